"""The offline feature definitions as SQL, generated from the declarations and run by both DuckDB and Spark.

Input relation `events(txn_id, card, merchant, amount, amount_cents, ts, fraud_label, late, seq, arrived_ms,
card_no, prev_max_ts)`, one row per distinct txn_id; `seq` is the card's arrival position (a history file's row index, or the stream's
per-card sequence), `arrived_ms` when it reached the store (a history file's rows arrive at their event time),
`card_no` a dense integer per card (what the card windows partition by: sorting millions of rows on 64-character
keys cost a third of each window's time) and `prev_max_ts` the newest ts among the card's earlier arrivals
(`arrival_order_sql`).

A stream group's window counts the card's on-time events with ts in [t - W, t] that arrived before x, plus x
(SPEC section 4). SQL's RANGE frame over ts gives every on-time event in [t - W, t]: exactly right unless an
event that arrived *after* x sits in it. Only an "overtaken" event (one whose ts is at most the card's running
maximum when it arrived: ties and out-of-order arrivals) can, and those are few. One pass computes every
group's frame plus the largest overtaken arrival position in the longest frame, which tells whether x's frames
can be wrong; the few rows where they can are recomputed by brute force (one join for every group), every other
row takes its frames. Statistics are in integer cents (count, sum, min, max) and features derive from them
exactly like `WindowAggregate.value`.

Nightly (batch) groups are computed by `featurestore.batch_sql`; the training set joins each one's snapshot as of
each transaction, on its entity (card or merchant), here.
"""

from __future__ import annotations

from featurestore.definitions import DAY_MS, REGISTRY, FeatureGroup, Registry


def _avg(sum_expr: str, count_expr: str) -> str:
    return (f"CASE WHEN {count_expr} > 0 THEN CAST({sum_expr} AS DOUBLE) / CAST(100 * {count_expr} AS DOUBLE) "
            f"ELSE CAST('NaN' AS DOUBLE) END")


def day_of(ts_expr: str) -> str:
    """The UTC day number of an epoch-ms expression (identical on both engines)."""
    return f"CAST(FLOOR({ts_expr} / {float(DAY_MS)}) AS BIGINT)"


def arrival_ms_of_seq(seq_expr: str) -> str:
    """A stream-assigned arrival position is the worker's clock in microseconds (see apply_events.lua)."""
    return f"CAST(FLOOR({seq_expr} / 1000.0) AS BIGINT)"


PREVIOUS_MAX_TS = "MAX(ts) OVER (PARTITION BY card_no ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)"


def with_card_numbers_sql(source: str) -> str:
    """`source` plus `card_no`, as a subquery: its distinct cards numbered 1..n, in key order (a history's loader
    numbers them while keying them instead)."""
    return f"""(
    SELECT s.*, n.card_no FROM {source} s
    JOIN (SELECT card, ROW_NUMBER() OVER (ORDER BY card) AS card_no FROM (SELECT DISTINCT card FROM {source}) c) n
      ON n.card = s.card
    ) numbered"""


def arrival_order_sql(source: str, allowed_lateness_ms: int | None = None) -> str:
    """`events` from distinct transactions with their `card_no`: adds `prev_max_ts`, the newest ts among the
    card's earlier arrivals.

    With `allowed_lateness_ms` (a history file; the stream marks late events itself) it also marks late ones:
    more than the allowed lateness behind that newest ts. Late events never raise the maximum, so a running max
    over every earlier arrival is the card's newest event, as the worker sees it.
    """
    cols = ", ".join(c for c in EVENT_COLUMNS if c != "late" or allowed_lateness_ms is None)
    late = "" if allowed_lateness_ms is None else \
        f", COALESCE(ts < prev_max_ts - {int(allowed_lateness_ms)}, FALSE) AS late"
    return f"""
    SELECT {cols}, card_no, prev_max_ts{late}
    FROM (SELECT *, {PREVIOUS_MAX_TS} AS prev_max_ts FROM {source}) p
    """


