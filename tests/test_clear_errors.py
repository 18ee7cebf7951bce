"""Clear errors, nothing half-written (issue 11, section 4).

- a damaged Parquet file in the offline store or a bad --history file: one line naming the file, exit 2;
- an output path that cannot be written: refused before any work, and no temporary file left behind;
- `velocity generate` refuses what the stream worker would refuse (extensions, start dates, sizes) up front;
- the stream worker's Redis retry log says what really happened, and a Redis that comes back empty is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent
VELOCITY = [str(Path(sys.executable).parent / "velocity")]
DAY_MS = 86_400_000
PAN = "4539578763621486"


def _garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not parquet" * 20)
    return path


def _good_archive_file(path: Path) -> Path:
    from stores.archive import ARCHIVE_SCHEMA

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(ARCHIVE_SCHEMA.empty_table(), path)
    return path


def _leftovers(folder: Path) -> list[str]:
    """Temporary files a writer or a check could leave behind."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".probe")) or "probe" in p.name
                  or ".writing-" in p.name)


@pytest.fixture
def history(tmp_path) -> Path:
    from ingest.generate import GenerateConfig, generate_history, write_history

    path = tmp_path / "history.parquet"
    write_history(generate_history(GenerateConfig(cards=20, days=9, start=dt.date(2020, 1, 1), seed=3)).table, path)
    return path


# ---------------------------------------------------------------- archive files (pure)


@pytest.mark.unit
def test_archive_files_checks_every_footer_and_names_the_bad_file(tmp_path):
    from stores.archive import ArchiveError, archive_files

    assert archive_files(tmp_path) == []
    good = _good_archive_file(tmp_path / "archive" / "date=2020-01-02" / "part-a.parquet")
    assert archive_files(tmp_path) == [good]
    bad = _garbage(tmp_path / "archive" / "date=2020-01-01" / "part-x.parquet")
    with pytest.raises(ArchiveError) as info:
        archive_files(tmp_path)
    msg = str(info.value)
    assert str(bad) in msg and "move it aside" in msg and "\n" not in msg
    assert isinstance(info.value, ValueError)
    bad.write_bytes(b"")  # zero-length file (a full disk)
    with pytest.raises(ArchiveError, match="part-x.parquet"):
        archive_files(tmp_path)
    bad.unlink()
    _good_archive_file(tmp_path / "archive" / "date=2020-01-01" / "part-b.parquet")
    assert [p.name for p in archive_files(tmp_path)] == ["part-b.parquet", "part-a.parquet"]  # sorted by path


@pytest.mark.unit
def test_a_damaged_history_file_is_named(tmp_path):
    from stores.history import HistoryError, load_history

    bad = _garbage(tmp_path / "history.parquet")
    with pytest.raises(HistoryError) as info:
        load_history(bad)
    assert str(bad) in str(info.value) and "cannot be read as Parquet" in str(info.value)
    good = tmp_path / "h.parquet"
    pq.write_table(pa.table({"a": list(range(1000))}), good, compression="snappy")
    raw = bytearray(good.read_bytes())
    raw[8:200] = b"\x00" * 192  # damage inside the data, footer intact
    good.write_bytes(bytes(raw))
    with pytest.raises(HistoryError, match="h.parquet"):
        load_history(good)


# ---------------------------------------------------------------- output paths (pure)


@pytest.mark.unit
def test_output_checks_refuse_before_work_and_leave_nothing(tmp_path):
    from stores.outputs import OutputError, check_output_dir, check_output_file

    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="is a folder"):
        check_output_file(tmp_path)
    with pytest.raises(OutputError, match="plain.txt is a file, not a folder"):
        check_output_file(a_file / "sub" / "out.parquet")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(a_file)
    with pytest.raises(OutputError, match="unknown extension '.txt'"):
        check_output_file(tmp_path / "x.txt", suffixes=(".parquet", ".csv"))
    with pytest.raises(OutputError, match="no extension"):
        check_output_file(tmp_path / "x", suffixes=(".parquet", ".csv"))
    if Path("/proc/self").exists():  # a pseudo file system: no file can be created there, not even by root
        with pytest.raises(OutputError, match="cannot write in /proc"):
            check_output_file(Path("/proc/velocity-test.parquet"))
    # fine: a new file in a new folder (nothing created by the check), and replacing a file
    assert check_output_file(tmp_path / "new" / "deeper" / "t.parquet")
    assert not (tmp_path / "new").exists()
    assert check_output_file(a_file)
    # a Spark dataset folder may be replaced (engine spark), any other folder may not
    ds = tmp_path / "ds.parquet"
    ds.mkdir()
    (ds / "part-00000-abc.snappy.parquet").write_bytes(b"x")
    (ds / "_SUCCESS").write_bytes(b"")
    (ds / ".part-00000-abc.snappy.parquet.crc").write_bytes(b"")
    assert check_output_file(ds, allow_dataset_dir=True)
    with pytest.raises(OutputError, match="is a folder"):
        check_output_file(ds)
    (ds / "notes.md").write_text("mine")
    with pytest.raises(OutputError, match="not a Parquet dataset"):
        check_output_file(ds, allow_dataset_dir=True)
    assert _leftovers(tmp_path) == []


