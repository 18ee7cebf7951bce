"""What the stream scorer folds, taken from the batch's own window update instead of a read per transaction.

The online read (stores/lua/read_features.lua) answers one transaction with its stored record, its card's window
members with ts in [t - window, t], and the nightly snapshot groups visible to it; the scorer folds the members in
Python. For a batch the stream worker has just applied, the apply script (stores/lua/apply_events.lua, given the
stream groups' window lengths) folds each transaction's windows itself, right after its card's writes, and returns
per transaction only the statistics (count, sum, min, max per window, and the newest counted event time) plus each
duplicate's stored record: what travels and what Python does per transaction no longer grows with the window. The
nights are resolved here from one read of the snapshot index per batch, by the read script's own rule, and the
entity hashes they need that an earlier batch has not fetched are fetched once per batch: a night's hash never
changes under its snapshot id (a rerun of the night publishes a new id; `stores.online_snapshots`), so the worker
keeps the hashes it has read (`SnapshotHashes`, bounded). tests/test_stream_reads.py checks every transaction's
features and ages against the read script's reply folded by the scorer.

Single Redis node only (`usable`): under Redis Cluster the index has a copy per master and the merchant lives on
its own node; the worker keeps the per-transaction read there.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from collections.abc import Sequence
from typing import NamedTuple

from redis.client import NEVER_DECODE

from featurestore.state import Applied, ApplyStatus
from serving.redis_reader import check_reply, encode_command
from stores.online_snapshots import SnapshotFold, entity_tag
from stores.redis_online import APPLY_CHUNK, applied_outcomes, apply_args, now_ms

#: Reads every hash named in ARGV (keys as ARGV: a single node only); Redis caches the compiled script by its SHA.
HGETALL_SCRIPT = b"local out = {} for i = 1, #ARGV do out[i] = redis.call('HGETALL', ARGV[i]) end return out"
HGETALL_CHUNK = 4_000
#: The read script walks at most this many cut-offs at or before t (its ZREVRANGEBYSCORE ... LIMIT 0 64).
MAX_CANDIDATES = 64
#: Snapshot hashes a stream worker keeps between batches: a card's and its merchant's nightly hashes are read from
#: Redis once, not on every transaction of the card. About 6 KB each with what is folded from them (measured: 2.2
#: KB a parsed card hash, 2.2 KB its folded part, plus its groups), so at most ~120 MB; seed scale (10,000 cards
#: and their merchants) fits.
SNAPSHOT_CACHE_KEYS = 20_000


class SnapshotHashes(dict):
    """Parsed nightly snapshot hashes by key (field -> raw value), kept across batches.

    Safe to keep because a key names one publication: `write_snapshot` writes every hash of a night under a fresh
    snapshot id before the index names it, and never writes them again (a rerun publishes a new id; only TTLs
    change). Whether a night is visible or expired is decided per batch from the index, as before. Bounded: when
    a batch's new keys would pass `limit` the cache starts over, and `generation` counts those restarts (what is
    folded from the hashes is dropped with them, `streaming.batch_fold.NightlyFold`).
    """

    def __init__(self, limit: int = SNAPSHOT_CACHE_KEYS) -> None:
        super().__init__()
        self.limit = limit
        self.generation = 0

    def missing(self, wanted: Sequence[str]) -> list[str]:
        """The keys of `wanted` to fetch; makes room for them first (all of them when the cache starts over)."""
        new = [k for k in wanted if k not in self]
        if new and len(self) + len(new) > self.limit:
            self.clear()
            self.generation += 1
            new = list(wanted)
        return new


def usable(store) -> bool:
    """The batch's reads come from its apply on a single Redis node (not a cluster)."""
    return not getattr(store, "cluster", False)


