"""The fraud model: time split, threshold rule, calibration, feature order and declarations, the registry and its
loader, MLflow tracking, and `velocity train` / `velocity models list|use` as a user runs them.

One small generated history (2,000 cards, 35 days, the generator's default fraud rate: ~250k rows, ~640 fraud
rows in ~100 attacks) is trained once with every option (`--compare-imbalance --compare-features --tune 2`) and once by default; the
e2e tests read what those runs left behind.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featurestore import definitions as defs
from model import calibration, registry
from model import data as data_mod
from model import features as feats
from model.metrics import ThresholdRule, evaluate, first_of_chain, threshold_for_max_fpr

SECRET = "model-test-secret"
CLI = str(Path(sys.executable).parent / "velocity")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".cloudpickle")


# ------------------------------------------------------------------ unit: split, threshold, calibration, features


def _ts(days: list[int], per_day: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = int(dt.datetime(2020, 1, 1, tzinfo=dt.UTC).timestamp() * 1000)
    out = [base + d * 86_400_000 + rng.integers(0, 86_400_000, per_day) for d in days]
    return np.sort(np.concatenate(out))


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(12))
def test_split_never_puts_a_later_day_in_train_than_in_test(seed: int) -> None:
    rng = np.random.default_rng(seed)
    days = sorted(rng.choice(200, size=int(rng.integers(3, 60)), replace=False).tolist())
    ts = _ts(days, seed=seed)
    split = data_mod.split_by_day(ts)
    sl = split.slices(ts)
    day = ts // 86_400_000
    train, val, test = day[sl["train"]], day[sl["validation"]], day[sl["test"]]
    assert train.size and val.size and test.size
    assert sl["train"].stop == sl["validation"].start and sl["validation"].stop == sl["test"].start
    assert sl["test"].stop == ts.size and sl["train"].start == 0  # every row in exactly one split
    assert train.max() < val.min() and val.max() < test.min()  # whole days, in time order
    assert split.train_start < split.val_start < split.test_start < split.end
    assert data_mod.TimeSplit.from_dict(split.to_dict()) == split


@pytest.mark.unit
def test_split_sizes_and_refusals() -> None:
    ts = _ts(list(range(30)))
    s = data_mod.split_by_day(ts)
    assert ((s.val_start - s.train_start).days, (s.test_start - s.val_start).days, (s.end - s.test_start).days) == (24, 3, 3)
    s = data_mod.split_by_day(ts, val_days=5, test_days=2)
    assert (s.end - s.test_start).days == 2 and (s.test_start - s.val_start).days == 5
    with pytest.raises(data_mod.TrainingDataError, match="at least 3"):
        data_mod.split_by_day(_ts([0, 1]))


@pytest.mark.unit
@pytest.mark.parametrize("max_fpr", [0.0, 0.001, 0.01, 0.05, 0.3])
def test_threshold_rule_is_the_lowest_threshold_within_the_fpr_budget(max_fpr: float) -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(5000) < 0.05).astype(int)
    s = np.round(np.where(y == 1, rng.beta(5, 2, y.size), rng.beta(2, 5, y.size)), 3)  # rounded: many ties
    t = threshold_for_max_fpr(y, s, max_fpr)
    neg = s[y == 0]
    assert np.mean(neg >= t) <= max_fpr
    lower = s[s < t]  # any lower threshold flags more legit rows than the budget allows (or none more fraud)
    if lower.size:
        t2 = lower.max()
        assert np.mean(neg >= t2) > max_fpr


@pytest.mark.unit
def test_metrics_on_a_known_ranking() -> None:
    y = np.array([0] * 990 + [1] * 10)
    s = np.r_[np.linspace(0, 0.5, 990), np.linspace(0.6, 1, 10)]  # perfectly separated
    m = evaluate(y, s, 0.55)
    assert m.aucpr == pytest.approx(1.0) and m.roc_auc == pytest.approx(1.0)
    assert m.recall_at_fpr_0_1pct == 1.0 and m.precision_at_threshold == 1.0 and m.recall_at_threshold == 1.0
    assert m.rows == 1000 and m.frauds == 10


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(6))
def test_early_stopping_aucpr_equals_average_precision(seed: int) -> None:
    """The per-round validation metric is the report's AUC-PR, ties and float32 scores included."""
    from model.metrics import AveragePrecision, average_precision

    rng = np.random.default_rng(seed)
    y = (rng.random(20_000) < 0.01 * (seed + 1)).astype(np.int8)
    s = (rng.random(y.size) + y * rng.random(y.size)).astype(np.float32)
    if seed % 2:
        s = np.round(s, 2).astype(np.float32)  # many ties, across classes too
    ap = AveragePrecision(y)
    assert ap(s) == pytest.approx(average_precision(y, s), rel=1e-12)
    assert ap(np.ones(y.size, np.float32)) == pytest.approx(average_precision(y, np.ones(y.size)), rel=1e-12)
    assert np.isnan(AveragePrecision(np.zeros(5))(np.arange(5.0)))


