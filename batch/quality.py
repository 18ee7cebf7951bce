"""The quality gate a nightly snapshot passes before it is published (offline file and Redis).

A night is refused when a value is impossible (a count below 1, a non-positive or non-finite amount statistic,
min above max), or, against the previous night when both nights' windows lie wholly inside the data, when the
number of cards moves by more than `max_row_change` or a feature's median by more than `max_median_factor`:
an upstream outage that halved the archive, or an amount unit changed from dollars to cents, stops at the gate
instead of reaching the model. A refused night is not written anywhere; the message says which check failed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from featurestore.definitions import FeatureGroup
from featurestore.offline_sql import SNAPSHOT_STATS


@dataclass(frozen=True)
class QualityLimits:
    max_row_change: float = 0.5  # |cards / previous cards - 1|
    max_median_factor: float = 3.0  # max(m, p) / min(m, p) for each feature's median m and previous p


class QualityError(ValueError):
    """A night failed the gate; nothing was published."""


def feature_values(frame: pd.DataFrame, group: FeatureGroup) -> dict[str, np.ndarray]:
    """The group's declared features, from a snapshot's statistics (amounts in currency units)."""
    col = {k: frame[v].to_numpy(dtype="float64") for k, v in SNAPSHOT_STATS.items() if v in frame.columns}
    n = col["n"]
    with np.errstate(divide="ignore", invalid="ignore"):
        derived = {"count": n, "sum": col["s"] / 100, "mean": col["s"] / n / 100,
                   "min": col.get("mn", np.full_like(n, np.nan)) / 100,
                   "max": col.get("mx", np.full_like(n, np.nan)) / 100}
    return {a.name: derived[a.function] for a in group.features}


def invalid_values(frame: pd.DataFrame) -> list[str]:
    """Statistics no real week can have."""
    problems = []
    n = frame[SNAPSHOT_STATS["n"]].to_numpy(dtype="float64")
    if (bad := int(np.sum(~(n >= 1)))):
        problems.append(f"{bad} card(s) with a transaction count below 1")
    s = frame[SNAPSHOT_STATS["s"]].to_numpy(dtype="float64")
    if (bad := int(np.sum(~((s > 0) & np.isfinite(s))))):
        problems.append(f"{bad} card(s) with a non-positive or non-finite amount sum")
    if {SNAPSHOT_STATS["mn"], SNAPSHOT_STATS["mx"]} <= set(frame.columns):
        mn, mx = frame[SNAPSHOT_STATS["mn"]].to_numpy(dtype="float64"), frame[SNAPSHOT_STATS["mx"]].to_numpy(dtype="float64")
        if (bad := int(np.sum(~((mn > 0) & (mn <= mx))))):
            problems.append(f"{bad} card(s) with min amount not in (0, max]")
    return problems


def drift(frame: pd.DataFrame, previous: pd.DataFrame, group: FeatureGroup, limits: QualityLimits) -> list[str]:
    """Changes against the previous night beyond the limits."""
    problems = []
    rows, prev_rows = len(frame), len(previous)
    if prev_rows and abs(rows / prev_rows - 1) > limits.max_row_change:
        problems.append(f"{rows:,} cards against {prev_rows:,} the night before "
                        f"(more than {limits.max_row_change:.0%} change)")
    now, before = feature_values(frame, group), feature_values(previous, group)
    for name, values in now.items():
        m, p = np.nanmedian(values) if len(values) else np.nan, np.nanmedian(before[name]) if prev_rows else np.nan
        if np.isfinite(m) and np.isfinite(p) and min(m, p) > 0 and max(m, p) / min(m, p) > limits.max_median_factor:
            problems.append(f"median {name} {m:.4g} against {p:.4g} the night before "
                            f"(more than {limits.max_median_factor:g}x)")
    return problems


def check_nights(nights: Sequence[tuple[dt.date, pd.DataFrame]], previous: tuple[dt.date, pd.DataFrame] | None,
                 group: FeatureGroup, *, data_start_ms: int, limits: QualityLimits = QualityLimits()) -> None:
    """Check every night of a run in date order, each against the night before it (the run's, or the latest
    published one before the run). Raises QualityError naming every failing night and check."""
    from stores.offline_files import cutoff_ms_of

    failures = []
    before = previous
    for day, frame in sorted(nights, key=lambda x: x[0]):
        problems = invalid_values(frame)
        both_full = before is not None and cutoff_ms_of(before[0]) - group.window_ms >= data_start_ms
        if both_full and (day - before[0]).days >= 1:
            problems += drift(frame, before[1], group, limits)
        if problems:
            failures.append(f"{day}: " + "; ".join(problems))
        before = (day, frame)
    if failures:
        raise QualityError("snapshot quality gate: nothing was published. " + " | ".join(failures)
                           + " (inspect the input; rerun with --skip-quality-gate to publish anyway)")
