"""Soak (issue 17, SPEC section 10): a steady stream plus steady scoring for minutes; memory must stay flat.

    .venv/bin/python -m bench.bench_soak [--minutes 10] [--tps 2000] [--rps 200]

Starts one stream worker (`velocity stream`, scoring on when a current model exists) and one API process
(`velocity serve`'s app under uvicorn; the bench's synthetic model when no model is current) on a bench topic and
key prefix, then for `--minutes` produces live transactions at `--tps` (paced, keyed by entity key) while an
open-loop client sends `--rps` scoring requests (which the API also publishes to the same topic). Every 10 s it
samples the resident memory of both processes, the consumer group's lag and the error counts. Records the RSS
growth from the first sample after the warm-up (a quarter of the run, at most two minutes) to the end (`soak_rss_growth_mb_worker`,
`soak_rss_growth_mb_api`) and `soak_errors` (HTTP non-2xx or failed requests, plus worker dead letters).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from bench import results
from bench.bench_serve import CARDS, OpenLoop, _luhn_pans, free_port, request_bytes, seed_online_state
from bench.bench_stream import messages, metric, producer, wait_metrics

REPO = Path(__file__).resolve().parent.parent
BOOT = os.environ.get("VELOCITY_KAFKA_BOOTSTRAP", "127.0.0.1:9092")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def lag(group: str, topic: str) -> int:
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

    admin = KafkaAdminClient(bootstrap_servers=BOOT)
    consumer = KafkaConsumer(bootstrap_servers=BOOT)
    try:
        committed = admin.list_group_offsets(group).get(group, {})
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = consumer.end_offsets(parts)
        return int(sum(end - (committed[tp].offset if tp in committed else 0) for tp, end in ends.items()))
    finally:
        admin.close()
        consumer.close()


def current_model_exists() -> bool:
    try:
        from featurestore.config import get_settings
        from serving.model_source import current_model_source

        current_model_source(get_settings()).load()
        return True
    except Exception:  # none current, or one the definitions cannot produce: the bench uses its synthetic model
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--tps", type=int, default=2000)
    ap.add_argument("--rps", type=int, default=200)
    ap.add_argument("--no-record", action="store_true", help="Print only; leave bench/results.json alone.")
    args = ap.parse_args()
    # A stopped soak (kill, Ctrl-C) still stops its worker and API: the `finally` below must run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from featurestore.entity import EntityKeyer
    from stores.kafka_topics import ensure_topics

    run = uuid.uuid4().hex[:8]
    topic, prefix, group = f"bench.soak.{run}", f"bench:soak:{run}", f"bench-soak-{run}"
    scores, alerts = f"{topic}.scores", f"{topic}.alerts"
    ensure_topics(BOOT, {topic: 4, f"{topic}.dlq": 4, scores: 4, alerts: 4})
    secret = "bench-soak-secret"
    rng = np.random.default_rng(7)
    pans = _luhn_pans(CARDS, rng)
    seed_online_state(prefix, pans, secret, rng)
    model = current_model_exists()
    offline = Path(tempfile.mkdtemp(prefix="velocity-soak-"))
    env = {**os.environ, "VELOCITY_ENTITY_SECRET": secret, "VELOCITY_REDIS_KEY_PREFIX": prefix,
           "VELOCITY_KAFKA_TOPIC_TRANSACTIONS": topic, "VELOCITY_KAFKA_TOPIC_SCORES": scores,
           "VELOCITY_KAFKA_TOPIC_ALERTS": alerts, "VELOCITY_BENCH_SYNTHETIC_MODEL": "0" if model else "1"}
    wport, aport = free_port(), free_port()
    worker = subprocess.Popen(
        [sys.executable, "-m", "velocity_cli", "stream", "--topic", topic, "--group", group, "--key-prefix", prefix,
         "--offline-dir", str(offline), "--metrics-port", str(wport), "--log-level", "warning",
         *(["--scores-topic", scores, "--alerts-topic", alerts] if model else ["--no-score"])],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(offline / "worker.log", "w"))  # noqa: SIM115 (open while it runs)
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.bench_serve:app_factory", "--factory", "--port", str(aport),
         "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(offline / "api.log", "w"))  # noqa: SIM115
    stop = threading.Event()
    sent = [0]
    try:
        wait_metrics(wport)
        import urllib.request

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{aport}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.2)

        def produce() -> None:
            p = producer()
            stream = messages(10**12, CARDS, int(time.time() * 1000), EntityKeyer(secret), live=True)
            t0 = time.perf_counter()
            while not stop.is_set():
                due = int((time.perf_counter() - t0) * args.tps)
                while sent[0] < due:
                    key, value, _ = next(stream)
                    p.send(topic, key=key, value=value)
                    sent[0] += 1
                time.sleep(0.005)
            p.flush()
            p.close()

        client = OpenLoop(aport)
        seconds = args.minutes * 60

        def load() -> None:
            asyncio.run(client.run(args.rps, seconds, request_bytes(pans, rng)))

        threads = [threading.Thread(target=produce, daemon=True), threading.Thread(target=load, daemon=True)]
        for t in threads:
            t.start()
        samples = []
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            time.sleep(10)
            elapsed = time.monotonic() - start
            sample = (elapsed, rss_mb(worker.pid), rss_mb(api.pid), lag(group, topic), sent[0])
            samples.append(sample)
            print(f"{elapsed:6.0f} s  worker {sample[1]:7.1f} MB  api {sample[2]:7.1f} MB  lag {sample[3]:7d}  "
                  f"produced {sample[4]:,}", flush=True)
            if worker.poll() is not None or api.poll() is not None:
                raise SystemExit(f"a process exited; logs in {offline}")
        stop.set()
        for t in threads:
            t.join(60)
        http_errors = client.errors + sum(n for s, n in client.statuses.items() if s >= 300)
        dead = metric(wport, "velocity_stream_dlq_total") if _has(wport, "velocity_stream_dlq_total") else 0.0
    finally:
        stop.set()
        for proc in (worker, api):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    warmup = min(120.0, args.minutes * 60 / 4)  # start-up growth (first archive roll, pools) is not a leak
    warm = [s for s in samples if s[0] >= warmup] or samples
    first, middle, last = warm[0], warm[len(warm) // 2], warm[-1]
    growth_w, growth_a = last[1] - first[1], last[2] - first[2]
    errors = int(http_errors + dead)
    print(f"\nRSS worker (MB): start {first[1]:.1f}, middle {middle[1]:.1f}, end {last[1]:.1f} -> {growth_w:+.1f}")
    print(f"RSS api    (MB): start {first[2]:.1f}, middle {middle[2]:.1f}, end {last[2]:.1f} -> {growth_a:+.1f}")
    print(f"max lag {max(s[3] for s in samples):,}; produced {sent[0]:,}; requests {sum(client.statuses.values()):,}; "
          f"errors {errors} (HTTP {http_errors}: statuses {client.statuses}, failed {client.errors}; dead letters "
          f"{dead:.0f}); stream scoring {'on' if model else 'off'}")
    if not args.no_record:
        results.update(soak_rss_growth_mb_worker=round(growth_w, 1), soak_rss_growth_mb_api=round(growth_a, 1),
                       soak_errors=errors)


def _has(port: int, name: str) -> bool:
    try:
        metric(port, name)
        return True
    except Exception:
        return False


if __name__ == "__main__":
    main()
