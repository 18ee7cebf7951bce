"""Session fixtures: real Kafka and Redis, started once (or reused if already up); per-test names.

`VELOCITY_TEST_REDIS_CLUSTER=1` runs the session's online-store tests against a local three-master Redis Cluster
(started on ports 7100-7102, or VELOCITY_TEST_REDIS_CLUSTER_PORT.., by `velocity services up --redis-cluster`
logic, or reused): every fixture built on `redis_settings` then talks to the cluster. tests/test_redis_cluster.py
does that for the online-store modules, so CI covers both modes.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def services():
    """Make sure Kafka and Redis answer; start them with `velocity services up` logic if not."""
    from services.manager import ServiceConfig, port_open, up

    kafka_port = int(os.environ.get("VELOCITY_KAFKA_PORT", "9092"))
    redis_port = int(os.environ.get("VELOCITY_REDIS_PORT", "6379"))
    if not (port_open(kafka_port) and port_open(redis_port)):
        cfg = ServiceConfig(run_dir=Path(os.environ.get("VELOCITY_RUN_DIR", REPO / ".velocity")),
                            kafka_port=kafka_port, controller_port=kafka_port + 1, redis_port=redis_port)
        up(cfg)
    if cluster_mode():  # every process the tests start inherits the cluster mode, and gets the cluster's port
        _ensure_cluster()
        os.environ["VELOCITY_REDIS_CLUSTER"] = "true"
        redis_port = CLUSTER_PORT
    return {"bootstrap": f"127.0.0.1:{kafka_port}", "redis_port": redis_port}


#: The test cluster's first master port (three masters from there).
CLUSTER_PORT = int(os.environ.get("VELOCITY_TEST_REDIS_CLUSTER_PORT", "7100"))


def cluster_mode() -> bool:
    """The session runs its Redis tests against the local Redis Cluster (VELOCITY_TEST_REDIS_CLUSTER=1)."""
    return os.environ.get("VELOCITY_TEST_REDIS_CLUSTER", "") not in ("", "0", "false")


def _ensure_cluster() -> None:
    from services.manager import ServiceConfig
    from services.redis_cluster import cluster_ok, cluster_up

    if not cluster_ok(CLUSTER_PORT):
        cluster_up(ServiceConfig(run_dir=Path(os.environ.get("VELOCITY_RUN_DIR", REPO / ".velocity"))), CLUSTER_PORT)


@pytest.fixture(scope="session")
def redis_cluster_settings():
    """Settings of the local three-master Redis Cluster, started once (reused when it already answers)."""
    from featurestore.config import RedisSettings

    _ensure_cluster()
    return RedisSettings(port=CLUSTER_PORT, cluster=True)


@pytest.fixture(scope="session")
def redis_settings(services):
    from featurestore.config import RedisSettings

    return RedisSettings(port=services["redis_port"], cluster=cluster_mode())


@pytest.fixture
def key_prefix(redis_settings):
    """A Redis key prefix no other test uses; its keys are deleted afterwards (on every master of a cluster)."""
    prefix = f"test:{uuid.uuid4().hex[:12]}"
    yield prefix
    from stores.redis_cluster_store import sync_client
    from stores.redis_online import delete_prefix

    client = sync_client(redis_settings)
    delete_prefix(client, prefix)
    client.close()


@pytest.fixture
def online_store(redis_settings, key_prefix):
    from stores.redis_online import OnlineStore

    store = OnlineStore(redis_settings, prefix=key_prefix)
    yield store
    store.close()


@pytest.fixture(scope="session")
def kafka_admin(services):
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=services["bootstrap"], request_timeout_ms=15000)
    yield admin
    admin.close()


@pytest.fixture
def make_topic(kafka_admin):
    """Create uniquely named topics for one test; delete them afterwards."""
    from kafka.admin import NewTopic

    from stores.kafka_topics import topic_configs

    created: list[str] = []

    def _make(base: str = "t", partitions: int = 4) -> str:
        name = f"test.{base}.{uuid.uuid4().hex[:10]}"
        # Test events carry old event-time timestamps: without this the broker's retention check could delete
        # them mid-test.
        kafka_admin.create_topics([NewTopic(name, partitions, 1, topic_configs=topic_configs())])
        created.append(name)
        return name

    yield _make
    if created:
        with contextlib.suppress(Exception):  # a topic already gone is fine
            kafka_admin.delete_topics(created)
