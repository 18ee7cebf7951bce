import math

import pytest

from featurestore.windows import (
    Arrival,
    WindowEvent,
    is_late,
    mean_amount,
    naive_window_features,
    to_cents,
    window_aggregate,
)

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


def test_ties_broken_by_stream_order():
    events = [ev("a", 5, 0), ev("b", 5, 1), ev("c", 5, 2)]
    assert [window_aggregate(events, e, W).count for e in events] == [1, 2, 3]


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


def test_oracle_dedups_and_marks_late():
    arr = [
        Arrival("c", "t1", 1_000_000, 100),
        Arrival("c", "t2", 1_000_010, 200),
        Arrival("c", "t1", 1_000_000, 100),  # redelivery: ignored
        Arrival("c", "t3", 1_000_010 - W - 1, 300),  # beyond lateness: late
        Arrival("d", "t4", 1_000_005, 50),
    ]
    rows = naive_window_features(arr, W, W)
    assert [r.txn_id for r in rows] == ["t1", "t2", "t3", "t4"]
    assert [(r.count, r.sum_cents, r.late) for r in rows] == [
        (1, 100, False), (2, 300, False), (1, 300, True), (1, 50, False)
    ]
    assert [r.seq for r in rows] == [0, 1, 3, 4]
