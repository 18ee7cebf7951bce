"""Stream worker throughput and freshness against the real broker and Redis.

    .venv/bin/python -m bench.bench_stream [--events 400000] [--rate 5000] [--seconds 30]

Phase 0 (ceiling): the same N events applied to Redis from a bare synchronous loop, no Kafka (pre-built window
writes, the worker's batch size, the worker's Lua script): the Redis-bound ceiling the worker is compared with.
Phase 1 (throughput): pre-produce N transactions to a fresh 4-partition topic, start one `velocity stream`
worker process, and time from its first processed event to the last (sustained events/s, one process).
Phase 2 (freshness): a paced producer sends live events (Kafka timestamp = send time) at a fixed rate; the
worker's own metric reports event-produced -> visible-in-Redis p99 over the run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import orjson
from kafka import KafkaProducer

from bench.results import update
from featurestore.entity import EntityKeyer
from stores.kafka_topics import ensure_topics

REPO = Path(__file__).resolve().parent.parent
BOOT = os.environ.get("VELOCITY_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
SECRET = "bench-secret"


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_metrics(port: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            metric(port, "velocity_stream_events_total")
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("worker metrics never came up")


def producer() -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=BOOT, acks="all", linger_ms=5, batch_size=512 * 1024,
                         compression_type="lz4", max_in_flight_requests_per_connection=5)


def messages(n: int, cards: int, t0: int, keyer: EntityKeyer, live: bool = False):
    """As Velocity's producers send them: keyed by entity key, with `card` and `pan_last4`, never the PAN."""
    pans = [f"4{i:015d}" for i in range(cards)]
    keys = [keyer(p) for p in pans]
    for i in range(n):
        c = i % cards
        ts = int(time.time() * 1000) if live else t0 + i * 50
        v = orjson.dumps({"txn_id": f"b{t0}-{i}", "card": keys[c], "pan_last4": pans[c][-4:],
                          "amount": round(5 + (i % 97) * 1.37, 2), "ts": ts, "merchant": "m",
                          "category": "grocery_pos"})
        yield keys[c].encode(), v, ts


def redis_ceiling(n: int, cards: int, keyer: EntityKeyer, prefix: str, batch: int = 2000) -> float:
    """Events/s of the worker's Redis writes from a bare loop: same events, same Lua, same batch size, no Kafka."""
    from featurestore.state import EventWrite
    from stores.redis_online import OnlineStore

    pans = [f"4{i:015d}" for i in range(cards)]
    keys = [keyer(p) for p in pans]
    writes = [EventWrite(keys[i % cards], f"c-{i}", 1_600_000_000_000 + i * 50, 500 + i % 9_700) for i in range(n)]
    store = OnlineStore(prefix=prefix)
    try:
        start = time.perf_counter()
        for i in range(0, n, batch):
            store.apply_events(writes[i:i + batch])
        return n / (time.perf_counter() - start)
    finally:
        store.close()


def start_worker(topic: str, prefix: str, port: int, offline: Path, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "VELOCITY_ENTITY_SECRET": SECRET}
    cmd = [str(REPO / ".venv/bin/velocity"), "stream", "--topic", topic, "--dlq-topic", f"{topic}.dlq",
           "--group", f"bench-{topic}", "--key-prefix", prefix, "--metrics-port", str(port),
           "--offline-dir", str(offline), "--log-level", "warning", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(offline / "worker.log", "w"))


