"""The dashboard's feed, in-process (serving/dashboard.py): bounded memory, dropped stalled pages, the live budget,
masking, clean disconnects, and Kafka down as a reported state. The page in a real browser: test_dashboard_e2e.py."""

from __future__ import annotations

import asyncio
import re
import time
import tomllib

import orjson
import pytest
from fastapi import FastAPI

from featurestore.config import KafkaSettings, Settings
from serving.dashboard import (
    BINS,
    Dashboard,
    DashboardSettings,
    EventStream,
    Page,
    compact,
    histogram_quantile,
    mask_card,
    page_html,
)
from tests.conftest import REPO
from tests.test_serving import free_port

pytestmark = pytest.mark.unit

KEY = "0123456789abcdef0123456789abcdef"


NOW = int(time.time() * 1000) // 1000 * 1000 + 500  # one fixed instant, mid-second


def record(i: int = 0, *, score: float = 0.1, decision: str = "NOT_FRAUD", source: str = "api",
           lag_ms: int = 5, now: int = NOW) -> bytes:
    return orjson.dumps({"txn_id": f"t-{i}", "card": KEY, "score": score, "decision": decision, "threshold": 0.5,
                         "model_version": "v1", "features": {"amount": 12.5, "num_trans_last_10m": 3,
                                                             "amt_ratio1": None, "amt_ratio2": 1.5,
                                                             "count_ratio": 0.2},
                         "source": source, "ts": now - lag_ms, "scored_at_ms": now})


def dashboard(bootstrap: str = "127.0.0.1:9", **cfg) -> Dashboard:
    settings = Settings(kafka=KafkaSettings(bootstrap=bootstrap, topic_scores="s", topic_alerts="a"))
    return Dashboard(FastAPI(), settings, DashboardSettings(**cfg))


def frames(page: Page) -> list[tuple[str, dict]]:
    out = []
    while not page.queue.empty():
        frame = page.queue.get_nowait()
        if frame is None:
            break
        event, data = re.match(rb"event: (\w+)\ndata: (.*)\n\n", frame).groups()
        out.append((event.decode(), orjson.loads(data)))
    return out


def test_the_page_is_one_self_contained_file_declared_as_package_data():
    html = page_html().decode()
    assert "<script>" in html and "EventSource(\"/dashboard/events\")" in html
    # Nothing from elsewhere: no CDN, no remote font, no import.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(http" not in html
    assert "innerHTML" not in html  # data reaches the DOM as text only (a txn_id is client input)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "serving.static" in pyproject["packages"] and "*.html" in pyproject["package-data"]["serving.static"]


def test_compact_shows_masked_tokens_only():
    rec = orjson.loads(record())
    rec["txn_id"] = "order 4111111111111111 retry"
    ev = compact(rec, "score")
    assert ev["card"] == KEY[:8] + "…" and "4111111111111111" not in orjson.dumps(ev).decode()
    assert ev["txn_id"] == "order ************1111 retry"
    assert compact({**rec, "txn_id": "dash-920044033411"}, "score")["txn_id"] == "dash-920044033411"  # not a PAN
    assert not re.search(r"[0-9]", mask_card("4111111111111111"))  # not an entity key: nothing of it shown
    assert ev["amt_ratio1"] is None and ev["amt_ratio2"] == 1.5 and ev["num_trans_last_10m"] == 3
    junk = compact({"score": "high", "decision": "MAYBE", "features": [1], "reasons": "x", "ts": 1.5}, "score")
    assert junk["score"] is None and junk["decision"] == "?" and junk["reasons"] == [] and junk["ts"] is None


def test_ring_buffers_and_figures_stay_bounded_and_count_everything():
    dash = dashboard(recent=10, live_per_s=5)
    page = Page(10_000)
    dash.pages.add(page)
    now = NOW
    t0 = time.monotonic()
    for i in range(1000):
        dash.ingest("s", record(i, score=(i % 100) / 100, decision="FRAUD" if i % 10 == 0 else "NOT_FRAUD"), now)
    for i in range(30):
        dash.ingest("a", record(i, score=0.9, decision="FRAUD", source="stream"), now)
    seconds = int(time.monotonic()) - int(t0) + 1  # the budget is per clock second
    dash.ingest("s", b"not json", now)
    dash.ingest("s", b"[1, 2]", now)
    assert len(dash.recent) == 10 and len(dash.recent_alerts) == 10
    assert dash.recent[-1]["txn_id"] == "t-999"
    s = dash.stats
    assert s.scores == 1000 and s.alerts == 30 and s.bad == 2
    assert sum(s.hist) == 1000 and len(s.hist) == BINS and s.decisions == {"FRAUD": 100, "NOT_FRAUD": 900}
    # At most live_per_s scores a second (and as many alerts) reach pages; all are counted.
    sent = frames(page)
    kinds = [e for e, _ in sent]
    assert 5 <= kinds.count("score") <= 5 * seconds and 5 <= kinds.count("alert") <= 5 * seconds
    assert s.shown == len(sent)
    snap = s.snapshot(now + 1000)  # complete seconds only
    assert sum(snap["series"]["api"]) == 1000 and len(snap["series"]["api"]) == 60
    assert snap["event_to_score_ms"]["api"]["p50"] == 5
    # Records from before the window (read back at start) are counted but not in the live figures.
    dash.ingest("s", orjson.dumps({**orjson.loads(record()), "scored_at_ms": now - 3_600_000}), now)
    assert s.scores == 1001 and sum(s.snapshot(now + 1000)["series"]["api"]) == 1000


