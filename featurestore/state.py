"""What a window write is and what the online state answers about it: the contract between the stream worker's
batch logic and any online store implementation (`stores.redis_online` is the one in use)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple


class ApplyStatus(IntEnum):
    APPLIED = 0
    LATE = 1
    DUPLICATE = 2
    DUPLICATE_LATE = 3


class Applied(NamedTuple):
    """What the store did with one event, and the card's arrival position it holds (the stored one for a duplicate)."""

    status: ApplyStatus
    seq: int


@dataclass(frozen=True, slots=True)
class EventWrite:
    """One transaction as the window state needs it; the store assigns its arrival position."""

    card: str
    txn_id: str
    ts: int
    amount_cents: int
