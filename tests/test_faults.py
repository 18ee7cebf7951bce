"""Faults survived with nothing lost (issue 17): a worker SIGKILLed under load while another shares the
partitions, and the Kafka broker stopped and restarted under a running worker. The end state is checked
against the oracle (tests/oracle.py) and the archive holds every transaction exactly once."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from featurestore.entity import EntityKeyer
from stores.redis_online import OnlineStore
from tests import synthetic
from tests.conftest import REPO
from tests.helpers import wait_until
from tests.stream_harness import SECRET, Worker, stable_members, wait_committed
from tests.test_stream_worker import RETAIN_ALL_MS, assert_archive_exactly_once, assert_online_equals_oracle

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_one_of_two_workers_sigkilled_under_load_the_other_takes_over(services, make_topic, kafka_admin,
                                                                      key_prefix, redis_settings, tmp_path):
    from stores.kafka_topics import ensure_topics

    topic = make_topic("faults", partitions=4)
    ensure_topics(services["bootstrap"], {f"{topic}.dlq": 4})
    group = f"g-{uuid.uuid4().hex[:8]}"

    def worker(name: str) -> Worker:
        return Worker(topic=topic, prefix=key_prefix, group=group, offline=tmp_path, bootstrap=services["bootstrap"],
                      redis_port=services["redis_port"], log=tmp_path / f"{name}.log", retention_ms=RETAIN_ALL_MS)

    rows = synthetic.history(n=12_000, cards=120, seed=41)
    keyer = EntityKeyer(SECRET)
    halves = rows[:6000], rows[6000:]
    synthetic.produce(services["bootstrap"], topic, halves[0], keyer)
    survivor, victim = worker("survivor").start(), worker("victim").start()
    try:
        wait_until(lambda: stable_members(kafka_admin, group) == 2, timeout=120, what="two workers in the group")
        synthetic.produce(services["bootstrap"], topic, halves[1], keyer)  # under load when the kill lands
        wait_until(lambda: (victim.metric("velocity_stream_events_total") or 0) >= 500, timeout=120,
                   what="the second worker to be processing its partitions")
        victim.kill()
        wait_committed(kafka_admin, survivor, group, topic, services["bootstrap"], timeout=240)
    finally:
        if victim.alive():
            victim.kill()
        assert survivor.stop() == 0, survivor.tail()
    store = OnlineStore(redis_settings, prefix=key_prefix)
    try:
        assert_online_equals_oracle(store, rows)
    finally:
        store.close()
    assert_archive_exactly_once(tmp_path, rows)


def test_broker_stopped_and_restarted_under_a_running_worker_loses_nothing(services, key_prefix, redis_settings,
                                                                           tmp_path):
    """A private broker (the shared one serves other tests) goes down mid-stream for a few seconds."""
    from kafka import KafkaAdminClient

    from services.manager import ServiceConfig, _stop, kafka_up, port_open
    from stores.kafka_topics import ensure_topics
    from tests.test_ingest import _free_port_pair

    port = _free_port_pair()
    cfg = ServiceConfig(run_dir=tmp_path / "svc", kafka_port=port, controller_port=port + 1, kafka_heap="256m",
                        jars_dir=Path(os.environ.get("VELOCITY_RUN_DIR", REPO / ".velocity")) / "kafka-jars-3.9.1")
    cfg.logs_dir.mkdir(parents=True)
    bootstrap = f"127.0.0.1:{port}"
    kafka_up(cfg)
    topic, group = "tx", f"g-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, {topic: 4, f"{topic}.dlq": 4})
    rows = synthetic.history(n=6000, cards=60, seed=43)
    keyer = EntityKeyer(SECRET)
    synthetic.produce(bootstrap, topic, rows[:3000], keyer)
    offline = tmp_path / "offline"
    offline.mkdir()
    worker = Worker(topic=topic, prefix=key_prefix, group=group, offline=offline, bootstrap=bootstrap,
                    redis_port=services["redis_port"], log=tmp_path / "worker.log", retention_ms=RETAIN_ALL_MS).start()
    admin = None
    try:
        wait_until(lambda: (worker.metric("velocity_stream_events_total") or 0) >= 500, timeout=120,
                   what="the worker to be mid-stream")
        _stop(cfg.kafka_dir / "kafka.pid", "Kafka", 30)
        wait_until(lambda: not port_open(port), timeout=30, what="the broker down")
        time.sleep(5)  # the outage: the worker must neither exit nor skip what it has not committed
        assert worker.alive(), f"the worker exited during a short broker outage:\n{worker.tail()}"
        kafka_up(cfg)
        synthetic.produce(bootstrap, topic, rows[3000:], keyer)
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
        wait_committed(admin, worker, group, topic, bootstrap, timeout=300)
    finally:
        if admin is not None:
            admin.close()
        code = worker.stop()
        _stop(cfg.kafka_dir / "kafka.pid", "Kafka", 30)
    assert code == 0, worker.tail()
    store = OnlineStore(redis_settings, prefix=key_prefix)
    try:
        assert_online_equals_oracle(store, rows)
    finally:
        store.close()
    assert_archive_exactly_once(offline, rows)
