"""Arrival order end to end: it is the worker's per-card sequence, not the Kafka offset, so it survives a recreated
topic; and a history file's row order is its stream order, so replay-then-archive equals `--history`."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import uuid

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.engines import open_engine, run_snapshots
from featurestore.entity import EntityKeyer
from stores.archive import read_archive
from stores.kafka_topics import ensure_topics
from stores.offline_files import cutoff_ms_of
from stores.redis_online import OnlineStore
from tests import oracle, synthetic
from tests.conftest import REPO
from tests.helpers import wait_until
from tests.stream_harness import SECRET, Worker, wait_committed

pytestmark = pytest.mark.integration
W = 600_000


def _worker(services, topic, prefix, group, offline) -> Worker:
    return Worker(topic=topic, prefix=prefix, group=group, offline=offline, bootstrap=services["bootstrap"],
                  redis_port=services["redis_port"], log=offline / "worker.log", retention_ms=60 * 86_400_000)


def _consume_all(services, kafka_admin, topic, prefix, group, offline) -> None:
    """Run a worker until its group has committed the whole topic, then stop it cleanly."""
    worker = _worker(services, topic, prefix, group, offline).start()
    try:
        wait_committed(kafka_admin, worker, group, topic, services["bootstrap"])
    finally:
        assert worker.stop() == 0, worker.tail()


def _recreate(kafka_admin, topic: str, partitions: int) -> None:
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    from stores.kafka_topics import topic_configs

    kafka_admin.delete_topics([topic])
    wait_until(lambda: topic not in kafka_admin.list_topics(), timeout=30, what=f"{topic} to be deleted")

    def created() -> bool:
        try:
            kafka_admin.create_topics([NewTopic(topic, partitions, 1, topic_configs=topic_configs())])
        except TopicAlreadyExistsError:
            return topic in kafka_admin.list_topics()
        except Exception:  # the deletion is still being completed
            return False
        return True

    wait_until(created, timeout=30, interval=0.5, what=f"{topic} to be created again")


def test_recreated_topic_with_other_partition_count_loses_nothing(services, make_topic, kafka_admin,
                                                                 redis_settings, key_prefix, tmp_path):
    """New events at offsets the old topic already used are applied, not mistaken for redeliveries; a changed
    partition count does not reorder a card."""
    rows = synthetic.history(n=1600, cards=20, seed=5, mean_gap_ms=60_000)
    first, second = rows[:800], rows[800:]
    topic = make_topic("recreate", partitions=4)
    ensure_topics(services["bootstrap"], {f"{topic}.dlq": 4})
    group = f"g-{uuid.uuid4().hex[:8]}"
    keyer = EntityKeyer(SECRET)
    synthetic.produce(services["bootstrap"], topic, first, keyer)
    _consume_all(services, kafka_admin, topic, key_prefix, group, tmp_path)

    _recreate(kafka_admin, topic, partitions=2)
    synthetic.produce(services["bootstrap"], topic, second, keyer)
    _consume_all(services, kafka_admin, topic, key_prefix, group, tmp_path)

    store = OnlineStore(redis_settings, prefix=key_prefix)
    want = oracle.window_10m(synthetic.arrivals(rows, keyer), W)
    try:
        bad = [(r.txn_id, (f.num_trans_last_10m, f.sum_cents_last_10m), (r.count, r.sum_cents))
               for r in want
               for f in [store.read_features(r.card, r.txn_id, r.ts, r.amount_cents)]
               if (f.num_trans_last_10m, f.sum_cents_last_10m) != (r.count, r.sum_cents)]
    finally:
        store.close()
    assert not bad, f"{len(bad)} of {len(want)} differ, e.g. {bad[:5]}"
    archived = read_archive(tmp_path)
    assert sorted(archived["txn_id"]) == sorted(r["txn_id"] for r in rows)


def test_replay_then_archive_equals_training_set_from_the_history_file(services, make_topic, kafka_admin,
                                                                      key_prefix, tmp_path):
    """`velocity replay` sends a file in its row order (out-of-order and late rows included), the worker archives
    it, and the training rows built from that archive equal the ones built from the file with --history."""
    rows = synthetic.history(n=1500, cards=25, seed=23, mean_gap_ms=400_000, late=10, disorder=40)
    history = tmp_path / "history.parquet"
    pq.write_table(pa.Table.from_pylist(rows), history)
    topic = make_topic("replay", partitions=4)
    ensure_topics(services["bootstrap"], {f"{topic}.dlq": 4})
    group = f"g-{uuid.uuid4().hex[:8]}"
    env = {"VELOCITY_ENTITY_SECRET": SECRET, "VELOCITY_KAFKA_BOOTSTRAP": services["bootstrap"]}
    done = subprocess.run([sys.executable, "-m", "velocity_cli", "replay", "--input", str(history), "--topic", topic,
                           "--speed", "max"], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    offline = tmp_path / "offline"
    offline.mkdir()
    _consume_all(services, kafka_admin, topic, key_prefix, group, offline)

    frames = {}
    days = [dt.date(2020, 1, d) for d in range(2, 8)]
    for source, hist in (("archive", None), ("history", history)):
        root = tmp_path / source
        if source == "archive":
            root = offline
        eng = open_engine("duckdb", offline_dir=root, history=hist, secret=SECRET)
        # past nights: published on time, visible to both. quality=None: the last nights lie after the stream's
        # end, where the 1-day groups hold 0 cards (an outage to the gate, tested in test_quality_gate.py)
        run_snapshots(eng, days, offline_dir=root, quality=None)
        frames[source] = eng.training_set(cutoff_ms_of(dt.date(2020, 1, 1)), cutoff_ms_of(dt.date(2020, 2, 1)))
        eng.close()
    assert len(frames["archive"]) == len(rows)
    pd.testing.assert_frame_equal(frames["archive"], frames["history"], check_exact=False, rtol=1e-12, atol=0)
    # The file really was out of order, and its late rows reached the training set with their own windows.
    assert any(a["ts"] > b["ts"] for a, b in zip(rows, rows[1:], strict=False))
    late = [r for r in oracle.window_10m(synthetic.arrivals(rows, EntityKeyer(SECRET)), W) if r.late]
    assert late and set(r.txn_id for r in late) <= set(frames["history"]["txn_id"])


def _features_get(prefix: str, redis_port: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VELOCITY_REDIS_KEY_PREFIX": prefix, "VELOCITY_REDIS_PORT": str(redis_port),
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "velocity_cli", "features", "get", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def _count_shown(out: str) -> int:
    line = next(ln for ln in out.splitlines() if "num_trans_last_10m" in ln)
    return int(line.replace("│", " ").split()[-1])


@pytest.mark.e2e
def test_features_get_reads_a_stored_transaction_as_scored_and_refuses_beyond_retention(services, online_store):
    from featurestore.state import EventWrite

    store, card, t = online_store, "f" * 32, 1_600_000_000_000
    store.retention = 2 * W
    # "late-arrival" arrives after "first" with an earlier ts: "first" was scored without it, and it without "first".
    store.apply_events([EventWrite(card, "first", t, 1000), EventWrite(card, "late-arrival", t - 1000, 500)])
    prefix, port = store.keys.prefix, services["redis_port"]
    as_scored = _features_get(prefix, port, card, "--txn", "late-arrival", "--at", str(t))
    assert as_scored.returncode == 0, as_scored.stderr
    assert _count_shown(as_scored.stdout) == 1
    now_view = _features_get(prefix, port, card, "--at", str(t))
    assert now_view.returncode == 0 and _count_shown(now_view.stdout) == 2  # everything arrived so far
    store.apply_events([EventWrite(card, "much-later", t + 5 * W, 100)])  # trims what is older than t + 3W
    old = _features_get(prefix, port, card, "--at", str(t))
    assert old.returncode == 1 and "older than what the online store still holds" in old.stderr
