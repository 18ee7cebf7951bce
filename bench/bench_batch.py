"""Batch job on the seed-scale history: Spark (local[2]) vs DuckDB, same computation, same SQL.

    .venv/bin/python -m bench.bench_batch [--history data/history_seed.parquet] [--date 2020-05-01]

For each engine: load + dedupe the events, one night's `card_agg_1w` snapshot (offline write, no Redis), and
the point-in-time training set over the whole span (write to Parquet). Records the totals.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import tempfile
import time
from pathlib import Path

from batch.jobs import build_training_set, open_engine, run_snapshots
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
        frame = build_training_set(eng, dt.date(2020, 1, 1), dt.date(2020, 6, 1), root / "training.parquet")
        t3 = time.perf_counter()
        eng.close()
        rows = frame if isinstance(frame, int) else len(frame)
        return {"load": t1 - t0, "snapshot": t2 - t1, "training": t3 - t2, "total": t3 - t0, "rows": rows}
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
        print(f"{engine:7s} load {r['load']:6.1f}s | snapshot {r['snapshot']:6.1f}s | training set {r['training']:6.1f}s"
              f" ({r['rows']:,} rows) | total {r['total']:6.1f}s")
    print(f"spark / duckdb = {results['spark']['total'] / results['duckdb']['total']:.1f}x")
    update(batch_spark_s=round(results["spark"]["total"], 1), batch_duckdb_s=round(results["duckdb"]["total"], 1))


if __name__ == "__main__":
    main()
