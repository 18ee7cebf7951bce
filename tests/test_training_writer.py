"""DuckDB's streamed training-set writer (`velocity features training-set --out`, the bench's path) writes what the
frame path returns: the same rows, values, column order and Parquet types, ratios included."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.engines import build_training_set, open_engine, run_snapshots
from stores.offline_files import OfflineError, write_frame
from tests import synthetic

SECRET = "writer-secret"
DAYS = [dt.date(2020, 1, d) for d in range(2, 9)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("writer")
    rows = synthetic.history(n=1500, cards=20, seed=5, mean_gap_ms=300_000, late=10, disorder=40)
    path = root / "history.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    eng = open_engine("duckdb", offline_dir=root, history=path, secret=SECRET)
    run_snapshots(eng, DAYS, offline_dir=root, quality=None)  # the writer is under test, not the gate
    yield eng, root
    eng.close()


@pytest.mark.unit
def test_streamed_file_equals_the_frame_written_whole(engine):
    eng, root = engine
    start, end = dt.date(2020, 1, 1), dt.date(2020, 2, 1)
    frame = build_training_set(eng, start, end, None)
    rows = build_training_set(eng, start, end, root / "streamed.parquet")
    write_frame(frame, root / "whole.parquet")
    assert rows == len(frame) > 1000
    streamed, whole = pq.read_table(root / "streamed.parquet"), pq.read_table(root / "whole.parquet")
    assert streamed.schema.equals(whole.schema, check_metadata=True)
    assert streamed.equals(whole)
    pd.testing.assert_frame_equal(pd.read_parquet(root / "streamed.parquet"), frame)
    assert frame["amt_ratio1"].notna().sum() > 100 and frame["amt_ratio1"].isna().any()


@pytest.mark.unit
def test_streamed_writer_errors_are_clear_and_leave_nothing(engine, tmp_path):
    eng, _ = engine
    (tmp_path / "folder").mkdir()
    with pytest.raises(OfflineError, match="cannot write .*folder: it is a folder"):
        build_training_set(eng, dt.date(2020, 1, 2), dt.date(2020, 1, 5), tmp_path / "folder")
    with pytest.raises(OfflineError, match=r"no transactions in \[2021-01-01, 2021-01-05\)"):
        build_training_set(eng, dt.date(2021, 1, 1), dt.date(2021, 1, 5), tmp_path / "none.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def _dictionary_encoded(path) -> dict[str, bool]:
    """Per column of the file's first row group: is it dictionary-encoded?"""
    group = pq.ParquetFile(path).metadata.row_group(0)
    return {group.column(i).path_in_schema: any("DICTIONARY" in e for e in group.column(i).encodings)
            for i in range(group.num_columns)}


@pytest.mark.unit
def test_only_the_columns_that_repeat_get_a_parquet_dictionary(engine):
    eng, root = engine
    out = root / "encodings.parquet"
    build_training_set(eng, dt.date(2020, 1, 1), dt.date(2020, 2, 1), out)
    encoded = _dictionary_encoded(out)
    table = pq.read_table(out)
    for name in ("txn_id", "ts"):  # mostly distinct values: a dictionary would only cost
        assert len(table[name].unique()) >= table.num_rows / 2
        assert not encoded[name], name
    for name in ("card", "merchant", "fraud_label", "num_trans_last_10m"):  # few values, many rows
        assert len(table[name].unique()) < table.num_rows / 2
        assert encoded[name], name
