"""Kafka from the API: the tokenized transaction to `transactions`, and what was served to `scores`.

Kafka is not required for scoring: the producer connects in the background (retrying), and a request never
waits longer than `send_timeout_s` for it. Two ways to publish a scored transaction (`publish(wait=...)`):

- handed over (the default of `velocity serve`): the message is queued on a producer whose deliveries succeed, and
  the answer does not wait for the broker (a Kafka round trip, and its tail, stay out of the request's latency).
  A delivery that fails afterwards is counted (`kafka_delivery`), marks the producer unhealthy and is reported in
  /readyz; while unhealthy, answers say `published: false` until a delivery succeeds again.
- acknowledged (`wait=True`): the answer waits, at most `send_timeout_s`, for the broker's acknowledgement.

A message reported unpublished may still reach the broker later; that is harmless because the stream counts each
`txn_id` once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from aiokafka.partitioner import DefaultPartitioner, murmur2

log = logging.getLogger(__name__)


class Publisher:
    """An aiokafka producer that may be down: its state is reported, never required."""

    def __init__(self, bootstrap: str, *, send_timeout_s: float = 0.5, retry_s: float = 5.0,
                 request_timeout_ms: int = 5_000, on_failure: Callable[[str], None] | None = None) -> None:
        self.bootstrap = bootstrap
        self.send_timeout_s = send_timeout_s
        self.retry_s = retry_s
        self.request_timeout_ms = request_timeout_ms
        self.state = "connecting"  # connecting | connected | unavailable | stopped
        self.healthy = False  # the last delivery (or the connection) succeeded
        self.last_error: str | None = None
        self.failures = 0
        self._producer = None
        self._task: asyncio.Task | None = None
        self._on_failure = on_failure or (lambda reason: None)
        self._partitioner = KeyHashCache()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._connect_loop(), name="kafka-connect")

    async def _connect_loop(self) -> None:
        from aiokafka import AIOKafkaProducer

        while self._producer is None:
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=0,
                                        request_timeout_ms=self.request_timeout_ms, client_id="velocity-serve",
                                        partitioner=self._partitioner)
            try:
                await asyncio.wait_for(producer.start(), timeout=max(self.request_timeout_ms / 1000, 1.0))
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await producer.stop()
                if self.state != "unavailable" or self.last_error != _one_line(exc):
                    log.warning("Kafka at %s unavailable (%s): scores are answered but not published; retrying "
                                "every %g s", self.bootstrap, _one_line(exc), self.retry_s)
                self.state, self.last_error = "unavailable", _one_line(exc)
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
        else:
            self.healthy, self.last_error = False, _one_line(exc)

    def _delivered_unwatched(self, fut: asyncio.Future) -> None:
        """A handed-over message's delivery: a failure nobody waits for is still counted."""
        self._delivered(fut)
        if not fut.cancelled() and fut.exception() is not None:
            self._fail("kafka_delivery")

    def _fail(self, reason: str, detail: str | None = None) -> bool:
        self.failures += 1
        if detail:
            self.last_error = detail
        self._on_failure(reason)
        return False

    async def publish(self, topic: str, key: bytes, value: bytes, timestamp_ms: int | None = None, *,
                      wait: bool = True) -> bool:
        """Send; with `wait`, wait (bounded) for the broker's acknowledgement. False when not published: Kafka
        unavailable, failing a moment ago, or (with `wait`) no acknowledgement in time."""
        producer = self._producer
        if producer is None:
            return self._fail("kafka_unavailable")
        try:
            async with asyncio.timeout(self.send_timeout_s):  # send() itself waits while the buffer is full
                fut = await producer.send(topic, value, key=key, timestamp_ms=timestamp_ms)
                fut.add_done_callback(self._delivered if wait else self._delivered_unwatched)
                if not self.healthy:
                    # The broker was failing a moment ago: do not hold the answer for it (the message is queued
                    # and may still get through; a later success marks the producer healthy again).
                    return self._fail("kafka_degraded")
                if wait:
                    await asyncio.shield(fut)
            return True
        except TimeoutError:
            self.healthy = False
            return self._fail("kafka_timeout", f"no acknowledgement within {self.send_timeout_s:g} s")
        except Exception as exc:
            self.healthy = False
            return self._fail("kafka_error", _one_line(exc))

    async def send_nowait(self, topic: str, key: bytes, value: bytes) -> bool:
        """Queue a message without waiting for the broker (audit records); False when it cannot be queued."""
        return await self.send_many_nowait(topic, [(key, value)]) == 1

    async def send_many_nowait(self, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> int:
        """Queue (key, value) messages without waiting for the broker; how many were queued (in order), each
        within `send_timeout_s` (all of them unless the producer is down or its buffer stays full)."""
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
                "bootstrap": self.bootstrap, "publish_failures": self.failures, "last_error": self.last_error}

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._producer is not None:
            t0 = time.monotonic()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), timeout=5)
            log.debug("producer stopped in %.2f s", time.monotonic() - t0)
            self._producer = None
        self.state = "stopped"


class KeyHashCache:
    """aiokafka's default partitioner (the Java client's murmur2 of the key) with each key's hash remembered: the
    pure-Python murmur2 costs ~20-60 us a message, and the API sees the same cards again and again."""

    def __init__(self, max_size: int = 200_000) -> None:
        self._hashes: dict[bytes, int] = {}
        self._max = max_size

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return DefaultPartitioner()(key, all_partitions, available)
        h = self._hashes.get(key)
        if h is None:
            if len(self._hashes) >= self._max:
                self._hashes.clear()
            h = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return all_partitions[h % len(all_partitions)]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
