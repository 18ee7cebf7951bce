"""Engine-independent orchestration of the nightly job and of training-set builds."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from featurestore.definitions import DEFAULT_ALLOWED_LATENESS_MS, REGISTRY, Registry
from featurestore.offline import OfflineError, cutoff_ms_of, write_frame, write_snapshot_file
from featurestore.offline_sql import SNAPSHOT_STATS

log = logging.getLogger(__name__)
WEEK_MS = 7 * 86_400_000
DAY_MS = 86_400_000


@dataclass
class Engine:
    """The two things an engine must do; everything else (validation, writing, Redis) is shared."""

    name: str
    snapshots: Callable[[list[dt.date]], list[tuple[dt.date, pd.DataFrame]]]  # every night in one pass
    training_set: Callable[[int, int], pd.DataFrame]
    span: tuple[int, int]
    close: Callable[[], None]
    write_training_set: Callable[[int, int, Path], int] | None = None  # engines that must not collect
    registry: Registry = REGISTRY


def open_engine(name: str, *, offline_dir: Path, history: Path | None, secret: str, master: str = "local[*]",
                allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS, registry: Registry = REGISTRY) -> Engine:
    """An engine over the history file or the stream's archive, computing the features `registry` declares."""
    if name == "duckdb":
        import duckdb

        from featurestore import offline

        con = duckdb.connect()
        offline.load_events(con, offline_dir=offline_dir, history=history, secret=secret,
                            allowed_lateness_ms=allowed_lateness_ms)
        return Engine("duckdb", lambda days: offline.snapshots_duckdb(con, days, registry),
                      lambda a, b: offline.training_set_duckdb(con, offline_dir, a, b, registry),
                      offline.events_span(con), con.close, registry=registry)
    if name == "spark":
        from batch import spark_job

        spark = spark_job.spark_session(master)
        spark_job.load_events(spark, offline_dir=offline_dir, history=history, secret=secret,
                              allowed_lateness_ms=allowed_lateness_ms)
        lo, hi = spark.sql("SELECT MIN(ts), MAX(ts) FROM events").first()
        return Engine("spark", lambda days: spark_job.snapshots(spark, days, registry),
                      lambda a, b: spark_job.training_set(spark, offline_dir, a, b, registry), (lo, hi), lambda: None,
                      lambda a, b, out: spark_job.write_training_set(spark, offline_dir, a, b, out, registry),
                      registry)
    raise OfflineError(f"unknown engine {name!r} (spark or duckdb)")


def dates_between(start: dt.date, end: dt.date) -> list[dt.date]:
    if end < start:
        raise OfflineError(f"--end {end} is before --start {start}")
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]


def publication_ms(day: dt.date, *, now_ms: int, delay_ms: int = 0) -> int:
    """When a night's snapshot counts as published (SPEC section 4, visibility).

    The nightly run (today's cut-off, or a later one) publishes now; a run for an earlier night is a backfill,
    recorded as published on time: its cut-off plus the configured delay (default 0).
    """
    c = cutoff_ms_of(day)
    if c >= now_ms - now_ms % DAY_MS:
        return now_ms
    return c + delay_ms


def run_snapshots(engine: Engine, days: list[dt.date], *, offline_dir: Path, online=None,
                  progress: Callable[[str], None] = lambda _: None,
                  published: Callable[[dt.date], int] | None = None) -> list[tuple[dt.date, int]]:
    """Compute every night first, then write: a date without data fails the run before anything is written.

    `published(day)` gives each night's publication time (default `publication_ms` with the configured delay);
    the offline file and Redis record the same one.
    """
    if published is None:
        from featurestore.config import get_settings

        delay = get_settings().snapshot_publish_delay_ms
        published = lambda day: publication_ms(day, now_ms=now(), delay_ms=delay)  # noqa: E731
    lo, hi = engine.span
    for day in days:
        c = cutoff_ms_of(day)
        if hi < c - WEEK_MS or lo >= c:
            raise OfflineError(f"no transactions in the week before {day} (history spans "
                               f"{_fmt(lo)} .. {_fmt(hi)}); nothing was written")
    progress(f"computing {len(days)} night(s)")
    frames = engine.snapshots(days)
    written = []
    for day, frame in frames:
        progress(f"writing {day}")
        at = write_snapshot_file(frame, offline_dir, day, published(day))
        if online is not None:
            online.write_snapshot(cutoff_ms_of(day), snapshot_rows(frame, engine.registry), published_ms=at)
        written.append((day, len(frame)))
    return written


def snapshot_rows(frame: pd.DataFrame, registry: Registry = REGISTRY):
    """(card, statistics) per row, for the online store: the statistics its read folds into the features."""
    stats = {k: frame[SNAPSHOT_STATS[k]].to_numpy() for k in registry.batch_group.stats}
    for i, card in enumerate(frame["card"]):
        yield card, {k: int(v[i]) for k, v in stats.items()}


def now() -> int:
    return time.time_ns() // 1_000_000


def build_training_set(engine: Engine, start: dt.date, end: dt.date, out: Path | None) -> pd.DataFrame | int:
    """DuckDB returns (and writes) the frame; Spark writes a Parquet directory from the executors and returns
    the row count, so a seed-scale set never has to fit in the driver."""
    if end <= start:
        raise OfflineError(f"--end {end} must be after --start {start}")
    if engine.write_training_set is not None and out is not None:
        rows = engine.write_training_set(cutoff_ms_of(start), cutoff_ms_of(end), out)
        if rows == 0:
            raise OfflineError(f"no transactions in [{start}, {end})")
        return rows
    frame = engine.training_set(cutoff_ms_of(start), cutoff_ms_of(end))
    if frame.empty:
        lo, hi = engine.span
        raise OfflineError(f"no transactions in [{start}, {end}) (history spans {_fmt(lo)} .. {_fmt(hi)}); "
                           "nothing was written")
    if out is not None:
        write_frame(frame, out)
    return frame


def _fmt(ms: int | None) -> str:
    return "?" if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")