def clean_up(topic: str, prefix: str, offline: Path) -> None:
    """Leave the developer's Redis and Kafka as they were: a run writes ~1M keys and two topics."""
    import shutil

    import redis
    from kafka import KafkaAdminClient

    from featurestore.config import RedisSettings
    from stores.redis_online import delete_prefix

    client = redis.Redis(**RedisSettings().client_kwargs())
    delete_prefix(client, prefix)
    client.close()
    admin = KafkaAdminClient(bootstrap_servers=BOOT)
    try:
        admin.delete_topics([topic, f"{topic}.dlq", f"{topic}.warmup"])
    finally:
        admin.close()
    shutil.rmtree(offline / "archive", ignore_errors=True)  # worker.log stays for a look afterwards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--cards", type=int, default=10_000)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--port", type=int, default=9480)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--worker-arg", action="append", default=[], help="extra `velocity stream` argument (repeatable)")
    args = ap.parse_args()

    run = uuid.uuid4().hex[:8]
    topic, prefix = f"bench.stream.{run}", f"bench:{run}"
    offline = REPO / "bench" / "out" / f"stream-{run}"
    offline.mkdir(parents=True, exist_ok=True)
    ensure_topics(BOOT, {topic: 4, f"{topic}.dlq": 4, f"{topic}.warmup": 1})
    keyer = EntityKeyer(SECRET)

    print(f"ceiling: {args.events:,} events from a bare loop into Redis ...", flush=True)
    ceiling = redis_ceiling(args.events, args.cards, keyer, f"{prefix}:ceiling")
    print(f"ceiling: {ceiling:,.0f} events/s (Redis writes alone, same script and batch size)", flush=True)

    print(f"producing {args.events:,} events to {topic} ...", flush=True)
    prod = producer()
    for k, v, ts in messages(args.events, args.cards, 1_600_000_000_000, keyer):
        prod.send(topic, key=k, value=v, timestamp_ms=ts)
    prod.flush()

    worker = start_worker(topic, prefix, args.port, offline, args.worker_arg)
    try:
        wait_metrics(args.port)
        first = None
        deadline = time.monotonic() + 600
        while True:
            if time.monotonic() > deadline:
                raise SystemExit(f"worker stalled at {metric(args.port, 'velocity_stream_events_total'):,.0f} events")
            n = metric(args.port, "velocity_stream_events_total")
            now = time.perf_counter()
            if n > 0 and first is None:
                first, n_first = now, n
            if n >= args.events:
                break
            if worker.poll() is not None:
                raise SystemExit("worker died; see " + str(offline / "worker.log"))
            time.sleep(0.25)  # scraping /metrics costs the worker CPU: do not poll it hard
        tps = (args.events - n_first) / (now - first)
        print(f"throughput: {tps:,.0f} events/s (one worker process, {args.events:,} events, {args.cards:,} cards); "
              f"{tps / ceiling:.2f}x the bare-loop ceiling", flush=True)

        print(f"freshness: live events at {args.rate}/s for {args.seconds}s ...", flush=True)
        live = KafkaProducer(bootstrap_servers=BOOT, acks=1, linger_ms=1)
        # A new producer's first sends wait for metadata and a connection while their timestamps are already set:
        # warm it up on a side topic so that wait is not counted as the worker's freshness.
        live.send(f"{topic}.warmup", value=b"warm-up").get(timeout=30)
        gen = messages(args.rate * args.seconds, args.cards, int(time.time() * 1000), keyer, live=True)
        start = time.perf_counter()
        for i, (k, v, _) in enumerate(gen):
            due = start + i / args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            live.send(topic, key=k, value=v)  # timestamp = now (CreateTime)
        live.flush()
        sent_s = time.perf_counter() - start
        target = args.events + args.rate * args.seconds
        end = time.monotonic() + 60
        while metric(args.port, "velocity_stream_events_total") < target and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(1.5)  # the worker refreshes its exact p99 gauge once a second
        p99 = metric(args.port, "velocity_stream_freshness_p99_ms")
        text = urllib.request.urlopen(f"http://127.0.0.1:{args.port}/metrics", timeout=5).read().decode()
        buckets = {float(m.group(1)): float(m.group(2)) for m in
                   re.finditer(r'velocity_stream_freshness_seconds_bucket\{le="([0-9.e+-]+)"\} ([0-9.e+]+)', text)}
        print(f"freshness p99 (all {args.rate * args.seconds:,} live events): {p99:.1f} ms at {args.rate * args.seconds / sent_s:,.0f}/s "
              f"achieved send rate; histogram: {json.dumps(buckets)}")
        if not args.no_record:
            update(stream_tps=round(tps), stream_freshness_p99_ms_at_5k=round(p99, 1),
                   stream_redis_ceiling_tps=round(ceiling), stream_vs_redis_ceiling=round(tps / ceiling, 2))
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        clean_up(topic, prefix, offline)


if __name__ == "__main__":
    sys.exit(main())
