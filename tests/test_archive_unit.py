"""The archive's spool roll is safe when two rollers meet: a stopping worker's roll thread and its shutdown
recovery once both rolled one spool and the loser crashed on the other's temporary file (found by
tests/test_faults.py). Now both finish and the archive holds each row once. Also: a spool cut anywhere, an older
worker's JSON-lines spool, a dead recoverer's claim, and no import on the hot path after the writer starts."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stores.archive import (
    ARCHIVE_COLUMNS,
    ARCHIVE_SCHEMA,
    ArchiveError,
    ArchiveWriter,
    archive_dir,
    read_archive,
    read_spool,
    recover_spools,
    roll_spool,
    spool_files,
)
from tests.conftest import REPO

pytestmark = pytest.mark.unit


def archive_row(i: int) -> dict:
    row = dict.fromkeys(ARCHIVE_COLUMNS)
    row.update(txn_id=f"t{i}", card="c" * 32, amount=1.0, amount_cents=100, ts=i * 3_600_000, late=False,
               seq=i, partition=0, offset=i, archived_ms=i)
    return row


def spool_with(rows: int, tmp_path, batch: int = 64):
    """A spool as the worker writes it (an Arrow IPC stream, one record batch per append), closed."""
    writer = ArchiveWriter(tmp_path)
    for start in range(0, rows, batch):
        writer.append(pa.RecordBatch.from_pylist([archive_row(i) for i in range(start, min(start + batch, rows))],
                                                 schema=ARCHIVE_SCHEMA))
    return writer.root, writer.detach()


def dead_pid() -> int:
    """The pid of a process that has exited (the owner or claimer of a spool left behind)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def json_spool_with(rows: int, tmp_path):
    """A JSON-lines spool, as workers before 2026-12 wrote them."""
    root = archive_dir(tmp_path)
    spool = root / "_spool" / "123-abc-def.jsonl"
    spool.parent.mkdir(parents=True)
    spool.write_bytes(b"".join(orjson.dumps(archive_row(i)) + b"\n" for i in range(rows)))
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
    spool.rename(spool.with_name(f"{spool.stem}.recovering9"))
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


def test_a_spool_cut_anywhere_reads_back_exactly_its_complete_batches(tmp_path):
    """A worker killed mid-append leaves a torn last batch; its offsets were never committed, so it is dropped and
    every complete batch before it is kept. Oracle: the file's size after each append, and the rows appended."""
    writer = ArchiveWriter(tmp_path)
    ends, rows = [], 0
    for i, size in enumerate((3, 5, 1, 4)):
        writer.append(pa.RecordBatch.from_pylist([archive_row(100 * i + k) for k in range(size)],
                                                 schema=ARCHIVE_SCHEMA))
        rows += size
        ends.append((next(writer.spool_dir.iterdir()).stat().st_size, rows))
    spool = writer.detach()
    whole = spool.read_bytes()
    cut_file = tmp_path / "cut.arrows"
    for cut in range(len(whole) + 1):
        cut_file.write_bytes(whole[:cut])
        expected = max([n for end, n in ends if end <= cut], default=0)
        table = read_spool(cut_file)
        assert table.num_rows == expected, f"cut at byte {cut} of {len(whole)}"
        assert table.schema == ARCHIVE_SCHEMA
    assert read_spool(spool).column("txn_id").to_pylist() == [f"t{100 * i + k}" for i, size in
                                                              enumerate((3, 5, 1, 4)) for k in range(size)]


def test_a_json_lines_spool_left_by_an_older_worker_is_rolled_with_its_torn_line_dropped(tmp_path):
    root, spool = json_spool_with(7, tmp_path)
    spool.write_bytes(spool.read_bytes() + b'{"txn_id": "torn", "ca')
    assert recover_spools(root) == 7
    assert sorted(read_archive(tmp_path)["txn_id"]) == sorted(f"t{i}" for i in range(7))
    assert not list((root / "_spool").iterdir())


def test_a_spool_claimed_by_a_dead_recoverer_is_rolled_and_a_live_ones_claim_is_left(tmp_path):
    dead = dead_pid()
    root, spool = spool_with(10, tmp_path / "a")
    orphan = spool.rename(spool.with_name(f"{spool.stem}.recovering{dead}"))
    root_b, spool_b = spool_with(4, tmp_path / "b")
    busy = spool_b.rename(spool_b.with_name(f"{spool_b.stem}.recovering{os.getppid()}"))
    assert recover_spools(root) == 10 and not orphan.exists()
    assert len(read_archive(tmp_path / "a")) == 10
    assert recover_spools(root_b) == 0 and busy.exists(), "a live process is rolling it"


