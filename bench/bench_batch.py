"""Batch job on the seed-scale history: Spark (local[2]) vs DuckDB, same computation, same SQL.

    .venv/bin/python -m bench.bench_batch [--history data/history_seed.parquet] [--date 2020-05-01]

For each engine: load the events (keys, arrival order, late marks), one night's `card_agg_1w` snapshot, the full
backfill (every night of the span, one pass; offline writes, no Redis), and the point-in-time training set over
the whole span (written to Parquet). Records `batch_*_s` (load + one night + training set) and `backfill_*_s`
(load + every night + training set).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import tempfile
import time
from pathlib import Path

from batch.engines import build_training_set, dates_between, open_engine, run_snapshots
from bench.results import update

REPO = Path(__file__).resolve().parent.parent


def run(engine: str, history: Path, day: dt.date, master: str) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"bench-batch-{engine}-"))
    try:
        t0 = time.perf_counter()
        eng = open_engine(engine, offline_dir=root, history=history, secret="bench", master=master)
        t1 = time.perf_counter()
        run_snapshots(eng, [day], offline_dir=root)
        t2 = time.perf_counter()
        lo, hi = eng.span
        first = dt.datetime.fromtimestamp(lo / 1000, dt.UTC).date() + dt.timedelta(days=1)
        last = dt.datetime.fromtimestamp(hi / 1000, dt.UTC).date() + dt.timedelta(days=1)
        nights = dates_between(first, last)
        run_snapshots(eng, nights, offline_dir=root)
        t3 = time.perf_counter()
        frame = build_training_set(eng, dt.date(2020, 1, 1), dt.date(2020, 6, 1), root / "training.parquet")
        t4 = time.perf_counter()
        eng.close()
        rows = frame if isinstance(frame, int) else len(frame)
        return {"load": t1 - t0, "snapshot": t2 - t1, "backfill": t3 - t2, "nights": len(nights),
                "training": t4 - t3, "total": (t1 - t0) + (t2 - t1) + (t4 - t3),
                "backfill_total": (t1 - t0) + (t3 - t2) + (t4 - t3), "rows": rows}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history", type=Path, default=REPO / "data" / "history_seed.parquet")
    ap.add_argument("--date", type=dt.date.fromisoformat, default=dt.date(2020, 5, 1))
    ap.add_argument("--master", default="local[2]")
    args = ap.parse_args()
    if not args.history.exists():
        raise SystemExit(f"{args.history} missing: run `velocity generate --out {args.history}` first")
    results = {}
    for engine in ("duckdb", "spark"):
        r = run(engine, args.history, args.date, args.master)
        results[engine] = r
        print(f"{engine:7s} load {r['load']:6.1f}s | one night {r['snapshot']:5.1f}s | backfill {r['nights']} nights "
              f"{r['backfill']:6.1f}s | training set {r['training']:6.1f}s ({r['rows']:,} rows) | nightly total "
              f"{r['total']:6.1f}s | backfill + training set {r['backfill_total']:6.1f}s", flush=True)
    print(f"spark / duckdb = {results['spark']['total'] / results['duckdb']['total']:.1f}x")
    update(batch_spark_s=round(results["spark"]["total"], 1), batch_duckdb_s=round(results["duckdb"]["total"], 1),
           backfill_spark_s=round(results["spark"]["backfill_total"], 1),
           backfill_duckdb_s=round(results["duckdb"]["backfill_total"], 1))


if __name__ == "__main__":
    main()
