"""The live dashboard (issue 15 section 4): a page at `/`, fed by server-sent events from the `scores`/`alerts` topics.

- **The page** is one file, `serving/static/dashboard.html` (package data): HTML, CSS and a little JavaScript inline,
  no build step and nothing fetched from anywhere but this API.
- **The feed** is one aiokafka consumer per API process, reading `scores` and `alerts` (no consumer group, nothing
  committed) from their ends, plus the last `backfill` records of each partition so a new page is not empty. It
  runs only while a page is open (and `idle_stop_s` after the last one closes): with no page open the dashboard
  costs the scoring path nothing. While it runs, every record is counted (throughput by source, decisions, the
  score distribution, event-to-score latency) but at most `live_per_s` scores a second are forwarded to pages, so a
  burst of traffic costs the event loop little; the reading is done in chunks with a yield between them.
- **Memory is bounded**: ring buffers of the latest scores and alerts, a 60-second window of counts and latency
  samples, and a bounded queue per page. A page whose queue fills up (a stalled browser) is dropped; its browser
  reconnects by itself and starts again from a fresh snapshot.
- **Kafka down** is a state, not an error: the page says so (and keeps showing the API's own request rate and
  latency, read from its Prometheus histogram in-process), and the feed retries every `retry_s`.
- **Clean disconnects**: a closed tab ends its stream at once (the ASGI `http.disconnect`), and on SIGTERM/SIGINT
  every stream is ended so uvicorn's graceful shutdown does not wait for open pages.

Cards are shown as the first characters of their entity key (a keyed hash); a PAN never reaches this module (the
API tokenizes it at once), and any PAN-like digit run in a displayed string is masked anyway.

Hooked into the app by `install(app, settings)`: routes (outside the OpenAPI schema) and a lifespan merged into the
app's by FastAPI's `include_router`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import signal
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path

import orjson
from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, HTMLResponse, Response
from pydantic_settings import BaseSettings, SettingsConfigDict

from featurestore.config import Settings
from featurestore.entity import redact_pans
from featurestore.events import is_entity_key

log = logging.getLogger(__name__)

#: Score distribution bins over [0, 1].
BINS = 20
#: Window of the throughput series and latency figures (seconds).
WINDOW_S = 60
#: Report figures shown for each model of the training report, in this order (metadata.json `metrics`).
REPORT_METRICS = ("aucpr", "roc_auc", "recall_at_fpr_0_1pct", "recall_at_fpr_1pct", "precision_at_threshold",
                  "recall_at_threshold", "brier")
REPORT_MODELS = {"model": "this model", "original_four": "original system's four features",
                 "amount_only": "amount only", "model_raw": "this model, before calibration"}
_PLOT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}\.png$")
_DIGITS = re.compile(r"[0-9]")


class DashboardSettings(BaseSettings):
    """The dashboard's limits (env VELOCITY_DASHBOARD_*)."""

    model_config = SettingsConfigDict(env_prefix="VELOCITY_DASHBOARD_")

    enabled: bool = True
    #: Latest scores (and, separately, alerts) kept for a page that opens.
    recent: int = 200
    #: Records read back from the end of each partition when the feed starts.
    backfill: int = 20
    max_pages: int = 32
    #: Frames queued for one page before it counts as stalled and is dropped (its browser reconnects).
    page_queue: int = 512
    #: Scores forwarded to pages per second at most (alerts have the same budget of their own); all are counted.
    live_per_s: int = 50
    retry_s: float = 5.0
    connect_timeout_s: float = 5.0
    heartbeat_s: float = 15.0
    #: The consumer stops this long after the last page closed.
    idle_stop_s: float = 30.0
    stats_s: float = 1.0
    probe_s: float = 5.0


# ---------------------------------------------------------------------------------------------- events


