"""The batch job on real separate executor JVMs (issue 17 section 4): Spark's `local-cluster[2,1,1024]` (a
standalone master and two workers, each executor its own JVM with its own Python workers) computes the same
snapshots and training set as `local[*]`. Each master runs in its own process (one Spark session per process).
A small history keeps it within minutes on a loaded two-core machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import synthetic
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FIRST, LAST = "2020-01-02", "2020-01-06"


def _run(master: str, history, out) -> str:
    env = {**os.environ, "VELOCITY_SPARK_DRIVER_MEMORY": "1g"}
    done = subprocess.run([sys.executable, "-m", "tests.spark_master_job", master, str(history), str(out), FIRST,
                           LAST], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{master}:\n{done.stderr[-4000:]}"
    return done.stdout


def _snapshots(root) -> dict[str, pd.DataFrame]:
    files = sorted((root / "snapshots").rglob("*.parquet"))
    return {str(f.relative_to(root)): pd.read_parquet(f).drop(columns=["published_ms"]) for f in files}


def _training(root) -> pd.DataFrame:
    frame = pq.read_table(root / "training").to_pandas()
    return frame.sort_values(["ts", "card", "txn_id"]).reset_index(drop=True)


@pytest.fixture
def executor_logs():
    """local-cluster workers keep each application's executor logs under SPARK_HOME/work: remove this test's."""
    import shutil
    from pathlib import Path

    import pyspark

    work = Path(pyspark.__file__).parent / "work"
    before = set(work.glob("app-*")) if work.is_dir() else set()
    yield
    for app in (set(work.glob("app-*")) if work.is_dir() else set()) - before:
        shutil.rmtree(app, ignore_errors=True)


def test_local_cluster_executors_give_the_same_snapshots_and_training_set_as_local(tmp_path, executor_logs):
    rows = synthetic.history(n=1200, cards=25, seed=53, mean_gap_ms=400_000, late=6, disorder=20)
    history = tmp_path / "history.parquet"
    pq.write_table(pa.Table.from_pylist(rows), history)
    local = _run("local[*]", history, tmp_path / "local")
    assert "executors=0" in local, local  # everything in the driver
    cluster = _run("local-cluster[2,1,1024]", history, tmp_path / "cluster")
    assert "executors=2" in cluster, cluster  # two executor JVMs really took part
    a, b = _snapshots(tmp_path / "local"), _snapshots(tmp_path / "cluster")
    assert list(a) == list(b) and len(a) >= 5, (list(a), list(b))
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=False, rtol=1e-9, atol=0, obj=name)
    ta, tb = _training(tmp_path / "local"), _training(tmp_path / "cluster")
    assert len(ta) == len({r["txn_id"] for r in rows})
    pd.testing.assert_frame_equal(ta, tb, check_exact=False, rtol=1e-9, atol=0)
    assert ta["num_trans_last_1w"].notna().sum() > 500  # the comparison covered snapshot values, not only NaNs
