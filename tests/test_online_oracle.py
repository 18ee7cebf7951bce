"""The Redis-backed online store against the brute-force oracle, on hypothesis-generated streams."""

from __future__ import annotations

import math
import uuid

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurestore.state import ApplyStatus, EventWrite
from stores.redis_online import OnlineStore, delete_prefix
from tests import oracle
from tests.oracle import Arrival

pytestmark = pytest.mark.integration
W = 600_000
BASE = 1_600_000_000_000

# Offsets that stress the semantics: exact window edges (k*W, +-1 ms), ties, and spread-out times.
edge_offsets = st.sampled_from([0, 1, W - 1, W, W + 1, 2 * W, 2 * W + 1, 3 * W - 1])
any_offsets = st.integers(min_value=0, max_value=4 * W)


@st.composite
def streams(draw):
    cards = draw(st.lists(st.sampled_from(["c1", "c2", "c3"]), min_size=1, max_size=3, unique=True))
    n = draw(st.integers(1, 30))
    arrivals: list[Arrival] = []
    for i in range(n):
        if arrivals and draw(st.integers(0, 9)) == 0:  # a redelivered or re-sent txn_id
            prev = draw(st.sampled_from(arrivals))
            if draw(st.booleans()):
                arrivals.append(prev)
            else:  # same txn_id, different content: the first one must still win
                arrivals.append(Arrival(prev.card, prev.txn_id, prev.ts + 5, prev.amount_cents + 7))
            continue
        ts = BASE + draw(st.one_of(edge_offsets, any_offsets))
        arrivals.append(Arrival(draw(st.sampled_from(cards)), f"x{i}", ts, draw(st.integers(1, 500_000))))
    cuts = sorted(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=3)))
    return arrivals, cuts


@pytest.fixture(scope="module")
def raw_client(redis_settings):
    from stores.redis_cluster_store import sync_client

    client = sync_client(redis_settings)  # a cluster client under VELOCITY_TEST_REDIS_CLUSTER
    yield client
    client.close()


def assert_latest_aggregates(store: OnlineStore, rows) -> None:
    """Each card's newest on-time ts, and its window as of then (what `velocity features get` shows): its on-time
    events with ts in [newest - W, newest], read back without a transaction of its own."""
    for card in {r.card for r in rows}:
        on_time = [r for r in rows if r.card == card and not r.late]
        newest = max(r.ts for r in on_time)
        live = [r for r in on_time if r.ts >= newest - W]
        state = store.card_state(card)
        f = store.read_features(card, "__inspect__", newest, None)
        got = (int(state["newest"]), f.num_trans_last_10m, f.sum_cents_last_10m)
        assert got == (newest, len(live), sum(r.amount_cents for r in live)), (card, state)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=streams())
def test_online_read_equals_oracle(redis_settings, raw_client, data):
    arrivals, cuts = data
    prefix = f"test:oracle:{uuid.uuid4().hex[:10]}"
    store = OnlineStore(redis_settings, prefix=prefix, allowed_lateness_ms=W, client=raw_client)
    try:
        writes = [EventWrite(a.card, a.txn_id, a.ts, a.amount_cents) for a in arrivals]
        applied = []
        for lo, hi in zip([0, *cuts], [*cuts, len(writes)], strict=True):  # several batches
            applied += store.apply_events(writes[lo:hi])
            assert_latest_aggregates(store, oracle.window_10m(arrivals[:hi], W))
        replay = store.apply_events(writes)  # a full replay changes nothing

        rows = oracle.window_10m(arrivals, W)
        first = {r.position: r for r in rows}
        for i, a in enumerate(applied):
            if i in first:
                assert a.status == (ApplyStatus.LATE if first[i].late else ApplyStatus.APPLIED)
            else:
                assert a.status in (ApplyStatus.DUPLICATE, ApplyStatus.DUPLICATE_LATE)
        # A card's arrival positions increase in arrival order; a duplicate reports its first copy's position.
        seq_of = {}
        for a, w in zip(applied, writes, strict=True):
            seq_of.setdefault(w.txn_id, a.seq)
            assert a.seq == seq_of[w.txn_id]
        for card in {w.card for w in writes}:
            seqs = [seq_of[r.txn_id] for r in rows if r.card == card]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert all(a.status != ApplyStatus.APPLIED for a in replay)
        assert [a.seq for a in replay] == [seq_of[w.txn_id] for w in writes]

        for r in rows:
            f = store.read_features(r.card, r.txn_id, r.ts, r.amount_cents)
            assert (f.num_trans_last_10m, f.sum_cents_last_10m) == (r.count, r.sum_cents), r
            assert f.ts == r.ts and f.complete
        # A transaction the store has not seen (the HTTP scorer's case): everything arrived so far counts.
        for card in {a.card for a in arrivals}:
            t = arrivals[-1].ts
            want = oracle.unseen_window(arrivals, card, t, 123, W)
            got = store.read_features(card, "new", t, 123)
            assert (got.num_trans_last_10m, got.sum_cents_last_10m) == want
    finally:
        delete_prefix(raw_client, prefix)


