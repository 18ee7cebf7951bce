"""The archive's spool roll is safe when two rollers meet: a stopping worker's roll thread and its shutdown
recovery once both rolled one spool and the loser crashed on the other's temporary file (found by
tests/test_faults.py). Now both finish and the archive holds each row once."""

from __future__ import annotations

import os
import threading

import orjson
import pyarrow.parquet as pq
import pytest

from stores.archive import ARCHIVE_COLUMNS, archive_dir, read_archive, roll_spool

pytestmark = pytest.mark.unit


def spool_with(rows: int, tmp_path):
    root = archive_dir(tmp_path)
    spool = root / "_spool" / "123-abc-def.jsonl"
    spool.parent.mkdir(parents=True)
    lines = []
    for i in range(rows):
        row = dict.fromkeys(ARCHIVE_COLUMNS)
        row.update(txn_id=f"t{i}", card="c" * 32, amount=1.0, amount_cents=100, ts=i * 3_600_000, late=False,
                   seq=i, partition=0, offset=i, archived_ms=i)
        lines.append(orjson.dumps(row))
    spool.write_bytes(b"\n".join(lines) + b"\n")
    return root, spool


@pytest.mark.parametrize("attempt", range(5))
def test_two_rollers_of_one_spool_both_finish_and_write_each_row_once(tmp_path, attempt):
    root, spool = spool_with(200, tmp_path)
    start, errors, rolled = threading.Barrier(2), [], []

    def roll():
        start.wait()
        try:
            rolled.append(roll_spool(spool, root))
        except Exception as exc:  # the crash this test guards against
            errors.append(exc)

    threads = [threading.Thread(target=roll) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert max(rolled) == 200
    files = sorted(p for p in root.rglob("*.parquet"))
    assert sum(pq.read_metadata(p).num_rows for p in files) == 200, "each row in exactly one file"
    assert not [p for p in root.rglob("*.tmp")], "no temporary file left"
    assert len(read_archive(tmp_path)) == 200


def test_a_spool_another_roller_claimed_is_not_an_error(tmp_path):
    root, spool = spool_with(3, tmp_path)
    spool.rename(spool.with_name("123-abc-def.recovering9"))
    assert roll_spool(spool, root) == 0


def test_the_single_threaded_roll_writes_what_the_threaded_one_writes(tmp_path):
    root, spool = spool_with(500, tmp_path / "a")
    threaded = roll_spool(spool, root)
    root_b, spool_b = spool_with(500, tmp_path / "b")
    assert roll_spool(spool_b, root_b, use_threads=False) == threaded == 500
    frame_a, frame_b = (read_archive(p).sort_values("txn_id").reset_index(drop=True) for p in (tmp_path / "a",
                                                                                             tmp_path / "b"))
    assert frame_a.equals(frame_b) and len(frame_b) == 500


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread priority is a Linux feature")
def test_the_worker_rolls_on_a_thread_of_lower_priority_than_its_own():
    from concurrent.futures import ThreadPoolExecutor

    from streaming.batch_sink import ROLL_NICENESS, _lower_priority

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    with ThreadPoolExecutor(1, initializer=_lower_priority) as roller:
        assert roller.submit(niceness).result() == min(19, niceness() + ROLL_NICENESS) > niceness()
