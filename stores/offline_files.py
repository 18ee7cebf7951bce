"""The offline store's files, shared by both engines: where snapshots live, how they are written (atomically,
with their publication time), the small as-of tables the point-in-time join uses, and the training frame's
final types and ratios.

Layout (root = `$VELOCITY_DATA_DIR/offline`):
- `archive/date=YYYY-MM-DD/*.parquet` — every transaction that flowed through the stream (stores.archive)
- `snapshots/card_agg_1w/cutoff=YYYY-MM-DD/part-0.parquet` — one nightly 1-week snapshot per cut-off
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
from featurestore.definitions import REGISTRY, FeatureGroup, Registry
from featurestore.entity import EntityKeyer
from featurestore.ratios import compute_ratio_columns

DAY_MS = 86_400_000
SNAPSHOT_GROUP = "card_agg_1w"


class OfflineError(ValueError):
    """Bad or missing offline input; the message says what and where."""


def cutoff_ms_of(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)


def snapshot_dir(offline_dir: Path) -> Path:
    return Path(offline_dir) / "snapshots" / SNAPSHOT_GROUP


def snapshot_path(offline_dir: Path, day: dt.date) -> Path:
    return snapshot_dir(offline_dir) / f"cutoff={day.isoformat()}" / "part-0.parquet"


def pan_keys(pans: list[str], secret: str) -> list[str]:
    keyer = EntityKeyer(secret)
    return [keyer(p) for p in pans]


def events_from_history(table: pa.Table, secret: str) -> pa.Table:
    import pyarrow.compute as pc

    enc = pc.dictionary_encode(table.column("cc_num")).combine_chunks()
    keys = pa.array(pan_keys(enc.dictionary.to_pylist(), secret), pa.string())
    amount = pc.cast(table.column("amount"), pa.float64())
    cents = pc.cast(pc.round(pc.multiply(amount, 100.0)), pa.int64())
    label = table.column("fraud_label") if "fraud_label" in table.column_names else pa.nulls(table.num_rows, pa.int8())
    return pa.table({
        "txn_id": table.column("txn_id"), "card": keys.take(enc.indices), "amount": amount,
        "amount_cents": cents, "ts": pc.cast(table.column("ts"), pa.int64()),
        "fraud_label": pc.cast(label, pa.int8()), "late": pa.array(np.zeros(table.num_rows, dtype=bool)),
        "seq": pa.array(np.arange(table.num_rows, dtype=np.int64)),  # row order is stream order
        "arrived_ms": pc.cast(table.column("ts"), pa.int64()),  # a history's rows arrive at their event time
    })


def write_snapshot_file(frame: pd.DataFrame | pa.Table, offline_dir: Path, day: dt.date, published_ms: int) -> int:
    """Write one cut-off's snapshot with its publication time; a rerun replaces the file atomically (temp file +
    rename) and keeps the first publication time (readers have used the cut-off since then). Returns the
    publication time recorded."""
    final = snapshot_path(offline_dir, day)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        with contextlib.suppress(Exception):  # an unreadable old file is simply replaced
            published_ms = min(published_ms, int(pq.read_table(final, columns=["published_ms"])[0][0].as_py()))
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    if "published_ms" in table.column_names:
        table = table.drop(["published_ms"])
    table = table.append_column("published_ms", pa.array(np.full(table.num_rows, published_ms, dtype=np.int64)))
    tmp = final.with_name(f".part-0.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return published_ms


def snapshot_publications(offline_dir: Path) -> dict[int, int]:
    """cut-off ms -> published ms of every snapshot in the offline store (an empty snapshot: nothing to join)."""
    out = {}
    for path in read_snapshots(offline_dir):
        table = pq.read_table(path, columns=["cutoff_ms", "published_ms"])
        if table.num_rows:
            out[int(table["cutoff_ms"][0].as_py())] = int(table["published_ms"][0].as_py())
    return out


def snapshot_tables(offline_dir: Path, start_ms: int, end_ms: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two small tables `offline_sql.asof_sql` joins: `snap_days(day, c1, p1)` for the days of
    [start_ms, end_ms) (the latest cut-off at or before the day's midnight and its publication time) and
    `snap_cutoffs(cutoff_ms, published_ms)`. Built here once for both engines."""
    pubs = snapshot_publications(offline_dir)
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


def week_days(days: list[dt.date], group: FeatureGroup = REGISTRY.batch_group) -> pd.DataFrame:
    """`week_days(day, cutoff_ms)`: for each run date's cut-off C, the UTC day numbers of [C - window, C)."""
    span = group.window_ms // DAY_MS
    cutoffs = np.array([cutoff_ms_of(d) for d in days], dtype=np.int64)
    before = [c // DAY_MS - np.arange(1, span + 1) for c in cutoffs]
    return pd.DataFrame({"day": np.concatenate(before).astype(np.int64) if before else np.array([], dtype=np.int64),
                         "cutoff_ms": np.repeat(cutoffs, span)})


def split_snapshots(frame: pd.DataFrame, days: list[dt.date]) -> list[tuple[dt.date, pd.DataFrame]]:
    """One frame per night, in `days` order, sorted by card (a night without rows gets an empty frame)."""
    frame = frame.sort_values(["cutoff_ms", "card"], kind="stable")
    groups = {int(c): g.reset_index(drop=True) for c, g in frame.groupby("cutoff_ms", sort=False)}
    return [(d, groups.get(cutoff_ms_of(d), frame.iloc[0:0])) for d in days]


def latest_snapshot_before(offline_dir: Path, day: dt.date) -> tuple[dt.date, pd.DataFrame] | None:
    """The newest published snapshot with a cut-off before `day` (None if there is none)."""
    earlier = [p for p in read_snapshots(offline_dir) if snapshot_day(p) < day]
    if not earlier:
        return None
    return snapshot_day(earlier[-1]), pq.read_table(earlier[-1]).to_pandas()


def snapshot_day(path: Path) -> dt.date:
    """The cut-off date a snapshot file is for (`cutoff=YYYY-MM-DD/part-0.parquet`)."""
    return dt.date.fromisoformat(Path(path).parent.name.removeprefix("cutoff="))


def read_snapshots(offline_dir: Path) -> list[Path]:
    return sorted(snapshot_dir(offline_dir).glob("cutoff=*/part-0.parquet"))


def add_ratios(frame: pd.DataFrame, registry: Registry = REGISTRY) -> pd.DataFrame:
    """The ratio columns, by the one function the scorer also calls."""
    for name, values in compute_ratio_columns(frame, registry.ratios).items():
        frame[name] = values
    return frame


def finish_training_frame(frame: pd.DataFrame, registry: Registry = REGISTRY) -> pd.DataFrame:
    """Types as the schema says (batch features are float: NaN before the first snapshot), then the ratios."""
    for name in registry.batch_group.feature_names:
        frame[name] = frame[name].astype("float64")
    frame["snapshot_cutoff_ms"] = frame["snapshot_cutoff_ms"].astype("Int64")
    frame["fraud_label"] = frame["fraud_label"].astype("Int8")
    frame = add_ratios(frame, registry)
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

