"""Online/offline skew, measured: the idea of Chronon's consistency job (`velocity consistency`).

Scored transactions are sampled from the `scores` topic, both what the stream scorer produced (`source: stream`)
and what the HTTP API served (`source: api`). Each one's features are recomputed offline, from the stream's archive
and the nightly snapshots, by the batch engine's point-in-time training-set code (`batch.engines`), and compared
feature by feature: floats equal to 1e-9 relative, a missing value (null/NaN) equal only to a missing one.

- The stream's scores are the reference (SPEC section 4): a transaction the stream applied is scored as of its own
  arrival, exactly as its training row is built, so 0 mismatches are expected and anything else is skew.
- The API scores a transaction before it enters the stream, so under concurrent traffic on one card it can miss
  what was still in flight, or serve a snapshot published a moment later. Its agreement rate is reported, with an
  explanation for each difference (or "unexplained").

Rows the stream worker has written to its archive spool but not yet rolled into Parquet count too: they are read
from the spool, so a check right after traffic (a worker still running) sees every scored transaction.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pandas as pd

from featurestore.definitions import DAY_MS, REGISTRY, Registry
from stores.archive import ArchiveError, archive_dir, archive_files, read_spools
from stores.offline_files import OfflineError, snapshot_path, snapshots_root

#: Floats agree when equal to this relative tolerance (SPEC section 4).
REL_TOL = 1e-9
#: An API read and the Kafka acknowledgement of its publish both happen before the answer's `scored_at_ms`; a
#: transaction that reached the stream at most this long before it may still have been unseen by the read.
IN_FLIGHT_SLACK_MS = 1_000
SOURCES = ("stream", "api")


class ConsistencyError(RuntimeError):
    """The check could not run (no scores, no offline data, Kafka unreachable); the message says what to do."""


@dataclass
class ScoreRecord:
    """One answer from the scores topic: what was served for a transaction, and when."""

    txn_id: str
    source: str
    card: str
    ts: int
    scored_at_ms: int | None
    features: dict[str, float | None]
    feature_age_ms: dict[str, int | None]
    published: bool | None = None

    @classmethod
    def parse(cls, raw: bytes) -> ScoreRecord | None:
        try:
            obj = orjson.loads(raw)
            if obj.get("source") not in SOURCES:
                return None
            return cls(txn_id=str(obj["txn_id"]), source=obj["source"], card=str(obj["card"]), ts=int(obj["ts"]),
                       scored_at_ms=obj.get("scored_at_ms"), features=dict(obj.get("features") or {}),
                       feature_age_ms=dict(obj.get("feature_age_ms") or {}), published=obj.get("published"))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return None


# ------------------------------------------------------------------------------------------------ reading scores


def read_scores(bootstrap: str, topic: str, *, sample: int, since_ms: int | None = None,
                timeout_s: float = 60.0) -> tuple[list[ScoreRecord], int]:
    """The most recent `sample` answers of each source on `topic` (at or after `since_ms`, by message time).

    Reads each partition from where its last `sample` messages (or `since_ms`) begin up to its end as of the call.
    Returns the records in topic order per partition and the number of messages that were not score records.
    """
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    try:
        from stores.kafka_security import KafkaSecurityError, check_credentials, kafka_python_kwargs
        from stores.kafka_topics import read_range

        try:
            check_credentials(bootstrap)
        except KafkaSecurityError as exc:
            raise ConsistencyError(str(exc)) from None
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                 allow_auto_create_topics=False, request_timeout_ms=15_000, **kafka_python_kwargs())
    except KafkaError as exc:
        raise ConsistencyError(f"Kafka at {bootstrap} is not reachable ({type(exc).__name__}); is it running? "
                               "(`velocity services status`)") from None
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise ConsistencyError(f"topic {topic!r} does not exist at {bootstrap}: nothing has been scored yet "
                                   "(run the stream worker with scoring, or `velocity demo`)")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        ends = consumer.end_offsets(tps)
        begins = consumer.beginning_offsets(tps)
        starts = {tp: max(begins[tp], ends[tp] - sample) for tp in tps}
        if since_ms is not None:
            found = consumer.offsets_for_times({tp: since_ms for tp in tps})
            for tp in tps:
                at = found.get(tp)
                starts[tp] = max(starts[tp], at.offset if at is not None else ends[tp])
        try:
            values = read_range(consumer, starts, ends, timeout_s)
        except TimeoutError as exc:
            raise ConsistencyError(f"reading {topic} timed out after {timeout_s:.0f}s ({exc})") from None
        records: list[ScoreRecord] = []
        skipped = 0
        for value in values:
            rec = ScoreRecord.parse(value) if value is not None else None
            if rec is None:
                skipped += 1
            else:
                records.append(rec)
    finally:
        consumer.close()
    by_source: dict[str, list[ScoreRecord]] = {s: [] for s in SOURCES}
    for r in records:
        by_source[r.source].append(r)
    kept = []
    for s in SOURCES:
        recs = sorted(by_source[s], key=lambda r: r.scored_at_ms or 0)[-sample:]
        kept.extend(recs)
    return kept, skipped


def dedupe_stream(records: Iterable[ScoreRecord]) -> list[ScoreRecord]:
    """Stream scores are at-least-once (a redelivered batch is scored again, identically): one per txn_id.
    Every API answer is kept: each is something a client was told."""
    seen: set[str] = set()
    out = []
    for r in records:
        if r.source == "stream":
            if r.txn_id in seen:
                continue
            seen.add(r.txn_id)
        out.append(r)
    return out


# ------------------------------------------------------------------------------------------------ offline side


class _OfflineView:
    """The offline store as the check reads it: the archive's Parquet files plus rows still in the worker's spool.

    Spool rows are written to a Parquet file in a temporary offline folder that links the real archive files and
    snapshots, so the batch engine reads them like any archived row (nothing in the real store is touched).
    """

    def __init__(self, offline_dir: Path) -> None:
        self.offline_dir = Path(offline_dir)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.spool_rows = 0

    def __enter__(self) -> Path:
        import pyarrow.parquet as pq

        root = archive_dir(self.offline_dir)
        spooled = read_spools(root)
        if not spooled.num_rows:
            return self.offline_dir
        self._tmp = tempfile.TemporaryDirectory(prefix="velocity-consistency-")
        view = Path(self._tmp.name)
        for i, path in enumerate(archive_files(self.offline_dir)):
            target = archive_dir(view) / path.parent.name / f"{i:06d}-{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path.resolve(), target)
        self.spool_rows = spooled.num_rows
        out = archive_dir(view) / "date=spool" / "part-spool.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(spooled, out)
        from stores.labels import labels_dir

        for linked in (snapshots_root, labels_dir):  # every batch group's snapshots, and the label store
            if linked(self.offline_dir).exists():
                os.symlink(linked(self.offline_dir).resolve(), linked(view))
        return view

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _archive_events(offline_dir: Path, cards: Sequence[str]) -> pd.DataFrame:
    """The archived transactions of `cards` (first arrival of each txn_id) with their arrival time in ms."""
    import duckdb

    from featurestore import offline_sql as sql

    files = [str(p) for p in archive_files(offline_dir)]
    if not files or not cards:
        return pd.DataFrame(columns=["txn_id", "card", "ts", "amount", "late", "seq", "arrived_ms"])
    con = duckdb.connect()
    try:
        con.register("wanted", pd.DataFrame({"card": list(cards)}))
        return con.execute(f"""
            SELECT txn_id, card, ts, amount, late, seq, {sql.arrival_ms_of_seq('seq')} AS arrived_ms
            FROM read_parquet(?, union_by_name = true)
            WHERE card IN (SELECT card FROM wanted)
            QUALIFY row_number() OVER (PARTITION BY txn_id ORDER BY seq, archived_ms) = 1
            ORDER BY card, seq""", [files]).df()
    finally:
        con.close()


def offline_rows(records: Sequence[ScoreRecord], *, offline_dir: Path, secret: str, allowed_lateness_ms: int,
                 registry: Registry = REGISTRY) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """The point-in-time training rows (by txn_id) of the scored transactions, recomputed by the DuckDB engine
    from the archive (spool included) and the snapshots; the archived events of their cards; the spool's rows."""
    if not records:
        return pd.DataFrame(), pd.DataFrame(), 0
    try:
        return _offline_rows(records, offline_dir=offline_dir, secret=secret,
                             allowed_lateness_ms=allowed_lateness_ms, registry=registry)
    except ArchiveError as exc:  # a damaged archive file: the message names it and says what to do
        raise ConsistencyError(str(exc)) from None


