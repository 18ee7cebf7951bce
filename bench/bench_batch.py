"""Batch job on the seed-scale history: Spark (local[2]) vs DuckDB, same computation, same SQL, for the product's
registry and for the card-only one (its three card groups: the registry before the merchant groups).

    .venv/bin/python -m bench.bench_batch [--history data/history_seed.parquet] [--date 2020-05-01]
        [--engines duckdb,spark] [--registries product,card]

For each engine and registry: load the events (keys, arrival order, late marks), one night's snapshots, the full
backfill (every night of the span, one pass; offline writes, no Redis), and the point-in-time training set over
the whole span (written to Parquet). Prints each, with the load average (the machine may be shared). Records, for
the product's registry, `batch_*_s` (load + one night + training set) and `backfill_*_s` (load + every night +
training set).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import tempfile
import time
from pathlib import Path

from batch.engines import build_training_set, dates_between, open_engine, run_snapshots
from bench.results import update
from featurestore.definitions import CARD_AGG_1M, CARD_AGG_1W, CARD_AGG_10M, REGISTRY, Registry

REPO = Path(__file__).resolve().parent.parent
#: The card groups alone (the product's registry before issue 16's merchant and card-spending groups).
CARD_ONLY = Registry(groups=(CARD_AGG_10M, CARD_AGG_1M, CARD_AGG_1W), ratios=REGISTRY.ratios,
                     model_features=REGISTRY.model_features)
REGISTRIES = {"product": REGISTRY, "card": CARD_ONLY}


def run(engine: str, history: Path, day: dt.date, master: str, registry: Registry = REGISTRY) -> dict:
    """One engine's timings (seconds) and the training set's row count."""
    root = Path(tempfile.mkdtemp(prefix=f"bench-batch-{engine}-"))
    try:
        t0 = time.perf_counter()
        eng = open_engine(engine, offline_dir=root, history=history, secret="bench", master=master,
                          registry=registry)
        t1 = time.perf_counter()
        run_snapshots(eng, [day], offline_dir=root)
        t2 = time.perf_counter()
        lo, hi = eng.span
        first = dt.datetime.fromtimestamp(lo / 1000, dt.UTC).date() + dt.timedelta(days=1)
        last = dt.datetime.fromtimestamp(hi / 1000, dt.UTC).date() + dt.timedelta(days=1)
        nights = dates_between(first, last)
        run_snapshots(eng, nights, offline_dir=root)
        t3 = time.perf_counter()
        frame = build_training_set(eng, first - dt.timedelta(days=1), last, root / "training.parquet")
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
    ap.add_argument("--engines", default="duckdb,spark", help="comma-separated: duckdb, spark")
    ap.add_argument("--registries", default="product,card", help="comma-separated: product, card")
    args = ap.parse_args()
    if not args.history.exists():
        raise SystemExit(f"{args.history} missing: run `velocity generate --out {args.history}` first")
    engines, registries = args.engines.split(","), args.registries.split(",")
    unknown = [e for e in engines if e not in ("duckdb", "spark")] + [r for r in registries if r not in REGISTRIES]
    if unknown:
        raise SystemExit(f"unknown engine or registry: {', '.join(unknown)}")
    results = {}
    for name in registries:
        for engine in engines:
            load_avg = os.getloadavg()[0]
            r = run(engine, args.history, args.date, args.master, REGISTRIES[name])
            results[engine, name] = r
            print(f"{engine:7s} {name:7s} load {r['load']:6.1f}s | one night {r['snapshot']:5.1f}s | backfill "
                  f"{r['nights']} nights {r['backfill']:6.1f}s | training set {r['training']:6.1f}s ({r['rows']:,} rows)"
                  f" | nightly total {r['total']:6.1f}s | backfill + training set {r['backfill_total']:6.1f}s "
                  f"(load average {load_avg:.1f} at start)", flush=True)
    if ("spark", "product") in results and ("duckdb", "product") in results:
        print(f"spark / duckdb = {results['spark', 'product']['total'] / results['duckdb', 'product']['total']:.1f}x")
    figures = {}
    for engine in engines:
        if (engine, "product") in results:
            r = results[engine, "product"]
            figures |= {f"batch_{engine}_s": round(r["total"], 1), f"backfill_{engine}_s": round(r["backfill_total"], 1)}
    if figures:
        update(**figures)


if __name__ == "__main__":
    main()
