"""Prometheus metrics of the stream worker (served on --metrics-port)."""

from __future__ import annotations

import collections

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("velocity_stream_events_total", "Messages processed, by outcome",
                 ["outcome"])  # applied, late, duplicate, invalid
DLQ = Counter("velocity_stream_dlq_total", "Messages sent to the dead-letter topic, by reason", ["reason"])
BATCHES = Histogram("velocity_stream_batch_seconds", "Time to process one batch (Redis, archive, DLQ)",
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
BATCH_SIZE = Histogram("velocity_stream_batch_size", "Messages per batch",
                       buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000))
FRESHNESS = Histogram(
    "velocity_stream_freshness_seconds",
    "Event produced (Kafka timestamp) to visible in Redis, for live events",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5),
)
FRESHNESS_P99 = Gauge("velocity_stream_freshness_p99_ms", "p99 freshness over the last 20,000 live events")
EVENTS_PER_S = Gauge("velocity_stream_events_per_second", "Messages per second over the last 5 s")
LAG = Gauge("velocity_stream_consumer_lag", "Messages behind the log end, per partition", ["partition"])
ARCHIVED = Counter("velocity_stream_archived_rows_total", "Rows appended to the archive spool")

#: A message whose Kafka timestamp is older than this is a replay of history, not live: no freshness sample.
LIVE_HORIZON_MS = 60_000


class RateWindow:
    """Events/s over a sliding time window, fed per batch."""

    def __init__(self, span_s: float = 5.0) -> None:
        self.span = span_s
        self.points: collections.deque[tuple[float, int]] = collections.deque()
        self.total = 0

    def add(self, now_s: float, n: int) -> float:
        self.total += n
        self.points.append((now_s, self.total))
        while self.points and now_s - self.points[0][0] > self.span:
            self.points.popleft()
        t0, c0 = self.points[0]
        return (self.total - c0) / (now_s - t0) if now_s > t0 else 0.0


class Reservoir:
    """The last N freshness samples, for an exact recent p99 (histogram buckets are too coarse for a target)."""

    def __init__(self, size: int = 20_000) -> None:
        self.samples: collections.deque[float] = collections.deque(maxlen=size)

    def extend(self, values) -> None:
        self.samples.extend(values)

    def p99(self) -> float:
        if not self.samples:
            return float("nan")
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