def _offline_rows(records, *, offline_dir, secret, allowed_lateness_ms, registry):
    from batch.engines import open_engine

    lo = min(r.ts for r in records)
    hi = max(r.ts for r in records) + 1
    view = _OfflineView(offline_dir)
    with view as root:
        if not archive_files(root):
            raise ConsistencyError(f"no archived transactions under {archive_dir(offline_dir)}: the stream worker "
                                   "archives what it scores (`velocity stream`); check VELOCITY_DATA_DIR or "
                                   "--offline-dir")
        try:
            engine = open_engine("duckdb", offline_dir=root, history=None, secret=secret,
                                 allowed_lateness_ms=allowed_lateness_ms, registry=registry)
        except OfflineError as exc:
            raise ConsistencyError(f"{exc}; the offline store checked is {offline_dir} "
                                   "(VELOCITY_DATA_DIR or --offline-dir)") from None
        try:
            frame = engine.training_set(lo, hi)
        finally:
            engine.close()
        events = _archive_events(root, sorted({r.card for r in records}))
    wanted = {r.txn_id for r in records}
    frame = frame[frame["txn_id"].isin(wanted)].drop_duplicates("txn_id").set_index("txn_id")
    return frame, events, view.spool_rows


# ------------------------------------------------------------------------------------------------ comparison


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def same_value(online, offline, rel_tol: float = REL_TOL) -> bool:
    """Equal to `rel_tol` relative; missing (None/NaN) equals missing only."""
    if _missing(online) or _missing(offline):
        return _missing(online) and _missing(offline)
    return math.isclose(float(online), float(offline), rel_tol=rel_tol, abs_tol=0.0)


