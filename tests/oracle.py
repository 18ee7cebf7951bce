"""Brute-force oracle for the feature semantics, written from SPEC section 4 and 7's words alone.

It imports nothing from the product: the product's window code, SQL and Lua are checked against this, never
against themselves. Slow on purpose (O(n^2)); clarity over speed.

SPEC words it follows:
- num_trans_last_10m of x (card c, time t) = transactions of c with ts in [t - 10 min, t] that arrived before x,
  plus x itself; late transactions never count for others; a late transaction's own window follows the same rule.
- avg_amt_last_10m = mean amount of those same transactions.
- a transaction is late when its ts is more than the allowed lateness behind the card's newest event (the newest
  ts among the card's earlier arrivals); the horizon never passes the worker's clock.
- a repeated txn_id changes nothing: its first arrival is the transaction.
- card_agg_1w for cut-off C: every valid transaction, late ones included, deduplicated by txn_id, with ts in
  [C - 7 days, C): count and mean amount; a card absent from an existing snapshot had 0 transactions.
- a snapshot counts for x only if C <= t and it was published at or before x arrived; the latest such C wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TEN_MINUTES_MS = 10 * 60 * 1000
WEEK_MS = 7 * 24 * 60 * 60 * 1000


@dataclass(frozen=True)
class Arrival:
    """One message as the stream delivers it: arrivals are given in arrival order."""

    card: str
    txn_id: str
    ts: int
    amount_cents: int


@dataclass(frozen=True)
class OracleRow:
    card: str
    txn_id: str
    ts: int
    position: int  # index of its first arrival in the stream
    amount_cents: int
    late: bool
    count: int
    sum_cents: int

    @property
    def average(self) -> float:
        return self.sum_cents / (100.0 * self.count)


def first_arrivals(arrivals: list[Arrival], lateness_ms: int, now_ms: int | None = None) -> list[tuple[int, Arrival, bool]]:
    """(position, arrival, late) of each txn_id's first arrival, in arrival order."""
    seen: set[str] = set()
    newest: dict[str, int] = {}
    out = []
    for position, a in enumerate(arrivals):
        if a.txn_id in seen:
            continue
        seen.add(a.txn_id)
        late = False
        if a.card in newest:
            horizon = newest[a.card] if now_ms is None else min(newest[a.card], now_ms)
            late = a.ts < horizon - lateness_ms
        if not late:
            newest[a.card] = max(newest.get(a.card, a.ts), a.ts)
        out.append((position, a, late))
    return out


def window_10m(arrivals: list[Arrival], lateness_ms: int, window_ms: int = TEN_MINUTES_MS,
               now_ms: int | None = None) -> list[OracleRow]:
    """One row per distinct transaction, in arrival order."""
    kept = first_arrivals(arrivals, lateness_ms, now_ms)
    rows = []
    for position, x, late in kept:
        count, total = 1, x.amount_cents
        for other_position, y, y_late in kept:
            if other_position >= position or y.card != x.card or y_late:
                continue  # only earlier arrivals of the same card that were not late
            if x.ts - window_ms <= y.ts <= x.ts:
                count += 1
                total += y.amount_cents
        rows.append(OracleRow(x.card, x.txn_id, x.ts, position, x.amount_cents, late, count, total))
    return rows


def window_amounts(arrivals: list[Arrival], lateness_ms: int, window_ms: int) -> dict[str, list[int]]:
    """txn_id -> the amounts (cents) in its window under the same rule as `window_10m`, itself included, for any
    window length (any aggregate over them is then a one-liner)."""
    kept = first_arrivals(arrivals, lateness_ms)
    out = {}
    for position, x, _ in kept:
        out[x.txn_id] = [x.amount_cents] + [
            y.amount_cents for p, y, late in kept
            if p < position and y.card == x.card and not late and x.ts - window_ms <= y.ts <= x.ts
        ]
    return out


def snapshot_amounts(arrivals: list[Arrival], cutoff_ms: int, days: int = 7) -> dict[str, list[int]]:
    """card -> the amounts (cents) of its transactions in [C - days, C), late ones included, first copies only."""
    seen: set[str] = set()
    out: dict[str, list[int]] = {}
    for a in arrivals:
        if a.txn_id not in seen:
            seen.add(a.txn_id)
            if cutoff_ms - days * 24 * 60 * 60 * 1000 <= a.ts < cutoff_ms:
                out.setdefault(a.card, []).append(a.amount_cents)
    return out


def unseen_window(arrivals: list[Arrival], card: str, t: int, amount_cents: int, lateness_ms: int,
                  window_ms: int = TEN_MINUTES_MS) -> tuple[int, int]:
    """Count and cents for a transaction the store has not seen: it arrives after everything, so all non-late
    earlier arrivals of the card in [t - W, t] count, plus itself."""
    count, total = 1, amount_cents
    for _, y, late in first_arrivals(arrivals, lateness_ms):
        if y.card == card and not late and t - window_ms <= y.ts <= t:
            count += 1
            total += y.amount_cents
    return count, total


def snapshot_1w(arrivals: list[Arrival], cutoff_ms: int) -> dict[str, tuple[int, int]]:
    """card -> (count, summed cents) over [C - 7 d, C), late ones included, first copy of each txn_id."""
    seen: set[str] = set()
    out: dict[str, tuple[int, int]] = {}
    for a in arrivals:
        if a.txn_id in seen:
            continue
        seen.add(a.txn_id)
        if cutoff_ms - WEEK_MS <= a.ts < cutoff_ms:
            n, s = out.get(a.card, (0, 0))
            out[a.card] = (n + 1, s + a.amount_cents)
    return out


def visible_cutoff(t: int, arrived_ms: int, published: dict[int, int]) -> int | None:
    """The latest cut-off C <= t whose snapshot was published (cut-off -> published_ms) at or before the arrival."""
    usable = [c for c, p in published.items() if c <= t and p <= arrived_ms]
    return max(usable) if usable else None


def ratio(numerator: float, denominator: float) -> float:
    """SPEC: a missing or zero denominator gives NaN, never an error or an infinite."""
    if denominator is None or numerator is None or math.isnan(denominator) or denominator == 0:
        return math.nan
    return numerator / denominator
