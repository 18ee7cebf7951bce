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

Issue 16 (merchant and card-spending groups), its words:
- a group over `days` days for cut-off C covers the transactions with ts in [C - days, C), per entity (the card,
  or the merchant id); count, amount mean (card spending), known fraud count and fraud rate (merchant);
- a transaction's known_fraud at C is 1 when its latest label version with labeled_at <= C is fraud (a label known
  later does not count; the latest version wins; fraud wins a tie on labeled_at), else 0;
- an entity absent from an existing snapshot gets the default (counts and sums 0, means missing); before any
  snapshot everything is missing.
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


DAY_MS = 24 * 60 * 60 * 1000


@dataclass(frozen=True)
class Txn:
    """A transaction as the batch sees it (any order; the first copy of a txn_id counts)."""

    txn_id: str
    card: str
    merchant: str
    ts: int
    amount_cents: int


def known_fraud(versions: list[tuple[int, int]], cutoff_ms: int) -> int:
    """1 if the latest of `versions` ((fraud_label, labeled_at) of one transaction) with labeled_at <= C is fraud,
    fraud winning a tie on labeled_at; 0 otherwise (never labeled, or labeled only after C)."""
    known = [(at, label) for label, at in versions if at <= cutoff_ms]
    if not known:
        return 0
    latest = max(at for at, _ in known)
    return 1 if any(label == 1 for at, label in known if at == latest) else 0


def entity_window(txns: list[Txn], cutoff_ms: int, days: int, entity: str,
                  labels: dict[str, list[tuple[int, int]]]) -> dict[str, dict[str, float]]:
    """entity key -> {count, sum_cents, fraud_count} over the first copies with ts in [C - days, C); `entity` is
    "card" or "merchant"; `labels`: txn_id -> its label versions."""
    seen: set[str] = set()
    out: dict[str, dict[str, float]] = {}
    for t in txns:
        if t.txn_id in seen:
            continue
        seen.add(t.txn_id)
        if cutoff_ms - days * DAY_MS <= t.ts < cutoff_ms:
            agg = out.setdefault(getattr(t, entity), {"count": 0, "sum_cents": 0, "fraud_count": 0})
            agg["count"] += 1
            agg["sum_cents"] += t.amount_cents
            agg["fraud_count"] += known_fraud(labels.get(t.txn_id, []), cutoff_ms)
    return out


def window_features(agg: dict[str, float] | None, snapshot_exists: bool) -> dict[str, float]:
    """count, mean amount (currency units), known fraud count, fraud rate of one entity's window; an entity absent
    from an existing snapshot: 0, NaN, 0, NaN; no snapshot at all: all NaN."""
    if not snapshot_exists:
        return {"count": math.nan, "mean": math.nan, "fraud_count": math.nan, "fraud_rate": math.nan}
    if agg is None or agg["count"] == 0:
        return {"count": 0.0, "mean": math.nan, "fraud_count": 0.0, "fraud_rate": math.nan}
    n = agg["count"]
    return {"count": float(n), "mean": agg["sum_cents"] / (100.0 * n), "fraud_count": float(agg["fraud_count"]),
            "fraud_rate": agg["fraud_count"] / n}
