"""One-row in-place prediction without the Python wrapper's per-call work.

`Booster.inplace_predict` calls XGBoost's C entry point `XGBoosterPredictFromDense` on the array it is given, but
first rebuilds the same JSON arguments, the array's interface and a class or two on every call: ~3x the C call
itself for one row (measured 340-510 us vs 105-115 us on the 2-core development machine, 100 trees). A
`RowPredictor` makes that same C call on one preallocated row with arguments built once. It is checked against
`inplace_predict` when a model is loaded; if the check fails (or XGBoost's internals moved) the scorer falls back
to `inplace_predict`.
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np

log = logging.getLogger(__name__)


class RowPredictor:
    """Predicts the probability for `self.row` (shape (1, n), float32; fill it, then call `predict()`)."""

    def __init__(self, booster, n_features: int) -> None:
        from xgboost._data_utils import array_interface
        from xgboost.core import _LIB, c_bst_ulong, make_jcargs

        self.booster = booster  # keeps the handle alive
        self.row = np.full((1, n_features), np.nan, dtype=np.float32)
        self._args = make_jcargs(type=0, training=False, iteration_begin=0, iteration_end=0, missing=float("nan"),
                                 strict_shape=False, cache_id=0)
        self._iface = array_interface(self.row)  # the row's buffer never moves: the interface stays valid
        self._preds = ctypes.POINTER(ctypes.c_float)()
        self._shape = ctypes.POINTER(c_bst_ulong)()
        self._dims = c_bst_ulong()
        self._fn = _LIB.XGBoosterPredictFromDense
        self._handle = booster.handle
        self._null = ctypes.c_void_p()
        self._refs = (ctypes.byref(self._shape), ctypes.byref(self._dims), ctypes.byref(self._preds))

    def predict(self) -> float:
        if self._fn(self._handle, self._iface, self._args, self._null, *self._refs) != 0:
            from xgboost.core import _LIB

            raise RuntimeError(_LIB.XGBGetLastError().decode())
        return float(self._preds[0])


def row_predictor(booster, n_features: int, checks: int = 64) -> RowPredictor | None:
    """A RowPredictor that agrees with `booster.inplace_predict` on random rows (NaNs included), else None."""
    try:
        fast = RowPredictor(booster, n_features)
        rng = np.random.default_rng(0)
        rows = rng.normal(0, 100, (checks, n_features)).astype(np.float32)
        rows[rng.random(rows.shape) < 0.2] = np.nan
        expected = booster.inplace_predict(rows)
        for i in range(checks):
            fast.row[0] = rows[i]
            if fast.predict() != float(expected[i]):
                log.warning("direct prediction disagrees with inplace_predict; using inplace_predict")
                return None
        return fast
    except Exception as exc:  # another XGBoost version: the public path still works
        log.warning("direct prediction unavailable (%s); using inplace_predict", exc)
        return None