def value_sql(function: str, n: str, s: str, mn: str, mx: str, f: str = "0", column: str = "amount") -> str:
    """One aggregation from statistics columns, as `WindowAggregate.value` computes it (NaN for an empty window).

    Over `known_fraud` the sum is the known fraud count `f` and the mean the fraud rate f / n."""
    nan = "CAST('NaN' AS DOUBLE)"
    if function == "count":
        return f"CAST({n} AS BIGINT)"
    if column == "known_fraud":
        if function == "sum":
            return f"CAST({f} AS DOUBLE)"
        return f"CASE WHEN {n} > 0 THEN CAST({f} AS DOUBLE) / CAST({n} AS DOUBLE) ELSE {nan} END"
    if function == "mean":
        return _avg(s, n)
    if function == "sum":
        return f"CAST({s} AS DOUBLE) / 100.0"
    cents = mn if function == "min" else mx
    return f"CASE WHEN {cents} IS NULL THEN {nan} ELSE CAST({cents} AS DOUBLE) / 100.0 END"


def _frame_stats(group: FeatureGroup, i: int) -> list[str]:
    """One stream group's RANGE-frame statistics over the on-time events (`frame<i>_<stat>`)."""
    rng = f"OVER (PARTITION BY card_no ORDER BY ts RANGE BETWEEN {int(group.window_ms)} PRECEDING AND CURRENT ROW)"
    on_cents = "CASE WHEN late THEN NULL ELSE amount_cents END"
    frame = {"n": f"SUM(CASE WHEN late THEN 0 ELSE 1 END) {rng} AS frame{i}_n",
             "s": f"SUM(CASE WHEN late THEN 0 ELSE amount_cents END) {rng} AS frame{i}_s",
             "mn": f"MIN({on_cents}) {rng} AS frame{i}_mn", "mx": f"MAX({on_cents}) {rng} AS frame{i}_mx"}
    return [frame[k] for k in group.stats]


def stream_frames_sql(groups: tuple[FeatureGroup, ...], source: str = "events", carry: tuple[str, ...] = ("txn_id",),
                      start_ms: int | None = None, end_ms: int | None = None) -> str:
    """Pass 1 of the stream groups (materialize it as `STREAM_FRAMES`): every group's RANGE frame in one SELECT
    (same partition and order, so one sort), and `overtaken_seq`, the largest arrival position of an overtaken
    event in the longest frame. An event that arrived after x and sits in x's frame is overtaken (its ts was at
    most the running maximum when it arrived), so x's frame is exact unless `overtaken_seq > seq`.

    With a [start_ms, end_ms) range only the events a window of those rows can reach are read: a frame looks back
    at most the longest window and never forward."""
    longest = max(int(g.window_ms) for g in groups)
    rng = f"OVER (PARTITION BY card_no ORDER BY ts RANGE BETWEEN {longest} PRECEDING AND CURRENT ROW)"
    frames = [f for i, g in enumerate(groups) for f in _frame_stats(g, i)]
    inner = ", ".join(dict.fromkeys(("txn_id", "card", "ts", "seq", "amount_cents", "late", *carry)))
    where = []
    if start_ms is not None:
        where.append(f"ts >= {int(start_ms) - longest}")
    if end_ms is not None:
        where.append(f"ts < {int(end_ms)}")
    return f"""
    SELECT {inner}, {', '.join(frames)},
           MAX(CASE WHEN NOT late AND ts <= prev_max_ts THEN seq END) {rng} AS overtaken_seq
    FROM {source} {'WHERE ' + ' AND '.join(where) if where else ''}
    """


def _features(groups: tuple[FeatureGroup, ...], stats: dict[tuple[int, str], str]) -> list[str]:
    """Each group's features from the others' statistics `stats[(i, stat)]` (x left out), x added once."""
    cols = []
    for i, g in enumerate(groups):
        n, s = f"(1 + {stats[i, 'n']})", f"(x.amount_cents + {stats[i, 's']})" if "s" in g.stats else "0"
        mn = f"LEAST(x.amount_cents, COALESCE({stats[i, 'mn']}, x.amount_cents))" if "mn" in g.stats else "0"
        mx = f"GREATEST(x.amount_cents, COALESCE({stats[i, 'mx']}, x.amount_cents))" if "mx" in g.stats else "0"
        cols += [f"{value_sql(a.function, n, s, mn, mx)} AS {a.name}" for a in g.features]
    return cols


