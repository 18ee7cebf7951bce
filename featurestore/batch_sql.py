"""Every batch group's nightly snapshots as one SQL text, generated from the declarations, run by DuckDB and Spark.

Inputs: `events` (one row per distinct txn_id, late ones included: `offline_sql.EVENT_COLUMNS` and `card_no`), `nights(day,
cutoff_ms)` (the cut-offs to compute, `day` = the cut-off's UTC day number), `calendar(day)` (every day number from
each night back the longest batch window: `calendar_days`) and `labels(txn_id, fraud_label, labeled_at)` (every
label version, possibly none).

For cut-off C a group covers the transactions with ts in [C - window, C), per entity key (SPEC section 4). The
method, per entity (card, merchant):
- statistics per (entity, day) once (count, cents sum/min/max);
- one probe row per entity and calendar day it can have data for; at the probe of night D, each group's window
  over days `[D - W, D - 1]` is a difference of two running totals (min and max: a RANGE frame), every group of
  the entity in the same SELECT (one pass over the days);
- `known_fraud` depends on the cut-off, not only on the day: only transactions with a fraud label version can be
  known frauds, so those few are expanded into the nights whose window holds them and where their latest version
  with labeled_at <= C is fraud (fraud wins a tie), then counted per (entity, night) and group window.
The result is wide: one row per (entity, night) with `<group>__<stat>` and every group's features; a group's
snapshot is its rows with a count above 0 (`offline_files.split_snapshots`).
"""

from __future__ import annotations

from featurestore.definitions import DAY_MS, REGISTRY, FeatureGroup, Registry
from featurestore.offline_sql import SNAPSHOT_STATS, day_of, value_sql

AMOUNT_STATS = {"n": "COUNT(*)", "s": "SUM(amount_cents)", "mn": "MIN(amount_cents)", "mx": "MAX(amount_cents)"}
#: An entity's dense integer column in `events` (`offline_sql`), what its rows are grouped and partitioned by where
#: one exists: on the 64-character card key that work took twice as long. The key is joined back at the end.
ENTITY_NUMBER = {"card": "card_no"}
FRAME_OF = {"n": "SUM", "s": "SUM", "mn": "MIN", "mx": "MAX"}


def stat_column(group: FeatureGroup, stat: str) -> str:
    """The wide result's column for one statistic of one group."""
    return f"{group.name}__{SNAPSHOT_STATS[stat]}"


def entities(registry: Registry) -> tuple[str, ...]:
    """The entities batch groups are kept for, in declaration order."""
    return tuple(dict.fromkeys(g.entity for g in registry.batch_groups))


def reads_fraud(group: FeatureGroup) -> bool:
    return "f" in group.stats


def window_stats(group: FeatureGroup) -> tuple[str, ...]:
    """The statistics kept for a group: its declared ones, and always the count (a group's rows are the entities
    with a transaction in its window)."""
    return ("n", *(k for k in group.stats if k != "n"))


def known_fraud_sql(registry: Registry, source: str, nights: str, labels: str) -> str:
    """(txn_id, card, card_no, merchant, ts, cutoff_ms): each transaction known as fraud at a night whose longest
    fraud-reading window holds it. Only txn_ids with a fraud version are expanded (versions are few)."""
    longest = max(g.window_ms for g in registry.batch_groups if reads_fraud(g))
    return f"""
    SELECT txn_id, card, card_no, merchant, ts, cutoff_ms FROM (
        SELECT v.txn_id, v.card, v.card_no, v.merchant, v.ts, v.fraud_label, n.cutoff_ms,
               ROW_NUMBER() OVER (PARTITION BY v.txn_id, n.cutoff_ms
                                  ORDER BY v.labeled_at DESC, v.fraud_label DESC) AS rn
        FROM (SELECT l.txn_id, CAST(l.fraud_label AS INT) AS fraud_label, CAST(l.labeled_at AS BIGINT) AS labeled_at,
                     e.card, e.card_no, e.merchant, e.ts
              FROM {labels} l
              JOIN (SELECT DISTINCT txn_id FROM {labels} WHERE fraud_label = 1) i ON i.txn_id = l.txn_id
              JOIN {source} e ON e.txn_id = l.txn_id) v
        JOIN {nights} n ON n.cutoff_ms > v.ts AND n.cutoff_ms <= v.ts + {int(longest)}
                        AND v.labeled_at <= n.cutoff_ms
    ) k WHERE rn = 1 AND fraud_label = 1
    """


