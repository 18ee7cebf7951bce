"""Window semantics as small pure functions (SPEC section 4). Stream, batch and serving all derive from these.

`card_agg_10m` for a transaction x of card c at event time t and stream position s:
the non-late transactions y of c with t - W <= y.ts <= t that come before x in stream order
((ts, position) < (t, s)), plus x itself, counted once. Amounts are summed in integer cents so that
every implementation (Lua, Spark, DuckDB, Python) gets bit-identical sums, and the mean is computed
once, here, by `mean_amount`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: Position given to a transaction the store has not seen yet: it sorts after everything at its ts.
SEQ_LAST = math.inf


def to_cents(amount: float) -> int:
    """Exact integer cents of a 2-decimal amount (round, never truncate: 0.29 * 100 == 28.999...)."""
    return int(round(amount * 100))


def mean_amount(count: int, sum_cents: int) -> float:
    """Mean amount in currency units; NaN for an empty window (it then reads as XGBoost's missing value)."""
    if count <= 0:
        return math.nan
    return sum_cents / (100.0 * count)


@dataclass(frozen=True, slots=True)
class WindowEvent:
    txn_id: str
    ts: int
    seq: float  # stream position: Kafka offset online, row index offline
    amount_cents: int
    late: bool = False


@dataclass(frozen=True, slots=True)
class WindowAggregate:
    count: int
    sum_cents: int

    @property
    def average(self) -> float:
        return mean_amount(self.count, self.sum_cents)


def precedes(a: WindowEvent, b: WindowEvent) -> bool:
    """Stream order: by event time, ties broken by stream position."""
    return (a.ts, a.seq) < (b.ts, b.seq)


def in_window(event_ts: int, t: int, window_ms: int) -> bool:
    """Inclusive on both ends: an event exactly `window_ms` before t still counts."""
    return t - window_ms <= event_ts <= t


def window_aggregate(events: Iterable[WindowEvent], current: WindowEvent, window_ms: int) -> WindowAggregate:
    """Count and summed cents of `current`'s window: on-time events before it, plus itself once."""
    count, total = 1, current.amount_cents
    for e in events:
        if e.late or e.txn_id == current.txn_id:
            continue
        if in_window(e.ts, current.ts, window_ms) and precedes(e, current):
            count += 1
            total += e.amount_cents
    return WindowAggregate(count, total)


def is_late(ts: int, newest_ts: int | None, allowed_lateness_ms: int) -> bool:
    """An event further than the allowed lateness behind its card's newest event is late."""
    return newest_ts is not None and ts < newest_ts - allowed_lateness_ms


@dataclass(frozen=True, slots=True)
class Arrival:
    """One message as the stream delivers it, in arrival order."""

    card: str
    txn_id: str
    ts: int
    amount_cents: int


@dataclass(frozen=True, slots=True)
class OracleRow:
    card: str
    txn_id: str
    ts: int
    seq: int
    amount_cents: int
    late: bool
    count: int
    sum_cents: int

    @property
    def average(self) -> float:
        return mean_amount(self.count, self.sum_cents)


def naive_window_features(
    arrivals: Sequence[Arrival], window_ms: int, allowed_lateness_ms: int
) -> list[OracleRow]:
    """Brute-force oracle, O(n^2): what every fast implementation must reproduce.

    A repeated txn_id is a redelivery: the first arrival wins and later copies change nothing.
    Lateness is judged against the newest ts of the card's earlier (first) arrivals, late ones included.
    """
    seen: set[str] = set()
    newest: dict[str, int] = {}
    kept: list[tuple[Arrival, WindowEvent]] = []
    for seq, a in enumerate(arrivals):
        if a.txn_id in seen:
            continue
        seen.add(a.txn_id)
        late = is_late(a.ts, newest.get(a.card), allowed_lateness_ms)
        newest[a.card] = max(newest.get(a.card, a.ts), a.ts)
        kept.append((a, WindowEvent(a.txn_id, a.ts, seq, a.amount_cents, late)))

    by_card: dict[str, list[WindowEvent]] = {}
    for a, e in kept:
        by_card.setdefault(a.card, []).append(e)
    rows = []
    for a, e in kept:
        agg = window_aggregate(by_card[a.card], e, window_ms)
        rows.append(OracleRow(a.card, a.txn_id, a.ts, int(e.seq), a.amount_cents, e.late, agg.count, agg.sum_cents))
    return rows
