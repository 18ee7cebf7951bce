"""Entity-key rotation in the online store: move each card's state from its old-version key to its new one, and
find a card's state during a rotation (featurestore/entity.py has the key versions).

Moving is copy-then-delete per card, never RENAME: the two keys of a card live in different hash slots under Redis
Cluster. The copy merges with whatever the new key already holds (the window events and idempotency records of both,
by `txn_id`, the card's state as the rebuild merges it), so a rerun, or a run after a crash, changes nothing twice.
The old keys are deleted only if no write reached them since they were read (a one-slot script compares the card's
state field), else the card is merged again: a transaction applied meanwhile is never lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from stores.online_snapshots import SnapshotEntry

#: Cards per round of pipelined reads and writes.
REKEY_CHUNK = 500
#: Deletes a card's old keys (KEYS: its state hash, its window, its stream statistics cache) only when its state
#: field is still ARGV[1].
_DROP_IF_UNCHANGED = """
local state = redis.call('HGET', KEYS[1], '')
if (state or '') ~= ARGV[1] then return 0 end
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3])
return 1
"""


@dataclass
class RekeyStats:
    """What a re-keying run moved (or, for a dry run, would move)."""

    cards: int = 0
    cards_moved: int = 0
    events_copied: int = 0
    snapshot_hashes_moved: int = 0
    retries: int = 0


def merge_state(a: bytes | str | None, b: bytes | str | None) -> str:
    """Two stored card states "last_seq|newest|oldest|trimmed" as one: maxima, except `oldest` (a minimum)."""
    parts = [(x.decode() if isinstance(x, bytes) else x).split("|") for x in (a, b) if x]
    if not parts:
        return ""
    out = []
    for i in range(4):
        got = [int(p[i]) for p in parts if len(p) > i and p[i] != ""]
        out.append("" if not got else str(min(got) if i == 2 else max(got)))
    return "|".join(out)


def _ttl(*pttls: int) -> int | None:
    """The TTL (ms) a merged key keeps: the longest of the sources that exist (None: one of them never expires)."""
    live = [t for t in pttls if t != -2]
    if not live or -1 in live:
        return None
    return max(live)


def _txn_of(member: bytes) -> bytes:
    return member.split(b"|", 3)[3]


def rekey_online(store, pairs: Sequence[tuple[str, str]], *, dry_run: bool = False, chunk: int = REKEY_CHUNK,
                 on_progress: Callable[[int], None] | None = None) -> RekeyStats:
    """Move every (old key, new key) card's window, state and published-snapshot hashes to the new key.

    `store` is a synchronous `stores.redis_online.OnlineStore`; key names come from its `_Keys`. Idempotent and
    resumable: cards already moved have nothing under the old key. `dry_run` only counts.
    """
    stats = RekeyStats(cards=len(pairs))
    snap_ids = [e.snap_id for e in store.snapshot_entries().values()]
    for i in range(0, len(pairs), chunk):
        part = list(pairs[i:i + chunk])
        for attempt in range(6):
            part = _move_windows(store, part, stats, dry_run)
            if not part:
                break
            stats.retries += len(part)
            time.sleep(0.01 * (attempt + 1))
        else:
            raise RuntimeError(f"{len(part)} cards kept changing while being moved; rerun rotate-key")
        _move_snapshots(store, snap_ids, pairs[i:i + chunk], stats, dry_run)
        if on_progress:
            on_progress(min(i + chunk, len(pairs)))
    return stats


def _move_windows(store, pairs: list[tuple[str, str]], stats: RekeyStats, dry_run: bool) -> list:
    """One round of window moves; returns the pairs whose old keys changed meanwhile (to merge again)."""
    keys, r = store.keys, store.redis
    pipe = r.pipeline(transaction=False)
    for old, new in pairs:
        pipe.zrange(keys.window(old), 0, -1, withscores=True)
        pipe.hgetall(keys.card(old))
        pipe.pttl(keys.window(old))
        pipe.pttl(keys.card(old))
        pipe.pttl(keys.window(new))
        pipe.pttl(keys.card(new))
    got = pipe.execute()
    todo = []
    for j, (old, new) in enumerate(pairs):
        members, records, *ttls = got[6 * j:6 * j + 6]
        if members or records:
            todo.append((old, new, members, records, ttls))
    if dry_run or not todo:
        if dry_run:
            stats.cards_moved += len(todo)
            stats.events_copied += sum(len(t[2]) for t in todo)
        return []
    pipe = r.pipeline(transaction=False)
    for _old, new, _, records, _ in todo:
        pipe.hmget(keys.card(new), ["", *(k for k in records if k != b"")])
    present = pipe.execute()
    pipe = r.pipeline(transaction=False)
    for (_old, new, members, records, ttls), have in zip(todo, present, strict=True):
        txns = [k for k in records if k != b""]
        known = {t for t, v in zip(txns, have[1:], strict=True) if v is not None}
        fresh = {t: records[t] for t in txns if t not in known}
        state = merge_state(records.get(b""), have[0])
        if state:
            fresh[b""] = state.encode()
        if fresh:
            pipe.hset(keys.card(new), mapping=fresh)
        adds = {m: s for m, s in members if _txn_of(m) not in known}
        if adds:
            pipe.zadd(keys.window(new), adds)
        stats.events_copied += len(adds)
        for key, ttl in ((keys.window(new), _ttl(ttls[0], ttls[2])), (keys.card(new), _ttl(ttls[1], ttls[3]))):
            if ttl is not None and ttl > 0:
                pipe.pexpire(key, ttl)
    pipe.execute()
    pipe = r.pipeline(transaction=False)
    for old, _new, _, records, _ in todo:
        # EVAL, not EVALSHA: a cluster node may not hold the script yet, and it is short.
        pipe.execute_command("EVAL", _DROP_IF_UNCHANGED, 3, keys.card(old), keys.window(old), keys.agg(old),
                             records.get(b"", b"").decode())
    dropped = pipe.execute()  # 0: the old keys changed since they were read: merge them again
    stats.cards_moved += sum(1 for d in dropped if d == 1)
    return [(t[0], t[1]) for t, d in zip(todo, dropped, strict=True) if d != 1]


def _move_snapshots(store, snap_ids: list[str], pairs: Sequence[tuple[str, str]], stats: RekeyStats,
                    dry_run: bool) -> None:
    """Each published snapshot's card hash, old key -> new key (a night already written under the new key wins:
    it was computed from the new keys)."""
    if not snap_ids:
        return
    keys, r = store.keys, store.redis
    pipe = r.pipeline(transaction=False)
    for old, new in pairs:
        for sid in snap_ids:
            pipe.hgetall(keys.snapshot(sid, old))
            pipe.pttl(keys.snapshot(sid, old))
            pipe.exists(keys.snapshot(sid, new))
    got = pipe.execute()
    pipe = r.pipeline(transaction=False)
    k = 0
    for old, new in pairs:
        for sid in snap_ids:
            fields, ttl, exists = got[k:k + 3]
            k += 3
            if not fields:
                continue
            stats.snapshot_hashes_moved += 1
            if dry_run:
                continue
            if not exists:
                pipe.hset(keys.snapshot(sid, new), mapping=fields)
                if ttl > 0:
                    pipe.pexpire(keys.snapshot(sid, new), ttl)
            pipe.unlink(keys.snapshot(sid, old))
    if len(pipe):
        pipe.execute()


async def _index_key(store) -> str:
    """The snapshot index to read: the single node's, or the first master's copy under Redis Cluster."""
    if not getattr(store, "cluster", False):
        return store.keys.snapshot_index
    from stores import redis_cluster_store as rc

    await store.redis.initialize()
    nodes = rc.node_map(store.redis)
    return store.keys.snapshot_index + nodes.suffix(sorted(nodes.tags)[0])


class RotationResolver:
    """During a rotation, which key a card given by PAN lives under: the current version's unless the card has
    no state under it yet and has some under the previous version's (its window state, or a row in the latest
    published snapshot). Outside a rotation (one version configured) it is always the current key."""

    def __init__(self, keys, keyer, cache_s: float = 30.0) -> None:
        self.keys = keys
        self.keyer = keyer
        self._cache_s = cache_s
        self._latest: tuple[float, str | None] = (0.0, None)

    def _pairs(self, cards: Sequence[str]) -> list[tuple[int, str, str]]:
        prev = self.keyer.previous_key
        return [(i, c, p) for i, c in enumerate(cards) if (p := prev(c)) is not None]

    def _queue(self, pipe, pairs, snap_id: str | None) -> None:
        for _, cur, prev in pairs:
            pipe.exists(self.keys.card(cur))
            pipe.exists(self.keys.card(prev))
            if snap_id is not None:
                pipe.exists(self.keys.snapshot(snap_id, prev))

    def _choose(self, cards: Sequence[str], pairs, got, snap_id: str | None) -> list[str]:
        out, step = list(cards), 3 if snap_id is not None else 2
        for n, (i, _, prev) in enumerate(pairs):
            has_cur, has_prev, *in_snap = got[step * n:step * n + step]
            if not has_cur and (has_prev or any(in_snap)):
                out[i] = prev
        return out

    def _snap_id(self, entries: dict) -> str | None:
        if not entries:
            return None
        return entries[max(entries)].snap_id

    async def resolve(self, store, cards: Sequence[str]) -> list[str]:
        """The keys to read and write for `cards` (current-version keys from the keyer), one pipelined round trip
        (plus one every `cache_s` for the latest snapshot's id)."""
        pairs = self._pairs(cards)
        if not pairs:
            return list(cards)
        try:
            at, snap_id = self._latest
            if time.monotonic() - at > self._cache_s:
                raw = await store.redis.hgetall(await _index_key(store))
                snap_id = self._snap_id({int(k): SnapshotEntry.parse(v) for k, v in raw.items()})
                self._latest = (time.monotonic(), snap_id)
            pipe = store.redis.pipeline(transaction=False)
            self._queue(pipe, pairs, snap_id)
            return self._choose(cards, pairs, await pipe.execute(), snap_id)
        except (redis.RedisError, OSError):
            return list(cards)  # the read that follows reports the outage (a 503), as without a rotation

    def resolve_sync(self, store, cards: Sequence[str]) -> list[str]:
        """`resolve` for a synchronous OnlineStore (the CLI)."""
        pairs = self._pairs(cards)
        if not pairs:
            return list(cards)
        snap_id = self._snap_id(store.snapshot_entries())
        pipe = store.redis.pipeline(transaction=False)
        self._queue(pipe, pairs, snap_id)
        return self._choose(cards, pairs, pipe.execute(), snap_id)
