"""The offline SQL against the brute-force oracle on hypothesis-generated streams in arrival order.

Streams mix ties, exact 10-minute edges, out-of-order arrivals within and beyond the allowed lateness, re-sent
txn_ids, and times around day and week cut-offs; snapshots are published at random times after their cut-offs,
so the visibility rule (cut-off <= t and published before the arrival) is exercised too. Every training row must
equal tests/oracle.py. DuckDB runs many cases; Spark (the default engine of `velocity batch`) a few, from the
stream's archive as `velocity batch` reads it.
"""

from __future__ import annotations

import datetime as dt
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch.engines import open_engine, run_snapshots
from stores.archive import ARCHIVE_SCHEMA
from tests import oracle
from tests.oracle import Arrival

W = 600_000
DAY = 86_400_000
WEEK = 7 * DAY
C0 = 1_578_096_000_000  # 2020-01-04 00:00 UTC, a cut-off
ARRIVED_US = 1_764_000_000_000_000
SECRET = "prop-secret"
CARDS = ("a" * 32, "b" * 32, "c" * 32)  # entity keys as the archive holds them

edge = st.sampled_from([0, 1, -1, W, W + 1, -W, -W - 1, 2 * W, DAY - 1, DAY, DAY + 1, -DAY, WEEK - 1, WEEK, WEEK + 1,
                        -WEEK, -WEEK + 1])


@st.composite
def streams(draw):
    """(arrivals, arrival ms of each position, publication delay of each cut-off after day 0)."""
    n = draw(st.integers(1, 40))
    out: list[Arrival] = []
    for i in range(n):
        if out and draw(st.integers(0, 9)) == 0:  # a re-sent txn_id (maybe with other content): first one wins
            prev = draw(st.sampled_from(out))
            out.append(Arrival(prev.card, prev.txn_id, prev.ts + draw(st.sampled_from([0, 5])), prev.amount_cents))
            continue
        anchor = draw(st.sampled_from([C0, C0 + DAY, C0 + 2 * DAY])) if not out or draw(st.booleans()) \
            else draw(st.sampled_from(out)).ts
        ts = anchor + draw(st.one_of(edge, st.integers(-3 * W, 3 * W)))
        out.append(Arrival(draw(st.sampled_from(CARDS)), f"x{i}", ts, draw(st.integers(1, 200_000))))
    # Arrival times: the worker's clock when each message arrived, increasing, sometimes around a publication.
    gaps = draw(st.lists(st.integers(1, 3 * 3_600_000), min_size=n, max_size=n))
    start = draw(st.sampled_from([C0 - DAY, C0, C0 + 2 * 3_600_000, C0 + DAY + 3_600_000]))
    arrived, t = [], start
    for g in gaps:
        t += g
        arrived.append(t)
    delays = draw(st.lists(st.sampled_from([0, 1, 3_600_000, 5 * 3_600_000, 2 * DAY]), min_size=4, max_size=4))
    return out, arrived, delays


def archive_table(arrivals: list[Arrival], arrived: list[int]) -> pa.Table:
    """What the worker archives: every arrival (re-sends with the first copy's position), with late flags."""
    first = {r.txn_id: r for r in oracle.window_10m(arrivals, W)}
    recs = []
    for i, a in enumerate(arrivals):
        o = first[a.txn_id]
        seq = arrived[o.position] * 1000 + o.position % 1000  # the worker's clock in us, strictly increasing
        recs.append({"txn_id": a.txn_id, "card": a.card, "pan_last4": "0000", "amount": a.amount_cents / 100,
                     "amount_cents": a.amount_cents, "ts": a.ts, "merchant": "m", "category": "c",
                     "fraud_label": 0, "late": o.late, "seq": seq, "partition": 0, "offset": i,
                     "archived_ms": arrived[i]})
    return pa.Table.from_pylist(recs, schema=ARCHIVE_SCHEMA)


def days_to_snapshot(arrivals: list[Arrival]) -> list[dt.date]:
    lo, hi = min(a.ts for a in arrivals), max(a.ts for a in arrivals)
    first, last = lo // DAY + 1, hi // DAY + 1
    return [dt.date(1970, 1, 1) + dt.timedelta(days=d) for d in range(first, min(last, first + 3) + 1)]


