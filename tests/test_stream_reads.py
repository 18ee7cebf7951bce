"""The stream scorer's reads come from its batch's apply (streaming/stream_reads.py: the apply script folds each
transaction's windows) instead of one read script call per transaction: on real Redis, every transaction of several
batches (out of order, late, ties, redelivered and in-batch duplicates, cards idle and busy) gets exactly the
features and feature ages the online read script's reply gives it through the scorer's Python fold, with nightly
snapshots that are visible, not yet published, serving only some groups, and expired."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace

import numpy as np
import pytest

from featurestore.definitions import DAY_MS, MINUTE_MS, REGISTRY_WITH_MERCHANT, Aggregate, Registry
from featurestore.events import Transaction
from serving.redis_reader import ScriptReader
from serving.scorer import Scorer
from stores.redis_online import AsyncOnlineStore, OnlineStore, fold_read, pack_writes
from streaming import batch_fold
from streaming.batch_fold import BatchFold
from streaming.stream_reads import BatchReplies, apply_with_stats

pytestmark = pytest.mark.integration

REG = REGISTRY_WITH_MERCHANT
#: Every aggregation a stream group can declare (count, sum, mean, min, max), on both stream windows.
ALL_STATS = Registry(
    groups=tuple(replace(g, features=(*g.features, *(Aggregate(f"{fn}_amt_{g.name}", fn) for fn in ("sum", "min", "max"))))
                 if g.source == "stream" else g for g in REG.groups),
    ratios=REG.ratios, model_features=REG.model_features)
#: The same groups, the stream windows declared in the other order (a worker restarted with changed declarations).
REVERSED = Registry(groups=(*reversed([g for g in ALL_STATS.groups if g.source == "stream"]),
                            *(g for g in ALL_STATS.groups if g.source != "stream")),
                    ratios=REG.ratios, model_features=REG.model_features)
D0 = 1_600_000_000_000 - 1_600_000_000_000 % DAY_MS  # a midnight


def nights(store: OnlineStore, cards: list[str], merchants: list[str]) -> None:
    card_groups = [g.name for g in REG.batch_groups if g.entity == "card"]
    merchant_groups = [g.name for g in REG.batch_groups if g.entity == "merchant"]

    def rows(day: int, groups: list[str]) -> dict:
        out = {}
        for gi, g in enumerate(groups):
            keys = merchants if g in merchant_groups else cards
            # One entity of each kind is absent from every night (its defaults); the others differ per night/group.
            out[g] = [(k, {"n": 3 + i + day + gi, "s": 1000 * (i + 1) + 7 * day, "mn": 100, "mx": 900, "f": i % 2})
                      for i, k in enumerate(keys[:-1])]
        return out

    everything = card_groups + merchant_groups
    store.write_snapshot(D0 + 1 * DAY_MS, rows(1, everything), published_ms=D0 + 1 * DAY_MS)
    store.write_snapshot(D0 + 2 * DAY_MS, rows(2, ["card_agg_1w"]), published_ms=D0 + 2 * DAY_MS)
    store.write_snapshot(D0 + 3 * DAY_MS, rows(3, everything), published_ms=10 ** 15)  # published after arrival
    # A night whose keys have expired (the index says so): it stops the walk for the groups it holds.
    store.redis.hset(store.keys.snapshot_index, str(D0 + DAY_MS + DAY_MS // 2),
                     f"gone|{D0 + DAY_MS + DAY_MS // 2}|1|card_agg_1d")
    store.redis.zadd(store.keys.snapshot_cutoffs, {str(D0 + DAY_MS + DAY_MS // 2): D0 + DAY_MS + DAY_MS // 2})


def txn(i: int, card: str, ts: int, amount: float, merchant: str) -> Transaction:
    return Transaction(txn_id=f"t{i}", card=card, pan_last4="0000", amount=amount, ts=ts, merchant=merchant,
                       category="c")


def batches(cards: list[str], merchants: list[str]) -> list[list[Transaction]]:
    """Cards before the expired night (day 1.2) and after it (day 3.5); out of order, late, ties, duplicates."""
    out, i = [], 0
    for b in range(4):
        batch = []
        for c, card in enumerate(cards):
            base = D0 + (DAY_MS + DAY_MS // 5 if c % 2 else 3 * DAY_MS + DAY_MS // 2) + b * 4 * MINUTE_MS
            # Exactly 10 minutes (and 1 minute) before a later arrival: on the windows' inclusive edges.
            for k, offset in enumerate((-510_000, 0, 30_000, 90_000, -150_000, 90_000, -25 * MINUTE_MS, 30_000)):
                i += 1
                batch.append(txn(i, card, base + offset + c * 1_000, 1.25 + (i * 37 % 400) + 0.01 * k,
                                 merchants[(i + c) % len(merchants)]))
        batch.append(batch[3])  # a duplicate within the batch
        if out:
            batch += out[-1][::7]  # redelivered from the previous batch
        out.append(batch)
    return out


def same(a: float, b: float) -> bool:
    """Equal numbers of the same Python type (an int count stays an int in the JSON answer); NaN equals NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def republish_first_night(store: OnlineStore, cards: list[str], merchants: list[str], version: int) -> None:
    """Night 1 run again with other figures: a new snapshot id replaces the one the index named."""
    rows = {g.name: [(k, {"n": 50 + version + i, "s": 99 * (version + 1) + i, "mn": 7 + version, "mx": 990, "f": 1})
                     for i, k in enumerate(merchants[:-1] if g.entity == "merchant" else cards[:-1])]
            for g in REG.batch_groups}
    store.write_snapshot(D0 + 1 * DAY_MS, rows, published_ms=D0 + 1 * DAY_MS)