def stream_groups_sql(groups: tuple[FeatureGroup, ...], source: str = "events",
                      carry: tuple[str, ...] = ("txn_id",), frames: str = "stream_frames",
                      start_ms: int | None = None, end_ms: int | None = None) -> str:
    """Pass 2: the `carry` columns and every group's features for every transaction of `frames` (pass 1,
    `stream_frames_sql`) with ts in [start_ms, end_ms), as two disjoint branches:
    - a row no overtaken event can change takes its frames (the frame holds x itself unless x is late);
    - the few others are recomputed by brute force over `source`: the card's on-time events that arrived before
      x with ts in [t - W, t], every group in one join (conditional aggregates per window).
    No join runs over every row (see the module docstring for the method)."""
    longest = max(int(g.window_ms) for g in groups)
    keep = ["x.overtaken_seq IS NULL OR x.overtaken_seq <= x.seq"]
    if start_ms is not None:
        keep.append(f"x.ts >= {int(start_ms)}")
    if end_ms is not None:
        keep.append(f"x.ts < {int(end_ms)}")
    own_n, own_c = "CASE WHEN x.late THEN 0 ELSE 1 END", "CASE WHEN x.late THEN 0 ELSE x.amount_cents END"
    framed = {}
    for i in range(len(groups)):
        framed |= {(i, "n"): f"(x.frame{i}_n - {own_n})", (i, "s"): f"(x.frame{i}_s - {own_c})",
                   (i, "mn"): f"x.frame{i}_mn", (i, "mx"): f"x.frame{i}_mx"}
    exact = {}
    for i, g in enumerate(groups):
        inside = f"y.ts >= x.ts - {int(g.window_ms)}"
        exact |= {(i, "n"): f"COUNT(CASE WHEN {inside} THEN y.seq END)",
                  (i, "s"): f"COALESCE(SUM(CASE WHEN {inside} THEN y.amount_cents END), 0)",
                  (i, "mn"): f"MIN(CASE WHEN {inside} THEN y.amount_cents END)",
                  (i, "mx"): f"MAX(CASE WHEN {inside} THEN y.amount_cents END)"}
    keys = ", ".join(f"x.{c}" for c in dict.fromkeys(("txn_id", "card", "ts", "seq", "amount_cents", "late", *carry)))
    sep = ",\n           "
    out = ", ".join(f"x.{c}" for c in carry)
    redo = " AND ".join(["x.overtaken_seq > x.seq", *keep[1:]])
    return f"""
    SELECT {out},
           {sep.join(_features(groups, framed))}
    FROM {frames} x
    WHERE ({keep[0]}){''.join(' AND ' + k for k in keep[1:])}
    UNION ALL
    SELECT {out},
           {sep.join(_features(groups, exact))}
    FROM (SELECT * FROM {frames} x WHERE {redo}) x
    LEFT JOIN {source} y ON y.card = x.card AND y.seq < x.seq AND NOT y.late
                         AND y.ts <= x.ts AND y.ts >= x.ts - {longest}
    GROUP BY {keys}
    """


BASE_COLUMNS = ("txn_id", "card", "merchant", "ts", "amount", "amount_cents", "fraud_label", "late", "seq",
                "arrived_ms")


STREAM_FRAMES = "stream_frames"


def stream_features_steps(start_ms: int | None = None, end_ms: int | None = None, registry: Registry = REGISTRY,
                          source: str = "events", out: str = "f10") -> list[tuple[str, str]]:
    """Every transaction with ts in [start_ms, end_ms) with every stream group's features, the event columns
    carried, as (relation, SQL) steps an engine materializes in order: pass 1 (`STREAM_FRAMES`), then `out`.
    Windows see every event before the range."""
    groups = registry.stream_groups
    return [(STREAM_FRAMES, stream_frames_sql(groups, source, BASE_COLUMNS, start_ms, end_ms)),
            (out, stream_groups_sql(groups, source, BASE_COLUMNS, STREAM_FRAMES, start_ms, end_ms))]


