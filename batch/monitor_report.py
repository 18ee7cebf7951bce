"""The monitor's outputs: a JSON report, a Markdown report and a Prometheus textfile (for a node exporter's
textfile collector), each written atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

METRICS_HELP = {
    "velocity_model_precision": ("gauge", "Precision at the threshold of the day's decisions, labels known now"),
    "velocity_model_recall": ("gauge", "Recall at the threshold of the day's decisions (a lower bound while "
                                       "labels are still arriving)"),
    "velocity_model_decisions": ("gauge", "Decisions of the day (one per transaction)"),
    "velocity_model_frauds_known": ("gauge", "Transactions of the day labeled fraud so far"),
    "velocity_model_feature_psi": ("gauge", "Population stability index of a feature: live vs training window"),
    "velocity_model_drift_alert": ("gauge", "1 when a feature's PSI is above the threshold"),
    "velocity_model_psi_threshold": ("gauge", "The PSI alert threshold"),
    "velocity_model_monitor_timestamp_seconds": ("gauge", "When the monitor last ran (Unix time)"),
}


def _atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _num(v) -> str:
    return "NaN" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def prometheus_text(report: dict, days: int) -> str:
    """The report as Prometheus text: per-day figures for the last `days` days, per-feature PSI, the alert."""
    model = _esc(report.get("model_version") or "")
    samples: dict[str, list[str]] = {name: [] for name in METRICS_HELP}
    for q in report["days"][-days:] if days else []:
        day = _esc(q["day"])
        samples["velocity_model_precision"].append(f'{{day="{day}"}} {_num(q["precision"])}')
        samples["velocity_model_recall"].append(f'{{day="{day}"}} {_num(q["recall"])}')
        samples["velocity_model_decisions"].append(f'{{day="{day}"}} {q["decisions"]}')
        samples["velocity_model_frauds_known"].append(f'{{day="{day}"}} {q["frauds_known"]}')
    for name, d in sorted(report["drift"].items()):
        samples["velocity_model_feature_psi"].append(f'{{feature="{_esc(name)}",model="{model}"}} {_num(d["psi"])}')
    samples["velocity_model_drift_alert"].append(f" {int(report['drift_alert'])}")
    samples["velocity_model_psi_threshold"].append(f" {_num(report['psi_threshold'])}")
    samples["velocity_model_monitor_timestamp_seconds"].append(f" {report['as_of_ms'] / 1000:.3f}")
    lines = []
    for name, (kind, help_text) in METRICS_HELP.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{s}" for s in samples[name]]
    return "\n".join(lines) + "\n"


def _fmt(v, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def markdown(report: dict) -> str:
    t = report["total"]
    lines = [
        f"# Live model quality (as of {report['as_of']})", "",
        f"Model `{report['model_version']}` (threshold {_fmt(report.get('threshold'), 4)}); {report['decisions']:,} "
        f"decisions from topic `{report['scores_topic']}`; {report['labels_known']:,} labels known. A transaction "
        "without a label counts as legitimate; labels arrive up to weeks late, so recent days' recall rises as they "
        "come in.", "",
        f"Overall: precision {_fmt(t['precision'])}, recall {_fmt(t['recall'])} "
        f"(TP {t['tp']}, FP {t['fp']}, FN {t['fn']}).", "",
        "| day | decisions | flagged | frauds known | TP | FP | FN | precision | recall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {q['day']} | {q['decisions']} | {q['flagged']} | {q['frauds_known']} | {q['tp']} | {q['fp']} | "
              f"{q['fn']} | {_fmt(q['precision'])} | {_fmt(q['recall'])} |" for q in report["days"]]
    lines += ["", f"## Input drift (PSI against the training window; alert above {report['psi_threshold']:g})", "",
              f"Reference: {report['reference']}.", "", "| feature | PSI | rows | drift |", "|---|---:|---:|---|"]
    for name, d in report["drift"].items():
        flag = "**ALERT**" if name in report["drifted"] else ""
        lines.append(f"| {name} | {_fmt(d['psi'], 4)} | {d['rows']} | {flag} |")
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, out_dir: Path, metrics_file: Path | None, days: int) -> list[Path]:
    """report.json, report.md in `out_dir`, and the textfile metrics; returns the paths written."""
    out_dir = Path(out_dir)
    paths = [out_dir / "report.json", out_dir / "report.md"]
    _atomic(paths[0], json.dumps(report, indent=1, allow_nan=False, default=str))
    _atomic(paths[1], markdown(report))
    metrics_file = metrics_file or out_dir / "metrics.prom"
    _atomic(metrics_file, prometheus_text(report, days))
    return [*paths, metrics_file]
