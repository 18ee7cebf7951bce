"""The offline store: Parquet files under one root, and the DuckDB engine over them.

Layout (root = `$VELOCITY_DATA_DIR/offline`):
- `archive/date=YYYY-MM-DD/*.parquet` — every transaction that flowed through the stream (featurestore.archive)
- `snapshots/card_agg_1w/cutoff=YYYY-MM-DD/part-0.parquet` — one nightly 1-week snapshot per cut-off
- training sets wherever `--out` puts them.
Both engines read events through the same definitions (`featurestore.offline_sql`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from featurestore import offline_sql as sql
from featurestore.archive import ArchiveError, archive_dir, archive_files
from featurestore.definitions import DEFAULT_ALLOWED_LATENESS_MS, REGISTRY, FeatureGroup, Registry
from featurestore.entity import EntityKeyer
from featurestore.ratios import compute_ratio_columns

DAY_MS = 86_400_000
SNAPSHOT_GROUP = "card_agg_1w"


class OfflineError(ValueError):
    """Bad or missing offline input; the message says what and where."""


def cutoff_ms_of(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)


def snapshot_dir(offline_dir: Path) -> Path:
    return Path(offline_dir) / "snapshots" / SNAPSHOT_GROUP


def snapshot_path(offline_dir: Path, day: dt.date) -> Path:
    return snapshot_dir(offline_dir) / f"cutoff={day.isoformat()}" / "part-0.parquet"


# ------------------------------------------------------------------ events


def pan_keys(pans: list[str], secret: str) -> list[str]:
    keyer = EntityKeyer(secret)
    return [keyer(p) for p in pans]


def events_from_history(table: pa.Table, secret: str) -> pa.Table:
    import pyarrow.compute as pc

    enc = pc.dictionary_encode(table.column("cc_num")).combine_chunks()
    keys = pa.array(pan_keys(enc.dictionary.to_pylist(), secret), pa.string())
    amount = pc.cast(table.column("amount"), pa.float64())
    cents = pc.cast(pc.round(pc.multiply(amount, 100.0)), pa.int64())
    label = table.column("fraud_label") if "fraud_label" in table.column_names else pa.nulls(table.num_rows, pa.int8())
    return pa.table({
        "txn_id": table.column("txn_id"), "card": keys.take(enc.indices), "amount": amount,
        "amount_cents": cents, "ts": pc.cast(table.column("ts"), pa.int64()),
        "fraud_label": pc.cast(label, pa.int8()), "late": pa.array(np.zeros(table.num_rows, dtype=bool)),
        "seq": pa.array(np.arange(table.num_rows, dtype=np.int64)),  # row order is stream order
        "arrived_ms": pc.cast(table.column("ts"), pa.int64()),  # a history's rows arrive at their event time
    })


def load_events(con: duckdb.DuckDBPyConnection, *, offline_dir: Path, history: Path | None, secret: str,
                allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS) -> int:
    """Create the deduplicated `events` view in `con`; returns its row count. Raises OfflineError when empty.

    A history file's rows are its stream, in row order; late ones are marked as the worker would mark them.
    The archive holds what flowed through the stream, with the worker's arrival positions and late flags.
    """
    if history is not None:
        from featurestore.history import HistoryError, load_history

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


# ------------------------------------------------------------------ snapshots


def write_snapshot_file(frame: pd.DataFrame | pa.Table, offline_dir: Path, day: dt.date, published_ms: int) -> int:
    """Write one cut-off's snapshot with its publication time; a rerun replaces the file atomically (temp file +
    rename) and keeps the first publication time (readers have used the cut-off since then). Returns the
    publication time recorded."""
    final = snapshot_path(offline_dir, day)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        with contextlib.suppress(Exception):  # an unreadable old file is simply replaced
            published_ms = min(published_ms, int(pq.read_table(final, columns=["published_ms"])[0][0].as_py()))
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    if "published_ms" in table.column_names:
        table = table.drop(["published_ms"])
    table = table.append_column("published_ms", pa.array(np.full(table.num_rows, published_ms, dtype=np.int64)))
    tmp = final.with_name(f".part-0.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return published_ms


def snapshot_publications(offline_dir: Path) -> dict[int, int]:
    """cut-off ms -> published ms of every snapshot in the offline store (an empty snapshot: nothing to join)."""
    out = {}
    for path in read_snapshots(offline_dir):
        table = pq.read_table(path, columns=["cutoff_ms", "published_ms"])
        if table.num_rows:
            out[int(table["cutoff_ms"][0].as_py())] = int(table["published_ms"][0].as_py())
    return out


def snapshot_tables(offline_dir: Path, start_ms: int, end_ms: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two small tables `offline_sql.asof_sql` joins: `snap_days(day, c1, p1)` for the days of
    [start_ms, end_ms) (the latest cut-off at or before the day's midnight and its publication time) and
    `snap_cutoffs(cutoff_ms, published_ms)`. Built here once for both engines."""
    pubs = snapshot_publications(offline_dir)
    cutoffs = np.array(sorted(pubs), dtype=np.int64)
    days = np.arange(start_ms // DAY_MS, (end_ms - 1) // DAY_MS + 1, dtype=np.int64)
    pos = np.searchsorted(cutoffs, days * DAY_MS, side="right") - 1
    have = pos >= 0
    c1 = cutoffs[pos[have]] if len(cutoffs) else np.array([], dtype=np.int64)
    snap_days = pd.DataFrame({"day": days[have], "c1": c1,
                              "p1": np.array([pubs[int(c)] for c in c1], dtype=np.int64)})
    snap_cutoffs = pd.DataFrame({"cutoff_ms": cutoffs, "published_ms": np.array([pubs[int(c)] for c in cutoffs],
                                                                               dtype=np.int64)})
    return snap_days, snap_cutoffs


def week_days(days: list[dt.date], group: FeatureGroup = REGISTRY.batch_group) -> pd.DataFrame:
    """`week_days(day, cutoff_ms)`: for each run date's cut-off C, the UTC day numbers of [C - window, C)."""
    span = group.window_ms // DAY_MS
    cutoffs = np.array([cutoff_ms_of(d) for d in days], dtype=np.int64)
    before = [c // DAY_MS - np.arange(1, span + 1) for c in cutoffs]
    return pd.DataFrame({"day": np.concatenate(before).astype(np.int64) if before else np.array([], dtype=np.int64),
                         "cutoff_ms": np.repeat(cutoffs, span)})


def split_snapshots(frame: pd.DataFrame, days: list[dt.date]) -> list[tuple[dt.date, pd.DataFrame]]:
    """One frame per night, in `days` order, sorted by card (a night without rows gets an empty frame)."""
    frame = frame.sort_values(["cutoff_ms", "card"], kind="stable")
    groups = {int(c): g.reset_index(drop=True) for c, g in frame.groupby("cutoff_ms", sort=False)}
    return [(d, groups.get(cutoff_ms_of(d), frame.iloc[0:0])) for d in days]


def snapshots_duckdb(con: duckdb.DuckDBPyConnection, days: list[dt.date],
                     registry: Registry = REGISTRY) -> list[tuple[dt.date, pd.DataFrame]]:
    con.register("week_days", week_days(days, registry.batch_group))
    result = con.sql(sql.snapshots_sql(registry.batch_group)).arrow()
    table = result.read_all() if hasattr(result, "read_all") else result
    return split_snapshots(table.to_pandas(), days)


def read_snapshots(offline_dir: Path) -> list[Path]:
    return sorted(snapshot_dir(offline_dir).glob("cutoff=*/part-0.parquet"))


def events_span(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    return con.execute("SELECT MIN(ts), MAX(ts) FROM events").fetchall()[0]


# ------------------------------------------------------------------ training set


def add_ratios(frame: pd.DataFrame, registry: Registry = REGISTRY) -> pd.DataFrame:
    """The ratio columns, by the one function the scorer also calls."""
    for name, values in compute_ratio_columns(frame, registry.ratios).items():
        frame[name] = values
    return frame


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


def finish_training_frame(frame: pd.DataFrame, registry: Registry = REGISTRY) -> pd.DataFrame:
    """Types as the schema says (batch features are float: NaN before the first snapshot), then the ratios."""
    for name in registry.batch_group.feature_names:
        frame[name] = frame[name].astype("float64")
    frame["snapshot_cutoff_ms"] = frame["snapshot_cutoff_ms"].astype("Int64")
    frame["fraud_label"] = frame["fraud_label"].astype("Int8")
    frame = add_ratios(frame, registry)
    return frame[list(sql.training_columns(registry))].reset_index(drop=True)


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


def write_frame(frame: pd.DataFrame, out: Path) -> Path:
    """Write `frame` as one Parquet file, atomically (temp file + rename): a failed write leaves nothing behind.

    Raises OfflineError, naming the path, when it cannot be written (a folder, a path under a regular file, no
    permission, a full disk); the temporary file is removed whatever happens.
    """
    import contextlib

    out = Path(out)
    if out.is_dir():
        raise OfflineError(f"cannot write {out}: it is a folder; give a file path such as {out / 'training.parquet'}")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
        os.replace(tmp, out)
    except OSError as exc:
        raise OfflineError(f"cannot write {out} ({exc.strerror or exc}); nothing was written: choose a writable "
                           "path (or free disk space) and rerun") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return out
