"""Spark settings for a master with real executor JVMs (`local-cluster[...]`, standalone, YARN, Kubernetes).

`local[*]` runs everything in the driver; a cluster master adds executors that must fit their worker, find the
same Python (the training set runs Velocity's own code in `mapInArrow`), and survive a loaded machine: on two
shared cores an executor can take a minute to register, and with Spark's default timeouts the master then
gives up ("Master removed our application: FAILED"). These settings are merged into every session
(`stores.spark_offline.spark_session`); `VELOCITY_SPARK_*` environment variables override them.
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


def executor_conf(master: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The settings a session on `master` gets beyond the defaults; empty for `local[...]` (no executors).

    For `local-cluster[N,C,M]`: executors of C cores and half of M megabytes (the worker's M must also hold the
    JVM's overhead; an executor asking for all of it is never started, and the master eventually removes the
    application), the driver's Python for executors, and the timeouts above; a failing executor is retried
    instead of failing the application. For any other cluster master: the timeouts, plus executor memory, cores
    and Python only where `VELOCITY_SPARK_EXECUTOR_MEMORY`, `_CORES` or `_PYTHON` say so (the cluster decides).
    """
    env = os.environ if env is None else env
    if master.startswith("local") and not master.startswith("local-cluster"):
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
