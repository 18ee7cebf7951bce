"""Spark settings for a master with real executor JVMs (`local-cluster[...]`, standalone, YARN, Kubernetes).

`local[*]` runs everything in the driver; a cluster master adds executors that must fit their worker, find the
same Python (the training set runs Velocity's own code in an Arrow UDF), and survive a loaded machine: on two
shared cores an executor can take a minute to register, and with Spark's default timeouts the master then
gives up ("Master removed our application: FAILED"). These settings are merged into every session
(`stores.spark_offline.spark_session`); `VELOCITY_SPARK_*` environment variables override them.

A local master gets its own few: the driver runs every task there, so its collector and join strategy are chosen
for a batch job's throughput, added to what the user's `spark-defaults.conf` says rather than replacing it.
"""

from __future__ import annotations

import os
import re
import sys

_LOCAL_CLUSTER = re.compile(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]")

#: Generous timeouts: a slow heartbeat or registration on a loaded machine is not a failure.
TIMEOUTS = {
    "spark.network.timeout": "600s",
    "spark.executor.heartbeatInterval": "30s",  # must stay well below spark.network.timeout
    "spark.rpc.askTimeout": "600s",
    "spark.rpc.lookupTimeout": "600s",
    "spark.worker.timeout": "600",  # standalone master: seconds before a silent worker counts as lost
    "spark.scheduler.maxRegisteredResourcesWaitingTime": "120s",
    "spark.task.maxFailures": "8",
}

#: The local driver JVM's collector. In `local[...]` the driver runs every task, and a batch job wants throughput,
#: not short pauses: the parallel collector took the seed-scale backfill + training set from 229-230 s to 200-206 s
#: on `local[2]` (G1, the JVM default; bench/RESULTS.md).
LOCAL_DRIVER_JAVA_OPTIONS = "-XX:+UseParallelGC"
_GC_CHOICE = re.compile(r"-XX:\+Use\w*GC\b")


#: One `key value` line of a Java properties file (spark-defaults.conf): the key ends at whitespace, `=` or `:`.
_PROPERTY = re.compile(r"([^\s=:]+)\s*(?:[=:]\s*|\s+|$)(.*)")


def spark_defaults(env: dict[str, str] | None = None) -> dict[str, str]:
    """The user's `spark-defaults.conf` (in `SPARK_CONF_DIR`, else `SPARK_HOME/conf`), as spark-submit reads it
    (`key value`, `key=value` or `key: value`; `#` and `!` start comments); empty when there is none or it cannot
    be read (Spark then says so itself)."""
    env = os.environ if env is None else env
    conf_dir = env.get("SPARK_CONF_DIR") or (os.path.join(env["SPARK_HOME"], "conf") if env.get("SPARK_HOME") else "")
    try:
        with open(os.path.join(conf_dir, "spark-defaults.conf"), encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f.read().splitlines()]
    except OSError:
        return {}
    found = (_PROPERTY.fullmatch(line) for line in lines if line and line[0] not in "#!")
    return {m.group(1): m.group(2).strip() for m in found if m}


def driver_conf(master: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The driver JVM's options: `VELOCITY_SPARK_DRIVER_JAVA_OPTIONS` when set; else, on a local master, the
    parallel collector appended to the user's own `spark.driver.extraJavaOptions` (a setting in the builder replaces
    the spark-defaults.conf one), unless they chose a collector themselves (two would stop the JVM from starting).
    A cluster master gets nothing here: its driver runs no tasks."""
    env = os.environ if env is None else env
    if env.get("VELOCITY_SPARK_DRIVER_JAVA_OPTIONS"):
        return {"spark.driver.extraJavaOptions": env["VELOCITY_SPARK_DRIVER_JAVA_OPTIONS"]}
    if not _is_local(master):
        return {}
    defaults = spark_defaults(env)
    theirs = defaults.get("spark.driver.extraJavaOptions", "")
    if _GC_CHOICE.search(f"{defaults.get('spark.driver.defaultJavaOptions', '')} {theirs}"):
        return {}
    return {"spark.driver.extraJavaOptions": f"{theirs} {LOCAL_DRIVER_JAVA_OPTIONS}".strip()}


#: On a local master the driver is the only executor: a snapshot table up to this size is joined by broadcasting it
#: (hashed once in memory) instead of shuffling and sorting the training rows against it: the seed-scale training
#: set took 96-99 s against 110-112 s (Spark's default threshold, 10 MB; alternating, bench/RESULTS.md).
LOCAL_BROADCAST_THRESHOLD = "256m"
#: On a local master the files are local: a read of more paths than Spark's default threshold (32) is listed by the
#: driver instead of by a Spark job of its own. A training set reads each batch group's nightly files (152 per group
#: at seed scale): registering the six groups took 5.5-6.5 s against 1.3-1.6 s (bench/RESULTS.md).
LOCAL_LISTING_THRESHOLD = "100000"


def local_conf(master: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The join and file-listing settings of a local master (`LOCAL_BROADCAST_THRESHOLD`,
    `LOCAL_LISTING_THRESHOLD`), each unless the user's spark-defaults.conf sets it; a cluster master keeps the
    cluster's (a broadcast there travels to every executor, and its files may sit in an object store)."""
    if not _is_local(master):
        return {}
    theirs = spark_defaults(env)
    ours = {"spark.sql.autoBroadcastJoinThreshold": LOCAL_BROADCAST_THRESHOLD,
            "spark.sql.sources.parallelPartitionDiscovery.threshold": LOCAL_LISTING_THRESHOLD}
    return {key: value for key, value in ours.items() if key not in theirs}


def _is_local(master: str) -> bool:
    return master.startswith("local") and not master.startswith("local-cluster")


def executor_conf(master: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The settings a session on `master` gets beyond the defaults; empty for `local[...]` (no executors).

    For `local-cluster[N,C,M]`: executors of C cores and half of M megabytes (the worker's M must also hold the
    JVM's overhead; an executor asking for all of it is never started, and the master eventually removes the
    application), the driver's Python for executors, and the timeouts above; a failing executor is retried
    instead of failing the application. For any other cluster master: the timeouts, plus executor memory, cores
    and Python only where `VELOCITY_SPARK_EXECUTOR_MEMORY`, `_CORES` or `_PYTHON` say so (the cluster decides).
    """
    env = os.environ if env is None else env
    if _is_local(master):
        return {}
    conf = dict(TIMEOUTS)
    m = _LOCAL_CLUSTER.fullmatch(master.strip())
    if m:
        cores, worker_mb = int(m.group(2)), int(m.group(3))
        conf.update({"spark.executor.memory": f"{max(worker_mb // 2, 256)}m", "spark.executor.cores": str(cores),
                     "spark.pyspark.python": sys.executable, "spark.deploy.maxExecutorRetries": "-1"})
    for key, name in (("spark.executor.memory", "VELOCITY_SPARK_EXECUTOR_MEMORY"),
                      ("spark.executor.cores", "VELOCITY_SPARK_EXECUTOR_CORES"),
                      ("spark.pyspark.python", "VELOCITY_SPARK_EXECUTOR_PYTHON")):
        if env.get(name):
            conf[key] = env[name]
    return conf
