"""Reading a transaction history file, with clear errors before anything is produced."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

REQUIRED = {"txn_id": "string", "cc_num": "string", "amount": "number", "ts": "integer",
            "merchant": "string", "category": "string"}
#: Columns a history may have, checked only when present: the inline label's time (epoch ms, null = never labeled).
OPTIONAL = {"labeled_at": "integer"}


class HistoryError(ValueError):
    """The history file cannot be used; the message names the file and the problem."""


def _kind(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    return str(t)


def read_table(path: Path) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise HistoryError(f"{path}: no such file")
    if path.is_dir():
        raise HistoryError(f"{path}: is a directory, expected a Parquet or CSV file")
    try:
        if path.suffix.lower() == ".csv":
            import pyarrow.csv as pacsv

            opts = pacsv.ConvertOptions(column_types={"txn_id": pa.string(), "cc_num": pa.string(),
                                                      "merchant": pa.string(), "category": pa.string()})
            return pacsv.read_csv(path, convert_options=opts)
        import pyarrow.parquet as pq

        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        kind = "CSV" if path.suffix.lower() == ".csv" else "Parquet"
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise HistoryError(f"{path}: cannot be read as {kind} ({reason}); check the file (a .csv suffix is read "
                           "as CSV, anything else as Parquet), or regenerate it with `velocity generate`") from None


def check_schema(path: Path, schema: pa.Schema) -> None:
    """The columns and types of SPEC section 2 (extra columns are fine)."""
    missing = [c for c in REQUIRED if c not in schema.names]
    if missing:
        raise HistoryError(f"{path}: missing column(s) {', '.join(missing)} (have: {', '.join(schema.names)})")
    for col, want in REQUIRED.items():
        got = _kind(schema.field(col).type)
        if got != want and not (want == "number" and got == "integer"):
            raise HistoryError(f"{path}: column {col} should be {want}, found {schema.field(col).type}")
    if "labeled_at" in schema.names and "fraud_label" not in schema.names:
        raise HistoryError(label_time_without_label(path))
    for col, want in OPTIONAL.items():
        field = schema.field(col) if col in schema.names else None
        if field is not None and _kind(field.type) != want and not pa.types.is_null(field.type):
            raise HistoryError(f"{path}: column {col} should be {want} (epoch ms, empty = never labeled), found "
                               f"{schema.field(col).type}")


def label_time_without_label(path: Path) -> str:
    """The one-line refusal of a history that dates labels (labeled_at) but holds none (no fraud_label)."""
    return (f"{path}: has a labeled_at column but no fraud_label column: labeled_at says when each row's "
            "fraud_label became known, so add fraud_label (0/1) or drop labeled_at")


#: What a file reader that globs (DuckDB, Spark's Hadoop paths) takes for a pattern in a file name.
GLOB_CHARACTERS = "*?[]{}"


def engine_cannot_read(path: Path, engine: str, exc: Exception) -> str:
    """The one-line error for a history an engine fails to read after its checks passed (a damaged page, a value
    its types cannot hold): the file, the engine's first line, what to do."""
    first = " ".join(str(exc).split("\n", 1)[0].split())[:300]
    return f"{path}: {engine} cannot read it ({first}); check the file or regenerate it with `velocity generate`"


def counts_sql(source: str) -> str:
    """The counts `check_counts` needs, over a relation of the history's rows, as one SQL text DuckDB and Spark
    both run (the rows are checked where they are, never collected). A NaN amount is counted apart: both engines
    order NaN above every number, so NaN > 0 holds. The distinct ids are counted in a subquery of their own: beside
    the other aggregates, Spark carries all their buffers through its per-id aggregation and shuffle (seed scale,
    `local[2]`: 6.9-8.9 s against 6.2-7.3 s; DuckDB the same either way)."""
    amount = "CAST(amount AS DOUBLE)"
    nulls = ", ".join(f"COUNT_IF({c} IS NULL) AS null_{c}" for c in REQUIRED)
    return (f"SELECT COUNT(*) AS n_rows, (SELECT COUNT(DISTINCT txn_id) FROM {source}) AS n_ids, "
            f"COUNT_IF(NOT ({amount} > 0) OR isnan({amount}) OR {amount} = CAST('Infinity' AS DOUBLE)) AS n_bad, "
            f"{nulls} FROM {source}")


def check_count_row(path: Path, counts: dict) -> None:
    """`check_counts` over the row `counts_sql` returned (column name -> value)."""
    check_counts(path, rows=counts["n_rows"], nulls={c: counts[f"null_{c}"] for c in REQUIRED},
                 bad_amounts=counts["n_bad"], distinct_ids=counts["n_ids"])


def check_counts(path: Path, *, rows: int, nulls: dict[str, int], bad_amounts: int, distinct_ids: int) -> None:
    """The value checks, over counts any engine can compute: no rows, empty values, amounts that are not finite
    and > 0, duplicate ids."""
    if rows == 0:
        raise HistoryError(f"{path}: has no rows")
    for col in REQUIRED:
        if nulls.get(col):
            raise HistoryError(f"{path}: column {col} has {nulls[col]} empty value(s)")
    if bad_amounts:
        raise HistoryError(f"{path}: amounts must be finite and > 0")
    if distinct_ids != rows:
        raise HistoryError(f"{path}: txn_id values are not unique")


def schema_of(path: Path) -> pa.Schema | None:
    """A Parquet file's schema from its footer alone (None for CSV, whose types the reader imposes)."""
    path = Path(path)
    if not path.exists():
        raise HistoryError(f"{path}: no such file")
    if path.is_dir():
        raise HistoryError(f"{path}: is a directory, expected a Parquet or CSV file")
    if path.suffix.lower() == ".csv":
        return None
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise HistoryError(f"{path}: cannot be read as Parquet ({reason}); check the file (a .csv suffix is read "
                           "as CSV, anything else as Parquet), or regenerate it with `velocity generate`") from None


def load_history(path: Path) -> pa.Table:
    """Read and check a history file: columns and types of SPEC section 2, positive amounts, unique ids.

    Its row order is its stream order (SPEC section 4), whatever the timestamps say: it need not be sorted.
    """
    table = read_table(path)
    check_schema(path, table.schema)
    amount = pc.cast(table.column("amount"), pa.float64())
    bad = 0 if table.num_rows == 0 else int(pc.sum(pc.or_(pc.less_equal(amount, 0),
                                                          pc.invert(pc.is_finite(amount)))).as_py() or 0)
    check_counts(path, rows=table.num_rows, nulls={c: table.column(c).null_count for c in REQUIRED},
                 bad_amounts=bad, distinct_ids=distinct_count(table.column("txn_id")))
    return table


def distinct_count(column: pa.ChunkedArray) -> int:
    """How many distinct non-null values a column holds, counted by DuckDB on every core: at seed scale (5.4M
    txn_ids) 0.8-1.0 s, where pyarrow's single-threaded `count_distinct` took 2.4-5.0 s."""
    import duckdb

    con = duckdb.connect()
    try:
        con.register("ids", pa.table({"v": column}))
        return con.execute("SELECT COUNT(DISTINCT v) FROM ids").fetchall()[0][0]
    finally:
        con.close()