#: A snapshot's statistic columns, by the stat names of `definitions.STAT_ORDER` (integers; the online store
#: keeps these and folds them into the features).
SNAPSHOT_STATS = {"n": "count", "s": "sum_cents", "mn": "min_cents", "mx": "max_cents", "f": "fraud_count"}

EVENT_COLUMNS = ("txn_id", "card", "merchant", "amount", "amount_cents", "ts", "fraud_label", "late", "seq",
                 "arrived_ms")


def dedup_sql(source: str, order: str = "seq") -> str:
    """Keep the first arrival of each txn_id (redeliveries and re-sends change nothing)."""
    cols = ", ".join(EVENT_COLUMNS)
    return f"""
    SELECT {cols} FROM (
        SELECT *, ROW_NUMBER() OVER (PARTITION BY txn_id ORDER BY {order}) AS rn FROM {source}
    ) d WHERE rn = 1
    """


def asof_sql(features: str, snap_days: str = "snap_days", snap_cutoffs: str = "snap_cutoffs",
             column: str = "snapshot_cutoff_ms", columns: tuple[str, ...] = ("txn_id", "ts", "arrived_ms")) -> str:
    """`features` (its `columns`) plus `column`: the latest cut-off C <= t whose snapshot was published at or
    before the transaction arrived (SPEC section 4, visibility).

    Cut-offs are midnights, so the latest C <= t is the latest C <= t's midnight: `snap_days(day, c1, p1)` maps a
    day to it and its publication time (an equi-join on a small table, cheap on both engines). Only a transaction
    that arrived before c1 was published needs more: the latest earlier cut-off published by then, from
    `snap_cutoffs(cutoff_ms, published_ms)`. The two cases are disjoint branches, so no join runs over every row
    for the few of the second.
    """
    day = day_of("f.ts")
    cols = ", ".join(f"f.{c}" for c in columns)
    return f"""
    SELECT {cols}, d.c1 AS {column}
    FROM {features} f LEFT JOIN {snap_days} d ON d.day = {day}
    WHERE d.p1 IS NULL OR d.p1 <= f.arrived_ms
    UNION ALL
    SELECT {cols}, MAX(c.cutoff_ms) AS {column}
    FROM {features} f
    JOIN {snap_days} d ON d.day = {day} AND d.p1 > f.arrived_ms
    LEFT JOIN {snap_cutoffs} c ON c.cutoff_ms < d.c1 AND c.published_ms <= f.arrived_ms
    GROUP BY {cols}
    """


def key_columns(registry: Registry = REGISTRY) -> tuple[str, ...]:
    """The entity columns a training row carries: the card, then any other entity a batch group is kept for."""
    others = (g.entity_column for g in registry.batch_groups if g.entity_column != "card")
    return ("card", *dict.fromkeys(others))


def training_columns(registry: Registry = REGISTRY) -> tuple[str, ...]:
    """The training set's schema, from the declarations: keys, label, every group's features, the snapshot used,
    the event-time features, the ratios."""
    return ("txn_id", *key_columns(registry), "ts", "amount", "fraud_label", *registry.group_features,
            "snapshot_cutoff_ms", *registry.event_time_features, *(r.name for r in registry.ratios))


TRAINING_COLUMNS = training_columns()


def snap_view(group: FeatureGroup) -> str:
    """The relation name holding every snapshot row of a batch group (all cut-offs)."""
    return f"snap__{group.name}"


def asof_views(k: int) -> tuple[str, str]:
    """The `snap_days` and `snap_cutoffs` relations of the k-th distinct publication history."""
    return f"snap_days__{k}", f"snap_cutoffs__{k}"


