"""The scorer's fold (`serving.scorer.Scorer.features`: `stores.redis_online.fold_read`, the ratios, the ages) for a
whole applied batch, with the work its transactions share done once.

Per transaction it computes what `Scorer.features` computes from that transaction's read reply, a column at a time
with the functions training uses for whole columns: each stream group's values from the window statistics the
apply script folded (`streaming.stream_reads.apply_with_stats`) by `featurestore.windows.aggregate_columns`
(`WindowAggregate.values` for many windows), the nightly groups by the statements of the store's
`SnapshotFold.fold` (`NightlyFold`), the event-time parts and the ratios by `event_time_columns` and
`compute_ratio_columns`. What is shared is not repeated: each group of a night is folded once per entity and kept
while its hash is (`streaming.stream_reads.SnapshotHashes`: a night's hashes never change under its snapshot id),
so a card's nightly features are folded once, not on every one of its transactions. tests/test_stream_reads.py
checks the result equals `Scorer.features` on the read script's replies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from featurestore.definitions import Registry
from featurestore.event_time import event_time_columns
from featurestore.events import Transaction
from featurestore.ratios import compute_ratio_columns
from featurestore.windows import WindowAggregate, aggregate_columns
from stores.online_snapshots import SnapshotFold, group_values
from streaming.stream_reads import EventRead

#: Distinct nights (a card's and its merchant's hashes) whose folded row is kept: beyond it the memo starts over.
ROW_MEMO = 50_000


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
        ordered = (*self.card_groups, *self.merchant_groups)
        #: What `fold` returns, in order: every nightly feature, and the group each cut-off belongs to.
        self.value_names = tuple(a.name for g in ordered for a in g[0].features)
        self.cutoff_names = tuple(g[1] for g in ordered)
        self._parts: dict = {}
        self._groups: dict = {}
        self._rows: dict = {}
        self._hashes: dict | None = None
        self._generation = -1

    def fold(self, nights: Iterable[tuple], hashes: dict) -> list[tuple[tuple, tuple]]:
        """Per transaction, (values in `value_names` order, cut-off in `cutoff_names` order) for its nights of
        (cut-off, "g1,g2", card hash key or None, merchant hash key or None), the hashes' contents (field -> raw
        value) in `hashes` (`SnapshotHashes`, or one batch's dict: what is folded from them is kept as long as
        they are). Transactions naming the same nights (a card's, at one merchant) share one answer."""
        generation = getattr(hashes, "generation", None)
        if hashes is not self._hashes or generation != self._generation:
            self._hashes, self._generation, self._groups, self._parts = hashes, generation, {}, {}
            self._rows = {}
        rows, out = self._rows, []
        for n in nights:
            got = rows.get(n)
            if got is None:
                if len(rows) >= ROW_MEMO:
                    rows.clear()
                got = rows[n] = self._row(n)
            out.append(got)
        return out

    def _row(self, nights: tuple) -> tuple[tuple, tuple]:
        """The card's groups depend on the nights and the card's hashes only, the merchant's on the nights, the
        merchant's hashes and whether the card's were read: each part is folded once for each such key (every
        transaction of a card, and of a busy merchant, shares its part)."""
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
        return card[0] + merchant[0], card[1] + merchant[1]

    def _part(self, nights: tuple, groups: tuple) -> tuple[tuple, tuple]:
        served = {}
        for cutoff, held, ck, mk in nights:
            night = (int(cutoff), ck, mk)
            for name in held.split(","):
                served[name] = night
        values: list[float] = []
        cutoffs: list[int | None] = []
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
            values.extend(got[0].values())  # in the group's feature order
            cutoffs.append(got[1])
        return tuple(values), tuple(cutoffs)

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


class FoldedBatch(NamedTuple):
    """A batch's features: per transaction every feature by name (the registry's `all_features` order) and each
    group's age in ms, as `Scorer.features` gives them; and each feature as one column, for the model's rows."""

    values: list[dict[str, float]]
    ages: list[dict[str, int | None]]
    columns: dict[str, Sequence]

    def matrix(self, names: Sequence[str]) -> np.ndarray:
        """The model's input rows (float32, `names` order), each value converted once, as `np.array(..., float32)`
        converts a row of the same numbers."""
        rows = np.empty((len(self.values), len(names)), dtype=np.float32)
        for j, name in enumerate(names):
            rows[:, j] = self.columns[name]
        return rows


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
        self.names = registry.all_features
        self.age_names = (*(g.name for g, _ in self.stream), *self.batch_groups)
        #: Where each batch group's cut-off sits in `NightlyFold.fold`'s cut-offs.
        self._cutoff_at = tuple(self.nightly.cutoff_names.index(name) for name in self.batch_groups)

    def fold(self, txns: Sequence[Transaction], reads: Sequence[EventRead], hashes: dict, at_ms: int) -> FoldedBatch:
        """The batch's features, column by column with the functions training uses for whole columns
        (`aggregate_columns`, `event_time_columns`, `compute_ratio_columns`), then row by row."""
        n = len(reads)
        width = 1 + 4 * len(self.stream)
        # [newest counted ts, then count, sum, min, max per window] per event; None (an empty min/max) -> NaN.
        stats = np.array([r.stats for r in reads], dtype=np.float64).reshape(n, width)
        columns: dict[str, Sequence] = {"amount": [t.amount for t in txns]}
        for j, (group, _) in enumerate(self.stream):
            o = 1 + 4 * j
            columns.update(aggregate_columns(group, stats[:, o], stats[:, o + 1], stats[:, o + 2], stats[:, o + 3]))
        nightly = self.nightly.fold([r.nights for r in reads], hashes)
        if n:
            columns.update(zip(self.nightly.value_names, zip(*(v for v, _ in nightly), strict=True), strict=True))
        else:
            columns.update((name, ()) for name in self.nightly.value_names)
        columns.update(event_time_columns(np.array([t.ts for t in txns], dtype=np.int64), self.event_time))
        columns.update(compute_ratio_columns(columns, self.ratios))
        names = self.names
        listed = [c.tolist() if isinstance(c, np.ndarray) else c for c in (columns[name] for name in names)]
        values = [dict(zip(names, row, strict=True)) for row in zip(*listed, strict=True)]
        ages = self._ages(stats[:, 0], [r.ts for r in reads], [c for _, c in nightly], at_ms)
        return FoldedBatch(values, ages, columns)

    def _ages(self, newest: np.ndarray, ts: list[int], cutoffs: list[tuple], at_ms: int) -> list[dict]:
        """`Scorer._ages`: a stream group's age is now minus its newest counted event time (0 when it counts none:
        `newest` NaN or outside the window), a batch group's now minus its night's cut-off (None: none).
        `cutoffs`: per transaction, its nights' cut-offs in `NightlyFold.cutoff_names` order (shared by the
        transactions of a card: each distinct tuple's ages are computed once)."""
        t = np.array(ts, dtype=np.float64)
        known = ~np.isnan(newest)
        age = np.maximum(0.0, at_ms - newest)
        stream = []
        for _, window in self.stream:
            counted = known & (t - window <= newest) & (newest <= t)  # featurestore.windows.in_window
            stream.append(np.where(counted, age, 0.0).astype(np.int64).tolist())
        order = self._cutoff_at
        batch = {}
        for c in cutoffs:
            if c not in batch:
                batch[c] = tuple(None if c[i] is None else max(0, at_ms - c[i]) for i in order)
        names = self.age_names
        rows = zip(*stream, strict=True) if stream else ((),) * len(cutoffs)
        return [dict(zip(names, (*s, *batch[c]), strict=True)) for s, c in zip(rows, cutoffs, strict=True)]
