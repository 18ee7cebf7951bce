"""Where XGBoost trains: CUDA when it can see a GPU, the CPU otherwise; one code path, the device is a parameter."""

from __future__ import annotations

import functools
import json
import warnings

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """The asked-for device cannot be used (e.g. `--device cuda` with no visible GPU)."""


@functools.lru_cache(maxsize=1)
def cuda_available() -> tuple[bool, str]:
    """(usable, why): whether XGBoost itself can train on a CUDA device here.

    XGBoost quietly falls back to the CPU when asked for a GPU it cannot find, so this trains one tiny round on
    "cuda" and reads back the device the booster really used.
    """
    import numpy as np
    import xgboost as xgb

    if not xgb.build_info().get("USE_CUDA"):
        return False, f"this XGBoost {xgb.__version__} build has no CUDA support"
    x = np.arange(16, dtype=np.float32).reshape(8, 2)
    y = np.array([0, 1] * 4, dtype=np.float32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            booster = xgb.train({"device": "cuda", "tree_method": "hist", "verbosity": 0}, xgb.DMatrix(x, y), 1)
        used = json.loads(booster.save_config())["learner"]["generic_param"]["device"]
    except Exception as exc:  # a broken driver or runtime: say so, train on the CPU
        return False, f"XGBoost could not use CUDA ({' '.join(str(exc).split())[:200]})"
    if not str(used).startswith("cuda"):
        return False, "no CUDA GPU is visible to XGBoost (CUDA_VISIBLE_DEVICES, driver, or no GPU)"
    return True, "a CUDA GPU is visible to XGBoost"


def resolve(requested: str = "auto") -> tuple[str, str]:
    """("cuda" | "cpu", why). `auto` picks CUDA when usable; `cuda` without a GPU is an error, never a fallback."""
    if requested not in DEVICES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICES)}, not {requested!r}")
    if requested == "cpu":
        return "cpu", "asked for (--device cpu)"
    ok, why = cuda_available()
    if requested == "cuda":
        if not ok:
            raise DeviceError(f"--device cuda was asked for, but {why}; rerun with --device cpu (or --device auto, "
                              "which uses a GPU only when one is visible)")
        return "cuda", f"asked for (--device cuda); {why}"
    return ("cuda", f"auto: {why}") if ok else ("cpu", f"auto: {why}")
