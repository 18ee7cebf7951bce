"""The offline feature definitions as SQL, generated from the declarations and run by both DuckDB and Spark.

Input relation `events(txn_id, card, merchant, amount, amount_cents, ts, fraud_label, late, seq, arrived_ms,
prev_max_ts)`, one row per distinct txn_id; `seq` is the card's arrival position (a history file's row index, or the stream's
per-card sequence), `arrived_ms` when it reached the store (a history file's rows arrive at their event time) and
`prev_max_ts` the newest ts among the card's earlier arrivals (`arrival_order_sql`).

A stream group's window counts the card's on-time events with ts in [t - W, t] that arrived before x, plus x
(SPEC section 4). SQL's RANGE frame over ts gives every on-time event in [t - W, t]: exactly right unless an
event that arrived *after* x sits in it. Only an "overtaken" event (one whose ts is at most the card's running
maximum when it arrived: ties and out-of-order arrivals) can, and those are few, so the transactions they touch
are found with a small join and recomputed by brute force; every other row takes the frame. Statistics are in
integer cents (count, sum, min, max) and features derive from them exactly like `WindowAggregate.value`.

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


PREVIOUS_MAX_TS = "MAX(ts) OVER (PARTITION BY card ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)"


def arrival_order_sql(source: str, allowed_lateness_ms: int | None = None) -> str:
    """`events` from distinct transactions: adds `prev_max_ts`, the newest ts among the card's earlier arrivals.

    With `allowed_lateness_ms` (a history file; the stream marks late events itself) it also marks late ones:
    more than the allowed lateness behind that newest ts. Late events never raise the maximum, so a running max
    over every earlier arrival is the card's newest event, as the worker sees it.
    """
    cols = ", ".join(c for c in EVENT_COLUMNS if c != "late" or allowed_lateness_ms is None)
    late = "" if allowed_lateness_ms is None else \
        f", COALESCE(ts < prev_max_ts - {int(allowed_lateness_ms)}, FALSE) AS late"
    return f"""
    SELECT {cols}, prev_max_ts{late}
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


def _stream_parts(group: FeatureGroup, i: int, source: str) -> tuple[list[str], str, list[str]]:
    """One stream group's pieces for the shared SELECT: its RANGE-frame columns (`frame<i>_*`), its brute-force
    relation for the few rows an overtaken event touches (joined as `e<i>`), and its feature expressions."""
    w = int(group.window_ms)
    rng = f"OVER (PARTITION BY card ORDER BY ts RANGE BETWEEN {w} PRECEDING AND CURRENT ROW)"
    on_cents = "CASE WHEN late THEN NULL ELSE amount_cents END"
    overtaken = f"(SELECT card, ts, seq FROM {source} WHERE NOT late AND ts <= prev_max_ts)"
    touched = f"""(SELECT DISTINCT x.txn_id FROM {source} x JOIN {overtaken} y
                   ON y.card = x.card AND y.seq > x.seq AND y.ts <= x.ts AND y.ts >= x.ts - {w})"""
    exact = f"""(SELECT x.txn_id, COUNT(y.seq) AS n, SUM(y.amount_cents) AS s, MIN(y.amount_cents) AS mn,
                        MAX(y.amount_cents) AS mx
                 FROM {source} x JOIN {touched} t ON t.txn_id = x.txn_id
                 LEFT JOIN {source} y ON y.card = x.card AND y.seq < x.seq AND NOT y.late
                                      AND y.ts <= x.ts AND y.ts >= x.ts - {w}
                 GROUP BY x.txn_id)"""
    e, fr = f"e{i}", f"f.frame{i}"
    own_n, own_c = "CASE WHEN f.late THEN 0 ELSE 1 END", "CASE WHEN f.late THEN 0 ELSE f.amount_cents END"
    # Others' statistics (x left out), from the brute force where it ran, else from the frame; then x added once.
    n = f"(1 + CASE WHEN {e}.txn_id IS NULL THEN {fr}_n - {own_n} ELSE {e}.n END)"
    s = f"(f.amount_cents + CASE WHEN {e}.txn_id IS NULL THEN {fr}_s - {own_c} ELSE COALESCE({e}.s, 0) END)"
    mn = f"LEAST(f.amount_cents, COALESCE(CASE WHEN {e}.txn_id IS NULL THEN {fr}_mn ELSE {e}.mn END, f.amount_cents))"
    mx = (f"GREATEST(f.amount_cents, COALESCE(CASE WHEN {e}.txn_id IS NULL THEN {fr}_mx ELSE {e}.mx END, "
          "f.amount_cents))")
    cols = [f"{value_sql(a.function, n, s, mn, mx)} AS {a.name}" for a in group.features]
    frame = {"n": f"SUM(CASE WHEN late THEN 0 ELSE 1 END) {rng} AS frame{i}_n",
             "s": f"SUM(CASE WHEN late THEN 0 ELSE amount_cents END) {rng} AS frame{i}_s",
             "mn": f"MIN({on_cents}) {rng} AS frame{i}_mn", "mx": f"MAX({on_cents}) {rng} AS frame{i}_mx"}
    return [frame[k] for k in group.stats], f"LEFT JOIN {exact} {e} ON {e}.txn_id = f.txn_id", cols


