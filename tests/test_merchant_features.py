"""Issue 16, offline: the merchant and card-spending snapshots and their point-in-time training columns equal the
brute-force oracle (tests/oracle.py, written from the issue's words), on DuckDB and on Spark alike.

Covered on purpose: labels known only after a cut-off (excluded from it), re-labels (the latest version wins, fraud
wins a tie), labels from both sources (the label store and a history's inline `labeled_at`), a merchant absent
on a night, the exact 1/7/30-day window edges (ts = C - window is in, ts = C is out), a late-published night, and
a history without any label."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.engines import open_engine, run_snapshots
from featurestore.definitions import REGISTRY_WITH_MERCHANT, FeatureGroup
from featurestore.entity import EntityKeyer
from stores.labels import write_labels
from stores.offline_files import cutoff_ms_of, read_snapshots
from tests import oracle
from tests.synthetic import luhn_pan

SECRET = "merchant-test-secret"
DAY = 86_400_000
HOUR = 3_600_000
START = dt.date(2020, 1, 1)
NIGHTS = [START + dt.timedelta(days=d) for d in range(1, 46)]
EDGE_NIGHT = START + dt.timedelta(days=40)  # the night of the hand-made edge cases
LATE_NIGHT = START + dt.timedelta(days=35)  # published at 03:00, not at its cut-off
REG = REGISTRY_WITH_MERCHANT


def ms(day: dt.date, hours: float = 0) -> int:
    return cutoff_ms_of(day) + int(hours * HOUR)


def build_history(seed: int = 5):
    """(history rows, label-store versions): random traffic over 45 days plus hand-made cases."""
    rng = np.random.default_rng(seed)
    pans = [luhn_pan(rng) for _ in range(8)]
    merchants = [f"m{i}" for i in range(6)]
    rows, store = [], []
    t0 = ms(START)
    for i in range(900):
        ts = t0 + int(rng.integers(0, 45 * DAY))
        row = {"txn_id": f"r{i}", "cc_num": pans[int(rng.integers(len(pans)))],
               "amount": float(rng.integers(100, 9000)) / 100, "ts": ts, "merchant": merchants[int(rng.integers(len(merchants)))], "category": "c", "fraud_label": 0,
               "labeled_at": None}
        u = rng.random()
        if u < 0.08:  # labeled inline, known some days later
            row["fraud_label"], row["labeled_at"] = 1, ts + int(rng.integers(0, 20 * DAY))
        elif u < 0.14:  # the label store: a fraud verdict, sometimes reversed later, sometimes a same-time tie
            first = ts + int(rng.integers(0, 15 * DAY))
            store.append({"txn_id": row["txn_id"], "fraud_label": 1, "labeled_at": first})
            v = rng.random()
            if v < 0.4:
                later = first + int(rng.integers(1, 10 * DAY))
                store.append({"txn_id": row["txn_id"], "fraud_label": 0, "labeled_at": later})
            elif v < 0.6:
                store.append({"txn_id": row["txn_id"], "fraud_label": 0, "labeled_at": first})
        rows.append(row)
    c = ms(EDGE_NIGHT)
    edge = {"cc_num": pans[0], "category": "c", "fraud_label": 0, "labeled_at": None}
    # Window edges at merchant "edge": ts = C - 1/7/30 days are in the 1/7/30-day windows, ts = C is out.
    for name, ts in (("e1", c - DAY), ("e7", c - 7 * DAY), ("e30", c - 30 * DAY), ("e0", c)):
        rows.append({**edge, "txn_id": name, "ts": ts, "amount": 10.0, "merchant": "edge"})
    # Labels at merchant "lab", for night C: known at C (in), known 1 ms after C (out), re-labeled 0 (out), a tie
    # between fraud and not fraud at the same labeled_at (in: fraud wins).
    for name in ("known", "after", "relabeled", "tie"):
        rows.append({**edge, "txn_id": name, "ts": c - 2 * DAY, "amount": 20.0, "merchant": "lab"})
    store += [{"txn_id": "known", "fraud_label": 1, "labeled_at": c},
              {"txn_id": "after", "fraud_label": 1, "labeled_at": c + 1},
              {"txn_id": "relabeled", "fraud_label": 1, "labeled_at": c - DAY},
              {"txn_id": "relabeled", "fraud_label": 0, "labeled_at": c - HOUR},
              {"txn_id": "tie", "fraud_label": 0, "labeled_at": c - HOUR},
              {"txn_id": "tie", "fraud_label": 1, "labeled_at": c - HOUR}]
    # A merchant seen early and once more much later: absent from every window of the late night.
    rows.append({**edge, "txn_id": "rare-early", "ts": ms(START, 5), "amount": 5.0, "merchant": "rare"})
    rows.append({**edge, "txn_id": "rare-late", "ts": c + 2 * HOUR, "amount": 5.0, "merchant": "rare"})
    # Transactions in the late-published night's first hours: they cannot see it yet.
    for h in (1, 2, 4):
        rows.append({**edge, "txn_id": f"late-pub-{h}", "ts": ms(LATE_NIGHT, h), "amount": 7.0, "merchant": "m1"})
    rows.sort(key=lambda r: r["ts"])
    return rows, store


def write_history(rows, path, inline_labels: bool = True):
    table = pa.Table.from_pylist(rows)
    if not inline_labels:
        table = table.drop(["labeled_at"])
    else:
        table = table.set_column(table.column_names.index("labeled_at"), "labeled_at",
                                 pa.array([r["labeled_at"] for r in rows], pa.int64()))
    if path.suffix == ".csv":  # columns by header name, labeled_at empty where never labeled
        from pyarrow import csv as pacsv

        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


def oracle_inputs(rows, store, keyer, inline_labels: bool = True):
    txns = [oracle.Txn(r["txn_id"], keyer(r["cc_num"]), r["merchant"], r["ts"], round(r["amount"] * 100))
            for r in rows]
    labels: dict[str, list[tuple[int, int]]] = {}
    for v in store:
        labels.setdefault(v["txn_id"], []).append((v["fraud_label"], v["labeled_at"]))
    if inline_labels:
        for r in rows:
            if r["labeled_at"] is not None:
                labels.setdefault(r["txn_id"], []).append((r["fraud_label"], r["labeled_at"]))
    return txns, labels


KIND = {("count", "amount"): "count", ("mean", "amount"): "mean", ("sum", "known_fraud"): "fraud_count",
        ("mean", "known_fraud"): "fraud_rate"}


def group_oracle(g: FeatureGroup, txns, labels, cutoff_ms: int) -> dict[str, dict[str, float]]:
    return oracle.entity_window(txns, cutoff_ms, g.window_ms // DAY, g.entity, labels)


def same(a, b) -> bool:
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or pd.isna(b)
    return b is not None and not pd.isna(b) and math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0)


@pytest.fixture(scope="module")
def data():
    return build_history()


@pytest.fixture(scope="module")
def duckdb_run(data, tmp_path_factory):
    """A 45-night backfill with the night LATE_NIGHT published at 03:00, and the training set, on DuckDB."""
    rows, store = data
    root = tmp_path_factory.mktemp("merchant-duckdb")
    write_labels(root, store)
    history = write_history(rows, root / "history.parquet")
    eng = open_engine("duckdb", offline_dir=root, history=history, secret=SECRET, registry=REG)
    assert eng.registry is REG
    nights = as_frames(eng.snapshots(NIGHTS))
    run_snapshots(eng, NIGHTS, offline_dir=root, published=published_at)
    frame = eng.training_set(ms(START), ms(START + dt.timedelta(days=47)))
    eng.close()
    return root, nights, frame


def as_frames(nights):
    """An engine's nights (Arrow tables per group) as pandas frames, for the oracle comparisons."""
    return [(day, {name: table.to_pandas() for name, table in tables.items()}) for day, tables in nights]


