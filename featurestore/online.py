"""The Redis online store: idempotent window writes, 1-week snapshots, and a one-round-trip feature read.

Both Lua scripts live in `featurestore/lua/`; the sync client (batch, CLI, tests) and the asyncio client
(stream worker, HTTP server) run the very same scripts, so there is one implementation of the online state.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from importlib import resources

import orjson
import redis
import redis.asyncio as aioredis

from featurestore.config import RedisSettings
from featurestore.definitions import CARD_AGG_1W, CARD_AGG_10M, DEFAULT_ALLOWED_LATENESS_MS
from featurestore.windows import SEQ_LAST, WindowAggregate, WindowEvent, mean_amount, window_aggregate

#: Events per EVALSHA call: bounds the time Redis spends in one script (it blocks other clients meanwhile).
APPLY_CHUNK = 2_000
SNAPSHOT_CHUNK = 5_000
#: Default online retention of window events (event time). Must exceed window + lateness; longer keeps
#: idempotency records for redelivered messages after a crash.
DEFAULT_RETENTION_MS = 86_400_000


def _script(name: str) -> str:
    return resources.files("featurestore").joinpath("lua", name).read_text()


class ApplyStatus(IntEnum):
    APPLIED = 0
    LATE = 1
    DUPLICATE = 2
    DUPLICATE_LATE = 3
    REDELIVERED = 4


@dataclass(frozen=True, slots=True)
class EventWrite:
    """One transaction as the window state needs it."""

    card: str
    txn_id: str
    ts: int
    seq: int
    amount_cents: int


@dataclass(frozen=True, slots=True)
class OnlineFeatures:
    """Both feature groups for one transaction, as of its own time, the transaction itself folded in."""

    num_trans_last_10m: int
    sum_cents_last_10m: int
    num_trans_last_1w: float  # NaN when no snapshot covers the time
    sum_cents_last_1w: float
    snapshot_cutoff_ms: int | None
    ts: int

    @property
    def avg_amt_last_10m(self) -> float:
        return mean_amount(self.num_trans_last_10m, self.sum_cents_last_10m)

    @property
    def avg_amt_last_1w(self) -> float:
        if math.isnan(self.num_trans_last_1w):
            return math.nan
        return mean_amount(int(self.num_trans_last_1w), int(self.sum_cents_last_1w))

    def as_dict(self) -> dict[str, float]:
        return {
            "num_trans_last_10m": self.num_trans_last_10m,
            "avg_amt_last_10m": self.avg_amt_last_10m,
            "num_trans_last_1w": self.num_trans_last_1w,
            "avg_amt_last_1w": self.avg_amt_last_1w,
        }


def parse_member(member: bytes | str, score: float) -> WindowEvent:
    if isinstance(member, bytes):
        member = member.decode()
    seq, cents, flag, txn_id = member.split("|", 3)
    return WindowEvent(txn_id, int(score), int(seq), int(cents), flag == "L")


def fold_read(reply: Sequence, txn_id: str, ts: int, amount_cents: int, window_ms: int) -> OnlineFeatures:
    """Turn the read script's reply into features, with the SPEC section 4 window fold."""
    stored, flat, cutoff, n1w, s1w, ts_used = reply
    members = [parse_member(flat[i], float(flat[i + 1])) for i in range(0, len(flat), 2)]
    if stored:
        current = next((m for m in members if m.txn_id == txn_id), None)
        if current is None:  # cannot happen while the stored member is in the zset; be explicit anyway
            current = WindowEvent(txn_id, int(ts_used), SEQ_LAST, amount_cents)
    else:
        current = WindowEvent(txn_id, ts, SEQ_LAST, amount_cents)
    agg: WindowAggregate = window_aggregate(members, current, window_ms)
    if cutoff:
        n1, s1, cut = float(int(n1w)), float(int(s1w)), int(cutoff)
    else:
        n1, s1, cut = math.nan, math.nan, None
    return OnlineFeatures(agg.count, agg.sum_cents, n1, s1, cut, current.ts)


