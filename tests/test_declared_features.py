"""Declarations drive every engine: a test-only registry adds aggregates (a 10-minute max, a 1-minute group, 1-week
min/max/sum) and gets them, equal to the brute-force oracle, in the training set on DuckDB and Spark and in the
online read, without any other module changing."""

from __future__ import annotations

import datetime as dt
import math
import re
import uuid
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.engines import open_engine, run_snapshots
from featurestore.definitions import (
    CARD_AGG_1W,
    CARD_AGG_10M,
    MINUTE_MS,
    REGISTRY,
    Aggregate,
    FeatureGroup,
    Registry,
)
from featurestore.entity import EntityKeyer
from featurestore.offline_sql import training_columns
from featurestore.state import EventWrite
from stores.offline_files import cutoff_ms_of
from stores.redis_online import OnlineStore
from tests import oracle, synthetic

SECRET = "declared-secret"
W = 600_000
DAY = 86_400_000
DAYS = [dt.date(2020, 1, d) for d in range(2, 9)]


def adding(group: FeatureGroup, *aggregates: Aggregate) -> FeatureGroup:
    """`group` with `aggregates` appended, leaving out any the product already declares there."""
    have = set(group.feature_names)
    return replace(group, features=(*group.features, *(a for a in aggregates if a.name not in have)))


EXTENDED = Registry(
    groups=(
        adding(CARD_AGG_10M, Aggregate("max_amt_last_10m", "max")),
        FeatureGroup("card_agg_1m", "card", MINUTE_MS, "stream", 3_600,
                     (Aggregate("num_trans_last_1m", "count"), Aggregate("sum_amt_last_1m", "sum"))),
        adding(CARD_AGG_1W, Aggregate("min_amt_last_1w", "min"), Aggregate("max_amt_last_1w", "max"),
               Aggregate("sum_amt_last_1w", "sum")),
    ),
    ratios=REGISTRY.ratios,
    model_features=(*REGISTRY.model_features, "max_amt_last_10m", "num_trans_last_1m"),
)
NEW = ("max_amt_last_10m", "num_trans_last_1m", "sum_amt_last_1m", "min_amt_last_1w", "max_amt_last_1w",
       "sum_amt_last_1w")


@pytest.fixture(scope="module")
def rows():
    return synthetic.history(n=1200, cards=15, seed=43, mean_gap_ms=300_000, late=8, disorder=30)


def expected(rows) -> dict[str, dict[str, float]]:
    """The oracle's value of every declared feature (stream groups and the visible 1-week snapshot)."""
    arrivals = synthetic.arrivals(rows, EntityKeyer(SECRET))
    w10, w1 = oracle.window_amounts(arrivals, W, W), oracle.window_amounts(arrivals, W, MINUTE_MS)
    cutoffs = [cutoff_ms_of(d) for d in DAYS]
    snaps = {c: oracle.snapshot_amounts(arrivals, c) for c in cutoffs}
    out = {}
    for a in {a.txn_id: a for a in reversed(arrivals)}.values():
        c = oracle.visible_cutoff(a.ts, a.ts, {c: c for c in cutoffs})  # backfilled nights, published on time
        week = snaps[c].get(a.card, []) if c is not None else None
        nan = math.nan
        out[a.txn_id] = {
            "num_trans_last_10m": len(w10[a.txn_id]), "max_amt_last_10m": max(w10[a.txn_id]) / 100.0,
            "num_trans_last_1m": len(w1[a.txn_id]), "sum_amt_last_1m": sum(w1[a.txn_id]) / 100.0,
            "num_trans_last_1w": nan if week is None else float(len(week)),
            "min_amt_last_1w": min(week) / 100.0 if week else nan,
            "max_amt_last_1w": max(week) / 100.0 if week else nan,
            "sum_amt_last_1w": nan if week is None else sum(week) / 100.0,
        }
    return out


def same(a: float, b: float) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def assert_rows_equal(frame, want) -> None:
    assert sorted(frame["txn_id"]) == sorted(want)
    bad = [(r["txn_id"], k, r[k], v) for r in frame.to_dict("records") for k, v in want[r["txn_id"]].items()
           if not same(v, r[k])]
    assert not bad, f"{len(bad)} differences, e.g. {bad[:5]}"


@pytest.fixture(scope="module")
def history_file(rows, tmp_path_factory):
    path = tmp_path_factory.mktemp("declared") / "history.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.unit
