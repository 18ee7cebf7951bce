"""bench/results.json: the latest figure for each SPEC section 10 target; each bench script updates its own keys."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.json"
KEYS = (
    "generate_seed_scale_s", "replay_tps", "stream_tps", "stream_freshness_p99_ms_at_5k", "batch_spark_s",
    "batch_duckdb_s", "backfill_duckdb_s", "backfill_spark_s", "stream_redis_ceiling_tps", "stream_vs_redis_ceiling",
    "score_p99_ms_at_500rps", "score_max_rps_p99_10ms", "model_test_aucpr", "model_baseline_aucpr",
    "model_test_aucpr_by_kind", "stream_tps_with_scoring", "soak_rss_growth_mb_worker", "soak_rss_growth_mb_api",
    "soak_errors", "stream_scaleout", "stream_scaleout_cluster",
)


def load() -> dict:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    return {k: data.get(k) for k in KEYS}


def update(**figures: float | None) -> dict:
    unknown = set(figures) - set(KEYS)
    if unknown:
        raise KeyError(f"not a bench/results.json key: {sorted(unknown)}")
    data = load()
    data.update(figures)
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    return data
