"""The fraud model: `velocity train`, the model registry (`velocity models list|use`) and the loader a scorer calls.

Training reads the offline store's point-in-time training set (`featurestore`), so the model learns from exactly
what is served. This package imports from `featurestore` (and `batch` for building the training set); nothing in
`featurestore` imports from it.

- `model.features`  — the model's candidate inputs, in the declarations' order, and their declaration signatures
- `model.data`      — the training frame as float32 arrays, and the split by day
- `model.targets`   — the target: each row's latest label known at training time (label store, inline labeled_at)
- `model.kinds`     — recall and AUC by fraud kind, from the generator's side file
- `model.device`    — CUDA when XGBoost can see a GPU, CPU otherwise
- `model.metrics`   — AUC-PR, ROC AUC, recall at a fixed false-positive rate, the threshold rule, Brier
- `model.calibration` — Platt / isotonic calibration fitted on validation, applied with NumPy alone
- `model.trainer`   — fits on a time split, the imbalance comparison, feature-group selection, baselines
- `model.tune`      — `--tune N`: an Optuna search with pruning
- `model.pipeline`  — `velocity train` end to end (load, split, choose, evaluate, save, track)
- `model.report`    — the Markdown report and its PNG plots
- `model.registry`  — versioned model directories, the `CURRENT` pointer and `load_current()`
- `model.tracking`  — MLflow
- `model.cli`       — `velocity train`, `velocity models list|use`
"""
