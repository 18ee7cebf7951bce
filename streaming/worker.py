"""`velocity stream`: the faust app. Short on purpose: the semantics live in featurestore/."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import faust
from prometheus_client import Counter

from featurestore.config import RedisSettings, get_settings
from featurestore.definitions import DEFAULT_ALLOWED_LATENESS_MS, DEFAULT_MAX_FUTURE_MS
from featurestore.entity import (
    EntityKeyer,
    install_pan_redaction,
    redact_pans,
    redact_pans_bytes,
    warn_if_default_secret,
)
from featurestore.events import dead_letter
from stores.archive import ArchiveWriter, archive_dir, recover_spools
from stores.kafka_security import check_credentials, faust_app_kwargs
from stores.kafka_topics import KeyHashCache, ensure_topics
from stores.redis_online import DEFAULT_RETENTION_MS, AsyncOnlineStore
from streaming import metrics, stream_reads
from streaming.batch_prep import RawMessage
from streaming.batch_sink import BatchSink
from streaming.faust_lean import LeanDrainApp, RawBytesSchema, WebViewlessMonitor
from streaming.scoring import StreamScorer

log = logging.getLogger(__name__)

#: Batches started and not yet done: one in Redis, the ones before it archiving, scoring and acking.
MAX_BATCHES_IN_FLIGHT = 3

#: A dead letter is tried this many times, each attempt bounded, before it is dropped (see dlq_send).
DLQ_SEND_ATTEMPTS = 4
DLQ_SEND_TIMEOUT_S = 5.0
DLQ_SEND_FAILURES = Counter("velocity_stream_dlq_send_failures_total",
                            "Failed attempts to write a dead letter (each is retried, then dropped)", ["reason"])
DLQ_DROPPED = Counter("velocity_stream_dlq_dropped_total",
                      "Dead letters given up after every attempt failed (logged at ERROR with their source "
                      "partition and offset)", ["reason"])


@dataclass
class StreamConfig:
    group: str = "velocity-stream"
    bootstrap: str = "127.0.0.1:9092"
    topic: str = "transactions"
    dlq_topic: str = "transactions.dlq"
    scores_topic: str = "scores"
    alerts_topic: str = "alerts"
    #: Late fraud labels, archived to the offline label store (streaming/labels.py); "" or no archive: off.
    labels_topic: str = "labels"
    labels_dlq_topic: str = "labels.dlq"
    #: Score each transaction after its window update (needs a current model; without one, it aggregates only).
    score: bool = True
    models_dir: Path | None = None  # the model directory's root (`velocity train`); None: the configured one
    partitions: int = 4
    batch_size: int = 2000
    commit_interval_s: float = 1.0
    #: A killed worker's partitions move to the survivors after this long (Kafka's session timeout).
    session_timeout_s: float = 10.0
    metrics_port: int = 9464
    metrics_host: str = "127.0.0.1"
    offline_dir: Path | None = None  # None: no archive
    archive_roll_bytes: int = 32 << 20
    archive_roll_s: float = 60.0
    redis: RedisSettings = field(default_factory=RedisSettings)
    key_prefix: str | None = None
    allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS
    retention_ms: int = DEFAULT_RETENTION_MS
    entity_secret: str = ""
    datadir: Path = Path(".velocity/faust")


def make_batch_sink(cfg: StreamConfig, dlq_send) -> BatchSink:
    store = AsyncOnlineStore(cfg.redis, prefix=cfg.key_prefix, allowed_lateness_ms=cfg.allowed_lateness_ms,
                             retention_ms=cfg.retention_ms)
    archive = None
    if cfg.offline_dir is not None:
        archive = ArchiveWriter(cfg.offline_dir, roll_bytes=cfg.archive_roll_bytes, roll_seconds=cfg.archive_roll_s)
    return BatchSink(store, EntityKeyer(cfg.entity_secret), dlq_send, archive, max_future_ms=cfg.max_future_ms)


def build_app(cfg: StreamConfig) -> faust.App:
    app = LeanDrainApp(
        cfg.group,
        broker=f"kafka://{cfg.bootstrap}",
        store="memory://",
        web_enabled=False,  # no faust web server, no table views; metrics have their own port
        monitor=WebViewlessMonitor(),
        datadir=str(cfg.datadir / cfg.group),
        topic_partitions=cfg.partitions,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=cfg.commit_interval_s,
        broker_session_timeout=cfg.session_timeout_s,
        broker_heartbeat_interval=max(cfg.session_timeout_s / 3.0, 1.0),
        # Offsets are committed every commit_interval_s; a count-triggered commit would stall the drain loop.
        broker_commit_every=max(50 * cfg.batch_size, 100_000),
        broker_max_poll_records=cfg.batch_size,
        stream_buffer_maxsize=16,  # fetched batches (of up to batch_size records each) waiting for the agent
        stream_recovery_delay=0.0,
        stream_wait_empty=False,  # a rebalance waits for the batches in flight only (see _finish_batches_in_flight)
        producer_acks=-1,
        producer_linger=0.005,
        # Record batches of up to 512 KiB (aiokafka's default: 16 KiB, ~25 scores): fewer batches per request.
        producer_max_batch_size=512 << 10,
        # murmur2 in pure Python was an eighth of a scoring worker's time; each card's hash is remembered.
        producer_partitioner=KeyHashCache(),
        key_serializer="raw",
        value_serializer="raw",
        **faust_app_kwargs(),  # SASL / TLS from VELOCITY_KAFKA_* (stores/kafka_security.py)
    )
    source = app.topic(cfg.topic, schema=RawBytesSchema(key_serializer="raw", value_serializer="raw"))
    dlq = app.topic(cfg.dlq_topic, key_serializer="raw", value_serializer="raw", partitions=cfg.partitions)

    if cfg.labels_topic and cfg.offline_dir is not None:
        from streaming.labels import install as install_label_agent

        install_label_agent(app, cfg)

    async def send_output(topic: str, key: bytes, value: bytes):
        # Straight to the producer (the topics exist: `ensure_topics` at start): faust's Topic.send wraps every
        # message in futures, callbacks and a debug log record that cost more than producing it (bench/RESULTS.md).
        producer = await app.maybe_start_producer()
        return await producer.send(topic, key, value, None, None, None)

    hashes = KeyHashCache()  # the producer's partitioner: a key goes where `send_output` would send it

    async def send_many(topic: str, messages) -> list:
        """Messages (key, value) as one record batch per partition (aiokafka's batch API): `send_output` costs ~20
        us of Python per message (metadata wait, partitioning, a future and an accumulator call each)."""
        producer = (await app.maybe_start_producer())._ensure_producer()  # faust's own send goes through it too
        partitions = list(await producer.partitions_for(topic))  # the order aiokafka hands its partitioner
        batches: dict[int, object] = {}
        sent = []
        for key, value in messages:
            p = hashes(key, partitions, partitions)
            batch = batches.get(p)
            if batch is None:
                batch = batches[p] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it, start the next
                sent.append(await producer.send_batch(batch, topic, partition=p))
                batch = batches[p] = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"a {len(value)}-byte message does not fit an empty record batch")
        for p, batch in batches.items():
            sent.append(await producer.send_batch(batch, topic, partition=p))
        return sent
    rebalances = [0]  # bumped when partitions are revoked: batches taken before that are never written
    in_flight: set[asyncio.Task] = set()  # batch writes not yet acked; a rebalance waits for them

    dlq_log = {"window": 0.0, "lines": 0, "quiet": 0}  # dlq_send's log lines: at most 20 per 10 s

    def dlq_log_allowed() -> bool:
        now = time.monotonic()
        if now - dlq_log["window"] >= 10.0:
            if dlq_log["quiet"]:
                log.warning("%d more dead-letter write failures were not logged in the last 10 s (see "
                            "velocity_stream_dlq_send_failures_total and velocity_stream_dlq_dropped_total)",
                            dlq_log["quiet"])
            dlq_log.update(window=now, lines=0, quiet=0)
        dlq_log["lines"] += 1
        if dlq_log["lines"] > 20:
            dlq_log["quiet"] += 1
            return False
        return True

    async def dlq_send(msg: RawMessage, reason: str, detail: str) -> None:
        """Dead-letter one message; returns once the broker has it, or once it is given up. Never raises.

        The copy is bounded and masked (featurestore.events.dead_letter), so no size, encoding or content stops
        it. A failed send is retried DLQ_SEND_ATTEMPTS times with backoff, each attempt bounded by
        DLQ_SEND_TIMEOUT_S; the later attempts send a smaller copy (1 KiB, then headers only), in case the DLQ
        topic refuses the size. If every attempt fails (the DLQ topic unreachable or refusing), the dead letter
        is dropped: an ERROR log line (masked) names the original's partition and offset in the source topic,
        which keeps it (no time limit), and velocity_stream_dlq_dropped_total counts it. Dropping is the safe
        choice: a dead letter is a diagnostic copy of a message that is not applied (or, for `late`, is archived
        anyway), while waiting for it would stall the partition and every valid event behind it.
        """
        key, value, headers = dead_letter(msg.value, msg.key, reason=reason, detail=detail, topic=cfg.topic,
                                          partition=msg.partition, offset=msg.offset)
        delay = 0.2
        for attempt in range(1, DLQ_SEND_ATTEMPTS + 1):
            if attempt >= DLQ_SEND_ATTEMPTS - 1:  # a smaller copy, in case the DLQ topic refuses the size
                value = value[:1024] if attempt < DLQ_SEND_ATTEMPTS else b""
                if len(value) < len(msg.value or b""):
                    headers = [(k, b"1" if k == "truncated" else v) for k, v in headers]
            try:
                fut = await asyncio.wait_for(
                    dlq.send(key=key, value=value, headers=headers, force=True), DLQ_SEND_TIMEOUT_S)
                await asyncio.wait_for(asyncio.shield(fut), DLQ_SEND_TIMEOUT_S)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                DLQ_SEND_FAILURES.labels(reason).inc()
                what = (f"dead letter of {redact_pans(cfg.topic)}/{msg.partition}/{msg.offset} (reason {reason}, "
                        f"{len(msg.value or b'')} bytes)")
                problem = redact_pans(" ".join(f"{type(exc).__name__}: {exc}".split()))[:300]
                if attempt < DLQ_SEND_ATTEMPTS:
                    if dlq_log_allowed():
                        log.warning("%s not written to %s (attempt %d of %d: %s); retrying in %.1fs", what,
                                    cfg.dlq_topic, attempt, DLQ_SEND_ATTEMPTS, problem, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                DLQ_DROPPED.labels(reason).inc()
                if dlq_log_allowed():
                    log.error("%s DROPPED after %d attempts to write it to %s (%s); the original stays in the source "
                              "topic at that partition and offset. Detail: %s. Starts: %r", what,
                              DLQ_SEND_ATTEMPTS, cfg.dlq_topic, problem, redact_pans(detail)[:200],
                              redact_pans_bytes(bytes((msg.value or b"")[:200])))

    async def write(agg: BatchSink, prepared, events: list, online: asyncio.Future,
                    previous: asyncio.Task | None, scorer: StreamScorer | None) -> None:
        """One batch: Redis (then `online` resolves), archive, DLQ, metrics and scores, then ack in batch order.

        The agent starts the next batch's Redis write as soon as `online` resolves, so this batch's archive and
        metrics work overlaps it; acks wait for the previous batch's, so offsets are acked in order.
        """
        try:
            statuses, visible_ms = await agg.write_online(prepared)
        except asyncio.CancelledError:
            online.cancel()
            raise
        except Exception as exc:
            online.set_exception(exc)
            raise
        online.set_result(None)
        # Two turns of the loop: in the first the agent wakes and starts the next batch's task, in the second that
        # task sends its Redis request; this batch's CPU work runs after, while Redis works on the next one.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        await agg.finish(prepared, statuses, visible_ms)
        if scorer is not None:  # after the window update; the broker has the scores before the batch is acked
            await scorer.score_batch(prepared[1], statuses)
        if previous is not None:
            await previous
        last: dict = {}
        for e in events:
            e.ack()
            last[e.message.tp] = e.message.offset
        consumer = app.consumer
        for tp, offset in last.items():
            high = consumer.highwater(tp)
            if high is not None:
                metrics.LAG.labels(str(tp.partition)).set(max(high - offset - 1, 0))

    @app.agent(source)
    async def aggregate(stream):
        # Batches form from what has arrived: the agent takes fetched record batches until the channel is empty
        # (or batch_size records are taken), then validates them while the previous batch is being written to
        # Redis, and starts their write once Redis has finished that one. Under load batches fill up; when idle,
        # what arrived is written at once. Acks are manual, after the batch is in Redis and archived, so a crash
        # never commits an unprocessed offset. The aggregator lives and dies with the agent: created in the
        # running loop (its asyncio Redis client binds to it) and closed only once the last write is done.
        agg = make_batch_sink(cfg, dlq_send)
        scorer = await make_stream_scorer(cfg, agg, send_output, send_many) if cfg.score else None
        manual = stream.noack()
        arrived = manual.channel.queue
        loop = asyncio.get_running_loop()
        events: list = []
        taken, epoch = 0, rebalances[0]
        started: deque[asyncio.Task] = deque()  # the batches started and not yet awaited here, oldest first
        online: asyncio.Future | None = None  # resolves when the last batch started is in Redis
        try:
            async for _ in manual:
                if rebalances[0] != epoch:
                    # Taken before a rebalance, never written or acked: after a rebalance faust seeks every
                    # assigned partition back to its committed offset, so whoever owns them now reads them again.
                    events, taken, epoch = [], 0, rebalances[0]
                event = manual.current_event  # one partition's records from one fetch (faust_lean.FetchedBatch)
                events.append(event)
                taken += len(event.value)
                if taken < cfg.batch_size and not arrived.empty():
                    continue
                prepared = agg.prepare([RawMessage(r.key, r.value, r.partition, r.offset, r.timestamp)
                                        for e in events for r in e.value])
                if online is not None:
                    await online  # Redis has the previous batch: one batch at a time there, in order
                while len(started) >= MAX_BATCHES_IN_FLIGHT:
                    await started.popleft()  # a failed write surfaces here
                if rebalances[0] == epoch:  # else partitions were revoked while this batch was prepared
                    online = loop.create_future()
                    previous = started[-1] if started else None  # the batch before: this one acks after it
                    task = loop.create_task(write(agg, prepared, events, online, previous, scorer))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    started.append(task)
                    await asyncio.sleep(0)  # the task sends its Redis request now, not after the next batch's prep
                events, taken = [], 0
        finally:
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)
            if scorer is not None:
                await scorer.models.stop()
                if scorer.scorer.reader is not agg.store:
                    await scorer.scorer.reader.close()
            await agg.close()

    @app.on_partitions_revoked.connect
    async def _finish_batches_in_flight(app, revoked, **kwargs) -> None:  # noqa: ARG001 - signal signature
        """Before partitions move, the batches being written complete and are committed.

        Two workers must never apply one card's events at the same time: lateness is judged against the card's
        newest event, so the outcome would depend on which worker got there first. faust's own remedy
        (stream_wait_empty) waits for every message in the agent's channel, which on shutdown can wait forever.
        """
        rebalances[0] += 1
        if in_flight:
            await asyncio.gather(*list(in_flight), return_exceptions=True)
        await app.consumer.commit()
        if revoked:
            log.info("partitions %s revoked: batches in flight are written and offsets committed",
                     sorted(tp.partition for tp in revoked))

    return app


async def make_stream_scorer(cfg: StreamConfig, agg: BatchSink, send, send_many=None) -> StreamScorer:
    """The serving scorer over the worker's own store, with the current model (reloaded when it changes)."""
    from serving.model_source import CurrentModelSource
    from serving.models import ModelWatcher
    from serving.redis_reader import ScriptReader
    from serving.scorer import Scorer

    if cfg.models_dir is None:
        from model.registry import models_dir

        root = models_dir(get_settings().data_dir)
    else:
        root = cfg.models_dir
    watcher = ModelWatcher(CurrentModelSource(root))
    await asyncio.to_thread(watcher.load_now)
    watcher.start()
    # The API's lean transport of the read script where it applies (plain TCP): a third less CPU per score than
    # redis-py's pipeline (bench/RESULTS.md). Same script, same replies.
    reader = None
    if ScriptReader.usable(cfg.redis):
        reader = ScriptReader(cfg.redis, agg.store.keys.prefix, agg.store.registry)
    scorer = Scorer(agg.store, watcher, timeout_s=5.0, registry=agg.store.registry,  # the groups the store keeps
                    reader=reader)
    stream_scorer = StreamScorer(scorer, watcher, send, scores_topic=cfg.scores_topic,
                                 alerts_topic=cfg.alerts_topic, send_many=send_many)
    if stream_reads.usable(agg.store):  # each batch's apply folds its windows: no read per transaction
        agg.windows_ms = stream_scorer.fold.windows_ms
    return stream_scorer


def prepare(cfg: StreamConfig) -> None:
    """Before the worker starts: topics exist, metrics are served, a dead predecessor's spool is archived."""
    (cfg.datadir / cfg.group).mkdir(parents=True, exist_ok=True)
    check_credentials(cfg.bootstrap)  # refused credentials: one clear line now, not a bootstrap timeout later
    labels = (cfg.labels_topic, cfg.labels_dlq_topic) if cfg.labels_topic and cfg.offline_dir is not None else ()
    ensure_topics(cfg.bootstrap, {name: cfg.partitions for name in (cfg.topic, cfg.dlq_topic, cfg.scores_topic,
                                                                     cfg.alerts_topic, *labels)})
    if cfg.offline_dir is not None:
        rows = recover_spools(archive_dir(cfg.offline_dir))
        if rows:
            log.info("archived %d rows left in the spool by a previous worker", rows)
    if cfg.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(cfg.metrics_port, addr=cfg.metrics_host)
        log.info("metrics on http://%s:%d/metrics", cfg.metrics_host, cfg.metrics_port)


def _use_uvloop() -> None:
    """faust spends most of its per-message time in event-loop scheduling; uvloop makes that several times cheaper."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency; keep working without it
        log.warning("uvloop not installed: the worker runs on the default asyncio loop (slower)")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(asyncio.new_event_loop())


def _tune_gc() -> None:
    """Fewer, cheaper collections: the worker allocates a few objects per message and keeps few cycles.

    Objects alive after start-up (modules, the app) are frozen out of every later collection, and generation 0
    is collected every 50,000 allocations instead of 700, so the full collections that would otherwise stall the
    loop for tens of milliseconds (freshness p99) become rare.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


#: How long a thread may hold the GIL while another waits for it (CPython's default: 5 ms).
GIL_SWITCH_INTERVAL_S = 0.001


def _shorten_gil_handoff() -> None:
    """A fetched batch crosses threads: faust runs the Kafka consumer on its own thread and loop, and the agent
    on the main one. While the main thread is busy, the consumer thread waits up to the switch interval for the
    GIL at each step of a fetch, so each hand-off can add several 5 ms waits to an event's freshness. At 1 ms,
    five alternating runs each (bench/RESULTS.md): p99 freshness at 5,000/s 23-40 ms instead of 22-126 ms, the
    same throughput."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


class _Worker(faust.Worker):
    velocity_cfg: StreamConfig | None = None

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        """faust replaces the root logger's handlers when the worker starts (mode's `dictConfig`), dropping the
        PAN-masking filter the CLI put on them: put it back on the new ones. (The masking log-record factory that
        `install_pan_redaction` also installs survives that set-up; this is the second layer.)"""
        super().on_setup_root_logger(logger, level)
        install_pan_redaction()

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        cfg = self.velocity_cfg
        if cfg is not None:  # what this worker does, in one line, once faust's logging is in place
            log.info("stream worker ready: topic %s, group %s, dead letters to %s, Redis %s:%d, archive %s, "
                     "lateness %d ms, future bound %d ms", cfg.topic, cfg.group, cfg.dlq_topic, cfg.redis.host,
                     cfg.redis.port, cfg.offline_dir or "off", cfg.allowed_lateness_ms, cfg.max_future_ms)


def run(cfg: StreamConfig, loglevel: str = "info") -> None:
    """Run the worker until SIGTERM/SIGINT; offsets of processed batches are committed as it goes."""
    install_pan_redaction()  # also when run from Python rather than the CLI
    warn_if_default_secret(cfg.entity_secret, "stream")
    prepare(cfg)
    _use_uvloop()
    if os.environ.get("VELOCITY_STREAM_GC_TUNING", "1") != "0":
        _tune_gc()
    _shorten_gil_handoff()
    try:
        app = build_app(cfg)
        worker = _Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
        worker.velocity_cfg = cfg
        worker.execute_from_commandline()
    finally:
        # faust gives stopping agents about a second before it closes the loop; rolling a large spool can take
        # longer, which left this worker's last rows in the spool until the next start. Every row in the spool
        # was flushed before its batch was acked, so whatever is left is rolled here, after the loop.
        if cfg.offline_dir is not None:
            rows = recover_spools(archive_dir(cfg.offline_dir))
            if rows:
                log.info("archived %d rows left in this worker's spool at shutdown", rows)


def default_config(**overrides) -> StreamConfig:
    s = get_settings()
    base = StreamConfig(
        bootstrap=s.kafka.bootstrap, topic=s.kafka.topic_transactions, dlq_topic=s.kafka.topic_dlq,
        scores_topic=s.kafka.topic_scores, alerts_topic=s.kafka.topic_alerts,
        labels_topic=s.kafka.topic_labels, labels_dlq_topic=s.kafka.topic_labels_dlq,
        partitions=s.kafka.partitions, redis=s.redis, allowed_lateness_ms=s.allowed_lateness_ms,
        retention_ms=s.event_retention_ms,
        max_future_ms=s.max_future_ms,
        entity_secret=s.entity_secret, offline_dir=s.offline_dir, datadir=s.run_dir / "faust",
    )
    for k, v in overrides.items():
        setattr(base, k, v)
    return base


