"""The DuckDB offline engine: the generated SQL (`featurestore.offline_sql`) over the offline store's files
(`stores.offline_files`), in process. The Spark engine (`stores.spark_offline`) runs the same text."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from featurestore import batch_sql
from featurestore import offline_sql as sql
from featurestore.definitions import DEFAULT_ALLOWED_LATENESS_MS, REGISTRY, FeatureGroup, Registry
from stores.archive import ArchiveError, archive_dir, archive_files
from stores.history import engine_cannot_read
from stores.offline_files import (
    OfflineError,
    archived_labels,
    asof_plan,
    calendar_table,
    card_numbers,
    cutoff_ms_of,
    finish_training_frame,
    nights_table,
    pan_keys,
    read_snapshots,
    snapshot_tables,
    split_snapshots,
)
from stores.training_batches import dictionary_columns, finish_training_batch

#: Finished training batches that may wait for the Parquet writer thread (memory: a few batches of ~120k rows).
WRITE_AHEAD = 2


def load_events(con: duckdb.DuckDBPyConnection, *, offline_dir: Path, history: Path | None, secret: str,
                allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS) -> int:
    """Create the deduplicated `events` view and the `labels` relation (every label version: the label store's
    plus a history's inline ones) in `con`; returns the event count. Raises OfflineError when empty.

    A history file's rows are its stream, in row order; late ones are marked as the worker would mark them.
    The archive holds what flowed through the stream, with the worker's arrival positions and late flags.
    """
    if history is not None:
        inline_labels = register_history(con, Path(history), secret)
        try:  # the rows' other columns are read here (a damaged page, a label that is no small integer)
            con.execute(f"CREATE OR REPLACE TEMP TABLE events AS "
                        f"{sql.arrival_order_sql('raw_events', allowed_lateness_ms)}")
        except duckdb.Error as exc:
            raise OfflineError(engine_cannot_read(history, "DuckDB", exc)) from None
        con.register("labels", pa.concat_tables([archived_labels(offline_dir), inline_labels]))
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
            SELECT txn_id, card, merchant, amount, amount_cents, ts, fraud_label, late, seq,
                   {sql.arrival_ms_of_seq('seq')} AS arrived_ms, archived_ms
            FROM read_parquet({files!r}, union_by_name = true)""")
        con.execute(f"CREATE OR REPLACE TEMP VIEW first_events AS {sql.dedup_sql('raw_events', 'seq, archived_ms')}")
        con.execute(f"CREATE OR REPLACE TEMP TABLE events AS "
                    f"{sql.arrival_order_sql(sql.with_card_numbers_sql('first_events'))}")
        con.register("labels", archived_labels(offline_dir))
    n = con.execute("SELECT COUNT(*) FROM events").fetchall()[0][0]  # fetchone would leave the result open
    if n == 0:
        raise OfflineError("the history is empty")
    return n


