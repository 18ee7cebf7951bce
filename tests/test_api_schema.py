"""The scoring API against its own OpenAPI document (issue 14): Schemathesis generates requests from /openapi.json,
valid and invalid, for every documented operation, and checks each answer against the document on a real server
process (real Redis and Kafka, its own key prefix and topics, a toy model).

Failing: any 5xx, an answer whose status code, content type, headers or body the document does not declare, a
valid request refused, an invalid one accepted. Bounded: a few dozen examples per operation, a deadline per example.
"""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.api_harness import isolated_api
from tests.test_serving import PANS, body

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

EXAMPLES = 30
DAY_MS = 86_400_000


def _luhn_fixed(digits: str) -> str:
    """The same digits with the last one replaced by the valid Luhn check digit."""
    total = 0
    for i, ch in enumerate(reversed(digits[:-1])):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return digits[:-1] + str((10 - total % 10) % 10)


def _realistic_item(item) -> None:
    if not isinstance(item, dict):
        return
    cc = item.get("cc_num")
    if isinstance(cc, str) and cc.isascii() and cc.isdigit() and len(cc) >= 12:
        item["cc_num"] = _luhn_fixed(cc)
    for name in ("ts", "labeled_at"):  # at most a day ahead of now
        ts = item.get(name)
        if type(ts) in (int, float) and ts > time.time() * 1000 + DAY_MS / 2:
            item[name] = int(time.time() * 1000)


def realistic(case):
    """What JSON Schema cannot say about a valid request, applied to a generated valid one: the card number's
    last digit is its Luhn check digit, and `ts` is at most a day ahead of now (both in the fields' descriptions)."""
    body = case.body
    for item in body if isinstance(body, list) else [body]:
        _realistic_item(item)
    return case


@pytest.fixture(scope="module")
def api(services, kafka_admin, tmp_path_factory):
    """A server process with its own Redis prefix, topics and model directory, and a few cards with history."""
    with isolated_api(services, kafka_admin, tmp_path_factory.mktemp("api-schema"), "schema",
                      topics=("transactions", "scores", "labels"), env={"VELOCITY_SERVE_MAX_BATCH": "8"}) as stack:
        for pan in PANS[:3]:  # cards with stored transactions, so generated reads find something
            assert stack["client"].post("/v1/score", json=body(pan)).status_code == 200
        yield stack["server"]


def _run_operation(op, mode: GenerationMode, base_url: str, seen: dict[tuple[str, str, int], int]) -> None:
    """Generated requests for one operation; raises what Schemathesis finds (a failure group)."""
    from hypothesis import given

    strategy = op.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE:
        strategy = strategy.map(realistic)

    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=10_000, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None, print_blob=False)
    def check(case):
        response = case.call_and_validate(base_url=base_url, timeout=10)
        key = (op.label, mode.value, response.status_code // 100)
        seen[key] = seen.get(key, 0) + 1

    check()


def test_every_operation_conforms_to_its_openapi_document(api):
    """Each documented operation, with valid (positive) and invalid (negative) generated requests.

    Driven from inside one test with Schemathesis's public strategies (`APIOperation.as_strategy`), so a pytest
    upgrade cannot break the plumbing; every failure of every operation is reported at once."""
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /v1/score", "POST /v1/score/batch", "GET /v1/features/{card}", "POST /v1/features", "GET /healthz",
        "GET /readyz", "GET /metrics", "POST /v1/labels"}
    failures: dict[str, str] = {}
    seen: dict[tuple[str, str, int], int] = {}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _run_operation(op, mode, api.url, seen)
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, op.label  # nothing to make invalid (no parameters, no body)
            except (Exception, BaseExceptionGroup) as exc:  # a failure group names the checks and the request
                failures[f"{op.label} ({mode.value})"] = str(exc)[:6000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    # Valid requests were scored; invalid ones refused (the checks above already hold each answer to the document).
    for label in ("POST /v1/score", "POST /v1/score/batch", "POST /v1/features", "GET /v1/features/{card}",
                  "POST /v1/labels"):
        assert seen.get((label, "positive", 2), 0) >= EXAMPLES // 2, (label, seen)
        assert seen.get((label, "negative", 4), 0) >= EXAMPLES // 2, (label, seen)
    for label in ("GET /healthz", "GET /readyz", "GET /metrics"):
        assert seen.get((label, "positive", 2)), (label, seen)
    log = api.log.read_text()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
