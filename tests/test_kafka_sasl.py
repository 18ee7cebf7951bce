"""Kafka with SASL/SCRAM-SHA-256 (issue 17 section 3b): one set of VELOCITY_KAFKA_* settings reaches every client.

A private single-node KRaft broker whose only client listener is SASL_PLAINTEXT (tests/sasl_broker.py). With the
credentials: `velocity replay` sends a history, `velocity stream` aggregates it (online state equal to the oracle),
`velocity dlq replay --dry-run` reads the worker's dead letters, the consistency reader reads the topic, and the API
publishes a scored transaction. With a wrong password, replay, the worker and the DLQ replay each stop with one
clear line (exit 2) instead of a bootstrap timeout, and the API keeps scoring and says why Kafka is unavailable.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stores.redis_online import OnlineStore
from tests import synthetic
from tests.api_harness import Server
from tests.conftest import REPO
from tests.helpers import wait_until
from tests.sasl_broker import SaslBroker
from tests.stream_harness import SECRET, Worker
from tests.test_stream_worker import RETAIN_ALL_MS, assert_online_equals_oracle
from tests.toy_models import save_model, toy_booster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USER, PASSWORD = "velocity", "scram-" + uuid.uuid4().hex[:16]


def _cli(args: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "velocity_cli", *args], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def _one_clear_line(res: subprocess.CompletedProcess, t0: float) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert time.monotonic() - t0 < 90, "the refusal should come at once, not after a bootstrap timeout"
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "refused the credentials" in lines[0] and "VELOCITY_KAFKA_SASL_PASSWORD" in lines[0]
    assert PASSWORD not in res.stderr and "wrong-password" not in res.stderr  # never a password in a message
    return lines[0]


def test_every_client_over_sasl_scram_and_a_wrong_password_is_one_clear_line(services, key_prefix, redis_settings,
                                                                            tmp_path):
    from tests.test_ingest import _free_port_pair

    port = _free_port_pair()
    broker = SaslBroker(tmp_path / "kafka", port, port + 1, {USER: PASSWORD}).start()
    good = {"VELOCITY_ENTITY_SECRET": SECRET, **broker.env(USER)}
    bad = {**good, "VELOCITY_KAFKA_SASL_PASSWORD": "wrong-password"}
    topic = "tx"
    rows = synthetic.history(n=1500, cards=25, seed=29)
    history = tmp_path / "history.parquet"
    pq.write_table(pa.Table.from_pylist(rows), history)
    worker = server = None
    try:
        # Wrong password: replay stops in one line, and sends nothing.
        t0 = time.monotonic()
        _one_clear_line(_cli(["replay", "--input", str(history), "--topic", topic], bad), t0)
        # Right password: the replay goes through.
        done = _cli(["replay", "--input", str(history), "--topic", topic, "--speed", "max"], good, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"sent {len(rows):,}" in done.stderr

        # The worker with a wrong password: one line. With the right one: aggregates everything.
        offline = tmp_path / "offline"
        offline.mkdir()

        def make_worker(env: dict, name: str) -> Worker:
            w = Worker(topic=topic, prefix=key_prefix, group=f"g-{uuid.uuid4().hex[:8]}", offline=offline,
                       bootstrap=broker.bootstrap, redis_port=services["redis_port"], log=tmp_path / f"{name}.log",
                       retention_ms=RETAIN_ALL_MS)
            w.env.update(env)
            return w

        refused = make_worker(bad, "refused")
        t0 = time.monotonic()
        refused.start()
        assert refused.proc.wait(timeout=120) == 2, refused.tail()
        log = (tmp_path / "refused.log").read_text()
        assert "refused the credentials" in log and "Traceback" not in log and "wrong-password" not in log

        worker = make_worker(good, "worker").start()
        store = OnlineStore(redis_settings, prefix=key_prefix)
        try:
            def aggregated() -> bool:
                assert worker.alive(), worker.tail()
                try:
                    assert_online_equals_oracle(store, rows)
                    return True
                except AssertionError:
                    return False
            wait_until(aggregated, timeout=240, interval=2.0, what="the worker to aggregate the replay over SASL")
        finally:
            store.close()

        # The DLQ replay (a dry run) reads the worker's dead letters (the late rows) over SASL; wrong: one line.
        dlq = ["dlq", "replay", "--dry-run", "--topic", topic, "--dlq-topic", f"{topic}.dlq"]
        t0 = time.monotonic()
        _one_clear_line(_cli(dlq, bad), t0)
        dry = _cli(dlq, good)
        assert dry.returncode == 0, dry.stderr[-2000:]
        assert "dead letters read" in dry.stderr or "read" in dry.stderr

        # The consistency reader (kafka-python consumer) reads the topic with the same settings.
        _consistency_reader_reads(broker, topic)

        # The API's producer publishes over SASL.
        models = tmp_path / "data" / "models"
        save_model(models, "v1", toy_booster(1))
        server = Server(env={**good, "VELOCITY_REDIS_KEY_PREFIX": key_prefix,
                             "VELOCITY_REDIS_PORT": str(services["redis_port"]),
                             "VELOCITY_DATA_DIR": str(tmp_path / "data"), "VELOCITY_KAFKA_TOPIC_TRANSACTIONS": "api.tx",
                             "VELOCITY_KAFKA_TOPIC_SCORES": "api.sc"}, log=tmp_path / "api.log").start()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            wait_until(lambda: client.get("/readyz").json()["kafka"]["state"] == "connected", timeout=60,
                       what="the API's producer over SASL")
            answer = client.post("/v1/score", json={**{k: rows[0][k] for k in ("cc_num", "amount", "merchant",
                                                                                "category")},
                                                    "txn_id": "api-sasl-1"}).json()
            assert answer["published"] is True
        wait_until(lambda: b"api-sasl-1" in b"".join(_values(broker, "api.tx")), timeout=60,
                   what="the API's message on the SASL broker")
        server.stop()
        # The API with a wrong password keeps scoring, holds the transaction, and says why.
        server = Server(env={**bad, "VELOCITY_REDIS_KEY_PREFIX": key_prefix,
                             "VELOCITY_REDIS_PORT": str(services["redis_port"]),
                             "VELOCITY_DATA_DIR": str(tmp_path / "data"), "VELOCITY_KAFKA_TOPIC_TRANSACTIONS": "api.tx",
                             "VELOCITY_KAFKA_TOPIC_SCORES": "api.sc"}, log=tmp_path / "api-bad.log").start()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            kafka = wait_until(lambda: (k := client.get("/readyz").json()["kafka"])["state"] == "unavailable" and k,
                               timeout=60, what="the API to report Kafka unavailable")
            assert "refused the credentials" in kafka["last_error"], kafka
            answer = client.post("/v1/score", json={**{k: rows[1][k] for k in ("cc_num", "amount", "merchant",
                                                                                "category")},
                                                    "txn_id": "api-sasl-2"}).json()
            assert answer["published"] is False and answer["queued"] is True
        assert "wrong-password" not in (tmp_path / "api-bad.log").read_text()
    finally:
        if server is not None:
            server.stop()
        code = worker.stop() if worker is not None else 0
        broker.stop()
    assert code == 0, worker.tail()


def _values(broker: SaslBroker, topic: str) -> list[bytes]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=2000, security_protocol="SASL_PLAINTEXT",
                             sasl_mechanism="SCRAM-SHA-256", sasl_plain_username=USER, sasl_plain_password=PASSWORD)
    try:
        return [m.value for m in consumer]
    finally:
        consumer.close()


def _consistency_reader_reads(broker: SaslBroker, topic: str) -> None:
    import os

    from batch.consistency import read_scores

    saved = dict(os.environ)
    os.environ.update(broker.env(USER))
    try:
        records, skipped = read_scores(broker.bootstrap, topic, sample=50, timeout_s=30)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert skipped > 0 and not records  # transactions, not score records: read, and told apart
