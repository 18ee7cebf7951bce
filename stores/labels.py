"""The offline label store: every fraud-label version ever received, append-only, Parquet by the date it became
known.

A label is `{"txn_id", "fraud_label", "labeled_at"}` (epoch ms): a chargeback, a customer's complaint or an
analyst's verdict, known days or weeks after the transaction. Versions are never overwritten: for any cut-off C
the label of a transaction is its latest version with `labeled_at` <= C (SPEC section 4); two versions with the
same `labeled_at` resolve to the fraud one (`fraud_label` 1 wins a tie), so the answer never depends on file
order.

Layout (root = `$VELOCITY_DATA_DIR/offline`): `labels/date=YYYY-MM-DD/*.parquet`, the date of `labeled_at` (UTC).
A generated history carries its labels inline instead: a nullable `labeled_at` column beside `fraud_label`
(null = never labeled); `history_labels` turns those rows into label versions, so both sources read alike.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stores.archive import check_parquet_files, visible_files

LABELS_SCHEMA = pa.schema([
    ("txn_id", pa.string()),
    ("fraud_label", pa.int8()),
    ("labeled_at", pa.int64()),
])
LABEL_COLUMNS = tuple(LABELS_SCHEMA.names)
DAY_MS = 86_400_000


def labels_dir(offline_dir: Path) -> Path:
    return Path(offline_dir) / "labels"


def write_labels(offline_dir: Path, rows: pa.Table | Iterable[dict]) -> int:
    """Append label versions, one new file per date of `labeled_at`, each written atomically (temp + rename).

    Rows are validated by the caller (streaming/labels or the API); this only refuses a wrong schema. Returns the
    number of rows written.
    """
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows), schema=LABELS_SCHEMA)
    table = table.select(list(LABEL_COLUMNS)).cast(LABELS_SCHEMA)
    if not table.num_rows:
        return 0
    root = labels_dir(offline_dir)
    days = pc.divide(table.column("labeled_at"), pa.scalar(DAY_MS, pa.int64()))
    name = f"part-{os.getpid()}-{time.time_ns():x}-{uuid.uuid4().hex[:6]}.parquet"
    for day in pc.unique(days).to_pylist():
        part = table.filter(pc.equal(days, day))
        out_dir = root / f"date={time.strftime('%Y-%m-%d', time.gmtime(day * DAY_MS // 1000))}"
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{name}.tmp"
        pq.write_table(part, tmp, compression="zstd")
        os.replace(tmp, out_dir / name)
    return table.num_rows


def label_files(offline_dir: Path) -> list[Path]:
    """The label store's Parquet files, sorted, each footer checked (ArchiveError names an unreadable one)."""
    root = labels_dir(offline_dir)
    listed = [f for day in sorted(p for p in root.glob("date=*") if p.is_dir()) for f in visible_files(day)]
    return check_parquet_files(listed, what="label file")


def history_labels(table: pa.Table) -> pa.Table:
    """A history's inline labels as label versions: rows whose `labeled_at` is set. A history without the column
    has none (its inline `fraud_label` is the training target, known to the trainer only)."""
    if "labeled_at" not in table.column_names:
        return LABELS_SCHEMA.empty_table()
    known = table.filter(pc.is_valid(table.column("labeled_at")))
    return known.select(list(LABEL_COLUMNS)).cast(LABELS_SCHEMA)


def read_labels(offline_dir: Path) -> pa.Table:
    """Every stored label version (not resolved: see `latest_labels_sql`)."""
    files = label_files(offline_dir)
    if not files:
        return LABELS_SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(f).select(list(LABEL_COLUMNS)).cast(LABELS_SCHEMA) for f in files)


def latest_labels_sql(source: str, cutoff_expr: str | None = None) -> str:
    """SQL (DuckDB and Spark alike): each txn_id's label as known at `cutoff_expr` (all versions when None) from a
    relation `source(txn_id, fraud_label, labeled_at)`: the latest `labeled_at` <= the cut-off, fraud winning a
    tie."""
    where = "" if cutoff_expr is None else f"WHERE labeled_at <= {cutoff_expr}"
    return f"""
    SELECT txn_id, fraud_label, labeled_at FROM (
        SELECT txn_id, fraud_label, labeled_at,
               ROW_NUMBER() OVER (PARTITION BY txn_id ORDER BY labeled_at DESC, fraud_label DESC) AS rn
        FROM {source} {where}
    ) v WHERE rn = 1
    """