def published_at(day: dt.date) -> int:
    return ms(day, 3) if day == LATE_NIGHT else ms(day)


@pytest.mark.unit
def test_snapshots_of_every_group_and_night_equal_the_oracle(data, duckdb_run):
    rows, store = data
    txns, labels = oracle_inputs(rows, store, EntityKeyer(SECRET))
    root, nights, _ = duckdb_run
    assert [d for d, _ in nights] == NIGHTS
    bad, checked = [], 0
    for day, frames in nights:
        assert set(frames) == {g.name for g in REG.batch_groups}
        for g in REG.batch_groups:
            want = group_oracle(g, txns, labels, cutoff_ms_of(day))
            got = frames[g.name].set_index(g.entity_column)
            assert set(got.index) == set(want), (g.name, day)
            stats = {"n": "count", "s": "sum_cents", "f": "fraud_count"}
            for key, agg in want.items():
                for stat in g.stats:
                    checked += 1
                    if got.loc[key, stats[stat]] != agg[stats[stat]]:
                        bad.append((g.name, day, key, stats[stat], got.loc[key, stats[stat]], agg[stats[stat]]))
                values = oracle.window_features(agg, True)
                for a in g.features:
                    if not same(values[KIND[a.function, a.column]], got.loc[key, a.name]):
                        bad.append((g.name, day, key, a.name, got.loc[key, a.name], values[KIND[a.function, a.column]]))
    assert not bad, f"{len(bad)} differences, e.g. {bad[:5]}"
    assert checked > 2000
    # The files hold the same, one per group and night, with the night's shared publication time.
    for g in REG.batch_groups:
        files = read_snapshots(root, g.name)
        assert len(files) == len(NIGHTS)
        late = pd.read_parquet(files[NIGHTS.index(LATE_NIGHT)])
        assert (late["published_ms"] == published_at(LATE_NIGHT)).all()


