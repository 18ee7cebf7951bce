"""Rebuild the online store after Redis came back empty (`velocity features rebuild`).

The source of truth is the offline archive (`stores.archive`): every valid transaction the stream worker
processed, with the per-card arrival sequence (`seq`) it assigned and whether it was late, written (to the spool)
before the batch's offsets were committed. Kafka is not the source: its retention may already have dropped what
the windows need, and a re-consumed topic would assign new arrival sequences.

What is restored, merging with anything a running worker wrote meanwhile (idempotent, rerunnable):
- each card's window events and idempotency records, within the event retention (per card: from its newest
  on-time event time, capped at now, minus the retention, as the worker's own trimming keeps them), and its
  state with `last_seq` = the largest archived seq, so sequences keep increasing afterwards;
- the latest snapshot(s) from the offline store, through the batch job's own publish path
  (`batch.engines.publish_online`), with their recorded publication times.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from stores.archive import archive_dir, archive_files, read_spools
from stores.redis_online import OnlineStore, now_ms

#: Events per restore script call: bounds how long Redis is blocked by one call (and Lua's unpack limit).
RESTORE_CHUNK = 1_000
_COLUMNS = ("txn_id", "card", "amount_cents", "ts", "late", "seq")


@dataclass
class RebuildReport:
    """What a rebuild found and wrote; `summary()` is the one line the CLI ends with."""

    archive_files: int = 0
    spool_rows: int = 0
    cards: int = 0
    events: int = 0
    late: int = 0
    written: int = 0
    left_out: int = 0
    snapshots: list[dt.date] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        snaps = ", ".join(map(str, self.snapshots)) or "none in the offline store"
        return (f"rebuilt {self.cards:,} cards: {self.events:,} window events ({self.late:,} late; "
                f"{self.written:,} written, {self.events - self.written:,} already online) from "
                f"{self.archive_files:,} archive files + {self.spool_rows:,} spooled rows, "
                f"{self.left_out:,} older than the retention left out; snapshots restored: {snaps}; "
                f"{self.seconds:.1f} s")


def spooled_rows(offline_dir: Path) -> pa.Table:
    """Every row in the archive's spools (workers' not-yet-rolled batches), read without claiming them."""
    return read_spools(archive_dir(offline_dir)).select(list(_COLUMNS))


def restorable_events(offline_dir: Path, retention_ms: int, ttl_ms: int,
                      at_ms: int) -> tuple[pa.Table, dict[str, int], int, int, int]:
    """What to restore, as the live store would hold it now.

    Returns (events ordered by card then seq; card -> cut for cards whose older events are left out; archive files
    read; spooled rows read; distinct archived transactions). Each txn_id once, its earliest arrival (smallest
    seq). A card whose last arrival (seq // 1000, ms) is more than `ttl_ms` ago is left out: its keys would have
    expired online.
    """
    import duckdb

    spool = spooled_rows(offline_dir)  # before listing files: a spool rolled meanwhile is then in the files
    files = [str(p) for p in archive_files(offline_dir)]
    cols = ", ".join(_COLUMNS)
    source = f"SELECT {cols} FROM spool"
    if files:
        source = f"SELECT {cols} FROM read_parquet(?, union_by_name = true) UNION ALL " + source
    con = duckdb.connect()
    try:
        con.register("spool", spool)
        con.execute(f"CREATE TEMP TABLE first AS SELECT * FROM ({source}) "
                    "QUALIFY row_number() OVER (PARTITION BY txn_id ORDER BY seq) = 1",
                    [files] if files else []).fetchall()
        total = con.execute("SELECT count(*) FROM first").fetchall()[0][0]
        table = con.sql(
            f"""
            WITH horizon AS (
                SELECT card, LEAST(MAX(ts) FILTER (WHERE NOT late), {int(at_ms)}) - {int(retention_ms)} AS cut,
                       MIN(ts) AS first_ts, MAX(seq) // 1000 AS last_arrival_ms
                FROM first GROUP BY card)
            SELECT f.card, f.txn_id, f.ts, f.amount_cents, f.late, f.seq,
                   CASE WHEN h.first_ts < h.cut THEN h.cut END AS cut
            FROM first f JOIN horizon h USING (card)
            WHERE (h.cut IS NULL OR f.ts >= h.cut) AND h.last_arrival_ms >= {int(at_ms - ttl_ms)}
            ORDER BY f.card, f.seq
            """).to_arrow_table()
    finally:
        con.close()
    cuts = {card: int(cut) for card, cut in zip(table.column("card").to_pylist(), table.column("cut").to_pylist(),
                                                strict=True) if cut is not None}
    return table.drop(["cut"]), cuts, len(files), spool.num_rows, int(total)


def restore_events(store: OnlineStore, events: pa.Table, cuts: dict[str, int],
                   on_progress: Callable[[int], None] = lambda _: None) -> int:
    """Write `events` (card, txn_id, ts, amount_cents, late, seq; grouped by card) with the restore script, in
    calls of at most RESTORE_CHUNK events. Returns how many were not already online."""
    cols = {c: events.column(c).to_pylist() for c in ("card", "txn_id", "ts", "amount_cents", "late", "seq")}
    n, written = events.num_rows, 0
    for i in range(0, n, RESTORE_CHUNK):
        j = min(i + RESTORE_CHUNK, n)
        flat: list[str] = []
        chunk_cuts: dict[str, str] = {}
        for k in range(i, j):
            card = cols["card"][k]
            flat += [card, cols["txn_id"][k], str(cols["ts"][k]), str(cols["amount_cents"][k]),
                     "L" if cols["late"][k] else "A", str(cols["seq"][k])]
            if card in cuts:
                chunk_cuts[card] = str(cuts[card])
        written += store.restore_events(flat, chunk_cuts)  # one call per Redis Cluster master
        on_progress(j - i)
    return written


def snapshots_to_restore(offline_dir: Path, keep_ms: int, at_ms: int) -> list[tuple[dt.date, Path, int]]:
    """(day, file, published_ms) of the nights the online store would still serve, oldest first: the latest, and
    any earlier one published within `keep_ms` (the batch groups' TTL) of now. Nights are those of the first
    batch group (card_agg_1w); every group of a night is published together."""
    from stores.offline_files import constants_of, read_snapshots, snapshot_day

    found = []
    for path in read_snapshots(offline_dir):
        pinned = constants_of(path, ("published_ms",))  # OfflineError naming a damaged file
        found.append((snapshot_day(path), path, pinned[0] if pinned else at_ms))
    found.sort()
    return [s for k, s in enumerate(found) if k == len(found) - 1 or s[2] >= at_ms - keep_ms]


def restore_snapshots(store: OnlineStore, offline_dir: Path, at_ms: int,
                      on_progress: Callable[[str], None] = lambda _: None) -> list[dt.date]:
    """Publish the nights `snapshots_to_restore` picks (every batch group's file of each night) through the batch
    job's own publish path."""
    from batch.engines import publish_online
    from stores.offline_files import read_night

    done = []
    keep_ms = max(g.ttl_s for g in store.registry.batch_groups) * 1000
    for day, _, published in snapshots_to_restore(offline_dir, keep_ms, at_ms):
        on_progress(f"snapshot {day}")
        publish_online(store, day, read_night(offline_dir, day, store.registry), published, store.registry)
        done.append(day)
    return done


def rebuild(store: OnlineStore, offline_dir: Path, *, retention_ms: int, snapshots: bool = True,
            on_total: Callable[[int], None] = lambda _: None, on_progress: Callable[[int], None] = lambda _: None,
            on_stage: Callable[[str], None] = lambda _: None) -> RebuildReport:
    """Restore windows, arrival sequences, idempotency records and snapshots from the offline store."""
    started, at = time.monotonic(), now_ms()
    on_stage("reading the archive")
    events, cuts, n_files, n_spool, total = restorable_events(offline_dir, retention_ms, store.ttl_s * 1000, at)
    report = RebuildReport(archive_files=n_files, spool_rows=n_spool, events=events.num_rows,
                           cards=len(set(events.column("card").to_pylist())),
                           late=sum(events.column("late").to_pylist()), left_out=total - events.num_rows)
    on_total(events.num_rows)
    on_stage("restoring window events")
    report.written = restore_events(store, events, cuts, on_progress)
    if snapshots:
        report.snapshots = restore_snapshots(store, offline_dir, at, on_stage)
    report.seconds = time.monotonic() - started
    return report