@pytest.mark.unit
def test_first_of_chain_marks_each_attacks_first_row() -> None:
    ts = np.array([0, 60_000, 120_000, 5_000_000, 5_030_000, 0, 90_000])
    card = np.array([1, 1, 1, 1, 1, 2, 2])
    y = np.array([1, 1, 1, 1, 1, 0, 1])
    assert first_of_chain(ts, card, y, 600_000).tolist() == [True, False, False, True, False, False, True]


@pytest.mark.unit
def test_calibration_is_monotone_json_ready_and_chosen_only_when_it_lowers_brier() -> None:
    rng = np.random.default_rng(2)
    raw = rng.random(20_000)
    y = (rng.random(raw.size) < raw**3).astype(int)  # raw scores overstate the risk: calibration must help
    choice = calibration.choose(y, raw)
    assert choice.calibration.method in ("platt", "isotonic")
    assert choice.brier_oof[choice.calibration.method] < choice.brier_oof["none"]
    back = calibration.Calibration.from_dict(json.loads(json.dumps(choice.calibration.to_dict())))
    grid = np.linspace(0, 1, 1001)
    assert np.all(np.diff(back.apply(grid)) >= 0)
    assert np.allclose(back.apply(raw), choice.calibration.apply(raw))
    y_ok = (rng.random(raw.size) < raw).astype(int)  # already calibrated: raw should not lose to a refit often
    ok = calibration.choose(y_ok, raw)
    assert ok.brier_oof[ok.calibration.method] <= ok.brier_oof["none"]


@pytest.mark.unit
def test_feature_order_follows_the_declarations() -> None:
    assert feats.base_features() == tuple(defs.MODEL_FEATURES)
    extras = [f for f in defs.ALL_FEATURES if f not in defs.MODEL_FEATURES]
    ordered = feats.ordered(reversed(extras))
    assert ordered[:len(defs.MODEL_FEATURES)] == tuple(defs.MODEL_FEATURES)
    assert list(ordered[len(defs.MODEL_FEATURES):]) == extras  # declaration order, whatever order they came in
    with pytest.raises(feats.IncompatibleFeaturesError, match="not declared"):
        feats.ordered(["no_such_feature"])
    groups = feats.candidate_groups()  # blocks of the groups of one entity and source, in declaration order
    named = [n for g in groups for n in g.name.split(" + ")]
    assert sorted(named) == sorted([*(g.name for g in defs.FEATURE_GROUPS), "event time"])
    assert groups[-1] == feats.CandidateGroup("event time", ("hour_of_day",))  # after every group's block
    assert groups[0].name.split(" + ")[0] == defs.FEATURE_GROUPS[0].name


