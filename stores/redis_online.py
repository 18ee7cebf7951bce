"""The Redis online store: idempotent window writes, nightly snapshots of every batch group (card and merchant,
`stores.online_snapshots`), and a one-round-trip feature read of a transaction's card and merchant.

Both Lua scripts live in `stores/lua/`; the sync client (batch, CLI, tests) and the asyncio client
(stream worker, HTTP server) run the very same scripts, so there is one implementation of the online state.

A card's keys carry its key in a hash tag (`p:win:{<card>}`, `p:card:{<card>}`, like its snapshot hashes) so
they share one slot. With `VELOCITY_REDIS_CLUSTER=true` both stores talk to a Redis Cluster: writes go out as one
apply call per master, reads as one call per master involved, in one pipeline; the design is in
`stores.redis_cluster_store`. The single-node path is the one it always was.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from itertools import repeat
from typing import Protocol

import orjson
import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from featurestore.config import RedisSettings
from featurestore.definitions import (
    CARD_AGG_1W,
    CARD_AGG_10M,
    DEFAULT_ALLOWED_LATENESS_MS,
    DEFAULT_EVENT_RETENTION_MS,
    REGISTRY,
    Registry,
)
from featurestore.state import Applied, ApplyStatus
from featurestore.windows import SEQ_LAST, WindowAggregate, WindowEvent, window_aggregate
from stores import redis_cluster_ops as ops
from stores import redis_cluster_store as rc
from stores.online_snapshots import (  # noqa: F401  (SnapshotEntry, KEEP_LATEST_S: re-exported)
    KEEP_LATEST_S,
    SNAPSHOT_CHUNK,
    SnapshotEntry,
    SnapshotFold,
    entity_tag,
    expire_keys,
    publish_entries,
    write_night,
)
from stores.redis_async_client import async_redis

#: Events per EVALSHA call: bounds the time Redis spends in one script (it blocks other clients meanwhile).
APPLY_CHUNK = 2_000
#: Default online retention of window events (event time). Must exceed window + lateness; longer keeps
#: idempotency records for redelivered messages after a crash.
DEFAULT_RETENTION_MS = DEFAULT_EVENT_RETENTION_MS


def _script(name: str) -> str:
    return resources.files("stores").joinpath("lua", name).read_text()


class RetentionError(LookupError):
    """A read reaches back beyond what the online store still holds; the offline store has the answer."""


@dataclass(frozen=True, slots=True)
class OnlineFeatures:
    """Every declared group's features for one transaction, as of its own time, the transaction folded in.

    Feature values are attributes too (`f.num_trans_last_10m`); `stats` holds each group's statistics in cents
    (None for a batch group without a snapshot).
    """

    values: dict[str, float]
    stats: dict[str, WindowAggregate | None]
    snapshot_cutoff_ms: int | None
    ts: int
    #: False when the read reaches back beyond the store's retention (events trimmed, or the chosen snapshot
    #: expired): the values above are then not the full answer.
    complete: bool = True
    #: Per batch group, the cut-off of the snapshot its values come from (None: no snapshot holds the group).
    group_cutoffs: dict[str, int | None] = field(default_factory=dict)

    def __getattr__(self, name: str) -> float:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def as_dict(self) -> dict[str, float]:
        return dict(self.values)

    @property
    def sum_cents_last_10m(self) -> int:
        """The product's 10-minute summed cents (inspection and tests)."""
        return self.stats[CARD_AGG_10M.name].sum_cents

    @property
    def sum_cents_last_1w(self) -> float:
        w = self.stats.get(CARD_AGG_1W.name)
        return math.nan if w is None else float(w.sum_cents)


def parse_member(member: bytes | str, score: float) -> WindowEvent:
    """A stored window member "seq|cents|flag|txn_id": the txn_id is last, so it may contain '|'."""
    if isinstance(member, bytes):
        member = member.decode()
    seq, cents, flag, txn_id = member.split("|", 3)
    return WindowEvent(txn_id, int(score), int(seq), int(cents), flag == "L")


_FOLDS: dict[int, tuple[Registry, SnapshotFold]] = {}


