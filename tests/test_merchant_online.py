"""Issue 16, online half, on the real Redis: one night's batch groups (card spending, merchant risk) are written
under one snapshot id and published together, and a transaction's card and merchant groups come back in one
read, folded into every declared feature. Expectations are computed by hand from SPEC section 4 and the
declarations' words (count, known fraud count = sum of known_fraud, fraud rate = their ratio; an entity absent from
an existing snapshot gets the default: 0 for counts and sums, NaN for means; no snapshot: NaN)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import redis

from featurestore.definitions import REGISTRY_WITH_MERCHANT
from tests.test_redis_acl import accounts, as_user, refused  # noqa: F401  (accounts: a fixture)

pytestmark = pytest.mark.integration

DAY = 86_400_000
BASE = 1_600_041_600_000  # 2020-09-14 00:00 UTC
NAN = math.nan

#: One night's statistics, by group: what the batch would publish (cents; f = known frauds).
NIGHT = {
    "card_agg_1w": [("c", {"n": 3, "s": 3000}), ("d", {"n": 1, "s": 5})],
    "card_agg_1d": [("c", {"n": 1, "s": 250})],
    "card_agg_30d": [("c", {"n": 10, "s": 12345}), ("e", {"n": 2, "s": 100})],
    "merchant_agg_1d": [("m1", {"n": 4, "f": 1})],
    "merchant_agg_7d": [("m1", {"n": 20, "f": 2}), ("m2", {"n": 1, "f": 1})],
    "merchant_agg_30d": [("m1", {"n": 50, "f": 0}), ("m2", {"n": 3, "f": 1})],
}
CARD_C = {"num_trans_last_1w": 3.0, "avg_amt_last_1w": 10.0, "num_trans_last_1d": 1.0, "avg_amt_last_1d": 2.5,
          "num_trans_last_30d": 10.0, "avg_amt_last_30d": 12.345}
MERCHANT_M1 = {"merchant_num_trans_1d": 4.0, "merchant_fraud_count_1d": 1.0, "merchant_fraud_rate_1d": 0.25,
               "merchant_num_trans_7d": 20.0, "merchant_fraud_count_7d": 2.0, "merchant_fraud_rate_7d": 0.1,
               "merchant_num_trans_30d": 50.0, "merchant_fraud_count_30d": 0.0, "merchant_fraud_rate_30d": 0.0}
#: A merchant absent from an existing snapshot: no transactions, no frauds, a rate of nothing.
MERCHANT_ABSENT = {f"merchant_{k}_{d}": v for d in ("1d", "7d", "30d")
                   for k, v in (("num_trans", 0.0), ("fraud_count", 0.0), ("fraud_rate", NAN))}
NIGHTLY = (*CARD_C, *MERCHANT_M1)
ALL_NAN = dict.fromkeys(NIGHTLY, NAN)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) if (math.isnan(a) or math.isnan(b)) else \
        math.isclose(a, b, rel_tol=1e-12, abs_tol=0)


def check(got: dict, want: dict) -> None:
    bad = {k: (got[k], v) for k, v in want.items() if not same(got[k], v)}
    assert not bad, f"(served, expected): {bad}"


@pytest.fixture
def store(redis_settings, key_prefix):
    from stores.redis_online import OnlineStore

    s = OnlineStore(redis_settings, prefix=key_prefix, registry=REGISTRY_WITH_MERCHANT)
    yield s
    s.close()


def read(store, card: str, ts: int, merchant: str | None, arrival_ms: int | None = None):
    return store.read_features(card, "probe", ts, 100, arrival_ms=arrival_ms, merchant=merchant)


@pytest.mark.unit
def test_entity_tags_are_injective_and_one_slot_per_entity():
    from stores.online_snapshots import entity_tag

    ids = ["m1", "a{b}c", "a{b", "a}b", "{}", "{", "}", "m:1:2", "m#:{x}", "é商店🙂", "x" * 10_000, "x" * 32, "y" * 129]
    tags = [entity_tag("merchant", m) for m in ids]
    assert len(set(tags)) == len(ids)
    for m, tag in zip(ids, tags, strict=True):
        assert len(tag.encode()) <= 200  # a 10 KB id does not make 10 KB keys
        inner = tag[tag.index("{") + 1:]
        assert "{" not in inner and inner.index("}") == len(inner) - 1 and len(inner) > 1  # one well-formed tag
        if "{" not in m and "}" not in m and len(m.encode()) <= 128:
            assert tag == f"merchant:{{{m}}}"  # readable where that is safe


def test_one_night_of_every_group_read_in_one_call(store):
    assert store.read_features("c", "t", BASE + 10, 100, merchant="m1").group_cutoffs == dict.fromkeys(
        (g.name for g in REGISTRY_WITH_MERCHANT.batch_groups), None)
    check(read(store, "c", BASE + 10, "m1").values, ALL_NAN)  # before any snapshot: unknown, NaN
    store.write_snapshot(BASE, NIGHT, published_ms=BASE)
    f = read(store, "c", BASE + 10, "m1")
    check(f.values, {**CARD_C, **MERCHANT_M1})
    assert set(f.group_cutoffs.values()) == {BASE} and f.complete and f.snapshot_cutoff_ms == BASE
    check(read(store, "c", BASE + 10, "m-absent").values, {**CARD_C, **MERCHANT_ABSENT})
    # A card in some groups of the night and not in others: 0 transactions there.
    check(read(store, "e", BASE + 10, "m2").values, {
        "num_trans_last_1w": 0.0, "avg_amt_last_1w": NAN, "num_trans_last_1d": 0.0, "avg_amt_last_1d": NAN,
        "num_trans_last_30d": 2.0, "avg_amt_last_30d": 0.5, "merchant_num_trans_1d": 0.0,
        "merchant_fraud_count_1d": 0.0, "merchant_fraud_rate_1d": NAN, "merchant_num_trans_7d": 1.0,
        "merchant_fraud_count_7d": 1.0, "merchant_fraud_rate_7d": 1.0, "merchant_fraud_rate_30d": 1 / 3})
    # Without a merchant (inspection of a card) the merchant groups are unknown, the card's are there.
    f = read(store, "c", BASE + 10, None)
    check(f.values, {**CARD_C, **dict.fromkeys(MERCHANT_M1, NAN)})
    assert f.group_cutoffs["merchant_agg_7d"] is None and f.group_cutoffs["card_agg_30d"] == BASE
    # The stream groups are still there, the transaction folded in.
    assert f.num_trans_last_10m == 1 and store.read_features("c", "", BASE + 10, None).num_trans_last_10m == 0


def test_late_publication_expiry_and_a_night_without_the_new_groups(store):
    from stores.redis_online import SnapshotEntry

    c1, c2, c3 = BASE, BASE + DAY, BASE + 2 * DAY
    store.write_snapshot(c1, NIGHT, published_ms=c1 + 3_600_000)
    second = {g: [(k, {s: 2 * v for s, v in st.items()}) for k, st in rows] for g, rows in NIGHT.items()}
    seen = []

    def mid_write(_rows: int) -> None:  # before publication every group still reads the previous night
        seen.append(read(store, "c", c2 + 10, "m1").group_cutoffs)

    store.write_snapshot(c2, second, published_ms=c2 + 3 * 3_600_000, chunk=2, on_progress=mid_write)
    assert len(seen) > 3 and all(set(s.values()) == {c1} for s in seen)
    # 01:00 on day 2 the night was not published yet when the transaction arrived: night 1, every group.
    early = read(store, "c", c2 + 3_600_000, "m1", arrival_ms=c2 + 3_600_000)
    check(early.values, {**CARD_C, **MERCHANT_M1})
    assert set(early.group_cutoffs.values()) == {c1}
    late = read(store, "c", c2 + 3_600_000, "m1", arrival_ms=c2 + 4 * 3_600_000)
    assert set(late.group_cutoffs.values()) == {c2}
    check(late.values, {"num_trans_last_1w": 6.0, "avg_amt_last_1w": 10.0, "merchant_num_trans_7d": 40.0,
                        "merchant_fraud_count_7d": 4.0, "merchant_fraud_rate_7d": 0.1})
    # A transaction before night 1's cut-off: nothing visible, NaN.
    check(read(store, "c", c1 - 1, "m1").values, ALL_NAN)
    # A night holding card_agg_1w only (the single-group form): each group is served, as of t, by the latest
    # visible night that holds it (SPEC section 4's rule, per group), here night 2 for every other group.
    store.write_snapshot(c3, [("c", 5, 500)], published_ms=c3)
    f = read(store, "c", c3 + 10, "m1")
    check(f.values, {"num_trans_last_1w": 5.0, "avg_amt_last_1w": 1.0, "num_trans_last_1d": 2.0,
                     "avg_amt_last_1d": 2.5, "merchant_num_trans_7d": 40.0, "merchant_fraud_rate_1d": 0.25})
    assert f.group_cutoffs == {g: c3 if g == "card_agg_1w" else c2 for g in NIGHT} and f.complete
    # An expired night is unknown (NaN), never "absent" (defaults), and the read says it is incomplete.
    entry = store.snapshot_entries()[c2]
    assert entry.groups == tuple(NIGHT)
    store.put_snapshot_entry(c2, SnapshotEntry(entry.snap_id, entry.published_ms, 1, entry.groups))
    f = read(store, "c", c3 + 10, "m-absent")
    check(f.values, {**dict.fromkeys(NIGHTLY, NAN), "num_trans_last_1w": 5.0, "avg_amt_last_1w": 1.0})
    assert not f.complete
    f = read(store, "c", c2 + 10, "m1")
    check(f.values, ALL_NAN)
    assert not f.complete


def test_hostile_merchant_ids_are_stored_and_read_back_exactly(store, key_prefix):
    hostile = ["a{b}c", "{m1}", "}{", "m1}", "{", "m:1:2", "shop:{c}", "é商店🙂", "x" * 10_000, "m1 ", "\n\t"]
    ids = ["m1", *hostile]
    rows = [(m, {"n": i + 1, "f": i % 2}) for i, m in enumerate(ids)]
    store.write_snapshot(BASE, {"merchant_agg_7d": rows, "card_agg_1w": [("c", {"n": 1, "s": 1})]},
                         published_ms=BASE)
    for i, m in enumerate(ids):
        f = read(store, "c", BASE + 1, m)
        assert (f.merchant_num_trans_7d, f.merchant_fraud_count_7d) == (i + 1, i % 2), repr(m[:20])
        assert math.isnan(f.merchant_num_trans_1d)  # not in this night
    keys = list(store.redis.scan_iter(match=f"{key_prefix}:*", count=1000))
    assert all(len(k) < 300 for k in keys)
    assert len([k for k in keys if b":merchant" in k]) == len(ids)
    # The API's transport (raw RESP) and the stream's (redis-py) send the same bytes and read the same keys.
    from serving.redis_reader import ScriptReader
    from stores.redis_online import AsyncOnlineStore

    async def both():
        stock = AsyncOnlineStore(store.settings, prefix=key_prefix, registry=REGISTRY_WITH_MERCHANT)
        lean = ScriptReader(store.settings, key_prefix, REGISTRY_WITH_MERCHANT)
        try:
            reqs = [("c", "probe", BASE + 1, m) for m in ids]
            return await stock.read_replies(reqs, BASE + 5), await lean.read_replies(reqs, BASE + 5)
        finally:
            await stock.close()
            await lean.close()

    a, b = asyncio.run(both())
    assert a == b and [r[3][0][3] for r in a] == [[b"merchant_agg_7d:n", str(i + 1).encode(), b"merchant_agg_7d:f",
                                             str(i % 2).encode()] for i in range(len(ids))]


def test_scorer_reports_every_feature_and_an_age_per_group(store, key_prefix):
    from featurestore.events import Transaction
    from serving.scorer import Scorer
    from stores.redis_online import AsyncOnlineStore

    now = int(time.time() * 1000)
    today = now - now % DAY
    store.write_snapshot(today - DAY, NIGHT, published_ms=today - DAY)
    store.write_snapshot(today, {g: rows for g, rows in NIGHT.items() if g != "merchant_agg_30d"},
                         published_ms=today)
    txn = Transaction("x1", "c", "1234", 7.5, now - 1000, "m1", "shop")

    async def go():
        astore = AsyncOnlineStore(store.settings, prefix=key_prefix, registry=REGISTRY_WITH_MERCHANT)
        try:
            scorer = Scorer(astore, models=None, registry=REGISTRY_WITH_MERCHANT)
            reply = (await astore.read_replies([(txn.card, txn.txn_id, txn.ts, txn.merchant)]))[0]
            return scorer.features(txn, reply, now)
        finally:
            await astore.close()

    values, _, ages = asyncio.run(go())
    assert set(values) >= set(REGISTRY_WITH_MERCHANT.all_features)
    check(values, {**CARD_C, **MERCHANT_M1, "amount": 7.5, "count_ratio": 1 / 3})
    assert set(ages) == {g.name for g in REGISTRY_WITH_MERCHANT.groups}
    assert {g: ages[g] for g in NIGHT} == {g: now - today + (DAY if g == "merchant_agg_30d" else 0) for g in NIGHT}


def test_api_scorer_answers_with_every_group_through_its_lean_reader(store, key_prefix, tmp_path):
    """The API's path: the raw-RESP reader, the scorer, a model: one read, every feature by name, ages per group."""
    from featurestore.events import Transaction
    from serving.model_source import CurrentModelSource
    from serving.models import ModelWatcher
    from serving.redis_reader import ScriptReader
    from serving.scorer import Scorer
    from stores.redis_online import AsyncOnlineStore
    from tests.toy_models import save_model, toy_booster

    now = int(time.time() * 1000)
    today = now - now % DAY
    store.write_snapshot(today, NIGHT, published_ms=today)
    save_model(tmp_path, "v1", toy_booster(2))
    watcher = ModelWatcher(CurrentModelSource(tmp_path))
    assert watcher.load_now() is not None
    txns = [Transaction("api-1", "c", "1234", 7.5, now, "m1", "shop"),
            Transaction("api-2", "c", "1234", 2.0, now, "é{商店}", "shop")]

    async def go():
        astore = AsyncOnlineStore(store.settings, prefix=key_prefix, registry=REGISTRY_WITH_MERCHANT)
        reader = ScriptReader(store.settings, key_prefix, REGISTRY_WITH_MERCHANT)
        try:
            scorer = Scorer(astore, watcher, registry=REGISTRY_WITH_MERCHANT, reader=reader)
            return (await scorer.score(txns[0])).answer, [s.answer for s in await scorer.score_many(txns)]
        finally:
            await reader.close()
            await astore.close()

    one, many = asyncio.run(go())
    assert one == {**many[0], "feature_age_ms": one["feature_age_ms"]}  # ages move with the clock
    for answer, merchant in zip(many, (MERCHANT_M1, MERCHANT_ABSENT), strict=True):
        assert list(answer["features"]) == list(REGISTRY_WITH_MERCHANT.all_features)
        check(answer["features"], {**CARD_C, **merchant})
        assert set(answer["feature_age_ms"]) == {g.name for g in REGISTRY_WITH_MERCHANT.groups}
        assert all(answer["feature_age_ms"][g] >= now - today for g in NIGHT)