def entity_sql(registry: Registry, entity: str, source: str, nights: str, labels: str,
               calendar: str = "calendar") -> str:
    """One entity's groups for every night: (entity, entity_key, cutoff_ms, every group's stats and features),
    with NULLs in the columns of the other entities' groups.

    Rows per entity key: its daily statistics (kind 1) and one probe per calendar day it can have data for (kind
    0, statistics empty). Count and sums are differences of running totals: at the probe of day D, the total of
    the days before D (probes sort before the same day's statistics), minus the same total W probes earlier,
    i.e. at day D - W (the calendar holds every day of [D - W, D]; an earlier probe a window or more back is
    never reached). Min and max, which do not subtract, take a RANGE frame over
    days [D - W, D - 1]. Only the probes of `nights` are kept."""
    mine = [g for g in registry.batch_groups if g.entity == entity]
    col = mine[0].entity_column
    number = ENTITY_NUMBER.get(col)
    by = number or col  # what the entity's rows are grouped and partitioned by
    stats = [k for k in AMOUNT_STATS if any(k in g.stats for g in mine) or k == "n"]
    additive = [k for k in stats if FRAME_OF[k] == "SUM"]
    longest_days = max(g.window_ms for g in mine) // DAY_MS
    day_stats = ", ".join(f"{AMOUNT_STATS[k]} AS {k}" for k in stats)
    probe_stats = ", ".join("0" if k in additive else "CAST(NULL AS BIGINT)" for k in stats)
    running = ", ".join(f"SUM({k}) OVER (PARTITION BY k ORDER BY day, kind ROWS UNBOUNDED PRECEDING) AS total_{k}"
                        for k in additive)
    extremes, frames = [], []
    for g in mine:
        days = g.window_ms // DAY_MS
        for k in window_stats(g):
            if k in additive:
                frames.append(f"total_{k} - COALESCE(LAG(total_{k}, {days}) OVER (PARTITION BY k ORDER BY day), 0) "
                              f"AS {stat_column(g, k)}")
            elif k in AMOUNT_STATS:
                rng = f"OVER (PARTITION BY k ORDER BY day RANGE BETWEEN {days} PRECEDING AND 1 PRECEDING)"
                extremes.append(f"{FRAME_OF[k]}({k}) {rng} AS {stat_column(g, k)}")
                frames.append(stat_column(g, k))
    fraud_groups = [g for g in mine if reads_fraud(g)]
    fraud_join = ""
    if fraud_groups:
        counts = ", ".join(f"SUM(CASE WHEN ts >= cutoff_ms - {int(g.window_ms)} THEN 1 ELSE 0 END) AS "
                           f"{stat_column(g, 'f')}" for g in fraud_groups)
        fraud_join = f"""LEFT JOIN (SELECT {by} AS k, cutoff_ms, {counts}
                   FROM ({known_fraud_sql(registry, source, nights, labels)}) kf GROUP BY {by}, cutoff_ms) kf
          ON kf.k = w.k AND kf.cutoff_ms = n.cutoff_ms"""
    out = []
    for g in registry.batch_groups:
        if g.entity != entity:
            out += [f"CAST(NULL AS BIGINT) AS {stat_column(g, k)}" for k in window_stats(g)]
            out += [f"CAST(NULL AS {'BIGINT' if a.function == 'count' else 'DOUBLE'}) AS {a.name}" for a in g.features]
            continue
        typed = {k: f"CAST(w.{stat_column(g, k)} AS BIGINT)" for k in window_stats(g) if k in AMOUNT_STATS}
        if "f" in g.stats:
            typed["f"] = f"CAST(COALESCE(kf.{stat_column(g, 'f')}, 0) AS BIGINT)"
        out += [f"{typed[k]} AS {stat_column(g, k)}" for k in window_stats(g)]
        for a in g.features:
            value = value_sql(a.function, typed["n"], typed.get("s"), typed.get("mn"), typed.get("mx"),
                              typed.get("f", "0"), a.column)
            out.append(f"{value} AS {a.name}")
    present = " OR ".join(f"w.{stat_column(g, 'n')} > 0" for g in mine)
    key, key_join = "w.k", ""
    if number:
        key, key_join = "m.key", f"JOIN (SELECT DISTINCT {number} AS k, {col} AS key FROM {source}) m ON m.k = w.k"
    return f"""
    SELECT '{entity}' AS entity, {key} AS entity_key, CAST(n.cutoff_ms AS BIGINT) AS cutoff_ms, {', '.join(out)}
    FROM (
        SELECT k, day, {', '.join(frames)}
        FROM (
            SELECT k, day, kind, {', '.join([running, *extremes])}
            FROM (
                SELECT {by} AS k, {day_of('ts')} AS day, 1 AS kind, {day_stats}
                FROM {source} GROUP BY 1, 2
                UNION ALL
                SELECT s.k, c.day, 0 AS kind, {probe_stats}
                FROM (SELECT {by} AS k, MIN({day_of('ts')}) AS lo, MAX({day_of('ts')}) AS hi FROM {source} GROUP BY 1) s
                JOIN {calendar} c ON c.day > s.lo AND c.day <= s.hi + {int(longest_days)}
            ) r
        ) t WHERE kind = 0
    ) w
    JOIN {nights} n ON n.day = w.day
    {key_join}
    {fraud_join}
    WHERE {present}
    """


