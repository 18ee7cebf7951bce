"""`velocity dlq replay` on the real broker and worker: a worker with a far-too-tight future bound (a clock that
was off) dead-letters good transactions; after the fix they are replayed, validated again, aggregated once; what
is still bad stays; a dry run sends nothing; a second run resends nothing; no PAN travels."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import numpy as np
import orjson
import pytest

from featurestore.entity import EntityKeyer
from stores.redis_online import OnlineStore
from tests.conftest import REPO
from tests.helpers import topic_messages
from tests.stream_harness import SECRET, Worker, wait_committed
from tests.synthetic import luhn_pan

pytestmark = pytest.mark.integration




def dlq_replay(bootstrap: str, topic: str, *flags: str, future_ms: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "VELOCITY_KAFKA_BOOTSTRAP": bootstrap, "VELOCITY_ENTITY_SECRET": SECRET,
           "VELOCITY_MAX_FUTURE_MS": str(future_ms)}
    return subprocess.run([sys.executable, "-m", "velocity_cli", "dlq", "replay", "--topic", topic, "--dlq-topic",
                           f"{topic}.dlq", "--group", f"{topic}-replay", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)


def test_dead_letters_are_replayed_once_after_the_fix(services, make_topic, kafka_admin, key_prefix, redis_settings,
                                                      tmp_path):
    from kafka import KafkaProducer

    from stores.kafka_topics import ensure_topics

    bootstrap, topic = services["bootstrap"], make_topic("dlqr", partitions=2)
    ensure_topics(bootstrap, {f"{topic}.dlq": 2})
    keyer = EntityKeyer(SECRET)
    pan = luhn_pan(np.random.default_rng(5))
    card = keyer(pan)
    now = int(time.time() * 1000)
    good = [{"txn_id": f"f{i}", "card": card, "pan_last4": pan[-4:], "amount": 10.0 + i, "ts": now + 3_600_000 + i,
             "merchant": "m", "category": "c"} for i in range(5)]  # an hour ahead: refused by a 1 s bound
    with_pan = {"txn_id": "p1", "cc_num": pan, "amount": 5.0, "ts": now + 3_600_000, "merchant": "m",
                "category": "c"}
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=2 << 20)
    for row in good:
        producer.send(topic, key=card.encode(), value=orjson.dumps(row))
    producer.send(topic, key=card.encode(), value=orjson.dumps(with_pan))  # its dead letter masks the PAN
    producer.send(topic, key=b"x", value=b"{not json")
    producer.send(topic, key=b"x", value=b'{"txn_id": "big", "pad": "' + b"a" * 100_000 + b'"}')  # truncated copy
    producer.flush()
    producer.close()

    group = f"g-{uuid.uuid4().hex[:8]}"

    def worker(future_ms: int) -> Worker:
        w = Worker(topic=topic, prefix=key_prefix, group=group, offline=tmp_path, bootstrap=bootstrap,
                   redis_port=services["redis_port"], log=tmp_path / "worker.log")
        w.env["VELOCITY_MAX_FUTURE_MS"] = str(future_ms)
        return w

    tight = worker(1_000).start()  # the misconfiguration
    try:
        wait_committed(kafka_admin, tight, group, topic, bootstrap)
    finally:
        assert tight.stop() == 0, tight.tail()
    assert len(topic_messages(bootstrap, f"{topic}.dlq")) == 8
    before = len(topic_messages(bootstrap, topic))

    dry = dlq_replay(bootstrap, topic, "--dry-run", future_ms=86_400_000)
    assert dry.returncode == 0, dry.stderr
    assert "8 dead letters read; 5 would be replayed" in dry.stderr, dry.stderr
    assert "1 truncated" in dry.stderr and "still invalid (not_json)" in dry.stderr
    assert len(topic_messages(bootstrap, topic)) == before, "a dry run sends nothing"

    fixed = dlq_replay(bootstrap, topic, future_ms=86_400_000)
    assert "5 replayed" in fixed.stderr, fixed.stderr
    replayed = [m for m in topic_messages(bootstrap, topic) if any(k == "replayed_from" for k, _ in m.headers or ())]
    assert sorted(orjson.loads(m.value)["txn_id"] for m in replayed) == [f"f{i}" for i in range(5)]
    for m in replayed:
        body = orjson.loads(m.value)
        assert "cc_num" not in body and body["card"] == card and pan not in m.value.decode()
    again = dlq_replay(bootstrap, topic, future_ms=86_400_000)
    assert "0 dead letters read; 0 replayed" in again.stderr, "a second run resends nothing"

    after_fix = worker(86_400_000).start()
    try:
        wait_committed(kafka_admin, after_fix, group, topic, bootstrap)
    finally:
        assert after_fix.stop() == 0, after_fix.tail()
    store = OnlineStore(redis_settings, prefix=key_prefix)
    try:
        features = store.read_features(card, "probe", now + 3_600_000 + 10, 100)
    finally:
        store.close()
    assert features.num_trans_last_10m == 6, "the five replayed transactions are aggregated once, plus the probe"