async def apply_with_stats(store, packed: list[str], windows_ms: Sequence[int],
                           busy_members: int | None = None) -> tuple[list[Applied], list]:
    """`AsyncOnlineStore.apply_packed`, also returning per event (its window statistics, its stored record or None).

    The same script and arguments as the store's apply, plus the window lengths (the apply's reply then carries
    each event's statistics: [newest counted ts or None, then count, sum, min, max in cents per window]), in calls
    of at most APPLY_CHUNK events. `busy_members`: the apply script's BUSY (from how many members a card's window
    statistics are kept between batches rather than read afresh; None: the script's default)."""
    applied: list[Applied] = []
    per_event: list = []
    step = 4 * APPLY_CHUNK
    spec = ",".join(str(int(w)) for w in windows_ms)
    for i in range(0, len(packed), step):
        chunk = packed[i:i + step]
        args = apply_args(store.keys.prefix, chunk, store.lateness, store.retention, store.ttl_s)
        extra = [spec] if busy_members is None else [spec, int(busy_members)]
        statuses, stats, recs = await store._apply(keys=[], args=[*args, *extra])
        applied.extend(applied_outcomes(statuses))
        per_event.extend(zip(stats, recs, strict=True))
    return applied, per_event


class NightIndex:
    """The published nights as the read script walks them (cut-offs at or before t, newest first)."""

    def __init__(self, cutoffs: list[tuple[float, str]], entries: dict[str, str], fold: SnapshotFold,
                 now: int) -> None:
        cutoffs.sort()
        self.scores = [c[0] for c in cutoffs]
        self.members = [c[1] for c in cutoffs]
        self.entries = entries
        self.groups = [g for g in fold.names.split(",") if g]
        self.now = now
        self._plans: dict = {}

    @classmethod
    async def read(cls, run, keys, fold: SnapshotFold) -> NightIndex:
        """One round trip (`run`: commands -> raw replies): the cut-offs and the index."""
        cutoffs, entries = await run([(b"ZRANGE", keys.snapshot_cutoffs, 0, -1, b"WITHSCORES"),
                                      (b"HGETALL", keys.snapshot_index)])
        now = now_ms()
        return cls([(float(s), _text(m)) for m, s in zip(cutoffs[0::2], cutoffs[1::2], strict=True)],
                   {_text(k): _text(v) for k, v in zip(entries[0::2], entries[1::2], strict=True)}, fold, now)

    def plan(self, ts: int, arrival: int) -> tuple[str | None, list[tuple[str, str, str, bool]], int]:
        """read_features.lua's walk: (latest visible cut-off, nights as (cut-off, "g1,g2", snap id, expired),
        1 when a group's night has expired else 0). It depends on t only through the cut-offs at or before it."""
        top = bisect_right(self.scores, ts)
        got = self._plans.get((top, arrival))
        if got is None:
            got = self._plans[(top, arrival)] = self._walk(top, arrival)
        return got

    def _walk(self, top: int, arrival: int) -> tuple[str | None, list[tuple[str, str, str, bool]], int]:
        latest, nights, expired = None, [], 0
        want = set(self.groups)
        if not want:
            return latest, nights, expired
        for k in range(top - 1, max(top - MAX_CANDIDATES, 0) - 1, -1):
            if not want:
                break
            c = self.members[k]
            entry = self.entries.get(c)
            if entry is None:
                continue
            snap, published, expires, held = _entry(entry)
            if float(published) > arrival:
                continue
            if latest is None:
                latest = c
            if held == "":
                expired = 1
                break
            mine = []
            for g in held.split(","):
                if g and g in want:
                    want.discard(g)
                    mine.append(g)
            e = float(expires)
            dead = e > 0 and e <= self.now
            if mine:
                if dead:
                    expired = 1
                nights.append((c, ",".join(mine), snap, dead))
            if dead:
                break
        return latest, nights, expired


def _flat_reply(reply) -> list:
    """A map or a list of pairs (RESP3) as the flat list RESP2 and the scripts give."""
    if isinstance(reply, dict):
        return [x for kv in reply.items() for x in kv]
    return [x for r in reply for x in r] if reply and isinstance(reply[0], list) else reply


def _text(v) -> str:
    return v.decode() if type(v) is bytes else v


