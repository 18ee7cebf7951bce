"""The nightly job on PySpark: same SQL text as the DuckDB engine (featurestore.offline_sql), at cluster scale.

Any `--master` works; `local[*]` by default. The driver only touches small things: the distinct PANs (to map
them to entity keys with the shared HMAC), the list of snapshot cut-offs, and each night's snapshot rows
(one per card) on their way to Redis in bounded pipelines.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from featurestore import offline_sql as sql
from featurestore.archive import archive_dir
from featurestore.offline import DAY_MS, OfflineError, cutoff_ms_of, finish_training_frame, pan_keys, read_snapshots


def spark_session(master: str = "local[*]", app: str = "velocity-batch"):
    os.environ.setdefault("PYSPARK_PYTHON", os.sys.executable)
    from pyspark.sql import SparkSession

    return _quiet(
        SparkSession.builder.master(master).appName(app)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "8")
        .config("spark.driver.memory", os.environ.get("VELOCITY_SPARK_DRIVER_MEMORY", "3g"))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.ansi.enabled", "false")
        .getOrCreate()
    )


def _quiet(spark):
    spark.sparkContext.setLogLevel("WARN")
    return spark


def load_events(spark, *, offline_dir: Path, history: Path | None, secret: str) -> int:
    """Register the deduplicated `events` view; returns its row count."""
    from pyspark.sql import functions as F

    if history is not None:
        from featurestore.history import HistoryError, load_history

        try:
            load_history(history)  # the same up-front checks as every other reader of a history file
        except HistoryError as exc:
            raise OfflineError(str(exc)) from None
        path = str(Path(history).resolve())
        if path.lower().endswith(".csv"):
            raw = spark.read.option("header", True).schema(
                "txn_id string, cc_num string, amount double, ts long, merchant string, category string, "
                "fraud_label int").csv(path)
        else:
            raw = spark.read.parquet(path)
        # A single file is read in order: monotonically increasing ids follow the row order (the stream order).
        raw = raw.withColumn("seq", F.monotonically_increasing_id())
        pans = [r[0] for r in raw.select("cc_num").distinct().collect()]
        keys = spark.createDataFrame(pd.DataFrame({"cc_num": pans, "card": pan_keys(pans, secret)}))
        ev = (raw.join(F.broadcast(keys), "cc_num")
              .select("txn_id", "card", F.col("amount").cast("double").alias("amount"),
                      F.round(F.col("amount") * 100).cast("long").alias("amount_cents"),
                      F.col("ts").cast("long").alias("ts"), F.col("fraud_label").cast("tinyint").alias("fraud_label"),
                      F.lit(False).alias("late"), "seq"))
        ev.createOrReplaceTempView("raw_events")
        spark.sql(sql.dedup_sql("raw_events", "seq")).createOrReplaceTempView("events")
    else:
        root = archive_dir(offline_dir)
        if not list(root.glob("date=*/*.parquet")):
            raise OfflineError(f"no archived transactions under {root} (run `velocity stream`, or pass --history PATH)")
        raw = spark.read.option("basePath", str(root)).parquet(str(root / "date=*"))
        raw.select("txn_id", "card", "amount", "amount_cents", "ts", "fraud_label", "late",
                   F.col("offset").alias("seq"), F.col("partition").alias("part")).createOrReplaceTempView("raw_events")
        spark.sql(sql.dedup_sql("raw_events", "part, seq")).createOrReplaceTempView("events")
    spark.table("events").cache()
    n = spark.table("events").count()
    if n == 0:
        raise OfflineError("the history is empty")
    return n


def snapshot(spark, day: dt.date) -> pd.DataFrame:
    return spark.sql(sql.snapshot_1w_sql(cutoff_ms_of(day)) + " ORDER BY card").toPandas()


TRAINING_SCHEMA = (
    "txn_id string, card string, ts long, amount double, fraud_label tinyint, num_trans_last_10m long, "
    "avg_amt_last_10m double, num_trans_last_1w double, avg_amt_last_1w double, snapshot_cutoff_ms long, "
    "amt_ratio1 double, amt_ratio2 double, count_ratio double"
)


def _with_ratios(batches):
    """Runs on the executors: the shared ratio function, batch by batch (no collect to the driver)."""
    for pdf in batches:
        yield finish_training_frame(pdf)


def training_set(spark, offline_dir: Path, start_ms: int, end_ms: int) -> pd.DataFrame:
    frame = training_frame(spark, offline_dir, start_ms, end_ms).orderBy("ts", "card", "txn_id").toPandas()
    return finish_training_frame(frame)


def write_training_set(spark, offline_dir: Path, start_ms: int, end_ms: int, out: Path) -> int:
    """Distributed write (a directory of Parquet parts), swapped into place when complete.

    The work directory is not hidden: Spark's file listing skips names starting with '.' or '_'.
    """
    out = Path(out)
    tmp = out.with_name(f"{out.name}.writing-{uuid.uuid4().hex[:8]}")
    frame = training_frame(spark, offline_dir, start_ms, end_ms)
    frame.write.parquet(str(tmp))
    rows = spark.read.parquet(str(tmp)).count()
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    os.replace(tmp, out)
    return rows


def training_frame(spark, offline_dir: Path, start_ms: int, end_ms: int):
    """Point-in-time rows for ts in [start_ms, end_ms). The as-of join: cut-offs are midnights, so the latest
    cut-off <= t is the latest cut-off <= t's midnight; a day -> cut-off map (tiny, broadcast) makes it an
    equi-join instead of a range join."""
    from pyspark.sql import functions as F

    spark.sql(sql.features_10m_sql("events")).createOrReplaceTempView("f10_all")
    f10 = spark.table("f10_all").where((F.col("ts") >= start_ms - 0) & (F.col("ts") < end_ms))
    snaps = read_snapshots(offline_dir)
    if snaps:
        snap = spark.read.parquet(*[str(p) for p in snaps])
        cutoffs = np.array(sorted({int(r[0]) for r in snap.select("cutoff_ms").distinct().collect()}))
        first_day, last_day = start_ms // DAY_MS, (end_ms - 1) // DAY_MS
        days = np.arange(first_day, last_day + 1)
        pos = np.searchsorted(cutoffs, days * DAY_MS, side="right") - 1
        day_map = pd.DataFrame({"day": days.astype("int64"),
                                "snapshot_cutoff_ms": np.where(pos >= 0, cutoffs[np.maximum(pos, 0)], -1)})
        dm = spark.createDataFrame(day_map).withColumn(
            "snapshot_cutoff_ms", F.when(F.col("snapshot_cutoff_ms") >= 0, F.col("snapshot_cutoff_ms")))
        f10 = f10.withColumn("day", F.floor(F.col("ts") / DAY_MS).cast("long")).join(F.broadcast(dm), "day", "left")
        snap.createOrReplaceTempView("snap")
        join = "LEFT JOIN snap s ON s.cutoff_ms = f.snapshot_cutoff_ms AND s.card = f.card"
    else:
        f10 = f10.withColumn("snapshot_cutoff_ms", F.lit(None).cast("long"))
        spark.createDataFrame([], "card string, num_trans_last_1w long, avg_amt_last_1w double, cutoff_ms long") \
            .createOrReplaceTempView("snap")
        join = "LEFT JOIN snap s ON s.cutoff_ms = f.snapshot_cutoff_ms AND s.card = f.card"
    f10.createOrReplaceTempView("f10_asof")
    return spark.sql(sql.training_select_sql("f10_asof", join)).mapInPandas(_with_ratios, TRAINING_SCHEMA)


