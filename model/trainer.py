"""XGBoost fits on a time split, and the choices made on the validation days: the class-imbalance strategy and
which declared features beyond the original four are worth their place.

Every fit is the same code on CPU and CUDA (`device` is a parameter), uses the `hist` tree method, stops early on
validation AUC-PR, and keeps only its best rounds.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from model import features as feats
from model.data import TimeSplit, TrainingData
from model.metrics import AveragePrecision, average_precision

#: XGBoost's OpenMP threads wait for each other many times a round. Spinning while they wait (libgomp's default)
#: takes the CPU away from the thread that holds the work whenever the machine runs more than its cores: on the
#: shared 2-core machine (load ~7), 40 rounds took 40.6 s spinning and 8.5-11.9 s sleeping (one thread: 11.6-17.7 s).
#: Read when XGBoost's OpenMP runtime loads, i.e. at the first fit; an explicit setting is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: The model's defaults (a `--tune N` search may replace them when it beats them on validation). max_depth 4: on
#: the seed history's validation days, with every feature group, depth 3/4/5/6/8 gave AUC-PR 0.7820/0.7857/0.7838/
#: 0.7813/0.7753 (depth 8 with min_child_weight 5; 10% negatives, scale_pos_weight; 2026-11-30).
DEFAULT_PARAMS: dict[str, float] = {"max_depth": 4, "eta": 0.1, "min_child_weight": 1.0, "subsample": 0.8,
                                    "colsample_bytree": 1.0, "gamma": 0.0, "reg_lambda": 1.0}
#: The original system's model: its four features with these hyperparameters and 100 rounds, no reweighting.
ORIGINAL_PARAMS: dict[str, float] = {"max_depth": 5, "eta": 0.2, "gamma": 4.0, "min_child_weight": 6.0,
                                     "subsample": 0.7}
ORIGINAL_ROUNDS = 100
MAX_ROUNDS = 1000
EARLY_STOPPING_ROUNDS = 30
#: Early stopping scores every round on the validation days' fraud rows and this share of their legitimate rows
#: (a fixed draw, each counted 1 / share: an unbiased estimate of the false positives above each fraud score).
#: Scoring and ranking all ~530k validation rows after every round took about half of a fit's time at seed scale;
#: every validation AUC-PR a choice reads (`Fit.val_aucpr`) is still computed on every validation row.
EARLY_STOPPING_NEGATIVE_RATE = 0.2
#: Validation AUC-PR a feature group must add to be kept, and the most a cheaper imbalance strategy may cost.
MIN_GAIN = 0.005
#: Share of the legitimate training rows kept by negative subsampling (each weighted 1 / rate).
NEGATIVE_RATE = 0.1


@dataclass(frozen=True)
class Imbalance:
    """How the ~0.25% fraud is handled: `scale_pos_weight` = sqrt(#legit / #fraud) on the fraud rows, and/or
    training on a `negative_rate` share of the legitimate rows, each weighted 1 / rate (the weight correction keeps
    the loss an unbiased estimate of the full data's)."""

    scale_pos_weight: bool = False
    negative_rate: float = 1.0

    @property
    def name(self) -> str:
        parts = ["scale_pos_weight"] if self.scale_pos_weight else []
        if self.negative_rate < 1:
            parts.append(f"negatives subsampled to {self.negative_rate:.0%} (weight x{1 / self.negative_rate:g})")
        return " + ".join(parts) or "no reweighting"

    @property
    def short(self) -> str:
        parts = ["spw"] if self.scale_pos_weight else []
        if self.negative_rate < 1:
            parts.append(f"neg {self.negative_rate:.0%}")
        return " + ".join(parts) or "none"

    def to_dict(self) -> dict:
        return {"scale_pos_weight": self.scale_pos_weight, "negative_rate": self.negative_rate, "name": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> Imbalance:
        return cls(bool(d["scale_pos_weight"]), float(d["negative_rate"]))


#: Used when no `--compare-imbalance` run has chosen one yet: what the seed-scale comparison chose (bench/RESULTS.md).
DEFAULT_IMBALANCE = Imbalance(scale_pos_weight=True, negative_rate=NEGATIVE_RATE)


class Progress:
    """What a long fit reports; the CLI draws bars, tests pass this silent one."""

    def start(self, label: str, total: int) -> object:
        return label

    def advance(self, handle: object, done: int, info: str = "") -> None:
        pass

    def finish(self, handle: object, info: str = "") -> None:
        pass


@dataclass
class Fit:
    name: str
    features: tuple[str, ...]
    params: dict
    imbalance: Imbalance
    booster: object  # xgboost.Booster, cut to its best round, predicting on the CPU
    rounds: int
    seconds: float
    train_rows: int
    val_scores: np.ndarray
    val_aucpr: float
    early_stopped: bool = True
    extra: dict = field(default_factory=dict)


class Trainer:
    """Fits on one TrainingData and TimeSplit, on one device."""

    def __init__(self, data: TrainingData, split: TimeSplit, *, device: str, seed: int = 0,
                 progress: Progress | None = None, max_rounds: int = MAX_ROUNDS,
                 early_stopping_rounds: int = EARLY_STOPPING_ROUNDS,
                 early_stopping_negative_rate: float = EARLY_STOPPING_NEGATIVE_RATE) -> None:
        self.data = data
        self.split = split
        self.slices = split.slices(data.ts)
        self.device = device
        self.seed = seed
        self.progress = progress or Progress()
        self.max_rounds = max_rounds
        self.early_stopping_rounds = early_stopping_rounds
        tr = self.slices["train"]
        y_tr = data.y[tr]
        self.n_pos = int(np.sum(y_tr == 1))
        self.n_neg = int(y_tr.size - self.n_pos)
        self.fit_seconds = 0.0  # every fit's training time, summed (the device's share of the run)
        # The rows early stopping scores after every round (positions in the validation slice): every fraud row,
        # a fixed draw of the legitimate ones; AUC-PR over them counts each legitimate row 1 / rate.
        y_val = self.y("validation")
        rate = early_stopping_negative_rate
        if not 0 < rate <= 1:
            raise ValueError("early_stopping_negative_rate must be in (0, 1]")
        draw = np.random.default_rng(seed + 1).random(y_val.size) < rate
        self.stop_rows = np.flatnonzero((y_val == 1) | draw) if rate < 1 else np.arange(y_val.size)
        self.val_aucpr = AveragePrecision(y_val[self.stop_rows], neg_weight=1.0 / rate if rate < 1 else 1.0)
        # Matrices reused across fits of the same inputs and rows (the original baseline learns from the declared
        # four's, the no-merchant baseline from a feature-selection fit's): XGBoost's quantised training matrix,
        # and the plain validation matrix early stopping scores.
        self._dtrain: dict[tuple, object] = {}
        self._dval: dict[tuple, object] = {}

    @property
    def scale_pos_weight(self) -> float:
        return math.sqrt(self.n_neg / max(self.n_pos, 1))

    def y(self, split: str) -> np.ndarray:
        return self.data.y[self.slices[split]]

    def matrix(self, split: str, features: Sequence[str]) -> np.ndarray:
        return self.data.X[self.slices[split]][:, self.data.cols(list(features))]

    def _train_rows(self, imbalance: Imbalance) -> tuple[np.ndarray | slice, np.ndarray | None]:
        tr = self.slices["train"]
        if imbalance.negative_rate >= 1:
            return tr, None
        y = self.data.y[tr]
        # The same seed draws the same legitimate rows for every fit, so comparisons differ only in what they test.
        keep = (y == 1) | (np.random.default_rng(self.seed).random(y.size) < imbalance.negative_rate)
        rows = np.flatnonzero(keep) + tr.start
        weight = np.where(self.data.y[rows] == 1, 1.0, 1.0 / imbalance.negative_rate).astype(np.float32)
        return rows, weight

    def xgb_params(self, params: dict, imbalance: Imbalance) -> dict:
        # Validation AUC-PR is computed by `AveragePrecision` (the report's own definition), not XGBoost's aucpr.
        out = {"objective": "binary:logistic", "disable_default_eval_metric": 1, "tree_method": "hist",
               "max_bin": 256, "device": self.device, "seed": self.seed, "verbosity": 1, **params}
        if imbalance.scale_pos_weight:
            out["scale_pos_weight"] = self.scale_pos_weight
        return out

    def _train_matrix(self, features: tuple[str, ...], imbalance: Imbalance, max_bin: int):
        """The quantised training matrix of these inputs and rows, built once and kept for the next fit of the
        same inputs (the cache holds the last few: each is ~1 byte per cell)."""
        import xgboost as xgb

        key = (features, imbalance.negative_rate, max_bin)
        if key not in self._dtrain:
            rows, weight = self._train_rows(imbalance)
            cols = self.data.cols(list(features))
            X_tr = self.data.X[rows][:, cols] if isinstance(rows, slice) else self.data.X[np.ix_(rows, cols)]
            while len(self._dtrain) >= 6:
                self._dtrain.pop(next(iter(self._dtrain)))
            self._dtrain[key] = xgb.QuantileDMatrix(X_tr, self.data.y[rows], weight=weight, max_bin=max_bin)
        return self._dtrain[key]

    def _val_matrix(self, features: tuple[str, ...]):
        import xgboost as xgb

        if features not in self._dval:
            while len(self._dval) >= 4:
                self._dval.pop(next(iter(self._dval)))
            rows = self.stop_rows
            self._dval[features] = xgb.DMatrix(self.matrix("validation", features)[rows], self.y("validation")[rows])
        return self._dval[features]

    def fit(self, name: str, features: Sequence[str], params: dict, imbalance: Imbalance, *,
            rounds: int | None = None, early_stopping: bool = True, callbacks: Sequence = ()) -> Fit:
        """One fit, stopped early on validation AUC-PR and cut to its best round; without early stopping, exactly
        `rounds` rounds."""
        import xgboost as xgb

        features = tuple(features)
        rounds = rounds or self.max_rounds
        full = self.xgb_params(params, imbalance)
        handle = self.progress.start(name, rounds)
        t0 = time.perf_counter()
        dtrain = self._train_matrix(features, imbalance, int(full["max_bin"]))
        evals, metric = [], None
        if early_stopping:
            # Scored after every round (on `stop_rows`): a plain DMatrix (raw values take the same branches as their
            # bins) predicts about 3x faster than a quantised one, and AveragePrecision avoids sorting every score.
            evals = [(self._val_matrix(features), "val")]
            metric = _aucpr_metric(self.val_aucpr)
        cbs = [_ProgressCallback(self.progress, handle), *callbacks]
        try:
            booster = xgb.train(full, dtrain, num_boost_round=rounds, evals=evals, verbose_eval=False,
                                early_stopping_rounds=self.early_stopping_rounds if early_stopping else None,
                                custom_metric=metric, maximize=True if early_stopping else None, callbacks=cbs)
        except BaseException as exc:  # a pruned tuning trial, Ctrl-C: close this fit's line, then go on up
            self.fit_seconds += time.perf_counter() - t0
            self.progress.finish(handle, str(exc) or type(exc).__name__)
            raise
        seconds = time.perf_counter() - t0
        self.fit_seconds += seconds
        best = booster.best_iteration + 1 if early_stopping else rounds
        booster = booster[:best]  # keep only the rounds early stopping chose: the saved model is what was measured
        booster.set_param({"device": "cpu"})  # every score is computed as the scorer will: on the CPU
        booster.feature_names = list(features)  # saved with the model: a scorer can check its vector's order
        val_scores = predict(booster, self.matrix("validation", features))
        aucpr = average_precision(self.y("validation"), val_scores)
        self.progress.finish(handle, f"{best} rounds, val AUC-PR {aucpr:.4f}")
        return Fit(name, features, full, imbalance, booster, best, seconds, int(dtrain.num_row()), val_scores, aucpr,
                   early_stopping)

    def scores(self, fit: Fit, split: str) -> np.ndarray:
        return predict(fit.booster, self.matrix(split, fit.features))


def predict(booster, X: np.ndarray) -> np.ndarray:
    """Probabilities as float64 (XGBoost reads the float32 features; the same call the loader makes)."""
    return np.asarray(booster.inplace_predict(np.ascontiguousarray(X, dtype=np.float32)), dtype=np.float64)


def _aucpr_metric(aucpr: AveragePrecision):
    """XGBoost's custom metric: validation AUC-PR (average precision) of the probabilities, named `aucpr`."""

    def metric(predt: np.ndarray, _dmatrix) -> tuple[str, float]:
        return "aucpr", aucpr(predt)

    return metric


class _ProgressCallback:
    """xgboost.callback.TrainingCallback, built lazily so importing this module does not import XGBoost."""

    def __new__(cls, progress: Progress, handle: object):
        import xgboost as xgb

        class _Cb(xgb.callback.TrainingCallback):
            def after_iteration(self, model, epoch, evals_log) -> bool:
                val = evals_log.get("val", {}).get("aucpr")
                progress.advance(handle, epoch + 1, f"val AUC-PR {val[-1]:.4f}" if val else "")  # XGBoost's own
                return False

        return _Cb()


# ------------------------------------------------------------------ choices made on validation


@dataclass
class ImbalanceComparison:
    chosen: Imbalance
    rows: list[dict]  # one per strategy: name, val_aucpr, rounds, seconds, train_rows
    rule: str

    def to_dict(self) -> dict:
        return {"chosen": self.chosen.to_dict(), "rows": self.rows, "rule": self.rule}


def compare_imbalance(trainer: Trainer, features: Sequence[str], params: dict,
                      rate: float = NEGATIVE_RATE) -> ImbalanceComparison:
    """No reweighting vs scale_pos_weight, each on all legitimate rows and on a subsample with weight correction;
    the fastest strategy within MIN_GAIN of the best validation AUC-PR wins."""
    candidates = [Imbalance(False, 1.0), Imbalance(True, 1.0), Imbalance(False, rate), Imbalance(True, rate)]
    fits = [trainer.fit(f"imbalance: {c.short}", features, params, c) for c in candidates]
    best = max(f.val_aucpr for f in fits)
    eligible = [f for f in fits if f.val_aucpr >= best - MIN_GAIN]
    chosen = min(eligible, key=lambda f: f.seconds)
    rows = []
    for f in fits:
        full = next(g for g in fits if g.imbalance.scale_pos_weight == f.imbalance.scale_pos_weight
                    and g.imbalance.negative_rate == 1.0)
        rows.append({"strategy": f.imbalance.name, **f.imbalance.to_dict(), "val_aucpr": f.val_aucpr,
                     "rounds": f.rounds, "seconds": f.seconds, "train_rows": f.train_rows,
                     "time_saved_vs_all_rows": 1 - f.seconds / full.seconds if full.seconds else 0.0,
                     "aucpr_cost_vs_all_rows": full.val_aucpr - f.val_aucpr, "chosen": f is chosen})
    rule = (f"the fastest strategy whose validation AUC-PR is within {MIN_GAIN} of the best "
            f"(features: {', '.join(features)})")
    return ImbalanceComparison(chosen.imbalance, rows, rule)


@dataclass
class FeatureSelection:
    fit: Fit  # the kept set's fit: the model
    rows: list[dict]
    fits: list[Fit]
    rule: str


def select_features(trainer: Trainer, params: dict, imbalance: Imbalance, *, event_time: bool = True
                    ) -> FeatureSelection:
    """Start from the declared model features (the original four); add each block of other feature groups (the
    groups of one entity and source: `features.candidate_groups`), in declaration order, only if it raises
    validation AUC-PR by at least MIN_GAIN over the set kept so far. The last kept fit is the model.
    `event_time=False`: the event-time features are not candidates (`velocity train --no-event-time`)."""
    kept = trainer.fit("features: declared four" if len(feats.base_features()) == 4 else "features: declared",
                       feats.base_features(), params, imbalance)
    rows = [{"features": "declared model features (" + ", ".join(kept.features) + ")", "added": "",
             "val_aucpr": kept.val_aucpr, "gain": None, "kept": True, "rounds": kept.rounds,
             "seconds": kept.seconds}]
    fits = [kept]
    for group in feats.candidate_groups(event_time):
        cand = feats.ordered(set(kept.features) | set(group.features))
        fit = trainer.fit(f"features: +{group.name}", cand, params, imbalance)
        fits.append(fit)
        gain = fit.val_aucpr - kept.val_aucpr
        ok = gain >= MIN_GAIN
        rows.append({"features": "+ " + group.name + " (" + ", ".join(group.features) + ")", "added": group.name,
                     "val_aucpr": fit.val_aucpr, "gain": gain, "kept": ok, "rounds": fit.rounds,
                     "seconds": fit.seconds})
        if ok:
            kept = fit
    rule = (f"a block of feature groups (those of one entity and source) is added, in declaration order, only if it "
            f"raises validation AUC-PR by >= {MIN_GAIN} over the features kept so far"
            + ("" if event_time else "; the event-time features are not candidates (--no-event-time)"))
    return FeatureSelection(kept, rows, fits, rule)


@dataclass
class FeatureAblation:
    """Drop-one comparison of the kept feature set: what each feature beyond the declared model features adds
    given all the others (the kept fit's validation AUC-PR minus the same recipe's without it)."""

    rows: list[dict]
    rule: str

    def to_dict(self) -> dict:
        return {"rows": self.rows, "rule": self.rule}


def ablate_features(trainer: Trainer, kept: Fit, params: dict, imbalance: Imbalance) -> FeatureAblation:
    """For each kept feature beyond the declared model features (those are the original system's and stay), refit
    the same recipe without it. A group is chosen as a whole by `select_features`; this shows its members one by
    one (`helps`: its removal costs at least the MIN_GAIN a group must add)."""
    base = set(feats.base_features())
    rows = []
    for name in kept.features:
        if name in base:
            continue
        fit = trainer.fit(f"without {name}", [f for f in kept.features if f != name], params, imbalance)
        loss = kept.val_aucpr - fit.val_aucpr
        rows.append({"feature": name, "group": _group_name(name), "val_aucpr_without": fit.val_aucpr,
                     "loss": loss, "helps": loss >= MIN_GAIN, "rounds": fit.rounds, "seconds": fit.seconds})
    rule = (f"each kept feature beyond the declared model features is dropped in turn (same recipe); what it adds "
            f"is the fall in validation AUC-PR without it (kept set: {kept.val_aucpr:.4f})")
    return FeatureAblation(rows, rule)


def _group_name(feature: str) -> str:
    from featurestore import definitions as defs

    group = defs.REGISTRY.group_of(feature)
    return group.name if group is not None else "ratios"


#: The original-four baseline learns from every fraud row and this share of the legitimate ones, each weighted
#: 1 / share: the same loss as on every row, in expectation (no class reweighting), for a tenth of the time
#: (100 rounds over every training row were ~17% of a default run's time at seed scale).
ORIGINAL_NEGATIVE_RATE = NEGATIVE_RATE


def original_baseline(trainer: Trainer) -> Fit:
    """The original system: its four features, depth 5, eta 0.2, gamma 4, min_child_weight 6, subsample 0.7,
    100 rounds, no class reweighting; fitted on a weight-corrected negative subsample (ORIGINAL_NEGATIVE_RATE)."""
    return trainer.fit("baseline: original four", feats.base_features(), ORIGINAL_PARAMS,
                       Imbalance(False, ORIGINAL_NEGATIVE_RATE), rounds=ORIGINAL_ROUNDS, early_stopping=False)


def no_merchant_baseline(trainer: Trainer, final: Fit, params: dict, imbalance: Imbalance,
                         done: Sequence[Fit] = ()) -> Fit | None:
    """The model's own recipe without its merchant-keyed features: what the merchant entity adds. None when the
    model uses no merchant feature (then the model is its own baseline). A fit in `done` (the feature selection's)
    of exactly that feature set with the same recipe is reused rather than fitted again."""
    merchant = set(feats.merchant_features(final.features))
    if not merchant:
        return None
    features = tuple(f for f in final.features if f not in merchant)
    for fit in done:
        if fit.features == features and fit.params == final.params and fit.imbalance == final.imbalance:
            return fit
    return trainer.fit("baseline: no merchant features", features, params, imbalance)


def amount_baseline(trainer: Trainer, params: dict, imbalance: Imbalance) -> Fit:
    """The model's own recipe with the amount alone: what the velocity features add."""
    return trainer.fit("baseline: amount only", ("amount",), params, imbalance)
