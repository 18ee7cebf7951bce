"""The API's hold for Kafka (serving/spill.py): bounded memory, then spill files; oldest first; nothing lost across
a stop, a kill (what was spilled) and a restart; a drained file is deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from serving.spill import HoldQueue

pytestmark = pytest.mark.unit


def msg(i: int) -> tuple:
    return ("transactions", f"card{i % 3}".encode(), json.dumps({"txn_id": f"t{i}"}).encode(), 1_700_000_000_000 + i)


def drain(q: HoldQueue, batch: int = 4) -> list:
    got = []
    while q.depth:
        head = q.peek(batch)
        got += head
        q.commit(len(head))
    return got


def test_memory_first_then_files_and_order_is_kept_across_both(tmp_path):
    q = HoldQueue(tmp_path, memory_items=3, fsync_s=0)
    where = [q.put(msg(i)) for i in range(10)]
    assert where == ["memory"] * 3 + ["file"] * 7
    assert q.depth == 10 and q.spilled == 7
    files = list(tmp_path.glob("spill-*.jsonl"))
    assert len(files) == 1 and len(files[0].read_bytes().splitlines()) == 7
    # Room in memory again, but a file is pending: the new message goes behind it, not ahead.
    head = q.peek(2)
    q.commit(2)
    assert head == [msg(0), msg(1)]
    assert q.put(msg(10)) == "file"
    assert drain(q) == [msg(i) for i in range(2, 11)]
    assert not list(tmp_path.glob("spill-*")), "a drained spill file is deleted"
    assert q.put(msg(11)) == "memory"  # and memory is used again


def test_a_partial_commit_resends_only_the_rest(tmp_path):
    q = HoldQueue(tmp_path, memory_items=0)
    for i in range(5):
        assert q.put(msg(i)) == "file"
    assert q.peek(3) == [msg(0), msg(1), msg(2)]
    q.commit(1)  # only the first was acknowledged
    assert drain(q, batch=10) == [msg(1), msg(2), msg(3), msg(4)]


def test_a_stopped_process_leaves_its_memory_in_a_file_that_the_next_one_republishes_first(tmp_path):
    q = HoldQueue(tmp_path, memory_items=2)
    for i in range(5):
        q.put(msg(i))
    q.close()  # two in memory, three spilled: the memory pair is older and must come first
    nxt = HoldQueue(tmp_path, memory_items=2)
    assert nxt.adopt() == 5 and nxt.adopted == 5
    assert drain(nxt) == [msg(i) for i in range(5)]
    assert not list(tmp_path.iterdir())


def test_spilled_lines_survive_a_sigkill_and_a_live_process_file_is_not_adopted(tmp_path):
    code = f"""
import json, os, signal, sys
sys.path.insert(0, {str(os.getcwd())!r})
from serving.spill import HoldQueue
q = HoldQueue(__import__('pathlib').Path({str(tmp_path)!r}), memory_items=0, fsync_s=3600)
for i in range(4):
    q.put(("transactions", b"k", json.dumps({{"txn_id": f"t{{i}}"}}).encode(), i))
print("spilled", flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "spilled"
        assert HoldQueue(tmp_path).adopt() == 0, "the file of a live process must not be taken over"
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
    q = HoldQueue(tmp_path)
    assert q.adopt() == 4
    values = [json.loads(m[2])["txn_id"] for m in drain(q)]
    assert values == ["t0", "t1", "t2", "t3"]


def test_a_line_cut_short_by_a_crash_is_skipped_not_fatal(tmp_path):
    q = HoldQueue(tmp_path, memory_items=0)
    for i in range(3):
        q.put(msg(i))
    q.close()
    (path,) = tmp_path.glob("spill-*.jsonl")
    with open(path, "ab") as f:
        f.write(b'{"topic": "transactions", "key": "')
    nxt = HoldQueue(tmp_path)
    nxt.adopt()
    got = drain(nxt)
    assert [m for m in got if m is not None] == [msg(0), msg(1), msg(2)]
    assert not path.exists()


def test_a_full_hold_drops_and_counts(tmp_path):
    q = HoldQueue(tmp_path, memory_items=1, max_file_bytes=300)
    where = [q.put(msg(i)) for i in range(6)]
    assert where[0] == "memory" and "file" in where and where[-1] == "dropped"
    assert q.dropped == where.count("dropped") and q.depth == 6 - q.dropped
    drain(q)  # Kafka back: the hold empties, and has room again
    assert [q.put(msg(i)) for i in range(3)] == ["memory", "file", "file"]
    memory_only = HoldQueue(None, memory_items=2)
    assert [memory_only.put(msg(i)) for i in range(3)] == ["memory", "memory", "dropped"]


def test_a_process_taking_over_a_file_resumes_after_what_was_acknowledged(tmp_path):
    q = HoldQueue(tmp_path, memory_items=0)
    for i in range(6):
        q.put(msg(i))
    assert q.peek(2) == [msg(0), msg(1)]
    q.commit(2)
    assert q.peek(2) == [msg(2), msg(3)]  # in flight when the process dies: not acknowledged
    for f in q.files:  # the process dies: its descriptors (and its lock) go with it, nothing else is written
        f.writer.close()
        os.close(f.fd)
    nxt = HoldQueue(tmp_path)
    assert nxt.adopt() == 4
    assert drain(nxt) == [msg(i) for i in range(2, 6)]
    assert not list(tmp_path.iterdir()), "the file and its progress record are both gone"