@pytest.mark.unit
def test_declaration_check_refuses_a_changed_or_missing_feature() -> None:
    names = feats.ordered(["num_trans_last_10m"])
    recorded = json.loads(json.dumps(feats.signatures(names)))
    feats.check_producible(names, recorded)  # today's declarations produce today's model
    changed = json.loads(json.dumps(recorded))
    changed["num_trans_last_10m"]["group"]["window_ms"] = 5 * 60_000
    with pytest.raises(feats.IncompatibleFeaturesError, match=r"num_trans_last_10m \(declared differently now"):
        feats.check_producible(names, changed, model="model X")
    with pytest.raises(feats.IncompatibleFeaturesError, match="no_such_feature.*no longer declared"):
        feats.check_producible([*names, "no_such_feature"], recorded)
    ratio = json.loads(json.dumps(recorded))  # a ratio whose operand's window changed is a different ratio
    ratio["count_ratio"]["denominator"]["group"]["window_ms"] = 1
    with pytest.raises(feats.IncompatibleFeaturesError, match="count_ratio"):
        feats.check_producible(names, ratio)
    assert feats.declarations_version() and feats.declarations_version() == feats.declarations_version()


@pytest.mark.unit
def test_device_cuda_without_a_gpu_is_an_error_not_a_fallback() -> None:
    from model.device import DeviceError, cuda_available, resolve

    assert resolve("cpu")[0] == "cpu"
    with pytest.raises(DeviceError, match="--device must be one of"):
        resolve("tpu")
    if cuda_available()[0]:
        assert resolve("auto")[0] == resolve("cuda")[0] == "cuda"
    else:
        assert resolve("auto")[0] == "cpu"
        with pytest.raises(DeviceError, match="--device cuda was asked for, but"):
            resolve("cuda")


@pytest.mark.integration
def test_spark_builds_the_same_training_rows_for_the_model(tmp_path) -> None:
    """`velocity train --engine spark`: the executors write Parquet, the model reads it back like DuckDB's frame."""
    from batch.engines import dates_between, open_engine, run_snapshots
    from ingest.generate import GenerateConfig, generate_history, write_history

    history = tmp_path / "h.parquet"
    write_history(generate_history(GenerateConfig(cards=120, days=9, seed=4, fraud_rate=0.01)).table, history)
    offline = tmp_path / "offline"
    eng = open_engine("duckdb", offline_dir=offline, history=history, secret=SECRET)
    run_snapshots(eng, dates_between(dt.date(2020, 1, 2), dt.date(2020, 1, 9)), offline_dir=offline)
    eng.close()
    loaded = {}
    for engine in ("duckdb", "spark"):
        src = data_mod.Source(history=history, offline_dir=offline, engine=engine, master="local[2]")
        loaded[engine] = data_mod.load(src, start=None, end=None, secret=SECRET,
                                       allowed_lateness_ms=defs.DEFAULT_ALLOWED_LATENESS_MS)
    a, b = loaded["duckdb"], loaded["spark"]
    assert a.rows == b.rows > 1000 and np.array_equal(a.ts, b.ts) and np.array_equal(a.y, b.y)
    # Rows with equal ts may come back in another order from Spark: compare them as sorted multisets per ts.
    ka = np.lexsort((*a.X.T[::-1], a.ts))
    kb = np.lexsort((*b.X.T[::-1], b.ts))
    assert np.allclose(a.X[ka], b.X[kb], rtol=1e-9, equal_nan=True)
    assert not list(offline.glob("velocity-train-*"))  # the Spark dataset was a temporary


def _has_cuda() -> tuple[bool, str]:
    from model.device import cuda_available

    return cuda_available()


