"""No full card number anywhere (issue 17 section 3b): an end-to-end run on real services, then a scan of every
log line, Redis key and value, archive row and topic for the history's PANs (tests/pan_scan.py, written from the
SPEC's words).

The run: `velocity generate` a small history, `velocity replay` it, a stream worker scoring with a model, scores
through the HTTP API (single, batch, features, refused requests), hostile messages that carry PANs straight into
the transactions topic (an outside producer's `cc_num`, PANs in free text and ids, bytes that are not JSON, a bad
amount), and the DLQ exercised (`velocity dlq replay` re-sends a dead letter once its cause is fixed). The messages
the test itself injected are the only ones allowed to carry a PAN: the scan checks what Velocity wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import orjson
import pyarrow.parquet as pq
import pytest
import redis
from kafka import KafkaProducer

from featurestore.entity import EntityKeyer
from stores.archive import read_spools
from tests.api_harness import isolated_api
from tests.conftest import REPO
from tests.helpers import topic_messages, wait_until
from tests.pan_scan import PanScanner
from tests.stream_harness import SECRET, Worker, wait_committed

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _cli(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "velocity_cli", *args], env={**os.environ, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _messages(bootstrap: str, topic: str) -> list:
    return topic_messages(bootstrap, topic, idle_ms=4000)


def _redis_items(client: redis.Redis, prefix: str):
    """Every key under the prefix with its whole value, whatever its type."""
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        kind = client.type(key).decode()
        value = {"hash": client.hgetall, "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
                 "string": client.get, "set": client.smembers, "list": lambda k: client.lrange(k, 0, -1),
                 "stream": lambda k: client.xrange(k)}.get(kind, lambda k: client.dump(k))(key)
        yield key + b" " + repr(value).encode()


def test_no_full_card_number_in_any_log_key_value_archive_row_or_topic(services, kafka_admin, tmp_path):
    bootstrap = services["bootstrap"]
    history = tmp_path / "history.parquet"
    base_env = {"VELOCITY_ENTITY_SECRET": SECRET, "VELOCITY_KAFKA_BOOTSTRAP": bootstrap,
                "VELOCITY_REDIS_PORT": str(services["redis_port"])}
    outputs: dict[str, str] = {}
    gen = _cli(["generate", "--cards", "30", "--days", "2", "--start", "2020-01-01", "--seed", "17", "--out",
                str(history)], base_env)
    assert gen.returncode == 0, gen.stderr
    outputs["generate"] = gen.stdout + gen.stderr
    rows = pq.read_table(history).to_pylist()
    pans = sorted({r["cc_num"] for r in rows})
    scanner = PanScanner(frozenset(pans))
    # The scanner can fail: it finds these PANs as written and with separators.
    assert scanner.find(f"x{pans[0]}y") == {pans[0]}
    assert scanner.find(" ".join(pans[1][i:i + 4] for i in range(0, 16, 4)).encode()) == {pans[1]}
    assert scanner.find("-".join(pans[2][i:i + 4] for i in range(0, 16, 4))) == {pans[2]}
    keyer = EntityKeyer(SECRET)
    offline = tmp_path / "offline"
    offline.mkdir()

    with isolated_api(services, kafka_admin, tmp_path / "api", "panscan", threshold=0.001,
                      topics=("transactions", "scores", "alerts", "dlq"),
                      env={"VELOCITY_ENTITY_SECRET": SECRET}) as api:
        topics, prefix, client = api["topics"], api["prefix"], api["client"]
        topic = topics["transactions"]
        env = {**base_env, "VELOCITY_REDIS_KEY_PREFIX": prefix,
               **{f"VELOCITY_KAFKA_TOPIC_{k.upper()}": t for k, t in topics.items()}}
        group = f"g-{uuid.uuid4().hex[:8]}"

        def make_worker(max_future_ms: int) -> Worker:
            w = Worker(topic=topic, prefix=prefix, group=group, offline=offline, bootstrap=bootstrap,
                       redis_port=services["redis_port"], log=tmp_path / "worker.log",
                       score={"scores": topics["scores"], "alerts": topics["alerts"], "models_dir": api["models"]})
            w.env.update({"VELOCITY_ENTITY_SECRET": SECRET, "VELOCITY_MAX_FUTURE_MS": str(max_future_ms)})
            return w

        worker = make_worker(60_000)  # a bound too tight for the `future` message below: it is dead-lettered
        replay = _cli(["replay", "--input", str(history), "--topic", topic, "--speed", "max"], env)
        assert replay.returncode == 0, replay.stderr
        outputs["replay"] = replay.stdout + replay.stderr
        worker.start()
        try:
            # Scores through the API: single, batch, features by PAN, and refused requests that carry a PAN.
            answers = []
            now = int(time.time() * 1000)
            for i, pan in enumerate(pans[:8]):
                r = client.post("/v1/score", json={"txn_id": f"api-{i}", "cc_num": pan, "amount": 12.5 + i,
                                                   "merchant": "m1", "category": "grocery_pos", "ts": now + i})
                assert r.status_code == 200, r.text
                answers.append(r.text)
            r = client.post("/v1/score/batch", json=[{"txn_id": f"apib-{i}", "cc_num": pan, "amount": 30.0,
                                                      "merchant": "m2", "category": "misc_net"}
                                                     for i, pan in enumerate(pans[8:12])])
            assert r.status_code == 200, r.text
            answers.append(r.text)
            r = client.post("/v1/features", json={"cc_num": pans[12]})
            assert r.status_code == 200, r.text
            answers.append(r.text)
            for bad in ({"txn_id": "bad-amount", "cc_num": pans[13], "amount": -4, "merchant": "m", "category": "c"},
                        {"txn_id": f"pan-in-id-{pans[14]}", "cc_num": pans[14][:-1] + "x", "amount": 1,
                         "merchant": f"shop {pans[15]}", "category": "c"}):
                r = client.post("/v1/score", json=bad)
                assert r.status_code == 422, r.text
                answers.append(r.text)

            # Hostile messages straight into the topic (an outside producer): the only PANs allowed in it.
            card = keyer(pans[16])
            future = {"txn_id": "fut-1", "card": card, "pan_last4": pans[16][-4:], "amount": 7.0,
                      "ts": int(time.time() * 1000) + 3_600_000, "merchant": f"shop {pans[17]} ltd", "category": "c"}
            hostile = [
                (card.encode(), orjson.dumps({"txn_id": "out-1", "cc_num": pans[16], "amount": 5.0, "ts": now,
                                              "merchant": "m", "category": "c"})),  # valid: tokenized by the worker
                (card.encode(), orjson.dumps({"txn_id": f"id-{pans[18]}", "card": card, "pan_last4": "0000",
                                              "amount": 6.0, "ts": now + 10, "merchant": f"at {pans[19]}",
                                              "category": "card " + " ".join(pans[23][i:i + 4] for i in
                                                                             range(0, len(pans[23]), 4))})),
                # valid, PANs in free text, one printed in groups of 4 ("4539 5787 6362 1486")
                (card.encode(), b"\xff not json " + pans[20].encode()),
                (pans[21].encode(), orjson.dumps({"txn_id": "neg", "cc_num": pans[21], "amount": -1.0, "ts": now,
                                                  "merchant": "m", "category": "c"})),
                (card.encode(), orjson.dumps(future)),  # refused as `future` by a worker with a tight bound
            ]
            producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
            injected = set()
            for key, value in hostile:
                md = producer.send(topic, key=key, value=value).get(timeout=60)
                injected.add((md.partition, md.offset))
            producer.flush()
            producer.close()
            wait_committed(kafka_admin, worker, group, topic, bootstrap, timeout=240)
            wait_until(lambda: len(_messages(bootstrap, topics["dlq"])) >= 3, timeout=60, what="dead letters")
            assert worker.stop() == 0, worker.tail()
            # The DLQ exercised: after the fix (a sane bound) the future one is re-sent; its PAN stays masked.
            fixed = _cli(["dlq", "replay", "--dlq-topic", topics["dlq"], "--topic", topic, "--group",
                          f"{group}-dlq"], {**env, "VELOCITY_MAX_FUTURE_MS": str(86_400_000)})
            assert fixed.returncode == 0, fixed.stderr
            outputs["dlq replay"] = fixed.stdout + fixed.stderr
            worker = make_worker(86_400_000).start()
            r = client.post("/v1/score", json={"txn_id": "last", "cc_num": pans[22], "amount": 3.0, "merchant": "m",
                                               "category": "c"})
            assert r.status_code == 200, r.text
            answers.append(r.text)
            wait_committed(kafka_admin, worker, group, topic, bootstrap, timeout=120)
        finally:
            assert worker.stop() == 0, worker.tail()
        r_client = redis.Redis(port=services["redis_port"])
        try:
            redis_items = list(_redis_items(r_client, prefix))
        finally:
            r_client.close()
        api["server"].stop()  # its log is complete
        api_log = (tmp_path / "api" / "server.log").read_text(errors="replace")
        by_topic = {kind: _messages(bootstrap, t) for kind, t in topics.items()}

    # What happened is what the scan covers.
    assert len(redis_items) > 30
    assert len(by_topic["scores"]) >= len(rows) and by_topic["alerts"], "the worker scored and alerted"
    assert len(by_topic["dlq"]) >= 3
    assert "POST /v1/score" in api_log, "the access log is on"
    assert any(b"fut-1" in m.value for m in by_topic["transactions"] if (m.partition, m.offset) not in injected)
    archive_files = sorted((offline / "archive").rglob("*.parquet"))
    archive_rows = [row for f in archive_files for row in pq.read_table(f).to_pylist()]
    assert len({r["txn_id"] for r in archive_rows}) >= len(rows) + 8
    spools = read_spools(offline / "archive").to_pylist()  # a running worker's unrolled rows

    scanner.scan("worker log", (tmp_path / "worker.log").read_text(errors="replace").splitlines())
    scanner.scan("API log", api_log.splitlines())
    for name, text in outputs.items():
        scanner.scan(f"`velocity {name}` output", text.splitlines())
    scanner.scan("API answers", answers)
    scanner.scan("Redis", redis_items)
    scanner.scan("archive row", archive_rows)
    scanner.scan("archive spool", spools)
    for kind, msgs in by_topic.items():
        mine = [m for m in msgs if kind != "transactions" or (m.partition, m.offset) not in injected]
        scanner.scan(f"topic {kind}", [(m.key or b"") + b" " + (m.value or b"") + b" " + repr(m.headers).encode()
                                       for m in mine])
    assert not scanner.hits, f"clear PANs found ({scanner.report()})"
    # The injected messages themselves do carry PANs: the topic scan would have seen them.
    injected_msgs = [m for m in by_topic["transactions"] if (m.partition, m.offset) in injected]
    assert any(scanner.find(m.value) for m in injected_msgs)