def difference(online, offline) -> float:
    """|online - offline|; infinite where only one side is missing (ranks first among the largest)."""
    if _missing(online) or _missing(offline):
        return 0.0 if _missing(online) and _missing(offline) else math.inf
    return abs(float(online) - float(offline))


@dataclass
class FeatureDiff:
    txn_id: str
    card: str
    feature: str
    online: float | None
    offline: float | None

    @property
    def size(self) -> float:
        return difference(self.online, self.offline)


@dataclass
class RowResult:
    record: ScoreRecord
    diffs: list[FeatureDiff]
    explanation: str | None = None
    explained: bool = False


@dataclass
class SideReport:
    """One source's comparison: per-feature mismatch counts, the largest differences, the rows that differ."""

    source: str
    features: tuple[str, ...]
    sampled: int = 0
    missing: list[ScoreRecord] = field(default_factory=list)  # not in the offline store
    rows: list[RowResult] = field(default_factory=list)  # every compared row

    @property
    def compared(self) -> int:
        return len(self.rows)

    @property
    def differing(self) -> list[RowResult]:
        return [r for r in self.rows if r.diffs]

    @property
    def mismatches(self) -> int:
        """Feature values that differ, over all compared rows."""
        return sum(len(r.diffs) for r in self.rows)

    def per_feature(self) -> dict[str, int]:
        counts = dict.fromkeys(self.features, 0)
        for r in self.rows:
            for d in r.diffs:
                counts[d.feature] += 1
        return counts

    def largest(self, n: int = 5) -> list[FeatureDiff]:
        diffs = [d for r in self.rows for d in r.diffs]
        return sorted(diffs, key=lambda d: d.size, reverse=True)[:n]

    def largest_by_feature(self) -> dict[str, FeatureDiff]:
        out: dict[str, FeatureDiff] = {}
        for r in self.rows:
            for d in r.diffs:
                if d.feature not in out or d.size > out[d.feature].size:
                    out[d.feature] = d
        return out

    @property
    def agreement(self) -> float:
        return (self.compared - len(self.differing)) / self.compared if self.compared else math.nan