def sse_frame(event: str, data: object) -> bytes:
    """One server-sent event (orjson writes no newline, and NaN as null)."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def mask_text(value: object, limit: int = 64) -> str:
    """A string fit for the screen: PAN-like digit runs masked (the product's one rule, `redact_pans`; the API
    and the stream worker already applied it to txn_id), truncated to `limit`."""
    text = redact_pans(str(value)[: limit * 2])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def mask_card(card: object) -> str:
    """An entity key's first 8 characters (it is a keyed hash: nothing about the card can be read from it);
    anything else shows no digit at all."""
    if is_entity_key(card):
        return card[:8] + "…"
    return _DIGITS.sub("*", str(card))[:8] + "…" if card is not None else "?"


def _number(value: object) -> float | None:
    if type(value) in (int, float) and math.isfinite(value):
        return value
    return None


def compact(record: dict, kind: str) -> dict:
    """What a page shows of a `scores`/`alerts` record (SPEC section 6's answer, plus source, ts, scored_at_ms)."""
    features = record.get("features")
    features = features if type(features) is dict else {}
    reasons = record.get("reasons")
    decision = record.get("decision")
    return {
        "kind": kind,
        "txn_id": mask_text(record.get("txn_id", "?")),
        "card": mask_card(record.get("card")),
        "source": mask_text(record.get("source", "?"), 16),
        "amount": _number(features.get("amount")),
        "num_trans_last_10m": _number(features.get("num_trans_last_10m")),
        "amt_ratio1": _number(features.get("amt_ratio1")),
        "amt_ratio2": _number(features.get("amt_ratio2")),
        "count_ratio": _number(features.get("count_ratio")),
        "score": _number(record.get("score")),
        "decision": decision if decision in ("FRAUD", "NOT_FRAUD") else "?",
        "threshold": _number(record.get("threshold")),
        "model_version": mask_text(record.get("model_version", "?"), 40),
        "ts": record.get("ts") if type(record.get("ts")) is int else None,
        "scored_at_ms": record.get("scored_at_ms") if type(record.get("scored_at_ms")) is int else None,
        "published": record.get("published") if type(record.get("published")) is bool else None,
        "reasons": [mask_text(r.get("feature"), 32) for r in reasons[:3] if type(r) is dict]
        if type(reasons) is list else [],
    }


# ---------------------------------------------------------------------------------------------- statistics


def histogram_quantile(bounds: list[float], cumulative: list[float], q: float) -> float | None:
    """Prometheus-style quantile of a cumulative histogram (linear within the bucket); None when empty."""
    total = cumulative[-1] if cumulative else 0
    if total <= 0:
        return None
    rank = q * total
    prev_b, prev_c = 0.0, 0.0
    for b, c in zip(bounds, cumulative, strict=True):
        if c >= rank:
            if math.isinf(b):
                return prev_b
            if c == prev_c:
                return b
            return prev_b + (b - prev_b) * (rank - prev_c) / (c - prev_c)
        prev_b, prev_c = b, c
    return prev_b


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p99": None}
    values.sort()
    n = len(values)
    return {"n": n, "p50": values[(n - 1) // 2], "p99": values[min(n - 1, math.ceil(0.99 * n) - 1)]}


class Stats:
    """Counts of what the feed has seen, and the last minute's throughput and latency. All bounded."""

    def __init__(self, window_s: int = WINDOW_S) -> None:
        self.window_s = window_s
        self.hist = [0] * BINS
        self.decisions = {"FRAUD": 0, "NOT_FRAUD": 0}
        self.sources: dict[str, int] = {}
        self.scores = 0
        self.alerts = 0
        self.shown = 0
        self.bad = 0
        self.per_second: dict[int, dict[str, int]] = {}
        #: (scored_at_ms, source, event time to score in ms), live records only.
        self.lags: deque[tuple[int, str, int]] = deque(maxlen=10_000)
        #: (monotonic time, cumulative bucket counts) of the API's /v1/score latency histogram.
        self._api: deque[tuple[float, list[float]]] = deque()
        self._api_bounds: list[float] = []

    def add(self, ev: dict, now_ms: int) -> None:
        self.scores += 1
        score = ev["score"]
        if score is not None and 0 <= score <= 1:
            self.hist[min(int(score * BINS), BINS - 1)] += 1
        if ev["decision"] in self.decisions:
            self.decisions[ev["decision"]] += 1
        src = ev["source"] if len(self.sources) < 8 or ev["source"] in self.sources else "other"
        self.sources[src] = self.sources.get(src, 0) + 1
        at = ev["scored_at_ms"]
        if at is None or not now_ms - self.window_s * 1000 <= at <= now_ms + 5_000:
            return  # a record from before the window (read back at start): counted, not in the live figures
        second = self.per_second.setdefault(at // 1000, {})
        second[src] = second.get(src, 0) + 1
        if ev["ts"] is not None and 0 <= at - ev["ts"] <= 600_000:
            self.lags.append((at, src, at - ev["ts"]))

    def observe_api(self, metrics, now_mono: float) -> None:
        """Sample the API's request-latency histogram for /v1/score (in-process, no scrape)."""
        if metrics is None:
            return
        bounds, counts = [], []
        with contextlib.suppress(Exception):
            for family in metrics.latency.collect():
                for s in family.samples:
                    if s.name.endswith("_bucket") and s.labels.get("endpoint") == "/v1/score":
                        bounds.append(float(s.labels["le"]))
                        counts.append(s.value)
        if not counts:
            return
        self._api_bounds = bounds
        self._api.append((now_mono, counts))
        while len(self._api) > 2 and self._api[1][0] <= now_mono - self.window_s:
            self._api.popleft()

    def api_latency(self) -> dict:
        if len(self._api) < 2:
            return {"n": 0, "rate": 0.0, "p50_ms": None, "p95_ms": None, "p99_ms": None}
        (t0, c0), (t1, c1) = self._api[0], self._api[-1]
        diff = [b - a for a, b in zip(c0, c1, strict=True)]
        n = diff[-1]
        out = {"n": int(n), "rate": n / max(t1 - t0, 1e-9)}
        for q in (50, 95, 99):
            v = histogram_quantile(self._api_bounds, diff, q / 100)
            out[f"p{q}_ms"] = None if v is None else v * 1000
        return out

    def snapshot(self, now_ms: int) -> dict:
        now_s = now_ms // 1000
        first = now_s - self.window_s
        for sec in [s for s in self.per_second if s < first]:
            del self.per_second[sec]
        names = sorted({src for counts in self.per_second.values() for src in counts} | {"api", "stream"})
        series = {src: [self.per_second.get(sec, {}).get(src, 0) for sec in range(first, now_s)] for src in names}
        rate = {src: sum(v[-10:]) / 10 for src, v in series.items()}
        lags: dict[str, list[float]] = {}
        for at, src, lag in self.lags:
            if at >= now_ms - self.window_s * 1000:
                lags.setdefault(src, []).append(lag)
        return {
            "scores": self.scores, "alerts": self.alerts, "shown": self.shown, "bad": self.bad,
            "decisions": self.decisions, "sources": self.sources, "hist": self.hist,
            "series": series, "series_end_s": now_s, "rate": rate,
            "event_to_score_ms": {src: _percentiles(v) for src, v in lags.items()},
            "api": self.api_latency(),
        }


# ---------------------------------------------------------------------------------------------- pages


class Page:
    """One open page: a bounded queue of frames. Overflow means the browser stalled: it is dropped."""

    __slots__ = ("queue", "closed", "reason")

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(max(size, 2))
        self.closed = False
        self.reason: str | None = None

    def offer(self, frame: bytes) -> bool:
        if self.closed:
            return False
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.close("stalled")
            return False
        return True

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed, self.reason = True, reason
        with contextlib.suppress(asyncio.QueueEmpty):
            if self.queue.full():
                self.queue.get_nowait()
        self.queue.put_nowait(None)

    async def next(self, heartbeat_s: float) -> bytes | None:
        """The next frame, a comment line after `heartbeat_s` of silence, None once closed."""
        try:
            async with asyncio.timeout(heartbeat_s):
                return await self.queue.get()
        except TimeoutError:
            return None if self.closed else b": keep-alive\n\n"


class EventStream(Response):
    """text/event-stream for one page, as a plain ASGI response: ends on the client's disconnect, on a stalled
    queue, and on server shutdown; always unregisters the page."""

    media_type = "text/event-stream"

    def __init__(self, dashboard: Dashboard) -> None:  # no Response.__init__: it would add a content-length
        self.dashboard = dashboard
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]

    async def __call__(self, scope, receive, send) -> None:
        dash = self.dashboard
        page = dash.subscribe()
        if page is None:
            body = orjson.dumps({"error": "unavailable", "field": None, "reason": "too_many_pages",
                                 "detail": f"at most {dash.cfg.max_pages} dashboard pages at once (or shutting down)"})
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"10")]})
            await send({"type": "http.response.body", "body": body})
            return

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    page.close("disconnected")
                    return

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": dash.hello_frame(), "more_body": True})
            while True:
                frame = await page.next(dash.cfg.heartbeat_s)
                if frame is None:
                    break
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            if page.reason != "disconnected":
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-write
            pass
        finally:
            watcher.cancel()
            dash.unsubscribe(page)