def register_history(con: duckdb.DuckDBPyConnection, history: Path, secret: str) -> pa.Table:
    """Register `raw_events`, a history file's rows as events (`seq` = row index: its row order is its stream
    order), after the checks every reader makes (stores.history); returns its inline label versions.

    A Parquet file is read and checked by DuckDB where it lies, as Spark's executors do: only the footer and the
    distinct card numbers (to key them) reach Python. Reading it into an Arrow table first cost more time than
    the checks and doubled the memory the load touches."""
    from stores.history import (
        GLOB_CHARACTERS,
        OPTIONAL,
        REQUIRED,
        HistoryError,
        check_count_row,
        check_schema,
        counts_sql,
        read_table,
        schema_of,
    )
    from stores.labels import LABELS_SCHEMA

    try:
        schema = schema_of(history)  # the footer only; None for a CSV, typed by the reader
        if schema is not None and (set(str(history)) & set(GLOB_CHARACTERS) or "file_row_number" in schema.names):
            # DuckDB would take the name for a glob pattern, or refuse a column of the name its row number takes
            # (extra columns are allowed): read it as a table instead.
            schema = None
        table = None if schema is not None else read_table(history)
        check_schema(history, schema if table is None else table.schema)
        names = schema.names if table is None else table.column_names
        wanted = [*REQUIRED, *(c for c in ("fraud_label", *OPTIONAL) if c in names)]
        columns = ", ".join(f'"{c}"' for c in wanted)
        if table is None:
            quoted = "'" + str(history).replace("'", "''") + "'"
            body = f"SELECT {columns}, file_row_number AS seq FROM read_parquet({quoted}, file_row_number = true)"
        else:
            con.register("history_table", pa.table({**{c: table[c] for c in wanted},
                                                    "seq": np.arange(table.num_rows, dtype=np.int64)}))
            body = "SELECT * FROM history_table"
        con.execute(f"CREATE OR REPLACE TEMP VIEW history_file AS {body}")
        # DuckDB (2.0.0) folds isnan() to false from a Parquet column's min/max, which leave NaN out: the
        # counts run without statistics propagation, or a NaN amount would pass (tests/test_batch.py).
        con.execute("SET disabled_optimizers = 'statistics_propagation'")
        try:
            counts = con.sql(counts_sql("history_file"))
            check_count_row(history, dict(zip(counts.columns, counts.fetchall()[0], strict=True)))
        finally:
            con.execute("RESET disabled_optimizers")
        pans = [r[0] for r in con.execute("SELECT DISTINCT cc_num FROM history_file").fetchall()]
        inline = (con.sql("SELECT txn_id, fraud_label, labeled_at FROM history_file WHERE labeled_at IS NOT NULL")
                  .to_arrow_table().cast(LABELS_SCHEMA) if "labeled_at" in wanted else LABELS_SCHEMA.empty_table())
    except HistoryError as exc:
        raise OfflineError(str(exc)) from None
    except duckdb.Error as exc:
        raise OfflineError(engine_cannot_read(history, "DuckDB", exc)) from None
    keys = pan_keys(pans, secret)
    con.register("card_keys", pa.table({"cc_num": pa.array(pans, pa.string()), "card": pa.array(keys, pa.string()),
                                        "card_no": pa.array(card_numbers(keys), pa.int64())}))
    label = "fraud_label" if "fraud_label" in wanted else "NULL"
    # Amounts to cents half to even, as the stream does (Python's round).
    con.execute(f"""
        CREATE OR REPLACE TEMP VIEW raw_events AS
        SELECT txn_id, k.card, CAST(merchant AS VARCHAR) AS merchant, CAST(amount AS DOUBLE) AS amount,
               CAST(round_even(CAST(amount AS DOUBLE) * 100, 0) AS BIGINT) AS amount_cents, CAST(ts AS BIGINT) AS ts,
               CAST({label} AS TINYINT) AS fraud_label, FALSE AS late, CAST(seq AS BIGINT) AS seq,
               CAST(ts AS BIGINT) AS arrived_ms, k.card_no
        FROM history_file h JOIN card_keys k ON k.cc_num = h.cc_num""")  # txn_ids are unique (checked above)
    return inline


def snapshots_duckdb(con: duckdb.DuckDBPyConnection, days: list[dt.date],
                     registry: Registry = REGISTRY) -> list[tuple[dt.date, dict[str, pa.Table]]]:
    """Every batch group's snapshot for every night of `days`, in one statement (`batch_sql`)."""
    con.register("nights", nights_table(days))
    con.register("calendar", calendar_table(days, registry))
    result = con.sql(batch_sql.snapshots_sql(registry)).arrow()
    table = result.read_all() if hasattr(result, "read_all") else result
    return split_snapshots(table, days, registry)


