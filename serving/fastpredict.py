"""One-row prediction without XGBoost's per-call overhead, bit for bit equal to `Booster.inplace_predict`.

For one row, XGBoost's fixed cost per call dominates: `Booster.inplace_predict` rebuilds JSON arguments and the
array's interface on every call (340-510 us measured for 100 trees on the 2-core development machine), and even
the bare C entry point `XGBoosterPredictFromDense` costs 150-250 us of CPU, the same for 1 tree as for 87. Two
faster ways, tried in this order when a model is loaded:

1. `CompiledTrees`: the booster's trees as generated Python code (one nested conditional expression per tree,
   the split thresholds as float32 constants), the margin summed tree by tree in float32 and the logistic link
   computed with the C library's `expf` in float32, as XGBoost does. ~25-45 us a row for 87 trees of depth 6.
   The code is compiled in a short-lived child Python (`compile()` holds the GIL for ~0.5 s on 100 trees, which
   would stall requests during a model switch) and loaded here with `marshal`.
2. `RowPredictor`: the same C call `inplace_predict` makes, with its arguments built once.

Either is used only if it returns exactly `inplace_predict`'s value (float equality) on a check set: random rows
with missing values, and every split threshold of the model with its float32 neighbours. Otherwise (another
objective, categorical splits, DART, or XGBoost's internals moved) the scorer calls `inplace_predict`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import marshal
import math
import subprocess
import sys
from array import array

import numpy as np

log = logging.getLogger(__name__)

#: Larger models stay with XGBoost's C predictor (the generated code grows with the node count).
MAX_COMPILED_NODES = 60_000
MAX_COMPILED_DEPTH = 40  # nested conditional expressions: far below the compiler's nesting limit


class RowPredictor:
    """XGBoost's C prediction of one row, with the call's arguments built once (fill `row`, then `predict()`)."""

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

    def predict_row(self, row: np.ndarray) -> float:
        """The probability for `row` (shape (1, n), float32). Not re-entrant: no await in between."""
        self.row[...] = row
        return self.predict()


_libm = None


def _expf():
    global _libm
    if _libm is None:
        _libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        _libm.expf.restype = ctypes.c_float
        _libm.expf.argtypes = [ctypes.c_float]
        _libm.logf.restype = ctypes.c_float
        _libm.logf.argtypes = [ctypes.c_float]
    return _libm


class CompiledTrees:
    """A binary:logistic gbtree as a Python function of the row's values (see the module's docstring)."""

    def __init__(self, margin_fn, base_margin: float) -> None:
        self._margin = margin_fn
        self._base = base_margin
        self._expf = _expf().expf
        self._f = array("f", [0.0])  # float32 rounding: store a double, read the float32 back

    def margin(self, row: np.ndarray) -> float:
        return self._margin(self._base, *row[0].tolist())

    def predict_row(self, row: np.ndarray) -> float:
        """The probability for `row` (shape (1, n), float32): XGBoost's float32 sigmoid of the margin."""
        f = self._f
        f[0] = self._expf(min(-self._margin(self._base, *row[0].tolist()), 88.7)) + 1.0
        f[0] = f[0] + 1e-16
        f[0] = 1.0 / f[0]
        return f[0]


def _f32(value: float) -> str:
    return repr(float(np.float32(value)))


def _tree_expr(tree: dict, i: int, depth: int) -> str:
    """Node `i` of an XGBoost JSON tree as a Python expression of x0, x1, ... (its leaf value where it ends)."""
    left = tree["left_children"][i]
    if left == -1:
        return _f32(tree["split_conditions"][i])
    if depth > MAX_COMPILED_DEPTH:
        raise OverflowError("tree too deep")
    x, c = f"x{tree['split_indices'][i]}", _f32(tree["split_conditions"][i])
    # A missing value (NaN) fails every comparison: `not x >= c` sends it left, `x < c` right.
    test = f"not {x} >= {c}" if tree["default_left"][i] else f"{x} < {c}"
    right = tree["right_children"][i]
    return f"({_tree_expr(tree, left, depth + 1)} if {test} else {_tree_expr(tree, right, depth + 1)})"


