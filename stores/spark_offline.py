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

import pandas as pd
import pyarrow as pa

from featurestore import batch_sql
from featurestore import offline_sql as sql
from featurestore.definitions import DEFAULT_ALLOWED_LATENESS_MS, REGISTRY, Registry
from stores.archive import ArchiveError, archive_dir, archive_files
from stores.offline_files import (
    OfflineError,
    archived_labels,
    asof_plan,
    calendar_table,
    card_numbers,
    finish_training_frame,
    nights_table,
    pan_keys,
    read_snapshots,
    snapshot_tables,
    split_snapshots,
)
from stores.training_batches import derived_columns, derived_inputs

LABELS_DDL = "txn_id string, fraud_label int, labeled_at long"


def spark_session(master: str = "local[*]", app: str = "velocity-batch"):
    os.environ.setdefault("PYSPARK_PYTHON", os.sys.executable)
    from pyspark.sql import SparkSession

    from stores.spark_cluster import driver_conf, executor_conf, local_conf

    return _quiet(
        SparkSession.builder.master(master).appName(app)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "8")
        .config("spark.driver.memory", os.environ.get("VELOCITY_SPARK_DRIVER_MEMORY", "3g"))
        .config(map=driver_conf(master))  # the local driver's collector, kept with the user's own options
        .config(map=local_conf(master))  # small tables broadcast, files listed by the driver, on a local master
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        # The cached events and stream features are scanned again and again; kept uncompressed, the seed-scale
        # backfill + training set took 208-213 s against 232-237 s compressed (alternating, bench/RESULTS.md).
        # Memory is not at risk: a cached partition that does not fit spills to disk.
        .config("spark.sql.inMemoryColumnarStorage.compressed", "false")
        .config("spark.sql.ansi.enabled", "false")
        .config(map=executor_conf(master))  # executors' memory, Python and timeouts on a cluster master
        .getOrCreate()
    )


def _quiet(spark):
    spark.sparkContext.setLogLevel("WARN")
    return spark


def literal_path(path: Path) -> str:
    """A path Spark reads as that one file: its reader globs (Hadoop's patterns), so h[1].parquet would read
    h1.parquet; a backslash makes each pattern character literal."""
    from stores.history import GLOB_CHARACTERS

    return "".join("\\" + c if c in "\\" + GLOB_CHARACTERS else c for c in str(path))


