"""Kafka topics of the product, created with the configured partition count when missing."""

from __future__ import annotations

import contextlib
import logging

from aiokafka.partitioner import DefaultPartitioner, murmur2

from featurestore.config import KafkaSettings

log = logging.getLogger(__name__)


def topic_configs(retention_ms: int = -1) -> dict[str, str]:
    """Per-topic settings for topics that carry event-time timestamps (see KafkaSettings.topic_retention_ms)."""
    return {"retention.ms": str(retention_ms)}


def ensure_topics(bootstrap: str, topics: dict[str, int], timeout_ms: int = 15_000,
                  retention_ms: int | None = None) -> list[str]:
    """Create each topic (name -> partitions) that does not exist yet; return the names created.

    Existing topics are left as they are. New ones get `topic_configs` (retention from the settings unless given).
    """
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    from stores.kafka_security import kafka_python_kwargs

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms, **kafka_python_kwargs())
    try:
        existing = set(admin.list_topics())
        if retention_ms is None:
            retention_ms = KafkaSettings().topic_retention_ms
        configs = topic_configs(retention_ms)
        missing = [NewTopic(name, parts, 1, topic_configs=configs) for name, parts in topics.items()
                   if name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another process won the race
                admin.create_topics(missing)
            log.info("created topics %s", ", ".join(t.name for t in missing))
        return [t.name for t in missing]
    finally:
        admin.close()


def product_topics(settings: KafkaSettings) -> dict[str, int]:
    """Every topic the product uses; the DLQ and outputs get the same partitioning as the input."""
    n = settings.partitions
    return {settings.topic_transactions: n, settings.topic_dlq: n, settings.topic_scores: n, settings.topic_alerts: n,
            settings.topic_labels: n, settings.topic_labels_dlq: n}


def read_range(consumer, starts: dict, ends: dict, timeout_s: float) -> list[bytes | None]:
    """The values of a kafka-python consumer's messages in [starts[tp], ends[tp]) of each partition, as polled.

    For readers of a topic up to its end as of a moment (`velocity consistency`, `velocity monitor`): messages
    produced after `ends` was taken are left out. Raises TimeoutError saying how many partitions were not read to
    their end within `timeout_s`.
    """
    import time

    todo = [tp for tp in starts if starts[tp] < ends[tp]]
    values: list[bytes | None] = []
    if not todo:
        return values
    consumer.assign(todo)
    for tp in todo:
        consumer.seek(tp, starts[tp])
    deadline = time.monotonic() + timeout_s
    while todo and time.monotonic() < deadline:
        for tp, msgs in consumer.poll(timeout_ms=500, max_records=10_000).items():
            values.extend(m.value for m in msgs if m.offset < ends[tp])
        todo = [tp for tp in todo if consumer.position(tp) < ends[tp]]
    if todo:
        raise TimeoutError(f"{len(todo)} partition(s) not read to their end")
    return values


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
