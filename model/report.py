"""The training report: a Markdown page next to the model, with PNG plots (matplotlib, Agg backend: no display).

Everything in it is measured on the same time split: the model and both baselines on the same test days, the
choices (imbalance strategy, feature groups, tuning, calibration, threshold) on the validation days.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from model.pipeline import TrainResult

PLOTS = {"pr": "plots/pr_curves.png", "calibration": "plots/calibration.png",
         "scores": "plots/score_distributions.png", "importance": "plots/feature_importance.png"}
METRIC_COLUMNS = [("aucpr", "AUC-PR"), ("roc_auc", "ROC AUC"), ("recall_at_fpr_0_1pct", "recall @ 0.1% FPR"),
                  ("recall_at_fpr_1pct", "recall @ 1% FPR"), ("precision_at_threshold", "precision @ thr"),
                  ("recall_at_threshold", "recall @ thr"), ("brier", "Brier"), ("threshold", "threshold")]


def _f(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


# ------------------------------------------------------------------ plots


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_pr(path: Path, y: np.ndarray, curves: dict[str, np.ndarray], threshold_point: tuple[float, float]) -> None:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
    for name, scores in curves.items():
        p, r, _ = precision_recall_curve(y, scores)
        ax.step(r, p, where="post", label=f"{name} (AUC-PR {average_precision_score(y, scores):.3f})")
    ax.plot([threshold_point[0]], [threshold_point[1]], "o", color="black", label="model at its threshold")
    ax.axhline(float(np.mean(y)), color="grey", lw=0.8, ls=":", label=f"fraud rate {np.mean(y):.2%}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall, test days")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_calibration(path: Path, y: np.ndarray, raw: np.ndarray, calibrated: np.ndarray | None) -> None:
    """Reliability diagram on the test days: observed fraud rate per score bin against the mean score in it.
    Bins are log-spaced because almost every score is near 0."""
    plt = _plt()
    edges = np.r_[0.0, np.logspace(-4, 0, 13)]
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(6.4, 6.4), dpi=110, gridspec_kw={"height_ratios": [3, 1]},
                                 sharex=True)
    series = {"raw booster scores": raw}
    if calibrated is not None:
        series["calibrated"] = calibrated
    for name, s in series.items():
        idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, edges.size - 2)
        counts = np.bincount(idx, minlength=edges.size - 1)
        ok = counts > 0
        mean_s = np.bincount(idx, weights=s, minlength=edges.size - 1)[ok] / counts[ok]
        frac = np.bincount(idx, weights=y, minlength=edges.size - 1)[ok] / counts[ok]
        ax.plot(mean_s, frac, "o-", label=name)
        hx.step(edges[:-1], counts, where="post", label=name)
    ax.plot([1e-5, 1], [1e-5, 1], color="grey", ls=":", label="perfectly calibrated")
    ax.set(xscale="log", ylabel="observed fraud rate", title="Reliability, test days")
    ax.set_yscale("symlog", linthresh=1e-4)  # an empty-of-fraud bin (rate 0) still shows
    ax.set_ylim(0, 1.5)
    ax.legend(fontsize=8)
    hx.set(xscale="log", yscale="log", xlabel="score", ylabel="transactions")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_scores(path: Path, y: np.ndarray, scores: np.ndarray, threshold: float) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    bins = np.linspace(0, 1, 51)
    ax.hist(scores[y == 0], bins=bins, density=True, alpha=0.6, label=f"legitimate ({int(np.sum(y == 0)):,})")
    ax.hist(scores[y == 1], bins=bins, density=True, alpha=0.6, label=f"fraud ({int(np.sum(y == 1)):,})")
    ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    ax.set(yscale="log", xlabel="model score", ylabel="density", title="Score distribution by class, test days")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_importance(path: Path, importance: dict[str, float]) -> None:
    plt = _plt()
    names = list(importance)[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(names) + 1.5), dpi=110)
    ax.barh(names, [importance[n] for n in names])
    ax.set(xlabel="total gain (share)", title="Feature importance (gain)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_plots(result: TrainResult, out: Path) -> dict[str, Path]:
    (out / "plots").mkdir(parents=True, exist_ok=True)
    s = result.scores
    paths = {k: out / v for k, v in PLOTS.items()}
    m = result.metrics["model"]["test"]
    curves = {"model": s["model"], "original four (baseline)": s["original_four"],
              "amount only (baseline)": s["amount_only"]}
    if "no_merchant" in s:
        curves["no merchant features (baseline)"] = s["no_merchant"]
    plot_pr(paths["pr"], s["y_test"], curves,
            (m["recall_at_threshold"], m["precision_at_threshold"]))
    plot_calibration(paths["calibration"], s["y_test"], s["model_raw"],
                     s["model"] if result.calibration.method != "none" else None)
    plot_scores(paths["scores"], s["y_test"], s["model"], result.threshold)
    plot_importance(paths["importance"], result.importance)
    return paths


# ------------------------------------------------------------------ Markdown


def _metrics_table(rows: list[tuple[str, dict]]) -> list[str]:
    out = ["| model | " + " | ".join(label for _, label in METRIC_COLUMNS) + " |",
           "|---|" + "---:|" * len(METRIC_COLUMNS)]
    for name, m in rows:
        out.append(f"| {name} | " + " | ".join(_f(m.get(k)) for k, _ in METRIC_COLUMNS) + " |")
    return out


def markdown(result: TrainResult) -> str:
    r = result
    mt = r.metrics["model"]["test"]
    orig = r.metrics["original_four"]["test"]
    amt = r.metrics["amount_only"]["test"]
    L = [f"# Fraud model {r.version}", ""]
    L += [f"Trained {r.created_at} on **{r.device}** ({r.device_why}) in {r.durations['total_s']:.0f} s "
          f"(fits {r.durations['fits_s']:.0f} s). Data: {r.source}, window {r.start} .. {r.end} (end exclusive), "
          f"{r.rows:,} labeled transactions"
          + (f" ({r.unlabeled_dropped:,} unlabeled left out)" if r.unlabeled_dropped else "") + ".", ""]
    L += ["## Result on the test days", ""]
    L += [f"Test AUC-PR **{mt['aucpr']:.4f}** against {orig['aucpr']:.4f} for the original system's model "
          f"({mt['aucpr'] - orig['aucpr']:+.4f}) and {amt['aucpr']:.4f} for the amount alone "
          f"({mt['aucpr'] - amt['aucpr']:+.4f}). At its threshold the model flags "
          f"{_pct(mt['recall_at_threshold'])} of the test fraud with precision {_pct(mt['precision_at_threshold'])} "
          f"({_pct(mt['fpr_at_threshold'])} of legitimate transactions flagged).", ""]
    rows = [("**model**", mt), ("model, uncalibrated", r.metrics["model_raw"]["test"])]
    if "no_merchant" in r.metrics:
        rows.append(("no merchant features (baseline)", r.metrics["no_merchant"]["test"]))
    rows += [("original four (baseline)", orig), ("amount only (baseline)", amt)]
    L += _metrics_table(rows)
    L += ["", "Each row's threshold comes from its own validation scores by the same rule (below). Baselines: "
          "*original four* is the original system's model (amount, amt_ratio1, amt_ratio2, count_ratio; depth 5, "
          "eta 0.2, gamma 4, min_child_weight 6, subsample 0.7, 100 rounds, no class reweighting; every fraud row "
          "and a 10% sample of the legitimate ones, each weighted x10, which estimates the same loss as every row); "
          "*amount only* is this model's own recipe with the amount as its only feature; *no merchant features* is "
          "this model's recipe and features less those keyed by the merchant"
          + ("." if "no_merchant" in r.metrics else " (the model uses none, so it is its own baseline: no row).")]
    L += ["", f"Training target: {r.target.get('description', 'the inline fraud_label')}.", ""]
    L += _by_kind(r)
    L += ["Validation days (where every choice below was made):", ""]
    L += _metrics_table([("model", r.metrics["model"]["validation"]),
                         ("original four", r.metrics["original_four"]["validation"]),
                         ("amount only", r.metrics["amount_only"]["validation"])])
    L += ["", f"![precision-recall]({PLOTS['pr']})", ""]

    L += ["## Split by time", "", "Train on the earliest days, validate on the next, test on the latest; never "
          "random (an attack is a chain of transactions minutes apart: a random split would put parts of one chain "
          "in train and test).", "", "| split | days | transactions | fraud | fraud rate | without a 1-week snapshot |",
          "|---|---|---:|---:|---:|---:|"]
    for name, (a, b) in r.split.ranges().items():
        c = r.split_counts[name]
        L.append(f"| {name} | {a} .. {b - dt.timedelta(days=1)} ({(b - a).days} d) | {c['rows']:,} | "
                 f"{c['frauds']:,} | {c['frauds'] / c['rows']:.3%} | {_pct(c['without_snapshot'])} |")
    L.append("")

    L += ["## Class imbalance", "", f"Used: **{r.imbalance.name}** — {r.imbalance_source}.", ""]
    if r.imbalance_comparison:
        cmp = r.imbalance_comparison
        L += [f"Rule: {cmp['rule']}.", "",
              "| strategy | val AUC-PR | rounds | training rows | fit time | time saved vs all rows | AUC-PR cost vs all rows |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for row in cmp["rows"]:
            mark = " **(chosen)**" if row["chosen"] else ""
            L.append(f"| {row['strategy']}{mark} | {row['val_aucpr']:.4f} | {row['rounds']} | {row['train_rows']:,} | "
                     f"{row['seconds']:.1f} s | {_pct(row['time_saved_vs_all_rows'])} | "
                     f"{row['aucpr_cost_vs_all_rows']:+.4f} |")
        L += ["", "scale_pos_weight = sqrt(#legitimate / #fraud) of the training days "
              f"({r.scale_pos_weight:.1f} here). Subsampling keeps every fraud row and a random share of the "
              "legitimate ones, each weighted 1 / share, so the loss stays an unbiased estimate of the full "
              "data's: most legitimate rows are easy and add little but time.", ""]
    L += ["## Features", "", f"Model input, in the declarations' order: **{', '.join(r.features)}** "
          f"(declarations version `{r.declarations_version}`). Rule: {r.selection.rule}.", "",
          "| feature set | val AUC-PR | gain | kept | rounds | fit time |", "|---|---:|---:|---|---:|---:|"]
    for row in r.selection.rows:
        gain = "" if row["gain"] is None else f"{row['gain']:+.4f}"
        L.append(f"| {row['features']} | {row['val_aucpr']:.4f} | {gain} | {'yes' if row['kept'] else 'no'} | "
                 f"{row['rounds']} | {row['seconds']:.1f} s |")
    if r.ablation:
        L += ["", f"Drop-one comparison (`--compare-features`): {r.ablation['rule']}. Blocks of groups are chosen whole "
              "(above); this shows what each member adds given all the others.", "",
              "| feature | group | val AUC-PR without it | what it adds | adds >= the rule's gain alone | rounds | "
              "fit time |",
              "|---|---|---:|---:|---|---:|---:|"]
        for row in r.ablation["rows"]:
            L.append(f"| {row['feature']} | {row['group']} | {row['val_aucpr_without']:.4f} | {row['loss']:+.4f} | "
                     f"{'yes' if row['helps'] else 'no'} | {row['rounds']} | {row['seconds']:.1f} s |")
    L += ["", f"![feature importance]({PLOTS['importance']})", ""]

    L += ["## Hyperparameters", ""]
    if r.tuning is not None:
        t = r.tuning
        states = [x["state"] for x in t.trials]
        L += [f"`--tune {len(t.trials) - 1}`: Optuna TPE, median pruning on validation AUC-PR (early-stopped "
              f"trials); {states.count('COMPLETE')} completed, {states.count('PRUNED')} pruned. Best trial "
              f"{t.best_val_aucpr:.4f} vs defaults {t.default_val_aucpr:.4f} on validation: "
              + ("**the best trial's parameters are used**." if t.improved else
                 "**the defaults are kept** (a trial must beat them by >= 0.005 to replace them)."), "",
              "| trial | state | val AUC-PR | rounds | params |", "|---:|---|---:|---:|---|"]
        for x in t.trials:
            params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in x["params"].items())
            state = x["state"] + (f" (round {x['pruned_at']})" if x.get("pruned_at") else "")
            L.append(f"| {x['number']} | {state} | {_f(x['val_aucpr'])} | {x['rounds'] or '–'} | {params} |")
        L.append("")
    from model.trainer import EARLY_STOPPING_NEGATIVE_RATE as es_rate

    L += [f"XGBoost `hist` on {r.device}, early stopping on validation AUC-PR (scored each round on every fraud row "
          f"and a fixed {es_rate:.0%} of the legitimate rows, each counted x{1 / es_rate:g}; every figure above is "
          f"over all validation rows) after {r.early_stopping_rounds} "
          f"rounds without gain (at most {r.max_rounds}); kept {r.best_rounds} rounds. Parameters: "
          + ", ".join(f"`{k}={v}`" for k, v in r.params.items()) + ".", ""]

    L += ["## Threshold", "", f"Rule: {r.rule.describe()}. Chosen on the validation days: **{r.threshold:.6f}** "
          f"(validation false-positive rate {_pct(r.metrics['model']['validation']['fpr_at_threshold'])}, recall "
          f"{_pct(r.metrics['model']['validation']['recall_at_threshold'])}; on the test days "
          f"{_pct(mt['fpr_at_threshold'])} and {_pct(mt['recall_at_threshold'])}).", ""]

    cal = r.calibration_choice
    L += ["## Calibration", "", "Out-of-fold Brier score on the validation days (5 contiguous folds in time order; "
          "each calibrated by a map fitted on the other four):", "",
          "| method | Brier (validation, out of fold) |", "|---|---:|"]
    for k, v in cal.brier_oof.items():
        L.append(f"| {'raw scores' if k == 'none' else k} | {v:.6f} |")
    used = r.calibration.method
    L += ["", ("No calibration improved the Brier score: the booster's scores are served as they are."
               if used == "none" else
               f"**{used}** lowered it and is used, refitted on all validation days. On the test days the Brier "
               f"score is {r.metrics['model_raw']['test']['brier']:.6f} raw and {mt['brier']:.6f} calibrated."),
          "", f"![calibration]({PLOTS['calibration']})", "", f"![score distributions]({PLOTS['scores']})", ""]

    L += ["## Where the misses are", "", "An attack's first transaction has nothing in its 10-minute window but the "
          "card's own legitimate history, so no velocity feature can see it; every later one can. Recall at each "
          "model's threshold on the test days, by position in the attack (a fraud row with no fraud row of the same "
          "card in the previous 10 minutes is a first one):", "",
          "| model | recall, first transactions | recall, later transactions | AUC-PR without the first ones |",
          "|---|---:|---:|---:|"]
    for name, b in r.chains.items():
        L.append(f"| {name} | {_pct(b['first'])} of {b['n_first']:,} | {_pct(b['later'])} of {b['n_later']:,} | "
                 f"{_f(b['aucpr_without_first'])} |")
    L += ["", "The last column drops the first transactions of attacks from the test days: what the same scores "
          "are worth on the fraud a velocity feature can see at all.", ""]

    L += ["## Run", "", f"- version `{r.version}`, directory `{r.model_dir}`",
          f"- MLflow: {r.tracking_uri}, experiment `{r.experiment}`, run `{r.run_id}`",
          "- durations: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in r.durations.items()),
          "- libraries: " + ", ".join(f"{k} {v}" for k, v in r.libraries.items()), ""]
    return "\n".join(L)


MODEL_NAMES = {"model": "model", "no_merchant": "no merchant features", "original_four": "original four",
               "amount_only": "amount only"}


def _by_kind(r: TrainResult) -> list[str]:
    """The by-fraud-kind table: each kind's fraud rows against every legitimate row of the test days."""
    if not r.by_kind:
        return ["No fraud-kind side file (`--fraud-kinds PATH`; `velocity generate` writes `<stem>.fraud_kinds.parquet`"
                " next to the history): no breakdown by kind.", ""]
    L = ["### By fraud kind", "", f"From `{r.by_kind['source']}`. Each kind's fraud rows of the test days against "
         "every legitimate row of the test days; recall at each model's own threshold.", "",
         "| kind | model | frauds | recall @ thr | ROC AUC | AUC-PR |", "|---|---|---:|---:|---:|---:|"]
    models = r.by_kind["models"]
    kinds = sorted({k for figures in models.values() for k in figures})
    for kind in kinds:
        for name, figures in models.items():
            m = figures.get(kind)
            if m:
                label = f"**{MODEL_NAMES.get(name, name)}**" if name == "model" else MODEL_NAMES.get(name, name)
                L.append(f"| {kind} | {label} | {m['frauds']:,} | {_pct(m['recall_at_threshold'])} | "
                         f"{_f(m['roc_auc'])} | {_f(m['aucpr'])} |")
    return [*L, ""]


def write(result: TrainResult, out: Path) -> Path:
    write_plots(result, out)
    path = out / "report.md"
    path.write_text(markdown(result))
    return path