PANS = {"a" * 32: "4539578763621486", "b" * 32: "4716108999716531", "c" * 32: "4024007198964305"}


def history_file(arrivals: list[Arrival], root) -> tuple[list[Arrival], object]:
    """A history file (unique txn_ids, PANs) whose row order is the stream order; its rows arrive at their ts."""
    from featurestore.entity import entity_key

    seen, rows = set(), []
    for a in arrivals:
        if a.txn_id not in seen:
            seen.add(a.txn_id)
            rows.append({"txn_id": a.txn_id, "cc_num": PANS[a.card], "amount": a.amount_cents / 100, "ts": a.ts,
                         "merchant": "m", "category": "c", "fraud_label": 0})
    path = root / "history.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    keyed = [Arrival(entity_key(r["cc_num"], SECRET), r["txn_id"], r["ts"], round(r["amount"] * 100)) for r in rows]
    return keyed, path


def check(engine_name: str, arrivals, arrived, delays, root, source: str = "archive") -> None:
    if source == "archive":
        day_dir = root / "archive" / "date=2020-01-01"
        day_dir.mkdir(parents=True)
        pq.write_table(archive_table(arrivals, arrived), day_dir / "part-0.parquet")
        history = None
    else:
        arrivals, history = history_file(arrivals, root)
        arrived = [a.ts for a in arrivals]
    days = days_to_snapshot(arrivals)
    published = {}
    for i, d in enumerate(days):
        c = (d - dt.date(1970, 1, 1)).days * DAY
        published[c] = c + delays[i % len(delays)]
    eng = open_engine(engine_name, offline_dir=root, history=history, secret=SECRET, master="local[2]")
    try:
        # quality=None: a random stream's quiet days give the 1-day groups nights of 0 cards, which the quality
        # gate refuses as an outage (its own tests: test_quality_gate.py); here the values are what is checked
        run_snapshots(eng, days, offline_dir=root, quality=None,
                      published=lambda d: published[(d - dt.date(1970, 1, 1)).days * DAY])
        frame = eng.training_set(min(a.ts for a in arrivals) - 1, max(a.ts for a in arrivals) + 1)
    finally:
        eng.close()
    rows = oracle.window_10m(arrivals, W)
    snaps = {c: oracle.snapshot_1w(arrivals, c) for c in published}
    got = frame.set_index("txn_id")
    assert sorted(got.index) == sorted(r.txn_id for r in rows)
    for r in rows:
        g = got.loc[r.txn_id]
        assert (int(g["num_trans_last_10m"]), g["avg_amt_last_10m"]) == (r.count, r.sum_cents / (100.0 * r.count)), r
        c = oracle.visible_cutoff(r.ts, arrived[r.position], published)
        assert (None if pd.isna(g["snapshot_cutoff_ms"]) else int(g["snapshot_cutoff_ms"])) == c, (r, published)
        n, cents = snaps[c].get(r.card, (0, 0)) if c is not None else (math.nan, 0)
        assert g["num_trans_last_1w"] == n or (math.isnan(n) and math.isnan(g["num_trans_last_1w"])), r
        avg = cents / (100.0 * n) if c is not None and n else math.nan
        for name, want in (("avg_amt_last_1w", avg), ("count_ratio", oracle.ratio(r.count, n)),
                           ("amt_ratio2", oracle.ratio(r.amount_cents / 100, avg))):
            assert (math.isnan(want) and math.isnan(g[name])) or math.isclose(g[name], want, rel_tol=1e-12), (name, r)


@pytest.mark.unit
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=streams())
def test_duckdb_training_rows_equal_the_oracle(tmp_path_factory, data):
    arrivals, arrived, delays = data
    check("duckdb", arrivals, arrived, delays, tmp_path_factory.mktemp("prop"))


@pytest.mark.unit
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=streams())
def test_duckdb_from_a_history_file_marks_late_rows_like_the_worker(tmp_path_factory, data):
    arrivals, arrived, delays = data
    check("duckdb", arrivals, arrived, delays, tmp_path_factory.mktemp("hprop"), source="history")


@pytest.mark.integration
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=streams())
def test_spark_archive_loader_and_sql_equal_the_oracle(tmp_path_factory, data):
    arrivals, arrived, delays = data
    check("spark", arrivals, arrived, delays, tmp_path_factory.mktemp("sprop"))
