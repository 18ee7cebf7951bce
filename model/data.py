"""The training frame, as the model reads it: the offline store's point-in-time rows, turned once into one float32
matrix (every declared feature, NaN kept as NaN: XGBoost's missing value) in time order, and split by day.

Rows stay in `ts` order, so each split is a contiguous slice of that matrix (a view, not a copy); only the
columns and rows a fit actually uses are copied, once, into XGBoost's quantised matrix.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model import features as feats

DAY_MS = 86_400_000
#: A split in which more rows than this lack a 1-week snapshot cannot learn or test the original features.
MAX_WITHOUT_SNAPSHOT = 0.5


class TrainingDataError(ValueError):
    """The training data is missing, unreadable or unfit for a time split; the message says what to do."""


@dataclass(frozen=True)
class Source:
    """Where the training rows come from: a prebuilt training set, or the offline store through an engine."""

    training_set: Path | None = None
    history: Path | None = None
    offline_dir: Path | None = None
    engine: str = "duckdb"
    master: str = "local[*]"

    def describe(self) -> str:
        if self.training_set is not None:
            return f"training set {self.training_set}"
        what = f"history {self.history}" if self.history else f"stream archive under {self.offline_dir}"
        return f"{self.engine} over {what} + snapshots under {self.offline_dir}"


@dataclass
class TrainingData:
    X: np.ndarray  # float32 [rows, len(columns)], rows in ts order
    columns: tuple[str, ...]
    y: np.ndarray  # int8
    ts: np.ndarray  # int64 epoch ms
    card: np.ndarray  # int32 codes of the entity key (for the attack-position breakdown only)
    has_snapshot: np.ndarray  # bool
    start: dt.date
    end: dt.date  # exclusive
    source: str
    unlabeled_dropped: int = 0
    txn_id: object = None  # pyarrow string array, rows as above (fraud kinds are matched on it)
    target: object = None  # model.targets.Target: what decided the labels in `y`

    def cols(self, names: tuple[str, ...] | list[str]) -> list[int]:
        missing = [n for n in names if n not in self.columns]
        if missing:
            raise TrainingDataError(f"the training set has no column {', '.join(missing)}")
        return [self.columns.index(n) for n in names]

    @property
    def rows(self) -> int:
        return int(self.y.size)


@dataclass(frozen=True)
class TimeSplit:
    """Whole UTC days: train [train_start, val_start), validation [val_start, test_start), test [test_start, end)."""

    train_start: dt.date
    val_start: dt.date
    test_start: dt.date
    end: dt.date

    def ranges(self) -> dict[str, tuple[dt.date, dt.date]]:
        return {"train": (self.train_start, self.val_start), "validation": (self.val_start, self.test_start),
                "test": (self.test_start, self.end)}

    def slices(self, ts: np.ndarray) -> dict[str, slice]:
        """Row slices of a ts-sorted array."""
        cut = [int(np.searchsorted(ts, _ms(d), side="left"))
               for d in (self.train_start, self.val_start, self.test_start, self.end)]
        return {"train": slice(cut[0], cut[1]), "validation": slice(cut[1], cut[2]), "test": slice(cut[2], cut[3])}

    def to_dict(self) -> dict[str, list[str]]:
        return {k: [a.isoformat(), b.isoformat()] for k, (a, b) in self.ranges().items()}

    @classmethod
    def from_dict(cls, d: dict) -> TimeSplit:
        tr, va, te = (d[k] for k in ("train", "validation", "test"))
        return cls(*(dt.date.fromisoformat(x) for x in (tr[0], va[0], te[0], te[1])))

    def describe(self) -> str:
        return "; ".join(f"{k} {a} .. {b - dt.timedelta(days=1)} ({(b - a).days} d)"
                         for k, (a, b) in self.ranges().items())


def _ms(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)


def _day(ms: int) -> dt.date:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).date()


def split_by_day(ts: np.ndarray, *, val_days: int | None = None, test_days: int | None = None) -> TimeSplit:
    """Train on the earliest days, validate on the next, test on the latest (never random: an attack is a chain of
    transactions minutes apart, and a random split would put parts of one chain on both sides).

    Defaults: validation and test get 10% of the days with data each (at least one day), train the rest.
    """
    if ts.size == 0:
        raise TrainingDataError("the training set is empty")
    days = np.unique(ts // DAY_MS)
    n = days.size
    k = max(1, round(0.1 * n))
    val_days = k if val_days is None else val_days
    test_days = k if test_days is None else test_days
    if val_days < 1 or test_days < 1:
        raise TrainingDataError("--val-days and --test-days must be at least 1")
    if n < val_days + test_days + 1:
        raise TrainingDataError(f"the training set covers {n} day(s) with data; a time split needs at least "
                                f"{val_days + test_days + 1} (train >= 1, validation {val_days}, test {test_days})")
    day0 = dt.date(1970, 1, 1)
    d = [day0 + dt.timedelta(days=int(x)) for x in days]
    return TimeSplit(d[0], d[n - test_days - val_days], d[n - test_days], d[-1] + dt.timedelta(days=1))


# ------------------------------------------------------------------ loading


def load(source: Source, *, start: dt.date | None, end: dt.date | None, secret: str,
         allowed_lateness_ms: int, labels_as_of_ms: int | None = None) -> TrainingData:
    """Build (or read) the point-in-time training set for [start, end) and turn it into a TrainingData whose
    target is each row's label as known at `labels_as_of_ms` (default: now; see model.targets)."""
    from model import targets

    as_of = int(time.time() * 1000) if labels_as_of_ms is None else int(labels_as_of_ms)
    versions, sources = targets.label_versions(source.offline_dir, source.history)
    labels = (versions, as_of, sources)
    if source.training_set is not None:
        table = _read_parquet(source.training_set, start, end)
        return _to_data(table, start, end, source.describe(), labels)
    from batch.engines import build_training_set, open_engine

    eng = open_engine(source.engine, offline_dir=source.offline_dir, history=source.history, secret=secret,
                      master=source.master, allowed_lateness_ms=allowed_lateness_ms)
    try:
        lo, hi = eng.span
        if lo is None:
            raise TrainingDataError("no transactions to train on")
        start = start or _day(lo)
        end = end or _day(hi) + dt.timedelta(days=1)
        if end <= start:
            raise TrainingDataError(f"--end {end} must be after --start {start}")
        if source.engine == "spark":  # the executors write Parquet; the driver never holds the frame twice
            tmp = Path(tempfile.mkdtemp(prefix="velocity-train-", dir=source.offline_dir))
            try:
                build_training_set(eng, start, end, tmp / "training")
                table = _read_parquet(tmp / "training", None, None)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            table = build_training_set(eng, start, end, None)
    finally:
        eng.close()
    return _to_data(table, start, end, source.describe(), labels)


