"""Entity-key rotation in the offline store: rewrite the card column of every file that holds one, old key -> new
key, each file atomically (temp file + rename, same name), so a reader sees a file before or after, never half.

What holds card keys (stores/offline_files.py has the layout): the archive (`archive/date=*/*.parquet`, column
`card`), every card-entity batch group's snapshots (`snapshots/<group>/cutoff=*/part-0.parquet`, its entity column)
and any label file with a `card` column (labels are keyed by `txn_id` today: none). Idempotent: a file holding no
old key is left untouched, so a rerun rewrites nothing it already did.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurestore.definitions import REGISTRY, Registry


@dataclass
class OfflineRekeyStats:
    """Files looked at, files rewritten (or to rewrite, for a dry run), rows whose key changed."""

    files: int = 0
    files_rewritten: int = 0
    rows_rekeyed: int = 0


def card_files(offline_dir: Path, registry: Registry = REGISTRY) -> list[tuple[Path, str]]:
    """Every offline file that may hold card keys, with the column holding them."""
    root = Path(offline_dir)
    out = [(p, "card") for p in sorted((root / "archive").glob("date=*/*.parquet"))]
    for g in registry.batch_groups:
        if g.entity == "card":
            col = g.entity_column
            out += [(p, col) for p in sorted((root / "snapshots" / g.name).glob("cutoff=*/part-0.parquet"))]
    out += [(p, "card") for p in sorted((root / "labels").glob("date=*/*.parquet"))]
    return [(p, c) for p, c in out if not p.name.startswith(".")]


def rekey_table(table: pa.Table, column: str, old: pa.Array, new: pa.Array) -> tuple[pa.Table, int]:
    """`table` with `column`'s old keys replaced by the new ones (vectorized); and how many rows changed."""
    if column not in table.column_names:
        return table, 0
    col = table.column(column).combine_chunks()
    idx = pc.index_in(col, value_set=old)
    changed = len(idx) - idx.null_count
    if not changed:
        return table, 0
    mapped = new.take(pc.fill_null(idx, 0))
    replaced = pc.if_else(pc.is_valid(idx), mapped, col).cast(table.schema.field(column).type)
    return table.set_column(table.schema.get_field_index(column), table.schema.field(column), replaced), changed


def rekey_offline(offline_dir: Path, mapping: Mapping[str, str], *, dry_run: bool = False,
                  registry: Registry = REGISTRY,
                  on_progress: Callable[[int, int], None] | None = None) -> OfflineRekeyStats:
    """Rewrite every offline file's card keys by `mapping` (old key -> new key); `dry_run` only counts."""
    old = pa.array(list(mapping), pa.string())
    new = pa.array(list(mapping.values()), pa.string())
    files = card_files(offline_dir, registry)
    stats = OfflineRekeyStats(files=len(files))
    for n, (path, column) in enumerate(files, 1):
        meta = pq.read_metadata(path)
        if column in meta.schema.names:
            table = pq.read_table(path)
            out, changed = rekey_table(table, column, old, new)
            if changed:
                stats.files_rewritten += 1
                stats.rows_rekeyed += changed
                if not dry_run:
                    _replace(path, out, meta)
        if on_progress:
            on_progress(n, len(files))
    return stats


def _replace(path: Path, table: pa.Table, meta: pq.FileMetaData) -> None:
    """Write `table` over `path` atomically, with the file's compression."""
    compression = "snappy"
    if meta.num_row_groups and meta.row_group(0).num_columns:
        compression = meta.row_group(0).column(0).compression.lower()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(table, tmp, compression=None if compression == "uncompressed" else compression)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
