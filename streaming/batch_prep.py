"""Turning one batch of raw `transactions` messages into window writes, archive rows and rejects.

Pure functions: the stream worker does the I/O (Redis, Kafka, files) around them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import pyarrow as pa

from featurestore.events import InvalidEvent, Transaction, parse_transaction
from featurestore.state import Applied, ApplyStatus
from featurestore.windows import to_cents
from stores.archive import ARCHIVE_SCHEMA


class RawMessage(NamedTuple):
    """One Kafka record as the worker keeps it (a tuple: one is made per message, so it has to be cheap)."""

    key: bytes | None
    value: bytes | None
    partition: int
    offset: int
    timestamp_ms: int

    @classmethod
    def from_record(cls, record) -> RawMessage:
        """From a Kafka consumer record (aiokafka's: key, value, partition, offset, timestamp in ms)."""
        return cls(record.key, record.value, record.partition, record.offset, record.timestamp)


@dataclass(slots=True)
class PreparedBatch:
    """A batch's valid transactions (in stream order) with the messages they came from, and its rejects.

    `packed` is their window writes as the online store's apply script takes them (`stores.redis_online.
    pack_writes`: card, txn_id, ts, cents per event), built here once, with `cents` kept for the archive:
    no second object per event. A Transaction is its own window write where one is needed (`writes`).
    """

    txns: list[Transaction] = field(default_factory=list)
    sources: list[RawMessage] = field(default_factory=list)
    rejects: list[tuple[RawMessage, InvalidEvent]] = field(default_factory=list)
    packed: list[str] = field(default_factory=list)
    cents: list[int] = field(default_factory=list)
    #: Per valid transaction, its window statistics and stored record as the apply returned them for its scoring
    #: (`streaming.stream_reads.apply_with_stats`); None when the batch was applied without (scoring off, or
    #: Redis Cluster).
    window_stats: list | None = None

    @property
    def writes(self) -> list[Transaction]:
        """The window writes, in stream order (the store assigns each its arrival position)."""
        return self.txns


def prepare_batch(messages: Sequence[RawMessage], keyer: Callable[[str], str], now_ms: int | None = None,
                  max_future_ms: int | None = None) -> PreparedBatch:
    """Validate each message; valid ones become window writes, in stream order (the store assigns the seq).

    `now_ms` is the worker's clock for the whole batch (read once here when not given): events more than
    `max_future_ms` ahead of it are rejected as `future` (default: the configured VELOCITY_MAX_FUTURE_MS).
    `keyer` tokenizes an outside producer's `cc_num`; nothing after this holds a clear PAN, and PAN-like runs in
    txn_id, merchant and category are already masked in the Transactions.
    """
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    if max_future_ms is None:
        from featurestore.config import get_settings

        max_future_ms = get_settings().max_future_ms
    out = PreparedBatch()
    txns, sources, rejects, packed, amounts = out.txns, out.sources, out.rejects, out.packed, out.cents
    for msg in messages:
        try:
            txn = parse_transaction(msg.value, keyer, now_ms, max_future_ms)
        except InvalidEvent as exc:
            rejects.append((msg, exc))
            continue
        cents = to_cents(txn.amount)
        txns.append(txn)
        sources.append(msg)
        amounts.append(cents)
        packed += (txn.card, txn.txn_id, str(txn.ts), str(cents))  # stores.redis_online.pack_writes
    return out


LATE_STATUSES = (ApplyStatus.LATE, ApplyStatus.DUPLICATE_LATE)


def archive_rows(batch: PreparedBatch, applied: Sequence[Applied], now_ms: int) -> pa.RecordBatch:
    """One archive row per valid message (ARCHIVE_SCHEMA), with its arrival position, marked late when the window
    left it out; built column by column (no object per row).

    Duplicates are archived too (at-least-once: the first copy may have been lost with a killed worker); they
    carry the first copy's arrival position, and readers keep one row per txn_id (the earliest arrival).
    """
    txns, sources, n = batch.txns, batch.sources, len(batch.txns)
    if len(applied) != n:
        raise ValueError(f"{len(applied)} outcomes for {n} transactions")
    late = LATE_STATUSES
    columns = [
        [t.txn_id for t in txns], [t.card for t in txns], [t.pan_last4 for t in txns], [t.amount for t in txns],
        batch.cents, [t.ts for t in txns], [t.merchant for t in txns], [t.category for t in txns],
        [t.fraud_label for t in txns], [a[0] in late for a in applied], [a[1] for a in applied],
        [m.partition for m in sources], [m.offset for m in sources], [now_ms] * n,
    ]
    return pa.RecordBatch.from_arrays([pa.array(c, f.type) for c, f in zip(columns, ARCHIVE_SCHEMA, strict=True)],
                                      schema=ARCHIVE_SCHEMA)
