"""The offline store's files, shared by both engines: where snapshots live, how they are written (atomically,
with their publication time), the small as-of tables the point-in-time join uses, and the training frame's
final types and ratios.

Layout (root = `$VELOCITY_DATA_DIR/offline`):
- `archive/date=YYYY-MM-DD/*.parquet` — every transaction that flowed through the stream (stores.archive)
- `snapshots/<group>/cutoff=YYYY-MM-DD/part-0.parquet` — one nightly snapshot per batch group and cut-off (the
  group's entity column, its statistics, its features, `cutoff_ms`, `published_ms`); every group of one nightly
  run records the same publication time
- `labels/date=YYYY-MM-DD/*.parquet` — every fraud label version (stores.labels)
- training sets wherever `--out` puts them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from featurestore import offline_sql as sql
from featurestore.definitions import REGISTRY, Registry
from featurestore.entity import EntityKeyer
from featurestore.event_time import event_time_columns
from featurestore.ratios import compute_ratio_columns

DAY_MS = 86_400_000
SNAPSHOT_GROUP = "card_agg_1w"
#: Snapshot files written at once: a backfill is nights x groups small files, and Parquet encoding releases the GIL.
FILE_THREADS = 4


class OfflineError(ValueError):
    """Bad or missing offline input; the message says what and where."""


def cutoff_ms_of(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)


def snapshots_root(offline_dir: Path) -> Path:
    """The folder holding every batch group's snapshots."""
    return Path(offline_dir) / "snapshots"


def snapshot_dir(offline_dir: Path, group: str = SNAPSHOT_GROUP) -> Path:
    return snapshots_root(offline_dir) / group


def snapshot_path(offline_dir: Path, day: dt.date, group: str = SNAPSHOT_GROUP) -> Path:
    return snapshot_dir(offline_dir, group) / f"cutoff={day.isoformat()}" / "part-0.parquet"


def pan_keys(pans: list[str], secret: str) -> list[str]:
    keyer = EntityKeyer(secret)
    return [keyer(p) for p in pans]


def card_numbers(keys: list[str]) -> list[int]:
    """`card_no` for each of `keys` (`offline_sql`): one number per distinct key, 1..n in first-seen order."""
    number: dict[str, int] = {}
    return [number.setdefault(k, len(number) + 1) for k in keys]


def constants_of(path: Path, columns: tuple[str, ...]) -> tuple[int, ...] | None:
    """The values every row of a snapshot file holds in `columns` (`cutoff_ms`, `published_ms`), None for an empty
    file. Read from the footer's statistics where they pin them (min = max in every row group): a training set
    looks at every snapshot file of every group (912 at seed scale), and reading the columns themselves took
    1.35 s against 0.3 s. A file without such statistics (another writer) has the columns read. Raises
    OfflineError naming the file when it is not a readable snapshot (damaged, truncated, columns missing)."""
    try:
        meta = pq.read_metadata(path)
        if meta.num_rows == 0:
            return None
        paths = [meta.schema.column(i).path for i in range(meta.num_columns)]
        found = []
        for column in columns:
            values = set()
            for i in range(meta.num_row_groups):
                stats = meta.row_group(i).column(paths.index(column)).statistics
                if stats is None or not stats.has_min_max or stats.null_count:
                    values = set()
                    break
                values |= {stats.min, stats.max}
            if len(values) != 1:
                table = pq.read_table(path, columns=list(columns))
                return tuple(int(table[c][0].as_py()) for c in columns)
            found.append(int(values.pop()))
        return tuple(found)
    except (pa.ArrowException, OSError, ValueError, TypeError) as exc:
        raise _unreadable(path, exc) from None


def read_snapshot_file(path: Path) -> pa.Table:
    """One snapshot file; OfflineError naming it when it cannot be read (a damaged file, not a traceback)."""
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: Exception) -> OfflineError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return OfflineError(f"{path} is not a readable snapshot file ({reason}): rerun `velocity batch` for its night "
                        "to rewrite it, or move it away")


def _published_ms_of(path: Path) -> int | None:
    with contextlib.suppress(Exception):  # an unreadable or empty old file is simply replaced
        return constants_of(path, ("published_ms",))[0]
    return None


def first_publication(offline_dir: Path, day: dt.date, groups: list[str], published_ms: int) -> int:
    """The publication time a (re)run of night `day` records for all its groups: the earliest already recorded by
    any of them (readers have used that cut-off since then), else `published_ms`."""
    found = [p for g in groups if (p := _published_ms_of(snapshot_path(offline_dir, day, g))) is not None]
    return min([published_ms, *found])


