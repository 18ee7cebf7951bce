"""The stream scorer's reads come from its batch's apply (streaming/stream_reads.py) instead of one read script call
per transaction: on real Redis, every transaction of several batches (out of order, late, ties, redelivered and
in-batch duplicates, cards idle and busy) gets exactly the features the online read script gives it, with nightly
snapshots that are visible, not yet published, serving only some groups, and expired."""

from __future__ import annotations

import asyncio
import math

import pytest

from featurestore.definitions import DAY_MS, MINUTE_MS, REGISTRY_WITH_MERCHANT
from featurestore.events import Transaction
from serving.redis_reader import ScriptReader
from serving.scorer import Scorer
from stores.redis_online import AsyncOnlineStore, OnlineStore, fold_read, newest_counted_ts, pack_writes
from streaming.batch_fold import BatchFold
from streaming.stream_reads import BatchReplies, apply_with_windows

pytestmark = pytest.mark.integration

REG = REGISTRY_WITH_MERCHANT
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
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


@pytest.mark.parametrize("lean", [True, False], ids=["lean-connection", "redis-py"])
def test_batch_replies_fold_to_the_online_reads(redis_settings, key_prefix, lean):
    cards = [f"{c:032x}" for c in range(6)]
    merchants = ["m-a", "m-b", "m-{x}", "m-absent"]
    sync = OnlineStore(redis_settings, prefix=key_prefix, registry=REG)
    nights(sync, cards, merchants)
    sync.close()

    async def run() -> list[str]:
        store = AsyncOnlineStore(redis_settings, prefix=key_prefix, registry=REG, retention_ms=60 * DAY_MS)
        reader = ScriptReader(redis_settings, key_prefix, REG) if lean else None
        replies = BatchReplies(store, reader)
        fold, scorer = BatchFold(REG), Scorer(store, None, registry=REG)
        bad, compared, kinds = [], 0, set()
        seen = {"counts": set(), "cutoffs": set(), "merchant": set()}
        try:
            for batch in batches(cards, merchants):
                applied, per_event = await apply_with_windows(store, pack_writes(batch), REG.longest_stream_window_ms)
                reads, hashes = await replies.gather(batch, [t.amount_cents for t in batch], applied, per_event)
                got = [r.reply(hashes, REG.longest_stream_window_ms) for r in reads]
                # The batch fold the worker uses gives Scorer.features' answer on those replies.
                at = 1_700_000_000_000
                for t, g, (values, ages) in zip(batch, got, fold.fold(batch, reads, hashes, at), strict=True):
                    want_values, _, want_ages = scorer.features(t, g, at)
                    if ages != want_ages or set(values) != set(want_values) or not all(
                            same(values[n], v) for n, v in want_values.items()):
                        bad.append(f"{t.txn_id}: batch fold {values, ages} != {want_values, want_ages}")
                want = await store.read_replies([(t.card, t.txn_id, t.ts, t.merchant) for t in batch])
                for t, (status, _), g, w in zip(batch, applied, got, want, strict=True):
                    kinds.add(int(status))
                    fg = fold_read(g, t.txn_id, t.ts, t.amount_cents, REG)
                    fw = fold_read(w, t.txn_id, t.ts, t.amount_cents, REG)
                    compared += 1
                    seen["counts"].add(fw.values["num_trans_last_10m"])
                    seen["cutoffs"].add(tuple(sorted((k, v) for k, v in fw.group_cutoffs.items())))
                    seen["merchant"] |= {not math.isnan(fw.values["merchant_num_trans_7d"])}
                    for name, value in fw.values.items():
                        if not same(fg.values[name], value):
                            bad.append(f"{t.txn_id} {name}: {fg.values[name]} != {value}")
                    if (fg.group_cutoffs, fg.snapshot_cutoff_ms, fg.ts) != (fw.group_cutoffs, fw.snapshot_cutoff_ms,
                                                                             fw.ts):
                        bad.append(f"{t.txn_id}: {fg.group_cutoffs} != {fw.group_cutoffs}")
                    if newest_counted_ts(g, t.txn_id) != newest_counted_ts(w, t.txn_id):
                        bad.append(f"{t.txn_id}: newest counted event differs")
        finally:
            await store.close()
            if reader is not None:
                await reader.close()
        assert compared > 150 and kinds == {0, 1, 2, 3}, (compared, kinds)
        # The comparison covered busy windows, both snapshot situations (one night for all groups; a subset from
        # a newer night, the rest stopped by the expired one), and merchants with and without statistics.
        assert max(seen["counts"]) >= 5 and len(seen["cutoffs"]) == 2 and seen["merchant"] == {True, False}, seen
        return bad

    bad = asyncio.run(run())
    assert not bad, f"{len(bad)} differences, e.g. {bad[:5]}"
