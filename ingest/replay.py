"""`velocity replay`: produce a history file to Kafka in event-time order, keyed by entity key.

kafka-python checksums every record batch with CRC-32C; without the `crc32c` C extension it falls back to a
pure-Python CRC that alone caps a process near 36k messages/s, so `crc32c` is a pinned dependency and a missing
one is logged. The replay shards by partition over a few forked processes (each partition stays in one process,
so per-card order is kept), and computes each card's partition once with Kafka's own murmur2 partitioner, so
keys land exactly where any other Kafka producer would put them.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from featurestore.entity import EntityKeyer

log = logging.getLogger(__name__)


@dataclass
class ReplayStats:
    sent: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    last_index: int = -1  # row index (in the input) of the last row handed to the producer
    interrupted: bool = False
    first_error: str | None = None
    broker_errors: int = 0  # kafka-python connection/metadata errors seen (outages are retried, then reported)

    @property
    def tps(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s else 0.0


class _BrokerTrouble(logging.Handler):
    """Turns kafka-python's per-attempt connection warnings into one throttled line of ours, and counts them.

    During an outage kafka-python logs every reconnect attempt; the user needs to know the broker is gone and
    that rows are being held and retried, not a screenful of ECONNREFUSED.
    """

    def __init__(self, shard_id: int, every_s: float = 5.0) -> None:
        super().__init__(logging.WARNING)
        self.shard_id = shard_id
        self.every_s = every_s
        self.count = 0
        self._last = float("-inf")

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            log.warning("producer %d: Kafka unreachable or erroring (%s); holding rows and retrying with backoff",
                        self.shard_id, record.getMessage()[:160])


def partition_for(key: bytes, partitions: int) -> int:
    from kafka.partitioner.default import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


def native_crc_available() -> bool:
    """True when kafka-python checksums record batches with the `crc32c` C extension, not its Python fallback."""
    from kafka.record import util

    return util.crc32c_c is not None


def _producer(bootstrap: str):
    from kafka import KafkaProducer

    if not native_crc_available():
        log.warning("the crc32c package is missing: kafka-python will checksum batches in pure Python and the "
                    "replay will be ~3x slower (pip install crc32c)")

    compression = "lz4"
    try:
        import lz4  # noqa: F401
    except ImportError:  # pragma: no cover
        compression = "gzip"
    return KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=20,
        batch_size=1 << 20, compression_type=compression, max_in_flight_requests_per_connection=5,
        retry_backoff_ms=200, reconnect_backoff_max_ms=5000, delivery_timeout_ms=120_000,
        request_timeout_ms=30_000,
    )


def _encode_rows(table: pa.Table, rows: np.ndarray) -> list[bytes]:
    cols = {c: table.column(c).take(pa.array(rows)).to_pylist() for c in table.column_names}
    has_label = "fraud_label" in cols
    out = []
    for i in range(len(rows)):
        d = {"txn_id": cols["txn_id"][i], "cc_num": cols["cc_num"][i], "amount": cols["amount"][i],
             "ts": cols["ts"][i], "merchant": cols["merchant"][i], "category": cols["category"][i]}
        if has_label and cols["fraud_label"][i] is not None:
            d["fraud_label"] = int(cols["fraud_label"][i])
        out.append(orjson.dumps(d))
    return out


def _shard(table, rows, key_of_row, part_of_row, bootstrap, topic, speed, clock0, counter, results, shard_id):
    """One producer process: its partitions' rows, in input order, paced by event time if asked.

    clock0 = (first event time of the whole replay, monotonic start): every shard paces against the same origin,
    so partitions stay in step with each other (CLOCK_MONOTONIC is shared by forked processes).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; we stop on SIGTERM
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))
    stats = {"sent": 0, "failed": 0, "last": -1, "first": int(rows[0]) if len(rows) else -1, "error": None}
    trouble = _BrokerTrouble(shard_id)
    kafka_log = logging.getLogger("kafka")
    kafka_log.addHandler(trouble)
    kafka_log.propagate = False
    producer = None
    try:
        producer = _producer(bootstrap)

        def on_error(exc):
            stats["failed"] += 1
            stats["error"] = stats["error"] or repr(exc)

        ts_all = table.column("ts").to_numpy()
        t0_event, t0_wall = clock0
        chunk = 20_000
        for lo in range(0, len(rows), chunk):
            idx = rows[lo:lo + chunk]
            values = _encode_rows(table, idx)
            for j, row in enumerate(idx):
                if stop["flag"]:
                    raise KeyboardInterrupt
                ts = int(ts_all[row])
                if speed:
                    due = t0_wall + (ts - t0_event) / 1000.0 / speed
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                producer.send(topic, key=key_of_row[row], value=values[j], timestamp_ms=ts,
                              partition=int(part_of_row[row])).add_errback(on_error)
                stats["last"] = int(row)
                stats["sent"] += 1
            with counter.get_lock():
                counter.value += len(idx)
        producer.flush()
    except KeyboardInterrupt:
        if producer is not None:
            producer.flush(timeout=60)
    except Exception as exc:  # reported to the parent, never silent
        stats["error"] = stats["error"] or repr(exc)
    finally:
        if producer is not None:
            producer.close(timeout=30)
        stats["sent"] -= stats["failed"]
        stats["broker_errors"] = trouble.count
        results.put((shard_id, stats))