@pytest.mark.unit
def test_scattered_nights_run_alone_equal_the_oracle(data, tmp_path):
    """Nights asked for one by one, with gaps (not a whole range), read the same windows: a window's count and sums
    are differences of running totals over a calendar that reaches a whole window back from each night."""
    rows, store = data
    txns, labels = oracle_inputs(rows, store, EntityKeyer(SECRET))
    write_labels(tmp_path, store)
    history = write_history(rows, tmp_path / "history.parquet")
    eng = open_engine("duckdb", offline_dir=tmp_path, history=history, secret=SECRET, registry=REG)
    scattered = [NIGHTS[0], NIGHTS[6], NIGHTS[29], EDGE_NIGHT, NIGHTS[-1]]
    try:
        nights = as_frames(eng.snapshots(scattered))
        alone = as_frames(eng.snapshots([EDGE_NIGHT]))
        apart = as_frames(eng.snapshots([NIGHTS[0], NIGHTS[-1]]))  # further apart than the longest window: two calendar runs
    finally:
        eng.close()
    assert [d for d, _ in nights] == scattered
    checked = 0
    for day, frames in [*nights, *alone, *apart]:
        for g in REG.batch_groups:
            want = group_oracle(g, txns, labels, cutoff_ms_of(day))
            got = frames[g.name].set_index(g.entity_column)
            assert set(got.index) == set(want), (g.name, day)
            for key, agg in want.items():
                for stat, column in (("n", "count"), ("s", "sum_cents"), ("f", "fraud_count")):
                    if stat in g.stats:
                        checked += 1
                        assert got.loc[key, column] == agg[column], (g.name, day, key, column)
    assert checked > 300


@pytest.mark.unit
def test_the_calendar_holds_each_nights_longest_window_and_nothing_between_distant_nights():
    from featurestore.batch_sql import calendar_days

    longest = max(g.window_ms for g in REG.batch_groups) // DAY  # 30 days: merchant_agg_30d
    assert calendar_days([100, 140, 102], REG) == [*range(100 - longest, 103), *range(140 - longest, 141)]
    assert calendar_days([], REG) == []
    far = calendar_days([0, 3_000_000], REG)  # two nights ~8,000 years apart: two windows, not every day between
    assert far == [*range(-longest, 1), *range(3_000_000 - longest, 3_000_001)]


@pytest.mark.unit
def test_hand_made_cases_edges_labels_and_absence(duckdb_run):
    """The oracle's answers for the hand-made cases, spelled out."""
    _, nights, _ = duckdb_run
    frames = dict(nights)[EDGE_NIGHT]
    m = {g: frames[g].set_index("merchant") for g in ("merchant_agg_1d", "merchant_agg_7d", "merchant_agg_30d")}
    assert [int(m[g].loc["edge", "count"]) for g in m] == [1, 2, 3]  # C - 1d / C - 7d / C - 30d in, C out
    lab = m["merchant_agg_7d"].loc["lab"]
    assert (lab["count"], lab["fraud_count"]) == (4, 2)  # "known" (labeled_at = C) and "tie"; not "after", "relabeled"
    assert lab["merchant_fraud_rate_7d"] == 0.5
    assert "rare" not in m["merchant_agg_30d"].index  # absent: its only transaction is 35 days old
    after = dict(nights)[EDGE_NIGHT + dt.timedelta(days=1)]["merchant_agg_7d"].set_index("merchant")
    assert after.loc["lab", "fraud_count"] == 3  # one day later "after" is known