def test_schema_comes_from_the_declarations():
    cols = training_columns(EXTENDED)
    assert set(NEW) <= set(cols) and cols.index("max_amt_last_10m") < cols.index("snapshot_cutoff_ms")
    assert training_columns(REGISTRY) == (  # the product's schema: SPEC section 4's, plus the declared extras
        "txn_id", "card", "merchant", "ts", "amount", "fraud_label", "num_trans_last_10m", "avg_amt_last_10m",
        "num_trans_last_1m", "num_trans_last_1w", "avg_amt_last_1w",
        "num_trans_last_1d", "avg_amt_last_1d", "num_trans_last_30d", "avg_amt_last_30d",  # card spending (issue 16)
        *(f"merchant_{s}_{d}d" for d in (1, 7, 30) for s in ("num_trans", "fraud_count", "fraud_rate")),
        "snapshot_cutoff_ms", "hour_of_day",  # the transaction's hour (UTC), an event-time feature
        "amt_ratio1", "amt_ratio2", "count_ratio")
    assert EXTENDED.version != REGISTRY.version
    with pytest.raises(ValueError, match="unique"):
        Registry(groups=(CARD_AGG_10M, replace(CARD_AGG_1W, features=CARD_AGG_10M.features)), ratios=(),
                 model_features=())
    with pytest.raises(ValueError, match="unknown aggregation"):
        Aggregate("x", "median")


@pytest.mark.unit
def test_readme_feature_table_matches_the_declarations():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = dict(re.findall(r"^\| `(\w+)` \| (.+?) \|", readme, flags=re.M))
    for group in REGISTRY.groups:
        for a in group.features:
            assert a.name in table, f"README's feature table lacks {a.name}"
            assert group.name in table[a.name] and a.function in table[a.name], (a.name, table[a.name])
    for r in REGISTRY.ratios:
        assert r.name in table and r.numerator in table[r.name] and r.denominator in table[r.name]
    for e in REGISTRY.event_time:
        assert e.name in table and "event time" in table[e.name], f"README's feature table lacks {e.name}"


@pytest.mark.unit
def test_new_aggregates_on_duckdb_equal_the_oracle(rows, history_file, tmp_path):
    eng = open_engine("duckdb", offline_dir=tmp_path, history=history_file, secret=SECRET, registry=EXTENDED)
    run_snapshots(eng, DAYS, offline_dir=tmp_path)
    frame = eng.training_set(cutoff_ms_of(dt.date(2020, 1, 1)), cutoff_ms_of(dt.date(2020, 2, 1)))
    eng.close()
    assert list(frame.columns) == list(training_columns(EXTENDED))
    assert_rows_equal(frame, expected(rows))
    assert frame["num_trans_last_1m"].max() >= 3 and frame["min_amt_last_1w"].notna().sum() > 100


@pytest.mark.integration
def test_new_aggregates_on_spark_equal_the_oracle(rows, history_file, tmp_path):
    eng = open_engine("spark", offline_dir=tmp_path, history=history_file, secret=SECRET, master="local[2]",
                      registry=EXTENDED)
    run_snapshots(eng, DAYS, offline_dir=tmp_path)
    frame = eng.training_set(cutoff_ms_of(dt.date(2020, 1, 1)), cutoff_ms_of(dt.date(2020, 2, 1)))
    eng.close()
    assert_rows_equal(frame, expected(rows))


@pytest.mark.integration
def test_new_aggregates_online_equal_the_oracle(rows, history_file, tmp_path, redis_settings):
    prefix = f"test:declared:{uuid.uuid4().hex[:8]}"
    store = OnlineStore(redis_settings, prefix=prefix, registry=EXTENDED, retention_ms=60 * DAY)
    keyer = EntityKeyer(SECRET)
    try:
        store.apply_events([EventWrite(keyer(r["cc_num"]), r["txn_id"], r["ts"], round(r["amount"] * 100))
                            for r in rows])
        eng = open_engine("duckdb", offline_dir=tmp_path, history=history_file, secret=SECRET, registry=EXTENDED)
        run_snapshots(eng, DAYS, offline_dir=tmp_path, online=store)
        eng.close()
        want = expected(rows)
        bad = []
        for r in rows:
            got = store.read_features(keyer(r["cc_num"]), r["txn_id"], r["ts"], 0).values
            bad += [(r["txn_id"], k, got[k], v) for k, v in want[r["txn_id"]].items() if not same(v, got[k])]
        assert not bad, f"{len(bad)} differences, e.g. {bad[:5]}"
    finally:
        from stores.redis_online import delete_prefix

        delete_prefix(store.redis, prefix)
        store.close()
