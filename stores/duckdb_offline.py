"""The DuckDB offline engine: the generated SQL (`featurestore.offline_sql`) over the offline store's files
(`stores.offline_files`), in process. The Spark engine (`stores.spark_offline`) runs the same text."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import pandas as pd

from featurestore import offline_sql as sql
from featurestore.definitions import DEFAULT_ALLOWED_LATENESS_MS, REGISTRY, FeatureGroup, Registry
from stores.archive import ArchiveError, archive_dir, archive_files
from stores.offline_files import (
    OfflineError,
    cutoff_ms_of,
    events_from_history,
    finish_training_frame,
    read_snapshots,
    snapshot_tables,
    split_snapshots,
    week_days,
)


def load_events(con: duckdb.DuckDBPyConnection, *, offline_dir: Path, history: Path | None, secret: str,
                allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS) -> int:
    """Create the deduplicated `events` view in `con`; returns its row count. Raises OfflineError when empty.

    A history file's rows are its stream, in row order; late ones are marked as the worker would mark them.
    The archive holds what flowed through the stream, with the worker's arrival positions and late flags.
    """
    if history is not None:
        from stores.history import HistoryError, load_history

        try:
            table = load_history(history)
        except HistoryError as exc:
            raise OfflineError(str(exc)) from None
        con.register("raw_events", events_from_history(table, secret))  # txn_ids are unique (load_history)
        con.execute(f"CREATE OR REPLACE TEMP TABLE events AS {sql.arrival_order_sql('raw_events', allowed_lateness_ms)}")
    else:
        try:
            files = [str(p) for p in archive_files(offline_dir)]
        except ArchiveError as exc:
            raise OfflineError(str(exc)) from None
        if not files:
            raise OfflineError(f"no archived transactions under {archive_dir(offline_dir)} "
                               "(run `velocity stream`, or pass --history PATH)")
        con.execute(f"""
            CREATE OR REPLACE TEMP VIEW raw_events AS
            SELECT txn_id, card, amount, amount_cents, ts, fraud_label, late, seq,
                   {sql.arrival_ms_of_seq('seq')} AS arrived_ms, archived_ms
            FROM read_parquet({files!r}, union_by_name = true)""")
        con.execute(f"CREATE OR REPLACE TEMP VIEW first_events AS {sql.dedup_sql('raw_events', 'seq, archived_ms')}")
        con.execute(f"CREATE OR REPLACE TEMP TABLE events AS {sql.arrival_order_sql('first_events')}")
    n = con.execute("SELECT COUNT(*) FROM events").fetchall()[0][0]  # fetchone would leave the result open
    if n == 0:
        raise OfflineError("the history is empty")
    return n


def snapshots_duckdb(con: duckdb.DuckDBPyConnection, days: list[dt.date],
                     registry: Registry = REGISTRY) -> list[tuple[dt.date, pd.DataFrame]]:
    con.register("week_days", week_days(days, registry.batch_group))
    result = con.sql(sql.snapshots_sql(registry.batch_group)).arrow()
    table = result.read_all() if hasattr(result, "read_all") else result
    return split_snapshots(table.to_pandas(), days)


def events_span(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    return con.execute("SELECT MIN(ts), MAX(ts) FROM events").fetchall()[0]


def empty_snapshots_sql(group: FeatureGroup) -> str:
    """A `snap` relation with a snapshot's columns and no rows (before the first nightly run)."""
    stats = ", ".join(f"NULL::BIGINT AS {sql.SNAPSHOT_STATS[k]}" for k in group.stats)
    return f"SELECT NULL::VARCHAR AS card, {stats}, NULL::BIGINT AS cutoff_ms WHERE FALSE"


def training_set_duckdb(con: duckdb.DuckDBPyConnection, offline_dir: Path, start_ms: int, end_ms: int,
                        registry: Registry = REGISTRY) -> pd.DataFrame:
    """Point-in-time training rows for transactions with ts in [start_ms, end_ms)."""
    snap_days, snap_cutoffs = snapshot_tables(offline_dir, start_ms, end_ms)
    con.register("snap_days", snap_days)
    con.register("snap_cutoffs", snap_cutoffs)
    snaps = read_snapshots(offline_dir)
    if snaps:
        con.execute(f"CREATE OR REPLACE TEMP VIEW snap AS SELECT * FROM read_parquet({[str(p) for p in snaps]!r})")
    else:
        con.execute(f"CREATE OR REPLACE TEMP VIEW snap AS {empty_snapshots_sql(registry.batch_group)}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE f10 AS {sql.features_in_range_sql(start_ms, end_ms, registry)}")
    # Through Arrow: DuckDB's own pandas conversion of 5M rows with string columns is ~3x slower.
    result = con.sql(f"SELECT * FROM ({sql.training_sql('f10', registry)}) t ORDER BY ts, card, txn_id").arrow()
    table = result.read_all() if hasattr(result, "read_all") else result
    return finish_training_frame(table.to_pandas(), registry)


def training_set(start: dt.date, end: dt.date, *, offline_dir: Path, history: Path | None = None,
                 secret: str | None = None, registry: Registry = REGISTRY) -> pd.DataFrame:
    """Python entry point (SPEC section 5): a point-in-time-correct training frame through DuckDB."""
    from featurestore.config import get_settings

    con = duckdb.connect()
    try:
        load_events(con, offline_dir=offline_dir, history=history, secret=secret or get_settings().entity_secret)
        return training_set_duckdb(con, offline_dir, cutoff_ms_of(start), cutoff_ms_of(end), registry)
    finally:
        con.close()