@pytest.mark.parametrize(("lean", "registry", "case"),
                         [(True, REG, "kept"), (False, REG, "kept"), (True, ALL_STATS, "kept"),
                          (True, REG, "republished, small cache")],
                         ids=["lean-connection", "redis-py", "sum-min-max", "republished-small-cache"])
def test_batch_replies_fold_to_the_online_reads(redis_settings, key_prefix, lean, registry, case, monkeypatch):
    """Also across batches: the snapshot hashes one batch read serve the next ones (`SnapshotHashes`), a night run
    again between batches is read anew (its new snapshot id), and a cache too small for a batch starts over (the
    folded rows' memo too)."""
    cards = [f"{c:032x}" for c in range(6)]
    merchants = ["m-a", "m-b", "m-{x}", "m-absent"]
    sync = OnlineStore(redis_settings, prefix=key_prefix, registry=REG)
    nights(sync, cards, merchants)

    async def run() -> list[str]:
        store = AsyncOnlineStore(redis_settings, prefix=key_prefix, registry=registry, retention_ms=60 * DAY_MS)
        reader = ScriptReader(redis_settings, key_prefix, registry) if lean else None
        replies = BatchReplies(store, reader)
        fetched, fetch = [], replies._hgetall

        async def counted(names):
            fetched.append(len(names))
            return await fetch(names)

        replies._hgetall = counted
        if case != "kept":
            replies.hashes.limit = 3  # fewer than one batch names: every batch starts the cache over
            monkeypatch.setattr(batch_fold, "ROW_MEMO", 2)
        fold, scorer = BatchFold(registry), Scorer(store, None, registry=registry)
        bad, compared, kinds = [], 0, set()
        seen = {"counts": set(), "cutoffs": set(), "merchant": set()}
        try:
            for b, batch in enumerate(batches(cards, merchants)):
                if case != "kept" and b:
                    republish_first_night(sync, cards, merchants, b)
                applied, per_event = await apply_with_stats(store, pack_writes(batch), fold.windows_ms)
                reads, hashes = await replies.gather(batch, [t.amount_cents for t in batch], applied, per_event)
                # What the API's read gives each transaction right after the batch, folded by the scorer.
                want = await store.read_replies([(t.card, t.txn_id, t.ts, t.merchant) for t in batch])
                at = 1_700_000_000_000
                folded = fold.fold(batch, reads, hashes, at)
                # The model's rows: each feature's number as a row of Python values converts it to float32.
                names = registry.all_features
                np.testing.assert_array_equal(folded.matrix(names[::-1]), np.array(
                    [[v[n] for n in names[::-1]] for v in folded.values], dtype=np.float32))
                for t, (status, _), values, ages, w in zip(batch, applied, folded.values, folded.ages, want,
                                                           strict=True):
                    want_values, _, want_ages = scorer.features(t, w, at)
                    compared += 1
                    kinds.add(int(status))
                    if list(ages.items()) != list(want_ages.items()):  # the same ages, in the answer's order
                        bad.append(f"{t.txn_id}: ages {ages} != {want_ages}")
                    if list(values) != list(registry.all_features) or set(values) != set(want_values):
                        bad.append(f"{t.txn_id}: names {list(values)} vs {sorted(want_values)}")
                    bad += [f"{t.txn_id} {n}: {values.get(n)} != {v}" for n, v in want_values.items()
                            if not same(values.get(n), v)]
                    fw = fold_read(w, t.txn_id, t.ts, t.amount_cents, registry)
                    seen["counts"].add(fw.values["num_trans_last_10m"])
                    seen["cutoffs"].add(tuple(sorted((k, v) for k, v in fw.group_cutoffs.items())))
                    seen["merchant"] |= {not math.isnan(fw.values["merchant_num_trans_7d"])}
        finally:
            await store.close()
            if reader is not None:
                await reader.close()
        assert compared > 150 and kinds == {0, 1, 2, 3}, (compared, kinds)
        assert len(fold.nightly._rows) <= batch_fold.ROW_MEMO  # the memo of folded rows stays bounded
        # The comparison covered busy windows, both snapshot situations (one night for all groups; a subset from
        # a newer night, the rest stopped by the expired one), and merchants with and without statistics.
        assert max(seen["counts"]) >= 5 and len(seen["cutoffs"]) == 2 and seen["merchant"] == {True, False}, seen
        if registry is ALL_STATS:  # the extra aggregations were compared, on windows holding several amounts
            assert {"sum_amt_card_agg_1m", "min_amt_card_agg_10m", "max_amt_card_agg_10m"} <= set(want_values)
        return bad, fetched, replies.hashes.generation

    try:
        bad, fetched, generation = asyncio.run(run())
    finally:
        sync.close()
    assert not bad, f"{len(bad)} differences, e.g. {bad[:5]}"
    if case == "kept":  # later batches fetched only what the first did not (the same nights and entities)
        assert fetched[0] > 0 and sum(fetched[1:]) == 0, fetched
    else:  # every batch fetched again: night 1 has a new id each time, and the cache started over
        assert len(fetched) == 4 and min(fetched) > 3 and generation >= 3, (fetched, generation)


