"""Live model quality, as pure functions: decisions joined with the labels known now, and input drift.

- **Precision and recall at the threshold, per day** (UTC day of the transaction's `ts`): a decision is the
  scorer's FRAUD/NOT_FRAUD; its truth is the transaction's latest label known at the as-of time, and a transaction
  without a label counts as legitimate (nobody confirms a legitimate payment). Labels arrive up to weeks late, so
  recent days' recall is a lower bound that rises as labels come in; each day reports how many fraud labels it has.
- **Population stability index (PSI) per feature** against the training window: the reference bins are the
  deciles of the feature's finite training values (distinct interior edges, bins (-inf, e1], (e1, e2], ...,
  (ek, inf)) plus one bin for missing values; PSI = sum over bins of (a - e) * ln(a / e), where e and a are the
  training and live shares of each bin, each floored at `PSI_FLOOR` so an empty bin stays finite. Common reading:
  < 0.1 stable, 0.1-0.25 a moderate shift, > 0.25 a major one.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

PSI_FLOOR = 1e-4
DECILES = tuple(i / 10 for i in range(1, 10))


@dataclass(frozen=True)
class Decision:
    """One scored transaction as the scorer answered it (topic `scores`)."""

    txn_id: str
    ts: int
    fraud: bool
    score: float
    model_version: str
    source: str
    features: Mapping[str, float | None] = field(default_factory=dict)


@dataclass
class DayQuality:
    day: str
    decisions: int = 0
    flagged: int = 0
    frauds_known: int = 0  # transactions of the day whose label (as of now) is fraud
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    def as_dict(self) -> dict:
        return {"day": self.day, "decisions": self.decisions, "flagged": self.flagged,
                "frauds_known": self.frauds_known, "tp": self.tp, "fp": self.fp, "fn": self.fn,
                "precision": self.precision, "recall": self.recall}


def one_per_transaction(decisions: Iterable[Decision]) -> list[Decision]:
    """One decision per txn_id: the stream's (the reference scorer; at-least-once, so repeated) when there is one,
    else the first API answer (an API-scored transaction usually enters the stream and is scored there too)."""
    chosen: dict[str, Decision] = {}
    for d in decisions:
        have = chosen.get(d.txn_id)
        if have is None or (have.source != "stream" and d.source == "stream"):
            chosen[d.txn_id] = d
    return list(chosen.values())


def day_of(ts_ms: int) -> str:
    return dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC).strftime("%Y-%m-%d")


def daily_quality(decisions: Sequence[Decision], labels: Mapping[str, int]) -> list[DayQuality]:
    """Per day, in day order: the confusion counts of the decisions against `labels` (txn_id -> latest label)."""
    days: dict[str, DayQuality] = {}
    for d in decisions:
        q = days.setdefault(day_of(d.ts), DayQuality(day_of(d.ts)))
        truth = labels.get(d.txn_id, 0) == 1
        q.decisions += 1
        q.flagged += d.fraud
        q.frauds_known += truth
        q.tp += d.fraud and truth
        q.fp += d.fraud and not truth
        q.fn += (not d.fraud) and truth
    return [days[k] for k in sorted(days)]


def total(days: Sequence[DayQuality]) -> DayQuality:
    out = DayQuality("all")
    for q in days:
        for name in ("decisions", "flagged", "frauds_known", "tp", "fp", "fn"):
            setattr(out, name, getattr(out, name) + getattr(q, name))
    return out


def reference_bins(values: np.ndarray) -> dict:
    """The reference of one feature from its training values: decile edges and each bin's share (last: missing)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    edges = np.unique(np.quantile(finite, DECILES)) if finite.size else np.empty(0)
    shares = bin_shares(values, edges)
    return {"edges": edges.tolist(), "shares": shares.tolist(), "rows": int(values.size)}


def bin_shares(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Shares of `values` in the bins (-inf, e1], (e1, e2], ..., (ek, inf) and a last bin for missing (NaN/None)."""
    values = np.asarray(values, dtype=np.float64)
    if not values.size:
        return np.zeros(len(edges) + 2)
    finite = np.isfinite(values)
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), values[finite], side="left")
    counts = np.bincount(idx, minlength=len(edges) + 1).astype(np.float64)
    counts = np.append(counts, float((~finite).sum()))
    return counts / values.size


def psi(expected: Sequence[float], actual: Sequence[float], floor: float = PSI_FLOOR) -> float:
    """Population stability index of two share vectors over the same bins (shares floored at `floor`)."""
    out = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, floor), max(a, floor)
        out += (a - e) * math.log(a / e)
    return out


def feature_drift(decisions: Sequence[Decision], reference: Mapping[str, dict]) -> dict[str, dict]:
    """PSI of each referenced feature over the decisions' served features (a feature absent from an answer counts
    as missing)."""
    out = {}
    for name, ref in reference.items():
        values = np.array([_num(d.features.get(name)) for d in decisions], dtype=np.float64)
        shares = bin_shares(values, ref["edges"])
        out[name] = {"psi": psi(ref["shares"], shares) if values.size else None, "rows": int(values.size),
                     "shares": shares.tolist(), "reference_shares": list(ref["shares"])}
    return out


def _num(v) -> float:
    try:
        return float("nan") if v is None else float(v)
    except (TypeError, ValueError):
        return float("nan")
