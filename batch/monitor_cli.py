"""`velocity monitor`: the scorer's past decisions against the labels known now, and input drift (issue 16)."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import typer
from rich.console import Console

err = Console(stderr=True)


def _when(value: str | None, flag: str) -> int | None:
    if value is None:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"expected an ISO date or time (2024-05-01, 2024-05-01T12:00), got {value!r}",
                                 param_hint=flag) from None
    return int((t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp() * 1000)


def build_report(*, bootstrap: str, scores_topic: str, offline_dir: Path, models_dir: Path,
                 training_set: Path | None, history: Path | None, secret: str, since_ms: int | None,
                 as_of_ms: int, psi_threshold: float, rebuild_reference: bool = False) -> dict:
    """Everything the report says (see batch.monitor_quality for the definitions)."""
    from batch import monitor_quality as quality
    from batch.monitor_sources import current_model, known_labels, load_reference, read_decisions

    version, ref, source = load_reference(models_dir, training_set=training_set, offline_dir=offline_dir,
                                          history=history, secret=secret, rebuild=rebuild_reference)
    meta = current_model(models_dir)[2]
    raw, skipped = read_decisions(bootstrap, scores_topic, since_ms=since_ms)
    decisions = quality.one_per_transaction(raw)
    labels = known_labels(offline_dir, as_of_ms)
    days = quality.daily_quality(decisions, labels)
    drift = quality.feature_drift([d for d in decisions if d.model_version == version] or decisions, ref)
    drifted = sorted(n for n, d in drift.items() if d["psi"] is not None and d["psi"] > psi_threshold)
    return {
        "as_of_ms": as_of_ms, "as_of": dt.datetime.fromtimestamp(as_of_ms / 1000, dt.UTC).isoformat(),
        "scores_topic": scores_topic, "decisions": len(decisions), "not_decisions": skipped,
        "labels_known": len(labels), "model_version": version, "threshold": meta.get("threshold"),
        "versions_seen": sorted({d.model_version for d in decisions}),
        "days": [q.as_dict() for q in days], "total": quality.total(days).as_dict(),
        "drift": drift, "psi_threshold": psi_threshold, "drifted": drifted, "drift_alert": bool(drifted),
        "reference": source,
    }


def register(app: typer.Typer) -> None:
    @app.command()
    def monitor(
        out: Path = typer.Option(None, help="Folder for report.json, report.md and metrics.prom (default "
                                 "$VELOCITY_DATA_DIR/monitor)."),
        metrics_file: Path = typer.Option(None, help="Prometheus textfile (default OUT/metrics.prom), for a node "
                                          "exporter's textfile collector; written atomically."),
        psi_threshold: float = typer.Option(0.2, envvar="VELOCITY_MONITOR_PSI_THRESHOLD",
                                            help="Alert (exit 1) when a feature's PSI against the training window "
                                            "is above this (0.1: moderate shift, 0.25: major)."),
        since: str = typer.Option(None, help="Only decisions scored at or after this ISO date/time (default: all "
                                  "on the topic)."),
        as_of: str = typer.Option(None, help="Labels known at this ISO date/time (default: now)."),
        days: int = typer.Option(30, min=0, help="Days of per-day figures in the metrics file (the latest)."),
        scores_topic: str = typer.Option(None, help="Decisions topic (default VELOCITY_KAFKA_TOPIC_SCORES)."),
        bootstrap: str = typer.Option(None, help="Kafka brokers (default VELOCITY_KAFKA_BOOTSTRAP)."),
        offline_dir: Path = typer.Option(None, help="Offline store root with the label store (default "
                                         "$VELOCITY_DATA_DIR/offline)."),
        models_dir: Path = typer.Option(None, help="Model directory whose current model is monitored (default "
                                        "$VELOCITY_DATA_DIR/models)."),
        training_set: Path = typer.Option(None, help="The training data (Parquet) for the drift reference; default: "
                                          "the reference kept beside the model, else the model's train window "
                                          "rebuilt through DuckDB."),
        history: Path = typer.Option(None, help="History file the model was trained from, for rebuilding its "
                                     "training data (default: the stream's archive)."),
        rebuild_reference: bool = typer.Option(False, help="Recompute the drift reference kept beside the model."),
    ) -> None:
        """Live model quality: the scorer's decisions (topic scores) joined with the fraud labels known now
        (precision and recall at the threshold, per day), and input drift per feature (PSI against the training
        window). Writes a JSON and Markdown report and Prometheus textfile metrics; exit 1 when drift passes
        --psi-threshold, 2 when it cannot run."""
        from rich.markup import escape

        from batch.monitor_report import write_outputs
        from batch.monitor_sources import MonitorError
        from featurestore.config import get_settings

        s = get_settings()
        try:
            report = build_report(
                bootstrap=bootstrap or s.kafka.bootstrap, scores_topic=scores_topic or s.kafka.topic_scores,
                offline_dir=offline_dir or s.offline_dir, models_dir=models_dir or s.data_dir / "models",
                training_set=training_set, history=history, secret=s.entity_secret,
                since_ms=_when(since, "--since"), as_of_ms=_when(as_of, "--as-of") or int(time.time() * 1000),
                psi_threshold=psi_threshold, rebuild_reference=rebuild_reference)
        except MonitorError as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None
        paths = write_outputs(report, out or s.data_dir / "monitor", metrics_file, days)
        t = report["total"]
        p = "—" if t["precision"] is None else f"{t['precision']:.3f}"
        r = "—" if t["recall"] is None else f"{t['recall']:.3f}"
        err.print(f"{report['decisions']:,} decisions, {report['labels_known']:,} labels known | precision {p} "
                  f"recall {r} | report {paths[1]}", soft_wrap=True, highlight=False)
        if report["drift_alert"]:
            worst = ", ".join(f"{n} {report['drift'][n]['psi']:.3f}" for n in report["drifted"])
            err.print(f"[red]drift[/]: PSI above {psi_threshold:g} for {worst}", soft_wrap=True, highlight=False)
            raise typer.Exit(1)
        err.print(f"no drift above {psi_threshold:g}")