def _entry(entry: str) -> tuple[str, str, str, str]:
    """`snap|published|expires[|groups]` as the read script's pattern splits it."""
    parts = entry.split("|", 3)
    return parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else ""


class EventRead(NamedTuple):
    """One transaction's read: its stored record, the ts used, its window statistics (`apply_with_stats`), the
    latest visible cut-off, the nights serving its groups as (cut-off, "g1,g2", card hash key or None, merchant
    hash key or None; None: the night has expired or no merchant is read), and 1 when a group's night has expired."""

    stored: str
    ts: int
    stats: list
    latest: str | None
    nights: tuple
    expired: int


class BatchReplies:
    """Read-script replies for an applied batch's transactions (see the module's docstring)."""

    def __init__(self, store, reader=None) -> None:
        """`reader`: the scorer's `serving.redis_reader.ScriptReader` (its lean connection carries the commands
        here too); None: the store's redis-py client."""
        self.store = store
        self.reader = reader if hasattr(reader, "connection") else None
        self.registry = store.registry
        self.fold = SnapshotFold(self.registry)
        self.hashes = SnapshotHashes()

    async def gather(self, txns: Sequence, cents: Sequence[int], applied: Sequence[Applied],
                     per_event: Sequence) -> tuple[list[EventRead], SnapshotHashes]:
        """Per transaction what its read holds, the nights naming their entity hashes; and the hashes (parsed,
        `SnapshotHashes`: those this batch names and those earlier batches read)."""
        index = await NightIndex.read(self._run, self.store.keys, self.fold)
        keys = self.store.keys
        reads_merchant = self.fold.reads_merchant
        out, wanted = [], {}
        for txn, c, (status, seq), (stats, rec) in zip(txns, cents, applied, per_event, strict=True):
            if rec is None:
                ts = txn.ts
                stored = f"{seq}|{c}|{'L' if status == ApplyStatus.LATE else 'A'}|{ts}"
            else:
                stored = _text(rec)
                ts = int(stored.rsplit("|", 1)[1])
            latest, plan, expired = index.plan(ts, seq // 1000)
            nights = []
            for cutoff, held, snap, dead in plan:
                if dead:
                    nights.append((cutoff, held, None, None))
                    continue
                ck = keys.snapshot_at(snap, entity_tag("card", txn.card))
                mk = (keys.snapshot_at(snap, entity_tag("merchant", txn.merchant))
                      if reads_merchant and txn.merchant is not None else None)
                wanted[ck] = None
                if mk is not None:
                    wanted[mk] = None
                nights.append((cutoff, held, ck, mk))
            out.append(EventRead(stored, ts, stats, latest, tuple(nights), expired))
        hashes = self.hashes
        names = hashes.missing(list(wanted))
        if names:
            for name, flat in zip(names, await self._hgetall(names), strict=True):
                it = iter(flat or ())
                hashes[name] = dict(zip(it, it, strict=True))  # field -> raw value, as Redis sent them
        return out, hashes

    async def _hgetall(self, names: list[str]) -> list:
        """HGETALL of every key, as flat lists: on the lean connection one script call (one command, one reply
        and one future for the batch, not one per key), else a pipeline."""
        if self.reader is None:
            return await self._run([(b"HGETALL", k) for k in names])
        got = []
        for i in range(0, len(names), HGETALL_CHUNK):
            (reply,) = await self._run([(b"EVAL", HGETALL_SCRIPT, 0, *names[i:i + HGETALL_CHUNK])])
            got += reply
        return got

    async def _run(self, commands: list[tuple]) -> list:
        """Commands in one pipelined round trip; raw replies (an HGETALL as a flat field/value list, as the read
        script returns it)."""
        if self.reader is not None:
            proto = await self.reader.connection()
            replies = await asyncio.gather(*proto.request(b"".join(encode_command(*c) for c in commands), len(commands)))
            return [check_reply(r) for r in replies]
        pipe = self.store.redis.pipeline(transaction=False)
        for c in commands:
            pipe.execute_command(*c, **{NEVER_DECODE: True})
        return [_flat_reply(r) for r in await pipe.execute()]