@pytest.mark.gpu
def test_training_on_cuda_uses_the_gpu_and_scores_like_the_cpu() -> None:
    ok, why = _has_cuda()
    if not ok:
        pytest.skip(f"no CUDA GPU: {why}")
    import xgboost as xgb

    from model.trainer import DEFAULT_PARAMS, Imbalance, Trainer

    rng = np.random.default_rng(0)
    ts = _ts(list(range(12)), per_day=4000)
    X = rng.random((ts.size, len(feats.all_features()))).astype(np.float32)
    y = (X[:, 0] + 0.3 * rng.random(ts.size) > 1.1).astype(np.int8)
    data = data_mod.TrainingData(X, feats.all_features(), y, ts, np.zeros(ts.size, np.int32),
                                 np.ones(ts.size, bool), dt.date(2020, 1, 1), dt.date(2020, 1, 13), "synthetic")
    fits = {}
    for device in ("cuda", "cpu"):
        trainer = Trainer(data, data_mod.split_by_day(ts), device=device, max_rounds=30)
        fits[device] = trainer.fit(device, feats.base_features(), DEFAULT_PARAMS, Imbalance())
        assert fits[device].params["device"] == device
    cfg = json.loads(fits["cuda"].booster.save_config())
    assert cfg["learner"]["generic_param"]["device"] == "cpu"  # scored on the CPU, as the scorer will
    assert isinstance(fits["cuda"].booster, xgb.Booster)
    assert abs(fits["cuda"].val_aucpr - fits["cpu"].val_aucpr) < 0.05


# ------------------------------------------------------------------ end to end on a small generated history


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A generated history and every night's 1-week snapshot, keyed with SECRET."""
    from batch.engines import dates_between, open_engine, run_snapshots
    from ingest.generate import GenerateConfig, generate_history, write_fraud_kinds, write_history

    root = tmp_path_factory.mktemp("model")
    history = root / "history.parquet"
    cfg = GenerateConfig(cards=2000, days=35, start=dt.date(2020, 1, 1), seed=3, compromise_rate=0.0008)  # both kinds
    hist = generate_history(cfg)
    write_history(hist.table, history)
    write_fraud_kinds(hist, history)  # history.fraud_kinds.parquet, as `velocity generate` writes it
    offline = root / "offline"
    eng = open_engine("duckdb", offline_dir=offline, history=history, secret=SECRET)
    run_snapshots(eng, dates_between(dt.date(2020, 1, 2), dt.date(2020, 2, 4)), offline_dir=offline)
    eng.close()
    return {"root": root, "history": history, "offline": offline, "data_dir": root / "data",
            "models": root / "data" / "models"}


