"""The quality gate a nightly snapshot passes before it is published (offline file and Redis).

Every batch group of a night is checked; one failing group refuses the whole night (the groups of a night are
published together). A night is refused when a value is impossible (a count below 1, a non-positive or non-finite
amount statistic, min above max, a known fraud count outside [0, count]), or, against the previous night when
both nights' windows lie wholly inside the data, when the number of entities moves by more than `max_row_change`
or a feature's median by more than `max_median_factor`: an upstream outage that halved the archive, or an amount
unit changed from dollars to cents, stops at the gate instead of reaching the model. A refused night is not
written anywhere; the message says which group and check failed.

Features over `known_fraud` (a merchant's known fraud count and rate) are not compared with the night before:
they legitimately jump, by design: a compromised merchant's frauds get labeled in bursts (a batch of
chargebacks), and the pattern these features exist to catch is exactly a sudden rise. Their values are still
checked for being possible.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from featurestore.definitions import FeatureGroup
from featurestore.offline_sql import SNAPSHOT_STATS


@dataclass(frozen=True)
class QualityLimits:
    max_row_change: float = 0.5  # |cards / previous cards - 1|
    max_median_factor: float = 3.0  # max(m, p) / min(m, p) for each feature's median m and previous p


class QualityError(ValueError):
    """A night failed the gate; nothing was published."""


def _floats(frame: pa.Table, column: str) -> np.ndarray:
    """A column as float64 (nulls NaN)."""
    return np.asarray(frame[column], dtype="float64")


def _median(values: np.ndarray) -> float:
    """np.nanmedian (NaN when no value is left) without its per-call overhead: a backfill checks thousands of
    nights."""
    kept = values[~np.isnan(values)]
    return float(np.median(kept)) if len(kept) else float("nan")


def feature_values(frame: pa.Table, group: FeatureGroup) -> dict[str, np.ndarray]:
    """The group's declared features that are compared night to night (not those over known_fraud), from a
    snapshot's statistics (amounts in currency units)."""
    present = frame.column_names
    col = {k: _floats(frame, v) for k, v in SNAPSHOT_STATS.items() if v in present}
    n = col["n"]
    nan = np.full_like(n, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        derived = {"count": n, "sum": col.get("s", nan) / 100, "mean": col.get("s", nan) / n / 100,
                   "min": col.get("mn", nan) / 100, "max": col.get("mx", nan) / 100}
    return {a.name: derived[a.function] for a in group.features if a.column != "known_fraud"}


def invalid_values(frame: pa.Table, entity: str = "card") -> list[str]:
    """Statistics no real window can have."""
    problems = []
    present = frame.column_names
    n = _floats(frame, SNAPSHOT_STATS["n"])
    if (bad := int(np.sum(~(n >= 1)))):
        problems.append(f"{bad} {entity}(s) with a transaction count below 1")
    if SNAPSHOT_STATS["s"] in present:
        s = _floats(frame, SNAPSHOT_STATS["s"])
        if (bad := int(np.sum(~((s > 0) & np.isfinite(s))))):
            problems.append(f"{bad} {entity}(s) with a non-positive or non-finite amount sum")
    if {SNAPSHOT_STATS["mn"], SNAPSHOT_STATS["mx"]} <= set(present):
        mn, mx = _floats(frame, SNAPSHOT_STATS["mn"]), _floats(frame, SNAPSHOT_STATS["mx"])
        if (bad := int(np.sum(~((mn > 0) & (mn <= mx))))):
            problems.append(f"{bad} {entity}(s) with min amount not in (0, max]")
    if SNAPSHOT_STATS["f"] in present:
        f = _floats(frame, SNAPSHOT_STATS["f"])
        if (bad := int(np.sum(~((f >= 0) & (f <= n))))):
            problems.append(f"{bad} {entity}(s) with a known fraud count not in [0, count]")
    return problems


def feature_medians(frame: pa.Table, group: FeatureGroup) -> dict[str, float]:
    """Each compared feature's median over a night's entities (NaN when none has a value)."""
    return {name: _median(values) for name, values in feature_values(frame, group).items()}


def drift(frame: pa.Table, previous: pa.Table, group: FeatureGroup, limits: QualityLimits,
          medians: Mapping[str, float] | None = None, previous_medians: Mapping[str, float] | None = None) -> list[str]:
    """Changes against the previous night beyond the limits. A backfill passes the nights' medians it already
    has (`feature_medians`): each night is the next one's previous night."""
    problems = []
    rows, prev_rows = len(frame), len(previous)
    if prev_rows and abs(rows / prev_rows - 1) > limits.max_row_change:
        problems.append(f"{rows:,} {group.entity}s against {prev_rows:,} the night before "
                        f"(more than {limits.max_row_change:.0%} change)")
    now = feature_medians(frame, group) if medians is None else medians
    before = feature_medians(previous, group) if previous_medians is None else previous_medians
    for name, m in now.items():
        p = before[name]
        if np.isfinite(m) and np.isfinite(p) and min(m, p) > 0 and max(m, p) / min(m, p) > limits.max_median_factor:
            problems.append(f"median {name} {m:.4g} against {p:.4g} the night before "
                            f"(more than {limits.max_median_factor:g}x)")
    return problems


def night_problems(nights: Sequence[tuple[dt.date, pa.Table]], previous: tuple[dt.date, pa.Table] | None,
                   group: FeatureGroup, *, data_start_ms: int, limits: QualityLimits = QualityLimits()) -> list[str]:
    """One group's failures over a run's nights in date order, each against the night before it (the run's, or
    the latest published one before the run)."""
    from stores.offline_files import cutoff_ms_of

    failures = []
    before, before_medians = previous, None
    for day, frame in sorted(nights, key=lambda x: x[0]):
        problems = invalid_values(frame, group.entity)
        both_full = before is not None and cutoff_ms_of(before[0]) - group.window_ms >= data_start_ms
        medians = None
        if both_full and (day - before[0]).days >= 1:
            medians = feature_medians(frame, group)
            problems += drift(frame, before[1], group, limits, medians, before_medians)
        if problems:
            failures.append(f"{day}: " + "; ".join(problems))
        before, before_medians = (day, frame), medians
    return failures


def _refuse(failures: list[str]) -> None:
    if failures:
        raise QualityError("snapshot quality gate: nothing was published. " + " | ".join(failures)
                           + " (inspect the input; rerun with --skip-quality-gate to publish anyway)")


def check_nights(nights: Sequence[tuple[dt.date, pa.Table]], previous: tuple[dt.date, pa.Table] | None,
                 group: FeatureGroup, *, data_start_ms: int, limits: QualityLimits = QualityLimits()) -> None:
    """Check one group's nights. Raises QualityError naming every failing night and check."""
    _refuse(night_problems(nights, previous, group, data_start_ms=data_start_ms, limits=limits))


def check_groups(nights: Sequence[tuple[dt.date, Mapping[str, pa.Table]]],
                 previous: Mapping[str, tuple[dt.date, pa.Table] | None], groups: Sequence[FeatureGroup], *,
                 data_start_ms: int, limits: QualityLimits = QualityLimits()) -> None:
    """Check every batch group of every night (`Engine.snapshots`' shape). Raises QualityError naming every
    failing group, night and check: one failure refuses the whole run."""
    failures = []
    for g in groups:
        mine = [(day, frames[g.name]) for day, frames in nights]
        failures += [f"{g.name} {f}" for f in night_problems(mine, previous.get(g.name), g,
                                                                data_start_ms=data_start_ms, limits=limits)]
    _refuse(failures)