@st.composite
def long_streams(draw):
    """Streams spanning several retentions (no repeated txn_id: a redelivery of a trimmed event is re-applied)."""
    cards = draw(st.lists(st.sampled_from(["c1", "c2"]), min_size=1, max_size=2, unique=True))
    n = draw(st.integers(1, 40))
    step = draw(st.sampled_from([W // 7, W // 2, W, 2 * W]))
    arrivals = [Arrival(draw(st.sampled_from(cards)), f"x{i}",
                        BASE + i * step + draw(st.integers(-2 * W, W)), draw(st.integers(1, 500_000)))
                for i in range(n)]
    cuts = sorted(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=4)))
    return arrivals, cuts


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=long_streams())
def test_reads_under_retention_equal_the_oracle_or_say_they_are_incomplete(redis_settings, raw_client, data):
    """With a retention of window + lateness, the store trims as time moves on; every read it calls complete is
    the oracle's, and the read of each card's newest on-time event is always complete."""
    arrivals, cuts = data
    prefix = f"test:oracle:{uuid.uuid4().hex[:10]}"
    store = OnlineStore(redis_settings, prefix=prefix, allowed_lateness_ms=W, retention_ms=2 * W, client=raw_client)
    try:
        writes = [EventWrite(a.card, a.txn_id, a.ts, a.amount_cents) for a in arrivals]
        applied = []
        for lo, hi in zip([0, *cuts], [*cuts, len(writes)], strict=True):
            applied += store.apply_events(writes[lo:hi])
        rows = oracle.window_10m(arrivals, W)
        assert [a.status == ApplyStatus.LATE for a in applied] == [r.late for r in rows]
        for r in rows:
            f = store.read_features(r.card, r.txn_id, r.ts, r.amount_cents)
            if f.complete:
                assert (f.num_trans_last_10m, f.sum_cents_last_10m) == (r.count, r.sum_cents), r
        for card in {r.card for r in rows}:
            newest = max((r for r in rows if r.card == card and not r.late), key=lambda r: r.ts)
            f = store.read_features(card, newest.txn_id, newest.ts, newest.amount_cents)
            assert f.complete and (f.num_trans_last_10m, f.sum_cents_last_10m) == (newest.count, newest.sum_cents)
    finally:
        delete_prefix(raw_client, prefix)


def test_the_store_keeps_two_keys_per_card_and_no_inspection_only_state(online_store):
    """Per card: its window events and one hash (state + idempotency records); nothing only a debug command reads
    (the apply script once kept a running 10-minute aggregate for `velocity features get`: a Redis write per
    event that no read used)."""
    from stores.redis_online import CARD_STATE_FIELDS

    store = online_store
    store.apply_events([EventWrite("c", f"t{i}", BASE + i * 1000, 100 + i) for i in range(5)])
    store.apply_events([EventWrite("c", "t5", BASE + 9000, 100), EventWrite("d", "u0", BASE, 7)])
    r = store.redis
    keys = {k.decode() for k in r.scan_iter(match=f"{store.keys.prefix}:*")}
    assert keys == {store.keys.card(c) for c in "cd"} | {store.keys.window(c) for c in "cd"}
    assert {k.decode() for k in r.hkeys(store.keys.card("c"))} == {""} | {f"t{i}" for i in range(6)}
    state = store.card_state("c")
    assert tuple(state) == CARD_STATE_FIELDS == ("last_seq", "newest", "oldest", "trimmed")
    assert (state["newest"], state["oldest"], state["trimmed"]) == (str(BASE + 9000), str(BASE), "")
    assert int(state["last_seq"]) == store.apply_events([EventWrite("c", "t5", 0, 0)])[0].seq  # a duplicate
    assert r.zcard(store.keys.window("c")) == 6 and all(r.ttl(k) > 0 for k in keys)


