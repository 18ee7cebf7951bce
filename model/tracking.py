"""MLflow tracking of training runs: a local SQLite store under the data folder by default, any tracking server
through `MLFLOW_TRACKING_URI`.

Only plain files are logged as artifacts (the model directory: UBJ booster, JSON metadata, Markdown report, PNG
plots); no MLflow model flavour is used, so nothing is ever pickled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

EXPERIMENT = "velocity-fraud"


class TrackingError(RuntimeError):
    """MLflow could not be reached or refused a run; nothing was saved."""


@dataclass(frozen=True)
class Tracking:
    uri: str
    experiment: str
    artifact_location: str | None  # where a new local experiment keeps its artifacts

    def describe(self) -> str:
        return f"{self.uri} (experiment {self.experiment})"

    def ui_command(self) -> str:
        """How to look at the runs: a server's own UI, or `mlflow ui` (the full `mlflow` package) on a local store."""
        if self.uri.startswith(("http://", "https://")):
            return f"open {self.uri}"
        return f"mlflow ui --backend-store-uri {self.uri}"


def settings(data_dir: Path, experiment: str | None = None) -> Tracking:
    """MLFLOW_TRACKING_URI if set; else sqlite:///<data_dir>/mlflow/mlflow.db with artifacts beside it."""
    experiment = experiment or os.environ.get("VELOCITY_MLFLOW_EXPERIMENT", EXPERIMENT)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return Tracking(env, experiment, None)
    root = (Path(data_dir) / "mlflow").resolve()
    return Tracking(f"sqlite:///{root / 'mlflow.db'}", experiment, (root / "artifacts").as_uri())


def _quiet() -> None:
    # MLflow and alembic narrate the SQLite schema set-up at INFO on first use.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def prepare(tracking: Tracking) -> str:
    """Connect (creating the local store and the experiment on first use); returns the experiment id. Called before
    training, so a wrong URI fails in seconds, not after the fits."""
    try:
        import mlflow

        _quiet()  # after the import: importing mlflow sets its own logger up at INFO

        if tracking.uri.startswith("sqlite:///"):
            Path(tracking.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(tracking.uri)
        exp = mlflow.get_experiment_by_name(tracking.experiment)
        if exp is not None:
            return exp.experiment_id
        return mlflow.create_experiment(tracking.experiment, artifact_location=tracking.artifact_location)
    except Exception as exc:
        raise TrackingError(f"MLflow tracking at {tracking.uri} is not usable ({' '.join(str(exc).split())[:300]}); "
                            "fix MLFLOW_TRACKING_URI (or unset it for the local store under the data folder)") from None


@contextmanager
def run(tracking: Tracking, experiment_id: str, name: str, tags: dict[str, str]) -> Iterator[object]:
    """An MLflow run; it ends FAILED if the body raises."""
    import mlflow

    mlflow.set_tracking_uri(tracking.uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags) as active:
        yield active


def log(params: dict, metrics: dict[str, float], artifacts_dir: Path, artifact_path: str = "model") -> None:
    import math

    import mlflow

    # MLflow caps a parameter value at 6,000 characters and takes at most 100 per call.
    items = [(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i:i + 100]))
    finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    mlflow.log_metrics(finite)
    mlflow.log_artifacts(str(artifacts_dir), artifact_path=artifact_path)


def run_artifacts(tracking: Tracking, run_id: str, path: str = "model") -> list[str]:
    """Artifact paths of a run (for checks and `velocity models list`)."""
    from mlflow.tracking import MlflowClient

    _quiet()
    client = MlflowClient(tracking_uri=tracking.uri)
    out, todo = [], [path]
    while todo:
        for item in client.list_artifacts(run_id, todo.pop()):
            if item.is_dir:
                todo.append(item.path)
            else:
                out.append(item.path)
    return sorted(out)
