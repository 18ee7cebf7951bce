"""The stream worker's label archiver: topic `labels` -> the offline label store (stores/labels.py).

An agent of the worker's faust app (its own topic and channel, the same consumer group). It takes label
messages in batches (what has arrived, up to the batch size), validates each (featurestore.label_events: txn_id a
non-empty bounded string, fraud_label 0 or 1, labeled_at epoch ms in range and at most the future bound ahead of
the worker's clock), appends the valid ones to the label store with `write_labels` and only then acknowledges
the batch. A bad message goes to `labels.dlq` (a bounded, masked copy with the reason in its headers, like
`transactions.dlq`), is counted, and never stops the agent.

Delivery is at-least-once: a worker killed between the write and the commit archives the batch again when the
messages are redelivered. A duplicate label version is harmless: versions are resolved by `txn_id`, the latest
`labeled_at` winning (stores.labels.latest_labels_sql), and two identical versions resolve to the same label.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from prometheus_client import Counter, Gauge

from featurestore.entity import EntityKeyer, redact_pans
from featurestore.events import InvalidEvent, dead_letter
from featurestore.label_events import parse_label
from stores.labels import write_labels
from streaming.batch_prep import RawMessage
from streaming.faust_lean import RawBytesSchema

log = logging.getLogger(__name__)

LABELS = Counter("velocity_stream_labels_total", "Label messages processed, by outcome", ["outcome"])  # archived, invalid
LABELS_DLQ = Counter("velocity_stream_labels_dlq_total", "Label messages sent to the labels dead-letter topic, by "
                     "reason", ["reason"])
LABELS_DLQ_DROPPED = Counter("velocity_stream_labels_dlq_dropped_total",
                             "Label dead letters given up after every attempt to write them failed")
LABELS_WRITE_FAILURES = Counter("velocity_stream_labels_write_failures_total",
                                "Failed attempts to append a batch to the label store (retried until it succeeds)")
LABELS_NEWEST = Gauge("velocity_stream_labels_newest_labeled_at_seconds",
                      "labeled_at of the newest label archived by this worker (Unix time)")

DLQ_ATTEMPTS = 3
DLQ_TIMEOUT_S = 5.0


def prepare_labels(messages: Sequence[RawMessage], keyer: Callable[[str], str], now_ms: int,
                   max_future_ms: int) -> tuple[list[dict], list[tuple[RawMessage, InvalidEvent]]]:
    """Split a batch into valid labels (in arrival order) and rejects with their reason."""
    good, bad = [], []
    for msg in messages:
        try:
            good.append(parse_label(msg.value, keyer, now_ms, max_future_ms))
        except InvalidEvent as exc:
            bad.append((msg, exc))
    return good, bad


def install(app, cfg) -> None:
    """Register the label agent on the worker's faust app (`cfg`: streaming.worker.StreamConfig)."""
    source = app.topic(cfg.labels_topic, schema=RawBytesSchema(key_serializer="raw", value_serializer="raw"))
    dlq = app.topic(cfg.labels_dlq_topic, key_serializer="raw", value_serializer="raw", partitions=cfg.partitions)
    keyer = EntityKeyer(cfg.entity_secret)

    async def dead_letter_one(msg: RawMessage, exc: InvalidEvent) -> None:
        """Send one bounded, masked copy with its reason; retried a few times, then dropped and counted. Never raises."""
        key, value, headers = dead_letter(msg.value, msg.key, reason=exc.reason, detail=exc.detail,
                                          topic=cfg.labels_topic, partition=msg.partition, offset=msg.offset)
        for attempt in range(1, DLQ_ATTEMPTS + 1):
            try:
                fut = await asyncio.wait_for(dlq.send(key=key, value=value, headers=headers, force=True),
                                             DLQ_TIMEOUT_S)
                await asyncio.wait_for(asyncio.shield(fut), DLQ_TIMEOUT_S)
                return
            except asyncio.CancelledError:
                raise
            except Exception as problem:
                if attempt < DLQ_ATTEMPTS:
                    await asyncio.sleep(0.2 * attempt)
                    continue
                LABELS_DLQ_DROPPED.inc()
                log.error("label dead letter of %s/%d/%d (reason %s) dropped after %d attempts: %s",
                          redact_pans(cfg.labels_topic), msg.partition, msg.offset, exc.reason, DLQ_ATTEMPTS,
                          redact_pans(f"{type(problem).__name__}: {problem}")[:300])

    async def archive(labels: list[dict]) -> None:
        """Append to the label store, retried with backoff until it succeeds (nothing is acked before)."""
        delay = 0.5
        while True:
            try:
                await asyncio.to_thread(write_labels, cfg.offline_dir, labels)
                return
            except Exception as exc:  # a full or read-only disk: keep the batch, say so, try again
                LABELS_WRITE_FAILURES.inc()
                log.error("cannot append %d labels to the label store under %s (%s); retrying in %.1fs",
                          len(labels), cfg.offline_dir, redact_pans(f"{type(exc).__name__}: {exc}")[:300], delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    @app.agent(source, name="velocity-labels")
    async def archive_labels(stream):
        manual = stream.noack()
        arrived = manual.channel.queue
        events: list = []
        taken = 0
        async for _ in manual:
            event = manual.current_event  # one partition's records from one fetch (faust_lean.FetchedBatch)
            events.append(event)
            taken += len(event.value)
            if taken < cfg.batch_size and not arrived.empty():
                continue
            messages = [RawMessage(r.key, r.value, r.partition, r.offset, r.timestamp) for e in events for r in e.value]
            good, bad = prepare_labels(messages, keyer, time.time_ns() // 1_000_000, cfg.max_future_ms)
            if good:
                await archive(good)
                LABELS.labels("archived").inc(len(good))
                LABELS_NEWEST.set(max(g["labeled_at"] for g in good) / 1000.0)
            if bad:
                for _msg, exc in bad:
                    LABELS_DLQ.labels(exc.reason).inc()
                LABELS.labels("invalid").inc(len(bad))
                await asyncio.gather(*(dead_letter_one(m, e) for m, e in bad))
            for e in events:
                e.ack()
            events, taken = [], 0