def random_batches(seed: int, cards: list[str], far_clocks: bool = False) -> list[tuple[bool, list[Transaction]]]:
    """Batches of mostly in-order card streams (what the apply's cache moves on from batch to batch), with gaps
    longer than a window, events on the windows' edges, out-of-order and late events, redeliveries, tied amounts;
    every fifth batch is applied without statistics (a scoring-off worker: the cache must not be trusted after).
    `far_clocks`: one card's events stamped 80 years ahead, another's on the second day of 1970."""
    import random

    rng = random.Random(seed)
    clock = {c: D0 + 20 * DAY_MS + i * 1_000 for i, c in enumerate(cards)}
    if far_clocks:
        clock[cards[-1]] = D0 + 80 * 365 * DAY_MS
        clock[cards[-2]] = DAY_MS
    sent: list[Transaction] = []
    out, n = [], 0
    for b in range(40):
        batch = []
        for card in cards:
            for _ in range(rng.choice((0, 1, 1, 2, 3, 6))):
                kind = rng.random()
                if kind < 0.55:
                    step = rng.randint(0, 90_000)
                elif kind < 0.65:
                    step = rng.choice((10 * MINUTE_MS, MINUTE_MS, 10 * MINUTE_MS + 1, MINUTE_MS + 1))
                elif kind < 0.72:
                    step = rng.randint(11 * MINUTE_MS, 40 * MINUTE_MS)  # the window empties
                elif kind < 0.85:
                    step = -rng.randint(1, 5 * MINUTE_MS)  # out of order, on time
                else:
                    step = -rng.randint(20 * MINUTE_MS, 40 * MINUTE_MS)  # late
                ts = clock[card] + step
                clock[card] = max(clock[card], ts)
                n += 1
                batch.append(txn(n, card, ts, rng.choice((1.0, 2.5, 2.5, 7.0, 9.99, 40.0)), "m-a"))
        if sent and rng.random() < 0.3:
            batch += rng.sample(sent, min(3, len(sent)))  # redelivered
        if rng.random() < 0.1:
            rng.shuffle(batch)  # cards interleaved differently
        sent += batch
        out.append((b % 5 != 4, batch))
    return out


