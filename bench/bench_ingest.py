"""Seed-scale generation time and replay rate.

    .venv/bin/python -m bench.bench_ingest [--replay-rows 1000000] [--workers 2]

Generation: `velocity generate` defaults (10,000 cards, 152 days, ~5.4M rows, 0.25% fraud), including Parquet
writing. Replay: the first N rows of that file into a fresh 4-partition topic at --speed max.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from pathlib import Path

from bench.results import update
from ingest.generate import GenerateConfig, generate_history, write_history
from ingest.replay import replay_table
from stores.history import load_history

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replay-rows", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "data" / "history_seed.parquet")
    args = ap.parse_args()

    t0 = time.perf_counter()
    hist = generate_history(GenerateConfig())
    write_history(hist.table, args.out)
    gen_s = time.perf_counter() - t0
    s = hist.summary
    print(f"generate: {gen_s:.1f}s for {s['rows']:,} rows, {s['cards']:,} cards, fraud {s['fraud_rate']:.3%} "
          f"in {s['chains']:,} chains -> {args.out}")

    table = load_history(args.out)
    topic = f"bench.replay.{uuid.uuid4().hex[:8]}"
    stats = replay_table(table, bootstrap=os.environ.get("VELOCITY_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
                         topic=topic, secret="bench", limit=args.replay_rows, workers=args.workers)
    print(f"replay: {stats.tps:,.0f} msg/s ({stats.sent:,} sent, {stats.failed} failed, {stats.elapsed_s:.1f}s, "
          f"{args.workers} producer processes, acks=all, idempotent, lz4)")
    update(generate_seed_scale_s=round(gen_s, 1), replay_tps=round(stats.tps))


if __name__ == "__main__":
    main()
