"""Window semantics as small pure functions (SPEC section 4). Stream, batch and serving all derive from these.

`card_agg_10m` for a transaction x of card c at event time t and arrival position s:
the non-late transactions y of c with t - W <= y.ts <= t that arrived before x (y.seq < s), plus x itself,
counted once. Arrival order is what a scorer at x's arrival could see: one that arrived later never counts for x,
even with a smaller ts, and one that arrived earlier with a ts after t is in x's future. Amounts are summed in
integer cents so that every implementation (Lua, Spark, DuckDB, Python) gets bit-identical sums, and the mean is
computed once, here, by `mean_amount`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

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


class WindowEvent(NamedTuple):
    """One stored window event (a tuple: a read makes one per member, on every score)."""

    txn_id: str
    ts: int
    seq: float  # arrival position: per-card sequence online, row index of a history file offline
    amount_cents: int
    late: bool = False


@dataclass(frozen=True, slots=True)
class WindowAggregate:
    """The statistics every declared aggregation derives from (`definitions.STATS_OF`), in integer cents."""

    count: int
    sum_cents: int
    min_cents: int | None = None  # None for an empty window
    max_cents: int | None = None
    fraud_count: int = 0  # transactions known as fraud at the cut-off (batch groups reading known_fraud)

    @property
    def average(self) -> float:
        return mean_amount(self.count, self.sum_cents)

    def value(self, function: str, column: str = "amount") -> float:
        """One aggregation's value: counts as int, amounts in currency units, NaN where the window is empty.

        Over `known_fraud` (0/1 per transaction): the sum is the known fraud count, the mean the fraud rate."""
        if function == "count":
            return self.count
        if column == "known_fraud":
            if function == "sum":
                return float(self.fraud_count)
            if function == "mean":
                return self.fraud_count / self.count if self.count > 0 else math.nan
            raise ValueError(f"known_fraud is counted, summed or averaged, not {function!r}")
        if function == "mean":
            return mean_amount(self.count, self.sum_cents)
        if function == "sum":
            return self.sum_cents / 100.0
        cents = self.min_cents if function == "min" else self.max_cents if function == "max" else None
        if function not in ("min", "max"):
            raise ValueError(f"unknown aggregation {function!r}")
        return math.nan if cents is None or self.count <= 0 else cents / 100.0

    def values(self, group) -> dict[str, float]:
        """Every feature of a `definitions.FeatureGroup` from these statistics."""
        return {f.name: self.value(f.function, f.column) for f in group.features}


def aggregate_columns(group, count: np.ndarray, sum_cents: np.ndarray, min_cents: np.ndarray,
                      max_cents: np.ndarray, fraud_count: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """`WindowAggregate.values` for many windows at once (one statistic per array, NaN for a missing min or max),
    element for element the same numbers: counts as int64, the rest float64 by the same IEEE operations. The stream
    scorer folds a whole batch with it."""
    count = np.asarray(count).astype(np.int64)
    empty = count <= 0
    out: dict[str, np.ndarray] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for f in group.features:
            function, column = f.function, f.column
            if function == "count":
                out[f.name] = count
            elif column == "known_fraud":
                fraud = (np.zeros(len(count)) if fraud_count is None else np.asarray(fraud_count, dtype=np.float64))
                if function == "sum":
                    out[f.name] = fraud
                elif function == "mean":
                    out[f.name] = np.where(empty, math.nan, fraud / count)
                else:
                    raise ValueError(f"known_fraud is counted, summed or averaged, not {function!r}")
            elif function == "mean":
                out[f.name] = np.where(empty, math.nan, np.asarray(sum_cents, dtype=np.float64) / (100.0 * count))
            elif function == "sum":
                out[f.name] = np.asarray(sum_cents, dtype=np.float64) / 100.0
            elif function in ("min", "max"):
                cents = np.asarray(min_cents if function == "min" else max_cents, dtype=np.float64)
                out[f.name] = np.where(empty, math.nan, cents / 100.0)  # NaN cents stay NaN
            else:
                raise ValueError(f"unknown aggregation {function!r}")
    return out


def arrived_before(a: WindowEvent, b: WindowEvent) -> bool:
    """Stream order is arrival order: the card's arrival position, whatever the event times say."""
    return a.seq < b.seq


def in_window(event_ts: int, t: int, window_ms: int) -> bool:
    """Inclusive on both ends: an event exactly `window_ms` before t still counts."""
    return t - window_ms <= event_ts <= t


def window_aggregate(events: Iterable[WindowEvent], current: WindowEvent, window_ms: int,
                     include_current: bool = True) -> WindowAggregate:
    """Statistics of `current`'s window: on-time events that arrived before it, plus itself once (unless
    `include_current` is False: what the window holds for a transaction of no amount, for inspection)."""
    if include_current:
        count, total = 1, current.amount_cents
        low = high = current.amount_cents
    else:
        count, total, low, high = 0, 0, None, None
    for e in events:
        if e.late or e.txn_id == current.txn_id:
            continue
        if in_window(e.ts, current.ts, window_ms) and arrived_before(e, current):
            count += 1
            total += e.amount_cents
            low = e.amount_cents if low is None else min(low, e.amount_cents)
            high = e.amount_cents if high is None else max(high, e.amount_cents)
    return WindowAggregate(count, total, low, high)


def is_late(ts: int, newest_ts: int | None, allowed_lateness_ms: int, now_ms: int | None = None) -> bool:
    """An event further than the allowed lateness behind its card's newest event is late.

    The horizon never passes the worker's clock (`now_ms`): an event stamped in the future cannot make a card's
    real events late.
    """
    if newest_ts is None:
        return False
    horizon = newest_ts if now_ms is None else min(newest_ts, now_ms)
    return ts < horizon - allowed_lateness_ms
