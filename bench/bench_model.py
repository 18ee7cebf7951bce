"""`velocity train` on the seed-scale history: test AUC-PR against the original-four baseline, and time per device.

    .venv/bin/python -m bench.bench_model [--history data/history_seed.parquet] [--compare-imbalance]
        [--compare-features] [--tune N]

Generates the seed-scale history if it is missing (`velocity generate` defaults: 10,000 cards, 152 days, ~5.4M
rows, compromised merchants included), backfills every night's snapshot of every batch group (card 1-week, 1-day,
30-day; merchant 1/7/30-day) with DuckDB into `data/bench_model/offline` (the nightly batch's job, timed apart), then times the default `velocity train` as a user runs it (a subprocess, DuckDB
training set included) on the CPU, and on CUDA when XGBoost sees a GPU. Each run's wall time is printed with its
CPU time and the load average around it (on a shared machine the wall time moves with what else runs). The models,
their reports and the MLflow store stay under `data/bench_model/` (VELOCITY_DATA_DIR). Records `model_test_aucpr`,
`model_baseline_aucpr` (the original-four-features baseline) and `model_test_aucpr_by_kind` (each fraud kind's test
rows against every legitimate test row, from the generator's side file `<stem>.fraud_kinds.parquet`; a history
without one, or whose side file names no compromised-merchant fraud, i.e. from before compromised merchants were on
by default, is generated again) in bench/results.json.

    --cards N --days N  generate a smaller history instead (a smoke run; its figures are not the seed's)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.results import update

REPO = Path(__file__).resolve().parent.parent
SECRET = "bench-model-secret"


def velocity(*args: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "velocity"), *args], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"velocity {' '.join(args)} exited {proc.returncode}")
    PEAK_RSS_MB[args[0]] = max(PEAK_RSS_MB.get(args[0], 0.0), usage.ru_maxrss / 1024)
    LAST_RUN.update(cpu_s=usage.ru_utime + usage.ru_stime, load=(load0, os.getloadavg()[0]))
    return time.perf_counter() - t0


PEAK_RSS_MB: dict[str, float] = {}
#: The last run's CPU time (user + system) and the 1-minute load average when it started and ended.
LAST_RUN: dict = {}


def _cpu_load() -> str:
    a, b = LAST_RUN["load"]
    return f"CPU {LAST_RUN['cpu_s']:.0f} s, load average {a:.1f} -> {b:.1f} on {os.cpu_count()} cores"


def backfill(history: Path, offline: Path) -> tuple[float, dt.date, dt.date]:
    from batch.engines import dates_between, open_engine, run_snapshots

    shutil.rmtree(offline, ignore_errors=True)  # a snapshot layout from older code must not be reused
    t0 = time.perf_counter()
    eng = open_engine("duckdb", offline_dir=offline, history=history, secret=SECRET)
    lo, hi = eng.span
    first = dt.datetime.fromtimestamp(lo / 1000, dt.UTC).date()
    last = dt.datetime.fromtimestamp(hi / 1000, dt.UTC).date()
    run_snapshots(eng, dates_between(first + dt.timedelta(days=1), last), offline_dir=offline)
    eng.close()
    return time.perf_counter() - t0, first, last


def _has_both_kinds(kinds: Path) -> bool:
    """A side file naming both fraud kinds: a history generated with compromised merchants (the default now)."""
    if not kinds.exists():
        return False
    import pyarrow.parquet as pq

    return {"card_chain", "compromised_merchant"} <= set(pq.read_table(kinds, columns=["kind"])["kind"].to_pylist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history", type=Path, default=None,
                    help="default data/history_seed.parquet (a smoke run: <work>/history_smoke.parquet)")
    ap.add_argument("--work", type=Path, default=REPO / "data" / "bench_model", help="VELOCITY_DATA_DIR of the runs")
    ap.add_argument("--compare-imbalance", action="store_true",
                    help="first run `velocity train --compare-imbalance` (4 more fits; remembers the choice)")
    ap.add_argument("--compare-features", action="store_true",
                    help="also run `velocity train --compare-features --no-use` (drop-one comparison of the chosen "
                         "features; one more fit per feature beyond the original four)")
    ap.add_argument("--tune", type=int, default=0, help="also time a `--tune N` run (not part of the 3-minute target)")
    ap.add_argument("--cards", type=int, default=None, help="generate this many cards (smoke run; default: seed scale)")
    ap.add_argument("--days", type=int, default=None, help="generate this many days (smoke run; default: seed scale)")
    args = ap.parse_args()
    smoke = bool(args.cards or args.days)
    if args.history is None:
        args.history = args.work / "history_smoke.parquet" if smoke else REPO / "data" / "history_seed.parquet"
    env = {**os.environ, "VELOCITY_DATA_DIR": str(args.work), "VELOCITY_ENTITY_SECRET": SECRET}
    kinds = args.history.with_name(args.history.stem + ".fraud_kinds.parquet")
    if smoke or not args.history.exists() or not _has_both_kinds(kinds):
        print(f"generating the history -> {args.history} (+ {kinds.name})")
        size = [*(["--cards", str(args.cards)] if args.cards else []), *(["--days", str(args.days)] if args.days else [])]
        velocity("generate", "--out", str(args.history), *size, env=env)
    offline = args.work / "offline"
    snap_s, first, last = backfill(args.history, offline)
    print(f"snapshots: every night {first + dt.timedelta(days=1)} .. {last} (DuckDB) in {snap_s:.1f} s")

    from model.device import cuda_available
    from model.registry import load_current

    common = ["train", "--history", str(args.history), "--offline-dir", str(offline)]
    if args.compare_imbalance:
        s = velocity(*common, "--device", "cpu", "--compare-imbalance", env=env)
        print(f"train --compare-imbalance (cpu): {s:.1f} s ({_cpu_load()})")
    if args.compare_features:
        s = velocity(*common, "--device", "cpu", "--compare-features", "--no-use", env=env)
        from model.registry import versions

        newest = versions(args.work / "models")[-1]
        ablation = json.loads((args.work / "models" / newest / "metadata.json").read_text())["feature_ablation"]
        print(f"train --compare-features --no-use (cpu): {s:.1f} s ({_cpu_load()}); model {newest}, "
              f"report {args.work / 'models' / newest / 'report.md'}")
        for row in ablation["rows"]:
            print(f"  without {row['feature']:<20} val AUC-PR {row['val_aucpr_without']:.4f} "
                  f"(it adds {row['loss']:+.4f})")
    devices = ["cpu"] + (["cuda"] if cuda_available()[0] else [])
    times, cpu = {}, {}
    for device in devices:
        times[device] = velocity(*common, "--device", device, env=env)
        cpu[device] = LAST_RUN["cpu_s"]
        meta = load_current(args.work / "models").metadata
        print(f"default train ({device}): {times[device]:.1f} s wall (fits {meta['durations']['fits_s']:.1f} s, "
              f"final model {meta['durations']['final_fit_s']:.1f} s), {_cpu_load()}, peak RSS "
              f"{PEAK_RSS_MB['train']:,.0f} MB")
    model = load_current(args.work / "models")  # the last default run's model: the recorded figures
    if args.tune:
        s = velocity(*common, "--device", devices[-1], "--tune", str(args.tune), "--no-use", env=env)
        print(f"train --tune {args.tune} ({devices[-1]}): {s:.1f} s (not made current; see `velocity models list`)")
    m = model.metadata["metrics"]
    figures = {"version": model.version, "device": model.metadata["device"], "features": model.features,
               "imbalance": model.metadata["imbalance"]["name"], "calibration": model.metadata["calibration"]["method"],
               "threshold": model.threshold, "test": m["model"]["test"], "original_four": m["original_four"]["test"],
               "amount_only": m["amount_only"]["test"], "train_s_by_device": {k: round(v, 1) for k, v in times.items()},
               "train_cpu_s_by_device": {k: round(v, 1) for k, v in cpu.items()},
               "durations": {k: round(v, 1) for k, v in model.metadata["durations"].items()},
               "report": str(model.path / "report.md")}
    print(json.dumps(figures, indent=2))
    by_kind = {k: round(v["aucpr"], 4) for k, v in
               ((model.metadata.get("by_kind") or {}).get("models") or {}).get("model", {}).items()}
    print("test AUC-PR by fraud kind (each kind vs all legitimate test rows):", by_kind or "no side file")
    if smoke:
        print("smoke run (--cards/--days): bench/results.json is not updated")
        return
    update(model_test_aucpr=round(m["model"]["test"]["aucpr"], 4),
           model_baseline_aucpr=round(m["original_four"]["test"]["aucpr"], 4), model_test_aucpr_by_kind=by_kind)


if __name__ == "__main__":
    main()
