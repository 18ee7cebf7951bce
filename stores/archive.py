"""The stream's raw-transaction archive in the offline store: Parquet partitioned by event date.

Rows are appended per batch to a spool file, an Arrow IPC stream with one record batch per consumer batch (a killed
worker loses nothing that was acknowledged, since the spool is written before the batch's offsets can be
committed), and rolled into Parquet files under `archive/date=YYYY-MM-DD/` by size or age, atomically (temp file +
rename). The spool was JSON lines until 2026-12; such a spool left by an older worker is still read and rolled.
A crash between writing Parquet and removing the spool, or a redelivered batch, can leave a transaction twice:
readers deduplicate by `txn_id`, keeping the earliest arrival (smallest `seq`; a redelivered copy carries its first
copy's seq) (see `read_archive`). Cards' PANs are never archived, only entity keys.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from stores.processes import pid_alive

log = logging.getLogger(__name__)

ARCHIVE_SCHEMA = pa.schema([
    ("txn_id", pa.string()),
    ("card", pa.string()),
    ("pan_last4", pa.string()),
    ("amount", pa.float64()),
    ("amount_cents", pa.int64()),
    ("ts", pa.int64()),
    ("merchant", pa.string()),
    ("category", pa.string()),
    ("fraud_label", pa.int8()),
    ("late", pa.bool_()),
    ("seq", pa.int64()),  # the card's arrival position (SPEC section 4); seq // 1000 is the arrival time in ms
    ("partition", pa.int32()),
    ("offset", pa.int64()),
    ("archived_ms", pa.int64()),
])
ARCHIVE_COLUMNS = tuple(ARCHIVE_SCHEMA.names)
DAY_MS = 86_400_000
SPOOL_SUFFIX = ".arrows"  # an Arrow IPC stream
_JSON_SPOOL_SUFFIX = ".jsonl"  # what workers before 2026-12 spooled
_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the IPC stream format's end marker
_SCHEMA_MESSAGE = ARCHIVE_SCHEMA.serialize().to_pybytes()  # how every spool starts
UNREADABLE_SUFFIX = ".unreadable"  # a spool set aside because it cannot be read


def archive_dir(offline_dir: Path) -> Path:
    return Path(offline_dir) / "archive"


def spool_files(root: Path) -> list[Path]:
    """Every spool under an archive root: live workers', dead ones', and those a roller has claimed."""
    spool_dir = Path(root) / "_spool"
    if not spool_dir.is_dir():
        return []
    return sorted(p for p in spool_dir.iterdir()
                  if p.suffix in (SPOOL_SUFFIX, _JSON_SPOOL_SUFFIX) or ".recovering" in p.name)


def _date_of(ts_ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts_ms // 1000))


class ArchiveWriter:
    """Appends archive rows to a spool and rolls them into date-partitioned Parquet files."""

    def __init__(self, offline_dir: Path, *, roll_bytes: int = 32 << 20, roll_seconds: float = 60.0,
                 fsync: bool = False) -> None:
        self.root = archive_dir(offline_dir)
        self.spool_dir = self.root / "_spool"
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.roll_bytes = roll_bytes
        self.roll_seconds = roll_seconds
        self.fsync = fsync
        self._name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._fh = None
        self._opened_at = 0.0
        self._bytes = 0
        self.rows_written = 0
        # pyarrow imports pandas the first time it converts Python values (0.4-2.5 s here, holding the GIL): paid
        # now, at start, not by the first batch or the first roll in the middle of the stream.
        pa.array([0])

    def _open(self) -> None:
        path = self.spool_dir / f"{self._name}-{time.time_ns():x}{SPOOL_SUFFIX}"
        self._fh = open(path, "ab", buffering=0)  # noqa: SIM115 - kept open across batches on purpose
        self._path = path
        self._opened_at = time.monotonic()
        self._bytes = 0
        self._write(_SCHEMA_MESSAGE)

    def append(self, rows: pa.RecordBatch) -> None:
        """Durably (to the OS) append one batch's rows (ARCHIVE_SCHEMA); call before its offsets may be committed.

        Columnar end to end: building the batch's columns costs the hot path about half of what a JSON line per
        row did, and the roll reads the spool back without parsing (bench/RESULTS.md, fourteenth session).
        """
        if not rows.num_rows:
            return
        if not rows.schema.equals(ARCHIVE_SCHEMA):
            raise ValueError(f"archive rows must have the archive's schema, got {rows.schema}")
        if self._fh is None:
            self._open()
        self._write(rows.serialize())
        self.rows_written += rows.num_rows

    def _write(self, message: pa.Buffer | bytes) -> None:
        """One IPC message, whole or not at all: a failed write (a full disk) is cut off again, so the spool ends
        with its last complete batch and later appends stay readable behind it."""
        start, fd, data = self._bytes, self._fh.fileno(), memoryview(message)
        size = data.nbytes
        try:
            while data:
                data = data[os.write(fd, data):]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
        self._bytes = start + size

    def should_roll(self) -> bool:
        return self._fh is not None and (
            self._bytes >= self.roll_bytes or time.monotonic() - self._opened_at >= self.roll_seconds
        )

    def detach(self) -> Path | None:
        """Close the current spool and return it for rolling; the next append opens a new one."""
        if self._fh is None:
            return None
        with contextlib.suppress(OSError):  # readers stop at a spool's end without it too
            self._write(_END_OF_STREAM)
        self._fh.close()
        self._fh = None
        return self._path

    def close(self) -> None:
        path = self.detach()
        if path:
            roll_spool(path, self.root)


def roll_spool(spool: Path, root: Path, *, use_threads: bool = True) -> int:
    """Turn one spool file into Parquet files, one per event date, then delete it. Returns rows rolled (0 when
    another roller claimed the spool first: it rolls the same rows). `use_threads=False` parses on the calling
    thread only (a worker's background roll: Arrow's pool would take every core from the hot path)."""
    try:
        table = read_spool(spool, use_threads=use_threads)
    except FileNotFoundError:
        return 0
    if table.num_rows:
        # Vectorized (the roll runs in a thread beside the hot path: no per-row Python holding the GIL).
        days = pc.divide(table.column("ts"), pa.scalar(DAY_MS, pa.int64()))
        for day in pc.unique(days).to_pylist():
            part = table.filter(pc.equal(days, day))
            out_dir = root / f"date={_date_of(day * DAY_MS)}"
            out_dir.mkdir(parents=True, exist_ok=True)
            final = out_dir / f"part-{spool.stem}.parquet"
            # The final name comes from the spool, so a rerun after a crash (or two rollers of one spool: a
            # stopping worker's roll thread and its shutdown recovery) overwrites the same file with the same
            # rows, never a duplicate; each writer has its own temporary name.
            tmp = out_dir / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
            pq.write_table(part, tmp, compression="zstd")
            os.replace(tmp, final)
    spool.unlink(missing_ok=True)
    return table.num_rows


def read_spools(root: Path) -> pa.Table:
    """Every row in the spools under an archive root (workers' not-yet-rolled batches), read without claiming
    them; a spool rolled meanwhile is skipped (its rows are in Parquet files by then: list those afterwards)."""
    tables = []
    for path in spool_files(root):
        try:
            tables.append(read_spool(path))
        except FileNotFoundError:
            continue
    return pa.concat_tables(tables) if tables else ARCHIVE_SCHEMA.empty_table()


def read_spool(spool: Path, *, use_threads: bool = True) -> pa.Table:
    """Read a spool, ignoring a torn last record batch (or JSON line) left by a killed writer. A file that is not
    a spool of this schema raises ArchiveError naming it."""
    raw = spool.read_bytes()
    if raw[:1] == b"{":
        return _read_json_spool(raw, use_threads)
    batches = []
    if raw and not _SCHEMA_MESSAGE.startswith(raw):  # else empty, or killed while writing the schema
        try:
            reader = ipc.open_stream(pa.py_buffer(raw))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ArchiveError(f"{spool} is not an archive spool (an Arrow IPC stream of the archive's rows): "
                               f"{exc}; move it out of {spool.parent}") from None
        if not reader.schema.equals(ARCHIVE_SCHEMA):
            raise ArchiveError(f"{spool} holds rows of another schema than the archive's ({reader.schema.names}); "
                               f"move it out of {spool.parent}")
        try:
            while True:
                batches.append(reader.read_next_batch())
        except StopIteration:
            pass  # the end-of-stream marker, or the end of a spool whose writer is still appending
        except (pa.ArrowInvalid, OSError) as exc:  # a torn last batch: its offsets were never committed
            log.info("%s: ignored a torn record batch after %d complete ones (%s)", spool.name, len(batches), exc)
    return pa.Table.from_batches(batches, schema=ARCHIVE_SCHEMA)


def _read_json_spool(raw: bytes, use_threads: bool) -> pa.Table:
    if not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]
    if not raw:
        return ARCHIVE_SCHEMA.empty_table()
    opts = pajson.ParseOptions(explicit_schema=ARCHIVE_SCHEMA, unexpected_field_behavior="ignore")
    table = pajson.read_json(pa.BufferReader(raw), parse_options=opts,
                             read_options=pajson.ReadOptions(use_threads=use_threads))
    return table.select(list(ARCHIVE_COLUMNS)).cast(ARCHIVE_SCHEMA)


def recover_spools(root: Path) -> int:
    """Roll spools left behind by dead workers (a live worker's spool, named by its pid, is left alone), and
    spools a dead recoverer had claimed (`.recovering<pid>`) but not finished.

    Claiming by rename makes this safe when several workers start at once.
    """
    rows = 0
    for spool in spool_files(root):
        stem, _, claimer = spool.name.partition(".recovering")
        owner = claimer if claimer else stem.split("-", 1)[0]
        if owner.isdigit() and int(owner) != os.getpid() and pid_alive(int(owner)):
            continue
        claimed = spool.with_name(f"{spool.stem}.recovering{os.getpid()}")
        try:
            os.rename(spool, claimed)
        except FileNotFoundError:
            continue  # another worker claimed it
        try:
            got = roll_spool(claimed, root)
        except (ArchiveError, pa.ArrowInvalid) as exc:  # set aside, never deleted: it may hold rows
            aside = claimed.with_name(f"{spool.stem}{UNREADABLE_SUFFIX}")
            os.rename(claimed, aside)
            log.error("archive spool %s cannot be read and was set aside as %s; its rows are not archived (the "
                      "worker's own spools are unaffected): %s", spool.name, aside.name, exc)
            continue
        rows += got
        log.info("recovered %s archived rows from %s", got, spool.name)
    return rows


def read_archive(offline_dir: Path, columns: Iterable[str] | None = None):
    """The archive as a pandas frame, deduplicated by txn_id (earliest arrival), in arrival order per card."""
    import duckdb

    files = [str(p) for p in listed_files(offline_dir)]
    cols = ", ".join(f'"{c}"' for c in (columns or ARCHIVE_COLUMNS))
    if not files:
        return ARCHIVE_SCHEMA.empty_table().to_pandas()[list(columns or ARCHIVE_COLUMNS)]
    con = duckdb.connect()
    try:
        return con.execute(
            f"""
            SELECT {cols} FROM read_parquet(?, union_by_name = true)
            QUALIFY row_number() OVER (PARTITION BY txn_id ORDER BY seq, archived_ms) = 1
            ORDER BY seq, card
            """,
            [files],
        ).df()
    finally:
        con.close()


class ArchiveError(ValueError):
    """A file in the offline store cannot be read; the message names it and says what to do."""


def check_parquet_files(files: Iterable[Path], what: str = "archive file") -> list[Path]:
    """Each file's Parquet footer is readable (cheap: the footer only), else ArchiveError naming the file.

    A footer check catches the usual damage (a truncated copy, a file that is not Parquet, a zero-length file
    left by a full disk); damage inside a data page only shows when the rows are read.
    """
    checked = []
    for path in files:
        path = Path(path)
        try:
            pq.read_metadata(path)
        except (pa.ArrowException, OSError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise ArchiveError(
                f"{what} {path} is not readable Parquet ({reason}); move it aside, out of the offline store "
                "(e.g. into a quarantine folder), and rerun: its rows are left out until a good copy is put back"
            ) from None
        checked.append(path)
    return checked


#: Markers of archive upkeep (stores.archive_maintenance): a compacted day's replaced inputs, an expired day.
SUPERSEDED = "_superseded.json"
EXPIRED = "_expired"


def visible_files(day_dir: Path) -> list[Path]:
    """A day's Parquet files as readers see them: none for an expired day; for a compacted one, the merged file
    and anything written since, not the inputs it replaces (they stay on disk for readers that listed them)."""
    if (day_dir / EXPIRED).exists():
        return []
    manifest = day_dir / SUPERSEDED
    hidden = set(orjson.loads(manifest.read_bytes())["inputs"]) if manifest.is_file() else set()
    return sorted(p for p in day_dir.glob("*.parquet") if p.name not in hidden)


def listed_files(offline_dir: Path) -> list[Path]:
    """The archive's Parquet files (`archive/date=*/*.parquet`) readers should read, sorted, unchecked."""
    root = archive_dir(offline_dir)
    return [f for day in sorted(p for p in root.glob("date=*") if p.is_dir()) for f in visible_files(day)]


def archive_files(offline_dir: Path) -> list[Path]:
    """The archive's Parquet files readers should read (`listed_files`), each one's footer checked.

    Raises ArchiveError naming the first unreadable file. An empty list means nothing is archived yet.
    """
    return check_parquet_files(listed_files(offline_dir))
