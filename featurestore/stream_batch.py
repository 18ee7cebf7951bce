"""Turning one batch of raw `transactions` messages into window writes, archive rows and rejects.

Pure functions: the stream worker does the I/O (Redis, Kafka, files) around them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from featurestore.events import InvalidEvent, Transaction, parse_transaction
from featurestore.online import ApplyStatus, EventWrite


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


def prepare_batch(messages: Sequence[RawMessage], keyer: Callable[[str], str]) -> PreparedBatch:
    """Validate each message; valid ones become window writes with seq = Kafka offset (stream order)."""
    out = PreparedBatch()
    for msg in messages:
        try:
            txn = parse_transaction(msg.value)
        except InvalidEvent as exc:
            out.rejects.append((msg, exc))
            continue
        out.writes.append(EventWrite(keyer(txn.cc_num), txn.txn_id, txn.ts, msg.offset, txn.amount_cents))
        out.txns.append(txn)
        out.sources.append(msg)
    return out


LATE_STATUSES = (ApplyStatus.LATE, ApplyStatus.DUPLICATE_LATE)


def archive_rows(batch: PreparedBatch, statuses: Sequence[ApplyStatus], now_ms: int) -> list[dict]:
    """One archive row per valid message, marked late when the window left it out.

    Duplicates are archived too (at-least-once: the first copy may have been lost with a killed worker);
    readers keep the row with the smallest (partition, offset) per txn_id.
    """
    rows = []
    for w, txn, src, status in zip(batch.writes, batch.txns, batch.sources, statuses, strict=True):
        rows.append({
            "txn_id": txn.txn_id, "card": w.card, "amount": txn.amount, "amount_cents": w.amount_cents,
            "ts": txn.ts, "merchant": txn.merchant, "category": txn.category, "fraud_label": txn.fraud_label,
            "late": status in LATE_STATUSES, "partition": src.partition, "offset": src.offset,
            "archived_ms": now_ms,
        })
    return rows
