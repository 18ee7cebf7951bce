"""Archive compaction and retention keep every reader correct: one that listed the files before, one that lists
them after, and the training set built from the archive (unchanged by compaction)."""

from __future__ import annotations

import datetime as dt
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.engines import open_engine
from stores.archive import ARCHIVE_SCHEMA, archive_dir, archive_files, read_archive
from stores.archive_maintenance import maintain
from stores.offline_files import cutoff_ms_of

pytestmark = pytest.mark.unit
DAY_MS = 86_400_000
DAYS = [dt.date(2020, 3, d) for d in (1, 2, 3)]
CARDS = [f"{c:032x}" for c in range(6)]


def write_parts(root, day: dt.date, parts: int, start: int) -> int:
    """`parts` small files for `day`, each with a few transactions per card; returns the next txn number."""
    n = start
    for part in range(parts):
        rows = []
        for i, card in enumerate(CARDS):
            ts = cutoff_ms_of(day) + (part * 7 + i) * 60_000
            rows.append(dict(txn_id=f"t{n}", card=card, pan_last4="1234", amount=10.0 + n % 7,
                             amount_cents=(10 + n % 7) * 100, ts=ts, merchant="m", category="c", fraud_label=0,
                             late=False, seq=ts * 1000 + i, partition=0, offset=n, archived_ms=ts))
            n += 1
        out = archive_dir(root) / f"date={day}"
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, ARCHIVE_SCHEMA), out / f"part-{n}.parquet")
    return n


def training(root) -> pd.DataFrame:
    eng = open_engine("duckdb", offline_dir=root, history=None, secret="s")
    try:
        return eng.training_set(cutoff_ms_of(DAYS[0]), cutoff_ms_of(DAYS[-1]) + DAY_MS)
    finally:
        eng.close()


def test_compaction_and_retention_change_no_answer_and_break_no_reader(tmp_path):
    n = 0
    for day in DAYS:
        n = write_parts(tmp_path, day, parts=5, start=n)
    original, before_training = read_archive(tmp_path), training(tmp_path)
    listed_before = archive_files(tmp_path)
    t0 = 1_000_000.0

    report = maintain(tmp_path, today=DAYS[-1], retention_days=None, min_files=4, grace_s=3_600, now=t0)
    assert (report.compacted_days, report.files_merged) == (2, 10), "past days merged, today's left alone"
    assert all(p.exists() for p in listed_before), "a reader that listed the files before can still read them"
    assert pd.read_parquet(listed_before).shape[0] == len(original)
    assert len(archive_files(tmp_path)) == 1 + 1 + 5
    pd.testing.assert_frame_equal(read_archive(tmp_path), original)
    pd.testing.assert_frame_equal(training(tmp_path), before_training)

    n = write_parts(tmp_path, DAYS[0], parts=1, start=n)  # a late file for a compacted day stays visible
    assert len(read_archive(tmp_path)) == len(original) + len(CARDS)

    maintain(tmp_path, today=DAYS[-1], retention_days=None, min_files=4, grace_s=3_600, now=t0 + 60)
    assert all(p.exists() for p in listed_before), "nothing deleted within the grace period"
    report = maintain(tmp_path, today=DAYS[-1], retention_days=None, min_files=4, grace_s=3_600,
                      now=time.time() + 3_601)
    assert report.deleted_files == 10
    assert len(read_archive(tmp_path)) == len(original) + len(CARDS)

    report = maintain(tmp_path, today=DAYS[-1], retention_days=1, min_files=4, grace_s=3_600)
    assert report.expired_days == [str(DAYS[0])]
    assert (archive_dir(tmp_path) / f"date={DAYS[0]}").is_dir(), "kept on disk for readers during the grace"
    assert set(pd.to_datetime(read_archive(tmp_path)["ts"], unit="ms").dt.date) == set(DAYS[1:])
    report = maintain(tmp_path, today=DAYS[-1], retention_days=1, min_files=4, grace_s=3_600,
                      now=time.time() + 3_601)
    assert report.deleted_days == 1 and not (archive_dir(tmp_path) / f"date={DAYS[0]}").exists()
