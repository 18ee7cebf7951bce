"""Run the batch job (every night's snapshots, then the training set written by the executors) on one Spark
master, in a process of its own: a Spark session is one per process, so comparing masters takes two processes.

Usage: python -m tests.spark_master_job MASTER HISTORY OUT FIRST_DAY LAST_DAY
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from pathlib import Path

SECRET = "spark-cluster-test-secret"


def main(master: str, history: str, out: str, first: str, last: str) -> None:
    from batch.engines import dates_between, open_engine, run_snapshots
    from stores.offline_files import cutoff_ms_of

    started = time.monotonic()
    root = Path(out)
    days = dates_between(dt.date.fromisoformat(first), dt.date.fromisoformat(last))
    eng = open_engine("spark", offline_dir=root, history=Path(history), secret=SECRET, master=master)
    run_snapshots(eng, days, offline_dir=root, quality=None)
    a, b = cutoff_ms_of(days[0] - dt.timedelta(days=1)), cutoff_ms_of(days[-1] + dt.timedelta(days=2))
    rows = eng.write_training_set(a, b, root / "training")
    executors = eng._spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() - 1  # minus the driver
    print(f"master={master} rows={rows} executors={executors} seconds={time.monotonic() - started:.0f}", flush=True)
    eng._spark.stop()


if __name__ == "__main__":
    main(*sys.argv[1:6])
