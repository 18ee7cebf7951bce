"""Nightly snapshots in the online store: every batch group of one night under one snapshot id, per entity.

Layout (prefix `p`): one HASH per entity and night, `p:snap:<snap_id>:<kind>:{<entity key>}`, whose fields are
`<group>:<stat>` (`STAT_ORDER` names, integers). A card's groups of one night (card_agg_1w, _1d, _30d) share its
hash and a merchant's groups share the merchant's, so a score reads two hashes (two HGETALLs) whatever the number of
groups, rather than one key per group. The entity key sits in a hash tag (`{...}`), so in a Redis Cluster each
entity's snapshot keys stay in one slot (a card's also holds its window keys); a key that could break the tag (a
brace, or over `MAX_TAGGED_BYTES`) is replaced by its SHA-256 under a distinct kind (`merchant#`), so distinct ids
never share a key.

The index (`p:w1:index`, cut-off -> `snap_id|published_ms|expires_ms|group,group,...`) is published in one
MULTI/EXEC once every row is written: readers see a night completely or not at all. Under Redis Cluster every
master holds a copy of the index (`OnlineStore.index_copies`), each published in its own MULTI/EXEC with the same
entry, dated `PUBLISH_MARGIN_MS` ahead (stores.redis_cluster_store): every copy is written before the night
becomes visible, so a reader on any master sees the same nights at any arrival time. The index lists the groups a
night holds, so the read (stores/lua/read_features.lua) serves each group from the latest visible night that holds
it, as the training set's per-group as-of join does; a night that lacks a group never reads as "every entity
absent" (defaults) for it. The read script resolves the night and reads the entity hashes in one atomic call, so
their names are computed inside it, not declared (under Redis Cluster the script reads its own master's copy of
the index).
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from featurestore.definitions import STAT_ORDER, FeatureGroup, Registry
from featurestore.windows import WindowAggregate

SNAPSHOT_CHUNK = 5_000
#: The latest snapshot stays online this long without a newer one (a month of missed nights).
KEEP_LATEST_S = 30 * 86_400
#: Longest entity key kept verbatim inside a hash tag; longer ones (and any with a brace) are hashed.
MAX_TAGGED_BYTES = 128


def entity_tag(kind: str, key: str) -> str:
    """`kind:{key}`: the entity's part of its key names, injective over keys, one hash slot per entity.

    A key with a brace would end (or nest) the hash tag early, and a 10 KB id would make every key 10 KB: both are
    stored under `kind#:{sha256 hex}` instead, a namespace no verbatim key can reach."""
    if "{" in key or "}" in key or (len(key) > MAX_TAGGED_BYTES // 4 and len(key.encode()) > MAX_TAGGED_BYTES):
        return f"{kind}#:{{{hashlib.sha256(key.encode()).hexdigest()}}}"
    return f"{kind}:{{{key}}}"


@dataclass(frozen=True, slots=True)
class SnapshotEntry:
    """A published snapshot in the index: its key id, when it became visible, when its keys expire, and the
    batch groups it holds (an entry written before groups were recorded holds none: read as unknown)."""

    snap_id: str
    published_ms: int
    expires_ms: int
    groups: tuple[str, ...] = ()

    @classmethod
    def parse(cls, raw: bytes | str) -> SnapshotEntry:
        parts = (raw.decode() if isinstance(raw, bytes) else raw).split("|", 3)
        groups = tuple(g for g in parts[3].split(",") if g) if len(parts) == 4 else ()
        return cls(parts[0], int(parts[1]), int(parts[2]), groups)

    def dump(self) -> str:
        head = f"{self.snap_id}|{self.published_ms}|{self.expires_ms}"
        return f"{head}|{','.join(self.groups)}" if self.groups else head


Rows = Iterable[tuple[str, Mapping[str, int]]]


def _legacy_rows(rows: Iterable) -> Rows:
    """(card, statistics) or the older (card, count, summed cents) rows of the single-group form."""
    for card, *values in rows:
        yield card, (values[0] if len(values) == 1 else {"n": values[0], "s": values[1]})


def _flat(flat) -> dict[str, int]:
    if not flat:
        return {}
    return {(k.decode() if type(k) is bytes else k): int(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}


class SnapshotFold:
    """Turns the read script's nights into every batch group's features (generic over the registry's batch
    groups), with what to report per group: its statistics and the cut-off of the night serving it."""

    def __init__(self, registry: Registry) -> None:
        self.groups = registry.batch_groups
        self.names = ",".join(g.name for g in self.groups)
        self.nan = {g.name: {a.name: math.nan for a in g.features} for g in self.groups}
        self.defaults = {g.name: {a.name: a.default for a in g.features} for g in self.groups}
        self.fields = {g.name: {s: f"{g.name}:{s}" for s in STAT_ORDER} for g in self.groups}
        self.reads_merchant = any(g.entity == "merchant" for g in self.groups)
        self.stats_of = {g.name: g.stats for g in self.groups}  # a property that builds a set: once, not per read

    def fold(self, nights, values: dict, stats: dict, cutoffs: dict) -> None:
        """`nights`: the script's list of [cut-off, "g1,g2", card stats or None, merchant stats or None]."""
        served = {}
        for cutoff, held, card_flat, merchant_flat in nights or ():
            night = (int(cutoff), card_flat, merchant_flat, {})
            for name in (held.decode() if type(held) is bytes else held).split(","):
                served[name] = night
        for g in self.groups:
            name = g.name
            night = served.get(name)
            if night is None:  # no visible night holds it (or its night is older than an expired one)
                values.update(self.nan[name])
                stats[name] = None
                cutoffs[name] = None
                continue
            cutoff, card_flat, merchant_flat, parsed = night
            cutoffs[name] = cutoff
            flat = merchant_flat if g.entity == "merchant" else card_flat
            if flat is None:  # expired (unknown here), or no merchant asked for
                values.update(self.nan[name])
                stats[name] = None
                if g.entity == "merchant" and card_flat is not None:
                    cutoffs[name] = None
                continue
            got = parsed.get(g.entity)
            if got is None:
                got = parsed[g.entity] = _flat(flat)
            f = self.fields[name]
            if not any(f[s] in got for s in self.stats_of[name]):
                values.update(self.defaults[name])  # absent from an existing snapshot: nothing in its window
                stats[name] = WindowAggregate(0, 0)
                continue
            agg = stats[name] = WindowAggregate(got.get(f["n"], 0), got.get(f["s"], 0), got.get(f["mn"]),
                                                 got.get(f["mx"]), got.get(f["f"], 0))
            values.update(group_values(g, agg))


