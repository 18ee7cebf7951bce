"""`velocity replay`: produce a history file to Kafka in the file's row order, keyed by entity key.

The row order is the stream order (SPEC section 1): rows go out in file order, paced by event time (a row whose
`ts` is behind the pace goes out at once), and each card's rows stay in order (a card lives in one partition).
The clear PAN stops here: each message carries `card` (the entity key of the file's `cc_num`) and `pan_last4`,
never `cc_num`, and PAN-like digit runs in txn_id, merchant and category are masked as the worker would. Rows the
stream worker would dead-letter are refused before anything is produced (`check_rows`).

kafka-python checksums every record batch with CRC-32C; without the `crc32c` C extension it falls back to a
pure-Python CRC that alone caps a process near 36k messages/s, so `crc32c` is a pinned dependency and a missing
one is logged. The replay shards by partition over a few forked processes (each partition stays in one process,
so per-card order is kept), and computes each card's partition once with Kafka's own murmur2 partitioner, so
keys land exactly where any other Kafka producer would put them.

With labels (`velocity replay --labels`, ingest/labels.py), each producer process also sends the labels of its
own rows to the labels topic (key txn_id), each right after the row at which the process's event-time clock (the
largest `ts` it has sent) reaches the label's `labeled_at`, and never before the transaction it labels. Labels
known only after the last row are sent when the rows are done, without waiting for their time.
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

from featurestore.definitions import DEFAULT_MAX_FUTURE_MS
from featurestore.entity import EntityKeyer, redact_pans
from featurestore.events import (
    MAX_AMOUNT,
    MAX_TEXT_LEN,
    MAX_TS_MS,
    MAX_TXN_ID_LEN,
    MIN_TS_MS,
    InvalidEvent,
    mask_text_fields,
    validate_transaction,
)

log = logging.getLogger(__name__)


class ReplayError(ValueError):
    """The replay is refused before anything is produced; the message names the first offending row."""


@dataclass
class ReplayStats:
    sent: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    last_index: int = -1  # row index (in the input) of the last row handed to the producer
    interrupted: bool = False
    first_error: str | None = None
    broker_errors: int = 0  # kafka-python connection/metadata errors seen (outages are retried, then reported)
    labels_sent: int = 0
    labels_failed: int = 0

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

    from stores.kafka_security import kafka_python_kwargs

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
        request_timeout_ms=30_000, **kafka_python_kwargs(),
    )


def _bad_rows(table: pa.Table, now_ms: int, max_future_ms: int) -> list[tuple[np.ndarray, str, str]]:
    """(rows as a boolean mask, reason, what is wrong) for each rule of the worker's validation (vectorized)."""
    def col_mask(arr) -> np.ndarray:
        return np.asarray(pc.fill_null(arr, True).to_numpy(zero_copy_only=False), dtype=bool)

    def length_outside(name: str, max_len: int) -> np.ndarray:
        col = table.column(name)
        n = pc.utf8_length(col) if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) else None
        if n is None:
            return np.ones(table.num_rows, dtype=bool)
        return col_mask(pc.or_(pc.less(n, 1), pc.greater(n, max_len)))

    cc = table.column("cc_num")
    out = [(col_mask(pc.invert(pc.match_substring_regex(cc, r"^[0-9]{12,19}$"))), "bad_field",
            "cc_num is empty or not a card number of 12-19 digits")]
    out.append((length_outside("txn_id", MAX_TXN_ID_LEN), "bad_field",
                f"txn_id must be a non-empty string of at most {MAX_TXN_ID_LEN} chars"))
    amount = pc.cast(table.column("amount"), pa.float64()).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore", over="ignore"):
        cents = np.round(amount * 100)
        bad_amount = (~np.isfinite(amount) | (amount <= 0) | (amount > MAX_AMOUNT)
                      | (np.abs(amount * 100 - cents) > 1e-6 * np.maximum(1.0, amount)) | (cents < 1))
    out.append((bad_amount, "bad_amount", "amount must be > 0 with at most 2 decimals, and at least 0.01"))
    ts = table.column("ts").to_numpy(zero_copy_only=False).astype(np.int64)
    out.append(((ts < MIN_TS_MS) | (ts >= MAX_TS_MS), "bad_ts", "ts must be epoch ms between 2000 and 2100"))
    out.append((ts > now_ms + max_future_ms, "future",
                f"ts is more than {max_future_ms / 3_600_000:g} h ahead of now"))
    for name in ("merchant", "category"):
        out.append((length_outside(name, MAX_TEXT_LEN), "bad_field",
                    f"{name} must be a non-empty string of at most {MAX_TEXT_LEN} chars"))
    if "fraud_label" in table.column_names:
        label = table.column("fraud_label")
        out.append((~col_mask(pc.or_(pc.is_null(label), pc.is_in(label, pa.array([0, 1], label.type)))),
                    "bad_field", "fraud_label must be 0 or 1"))
    return out