def stream_groups_sql(groups: tuple[FeatureGroup, ...], source: str = "events",
                      carry: tuple[str, ...] = ("txn_id",)) -> str:
    """The `carry` columns and the features of every group in `groups` for every transaction, in one pass: one
    SELECT holds every group's RANGE frame (same partition and order, so one sort), and each group's brute force
    joins only the few rows it recomputes (see the module docstring for the method). Carrying the event columns
    through saves a join on txn_id over every row."""
    frames, joins, cols = [], [], []
    for i, g in enumerate(groups):
        f, j, c = _stream_parts(g, i, source)
        frames += f
        joins.append(j)
        cols += c
    inner = ", ".join(dict.fromkeys(("txn_id", "amount_cents", "late", *carry)))
    sep = ",\n           "
    return f"""
    SELECT {', '.join(f"f.{c}" for c in carry)},
           {sep.join(cols)}
    FROM (SELECT {inner}, {', '.join(frames)} FROM {source}) f
    {' '.join(joins)}
    """


def stream_group_sql(group: FeatureGroup, source: str = "events", carry: tuple[str, ...] = ("txn_id",)) -> str:
    """The `carry` columns and one group's features for every transaction."""
    return stream_groups_sql((group,), source, carry)


BASE_COLUMNS = ("txn_id", "card", "merchant", "ts", "amount", "amount_cents", "fraud_label", "late", "seq",
                "arrived_ms")


def stream_features_sql(registry: Registry = REGISTRY, source: str = "events") -> str:
    """Every transaction with every stream group's features, all groups in one pass, the event columns carried."""
    return stream_groups_sql(registry.stream_groups, source, BASE_COLUMNS)


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
             column: str = "snapshot_cutoff_ms", base: str | None = None) -> str:
    """`features` plus `column`: the latest cut-off C <= t whose snapshot was published at or before the
    transaction arrived (SPEC section 4, visibility).

    Cut-offs are midnights, so the latest C <= t is the latest C <= t's midnight: `snap_days(day, c1, p1)` maps a
    day to it and its publication time (an equi-join, cheap on both engines). Only a transaction that arrived
    before c1 was published needs more: the latest earlier cut-off published by then, from `snap_cutoffs
    (cutoff_ms, published_ms)`, for those few rows only (looked up in `base`, the plain rows, default `features`).
    """
    day = day_of("f.ts")
    base = base or features
    return f"""
    SELECT f.*, CASE WHEN d.p1 <= f.arrived_ms THEN d.c1 ELSE b.c2 END AS {column}
    FROM {features} f
    LEFT JOIN {snap_days} d ON d.day = {day}
    LEFT JOIN (
        SELECT f.txn_id, MAX(c.cutoff_ms) AS c2
        FROM {base} f
        JOIN {snap_days} d ON d.day = {day} AND d.p1 > f.arrived_ms
        JOIN {snap_cutoffs} c ON c.cutoff_ms < d.c1 AND c.published_ms <= f.arrived_ms
        GROUP BY f.txn_id
    ) b ON b.txn_id = f.txn_id
    """


