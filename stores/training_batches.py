"""Training rows finished batch by batch in Arrow, for both engines' writers (DuckDB's Parquet file, Spark's
`mapInArrow`): the ratio and event-time columns by the shared functions (`featurestore.ratios`, `.event_time`),
the columns in the training schema's order and types. Only the ratios' operands become NumPy arrays; the string columns (ids, keys) never
become Python objects, which was most of a seed-scale training set's conversion time."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from featurestore.definitions import REGISTRY, Registry
from featurestore.event_time import event_time_columns
from featurestore.ratios import compute_ratio_columns


def finish_training_batch(batch: pa.RecordBatch, schema: pa.Schema, registry: Registry = REGISTRY) -> pa.RecordBatch:
    """`batch` (the training query's columns) with the ratios added, as `schema` (names, order and types of
    `offline_sql.training_columns`), as `offline_files.finish_training_frame` does for a frame."""
    operands = {n for r in registry.ratios for n in (r.numerator, r.denominator)}
    numbers = {n: batch.column(n).to_numpy(zero_copy_only=False) for n in operands}
    ratios = compute_ratio_columns(numbers, registry.ratios)
    ratios.update(event_time_columns(batch.column("ts").to_numpy(zero_copy_only=False), registry.event_time))
    columns = [pa.array(ratios[f.name], f.type, from_pandas=True) if f.name in ratios
               else _nan_as_null(batch.column(f.name).cast(f.type)) for f in schema]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _nan_as_null(column: pa.Array) -> pa.Array:
    """A missing float is null in the file, as pandas' conversion (`Table.from_pandas`) writes NaN."""
    if not pa.types.is_floating(column.type):
        return column
    return pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
