# Everything installs into .venv/ at the repo root; .venv/bin/velocity is the CLI.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install services-up services-down status test test-unit test-fast demo lint bench clean

$(STAMP): pyproject.toml requirements.lock scripts/system-deps.sh
	@echo "==> system packages (Python 3.11, Java 17+, Maven, redis-server)"
	@PYTHON=$(PYTHON) bash scripts/system-deps.sh
	@echo "==> Python packages into $(VENV)/ (pinned in requirements.lock; a few minutes the first time)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	@$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	@echo "==> velocity (editable) -> $(BIN)/velocity"
	@$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

services-up: install
	$(BIN)/velocity services up

services-down:
	$(BIN)/velocity services down

status:
	$(BIN)/velocity services status

## Sets up everything, starts Kafka and Redis, and runs the whole test suite against them.
test: services-up
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

## The edit loop: pure tests (no services) in about a minute.
test-fast: test-unit

## Runs the product end to end on real Kafka and Redis and tells the seed's story: ends in `velocity demo`
## (flags: make demo DEMO_ARGS="--keep-running --json story.json").
DEMO_ARGS ?=
demo: services-up
	bash scripts/demo.sh $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