def _snapshot_fold(registry: Registry) -> SnapshotFold:
    """The registry's snapshot fold, built once (keyed by identity: hashing a Registry costs more than the fold)."""
    got = _FOLDS.get(id(registry))
    if got is None or got[0] is not registry:
        got = _FOLDS[id(registry)] = (registry, SnapshotFold(registry))
    return got[1]


def fold_read(reply: Sequence, txn_id: str, ts: int, amount_cents: int | None,
              registry: Registry = REGISTRY) -> OnlineFeatures:
    """Turn the read script's reply into every declared feature, with the SPEC section 4 window fold.

    A stored transaction is read as of its own arrival (its seq); one the store has not seen arrives now,
    after everything stored. `amount_cents=None` reads the windows without a transaction of its own (inspection).
    """
    stored, flat, cutoff, nights, ts_used, trimmed, expired = reply
    members = [parse_member(flat[i], float(flat[i + 1])) for i in range(0, len(flat), 2)]
    t = int(ts_used)
    if stored:
        seq, cents, flag, _ = (stored.decode() if isinstance(stored, bytes) else stored).split("|", 3)
        current = WindowEvent(txn_id, t, int(seq), int(cents), flag == "L")
    else:
        current = WindowEvent(txn_id, t, SEQ_LAST, amount_cents or 0)
    values: dict[str, float] = {}
    stats: dict[str, WindowAggregate | None] = {}
    for group in registry.stream_groups:
        stats[group.name] = agg = window_aggregate(members, current, group.window_ms,
                                                   include_current=bool(stored) or amount_cents is not None)
        values.update(agg.values(group))
    cutoff_ms = int(cutoff) if cutoff else None
    cutoffs: dict[str, int | None] = {}
    _snapshot_fold(registry).fold(nights, values, stats, cutoffs)
    complete = not expired and not (trimmed and t - registry.longest_stream_window_ms < int(trimmed))
    return OnlineFeatures(values, stats, cutoff_ms, t, complete, cutoffs)


class WindowWrite(Protocol):
    """What a window write needs: an `EventWrite`, or a validated `Transaction` (the stream worker's)."""

    card: str
    txn_id: str
    ts: int
    amount_cents: int


def pack_writes(events: Sequence[WindowWrite]) -> list[str]:
    """Window writes as the apply script takes them: card, txn_id, ts, cents per event, numbers as decimal strings
    (Redis 7.0 would printf-format Lua numbers handed to redis.call: ~15% of the script's time)."""
    return [x for e in events for x in (e.card, e.txn_id, str(e.ts), str(e.amount_cents))]