def group_values(group: FeatureGroup, agg: WindowAggregate) -> dict[str, float]:
    """A nightly group's features from an entity's stored statistics, every value a float like the training set's
    (counts included): the online read and the stream's batch fold both use it."""
    return {name: float(v) for name, v in agg.values(group).items()}


def write_night(store, cutoff_ms: int, rows_by_group: Mapping[str, Rows] | Iterable, *, published_ms: int | None,
                now: int, chunk: int = SNAPSHOT_CHUNK, on_progress: Callable[[int], None] | None = None) -> str:
    """`OnlineStore.write_snapshot`'s work (see there); `store` is a synchronous OnlineStore. `published_ms`
    None (Redis Cluster only): dated just ahead of the index copies' writes, and returns once it is visible."""
    registry = store.registry
    by_name = {g.name: g for g in registry.batch_groups}
    if not isinstance(rows_by_group, Mapping):  # the single-group form: the first batch group's rows
        rows_by_group = {registry.batch_groups[0].name: _legacy_rows(rows_by_group)}
    unknown = [n for n in rows_by_group if n not in by_name]
    if not rows_by_group:
        raise ValueError("a night needs at least one batch group")
    if unknown:
        raise ValueError(f"not a batch group of this registry: {', '.join(unknown)}")
    groups: list[FeatureGroup] = [by_name[n] for n in rows_by_group]
    superseded_ttl_s = max(g.ttl_s for g in registry.batch_groups)
    entries = store.snapshot_entries()
    is_latest = not entries or cutoff_ms >= max(entries)
    ttl_s = KEEP_LATEST_S if is_latest else superseded_ttl_s
    # A fresh id for every publication, a rerun too: a night's hashes never change under their id once the index
    # names it, and stream workers keep the hashes they have read on that promise (streaming.stream_reads).
    snap_id = f"{cutoff_ms}.{uuid.uuid4().hex[:8]}"
    keys = store.keys
    tags: dict[str, None] = {}  # every entity written (ordered set)
    pipe = store.redis.pipeline(transaction=False)
    pending = 0
    for g in groups:
        fields = {s: f"{g.name}:{s}" for s in STAT_ORDER}
        kind = g.entity
        for entity, stats in rows_by_group[g.name]:
            tag = entity_tag(kind, entity)
            key = keys.snapshot_at(snap_id, tag)
            pipe.hset(key, mapping={fields[k]: int(v) for k, v in stats.items()})
            if tag not in tags:
                tags[tag] = None
                pipe.expire(key, ttl_s)
            pending += 1
            if pending >= chunk:
                pipe.execute()
                if on_progress:
                    on_progress(pending)
                pending = 0
    if len(pipe):
        pipe.execute()
    if pending and on_progress:
        on_progress(pending)
    previous = entries.get(cutoff_ms)
    visible_at = None
    if published_ms is None:
        from stores.redis_cluster_store import PUBLISH_MARGIN_MS

        published_ms = visible_at = int(time.time() * 1000) + PUBLISH_MARGIN_MS
    if previous is not None:
        published_ms = min(published_ms, previous.published_ms)
    entry = SnapshotEntry(snap_id, published_ms, now + ttl_s * 1000, tuple(g.name for g in groups))
    publish_entries(store, {str(cutoff_ms): entry.dump()}, cutoff_ms)
    if visible_at is not None:
        time.sleep(max(0.0, visible_at - time.time() * 1000 + 1) / 1000)
    written = list(tags)
    if previous is not None:
        # Readers outside the read script (which reads the index and the keys atomically) get a minute.
        expire_keys(store, previous.snap_id, written, 60)
    if is_latest:
        retire_until = now + superseded_ttl_s * 1000
        for c, old in entries.items():
            if c < cutoff_ms and old.expires_ms > retire_until:
                # Superseded: its keys (those of the entities the new night lists; any other keeps its longer
                # TTL, which the index's expiry time overrides for readers) expire with the batch groups' TTL.
                expire_keys(store, old.snap_id, written, superseded_ttl_s)
                publish_entries(store, {str(c): SnapshotEntry(old.snap_id, old.published_ms, retire_until,
                                                       old.groups).dump()})
    return snap_id


def publish_entries(store, entries: Mapping[str, str], cutoff_ms: int | None = None) -> None:
    """Index entries (and a new cut-off) on every copy of the index (one on a single node, one per master of a
    cluster), one MULTI/EXEC per copy."""
    for index, cutoffs in store.index_copies():
        tx = store.redis.pipeline(transaction=True)
        tx.hset(index, mapping=entries)
        if cutoff_ms is not None:
            tx.zadd(cutoffs, {str(cutoff_ms): cutoff_ms})
        tx.execute()


def expire_keys(store, snap_id: str, tags: Sequence[str], ttl_s: int) -> None:
    """Set the TTL of one snapshot's keys for these entities (bounded pipelines)."""
    pipe = store.redis.pipeline(transaction=False)
    for tag in tags:
        pipe.expire(store.keys.snapshot_at(snap_id, tag), ttl_s)
        if len(pipe) >= SNAPSHOT_CHUNK:
            pipe.execute()
    pipe.execute()