def test_after_the_writer_starts_a_batch_appended_and_rolled_imports_nothing(tmp_path):
    """An import on the worker's hot path or in its roll thread holds the GIL (pyarrow imports pandas on its first
    conversion of Python values: 0.4-2.5 s here), so the writer pays it when the worker starts."""
    code = f"""
import sys
from streaming.batch_prep import PreparedBatch, RawMessage, archive_rows
from featurestore.events import Transaction
from featurestore.state import ApplyStatus
from stores.archive import ArchiveWriter, roll_spool
writer = ArchiveWriter({str(tmp_path)!r})
before = set(sys.modules)
batch = PreparedBatch(txns=[Transaction("t1", "c" * 32, "1234", 12.5, 1_600_000_000_000, "m", "grocery_pos")],
                      sources=[RawMessage(None, b"", 0, 7, 0)], cents=[1250])
writer.append(archive_rows(batch, [(ApplyStatus.APPLIED, 5)], 1))
print(roll_spool(writer.detach(), writer.root, use_threads=False))
print(sorted(set(sys.modules) - before))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rolled, imported = done.stdout.splitlines()
    assert rolled == "1" and imported == "[]", done.stdout


def test_an_append_the_disk_refuses_leaves_the_spool_ending_with_its_last_whole_batch(tmp_path):
    """A file size limit (RLIMIT_FSIZE: the kernel writes up to it, then refuses with EFBIG, as a full disk
    would) stops an append mid-batch: the append raises, the torn bytes are cut off again, and a later append,
    once there is room, is read back behind the earlier batches."""
    code = f"""
import os, resource, signal, sys
import pyarrow as pa
sys.path.insert(0, {str(REPO)!r})
from stores.archive import ARCHIVE_SCHEMA, ArchiveWriter, read_spool
from tests.test_archive_unit import archive_row
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
def batch(start, n):
    return pa.RecordBatch.from_pylist([archive_row(i) for i in range(start, start + n)], schema=ARCHIVE_SCHEMA)
writer = ArchiveWriter({str(tmp_path)!r})
writer.append(batch(0, 5))
spool = next(writer.spool_dir.iterdir())
size = spool.stat().st_size
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 300, resource.RLIM_INFINITY))
try:
    writer.append(batch(5, 500))
    print("no error")
except OSError as exc:
    print("refused", exc.errno)
print(spool.stat().st_size == size)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
writer.append(batch(1000, 3))
print(read_spool(spool).column("txn_id").to_pylist())
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    refused, cut_back, txns = done.stdout.splitlines()
    assert refused == "refused 27" and cut_back == "True", done.stdout  # EFBIG
    assert txns == str([f"t{i}" for i in (*range(5), 1000, 1001, 1002)])


def test_a_spool_that_cannot_be_read_is_set_aside_with_an_error_and_the_others_are_rolled(tmp_path, caplog):
    """A damaged or foreign file in the spool folder must not stop a worker from starting (it recovers spools
    first), nor be deleted (it may hold rows): it is renamed *.unreadable and named in an ERROR line."""
    dead = dead_pid()
    root, good = spool_with(6, tmp_path)
    good = good.rename(good.with_name(f"{dead}-aaaa-1{good.suffix}"))
    garbage = good.with_name(f"{dead}-bbbb-2.arrows")
    garbage.write_bytes(b"\x00garbage, not Arrow" * 50)
    foreign = good.with_name(f"{dead}-cccc-3.arrows")
    foreign.write_bytes(pa.schema([("x", pa.int64())]).serialize().to_pybytes())
    with caplog.at_level("ERROR", logger="stores.archive"):
        assert recover_spools(root) == 6
    assert len(read_archive(tmp_path)) == 6
    aside = sorted(p.name for p in (root / "_spool").iterdir())
    assert aside == [f"{dead}-bbbb-2.unreadable", f"{dead}-cccc-3.unreadable"], aside
    assert (root / "_spool" / aside[0]).read_bytes() == b"\x00garbage, not Arrow" * 50, "kept as it was"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and all("set aside" in e for e in errors), errors
    assert recover_spools(root) == 0 and not spool_files(root), "set aside once, not retried on every start"
    with pytest.raises(ArchiveError, match="another schema"):
        read_spool(foreign.with_name(aside[1]))
