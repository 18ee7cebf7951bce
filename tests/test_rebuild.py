"""`velocity features rebuild` on real services (issue 17 section 1): a history streamed through a worker, the
test's own Redis keys deleted (Redis "restarted empty"), the store rebuilt from the archive (Parquet plus a live
worker's unrolled spool) and the offline snapshot; the online state then equals the oracle, and more events
(redeliveries included) continue the windows and the per-card arrival sequences as if nothing had happened."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pyarrow.parquet as pq
import pytest

from featurestore.entity import EntityKeyer
from stores.archive import read_archive, read_spools
from stores.redis_cluster_store import sync_client
from stores.redis_online import OnlineStore, delete_prefix
from tests import synthetic
from tests.conftest import REPO
from tests.helpers import wait_until
from tests.stream_harness import SECRET, Worker, wait_committed
from tests.test_stream_worker import RETAIN_ALL_MS, assert_archive_exactly_once, assert_online_equals_oracle

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _velocity(args: list[str], prefix: str, redis_port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "VELOCITY_ENTITY_SECRET": SECRET, "VELOCITY_REDIS_PORT": str(redis_port),
           "VELOCITY_REDIS_KEY_PREFIX": prefix}
    return subprocess.run([sys.executable, "-m", "velocity_cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _spooled(offline) -> int:
    return read_spools(offline / "archive").num_rows


def test_rebuild_after_redis_emptied_restores_windows_sequences_records_and_snapshot(
        services, make_topic, kafka_admin, key_prefix, redis_settings, tmp_path):
    from stores.kafka_topics import ensure_topics

    topic = make_topic("rebuild", partitions=4)
    ensure_topics(services["bootstrap"], {f"{topic}.dlq": 4})
    group, keyer, port = f"g-{uuid.uuid4().hex[:8]}", EntityKeyer(SECRET), services["redis_port"]

    def worker(name: str, roll_s: int | None = None) -> Worker:
        w = Worker(topic=topic, prefix=key_prefix, group=group, offline=tmp_path, bootstrap=services["bootstrap"],
                   redis_port=port, log=tmp_path / f"{name}.log", retention_ms=RETAIN_ALL_MS)
        if roll_s is not None:
            w.args += ["--archive-roll-s", str(roll_s)]
        return w

    rows = synthetic.history(n=3600, cards=40, seed=71)
    parts = rows[:1500], rows[1500:2600], rows[2600:]
    redelivered = rows[:150] + rows[1500:1650]  # already applied before the loss: must not count twice after it
    store = OnlineStore(redis_settings, prefix=key_prefix)
    try:
        # 1. Part one through a worker that stops cleanly: its spool is rolled into Parquet.
        synthetic.produce(services["bootstrap"], topic, parts[0], keyer)
        first = worker("first").start()
        try:
            wait_committed(kafka_admin, first, group, topic, services["bootstrap"])
        finally:
            assert first.stop() == 0, first.tail()
        # A nightly snapshot over the archive, published to this test's Redis prefix.
        batch = _velocity(["batch", "--engine", "duckdb", "--date", "2020-01-02", "--offline-dir", str(tmp_path),
                           "--skip-quality-gate"], key_prefix, port)
        assert batch.returncode == 0, batch.stderr
        # 2. Part two through a worker that stays up and never rolls: its rows are only in its spool.
        synthetic.produce(services["bootstrap"], topic, parts[1], keyer)
        second = worker("second", roll_s=3600).start()
        try:
            wait_committed(kafka_admin, second, group, topic, services["bootstrap"])
            assert _spooled(tmp_path) >= len(parts[1]), "part two should still be in the live worker's spool"
            cards = sorted({keyer(r["cc_num"]) for r in rows[:2600]})
            probe_ts = rows[2599]["ts"]
            before = {c: store.read_features(c, "__probe__", probe_ts, None) for c in cards}
            entries_before = store.snapshot_entries()
            assert entries_before, "the batch run should have published a snapshot"

            # 3. Redis "restarted empty": every key of this test's prefix is gone.
            client = sync_client(redis_settings)  # every master of a cluster
            assert delete_prefix(client, key_prefix) > 0
            client.close()
            assert store.card_state(cards[0]) == {} and store.snapshot_entries() == {}

            # 4. Rebuild from the archive (Parquet + the live worker's spool) and the offline snapshot.
            done = _velocity(["features", "rebuild", "--offline-dir", str(tmp_path), "--retention-ms",
                              str(RETAIN_ALL_MS)], key_prefix, port)
            assert done.returncode == 0, done.stderr
            assert "rebuilt 40 cards" in done.stderr and "snapshots restored: 2020-01-02" in done.stderr, done.stderr
            assert_online_equals_oracle(store, rows[:2600])
            archived = read_archive(tmp_path)  # Parquet only (part one); the spool's seqs come from the store
            spool = read_spools(tmp_path / "archive").to_pandas()
            seqs = {**dict(zip(archived["txn_id"], archived["seq"], strict=True)),
                    **dict(zip(spool["txn_id"], spool["seq"], strict=True))}
            by_card: dict[str, int] = {}
            for r in rows[:2600]:
                c = keyer(r["cc_num"])
                by_card[c] = max(by_card.get(c, 0), int(seqs[r["txn_id"]]))
            assert {c: int(store.card_state(c)["last_seq"]) for c in cards} == by_card
            after = {c: store.read_features(c, "__probe__", probe_ts, None) for c in cards}
            for c in cards:
                assert after[c].values == pytest.approx(before[c].values, nan_ok=True), c
                assert after[c].snapshot_cutoff_ms == before[c].snapshot_cutoff_ms
            assert {c: e.published_ms for c, e in store.snapshot_entries().items()} == \
                {c: e.published_ms for c, e in entries_before.items()}
            again = _velocity(["features", "rebuild", "--offline-dir", str(tmp_path), "--retention-ms",
                               str(RETAIN_ALL_MS), "--no-snapshots"], key_prefix, port)
            assert again.returncode == 0 and "0 written" in again.stderr, again.stderr  # idempotent

            # 5. More events, redeliveries of already-counted ones among them, into the same running worker.
            synthetic.produce(services["bootstrap"], topic, redelivered + parts[2], keyer)
            wait_committed(kafka_admin, second, group, topic, services["bootstrap"])
            wait_until(lambda: "features rebuild" in second.log.read_text(errors="replace"), timeout=30,
                       what="the running worker to report the emptied store and point to the rebuild")
        finally:
            assert second.stop() == 0, second.tail()
        whole = rows[:2600] + redelivered + parts[2]
        assert_online_equals_oracle(store, whole)
        assert_archive_exactly_once(tmp_path, whole)  # per card, seq order is arrival order across the loss
        table = pq.read_table(sorted((tmp_path / "snapshots").rglob("*.parquet"))[0])
        assert table.num_rows > 0
    finally:
        store.close()


@pytest.mark.integration
def test_api_reports_an_emptied_store_and_points_to_the_rebuild(redis_settings, key_prefix, caplog):
    """The API's watch on the worker's marker (serving.store_watch): gone or replaced -> one ERROR naming the
    rebuild and a counted metric; a marker that merely appears (first worker) is not a loss."""
    import asyncio
    import logging

    import redis.asyncio as aioredis
    from prometheus_client import CollectorRegistry

    from serving.store_watch import StoreLossWatch

    marker = f"{key_prefix}:meta:instance"
    registry = CollectorRegistry()

    async def scenario() -> list[bool]:
        from stores.redis_cluster_store import async_cluster_client

        client = (async_cluster_client(redis_settings) if redis_settings.cluster
                  else aioredis.Redis(**redis_settings.client_kwargs()))
        if redis_settings.cluster:
            await client.initialize()  # learn the slot table now, not inside the watch's first check below
        watch = StoreLossWatch("test-redis", registry, every_s=3600)
        watch.start(client, key_prefix)
        await asyncio.sleep(0.2)  # the first check: no marker yet
        got = []
        await client.set(marker, b"m1")
        got.append(await watch.check())  # appears: the first worker, not a loss
        await client.delete(marker)
        got.append(await watch.check())  # gone: lost
        await client.set(marker, b"m2")
        got.append(await watch.check())  # re-created after a reported loss: not reported twice
        await client.set(marker, b"m3")
        got.append(await watch.check())  # replaced: another loss, found first by a worker
        await watch.stop()
        await client.aclose()
        return got

    with caplog.at_level(logging.INFO, logger="serving.store_watch"):
        assert asyncio.run(scenario()) == [True, False, True, False]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all("LOST ITS DATA" in e and "velocity features rebuild" in e for e in errors)
    assert any("no marker" in r.getMessage() and "velocity features rebuild" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    assert registry.get_sample_value("velocity_api_redis_data_lost_total") == 2


@pytest.mark.integration
def test_rebuild_errors_are_one_clear_line(redis_settings, key_prefix, tmp_path):
    """Redis unreachable: exit 1; a damaged archive file: exit 2 naming it; nothing else printed, no traceback."""
    unreachable = _velocity(["features", "rebuild", "--offline-dir", str(tmp_path)], key_prefix, 1)
    assert unreachable.returncode == 1
    assert unreachable.stderr.strip().startswith("error: Redis at 127.0.0.1:1 is unreachable")
    assert "Traceback" not in unreachable.stderr and len(unreachable.stderr.strip().splitlines()) == 1
    bad = tmp_path / "archive" / "date=2020-01-01" / "part-x.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not parquet")
    damaged = _velocity(["features", "rebuild", "--offline-dir", str(tmp_path)], key_prefix,
                        redis_settings.port)
    assert damaged.returncode == 2 and str(bad) in damaged.stderr and "Traceback" not in damaged.stderr
    bad.unlink()  # a damaged snapshot file: the same
    snap = tmp_path / "snapshots" / "card_agg_1w" / "cutoff=2020-01-02" / "part-0.parquet"
    snap.parent.mkdir(parents=True)
    snap.write_bytes(b"PAR1 truncated")
    damaged = _velocity(["features", "rebuild", "--offline-dir", str(tmp_path)], key_prefix,
                        redis_settings.port)
    assert damaged.returncode == 2 and "Traceback" not in damaged.stderr, damaged.stderr
    assert str(snap) in damaged.stderr and "not a readable snapshot file" in damaged.stderr
