#!/usr/bin/env bash
# `make demo` ends here, after the install and `velocity services up`: `velocity demo` runs the product end to end
# on real Kafka and Redis (history ending today -> nightly snapshots -> `velocity train` -> stream worker + API) and
# tells the seed's fraud story through the HTTP endpoint (SPEC section 9). Flags pass through:
#   make demo DEMO_ARGS="--keep-running --json story.json"      or      bash scripts/demo.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/velocity demo "$@"
