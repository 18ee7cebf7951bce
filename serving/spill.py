"""What the API could not publish to Kafka, held in order until Kafka is back (issue 17: nothing lost).

A bounded in-memory queue first, then JSON-lines spill files under `$VELOCITY_DATA_DIR/api-spill/` beyond it:

- Order: once anything is spilled, every later message is spilled behind it (until the files are drained), so the
  head of the hold is always the oldest message: memory first, then the files by name (each named by the hold time
  of its first message).
- Durability: a spilled line is written and flushed to the operating system before the answer returns (it survives
  the API process being killed); it is fsynced at most every `fsync_s` seconds and on close (0: before every
  answer), so a machine crash loses at most that much. Messages still in memory are written to a spill file on a
  graceful stop; a SIGKILL loses them, so `VELOCITY_SERVE_SPILL_MEMORY_ITEMS=0` spills everything at once.
- A spill file is locked (`flock`) by the process writing it; a process adopts at start-up (and whenever its own
  hold is empty) every spill file no live process holds, e.g. one left by a killed or stopped API.
- A file is deleted once every line of it has been acknowledged by Kafka. How far a file is acknowledged is kept
  next to it (`<file>.offset`, replaced after each acknowledged batch), so a process taking a file over resumes
  there; a batch in flight when a process died is sent again, so a message can be published twice (harmless: the
  stream counts each `txn_id` once); none is lost.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

log = logging.getLogger(__name__)

#: (topic, key, value, timestamp_ms): one message the API owes Kafka.
Message = tuple[str, bytes, bytes, "int | None"]


@dataclass
class _SpillFile:
    path: Path
    fd: int  # holds the flock
    pending: int  # lines not yet acknowledged
    read_at: int = 0  # byte offset of the first unacknowledged line
    writer: object | None = None  # binary file object while this process appends to it
    peeked: list[int] = field(default_factory=list)  # byte offset after each peeked line


class HoldQueue:
    """Messages in hold order; `peek` the oldest, `commit` them once Kafka has acknowledged them."""

    def __init__(self, folder: Path | None, *, memory_items: int = 10_000, max_file_bytes: int = 1 << 30,
                 fsync_s: float = 1.0) -> None:
        self.folder = folder
        self.memory_items = memory_items
        self.max_file_bytes = max_file_bytes
        self.fsync_s = fsync_s
        self.memory: deque[Message] = deque()
        self.files: list[_SpillFile] = []
        self.spilled = 0  # messages written to spill files by this process
        self.dropped = 0  # messages neither held nor published (hold full, or no spill folder)
        self.adopted = 0  # messages found in spill files left by an earlier process
        self._written = 0  # bytes appended to this process's current spill file
        self._synced_at = 0.0
        self._dirty = False  # written since the last fsync
        self._peeked_memory = 0

    def sync(self, force: bool = False) -> None:
        """fsync this process's spill file if it was written to and `fsync_s` has passed since the last fsync (the
        publisher calls this every 0.1 s, so nothing stays unsynced much longer than `fsync_s`)."""
        now = time.monotonic()
        if not self._dirty or not (force or now - self._synced_at >= self.fsync_s):
            return
        for spill in self.files:
            if spill.writer is not None:
                os.fsync(spill.writer.fileno())
        self._dirty, self._synced_at = False, now

    @property
    def depth(self) -> int:
        return len(self.memory) + sum(f.pending for f in self.files)

    def put(self, msg: Message) -> str:
        """Hold one message: "memory", "file" (written and flushed), or "dropped" (hold full; counted)."""
        if not self.files and len(self.memory) < self.memory_items:
            self.memory.append(msg)
            return "memory"
        if self._append([msg]):
            return "file"
        self.dropped += 1
        return "dropped"

    def _append(self, msgs: list[Message]) -> bool:
        if self.folder is None:
            return False
        lines = b"".join(_encode(m) for m in msgs)
        spill = self.files[-1] if self.files and self.files[-1].writer is not None else None
        if (self._written if spill is not None else 0) + len(lines) > self.max_file_bytes:
            if self.dropped == 0:
                log.error("the API's Kafka spill is full (%d bytes); further unpublished transactions are dropped "
                          "(counted: velocity_api_publish_held_dropped_total)", self.max_file_bytes)
            return False
        try:
            if spill is None:
                spill = self._new_file()
            spill.writer.write(lines)
            spill.writer.flush()  # in the OS before the answer: survives the process being killed
            self._dirty = True
            self.sync(force=self.fsync_s == 0)
        except OSError as exc:
            log.error("cannot write the Kafka spill file under %s (%s)", self.folder, exc)
            return False
        spill.pending += len(msgs)
        self._written += len(lines)
        self.spilled += len(msgs)
        return True

    def _new_file(self) -> _SpillFile:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"spill-{time.time_ns():020d}-{os.getpid()}.jsonl"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        spill = _SpillFile(path, fd, 0, writer=os.fdopen(os.dup(fd), "ab"))
        self.files.append(spill)
        self._written = 0
        return spill

    def adopt(self) -> int:
        """Take over spill files no live process holds (oldest first); how many messages they hold. Only while
        this hold is empty, so that the hold order stays the age order."""
        if self.folder is None or self.depth or not self.folder.is_dir():
            return 0
        found = 0
        for path in sorted(self.folder.glob("spill-*.jsonl")):
            if any(f.path == path for f in self.files):
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # another live process holds it
                os.close(fd)
                continue
            start = _read_offset(path)
            if start > path.stat().st_size:  # not this file's: start over (duplicates, never a loss)
                start = 0
            with open(path, "rb") as f:
                f.seek(start)
                lines = sum(1 for line in f if line.strip())
            if not lines:
                path.unlink(missing_ok=True)
                _offset_path(path).unlink(missing_ok=True)
                os.close(fd)
                continue
            self.files.append(_SpillFile(path, fd, lines, read_at=start))
            found += lines
        if found:
            self.adopted += found
            log.warning("republishing %d transactions an earlier API process held for Kafka (%s)", found, self.folder)
        return found

    def peek(self, n: int) -> list[Message]:
        """Up to `n` of the oldest held messages (not removed: `commit` removes them once acknowledged)."""
        out = list(self._iter_memory(n))
        self._peeked_memory = len(out)
        if len(out) < n and self.files:
            out.extend(self._read_file(self.files[0], n - len(out)))
        return out

    def _iter_memory(self, n: int) -> Iterator[Message]:
        for i, msg in enumerate(self.memory):
            if i >= n:
                return
            yield msg

    def _read_file(self, spill: _SpillFile, n: int) -> list[Message]:
        out: list[Message] = []
        spill.peeked = []
        with open(spill.path, "rb") as f:
            f.seek(spill.read_at)
            offset = spill.read_at
            while len(out) < n:
                line = f.readline()
                if not line.endswith(b"\n"):  # end of file (or a line cut short by a crash: skipped below)
                    if line and spill.writer is None:
                        log.error("skipping a truncated last line in %s", spill.path)
                        spill.peeked.append(offset + len(line))
                        out.append(None)  # type: ignore[arg-type]
                    break
                offset += len(line)
                spill.peeked.append(offset)
                try:
                    out.append(_decode(line))
                except (ValueError, KeyError):
                    log.error("skipping an unreadable line in %s", spill.path)
                    out.append(None)  # type: ignore[arg-type]
        return out

    def commit(self, n: int) -> None:
        """The oldest `n` peeked messages are acknowledged: forget them (a drained spill file is deleted)."""
        from_memory = min(n, self._peeked_memory)
        for _ in range(from_memory):
            self.memory.popleft()
        self._peeked_memory -= from_memory
        rest = n - from_memory
        if rest and self.files:
            spill = self.files[0]
            spill.read_at = spill.peeked[rest - 1]
            spill.peeked = spill.peeked[rest:]
            spill.pending = max(spill.pending - rest, 0)
            if spill.pending == 0 or (spill.writer is None and spill.read_at >= os.path.getsize(spill.path)):
                self._remove(self.files.pop(0))
            else:
                _write_offset(spill.path, spill.read_at)

    def _remove(self, spill: _SpillFile) -> None:
        if spill.writer is not None:
            with contextlib.suppress(OSError):
                spill.writer.close()
        spill.path.unlink(missing_ok=True)
        _offset_path(spill.path).unlink(missing_ok=True)
        os.close(spill.fd)

    def close(self) -> None:
        """Graceful stop: what is still in memory goes to a spill file (ordered before the others), then fsync."""
        if self.memory and self.folder is not None:
            mine = [f for f in self.files if f.writer is not None]
            for f in mine:  # the memory messages are older than anything this process spilled
                f.writer.flush()
            self.folder.mkdir(parents=True, exist_ok=True)
            oldest = min([int(f.path.name.split("-")[1]) for f in self.files] + [time.time_ns()]) - 1
            path = self.folder / f"spill-{oldest:020d}-{os.getpid()}.jsonl"
            try:
                with open(path, "wb") as f:
                    f.write(b"".join(_encode(m) for m in self.memory))
                    f.flush()
                    os.fsync(f.fileno())
                log.warning("%d transactions not yet published to Kafka were written to %s", len(self.memory), path)
                self.spilled += len(self.memory)
                self.memory.clear()
            except OSError as exc:
                log.error("could not write %d unpublished transactions to %s (%s)", len(self.memory), path, exc)
        for spill in self.files:
            if spill.writer is not None:
                with contextlib.suppress(OSError):
                    spill.writer.flush()
                    os.fsync(spill.writer.fileno())
                    spill.writer.close()
            os.close(spill.fd)
        self.files = []

    def report(self) -> dict:
        return {"depth": self.depth, "in_memory": len(self.memory), "in_files": sum(f.pending for f in self.files),
                "spilled": self.spilled, "adopted": self.adopted, "dropped": self.dropped,
                "folder": str(self.folder) if self.folder is not None else None}


def _offset_path(path: Path) -> Path:
    return path.with_name(path.name + ".offset")


def _read_offset(path: Path) -> int:
    """Where the acknowledged part of a spill file ends (0: none recorded)."""
    try:
        return max(int(_offset_path(path).read_text().strip()), 0)
    except (OSError, ValueError):
        return 0


def _write_offset(path: Path, offset: int) -> None:
    tmp = path.with_name(path.name + ".offset.tmp")
    try:
        tmp.write_text(str(offset))
        os.replace(tmp, _offset_path(path))
    except OSError as exc:  # only costs duplicates after a restart
        log.warning("cannot record the progress of %s (%s)", path, exc)


def _encode(msg: Message) -> bytes:
    topic, key, value, ts = msg
    return orjson.dumps({"topic": topic, "key": base64.b64encode(key).decode(), "ts": ts,
                         "value": base64.b64encode(value).decode()}) + b"\n"


def _decode(line: bytes) -> Message:
    obj = orjson.loads(line)
    return obj["topic"], base64.b64decode(obj["key"]), base64.b64decode(obj["value"]), obj["ts"]


class HoldCollector:
    """Prometheus view of a publisher's hold: queue depth, spilled, republished and dropped counts."""

    def __init__(self, publisher) -> None:
        self.publisher = publisher

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        pub, hold = self.publisher, self.publisher.hold
        yield GaugeMetricFamily("velocity_api_publish_queue_depth",
                                "Transactions answered but held for Kafka (memory and spill files)", value=hold.depth)
        yield GaugeMetricFamily("velocity_api_publish_queue_spill_depth",
                                "Of those, held in spill files", value=hold.depth - len(hold.memory))
        yield CounterMetricFamily("velocity_api_publish_spilled", "Held transactions written to spill files",
                                  value=hold.spilled)
        yield CounterMetricFamily("velocity_api_publish_republished",
                                  "Held transactions published once Kafka was back", value=pub.republished)
        yield CounterMetricFamily("velocity_api_publish_held_dropped",
                                  "Transactions neither published nor held (hold full, or refused by the broker)",
                                  value=hold.dropped + pub.rejected)