@pytest.mark.parametrize(("seed", "busy", "far_clocks"),
                         [(1, 1, False), (2, 1, False), (1, 4, False), (2, 4, False), (1, None, False),
                          (3, None, True), (3, 1, True)],
                         ids=["cached-1", "cached-2", "switching-1", "switching-2", "default-quiet",
                              "far-clocks-quiet", "far-clocks-cached"])
def test_window_statistics_moved_on_from_the_cache_equal_the_read(redis_settings, key_prefix, seed, busy,
                                                                 far_clocks):
    """The apply script's per-card cache (p:agg) carries each card's statistics from batch to batch; whatever the
    stream does, whoever else writes the card meanwhile, and whatever windows the worker declares (every third
    batch in the other order), each transaction's statistics equal the read's. With BUSY 1 every card keeps the
    cache; with 4 cards go back and forth between the cache and reading afresh; with the default (32) these quiet
    cards are read afresh. With far clocks, a card stamped 80 years ahead and one in 1970 ride along."""
    cards = [f"{c:032x}" for c in range(5)]

    async def run() -> list[str]:
        store = AsyncOnlineStore(redis_settings, prefix=key_prefix, registry=ALL_STATS, retention_ms=60 * DAY_MS)
        replies, folds = BatchReplies(store, None), (BatchFold(ALL_STATS), BatchFold(REVERSED))
        assert folds[0].windows_ms != folds[1].windows_ms
        scorer = Scorer(store, None, registry=ALL_STATS)
        bad, compared, cached, sizes = [], 0, 0, []
        try:
            for b, (with_stats, batch) in enumerate(random_batches(seed, cards, far_clocks)):
                if b == 17:
                    # Another writer adds an earlier-arrived event to a card's window without moving its arrival
                    # position (as a rebuild merging the archive back does): the cache must not hide it.
                    card = cards[0]
                    state = (await store.redis.hget(store.keys.card(card), "")).decode().split("|")
                    seq = int(state[0]) - 1
                    ts = int(state[1]) - 1_000
                    await store.redis.zadd(store.keys.window(card), {f"{seq}|123|A|foreign": ts})
                    await store.redis.hset(store.keys.card(card), "foreign", f"{seq}|123|A|{ts}")
                if not with_stats:
                    await store.apply_packed(pack_writes(batch))
                    continue
                cached += sum([await store.redis.exists(f"{key_prefix}:agg:{{{c}}}") for c in cards])
                fold = folds[b % 3 == 2]
                applied, per_event = await apply_with_stats(store, pack_writes(batch), fold.windows_ms, busy)
                reads, hashes = await replies.gather(batch, [t.amount_cents for t in batch], applied, per_event)
                want = await store.read_replies([(t.card, t.txn_id, t.ts, t.merchant) for t in batch])
                at = D0 + 40 * DAY_MS
                for stats, _ in per_event:  # members of the longest window besides the event itself
                    sizes.append(max(stats[1], stats[5]) - 1)
                folded = fold.fold(batch, reads, hashes, at)
                for t, values, ages, w in zip(batch, folded.values, folded.ages, want, strict=True):
                    want_values, _, want_ages = scorer.features(t, w, at)
                    compared += 1
                    if ages != want_ages:
                        bad.append(f"batch {b} {t.txn_id}: ages {ages} != {want_ages}")
                    bad += [f"batch {b} {t.txn_id} {n}: {values.get(n)} != {v}" for n, v in want_values.items()
                            if not same(values.get(n), v)]
        finally:
            await store.close()
        assert compared > 300, compared
        return bad, cached, sizes

    bad, cached, sizes = asyncio.run(run())
    assert not bad, f"{len(bad)} differences, e.g. {bad[:5]}"
    if busy == 1:  # the cache was there to be moved on from, batch after batch
        assert cached > 50, cached
    elif busy == 4:  # windows on both sides of the threshold: cards switched between the two ways
        assert sum(n >= busy for n in sizes) > 50 and sum(n < busy for n in sizes) > 50, sorted(sizes)