def test_one_card_filling_whole_batches(online_store):
    """A batch of one card's events: the script's per-card calls go out in bounded pieces (Lua's unpack limit)."""
    store = online_store
    writes = [EventWrite("c", f"x{i}", BASE + i, 100 + i % 7) for i in range(2500)]  # 2,000 + 500 per call
    first, again = store.apply_events(writes), store.apply_events(writes[::-1])
    assert {a.status for a in first} == {ApplyStatus.APPLIED} and {a.status for a in again} == {ApplyStatus.DUPLICATE}
    seqs = [a.seq for a in first]
    assert seqs == sorted(set(seqs)) and [a.seq for a in again] == seqs[::-1]
    f = store.read_features("c", "x2499", BASE + 2499, 0)
    assert (f.num_trans_last_10m, f.sum_cents_last_10m) == (2500, sum(w.amount_cents for w in writes))
    assert store.redis.hlen(store.keys.card("c")) == 2501 and store.redis.zcard(store.keys.window("c")) == 2500


def test_ttls_are_set_once_per_half_ttl_not_per_batch(online_store):
    import time

    store = online_store
    store.ttl_s = 4  # periods of 2 s of the worker's clock
    keys = (store.keys.card("c"), store.keys.window("c"))
    store.apply_events([EventWrite("c", "a", BASE, 1)])
    assert all(0 < store.redis.ttl(k) <= 4 for k in keys)
    for k in keys:
        store.redis.expire(k, 1000)
    period = int(time.time() // 2)
    store.apply_events([EventWrite("c", "b", BASE + 1, 1)])
    if int(time.time() // 2) == period:  # (else the period turned meanwhile: the next write checks that case)
        assert all(store.redis.ttl(k) > 900 for k in keys), "an EXPIRE per batch"
    while int(time.time() // 2) == period:
        time.sleep(0.05)
    store.apply_events([EventWrite("c", "c", BASE + 2, 1)])
    assert all(0 < store.redis.ttl(k) <= 4 for k in keys), "a new period must set the TTLs again"


def test_txn_id_with_separators_keeps_its_late_flag_structurally(online_store):
    store = online_store
    store.lateness = W
    ids = ["a|L|b", "|A|", "x|y", "late|L|"]
    store.apply_events([EventWrite("c", ids[0], BASE + 3 * W, 100)])
    got = store.apply_events([EventWrite("c", i, BASE + 3 * W + 1, 100) for i in ids[1:3]]
                             + [EventWrite("c", ids[3], BASE, 100)])
    assert [a.status for a in got] == [ApplyStatus.APPLIED, ApplyStatus.APPLIED, ApplyStatus.LATE]
    again = store.apply_events([EventWrite("c", i, BASE + 3 * W, 100) for i in ids])
    assert [a.status for a in again] == [ApplyStatus.DUPLICATE] * 3 + [ApplyStatus.DUPLICATE_LATE]
    f = store.read_features("c", "x|y", BASE + 3 * W + 1, 100)
    assert f.num_trans_last_10m == 3


def test_future_stamped_event_cannot_make_real_events_late(online_store):
    """An event a day ahead (inside the accepted bound) must not push the card's lateness horizon past now."""
    from stores.redis_online import now_ms

    store = online_store
    store.lateness = W
    now = now_ms()
    got = store.apply_events([EventWrite("c", "real-1", now - 1000, 100),
                              EventWrite("c", "future", now + 20 * 3_600_000, 100),
                              EventWrite("c", "real-2", now, 100)])
    assert [a.status for a in got] == [ApplyStatus.APPLIED] * 3
    assert store.read_features("c", "real-2", now, 100).num_trans_last_10m == 2


def test_arrival_sequence_survives_an_emptied_store(online_store):
    store = online_store
    first = store.apply_events([EventWrite("c", "a", BASE, 100), EventWrite("c", "b", BASE + 1, 100)])
    delete_prefix(store.redis, store.keys.prefix)  # Redis restarted empty
    second = store.apply_events([EventWrite("c", "d", BASE + 2, 100)])
    assert first[0].seq < first[1].seq < second[0].seq


def test_retention_trims_events_and_idempotency_records(online_store):
    store = online_store
    store.retention = 2 * W
    store.apply_events([EventWrite("c", "old", BASE, 100), EventWrite("c", "mid", BASE + W, 100)])
    store.apply_events([EventWrite("c", "new", BASE + 3 * W, 100)])
    r = store.redis
    members = [m.decode().split("|")[-1] for m in r.zrange(store.keys.window("c"), 0, -1)]
    assert members == ["mid", "new"]
    assert set(k.decode() for k in r.hkeys(store.keys.events("c"))) == {"", "mid", "new"}  # "": the card's state
    assert r.ttl(store.keys.window("c")) > 0 and r.ttl(store.keys.card("c")) > 0
    state = store.card_state("c")
    assert state["newest"] == str(BASE + 3 * W) and state["trimmed"] == str(BASE + W)
    assert int(state["oldest"]) <= BASE + W  # no stored event is older
    assert store.read_features("c", "__inspect__", BASE + 3 * W, None).num_trans_last_10m == 1
    # A read whose window reaches below what the store still holds says so instead of a truncated answer.
    assert not store.read_features("c", "probe", BASE + W + 10, 1).complete
    assert store.read_features("c", "probe", BASE + 2 * W, 1).complete
    # The old event comes back (a redelivery whose record is gone): far behind the card's present, it is late.
    assert [a.status for a in store.apply_events([EventWrite("c", "old", BASE, 100)])] == [ApplyStatus.LATE]


def test_card_idle_longer_than_retention_starts_afresh(online_store):
    store = online_store
    store.retention = 2 * W
    store.apply_events([EventWrite("c", "old", BASE, 100), EventWrite("c", "mid", BASE + W, 200)])
    far = BASE + 10 * W
    assert [a.status for a in store.apply_events([
        EventWrite("c", "new", far, 300), EventWrite("c", "next", far + 1, 400), EventWrite("c", "new", far + 2, 999)
    ])] == [ApplyStatus.APPLIED, ApplyStatus.APPLIED, ApplyStatus.DUPLICATE]
    r = store.redis
    assert sorted(m.decode().split("|")[-1] for m in r.zrange(store.keys.window("c"), 0, -1)) == ["new", "next"]
    assert set(k.decode() for k in r.hkeys(store.keys.events("c"))) == {"", "new", "next"}
    assert all(r.ttl(k) > 0 for k in (store.keys.window("c"), store.keys.card("c")))
    state = store.card_state("c")
    assert (state["oldest"], state["newest"], state["trimmed"]) == (str(far), str(far + 1), str(far - 2 * W))
    f = store.read_features("c", "__inspect__", far + 1, None)
    assert (f.num_trans_last_10m, f.sum_cents_last_10m) == (2, 700)
    got = store.read_features("c", "probe", far + 5, 1)
    assert (got.num_trans_last_10m, got.sum_cents_last_10m) == (3, 701)


def test_snapshot_as_of_and_atomic_replace(online_store):
    store = online_store
    day = 86_400_000
    assert math.isnan(store.read_features("c", "t", BASE, 100).num_trans_last_1w)  # no snapshot yet
    store.write_snapshot(BASE, [("c", 3, 3000), ("d", 1, 10)])
    store.write_snapshot(BASE + day, [("c", 5, 1000)], chunk=1)
    f = store.read_features("c", "t", BASE + 10, 100)
    assert (f.num_trans_last_1w, f.avg_amt_last_1w, f.snapshot_cutoff_ms) == (3, 10.0, BASE)
    f = store.read_features("c", "t", BASE + day, 100)
    assert (f.num_trans_last_1w, f.avg_amt_last_1w) == (5, 2.0)
    # A card absent from a snapshot had no transactions that week: count 0, average missing.
    f = store.read_features("d", "t", BASE + day + 1, 100)
    assert f.num_trans_last_1w == 0 and math.isnan(f.avg_amt_last_1w)
    store.write_snapshot(BASE + day, [("c", 7, 700)])  # rerun of a night replaces it
    f = store.read_features("c", "t", BASE + day + 1, 100)
    assert (f.num_trans_last_1w, f.sum_cents_last_1w) == (7, 700)
    assert store.snapshot_cutoffs() == [BASE, BASE + day]
    assert math.isnan(store.read_features("c", "t", BASE - 1, 100).num_trans_last_1w)


def test_snapshot_visibility_late_publish_and_missed_night(online_store):
    """A snapshot counts for a transaction only once published before it arrived; the latest stays online."""
    from stores.redis_online import KEEP_LATEST_S, now_ms

    store = online_store
    day = 86_400_000
    c1, c2, c3 = BASE, BASE + day, BASE + 2 * day
    store.write_snapshot(c1, [("c", 1, 100)], published_ms=c1 + 3_600_000)
    store.write_snapshot(c2, [("c", 2, 400)], published_ms=c2 + 3 * 3_600_000)  # the job ran late: 03:00
    # 01:00 on day 2: the new night was not yet published when the transaction arrived -> the previous one.
    f = store.read_features("c", "t", c2 + 3_600_000, 100, arrival_ms=c2 + 3_600_000)
    assert f.snapshot_cutoff_ms == c1 and f.num_trans_last_1w == 1
    f = store.read_features("c", "t", c2 + 3_600_000, 100, arrival_ms=c2 + 4 * 3_600_000)
    assert f.snapshot_cutoff_ms == c2 and f.num_trans_last_1w == 2
    # Night 3 missed: transactions on day 3 and 4 still get night 2, and its keys do not expire meanwhile.
    f = store.read_features("c", "t", c3 + 2 * day, 100)
    assert f.snapshot_cutoff_ms == c2 and f.num_trans_last_1w == 2 and f.complete
    assert store.redis.ttl(store.keys.snapshot(store.snapshot_entries()[c2].snap_id, "c")) > KEEP_LATEST_S - 60
    # The superseded night expires with card_agg_1w's TTL, and the index says so to readers.
    old = store.snapshot_entries()[c1]
    assert old.expires_ms <= now_ms() + 3 * day and store.redis.ttl(store.keys.snapshot(old.snap_id, "c")) <= 3 * 86_400


def test_read_of_an_expired_snapshot_says_so(online_store):
    from stores.redis_online import SnapshotEntry

    store = online_store
    store.write_snapshot(BASE, [("c", 1, 100)], published_ms=BASE)
    entry = store.snapshot_entries()[BASE]
    store.put_snapshot_entry(BASE, SnapshotEntry(entry.snap_id, BASE, 1))
    f = store.read_features("c", "t", BASE + 5, 100)
    assert not f.complete and math.isnan(f.num_trans_last_1w)


def test_password_and_timeouts_are_passed_through():
    from featurestore.config import RedisSettings

    s = RedisSettings(password="pw", username="u", ssl=True, ssl_ca_certs="/ca.pem", socket_timeout_s=0.5)
    kw = s.client_kwargs()
    assert kw["password"] == "pw" and kw["username"] == "u" and kw["ssl"] is True
    assert kw["ssl_ca_certs"] == "/ca.pem" and kw["socket_timeout"] == 0.5 and kw["socket_connect_timeout"] == 1.0
    store = OnlineStore(RedisSettings(port=1, connect_timeout_s=0.2, socket_timeout_s=0.2))
    with pytest.raises(redis.ConnectionError):
        store.ping()


def test_delete_prefix_removes_only_its_namespace(raw_client):
    base = f"test:del:{uuid.uuid4().hex[:8]}"
    mset = getattr(raw_client, "mset_nonatomic", raw_client.mset)  # a cluster client: keys of several slots
    mset({f"{base}:a:{i}": 1 for i in range(12)} | {f"{base}x:keep": 1, f"{base}:a": 1})
    assert delete_prefix(raw_client, f"{base}:a", chunk=5) == 12
    assert raw_client.exists(f"{base}x:keep", f"{base}:a") == 2  # a sibling prefix and the bare key survive
    raw_client.delete(f"{base}x:keep", f"{base}:a")
