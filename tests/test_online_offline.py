"""Online equals offline: replay a history through the real stream worker, materialize the nightly snapshots,
then for every transaction the training row equals what the online store serves for it."""

from __future__ import annotations

import datetime as dt
import math
import uuid

import pytest

from batch.engines import open_engine, run_snapshots
from featurestore.entity import EntityKeyer
from featurestore.ratios import compute_ratios
from stores.kafka_topics import ensure_topics
from stores.offline_files import cutoff_ms_of
from stores.redis_online import OnlineStore
from tests import synthetic
from tests.stream_harness import SECRET, Worker, wait_committed

pytestmark = pytest.mark.integration
FEATURES = ("num_trans_last_10m", "avg_amt_last_10m", "num_trans_last_1w", "avg_amt_last_1w",
            "amt_ratio1", "amt_ratio2", "count_ratio")


def same(a: float, b: float) -> bool:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0)


def test_training_rows_equal_online_features_after_stream_replay(services, make_topic, redis_settings, key_prefix,
                                                                  tmp_path, kafka_admin):
    rows = synthetic.history(n=2500, cards=30, seed=41, mean_gap_ms=450_000, late=12, disorder=40)
    topic = make_topic("oo", partitions=4)
    ensure_topics(services["bootstrap"], {f"{topic}.dlq": 4})
    group = f"g-{uuid.uuid4().hex[:8]}"
    keyer = EntityKeyer(SECRET)
    synthetic.produce(services["bootstrap"], topic, rows, keyer)
    worker = Worker(topic=topic, prefix=key_prefix, group=group, offline=tmp_path,
                    bootstrap=services["bootstrap"], redis_port=services["redis_port"], log=tmp_path / "w.log",
                    retention_ms=60 * 86_400_000)
    worker.start()
    try:
        wait_committed(kafka_admin, worker, group, topic, services["bootstrap"])
    finally:
        assert worker.stop() == 0, worker.tail()

    store = OnlineStore(redis_settings, prefix=key_prefix)
    days = [dt.date(2020, 1, d) for d in range(2, 11)]
    eng = open_engine("duckdb", offline_dir=tmp_path, history=None, secret=SECRET)  # from the stream's archive
    # quality=None: the last nights lie after the stream's end, where the 1-day groups hold 0 cards (an outage
    # to the quality gate, which test_quality_gate.py tests); here online = offline is what is checked
    run_snapshots(eng, days, offline_dir=tmp_path, online=store, quality=None)
    frame = eng.training_set(cutoff_ms_of(dt.date(2020, 1, 1)), cutoff_ms_of(dt.date(2020, 2, 1)))
    eng.close()
    assert len(frame) == len({r["txn_id"] for r in rows})

    mismatches = []
    for row in frame.itertuples(index=False):
        f = store.read_features(row.card, row.txn_id, int(row.ts), round(row.amount * 100))
        online = {**f.as_dict(), "amount": row.amount}
        online.update(compute_ratios(online))
        for name in FEATURES:
            if not same(online[name], getattr(row, name)):
                mismatches.append((row.txn_id, name, online[name], getattr(row, name)))
    store.close()
    assert not mismatches, f"{len(mismatches)} differences, e.g. {mismatches[:5]}"
    assert frame["snapshot_cutoff_ms"].notna().sum() > len(frame) // 2
