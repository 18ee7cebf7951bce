"""Stream scale-out: 1, 2 and 4 stream worker processes on one topic with 8 partitions, against one Redis or a
three-master Redis Cluster.

    .venv/bin/python -m bench.bench_scale [--events 1000000] [--seconds 20] [--workers 1,2,4] [--partitions 8]
    .venv/bin/python -m bench.bench_scale --redis-cluster 7000 ...   # after `velocity services up --redis-cluster`

The events are produced once (keyed by entity key, as Velocity's producers send them) to a fresh topic; each
trial starts K `velocity stream` processes in a fresh consumer group and Redis prefix (scoring off: aggregation
and archive, the `stream_tps` configuration), waits until every one of them is processing (the group has settled),
then measures for `--seconds` (or until the backlog is drained): events/s summed over the workers, and the CPU
used meanwhile by each worker process, by Redis (`INFO cpu`) and by the Kafka broker (its pid from
`.velocity/kafka/kafka.pid`, or `--broker-pid`), each as a percentage of one core. On a machine with fewer
cores than processes the sum of those percentages shows where the ceiling is: the cores, not the design.

With `--redis-cluster PORT` the workers run with VELOCITY_REDIS_CLUSTER=true against the cluster seeded at PORT
(one apply call per master per batch) and the Redis CPU is summed over its masters; the figures go to
`stream_scaleout_cluster`.

Writes `stream_scaleout` to bench/results.json and appends the table to bench/RESULTS.md (unless --no-record).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from bench.bench_stream import SECRET, messages, metric, process_cpu_s, producer, redis_cpu_s
from featurestore.config import RedisSettings
from featurestore.entity import EntityKeyer

REPO = Path(__file__).resolve().parent.parent
BOOT = os.environ.get("VELOCITY_KAFKA_BOOTSTRAP", "127.0.0.1:9092")


def produce(topic: str, n: int, cards: int) -> float:
    """Send the events; returns the seconds it took."""
    start = time.perf_counter()
    p = producer()
    for key, value, ts in messages(n, cards, int(time.time() * 1000) - n * 50, EntityKeyer(SECRET)):
        p.send(topic, key=key, value=value, timestamp_ms=ts)
    p.flush(timeout=300)
    p.close()
    return time.perf_counter() - start


#: The Redis the trials use: `--redis-cluster PORT` switches it (and the workers' environment) to a cluster.
REDIS = RedisSettings()


def redis_env() -> dict[str, str]:
    return {"VELOCITY_REDIS_CLUSTER": "true", "VELOCITY_REDIS_PORT": str(REDIS.port)} if REDIS.cluster else {}


def redis_cpu_total(probe) -> float:
    """Redis CPU seconds so far: the one server's, or the sum over a cluster's masters."""
    if not REDIS.cluster:
        return redis_cpu_s(probe)
    return sum(redis_cpu_s(node.redis_connection) for node in probe.get_primaries())


def start_worker(topic: str, group: str, prefix: str, port: int, offline: Path, batch: int) -> subprocess.Popen:
    env = {**os.environ, "VELOCITY_ENTITY_SECRET": SECRET, **redis_env()}
    cmd = [str(REPO / ".venv/bin/velocity"), "stream", "--topic", topic, "--dlq-topic", f"{topic}.dlq",
           "--group", group, "--key-prefix", prefix, "--metrics-port", str(port), "--offline-dir", str(offline),
           "--batch-size", str(batch), "--log-level", "warning", "--no-score"]
    log = open(offline / f"worker-{port}.log", "w")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)


def events_of(port: int) -> float | None:
    try:
        return metric(port, "velocity_stream_events_total")
    except OSError:
        return None


def broker_pid(explicit: int | None) -> int | None:
    if explicit:
        return explicit
    pid_file = Path(os.environ.get("VELOCITY_RUN_DIR", REPO / ".velocity")) / "kafka" / "kafka.pid"
    try:
        pid = int(pid_file.read_text().strip())
        return pid if Path(f"/proc/{pid}").exists() else None
    except (OSError, ValueError):
        return None


def trial(k: int, topic: str, n: int, seconds: float, batch: int, port0: int, broker: int | None) -> dict:
    """K workers in a fresh group on the whole topic; the measured window starts once each one is processing."""
    tag = uuid.uuid4().hex[:8]
    prefix, group = f"bench:scale:{tag}", f"bench-scale-{tag}"
    offline = Path(tempfile.mkdtemp(prefix=f"scale{k}-"))
    ports = [port0 + i for i in range(k)]
    procs = [start_worker(topic, group, prefix, p, offline, batch) for p in ports]
    from stores.redis_cluster_store import sync_client

    probe = sync_client(REDIS)
    try:
        deadline = time.monotonic() + 180
        while True:  # every worker has partitions and is past its start-up
            counts = [events_of(p) for p in ports]
            if all(c for c in counts):
                break
            for proc in procs:
                if proc.poll() is not None:
                    raise SystemExit(f"a worker exited (code {proc.returncode}); see {offline}")
            if sum(c or 0 for c in counts) >= n or time.monotonic() > deadline:
                print(f"  {k} workers: the backlog was drained (or 180 s passed) before every worker was processing "
                      f"(events per worker {counts}); no figure: raise --events", flush=True)
                return {"workers": k, "events_per_s": None, "note": "backlog drained before all workers joined"}
            time.sleep(0.2)
        e0, t0 = sum(counts), time.perf_counter()
        cpu0 = [process_cpu_s(p.pid) for p in procs]
        r0 = redis_cpu_total(probe)
        b0 = process_cpu_s(broker) if broker else None
        while time.perf_counter() - t0 < seconds:
            time.sleep(0.5)
            done = sum(events_of(p) or 0 for p in ports)
            if done >= n:  # the backlog is drained: the window ends here
                break
        elapsed = time.perf_counter() - t0
        e1 = sum(events_of(p) or 0 for p in ports)
        cpu = [(process_cpu_s(p.pid) - c) / elapsed * 100 for p, c in zip(procs, cpu0, strict=True)]
        redis_pct = (redis_cpu_total(probe) - r0) / elapsed * 100
        broker_pct = (process_cpu_s(broker) - b0) / elapsed * 100 if broker else None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        from stores.redis_online import delete_prefix

        delete_prefix(probe, prefix)
        probe.close()
        shutil.rmtree(offline, ignore_errors=True)
    rate = (e1 - e0) / elapsed
    return {"workers": k, "events_per_s": round(rate), "window_s": round(elapsed, 1), "events": int(e1 - e0),
            "drained": e1 >= n, "worker_cpu_pct": [round(c) for c in cpu], "workers_cpu_pct": round(sum(cpu)),
            "redis_cpu_pct": round(redis_pct), "broker_cpu_pct": None if broker_pct is None else round(broker_pct)}


def table(runs: list[dict]) -> str:
    lines = ["| workers | events/s | x one worker | CPU per worker, % of a core | workers total | Redis | broker | "
             "all three | window |", "|---|---|---|---|---|---|---|---|---|"]
    base = runs[0]["events_per_s"] or 1
    for r in runs:
        if r["events_per_s"] is None:
            lines.append(f"| {r['workers']} | - | - | {r['note']} | | | | | |")
            continue
        broker = r["broker_cpu_pct"]
        total = r["workers_cpu_pct"] + r["redis_cpu_pct"] + (broker or 0)
        lines.append(f"| {r['workers']} | {r['events_per_s']:,} | {r['events_per_s'] / base:.2f} | "
                     f"{', '.join(map(str, r['worker_cpu_pct']))} | {r['workers_cpu_pct']} | {r['redis_cpu_pct']} | "
                     f"{'?' if broker is None else broker} | {total} | {r['window_s']} s"
                     f"{'' if not r['drained'] else ' (drained)'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000,
                    help="events produced once, read by every trial: enough that the backlog outlasts the workers' "
                    "start-up and the window")
    ap.add_argument("--cards", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=20, help="measured window per trial (ends early if drained)")
    ap.add_argument("--workers", default="1,2,4", help="worker counts to try, comma-separated")
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=2000)
    ap.add_argument("--port", type=int, default=9520, help="first worker's metrics port")
    ap.add_argument("--broker-pid", type=int, default=None, help="the Kafka broker's pid (default: velocity's)")
    ap.add_argument("--no-record", action="store_true", help="print only; leave results.json and RESULTS.md")
    ap.add_argument("--redis-cluster", type=int, default=None, metavar="PORT",
                    help="measure against the Redis Cluster with a master on PORT (velocity services up "
                    "--redis-cluster: 7000)")
    args = ap.parse_args()
    global REDIS
    if args.redis_cluster:
        REDIS = RedisSettings(port=args.redis_cluster, cluster=True)
    from kafka import KafkaAdminClient

    from stores.kafka_topics import ensure_topics

    counts = [int(x) for x in args.workers.split(",")]
    topic = f"bench.scale.{uuid.uuid4().hex[:8]}"
    ensure_topics(BOOT, {topic: args.partitions, f"{topic}.dlq": args.partitions})
    load0 = Path("/proc/loadavg").read_text().split()[0]
    try:
        took = produce(topic, args.events, args.cards)
        print(f"produced {args.events:,} events to {topic} ({args.partitions} partitions) in {took:.1f} s", flush=True)
        runs = []
        for k in counts:
            runs.append(trial(k, topic, args.events, args.seconds, args.batch_size, args.port,
                              broker_pid(args.broker_pid)))
            print(runs[-1], flush=True)
    finally:
        admin = KafkaAdminClient(bootstrap_servers=BOOT)
        try:
            admin.delete_topics([topic, f"{topic}.dlq"])
        finally:
            admin.close()
    load1 = Path("/proc/loadavg").read_text().split()[0]
    out = table(runs)
    print(out)
    if args.no_record:
        return
    from bench.results import update

    key = "stream_scaleout_cluster" if REDIS.cluster else "stream_scaleout"
    update(**{key: {"partitions": args.partitions, "events": args.events, "seconds": args.seconds,
                    "cores": os.cpu_count(), "runs": runs, "redis": "cluster of 3" if REDIS.cluster else "one"}})
    flag = f" --redis-cluster {args.redis_cluster}" if REDIS.cluster else ""
    command = (f"`.venv/bin/python -m bench.bench_scale --events {args.events} --seconds {args.seconds:g} "
               f"--workers {args.workers} --partitions {args.partitions}{flag}`")
    against = "a three-master Redis Cluster" if REDIS.cluster else "one Redis"
    section = (f"## {dt.date.today()}: stream scale-out (bench_scale) against {against}, {os.cpu_count()} cores, "
               f"load {load0} -> {load1}\nCommand: {command}\n\n{out}\n\n")
    results = REPO / "bench" / "RESULTS.md"
    text = results.read_text()
    at = text.find("\n## ") + 1 or len(text)  # newest first, under the file's introduction
    results.write_text(text[:at] + section + text[at:])


if __name__ == "__main__":
    main()