@pytest.mark.unit
def test_write_frame_fails_clearly_and_leaves_no_temp_file(tmp_path, monkeypatch):
    from stores import offline_files
    from stores.offline_files import OfflineError, write_frame

    frame = pd.DataFrame({"a": [1, 2, 3]})
    with pytest.raises(OfflineError, match="is a folder"):
        write_frame(frame, tmp_path)
    a_file = tmp_path / "plain"
    a_file.write_text("x")
    with pytest.raises(OfflineError, match="cannot write"):
        write_frame(frame, a_file / "t.parquet")

    def half_then_disk_full(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(offline_files.pq, "write_table", half_then_disk_full)
    with pytest.raises(OfflineError, match="No space left on device"):
        write_frame(frame, tmp_path / "t.parquet")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"], "nothing half-written"
    assert write_frame(frame, tmp_path / "ok.parquet").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.parquet", "plain"]


# ---------------------------------------------------------------- generate (pure)


@pytest.mark.unit
def test_generate_refuses_what_the_worker_would_refuse():
    from featurestore.events import MIN_TS_MS
    from ingest.generate import GenerateConfig

    now = int(time.time() * 1000)
    future = DAY_MS
    today = dt.datetime.fromtimestamp(now / 1000, dt.UTC).date()
    def last_row_ms(start: dt.date, days: int) -> int:  # rows fall in [start, start + days)
        return (start - dt.date(1970, 1, 1)).days * DAY_MS + days * DAY_MS - 1

    for days in (1, 10, 152):
        # the latest allowed start, by search: its last row is at most max_future ahead of now
        latest = max(d for d in (today + dt.timedelta(days=k) for k in range(-days - 3, 4))
                     if last_row_ms(d, days) <= now + future)
        GenerateConfig(start=latest, days=days).validate(now_ms=now, max_future_ms=future)
        with pytest.raises(ValueError) as info:
            GenerateConfig(start=latest + dt.timedelta(days=1), days=days).validate(now_ms=now, max_future_ms=future)
        assert f"the latest allowed start for --days {days} is {latest}" in str(info.value)
        assert "future" in str(info.value)
    with pytest.raises(ValueError, match="use fewer --days"):
        GenerateConfig(start=dt.date(2000, 1, 1), days=100_000).validate(now_ms=now, max_future_ms=future)
    first = dt.datetime.fromtimestamp(MIN_TS_MS / 1000, dt.UTC).date()
    GenerateConfig(start=first, days=1).validate(now_ms=now, max_future_ms=future)
    with pytest.raises(ValueError, match="before 2000-01-01"):
        GenerateConfig(start=first - dt.timedelta(days=1)).validate()
    for field in ("cards", "days"):
        for bad in (0, -5):
            with pytest.raises(ValueError, match=f"--{field} must be at least 1 \\(got {bad}\\)"):
                GenerateConfig(**{field: bad}).validate()


@pytest.mark.unit
def test_generate_output_format_is_checked_up_front(tmp_path):
    from ingest.generate import output_format

    assert output_format(tmp_path / "h.parquet") == "parquet"
    assert output_format(tmp_path / "h.CSV") == "csv"
    assert output_format(tmp_path / "h.csv", "csv") == "csv"
    for bad, fmt, match in [("h.txt", None, "unknown extension '.txt'"), ("h", None, "no extension"),
                            ("h.csv", "parquet", "does not match"), ("h.parquet", "json", "parquet or csv")]:
        with pytest.raises(ValueError, match=match):
            output_format(tmp_path / bad, fmt)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the CLI as a user runs it


def _velocity(*args: str, tmp_path: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "VELOCITY_DATA_DIR": str(tmp_path / "data"), "VELOCITY_RUN_DIR": str(tmp_path / "run"),
           "VELOCITY_ENTITY_SECRET": "test-clear-errors", "COLUMNS": "80"}
    return subprocess.run([*VELOCITY, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, exactly one `error:` line holding every needle (other log lines may be there)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.mark.e2e
def test_cli_damaged_archive_file_is_named_exit_2(tmp_path):
    offline = tmp_path / "offline"
    _good_archive_file(offline / "archive" / "date=2020-01-02" / "part-a.parquet")
    bad = _garbage(offline / "archive" / "date=2020-01-01" / "part-x.parquet")
    proc = _velocity("batch", "--date", "2020-01-02", "--engine", "duckdb", "--no-online",
                     "--offline-dir", str(offline), tmp_path=tmp_path)
    _one_error_line(proc, str(bad))
    proc = _velocity("features", "training-set", "--start", "2020-01-01", "--end", "2020-01-02",
                     "--out", str(tmp_path / "t.parquet"), "--offline-dir", str(offline), tmp_path=tmp_path)
    _one_error_line(proc, str(bad))
    assert not (tmp_path / "t.parquet").exists() and _leftovers(tmp_path) == []
    assert not (offline / "snapshots").exists()


@pytest.mark.e2e
def test_cli_damaged_history_file_is_named_exit_2(tmp_path):
    bad = _garbage(tmp_path / "history.parquet")
    proc = _velocity("features", "training-set", "--start", "2020-01-01", "--end", "2020-01-02",
                     "--out", str(tmp_path / "t.parquet"), "--history", str(bad), tmp_path=tmp_path)
    _one_error_line(proc, str(bad), "cannot be read as Parquet")
    proc = _velocity("batch", "--date", "2020-01-05", "--engine", "duckdb", "--no-online", "--history", str(bad),
                     "--offline-dir", str(tmp_path / "offline"), tmp_path=tmp_path)
    _one_error_line(proc, str(bad))
    assert not (tmp_path / "t.parquet").exists() and not (tmp_path / "offline" / "snapshots").exists()


@pytest.mark.e2e
def test_cli_training_set_out_is_checked_before_any_work(tmp_path, history):
    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    damaged = _garbage(tmp_path / "damaged.parquet")
    # The --out check comes first: with a damaged history too, the --out problem is what is reported.
    base = ["features", "training-set", "--start", "2020-01-01", "--end", "2020-01-05", "--history", str(damaged)]
    _one_error_line(_velocity(*base, "--out", str(folder), tmp_path=tmp_path), f"--out {folder} is a folder")
    _one_error_line(_velocity(*base, "--out", str(folder), "--engine", "spark", tmp_path=tmp_path),
                    "not a Parquet dataset")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    _one_error_line(_velocity(*base, "--out", str(plain / "sub" / "t.parquet"), tmp_path=tmp_path),
                    "plain.txt is a file, not a folder")
    if Path("/proc/self").exists():
        _one_error_line(_velocity(*base, "--out", "/proc/velocity-t.parquet", tmp_path=tmp_path),
                        "cannot write in /proc")
    # the same command with a good history and a good --out works, and writes only the output
    out = tmp_path / "sets" / "t.parquet"
    proc = _velocity("features", "training-set", "--start", "2020-01-01", "--end", "2020-01-05",
                     "--history", str(history), "--out", str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(pd.read_parquet(out)) > 0
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"] and plain.read_text() == "x"
    assert _leftovers(tmp_path) == []


@pytest.mark.e2e
def test_cli_batch_offline_dir_under_a_file_is_refused(tmp_path, history):
    plain = tmp_path / "plain"
    plain.write_text("x")
    proc = _velocity("batch", "--date", "2020-01-05", "--engine", "duckdb", "--no-online", "--history", str(history),
                     "--offline-dir", str(plain / "offline"), tmp_path=tmp_path)
    _one_error_line(proc, "--offline-dir", "plain is a file, not a folder")


@pytest.mark.e2e
def test_cli_generate_refuses_up_front(tmp_path):
    now = dt.datetime.now(dt.UTC).date()
    cases = [
        (["--out", "h.txt"], "unknown extension '.txt'"),
        (["--out", "h.csv", "--format", "parquet"], "does not match"),
        (["--start", (now + dt.timedelta(days=30)).isoformat(), "--days", "10"], "latest allowed start for --days 10"),
        (["--start", "1999-12-31"], "before 2000-01-01"),
        (["--cards", "0"], "--cards must be at least 1"),
        (["--days", "-3"], "--days must be at least 1"),
    ]
    for args, needle in cases:
        _one_error_line(_velocity("generate", *args, tmp_path=tmp_path, timeout=60), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing generated, nothing written"


# ---------------------------------------------------------------- Redis retry log and emptied Redis


def _sample(name: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name) or 0.0


class _FakeRedis:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def get(self, key):
        return self.data.get(key)

    async def set(self, key, value, nx=False):
        if nx and key in self.data:
            return None
        self.data[key] = value
        return True


class _FlakyStore:
    """Fails `fails` write attempts, each taking `attempt_s`, then takes writes."""

    def __init__(self, fails: int, attempt_s: float) -> None:
        from featurestore.config import RedisSettings

        self.fails, self.attempt_s = fails, attempt_s
        self.keys = SimpleNamespace(prefix="fake")
        self.settings = RedisSettings(port=1)
        self.redis = _FakeRedis()

    async def apply_packed(self, packed):  # the worker's write path (AsyncOnlineStore.apply_packed)
        import redis

        await asyncio.sleep(self.attempt_s)
        if self.fails:
            self.fails -= 1
            raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        return [None] * len(packed)

    async def close(self) -> None:
        pass


async def _no_dlq(*_args) -> None:
    return None


_NUM = r"([0-9]+(?:\.[0-9]+)?)"


@pytest.mark.unit
def test_retry_log_is_measured_and_throttled(caplog):
    import redis

    from streaming.batch_sink import BatchSink, redis_unavailable

    assert redis_unavailable(redis.exceptions.ConnectionError("x")) and redis_unavailable(TimeoutError())
    assert not redis_unavailable(redis.exceptions.ResponseError("ERR bad script"))
    store = _FlakyStore(fails=12, attempt_s=0.2)
    agg = BatchSink(store, str, _no_dlq, None, max_backoff_s=0.05)
    agg.redis_watch.log_every_s = 1.0
    caplog.set_level(logging.INFO, logger="streaming.batch_sink")
    failures0 = _sample("velocity_stream_redis_write_failures_total")
    t0 = time.monotonic()
    assert asyncio.run(agg._apply_with_retry([1, 2, 3])) == [None] * 3
    total = time.monotonic() - t0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    first = warnings[0].getMessage()
    assert re.search(r"attempt 1 took 0\.2 s .*next attempt in 0\.1 s", first), first
    back = warnings[-1].getMessage()
    m = re.search(rf"is back after {_NUM} s and 12 failed attempts", back)
    assert m, back
    assert abs(float(m.group(1)) - total) < 0.15, (back, total)  # the outage's real length
    # 12 attempts over ~3 s: the first line, a summary about every second, the recovery; not one per attempt
    summaries = [r.getMessage() for r in warnings[1:-1]]
    assert 1 <= len(summaries) <= int(total) + 1, summaries
    for line in summaries:
        m = re.search(rf"still unavailable after {_NUM} s: ([0-9]+) failed attempts, attempt ([0-9]+) took 0\.2 s",
                      line)
        assert m and m.group(2) == m.group(3), line
    assert _sample("velocity_stream_redis_write_failures_total") - failures0 == 12
    assert _sample("velocity_stream_redis_up") == 1


@pytest.mark.unit
def test_a_request_error_is_not_retried():
    import redis

    from streaming.batch_sink import BatchSink

    class Broken(_FlakyStore):
        async def apply_packed(self, packed):
            raise redis.exceptions.ResponseError("ERR Error running script")

    agg = BatchSink(Broken(0, 0), str, _no_dlq, None)
    with pytest.raises(redis.exceptions.ResponseError):
        asyncio.run(agg._apply_with_retry([1]))


@pytest.mark.unit
def test_a_marker_check_that_is_refused_never_fails_a_batch(caplog):
    import redis

    from streaming.batch_sink import BatchSink

    class NoPermission(_FakeRedis):
        calls = 0

        async def get(self, key):
            NoPermission.calls += 1
            raise redis.exceptions.NoPermissionError("NOPERM this user has no permissions to access that key")

    store = _FlakyStore(fails=0, attempt_s=0)
    store.redis = NoPermission()
    agg = BatchSink(store, str, _no_dlq, None)
    agg.redis_watch.check_every_s = 0.0
    caplog.set_level(logging.INFO, logger="streaming.batch_sink")

    async def three_batches():
        return [await agg._apply_with_retry([1]) for _ in range(3)]

    assert asyncio.run(three_batches()) == [[None]] * 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "will not be detected" in warnings[0] and NoPermission.calls == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A throw-away redis-server without persistence: a restart comes back empty."""

    def __init__(self, folder: Path) -> None:
        self.port = _free_port()
        self.folder = folder
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def private_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def _messages(n: int, start: int = 0):
    import orjson

    from streaming.batch_prep import RawMessage

    now = int(time.time() * 1000)
    return [RawMessage(PAN.encode(), orjson.dumps({
        "txn_id": f"ce-{uuid.uuid4().hex[:8]}-{i}", "cc_num": PAN, "amount": 12.5, "ts": now + i,
        "merchant": "m", "category": "c"}), 0, start + i, now) for i in range(n)]


def _batch_sink(port: int, prefix: str):
    from featurestore.config import RedisSettings
    from featurestore.entity import EntityKeyer
    from stores.redis_online import AsyncOnlineStore
    from streaming.batch_sink import BatchSink

    settings = RedisSettings(port=port, socket_timeout_s=0.5, connect_timeout_s=0.5)
    return BatchSink(AsyncOnlineStore(settings, prefix=prefix), EntityKeyer("test-clear-errors"), _no_dlq, None,
                      max_backoff_s=0.5)


@pytest.mark.integration
def test_redis_outage_log_is_truthful_and_an_empty_restart_is_reported(private_redis, caplog):
    import redis

    prefix = f"test:{uuid.uuid4().hex[:8]}"
    marker = f"{prefix}:meta:instance"
    client = redis.Redis(port=private_redis.port)
    caplog.set_level(logging.INFO, logger="streaming.batch_sink")
    lost0 = _sample("velocity_stream_redis_data_lost_total")
    failures0 = _sample("velocity_stream_redis_write_failures_total")

    async def scenario():
        agg = _batch_sink(private_redis.port, prefix)
        agg.redis_watch.log_every_s = 0.0  # log every attempt, to check each line against the clock
        statuses, _ = await agg.write_online(agg.prepare(_messages(5)))
        assert len(statuses) == 5
        assert client.get(marker) is not None, "the first write creates the marker"
        assert _sample("velocity_stream_redis_data_lost_total") == lost0, "a first start is not a loss"

        private_redis.kill()
        t_call = time.monotonic()
        wall_call = time.time()
        task = asyncio.create_task(agg.write_online(agg.prepare(_messages(7, 100))))
        # redis-py retries a lost connection inside one call for about 4 s (each attempt of ours), so a shorter
        # outage never reaches the worker (the marker timer covers that case: next test); 6 s surfaces it.
        await asyncio.sleep(6.0)
        private_redis.start()  # empty: no persistence
        t_restart = time.monotonic() - t_call
        statuses, _ = await asyncio.wait_for(task, 60)
        took = time.monotonic() - t_call
        await agg.close()
        return statuses, wall_call, t_restart, took

    statuses, wall_call, t_restart, took = asyncio.run(scenario())
    assert len(statuses) == 7, "the held batch is written once Redis is back"
    records = [r for r in caplog.records if r.name == "streaming.batch_sink"]
    fails = [r for r in records if "write failed" in r.getMessage() or "still unavailable" in r.getMessage()]
    assert fails, [r.getMessage() for r in records]
    # Every failure line: the attempt's own duration and the next delay are what the clock says.
    previous_end, previous_delay = wall_call, 0.0
    for number, rec in enumerate(fails, start=1):
        msg = rec.getMessage()
        m = re.search(rf"attempt {number} took {_NUM} s .*next attempt in {_NUM} s", msg)
        assert m, msg
        attempt_s, delay = float(m.group(1)), float(m.group(2))
        assert abs((rec.created - previous_end) - (previous_delay + attempt_s)) < 0.3, (msg, rec.created - previous_end)
        previous_end, previous_delay = rec.created, delay
    back = [r for r in records if "is back after" in r.getMessage()]
    assert len(back) == 1
    m = re.search(rf"is back after {_NUM} s and ([0-9]+) failed attempts?;", back[0].getMessage())
    assert m, back[0].getMessage()
    assert int(m.group(2)) == len(fails) == _sample("velocity_stream_redis_write_failures_total") - failures0
    assert t_restart - 0.3 <= float(m.group(1)) <= took + 0.1, (m.group(1), t_restart, took)
    # The restart came back empty: reported loudly, counted, and the marker is there again.
    lost = [r for r in records if r.levelno == logging.ERROR]
    assert len(lost) == 1, [r.getMessage() for r in records]
    text = lost[0].getMessage()
    assert "LOST ITS DATA" in text and "velocity features rebuild" in text and "windows" in text
    assert _sample("velocity_stream_redis_data_lost_total") - lost0 == 1
    assert _sample("velocity_stream_redis_data_lost_timestamp_seconds") >= wall_call
    assert client.get(marker) is not None
    client.close()


@pytest.mark.integration
def test_an_emptied_redis_is_noticed_without_an_error_by_every_worker(private_redis, caplog):
    import redis

    prefix = f"test:{uuid.uuid4().hex[:8]}"
    client = redis.Redis(port=private_redis.port)
    caplog.set_level(logging.INFO, logger="streaming.batch_sink")
    lost0 = _sample("velocity_stream_redis_data_lost_total")

    async def scenario():
        a, b = _batch_sink(private_redis.port, prefix), _batch_sink(private_redis.port, prefix)
        for agg in (a, b):
            agg.redis_watch.check_every_s = 0.5
            await agg.write_online(agg.prepare(_messages(3)))
        await asyncio.sleep(0.6)
        for agg in (a, b):  # within the check interval: no extra round trip, nothing noticed yet
            await agg.write_online(agg.prepare(_messages(3)))
        assert not [r for r in caplog.records if r.levelno == logging.ERROR]
        client.flushall()  # what a restart without persistence leaves, without any connection error
        await a.write_online(a.prepare(_messages(3)))  # within the interval: not noticed yet
        assert not [r for r in caplog.records if r.levelno == logging.ERROR]
        await asyncio.sleep(0.6)
        for agg in (a, b):
            await agg.write_online(agg.prepare(_messages(3)))
        for agg in (a, b):
            await agg.close()
        return a, b

    a, b = asyncio.run(scenario())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, errors
    assert any("is gone" in e for e in errors) and any("another worker found the marker" in e for e in errors)
    assert (a.redis_watch.losses, b.redis_watch.losses) == (1, 1)
    assert _sample("velocity_stream_redis_data_lost_total") - lost0 == 2
    client.close()


@pytest.mark.integration
def test_a_burst_that_lands_on_an_emptied_redis_is_reported_without_a_later_write(private_redis, caplog):
    """The marker check is due every `check_every_s` on the write path; a write inside the interval must still be
    followed by a check at the interval's end, or a worker that goes quiet after it never notices the loss."""
    import redis

    prefix = f"test:{uuid.uuid4().hex[:8]}"
    client = redis.Redis(port=private_redis.port)
    caplog.set_level(logging.INFO, logger="streaming.batch_sink")

    async def scenario():
        agg = _batch_sink(private_redis.port, prefix)
        agg.redis_watch.check_every_s = 0.5
        await agg.write_online(agg.prepare(_messages(3)))  # checks: the marker is created
        client.flushall()
        await agg.write_online(agg.prepare(_messages(3, 10)))  # inside the interval: not checked now
        noticed_at_once = agg.redis_watch.losses
        await asyncio.sleep(1.0)  # no more writes
        losses = agg.redis_watch.losses
        await agg.close()
        return noticed_at_once, losses

    noticed_at_once, losses = asyncio.run(scenario())
    assert (noticed_at_once, losses) == (0, 1)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "is gone" in errors[0] and "velocity features rebuild" in errors[0], errors
    assert client.get(f"{prefix}:meta:instance") is not None, "the marker is re-created"
    client.close()