@dataclass
class ConsistencyReport:
    stream: SideReport
    api: SideReport
    topic: str
    offline_dir: Path
    since_ms: int | None
    not_scores: int = 0
    spool_rows: int = 0

    @property
    def ok(self) -> bool:
        """The scheduler's answer: the stream's scores (the reference) agree with offline, every one found."""
        return self.stream.compared > 0 and self.stream.mismatches == 0 and not self.stream.missing

    @property
    def exit_code(self) -> int:
        if self.stream.compared == 0 and not self.stream.missing:
            return 2  # nothing to check
        return 0 if self.ok else 1


def _snapshot_written_ms(offline_dir: Path, cutoff_ms: int, group: str) -> int | None:
    day = dt.datetime.fromtimestamp(cutoff_ms / 1000, dt.UTC).date()
    path = snapshot_path(offline_dir, day, group)
    try:
        return int(path.stat().st_mtime * 1000)
    except OSError:
        return None


def served_cutoff_ms(record: ScoreRecord, group: str) -> int | None:
    """The snapshot cut-off an answer was served from: its age is measured from the cut-off (a midnight) at about
    `scored_at_ms`, so the nearest midnight to scored_at - age is it."""
    age = record.feature_age_ms.get(group)
    if age is None or record.scored_at_ms is None:
        return None
    return int(round((record.scored_at_ms - age) / DAY_MS)) * DAY_MS


def explain(result: RowResult, offline: pd.Series, events: pd.DataFrame, offline_dir: Path,
            registry: Registry = REGISTRY) -> tuple[str, bool]:
    """Why an answer differs from its offline row: transactions of the card still in flight when it was read,
    another snapshot, or a snapshot rebuilt after the score. Returns (text, explained)."""
    rec = result.record
    names = {d.feature for d in result.diffs}
    reasons: list[str] = []
    explained = True
    stream_groups = [g for g in registry.stream_groups if names & set(g.feature_names)]
    for g in stream_groups:
        count = next((a.name for a in g.features if a.function == "count"), None)
        if count is None:
            reasons.append(f"{g.name} differs")
            explained = False
            continue
        online_n, offline_n = rec.features.get(count), offline.get(count)
        if _missing(online_n) or _missing(offline_n):
            reasons.append(f"{count} missing on one side")
            explained = False
            continue
        k = int(round(float(offline_n) - float(online_n)))
        mine = events[events["txn_id"] == rec.txn_id]
        if rec.source == "stream":  # the reference: the stream read its own arrival's window, nothing in flight
            reasons.append(f"{count}: the stream served {online_n:g}, offline computes {offline_n:g} (skew)")
            explained = False
            continue
        if k <= 0 or mine.empty or rec.scored_at_ms is None:
            reasons.append(f"{count}: served {online_n:g}, offline {offline_n:g} (unexplained)")
            explained = False
            continue
        x = mine.iloc[0]
        card = events[(events["card"] == rec.card) & (events["seq"] < x["seq"]) & ~events["late"].astype(bool)
                      & (events["ts"] <= x["ts"]) & (events["ts"] >= x["ts"] - g.window_ms)]
        in_flight = card[card["arrived_ms"] >= rec.scored_at_ms - IN_FLIGHT_SLACK_MS]
        if len(in_flight) >= k:
            lag = int(in_flight["arrived_ms"].max() - rec.scored_at_ms)
            reasons.append(f"{k} earlier transaction(s) of this card were still in flight when the API read its "
                           f"window (they reached the stream {lag:+d} ms from the API's answer, before this one)")
        else:
            reasons.append(f"{count}: served {online_n:g}, offline {offline_n:g}; only {len(in_flight)} of the card's "
                           f"transactions were in flight (unexplained)")
            explained = False
    used = offline.get("snapshot_cutoff_ms")  # every batch group of a nightly run shares the cut-off
    used = None if _missing(used) else int(used)
    for batch in (g for g in registry.batch_groups if names & set(g.feature_names)):
        served = served_cutoff_ms(rec, batch.name)
        if served != used:
            reasons.append(f"{batch.name}: served the snapshot of cut-off {_day(served)}, offline as of its arrival "
                           f"the one of {_day(used)} (published in between)")
        else:
            written = _snapshot_written_ms(offline_dir, used, batch.name) if used is not None else None
            if written is not None and rec.scored_at_ms is not None and written > rec.scored_at_ms:
                reasons.append(f"{batch.name}: the snapshot of cut-off {_day(used)} was rebuilt after this score "
                               f"(written {_when(written)}), so offline no longer holds what was served")
            else:
                reasons.append(f"{batch.name}: same snapshot ({_day(used)}), different values (unexplained)")
                explained = False
    return "; ".join(reasons) or "ratios only (unexplained)", explained