#: The order of the wide result's rows: what `offline_files.split_snapshots` expects.
SNAPSHOT_ORDER = ("entity", "cutoff_ms", "entity_key")


def snapshots_sql(registry: Registry = REGISTRY, source: str = "events", nights: str = "nights",
                  labels: str = "labels", calendar: str = "calendar", ordered: bool = True) -> str:
    """Every batch group's snapshot for every night of `nights`, in one statement (see the module docstring),
    ordered by `SNAPSHOT_ORDER` unless `ordered` is false (Spark: its global sort, a sampling job and a shuffle of
    the wide rows, cost more than sorting the collected table; DuckDB sorts faster than the driver)."""
    union = "\nUNION ALL\n".join(entity_sql(registry, e, source, nights, labels, calendar)
                                 for e in entities(registry))
    return f"SELECT * FROM ({union}) u" + (f" ORDER BY {', '.join(SNAPSHOT_ORDER)}" if ordered else "")


def calendar_days(nights: list[int], registry: Registry = REGISTRY) -> list[int]:
    """The `calendar` relation's day numbers for the night day numbers `nights`: every day from each night back
    the longest batch window, so the days [D - W, D] are dense for every night D and window W (the running
    totals' difference at D reads the probe W days back), and a few nights years apart cost a few windows of
    probes, not every day between them."""
    longest = max(g.window_ms for g in registry.batch_groups) // DAY_MS
    return sorted({d for night in nights for d in range(night - longest, night + 1)})


def wide_columns(registry: Registry) -> tuple[str, ...]:
    """The columns `snapshots_sql` returns, in order."""
    cols = ["entity", "entity_key", "cutoff_ms"]
    for g in registry.batch_groups:
        cols += [stat_column(g, k) for k in window_stats(g)]
        cols += list(g.feature_names)
    return tuple(cols)
