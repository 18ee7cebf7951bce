"""Turning one batch of raw `transactions` messages into window writes, archive rows and rejects.

Pure functions: the stream worker does the I/O (Redis, Kafka, files) around them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from featurestore.events import InvalidEvent, Transaction, parse_transaction
from featurestore.state import Applied, ApplyStatus, EventWrite


@dataclass(frozen=True, slots=True)
class RawMessage:
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
    writes: list[EventWrite] = field(default_factory=list)
    txns: list[Transaction] = field(default_factory=list)
    sources: list[RawMessage] = field(default_factory=list)
    rejects: list[tuple[RawMessage, InvalidEvent]] = field(default_factory=list)


def prepare_batch(messages: Sequence[RawMessage], keyer: Callable[[str], str], now_ms: int | None = None,
                  max_future_ms: int | None = None) -> PreparedBatch:
    """Validate each message; valid ones become window writes, in stream order (the store assigns the seq).

    `now_ms` is the worker's clock for the whole batch (read once here when not given): events more than
    `max_future_ms` ahead of it are rejected as `future` (default: the configured VELOCITY_MAX_FUTURE_MS).
    `keyer` tokenizes an outside producer's `cc_num`; nothing after this holds a clear PAN, and PAN-like runs in
    txn_id, merchant and category are already masked in the Transactions and writes.
    """
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    if max_future_ms is None:
        from featurestore.config import get_settings

        max_future_ms = get_settings().max_future_ms
    out = PreparedBatch()
    for msg in messages:
        try:
            txn = parse_transaction(msg.value, keyer, now_ms, max_future_ms)
        except InvalidEvent as exc:
            out.rejects.append((msg, exc))
            continue
        out.writes.append(EventWrite(card=txn.card, txn_id=txn.txn_id, ts=txn.ts, amount_cents=txn.amount_cents))
        out.txns.append(txn)
        out.sources.append(msg)
    return out


LATE_STATUSES = (ApplyStatus.LATE, ApplyStatus.DUPLICATE_LATE)


def archive_rows(batch: PreparedBatch, applied: Sequence[Applied], now_ms: int) -> list[dict]:
    """One archive row per valid message, with its arrival position, marked late when the window left it out.

    Duplicates are archived too (at-least-once: the first copy may have been lost with a killed worker); they
    carry the first copy's arrival position, and readers keep one row per txn_id (the earliest arrival).
    """
    rows = []
    for w, txn, src, a in zip(batch.writes, batch.txns, batch.sources, applied, strict=True):
        rows.append({
            "txn_id": txn.txn_id, "card": w.card, "pan_last4": getattr(txn, "pan_last4", None),
            "amount": txn.amount, "amount_cents": w.amount_cents, "ts": txn.ts, "merchant": txn.merchant,
            "category": txn.category, "fraud_label": txn.fraud_label, "late": a.status in LATE_STATUSES,
            "seq": a.seq, "partition": src.partition, "offset": src.offset, "archived_ms": now_ms,
        })
    return rows
