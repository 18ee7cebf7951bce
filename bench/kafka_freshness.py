"""Reference for the stream's freshness: how long Kafka alone takes from a producer's send to a consumer's hands.

    .venv/bin/python -m bench.kafka_freshness --topic T --count N

A bare aiokafka consumer in its own process (as the worker is), no processing: reads `count` records of `topic` from
the start and prints one JSON line with the receive time minus each record's CreateTime (the producer's send
time) at p50/p90/p99/max, in ms. `bench.bench_stream` runs it beside the worker's freshness phase with the same
producer, so the worker's own share of the latency shows on the day's machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import orjson
from aiokafka import AIOKafkaConsumer

BOOT = os.environ.get("VELOCITY_KAFKA_BOOTSTRAP", "127.0.0.1:9092")


def percentiles(latencies_ms: list[float]) -> dict[str, float]:
    if not latencies_ms:
        return {}
    s = sorted(latencies_ms)
    pick = lambda q: round(s[min(len(s) - 1, int(q * len(s)))], 1)  # noqa: E731 - nearest rank
    return {"n": len(s), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": round(s[-1], 1)}


async def consume(topic: str, count: int, timeout_s: float) -> dict[str, float]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=BOOT, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    print("ready", flush=True)  # the caller starts producing after this line
    latencies: list[float] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(latencies) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            now_ms = time.time() * 1000
            for records in batches.values():
                latencies.extend(now_ms - r.timestamp for r in records)
    finally:
        await consumer.stop()
    return percentiles(latencies)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    print(orjson.dumps(asyncio.run(consume(args.topic, args.count, args.timeout))).decode(), flush=True)


if __name__ == "__main__":
    sys.exit(main())
