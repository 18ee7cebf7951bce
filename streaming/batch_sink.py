"""One batch of the stream worker: validate, update windows in Redis, archive, dead-letter, count.

Order matters for delivery guarantees: the Redis write (idempotent) and the archive append (deduplicated on
read) and the DLQ sends all complete before `process` returns, and faust only acknowledges (and later commits)
a batch's offsets after that. A worker killed at any point is therefore redelivered the uncommitted batch and
reapplies it without double counting.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import orjson

from featurestore.entity import EntityKeyer
from featurestore.state import Applied, ApplyStatus
from stores.archive import ArchiveWriter, roll_spool
from stores.redis_online import AsyncOnlineStore
from streaming import metrics
from streaming.batch_prep import RawMessage, archive_rows, prepare_batch
from streaming.stream_reads import apply_with_stats

log = logging.getLogger(__name__)

DlqSend = Callable[[RawMessage, str, str], Awaitable[None]]
#: The archive roller thread's niceness above the worker's (Linux: per thread; elsewhere nothing changes).
ROLL_NICENESS = 10


def _lower_priority() -> None:
    """Run the calling thread (the archive roller) at a lower CPU priority: it yields to the worker's loop and
    Redis whenever they want a core, and still gets idle time."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + ROLL_NICENESS)
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted: the roll still runs, at normal priority
        log.debug("archive roller keeps its priority: %s", exc)


@dataclass
class BatchResult:
    applied: int = 0
    late: int = 0
    duplicate: int = 0
    invalid: int = 0