def load_events(spark, *, offline_dir: Path, history: Path | None, secret: str,
                allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS) -> int:
    """Register the deduplicated `events` view and the `labels` relation (same rules as the DuckDB loader);
    returns the event count.

    A history file is checked as every reader checks it (stores.history), by the executors: the driver reads
    its footer, never its rows.
    """
    from pyspark.errors import PySparkException
    from pyspark.sql import functions as F

    if history is not None:
        from stores.history import (
            HistoryError,
            check_count_row,
            check_schema,
            counts_sql,
            engine_cannot_read,
            label_time_without_label,
            schema_of,
        )

        path = literal_path(Path(history).resolve())
        schema = schema_of(history)  # the footer only: the rows are checked by the executors below
        if schema is not None:
            check_schema(history, schema)
        try:
            if str(history).lower().endswith(".csv"):
                # Columns by header name (any order, extra ones ignored, labeled_at read when present), as
                # stores.history reads a CSV for DuckDB; every value arrives as a string and is cast here.
                raw = spark.read.option("header", True).csv(path)
                casts = {"amount": "double", "ts": "long", "fraud_label": "int", "labeled_at": "long"}
                raw = raw.select(*[F.col(c).cast(casts[c]).alias(c) if c in casts else F.col(c)
                                   for c in raw.columns])
            else:
                raw = spark.read.parquet(path)
            if "fraud_label" not in raw.columns:  # unlabeled history; with labeled_at, check_schema refuses it
                if "labeled_at" in raw.columns:
                    raise OfflineError(label_time_without_label(history))
                raw = raw.withColumn("fraud_label", F.lit(None).cast("int"))
            raw.createOrReplaceTempView("history_file")
            counts = spark.sql(counts_sql("history_file")).first().asDict()
        except PySparkException as exc:
            raise OfflineError(engine_cannot_read(history, "Spark", exc)) from None
        try:
            check_count_row(history, counts)
        except HistoryError as exc:
            raise OfflineError(str(exc)) from None
        # A single file is read in order: monotonically increasing ids follow the row order (the stream order).
        raw = raw.withColumn("seq", F.monotonically_increasing_id())
        pans = [r[0] for r in raw.select("cc_num").distinct().collect()]
        cards = pan_keys(pans, secret)
        keys = spark.createDataFrame(pd.DataFrame({"cc_num": pans, "card": cards, "card_no": card_numbers(cards)}))
        ev = (raw.join(F.broadcast(keys), "cc_num")
              .select("txn_id", "card", F.col("merchant").cast("string").alias("merchant"),
                      F.col("amount").cast("double").alias("amount"),
                      F.bround(F.col("amount") * 100).cast("long").alias("amount_cents"),
                      F.col("ts").cast("long").alias("ts"), F.col("fraud_label").cast("tinyint").alias("fraud_label"),
                      F.lit(False).alias("late"), "seq", F.col("ts").cast("long").alias("arrived_ms"),
                      F.col("card_no").cast("long").alias("card_no")))
        ev.createOrReplaceTempView("raw_events")  # txn_ids are unique (check_counts)
        events = spark.sql(sql.arrival_order_sql("raw_events", allowed_lateness_ms))
        labels = _labels_frame(spark, offline_dir)
        if "labeled_at" in raw.columns:  # the history's inline labels, read by the executors
            inline = raw.where("labeled_at IS NOT NULL").selectExpr(
                "CAST(txn_id AS string) AS txn_id", "CAST(fraud_label AS int) AS fraud_label",
                "CAST(labeled_at AS long) AS labeled_at")
            labels = labels.unionByName(inline)
    else:
        root = archive_dir(offline_dir)
        try:
            files = archive_files(offline_dir)
        except ArchiveError as exc:
            raise OfflineError(str(exc)) from None
        if not files:
            raise OfflineError(f"no archived transactions under {root} (run `velocity stream`, or pass --history PATH)")
        raw = spark.read.option("basePath", str(root)).parquet(*[str(f) for f in files])
        raw.select("txn_id", "card", "merchant", "amount", "amount_cents", "ts", "fraud_label", "late", "seq",
                   F.expr(sql.arrival_ms_of_seq("seq")).alias("arrived_ms"),
                   "archived_ms").createOrReplaceTempView("raw_events")
        spark.sql(sql.dedup_sql("raw_events", "seq, archived_ms")).createOrReplaceTempView("first_events")
        events = spark.sql(sql.arrival_order_sql(sql.with_card_numbers_sql("first_events")))
        labels = _labels_frame(spark, offline_dir)
    labels.createOrReplaceTempView("labels")
    events.cache().createOrReplaceTempView("events")
    n = spark.table("events").count()
    if n == 0:
        raise OfflineError("the history is empty")
    return n


def _labels_frame(spark, offline_dir: Path):
    """The label store's versions (small: labels are few), as a Spark frame."""
    table = archived_labels(offline_dir)
    if not table.num_rows:
        return spark.createDataFrame([], LABELS_DDL)
    frame = table.to_pandas().astype({"fraud_label": "int32", "labeled_at": "int64"})
    return spark.createDataFrame(frame, LABELS_DDL)


def snapshots(spark, days: list[dt.date],
              registry: Registry = REGISTRY) -> list[tuple[dt.date, dict[str, pa.Table]]]:
    """Every batch group's snapshot for every night of `days`, in one statement (same SQL as DuckDB); one row per
    entity and night reaches the driver, as Arrow, and is sorted there: Spark's `ORDER BY` of the wide rows took
    9.5 s of a seed-scale backfill on `local[2]`, Arrow's sort 3.5-4.5 s (bench/RESULTS.md)."""
    spark.createDataFrame(nights_table(days), "day long, cutoff_ms long").createOrReplaceTempView("nights")
    spark.createDataFrame(calendar_table(days, registry), "day long").createOrReplaceTempView("calendar")
    table = spark.sql(batch_sql.snapshots_sql(registry, ordered=False)).toArrow()
    return split_snapshots(table.sort_by([(c, "ascending") for c in batch_sql.SNAPSHOT_ORDER]), days, registry)


def _training_types(registry: Registry) -> dict[str, str]:
    """Each training column's Spark type, from the declarations (`offline_sql.training_columns`)."""
    stream_counts = {a.name for g in registry.stream_groups for a in g.features if a.function == "count"}
    types = {"txn_id": "string", **dict.fromkeys(sql.key_columns(registry), "string"), "ts": "long",
             "fraud_label": "tinyint",
             "snapshot_cutoff_ms": "long", **{n: "long" for n in stream_counts}}
    return {c: types.get(c, "double") for c in sql.training_columns(registry)}


#: Each Spark type as Arrow (strings as `string`, Spark's default), for the derived features' UDF.
ARROW_TYPES = {"string": pa.string(), "long": pa.int64(), "double": pa.float64(), "tinyint": pa.int8()}


def training_arrow_schema(registry: Registry = REGISTRY) -> pa.Schema:
    """The training set's schema in Arrow types, from the declarations (`offline_sql.training_columns`)."""
    return pa.schema([(c, ARROW_TYPES[t]) for c, t in _training_types(registry).items()])


