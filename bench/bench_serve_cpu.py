"""CPU per scoring request, before and after: server and Kafka broker, A/B in one run (a shared machine's latency
figures mean little; CPU per request, alternated, still compares two versions of the code).

    .venv/bin/python -m bench.bench_serve_cpu [--reference HEAD] [--rate 300] [--seconds 8] [--rounds 6]

`git archive <reference>` is unpacked to a temporary directory; that tree and this working tree each serve from
their own server process (the same `bench.bench_serve:app_factory`, each tree's own HTTP protocol: what its
`velocity serve` uses) over one private redis-server seeded with the serving bench's 10,000 cards, publishing to
the same Kafka topics. Then, alternately (ABBA...), each gets `--rate` requests/s of `POST /v1/score` for
`--seconds` from the serving bench's open-loop generator, and the CPU its process and the Kafka broker's process
spent meanwhile (/proc/<pid>/stat, user + system) is divided by the answers. The broker's figure includes
whatever else uses the broker meanwhile (other people's tests on a shared machine): read its medians and the
paired differences, not one phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import orjson

from bench import bench_serve as bs

_PROTOCOL = "serving.http_protocol:HttpProtocol"


def _protocol(tree: Path) -> str:
    """The HTTP protocol the tree's `velocity serve` uses (older trees: plain httptools)."""
    return _PROTOCOL if (tree / "serving" / "http_protocol.py").exists() else "httptools"


def _start(tree: Path, env: dict) -> tuple[subprocess.Popen, int]:
    port = bs.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.bench_serve:app_factory", "--factory", "--port",
                             str(port), "--loop", "uvloop", "--http", _protocol(tree), "--no-access-log",
                             "--timeout-keep-alive", "600", "--log-level", "warning"],
                            cwd=tree, env={**env, "PYTHONPATH": str(tree)})
    return proc, port


def _wait_ready(proc: subprocess.Popen, port: int) -> str:
    deadline = time.monotonic() + 120
    while True:
        ready = None
        with contextlib.suppress(OSError, ValueError):
            ready = orjson.loads(bs._get(f"http://127.0.0.1:{port}/readyz", timeout=2))
        if ready and ready["ready"] and ready["kafka"]["state"] == "connected":
            return ready["model"]["version"]
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"server not ready: {ready}")
        time.sleep(0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", default="HEAD", help="The git revision to compare this working tree with.")
    ap.add_argument("--rate", type=float, default=300, help="Requests per second in each phase (modest).")
    ap.add_argument("--seconds", type=float, default=8, help="Seconds per phase.")
    ap.add_argument("--rounds", type=int, default=6, help="Phases per version, alternated.")
    ap.add_argument("--models-dir", help="Serve this model directory's current model (default: as bench_serve).")
    args = ap.parse_args()
    from kafka.admin import KafkaAdminClient, NewTopic

    from featurestore.config import KafkaSettings, RedisSettings
    from stores.redis_online import delete_prefix

    private = bs.start_private_redis()
    ref_dir = tempfile.TemporaryDirectory(prefix="velocity-ref-")
    subprocess.run(f"git archive {args.reference} | tar -x -C {ref_dir.name}", shell=True, check=True, cwd=bs.REPO)
    trees = {args.reference: Path(ref_dir.name), "this tree": bs.REPO}
    rng = np.random.default_rng(7)
    tag = uuid.uuid4().hex[:8]
    prefix, topic, scores = f"bench:cpu:{tag}", f"bench.cpu.{tag}", f"bench.cpu.{tag}.scores"
    pans = bs._luhn_pans(bs.CARDS, rng)
    bs.seed_online_state(prefix, pans, bs.SECRET, rng)
    bootstrap = KafkaSettings().bootstrap
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, 4, 1), NewTopic(scores, 4, 1)])
    kafka_pid = bs.pid_listening(int(bootstrap.rsplit(":", 1)[1]))
    models = bs.choose_models_dir(args.models_dir, False)
    env = {**os.environ, "VELOCITY_ENTITY_SECRET": bs.SECRET, "VELOCITY_REDIS_KEY_PREFIX": prefix,
           "VELOCITY_KAFKA_TOPIC_TRANSACTIONS": topic, "VELOCITY_KAFKA_TOPIC_SCORES": scores,
           "VELOCITY_BENCH_SYNTHETIC_MODEL": "1" if models is None else "0",
           "VELOCITY_BENCH_MODELS_DIR": str(models.resolve() if models else "")}
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    try:
        for i, (name, tree) in enumerate(trees.items()):
            servers[name] = _start(tree, {**env, "VELOCITY_SERVE_SPILL_DIR": f"{ref_dir.name}/.spill-{i}"})
        for name, (proc, port) in servers.items():
            print(f"{name}: ready, model {_wait_ready(proc, port)}, protocol {_protocol(trees[name])}", flush=True)

        async def drive() -> None:
            gens = {name: bs.OpenLoop(port) for name, (_, port) in servers.items()}
            bodies = bs.request_bytes(pans, rng)
            for gen in gens.values():  # warm-up: connections, the key cache, Kafka metadata
                await gen.run(200, 4, bodies)
                gen.reset()
            for r in range(args.rounds):
                for name in (list(servers) if r % 2 == 0 else list(reversed(servers))):
                    pid = servers[name][0].pid
                    await asyncio.sleep(1.0)
                    s0, k0 = bs.proc_cpu_s(pid), bs.proc_cpu_s(kafka_pid)
                    lat = await gens[name].run(args.rate, args.seconds, bodies)
                    await asyncio.sleep(0.5)  # the score records of these answers
                    s1, k1 = bs.proc_cpu_s(pid), bs.proc_cpu_s(kafka_pid)
                    n = max(len(lat), 1)
                    rows[name].append(((s1 - s0) / n * 1e3, (k1 - k0) / n * 1e3))
                    print(f"round {r} {name:>10}: server {rows[name][-1][0]:.3f} ms/req, kafka broker "
                          f"{rows[name][-1][1]:.3f} ms/req, answered {len(lat)} {dict(gens[name].statuses)}, "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
                    gens[name].reset()

        import uvloop

        uvloop.run(drive())
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            if proc.poll() is None:
                proc.kill()
        import redis

        client = redis.Redis(**RedisSettings().client_kwargs())
        delete_prefix(client, prefix)
        client.close()
        with contextlib.suppress(Exception):
            admin.delete_topics([topic, scores])
        admin.close()
        private.kill()
        private.wait()
        ref_dir.cleanup()
    ref, cur = rows[args.reference], rows["this tree"]
    print(f"\n| CPU ms per request (median of {args.rounds}; min) | {args.reference} | this tree | paired difference "
          "(median) |\n|---|---|---|---|")
    for i, what in enumerate(("server", "Kafka broker")):
        a, b = [x[i] for x in ref], [x[i] for x in cur]
        print(f"| {what} | {np.median(a):.3f}; {min(a):.3f} | {np.median(b):.3f}; {min(b):.3f} | "
              f"{np.median(np.subtract(b, a)):+.3f} |")


if __name__ == "__main__":
    main()
