"""`velocity consistency` (issue 15 section 3) on a real stream worker, a real API, real Kafka and Redis.

A history ending today gives today's snapshot (offline and online); the worker scores with a toy model. Cards send
transactions through POST /v1/score one at a time (each applied by the stream before the next: the API and the
stream must agree) and through /v1/score/batch two of one card at once (the API reads each alone, so the second
misses the first: an in-flight difference the report must explain). Then:
- the check reads 0 stream mismatches and exits 0;
- an offline computation with a changed window (a deliberate skew) is caught, feature by feature;
- a snapshot rewritten after the scores (a skew on the offline side) is caught by the CLI, exit 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from batch.consistency import ScoreRecord, check, parse_since, same_value, served_cutoff_ms
from featurestore.definitions import CARD_AGG_10M, DAY_MS, REGISTRY, Registry
from tests.conftest import REPO
from tests.helpers import wait_until
from tests.toy_models import save_model, toy_booster

SECRET = "consistency-test-secret"
MINUTE = 60_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# ------------------------------------------------------------------------------------------------ unit


@pytest.mark.unit
def test_values_agree_to_1e9_relative_and_missing_equals_missing_only():
    assert same_value(1.0, 1.0 + 1e-12)
    assert not same_value(1.0, 1.0 + 1e-6)
    assert same_value(None, float("nan"))
    assert not same_value(None, 0.0)
    assert not same_value(3.0, float("nan"))
    assert same_value(0.0, 0.0)


@pytest.mark.unit
def test_since_accepts_durations_iso_times_and_all():
    now = 1_800_000_000_000
    assert parse_since("30m", now) == now - 30 * MINUTE
    assert parse_since("2d", now) == now - 2 * DAY_MS
    assert parse_since("all", now) is None
    assert parse_since("2026-01-02T03:04:05", now) == int(dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
                                                          .timestamp() * 1000)
    with pytest.raises(ValueError, match="duration"):
        parse_since("yesterday", now)


@pytest.mark.unit
def test_served_snapshot_is_the_midnight_its_age_counts_from():
    midnight = 20_000 * DAY_MS
    rec = ScoreRecord("t", "api", "c", midnight + 5_000, midnight + 36_000_000,
                      {}, {"card_agg_1w": 36_000_000 - 40})
    assert served_cutoff_ms(rec, "card_agg_1w") == midnight
    assert ScoreRecord.parse(b'{"source": "batch"}') is None
    assert ScoreRecord.parse(b"not json") is None


# ------------------------------------------------------------------------------------------------ the stack


class Proc:
    def __init__(self, args: list[str], env: dict, log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "velocity_cli", *args], env=env, cwd=REPO,
                                         stdout=out, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Scores:
    """The test's own reader of the scores topic (from the beginning): answers by (txn_id, source)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaConsumer

        self.consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                      enable_auto_commit=False, consumer_timeout_ms=200)
        self.got: dict[tuple[str, str], dict] = {}

    def has(self, txn_id: str, source: str = "stream") -> bool:
        for m in self.consumer:
            rec = json.loads(m.value)
            self.got.setdefault((rec["txn_id"], rec["source"]), rec)
        return (txn_id, source) in self.got


