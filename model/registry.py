"""Versioned model directories, the `CURRENT` pointer, and the loader a scorer calls.

Layout (root = `$VELOCITY_DATA_DIR/models`):
- `<version>/model.ubj`      — the booster in XGBoost's UBJSON format (never pickle)
- `<version>/metadata.json`  — features in order with their declarations, threshold and its rule, calibration,
                               training window, split, metrics, library versions, device, MLflow run
- `<version>/report.md` and `<version>/plots/*.png` — the training report
- `CURRENT`                  — the version the scorer serves (written atomically by `velocity models use`)
- `imbalance.json`           — the class-imbalance strategy the last `--compare-imbalance` run chose

A version directory appears whole or not at all: training writes `.<version>.partial/` and renames it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model import features as feats
from model.calibration import Calibration

MODEL_FILE = "model.ubj"
METADATA_FILE = "metadata.json"
REPORT_FILE = "report.md"
CURRENT_FILE = "CURRENT"
IMBALANCE_FILE = "imbalance.json"
FORMAT = 1


class ModelError(ValueError):
    """No such model, no current model, or a model directory that cannot be loaded; the message says why."""


class IncompatibleModelError(ModelError):
    """The model needs features the current definitions cannot produce."""


def models_dir(data_dir: Path | None = None) -> Path:
    if data_dir is None:
        from featurestore.config import get_settings

        data_dir = get_settings().data_dir
    return Path(data_dir) / "models"


def new_version(now: dt.datetime | None = None) -> str:
    """Sortable by time, unique: 20260301-142530-3fa2."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def staging_dir(root: Path, version: str) -> Path:
    path = Path(root) / f".{version}.partial"
    path.mkdir(parents=True, exist_ok=False)
    return path


def publish(staging: Path, root: Path, version: str) -> Path:
    final = Path(root) / version
    os.rename(staging, final)
    return final


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def write_json(path: Path, obj: object) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o: object) -> object:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (dt.date, Path)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ------------------------------------------------------------------ loading


@dataclass
class LoadedModel:
    version: str
    path: Path
    metadata: dict
    booster: object  # xgboost.Booster
    calibration: Calibration

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.metadata["features"])

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    def score(self, X: np.ndarray) -> np.ndarray:
        """Calibrated fraud probabilities for rows of features in `self.features` order (NaN = missing)."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != len(self.features):
            raise ValueError(f"expected rows of {len(self.features)} features ({', '.join(self.features)}), "
                             f"got shape {X.shape}")
        raw = np.asarray(self.booster.inplace_predict(X), dtype=np.float64)
        return self.calibration.apply(raw)

    def vector(self, values: Mapping[str, float | None]) -> np.ndarray:
        """One row in the model's order from a name -> value mapping (None or a missing name = NaN)."""
        return np.array([[np.nan if values.get(f) is None else values[f] for f in self.features]], dtype=np.float32)

    def score_one(self, values: Mapping[str, float | None]) -> float:
        return float(self.score(self.vector(values))[0])

    def decide(self, score: float) -> bool:
        return score >= self.threshold


def load(path: Path) -> LoadedModel:
    """Load one model directory; refuses one whose features the current definitions cannot produce."""
    import xgboost as xgb

    path = Path(path)
    meta_path, model_path = path / METADATA_FILE, path / MODEL_FILE
    if not meta_path.is_file() or not model_path.is_file():
        raise ModelError(f"{path} is not a model directory (needs {METADATA_FILE} and {MODEL_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {meta_path} ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ModelError(f"{path}: unknown metadata format {meta.get('format')!r} (this code reads {FORMAT})")
    version = meta.get("version", path.name)
    try:
        feats.check_producible(meta["features"], meta.get("feature_declarations", {}).get("features", {}),
                               model=f"model {version}")
    except feats.IncompatibleFeaturesError as exc:
        raise IncompatibleModelError(str(exc)) from None
    booster = xgb.Booster()
    try:
        booster.load_model(str(model_path))
    except xgb.core.XGBoostError as exc:
        raise ModelError(f"cannot load {model_path} ({' '.join(str(exc).split())[:200]})") from None
    booster.set_param({"device": "cpu"})
    if booster.num_features() != len(meta["features"]) or (
            booster.feature_names and list(booster.feature_names) != list(meta["features"])):
        raise ModelError(f"{model_path} does not match {meta_path}: the booster reads {booster.feature_names or booster.num_features()}, "
                         f"the metadata lists {meta['features']}")
    return LoadedModel(version, path, meta, booster, Calibration.from_dict(meta.get("calibration", {})))


def current_version(root: Path | None = None) -> str | None:
    root = models_dir() if root is None else Path(root)
    try:
        text = (root / CURRENT_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def load_current(root: Path | None = None) -> LoadedModel:
    """The model `velocity models use` made current (the scorer's entry point)."""
    root = models_dir() if root is None else Path(root)
    version = current_version(root)
    if version is None:
        raise ModelError(f"no current model under {root}: train one (`velocity train`) or pick one "
                         "(`velocity models use VERSION`)")
    if not (root / version).is_dir():
        raise ModelError(f"the current model {version} is missing from {root}; pick another with "
                         "`velocity models use VERSION` (`velocity models list`)")
    return load(root / version)


def use(version: str, root: Path | None = None) -> LoadedModel:
    """Make `version` current, after checking that it loads (an unloadable model is never made current)."""
    root = models_dir() if root is None else Path(root)
    path = root / version
    if version.startswith(".") or "/" in version or not path.is_dir():
        known = ", ".join(v for v in versions(root)) or "none"
        raise ModelError(f"no model {version!r} under {root} (models: {known})")
    model = load(path)
    (root / CURRENT_FILE).parent.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{CURRENT_FILE}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(version + "\n")
    os.replace(tmp, root / CURRENT_FILE)
    return model


def versions(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (p / METADATA_FILE).is_file())


@dataclass
class ModelInfo:
    version: str
    path: Path
    metadata: dict | None
    current: bool
    problem: str | None  # why it cannot be loaded now, if it cannot


def list_models(root: Path | None = None) -> list[ModelInfo]:
    """Every model directory, oldest first, with whether the current definitions can still serve it."""
    root = models_dir() if root is None else Path(root)
    cur = current_version(root)
    out = []
    for v in versions(root):
        path = root / v
        meta, problem = None, None
        try:
            meta = json.loads((path / METADATA_FILE).read_text())
            feats.check_producible(meta["features"], meta.get("feature_declarations", {}).get("features", {}),
                                   model=f"model {v}")
        except (OSError, ValueError, KeyError) as exc:
            problem = str(exc)
        out.append(ModelInfo(v, path, meta, v == cur, problem))
    return out


# ------------------------------------------------------------------ the remembered imbalance choice


def save_imbalance_choice(root: Path, record: dict) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / IMBALANCE_FILE
    write_json(path, record)
    return path


def load_imbalance_choice(root: Path) -> dict | None:
    try:
        return json.loads((Path(root) / IMBALANCE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None