def _snapshots_side_by_side(groups: tuple[FeatureGroup, ...]) -> str:
    """The snapshot rows of batch groups that share an entity and a publication history, one row per (entity
    key, cut-off) with each group's statistics as `<group>__<stat>` (NULL where the key is absent from that
    group's snapshot): the training rows then join one relation per entity, not one per group."""
    col = groups[0].entity_column
    names = [(g, k) for g in groups for k in g.stats]
    parts = []
    for g in groups:
        cells = [f"{SNAPSHOT_STATS[k]} AS {h.name}__{k}" if h is g else f"CAST(NULL AS BIGINT) AS {h.name}__{k}"
                 for h, k in names]
        parts.append(f"SELECT {col}, cutoff_ms, {', '.join(cells)} FROM {snap_view(g)}")
    union = "\n        UNION ALL\n        ".join(parts)
    picked = ", ".join(f"MAX({g.name}__{k}) AS {g.name}__{k}" for g, k in names)
    return f"""(SELECT {col}, cutoff_ms, {picked} FROM (
        {union}
    ) u GROUP BY {col}, cutoff_ms)"""


def training_select_sql(features: str, registry: Registry = REGISTRY, asof_sets: tuple[int, ...] | None = None) -> str:
    """Stream and batch groups side by side. Each batch group is joined on its entity at its visible cut-off
    (`asof_sets[j]`: which publication history the j-th batch group follows, its cut-off column `asof<k>`); an entity
    absent from that snapshot gets the declared default (no transaction in its window: counts and sums 0, means
    missing), no snapshot at all leaves the group missing (NaN), exactly as the online read does. Groups of one
    entity and history are joined as one relation (`_snapshots_side_by_side`)."""
    groups = registry.batch_groups
    asof_sets = asof_sets or tuple(range(len(groups)))
    nan = "CAST('NaN' AS DOUBLE)"
    buckets: dict[tuple[str, int], list[FeatureGroup]] = {}
    for g, k in zip(groups, asof_sets, strict=True):
        buckets.setdefault((g.entity_column, k), []).append(g)
    alias = {(col, k): f"s{j}" for j, (col, k) in enumerate(buckets)}
    batch = []
    for g, k in zip(groups, asof_sets, strict=True):
        a = alias[g.entity_column, k]
        stat = {key: (f"COALESCE({a}.{g.name}__{key}, 0)" if key in ("n", "s", "f") else f"{a}.{g.name}__{key}")
                for key in SNAPSHOT_STATS if key in g.stats}
        for x in g.features:
            value = value_sql(x.function, stat.get("n", "0"), stat.get("s", "0"), stat.get("mn"), stat.get("mx"),
                              stat.get("f", "0"), x.column)
            batch.append(f"CASE WHEN f.asof{k} IS NULL THEN {nan} ELSE CAST({value} AS DOUBLE) END AS {x.name}")
    joins = [f"LEFT JOIN {_snapshots_side_by_side(tuple(members))} {alias[col, k]} "
             f"ON {alias[col, k]}.cutoff_ms = f.asof{k} AND {alias[col, k]}.{col} = f.{col}"
             for (col, k), members in buckets.items()]
    stream = [f"f.{name}" for g in registry.stream_groups for name in g.feature_names]
    keys = ", ".join(f"f.{c}" for c in key_columns(registry))
    first = f"f.asof{asof_sets[0]}" if groups else "CAST(NULL AS BIGINT)"
    return f"""
    SELECT f.txn_id, {keys}, f.ts, f.amount, f.fraud_label, {', '.join([*stream, *batch])},
           {first} AS snapshot_cutoff_ms
    FROM {features} f
    {' '.join(joins)}
    """


def training_sql(features: str = "f10", registry: Registry = REGISTRY,
                 asof_sets: tuple[int, ...] | None = None) -> str:
    """The point-in-time training rows from the materialized stream features (`stream_features_steps`), on
    either engine.

    Expects, per batch group, `snap_view(group)` (its snapshot rows) and, per distinct publication history k
    (`asof_sets`, default one per group), `asof_views(k)` to be registered (`stores.offline_files`). Every batch
    group of one nightly run shares the cut-off and publication time, so usually all follow one history."""
    asof_sets = asof_sets or tuple(range(len(registry.batch_groups)))
    rel = features
    columns = (*BASE_COLUMNS, *(n for g in registry.stream_groups for n in g.feature_names))
    for k in sorted(set(asof_sets)):
        days, cutoffs = asof_views(k)
        rel = f"({asof_sql(rel, days, cutoffs, column=f'asof{k}', columns=columns)})"
        columns = (*columns, f"asof{k}")
    return training_select_sql(rel, registry, asof_sets)
