"""Stream worker throughput and freshness against the real broker and Redis, with the Redis ceiling in the same run.

    .venv/bin/python -m bench.bench_stream [--events 400000] [--rate 5000] [--seconds 30] [--reference 3d3ed2b]

Phase 0 (ceiling): the same N events applied to Redis from a bare synchronous loop, no Kafka (pre-built window
writes, the worker's batch size, the worker's Lua script): the Redis-bound ceiling the worker is compared with.
Run alternately with the apply script of `--reference` (a git revision; default: the last one before the
per-card hash layout) on the same events, so the before/after ceilings share the machine's state; each run's
Redis CPU per event (INFO cpu of the whole server: other clients' work counts too) is printed beside it.
Phase 1 (throughput): pre-produce N transactions to a fresh 4-partition topic, start one `velocity stream`
worker process (scoring off: this is the aggregation figure), and time from its first processed event to the
last (sustained events/s, one process); then one more ceiling run of the current script, so drift in the
machine's speed shows. The ratio is the worker against the median of the current script's ceiling runs.
Phase 2 (freshness): a paced producer sends live events (Kafka timestamp = send time) at a fixed rate; the
worker's own metric reports event-produced -> visible-in-Redis p99 over the run. Then the reference: the same
producer at the same rate into another topic read by a bare consumer in its own process (`bench.kafka_freshness`,
no processing): Kafka's own share of the freshness on the day's machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import orjson
import redis
from kafka import KafkaProducer

from bench.results import update
from featurestore.config import RedisSettings
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
    """As Velocity's producers send them: keyed by entity key, with `card` and `pan_last4`, never the PAN.

    The txn_id holds no 13+ digit run (the run's start time in hex): Velocity's producers mask PAN-like runs
    before sending, so ids like "b1600000000000-7" would make the worker's PAN masking run on every event, a
    cost no real stream from Velocity's producers has.
    """
    pans = [f"4{i:015d}" for i in range(cards)]
    keys = [keyer(p) for p in pans]
    for i in range(n):
        c = i % cards
        ts = int(time.time() * 1000) if live else t0 + i * 50
        v = orjson.dumps({"txn_id": f"b{t0:x}-{i}", "card": keys[c], "pan_last4": pans[c][-4:],
                          "amount": round(5 + (i % 97) * 1.37, 2), "ts": ts, "merchant": "m",
                          "category": "grocery_pos"})
        yield keys[c].encode(), v, ts


def redis_cpu_s(client) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def reference_script(rev: str) -> str | None:
    """The apply script as of a git revision (None when git or the revision is not there)."""
    try:
        return subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:stores/lua/apply_events.lua"], check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def reference_apply(store, text: str):
    """`store.apply_events` through an older apply script (ARGV of the 3-keys-per-card layout: prefix, lateness,
    retention, ttl, window, now_ms, now_us, events as a JSON list of [card, txn_id, ts, cents])."""
    from featurestore.definitions import CARD_AGG_10M
    from stores.redis_online import applied_outcomes

    script = store.redis.register_script(text)

    def apply(chunk):
        packed = orjson.dumps([(e.card, e.txn_id, str(e.ts), str(e.amount_cents)) for e in chunk])
        now_ns = time.time_ns()
        return applied_outcomes(script(keys=[], args=[store.keys.prefix, store.lateness, store.retention,
                                              CARD_AGG_10M.ttl_s, CARD_AGG_10M.window_ms, now_ns // 1_000_000,
                                              now_ns // 1_000, packed]))
    return apply


def ceiling_writes(n: int, cards: int, keyer: EntityKeyer) -> list:
    from featurestore.state import EventWrite

    keys = [keyer(f"4{i:015d}") for i in range(cards)]
    return [EventWrite(keys[i % cards], f"c-{i}", 1_600_000_000_000 + i * 50, 500 + i % 9_700) for i in range(n)]


def redis_ceiling(writes: list, prefix: str, batch: int = 2000, script: str | None = None) -> tuple[float, float]:
    """Events/s of the worker's Redis writes from a bare loop (same events, Lua, batch size; no Kafka), and Redis's
    CPU per event meanwhile (us). `script`: an older apply script's text instead of the current one."""
    from stores.redis_online import OnlineStore, delete_prefix

    store = OnlineStore(prefix=prefix)
    apply = store.apply_events if script is None else reference_apply(store, script)
    probe = redis.Redis(**RedisSettings().client_kwargs())
    try:
        cpu0, start = redis_cpu_s(probe), time.perf_counter()
        for i in range(0, len(writes), batch):
            apply(writes[i:i + batch])
        elapsed, cpu = time.perf_counter() - start, redis_cpu_s(probe) - cpu0
        return len(writes) / elapsed, cpu / len(writes) * 1e6
    finally:
        delete_prefix(store.redis, prefix)
        store.close()
        probe.close()


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_s() -> tuple[float, float]:
    """(busy, stolen): CPU seconds every core of this machine spent busy (not idle, not waiting on I/O), and those
    the hypervisor took for others (`steal`: on a shared VM the source of much of its noise), since boot (Linux
    /proc/stat). Over a phase, with the worker's and Redis's own, they say what the broker and the rest took."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in
                                                               Path("/proc/stat").read_text().split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3]) + f" on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def start_worker(topic: str, prefix: str, port: int, offline: Path, extra: list[str],
                 code: Path | None = None) -> subprocess.Popen:
    """`velocity stream` over `topic`; `code`: run another copy of the code (an A/B reference) instead of this one."""
    env = {**os.environ, "VELOCITY_ENTITY_SECRET": SECRET}
    if code is not None:  # ahead of the editable install on sys.path
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(code), env.get("PYTHONPATH")) if p)
    cmd = [str(REPO / ".venv/bin/velocity"), "stream", "--topic", topic, "--dlq-topic", f"{topic}.dlq",
           "--group", f"bench-{topic}", "--key-prefix", prefix, "--metrics-port", str(port),
           "--offline-dir", str(offline), "--log-level", "warning", "--no-score", *extra]
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
        admin.delete_topics([topic, f"{topic}.dlq", f"{topic}.warmup", f"{topic}.kafka-only"])
    finally:
        admin.close()
    shutil.rmtree(offline / "archive", ignore_errors=True)  # worker.log stays for a look afterwards


def send_live(live: KafkaProducer, topic: str, rate: int, seconds: int, keyer: EntityKeyer, cards: int) -> float:
    """Live events at `rate`/s for `seconds` (timestamp = send time); returns the seconds the sends took."""
    # The topic's metadata first: a producer's first send to a topic waits for it with its timestamp already set,
    # which would count the producer's start-up (~100 ms, hundreds of events at 5,000/s) as the consumer's latency.
    live.partitions_for(topic)
    gen = messages(rate * seconds, cards, int(time.time() * 1000), keyer, live=True)
    start = time.perf_counter()
    for i, (k, v, _) in enumerate(gen):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        live.send(topic, key=k, value=v)  # timestamp = now (CreateTime)
    live.flush()
    return time.perf_counter() - start


def kafka_only_freshness(live: KafkaProducer, topic: str, rate: int, seconds: int, keyer: EntityKeyer,
                         cards: int) -> dict:
    """`send_live` into `topic` while `bench.kafka_freshness` reads it in its own process: Kafka's latency alone."""
    n = rate * seconds
    probe = subprocess.Popen([sys.executable, "-m", "bench.kafka_freshness", "--topic", topic, "--count", str(n)],
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    if probe.stdout.readline().strip() != "ready":
        probe.kill()
        raise SystemExit("the Kafka-only freshness probe did not start")
    send_live(live, topic, rate, seconds, keyer, cards)
    out, _ = probe.communicate(timeout=120)
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--cards", type=int, default=10_000)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--port", type=int, default=9480)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--worker-arg", action="append", default=[], help="extra `velocity stream` argument (repeatable)")
    ap.add_argument("--reference", default="3d3ed2b", help="git revision whose apply script is measured beside the "
                    "current one in phase 0 ('none' to skip)")
    ap.add_argument("--rounds", type=int, default=2, help="ceiling runs of each script before the worker phase")
    args = ap.parse_args()

    run = uuid.uuid4().hex[:8]
    topic, prefix = f"bench.stream.{run}", f"bench:{run}"
    offline = REPO / "bench" / "out" / f"stream-{run}"
    offline.mkdir(parents=True, exist_ok=True)
    ensure_topics(BOOT, {topic: 4, f"{topic}.dlq": 4, f"{topic}.warmup": 1, f"{topic}.kafka-only": 4})
    keyer = EntityKeyer(SECRET)
    print(f"load average at start: {load_average()}", flush=True)

    writes = ceiling_writes(args.events, args.cards, keyer)
    reference = None if args.reference == "none" else reference_script(args.reference)
    if args.reference != "none" and reference is None:
        print(f"reference {args.reference}: its apply script is not in this clone's history; measuring without it")
    scripts = [(f"reference {args.reference}", reference)] if reference else []
    scripts.append(("current", None))
    runs: dict[str, list[float]] = {name: [] for name, _ in scripts}

    def ceiling_run(name: str, script: str | None) -> None:
        tps, cpu = redis_ceiling(writes, f"{prefix}:ceiling{sum(map(len, runs.values()))}", script=script)
        runs[name].append(tps)
        print(f"  {name:>20}: {tps:9,.0f} events/s  (Redis CPU {cpu:5.1f} us/event)", flush=True)

    print(f"ceiling: {args.events:,} events over {args.cards:,} cards from a bare loop into Redis, batches of 2,000",
          flush=True)
    for _ in range(args.rounds):
        for name, script in scripts:
            ceiling_run(name, script)

    print(f"producing {args.events:,} events to {topic} ...", flush=True)
    prod = producer()
    for k, v, ts in messages(args.events, args.cards, 1_600_000_000_000, keyer):
        prod.send(topic, key=k, value=v, timestamp_ms=ts)
    prod.flush()

    worker = start_worker(topic, prefix, args.port, offline, args.worker_arg)
    try:
        wait_metrics(args.port)
        redis_probe = redis.Redis(**RedisSettings().client_kwargs())
        first = None
        deadline = time.monotonic() + 600
        while True:
            if time.monotonic() > deadline:
                raise SystemExit(f"worker stalled at {metric(args.port, 'velocity_stream_events_total'):,.0f} events")
            n = metric(args.port, "velocity_stream_events_total")
            now = time.perf_counter()
            if n > 0 and first is None:
                first, n_first = now, n
                cpu_first, redis_first = process_cpu_s(worker.pid), redis_cpu_s(redis_probe)
                machine_first = machine_cpu_s()
            if n >= args.events:
                break
            if worker.poll() is not None:
                raise SystemExit("worker died; see " + str(offline / "worker.log"))
            time.sleep(0.25)  # scraping /metrics costs the worker CPU: do not poll it hard
        tps = (args.events - n_first) / (now - first)
        worker_cpu = (process_cpu_s(worker.pid) - cpu_first) / (args.events - n_first) * 1e6
        redis_cpu = (redis_cpu_s(redis_probe) - redis_first) / (args.events - n_first) * 1e6
        busy, stolen = ((b - a) / (args.events - n_first) * 1e6 for a, b in zip(machine_first, machine_cpu_s(),
                                                                                  strict=True))
        print(f"throughput: {tps:,.0f} events/s (one worker process, {args.events:,} events, {args.cards:,} cards; "
              f"worker CPU {worker_cpu:.1f} us/event, Redis CPU {redis_cpu:.1f} us/event, the whole machine "
              f"{busy:.1f} us/event = {busy * tps / 1e6:.2f} of {os.cpu_count()} cores busy (the broker and this "
              f"bench the rest), {stolen * tps / 1e6:.2f} taken by the hypervisor; load {load_average()})", flush=True)
        ceiling_run("current", None)  # after the worker too: the machine's drift shows in the spread
        ceiling = statistics.median(runs["current"])
        print(f"ceiling (median of {len(runs['current'])} runs of the current script): {ceiling:,.0f} events/s; "
              f"worker {tps / ceiling:.2f}x of it", flush=True)
        if reference:
            before = statistics.median(runs[scripts[0][0]])
            print(f"ceiling before/after: {before:,.0f} -> {ceiling:,.0f} events/s ({ceiling / before:.2f}x)",
                  flush=True)

        print(f"freshness: live events at {args.rate}/s for {args.seconds}s ...", flush=True)
        live = KafkaProducer(bootstrap_servers=BOOT, acks=1, linger_ms=1)
        # A new producer's first sends wait for metadata and a connection while their timestamps are already set:
        # warm it up on a side topic so that wait is not counted as the worker's freshness.
        live.send(f"{topic}.warmup", value=b"warm-up").get(timeout=30)
        sent_s = send_live(live, topic, args.rate, args.seconds, keyer, args.cards)
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
        # The worker stays up but idle (its topic is drained): the reference has the machine as the worker had it.
        ref = kafka_only_freshness(live, f"{topic}.kafka-only", args.rate, args.seconds, keyer, args.cards)
        print(f"reference, Kafka alone (same producer and rate, a bare consumer process, no worker): p50 "
              f"{ref.get('p50')} ms, p90 {ref.get('p90')} ms, p99 {ref.get('p99')} ms, max {ref.get('max')} ms over "
              f"{ref.get('n', 0):,} events; the worker's p99 is {p99 / ref['p99']:.1f}x it" if ref.get("p99") else
              f"reference, Kafka alone: no events measured ({ref})")
        if not args.no_record:
            update(stream_tps=round(tps), stream_freshness_p99_ms_at_5k=round(p99, 1),
                   stream_redis_ceiling_tps=round(ceiling), stream_vs_redis_ceiling=round(tps / ceiling, 2))
        print(f"load average at the end: {load_average()}")
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        clean_up(topic, prefix, offline)


if __name__ == "__main__":
    sys.exit(main())