@pytest.fixture(scope="module")
def stack(services, kafka_admin, redis_settings, tmp_path_factory):
    from kafka.admin import NewTopic

    from batch.engines import open_engine, run_snapshots
    from ingest.generate import GenerateConfig, generate_history, write_history
    from stores.kafka_topics import topic_configs
    from stores.redis_online import OnlineStore, delete_prefix

    folder = tmp_path_factory.mktemp("consistency")
    tag = uuid.uuid4().hex[:10]
    topics = {k: f"test.cons.{tag}.{k}" for k in ("transactions", "dlq", "scores", "alerts")}
    kafka_admin.create_topics([NewTopic(t, 4, 1, topic_configs=topic_configs()) for t in topics.values()])
    prefix = f"test:cons:{tag}"
    data = folder / "data"
    offline = data / "offline"
    today = dt.datetime.now(dt.UTC).date()
    hist = generate_history(GenerateConfig(cards=300, days=8, start=today - dt.timedelta(days=8), seed=3))
    history = data / "history.parquet"
    write_history(hist.table, history)
    store = OnlineStore(redis_settings, prefix=prefix)
    engine = open_engine("duckdb", offline_dir=offline, history=history, secret=SECRET)
    run_snapshots(engine, [today - dt.timedelta(days=1)], offline_dir=offline)
    run_snapshots(engine, [today], offline_dir=offline, online=store)
    engine.close()
    store.close()
    save_model(data / "models", "v1", toy_booster(5), threshold=0.5)
    env = {**os.environ, "VELOCITY_ENTITY_SECRET": SECRET, "VELOCITY_DATA_DIR": str(data),
           "VELOCITY_RUN_DIR": str(folder / "run"), "VELOCITY_REDIS_KEY_PREFIX": prefix,
           "VELOCITY_REDIS_PORT": str(services["redis_port"]), "VELOCITY_KAFKA_BOOTSTRAP": services["bootstrap"],
           "VELOCITY_KAFKA_TOPIC_TRANSACTIONS": topics["transactions"], "VELOCITY_KAFKA_TOPIC_DLQ": topics["dlq"],
           "VELOCITY_KAFKA_TOPIC_SCORES": topics["scores"], "VELOCITY_KAFKA_TOPIC_ALERTS": topics["alerts"],
           "VELOCITY_SERVE_MODEL_POLL_S": "0.2", "VELOCITY_SERVE_KAFKA_RETRY_S": "1"}
    port = free_port()
    worker = Proc(["stream", "--group", f"g-{tag}", "--metrics-port", str(free_port()), "--archive-roll-s", "1"],
                  env, folder / "worker.log")
    api = Proc(["serve", "--port", str(port)], env, folder / "api.log")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    scores = Scores(services["bootstrap"], topics["scores"])
    try:
        def ready() -> bool:
            api.alive()
            try:
                body = client.get("/readyz").json()
            except (httpx.HTTPError, ValueError):
                return False
            return body.get("ready") and body["kafka"]["state"] == "connected"

        wait_until(ready, timeout=90, interval=0.25, what="the API to be ready")
        pans = list(dict.fromkeys(hist.table.column("cc_num").to_pylist()))[:5]
        sent: list[dict] = []
        base = now_ms() - 4 * MINUTE
        # One at a time, 30 s apart in event time, each applied by the stream before the next is sent.
        for i, pan in enumerate(pans[:4]):
            for j in range(3):
                body = {"txn_id": f"c-{tag}-{i}-{j}", "cc_num": pan, "amount": round(20.0 + 7 * i + j, 2),
                        "ts": base + j * 30_000 + i, "merchant": "m", "category": "grocery_pos"}
                r = client.post("/v1/score", json=body)
                assert r.status_code == 200 and r.json()["published"], r.text
                sent.append(body)
                wait_until(lambda b=body: worker.alive() and scores.has(b["txn_id"]), timeout=90, interval=0.05,
                           what=f"the stream to score {body['txn_id']}")
        # Two of one card in one batch: the API reads each as if it arrived alone; the stream applies both.
        burst = [{"txn_id": f"c-{tag}-burst-{k}", "cc_num": pans[4], "amount": 12.5 + k, "ts": now_ms() - 5_000 + k,
                  "merchant": "m", "category": "misc_net"} for k in range(2)]
        r = client.post("/v1/score/batch", json=burst)
        assert r.status_code == 200, r.text
        sent += burst
        for b in burst:
            wait_until(lambda b=b: worker.alive() and scores.has(b["txn_id"]), timeout=60, interval=0.05,
                       what=f"the stream to score {b['txn_id']}")
        wait_until(lambda: all(scores.has(b["txn_id"], "api") for b in sent), timeout=30,
                   what="the API's score records")
        yield {"env": env, "offline": offline, "topics": topics, "sent": sent, "scores": scores.got,
               "bootstrap": services["bootstrap"], "folder": folder, "today": today}
    finally:
        scores.consumer.close()
        client.close()
        api.stop()
        worker.stop()
        import redis

        r = redis.Redis(**redis_settings.client_kwargs())
        delete_prefix(r, prefix)
        r.close()
        with contextlib.suppress(Exception):  # already gone is fine
            kafka_admin.delete_topics(list(topics.values()))


