"""One batch of the stream worker: validate, update windows in Redis, archive, dead-letter, count.

Order matters for delivery guarantees: the Redis write (idempotent) and the archive append (deduplicated on
read) and the DLQ sends all complete before `process` returns, and faust only acknowledges (and later commits)
a batch's offsets after that. A worker killed at any point is therefore redelivered the uncommitted batch and
reapplies it without double counting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from featurestore.archive import ArchiveWriter, roll_spool
from featurestore.entity import EntityKeyer
from featurestore.online import ApplyStatus, AsyncOnlineStore
from featurestore.stream_batch import RawMessage, archive_rows, prepare_batch
from streaming import metrics

log = logging.getLogger(__name__)

DlqSend = Callable[[RawMessage, str, str], Awaitable[None]]


@dataclass
class BatchResult:
    applied: int = 0
    late: int = 0
    duplicate: int = 0
    invalid: int = 0


class Aggregator:
    def __init__(self, store: AsyncOnlineStore, keyer: EntityKeyer, dlq_send: DlqSend,
                 archive: ArchiveWriter | None = None, max_backoff_s: float = 5.0) -> None:
        self.store = store
        self.keyer = keyer
        self.dlq_send = dlq_send
        self.archive = archive
        self.max_backoff_s = max_backoff_s
        self.rate = metrics.RateWindow()
        self.freshness = metrics.Reservoir()
        self._rolls: set[asyncio.Task] = set()

    async def _apply_with_retry(self, writes) -> list[ApplyStatus]:
        """Redis unavailable is not a reason to drop or skip a batch: retry with backoff until it is back."""
        delay = 0.1
        while True:
            try:
                return await self.store.apply_events(writes)
            except (OSError, ConnectionError, TimeoutError) as exc:
                log.warning("online store write failed (%s); retrying in %.1fs", exc, delay)
            except Exception as exc:  # redis-py raises its own ConnectionError/TimeoutError types
                if "Connection" not in type(exc).__name__ and "Timeout" not in type(exc).__name__:
                    raise
                log.warning("online store write failed (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)

    def prepare(self, messages: Sequence[RawMessage]):
        """CPU-only half of a batch; the worker runs it while Redis still works on the previous one."""
        return messages, prepare_batch(messages, self.keyer), time.perf_counter()

    async def process(self, messages: Sequence[RawMessage]) -> BatchResult:
        return await self.apply(self.prepare(messages))

    async def apply(self, prepared) -> BatchResult:
        """Redis write, archive append and DLQ sends of a prepared batch; returns once all are done."""
        return await self.finish(prepared, *await self.write_online(prepared))

    async def write_online(self, prepared) -> tuple[list[ApplyStatus], float]:
        """The Redis half of `apply`: window writes (retried until Redis takes them); returns statuses, when visible."""
        _, batch, _ = prepared
        statuses = await self._apply_with_retry(batch.writes) if batch.writes else []
        return statuses, time.time() * 1000.0

    async def finish(self, prepared, statuses: Sequence[ApplyStatus], visible_ms: float) -> BatchResult:
        """The rest of `apply`: archive, DLQ sends and metrics. May overlap the next batch's `write_online`."""
        messages, batch, started = prepared
        result = BatchResult(invalid=len(batch.rejects))
        sends = []
        for msg, exc in batch.rejects:
            sends.append(self.dlq_send(msg, exc.reason, exc.detail))
            metrics.DLQ.labels(exc.reason).inc()
        for src, status in zip(batch.sources, statuses, strict=True):
            if status == ApplyStatus.APPLIED:
                result.applied += 1
            elif status in (ApplyStatus.LATE, ApplyStatus.DUPLICATE_LATE):
                result.late += status == ApplyStatus.LATE
                result.duplicate += status == ApplyStatus.DUPLICATE_LATE
                # Redelivered late events are dead-lettered again: at-least-once, never lost.
                sends.append(self.dlq_send(src, "late", "event time behind the card's newest event by more "
                                           "than the allowed lateness"))
                metrics.DLQ.labels("late").inc()
            else:
                result.duplicate += 1
        if self.archive is not None and batch.writes:
            rows = archive_rows(batch, statuses, int(visible_ms))
            self.archive.append(rows)
            metrics.ARCHIVED.inc(len(rows))
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
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(roll_spool, spool, self.archive.root))
        self._rolls.add(task)
        task.add_done_callback(self._rolls.discard)

    async def close(self) -> None:
        if self._rolls:
            await asyncio.gather(*self._rolls, return_exceptions=True)
        if self.archive is not None:
            await asyncio.to_thread(self.archive.close)
        await self.store.close()