@pytest.mark.unit
def test_training_set_batch_columns_equal_the_oracle_as_of_join(data, duckdb_run):
    rows, store = data
    keyer = EntityKeyer(SECRET)
    txns, labels = oracle_inputs(rows, store, keyer)
    _, _, frame = duckdb_run
    published = {cutoff_ms_of(d): published_at(d) for d in NIGHTS}
    windows = {(g.name, c): group_oracle(g, txns, labels, c) for g in REG.batch_groups for c in published}
    assert list(frame.columns[:3]) == ["txn_id", "card", "merchant"]
    assert [c for c in frame.columns if c in REG.all_features] == [c for c in REG.all_features if c in frame.columns]
    got = frame.set_index("txn_id")
    assert sorted(got.index) == sorted(t.txn_id for t in txns)
    bad = []
    for t in txns:
        c = oracle.visible_cutoff(t.ts, t.ts, published)  # a history's rows arrive at their event time
        for g in REG.batch_groups:
            agg = windows[g.name, c].get(getattr(t, g.entity)) if c is not None else None
            values = oracle.window_features(agg, c is not None)
            for a in g.features:
                if not same(values[KIND[a.function, a.column]], got.loc[t.txn_id, a.name]):
                    bad.append((t.txn_id, a.name, got.loc[t.txn_id, a.name], values[KIND[a.function, a.column]]))
    assert not bad, f"{len(bad)} differences, e.g. {bad[:5]}"
    # Visibility: before 03:00 the late-published night is not used, after it is.
    late_c = cutoff_ms_of(LATE_NIGHT)
    assert got.loc["late-pub-1", "snapshot_cutoff_ms"] == late_c - DAY
    assert got.loc["late-pub-2", "snapshot_cutoff_ms"] == late_c - DAY
    assert got.loc["late-pub-4", "snapshot_cutoff_ms"] == late_c
    counts = [f"merchant_num_trans_{d}d" for d in (1, 7, 30)]
    assert (got.loc["late-pub-1", counts] != got.loc["late-pub-4", counts]).any()  # the two nights do differ
    # An absent merchant gets the declared defaults; before the first snapshot everything is missing.
    rare = got.loc["rare-late"]
    assert (rare["merchant_num_trans_30d"], rare["merchant_fraud_count_30d"]) == (0, 0)
    assert math.isnan(rare["merchant_fraud_rate_30d"])
    assert got.loc["rare-early"][["merchant_num_trans_1d", "num_trans_last_30d"]].isna().all()
    assert got["merchant_fraud_count_30d"].max() >= 2 and got["merchant_fraud_rate_7d"].notna().sum() > 500


@pytest.mark.unit
def test_no_labels_at_all_counts_no_fraud(data, tmp_path):
    rows, _ = data
    history = write_history(rows, tmp_path / "h.parquet", inline_labels=False)
    eng = open_engine("duckdb", offline_dir=tmp_path, history=history, secret=SECRET, registry=REG)
    nights = as_frames(eng.snapshots([EDGE_NIGHT]))
    eng.close()
    txns, labels = oracle_inputs(rows, [], EntityKeyer(SECRET), inline_labels=False)
    assert labels == {}
    frames = nights[0][1]
    for g in REG.batch_groups:
        if g.entity == "merchant":
            f = frames[g.name]
            want = group_oracle(g, txns, labels, cutoff_ms_of(EDGE_NIGHT))
            assert len(f) == len(want) > 0 and (f["fraud_count"] == 0).all()
            rate = f[f"merchant_fraud_rate_{g.window_ms // DAY}d"]
            assert (rate == 0.0).all()  # 0 / count


@pytest.mark.integration
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_spark_equals_duckdb_on_the_same_data(data, duckdb_run, tmp_path, suffix):
    """Also from a CSV history: Spark reads its columns by header name, labeled_at included (the inline labels
    the merchant's known fraud counts), like the DuckDB engine (which read the Parquet file here)."""
    rows, store = data
    droot, _, dframe = duckdb_run
    write_labels(tmp_path, store)
    history = write_history(rows, tmp_path / f"history{suffix}")
    eng = open_engine("spark", offline_dir=tmp_path, history=history, secret=SECRET, master="local[2]", registry=REG)
    try:
        run_snapshots(eng, NIGHTS, offline_dir=tmp_path, published=published_at)
        sframe = eng.training_set(ms(START), ms(START + dt.timedelta(days=47)))
    finally:
        eng.close()
    for g in REG.batch_groups:
        dfiles, sfiles = read_snapshots(droot, g.name), read_snapshots(tmp_path, g.name)
        assert [p.relative_to(droot) for p in dfiles] == [p.relative_to(tmp_path) for p in sfiles]
        for a, b in zip(dfiles, sfiles, strict=True):
            pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b), check_exact=False, rtol=1e-9, atol=0)
    pd.testing.assert_frame_equal(dframe, sframe, check_exact=False, rtol=1e-9, atol=0)
    assert sframe["merchant_fraud_count_7d"].max() >= 2


