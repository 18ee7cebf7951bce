"""Kafka from the API: the tokenized transaction to `transactions`, and what was served to `scores`.

Kafka is not required for scoring: the producer connects in the background (retrying), and a request never
waits longer than `send_timeout_s` for it. A scored transaction is (`publish()` says which):

- "published": handed to a producer whose deliveries succeed (the default of `velocity serve`: the answer does not
  wait for the broker), or, with `wait=True`, acknowledged by the broker within `send_timeout_s`;
- "queued": not published yet, but held by the API (serving/spill.py: a bounded memory queue, then spill files) and
  published, in hold order, by a background task once Kafka is back. While anything is held, every new message
  joins the hold behind it, so a card's transactions reach Kafka in the order they were answered. A handed-over
  message whose delivery fails afterwards (the broker went away) is held too (`kafka_delivery`);
- "dropped": the broker refused the message for good (e.g. too large: `kafka_rejected`), or the hold is full.

Nothing held is lost while the spill folder has room; a message can be published twice (a delivery that timed out
may still have reached the broker; a batch in flight when a process died is sent again), which is harmless
because the stream counts each `txn_id` once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from serving.spill import HoldQueue, Message
from stores.kafka_topics import KeyHashCache

log = logging.getLogger(__name__)

PUBLISHED, QUEUED, DROPPED = "published", "queued", "dropped"
#: Refusals that no retry cures: the message is dropped (counted) rather than held at the head of the queue.
_REJECTED = ("MessageSizeTooLargeError", "RecordTooLargeError", "RecordListTooLargeError", "InvalidTopicError",
             "CorruptRecordException", "UnsupportedForMessageFormatError")


def _rejected(exc: BaseException) -> bool:
    return type(exc).__name__ in _REJECTED


class Publisher:
    """An aiokafka producer that may be down: its state is reported, never required; what it cannot publish is
    held and republished in order."""

    def __init__(self, bootstrap: str, *, send_timeout_s: float = 0.5, retry_s: float = 5.0,
                 request_timeout_ms: int = 5_000, on_failure: Callable[[str], None] | None = None,
                 hold: HoldQueue | None = None, security: dict | None = None, drain_batch: int = 500,
                 explain_failure: Callable[[], str | None] | None = None, linger_ms: int = 0) -> None:
        self.bootstrap = bootstrap
        #: Handed-over messages (wait=False) gather here for `linger_ms` and reach the producer together, so that
        #: one produce request carries every partition's batch (the producer's own linger is per partition: at
        #: 500/s over 4 partitions it made about one request per message). 0: straight to the producer.
        self.linger_ms = linger_ms
        self._pending: list[Message] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task] = set()
        self._flush_lock = asyncio.Lock()  # one flush at a time: a later one never overtakes an earlier one
        self.send_timeout_s = send_timeout_s
        self.retry_s = retry_s
        self.request_timeout_ms = request_timeout_ms
        self.state = "connecting"  # connecting | connected | unavailable | stopped
        self.healthy = False  # the last delivery (or the connection) succeeded
        self.last_error: str | None = None
        self.failures = 0
        self.republished = 0
        self.rejected = 0
        self.hold = hold if hold is not None else HoldQueue(None)
        self.security = security or {}
        self.drain_batch = drain_batch
        self._explain = explain_failure  # a clearer line than aiokafka's "unable to bootstrap" (e.g. bad credentials)
        self._producer = None
        self._task: asyncio.Task | None = None
        self._drain_task: asyncio.Task | None = None
        self._on_failure = on_failure or (lambda reason: None)
        self._partitioner = KeyHashCache()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.hold.adopt()  # spill files an earlier process left
        self._task = loop.create_task(self._connect_loop(), name="kafka-connect")
        self._drain_task = loop.create_task(self._drain_loop(), name="kafka-republish")

    async def _connect_loop(self) -> None:
        from aiokafka import AIOKafkaProducer

        while self._producer is None:
            # No linger of its own: the messages of one flush leave in one request (see `linger_ms` above).
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=0,
                                        request_timeout_ms=self.request_timeout_ms, client_id="velocity-serve",
                                        partitioner=self._partitioner, **self.security)
            try:
                await asyncio.wait_for(producer.start(), timeout=max(self.request_timeout_ms / 1000, 1.0))
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await producer.stop()
                why = _one_line(exc)
                if self._explain is not None:
                    with contextlib.suppress(Exception):
                        why = await asyncio.to_thread(self._explain) or why
                if self.state != "unavailable" or self.last_error != why:
                    log.warning("Kafka at %s unavailable (%s): scores are answered, and held for Kafka; retrying "
                                "every %g s", self.bootstrap, why, self.retry_s)
                self.state, self.last_error = "unavailable", why
                await asyncio.sleep(self.retry_s)
                continue
            self._producer = producer
            self.state, self.healthy, self.last_error = "connected", True, None
            log.info("Kafka producer connected to %s", self.bootstrap)

    def _delivered(self, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            self.healthy = True
        elif not _rejected(exc):
            self.healthy, self.last_error = False, _one_line(exc)

    def _delivery_of(self, msg: Message) -> Callable[[asyncio.Future], None]:
        """A handed-over message's delivery: if it fails, the message is held (or, refused for good, counted)."""
        def done(fut: asyncio.Future) -> None:
            self._delivered(fut)
            if fut.cancelled() or fut.exception() is None:
                return
            exc = fut.exception()
            if _rejected(exc):
                self._reject(exc)
            else:
                self._fail("kafka_delivery")
                self.hold.put(msg)
        return done

    def _fail(self, reason: str, detail: str | None = None) -> None:
        self.failures += 1
        if detail:
            self.last_error = detail
        self._on_failure(reason)

    def _reject(self, exc: BaseException) -> str:
        self.rejected += 1
        self._fail("kafka_rejected", _one_line(exc))
        return DROPPED

    def _hold(self, msg: Message, reason: str, detail: str | None = None) -> str:
        self._fail(reason, detail)
        return QUEUED if self.hold.put(msg) != "dropped" else DROPPED

    async def publish(self, topic: str, key: bytes, value: bytes, timestamp_ms: int | None = None, *,
                      wait: bool = True) -> str:
        """PUBLISHED, QUEUED (held; published once Kafka is back) or DROPPED (refused for good, or hold full).
        With `wait`, PUBLISHED means acknowledged (waited for at most `send_timeout_s`); without, handed over (to
        the producer, within `linger_ms`)."""
        msg = (topic, key, value, timestamp_ms)
        if self._producer is None or not self.healthy or self.hold.depth:
            return self._hold_behind_pending(msg)
        if self.linger_ms and not wait:
            self._pending.append(msg)
            if self._flush_timer is None:
                self._flush_timer = asyncio.get_running_loop().call_later(self.linger_ms / 1000, self._flush_soon)
            return PUBLISHED
        if self._pending:  # handed over earlier: they go first
            await self._flush()
            if self._producer is None or not self.healthy or self.hold.depth:
                return self._hold_behind_pending(msg)
        return await self._hand_over(msg, wait)

    def _hold_behind_pending(self, msg: Message) -> str:
        """Hold `msg` (the producer is down or degraded, or older messages are held), behind any handed-over
        message not yet given to the producer: a card's transactions stay in answer order."""
        reason = "kafka_unavailable" if self._producer is None else "kafka_degraded"
        pending, self._pending = self._pending, []
        for earlier in pending:
            self._hold(earlier, reason)
        return self._hold(msg, reason)

    async def _hand_over(self, msg: Message, wait: bool) -> str:
        topic, key, value, timestamp_ms = msg
        fut = None
        try:
            async with asyncio.timeout(self.send_timeout_s):  # send() itself waits while the buffer is full
                fut = await self._producer.send(topic, value, key=key, timestamp_ms=timestamp_ms)
                fut.add_done_callback(self._delivery_of(msg))
                if wait:
                    await asyncio.shield(fut)
            return PUBLISHED
        except TimeoutError:
            self.healthy = False
            detail = f"no acknowledgement within {self.send_timeout_s:g} s"
            if fut is None:  # never reached the producer
                return self._hold(msg, "kafka_timeout", detail)
            self._fail("kafka_timeout", detail)  # still in the producer; held if its delivery fails
            return QUEUED
        except Exception as exc:
            if fut is not None:  # its delivery failed: the callback held or counted it
                return DROPPED if _rejected(exc) else QUEUED
            if _rejected(exc):
                return self._reject(exc)
            self.healthy = False
            return self._hold(msg, "kafka_error", _one_line(exc))

    def _flush_soon(self) -> None:
        self._flush_timer = None
        task = asyncio.get_running_loop().create_task(self._flush())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        """Give the handed-over messages to the producer, in order; one that fails is held or counted as when
        published alone, and those after it are published as if they came now (held while degraded)."""
        async with self._flush_lock:
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
            pending, self._pending = self._pending, []
            producer, done = self._producer, 0
            if producer is not None and self.healthy and not self.hold.depth:
                loop = asyncio.get_running_loop()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.send_timeout_s) as budget:
                        for msg in pending:
                            fut = await producer.send(msg[0], msg[2], key=msg[1], timestamp_ms=msg[3])
                            fut.add_done_callback(self._delivery_of(msg))
                            done += 1
                            if done % 16 == 0:
                                budget.reschedule(loop.time() + self.send_timeout_s)
            for msg in pending[done:]:  # the first one failed (or the producer is down): one by one, as publish()
                if self._producer is None or not self.healthy or self.hold.depth:
                    self._hold(msg, "kafka_unavailable" if self._producer is None else "kafka_degraded")
                else:
                    await self._hand_over(msg, False)

    async def _drain_loop(self) -> None:
        """Republish what is held, oldest first, once the producer is up; each batch waits for its
        acknowledgements before it is forgotten."""
        adopted_at = time.monotonic()
        while True:
            hold, producer = self.hold, self._producer
            with contextlib.suppress(OSError):
                hold.sync()  # spilled lines reach the disk within VELOCITY_SERVE_SPILL_FSYNC_S
            if not hold.depth or producer is None:
                if not hold.depth and time.monotonic() - adopted_at > 5.0:
                    adopted_at = time.monotonic()
                    with contextlib.suppress(Exception):
                        hold.adopt()  # files of an API process that died meanwhile (a directory listing)
                await asyncio.sleep(0.1)
                continue
            try:
                ok = await self._drain_once(producer)
            except Exception as exc:  # never let the republisher die
                log.exception("republishing held transactions")
                self.last_error, ok = _one_line(exc), False
            if not ok:
                await asyncio.sleep(min(self.retry_s, 1.0))

    async def _drain_once(self, producer) -> bool:
        batch = self.hold.peek(self.drain_batch)
        futs: list[asyncio.Future | None] = []
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.request_timeout_ms / 1000):
                for msg in batch:
                    if msg is None:  # an unreadable spill line: nothing to send
                        futs.append(None)
                        continue
                    topic, key, value, ts = msg
                    fut = await producer.send(topic, value, key=key, timestamp_ms=ts)
                    fut.add_done_callback(_retrieve)  # a late failure is handled below or by the next round
                    futs.append(fut)
        pending = [f for f in futs if f is not None]
        if pending:  # asyncio.wait: a timeout does not cancel them (a message in the producer may still go)
            await asyncio.wait(pending, timeout=self.request_timeout_ms / 1000 + 1.0)
        done = 0
        sent = 0
        for fut in futs:
            if fut is not None:
                if not fut.done() or fut.cancelled():
                    break
                exc = fut.exception()
                if exc is not None and not _rejected(exc):
                    self.healthy, self.last_error = False, _one_line(exc)
                    break
                if exc is not None:
                    self._reject(exc)
                else:
                    sent += 1
            done += 1
        self.hold.commit(done)
        self.republished += sent
        if done == len(batch) and batch:
            self.healthy, self.last_error = True, None
            if not self.hold.depth:
                log.info("republished everything held for Kafka (%d in all)", self.republished)
            return True
        return False

    async def send_nowait(self, topic: str, key: bytes, value: bytes) -> bool:
        """Queue a message without waiting for the broker (audit records); False when it cannot be queued."""
        return await self.send_many_nowait(topic, [(key, value)]) == 1

    async def send_many_nowait(self, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> int:
        """Queue (key, value) messages without waiting for the broker; how many were queued (in order), each
        within `send_timeout_s` (all of them unless the producer is down or its buffer stays full). Not held:
        these are the audit records of `scores`, counted when dropped."""
        producer = self._producer
        if producer is None or not messages:
            return 0
        queued = 0
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.send_timeout_s) as budget:
                for key, value in messages:
                    fut = await producer.send(topic, value, key=key)
                    queued += 1
                    fut.add_done_callback(self._delivered)
                    if queued % 16 == 0:
                        budget.reschedule(loop.time() + self.send_timeout_s)
                        await asyncio.sleep(0)  # a send rarely suspends: let requests in between
        except Exception:
            pass
        return queued

    def report(self) -> dict:
        return {"state": self.state if self.healthy or self.state != "connected" else "degraded",
                "bootstrap": self.bootstrap, "publish_failures": self.failures, "last_error": self.last_error,
                "held": {**self.hold.report(), "republished": self.republished, "rejected": self.rejected}}

    async def stop(self, drain_s: float = 2.0) -> None:
        """Stop; what is still held is given `drain_s` to reach Kafka, then stays in spill files for the next
        process."""
        for task in (self._task, self._drain_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for task in list(self._flushes):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self._flush()  # handed over, not yet given to the producer: now (or held, if it is down)
        if self._producer is not None:
            with contextlib.suppress(Exception):  # TimeoutError included: the rest stays held, in spill files
                async with asyncio.timeout(drain_s):
                    while self.hold.depth and await self._drain_once(self._producer):
                        pass
            t0 = time.monotonic()
            with contextlib.suppress(Exception):
                # Long enough for the producer's own expiry: a handed-over message that fails meanwhile is held.
                await asyncio.wait_for(self._producer.stop(), timeout=self.request_timeout_ms / 1000 + 3)
            log.debug("producer stopped in %.2f s", time.monotonic() - t0)
            self._producer = None
        self.hold.close()
        self.state = "stopped"


def _retrieve(fut: asyncio.Future) -> None:
    """Mark a republished message's outcome as seen (asyncio would log every unretrieved failure at exit)."""
    if not fut.cancelled():
        fut.exception()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