def replay_table(table: pa.Table, *, bootstrap: str, topic: str, secret: str, speed: float | None = None,
                 limit: int | None = None, start_at: int = 0, partitions: int = 4, workers: int = 2,
                 progress=None) -> ReplayStats:
    """Produce rows [start_at, start_at + limit) of `table` to `topic`. speed None = as fast as possible."""
    from featurestore.topics import ensure_topics

    ensure_topics(bootstrap, {topic: partitions})
    partitions = _partition_count(bootstrap, topic)
    end = table.num_rows if limit is None else min(table.num_rows, start_at + limit)
    rows_all = np.arange(start_at, end)
    stats = ReplayStats()
    if rows_all.size == 0:
        return stats

    keyer = EntityKeyer(secret)
    dict_pan = pc.dictionary_encode(table.column("cc_num")).combine_chunks()
    pans = dict_pan.dictionary.to_pylist()
    keys = [keyer(p).encode() for p in pans]
    parts = np.array([partition_for(k, partitions) for k in keys], dtype=np.int32)
    codes = dict_pan.indices.to_numpy()
    key_of_row = np.array(keys, dtype=object)[codes]
    part_of_row = parts[codes]

    workers = max(1, min(workers, partitions))
    shard_of_partition = np.arange(partitions) % workers
    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 0)
    results = ctx.Queue()
    procs = []
    started = time.perf_counter()
    clock0 = (int(table.column("ts")[int(rows_all[0])].as_py()), time.monotonic())
    for w in range(workers):
        mine = rows_all[shard_of_partition[part_of_row[rows_all]] == w]
        p = ctx.Process(target=_shard, args=(table, mine, key_of_row, part_of_row, bootstrap, topic, speed,
                                             clock0, counter, results, w), daemon=True)
        p.start()
        procs.append(p)
    got: dict[int, dict] = {}
    try:
        while len(got) < workers:
            while not results.empty():
                sid, st = results.get()
                got[sid] = st
            if progress:
                progress(counter.value)
            if all(not p.is_alive() for p in procs) and results.empty() and len(got) < workers:
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        stats.interrupted = True
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 90
        while len(got) < workers and time.monotonic() < deadline:
            try:
                sid, st = results.get(timeout=1)
                got[sid] = st
            except Exception:  # queue.Empty
                if all(not p.is_alive() for p in procs):
                    break
    for p in procs:
        p.join(timeout=5)
    stats.elapsed_s = time.perf_counter() - started
    for st in got.values():
        stats.sent += st["sent"]
        stats.failed += st["failed"]
        stats.first_error = stats.first_error or st["error"]
        stats.broker_errors += st.get("broker_errors", 0)
    if len(got) < workers:
        stats.failed += int(rows_all.size - stats.sent - stats.failed)
        stats.first_error = stats.first_error or "a producer process died"
    # Resume point: rows are sharded, so the safe resume index is the smallest "last sent" across shards + 1
    # (a shard that sent nothing counts as just before its first row). Resuming may resend a few rows of the
    # shards that got further; the stream worker deduplicates them by txn_id.
    lasts = [st["last"] if st["last"] >= 0 else st["first"] - 1 for st in got.values() if st["first"] >= 0]
    if stats.interrupted:
        stats.last_index = min(lasts) if lasts else int(rows_all[0]) - 1
    else:
        stats.last_index = int(rows_all[-1]) if not stats.failed else -1
    if progress:
        progress(counter.value)
    return stats


def _partition_count(bootstrap: str, topic: str) -> int:
    from kafka import KafkaConsumer

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = c.partitions_for_topic(topic)
        return len(parts) if parts else 4
    finally:
        c.close()


def replay_file(path, **kwargs) -> ReplayStats:
    from featurestore.history import load_history

    return replay_table(load_history(path), **kwargs)
