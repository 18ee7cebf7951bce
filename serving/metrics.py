"""Prometheus metrics of the scoring API (one registry per app, so several apps can live in one process)."""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.values import MutexValue

#: Request latency buckets (seconds): fine below 10 ms, where the targets are.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5)
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.1, 1.0)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("velocity_api_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("velocity_api_request_seconds", "Time from request start to answer, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("velocity_api_stage_seconds",
                               "Where a score's time goes: parse (body + validation), redis (feature read), "
                               "predict (fold, ratios, row, booster), publish (Kafka acknowledgement)",
                               ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.errors = Counter("velocity_api_errors", "Errors by kind (client input, Redis, model, Kafka, internal)",
                              ["kind"], registry=r)
        self.decisions = Counter("velocity_api_decisions", "Scores by decision", ["decision"], registry=r)
        self.publish_failures = Counter("velocity_api_publish_failures",
                                        "Transactions answered but not confirmed published to Kafka, by reason",
                                        ["reason"], registry=r)
        self.records_dropped = Counter("velocity_api_score_records_dropped",
                                       "Answers not recorded to the scores topic (Kafka down or backlog full)",
                                       registry=r)
        self.model_info = Gauge("velocity_api_model_info", "The model being served (1 for the current version)",
                                ["version"], registry=r)
        self.model_reloads = Counter("velocity_api_model_reloads", "Model loads by outcome (loaded, refused)",
                                     ["outcome"], registry=r)
        self.kafka_up = Gauge("velocity_api_kafka_connected", "1 while the Kafka producer is connected and healthy",
                              registry=r)
        # Bound children: the hot path does no label lookup (and, on the event loop, takes no lock: `lean`).
        self.score_latency = lean(self.latency.labels("/v1/score"))
        self.stage_parse = lean(self.stage.labels("parse"))
        self.stage_redis = lean(self.stage.labels("redis"))
        self.stage_predict = lean(self.stage.labels("predict"))
        self.stage_publish = lean(self.stage.labels("publish"))

    def model_changed(self, outcome: str, model) -> None:
        self.model_reloads.labels(outcome).inc()
        if outcome == "loaded" and model is not None:
            self.model_info.clear()
            self.model_info.labels(model.version).set(1)


class _LeanHistogram:
    """`observe` of a histogram child without its lock, observability check and linear bucket scan (~4.5 us a call
    on the development machine, ~6 per score): the same values, read by the same registry. For the event loop's
    thread only: every hot-path metric is updated there, and scrapes run there too."""

    __slots__ = ("_sum", "_buckets", "_bounds")

    def __init__(self, child) -> None:
        self._sum = child._sum
        self._buckets = child._buckets
        self._bounds = child._upper_bounds

    def observe(self, amount: float) -> None:
        self._sum._value += amount
        self._buckets[bisect_left(self._bounds, amount)]._value += 1


class _LeanCounter:
    """`inc` of a counter child, like `_LeanHistogram`'s observe."""

    __slots__ = ("_value",)

    def __init__(self, child) -> None:
        self._value = child._value

    def inc(self, amount: float = 1) -> None:
        self._value._value += amount


def lean(child):
    """A lock-free stand-in for a counter's or histogram's child (`inc` / `observe`), for the event loop's thread;
    the child itself where prometheus_client keeps its values otherwise (e.g. multiprocess mode)."""
    try:
        if isinstance(child, Histogram) and all(type(v) is MutexValue for v in (child._sum, *child._buckets)):
            return _LeanHistogram(child)
        if isinstance(child, Counter) and type(child._value) is MutexValue:
            return _LeanCounter(child)
    except AttributeError:  # another prometheus_client layout
        pass
    return child