def _day(ms: int | None) -> str:
    return "none" if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.UTC).date().isoformat()


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def compare(records: Sequence[ScoreRecord], frame: pd.DataFrame, events: pd.DataFrame, *, offline_dir: Path,
            registry: Registry = REGISTRY, rel_tol: float = REL_TOL) -> tuple[SideReport, SideReport]:
    features = tuple(n for n in registry.all_features if frame.empty or n in frame.columns)
    sides = {s: SideReport(s, features) for s in SOURCES}
    for rec in records:
        side = sides[rec.source]
        side.sampled += 1
        if rec.txn_id not in frame.index:
            side.missing.append(rec)
            continue
        row = frame.loc[rec.txn_id]
        diffs = [FeatureDiff(rec.txn_id, rec.card, n, rec.features.get(n), _value(row[n])) for n in features
                 if not same_value(rec.features.get(n), row[n], rel_tol)]
        result = RowResult(rec, diffs)
        if diffs:
            result.explanation, result.explained = explain(result, row, events, offline_dir, registry)
        side.rows.append(result)
    return sides["stream"], sides["api"]


def _value(v) -> float | None:
    return None if _missing(v) else float(v)


def check(*, bootstrap: str, topic: str, offline_dir: Path, secret: str, allowed_lateness_ms: int,
          sample: int = 10_000, since_ms: int | None = None, registry: Registry = REGISTRY,
          txn_ids: Iterable[str] | None = None) -> ConsistencyReport:
    """Read, recompute, compare. `txn_ids` restricts the check to those transactions (the demo's own)."""
    records, skipped = read_scores(bootstrap, topic, sample=sample, since_ms=since_ms)
    if txn_ids is not None:
        keep = set(txn_ids)
        records = [r for r in records if r.txn_id in keep]
    records = dedupe_stream(records)
    if not records:
        when = f" since {_when(since_ms)}" if since_ms is not None else ""
        raise ConsistencyError(f"no scores on topic {topic!r}{when}: nothing to check (the stream worker scores "
                               "with a current model; the API records what it serves)")
    frame, events, spool_rows = offline_rows(records, offline_dir=offline_dir, secret=secret,
                                             allowed_lateness_ms=allowed_lateness_ms, registry=registry)
    stream, api = compare(records, frame, events, offline_dir=offline_dir, registry=registry)
    return ConsistencyReport(stream, api, topic, Path(offline_dir), since_ms, skipped, spool_rows)


def parse_since(value: str | None, now_ms: int | None = None) -> int | None:
    """`24h`, `30m`, `2d`, `all`, or an ISO time (UTC unless it says otherwise) -> epoch ms (None: everything)."""
    if value is None or value.strip().lower() in ("", "all"):
        return None
    now_ms = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    v = value.strip().lower()
    units = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": DAY_MS}
    if v[-1:] in units and v[:-1].replace(".", "", 1).isdigit():
        return now_ms - int(float(v[:-1]) * units[v[-1]])
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"expected a duration (30m, 24h, 2d), `all`, or an ISO time, got {value!r}") from None
    when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)

