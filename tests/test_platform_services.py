"""The platform: real Kafka and Redis round trips, the CLI, and no clear PAN in Redis or logs."""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer

from featurestore.entity import RedactPANFilter, entity_key, install_pan_redaction
from featurestore.state import EventWrite
from tests.conftest import REPO

PAN = "4539578763621486"


@pytest.mark.integration
def test_kafka_produce_consume_and_redis_roundtrip(services, make_topic, online_store):
    topic = make_topic("roundtrip", partitions=1)
    producer = KafkaProducer(bootstrap_servers=services["bootstrap"], acks="all")
    value = uuid.uuid4().hex.encode()
    producer.send(topic, key=b"k", value=value, timestamp_ms=1_600_000_000_000).get(timeout=30)
    producer.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=services["bootstrap"], auto_offset_reset="earliest",
                             consumer_timeout_ms=20_000, group_id=f"g-{uuid.uuid4().hex[:6]}")
    got = next(iter(consumer))
    consumer.close()
    assert (got.key, got.value, got.timestamp) == (b"k", value, 1_600_000_000_000)

    online_store.redis.set(f"{online_store.keys.prefix}:probe", value)
    assert online_store.redis.get(f"{online_store.keys.prefix}:probe") == value


@pytest.mark.integration
def test_topics_keep_old_event_time_messages(services, kafka_admin):
    # Replayed history is stamped with its (old) event time; time-based retention would delete it within minutes.
    from kafka.admin import ConfigResource, ConfigResourceType

    from stores.kafka_topics import ensure_topics

    name = f"test.retention.{uuid.uuid4().hex[:10]}"
    assert ensure_topics(services["bootstrap"], {name: 1}) == [name]
    try:
        got = kafka_admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name, configs=["retention.ms"])])
        assert got["topic"][name]["retention.ms"]["value"] == "-1"
        assert ensure_topics(services["bootstrap"], {name: 1}) == []  # idempotent
    finally:
        kafka_admin.delete_topics([name])


@pytest.mark.integration
def test_no_clear_pan_in_redis_or_logs(online_store, caplog):
    key = entity_key(PAN, "secret")
    online_store.apply_events([EventWrite(key, "t1", 1_600_000_000_000, 1000)])
    online_store.write_snapshot(1_600_000_000_000, [(key, 1, 1000)])
    r = online_store.redis
    for k in r.scan_iter(match=f"{online_store.keys.prefix}:*"):
        assert PAN.encode() not in k
        kind = r.type(k).decode()
        readers = {"hash": r.hgetall, "zset": lambda key: r.zrange(key, 0, -1), "string": r.get}
        dump = readers[kind](k)
        assert PAN not in repr(dump)
    logger = logging.getLogger("velocity.pan-test")
    install_pan_redaction()
    caplog.handler.addFilter(RedactPANFilter())
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("rejected transaction %s from card %s", "t1", PAN)
    assert PAN not in caplog.text and "************1486" in caplog.text


def _velocity(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "velocity_cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=180)


@pytest.mark.e2e
def test_services_cli_up_is_idempotent_and_status_shows_both(services):
    up = _velocity("services", "up")
    assert up.returncode == 0, up.stderr
    assert "already listening" in up.stdout
    status = _velocity("services", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("running") == 2


@pytest.mark.e2e
def test_every_command_has_help():
    import velocity_cli

    def walk(group, path):
        for cmd in group.registered_commands:
            yield [*path, cmd.name or cmd.callback.__name__]
        for sub in group.registered_groups:
            yield [*path, sub.name]
            yield from walk(sub.typer_instance, [*path, sub.name])

    commands = list(walk(velocity_cli.app, []))
    assert {"services", "features", "generate", "replay", "stream", "batch", "train", "serve", "demo"} <= {
        c[0] for c in commands
    }
    for cmd in commands + [[]]:
        res = _velocity(*cmd, "--help")
        assert res.returncode == 0 and "Usage" in res.stdout, (cmd, res.stderr)


@pytest.mark.e2e
def test_features_key_never_prints_the_pan():
    res = _velocity("features", "key", PAN)
    assert res.returncode == 0 and PAN not in res.stdout and "1486" in res.stdout


def _path_without(tmp_path, *hidden: str) -> str:
    """A PATH holding every tool of this machine's PATH except `hidden` (as a machine without them would)."""
    import os
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sed", "cut", "java", "mvn", "redis-server", "sudo", "env", "cat"):
        found = shutil.which(tool)
        if found and tool not in hidden:
            os.symlink(found, bin_dir / tool)
    os.symlink(os.path.join(sys.base_prefix, "bin", "python3.11"), bin_dir / "python3.11")  # not a pyenv shim
    fake_id = bin_dir / "id"  # an ordinary user: `id -u` is not 0
    fake_id.write_text("#!/bin/sh\necho 1000\n")
    fake_id.chmod(0o755)
    return str(bin_dir)


@pytest.mark.e2e
def test_system_deps_says_exactly_what_to_run_when_it_cannot_install(tmp_path):
    """Not root, no sudo, redis-server missing: one line naming the package and the command to run."""
    script = REPO / "scripts" / "system-deps.sh"
    env = {"PATH": _path_without(tmp_path, "redis-server", "sudo"), "HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "missing system packages: redis-server" in done.stderr
    assert "sudo apt-get install -y redis-server" in done.stderr
    no_python = subprocess.run(["bash", str(script)], env={**env, "PYTHON": "python3.99"}, capture_output=True,
                               text=True, timeout=60)
    assert no_python.returncode == 1 and "python3.99 is required" in no_python.stderr
    ok = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "system packages: Python 3.11" in ok.stdout, ok.stderr