def trees_source(booster, n_features: int) -> tuple[str, float] | None:
    """The generated module's source (defining `margin(acc, x0, x1, ...)`) and the base margin; None when the
    model is not a plain binary:logistic gbtree with numerical splits of a size worth compiling."""
    model = json.loads(booster.save_raw("json"))
    learner = model["learner"]
    params = learner["learner_model_param"]
    booster_json = learner["gradient_booster"]
    if (learner["objective"]["name"] != "binary:logistic" or booster_json["name"] != "gbtree"
            or int(params.get("num_class", 0)) > 1 or int(params.get("num_target", 1)) != 1):
        return None
    trees = booster_json["model"]["trees"]
    if not trees or sum(len(t["left_children"]) for t in trees) > MAX_COMPILED_NODES:
        return None
    base_score = [float(v) for v in str(params["base_score"]).strip("[]").split(",")]
    if len(base_score) != 1:
        return None
    libm = _expf()
    f = array("f", [0.0])
    f[0] = base_score[0]
    f[0] = 1.0 / f[0]
    f[0] = f[0] - 1.0
    base_margin = -float(libm.logf(f[0]))  # XGBoost's ProbToMargin, in float32
    body = []
    for tree in trees:
        left, feature = tree["left_children"], tree["split_indices"]
        if any(tree.get("split_type", [])) or int(tree["tree_param"].get("size_leaf_vector", "1")) > 1:
            return None
        if any(left[i] >= 0 and not 0 <= feature[i] < n_features for i in range(len(left))):
            return None
        try:
            body.append(f"    F[0] = acc + {_tree_expr(tree, 0, 0)}\n    acc = F[0]\n")
        except OverflowError:
            return None
    args = ", ".join(f"x{i}" for i in range(n_features))
    return f"def margin(acc, {args}, F=F):\n" + "".join(body) + "    return acc\n", base_margin


_COMPILE = ("import marshal, sys; sys.stdout.buffer.write(marshal.dumps(compile(sys.stdin.buffer.read().decode(), "
            "'<velocity-trees>', 'exec')))")


def compile_isolated(source: str, timeout_s: float = 120.0):
    """`compile(source)` in a child interpreter (same executable, so the same bytecode), loaded with marshal."""
    out = subprocess.run([sys.executable, "-I", "-S", "-c", _COMPILE], input=source.encode(), capture_output=True,
                         timeout=timeout_s, check=True)
    return marshal.loads(out.stdout)


def compiled_trees(booster, n_features: int) -> CompiledTrees | None:
    """CompiledTrees for the booster, if it can be built and agrees exactly with `inplace_predict`."""
    try:
        made = trees_source(booster, n_features)
        if made is None:
            return None
        source, base_margin = made
        namespace = {"F": array("f", [0.0])}
        exec(compile_isolated(source), namespace)
        fast = CompiledTrees(namespace["margin"], base_margin)
        return fast if _agrees(fast, booster, n_features, _check_rows(booster, n_features)) else None
    except Exception as exc:
        log.warning("compiled trees unavailable (%s); using XGBoost's predictor", exc)
        return None


def _check_rows(booster, n_features: int, random_rows: int = 512, max_rows: int = 4_000) -> np.ndarray:
    """Random rows with missing values, and rows holding each split threshold or a float32 neighbour of it."""
    rng = np.random.default_rng(0)
    thresholds: list[set[float]] = [set() for _ in range(n_features)]
    with np.errstate(all="ignore"):
        for tree in json.loads(booster.save_raw("json"))["learner"]["gradient_booster"]["model"]["trees"]:
            for i, f in enumerate(tree["split_indices"]):
                if tree["left_children"][i] != -1 and 0 <= f < n_features:
                    thresholds[f].add(float(tree["split_conditions"][i]))
    scale = np.array([max((abs(t) for t in ts), default=1.0) or 1.0 for ts in thresholds], dtype=np.float64)
    rows = (rng.random((random_rows, n_features)) * 2 * scale).astype(np.float32)
    rows[rng.random(rows.shape) < 0.2] = np.nan
    extra = []
    for f, ts in enumerate(thresholds):
        for t in sorted(ts):
            t32 = np.float32(t)
            for v in (t32, np.nextafter(t32, np.float32(-np.inf)), np.nextafter(t32, np.float32(np.inf))):
                row = rows[rng.integers(0, random_rows)].copy()
                row[f] = v
                extra.append(row)
    if extra:
        extra = np.asarray(extra, dtype=np.float32)
        if len(extra) > max_rows:
            extra = extra[rng.choice(len(extra), max_rows, replace=False)]
        rows = np.vstack([rows, extra])
    return rows