def run_cli(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "velocity_cli", "consistency", "--since", "1h", *args],
                          env={**stack["env"], "COLUMNS": "200"}, cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def _check(stack, **kw):
    return check(bootstrap=stack["bootstrap"], topic=stack["topics"]["scores"], offline_dir=stack["offline"],
                 secret=SECRET, allowed_lateness_ms=10 * MINUTE, since_ms=now_ms() - 3_600_000, **kw)


@pytest.mark.integration
def test_consistency_reads_zero_stream_mismatches_and_explains_the_api(stack):
    res = run_cli(stack)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "0 mismatches" in out, out
    # The burst's second transaction: the API read it alone, the stream counted the first one before it.
    second = stack["sent"][-1]["txn_id"]
    api = stack["scores"][(second, "api")]["features"]["num_trans_last_10m"]
    stream = stack["scores"][(second, "stream")]["features"]["num_trans_last_10m"]
    assert (api, stream) == (1, 2)
    assert "1 differ, 1 explained" in out, out
    assert second in out and "in flight" in out, out

    report = _check(stack)
    n = len(stack["sent"])
    assert (report.stream.compared, report.api.compared) == (n, n)
    assert report.stream.mismatches == 0 and report.exit_code == 0
    assert [r.record.txn_id for r in report.api.differing] == [second]
    assert report.api.differing[0].explained
    assert {d.feature for d in report.api.differing[0].diffs} >= {"num_trans_last_10m", "count_ratio"}
    # The check really compared the counts the stream served (1, 2, 3 per card), not a constant.
    counts = sorted(int(r.record.features["num_trans_last_10m"]) for r in report.stream.rows)
    assert counts == sorted([1, 2, 3] * 4 + [1, 2])


@pytest.mark.integration
def test_a_changed_window_in_the_offline_computation_is_caught(stack):
    groups = tuple(dataclasses.replace(g, window_ms=10_000) if g.name == CARD_AGG_10M.name else g
                   for g in REGISTRY.groups)
    skewed = Registry(groups=groups, ratios=REGISTRY.ratios, model_features=REGISTRY.model_features)
    report = _check(stack, registry=skewed)
    per = report.stream.per_feature()
    # The cards' 2nd and 3rd transactions were 30 s after the previous: a 10 s window no longer counts it.
    assert per["num_trans_last_10m"] == 8, per
    assert per["avg_amt_last_10m"] == 8 and per["count_ratio"] == 8 and per["amt_ratio1"] == 8, per
    assert per["amount"] == 0 and per["num_trans_last_1w"] == 0, per
    assert report.exit_code == 1 and not report.ok
    worst = report.stream.largest(1)[0]
    assert worst.feature in ("num_trans_last_10m", "avg_amt_last_10m", "amt_ratio1", "count_ratio")


@pytest.mark.integration
def test_a_snapshot_rebuilt_after_the_scores_is_caught_by_the_cli(stack, tmp_path):
    offline = tmp_path / "offline"
    shutil.copytree(stack["offline"], offline, symlinks=False)
    snap = offline / "snapshots" / "card_agg_1w" / f"cutoff={stack['today']}" / "part-0.parquet"
    table = pq.read_table(snap).to_pandas()
    table["count"] = table["count"] + 1
    table["num_trans_last_1w"] = table["count"].astype(np.int64)
    import pyarrow as pa

    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), snap)
    res = run_cli(stack, "--offline-dir", str(offline))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "num_trans_last_1w" in res.stdout and "skew" in res.stdout, res.stdout
    assert "rebuilt after this score" in res.stdout, res.stdout
