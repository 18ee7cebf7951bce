"""The event-time features (`definitions.EventTimeFeature`): one function, called by training-set building and by
the scorer and the stream alike, so a transaction's hour is the same number offline and online.

Integer arithmetic on the epoch milliseconds (UTC, the event time's own zone): no time-zone database, no float
rounding, identical for a Python int and a NumPy int64 array.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from featurestore.definitions import DAY_MS, EVENT_TIME_FEATURES, EventTimeFeature

HOUR_MS = 3_600_000
#: 1970-01-01, day 0 of the epoch, was a Thursday: weekday 3 with Monday = 0.
_EPOCH_WEEKDAY = 3


def time_part(part: str, ts_ms):
    """The `part` of an event time in epoch ms (an int, or an int64 array), as float(s)."""
    if part == "hour_of_day":
        value = (ts_ms // HOUR_MS) % 24
    elif part == "day_of_week":
        value = (ts_ms // DAY_MS + _EPOCH_WEEKDAY) % 7
    else:
        raise ValueError(f"unknown event-time part {part!r}")
    return float(value) if isinstance(value, int) else np.asarray(value, dtype=np.float64)


def event_time_values(ts_ms: int, features: Sequence[EventTimeFeature] = EVENT_TIME_FEATURES) -> dict[str, float]:
    """Every event-time feature of one transaction, by name."""
    ts_ms = int(ts_ms)
    return {f.name: time_part(f.part, ts_ms) for f in features}


def event_time_columns(ts_ms, features: Sequence[EventTimeFeature] = EVENT_TIME_FEATURES) -> dict[str, np.ndarray]:
    """Every event-time feature of a column of event times (epoch ms), by name."""
    ts = np.asarray(ts_ms, dtype=np.int64)
    return {f.name: time_part(f.part, ts) for f in features}