def _agrees(fast, booster, n_features: int, rows: np.ndarray) -> bool:
    expected = booster.inplace_predict(rows)
    for i in range(len(rows)):
        got = fast.predict_row(rows[i:i + 1])
        if got != float(expected[i]) and not (math.isnan(got) and math.isnan(float(expected[i]))):
            log.warning("a one-row predictor disagrees with inplace_predict (%r vs %r); not used", got,
                        float(expected[i]))
            return False
    return True


def row_predictor(booster, n_features: int, checks: int = 64) -> RowPredictor | None:
    """A RowPredictor that agrees with `booster.inplace_predict` on random rows (NaNs included), else None."""
    try:
        fast = RowPredictor(booster, n_features)
        rng = np.random.default_rng(0)
        rows = rng.normal(0, 100, (checks, n_features)).astype(np.float32)
        rows[rng.random(rows.shape) < 0.2] = np.nan
        return fast if _agrees(fast, booster, n_features, rows) else None
    except Exception as exc:  # another XGBoost version: the public path still works
        log.warning("direct prediction unavailable (%s); using inplace_predict", exc)
        return None


def one_row_predictor(booster, n_features: int) -> CompiledTrees | RowPredictor | None:
    """The fastest one-row predictor that agrees exactly with `inplace_predict` (None: use inplace_predict)."""
    return compiled_trees(booster, n_features) or row_predictor(booster, n_features)


class PlattOne:
    """Platt calibration of one score with the very float64 operations of `Calibration.apply` on a one-element
    array (NumPy's log, log1p and exp; clip as min/max), without the array machinery: ~1.5 us instead of 15-35."""

    def __init__(self, a: float, b: float, eps: float) -> None:
        self.a, self.b, self.lo, self.hi = a, b, eps, 1 - eps

    def __call__(self, score: float) -> float:
        s = min(max(score, self.lo), self.hi)
        z = self.a * (np.log(s) - np.log1p(-s)) + self.b
        return float(1.0 / (1.0 + np.exp(-z)))


def one_calibrator(calibrate, checks: int = 4_000):
    """A one-score form of the model's calibration (`calibrate`: a bound `Calibration.apply`) that returns exactly
    what `calibrate(np.array([score]))[0]` does on a check set of float32 scores (random, near 0 and 1, and the
    clip edges); None otherwise (another method, or any difference): the scorer then calls `calibrate`."""
    cal = getattr(calibrate, "__self__", None)
    if cal is None or getattr(cal, "method", None) != "platt":
        return None
    try:
        from model.calibration import EPS

        one = PlattOne(float(cal.params["a"]), float(cal.params["b"]), EPS)
        rng = np.random.default_rng(0)
        edges = np.array([0.0, 1.0, EPS, 1 - EPS, 0.5, 1e-30, 1e-9], dtype=np.float32)
        values = np.concatenate([rng.random(checks // 2, dtype=np.float32),
                                 rng.random(checks // 2, dtype=np.float32) ** 8, 1 - rng.random(64, dtype=np.float32)
                                 ** 8, edges, np.nextafter(edges, np.float32(0.5))]).tolist()
        for v in values:
            if one(v) != float(calibrate(np.array([v]))[0]):
                log.warning("the one-score calibration differs from Calibration.apply at %r; not used", v)
                return None
        return one
    except Exception as exc:
        log.warning("one-score calibration unavailable (%s)", exc)
        return None