@pytest.mark.unit
def test_quality_gate_covers_every_group_but_lets_fraud_rates_jump():
    """A merchant's known frauds arrive in bursts (that is the pattern): a jump is published; an impossible fraud
    count, or a group far from the night before, refuses the whole night and names the group."""
    from batch.quality import QualityError, check_groups

    g = next(g for g in REG.batch_groups if g.name == "merchant_agg_7d")
    days = [dt.date(2020, 3, 9), dt.date(2020, 3, 10)]

    def night(fraud, count=10, merchants=50):
        f = pd.DataFrame({"merchant": [f"m{i}" for i in range(merchants)], "count": count, "fraud_count": fraud})
        f["merchant_num_trans_7d"] = f["count"]
        f["merchant_fraud_count_7d"] = f["fraud_count"].astype(float)
        f["merchant_fraud_rate_7d"] = f["fraud_count"] / f["count"]
        return pa.Table.from_pandas(f, preserve_index=False)  # as the engines hand nights to the gate

    calm, burst = night(0), night(9)
    check_groups([(days[0], {g.name: calm}), (days[1], {g.name: burst})], {}, [g], data_start_ms=0)
    with pytest.raises(QualityError, match="merchant_agg_7d 2020-03-10: 50 merchant.s. with a known fraud count"):
        check_groups([(days[0], {g.name: calm}), (days[1], {g.name: night(11)})], {}, [g], data_start_ms=0)
    with pytest.raises(QualityError, match="merchant_agg_7d 2020-03-10: 10 merchants against 50"):
        check_groups([(days[0], {g.name: calm}), (days[1], {g.name: night(0, merchants=10)})], {}, [g],
                     data_start_ms=0)


@pytest.mark.unit
def test_each_group_follows_its_own_snapshots(data, tmp_path):
    """An offline store written before the merchant groups existed: card_agg_1w is joined as before, the groups
    without any snapshot are missing (NaN), not defaulted."""
    from featurestore.definitions import CARD_AGG_1M, CARD_AGG_1W, CARD_AGG_10M, REGISTRY, Registry

    before_issue_16 = Registry(groups=(CARD_AGG_10M, CARD_AGG_1M, CARD_AGG_1W), ratios=REGISTRY.ratios,
                               model_features=REGISTRY.model_features)
    rows, _ = data
    history = write_history(rows, tmp_path / "h.parquet")
    old = open_engine("duckdb", offline_dir=tmp_path, history=history, secret=SECRET, registry=before_issue_16)
    run_snapshots(old, NIGHTS[:10], offline_dir=tmp_path)
    before = old.training_set(ms(START), ms(START + dt.timedelta(days=12))).set_index("txn_id")
    old.close()
    new = open_engine("duckdb", offline_dir=tmp_path, history=history, secret=SECRET, registry=REG)
    after = new.training_set(ms(START), ms(START + dt.timedelta(days=12))).set_index("txn_id")
    new.close()
    assert before["num_trans_last_1w"].notna().sum() > 100
    pd.testing.assert_series_equal(before["num_trans_last_1w"], after["num_trans_last_1w"])
    pd.testing.assert_series_equal(before["snapshot_cutoff_ms"], after["snapshot_cutoff_ms"])
    others = [n for g in REG.batch_groups if g.name != "card_agg_1w" for n in g.feature_names]
    assert after[others].isna().all().all()


@pytest.mark.unit
def test_archive_source_with_the_label_store_equals_the_oracle(data, tmp_path):
    """The stream's archive (late rows, redelivered duplicates) and the label store: what the nightly job reads
    in production."""
    from tests.test_batch import write_archive

    rows, store = data
    keyer = EntityKeyer(SECRET)
    write_archive(rows, tmp_path, keyer)
    write_labels(tmp_path, store)
    nights = [EDGE_NIGHT - dt.timedelta(days=3), EDGE_NIGHT]
    eng = open_engine("duckdb", offline_dir=tmp_path, history=None, secret=SECRET, registry=REG)
    got = dict(as_frames(eng.snapshots(nights)))
    eng.close()
    txns, labels = oracle_inputs(rows, store, keyer, inline_labels=False)
    for day in nights:
        for g in REG.batch_groups:
            want = group_oracle(g, txns, labels, cutoff_ms_of(day))
            frame = got[day][g.name].set_index(g.entity_column)
            assert set(frame.index) == set(want), (g.name, day)
            assert all(frame.loc[k, "count"] == w["count"] for k, w in want.items())
            if "f" in g.stats:
                assert all(frame.loc[k, "fraud_count"] == w["fraud_count"] for k, w in want.items())
    assert got[EDGE_NIGHT]["merchant_agg_30d"]["fraud_count"].sum() > 3