def test_reader_user_reads_the_new_keys_and_nothing_more(redis_settings, key_prefix, accounts):  # noqa: F811
    from stores.redis_online import OnlineStore

    writer = OnlineStore(as_user(redis_settings, accounts["writer"]), prefix=key_prefix,
                         registry=REGISTRY_WITH_MERCHANT)
    writer.write_snapshot(BASE, NIGHT, published_ms=BASE)
    reader = OnlineStore(as_user(redis_settings, accounts["reader"]), prefix=key_prefix,
                         registry=REGISTRY_WITH_MERCHANT)
    check(read(reader, "c", BASE + 1, "m1").values, {**CARD_C, **MERCHANT_M1})
    key = writer.keys.merchant_snapshot(writer.snapshot_entries()[BASE].snap_id, "m1")
    assert reader.redis.hgetall(key)
    for command in [("HSET", key, "merchant_agg_7d:n", "9"), ("DEL", key), ("EXPIRE", key, "1")]:
        assert refused(reader.redis, *command), f"the reader's user may run {command[0]}"
    with pytest.raises(redis.exceptions.RedisError):
        reader.write_snapshot(BASE + DAY, NIGHT)
    reader.close()
    writer.close()


@pytest.mark.e2e
def test_features_get_shows_the_merchant_and_card_groups(store, key_prefix, services):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.test_merchant_online_offline import WITH_MERCHANT

    card = "c" * 32  # `features get` takes a PAN or an entity key, nothing else
    night = {g: [(card if k == "c" else k, v) for k, v in rows] for g, rows in NIGHT.items()}
    store.write_snapshot(BASE, {**night, "merchant_agg_7d": [("shop:{x}", {"n": 20, "f": 2})]}, published_ms=BASE)
    env = {**os.environ, "VELOCITY_REDIS_KEY_PREFIX": key_prefix, "VELOCITY_REDIS_PORT": str(services["redis_port"]),
           "COLUMNS": "200"}

    def get(*args: str) -> dict[str, str]:
        out = subprocess.run([sys.executable, "-c", WITH_MERCHANT, "features", "get", card, "--at", str(BASE + 10),
                              *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        cells = [[c.strip() for c in ln.split("│")[1:-1]] for ln in out.stdout.splitlines() if ln.count("│") == 4]
        return {f"{g}.{name}": value for g, name, value in cells}

    shown = get("--merchant", "shop:{x}")
    assert shown["merchant_agg_7d.merchant_fraud_rate_7d"] == "0.1"
    assert shown["merchant_agg_7d.snapshot_cutoff_ms"] == str(BASE)
    assert shown["merchant_agg_1d.merchant_num_trans_1d"] == "0.0"  # absent from that group: the default
    assert shown["card_agg_30d.avg_amt_last_30d"] == "12.345" and shown["card_agg_1d.num_trans_last_1d"] == "1.0"
    without = get()
    assert without["merchant_agg_7d.merchant_fraud_rate_7d"] == "nan"
    assert without["merchant_agg_7d.snapshot_cutoff_ms"] == "None"