def check_rows(table: pa.Table, start: int = 0, end: int | None = None, *, now_ms: int | None = None,
               max_future_ms: int = DEFAULT_MAX_FUTURE_MS) -> None:
    """Raise ReplayError if any row in [start, end) would be dead-lettered by the stream worker.

    The same rules as `featurestore.events.validate_transaction`, applied to whole columns; the message names
    the first bad row (its index in the file and txn_id, PANs masked), why, and how many rows are bad.
    """
    end = table.num_rows if end is None else end
    if end <= start:
        return
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    part = table.slice(start, end - start)
    bad = np.zeros(part.num_rows, dtype=bool)
    first: tuple[int, str, str] | None = None
    for mask, reason, what in _bad_rows(part, now_ms, max_future_ms):
        bad |= mask
        hits = np.flatnonzero(mask)
        if hits.size and (first is None or hits[0] < first[0]):
            first = (int(hits[0]), reason, what)
    if first is None:
        return
    i, reason, what = first
    row = {c: part.column(c)[i].as_py() for c in part.column_names}
    if row.get("amount") is not None:
        row["amount"] = float(row["amount"])  # a decimal column reads as Decimal
    try:  # the worker's own words for it, when the row reaches the validator in that form
        validate_transaction({k: v for k, v in row.items() if k != "card"}, EntityKeyer("-"), now_ms,
                             max_future_ms)
    except (InvalidEvent, TypeError, ValueError) as exc:
        if isinstance(exc, InvalidEvent):
            reason, what = exc.reason, exc.detail
    more = int(bad.sum()) - 1
    txn_id = redact_pans(str(row.get("txn_id")))[:60]
    raise ReplayError(redact_pans(
        f"row {start + i} (txn_id {txn_id!r}) would be dead-lettered by the stream worker ({reason}: {what})"
        + (f"; {more:,} more row(s) in the range are bad too" if more else "")
        + ". Nothing was sent: fix or drop the bad rows, or replay a range without them (--start-at/--limit)."))


def _encode_rows(table: pa.Table, rows: np.ndarray, codes: np.ndarray, cards: list[str], last4s: list[str],
                 keyer) -> list[bytes]:
    """Messages as SPEC section 2 has Velocity's producers write them: card + pan_last4, never the PAN."""
    take = pa.array(rows)
    cols = {c: table.column(c).take(take) for c in ("txn_id", "amount", "ts", "merchant", "category")}
    texts = {c: cols[c].to_pylist() for c in ("txn_id", "merchant", "category")}
    for i in np.flatnonzero(np.logical_or.reduce([  # rows with a run of 13+ digits in free text: mask as the worker
            np.asarray(pc.fill_null(pc.match_substring_regex(cols[c], "[0-9]{13}"), False)
                       .to_numpy(zero_copy_only=False), dtype=bool) for c in texts])).tolist():
        texts["txn_id"][i], texts["merchant"][i], texts["category"][i] = mask_text_fields(
            texts["txn_id"][i], texts["merchant"][i], texts["category"][i], keyer)
    row_codes = codes[rows].tolist()
    card_col = [cards[c] for c in row_codes]
    last4_col = [last4s[c] for c in row_codes]
    labels = (table.column("fraud_label").take(take).to_pylist() if "fraud_label" in table.column_names
              else [None] * len(rows))
    dumps = orjson.dumps
    out = []
    for txn_id, card, last4, amount, ts, merchant, category, label in zip(
            texts["txn_id"], card_col, last4_col, cols["amount"].to_pylist(), cols["ts"].to_pylist(),
            texts["merchant"], texts["category"], labels, strict=True):
        d = {"txn_id": txn_id, "card": card, "pan_last4": last4, "amount": amount, "ts": ts, "merchant": merchant,
             "category": category}
        if label is not None:
            d["fraud_label"] = int(label)
        out.append(dumps(d))
    return out


