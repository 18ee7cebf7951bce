"""`velocity train` end to end: load the point-in-time training set, split it by day, make each choice on the
validation days, measure the model and both baselines on the test days, write the versioned model directory with
its report, and track the run in MLflow. A run is saved and tracked whole, or not at all.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path

from model import calibration as cal
from model import data as data_mod
from model import features as feats
from model import kinds as kinds_mod
from model import registry, tracking
from model.device import resolve as resolve_device
from model.metrics import ThresholdRule, average_precision, evaluate, first_of_chain
from model.trainer import (
    DEFAULT_IMBALANCE,
    DEFAULT_PARAMS,
    EARLY_STOPPING_ROUNDS,
    MAX_ROUNDS,
    FeatureSelection,
    Fit,
    Imbalance,
    Progress,
    Trainer,
    ablate_features,
    amount_baseline,
    compare_imbalance,
    no_merchant_baseline,
    original_baseline,
    select_features,
)
from model.tune import TuneResult, tune

LIBRARIES = ("xgboost", "numpy", "pandas", "pyarrow", "duckdb", "scikit-learn", "scipy", "optuna", "mlflow-skinny",
             "matplotlib")


@dataclass
class TrainOptions:
    source: data_mod.Source
    data_dir: Path
    models_dir: Path
    secret: str
    allowed_lateness_ms: int
    start: dt.date | None = None
    end: dt.date | None = None
    val_days: int | None = None
    test_days: int | None = None
    device: str = "auto"
    tune_trials: int = 0
    compare_imbalance: bool = False
    compare_features: bool = False
    #: Whether the event-time features (the hour of day) are candidates; False: a model that does not read the clock.
    event_time: bool = True
    rule: ThresholdRule = field(default_factory=ThresholdRule)
    seed: int = 0
    max_rounds: int = MAX_ROUNDS
    early_stopping_rounds: int = EARLY_STOPPING_ROUNDS
    make_current: bool = True
    experiment: str | None = None
    fraud_kinds: Path | None = None  # side file for the by-kind breakdown (default: next to the history, if there)
    labels_as_of_ms: int | None = None  # the target is the label known at this time (default: now)


@dataclass
class TrainResult:
    version: str
    created_at: str
    model_dir: Path
    device: str
    device_why: str
    source: str
    start: dt.date
    end: dt.date
    rows: int
    unlabeled_dropped: int
    split: data_mod.TimeSplit
    split_counts: dict
    imbalance: Imbalance
    imbalance_source: str
    imbalance_comparison: dict | None
    scale_pos_weight: float
    selection: FeatureSelection
    ablation: dict | None
    tuning: TuneResult | None
    features: tuple[str, ...]
    params: dict
    best_rounds: int
    max_rounds: int
    early_stopping_rounds: int
    declarations_version: str
    calibration_choice: cal.CalibrationChoice
    calibration: cal.Calibration
    rule: ThresholdRule
    threshold: float
    metrics: dict
    chains: dict
    importance: dict
    scores: dict
    durations: dict
    libraries: dict
    tracking_uri: str = ""
    experiment: str = ""
    run_id: str = ""
    previous_current: str | None = None
    made_current: bool = False
    metadata: dict = field(default_factory=dict)
    target: dict = field(default_factory=dict)  # model.targets.Target.to_dict() + "description"
    by_kind: dict | None = None  # {"source": path, "models": {name: {kind: figures}}}

    @property
    def report_path(self) -> Path:
        return self.model_dir / registry.REPORT_FILE


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        with contextlib.suppress(importlib_metadata.PackageNotFoundError):
            out[name] = importlib_metadata.version(name)
    return out


def _batch_count_feature() -> str | None:
    """The batch group's count feature (num_trans_last_1w), from the declarations."""
    from featurestore import definitions as defs

    for group in sorted(defs.FEATURE_GROUPS, key=lambda g: g.entity != "card"):  # the card's snapshot first
        if group.source == "batch":
            for f in group.features:
                if getattr(f, "function", getattr(f, "aggregation", None)) == "count":
                    return f.name
    return None


