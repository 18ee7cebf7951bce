"""What the stream worker's Kafka client alone costs: a bare aiokafka consumer (the library faust runs on) reading
the stream bench's events as fast as it can, with no processing, so the worker's own CPU per event can be told
apart from the consumer's.

    .venv/bin/python -m bench.bench_consumer_floor [--events 400000 --rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from aiokafka import AIOKafkaConsumer
from kafka.admin import KafkaAdminClient

from bench.bench_stream import BOOT, SECRET, messages, producer
from featurestore.entity import EntityKeyer
from stores.kafka_topics import ensure_topics


async def consume(topic: str, events: int) -> tuple[float, float]:
    """(events/s, consumer CPU us per event) reading `events` messages from the start of `topic`."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=BOOT, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False, max_partition_fetch_bytes=4 << 20)
    await consumer.start()
    n, start, cpu0 = 0, None, 0.0
    try:
        while n < events:
            got = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in got.values():
                if start is None:  # from the first records on: the group join and first fetch are not counted
                    start, cpu0 = time.perf_counter(), time.process_time()
                n += len(records)
    finally:
        await consumer.stop()
    return n / (time.perf_counter() - start), (time.process_time() - cpu0) / n * 1e6


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    topic = f"bench.consumer.{uuid.uuid4().hex[:8]}"
    ensure_topics(BOOT, {topic: 4})
    try:
        prod = producer()
        for key, value, ts in messages(args.events, 10_000, 1_600_000_000_000, EntityKeyer(SECRET)):
            prod.send(topic, key=key, value=value, timestamp_ms=ts)
        prod.flush()
        prod.close()
        for _ in range(args.rounds):
            tps, us = asyncio.run(consume(topic, args.events))
            print(f"bare aiokafka consumer: {tps:,.0f} events/s, {us:.1f} us of CPU per event", flush=True)
    finally:
        admin = KafkaAdminClient(bootstrap_servers=BOOT)
        admin.delete_topics([topic])
        admin.close()


if __name__ == "__main__":
    main()
