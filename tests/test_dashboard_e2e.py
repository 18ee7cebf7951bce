"""The live dashboard in a real browser (issue 15 section 4): Debian's headless Chromium, driven by Playwright.

A real `velocity serve` process on real Redis and Kafka (its own key prefix and topics) serves the page; the test
opens it, scores transactions through POST /v1/score, and waits for each to appear on the page with the decision
and score the API answered, read back from the `scores` topic over server-sent events. A model switch must reach
the page, an alert produced to the `alerts` topic must show, and with Kafka unreachable the page must say so while
still showing the API's own latency. A screenshot is kept under .velocity/artifacts/ (the path is printed).

Chromium comes from the OS (`scripts/system-deps.sh` installs it); `playwright install` is never run.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from tests.api_harness import Server, free_port, isolated_api
from tests.conftest import REPO
from tests.helpers import wait_until
from tests.synthetic import luhn_pan
from tests.test_serving import body
from tests.toy_models import save_model, toy_booster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / ".velocity" / "artifacts"
SCREENSHOT = ARTIFACTS / "dashboard.png"
RNG = np.random.default_rng(15)
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/system-deps.sh` (installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"])
        yield chromium
        chromium.close()


def _with_report(folder: Path, aucpr: float) -> None:
    """Give a toy model directory what `velocity train` records for its report: metrics, split, rule, a plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta_path = folder / "metadata.json"
    meta = json.loads(meta_path.read_text())
    row = {"aucpr": aucpr, "roc_auc": 0.9711, "recall_at_fpr_0_1pct": 0.7, "recall_at_fpr_1pct": 0.8,
           "precision_at_threshold": float("nan"), "recall_at_threshold": 0.75, "brier": 0.0008, "rows": 1000,
           "frauds": 10}
    meta.update({
        "created_at": "2026-11-30T00:00:00Z", "device": "cpu", "imbalance": "none",
        "threshold_rule": {"rule": "max_fpr", "max_fpr": 0.001, "description": "test rule"},
        "split": {"train": ["2026-11-01", "2026-11-20"], "validation": ["2026-11-20", "2026-11-25"],
                  "test": ["2026-11-25", "2026-11-30"]},
        "metrics": {"model": {"test": row}, "original_four": {"test": {**row, "aucpr": 0.5907}},
                    "amount_only": {"test": {**row, "aucpr": 0.0168}}},
    })
    meta_path.write_text(json.dumps(meta))  # NaN as Python writes it, as metadata.json may hold
    (folder / "plots").mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(folder / "plots" / "pr_curves.png")
    plt.close(fig)


@pytest.fixture(scope="module")
def stack(services, kafka_admin, tmp_path_factory):
    with isolated_api(services, kafka_admin, tmp_path_factory.mktemp("dashboard"), "dash",
                      topics=("transactions", "scores", "alerts", "dlq"), threshold=0.5) as api:
        yield api


def _ms_text():
    import re

    return re.compile(r"^[0-9.]+ ms$")


def _open(browser, url: str):
    """A page that records console errors, uncaught exceptions, and every URL it requests."""
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    seen = {"errors": [], "requests": []}
    page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.goto(url + "/")
    return page, seen


def _score(client: httpx.Client, pan: str, **extra) -> dict:
    r = client.post("/v1/score", json=body(pan, f"dash-{uuid.uuid4().hex[:12]}", **extra))
    assert r.status_code == 200, r.text
    return r.json()


def _row_shows(page, answer: dict) -> None:
    from playwright.sync_api import expect

    row = page.locator(f'#scores-body tr[data-txn-id="{answer["txn_id"]}"]')
    expect(row).to_have_count(1, timeout=TIMEOUT_MS)
    expect(row.locator("td.decision")).to_have_text(answer["decision"].replace("_", " "))
    expect(row).to_have_attribute("data-decision", answer["decision"])
    expect(row.locator("td.score")).to_have_text(f"{answer['score']:.4f}")
    expect(row.locator("td.card")).to_have_text(answer["card"][:8] + "…")
    expect(row.locator("td.n10m")).to_have_text(str(int(answer["features"]["num_trans_last_10m"])))


