"""Calibration of the booster's scores, fitted on the validation days, kept only where it lowers the Brier score.

Both maps are monotone, so calibrating never reorders transactions (AUC-PR and ROC AUC are unchanged), and neither
has the flat steps of plain isotonic regression, which would merge distinct scores into ties that the threshold
rule could only take or leave together:
- `platt`: sigmoid(a * logit(s) + b), two numbers;
- `isotonic`: pool-adjacent-violators on the validation scores, then linear interpolation between the centres of
  its blocks (anchored at (0, 0) and (1, 1)) instead of its flat steps: strictly increasing between the lowest and
  the highest block centre.
Applying a calibration needs NumPy only (the scorer loads it from the model's metadata JSON, no pickle).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

EPS = 1e-7
FOLDS = 5


@dataclass(frozen=True)
class Calibration:
    method: str = "none"  # "none" | "platt" | "isotonic"
    params: dict = field(default_factory=dict)

    def apply(self, scores: np.ndarray) -> np.ndarray:
        s = np.asarray(scores, dtype=np.float64)
        if self.method == "none":
            return s
        if self.method == "platt":
            z = self.params["a"] * _logit(s) + self.params["b"]
            return 1.0 / (1.0 + np.exp(-z))
        if self.method == "isotonic":
            return np.interp(s, self.params["x"], self.params["y"])
        raise ValueError(f"unknown calibration method {self.method!r}")

    def to_dict(self) -> dict:
        return {"method": self.method, "params": self.params}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(d.get("method", "none"), dict(d.get("params", {})))


def _logit(s: np.ndarray) -> np.ndarray:
    s = np.clip(s, EPS, 1 - EPS)
    return np.log(s) - np.log1p(-s)


def fit_platt(y: np.ndarray, scores: np.ndarray) -> Calibration:
    from scipy.optimize import minimize

    z = _logit(np.asarray(scores, dtype=np.float64))
    y = np.asarray(y, dtype=np.float64)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        t = w[0] * z + w[1]
        # log(1 + e^t) - y t, computed stably; gradient (p - y) * [z, 1]
        ll = np.logaddexp(0.0, t) - y * t
        p = 1.0 / (1.0 + np.exp(-t))
        return float(ll.mean()), np.array([np.mean((p - y) * z), np.mean(p - y)])

    res = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=[(1e-6, None), (None, None)])
    return Calibration("platt", {"a": float(res.x[0]), "b": float(res.x[1])})


def fit_isotonic(y: np.ndarray, scores: np.ndarray) -> Calibration:
    from sklearn.isotonic import IsotonicRegression

    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(s, kind="stable")
    s, yy = s[order], np.asarray(y, dtype=np.float64)[order]
    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True).fit(s, yy).predict(s)
    # Blocks of equal fitted value -> (mean score, value): strictly increasing knots.
    starts = np.r_[0, np.flatnonzero(np.diff(fitted) > 0) + 1]
    counts = np.diff(np.r_[starts, s.size])
    centres = np.add.reduceat(s, starts) / counts
    values = fitted[starts]
    x = np.r_[0.0, centres, 1.0]
    v = np.r_[0.0, values, 1.0]
    keep = np.r_[True, np.diff(x) > 0]  # a centre at exactly 0 or 1 would repeat an anchor
    return Calibration("isotonic", {"x": x[keep].tolist(), "y": np.maximum.accumulate(v[keep]).tolist()})


FITTERS = {"platt": fit_platt, "isotonic": fit_isotonic}


@dataclass(frozen=True)
class CalibrationChoice:
    calibration: Calibration
    #: method -> out-of-fold Brier score on the validation days ("none" = the raw scores)
    brier_oof: dict[str, float]


def choose(y: np.ndarray, scores: np.ndarray, folds: int = FOLDS) -> CalibrationChoice:
    """Out-of-fold Brier on the validation rows (contiguous blocks in time order, so a fold never calibrates on
    its own rows) for each method; the lowest wins if it beats the raw scores, then is refitted on all of them."""
    y = np.asarray(y)
    scores = np.asarray(scores, dtype=np.float64)
    brier = {"none": float(np.mean((scores - y) ** 2))}
    bounds = np.linspace(0, y.size, folds + 1).astype(int)
    for name, fitter in FITTERS.items():
        oof = np.empty_like(scores)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            rest = np.r_[0:a, b:y.size]
            if not (0 < np.sum(y[rest]) < rest.size):
                oof[a:b] = scores[a:b]  # a fold without both classes to learn from: leave raw
                continue
            oof[a:b] = fitter(y[rest], scores[rest]).apply(scores[a:b])
        brier[name] = float(np.mean((oof - y) ** 2))
    best = min(brier, key=brier.get)
    if best == "none" or not 0 < np.sum(y) < y.size:
        return CalibrationChoice(Calibration(), brier)
    return CalibrationChoice(FITTERS[best](y, scores), brier)
