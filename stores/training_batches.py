"""Training rows finished in Arrow for both engines: the ratio and event-time columns by the shared functions
(`featurestore.ratios`, `.event_time`), from the same inputs (`derived_inputs`, `derived_columns`). DuckDB's writer
finishes whole batches (`finish_training_batch`: every column in the training schema's order and types); Spark
hands only the inputs to one Arrow UDF (`stores.spark_offline.with_derived`). Only the ratios' operands become
NumPy arrays; the string columns (ids, keys) never become Python objects, which was most of a seed-scale training
set's conversion time."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from featurestore.definitions import REGISTRY, Registry
from featurestore.event_time import event_time_columns
from featurestore.ratios import compute_ratio_columns


def finish_training_batch(batch: pa.RecordBatch, schema: pa.Schema, registry: Registry = REGISTRY) -> pa.RecordBatch:
    """`batch` (the training query's columns) with the ratios added, as `schema` (names, order and types of
    `offline_sql.training_columns`), as `offline_files.finish_training_frame` does for a frame."""
    derived = derived_columns({n: batch.column(n) for n in derived_inputs(registry)}, schema, registry)
    columns = [derived[f.name] if f.name in derived else _nan_as_null(batch.column(f.name).cast(f.type))
               for f in schema]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def derived_inputs(registry: Registry = REGISTRY) -> list[str]:
    """The training query's columns the derived features are computed from: the ratios' operands and `ts`."""
    operands = {n for r in registry.ratios for n in (r.numerator, r.denominator)}
    return [*sorted(operands), "ts"]


def derived_columns(inputs: dict[str, pa.Array], schema: pa.Schema,
                    registry: Registry = REGISTRY) -> dict[str, pa.Array]:
    """The ratio and event-time columns (a missing value null, as `schema` types them), by the shared functions,
    from `derived_inputs`' columns."""
    numbers = {n: inputs[n].to_numpy(zero_copy_only=False) for n in derived_inputs(registry)}
    values = compute_ratio_columns(numbers, registry.ratios)
    values.update(event_time_columns(numbers["ts"], registry.event_time))
    return {name: pa.array(v, schema.field(name).type, from_pandas=True) for name, v in values.items()}


def _nan_as_null(column: pa.Array) -> pa.Array:
    """A missing float is null in the file, as pandas' conversion (`Table.from_pandas`) writes NaN."""
    if not pa.types.is_floating(column.type):
        return column
    return pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)


#: A column whose sample is at least this fraction distinct values is written plain, without a dictionary.
MOSTLY_DISTINCT = 0.5


def dictionary_columns(batch: pa.RecordBatch, mostly_distinct: float = MOSTLY_DISTINCT) -> list[str]:
    """The columns worth a Parquet dictionary, judged on one batch: those that repeat their values.

    A dictionary pays when values repeat (keys, counts, rates); for a column of mostly distinct values (txn_id,
    ts, the amount ratios) the writer builds one, finds it too large and falls back to plain encoding: all cost,
    no saving. On the seed-scale training set, writing only the repeating columns with a dictionary took 5.2-5.9 s
    instead of 6.2-8.2 s, and the file is smaller (311 against 350 MB): bench/RESULTS.md.
    """
    rows = batch.num_rows
    return [name for name, column in zip(batch.schema.names, batch.columns, strict=True)
            if rows == 0 or pc.count_distinct(column, mode="all").as_py() < mostly_distinct * rows]