def apply_args(prefix: str, packed: list[str], lateness: int, retention: int, ttl_s: int) -> list:
    """One script call's arguments for packed writes (at most APPLY_CHUNK events: one JSON argument)."""
    now_ns = time.time_ns()
    return [prefix, lateness, retention, ttl_s, now_ns // 1_000_000, now_ns // 1_000, orjson.dumps(packed)]


def stream_ttl_s(registry: Registry) -> int:
    """How long a card's window state outlives its last write: the longest TTL of the declared stream groups."""
    return max(g.ttl_s for g in registry.stream_groups)


#: The fields of a card's state (apply_events.lua), in their stored order.
CARD_STATE_FIELDS = ("last_seq", "newest", "oldest", "trimmed")


def parse_card_state(raw: bytes | str | None) -> dict[str, str]:
    """A card's stored state as field -> value ('' where unknown); empty when the store holds nothing for it."""
    if raw is None:
        return {}
    text = raw.decode() if isinstance(raw, bytes) else raw
    return dict(zip(CARD_STATE_FIELDS, text.split("|"), strict=True))


def _read_args(prefix: str, card: str, txn_id: str, ts: int, arrival_ms: int | None, registry: Registry,
               merchant: str | None = None) -> list:
    """The read script's ARGV. The merchant's snapshot is read only where the registry has merchant groups.
    The last one, the index copy's suffix, is '' on a single node (a cluster read sets it per node)."""
    now = now_ms()
    fold = _snapshot_fold(registry)
    m = entity_tag("merchant", merchant) if merchant is not None and fold.reads_merchant else ""
    return [prefix, card, txn_id, ts, registry.longest_stream_window_ms, now if arrival_ms is None else arrival_ms,
            now, entity_tag("card", card), m, fold.names, ""]


def read_request_args(prefix: str, request: Sequence, arrival_ms: int | None, registry: Registry) -> list:
    """`_read_args` of a (card, txn_id, ts) or (card, txn_id, ts, merchant) request."""
    return _read_args(prefix, request[0], request[1], request[2], arrival_ms, registry,
                      request[3] if len(request) > 3 else None)


_STATUS = tuple(ApplyStatus)  # by value: 0, 1, 2, 3


def applied_outcomes(reply: Sequence[int]) -> list[Applied]:
    """The apply script's flat reply (status, seq per event) as Applied tuples, built without a Python-level call
    per event (the stream worker turns ~100k of these a second)."""
    return list(map(tuple.__new__, repeat(Applied), zip(map(_STATUS.__getitem__, reply[0::2]), reply[1::2],
                                                          strict=True)))


class _Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def window(self, card: str) -> str:
        """ZSET of the card's window events (score ts, member "seq|cents|flag|txn_id"); the card in a hash tag."""
        return f"{self.prefix}:win:{{{card}}}"

    def card(self, card: str) -> str:
        """HASH of the card's state (field "") and its idempotency records (txn_id -> "seq|cents|flag|ts")."""
        return f"{self.prefix}:card:{{{card}}}"

    def agg(self, card: str) -> str:
        """STRING: the stream scorer's window statistics as of the card's last arrival, a cache the apply script
        checks against the card's state before use (stores/lua/apply_events.lua); safe to delete."""
        return f"{self.prefix}:agg:{{{card}}}"

    #: The idempotency records live in the card's hash.
    events = card

    @property
    def snapshot_index(self) -> str:
        """The index of a single node; under Redis Cluster each master has a copy (`index_copies`)."""
        return f"{self.prefix}:w1:index"

    @property
    def snapshot_cutoffs(self) -> str:
        return f"{self.prefix}:w1:cutoffs"

    def snapshot_at(self, snap_id: str, tag: str) -> str:
        """HASH of one entity's statistics in one night (`online_snapshots`; `tag` from `entity_tag`)."""
        return f"{self.prefix}:snap:{snap_id}:{tag}"

    def snapshot(self, snap_id: str, card: str) -> str:
        """HASH of a card's statistics in one night: every card group's, fields `<group>:<stat>`."""
        return self.snapshot_at(snap_id, entity_tag("card", card))

    def merchant_snapshot(self, snap_id: str, merchant: str) -> str:
        return self.snapshot_at(snap_id, entity_tag("merchant", merchant))


class OnlineStore:
    """Synchronous online store, for batch materialization, the CLI and tests."""

    def __init__(
        self,
        settings: RedisSettings | None = None,
        *,
        prefix: str | None = None,
        allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS,
        retention_ms: int = DEFAULT_RETENTION_MS,
        client: redis.Redis | None = None,
        registry: Registry = REGISTRY,
    ) -> None:
        self.registry = registry
        self.settings = settings or RedisSettings()
        self.keys = _Keys(prefix or self.settings.key_prefix)
        self.lateness = allowed_lateness_ms
        self.retention = retention_ms
        #: Redis Cluster: writes and reads are routed per master (`stores.redis_cluster_store`).
        self.cluster = isinstance(client, RedisCluster) if client is not None else self.settings.cluster
        # A cluster client connects when built: it is built on first use, so that an unreachable cluster fails
        # where callers catch Redis errors (as a plain client, which connects lazily, does).
        self._client = client if client is not None or self.cluster else redis.Redis(**self.settings.client_kwargs())
        self.ttl_s = stream_ttl_s(registry)
        if not self.cluster:
            self._apply = self._client.register_script(_script("apply_events.lua"))
            self._read = self._client.register_script(_script("read_features.lua"))
        self._restore = None

    @property
    def redis(self) -> redis.Redis | RedisCluster:
        if self._client is None:
            self._client = rc.cluster_client(self.settings)
        return self._client

    @redis.setter
    def redis(self, client) -> None:
        self._client = client

    def ping(self) -> bool:
        return bool(self.redis.ping())

    def index_copies(self) -> list[tuple[str, str]]:
        """(index, cut-offs) keys of every copy of the snapshot index: one on a single node, one per master of a
        cluster (each in a slot of that master)."""
        return _index_copies(self)

    def run_calls(self, calls: list) -> list:
        """Cluster script calls (`stores.redis_cluster_ops`) in one pipeline: one round trip per master."""
        return ops.run_calls(self.redis, calls)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def apply_events(self, events: Sequence[WindowWrite]) -> list[Applied]:
        """Apply window events in arrival order; replaying a txn_id changes nothing."""
        return self.apply_packed(pack_writes(events))

    def apply_packed(self, packed: list[str]) -> list[Applied]:
        """`apply_events` for writes already packed (`pack_writes`), in calls of at most APPLY_CHUNK events."""
        if self.cluster:
            calls, where = ops.plan_apply(self, rc.node_map(self.redis), packed, APPLY_CHUNK)
            return ops.finish_apply(self.run_calls(calls), where, len(packed) // 4)
        out: list[Applied] = []
        step = 4 * APPLY_CHUNK
        for i in range(0, len(packed), step):
            args = apply_args(self.keys.prefix, packed[i:i + step], self.lateness, self.retention, self.ttl_s)
            out.extend(applied_outcomes(self._apply(keys=[], args=args)))
        return out

    def restore_events(self, flat: list[str], cuts: Mapping[str, str]) -> int:
        """Archived events (card, txn_id, ts, cents, flag, seq per event, strings) merged into the store with
        stores/lua/restore_events.lua (`velocity features rebuild`); one call, or one per master of a cluster.
        Returns how many were not already online."""
        if self.cluster:
            calls = ops.plan_restore(self, rc.node_map(self.redis), flat, dict(cuts))
            return sum(int(r) for r in self.run_calls(calls))
        if self._restore is None:
            self._restore = self.redis.register_script(_script("restore_events.lua"))
        return int(self._restore(keys=[], args=[self.keys.prefix, self.ttl_s, orjson.dumps(flat),
                                                orjson.dumps(dict(cuts))]))

    def read_features(self, card: str, txn_id: str, ts: int, amount_cents: int | None,
                      arrival_ms: int | None = None, merchant: str | None = None) -> OnlineFeatures:
        """Every group as of `ts` for one transaction, in one round trip.

        A transaction the store holds is read as of its own arrival; one it has not seen as if it arrived at
        `arrival_ms` (default now), after everything stored. Merchant groups need the transaction's `merchant`
        (NaN without one).
        """
        if self.cluster:
            reply = self.read_replies([(card, txn_id, ts, merchant)], arrival_ms)[0]
        else:
            reply = self._read(keys=[], args=_read_args(self.keys.prefix, card, txn_id, ts, arrival_ms,
                                                        self.registry, merchant))
        return fold_read(reply, txn_id, ts, amount_cents, self.registry)

    def read_replies(self, requests: Sequence[tuple], arrival_ms: int | None = None) -> list:
        """The read script's raw replies for (card, txn_id, ts[, merchant]) requests: one pipelined round trip (per
        master involved, under Redis Cluster, where the merchant's statistics are merged into the card's reply)."""
        if not self.cluster:
            pipe = self.redis.pipeline(transaction=False)
            for request in requests:
                self._read(keys=[], args=read_request_args(self.keys.prefix, request, arrival_ms, self.registry),
                           client=pipe)
            return list(pipe.execute())
        nodes = rc.node_map(self.redis)
        plan = ops.plan_reads(self, nodes, requests, arrival_ms)
        out, again, owners = ops.finish_reads(self, nodes, plan, self.run_calls(plan.calls))
        return ops.settle(out, owners, self.run_calls(again), plan.merchant_groups) if again else out

    def card_state(self, card: str) -> dict[str, str]:
        """The card's window state (`CARD_STATE_FIELDS`); empty when the store holds nothing for the card."""
        return parse_card_state(self.redis.hget(self.keys.card(card), ""))

    def snapshot_cutoffs(self) -> list[int]:
        return [int(c) for c in self.redis.zrange(self.index_copies()[0][1], 0, -1)]

    def snapshot_entries(self) -> dict[int, SnapshotEntry]:
        """Every published snapshot the index lists: cut-off -> (id, published_ms, expires_ms)."""
        return {int(k): SnapshotEntry.parse(v) for k, v in self.redis.hgetall(self.index_copies()[0][0]).items()}

    def put_snapshot_entry(self, cutoff_ms: int, entry: SnapshotEntry) -> None:
        """Replace one night's index entry on every copy of the index (operations and tests: e.g. retire a night)."""
        publish_entries(self, {str(cutoff_ms): entry.dump()})

    def write_snapshot(
        self,
        cutoff_ms: int,
        rows_by_group: Mapping[str, Iterable[tuple[str, Mapping[str, int]]]] | Iterable,
        *,
        published_ms: int | None = None,
        chunk: int = SNAPSHOT_CHUNK,
        on_progress: Callable[[int], None] | None = None,
    ) -> str:
        """Materialize one night's batch groups, then publish them together (`stores.online_snapshots`).

        `rows_by_group` maps a batch group's name to its (entity key, {stat: int}) rows, stats named as in
        `STAT_ORDER` (n, s, mn, mx in cents, f). The older single-group form, an iterable of (card, statistics) or
        (card, count, summed cents) rows, is the registry's first batch group (card_agg_1w).

        Rows go to fresh keys under a new snapshot id in bounded pipelines (`on_progress(rows)` after each); only
        when all are written does one MULTI/EXEC publish the id for the cut-off, with `published_ms` (default now;
        a backfill passes C + delay). Readers see the old night or the new one, every group of it, never a mix.
        The latest cut-off is kept until a newer one is published (`KEEP_LATEST_S`, a month of missed nights); a
        superseded one expires after the batch groups' TTL, and the index remembers when, so a read never mistakes
        expired keys for absent entities. A rerun of a night keeps the first publication time: readers have used
        that cut-off since then.
        """
        now = now_ms()
        # Under Redis Cluster the default publication time is set when the index copies are written (write_night).
        published = (None if self.cluster else now) if published_ms is None else int(published_ms)
        return write_night(self, cutoff_ms, rows_by_group, published_ms=published, now=now, chunk=chunk,
                           on_progress=on_progress)


class AsyncOnlineStore:
    """asyncio twin of OnlineStore for the stream worker and the HTTP server (same Lua scripts)."""

    def __init__(
        self,
        settings: RedisSettings | None = None,
        *,
        prefix: str | None = None,
        allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS,
        retention_ms: int = DEFAULT_RETENTION_MS,
        registry: Registry = REGISTRY,
    ) -> None:
        self.registry = registry
        self.settings = settings or RedisSettings()
        self.keys = _Keys(prefix or self.settings.key_prefix)
        self.lateness = allowed_lateness_ms
        self.retention = retention_ms
        self.cluster = self.settings.cluster
        self.redis = (rc.async_cluster_client(self.settings) if self.cluster
                      else async_redis(self.settings))
        self.ttl_s = stream_ttl_s(registry)
        self._apply = self.redis.register_script(_script("apply_events.lua"))
        self._read = self.redis.register_script(_script("read_features.lua"))

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def close(self) -> None:
        await self.redis.aclose()

    async def apply_events(self, events: Sequence[WindowWrite]) -> list[Applied]:
        return await self.apply_packed(pack_writes(events))

    async def _nodes(self) -> rc.NodeMap:
        try:
            await self.redis.initialize()
        except RedisClusterException as exc:  # no RedisError: callers handle outages as ConnectionError
            raise redis.ConnectionError(f"Redis Cluster at {self.settings.host}:{self.settings.port}: {exc}") from None
        return rc.node_map(self.redis)

    async def apply_packed(self, packed: list[str]) -> list[Applied]:
        """`apply_events` for writes already packed (`pack_writes`; the stream worker packs while validating)."""
        if self.cluster:
            calls, where = ops.plan_apply(self, await self._nodes(), packed, APPLY_CHUNK)
            return ops.finish_apply(await ops.run_calls_async(self.redis, calls), where, len(packed) // 4)
        out: list[Applied] = []
        step = 4 * APPLY_CHUNK
        for i in range(0, len(packed), step):
            args = apply_args(self.keys.prefix, packed[i:i + step], self.lateness, self.retention, self.ttl_s)
            out.extend(applied_outcomes(await self._apply(keys=[], args=args)))
        return out

    async def read_features(self, card: str, txn_id: str, ts: int, amount_cents: int,
                            arrival_ms: int | None = None, merchant: str | None = None) -> OnlineFeatures:
        if self.cluster:
            reply = (await self.read_replies([(card, txn_id, ts, merchant)], arrival_ms))[0]
        else:
            reply = await self._read(keys=[], args=_read_args(self.keys.prefix, card, txn_id, ts, arrival_ms,
                                                              self.registry, merchant))
        return fold_read(reply, txn_id, ts, amount_cents, self.registry)

    async def read_many(self, requests: Sequence[tuple]) -> list[OnlineFeatures]:
        """Several reads in one pipelined round trip: (card, txn_id, ts, cents[, merchant]) requests."""
        if self.cluster:
            replies = await self.read_replies([(r[0], r[1], r[2], *r[4:]) for r in requests])
            return [fold_read(r, q[1], q[2], q[3], self.registry) for r, q in zip(replies, requests, strict=True)]
        pipe = self.redis.pipeline(transaction=False)
        for card, txn_id, ts, _, *merchant in requests:
            await self._read(keys=[], args=_read_args(self.keys.prefix, card, txn_id, ts, None, self.registry,
                                                      *merchant), client=pipe)
        replies = await pipe.execute()
        return [
            fold_read(r, req[1], req[2], req[3], self.registry)
            for r, req in zip(replies, requests, strict=True)
        ]

    async def read_replies(self, requests: Sequence[tuple[str, str, int]], arrival_ms: int | None = None) -> list:
        """The read script's raw replies for (card, txn_id, ts[, merchant]) requests, one round trip (pipelined
        for several).

        For callers that need more than `fold_read` keeps (the scorer reports how old the newest stored window
        event is: `newest_counted_ts`); turn each reply into features with `fold_read`, as `read_features` does.
        """
        prefix, registry = self.keys.prefix, self.registry
        if self.cluster:
            nodes = await self._nodes()
            plan = ops.plan_reads(self, nodes, requests, arrival_ms)
            out, again, owners = ops.finish_reads(self, nodes, plan, await ops.run_calls_async(self.redis, plan.calls))
            if again:
                ops.settle(out, owners, await ops.run_calls_async(self.redis, again), plan.merchant_groups)
            return out
        if len(requests) == 1:
            return [await self._read(keys=[], args=read_request_args(prefix, requests[0], arrival_ms, registry))]
        pipe = self.redis.pipeline(transaction=False)
        for request in requests:
            await self._read(keys=[], args=read_request_args(prefix, request, arrival_ms, registry), client=pipe)
        return list(await pipe.execute())


def newest_counted_ts(reply: Sequence, txn_id: str) -> int | None:
    """The newest event time among the stored window events that count for the read's transaction (on time,
    arrived before it, itself excluded), from a read reply; None when only the transaction itself counts."""
    stored, flat = reply[0], reply[1]
    text = stored.decode() if isinstance(stored, bytes) else stored
    seq = float(text.split("|", 1)[0]) if text else SEQ_LAST
    newest = None
    for i in range(0, len(flat), 2):
        e = parse_member(flat[i], float(flat[i + 1]))
        if not e.late and e.txn_id != txn_id and e.seq < seq and (newest is None or e.ts > newest):
            newest = e.ts
    return newest


def _index_copies(store) -> list[tuple[str, str]]:
    keys = store.keys
    if not store.cluster:
        return [(keys.snapshot_index, keys.snapshot_cutoffs)]
    nodes = rc.node_map(store.redis)
    return [(keys.snapshot_index + nodes.suffix(n), keys.snapshot_cutoffs + nodes.suffix(n))
            for n in sorted(nodes.tags)]


def now_ms() -> int:
    return int(time.time() * 1000)


def delete_prefix(client: redis.Redis, prefix: str, chunk: int = 5_000) -> int:
    """Delete every key under `prefix:` (a test's or a benchmark's namespace), in bounded UNLINK calls (a cluster
    client scans every master and splits the UNLINKs by slot)."""
    deleted, batch = 0, []
    for key in client.scan_iter(match=f"{prefix}:*", count=10_000):
        batch.append(key)
        if len(batch) >= chunk:
            deleted += client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += client.unlink(*batch)
    return deleted
