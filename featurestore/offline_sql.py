"""The offline feature definitions as SQL, written once and run by both DuckDB and Spark.

Input relation `events(txn_id, card, amount, amount_cents, ts, fraud_label, late, seq)`, one row per distinct
txn_id. The 10-minute window is SQL's RANGE frame over ts with the tie rule of SPEC section 4 applied on top:
the RANGE frame holds every on-time event of the card in [t - W, t], including peers at the same ts that come
*after* x in stream order, so those (counted by a second frame over the peers) are taken back out; x itself
always counts once, late or not. Sums are integer cents; averages are computed as sum / (100 * count) in
doubles, exactly like `featurestore.windows.mean_amount`.
"""

from __future__ import annotations

from featurestore.definitions import CARD_AGG_1W, CARD_AGG_10M


def _avg(sum_expr: str, count_expr: str) -> str:
    return (f"CASE WHEN {count_expr} > 0 THEN CAST({sum_expr} AS DOUBLE) / CAST(100 * {count_expr} AS DOUBLE) "
            f"ELSE CAST('NaN' AS DOUBLE) END")


def window_10m_sql(source: str = "events") -> str:
    w = CARD_AGG_10M.window_ms
    on_time = "CASE WHEN late THEN 0 ELSE 1 END"
    on_cents = "CASE WHEN late THEN 0 ELSE amount_cents END"
    rng = f"OVER (PARTITION BY card ORDER BY ts RANGE BETWEEN {w} PRECEDING AND CURRENT ROW)"
    after = "OVER (PARTITION BY card, ts ORDER BY seq ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING)"
    return f"""
    SELECT txn_id, card, ts, amount, amount_cents, fraud_label, late, seq,
           CAST(1 + SUM({on_time}) {rng} - COALESCE(SUM({on_time}) {after}, 0) - {on_time} AS BIGINT)
               AS num_trans_last_10m,
           CAST(amount_cents + SUM({on_cents}) {rng} - COALESCE(SUM({on_cents}) {after}, 0) - {on_cents} AS BIGINT)
               AS sum_cents_last_10m
    FROM {source}
    """


def features_10m_sql(source: str = "events") -> str:
    return f"""
    SELECT *, {_avg('sum_cents_last_10m', 'num_trans_last_10m')} AS avg_amt_last_10m
    FROM ({window_10m_sql(source)}) w10
    """


def snapshot_1w_sql(cutoff_ms: int, source: str = "events") -> str:
    start = cutoff_ms - CARD_AGG_1W.window_ms
    return f"""
    SELECT card,
           CAST(COUNT(*) AS BIGINT) AS num_trans_last_1w,
           CAST(SUM(amount_cents) AS BIGINT) AS sum_cents_last_1w,
           {_avg('SUM(amount_cents)', 'COUNT(*)')} AS avg_amt_last_1w,
           CAST({cutoff_ms} AS BIGINT) AS cutoff_ms
    FROM {source}
    WHERE NOT late AND ts >= {start} AND ts < {cutoff_ms}
    GROUP BY card
    """


EVENT_COLUMNS = ("txn_id", "card", "amount", "amount_cents", "ts", "fraud_label", "late", "seq")


def dedup_sql(source: str, order: str) -> str:
    """Keep the first copy of each txn_id in stream order (redeliveries and re-sends change nothing)."""
    cols = ", ".join(EVENT_COLUMNS)
    return f"""
    SELECT {cols} FROM (
        SELECT *, ROW_NUMBER() OVER (PARTITION BY txn_id ORDER BY {order}) AS rn FROM {source}
    ) d WHERE rn = 1
    """


TRAINING_COLUMNS = (
    "txn_id", "card", "ts", "amount", "fraud_label", "num_trans_last_10m", "avg_amt_last_10m",
    "num_trans_last_1w", "avg_amt_last_1w", "snapshot_cutoff_ms", "amt_ratio1", "amt_ratio2", "count_ratio",
)


def training_select_sql(features: str, snap_join: str) -> str:
    """Both groups side by side; a card absent from the chosen snapshot had no transaction that week (count 0),
    no snapshot at all leaves the 1-week group missing (NaN), exactly as the online read does."""
    return f"""
    SELECT f.txn_id, f.card, f.ts, f.amount, f.fraud_label, f.num_trans_last_10m, f.avg_amt_last_10m,
           CASE WHEN f.snapshot_cutoff_ms IS NULL THEN CAST('NaN' AS DOUBLE)
                ELSE CAST(COALESCE(s.num_trans_last_1w, 0) AS DOUBLE) END AS num_trans_last_1w,
           COALESCE(s.avg_amt_last_1w, CAST('NaN' AS DOUBLE)) AS avg_amt_last_1w,
           f.snapshot_cutoff_ms
    FROM {features} f
    {snap_join}
    """
