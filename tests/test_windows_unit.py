import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore.windows import WindowEvent, is_late, mean_amount, to_cents, window_aggregate
from tests import oracle
from tests.oracle import Arrival

pytestmark = pytest.mark.unit
W = 600_000


def ev(txn, ts, seq, cents=100, late=False):
    return WindowEvent(txn, ts, seq, cents, late)


def test_window_includes_exact_edge_and_current_once():
    events = [ev("a", 0, 0, 100), ev("b", 1, 1, 200), ev("c", W, 2, 300)]
    agg = window_aggregate(events, events[2], W)
    assert (agg.count, agg.sum_cents) == (3, 600)
    agg = window_aggregate(events, ev("c", W + 1, 2, 300), W)
    assert (agg.count, agg.sum_cents) == (2, 500)  # "a" at exactly t - W - 1 falls out


def test_ties_broken_by_arrival_order():
    events = [ev("a", 5, 0), ev("b", 5, 1), ev("c", 5, 2)]
    assert [window_aggregate(events, e, W).count for e in events] == [1, 2, 3]


def test_only_earlier_arrivals_count_whatever_their_times():
    # b arrives after a with an earlier ts: it cannot count for a (the scorer never saw it), a counts for b only
    # if a.ts <= b.ts; c arrived before d with a ts in d's future: not in d's window.
    a, b = ev("a", 100, 0), ev("b", 50, 1)
    assert window_aggregate([a, b], a, W).count == 1
    assert window_aggregate([a, b], b, W).count == 1
    c, d = ev("c", 500, 0), ev("d", 400, 1)
    assert window_aggregate([c, d], d, W).count == 1
    e = ev("e", 600, 2)
    assert window_aggregate([c, d, e], e, W).count == 3


def test_late_events_never_count_but_late_txn_counts_itself():
    events = [ev("a", 10, 0), ev("late", 5, 1, late=True), ev("b", 20, 2)]
    assert window_aggregate(events, events[2], W).count == 2
    assert window_aggregate(events, events[1], W).count == 1


def test_mean_and_cents():
    assert to_cents(0.29) == 29 and to_cents(19.99) == 1999 and to_cents(1e6 + 0.01) == 100000001
    assert math.isnan(mean_amount(0, 0))
    assert mean_amount(3, 1000) == pytest.approx(1000 / 300)


def test_is_late_boundary():
    assert not is_late(0, None, W)
    assert not is_late(0, W, W)  # exactly at the allowed lateness is still on time
    assert is_late(0, W + 1, W)


def test_future_event_cannot_push_the_horizon_past_the_clock():
    now = 10 * W
    assert not is_late(now, newest_ts=now + 100 * W, allowed_lateness_ms=W, now_ms=now)
    assert is_late(now - W - 1, newest_ts=now + 100 * W, allowed_lateness_ms=W, now_ms=now)


def test_oracle_dedups_and_marks_late():
    arr = [
        Arrival("c", "t1", 1_000_000, 100),
        Arrival("c", "t2", 1_000_010, 200),
        Arrival("c", "t1", 1_000_000, 100),  # redelivery: ignored
        Arrival("c", "t3", 1_000_010 - W - 1, 300),  # beyond lateness: late
        Arrival("d", "t4", 1_000_005, 50),
    ]
    rows = oracle.window_10m(arr, W)
    assert [r.txn_id for r in rows] == ["t1", "t2", "t3", "t4"]
    assert [(r.count, r.sum_cents, r.late) for r in rows] == [
        (1, 100, False), (2, 300, False), (1, 300, True), (1, 50, False)
    ]
    assert [r.position for r in rows] == [0, 1, 3, 4]


@st.composite
def card_streams(draw):
    n = draw(st.integers(1, 25))
    offsets = st.one_of(st.sampled_from([0, 1, W - 1, W, W + 1, 2 * W]), st.integers(0, 3 * W))
    return [Arrival(draw(st.sampled_from("ab")), f"x{i}", draw(offsets), draw(st.integers(1, 10_000))) for i in range(n)]


@settings(max_examples=300, deadline=None)
@given(arrivals=card_streams())
def test_window_aggregate_equals_the_oracle(arrivals):
    rows = oracle.window_10m(arrivals, W)
    events = [WindowEvent(r.txn_id, r.ts, r.position, r.amount_cents, r.late) for r in rows]
    for r, e in zip(rows, events, strict=True):
        agg = window_aggregate([x for x, y in zip(events, rows, strict=True) if y.card == r.card], e, W)
        assert (agg.count, agg.sum_cents) == (r.count, r.sum_cents), r


def _stats():
    """A window's statistics as a store holds them: empty (count 0, no min/max) or count >= 1 with min <= max."""
    cents = st.integers(min_value=1, max_value=10 ** 9)  # sums stay below 2**53, as real cents do
    empty = st.tuples(st.just(0), st.just(0), st.none(), st.none(), st.just(0))
    full = st.tuples(st.integers(1, 10 ** 6), cents, cents, cents, st.integers(0, 10 ** 6)).map(
        lambda s: (s[0], s[1] * s[0], min(s[2], s[3]), max(s[2], s[3]), min(s[4], s[0])))
    return st.lists(st.one_of(empty, full), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(_stats())
def test_aggregate_columns_equal_window_aggregate_values_row_by_row(rows):
    """The stream scorer's columnar fold gives every aggregation exactly (same type, same bits) what the one-window
    form gives: empty windows NaN (count 0), counts int, means and fraud rates by the same divisions."""
    import numpy as np

    from featurestore.definitions import DAY_MS, Aggregate, FeatureGroup
    from featurestore.windows import WindowAggregate, aggregate_columns

    group = FeatureGroup(name="g", entity="card", window_ms=DAY_MS, source="batch", ttl_s=60, features=tuple(
        Aggregate(f"{fn}_{col}", fn, col) for fn, col in (("count", "amount"), ("sum", "amount"), ("mean", "amount"),
                                                          ("min", "amount"), ("max", "amount"), ("sum", "known_fraud"),
                                                          ("mean", "known_fraud"))))
    cols = [np.array([np.nan if v is None else v for v in c], dtype=np.float64) for c in zip(*rows, strict=True)]
    got = aggregate_columns(group, *cols)
    for i, (n, s, lo, hi, fraud) in enumerate(rows):
        want = WindowAggregate(n, s, lo, hi, fraud).values(group)
        for name, value in want.items():
            mine = got[name].tolist()[i]
            assert type(mine) is type(value), (name, mine, value)
            assert mine == value or (math.isnan(mine) and math.isnan(value)), (name, rows[i], mine, value)