def test_a_scored_transaction_appears_live_with_its_decision(browser, stack):
    from playwright.sync_api import expect

    server, client = stack["server"], stack["client"]
    pan = luhn_pan(RNG)
    page, seen = _open(browser, server.url)
    try:
        expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=TIMEOUT_MS)
        expect(page.locator("#model-version")).to_have_text("v1")

        # 1. A transaction through the API appears with the decision and score the API answered.
        first = _score(client, pan, amount=42.5)
        assert first["decision"] == "NOT_FRAUD" and first["model_version"] == "v1"
        _row_shows(page, first)

        # 2. A new current model (threshold low enough that the same card is now FRAUD) reaches the API and the
        #    page, with its report figures and plot.
        from model.registry import use

        folder = save_model(stack["models"], "v2", toy_booster(1), threshold=0.001, make_current=False)
        _with_report(folder, aucpr=0.8123)
        use("v2", stack["models"])  # what `velocity models use v2` does
        wait_until(lambda: client.get("/readyz").json()["model"]["version"] == "v2", timeout=30,
                   what="the API to load model v2")
        second = _score(client, pan, amount=7.25)
        assert second["decision"] == "FRAUD" and second["model_version"] == "v2"
        _row_shows(page, second)
        expect(page.locator("#model-version")).to_have_text("v2", timeout=TIMEOUT_MS)
        expect(page.locator('#model-metrics tr[data-model="model"] td[data-metric="aucpr"]')).to_have_text("0.8123")
        expect(page.locator('#model-metrics tr[data-model="original_four"] td[data-metric="aucpr"]')).to_have_text(
            "0.5907")
        page.wait_for_function("() => { const i = document.querySelector('#model-plots img');"
                               " return i && i.complete && i.naturalWidth > 0; }", timeout=TIMEOUT_MS)

        # 3. What the stream scorer produces to `alerts` (its answer, source stream) shows as an alert.
        from kafka import KafkaProducer

        alert = {**second, "txn_id": f"dash-alert-{uuid.uuid4().hex[:8]}", "source": "stream",
                 "ts": int(time.time() * 1000) - 40, "scored_at_ms": int(time.time() * 1000)}
        producer = KafkaProducer(bootstrap_servers=stack["bootstrap"])
        producer.send(stack["topics"]["alerts"], orjson.dumps(alert), key=second["card"].encode()).get(timeout=30)
        producer.close()
        expect(page.locator(f'#alerts li[data-txn-id="{alert["txn_id"]}"]')).to_contain_text(
            "FRAUD", timeout=TIMEOUT_MS)

        # 4. Throughput, decisions and the API's latency reach the page.
        expect(page.locator("#frauds")).to_have_text("1", timeout=TIMEOUT_MS)
        expect(page.locator("#decisions-more")).to_contain_text("1 NOT FRAUD")
        expect(page.locator("#api-p50")).to_have_text(_ms_text(), timeout=TIMEOUT_MS)
        expect(page.locator("#hist-legend")).to_contain_text("2 scores")

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        print(f"\ndashboard screenshot: {SCREENSHOT}")
        assert SCREENSHOT.stat().st_size > 10_000

        content = page.content()
        assert pan not in content and pan[:8] not in content, "a card number reached the page"
        assert not seen["errors"], f"errors in the page: {seen['errors']}"
        foreign = [u for u in seen["requests"] if not u.startswith(server.url) and not u.startswith("data:")]
        assert not foreign, f"the page fetched from elsewhere: {foreign}"
    except BaseException:
        with contextlib.suppress(Exception):
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard-failure.png"), full_page=True)
            print(f"\nfailure screenshot: {ARTIFACTS / 'dashboard-failure.png'}; server log: "
                  f"{stack['folder'] / 'server.log'}")
        raise
    finally:
        page.close()
    # The closed tab's stream ended with it: a new stream is the only page the API holds.
    wait_until(lambda: _pages_seen_by_a_new_stream(client) == 1, timeout=10, what="the closed page's stream to end")


def _pages_seen_by_a_new_stream(client: httpx.Client) -> int:
    with client.stream("GET", "/dashboard/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                return json.loads(line[6:])["status"]["pages"]
    raise AssertionError("the stream ended before its hello")


def test_with_kafka_unreachable_the_page_says_so_and_keeps_scoring_figures(browser, stack, tmp_path):
    from playwright.sync_api import expect

    closed = free_port()  # nothing listens there
    env = {**stack["env"], "VELOCITY_KAFKA_BOOTSTRAP": f"127.0.0.1:{closed}", "VELOCITY_DASHBOARD_RETRY_S": "1",
           "VELOCITY_DASHBOARD_CONNECT_TIMEOUT_S": "2"}
    server = Server(env=env, log=tmp_path / "server.log").start()
    try:
        page, seen = _open(browser, server.url)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            status = page.locator("#status")
            expect(status).to_have_attribute("data-state", "unavailable", timeout=TIMEOUT_MS)
            expect(status).to_contain_text("Kafka unavailable")
            expect(status).to_contain_text("scores are still answered")
            answer = _score(client, luhn_pan(RNG))
            assert answer["published"] is False
            # Not on the feed (it comes from Kafka), but the API's own figures still are.
            expect(page.locator("#api-p50")).to_have_text(_ms_text(), timeout=TIMEOUT_MS)
            assert page.locator(f'#scores-body tr[data-txn-id="{answer["txn_id"]}"]').count() == 0
        page.screenshot(path=str(tmp_path / "kafka-down.png"))
        assert not [e for e in seen["errors"] if "dashboard/events" not in e], seen["errors"]
        page.close()
    finally:
        server.stop()
