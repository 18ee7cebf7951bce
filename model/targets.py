"""The training target: each transaction's label as known when training runs.

Label versions come from the offline label store (`stores.labels.read_labels`: the `labels` stream's archive and
analysts' verdicts) and, when training from a history file, from its inline `labeled_at` column
(`stores.labels.history_labels`). A row's target is its latest version with `labeled_at` <= the training time,
fraud winning a tie (`stores.labels.latest_labels_sql`); a row with no version known by then keeps its inline
`fraud_label` (a history without a label stream, or a label that arrives after the run). The report says how many
rows each source decided.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stores.labels import LABELS_SCHEMA, history_labels, latest_labels_sql, read_labels


@dataclass
class Target:
    """What decided the target of each training row, for the report."""

    as_of_ms: int
    versions: int = 0  # label versions read (all sources)
    versions_after: int = 0  # of those, known only after as_of_ms (ignored)
    from_labels: int = 0  # rows whose target is a label version
    changed: int = 0  # of those, rows where it differs from the inline fraud_label
    from_inline: int = 0  # rows that kept the inline fraud_label
    sources: list[str] = field(default_factory=list)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.as_of_ms / 1000))
        if not self.versions:
            return (f"the inline fraud_label of all {self.from_inline:,} rows (no label versions: no label store, and "
                    f"no history with a labeled_at column; labels as of {when})")
        src = " and ".join(self.sources) or "no label source"
        return (f"latest label known at {when} ({src}: {self.versions:,} versions, {self.versions_after:,} known only "
                f"later and ignored) for {self.from_labels:,} rows ({self.changed:,} differ from the inline label); "
                f"the inline fraud_label for the other {self.from_inline:,}")

    def to_dict(self) -> dict:
        return {"as_of_ms": self.as_of_ms, "versions": self.versions, "versions_after": self.versions_after,
                "from_labels": self.from_labels, "changed": self.changed, "from_inline": self.from_inline,
                "sources": self.sources, "rule": "latest labeled_at <= as_of (fraud wins a tie), else inline"}


def _history_versions(history: Path) -> pa.Table:
    """A history's inline label versions, reading only the label columns of a Parquet file."""
    history = Path(history)
    if history.suffix.lower() != ".csv":
        import pyarrow.parquet as pq

        names = pq.read_schema(history).names
        if "labeled_at" not in names:
            return LABELS_SCHEMA.empty_table()
        if "fraud_label" not in names:
            from stores.history import HistoryError, label_time_without_label

            raise HistoryError(label_time_without_label(history))
        import pyarrow.dataset as ds

        # Only labeled rows (the frauds: a few thousand of millions) are read in full.
        table = ds.dataset(str(history), format="parquet").to_table(
            columns=["txn_id", "fraud_label", "labeled_at"], filter=ds.field("labeled_at").is_valid())
    else:
        from stores.history import read_table

        table = read_table(history)
        if "labeled_at" not in table.column_names:
            return LABELS_SCHEMA.empty_table()
        if "fraud_label" not in table.column_names:
            from stores.history import HistoryError, label_time_without_label

            raise HistoryError(label_time_without_label(history))
    if "labeled_at" in table.column_names and pa.types.is_null(table.column("labeled_at").type):
        return LABELS_SCHEMA.empty_table()  # a CSV column that is empty on every row
    return history_labels(table)


def label_versions(offline_dir: Path | None, history: Path | None) -> tuple[pa.Table, list[str]]:
    """Every label version from the label store under `offline_dir` and the history's inline column."""
    parts, sources = [], []
    if offline_dir is not None:
        stored = read_labels(offline_dir)
        if stored.num_rows:
            parts.append(stored)
            sources.append("the label store")
    if history is not None:
        inline = _history_versions(history)
        if inline.num_rows:
            parts.append(inline)
            sources.append("the history's labeled_at column")
    return (pa.concat_tables(parts) if parts else LABELS_SCHEMA.empty_table()), sources


def resolve(versions: pa.Table, as_of_ms: int) -> pa.Table:
    """Each txn_id's latest version with labeled_at <= as_of_ms (fraud wins a tie), by the label store's SQL."""
    import duckdb

    con = duckdb.connect()
    try:
        con.register("versions", versions)
        return con.sql(latest_labels_sql("versions", str(int(as_of_ms)))).to_arrow_table()
    finally:
        con.close()


def apply(txn_id: pa.Array, inline: np.ndarray, versions: pa.Table, as_of_ms: int,
          sources: list[str] | None = None) -> tuple[np.ndarray, Target]:
    """The target per row (float64, NaN where neither a known version nor an inline label exists)."""
    target = Target(as_of_ms=int(as_of_ms), versions=versions.num_rows, sources=list(sources or []))
    y = np.asarray(inline, dtype=np.float64).copy()
    if versions.num_rows:
        target.versions_after = int(pc.sum(pc.greater(versions.column("labeled_at"), as_of_ms)).as_py() or 0)
        known = resolve(versions, as_of_ms)
        if known.num_rows:
            idx = pc.index_in(txn_id, value_set=known.column("txn_id").combine_chunks())
            hit = pc.is_valid(idx).to_numpy(zero_copy_only=False)
            pos = pc.fill_null(idx, 0).to_numpy(zero_copy_only=False)
            label = known.column("fraud_label").to_numpy().astype(np.float64)[pos[hit]]
            target.from_labels = int(hit.sum())
            target.changed = int(np.sum(label != y[hit]))
            y[hit] = label
    target.from_inline = int(np.sum(~np.isnan(y))) - target.from_labels
    return y, target
