"""Kafka from the API: the tokenized transaction to `transactions`, and what was served to `scores`.

Kafka is not required for scoring: the producer connects in the background (retrying), a request never waits
longer than `send_timeout_s` for an acknowledgement, and once a send has failed requests stop waiting (they say
`published: false` at once) until a delivery succeeds again. A message reported unpublished may still reach the
broker later; that is harmless because the stream counts each `txn_id` once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

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

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._connect_loop(), name="kafka-connect")

    async def _connect_loop(self) -> None:
        from aiokafka import AIOKafkaProducer

        while self._producer is None:
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=0,
                                        request_timeout_ms=self.request_timeout_ms, client_id="velocity-serve")
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

    def _fail(self, reason: str, detail: str | None = None) -> bool:
        self.failures += 1
        if detail:
            self.last_error = detail
        self._on_failure(reason)
        return False

    async def publish(self, topic: str, key: bytes, value: bytes, timestamp_ms: int | None = None) -> bool:
        """Send and wait (bounded) for the broker's acknowledgement; False when not confirmed."""
        producer = self._producer
        if producer is None:
            return self._fail("kafka_unavailable")
        try:
            async with asyncio.timeout(self.send_timeout_s):
                fut = await producer.send(topic, value, key=key, timestamp_ms=timestamp_ms)
                fut.add_done_callback(self._delivered)
                if not self.healthy:
                    # The broker was failing a moment ago: do not hold the answer for it (the message is queued
                    # and may still get through; a later success marks the producer healthy again).
                    return self._fail("kafka_degraded")
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
        producer = self._producer
        if producer is None:
            return False
        try:
            async with asyncio.timeout(self.send_timeout_s):
                fut = await producer.send(topic, value, key=key)
        except Exception:
            return False
        fut.add_done_callback(self._delivered)
        return True

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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
