"""The offline store: Parquet files under one root, and the DuckDB engine over them.

Layout (root = `$VELOCITY_DATA_DIR/offline`):
- `archive/date=YYYY-MM-DD/*.parquet` — every transaction that flowed through the stream (featurestore.archive)
- `snapshots/card_agg_1w/cutoff=YYYY-MM-DD/part-0.parquet` — one nightly 1-week snapshot per cut-off
- training sets wherever `--out` puts them.
Both engines read events through the same definitions (`featurestore.offline_sql`).
"""

from __future__ import annotations

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
from featurestore.archive import archive_dir
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
        "seq": pa.array(np.arange(table.num_rows, dtype=np.int64)),
    })


def load_events(con: duckdb.DuckDBPyConnection, *, offline_dir: Path, history: Path | None, secret: str) -> int:
    """Create the deduplicated `events` view in `con`; returns its row count. Raises OfflineError when empty."""
    if history is not None:
        from featurestore.history import HistoryError, load_history

        try:
            table = load_history(history)
        except HistoryError as exc:
            raise OfflineError(str(exc)) from None
        con.register("raw_events", events_from_history(table, secret))
        con.execute(f"CREATE OR REPLACE TEMP VIEW events AS {sql.dedup_sql('raw_events', 'seq')}")
    else:
        files = sorted(str(p) for p in archive_dir(offline_dir).glob("date=*/*.parquet"))
        if not files:
            raise OfflineError(f"no archived transactions under {archive_dir(offline_dir)} "
                               "(run `velocity stream`, or pass --history PATH)")
        con.execute(f"""
            CREATE OR REPLACE TEMP VIEW raw_events AS
            SELECT txn_id, card, amount, amount_cents, ts, fraud_label, late, "offset" AS seq, "partition" AS part
            FROM read_parquet({files!r}, union_by_name = true)""")
        con.execute(f"""CREATE OR REPLACE TEMP VIEW events AS
            {sql.dedup_sql('raw_events', 'part, seq')}""")
    n = con.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    if n == 0:
        raise OfflineError("the history is empty")
    return n


# ------------------------------------------------------------------ snapshots


def write_snapshot_file(frame: pd.DataFrame | pa.Table, offline_dir: Path, day: dt.date) -> Path:
    """Write one cut-off's snapshot; a rerun replaces the file atomically (temp file + rename)."""
    final = snapshot_path(offline_dir, day)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".part-0.{uuid.uuid4().hex[:8]}.tmp")
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def snapshot_duckdb(con: duckdb.DuckDBPyConnection, day: dt.date) -> pd.DataFrame:
    return con.execute(sql.snapshot_1w_sql(cutoff_ms_of(day)) + " ORDER BY card").df()


def read_snapshots(offline_dir: Path) -> list[Path]:
    return sorted(snapshot_dir(offline_dir).glob("cutoff=*/part-0.parquet"))


def events_span(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    return con.execute("SELECT MIN(ts), MAX(ts) FROM events").fetchone()


# ------------------------------------------------------------------ training set


def add_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """The ratio columns, by the one function the scorer also calls."""
    for name, values in compute_ratio_columns(frame).items():
        frame[name] = values
    return frame


def training_set_duckdb(con: duckdb.DuckDBPyConnection, offline_dir: Path, start_ms: int, end_ms: int) -> pd.DataFrame:
    """Point-in-time training rows for transactions with ts in [start_ms, end_ms), via DuckDB's ASOF JOIN."""
    snaps = read_snapshots(offline_dir)
    con.execute(f"CREATE OR REPLACE TEMP VIEW f10 AS {sql.features_10m_sql('events')}")
    if snaps:
        con.execute(f"CREATE OR REPLACE TEMP VIEW snap AS SELECT * FROM read_parquet({[str(p) for p in snaps]!r})")
        con.execute("CREATE OR REPLACE TEMP VIEW cutoffs AS SELECT DISTINCT cutoff_ms FROM snap")
        asof = """(SELECT f.*, c.cutoff_ms AS snapshot_cutoff_ms FROM f10 f
                   ASOF LEFT JOIN cutoffs c ON f.ts >= c.cutoff_ms)"""
        join = "LEFT JOIN snap s ON s.cutoff_ms = f.snapshot_cutoff_ms AND s.card = f.card"
    else:
        con.execute("CREATE OR REPLACE TEMP VIEW snap AS SELECT NULL::VARCHAR AS card, NULL::BIGINT AS "
                    "num_trans_last_1w, NULL::DOUBLE AS avg_amt_last_1w, NULL::BIGINT AS cutoff_ms WHERE FALSE")
        asof = "(SELECT f.*, CAST(NULL AS BIGINT) AS snapshot_cutoff_ms FROM f10 f)"
        join = "LEFT JOIN snap s ON FALSE"
    query = f"""
        SELECT * FROM ({sql.training_select_sql(asof, join)}) t
        WHERE ts >= {start_ms} AND ts < {end_ms}
        ORDER BY ts, card, txn_id
    """
    frame = con.execute(query).df()
    return finish_training_frame(frame)


def finish_training_frame(frame: pd.DataFrame) -> pd.DataFrame:
    frame["num_trans_last_1w"] = frame["num_trans_last_1w"].astype("float64")
    frame["snapshot_cutoff_ms"] = frame["snapshot_cutoff_ms"].astype("Int64")
    frame["fraud_label"] = frame["fraud_label"].astype("Int8")
    frame = add_ratios(frame)
    return frame[list(sql.TRAINING_COLUMNS)].reset_index(drop=True)


def training_set(start: dt.date, end: dt.date, *, offline_dir: Path, history: Path | None = None,
                 secret: str | None = None) -> pd.DataFrame:
    """Python entry point (SPEC section 5): a point-in-time-correct training frame through DuckDB."""
    from featurestore.config import get_settings

    con = duckdb.connect()
    try:
        load_events(con, offline_dir=offline_dir, history=history, secret=secret or get_settings().entity_secret)
        return training_set_duckdb(con, offline_dir, cutoff_ms_of(start), cutoff_ms_of(end))
    finally:
        con.close()


def write_frame(frame: pd.DataFrame, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
    os.replace(tmp, out)
    return out
