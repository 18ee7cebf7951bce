"""How a fraud score is judged, and the decision-threshold rule. Pure NumPy/scikit-learn, no model code.

AUC-PR is average precision (scikit-learn's step-wise sum, no interpolation): with ~0.25% fraud, ROC AUC is
near 1 for any half-decent model and says little, so AUC-PR ranks models and recall at a fixed low false-positive
rate says what an alert budget buys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: The false-positive rates at which recall is reported (0.1% and 1% of legitimate transactions flagged).
REPORTED_FPRS = (0.001, 0.01)


@dataclass(frozen=True)
class ThresholdRule:
    """The decision threshold is the lowest score whose validation false-positive rate is at most `max_fpr`: the
    highest recall that alert budget allows (flag when score >= threshold)."""

    max_fpr: float = 0.005

    def describe(self) -> str:
        return (f"the lowest threshold whose validation false-positive rate is <= {self.max_fpr:.2%} "
                "(the highest recall at that alert budget); a transaction is flagged when score >= threshold")

    def choose(self, y: np.ndarray, scores: np.ndarray) -> float:
        return threshold_for_max_fpr(y, scores, self.max_fpr)


def threshold_for_max_fpr(y: np.ndarray, scores: np.ndarray, max_fpr: float) -> float:
    """Smallest t with #{legit: score >= t} <= floor(max_fpr * #legit). Ties are never split: a threshold above
    a tied score excludes all of them."""
    if not 0 <= max_fpr < 1:
        raise ValueError("max_fpr must be in [0, 1)")
    neg = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(y) == 0])[::-1]
    if neg.size == 0:
        raise ValueError("no legitimate transactions to set a threshold on")
    allowed = int(np.floor(max_fpr * neg.size + 1e-9))
    if allowed >= neg.size:
        return float(neg[-1])
    # Any t in (neg[allowed], neg[allowed - 1]] flags the same legit rows; the lowest one flags the most fraud.
    return float(np.nextafter(neg[allowed], np.inf))


def average_precision(y: np.ndarray, scores: np.ndarray) -> float:
    return ranking_metrics(y, scores)[0]


def ranking_metrics(y: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(average precision, ROC AUC) by scikit-learn's definitions (tied scores are one threshold), from one
    unstable sort: scikit-learn sorts stably, twice, which made the report's metrics a large share of a seed-scale
    run. NaN where a class is absent (AUC-PR needs fraud; ROC AUC both classes)."""
    pos = np.asarray(y) == 1
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0:
        return float("nan"), float("nan")
    order = np.argsort(s)[::-1]
    ends = np.r_[np.flatnonzero(np.diff(s[order])), s.size - 1]  # the last row of each distinct score
    tps = np.cumsum(pos[order])[ends]
    fps = ends + 1 - tps
    recall = tps / n_pos
    aucpr = float(np.sum(np.diff(recall, prepend=0.0) * (tps / (tps + fps))))
    if n_neg == 0:
        return aucpr, float("nan")
    tpr, fpr = np.r_[0.0, recall], np.r_[0.0, fps / n_neg]
    return aucpr, float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


class AveragePrecision:
    """`average_precision(y, scores)` for one fixed `y`, cheap enough to run after every boosting round (early
    stopping): the same step-wise sum, ties included, without sorting every score.

    Only the distinct positive scores are sorted (a few thousand); each legitimate score is placed among them by a
    binary search, which counts the legitimate rows at or above every positive score. With ~0.25% fraud this is a
    few times faster than a full sort, and equal to scikit-learn's value up to float summation order (tested).
    """

    def __init__(self, y: np.ndarray, neg_weight: float = 1.0) -> None:
        """`neg_weight`: what each legitimate row counts for (1 / share when they are a sample of a larger set:
        average precision with those sample weights, an estimate of the full set's)."""
        y = np.asarray(y)
        self.pos = np.flatnonzero(y == 1)
        self.is_neg = y != 1
        self.neg_weight = float(neg_weight)

    def __call__(self, scores: np.ndarray) -> float:
        if self.pos.size == 0:
            return float("nan")
        s = np.asarray(scores)
        values, counts = np.unique(s[self.pos], return_counts=True)  # ascending
        # Legitimate rows scoring >= values[i] are those placed after position i. Those below every positive
        # score (nearly all of them) are placed at 0 and count for no threshold: only the others are searched.
        above = s[(s >= values[0]) & self.is_neg]
        placed = np.searchsorted(values, above, side="right")
        fp = np.cumsum(np.bincount(placed, minlength=values.size + 1)[::-1])[::-1][1:] * self.neg_weight
        tp = np.cumsum(counts[::-1])[::-1]
        return float(np.sum(counts * (tp / (tp + fp))) / self.pos.size)


def recall_at_fpr(y: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """Recall when the threshold is set so that at most `fpr` of the legitimate transactions are flagged."""
    if not np.any(y == 1):
        return float("nan")
    t = threshold_for_max_fpr(y, scores, fpr)
    return float(np.mean(scores[y == 1] >= t))


def at_threshold(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    flagged = scores >= threshold
    tp = int(np.sum(flagged & (y == 1)))
    fp = int(np.sum(flagged & (y == 0)))
    pos, neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    return {
        "precision_at_threshold": tp / (tp + fp) if tp + fp else float("nan"),
        "recall_at_threshold": tp / pos if pos else float("nan"),
        "fpr_at_threshold": fp / neg if neg else float("nan"),
        "alerts": tp + fp,
    }


@dataclass(frozen=True)
class Metrics:
    aucpr: float
    roc_auc: float
    recall_at_fpr_0_1pct: float
    recall_at_fpr_1pct: float
    precision_at_threshold: float
    recall_at_threshold: float
    fpr_at_threshold: float
    brier: float
    threshold: float
    rows: int
    frauds: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def evaluate(y: np.ndarray, scores: np.ndarray, threshold: float) -> Metrics:
    """Every reported figure for one model on one split."""
    y = np.asarray(y)
    scores = np.asarray(scores, dtype=np.float64)
    at = at_threshold(y, scores, threshold)
    aucpr, roc_auc = ranking_metrics(y, scores)
    return Metrics(
        aucpr=aucpr,
        roc_auc=roc_auc,
        recall_at_fpr_0_1pct=recall_at_fpr(y, scores, REPORTED_FPRS[0]),
        recall_at_fpr_1pct=recall_at_fpr(y, scores, REPORTED_FPRS[1]),
        precision_at_threshold=at["precision_at_threshold"],
        recall_at_threshold=at["recall_at_threshold"],
        fpr_at_threshold=at["fpr_at_threshold"],
        brier=brier(y, scores),
        threshold=float(threshold),
        rows=int(y.size),
        frauds=int(np.sum(y == 1)),
    )


def brier(y: np.ndarray, scores: np.ndarray) -> float:
    return float(np.mean((np.asarray(scores, dtype=np.float64) - y) ** 2))


def first_of_chain(ts: np.ndarray, card: np.ndarray, y: np.ndarray, gap_ms: int) -> np.ndarray:
    """Fraud rows with no earlier fraud row of the same card within `gap_ms`: the first transaction of an attack,
    which no velocity feature can see yet (its window holds only the card's own legitimate history)."""
    fraud = np.flatnonzero(y == 1)
    out = np.zeros(y.size, dtype=bool)
    if fraud.size == 0:
        return out
    order = fraud[np.lexsort((ts[fraud], card[fraud]))]
    same_card = np.r_[False, card[order][1:] == card[order][:-1]]
    close = np.r_[False, np.diff(ts[order]) <= gap_ms]
    out[order] = ~(same_card & close)
    return out