def write_snapshot_file(frame: pd.DataFrame | pa.Table, offline_dir: Path, day: dt.date, published_ms: int,
                        group: str = SNAPSHOT_GROUP) -> int:
    """Write one cut-off's snapshot of one group with its publication time; a rerun replaces the file atomically
    (temp file + rename) and keeps the first publication time (readers have used the cut-off since then). Returns
    the publication time recorded."""
    final = snapshot_path(offline_dir, day, group)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and (before := _published_ms_of(final)) is not None:
        published_ms = min(published_ms, before)
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    if "published_ms" in table.column_names:
        table = table.drop(["published_ms"])
    table = table.append_column("published_ms", pa.array(np.full(table.num_rows, published_ms, dtype=np.int64)))
    tmp = final.with_name(f".part-0.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return published_ms


def snapshot_publications(offline_dir: Path, group: str = SNAPSHOT_GROUP) -> dict[int, int]:
    """cut-off ms -> published ms of every snapshot of `group` in the offline store (an empty snapshot: nothing
    to join)."""
    out = {}
    for path in read_snapshots(offline_dir, group):  # footers only: threads would only contend for the GIL
        pinned = constants_of(path, ("cutoff_ms", "published_ms"))
        if pinned is not None:
            out[pinned[0]] = pinned[1]
    return out


def snapshot_tables(offline_dir: Path, start_ms: int, end_ms: int, group: str = SNAPSHOT_GROUP,
                    pubs: dict[int, int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two small tables `offline_sql.asof_sql` joins: `snap_days(day, c1, p1)` for the days of
    [start_ms, end_ms) (the latest cut-off at or before the day's midnight and its publication time) and
    `snap_cutoffs(cutoff_ms, published_ms)`. Built here once for both engines."""
    pubs = snapshot_publications(offline_dir, group) if pubs is None else pubs
    cutoffs = np.array(sorted(pubs), dtype=np.int64)
    days = np.arange(start_ms // DAY_MS, (end_ms - 1) // DAY_MS + 1, dtype=np.int64)
    pos = np.searchsorted(cutoffs, days * DAY_MS, side="right") - 1
    have = pos >= 0
    c1 = cutoffs[pos[have]] if len(cutoffs) else np.array([], dtype=np.int64)
    snap_days = pd.DataFrame({"day": days[have], "c1": c1,
                              "p1": np.array([pubs[int(c)] for c in c1], dtype=np.int64)})
    snap_cutoffs = pd.DataFrame({"cutoff_ms": cutoffs, "published_ms": np.array([pubs[int(c)] for c in cutoffs],
                                                                               dtype=np.int64)})
    return snap_days, snap_cutoffs


def asof_plan(offline_dir: Path, registry: Registry) -> tuple[tuple[int, ...], list[dict[int, int]]]:
    """Which publication history each batch group follows: groups whose snapshots share every cut-off and
    publication time (every group of one nightly run does) share one as-of join. Returns the index of each
    group's history and the distinct histories (cut-off ms -> published ms)."""
    histories: list[dict[int, int]] = []
    sets = []
    for g in registry.batch_groups:
        pubs = snapshot_publications(offline_dir, g.name)
        if pubs not in histories:
            histories.append(pubs)
        sets.append(histories.index(pubs))
    return tuple(sets), histories


def nights_table(days: list[dt.date]) -> pd.DataFrame:
    """`nights(day, cutoff_ms)`: each run date's cut-off and its UTC day number (`batch_sql`)."""
    cutoffs = np.array([cutoff_ms_of(d) for d in days], dtype=np.int64)
    return pd.DataFrame({"day": cutoffs // DAY_MS, "cutoff_ms": cutoffs})


def calendar_table(days: list[dt.date], registry: Registry = REGISTRY) -> pd.DataFrame:
    """`calendar(day)` for the run dates `days` (`batch_sql.calendar_days`)."""
    from featurestore.batch_sql import calendar_days

    nights = [cutoff_ms_of(d) // DAY_MS for d in days]
    return pd.DataFrame({"day": np.array(calendar_days(nights, registry), dtype=np.int64)})


def split_snapshots(table: pa.Table, days: list[dt.date],
                    registry: Registry = REGISTRY) -> list[tuple[dt.date, dict[str, pa.Table]]]:
    """The wide result of `batch_sql.snapshots_sql` as one Arrow table per night and batch group, in `days`
    order: the group's entity column, its statistics (`offline_sql.SNAPSHOT_STATS`, integers), its features and
    `cutoff_ms`, sorted by entity key; a group's rows are the entities with a transaction in its window (a night
    without any gets an empty table).

    Each group's rows and columns are picked once; nights are zero-copy slices of it. The tables are what the
    quality gate checks and what the snapshot files are written from: a backfill's nights never become pandas
    frames (converting there and back was a fifth of a DuckDB backfill's time)."""
    import pyarrow.compute as pc

    from featurestore.batch_sql import stat_column

    per_group = {}
    of_entity = {e: pc.equal(table["entity"], e) for e in dict.fromkeys(g.entity for g in registry.batch_groups)}
    for g in registry.batch_groups:
        keep = pc.and_(of_entity[g.entity], pc.fill_null(pc.greater(table[stat_column(g, "n")], 0), False))
        names = {"entity_key": g.entity_column, **{stat_column(g, k): sql.SNAPSHOT_STATS[k] for k in g.stats}}
        types = {sql.SNAPSHOT_STATS[k]: pa.int64() for k in g.stats}
        types |= {a.name: pa.int64() if a.function == "count" else pa.float64() for a in g.features}
        types |= {"cutoff_ms": pa.int64(), g.entity_column: pa.string()}
        # Only this group's columns are taken, in the engine's order.
        picked = table.select([*names, *g.feature_names, "cutoff_ms"]).filter(keep)
        picked = picked.rename_columns([names.get(c, c) for c in picked.column_names])
        picked = picked.cast(pa.schema([(c, types[c]) for c in picked.column_names])).combine_chunks()
        cutoffs = picked["cutoff_ms"].to_numpy()
        if len(cutoffs) and not (np.diff(cutoffs) >= 0).all():  # an engine that did not sort: sort here
            picked = picked.sort_by([("cutoff_ms", "ascending"), (g.entity_column, "ascending")]).combine_chunks()
            cutoffs = picked["cutoff_ms"].to_numpy()
        nights = {}
        for d in days:
            c = cutoff_ms_of(d)
            lo, hi = np.searchsorted(cutoffs, c, "left"), np.searchsorted(cutoffs, c, "right")
            nights[d] = picked.slice(lo, hi - lo)
        per_group[g.name] = nights
    return [(d, {name: nights[d] for name, nights in per_group.items()}) for d in days]


def latest_snapshot_before(offline_dir: Path, day: dt.date,
                           group: str = SNAPSHOT_GROUP) -> tuple[dt.date, pa.Table] | None:
    """The newest published snapshot of `group` with a cut-off before `day` (None if there is none)."""
    earlier = [p for p in read_snapshots(offline_dir, group) if snapshot_day(p) < day]
    if not earlier:
        return None
    return snapshot_day(earlier[-1]), read_snapshot_file(earlier[-1])


def snapshot_day(path: Path) -> dt.date:
    """The cut-off date a snapshot file is for (`cutoff=YYYY-MM-DD/part-0.parquet`)."""
    return dt.date.fromisoformat(Path(path).parent.name.removeprefix("cutoff="))


def read_snapshots(offline_dir: Path, group: str = SNAPSHOT_GROUP) -> list[Path]:
    """The snapshot files of one batch group, oldest cut-off first."""
    return sorted(snapshot_dir(offline_dir, group).glob("cutoff=*/part-0.parquet"))


def read_night(offline_dir: Path, day: dt.date, registry: Registry = REGISTRY) -> dict[str, pa.Table]:
    """Every batch group's stored snapshot of night `day` (the groups that have one), as `Engine.snapshots`
    returns it: what `velocity features rebuild` republishes."""
    paths = {g.name: snapshot_path(offline_dir, day, g.name) for g in registry.batch_groups}
    return {name: read_snapshot_file(p) for name, p in paths.items() if p.exists()}


def add_derived(frame: pd.DataFrame, registry: Registry = REGISTRY) -> pd.DataFrame:
    """The event-time and ratio columns, by the functions the scorer also calls."""
    for name, values in event_time_columns(frame["ts"].to_numpy(), registry.event_time).items():
        frame[name] = values
    for name, values in compute_ratio_columns(frame, registry.ratios).items():
        frame[name] = values
    return frame


def finish_training_frame(frame: pd.DataFrame, registry: Registry = REGISTRY) -> pd.DataFrame:
    """Types as the schema says (batch features are float: NaN before the first snapshot), then the event-time
    features and the ratios."""
    for name in (n for g in registry.batch_groups for n in g.feature_names):
        frame[name] = frame[name].astype("float64")
    frame["snapshot_cutoff_ms"] = frame["snapshot_cutoff_ms"].astype("Int64")
    frame["fraud_label"] = frame["fraud_label"].astype("Int8")
    frame = add_derived(frame, registry)
    return frame[list(sql.training_columns(registry))].reset_index(drop=True)


def write_frame(frame: pd.DataFrame, out: Path) -> Path:
    """Write `frame` as one Parquet file, atomically (temp file + rename): a failed write leaves nothing behind.

    Raises OfflineError, naming the path, when it cannot be written (a folder, a path under a regular file, no
    permission, a full disk); the temporary file is removed whatever happens.
    """
    import contextlib

    out = Path(out)
    if out.is_dir():
        raise OfflineError(f"cannot write {out}: it is a folder; give a file path such as {out / 'training.parquet'}")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
        os.replace(tmp, out)
    except OSError as exc:
        raise OfflineError(f"cannot write {out} ({exc.strerror or exc}); nothing was written: choose a writable "
                           "path (or free disk space) and rerun") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return out


def archived_labels(offline_dir: Path) -> pa.Table:
    """Every label version of the label store (`stores.labels`); an engine adds a history's inline ones. Resolved
    per cut-off by the SQL (latest labeled_at <= C, fraud wins a tie)."""
    from stores.archive import ArchiveError
    from stores.labels import read_labels

    try:
        return read_labels(offline_dir)
    except ArchiveError as exc:
        raise OfflineError(str(exc)) from None
