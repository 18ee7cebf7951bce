"""Reading a transaction history file, with clear errors before anything is produced."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

REQUIRED = {"txn_id": "string", "cc_num": "string", "amount": "number", "ts": "integer",
            "merchant": "string", "category": "string"}


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


def load_history(path: Path) -> pa.Table:
    """Read and check a history file: columns and types of SPEC section 2, positive amounts, unique ids.

    Its row order is its stream order (SPEC section 4), whatever the timestamps say: it need not be sorted.
    """
    table = read_table(path)
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise HistoryError(f"{path}: missing column(s) {', '.join(missing)} (have: {', '.join(table.column_names)})")
    for col, want in REQUIRED.items():
        got = _kind(table.schema.field(col).type)
        if got != want and not (want == "number" and got == "integer"):
            raise HistoryError(f"{path}: column {col} should be {want}, found {table.schema.field(col).type}")
    if table.num_rows == 0:
        raise HistoryError(f"{path}: has no rows")
    for col in REQUIRED:
        if table.column(col).null_count:
            raise HistoryError(f"{path}: column {col} has {table.column(col).null_count} empty value(s)")
    amount = pc.cast(table.column("amount"), pa.float64())
    if pc.any(pc.less_equal(amount, 0)).as_py() or not pc.all(pc.is_finite(amount)).as_py():
        raise HistoryError(f"{path}: amounts must be finite and > 0")
    if pc.count_distinct(table.column("txn_id")).as_py() != table.num_rows:
        raise HistoryError(f"{path}: txn_id values are not unique")
    return table