def _apply_args(prefix: str, events: Sequence[EventWrite], lateness: int, retention: int) -> list:
    packed = orjson.dumps([(e.card, e.txn_id, str(e.ts), str(e.seq), str(e.amount_cents)) for e in events])
    return [prefix, lateness, retention, CARD_AGG_10M.ttl_s, CARD_AGG_10M.window_ms, int(time.time()), packed]


class _Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def window(self, card: str) -> str:
        return f"{self.prefix}:w:{card}"

    def events(self, card: str) -> str:
        return f"{self.prefix}:e:{card}"

    def card(self, card: str) -> str:
        return f"{self.prefix}:c:{card}"

    @property
    def snapshot_index(self) -> str:
        return f"{self.prefix}:w1:index"

    @property
    def snapshot_cutoffs(self) -> str:
        return f"{self.prefix}:w1:cutoffs"

    def snapshot(self, snap_id: str, card: str) -> str:
        return f"{self.prefix}:w1:{snap_id}:{card}"


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
    ) -> None:
        self.settings = settings or RedisSettings()
        self.keys = _Keys(prefix or self.settings.key_prefix)
        self.lateness = allowed_lateness_ms
        self.retention = retention_ms
        self.redis = client or redis.Redis(**self.settings.client_kwargs())
        self._apply = self.redis.register_script(_script("apply_events.lua"))
        self._read = self.redis.register_script(_script("read_features.lua"))

    def ping(self) -> bool:
        return bool(self.redis.ping())

    def close(self) -> None:
        self.redis.close()

    def apply_events(self, events: Sequence[EventWrite]) -> list[ApplyStatus]:
        """Apply window events in arrival order; replaying a txn_id changes nothing."""
        out: list[ApplyStatus] = []
        for i in range(0, len(events), APPLY_CHUNK):
            chunk = events[i : i + APPLY_CHUNK]
            res = self._apply(keys=[], args=_apply_args(self.keys.prefix, chunk, self.lateness, self.retention))
            out.extend(ApplyStatus(int(s)) for s in res)
        return out

    def read_features(self, card: str, txn_id: str, ts: int, amount_cents: int) -> OnlineFeatures:
        """Both groups as of `ts` for one transaction (known or not yet seen), in one round trip."""
        reply = self._read(keys=[], args=[self.keys.prefix, card, txn_id, ts, CARD_AGG_10M.window_ms])
        return fold_read(reply, txn_id, ts, amount_cents, CARD_AGG_10M.window_ms)

    def card_state(self, card: str) -> dict[str, str]:
        raw = self.redis.hgetall(self.keys.card(card))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def snapshot_cutoffs(self) -> list[int]:
        return [int(c) for c in self.redis.zrange(self.keys.snapshot_cutoffs, 0, -1)]

    def write_snapshot(
        self,
        cutoff_ms: int,
        rows: Iterable[tuple[str, int, int]],
        *,
        ttl_s: int = CARD_AGG_1W.ttl_s,
        chunk: int = SNAPSHOT_CHUNK,
        on_progress=None,
    ) -> str:
        """Materialize one `card_agg_1w` snapshot (card, count, summed cents), then switch readers to it.

        Rows go to fresh keys under a new snapshot id in bounded pipelines; only when all are written
        does one MULTI/EXEC publish the id for the cutoff. Readers see the old snapshot or the new one,
        never a mix or nothing. Superseded snapshot keys expire by TTL.
        """
        snap_id = f"{cutoff_ms}.{uuid.uuid4().hex[:8]}"
        pipe = self.redis.pipeline(transaction=False)
        pending = 0
        for card, n, sum_cents in rows:
            key = self.keys.snapshot(snap_id, card)
            pipe.hset(key, mapping={"n": int(n), "s": int(sum_cents)})
            pipe.expire(key, ttl_s)
            pending += 1
            if pending >= chunk:
                pipe.execute()
                if on_progress:
                    on_progress(pending)
                pending = 0
        if pending:
            pipe.execute()
            if on_progress:
                on_progress(pending)
        previous = self.redis.hget(self.keys.snapshot_index, str(cutoff_ms))
        tx = self.redis.pipeline(transaction=True)
        tx.hset(self.keys.snapshot_index, str(cutoff_ms), snap_id)
        tx.zadd(self.keys.snapshot_cutoffs, {str(cutoff_ms): cutoff_ms})
        tx.execute()
        if previous:
            # Readers that fetched the old id a moment ago still find its keys until the TTL ends;
            # shorten it so superseded snapshots do not linger at full size.
            self._expire_snapshot(previous.decode(), 60)
        return snap_id

    def _expire_snapshot(self, snap_id: str, ttl_s: int) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for i, key in enumerate(self.redis.scan_iter(match=f"{self.keys.prefix}:w1:{snap_id}:*", count=5000)):
            pipe.expire(key, ttl_s)
            if i % SNAPSHOT_CHUNK == SNAPSHOT_CHUNK - 1:
                pipe.execute()
        pipe.execute()