def _remembered_imbalance(models_dir: Path) -> tuple[Imbalance, str, dict | None]:
    rec = registry.load_imbalance_choice(models_dir)
    if rec is not None and not (isinstance(rec.get("chosen"), dict) and isinstance(rec.get("rows"), list)):
        rec = None  # unreadable: fall back to the default rather than guess
    if rec is None:
        return DEFAULT_IMBALANCE, ("the built-in default (what the seed-scale comparison chose, bench/RESULTS.md); "
                                   "`velocity train --compare-imbalance` measures it on your data and remembers the "
                                   "choice"), None
    return (Imbalance.from_dict(rec["chosen"]),
            f"remembered from the `--compare-imbalance` run of model {rec.get('version')} ({rec.get('measured_at')}, "
            f"window {rec.get('window')}); its comparison is below", rec)


def train(opts: TrainOptions, progress: Progress | None = None, status=None) -> TrainResult:
    """Run everything; `status(step, detail)` is told what the slow steps between fits are doing."""
    progress = progress or Progress()
    status = status or (lambda _step, _detail="": None)
    t_start = time.perf_counter()
    durations: dict[str, float] = {}
    cpu = {"last": time.process_time()}  # this process's CPU seconds (every thread's), per step: load-independent

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        durations[f"{name}_s"] = now - since
        now_cpu = time.process_time()
        durations[f"{name}_cpu_s"] = now_cpu - cpu["last"]
        cpu["last"] = now_cpu
        return now

    device, device_why = resolve_device(opts.device)
    trk = tracking.settings(opts.data_dir, opts.experiment)
    status("connecting to MLflow", trk.uri)
    experiment_id = tracking.prepare(trk)
    t = time.perf_counter()
    cpu["last"] = time.process_time()

    status("loading the training set", opts.source.describe())
    kinds_path = opts.fraud_kinds or kinds_mod.default_path(opts.source.history)
    kinds_table = kinds_mod.read(kinds_path) if kinds_path is not None else None  # refused before the slow part
    data = data_mod.load(opts.source, start=opts.start, end=opts.end, secret=opts.secret,
                         allowed_lateness_ms=opts.allowed_lateness_ms, labels_as_of_ms=opts.labels_as_of_ms)
    split = data_mod.split_by_day(data.ts, val_days=opts.val_days, test_days=opts.test_days)
    slices = split.slices(data.ts)
    without = data_mod.check_snapshots(data, split, slices, count_feature=_batch_count_feature())
    counts = {k: {"rows": sl.stop - sl.start, "frauds": int(data.y[sl].sum()), "without_snapshot": without[k]}
              for k, sl in slices.items()}
    for k, c in counts.items():
        if c["frauds"] == 0:
            a, b = split.ranges()[k]
            raise data_mod.TrainingDataError(
                f"the {k} days ({a} .. {b - dt.timedelta(days=1)}) hold no fraud: AUC-PR is undefined there; widen "
                "the window or --val-days/--test-days")
    t = lap("load", t)

    trainer = Trainer(data, split, device=device, seed=opts.seed, progress=progress, max_rounds=opts.max_rounds,
                      early_stopping_rounds=opts.early_stopping_rounds)
    version = registry.new_version()
    comparison = None
    if opts.compare_imbalance:
        comparison = compare_imbalance(trainer, feats.ordered(feats.all_features()), DEFAULT_PARAMS).to_dict()
        imbalance = Imbalance.from_dict(comparison["chosen"])
        imbalance_source = "chosen by the comparison in this run (below) and remembered for later runs"
        t = lap("imbalance_comparison", t)
    else:
        imbalance, imbalance_source, remembered = _remembered_imbalance(opts.models_dir)
        comparison = remembered

    selection = select_features(trainer, DEFAULT_PARAMS, imbalance, event_time=opts.event_time)
    t = lap("feature_selection", t)
    final: Fit = selection.fit
    ablation = None
    if opts.compare_features:
        ablation = ablate_features(trainer, final, DEFAULT_PARAMS, imbalance).to_dict()
        t = lap("feature_ablation", t)
    tuned = None
    if opts.tune_trials > 0:
        tuned = tune(trainer, final.features, imbalance, opts.tune_trials, default_fit=final)
        if tuned.improved:
            final = tuned.best_fit
        t = lap("tuning", t)
    params = {k: v for k, v in final.params.items() if k in DEFAULT_PARAMS}

    amount = amount_baseline(trainer, params, imbalance)
    original = original_baseline(trainer)
    no_merchant = no_merchant_baseline(trainer, final, params, imbalance, selection.fits)
    t = lap("baselines", t)

    status("calibration, threshold, metrics")
    y_val, y_test = trainer.y("validation"), trainer.y("test")
    choice = cal.choose(y_val, final.val_scores)
    calib = choice.calibration
    val_cal = calib.apply(final.val_scores)
    threshold = opts.rule.choose(y_val, val_cal)
    test_raw = trainer.scores(final, "test")
    test_cal = calib.apply(test_raw)
    metrics = {
        "model": {"test": evaluate(y_test, test_cal, threshold).to_dict(),
                  "validation": evaluate(y_val, val_cal, threshold).to_dict()},
        "model_raw": {"test": evaluate(y_test, test_raw, opts.rule.choose(y_val, final.val_scores)).to_dict()},
    }
    scores = {"y_test": y_test, "model": test_cal, "model_raw": test_raw}
    thresholds = {"model": threshold}
    baselines = (("original_four", original), ("amount_only", amount))
    if no_merchant is not None:
        baselines = (("no_merchant", no_merchant), *baselines)
    for name, fit in baselines:
        thr = opts.rule.choose(y_val, fit.val_scores)
        s = trainer.scores(fit, "test")
        scores[name] = s
        thresholds[name] = thr
        metrics[name] = {"test": evaluate(y_test, s, thr).to_dict(),
                         "validation": evaluate(y_val, fit.val_scores, thr).to_dict()}
    te = slices["test"]
    by_kind = None
    if kinds_table is not None:
        kind = kinds_mod.kinds_of(data.txn_id.slice(te.start, te.stop - te.start), y_test, kinds_table)
        by_kind = {"source": str(kinds_path), "models": {
            name: kinds_mod.breakdown(y_test, scores[name], thresholds[name], kind) for name in thresholds}}
    first = first_of_chain(data.ts[te], data.card[te], y_test, gap_ms=10 * 60_000)
    later = (y_test == 1) & ~first
    chains = {}
    for label, key in (("model", "model"), ("original four", "original_four"), ("amount only", "amount_only")):
        hit = scores[key] >= thresholds[key]
        chains[label] = {"first": float(hit[first].mean()) if first.any() else float("nan"),
                         "later": float(hit[later].mean()) if later.any() else float("nan"),
                         "n_first": int(first.sum()), "n_later": int(later.sum()),
                         "aucpr_without_first": average_precision(y_test[~first], scores[key][~first])}
    gain = final.booster.get_score(importance_type="total_gain")
    total = sum(gain.values()) or 1.0
    importance = {f: gain.get(f, 0.0) / total for f in sorted(final.features, key=lambda f: -gain.get(f, 0.0))}
    t = lap("evaluation", t)

    result = TrainResult(
        version=version, created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), model_dir=Path(),
        device=device, device_why=device_why, source=data.source, start=data.start, end=data.end, rows=data.rows,
        unlabeled_dropped=data.unlabeled_dropped, split=split, split_counts=counts, imbalance=imbalance,
        imbalance_source=imbalance_source, imbalance_comparison=comparison, scale_pos_weight=trainer.scale_pos_weight,
        selection=selection, ablation=ablation, tuning=tuned, features=final.features, params=params,
        best_rounds=final.rounds, max_rounds=opts.max_rounds, early_stopping_rounds=opts.early_stopping_rounds,
        declarations_version=feats.declarations_version(), calibration_choice=choice, calibration=calib,
        rule=opts.rule, threshold=threshold, metrics=metrics, chains=chains, importance=importance, scores=scores,
        durations=durations, libraries=library_versions(), tracking_uri=trk.uri, experiment=trk.experiment,
        target={**data.target.to_dict(), "description": data.target.describe()}, by_kind=by_kind)
    durations["fits_s"] = trainer.fit_seconds
    durations["final_fit_s"] = final.seconds
    del data, trainer  # the frame is no longer needed while the report is drawn

    staging = registry.staging_dir(opts.models_dir, version)
    try:
        tags = {"velocity.version": version, "velocity.device": device,
                "velocity.window": f"{result.start}..{result.end}"}
        with tracking.run(trk, experiment_id, version, tags) as active:
            result.run_id = active.info.run_id
            result.model_dir = opts.models_dir / version
            status("writing model and report", str(staging))
            final.booster.save_model(str(staging / registry.MODEL_FILE))
            durations["total_s"] = time.perf_counter() - t_start
            from model import report

            report.write(result, staging)
            lap("report", t)
            durations["total_s"] = time.perf_counter() - t_start
            durations["total_cpu_s"] = time.process_time()
            result.metadata = build_metadata(result, final)
            registry.write_json(staging / registry.METADATA_FILE, result.metadata)
            status("logging the run to MLflow", trk.uri)
            tracking.log(flat_params(result), flat_metrics(result), staging)
        registry.publish(staging, opts.models_dir, version)
    except BaseException:
        registry.discard(staging)
        raise
    result.previous_current = registry.current_version(opts.models_dir)
    if opts.make_current:
        registry.use(version, opts.models_dir)
        result.made_current = True
    if comparison is not None and opts.compare_imbalance:
        registry.save_imbalance_choice(opts.models_dir, {
            **comparison, "version": version, "measured_at": result.created_at,
            "window": f"{result.start}..{result.end}", "training_rows": result.rows, "device": device})
    return result