def _shard(table, rows, cards, part_of_row, bootstrap, topic, speed, clock0, counter, results, shard_id,
           labels=None):
    """One producer process: its partitions' rows, in file order, paced by event time if asked.

    clock0 = (event time of the replay's first row, monotonic start): every shard paces against the same origin,
    so partitions stay in step with each other (CLOCK_MONOTONIC is shared by forked processes). A row is due at
    origin + (ts - first ts) / speed; one whose ts went backwards is already due and goes out without waiting.
    `cards` = (codes: the row's card index, entity keys, last 4 digits, keyer). `labels` = (topic, due, keys,
    values, labeled_at): label i goes out right after this process's row at position due[i] (ingest.labels).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; we stop on SIGTERM
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))
    stats = {"sent": 0, "failed": 0, "last": -1, "first": int(rows[0]) if len(rows) else -1, "error": None,
             "labels_sent": 0, "labels_failed": 0}
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

        def on_label_error(exc):
            stats["labels_failed"] += 1
            stats["error"] = stats["error"] or repr(exc)

        label_topic, label_due, label_keys, label_values, label_at = labels or (None, [], [], [], [])
        label_due = [int(d) for d in label_due]
        li, n_labels = 0, len(label_due)
        next_due = label_due[0] if n_labels else len(rows) + 1

        def send_labels(upto: int) -> int:
            nonlocal li
            while li < n_labels and label_due[li] <= upto:
                producer.send(label_topic, key=label_keys[li], value=label_values[li],
                              timestamp_ms=int(label_at[li])).add_errback(on_label_error)
                stats["labels_sent"] += 1
                li += 1
            return label_due[li] if li < n_labels else len(rows) + 1

        ts_all = table.column("ts").to_numpy()
        codes, card_keys, last4s, keyer = cards
        key_bytes = [k.encode() for k in card_keys]
        t0_event, t0_wall = clock0
        chunk = 20_000
        for lo in range(0, len(rows), chunk):
            idx = rows[lo:lo + chunk]
            values = _encode_rows(table, idx, codes, card_keys, last4s, keyer)
            for j, row in enumerate(idx):
                if stop["flag"]:
                    raise KeyboardInterrupt
                ts = int(ts_all[row])
                if speed:
                    due = t0_wall + (ts - t0_event) / 1000.0 / speed
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                producer.send(topic, key=key_bytes[codes[row]], value=values[j], timestamp_ms=ts,
                              partition=int(part_of_row[row])).add_errback(on_error)
                stats["last"] = int(row)
                stats["sent"] += 1
                if lo + j >= next_due:
                    next_due = send_labels(lo + j)
            with counter.get_lock():
                counter.value += len(idx)
        send_labels(len(rows))  # labels known only after the last row
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
        stats["labels_sent"] -= stats["labels_failed"]
        stats["broker_errors"] = trouble.count
        results.put((shard_id, stats))


def replay_table(table: pa.Table, *, bootstrap: str, topic: str, secret: str, speed: float | None = None,
                 limit: int | None = None, start_at: int = 0, partitions: int = 4, workers: int = 2,
                 progress=None, max_future_ms: int = DEFAULT_MAX_FUTURE_MS, check: bool = True,
                 labels=None, labels_topic: str | None = None) -> ReplayStats:
    """Produce rows [start_at, start_at + limit) of `table` to `topic`, in file order. speed None = max.

    `labels` (an `ingest.labels.LabelPlan`) also sends the planned labels of those rows to `labels_topic`,
    interleaved in event time (see the module docstring).

    Refused (ReplayError, before connecting to Kafka) when `limit` or `start_at` is negative or a row in the range
    would be dead-lettered by the stream worker (`check_rows`, against the clock now and `max_future_ms`).
    """
    from stores.kafka_topics import ensure_topics

    if limit is not None and limit < 0:
        raise ReplayError(f"--limit must be 0 or more, got {limit}")
    if start_at < 0:
        raise ReplayError(f"--start-at must be a row index of 0 or more, got {start_at}")
    end = table.num_rows if limit is None else min(table.num_rows, start_at + limit)
    stats = ReplayStats()
    if end <= start_at:
        return stats
    if check:  # the CLI checks before its progress bar and says check=False
        check_rows(table, start_at, end, now_ms=int(time.time() * 1000), max_future_ms=max_future_ms)
    rows_all = np.arange(start_at, end)

    ensure_topics(bootstrap, {topic: partitions, **({labels_topic: partitions} if labels is not None else {})})
    partitions = _partition_count(bootstrap, topic)
    keyer = EntityKeyer(secret)
    dict_pan = pc.dictionary_encode(table.column("cc_num")).combine_chunks()
    pans = dict_pan.dictionary.to_pylist()
    card_keys = [keyer(p) for p in pans]
    last4s = [p[-4:] for p in pans]
    parts = np.array([partition_for(k.encode(), partitions) for k in card_keys], dtype=np.int32)
    codes = dict_pan.indices.to_numpy()
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
        label_part = None
        if labels is not None:
            from ingest.labels import encode_labels, schedule

            pick, due = schedule(mine, table.column("ts").to_numpy(zero_copy_only=False), labels)
            keys, values = encode_labels(table, labels, pick, keyer)
            label_part = (labels_topic, due, keys, values, labels.labeled_at[pick])
        p = ctx.Process(target=_shard, args=(table, mine, (codes, card_keys, last4s, keyer), part_of_row,
                                             bootstrap, topic, speed, clock0, counter, results, w, label_part),
                        daemon=True)
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
        stats.labels_sent += st.get("labels_sent", 0)
        stats.labels_failed += st.get("labels_failed", 0)
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

    from stores.kafka_security import kafka_python_kwargs

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **kafka_python_kwargs())
    try:
        parts = c.partitions_for_topic(topic)
        return len(parts) if parts else 4
    finally:
        c.close()


def replay_file(path, **kwargs) -> ReplayStats:
    from stores.history import load_history

    return replay_table(load_history(path), **kwargs)  # in file order: the row order is the stream order
