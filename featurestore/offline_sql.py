"""The offline feature definitions as SQL, generated from the declarations and run by both DuckDB and Spark.

Input relation `events(txn_id, card, amount, amount_cents, ts, fraud_label, late, seq, arrived_ms, prev_max_ts)`,
one row per distinct txn_id; `seq` is the card's arrival position (a history file's row index, or the stream's
per-card sequence), `arrived_ms` when it reached the store (a history file's rows arrive at their event time) and
`prev_max_ts` the newest ts among the card's earlier arrivals (`arrival_order_sql`).

A stream group's window counts the card's on-time events with ts in [t - W, t] that arrived before x, plus x
(SPEC section 4). SQL's RANGE frame over ts gives every on-time event in [t - W, t]: exactly right unless an
event that arrived *after* x sits in it. Only an "overtaken" event (one whose ts is at most the card's running
maximum when it arrived: ties and out-of-order arrivals) can, and those are few, so the transactions they touch
are found with a small join and recomputed by brute force; every other row takes the frame. Statistics are in
integer cents (count, sum, min, max) and features derive from them exactly like `WindowAggregate.value`.
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


def value_sql(function: str, n: str, s: str, mn: str, mx: str) -> str:
    """One aggregation from statistics columns, as `WindowAggregate.value` computes it (NaN for an empty window)."""
    nan = "CAST('NaN' AS DOUBLE)"
    if function == "count":
        return f"CAST({n} AS BIGINT)"
    if function == "mean":
        return _avg(s, n)
    if function == "sum":
        return f"CAST({s} AS DOUBLE) / 100.0"
    cents = mn if function == "min" else mx
    return f"CASE WHEN {cents} IS NULL THEN {nan} ELSE CAST({cents} AS DOUBLE) / 100.0 END"


def stream_group_sql(group: FeatureGroup, source: str = "events", carry: tuple[str, ...] = ("txn_id",)) -> str:
    """The `carry` columns and the group's features for every transaction (see the module docstring for the
    method). Carrying the event columns through saves a join on txn_id over every row."""
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
    own_n, own_c = "CASE WHEN f.late THEN 0 ELSE 1 END", "CASE WHEN f.late THEN 0 ELSE f.amount_cents END"
    # Others' statistics (x left out), from the brute force where it ran, else from the frame; then x added once.
    n = f"(1 + CASE WHEN e.txn_id IS NULL THEN f.frame_n - {own_n} ELSE e.n END)"
    s = f"(f.amount_cents + CASE WHEN e.txn_id IS NULL THEN f.frame_s - {own_c} ELSE COALESCE(e.s, 0) END)"
    mn = "LEAST(f.amount_cents, COALESCE(CASE WHEN e.txn_id IS NULL THEN f.frame_mn ELSE e.mn END, f.amount_cents))"
    mx = "GREATEST(f.amount_cents, COALESCE(CASE WHEN e.txn_id IS NULL THEN f.frame_mx ELSE e.mx END, f.amount_cents))"
    cols = ",\n           ".join(f"{value_sql(a.function, n, s, mn, mx)} AS {a.name}" for a in group.features)
    frame = {"n": f"SUM(CASE WHEN late THEN 0 ELSE 1 END) {rng} AS frame_n",
             "s": f"SUM(CASE WHEN late THEN 0 ELSE amount_cents END) {rng} AS frame_s",
             "mn": f"MIN({on_cents}) {rng} AS frame_mn", "mx": f"MAX({on_cents}) {rng} AS frame_mx"}
    inner = ", ".join(dict.fromkeys(("txn_id", "amount_cents", "late", *carry)))
    return f"""
    SELECT {', '.join(f"f.{c}" for c in carry)},
           {cols}
    FROM (SELECT {inner}, {', '.join(frame[k] for k in group.stats)} FROM {source}) f
    LEFT JOIN {exact} e ON e.txn_id = f.txn_id
    """


BASE_COLUMNS = ("txn_id", "card", "ts", "amount", "amount_cents", "fraud_label", "late", "seq", "arrived_ms")


def stream_features_sql(registry: Registry = REGISTRY, source: str = "events") -> str:
    """Every transaction with every stream group's features: the first group carries the event columns, each
    further group joins on txn_id."""
    first, *more = registry.stream_groups
    sql = f"({stream_group_sql(first, source, BASE_COLUMNS)}) b"
    if not more:
        return f"SELECT * FROM {sql}"
    select = [f"b.{c}" for c in (*BASE_COLUMNS, *first.feature_names)]
    joins = []
    for i, g in enumerate(more):
        select += [f"g{i}.{name}" for name in g.feature_names]
        joins.append(f"JOIN ({stream_group_sql(g, source)}) g{i} ON g{i}.txn_id = b.txn_id")
    return f"SELECT {', '.join(select)} FROM {sql} " + "\n".join(joins)


SNAPSHOT_STATS = {"n": "count", "s": "sum_cents", "mn": "min_cents", "mx": "max_cents"}


def snapshots_sql(group: FeatureGroup, week_days: str = "week_days", source: str = "events") -> str:
    """Every night's snapshot of a batch group in one pass: every valid transaction, late ones included, with ts
    in [C - window, C), for each cut-off C listed in `week_days(day, cutoff_ms)` (the days before each cut-off).

    Statistics are kept per card and day once; each day then feeds the nights whose window holds it (an equi-join
    on the day), so a backfill of N nights reads the events once instead of N times. Rows carry the statistics
    (`count`, `sum_cents`, `min_cents`, `max_cents` as the group needs them: the online store keeps these) and
    the group's features.
    """
    stats = {"n": "SUM(d.n)", "s": "SUM(d.s)", "mn": "MIN(d.mn)", "mx": "MAX(d.mx)"}
    typed = {k: f"CAST({v} AS BIGINT)" for k, v in stats.items()}
    cols = [f"{typed[k]} AS {SNAPSHOT_STATS[k]}" for k in group.stats]
    cols += [f"{value_sql(a.function, typed['n'], typed['s'], typed['mn'], typed['mx'])} AS {a.name}"
             for a in group.features]
    return f"""
    SELECT d.card, {', '.join(cols)}, CAST(w.cutoff_ms AS BIGINT) AS cutoff_ms
    FROM (SELECT card, {day_of('ts')} AS day, COUNT(*) AS n, SUM(amount_cents) AS s, MIN(amount_cents) AS mn,
                 MAX(amount_cents) AS mx
          FROM {source} GROUP BY 1, 2) d
    JOIN {week_days} w ON w.day = d.day
    GROUP BY d.card, w.cutoff_ms
    """


EVENT_COLUMNS = ("txn_id", "card", "amount", "amount_cents", "ts", "fraud_label", "late", "seq", "arrived_ms")


def dedup_sql(source: str, order: str = "seq") -> str:
    """Keep the first arrival of each txn_id (redeliveries and re-sends change nothing)."""
    cols = ", ".join(EVENT_COLUMNS)
    return f"""
    SELECT {cols} FROM (
        SELECT *, ROW_NUMBER() OVER (PARTITION BY txn_id ORDER BY {order}) AS rn FROM {source}
    ) d WHERE rn = 1
    """


def asof_sql(features: str, snap_days: str = "snap_days", snap_cutoffs: str = "snap_cutoffs") -> str:
    """`features` plus `snapshot_cutoff_ms`: the latest cut-off C <= t whose snapshot was published at or before
    the transaction arrived (SPEC section 4, visibility).

    Cut-offs are midnights, so the latest C <= t is the latest C <= t's midnight: `snap_days(day, c1, p1)` maps a
    day to it and its publication time (an equi-join, cheap on both engines). Only a transaction that arrived
    before c1 was published needs more: the latest earlier cut-off published by then, from `snap_cutoffs
    (cutoff_ms, published_ms)`, for those few rows only.
    """
    day = day_of("f.ts")
    return f"""
    SELECT f.*, CASE WHEN d.p1 <= f.arrived_ms THEN d.c1 ELSE b.c2 END AS snapshot_cutoff_ms
    FROM {features} f
    LEFT JOIN {snap_days} d ON d.day = {day}
    LEFT JOIN (
        SELECT f.txn_id, MAX(c.cutoff_ms) AS c2
        FROM {features} f
        JOIN {snap_days} d ON d.day = {day} AND d.p1 > f.arrived_ms
        JOIN {snap_cutoffs} c ON c.cutoff_ms < d.c1 AND c.published_ms <= f.arrived_ms
        GROUP BY f.txn_id
    ) b ON b.txn_id = f.txn_id
    """


def training_columns(registry: Registry = REGISTRY) -> tuple[str, ...]:
    """The training set's schema, from the declarations: keys, label, every group's features, the snapshot used,
    the ratios."""
    return ("txn_id", "card", "ts", "amount", "fraud_label", *registry.group_features, "snapshot_cutoff_ms",
            *(r.name for r in registry.ratios))


TRAINING_COLUMNS = training_columns()


def training_select_sql(features: str, registry: Registry = REGISTRY, snapshots: str = "snap") -> str:
    """Stream and batch groups side by side; a card absent from the chosen snapshot had no transaction in its
    window (count 0, amounts missing), no snapshot at all leaves the batch group missing (NaN), exactly as the
    online read does."""
    group = registry.batch_group
    stat = {k: (f"COALESCE(s.{v}, 0)" if k in ("n", "s") else f"s.{v}") for k, v in SNAPSHOT_STATS.items()}
    nan = "CAST('NaN' AS DOUBLE)"
    batch = [f"CASE WHEN f.snapshot_cutoff_ms IS NULL THEN {nan} ELSE CAST("
             f"{value_sql(a.function, stat['n'], stat['s'], stat['mn'], stat['mx'])} AS DOUBLE) END AS {a.name}"
             for a in group.features]
    stream = [f"f.{name}" for g in registry.stream_groups for name in g.feature_names]
    return f"""
    SELECT f.txn_id, f.card, f.ts, f.amount, f.fraud_label, {', '.join(stream)}, {', '.join(batch)},
           f.snapshot_cutoff_ms
    FROM {features} f
    LEFT JOIN {snapshots} s ON s.cutoff_ms = f.snapshot_cutoff_ms AND s.card = f.card
    """


def features_in_range_sql(start_ms: int, end_ms: int, registry: Registry = REGISTRY, source: str = "events") -> str:
    """The stream groups for transactions with ts in [start_ms, end_ms) (windows see everything before)."""
    return f"""
    SELECT * FROM ({stream_features_sql(registry, source)}) a WHERE ts >= {int(start_ms)} AND ts < {int(end_ms)}
    """


def training_sql(features: str = "f10", registry: Registry = REGISTRY) -> str:
    """The point-in-time training rows from a materialized `features_in_range_sql` relation, on either engine.

    Expects `snap` (the snapshots' rows), `snap_days` and `snap_cutoffs` to be registered (see
    `stores.offline_files.snapshot_tables`).
    """
    return training_select_sql(f"({asof_sql(features)})", registry)