def build_metadata(r: TrainResult, final: Fit) -> dict:
    return {
        "format": registry.FORMAT,
        "version": r.version,
        "created_at": r.created_at,
        "booster": registry.MODEL_FILE,
        "features": list(r.features),
        "feature_declarations": {"version": r.declarations_version, "features": feats.signatures(r.features)},
        "threshold": r.threshold,
        "threshold_rule": {"rule": "max_fpr", "max_fpr": r.rule.max_fpr, "description": r.rule.describe()},
        "calibration": r.calibration.to_dict(),
        "training_window": {"start": r.start.isoformat(), "end": r.end.isoformat(), "end_exclusive": True},
        "source": r.source,
        "split": {**r.split.to_dict(), "counts": r.split_counts},
        "metrics": r.metrics,
        "params": r.params,
        "xgboost_params": {k: v for k, v in final.params.items() if k != "device"},
        "rounds": r.best_rounds,
        "imbalance": {**r.imbalance.to_dict(), "source": r.imbalance_source,
                      "scale_pos_weight_value": r.scale_pos_weight if r.imbalance.scale_pos_weight else None},
        "feature_selection": r.selection.rows,
        "target": r.target,
        "by_kind": r.by_kind,
        "feature_ablation": r.ablation,
        "tuning": r.tuning.to_dict() if r.tuning else None,
        "device": r.device,
        "device_reason": r.device_why,
        "durations": r.durations,
        "libraries": r.libraries,
        "mlflow": {"tracking_uri": r.tracking_uri, "experiment": r.experiment, "run_id": r.run_id},
    }


