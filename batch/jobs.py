"""Engine-independent orchestration of the nightly job and of training-set builds."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from featurestore.offline import OfflineError, cutoff_ms_of, write_frame, write_snapshot_file

log = logging.getLogger(__name__)
WEEK_MS = 7 * 86_400_000


@dataclass
class Engine:
    """The two things an engine must do; everything else (validation, writing, Redis) is shared."""

    name: str
    snapshot: Callable[[dt.date], pd.DataFrame]
    training_set: Callable[[int, int], pd.DataFrame]
    span: tuple[int, int]
    close: Callable[[], None]
    write_training_set: Callable[[int, int, Path], int] | None = None  # engines that must not collect


def open_engine(name: str, *, offline_dir: Path, history: Path | None, secret: str, master: str = "local[*]") -> Engine:
    if name == "duckdb":
        import duckdb

        from featurestore import offline

        con = duckdb.connect()
        offline.load_events(con, offline_dir=offline_dir, history=history, secret=secret)
        return Engine("duckdb", lambda day: offline.snapshot_duckdb(con, day),
                      lambda a, b: offline.training_set_duckdb(con, offline_dir, a, b),
                      offline.events_span(con), con.close)
    if name == "spark":
        from batch import spark_job

        spark = spark_job.spark_session(master)
        spark_job.load_events(spark, offline_dir=offline_dir, history=history, secret=secret)
        lo, hi = spark.sql("SELECT MIN(ts), MAX(ts) FROM events").first()
        return Engine("spark", lambda day: spark_job.snapshot(spark, day),
                      lambda a, b: spark_job.training_set(spark, offline_dir, a, b), (lo, hi), lambda: None,
                      lambda a, b, out: spark_job.write_training_set(spark, offline_dir, a, b, out))
    raise OfflineError(f"unknown engine {name!r} (spark or duckdb)")


def dates_between(start: dt.date, end: dt.date) -> list[dt.date]:
    if end < start:
        raise OfflineError(f"--end {end} is before --start {start}")
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]


def run_snapshots(engine: Engine, days: list[dt.date], *, offline_dir: Path, online=None,
                  progress: Callable[[str], None] = lambda _: None) -> list[tuple[dt.date, int]]:
    """Compute every night first, then write: a date without data fails the run before anything is written."""
    lo, hi = engine.span
    frames = []
    for day in days:
        c = cutoff_ms_of(day)
        if hi < c - WEEK_MS or lo >= c:
            raise OfflineError(f"no transactions in the week before {day} (history spans "
                               f"{_fmt(lo)} .. {_fmt(hi)}); nothing was written")
        progress(f"computing {day}")
        frames.append((day, engine.snapshot(day)))
    written = []
    for day, frame in frames:
        progress(f"writing {day}")
        write_snapshot_file(frame, offline_dir, day)
        if online is not None:
            rows = zip(frame["card"], frame["num_trans_last_1w"], frame["sum_cents_last_1w"], strict=True)
            online.write_snapshot(cutoff_ms_of(day), rows)
        written.append((day, len(frame)))
    return written


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