def test_a_stalled_page_is_dropped_not_buffered():
    dash = dashboard()
    slow, fast = Page(4), Page(100)
    dash.pages |= {slow, fast}
    for i in range(10):
        dash.broadcast(f"event: x\ndata: {i}\n\n".encode())
    assert slow.closed and slow.reason == "stalled" and slow not in dash.pages
    assert slow.queue.qsize() <= 4
    assert fast in dash.pages and fast.queue.qsize() == 10


def test_histogram_quantile_interpolates_like_prometheus():
    bounds = [0.001, 0.002, 0.005, float("inf")]
    assert histogram_quantile(bounds, [0, 0, 0, 0], 0.5) is None
    assert histogram_quantile(bounds, [50, 100, 100, 100], 0.5) == pytest.approx(0.001)
    assert histogram_quantile(bounds, [0, 100, 100, 100], 0.5) == pytest.approx(0.0015)
    assert histogram_quantile(bounds, [0, 0, 0, 10], 0.99) == pytest.approx(0.005)


def test_kafka_down_is_reported_and_the_feed_stops_with_its_last_page():
    async def scenario():
        dash = dashboard(f"127.0.0.1:{free_port()}", retry_s=0.2, connect_timeout_s=1, idle_stop_s=0.1)
        page = dash.subscribe()
        deadline = time.monotonic() + 20
        states = []
        while time.monotonic() < deadline and "unavailable" not in states:
            frame = await page.next(1)
            if frame and frame.startswith(b"event: status"):
                states.append(orjson.loads(frame.split(b"data: ", 1)[1])["state"])
        assert "unavailable" in states, states
        assert "Kafka" in dash.detail or "connect" in dash.detail.lower(), dash.detail
        task = dash._task
        dash.unsubscribe(page)
        await asyncio.wait_for(asyncio.shield(task), 15)  # idle: the consumer stops by itself
        assert dash._task is None and dash.state == "idle"
        await dash.stop()

    asyncio.run(scenario())


def test_the_event_stream_ends_on_disconnect_and_on_shutdown():
    async def scenario():
        dash = dashboard(idle_stop_s=0.1)
        dash._run = _no_feed(dash)
        sent: list[dict] = []
        disconnect = asyncio.Event()

        async def receive():
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        stream = asyncio.create_task(EventStream(dash)({"type": "http"}, receive, send))
        await asyncio.sleep(0.05)
        assert len(dash.pages) == 1 and sent[0]["status"] == 200
        assert dict(sent[0]["headers"])[b"content-type"].startswith(b"text/event-stream")
        assert b"event: hello" in sent[1]["body"]
        disconnect.set()
        await asyncio.wait_for(stream, 2)
        assert not dash.pages

        # Shutdown ends open streams (uvicorn would otherwise wait for them) and refuses new ones.
        never = asyncio.Event()

        async def wait_forever():
            await never.wait()
            return {"type": "http.disconnect"}

        sent.clear()
        stream = asyncio.create_task(EventStream(dash)({"type": "http"}, wait_forever, send))
        await asyncio.sleep(0.05)
        assert len(dash.pages) == 1
        dash._shutdown_pages()
        await asyncio.wait_for(stream, 2)
        assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
        sent.clear()
        await EventStream(dash)({"type": "http"}, wait_forever, send)
        assert sent[0]["status"] == 503

    asyncio.run(scenario())


def _no_feed(dash: Dashboard):
    async def run():
        while not dash._idle():
            await asyncio.sleep(0.01)
        dash._task = None
    return run


def test_model_report_reads_the_model_directory(tmp_path):
    import json
    from types import SimpleNamespace

    folder = tmp_path / "models" / "v7"
    (folder / "plots").mkdir(parents=True)
    (folder / "plots" / "pr_curves.png").write_bytes(b"\x89PNG")
    (folder / "plots" / "notes.txt").write_text("x")
    row = {"aucpr": 0.7869, "roc_auc": 0.9687, "precision_at_threshold": float("nan"), "rows": 10, "frauds": 1}
    (folder / "metadata.json").write_text(json.dumps({
        "version": "v7", "device": "cpu", "imbalance": {"name": "scale_pos_weight", "negative_rate": 0.1},
        "threshold_rule": {"description": "the lowest threshold with FPR <= 0.1%"},
        "calibration": {"method": "isotonic", "params": {}},
        "split": {"train": ["2026-11-02", "2026-11-24"], "counts": {}},
        "metrics": {"model": {"test": row, "validation": row}, "amount_only": {"test": {**row, "aucpr": 0.01}},
                    "original_four": {"test": {**row, "aucpr": 0.63}}}}))
    dash = dashboard()
    model = SimpleNamespace(version="v7", threshold=0.0847, features=("amount", "count_ratio"))
    dash.app.state.watcher = SimpleNamespace(current=model, problem=None,
                                             source=SimpleNamespace(root=tmp_path / "models"))
    report = orjson.loads(orjson.dumps(dash.model_report()))
    assert report["loaded"] and report["version"] == "v7" and report["threshold"] == 0.0847
    assert [m["model"] for m in report["metrics"]] == ["model", "original_four", "amount_only"]
    assert report["metrics"][0]["aucpr"] == 0.7869 and report["metrics"][0]["precision_at_threshold"] is None
    assert report["imbalance"] == "scale_pos_weight" and report["calibration"] == "isotonic"
    assert report["split"] == {"train": ["2026-11-02", "2026-11-24"]} and report["plots"] == ["pr_curves.png"]
    assert dash.model_folder("../v7") is None and dash.model_folder("v8") is None
    dash.app.state.watcher.current = None
    assert dash.model_report()["loaded"] is False