class AsyncOnlineStore:
    """asyncio twin of OnlineStore for the stream worker and the HTTP server (same Lua scripts)."""

    def __init__(
        self,
        settings: RedisSettings | None = None,
        *,
        prefix: str | None = None,
        allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS,
        retention_ms: int = DEFAULT_RETENTION_MS,
    ) -> None:
        self.settings = settings or RedisSettings()
        self.keys = _Keys(prefix or self.settings.key_prefix)
        self.lateness = allowed_lateness_ms
        self.retention = retention_ms
        self.redis = aioredis.Redis(**self.settings.client_kwargs())
        self._apply = self.redis.register_script(_script("apply_events.lua"))
        self._read = self.redis.register_script(_script("read_features.lua"))

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def close(self) -> None:
        await self.redis.aclose()

    async def apply_events(self, events: Sequence[EventWrite]) -> list[ApplyStatus]:
        out: list[ApplyStatus] = []
        for i in range(0, len(events), APPLY_CHUNK):
            chunk = events[i : i + APPLY_CHUNK]
            res = await self._apply(
                keys=[], args=_apply_args(self.keys.prefix, chunk, self.lateness, self.retention)
            )
            out.extend(ApplyStatus(int(s)) for s in res)
        return out

    async def read_features(self, card: str, txn_id: str, ts: int, amount_cents: int) -> OnlineFeatures:
        reply = await self._read(keys=[], args=[self.keys.prefix, card, txn_id, ts, CARD_AGG_10M.window_ms])
        return fold_read(reply, txn_id, ts, amount_cents, CARD_AGG_10M.window_ms)

    async def read_many(self, requests: Sequence[tuple[str, str, int, int]]) -> list[OnlineFeatures]:
        """Several reads in one pipelined round trip (the stream scorer reads a whole batch at once)."""
        pipe = self.redis.pipeline(transaction=False)
        for card, txn_id, ts, _ in requests:
            await self._read(keys=[], args=[self.keys.prefix, card, txn_id, ts, CARD_AGG_10M.window_ms], client=pipe)
        replies = await pipe.execute()
        return [
            fold_read(r, txn_id, ts, cents, CARD_AGG_10M.window_ms)
            for r, (_, txn_id, ts, cents) in zip(replies, requests, strict=True)
        ]


def now_ms() -> int:
    return int(time.time() * 1000)


def delete_prefix(client: redis.Redis, prefix: str, chunk: int = 5_000) -> int:
    """Delete every key under `prefix:` (a test's or a benchmark's namespace), in bounded UNLINK calls."""
    deleted, batch = 0, []
    for key in client.scan_iter(match=f"{prefix}:*", count=10_000):
        batch.append(key)
        if len(batch) >= chunk:
            deleted += client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += client.unlink(*batch)
    return deleted
