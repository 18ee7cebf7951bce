"""Event-time features (the transaction's hour of day, day of week, UTC): checked against the calendar as Python's
`datetime` keeps it, an oracle that shares no code with `featurestore.event_time`."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from featurestore import definitions as defs
from featurestore.definitions import EventTimeFeature, Registry
from featurestore.event_time import event_time_columns, event_time_values

pytestmark = pytest.mark.unit
PARTS = (EventTimeFeature("hour", "hour_of_day"), EventTimeFeature("weekday", "day_of_week"))


def calendar(ts_ms: int) -> dict[str, float]:
    """What a wall clock in UTC shows at the event time, Monday = 0."""
    at = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=ts_ms)
    return {"hour": float(at.hour), "weekday": float(at.weekday())}


def edge_times() -> list[int]:
    """Each side of hour and midnight boundaries, a leap day, the year 2038, and random instants."""
    out = []
    for day in (dt.datetime(2020, 2, 29, tzinfo=dt.UTC), dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
                dt.datetime(2038, 1, 19, 3, tzinfo=dt.UTC), dt.datetime(1970, 1, 1, tzinfo=dt.UTC)):
        ms = int(day.timestamp()) * 1000
        out += [ms, ms + 1, ms + 3_599_999, ms + 3_600_000, ms + 86_399_999, ms + 86_400_000]
    rng = np.random.default_rng(7)
    out += [int(x) for x in rng.integers(0, 4_102_444_800_000, 2000)]  # up to 2100
    return out


def test_hour_and_weekday_match_the_utc_calendar_for_scalars_and_columns():
    times = edge_times()
    cols = event_time_columns(np.array(times, dtype=np.int64), PARTS)
    for i, ts in enumerate(times):
        want = calendar(ts)
        got = event_time_values(ts, PARTS)
        assert got == want, ts
        assert {k: float(v[i]) for k, v in cols.items()} == want, ts  # the training set's column form agrees
        assert all(type(v) is float for v in got.values())


def test_the_product_declares_the_hour_and_serves_it_by_name():
    assert defs.REGISTRY.event_time_features == ("hour_of_day",)
    assert "hour_of_day" in defs.REGISTRY.all_features
    assert event_time_values(1_590_969_600_000 + 13 * 3_600_000) == {"hour_of_day": 13.0}  # 2020-06-01 13:00 UTC


def test_bad_declarations_are_refused():
    with pytest.raises(ValueError, match="unknown event-time part 'minute'"):
        EventTimeFeature("m", "minute")
    with pytest.raises(ValueError, match="unique across groups: amount"):
        Registry(groups=defs.REGISTRY.groups, ratios=(), model_features=("amount",),
                 event_time=(EventTimeFeature("amount", "hour_of_day"),))
    plain = Registry(groups=defs.REGISTRY.groups, ratios=defs.REGISTRY.ratios,
                     model_features=defs.REGISTRY.model_features)
    assert plain.version != defs.REGISTRY.version  # declaring an event-time feature changes the declarations
