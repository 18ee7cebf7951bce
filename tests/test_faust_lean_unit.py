"""The worker's Kafka consumer asks the broker to hold an empty fetch for at most 100 ms, not faust's 1.5 s: aiokafka
sends one fetch per broker at a time, so a held fetch for caught-up partitions kept the busy ones unfetched and
stalled the worker for up to 1.5 s at a time over a backlog (streaming/faust_lean.py, bench/RESULTS.md).
Built here as the worker builds it, without connecting anywhere."""

from __future__ import annotations

import asyncio

import pytest

from streaming.worker import build_app, default_config

pytestmark = pytest.mark.unit


def test_the_workers_consumer_asks_for_a_short_fetch_wait_and_keeps_fausts_other_settings(tmp_path):
    async def consumer_settings() -> tuple:
        cfg = default_config(group="fetch-wait-check", datadir=tmp_path, batch_size=1234)
        app = build_app(cfg)
        thread = app.consumer._new_consumer_thread()
        consumer = thread._create_consumer(loop=asyncio.get_running_loop())
        try:
            return consumer._fetch_max_wait_ms, consumer._max_poll_records, consumer._group_id
        finally:
            await consumer.stop()  # never started: only closes its client

    wait_ms, max_records, group = asyncio.run(consumer_settings())
    assert wait_ms == 100  # faust's own consumer asks for 1,500 ms
    assert max_records == 1234 and group == "fetch-wait-check"
