"""The offline engines behind one small interface, and the engine-independent orchestration of the nightly
job and of training-set builds."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import pandas as pd
import pyarrow as pa

from batch.quality import QualityLimits
from featurestore.definitions import DEFAULT_ALLOWED_LATENESS_MS, REGISTRY, FeatureGroup, Registry
from featurestore.offline_sql import SNAPSHOT_STATS
from stores.arrow_memory import use_batch_allocator
from stores.offline_files import (
    FILE_THREADS,
    OfflineError,
    cutoff_ms_of,
    first_publication,
    latest_snapshot_before,
    write_frame,
    write_snapshot_file,
)

log = logging.getLogger(__name__)
DAY_MS = 86_400_000
#: Nights whose snapshot files may be queued behind the one being finished (their tables are in memory already).
NIGHTS_AHEAD = 4


class Engine(Protocol):
    """What an offline engine must do; everything else (validation, writing files and Redis) is shared here.

    Both engines run the same generated SQL (`featurestore.offline_sql`) over the same files.
    """

    name: str
    registry: Registry
    span: tuple[int, int]  # first and last event time loaded

    def snapshots(self, days: list[dt.date]) -> list[tuple[dt.date, dict[str, pa.Table]]]:
        """Every night of `days` in one pass: per night, one Arrow table per batch group (its entity column, then
        its statistics named by `offline_sql.SNAPSHOT_STATS`, its features, `cutoff_ms`)."""

    def training_set(self, start_ms: int, end_ms: int) -> pd.DataFrame:
        """Point-in-time rows for transactions with ts in [start_ms, end_ms)."""

    def write_training_set(self, start_ms: int, end_ms: int, out: Path) -> int | None:
        """Write the rows without collecting them (returns the row count), or None where the engine collects."""

    def close(self) -> None: ...


class DuckDBEngine:
    """In-process: the whole history in one DuckDB connection."""

    name = "duckdb"

    def __init__(self, *, offline_dir: Path, history: Path | None, secret: str,
                 allowed_lateness_ms: int, registry: Registry) -> None:
        import duckdb

        from stores import duckdb_offline

        self._sql, self._con = duckdb_offline, duckdb.connect()
        self.offline_dir, self.registry = offline_dir, registry
        duckdb_offline.load_events(self._con, offline_dir=offline_dir, history=history, secret=secret,
                                   allowed_lateness_ms=allowed_lateness_ms)
        self.span = duckdb_offline.events_span(self._con)

    def snapshots(self, days: list[dt.date]) -> list[tuple[dt.date, dict[str, pa.Table]]]:
        return self._sql.snapshots_duckdb(self._con, days, self.registry)

    def training_set(self, start_ms: int, end_ms: int) -> pd.DataFrame:
        return self._sql.training_set_duckdb(self._con, self.offline_dir, start_ms, end_ms, self.registry)

    def write_training_set(self, start_ms: int, end_ms: int, out: Path) -> int | None:
        return self._sql.write_training_set_duckdb(self._con, self.offline_dir, start_ms, end_ms, out, self.registry)

    def close(self) -> None:
        self._con.close()


class SparkEngine:
    """Any Spark master; the driver collects only one row per card and night, and never the training set."""

    name = "spark"

    def __init__(self, *, offline_dir: Path, history: Path | None, secret: str, master: str,
                 allowed_lateness_ms: int, registry: Registry) -> None:
        from stores import spark_offline

        self._job, self._spark = spark_offline, spark_offline.spark_session(master)
        self.offline_dir, self.registry = offline_dir, registry
        spark_offline.load_events(self._spark, offline_dir=offline_dir, history=history, secret=secret,
                                  allowed_lateness_ms=allowed_lateness_ms)
        self.span = tuple(self._spark.sql("SELECT MIN(ts), MAX(ts) FROM events").first())

    def snapshots(self, days: list[dt.date]) -> list[tuple[dt.date, dict[str, pa.Table]]]:
        return self._job.snapshots(self._spark, days, self.registry)

    def training_set(self, start_ms: int, end_ms: int) -> pd.DataFrame:
        return self._job.training_set(self._spark, self.offline_dir, start_ms, end_ms, self.registry)

    def write_training_set(self, start_ms: int, end_ms: int, out: Path) -> int | None:
        return self._job.write_training_set(self._spark, self.offline_dir, start_ms, end_ms, out, self.registry)

    def close(self) -> None:
        """The session stays for the process (Spark sessions are costly to start; tests share one)."""


def open_engine(name: str, *, offline_dir: Path, history: Path | None, secret: str, master: str = "local[*]",
                allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS, registry: Registry = REGISTRY) -> Engine:
    """An engine over the history file or the stream's archive, computing the features `registry` declares."""
    common = dict(offline_dir=offline_dir, history=history, secret=secret, allowed_lateness_ms=allowed_lateness_ms,
                  registry=registry)
    use_batch_allocator()  # the nightly tables and training batches are large Arrow buffers
    if name == "duckdb":
        return DuckDBEngine(**common)
    if name == "spark":
        return SparkEngine(master=master, **common)
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
                  published: Callable[[dt.date], int] | None = None,
                  quality: QualityLimits | None = QualityLimits()) -> list[tuple[dt.date, int]]:
    """Compute every night of every batch group first, then write: a date without data, or a night failing the
    quality gate (`batch.quality`; `quality=None` skips it), fails the run before anything is written.

    `published(day)` gives each night's publication time (default `publication_ms` with the configured delay);
    every group of the night, the offline files and Redis record the same one. Returns (night, rows of the first
    batch group) per night.
    """
    if published is None:
        from featurestore.config import get_settings

        delay = get_settings().snapshot_publish_delay_ms
        published = lambda day: publication_ms(day, now_ms=now(), delay_ms=delay)  # noqa: E731
    groups = engine.registry.batch_groups
    longest = max(g.window_ms for g in groups)
    lo, hi = engine.span
    for day in days:
        c = cutoff_ms_of(day)
        if hi < c - longest or lo >= c:
            raise OfflineError(f"no transactions in the {_span_words(longest)} before {day} (history spans "
                               f"{_fmt(lo)} .. {_fmt(hi)}); nothing was written")
    progress(f"computing {len(days)} night(s)")
    nights = engine.snapshots(days)
    if quality is not None:
        from batch.quality import check_groups

        progress("quality gate")
        previous = {g.name: latest_snapshot_before(offline_dir, min(days), g.name) for g in groups}
        check_groups(nights, previous, groups, data_start_ms=lo, limits=quality)
    written: list[tuple[dt.date, int]] = []
    names = [g.name for g in groups]
    # Files are written side by side (Parquet encoding releases the GIL), and the next nights' files are queued
    # while a night finishes: a backfill writes nights x groups small files, and waiting for each night's last
    # file before starting the next left a core idle (bench/RESULTS.md). A night reaches Redis only once all its
    # files are in place; a failed write stops the run, and nights not yet started are not written.
    pool = ThreadPoolExecutor(min(len(names), FILE_THREADS), thread_name_prefix="snapshot-write")
    in_flight: deque[tuple[dt.date, Mapping[str, pa.Table], int, list]] = deque()

    def finish_oldest() -> None:
        day, tables, at, files = in_flight.popleft()
        for done in files:
            done.result()
        if online is not None:
            publish_online(online, day, tables, at, engine.registry)
        written.append((day, tables[names[0]].num_rows))

    try:
        for day, tables in nights:
            progress(f"writing {day}")
            at = first_publication(offline_dir, day, names, published(day))
            in_flight.append((day, tables, at,
                              [pool.submit(write_snapshot_file, tables[n], offline_dir, day, at, n) for n in names]))
            if len(in_flight) > NIGHTS_AHEAD:
                finish_oldest()
        while in_flight:
            finish_oldest()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return written