def _env(store: dict) -> dict:
    env = {**os.environ, "VELOCITY_DATA_DIR": str(store["data_dir"]), "VELOCITY_ENTITY_SECRET": SECRET,
           "COLUMNS": "200"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _velocity(store: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([CLI, *args], env=_env(store), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"velocity {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _train(store: dict, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return _velocity(store, "train", "--history", str(store["history"]), "--offline-dir", str(store["offline"]),
                     *extra, check=check)


@pytest.fixture(scope="module")
def full_run(store) -> dict:
    """`velocity train` with every option: imbalance and feature comparisons and a small Optuna search."""
    proc = _train(store, "--compare-imbalance", "--compare-features", "--tune", "2")
    version = registry.current_version(store["models"])
    meta = json.loads((store["models"] / version / registry.METADATA_FILE).read_text())
    return {"proc": proc, "version": version, "meta": meta, "path": store["models"] / version}


@pytest.fixture(scope="module")
def training_set_file(store) -> Path:
    """The same window written by `velocity features training-set` (what `velocity train --training-set` reads)."""
    out = store["root"] / "training.parquet"
    _velocity(store, "features", "training-set", "--start", "2020-01-01", "--end", "2020-02-05", "--out", str(out),
              "--history", str(store["history"]), "--offline-dir", str(store["offline"]))
    return out


@pytest.fixture(scope="module")
def frame(store):
    """The same point-in-time training set, rebuilt in this process (as a scorer's consistency check would)."""
    return data_mod.load(data_mod.Source(history=store["history"], offline_dir=store["offline"]), start=None,
                         end=None, secret=SECRET, allowed_lateness_ms=defs.DEFAULT_ALLOWED_LATENESS_MS)


def _rows(frame, meta: dict, split: str, features) -> tuple[np.ndarray, np.ndarray]:
    sl = data_mod.TimeSplit.from_dict(meta["split"]).slices(frame.ts)[split]
    return frame.X[sl][:, frame.cols(list(features))], frame.y[sl]


@pytest.mark.e2e
def test_train_prints_a_summary_and_beats_the_amount_only_baseline(full_run) -> None:
    out = full_run["proc"].stdout
    for needle in ("AUC-PR", "original four", "amount only", "split", "train 2020-01-01", "report",
                   str(full_run["path"] / "report.md"), "MLflow", "device     cpu" if not _has_cuda()[0] else "cuda"):
        assert needle in out, needle
    m = full_run["meta"]["metrics"]
    assert m["model"]["test"]["aucpr"] >= m["amount_only"]["test"]["aucpr"] + 0.1, m
    assert m["model"]["test"]["frauds"] >= 40  # enough test fraud for the comparison to mean something


@pytest.mark.e2e
def test_metadata_records_what_a_scorer_needs(full_run) -> None:
    meta = full_run["meta"]
    names = meta["features"]
    assert tuple(names[:len(defs.MODEL_FEATURES)]) == tuple(defs.MODEL_FEATURES)
    assert tuple(names) == feats.ordered(names[len(defs.MODEL_FEATURES):])  # the declarations' order
    assert set(meta["feature_declarations"]["features"]) == set(names)
    assert meta["feature_declarations"]["version"] == feats.declarations_version()
    split = data_mod.TimeSplit.from_dict(meta["split"])
    assert split.train_start == dt.date(2020, 1, 1) and split.end == dt.date(2020, 2, 5)
    assert meta["training_window"] == {"start": "2020-01-01", "end": "2020-02-05", "end_exclusive": True}
    assert meta["device"] in ("cpu", "cuda") and meta["device_reason"]
    assert meta["calibration"]["method"] in ("none", "platt", "isotonic")
    assert meta["threshold_rule"]["max_fpr"] == ThresholdRule().max_fpr
    assert {"xgboost", "numpy", "scikit-learn", "mlflow-skinny"} <= set(meta["libraries"])
    assert meta["durations"]["total_s"] > meta["durations"]["fits_s"] > 0
    model = registry.load_current(full_run["path"].parent)
    assert list(model.booster.feature_names) == names and model.booster.num_features() == len(names)


@pytest.mark.e2e
def test_saved_model_reproduces_its_recorded_test_metrics(full_run, frame) -> None:
    model = registry.load_current(full_run["path"].parent)
    X, y = _rows(frame, model.metadata, "test", model.features)
    again = evaluate(y, model.score(X), model.threshold).to_dict()
    recorded = model.metadata["metrics"]["model"]["test"]
    for k, v in recorded.items():
        assert again[k] == pytest.approx(v, rel=1e-9, abs=1e-12, nan_ok=True), k
    one = model.score_one(dict(zip(model.features, X[0].tolist(), strict=True)))
    assert one == pytest.approx(float(model.score(X[:1])[0]))


@pytest.mark.e2e
def test_threshold_rule_holds_on_validation(full_run, frame) -> None:
    model = registry.load_current(full_run["path"].parent)
    X, y = _rows(frame, model.metadata, "validation", model.features)
    s = model.score(X)
    max_fpr = model.metadata["threshold_rule"]["max_fpr"]
    neg = s[y == 0]
    assert np.mean(neg >= model.threshold) <= max_fpr
    below = s[s < model.threshold]
    assert below.size == 0 or np.mean(neg >= below.max()) > max_fpr  # and no lower threshold would do
    assert model.threshold == ThresholdRule(max_fpr).choose(y, s)


@pytest.mark.e2e
def test_choices_are_reported_and_the_imbalance_choice_is_remembered(full_run, store) -> None:
    meta = full_run["meta"]
    remembered = json.loads((store["models"] / registry.IMBALANCE_FILE).read_text())
    assert remembered["version"] == full_run["version"]
    assert len(remembered["rows"]) == 4 and sum(r["chosen"] for r in remembered["rows"]) == 1
    assert meta["imbalance"]["name"] == remembered["chosen"]["name"]
    rows = meta["feature_selection"]
    assert rows[0]["kept"] and len(rows) == 1 + len(feats.candidate_groups())
    dropped = [r["feature"] for r in meta["feature_ablation"]["rows"]]  # each feature beyond the declared four
    assert dropped == [f for f in meta["features"] if f not in feats.base_features()]
    kept = [r for r in rows if r["kept"]][-1]["val_aucpr"]
    assert all(r["loss"] == pytest.approx(kept - r["val_aucpr_without"]) for r in meta["feature_ablation"]["rows"])
    tuning = meta["tuning"]
    assert tuning["trials"][0]["state"] == "DEFAULTS" and len(tuning["trials"]) == 3
    report = (full_run["path"] / registry.REPORT_FILE).read_text()
    for needle in ("## Class imbalance", "time saved vs all rows", "## Features", "## Hyperparameters",
                   "## Threshold", "## Calibration", "Drop-one comparison", "original four (baseline)", "amount only (baseline)",
                   "recall @ 0.1% FPR", "Brier", "## Where the misses are"):
        assert needle in report, needle
    for png in ("pr_curves", "calibration", "score_distributions", "feature_importance"):
        path = full_run["path"] / "plots" / f"{png}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plots/{png}.png" in report


def _pickles(base: Path) -> list[Path]:
    found = []
    for p in base.rglob("*"):
        if p.is_file():
            head = p.read_bytes()[:2]
            if p.suffix in PICKLE_SUFFIXES or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
                found.append(p)
    return found


@pytest.mark.e2e
def test_no_pickle_is_written_and_the_mlflow_run_holds_model_and_report(full_run, store) -> None:
    from mlflow.tracking import MlflowClient

    from model import tracking

    mlflow_dir = store["data_dir"] / "mlflow"
    assert (mlflow_dir / "mlflow.db").is_file()
    assert _pickles(full_run["path"]) == [] and _pickles(mlflow_dir) == []
    trk = tracking.settings(store["data_dir"])
    run_id = full_run["meta"]["mlflow"]["run_id"]
    arts = tracking.run_artifacts(trk, run_id)
    for name in ("model/report.md", "model/metadata.json", "model/model.ubj", "model/plots/pr_curves.png"):
        assert name in arts, arts
    run = MlflowClient(tracking_uri=trk.uri).get_run(run_id)
    assert run.data.params["device"] == full_run["meta"]["device"]
    assert run.data.params["split.test"].startswith(full_run["meta"]["split"]["test"][0])
    assert run.data.metrics["test_aucpr"] == pytest.approx(full_run["meta"]["metrics"]["model"]["test"]["aucpr"])
    assert "duration.total_s" in run.data.metrics and run.info.status == "FINISHED"


@pytest.mark.e2e
def test_a_prebuilt_training_set_loads_exactly_like_building_it(training_set_file, frame) -> None:
    read = data_mod.load(data_mod.Source(training_set=training_set_file), start=None, end=None, secret=SECRET,
                         allowed_lateness_ms=defs.DEFAULT_ALLOWED_LATENESS_MS)
    assert read.columns == frame.columns and read.rows == frame.rows
    assert np.array_equal(read.ts, frame.ts) and np.array_equal(read.y, frame.y)
    assert np.array_equal(read.X, frame.X, equal_nan=True)  # NaN stays NaN (XGBoost's missing value)
    assert np.isnan(frame.X).any()
    assert (read.start, read.end) == (dt.date(2020, 1, 1), dt.date(2020, 2, 5))


@pytest.mark.e2e
def test_models_list_and_use(full_run, store, training_set_file) -> None:
    # The default run (no comparison: the remembered imbalance choice), from the prebuilt training set.
    proc = _velocity(store, "train", "--training-set", str(training_set_file), "--no-use")
    second = registry.versions(store["models"])[-1]
    assert second != full_run["version"] and registry.current_version(store["models"]) == full_run["version"]
    meta2 = json.loads((store["models"] / second / registry.METADATA_FILE).read_text())
    assert "remembered" in meta2["imbalance"]["source"] and meta2["tuning"] is None
    assert meta2["source"] == f"training set {training_set_file}" and meta2["split"] == full_run["meta"]["split"]
    assert "not current" in proc.stdout
    listing = _velocity(store, "models", "list").stdout
    assert f"* {full_run['version']}" in listing and f"  {second}" in listing
    assert "AUC-PR" in listing and "R@thr" in listing
    used = _velocity(store, "models", "use", second)
    assert f"current model: {second} (was {full_run['version']})" in used.stdout
    assert registry.current_version(store["models"]) == second
    assert f"* {second}" in _velocity(store, "models", "list").stdout
    bad = _velocity(store, "models", "use", "20000101-000000-dead", check=False)
    assert bad.returncode == 2 and "no model '20000101-000000-dead'" in bad.stderr
    assert registry.current_version(store["models"]) == second


@pytest.mark.e2e
def test_a_model_the_definitions_cannot_serve_is_refused(full_run, store) -> None:
    models = store["models"]
    stale = models / "19990101-000000-beef"
    shutil.copytree(full_run["path"], stale)
    meta = json.loads((stale / registry.METADATA_FILE).read_text())
    meta["version"] = stale.name
    meta["feature_declarations"]["features"]["amt_ratio1"]["numerator"]["group"]["window_ms"] = 5 * 60_000
    (stale / registry.METADATA_FILE).write_text(json.dumps(meta))
    before = registry.current_version(models)
    try:
        with pytest.raises(registry.IncompatibleModelError, match="amt_ratio1.*declared differently.*window_ms"):
            registry.load(stale)
        proc = _velocity(store, "models", "use", stale.name, check=False)
        assert proc.returncode == 2 and "cannot produce" in proc.stderr and "velocity train" in proc.stderr
        assert registry.current_version(models) == before
        listing = _velocity(store, "models", "list").stdout
        assert stale.name in listing and "cannot produce" in listing
        (models / registry.CURRENT_FILE).write_text(stale.name + "\n")  # made current behind the loader's back
        with pytest.raises(registry.IncompatibleModelError, match="cannot produce"):
            registry.load_current(models)
    finally:
        (models / registry.CURRENT_FILE).write_text(before + "\n")
        shutil.rmtree(stale)


@pytest.mark.e2e
def test_train_errors_are_one_clear_line(store, tmp_path) -> None:
    if not _has_cuda()[0]:
        proc = _train(store, "--device", "cuda", check=False)
        assert proc.returncode == 2 and "--device cuda was asked for, but" in proc.stderr
        assert "Traceback" not in proc.stderr
    empty = tmp_path / "offline"  # no snapshots: the ratios would all be missing
    proc = _velocity(store, "train", "--history", str(store["history"]), "--offline-dir", str(empty), check=False)
    assert proc.returncode == 2 and "no card_agg_1w snapshot" in proc.stderr and "velocity batch" in proc.stderr
    proc = _velocity(store, "train", "--training-set", str(tmp_path / "missing.parquet"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


# ------------------------------------------------------------------ issue 16: target as known, by fraud kind


def _ms(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)


@pytest.mark.e2e
def test_report_breaks_recall_and_auc_down_by_fraud_kind(full_run, store) -> None:
    import pyarrow.parquet as pq

    meta = full_run["meta"]
    side = store["history"].with_name("history.fraud_kinds.parquet")
    by_kind = meta["by_kind"]
    assert by_kind["source"] == str(side)  # found next to the history without --fraud-kinds
    split = data_mod.TimeSplit.from_dict(meta["split"])
    h = pq.read_table(store["history"], columns=["txn_id", "ts", "fraud_label"]).to_pandas()
    test = h[(h.ts >= _ms(split.test_start)) & (h.ts < _ms(split.end)) & (h.fraud_label == 1)]
    expected = test.merge(pq.read_table(side).to_pandas(), on="txn_id").kind.value_counts().to_dict()
    assert set(expected) == {"card_chain", "compromised_merchant"}
    assert set(by_kind["models"]) >= {"model", "original_four", "amount_only"}
    for figures in by_kind["models"].values():
        assert {k: m["frauds"] for k, m in figures.items()} == expected
        for m in figures.values():
            assert 0 <= m["recall_at_threshold"] <= 1 and 0 <= m["roc_auc"] <= 1 and 0 < m["aucpr"] <= 1
    text = (full_run["path"] / "report.md").read_text()
    assert "### By fraud kind" in text and "| compromised_merchant | **model** |" in text
    assert "Training target: latest label known at" in text
    assert meta["target"]["from_labels"] == meta["split"]["counts"]["train"]["frauds"] + sum(
        meta["split"]["counts"][k]["frauds"] for k in ("validation", "test"))  # every inline label is known by now
    # the no-merchant baseline exists exactly when the model uses a merchant feature
    assert ("no_merchant" in meta["metrics"]) == bool(feats.merchant_features(meta["features"]))


@pytest.mark.e2e
def test_training_target_is_the_latest_label_known_at_training_time(store, tmp_path) -> None:
    import time

    import pyarrow.parquet as pq

    from stores.labels import write_labels

    offline = tmp_path / "offline"
    shutil.copytree(store["offline"], offline)
    h = pq.read_table(store["history"], columns=["txn_id", "ts", "fraud_label", "labeled_at"]).to_pandas()
    fraud, legit, legit2 = h[h.fraud_label == 1].iloc[0], h[h.fraud_label == 0].iloc[0], h[h.fraud_label == 0].iloc[1]
    now = int(time.time() * 1000)
    day = 86_400_000
    write_labels(offline, [
        {"txn_id": fraud.txn_id, "fraud_label": 0, "labeled_at": int(fraud.labeled_at) + day},  # reversed later
        {"txn_id": legit.txn_id, "fraud_label": 1, "labeled_at": int(legit.ts) + 3 * day},  # a late chargeback
        {"txn_id": legit2.txn_id, "fraud_label": 1, "labeled_at": now + 10 * day},  # known only after training
    ])
    data = data_mod.load(data_mod.Source(history=store["history"], offline_dir=offline), start=None, end=None,
                         secret=SECRET, allowed_lateness_ms=defs.DEFAULT_ALLOWED_LATENESS_MS, labels_as_of_ms=now)
    y = dict(zip(data.txn_id.to_pylist(), data.y.tolist(), strict=True))
    assert y[fraud.txn_id] == 0 and y[legit.txn_id] == 1 and y[legit2.txn_id] == 0
    assert int(data.y.sum()) == int(h.fraud_label.sum())  # one fraud un-labeled, one legitimate labeled fraud
    assert data.target.versions_after == 1 and data.target.changed == 2


@pytest.mark.unit
def test_no_event_time_leaves_the_hour_out_of_the_candidates() -> None:
    with_clock = [g.name for g in feats.candidate_groups()]
    without = [g.name for g in feats.candidate_groups(event_time=False)]
    assert "event time" in with_clock and without == [n for n in with_clock if n != "event time"]
    assert not any("hour_of_day" in g.features for g in feats.candidate_groups(event_time=False))