def _read_parquet(path: Path, start: dt.date | None, end: dt.date | None):
    import pyarrow.dataset as ds

    if not Path(path).exists():
        raise TrainingDataError(f"--training-set {path} does not exist (build one with `velocity features "
                                "training-set --out PATH`, or leave --training-set out to build it now)")
    wanted = ["txn_id", "ts", "fraud_label", "card", "snapshot_cutoff_ms", *feats.all_features()]
    try:
        data = ds.dataset(str(path), format="parquet")
    except Exception as exc:
        raise TrainingDataError(f"cannot read {path} as Parquet ({' '.join(str(exc).split())[:200]})") from None
    missing = [c for c in wanted if c not in data.schema.names]
    if missing:
        raise TrainingDataError(f"{path} is not a training set of the current feature definitions: no column "
                                f"{', '.join(missing)} (rebuild it with `velocity features training-set`)")
    flt = None
    if start is not None:
        flt = ds.field("ts") >= _ms(start)
    if end is not None:
        flt = (ds.field("ts") < _ms(end)) if flt is None else flt & (ds.field("ts") < _ms(end))
    return data.to_table(columns=wanted, filter=flt)


def _column(table, name: str) -> np.ndarray:
    """float64 NumPy array of one column (pandas frame or Arrow table); nulls become NaN."""
    col = table[name]
    if hasattr(col, "to_numpy") and hasattr(col, "dtype"):  # pandas Series (nullable ints included)
        return col.to_numpy(dtype=np.float64, na_value=np.nan)
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)


def _card_codes(table) -> np.ndarray:
    col = table["card"]
    if hasattr(col, "dtype"):
        import pandas as pd

        return pd.factorize(col)[0].astype(np.int32)
    import pyarrow.compute as pc

    return pc.dictionary_encode(col).combine_chunks().indices.to_numpy(zero_copy_only=False).astype(np.int32)


