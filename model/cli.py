"""`velocity train`, `velocity models list`, `velocity models use VERSION`.

Imports stay inside the commands: every `velocity` command loads this module, and XGBoost, MLflow and matplotlib
take seconds to import.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from batch.cli import fail, parse_date

err = Console(stderr=True)
out = Console()
log = logging.getLogger(__name__)


class _RichProgress:
    """model.trainer.Progress drawn with rich: one line per fit (rounds done, validation AUC-PR, time)."""

    def __init__(self, progress) -> None:
        self.bar = progress

    def start(self, label: str, total: int) -> object:
        return self.bar.add_task(label, total=total, info="")

    def advance(self, handle: object, done: int, info: str = "") -> None:
        self.bar.update(handle, completed=done, info=info)

    def finish(self, handle: object, info: str = "") -> None:
        task = self.bar.tasks[[t.id for t in self.bar.tasks].index(handle)]
        self.bar.update(handle, total=task.completed or 1, completed=task.completed or 1, info=info)


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def _summary(r) -> None:
    from rich import box
    from rich.table import Table

    out.print(f"model {r.version} — test days {r.split.test_start} .. {r.split.end - dt.timedelta(days=1)}",
              highlight=False)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    for col in ("", "AUC-PR", "ROC AUC", "R@0.1%", "R@1%", "P@thr", "R@thr", "Brier"):
        table.add_column(col, justify="left" if not col else "right", no_wrap=True)
    rows = (("model", "model"), ("no merchant feat.", "no_merchant"), ("original four", "original_four"),
            ("amount only", "amount_only"))
    for name, key in rows:
        if key not in r.metrics:
            continue
        m = r.metrics[key]["test"]
        table.add_row(name, f"{m['aucpr']:.4f}", f"{m['roc_auc']:.4f}", _pct(m["recall_at_fpr_0_1pct"]),
                      _pct(m["recall_at_fpr_1pct"]), _pct(m["precision_at_threshold"]),
                      _pct(m["recall_at_threshold"]), f"{m['brier']:.5f}")
    out.print(table)
    out.print("R@x%: recall with x% of legitimate transactions flagged; P/R@thr: precision/recall at each model's "
              "threshold", soft_wrap=True, highlight=False, style="dim")
    lines = [
        f"split      {r.split.describe()}",
        f"features   {', '.join(r.features)}",
        f"imbalance  {r.imbalance.name}",
        f"target     {r.target.get('description', 'the inline fraud_label')}",
        f"rounds     {r.best_rounds} (early stopping on validation AUC-PR)"
        + (f"; --tune: {'best trial used' if r.tuning.improved else 'defaults kept'}" if r.tuning else ""),
        f"threshold  {r.threshold:.6f} (validation FPR <= {r.rule.max_fpr:.2%}); calibration: {r.calibration.method}",
        f"device     {r.device} ({r.device_why})",
        f"time       {r.durations['total_s']:.0f} s in all; all fits {r.durations['fits_s']:.0f} s, the final "
        f"model's {r.durations['final_fit_s']:.1f} s",
        f"model      {r.model_dir}" + ("  [current]" if r.made_current else
                                       f"  (not current; `velocity models use {r.version}`)"),
        f"report     {r.report_path}",
        f"MLflow     run {r.run_id} in {r.tracking_uri}",
    ]
    if r.made_current and r.previous_current and r.previous_current != r.version:
        lines.append(f"previous   {r.previous_current} (back to it: `velocity models use {r.previous_current}`)")
    for kind, m in sorted(((r.by_kind or {}).get("models") or {}).get("model", {}).items()):
        base = r.by_kind["models"].get("no_merchant", {}).get(kind)
        lines.append(f"by kind    {kind}: {m['frauds']:,} test frauds, recall {_pct(m['recall_at_threshold'])}, "
                     f"AUC {m['roc_auc']:.4f}, AUC-PR {m['aucpr']:.4f}"
                     + (f" (without merchant features: AUC {base['roc_auc']:.4f})" if base else ""))
    for line in lines:
        out.print(escape(line), soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        start: str = typer.Option(None, help="First day (UTC) of transactions, YYYY-MM-DD (default: the first day "
                                  "with data)."),
        end: str = typer.Option(None, help="Last day, exclusive (default: the day after the last one with data)."),
        training_set: Path = typer.Option(None, "--training-set", help="Train on a training set built before "
                                          "(`velocity features training-set --out PATH`; a Parquet file or a Spark "
                                          "dataset folder) instead of building it now."),
        history: Path = typer.Option(None, help="Build the training set from this history file (Parquet/CSV) "
                                     "instead of the stream's archive; the 1-week snapshots come from the offline "
                                     "store either way (`velocity batch`)."),
        engine: str = typer.Option("duckdb", help="Engine that builds the training set: duckdb (in-process) or "
                                   "spark (for scale; equal row for row)."),
        master: str = typer.Option("local[*]", help="Spark master URL (with --engine spark)."),
        offline_dir: Path = typer.Option(None, help="Offline store root (default: $VELOCITY_DATA_DIR/offline)."),
        models_dir: Path = typer.Option(None, help="Where model versions live (default: "
                                        "$VELOCITY_DATA_DIR/models)."),
        device: str = typer.Option("auto", help="auto (CUDA when XGBoost sees a GPU, else CPU), cpu, or cuda "
                                   "(an error without a GPU, never a silent fallback)."),
        val_days: int = typer.Option(None, help="Days of validation, after the training days (default: 10% of the "
                                     "days, at least 1)."),
        test_days: int = typer.Option(None, help="Latest days held out for the test (default: 10%, at least 1)."),
        tune: int = typer.Option(0, "--tune", metavar="N", help="Run an Optuna search of N trials (pruned on "
                                 "validation AUC-PR) and keep the best trial if it beats the defaults by >= 0.005 AUC-PR."),
        compare_imbalance: bool = typer.Option(False, "--compare-imbalance", help="Measure no reweighting vs "
                                               "scale_pos_weight, each on all legitimate rows and on a 10% "
                                               "subsample, and remember the winner for later runs (4 more fits; "
                                               "without it the remembered choice is used)."),
        compare_features: bool = typer.Option(False, "--compare-features", help="Also refit the chosen feature set "
                                              "without each feature beyond the original four, one at a time, and "
                                              "report what each one adds (one more fit per feature)."),
        event_time: bool = typer.Option(True, "--event-time/--no-event-time", help="Let the event-time features "
                                        "(the hour of day, UTC) compete as a block like the feature groups. "
                                        "--no-event-time: a model that does not read the clock, whose decisions do "
                                        "not depend on when a transaction happens (`velocity demo` uses it)."),
        max_fpr: float = typer.Option(0.005, help="Threshold rule: the lowest threshold whose validation "
                                      "false-positive rate is at most this (0.005 = 0.5% of legitimate "
                                      "transactions flagged)."),
        fraud_kinds: Path = typer.Option(None, "--fraud-kinds", help="Side file naming each fraud row's kind "
                                         "(txn_id, kind) for the report's breakdown by kind (default: "
                                         "<history stem>.fraud_kinds.parquet next to --history, when it exists)."),
        labels_as_of: str = typer.Option(None, "--labels-as-of", help="Train on the labels known at this time "
                                         "(ISO date or time, UTC; default: now): the latest label version with "
                                         "labeled_at <= it, else the inline fraud_label."),
        seed: int = typer.Option(0, help="Seed for subsampling, row sampling in trees and the search."),
        use: bool = typer.Option(True, "--use/--no-use", help="Make the new model current (served) when done."),
    ) -> None:
        """Train the XGBoost fraud model on the point-in-time training set, split by day.

        Train on the earliest days, validate on the next, test on the latest. Early stopping, the class-imbalance strategy, the feature groups added to the original four, calibration and the decision threshold are all chosen on the validation days; the model and both baselines (amount only; the original system's four features and hyperparameters) are measured on the same test days.

        Writes a versioned model directory under --models-dir (UBJ booster, metadata.json, report.md with PNG plots), makes it current unless --no-use, and tracks the run in MLflow (MLFLOW_TRACKING_URI, or a SQLite store under $VELOCITY_DATA_DIR/mlflow). The 1-week snapshots must exist first (`velocity batch`). Bad input exits 2 with a one-line message.
        """
        import duckdb

        from featurestore.config import get_settings
        from model.data import Source, TrainingDataError
        from model.device import DeviceError
        from model.metrics import ThresholdRule
        from model.pipeline import TrainOptions
        from model.pipeline import train as run_train
        from model.registry import ModelError
        from model.registry import models_dir as default_models_dir
        from model.tracking import TrackingError
        from stores.archive import ArchiveError
        from stores.history import HistoryError
        from stores.offline_files import OfflineError

        settings = get_settings()
        if engine not in ("duckdb", "spark"):
            raise typer.BadParameter("duckdb or spark", param_hint="--engine")
        if not 0 <= max_fpr < 1:
            raise typer.BadParameter("a rate in [0, 1)", param_hint="--max-fpr")
        if tune < 0:
            raise typer.BadParameter("0 or more trials", param_hint="--tune")
        if training_set is not None and (history is not None or engine != "duckdb"):
            raise typer.BadParameter("--training-set is already built: leave out --history/--engine")
        root = offline_dir or settings.offline_dir
        as_of_ms = None
        if labels_as_of is not None:
            try:
                when = dt.datetime.fromisoformat(labels_as_of)
            except ValueError:
                raise typer.BadParameter(f"expected an ISO date or time, got {labels_as_of!r}",
                                         param_hint="--labels-as-of") from None
            as_of_ms = int((when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp() * 1000)
        opts = TrainOptions(
            source=Source(training_set=training_set, history=history, offline_dir=root, engine=engine, master=master),
            data_dir=settings.data_dir, models_dir=models_dir or default_models_dir(settings.data_dir),
            secret=settings.entity_secret, allowed_lateness_ms=settings.allowed_lateness_ms,
            start=parse_date(start, "--start"), end=parse_date(end, "--end"), val_days=val_days, test_days=test_days,
            device=device, tune_trials=tune, compare_imbalance=compare_imbalance,
            compare_features=compare_features, event_time=event_time, rule=ThresholdRule(max_fpr),
            seed=seed, make_current=use, fraud_kinds=fraud_kinds, labels_as_of_ms=as_of_ms)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description:<26}"), BarColumn(bar_width=12), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
        try:
            with Progress(*columns, console=err) as bar:
                step = bar.add_task("preparing", total=None, info="")

                def status(text: str, detail: str = "") -> None:
                    bar.update(step, description=text, info=detail[-70:])

                result = run_train(opts, _RichProgress(bar), status)
                bar.remove_task(step)
        except (DeviceError, TrainingDataError, OfflineError, ArchiveError, HistoryError, ModelError,
                TrackingError, ValueError) as exc:
            fail(str(exc))
        except (duckdb.IOException, duckdb.InvalidInputException) as exc:
            log.debug("DuckDB could not read the input", exc_info=True)
            fail(f"DuckDB could not read the offline input ({' '.join(str(exc).split())[:300]})")
        _summary(result)

    models = typer.Typer(help="List trained model versions and choose the one the scorer serves.",
                         no_args_is_help=True)

    @models.command("list")
    def list_models(
        models_dir: Path = typer.Option(None, help="Where model versions live (default: $VELOCITY_DATA_DIR/models)."),
    ) -> None:
        """Every trained model side by side: version, date, device, test AUC-PR, recall and precision at its threshold, whether it is current, and whether the current feature definitions can still serve it."""
        from rich.table import Table

        from model.registry import list_models as listing
        from model.registry import models_dir as default_models_dir

        root = models_dir or default_models_dir()
        infos = listing(root)
        if not infos:
            err.print(f"no models under {root}: train one with `velocity train`")
            raise typer.Exit(0)
        out.print(f"models under {root}", highlight=False)
        table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold underline")
        for col in ("", "version", "trained (UTC)", "device", "AUC-PR", "base", "R@thr", "P@thr", "loads"):
            table.add_column(col, no_wrap=True, justify="right" if col in ("AUC-PR", "base", "R@thr", "P@thr") else "left")
        for info in infos:
            m = info.metadata or {}
            test = m.get("metrics", {}).get("model", {}).get("test", {})
            base = m.get("metrics", {}).get("original_four", {}).get("test", {})
            table.add_row("*" if info.current else "", info.version, str(m.get("created_at", "?"))[:16].replace("T", " "),
                          str(m.get("device", "?")), f"{test.get('aucpr', float('nan')):.4f}",
                          f"{base.get('aucpr', float('nan')):.4f}", _pct(test.get("recall_at_threshold")),
                          _pct(test.get("precision_at_threshold")), "yes" if info.problem is None else "no")
        out.print(table)
        out.print("* current (served). AUC-PR on the model's test days; base: the original-four baseline on the same "
                  "days; R/P@thr: recall/precision at the model's threshold", soft_wrap=True, highlight=False,
                  style="dim")
        for info in infos:
            if info.problem:
                out.print(f"{info.version}: {escape(info.problem)}", soft_wrap=True, highlight=False)

    @models.command("use")
    def use_model(
        version: str = typer.Argument(..., help="A version from `velocity models list`."),
        models_dir: Path = typer.Option(None, help="Where model versions live (default: $VELOCITY_DATA_DIR/models)."),
    ) -> None:
        """Make VERSION the current model (the one the scorer loads).

        It is loaded first: a model the current feature definitions cannot serve is refused and the current one stays.
        """
        from model.registry import ModelError, current_version, use
        from model.registry import models_dir as default_models_dir

        root = models_dir or default_models_dir()
        before = current_version(root)
        try:
            model = use(version, root)
        except ModelError as exc:
            fail(str(exc))
        out.print(f"current model: {model.version} (was {before or 'none'}); features {', '.join(model.features)}, "
                  f"threshold {model.threshold:.6f}", soft_wrap=True, highlight=False)

    app.add_typer(models, name="models")
