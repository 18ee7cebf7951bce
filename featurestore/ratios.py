"""The ratio features: one function, called by training-set building and by the scorer alike."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from featurestore.definitions import RATIO_FEATURES, RatioFeature

_SCALARS = (float, int, np.float64, np.float32, np.int64)


def safe_ratio(numerator, denominator):
    """numerator / denominator, NaN where the denominator is missing, zero or not finite.

    Works on scalars and on NumPy/pandas arrays with identical results, so batch and online agree bit for bit:
    a Python scalar takes plain float division (IEEE 754 double, exactly what NumPy computes per element) without
    the cost of building 0-d arrays, which the scorer pays per request.
    """
    if type(numerator) in _SCALARS and type(denominator) in _SCALARS:
        den = float(denominator)
        if den != 0.0 and math.isfinite(den):
            return float(numerator) / den
        return math.nan
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    ok = np.isfinite(den) & (den != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(ok, num / np.where(ok, den, 1.0), np.nan)
    if out.ndim == 0:
        return float(out)
    return out


def compute_ratios(values: Mapping[str, object], ratios: Sequence[RatioFeature] = RATIO_FEATURES) -> dict[str, float]:
    """All ratio features from a mapping holding their numerators and denominators (None = missing)."""
    out = {}
    for r in ratios:
        num, den = values.get(r.numerator), values.get(r.denominator)
        out[r.name] = safe_ratio(math.nan if num is None else num, math.nan if den is None else den)
    return out


def compute_ratio_columns(frame, ratios: Sequence[RatioFeature] = RATIO_FEATURES) -> dict[str, np.ndarray]:
    """Vectorized form over a DataFrame-like object with the numerator/denominator columns."""
    return {r.name: safe_ratio(frame[r.numerator], frame[r.denominator]) for r in ratios}