def _txn_ids(table):
    import pyarrow as pa

    col = table["txn_id"]
    if hasattr(col, "dtype"):  # pandas
        return pa.array(col.to_numpy(dtype=object), pa.string())
    return pa.chunked_array(col.chunks).combine_chunks() if hasattr(col, "chunks") else col


def _to_data(table, start: dt.date | None, end: dt.date | None, source: str, labels=None) -> TrainingData:
    from model import targets

    n = len(table)
    if n == 0:
        raise TrainingDataError(f"no training rows in [{start}, {end})" if start else "the training set is empty")
    ts = _column(table, "ts").astype(np.int64)
    txn = _txn_ids(table)
    versions, as_of, sources = labels if labels is not None else (targets.LABELS_SCHEMA.empty_table(),
                                                                  int(time.time() * 1000), [])
    label, target = targets.apply(txn, _column(table, "fraud_label"), versions, as_of, sources)
    order = None if np.all(ts[1:] >= ts[:-1]) else np.argsort(ts, kind="stable")
    labeled = ~np.isnan(label)
    keep = labeled if order is None else labeled[order]
    idx = order if order is not None else None

    def take(a: np.ndarray) -> np.ndarray:
        a = a if idx is None else a[idx]
        return a if keep.all() else a[keep]

    import pyarrow as pa

    rows = np.arange(n) if idx is None else idx
    txn = txn.take(pa.array(rows if keep.all() else rows[keep]))
    columns = feats.all_features()
    X = np.empty((int(keep.sum()), len(columns)), dtype=np.float32)
    for j, name in enumerate(columns):
        X[:, j] = take(_column(table, name))
    data = TrainingData(
        X=X, columns=columns, y=take(label).astype(np.int8), ts=take(ts), card=take(_card_codes(table)),
        has_snapshot=~np.isnan(take(_column(table, "snapshot_cutoff_ms"))),
        start=start or _day(int(ts.min())), end=end or _day(int(ts.max())) + dt.timedelta(days=1),
        source=source, unlabeled_dropped=int(n - keep.sum()), txn_id=txn, target=target)
    if data.rows == 0:
        raise TrainingDataError("no labeled rows to train on (fraud_label is missing on every row)")
    return data


def check_snapshots(data: TrainingData, split: TimeSplit, slices: dict[str, slice],
                    count_feature: str | None = None) -> dict[str, float]:
    """Share of rows without a 1-week snapshot per split; too many and the ratio features are all missing.

    Also refuses a training set where most rows with a snapshot find their card absent from it (a 1-week count of
    0): real cards that transact today mostly did last week too, so that is the mark of snapshots keyed with
    another entity secret than the transactions."""
    out = {}
    count_col = data.cols([count_feature])[0] if count_feature else None
    for name, sl in slices.items():
        rows = sl.stop - sl.start
        share = float(1 - data.has_snapshot[sl].mean()) if rows else 1.0
        out[name] = share
        if rows == 0:
            a, b = split.ranges()[name]
            raise TrainingDataError(f"the {name} days ({a} .. {b - dt.timedelta(days=1)}) have no rows")
        if count_col is not None and name != "train":
            snap = data.has_snapshot[sl]
            absent = float(np.mean(data.X[sl][snap, count_col] == 0)) if snap.any() else 0.0
            if absent > MAX_WITHOUT_SNAPSHOT:
                raise TrainingDataError(
                    f"{absent:.0%} of the {name} rows find their card absent from the 1-week snapshot they use: "
                    "the snapshots were most likely built with another VELOCITY_ENTITY_SECRET than the "
                    "transactions; rebuild them (`velocity batch ...`) with the same secret")
        if share > MAX_WITHOUT_SNAPSHOT:
            a, b = split.ranges()[name]
            raise TrainingDataError(
                f"{share:.0%} of the {name} rows ({a} .. {b - dt.timedelta(days=1)}) have no card_agg_1w snapshot, so "
                "the 1-week features and the ratios are missing there: build the snapshots first, e.g. `velocity "
                f"batch --start {data.start + dt.timedelta(days=1)} --end {data.end - dt.timedelta(days=1)} "
                "--engine duckdb [--history PATH]`")
    return out
