"""Batch and offline store: oracle equality, Spark == DuckDB, idempotent reruns, as-of joins, Redis, errors."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.jobs import open_engine, run_snapshots
from featurestore.archive import ARCHIVE_SCHEMA
from featurestore.entity import EntityKeyer
from featurestore.offline import OfflineError, cutoff_ms_of, read_snapshots
from featurestore.ratios import compute_ratios
from featurestore.windows import mean_amount, naive_window_features, to_cents
from tests import synthetic

SECRET = "batch-test-secret"
W = 600_000
DAY = 86_400_000
DAYS = [dt.date(2020, 1, d) for d in range(2, 11)]


@pytest.fixture(scope="module")
def rows():
    """~14 days of one stream: bursts, ties, exact 10-minute edges, out-of-order and late rows."""
    return synthetic.history(n=2500, cards=30, seed=31, mean_gap_ms=450_000, late=12, disorder=40)


def history_rows(rows):
    """A history file is sorted by ts and has no duplicates (stable sort keeps tie order)."""
    return sorted(rows, key=lambda r: r["ts"])


@pytest.fixture(scope="module")
def history_file(rows, tmp_path_factory):
    path = tmp_path_factory.mktemp("hist") / "history.parquet"
    pq.write_table(pa.Table.from_pylist(history_rows(rows)), path)
    return path


def write_archive(rows, root, keyer, with_duplicates=True):
    """Archive files as the stream writes them: late flags, Kafka offsets, and redelivered duplicates."""
    oracle = {r.txn_id: r for r in naive_window_features(synthetic.arrivals(rows, keyer), W, W)}
    recs = []
    for i, r in enumerate(rows):
        o = oracle[r["txn_id"]]
        recs.append({"txn_id": r["txn_id"], "card": keyer(r["cc_num"]), "amount": r["amount"],
                     "amount_cents": to_cents(r["amount"]), "ts": r["ts"], "merchant": r["merchant"],
                     "category": r["category"], "fraud_label": r["fraud_label"], "late": o.late, "partition": 0,
                     "offset": i, "archived_ms": 0})
    if with_duplicates:
        recs += recs[100:140]  # a restarted worker archived these twice
    table = pa.Table.from_pylist(recs, schema=ARCHIVE_SCHEMA)
    day_dir = root / "archive" / "date=2020-01-01"
    day_dir.mkdir(parents=True)
    pq.write_table(table.slice(0, 1500), day_dir / "part-a.parquet")
    pq.write_table(table.slice(1500), day_dir / "part-b.parquet")


def expected_rows(rows, keyer, cutoffs):
    """Oracle training rows: 10-minute window from the brute-force oracle, 1-week snapshot by brute force."""
    oracle = naive_window_features(synthetic.arrivals(rows, keyer), W, W)
    on_time = [r for r in oracle if not r.late]
    out = {}
    for r in oracle:
        past = [c for c in cutoffs if c <= r.ts]
        if past:
            c = max(past)
            week = [e for e in on_time if e.card == r.card and c - 7 * DAY <= e.ts < c]
            n1, s1 = float(len(week)), sum(e.amount_cents for e in week)
            avg1 = mean_amount(len(week), s1)
        else:
            c, n1, avg1 = None, math.nan, math.nan
        vals = {"amount": r.amount_cents / 100, "num_trans_last_10m": r.count, "avg_amt_last_10m": r.average,
                "num_trans_last_1w": n1, "avg_amt_last_1w": avg1}
        out[r.txn_id] = {**vals, **compute_ratios(vals), "snapshot_cutoff_ms": c}
    return out


def assert_frame_matches(frame: pd.DataFrame, expected: dict) -> None:
    assert sorted(frame["txn_id"]) == sorted(expected)
    bad = []
    for row in frame.itertuples(index=False):
        want = expected[row.txn_id]
        for col, value in want.items():
            got = getattr(row, col)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                ok = got is None or pd.isna(got)
            elif isinstance(value, float):
                ok = math.isclose(got, value, rel_tol=1e-12, abs_tol=0)
            else:
                ok = got == value
            if not ok:
                bad.append((row.txn_id, col, got, value))
    assert not bad, f"{len(bad)} mismatches, e.g. {bad[:5]}"


@pytest.mark.integration
@pytest.mark.parametrize("source", ["history", "archive"])
def test_training_set_equals_oracle_for_every_row(rows, history_file, tmp_path, source):
    keyer = EntityKeyer(SECRET)
    if source == "archive":
        write_archive(rows, tmp_path, keyer)
        data, history = rows, None
    else:
        data, history = history_rows(rows), history_file
    eng = open_engine("duckdb", offline_dir=tmp_path, history=history, secret=SECRET)
    run_snapshots(eng, DAYS, offline_dir=tmp_path)
    frame = eng.training_set(cutoff_ms_of(dt.date(2020, 1, 1)), cutoff_ms_of(dt.date(2020, 2, 1)))
    eng.close()
    assert_frame_matches(frame, expected_rows(data, keyer, [cutoff_ms_of(d) for d in DAYS]))
    if source == "archive":
        assert frame["num_trans_last_10m"].max() >= 4 and frame["snapshot_cutoff_ms"].isna().any()


@pytest.mark.integration
def test_snapshot_equals_brute_force_and_rerun_is_idempotent(rows, history_file, tmp_path, online_store):
    keyer = EntityKeyer(SECRET)
    eng = open_engine("duckdb", offline_dir=tmp_path, history=history_file, secret=SECRET)
    days = DAYS[3:6]
    run_snapshots(eng, days, offline_dir=tmp_path, online=online_store)
    first = {p: pd.read_parquet(p) for p in read_snapshots(tmp_path)}
    run_snapshots(eng, days, offline_dir=tmp_path, online=online_store)  # rerun
    eng.close()
    again = {p: pd.read_parquet(p) for p in read_snapshots(tmp_path)}
    assert list(first) == list(again) and len(first) == len(days)
    assert all(first[p].equals(again[p]) for p in first)
    assert len(list(tmp_path.rglob("*.parquet"))) == len(days)  # replaced, not duplicated
    data = history_rows(rows)
    for day, path in zip(days, sorted(first), strict=True):
        c = cutoff_ms_of(day)
        want: dict[str, list[int]] = {}
        for r in data:
            if c - 7 * DAY <= r["ts"] < c:
                want.setdefault(keyer(r["cc_num"]), []).append(to_cents(r["amount"]))
        snap = first[path].set_index("card")
        assert set(snap.index) == set(want)
        for card, cents in want.items():
            assert snap.loc[card, "num_trans_last_1w"] == len(cents)
            assert snap.loc[card, "sum_cents_last_1w"] == sum(cents)
            assert snap.loc[card, "avg_amt_last_1w"] == mean_amount(len(cents), sum(cents))
            # The online store serves the same snapshot (as of a moment just after the cut-off).
            f = online_store.read_features(card, "probe", c + 1, 100)
            assert (f.num_trans_last_1w, f.sum_cents_last_1w, f.snapshot_cutoff_ms) == (len(cents), sum(cents), c)
    assert online_store.snapshot_cutoffs() == [cutoff_ms_of(d) for d in days]


@pytest.mark.integration
def test_as_of_join_takes_latest_cutoff_at_or_before_t(tmp_path):
    day1, day3 = dt.date(2020, 1, 2), dt.date(2020, 1, 4)
    c1, c3 = cutoff_ms_of(day1), cutoff_ms_of(day3)
    pan = "4539578763621486"
    base = {"cc_num": pan, "merchant": "m", "category": "c", "fraud_label": 0}
    times = [c1 - DAY, c1 - 1, c1, c1 + DAY, c3 - 1, c3, c3 + 5]
    recs = [{**base, "txn_id": f"t{i}", "amount": 10.0 * (i + 1), "ts": t} for i, t in enumerate(times)]
    path = tmp_path / "h.parquet"
    pq.write_table(pa.Table.from_pylist(recs), path)
    eng = open_engine("duckdb", offline_dir=tmp_path, history=path, secret=SECRET)
    run_snapshots(eng, [day1, day3], offline_dir=tmp_path)  # no snapshot for the day in between
    frame = eng.training_set(c1 - DAY, c3 + DAY).set_index("txn_id")
    eng.close()
    assert frame["snapshot_cutoff_ms"].tolist()[:2] == [pd.NA, pd.NA] or frame["snapshot_cutoff_ms"].iloc[:2].isna().all()
    assert frame.loc[["t2", "t3", "t4"], "snapshot_cutoff_ms"].tolist() == [c1, c1, c1]
    assert frame.loc[["t5", "t6"], "snapshot_cutoff_ms"].tolist() == [c3, c3]
    assert frame.loc["t2", "num_trans_last_1w"] == 2  # t0, t1 are in [c1 - 7d, c1)
    assert frame.loc["t5", "num_trans_last_1w"] == 5  # t0..t4


@pytest.mark.integration
def test_errors_are_clear_and_write_nothing(history_file, tmp_path):
    with pytest.raises(OfflineError, match="no such file"):
        open_engine("duckdb", offline_dir=tmp_path, history=tmp_path / "missing.parquet", secret=SECRET)
    with pytest.raises(OfflineError, match="no archived transactions"):
        open_engine("duckdb", offline_dir=tmp_path, history=None, secret=SECRET)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist(history_rows(synthetic.history(n=50, disorder=0, late=0))).slice(0, 0), empty)
    with pytest.raises(OfflineError, match="no rows"):
        open_engine("duckdb", offline_dir=tmp_path, history=empty, secret=SECRET)
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"txn_id": ["a"], "cc_num": ["4539578763621486"], "amount": ["12"], "ts": [1],
                             "merchant": ["m"], "category": ["c"]}), wrong)
    with pytest.raises(OfflineError, match="amount should be number"):
        open_engine("duckdb", offline_dir=tmp_path, history=wrong, secret=SECRET)
    eng = open_engine("duckdb", offline_dir=tmp_path, history=history_file, secret=SECRET)
    with pytest.raises(OfflineError, match="no transactions in the week before 2021-06-01"):
        run_snapshots(eng, [dt.date(2020, 1, 5), dt.date(2021, 6, 1)], offline_dir=tmp_path)
    eng.close()
    assert read_snapshots(tmp_path) == [], "a failing backfill writes nothing"


@pytest.fixture(scope="module")
def spark_and_duckdb(rows, history_file, tmp_path_factory):
    out = {}
    for name in ("duckdb", "spark"):
        root = tmp_path_factory.mktemp(name)
        eng = open_engine(name, offline_dir=root, history=history_file, secret=SECRET, master="local[2]")
        run_snapshots(eng, DAYS, offline_dir=root)
        a, b = cutoff_ms_of(dt.date(2020, 1, 1)), cutoff_ms_of(dt.date(2020, 2, 1))
        out[name] = (root, eng.training_set(a, b))
        if eng.write_training_set is not None:  # Spark's distributed writer must produce the same rows
            eng.write_training_set(a, b, root / "written.parquet")
            written = pd.read_parquet(root / "written.parquet").sort_values(["ts", "card", "txn_id"])
            out["spark_written"] = written.reset_index(drop=True)
        eng.close()
    return out


@pytest.mark.integration
def test_spark_and_duckdb_agree_row_for_row(spark_and_duckdb):
    (droot, dframe), (sroot, sframe) = spark_and_duckdb["duckdb"], spark_and_duckdb["spark"]
    pd.testing.assert_frame_equal(dframe, sframe, check_exact=False, rtol=1e-9, atol=0)
    dsnaps, ssnaps = read_snapshots(droot), read_snapshots(sroot)
    assert [p.relative_to(droot) for p in dsnaps] == [p.relative_to(sroot) for p in ssnaps]
    for a, b in zip(dsnaps, ssnaps, strict=True):
        pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b), check_exact=False, rtol=1e-9, atol=0)
    as_float = {"snapshot_cutoff_ms": "float64", "fraud_label": "float64"}  # nullable ints vs Parquet's types
    pd.testing.assert_frame_equal(dframe.astype(as_float), spark_and_duckdb["spark_written"].astype(as_float),
                                  check_exact=False, rtol=1e-9, atol=0, check_dtype=False)
    assert np.isfinite(dframe["amt_ratio1"]).sum() > 100  # the comparison covered real values, not only NaNs