def flat_params(r: TrainResult) -> dict:
    out = {f"xgb.{k}": v for k, v in r.params.items()}
    out.update({
        "features": ",".join(r.features), "feature_declarations_version": r.declarations_version,
        "imbalance": r.imbalance.name, "threshold_rule": f"max_fpr={r.rule.max_fpr}", "threshold": r.threshold,
        "calibration": r.calibration.method, "device": r.device, "rounds": r.best_rounds,
        "window_start": r.start, "window_end": r.end, "source": r.source, "rows": r.rows,
        "tune_trials": len(r.tuning.trials) - 1 if r.tuning else 0,
    })
    for name, (a, b) in r.split.ranges().items():
        out[f"split.{name}"] = f"{a}..{b}"
    return out


def flat_metrics(r: TrainResult) -> dict[str, float]:
    out = {}
    for model, by_split in r.metrics.items():
        for split, m in by_split.items():
            for k, v in m.items():
                out[f"{model}.{split}.{k}"] = v
    out.update({f"duration.{k}": v for k, v in r.durations.items()})
    out["test_aucpr"] = r.metrics["model"]["test"]["aucpr"]
    for model, figures in ((r.by_kind or {}).get("models") or {}).items():
        for kind, m in figures.items():
            out.update({f"by_kind.{model}.{kind}.{k}": v for k, v in m.items()})
    for row in (r.ablation or {}).get("rows", []):
        out[f"ablation.{row['feature']}.val_aucpr_without"] = row["val_aucpr_without"]
    return out