def redis_unavailable(exc: BaseException) -> bool:
    """A connection-level failure (retry the batch), as opposed to an error in the request itself."""
    if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__  # redis-py's ConnectionError/TimeoutError (BusyLoadingError is one) are its own
    return "Connection" in name or "Timeout" in name or "BusyLoading" in name


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RedisWatch:
    """Truthful outage logs, and a loud report when Redis comes back empty.

    Outages: each failed write attempt is timed (one attempt can take seconds: redis-py retries the connection
    inside it, each try bounded by the connect/socket timeout). The first failure is logged at once, then a
    summary at most every `log_every_s` while it lasts, then one line when Redis is back: after how long and how
    many attempts. Nothing is logged per attempt, so a long outage does not flood the log.

    Emptied Redis (restarted without persistence, or flushed): the worker keeps a marker key
    `<prefix>:meta:instance` (an id and a creation time, no TTL) in the online store. It is created at the first
    write and read again after every outage and otherwise at most every `check_every_s`, on the write path (one
    GET every few seconds, never an extra round trip per batch). A write inside the interval has the check run at
    the interval's end, so the last burst before a quiet spell is checked too. A marker that is gone, or that
    differs from the one this worker saw (another worker found it gone and re-created it), means the windows and
    1-week snapshots are gone: an ERROR says so and how to rebuild, the metric velocity_stream_redis_data_lost_total
    counts it, and the marker is re-created.
    """

    def __init__(self, store: AsyncOnlineStore, *, check_every_s: float = 5.0, log_every_s: float = 30.0) -> None:
        self.store = store
        self.key = f"{store.keys.prefix}:meta:instance"
        self.check_every_s = check_every_s
        self.log_every_s = log_every_s
        self.marker: bytes | None = None  # the marker value this worker last saw
        self.losses = 0
        self._next_check = 0.0  # monotonic time of the next marker check; 0: at the next write
        self._down_since: float | None = None  # monotonic start of the current outage's first failed attempt
        self._failures = 0  # failed attempts in the current outage
        self._logged_at = 0.0
        self._deferred: asyncio.Task | None = None  # the check due after a write that came inside the interval

    def failed(self, exc: BaseException, attempt_s: float, next_delay_s: float) -> None:
        """One write attempt failed after `attempt_s` seconds; the next starts in `next_delay_s` seconds."""
        now = time.monotonic()
        self._failures += 1
        metrics.REDIS_WRITE_FAILURES.inc()
        metrics.REDIS_UP.set(0)
        where = f"{self.store.settings.host}:{self.store.settings.port}"
        if self._down_since is None:
            self._down_since = now - attempt_s
            self._logged_at = now
            log.warning("online store (Redis at %s) write failed: attempt 1 took %.1f s (%s); the batch is held "
                        "and retried, next attempt in %.1f s (while Redis stays down, a summary every %.0f s)",
                        where, attempt_s, _one_line(exc), next_delay_s, self.log_every_s)
        elif now - self._logged_at >= self.log_every_s:
            self._logged_at = now
            log.warning("online store (Redis at %s) still unavailable after %.1f s: %d failed attempts, attempt %d "
                        "took %.1f s (%s); next attempt in %.1f s", where, now - self._down_since, self._failures,
                        self._failures, attempt_s, _one_line(exc), next_delay_s)

    async def succeeded(self) -> None:
        """A write went through: close an outage (log it, check the marker now), else check when due."""
        if self._down_since is not None:
            log.warning("online store (Redis at %s:%s) is back after %.1f s and %d failed attempt%s; the held "
                        "batch is written", self.store.settings.host, self.store.settings.port,
                        time.monotonic() - self._down_since, self._failures, "" if self._failures == 1 else "s")
            self._down_since, self._failures = None, 0
            metrics.REDIS_UP.set(1)
            self._next_check = 0.0
        if time.monotonic() >= self._next_check:
            await self.check()
        elif self._next_check != float("inf") and (self._deferred is None or self._deferred.done()):
            # A write inside the interval is still followed by a check within it, even if no write comes after:
            # a burst that lands on an emptied Redis is reported then, not at the next burst, however late.
            self._deferred = asyncio.create_task(self._check_when_due())

    async def _check_when_due(self) -> None:
        while (wait := self._next_check - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        await self.check()

    def close(self) -> None:
        if self._deferred is not None:
            self._deferred.cancel()

    def _new_marker(self) -> bytes:
        return orjson.dumps({"id": uuid.uuid4().hex[:16], "created_ms": int(time.time() * 1000),
                             "host": socket.gethostname(), "pid": os.getpid()})

    async def check(self) -> bool:
        """Read the marker; False when Redis lost its data since this worker last looked (reported here)."""
        self._next_check = time.monotonic() + self.check_every_s
        redis = self.store.redis
        try:
            seen = await redis.get(self.key)
            if seen is not None and seen == (self.marker or seen):
                self.marker = seen
                metrics.REDIS_UP.set(1)
                return True
            if seen is None:
                created = await redis.set(self.key, self._new_marker(), nx=True)
                current = await redis.get(self.key)
            else:
                created, current = False, seen
        except Exception as exc:  # the check never fails a batch (the batch itself is already written)
            if redis_unavailable(exc):
                self._next_check = 0.0  # the next write checks again
            else:  # e.g. an ACL that forbids the key: say so once, and stop checking
                self._next_check = float("inf")
                log.warning("cannot read or write the online store marker %s (%s): a Redis that comes back empty "
                            "will not be detected; allow this key for the worker's Redis user", self.key,
                            _one_line(exc))
            return True
        first, self.marker = self.marker is None, current
        if first:
            if created:
                log.info("online store marker %s created: this is the first worker on this Redis, or Redis was "
                         "emptied while no worker ran; if it was emptied, run `velocity features rebuild` to restore "
                         "the windows, arrival sequences and snapshots from the archive", self.key)
            return True
        self.losses += 1
        metrics.REDIS_DATA_LOST.inc()
        metrics.REDIS_DATA_LOST_AT.set(time.time())
        how = (f"the marker {self.key} is gone" if created
               else f"another worker found the marker {self.key} gone and re-created it")
        log.error("Redis at %s:%s LOST ITS DATA (%s): it restarted without persistence or was flushed. The "
                  "10-minute windows, arrival sequences, txn_id records and snapshots it held are gone: until "
                  "they are restored, cards are scored on partial windows and redelivered transactions may count "
                  "twice. Run `velocity features rebuild` now (it restores them from the archive and the offline "
                  "store, merging with what this worker writes meanwhile). To avoid this, run Redis with "
                  "persistence (appendonly yes).", self.store.settings.host, self.store.settings.port, how)
        return False


class BatchSink:
    def __init__(self, store: AsyncOnlineStore, keyer: EntityKeyer, dlq_send: DlqSend,
                 archive: ArchiveWriter | None = None, max_backoff_s: float = 5.0,
                 max_future_ms: int | None = None) -> None:
        self.store = store
        self.max_future_ms = max_future_ms
        self.keyer = keyer
        self.dlq_send = dlq_send
        self.archive = archive
        self.max_backoff_s = max_backoff_s
        self.rate = metrics.RateWindow()
        self.freshness = metrics.Reservoir()
        self._rolls: set[asyncio.Future] = set()
        #: One low-priority thread rolls spools into Parquet (`_lower_priority`), so a roll takes a spare core's
        #: time, not the hot path's: rolling a 32 MB spool on Arrow's pool took both cores of a 2-core machine for
        #: a second and put 1.5 s into the p99 freshness at 5,000 events/s (bench/RESULTS.md).
        self._roller: ThreadPoolExecutor | None = None
        self.redis_watch = RedisWatch(store)
        #: Non-empty: the apply also folds each transaction's windows of these lengths for the stream scorer
        #: (`streaming.stream_reads.apply_with_stats`; set by the worker when it scores on a single Redis node).
        self.windows_ms: tuple[int, ...] = ()

    async def _apply_packed(self, packed: list[str], batch) -> list[Applied]:
        if not self.windows_ms:
            return await self.store.apply_packed(packed)
        applied, batch.window_stats = await apply_with_stats(self.store, packed, self.windows_ms)
        return applied

    async def _apply_with_retry(self, packed: list[str], batch=None):
        """Redis unavailable is not a reason to drop or skip a batch: retry with backoff until it is back.

        What the log says is measured (see RedisWatch): how long each failed attempt really took (redis-py
        reconnects inside one attempt, so one can take seconds), the attempt count and the real next delay.
        """
        delay = 0.1
        watch = self.redis_watch
        while True:
            started = time.monotonic()
            try:
                applied = await self._apply_packed(packed, batch)
            except Exception as exc:  # redis-py raises its own ConnectionError/TimeoutError types
                if not redis_unavailable(exc):
                    raise
                watch.failed(exc, time.monotonic() - started, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
                continue
            await watch.succeeded()  # after an outage, or every few seconds: is the marker still there?
            return applied

    def prepare(self, messages: Sequence[RawMessage]):
        """CPU-only half of a batch; the worker runs it while Redis still works on the previous one."""
        now = time.time_ns() // 1_000_000
        return messages, prepare_batch(messages, self.keyer, now, self.max_future_ms), time.perf_counter()

    async def process(self, messages: Sequence[RawMessage]) -> BatchResult:
        return await self.apply(self.prepare(messages))

    async def apply(self, prepared) -> BatchResult:
        """Redis write, archive append and DLQ sends of a prepared batch; returns once all are done."""
        return await self.finish(prepared, *await self.write_online(prepared))

    async def write_online(self, prepared) -> tuple[list[Applied], float]:
        """The Redis half of `apply`: window writes (retried until Redis takes them); returns outcomes, when visible."""
        _, batch, _ = prepared
        applied = await self._apply_with_retry(batch.packed, batch) if batch.packed else []
        return applied, time.time() * 1000.0

    async def finish(self, prepared, applied: Sequence[Applied], visible_ms: float) -> BatchResult:
        """The rest of `apply`: archive, DLQ sends and metrics. May overlap the next batch's `write_online`."""
        messages, batch, started = prepared
        result = BatchResult(invalid=len(batch.rejects))
        sends = []
        for msg, exc in batch.rejects:
            sends.append(self.dlq_send(msg, exc.reason, exc.detail))
            metrics.DLQ.labels(exc.reason).inc()
        statuses = [a[0] for a in applied]
        result.applied = statuses.count(ApplyStatus.APPLIED)
        if result.applied != len(statuses):  # the usual batch is all applied: no second pass over it
            for src, status in zip(batch.sources, statuses, strict=True):
                if status in (ApplyStatus.LATE, ApplyStatus.DUPLICATE_LATE):
                    result.late += status == ApplyStatus.LATE
                    result.duplicate += status == ApplyStatus.DUPLICATE_LATE
                    # Redelivered late events are dead-lettered again: at-least-once, never lost.
                    sends.append(self.dlq_send(src, "late", "event time behind the card's newest event by more "
                                               "than the allowed lateness"))
                    metrics.DLQ.labels("late").inc()
                elif status == ApplyStatus.DUPLICATE:
                    result.duplicate += 1
        if self.archive is not None and batch.txns:
            rows = archive_rows(batch, applied, int(visible_ms))
            self.archive.append(rows)
            metrics.ARCHIVED.inc(rows.num_rows)
        if sends:
            await asyncio.gather(*sends)

        self._observe(messages, visible_ms, result, started)
        if self.archive is not None and self.archive.should_roll():
            self._roll_in_background()
        return result

    def _observe(self, messages, visible_ms: float, result: BatchResult, started: float) -> None:
        metrics.EVENTS.labels("applied").inc(result.applied)
        metrics.EVENTS.labels("late").inc(result.late)
        metrics.EVENTS.labels("duplicate").inc(result.duplicate)
        metrics.EVENTS.labels("invalid").inc(result.invalid)
        metrics.BATCH_SIZE.observe(len(messages))
        metrics.BATCHES.observe(time.perf_counter() - started)
        metrics.EVENTS_PER_S.set(self.rate.add(time.monotonic(), len(messages)))
        live = [visible_ms - m.timestamp_ms for m in messages if visible_ms - m.timestamp_ms < metrics.LIVE_HORIZON_MS]
        if live:
            for v in live:
                metrics.FRESHNESS.observe(v / 1000.0)
            self.freshness.extend(live)
            metrics.FRESHNESS_P99.set(self.freshness.p99(time.monotonic()))

    def _roll_in_background(self) -> None:
        spool = self.archive.detach()
        if spool is None:
            return
        if self._roller is None:
            self._roller = ThreadPoolExecutor(1, thread_name_prefix="archive-roll", initializer=_lower_priority)
        work = functools.partial(roll_spool, spool, self.archive.root, use_threads=False)
        task = asyncio.get_running_loop().run_in_executor(self._roller, work)
        self._rolls.add(task)
        task.add_done_callback(self._rolls.discard)

    async def close(self) -> None:
        self.redis_watch.close()
        if self._rolls:
            await asyncio.gather(*self._rolls, return_exceptions=True)
        if self._roller is not None:
            self._roller.shutdown(wait=True)
        if self.archive is not None:
            await asyncio.to_thread(self.archive.close)
        await self.store.close()