def key_columns(registry: Registry = REGISTRY) -> tuple[str, ...]:
    """The entity columns a training row carries: the card, then any other entity a batch group is kept for."""
    others = (g.entity_column for g in registry.batch_groups if g.entity_column != "card")
    return ("card", *dict.fromkeys(others))


def training_columns(registry: Registry = REGISTRY) -> tuple[str, ...]:
    """The training set's schema, from the declarations: keys, label, every group's features, the snapshot used,
    the ratios."""
    return ("txn_id", *key_columns(registry), "ts", "amount", "fraud_label", *registry.group_features,
            "snapshot_cutoff_ms", *(r.name for r in registry.ratios))


TRAINING_COLUMNS = training_columns()


def snap_view(group: FeatureGroup) -> str:
    """The relation name holding every snapshot row of a batch group (all cut-offs)."""
    return f"snap__{group.name}"


def asof_views(k: int) -> tuple[str, str]:
    """The `snap_days` and `snap_cutoffs` relations of the k-th distinct publication history."""
    return f"snap_days__{k}", f"snap_cutoffs__{k}"


def training_select_sql(features: str, registry: Registry = REGISTRY, asof_sets: tuple[int, ...] | None = None) -> str:
    """Stream and batch groups side by side. Each batch group is joined on its entity at its visible cut-off
    (`asof_sets[j]`: which publication history the j-th batch group follows, its cut-off column `asof<k>`); an entity
    absent from that snapshot gets the declared default (no transaction in its window: counts and sums 0, means
    missing), no snapshot at all leaves the group missing (NaN), exactly as the online read does."""
    groups = registry.batch_groups
    asof_sets = asof_sets or tuple(range(len(groups)))
    nan = "CAST('NaN' AS DOUBLE)"
    batch, joins = [], []
    for j, (g, k) in enumerate(zip(groups, asof_sets, strict=True)):
        a = f"s{j}"
        stat = {key: (f"COALESCE({a}.{col}, 0)" if key in ("n", "s", "f") else f"{a}.{col}")
                for key, col in SNAPSHOT_STATS.items()}
        batch += [f"CASE WHEN f.asof{k} IS NULL THEN {nan} ELSE CAST("
                  f"{value_sql(x.function, stat['n'], stat['s'], stat['mn'], stat['mx'], stat['f'], x.column)}"
                  f" AS DOUBLE) END AS {x.name}" for x in g.features]
        joins.append(f"LEFT JOIN {snap_view(g)} {a} ON {a}.cutoff_ms = f.asof{k} "
                     f"AND {a}.{g.entity_column} = f.{g.entity_column}")
    stream = [f"f.{name}" for g in registry.stream_groups for name in g.feature_names]
    keys = ", ".join(f"f.{c}" for c in key_columns(registry))
    first = f"f.asof{asof_sets[0]}" if groups else "CAST(NULL AS BIGINT)"
    return f"""
    SELECT f.txn_id, {keys}, f.ts, f.amount, f.fraud_label, {', '.join([*stream, *batch])},
           {first} AS snapshot_cutoff_ms
    FROM {features} f
    {' '.join(joins)}
    """


def features_in_range_sql(start_ms: int, end_ms: int, registry: Registry = REGISTRY, source: str = "events") -> str:
    """The stream groups for transactions with ts in [start_ms, end_ms) (windows see everything before)."""
    return f"""
    SELECT * FROM ({stream_features_sql(registry, source)}) a WHERE ts >= {int(start_ms)} AND ts < {int(end_ms)}
    """


def training_sql(features: str = "f10", registry: Registry = REGISTRY,
                 asof_sets: tuple[int, ...] | None = None) -> str:
    """The point-in-time training rows from a materialized `features_in_range_sql` relation, on either engine.

    Expects, per batch group, `snap_view(group)` (its snapshot rows) and, per distinct publication history k
    (`asof_sets`, default one per group), `asof_views(k)` to be registered (`stores.offline_files`). Every batch
    group of one nightly run shares the cut-off and publication time, so usually all follow one history."""
    asof_sets = asof_sets or tuple(range(len(registry.batch_groups)))
    rel = features
    for k in sorted(set(asof_sets)):
        days, cutoffs = asof_views(k)
        rel = f"({asof_sql(rel, days, cutoffs, column=f'asof{k}', base=features)})"
    return training_select_sql(rel, registry, asof_sets)