def training_set(spark, offline_dir: Path, start_ms: int, end_ms: int, registry: Registry = REGISTRY) -> pd.DataFrame:
    frame = training_frame(spark, offline_dir, start_ms, end_ms, registry).orderBy("ts", "card", "txn_id").toPandas()
    return finish_training_frame(frame, registry)


def write_training_set(spark, offline_dir: Path, start_ms: int, end_ms: int, out: Path,
                       registry: Registry = REGISTRY) -> int:
    """Distributed write (a directory of Parquet parts), swapped into place when complete.

    The work directory is not hidden: Spark's file listing skips names starting with '.' or '_'.
    """
    out = Path(out)
    tmp = out.with_name(f"{out.name}.writing-{uuid.uuid4().hex[:8]}")
    frame = training_frame(spark, offline_dir, start_ms, end_ms, registry)
    frame.write.parquet(str(tmp))
    rows = spark.read.parquet(str(tmp)).count()
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    os.replace(tmp, out)
    return rows


def training_frame(spark, offline_dir: Path, start_ms: int, end_ms: int, registry: Registry = REGISTRY):
    """Point-in-time rows for ts in [start_ms, end_ms): the same SQL text as DuckDB (`offline_sql.training_sql`)
    over the same small as-of tables (`offline_files.snapshot_tables`), broadcast to the executors."""
    sets, histories = asof_plan(offline_dir, registry)
    for k, pubs in enumerate(histories):
        days_name, cutoffs_name = sql.asof_views(k)
        snap_days, snap_cutoffs = snapshot_tables(offline_dir, start_ms, end_ms, pubs=pubs)
        spark.createDataFrame(snap_days, "day long, c1 long, p1 long").createOrReplaceTempView(days_name)
        spark.createDataFrame(snap_cutoffs, "cutoff_ms long, published_ms long").createOrReplaceTempView(cutoffs_name)
    for g in registry.batch_groups:
        snaps = read_snapshots(offline_dir, g.name)
        cols = [g.entity_column, *(sql.SNAPSHOT_STATS[k] for k in g.stats), "cutoff_ms"]
        if snaps:
            frame = spark.read.parquet(*[str(p) for p in snaps]).select(*cols)
        else:
            stats = ", ".join(f"{sql.SNAPSHOT_STATS[k]} long" for k in g.stats)
            frame = spark.createDataFrame([], f"{g.entity_column} string, {stats}, cutoff_ms long")
        frame.createOrReplaceTempView(sql.snap_view(g))
    cached = []
    for name, step in sql.stream_features_steps(start_ms, end_ms, registry, out="f10"):
        cached.append(spark.sql(step).cache())  # pass 1 feeds both branches of pass 2; f10 both as-of branches
        cached[-1].createOrReplaceTempView(name)
    cached[-1].count()  # materialize f10; then pass 1 is no longer needed
    for frame in cached[:-1]:
        frame.unpersist()
    return with_derived(spark.sql(sql.training_sql("f10", registry, sets)), registry)


def with_derived(query, registry: Registry = REGISTRY):
    """The training query's rows as the training schema: the ratios and event-time features by the shared
    functions (`stores.training_batches.derived_columns`), the other columns cast, a missing float null.

    Only the derived features' inputs cross to Python (one Arrow UDF returning them as one struct): handing
    every column through `mapInArrow` and back cost 1-8 s more of a seed-scale training set on `local[2]` (three
    alternating pairs, bench/RESULTS.md).
    """
    from pyspark.sql import functions as F
    from pyspark.sql.functions import arrow_udf

    types, arrow_schema = _training_types(registry), training_arrow_schema(registry)
    names = [*registry.event_time_features, *(r.name for r in registry.ratios)]
    inputs = derived_inputs(registry)

    def derive(*columns: pa.Array) -> pa.Array:
        out = derived_columns(dict(zip(inputs, columns, strict=True)), arrow_schema, registry)
        return pa.StructArray.from_arrays([out[n] for n in names], names=names)

    struct = "struct<" + ", ".join(f"{n}: {types[n]}" for n in names) + ">"
    derived = arrow_udf(derive, struct)(*inputs)  # a scalar UDF: the type hints say so
    frame = query.withColumn("__derived", derived)
    columns = []
    for name, kind in types.items():
        if name in names:
            columns.append(F.col(f"__derived.{name}").alias(name))
            continue
        column = F.col(name).cast(kind)
        if kind == "double":  # NaN -> null, as finish_training_batch writes a missing float
            column = F.when(F.isnan(column), F.lit(None)).otherwise(column)
        columns.append(column.alias(name))
    return frame.select(*columns)