def events_span(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    return con.execute("SELECT MIN(ts), MAX(ts) FROM events").fetchall()[0]


def empty_snapshots_sql(group: FeatureGroup) -> str:
    """A snapshot relation with a group's columns and no rows (before its first nightly run)."""
    stats = ", ".join(f"NULL::BIGINT AS {sql.SNAPSHOT_STATS[k]}" for k in group.stats)
    return f"SELECT NULL::VARCHAR AS {group.entity_column}, {stats}, NULL::BIGINT AS cutoff_ms WHERE FALSE"


def register_snapshots(con: duckdb.DuckDBPyConnection, offline_dir: Path, start_ms: int, end_ms: int,
                       registry: Registry) -> tuple[int, ...]:
    """Each batch group's snapshot rows and the as-of tables of each distinct publication history; returns which
    history each group follows (`offline_sql.training_sql`)."""
    sets, histories = asof_plan(offline_dir, registry)
    for k, pubs in enumerate(histories):
        days_name, cutoffs_name = sql.asof_views(k)
        snap_days, snap_cutoffs = snapshot_tables(offline_dir, start_ms, end_ms, pubs=pubs)
        con.register(days_name, snap_days)
        con.register(cutoffs_name, snap_cutoffs)
    for g in registry.batch_groups:
        snaps = read_snapshots(offline_dir, g.name)
        cols = ", ".join([g.entity_column, *(sql.SNAPSHOT_STATS[k] for k in g.stats), "cutoff_ms"])
        body = (f"SELECT {cols} FROM read_parquet({[str(p) for p in snaps]!r}, union_by_name = true)" if snaps
                else empty_snapshots_sql(g))
        con.execute(f"CREATE OR REPLACE TEMP VIEW {sql.snap_view(g)} AS {body}")
    return sets


def training_query(con: duckdb.DuckDBPyConnection, offline_dir: Path, start_ms: int, end_ms: int,
                   registry: Registry = REGISTRY) -> str:
    """Register the snapshots, materialize the stream features (`f10`) and return the training rows' query."""
    sets = register_snapshots(con, offline_dir, start_ms, end_ms, registry)
    for name, step in sql.stream_features_steps(start_ms, end_ms, registry, out="f10"):
        con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS {step}")
    con.execute(f"DROP TABLE IF EXISTS {sql.STREAM_FRAMES}")
    return f"SELECT * FROM ({sql.training_sql('f10', registry, sets)}) t ORDER BY ts, card, txn_id"


def training_set_duckdb(con: duckdb.DuckDBPyConnection, offline_dir: Path, start_ms: int, end_ms: int,
                        registry: Registry = REGISTRY) -> pd.DataFrame:
    """Point-in-time training rows for transactions with ts in [start_ms, end_ms)."""
    # Through Arrow: DuckDB's own pandas conversion of 5M rows with string columns is ~3x slower.
    result = con.sql(training_query(con, offline_dir, start_ms, end_ms, registry)).arrow()
    table = result.read_all() if hasattr(result, "read_all") else result
    return finish_training_frame(table.to_pandas(), registry)


def write_training_set_duckdb(con: duckdb.DuckDBPyConnection, offline_dir: Path, start_ms: int, end_ms: int,
                              out: Path, registry: Registry = REGISTRY) -> int:
    """The training rows streamed to one Parquet file (atomically: temp file + rename); returns the row count.

    The file is what `write_frame(training_set_duckdb(...))` writes (same columns, types and pandas metadata),
    built batch by batch: only the ratios' operands become NumPy arrays, for the one shared ratio function; the
    strings never become Python objects, and the set never has to fit in memory as a frame."""
    out = Path(out)
    if out.is_dir():
        raise OfflineError(f"cannot write {out}: it is a folder; give a file path such as {out / 'training.parquet'}")
    result = con.sql(training_query(con, offline_dir, start_ms, end_ms, registry)).arrow()
    reader = result if hasattr(result, "read_next_batch") else result.to_reader()
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    rows, writer = 0, None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Parquet encoding (most of the time, and it releases the GIL) runs on its own thread, in order, while
        # this one fetches and finishes the next batches; at most `WRITE_AHEAD` finished batches wait.
        with ThreadPoolExecutor(1, thread_name_prefix="training-write") as pool:
            pending: deque[Future] = deque()
            for batch in reader:
                if not batch.num_rows:
                    continue
                if writer is None:  # the schema of the frame path, from one finished row
                    schema = pa.Schema.from_pandas(
                        finish_training_frame(batch.slice(0, 1).to_pandas(), registry), preserve_index=False)
                finished = finish_training_batch(batch, schema, registry)
                if writer is None:  # dictionaries only for the columns that repeat, judged on the first batch
                    writer = pq.ParquetWriter(tmp, schema, use_dictionary=dictionary_columns(finished))
                pending.append(pool.submit(writer.write_batch, finished))
                rows += batch.num_rows
                while len(pending) > WRITE_AHEAD:
                    pending.popleft().result()
            for done in pending:
                done.result()
        if writer is None:
            return 0  # nothing to write (the caller says so)
        writer.close()
        os.replace(tmp, out)
    except OSError as exc:
        raise OfflineError(f"cannot write {out} ({exc.strerror or exc}); nothing was written: choose a writable "
                           "path (or free disk space) and rerun") from None
    finally:
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return rows


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