def publish_online(online, day: dt.date, tables: Mapping[str, pa.Table], published_ms: int,
                   registry: Registry = REGISTRY) -> None:
    """Materialize one night's snapshot tables (group name -> table) in the online store, every group at once:
    the batch job's publish step, also what `velocity features rebuild` calls to restore snapshots from the
    offline store (one path, so both agree)."""
    rows = {g.name: snapshot_rows(tables[g.name], g) for g in registry.batch_groups if g.name in tables}
    online.write_snapshot(cutoff_ms_of(day), rows, published_ms=published_ms)


def snapshot_rows(table: pa.Table, group: FeatureGroup) -> Iterator[tuple[str, dict[str, int]]]:
    """(entity key, statistics) per row, for the online store: the statistics its read folds into the features,
    keyed by `definitions.STAT_ORDER` names."""
    stats = {k: table[SNAPSHOT_STATS[k]].to_numpy() for k in group.stats}
    for i, key in enumerate(table[group.entity_column].to_pylist()):
        yield key, {k: int(v[i]) for k, v in stats.items()}


def _span_words(ms: int) -> str:
    days = ms // DAY_MS
    return {1: "day", 7: "week"}.get(days, f"{days} days")


def now() -> int:
    return time.time_ns() // 1_000_000


def build_training_set(engine: Engine, start: dt.date, end: dt.date, out: Path | None) -> pd.DataFrame | int:
    """The frame without `out`; with it, the engine writes the rows without collecting them (DuckDB one Parquet
    file streamed batch by batch, Spark a Parquet directory from the executors) and the row count is returned, so
    a seed-scale set never has to fit in memory as a frame."""
    if end <= start:
        raise OfflineError(f"--end {end} must be after --start {start}")
    rows = engine.write_training_set(cutoff_ms_of(start), cutoff_ms_of(end), out) if out is not None else None
    if rows is not None:
        if rows == 0:
            lo, hi = engine.span
            raise OfflineError(f"no transactions in [{start}, {end}) (history spans {_fmt(lo)} .. {_fmt(hi)}); "
                               "nothing was written")
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
