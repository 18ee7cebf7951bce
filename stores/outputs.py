"""Checks on where a command will write, run before any work: a bad --out fails in a second, not after the job.

Every check creates nothing it leaves behind: writability is probed with a temporary file that is removed at
once, in the folder that will hold the output or, when that folder does not exist yet, in its nearest existing
ancestor (the writer creates the missing folders). The probe is a real write, so it also holds for root (whom
permission bits do not stop), read-only mounts and pseudo file systems such as /proc.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path


class OutputError(ValueError):
    """The output path cannot be written; the message names it and says what to do."""


#: What a Parquet dataset folder written by Spark holds: part files, _SUCCESS and hidden .crc checksums.
_DATASET_ENTRY = re.compile(r"(part-.*|_.*|\..*\.crc)")


def is_parquet_dataset(path: Path) -> bool:
    """A non-empty folder holding only what Spark writes for a Parquet dataset (safe to replace as a whole)."""
    path = Path(path)
    if not path.is_dir():
        return False
    entries = list(path.iterdir())
    return bool(entries) and all(e.is_file() and _DATASET_ENTRY.fullmatch(e.name) for e in entries)


def _nearest_existing(path: Path) -> Path:
    cur = path
    while not cur.exists() and cur != cur.parent:
        cur = cur.parent
    return cur


def _probe_dir(folder: Path, flag: str, target: Path) -> None:
    """A temporary file can be created (and is removed) in `folder`, else OutputError."""
    if not folder.is_dir():
        raise OutputError(f"{flag} {target}: {folder} is a file, not a folder; choose a path in a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".velocity-probe-", dir=folder)
    except OSError as exc:
        raise OutputError(f"{flag} {target}: cannot write in {folder} ({exc.strerror or exc}); choose a writable "
                          "folder, or fix its permissions") from None
    os.close(fd)
    os.unlink(name)


def check_output_file(path: Path, *, flag: str = "--out", suffixes: tuple[str, ...] | None = None,
                      allow_dataset_dir: bool = False) -> Path:
    """`path` can be written (created or replaced) as a file; raises OutputError before any work if not.

    suffixes: the accepted extensions (lower case, with the dot). allow_dataset_dir: an existing folder is
    accepted when it is a Parquet dataset written earlier (Spark's output, replaced as a whole).
    """
    path = Path(path)
    example = path / (f"data{suffixes[0]}" if suffixes else "training.parquet")
    if path.is_dir():
        if allow_dataset_dir and is_parquet_dataset(path):
            _probe_dir(path.absolute().parent, flag, path)
            return path
        what = "a folder that is not a Parquet dataset written by Velocity" if allow_dataset_dir else "a folder"
        raise OutputError(f"{flag} {path} is {what}; give a file path such as {example}")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        got = f"unknown extension {path.suffix!r}" if path.suffix else "no extension"
        raise OutputError(f"{flag} {path}: {got}; use {' or '.join(suffixes)}")
    if path.exists() and not path.is_file():
        raise OutputError(f"{flag} {path} exists and is not a regular file; choose another path")
    _probe_dir(_nearest_existing(path.absolute().parent), flag, path)
    return path


def check_output_dir(path: Path, *, flag: str = "--offline-dir") -> Path:
    """`path` is (or can be created as) a folder this process can write in; raises OutputError if not."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder; choose a folder")
    _probe_dir(_nearest_existing(path.absolute()), flag, path)
    return path
