"""Small boosters written in model/'s model-directory format (model.registry loads them, as `velocity serve` and
the stream worker do), for tests that need a current model without training one."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np

from featurestore.definitions import MODEL_FEATURES

FEATURES = MODEL_FEATURES


def toy_booster(seed: int, rounds: int = 20):
    import xgboost as xgb

    rng = np.random.default_rng(seed)
    x = rng.random((3000, len(FEATURES))).astype(np.float32) * np.array([500, 4, 4, 1], dtype=np.float32)
    x[rng.random(x.shape) < 0.2] = np.nan
    y = ((np.nan_to_num(x[:, 3]) > 0.5) | (np.nan_to_num(x[:, 2]) > 3)).astype(int)
    return xgb.train({"objective": "binary:logistic", "max_depth": 4, "nthread": 1, "seed": seed},
                     xgb.DMatrix(x, y, feature_names=list(FEATURES)), rounds)


def save_model(root: Path, version: str, booster, threshold: float = 0.5, calibration: dict | None = None,
               make_current: bool = True) -> Path:
    from model import features as feats
    from model.registry import CURRENT_FILE, FORMAT, METADATA_FILE, MODEL_FILE

    folder = root / version
    folder.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(folder / MODEL_FILE))
    (folder / METADATA_FILE).write_text(json.dumps({
        "format": FORMAT, "version": version, "features": list(FEATURES), "threshold": threshold,
        "feature_declarations": {"features": feats.signatures(FEATURES)},
        "calibration": calibration or {"method": "none", "params": {}}}))
    if make_current:
        tmp = root / f".current.{uuid.uuid4().hex}"
        tmp.write_text(version + "\n")
        os.replace(tmp, root / CURRENT_FILE)
    return folder
