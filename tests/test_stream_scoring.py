"""Stream scoring end to end: the worker scores every transaction after its window update with the current model,
and every answer on `scores` carries exactly the features of that transaction's training row (online/offline
agreement on a replayed stream with out-of-order and late events), FRAUD decisions also on `alerts`."""

from __future__ import annotations

import datetime as dt
import math
import uuid

import numpy as np
import orjson
import pytest
from kafka import KafkaConsumer

from batch.engines import open_engine, run_snapshots
from featurestore.definitions import REGISTRY
from featurestore.entity import EntityKeyer
from stores.kafka_topics import ensure_topics
from stores.offline_files import cutoff_ms_of
from stores.redis_online import OnlineStore
from tests import synthetic
from tests.helpers import wait_until
from tests.stream_harness import SECRET, Worker, wait_committed
from tests.toy_models import save_model, toy_booster

pytestmark = pytest.mark.integration


def consume_all(bootstrap: str, topic: str, want: int, timeout: float = 60.0) -> list:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=1000)
    got: list = []
    try:
        wait_until(lambda: got.extend(consumer) or len(got) >= want, timeout=timeout, interval=0.1,
                   what=f"{want} messages on {topic}")
    finally:
        consumer.close()
    return got


def test_stream_scores_equal_training_rows_and_alerts_follow_the_threshold(services, make_topic, kafka_admin,
                                                                          redis_settings, key_prefix, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = synthetic.history(n=1200, cards=20, seed=61, mean_gap_ms=300_000, late=8, disorder=30)
    keyer = EntityKeyer(SECRET)
    history = tmp_path / "history.parquet"
    pq.write_table(pa.Table.from_pylist(rows), history)
    offline = tmp_path / "offline"
    # The nightly snapshots exist before the stream runs (backfilled, published on time), online and offline.
    store = OnlineStore(redis_settings, prefix=key_prefix)
    eng = open_engine("duckdb", offline_dir=offline, history=history, secret=SECRET)
    # quality=None: the stream ends on Jan 3, so later nights' 1-day groups hold 0 cards (an outage to the gate,
    # tested in test_quality_gate.py)
    run_snapshots(eng, [dt.date(2020, 1, d) for d in range(2, 7)], offline_dir=offline, online=store, quality=None)
    eng.close()
    models = tmp_path / "models"
    booster = toy_booster(3)
    save_model(models, "v1", booster, threshold=0.3)

    topic = make_topic("scoring", partitions=4)
    scores, alerts = make_topic("scores", partitions=4), make_topic("alerts", partitions=4)
    ensure_topics(services["bootstrap"], {f"{topic}.dlq": 4})
    group = f"g-{uuid.uuid4().hex[:8]}"
    synthetic.produce(services["bootstrap"], topic, rows, keyer)
    worker = Worker(topic=topic, prefix=key_prefix, group=group, offline=offline, bootstrap=services["bootstrap"],
                    redis_port=services["redis_port"], log=tmp_path / "worker.log", retention_ms=60 * 86_400_000,
                    score={"scores": scores, "alerts": alerts, "models_dir": models}).start()
    try:
        wait_committed(kafka_admin, worker, group, topic, services["bootstrap"])
        assert worker.metric("velocity_stream_scored_total") == len(rows)
    finally:
        assert worker.stop() == 0, worker.tail()
    store.close()

    answers = {a["txn_id"]: a for a in (orjson.loads(m.value) for m in consume_all(services["bootstrap"], scores,
                                                                                     len(rows)))}
    assert len(answers) == len(rows)
    eng = open_engine("duckdb", offline_dir=offline, history=None, secret=SECRET)  # from the stream's archive
    frame = eng.training_set(cutoff_ms_of(dt.date(2020, 1, 1)), cutoff_ms_of(dt.date(2020, 2, 1)))
    eng.close()
    compared = [n for n in REGISTRY.all_features if n in frame.columns]
    bad = []
    for row in frame.to_dict("records"):
        a = answers[row["txn_id"]]
        assert a["source"] == "stream" and a["model_version"] == "v1"
        for name in compared:
            want, got = row[name], a["features"][name]
            same = (got is None and (want is None or math.isnan(want))) or (
                got is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=0))
            if not same:
                bad.append((row["txn_id"], name, got, want))
    assert not bad, f"{len(bad)} features differ from the training rows, e.g. {bad[:5]}"
    assert frame["num_trans_last_1w"].notna().sum() > len(frame) // 2  # the snapshots were really used
    # The score is the model's, on the training row's features in the model's order; alerts are its FRAUDs.
    x = frame[list(REGISTRY.model_features)].to_numpy(dtype=np.float32)
    want_scores = booster.inplace_predict(x)
    got_scores = np.array([answers[t]["score"] for t in frame["txn_id"]])
    assert np.allclose(got_scores, want_scores, rtol=1e-6, atol=1e-7)
    frauds = {t for t, s in zip(frame["txn_id"], got_scores, strict=True) if s >= 0.3}
    alerted = {orjson.loads(m.value)["txn_id"] for m in consume_all(services["bootstrap"], alerts, len(frauds))} \
        if frauds else set()
    assert alerted == frauds and frauds, "every FRAUD answer, and only those, is an alert"
