"""Issue 17 section 4: the online store on a real three-master Redis Cluster (local, from the same redis-server).

Expectations come from the issue's and the SPEC's words: a card's keys share a hash slot; a write is one script
call per master; a read is one call per master involved (one pipeline); a night is used when published_ms <= the
transaction's arrival, seen completely or not at all, on every master alike; a duplicate txn_id changes nothing; an
event older than the card's newest on-time event minus the allowed lateness is late. The online-store test modules
themselves also run against the cluster (`test_online_store_modules_pass_against_the_cluster`).
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from featurestore.definitions import REGISTRY_WITH_MERCHANT
from featurestore.state import EventWrite
from tests.conftest import CLUSTER_PORT, REPO

pytestmark = pytest.mark.integration

DAY = 86_400_000
BASE = 1_600_041_600_000  # 2020-09-14 00:00 UTC
LATE_MS = 600_000


@pytest.fixture
def cluster(redis_cluster_settings):
    """A plain redis-py cluster client (the test's own view of the cluster) and a fresh key prefix."""
    client = RedisCluster(host="127.0.0.1", port=redis_cluster_settings.port)
    prefix = f"test:{uuid.uuid4().hex[:12]}"
    yield client, prefix
    keys = list(client.scan_iter(match=f"{prefix}:*", count=10_000))
    if keys:
        client.delete(*keys)
    client.close()


def owner(client: RedisCluster, key: str) -> str:
    return client.get_node_from_key(key).name


def evalsha_calls(client: RedisCluster) -> dict[str, int]:
    """Script calls that ran, per master (INFO commandstats: EVALSHA and EVAL, less failed and rejected ones). On
    a fresh cluster a script's first EVALSHA on a node fails with NOSCRIPT and the client sends EVAL instead: that
    loads the script once per node, it is not a second call of the batch."""
    out = {}
    for node in client.get_primaries():
        stats = node.redis_connection.info("commandstats")
        out[node.name] = sum(int(s.get("calls", 0)) - int(s.get("failed_calls", 0)) - int(s.get("rejected_calls", 0))
                             for s in (stats.get("cmdstat_evalsha", {}), stats.get("cmdstat_eval", {})))
    return out


def spread(client: RedisCluster, n: int = 3) -> list[str]:
    """`n` card ids owned by `n` different masters."""
    found: dict[str, str] = {}
    i = 0
    while len(found) < n:
        found.setdefault(owner(client, f"{{card{i}}}"), f"card{i}")
        i += 1
    return list(found.values())


def store_for(settings, prefix, **kw):
    from stores.redis_online import OnlineStore

    return OnlineStore(settings, prefix=prefix, allowed_lateness_ms=LATE_MS, **kw)


def test_a_cards_keys_share_a_slot_and_a_batch_is_one_call_per_master(redis_cluster_settings, cluster):
    client, prefix = cluster
    store = store_for(redis_cluster_settings, prefix)
    cards = spread(client) + [f"extra{i}" for i in range(20)]
    for card in cards:
        slots = {key_slot(k.encode()) for k in (store.keys.window(card), store.keys.card(card))}
        assert len(slots) == 1, f"{card}'s window and state are in different slots"
    events = [EventWrite(c, f"{c}-t{i}", BASE + i * 1_000, 100 + i) for i in range(3) for c in cards]
    masters = {owner(client, store.keys.card(c)) for c in cards}
    assert len(masters) == 3
    before = evalsha_calls(client)
    applied = store.apply_events(events)
    after = evalsha_calls(client)
    assert {n: after[n] - before[n] for n in after} == dict.fromkeys(masters, 1), "one apply call per master"
    assert [a.status for a in applied] == [0] * len(events)
    seqs = {}
    for e, a in zip(events, applied, strict=True):  # per card, arrival positions strictly increase
        assert a.seq > seqs.get(e.card, 0)
        seqs[e.card] = a.seq
    # A replay changes nothing (duplicates, with their stored seq); an event beyond the lateness is late.
    again = store.apply_events(events)
    assert [a.status for a in again] == [2] * len(events)
    assert [a.seq for a in again] == [a.seq for a in applied]
    late = store.apply_events([EventWrite(c, f"{c}-late", BASE + 2_000 - LATE_MS - 1, 5) for c in cards])
    assert [a.status for a in late] == [1] * len(cards)
    for card in cards:
        f = store.read_features(card, "", BASE + 2_000, None)
        assert f.num_trans_last_10m == 3 and f.sum_cents_last_10m == 100 + 101 + 102, card
    store.close()


NIGHT = {"card_agg_1w": [("c", {"n": 3, "s": 3000})],
         "merchant_agg_7d": [("m", {"n": 20, "f": 2})]}
LATER = {"card_agg_1w": [("c", {"n": 5, "s": 500})],
         "merchant_agg_7d": [("m", {"n": 40, "f": 1})]}


def _card_and_merchant_on_two_masters(client, store) -> tuple[str, str]:
    from stores.online_snapshots import entity_tag

    card = spread(client)[0]
    i = 0
    while owner(client, entity_tag("merchant", f"m{i}")) == owner(client, store.keys.card(card)):
        i += 1
    return card, f"m{i}"


def _rows(night, card, merchant):
    return {g: [(card if k == "c" else merchant, v) for k, v in rows] for g, rows in night.items()}


def test_a_night_is_published_on_every_master_and_read_in_one_call_per_master(redis_cluster_settings, cluster):
    client, prefix = cluster
    store = store_for(redis_cluster_settings, prefix, registry=REGISTRY_WITH_MERCHANT)
    card, merchant = _card_and_merchant_on_two_masters(client, store)
    copies = store.index_copies()
    assert len(copies) == 3 and len({owner(client, k) for k, _ in copies}) == 3, "one index copy per master"
    store.apply_events([EventWrite(card, "t1", BASE + DAY + 5, 700)])
    before_publish = int(time.time() * 1000)
    store.write_snapshot(BASE + DAY, _rows(NIGHT, card, merchant))
    published = store.snapshot_entries()[BASE + DAY].published_ms
    assert published > before_publish, "a cluster publication is dated after its copies are written"
    assert int(time.time() * 1000) >= published, "write_snapshot returns once the night is visible"
    for index, _ in copies:  # every copy holds the same entry
        assert client.hget(index, str(BASE + DAY)) == client.hget(copies[0][0], str(BASE + DAY))

    before = evalsha_calls(client)
    f = store.read_features(card, "new", BASE + DAY + 10, 100, merchant=merchant)
    after = evalsha_calls(client)
    involved = {owner(client, store.keys.card(card)), owner(client, f"{{{merchant}}}")}
    assert {n: after[n] - before[n] for n in after if after[n] != before[n]} == dict.fromkeys(involved, 1)
    assert f.num_trans_last_1w == 3 and f.avg_amt_last_1w == 10.0
    assert f.merchant_num_trans_7d == 20 and f.merchant_fraud_count_7d == 2 and f.merchant_fraud_rate_7d == 0.1
    assert f.num_trans_last_10m == 2 and f.complete
    # Arriving before the publication: no night at all (the card's and the merchant's alike).
    early = store.read_features(card, "new", BASE + DAY + 10, 100, arrival_ms=published - 1, merchant=merchant)
    assert math.isnan(early.num_trans_last_1w) and math.isnan(early.merchant_num_trans_7d)
    store.close()


def test_a_stored_transaction_reads_the_nights_of_its_own_arrival(redis_cluster_settings, cluster):
    """The merchant's node first answers for the request's arrival; the card's node knows the stored
    transaction's own (earlier) one, and the merchant's night follows it."""
    client, prefix = cluster
    store = store_for(redis_cluster_settings, prefix, registry=REGISTRY_WITH_MERCHANT)
    card, merchant = _card_and_merchant_on_two_masters(client, store)
    store.write_snapshot(BASE, _rows(NIGHT, card, merchant), published_ms=BASE)
    (applied,) = store.apply_events([EventWrite(card, "stored", BASE + DAY + 5, 700)])
    arrival = applied.seq // 1000
    store.write_snapshot(BASE + DAY, _rows(LATER, card, merchant), published_ms=arrival + 1)
    old = store.read_features(card, "stored", BASE + DAY + 5, 700, merchant=merchant)
    assert old.num_trans_last_1w == 3 and old.merchant_num_trans_7d == 20 and old.complete, old.values
    assert old.group_cutoffs["merchant_agg_7d"] == BASE
    new = store.read_features(card, "not-stored", BASE + DAY + 5, 700, merchant=merchant)
    assert new.num_trans_last_1w == 5 and new.merchant_num_trans_7d == 40
    store.close()


def test_the_apis_async_reads_equal_the_sync_store_and_the_reader_user_cannot_write(redis_cluster_settings,
                                                                                   cluster):
    from serving.redis_reader import ScriptReader
    from stores.redis_acl import RedisUser, apply_users, users
    from stores.redis_online import AsyncOnlineStore, fold_read

    client, prefix = cluster
    store = store_for(redis_cluster_settings, prefix, registry=REGISTRY_WITH_MERCHANT)
    card, merchant = _card_and_merchant_on_two_masters(client, store)
    store.apply_events([EventWrite(card, "a", BASE + DAY + 1, 300), EventWrite(card, "b", BASE + DAY + 2, 400)])
    store.write_snapshot(BASE + DAY, _rows(NIGHT, card, merchant), published_ms=BASE + DAY)
    tag = uuid.uuid4().hex[:8]
    reader, _ = [RedisUser(f"{u.name}-test-{tag}", u.password, u.rules) for u in users()]
    apply_users(client, [reader], prefix)
    as_reader = redis_cluster_settings.model_copy(update={"username": reader.name, "password": reader.password})
    requests = [(card, "b", BASE + DAY + 2, merchant), (card, "new", BASE + DAY + 3, merchant)]

    async def scorer_reads():
        stock = AsyncOnlineStore(as_reader, prefix=prefix, registry=REGISTRY_WITH_MERCHANT)
        lean = ScriptReader(as_reader, prefix, REGISTRY_WITH_MERCHANT)
        try:
            return (await stock.read_replies(requests, BASE + DAY + 10),
                    await lean.read_replies(requests, BASE + DAY + 10, timeout_s=2.0))
        finally:
            await stock.close()
            await lean.close()

    try:
        assert not ScriptReader.usable(as_reader), "the API keeps redis-py's cluster client"
        stock, lean = asyncio.run(scorer_reads())
        assert stock == lean
        sync = store.read_replies(requests, BASE + DAY + 10)
        for got, want, (_, t, ts, _) in zip(stock, sync, requests, strict=True):
            a, b = fold_read(got, t, ts, 100, REGISTRY_WITH_MERCHANT), fold_read(want, t, ts, 100,
                                                                                REGISTRY_WITH_MERCHANT)
            assert a.values.keys() == b.values.keys()
            assert all(a.values[k] == b.values[k] or (math.isnan(a.values[k]) and math.isnan(b.values[k]))
                       for k in a.values)
        f = fold_read(stock[1], "new", BASE + DAY + 3, 100, REGISTRY_WITH_MERCHANT)
        assert f.num_trans_last_10m == 3 and f.merchant_num_trans_7d == 20
        from stores.redis_online import OnlineStore

        ro = OnlineStore(as_reader, prefix=prefix)
        with pytest.raises(redis.RedisError):
            ro.apply_events([EventWrite(card, "c", BASE + DAY + 3, 1)])
        with pytest.raises(redis.RedisError):
            ro.redis.delete(store.keys.window(card))
        ro.close()
        assert client.zcard(store.keys.window(card)) == 2
    finally:
        client.execute_command("ACL", "DELUSER", reader.name, target_nodes=RedisCluster.ALL_NODES)
        store.close()


@pytest.mark.e2e
def test_services_up_redis_cluster_forms_three_masters_with_the_users_and_down_stops_them(services, tmp_path):
    from services.redis_cluster import cluster_ok

    port = CLUSTER_PORT + 100
    env = {**os.environ, "VELOCITY_KAFKA_PORT": services["bootstrap"].rsplit(":", 1)[1],
           "VELOCITY_REDIS_PORT": str(services["redis_port"])}
    args = ["--run-dir", str(tmp_path), "--redis-cluster", "--cluster-port", str(port)]

    def velocity(*cmd):
        return subprocess.run([sys.executable, "-m", "velocity_cli", "services", *cmd, *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)

    up = velocity("up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert all(cluster_ok(p) for p in range(port, port + 3)), up.stdout
        creds = dict(line.split("=", 1) for line in (tmp_path / "redis" / "users.env").read_text().split())
        for p in range(port, port + 3):  # ACLs are per node: the reader exists on every master
            r = redis.Redis(port=p, username="velocity-reader", password=creds["READER_PASSWORD"])
            assert r.ping()
            r.close()
        again = velocity("up")
        assert again.returncode == 0 and "already running" in again.stdout, again.stdout
    finally:
        down = velocity("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "Kafka: not started by velocity" in down.stdout, "down stops only what this run folder started"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(cluster_ok(p) for p in range(port, port + 3)):
        time.sleep(0.2)
    assert not any(cluster_ok(p) for p in range(port, port + 3))


@pytest.mark.slow
def test_online_store_modules_pass_against_the_cluster(redis_cluster_settings):
    """The online-store test modules (oracle, snapshots, merchant reads, ACL users, rebuild, the stream scorer's
    online = offline for merchant and spending features) on the cluster, with every Redis fixture pointed at it
    (VELOCITY_TEST_REDIS_CLUSTER=1, tests/conftest.py)."""
    modules = ["tests/test_online_oracle.py", "tests/test_merchant_online.py", "tests/test_redis_acl.py",
               "tests/test_rebuild.py", "tests/test_merchant_online_offline.py"]
    env = {**os.environ, "VELOCITY_TEST_REDIS_CLUSTER": "1", "VELOCITY_TEST_REDIS_CLUSTER_PORT": str(CLUSTER_PORT)}
    # The CLI's table display (`velocity features get`) is checked on one Redis; its store calls are the ones here.
    skip = ["--deselect", "tests/test_merchant_online.py::test_features_get_shows_the_merchant_and_card_groups"]
    run = subprocess.run([sys.executable, "-m", "pytest", *modules, *skip, "-q", "-p", "no:cacheprovider"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=570)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def test_the_api_scores_from_the_cluster(services, kafka_admin, redis_cluster_settings, cluster, tmp_path):
    """`velocity serve` with VELOCITY_REDIS_CLUSTER=true: the card's windows and nightly groups and the merchant's
    nightly groups come from their masters, into one answer."""
    from featurestore.definitions import REGISTRY
    from featurestore.entity import EntityKeyer
    from stores.redis_online import OnlineStore, delete_prefix
    from tests.api_harness import SECRET, isolated_api
    from tests.synthetic import luhn_pan

    client, _ = cluster
    pan = luhn_pan(np.random.default_rng(17))
    card = EntityKeyer(SECRET)(pan)
    assert owner(client, f"{{{card}}}") != owner(client, "{m-1}"), "the read must span two masters"
    t = int(time.time() * 1000) - 60_000
    where = {**services, "redis_port": redis_cluster_settings.port}
    with isolated_api(where, kafka_admin, tmp_path, "cluster", env={"VELOCITY_REDIS_CLUSTER": "true"}) as api:
        store = OnlineStore(redis_cluster_settings, prefix=api["prefix"])
        try:
            store.apply_events([EventWrite(card, "h1", t - 120_000, 1_000), EventWrite(card, "h2", t - 60_000, 3_000)])
            night = {"card_agg_1w": [(card, {"n": 6, "s": 12_000})]}
            if "merchant_agg_7d" in {g.name for g in REGISTRY.batch_groups}:
                night["merchant_agg_7d"] = [("m-1", {"n": 20, "f": 2})]
            store.write_snapshot(t - 3_600_000, night)
            r = api["client"].post("/v1/score?publish=false", json={
                "txn_id": "probe", "cc_num": pan, "amount": 20.0, "merchant": "m-1", "category": "grocery", "ts": t})
            assert r.status_code == 200, r.text
            got = r.json()["features"]
            assert got["num_trans_last_10m"] == 3 and got["avg_amt_last_10m"] == 20.0  # (10 + 30 + 20) / 3
            assert got["num_trans_last_1w"] == 6 and got["avg_amt_last_1w"] == 20.0
            if "merchant_agg_7d" in night:
                assert got["merchant_num_trans_7d"] == 20 and got["merchant_fraud_rate_7d"] == 0.1
        finally:
            delete_prefix(store.redis, api["prefix"])
            store.close()


def test_a_taken_cluster_bus_port_is_one_clear_error(tmp_path):
    """A node's cluster bus listens on its port + 10000: a port whose bus port is taken (or a port that is itself
    another node's bus) is refused with one line naming it, not a cluster that never forms."""
    import socket

    from services.manager import ServiceConfig, ServiceError
    from services.redis_cluster import cluster_up

    with socket.socket() as bus, socket.socket() as other:
        bus.bind(("127.0.0.1", 0))
        bus.listen()
        node = bus.getsockname()[1] - 10_000
        if node <= 1024:
            pytest.skip("the OS gave an ephemeral port below 11025; nothing to test with it")
        other.bind(("127.0.0.1", 0))
        other.listen()
        for port, taken in ((node, node + 10_000), (other.getsockname()[1], other.getsockname()[1])):
            with pytest.raises(ServiceError) as err:
                cluster_up(ServiceConfig(run_dir=tmp_path), port, masters=1)
            assert str(taken) in str(err.value) and "\n" not in str(err.value)
