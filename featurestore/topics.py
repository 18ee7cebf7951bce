"""Kafka topics of the product, created with the configured partition count when missing."""

from __future__ import annotations

import contextlib
import logging

from featurestore.config import KafkaSettings

log = logging.getLogger(__name__)


def ensure_topics(bootstrap: str, topics: dict[str, int], timeout_ms: int = 15_000) -> list[str]:
    """Create each topic (name -> partitions) that does not exist yet; return the names created."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(name, parts, 1) for name, parts in topics.items() if name not in existing]
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
    return {settings.topic_transactions: n, settings.topic_dlq: n, settings.topic_scores: n, settings.topic_alerts: n}
