"""Least-privilege Redis users on the real server: the scorer's user reads features and nothing else; the
writers' user applies windows and snapshots but cannot flush or reconfigure; neither leaves its key prefix."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis

from featurestore.state import EventWrite
from stores.redis_acl import RedisUser, apply_users, users
from stores.redis_online import AsyncOnlineStore, OnlineStore

pytestmark = pytest.mark.integration

FORBIDDEN_EVERYWHERE = [("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "SET", "maxmemory", "1"), ("KEYS", "*"),
                        ("DEBUG", "SLEEP", "0"), ("SCRIPT", "FLUSH"), ("ACL", "SETUSER", "x", "on")]


@pytest.fixture
def accounts(redis_settings, key_prefix):
    """The product's two users under test-only names (users are server-wide), for this test's prefix."""
    from stores.redis_cluster_store import sync_client

    admin = sync_client(redis_settings)  # under Redis Cluster: users set on every node
    tag = uuid.uuid4().hex[:8]
    made = [RedisUser(f"{u.name}-test-{tag}", u.password, u.rules) for u in users()]
    apply_users(admin, made, key_prefix)
    yield {"reader": made[0], "writer": made[1]}
    for u in made:
        admin.execute_command("ACL", "DELUSER", u.name, **({"target_nodes": "all"} if redis_settings.cluster else {}))
    admin.close()


def as_user(redis_settings, user: RedisUser):
    return redis_settings.model_copy(update={"username": user.name, "password": user.password})


def refused(client: redis.Redis, *command) -> bool:
    try:
        client.execute_command(*command)
    except redis.exceptions.NoPermissionError:
        return True
    except redis.exceptions.ResponseError as exc:  # a write inside a script; DEBUG, which the server disables
        return any(s in str(exc) for s in ("NOPERM", "no permissions", "can't run this command", "command not allowed"))
    return False


def test_reader_reads_features_and_cannot_write_delete_or_flush(redis_settings, key_prefix, accounts):
    now = int(time.time() * 1000)
    writer = OnlineStore(as_user(redis_settings, accounts["writer"]), prefix=key_prefix)
    applied = writer.apply_events([EventWrite("card-a", f"t{i}", now - 60_000 + i * 1_000, 1_000 + i) for i in range(3)])
    assert [a.status for a in applied] == [0, 0, 0]
    writer.write_snapshot(now - now % 86_400_000, [("card-a", 7, 70_000)], published_ms=now - 1)
    reader = OnlineStore(as_user(redis_settings, accounts["reader"]), prefix=key_prefix)
    features = reader.read_features("card-a", "t-new", now, 500)
    assert features.num_trans_last_10m == 4 and features.num_trans_last_1w == 7

    async def scorer_path():  # the HTTP scorer reads through the asyncio client and the same script
        store = AsyncOnlineStore(as_user(redis_settings, accounts["reader"]), prefix=key_prefix)
        try:
            return await store.read_many([("card-a", "t-new", now, 500)])
        finally:
            await store.close()

    assert asyncio.run(scorer_path())[0].num_trans_last_10m == 4

    client = reader.redis
    key = writer.keys.window("card-a")
    for command in [("SET", f"{key_prefix}:x", "1"), ("DEL", key), ("ZADD", key, "1", "m"), ("EXPIRE", key, "1"),
                    ("UNLINK", key), ("EVAL", "return redis.call('DEL', KEYS[1])", "1", key),
                    ("GET", "outside:the:prefix"), *FORBIDDEN_EVERYWHERE]:
        assert refused(client, *command), f"the reader's user may run {command[0]}"
    with pytest.raises(redis.exceptions.RedisError):
        reader.apply_events([EventWrite("card-a", "t9", now, 1)])
    assert writer.redis.exists(key), "nothing the reader tried changed the store"
    reader.close()
    writer.close()


def test_writer_writes_features_but_cannot_flush_or_leave_its_prefix(redis_settings, key_prefix, accounts):
    writer = OnlineStore(as_user(redis_settings, accounts["writer"]), prefix=key_prefix)
    client = writer.redis
    assert client.set(f"{key_prefix}:probe", "1") and client.delete(f"{key_prefix}:probe") == 1
    for command in [("SET", "outside:the:prefix", "1"), ("GET", "outside:the:prefix"), *FORBIDDEN_EVERYWHERE]:
        assert refused(client, *command), f"the writer's user may run {command}"
    writer.close()


def test_a_rerun_replaces_a_users_rights_instead_of_widening_them(redis_settings, key_prefix, accounts):
    admin = redis.Redis(**redis_settings.client_kwargs())
    reader = accounts["reader"]
    admin.execute_command("ACL", "SETUSER", reader.name, "+set")  # someone widened it by hand
    apply_users(admin, [reader], key_prefix)
    client = redis.Redis(**as_user(redis_settings, reader).client_kwargs())
    assert refused(client, "SET", f"{key_prefix}:x", "1")
    client.close()
    admin.close()


def test_services_up_creates_the_users_once_with_stable_passwords(services, tmp_path):
    from services.manager import ServiceConfig, redis_users

    cfg = ServiceConfig(run_dir=tmp_path, redis_port=services["redis_port"])
    path = redis_users(cfg)
    first = path.read_text()
    assert path.stat().st_mode & 0o077 == 0, "the passwords file is readable by its owner only"
    assert redis_users(cfg).read_text() == first, "a second `up` keeps the credentials"
    creds = dict(line.split("=", 1) for line in first.split())
    reader = redis.Redis(port=services["redis_port"], username="velocity-reader", password=creds["READER_PASSWORD"])
    assert reader.ping() and refused(reader, "SET", "vel:v1:x", "1")
    reader.close()