# ---------------------------------------------------------------------------------------------- the dashboard


class _Waiting(Exception):
    """Kafka answers but the topics do not exist yet."""


class _Reassign(Exception):
    """A topic that was missing exists now: assign again."""


class Dashboard:
    """The feed (one Kafka consumer, run while pages are open), its statistics, and the open pages."""

    def __init__(self, app: FastAPI, settings: Settings, cfg: DashboardSettings | None = None) -> None:
        self.app = app
        self.settings = settings
        self.cfg = cfg or DashboardSettings()
        kafka = settings.kafka
        self.bootstrap = kafka.bootstrap
        self.topic_scores, self.topic_alerts = kafka.topic_scores, kafka.topic_alerts
        self.pages: set[Page] = set()
        self.recent: deque[dict] = deque(maxlen=self.cfg.recent)
        self.recent_alerts: deque[dict] = deque(maxlen=self.cfg.recent)
        self.stats = Stats()
        self.state, self.detail = "idle", "no page open"
        self._task: asyncio.Task | None = None
        self._last_page = time.monotonic()
        self._closing = False
        self._next_offset: dict = {}
        self._tps: list = []
        self._missing: list[str] = []
        self._budget = {"score": [0, 0], "alert": [0, 0]}  # kind -> [second, forwarded in it]
        self._next_stats = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- pages

    def subscribe(self) -> Page | None:
        if self._closing or len(self.pages) >= self.cfg.max_pages:
            return None
        page = Page(self.cfg.page_queue)
        self.pages.add(page)
        self._last_page = time.monotonic()
        if self._task is None or self._task.done():
            self.state, self.detail = "connecting", f"connecting to Kafka at {self.bootstrap}"
            self._task = asyncio.get_running_loop().create_task(self._run(), name="dashboard-feed")
        return page

    def unsubscribe(self, page: Page) -> None:
        page.close(page.reason or "closed")
        self.pages.discard(page)
        self._last_page = time.monotonic()

    def close_pages(self, reason: str) -> None:
        for page in list(self.pages):
            page.close(reason)
        self.pages.clear()

    def broadcast(self, frame: bytes) -> None:
        for page in list(self.pages):
            if not page.offer(frame):
                self.pages.discard(page)

    def hello_frame(self) -> bytes:
        """The first frame of a stream: the reconnection delay, the state, the latest scores and alerts."""
        return b"retry: 3000\n\n" + sse_frame("hello", {"status": self.status(), "recent": list(self.recent)[-100:],
                                   "alerts": list(self.recent_alerts)[-50:], "stats": self._stats(),
                                   "model": self._model_brief()})

    # -- state

    def status(self) -> dict:
        return {"state": self.state, "detail": self.detail, "bootstrap": self.bootstrap,
                "topics": [self.topic_scores, self.topic_alerts], "pages": len(self.pages)}

    def _set_state(self, state: str, detail: str) -> None:
        if (state, detail) == (self.state, self.detail):
            return
        if state == "unavailable" and self.state != "unavailable":
            log.warning("dashboard feed: Kafka at %s unavailable (%s); retrying every %g s", self.bootstrap,
                        detail, self.cfg.retry_s)
        self.state, self.detail = state, detail
        self.broadcast(sse_frame("status", self.status()))

    def _idle(self) -> bool:
        if self._closing:
            return True
        return not self.pages and time.monotonic() - self._last_page >= self.cfg.idle_stop_s

    def _model_brief(self) -> dict:
        watcher = getattr(self.app.state, "watcher", None)
        model = getattr(watcher, "current", None)
        return {"version": getattr(model, "version", None), "threshold": getattr(model, "threshold", None),
                "problem": getattr(watcher, "problem", None)}

    def _stats(self) -> dict:
        return {**self.stats.snapshot(time.time_ns() // 1_000_000), "model": self._model_brief()}

    def _tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_stats:
            return
        self._next_stats = now + self.cfg.stats_s
        self.stats.observe_api(getattr(self.app.state, "metrics", None), now)
        if self.pages:
            self.broadcast(sse_frame("stats", self._stats()))

    # -- the feed

    def _forward(self, kind: str, ev: dict) -> None:
        budget = self._budget[kind]
        second = int(time.monotonic())
        if budget[0] != second:
            budget[0], budget[1] = second, 0
        if budget[1] >= self.cfg.live_per_s or not self.pages:
            return
        budget[1] += 1
        self.stats.shown += 1
        self.broadcast(sse_frame(kind, ev))

    def ingest(self, topic: str, value: bytes | None, now_ms: int) -> None:
        try:
            record = orjson.loads(value) if value is not None else None
        except orjson.JSONDecodeError:
            record = None
        if type(record) is not dict:
            self.stats.bad += 1
            return
        if topic == self.topic_alerts:
            ev = compact(record, "alert")
            self.stats.alerts += 1
            self.recent_alerts.append(ev)
            self._forward("alert", ev)
        else:
            ev = compact(record, "score")
            self.stats.add(ev, now_ms)
            self.recent.append(ev)
            self._forward("score", ev)

    async def _run(self) -> None:
        from aiokafka import AIOKafkaConsumer

        from stores.kafka_security import aiokafka_kwargs

        try:
            while not self._idle():
                consumer = AIOKafkaConsumer(
                    bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                    auto_offset_reset="latest", client_id="velocity-dashboard", fetch_max_wait_ms=100,
                    request_timeout_ms=int(self.cfg.connect_timeout_s * 1000) + 1000,
                    retry_backoff_ms=500, metadata_max_age_ms=30_000, **aiokafka_kwargs())
                retry = True
                try:
                    self._set_state("connecting", f"connecting to Kafka at {self.bootstrap}")
                    await asyncio.wait_for(consumer.start(), self.cfg.connect_timeout_s)
                    await self._assign(consumer)
                    await self._pump(consumer)
                except _Reassign:
                    retry = False
                except _Waiting as exc:
                    self._set_state("waiting", str(exc))
                except Exception as exc:
                    self._set_state("unavailable", _one_line(exc) if not isinstance(exc, TimeoutError)
                                    else f"no answer within {self.cfg.connect_timeout_s:g} s")
                finally:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(consumer.stop(), 5)
                if retry and not self._idle():
                    await self._wait(self.cfg.retry_s)
        finally:
            self._task = None
            if not self._closing:
                self.state, self.detail = "idle", "no page open"

    async def _wait(self, seconds: float) -> None:
        """Sleep before a retry, still sending statistics (the API's own latency needs no Kafka)."""
        end = time.monotonic() + seconds
        while not self._idle() and time.monotonic() < end:
            self._tick()
            await asyncio.sleep(min(0.25, max(end - time.monotonic(), 0)))

    async def _assign(self, consumer) -> None:
        from aiokafka import TopicPartition

        partitions = await self._partitions()
        tps, missing = [], []
        for topic in (self.topic_scores, self.topic_alerts):
            if not partitions.get(topic):
                missing.append(topic)
                continue
            tps += [TopicPartition(topic, p) for p in partitions[topic]]
        if not tps:
            raise _Waiting(f"Kafka at {self.bootstrap} is up; waiting for topics {', '.join(missing)} to be created")
        consumer.assign(tps)
        end = await asyncio.wait_for(consumer.end_offsets(tps), self.cfg.connect_timeout_s)
        begin = await asyncio.wait_for(consumer.beginning_offsets(tps), self.cfg.connect_timeout_s)
        for tp in tps:
            start = max(begin[tp], end[tp] - self.cfg.backfill)
            known = self._next_offset.get((tp.topic, tp.partition))
            if known is not None:  # a reconnect: carry on where it stopped, unless that is far behind
                start = max(start, min(known, end[tp]))
            consumer.seek(tp, start)
        self._tps, self._missing = tps, missing
        note = f" (topic {', '.join(missing)} not created yet)" if missing else ""
        self._set_state("live", f"reading {', '.join(sorted({tp.topic for tp in tps}))} from Kafka at "
                                f"{self.bootstrap}{note}")
        self._tick(force=True)

    async def _partitions(self) -> dict[str, list[int]]:
        """Every topic's partitions (a consumer only knows the metadata of topics it already reads)."""
        from aiokafka.admin import AIOKafkaAdminClient

        from stores.kafka_security import aiokafka_kwargs

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="velocity-dashboard",
                                    request_timeout_ms=int(self.cfg.connect_timeout_s * 1000), **aiokafka_kwargs())
        try:
            await asyncio.wait_for(admin.start(), self.cfg.connect_timeout_s)
            described = await asyncio.wait_for(admin.describe_topics(), self.cfg.connect_timeout_s)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(admin.close(), 5)
        return {d["topic"]: sorted(p["partition"] for p in d.get("partitions", ()))
                for d in described if d.get("error_code") == 0}

    async def _pump(self, consumer) -> None:
        next_probe = time.monotonic() + self.cfg.probe_s
        while not self._idle():
            batches = await consumer.getmany(timeout_ms=250, max_records=500)
            now_ms = time.time_ns() // 1_000_000
            for tp, records in batches.items():
                for r in records:
                    self.ingest(tp.topic, r.value, now_ms)
                self._next_offset[(tp.topic, tp.partition)] = records[-1].offset + 1
                await asyncio.sleep(0)  # let requests in between partitions' chunks
            self._tick()
            if time.monotonic() >= next_probe:
                await self._probe(consumer)
                next_probe = time.monotonic() + self.cfg.probe_s

    async def _probe(self, consumer) -> None:
        """Is the broker still answering? (The consumer reconnects by itself; this only keeps the state honest.)"""
        try:
            await asyncio.wait_for(consumer.end_offsets(self._tps), 3)
            if self._missing:
                existing = await asyncio.wait_for(consumer.topics(), 3)
                if set(self._missing) & existing:
                    raise _Reassign()
        except _Reassign:
            raise
        except Exception as exc:
            self._set_state("unavailable", _one_line(exc) if not isinstance(exc, TimeoutError)
                            else "the broker stopped answering")
            return
        if self.state != "live":
            self._set_state("live", f"reading {', '.join(sorted({tp.topic for tp in self._tps}))} from Kafka at "
                                    f"{self.bootstrap}")

    # -- life cycle

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self._loop = asyncio.get_running_loop()
        restore = self._chain_exit_signals()
        try:
            yield
        finally:
            restore()
            await self.stop()

    def _chain_exit_signals(self):
        """uvicorn waits for open responses before its lifespan shutdown, and a page's stream never ends by
        itself: on SIGTERM/SIGINT end every stream first, then hand the signal to uvicorn's handler."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        installed = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue

            def handler(signum, frame, previous=previous):
                with contextlib.suppress(RuntimeError):  # the loop is closed already
                    self._loop.call_soon_threadsafe(self._shutdown_pages)
                previous(signum, frame)

            signal.signal(sig, handler)
            installed[sig] = (handler, previous)

        def restore() -> None:
            for sig, (handler, previous) in installed.items():
                if signal.getsignal(sig) is handler:
                    signal.signal(sig, previous)

        return restore

    def _shutdown_pages(self) -> None:
        self._closing = True
        self.close_pages("shutdown")

    async def stop(self) -> None:
        self._shutdown_pages()
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 6)
        self.state, self.detail = "stopped", "the API is shutting down"

    # -- the model's report

    def _models_root(self) -> Path:
        watcher = getattr(self.app.state, "watcher", None)
        root = getattr(getattr(watcher, "source", None), "root", None)
        if root is None:
            from model.registry import models_dir

            root = models_dir(self.settings.data_dir)
        return Path(root)

    def model_folder(self, version: str | None) -> Path | None:
        if not version or version.startswith(".") or "/" in version or "\\" in version:
            return None
        folder = self._models_root() / version
        return folder if folder.is_dir() else None

    def model_report(self) -> dict:
        """The current model and its training report's figures (from its metadata.json), for the page."""
        brief = self._model_brief()
        if brief["version"] is None:
            return {"loaded": False, **brief}
        folder = self.model_folder(brief["version"])
        meta = _metadata(folder / "metadata.json", _mtime(folder / "metadata.json")) if folder else {}
        metrics = meta.get("metrics") if type(meta.get("metrics")) is dict else {}
        table = []
        for name in [*REPORT_MODELS, *(k for k in metrics if k not in REPORT_MODELS)]:
            split = metrics.get(name, {}).get("test") if type(metrics.get(name)) is dict else None
            if type(split) is dict:
                table.append({"model": name, "label": REPORT_MODELS.get(name, name.replace("_", " ")),
                              **{m: _number(split.get(m)) for m in REPORT_METRICS},
                              "rows": split.get("rows"), "frauds": split.get("frauds")})
        plots = sorted(p.name for p in (folder / "plots").glob("*.png")) if folder and (folder / "plots").is_dir() \
            else []
        rule = meta.get("threshold_rule")
        calibration = meta.get("calibration")
        return {
            "loaded": True, **brief,
            "features": list(getattr(getattr(getattr(self.app.state, "watcher", None), "current", None), "features",
                                     ()) or ()),
            "created_at": meta.get("created_at"), "training_window": meta.get("training_window"),
            "split": {k: v for k, v in (meta.get("split") or {}).items() if k in ("train", "validation", "test")},
            "device": meta.get("device"), "imbalance": _named(meta.get("imbalance")),
            "threshold_rule": rule.get("description") if type(rule) is dict else None,
            "calibration": calibration.get("method") if type(calibration) is dict else None,
            "metrics": table, "plots": [p for p in plots if _PLOT_NAME.match(p)],
            "report": bool(folder and (folder / "report.md").is_file()),
            "live": live_quality(self.settings.data_dir / "monitor" / "report.json"),
        }


def live_quality(path: Path) -> dict | None:
    """The latest `velocity monitor` report, in brief (None when it never ran): precision and recall of the
    decisions against the labels known, the last days, and each feature's PSI with the alert."""
    report = _metadata(path, _mtime(path))
    if not report.get("days") and not report.get("drift"):
        return None
    total = report.get("total") if type(report.get("total")) is dict else {}
    drift = report.get("drift") if type(report.get("drift")) is dict else {}
    return {"as_of": report.get("as_of"), "model_version": report.get("model_version"),
            "precision": _number(total.get("precision")), "recall": _number(total.get("recall")),
            "days": [{k: d.get(k) for k in ("day", "decisions", "frauds_known", "precision", "recall")}
                     for d in (report.get("days") or [])[-7:] if type(d) is dict],
            "psi": {k: _number(v.get("psi")) for k, v in drift.items() if type(v) is dict},
            "psi_threshold": _number(report.get("psi_threshold")), "drifted": list(report.get("drifted") or [])}


def _named(value: object) -> str | None:
    """A metadata entry that is a name, or a record with one."""
    if type(value) is dict:
        value = value.get("name")
    return None if value is None else str(value)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


@lru_cache(maxsize=8)
def _metadata(path: Path, mtime_ns: int) -> dict:
    """metadata.json (Python's json reads the NaN it may hold), cached per file version."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if type(meta) is dict else {}


@cache
def page_html() -> bytes:
    return resources.files("serving").joinpath("static", "dashboard.html").read_bytes()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------- the hook


def install(app: FastAPI, settings: Settings) -> Dashboard | None:
    """Add the dashboard to the API: `/` (the page), `/dashboard/events` (SSE), `/dashboard/model` (the current
    model's report figures) and its plots; the feed's life cycle joins the app's lifespan."""
    cfg = DashboardSettings()
    if not cfg.enabled:
        return None
    dash = Dashboard(app, settings, cfg)
    router = APIRouter(lifespan=dash.lifespan, include_in_schema=False)

    @router.get("/", response_class=HTMLResponse)
    async def dashboard_page():
        return HTMLResponse(page_html(), headers={"Cache-Control": "no-cache"})

    @router.get("/dashboard/events")
    async def dashboard_events():
        return EventStream(dash)

    @router.get("/dashboard/model")
    async def dashboard_model():
        report = await asyncio.to_thread(dash.model_report)
        return Response(orjson.dumps(report), media_type="application/json", headers={"Cache-Control": "no-cache"})

    @router.get("/dashboard/model/plots/{name}")
    async def dashboard_plot(name: str):
        folder = dash.model_folder(dash._model_brief()["version"])
        path = folder / "plots" / name if folder is not None and _PLOT_NAME.match(name) else None
        if path is None or not path.is_file():
            return Response(orjson.dumps({"error": "not_found", "field": "name", "reason": "no_such_plot",
                                          "detail": "no such plot for the current model"}),
                            status_code=404, media_type="application/json")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-cache"})

    app.include_router(router)
    app.state.dashboard = dash
    return dash
