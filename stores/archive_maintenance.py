"""Archive upkeep: merge a day's small files into one, and drop days older than a horizon, without breaking a
reader (a training set, a backfill) that listed the files before.

Nothing a reader may hold is removed at once. Compaction writes the merged file, then a manifest
(`date=D/_superseded.json`) naming the inputs it replaces; from then on `archive_files` lists the merged file
and skips the inputs. Retention writes `date=D/_expired`, and the day is no longer listed. The files themselves
are deleted by a later run, once the marker is older than a grace period longer than any build takes. A reader
that saw both the merged file and an input reads each row twice, which is harmless: every reader deduplicates by
`txn_id` (archive rows are identical copies).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from stores.archive import ARCHIVE_SCHEMA, EXPIRED, SUPERSEDED, archive_dir, visible_files


@dataclass
class MaintenanceReport:
    compacted_days: int = 0
    files_merged: int = 0
    expired_days: list[str] = field(default_factory=list)
    deleted_files: int = 0
    deleted_days: int = 0

    def lines(self) -> list[str]:
        return [f"compacted {self.compacted_days} day(s) ({self.files_merged} files merged)",
                f"expired {len(self.expired_days)} day(s) older than the horizon",
                f"deleted {self.deleted_files} superseded file(s) and {self.deleted_days} expired day(s) past the "
                "grace period"]


def superseded(day_dir: Path) -> set[str]:
    """File names a day's compaction manifest replaces."""
    manifest = day_dir / SUPERSEDED
    return set(json.loads(manifest.read_text())["inputs"]) if manifest.is_file() else set()


def _day(day_dir: Path) -> dt.date:
    return dt.date.fromisoformat(day_dir.name.removeprefix("date="))


def _age_s(path: Path, now: float) -> float:
    return now - path.stat().st_mtime


def maintain(offline_dir: Path, *, today: dt.date, retention_days: int | None, min_files: int = 4,
             grace_s: float = 3_600.0, now: float | None = None) -> MaintenanceReport:
    """Compact days before `today` with at least `min_files` visible files, expire days older than
    `retention_days`, and delete what earlier runs marked once their markers are older than `grace_s`."""
    now = time.time() if now is None else now
    report = MaintenanceReport()
    root = archive_dir(offline_dir)
    for day_dir in sorted(p for p in root.glob("date=*") if p.is_dir()):
        day = _day(day_dir)
        expired = day_dir / EXPIRED
        if expired.exists():
            if _age_s(expired, now) >= grace_s:
                shutil.rmtree(day_dir)
                report.deleted_days += 1
            continue
        if retention_days is not None and day < today - dt.timedelta(days=retention_days):
            expired.write_text(f"expired {dt.datetime.fromtimestamp(now, dt.UTC).isoformat()}\n")
            report.expired_days.append(str(day))
            continue
        manifest = day_dir / SUPERSEDED
        if manifest.is_file() and _age_s(manifest, now) >= grace_s:
            for name in superseded(day_dir):
                (day_dir / name).unlink(missing_ok=True)
                report.deleted_files += 1
            manifest.unlink()
        if day >= today or manifest.exists():  # today's day still grows; one compaction in flight per day
            continue
        inputs = visible_files(day_dir)
        if len(inputs) >= min_files:
            _compact(day_dir, inputs)
            report.compacted_days += 1
            report.files_merged += len(inputs)
    return report


def _compact(day_dir: Path, inputs: list[Path]) -> Path:
    """One file with every row of `inputs` (sorted by card and arrival), then the manifest that hides them."""
    import pyarrow as pa

    table = pa.concat_tables([pq.read_table(p).select(ARCHIVE_SCHEMA.names).cast(ARCHIVE_SCHEMA) for p in inputs])
    table = table.sort_by([("card", "ascending"), ("seq", "ascending")])
    merged = day_dir / f"part-compacted-{uuid.uuid4().hex[:12]}.parquet"
    tmp = day_dir / f".{merged.name}.tmp"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, merged)
    manifest_tmp = day_dir / f".{SUPERSEDED}.tmp"
    manifest_tmp.write_text(json.dumps({"merged": merged.name, "inputs": [p.name for p in inputs],
                                        "rows": table.num_rows}))
    os.replace(manifest_tmp, day_dir / SUPERSEDED)
    return merged
