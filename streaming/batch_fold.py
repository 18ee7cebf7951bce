"""The scorer's fold (`serving.scorer.Scorer.features`: `stores.redis_online.fold_read`, the ratios, the ages) for a
whole applied batch, with the work its transactions share done once.

Per transaction it computes what `Scorer.features` computes from that transaction's read reply: each stream
group's values from the window statistics the apply script folded (`streaming.stream_reads.apply_with_stats`) by
`featurestore.windows.WindowAggregate.values`, the nightly groups by the statements of the store's
`SnapshotFold.fold` (`NightlyFold`), the ratios with `featurestore.ratios.compute_ratios`. What is shared is not
repeated: each group of a night is folded once per entity and kept while its hash is (`streaming.stream_reads.
SnapshotHashes`: a night's hashes never change under its snapshot id), so a card's nightly features are folded once,
not on every one of its transactions. tests/test_stream_reads.py checks the result equals `Scorer.features` on the
read script's replies.
"""

from __future__ import annotations

from collections.abc import Sequence

from featurestore.definitions import Registry
from featurestore.event_time import event_time_values
from featurestore.events import Transaction
from featurestore.ratios import compute_ratios
from featurestore.windows import WindowAggregate, in_window
from stores.online_snapshots import SnapshotFold, group_values
from streaming.stream_reads import EventRead


class NightlyFold:
    """`SnapshotFold.fold` (the store's fold of the nightly groups) for reads whose nights name their entity hashes,
    each group's values computed once per (night, entity) while the hashes are kept (`SnapshotHashes`): a card's
    and a busy merchant's groups are folded once, not once per transaction. Same statements, in the same order, as
    SnapshotFold.fold; tests/test_stream_reads.py checks both agree."""

    def __init__(self, registry: Registry) -> None:
        ref = SnapshotFold(registry)
        self.groups = tuple((g, g.name, g.entity == "merchant", ref.fields[g.name], ref.stats_of[g.name])
                            for g in ref.groups)
        self.nan, self.defaults = ref.nan, ref.defaults
        self.fields_b = {name: {k: v.encode() for k, v in f.items()} for name, f in ref.fields.items()}
        self.card_groups = tuple(g for g in self.groups if not g[2])
        self.merchant_groups = tuple(g for g in self.groups if g[2])
        self._parts: dict = {}
        self._groups: dict = {}
        self._hashes: dict | None = None
        self._generation = -1

    def fold(self, nights: tuple, hashes: dict) -> tuple[dict, dict]:
        """(values, cut-off per group) for `nights` of (cut-off, "g1,g2", card hash key or None, merchant hash key
        or None), the hashes' contents (field -> raw value) in `hashes` (`SnapshotHashes`, or one batch's dict:
        what is folded from them is kept as long as they are).

        The card's groups depend on the nights and the card's hashes only, the merchant's on the nights, the
        merchant's hashes and whether the card's were read: each part is folded once for each such key (every
        transaction of a card, and of a busy merchant, shares its part)."""
        generation = getattr(hashes, "generation", None)
        if hashes is not self._hashes or generation != self._generation:
            self._hashes, self._generation, self._groups, self._parts = hashes, generation, {}, {}
        parts = self._parts
        kc = ("c", *((c, held, ck) for c, held, ck, _ in nights))
        card = parts.get(kc)
        if card is None:
            card = parts[kc] = self._part(nights, self.card_groups)
        if not self.merchant_groups:
            return card
        km = ("m", *((c, held, ck is None, mk) for c, held, ck, mk in nights))
        merchant = parts.get(km)
        if merchant is None:
            merchant = parts[km] = self._part(nights, self.merchant_groups)
        return {**card[0], **merchant[0]}, {**card[1], **merchant[1]}

    def _part(self, nights: tuple, groups: tuple) -> tuple[dict, dict]:
        served = {}
        for cutoff, held, ck, mk in nights:
            night = (int(cutoff), ck, mk)
            for name in held.split(","):
                served[name] = night
        values: dict[str, float] = {}
        cutoffs: dict[str, int | None] = {}
        cache = self._groups
        for group in groups:
            name = group[1]
            night = served.get(name)
            if night is None:
                key = name
            elif group[2]:  # a merchant group: the merchant's hash, and whether the card's was read
                key = (name, night[0], night[1] is None, night[2])
            else:
                key = (name, night[0], night[1])
            got = cache.get(key)
            if got is None:
                got = cache[key] = self._group(group, night)
            values.update(got[0])
            cutoffs[name] = got[1]
        return values, cutoffs

    def _group(self, group: tuple, night: tuple | None) -> tuple[dict, int | None]:
        g, name, merchant, f, stats_of = group
        if night is None:  # no visible night holds it (or its night is older than an expired one)
            return self.nan[name], None
        cutoff, ck, mk = night
        key = mk if merchant else ck
        if key is None:  # expired (unknown here), or no merchant asked for
            return self.nan[name], (None if merchant and ck is not None else cutoff)
        got = self._hashes[key]
        if type(next(iter(got), b"")) is bytes:  # the hash's field names as Redis sent them (bytes): no decoding
            f = self.fields_b[name]
        if not any(f[s] in got for s in stats_of):
            return self.defaults[name], cutoff  # absent from an existing snapshot: nothing in its window
        agg = WindowAggregate(_int(got, f["n"], 0), _int(got, f["s"], 0), _int(got, f["mn"], None),
                              _int(got, f["mx"], None), _int(got, f["f"], 0))
        return group_values(g, agg), cutoff


def _int(got: dict, field, default):
    v = got.get(field)
    return default if v is None else int(v)


class BatchFold:
    """Features and ages per transaction of an applied batch (see the module's docstring)."""

    def __init__(self, registry: Registry) -> None:
        self.stream = tuple((g, g.window_ms) for g in registry.stream_groups)
        #: The window lengths the apply script folds, in the order of `stream` (`apply_with_stats`).
        self.windows_ms = tuple(w for _, w in self.stream)
        self.nightly = NightlyFold(registry)
        self.batch_groups = tuple(g.name for g in registry.batch_groups)
        self.ratios = registry.ratios
        self.event_time = registry.event_time

    def fold(self, txns: Sequence[Transaction], reads: Sequence[EventRead], hashes: dict,
             at_ms: int) -> list[tuple[dict[str, float], dict]]:
        """(every feature and ratio by name, each group's age in ms) per transaction, as `Scorer.features`."""
        out = []
        for txn, read in zip(txns, reads, strict=True):
            t = read.ts
            stats = read.stats
            values: dict[str, float] = {"amount": txn.amount}
            for j, (group, _) in enumerate(self.stream):
                o = 1 + 4 * j
                values.update(WindowAggregate(stats[o], stats[o + 1], stats[o + 2], stats[o + 3]).values(group))
            got = self.nightly.fold(read.nights, hashes)
            values.update(got[0])
            values.update(event_time_values(txn.ts, self.event_time))
            values.update(compute_ratios(values, self.ratios))
            newest = stats[0]  # stores.redis_online.newest_counted_ts, folded by the apply script
            ages = {group.name: 0 if newest is None or not in_window(newest, t, window) else max(0, at_ms - newest)
                    for group, window in self.stream}
            cutoffs = got[1]
            for name in self.batch_groups:
                cutoff = cutoffs.get(name)
                ages[name] = None if cutoff is None else max(0, at_ms - cutoff)
            out.append((values, ages))
        return out
