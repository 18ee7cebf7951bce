"""The snapshot quality gate (issue 17, operations): a night with impossible values, or far from the night
before, is not published anywhere and the error says why; the ramp-up nights at the start of a history (windows
only partly covered by data) are not compared; `--skip-quality-gate` publishes anyway."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.engines import open_engine, run_snapshots
from batch.quality import QualityError
from stores.offline_files import read_snapshots, snapshot_day
from tests.synthetic import luhn_pan

pytestmark = pytest.mark.unit
SECRET = "quality-test"
START = dt.datetime(2020, 3, 1, tzinfo=dt.UTC)
DAY_MS = 86_400_000


def steady_history(path, *, days=20, cards=120, keep_cards=None, scale_from_day=None, scale=1.0, seed=3):
    """Every card buys about every six hours for `days` days. From `scale_from_day` on, amounts are multiplied by
    `scale` (a unit change upstream); with `keep_cards`, only that many cards appear in the last 8 days."""
    rng = np.random.default_rng(seed)
    pans = [luhn_pan(rng) for _ in range(cards)]
    start_ms = int(START.timestamp() * 1000)
    rows = []
    for c, pan in enumerate(pans):
        t = start_ms + int(rng.integers(0, 6 * 3_600_000))
        while t < start_ms + days * DAY_MS:
            day = (t - start_ms) // DAY_MS
            if keep_cards is None or c < keep_cards or day < days - 8:
                amount = float(np.round(rng.lognormal(3.5, 0.6), 2))
                if scale_from_day is not None and day >= scale_from_day:
                    amount = round(amount * scale, 2)
                rows.append({"txn_id": f"c{c}-{t}", "cc_num": pan, "amount": amount, "ts": t,
                             "merchant": "m", "category": "c", "fraud_label": 0})
            t += int(rng.integers(4, 8) * 3_600_000)
    rows.sort(key=lambda r: r["ts"])
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def nights(first: int, last: int) -> list[dt.date]:
    return [(START + dt.timedelta(days=d)).date() for d in range(first, last + 1)]


def run(history, offline, days, **kw):
    eng = open_engine("duckdb", offline_dir=offline, history=history, secret=SECRET)
    try:
        return run_snapshots(eng, days, offline_dir=offline, published=lambda d: 0, **kw)
    finally:
        eng.close()


def test_a_steady_history_passes_including_its_ramp_up_nights(tmp_path):
    history = steady_history(tmp_path / "h.parquet")
    written = run(history, tmp_path / "off", nights(1, 19))  # night 1 sees one day of data, night 2 two, ...
    assert len(written) == 19


@pytest.mark.parametrize("change, expected", [
    (dict(keep_cards=30), "cards against"),  # an upstream outage: three quarters of the cards vanish
    (dict(scale_from_day=12, scale=100.0), "median avg_amt_last_1w"),  # dollars became cents
])
def test_a_night_far_from_the_night_before_is_not_published(tmp_path, change, expected):
    offline = tmp_path / "off"
    run(steady_history(tmp_path / "good.parquet"), offline, nights(8, 18))  # full windows from night 8 on
    bad = steady_history(tmp_path / "bad.parquet", **change)
    with pytest.raises(QualityError, match=expected) as info:
        run(bad, offline, [nights(19, 19)[0]])
    assert "nothing was published" in str(info.value) and "2020-03-20" in str(info.value)
    assert max(snapshot_day(p) for p in read_snapshots(offline)) == nights(18, 18)[0], "night 19 not written"
    run(bad, offline, [nights(19, 19)[0]], quality=None)  # an operator who checked publishes anyway
    assert max(snapshot_day(p) for p in read_snapshots(offline)) == nights(19, 19)[0]


def test_a_backfill_compares_each_of_its_nights_with_the_one_before(tmp_path):
    """Within one run each night is checked against the run's previous night (its medians computed once)."""
    bad = steady_history(tmp_path / "bad.parquet", scale_from_day=12, scale=100.0)
    with pytest.raises(QualityError, match="median avg_amt_last_1w") as info:
        run(bad, tmp_path / "off", nights(8, 18))
    # 2020-03-14 is the first night whose week holds cents (day 12 = March 13); nothing of the run was written.
    assert "2020-03-14" in str(info.value) and "2020-03-12" not in str(info.value)
    assert not read_snapshots(tmp_path / "off")


def test_a_damaged_previous_night_is_named_and_a_rerun_of_it_mends_it(tmp_path):
    """The gate reads the night before the run: a damaged file there is named in one line (with what to do),
    not a pyarrow traceback; rerunning that night rewrites it and the next night runs."""
    from stores.offline_files import OfflineError, snapshot_path

    history, offline = steady_history(tmp_path / "h.parquet"), tmp_path / "off"
    run(history, offline, nights(8, 10))
    damaged = snapshot_path(offline, nights(10, 10)[0], "card_agg_1w")
    damaged.write_bytes(b"not parquet")
    with pytest.raises(OfflineError, match=r"cutoff=2020-03-11/part-0.parquet is not a readable snapshot file"):
        run(history, offline, nights(11, 11))
    run(history, offline, nights(10, 11))
    assert max(snapshot_day(p) for p in read_snapshots(offline)) == nights(11, 11)[0]


def test_impossible_values_fail_the_gate_whatever_the_night_before():
    import pyarrow as pa

    from batch.quality import check_nights
    from featurestore.definitions import REGISTRY

    frame = pa.table({"card": ["a", "b", "c"], "count": [3, 0, 2], "sum_cents": [900, 0, -5], "cutoff_ms": [0, 0, 0]})
    with pytest.raises(QualityError) as info:
        check_nights([(dt.date(2020, 3, 9), frame)], None, REGISTRY.batch_group, data_start_ms=0)
    assert "1 card(s) with a transaction count below 1" in str(info.value)
    assert "2 card(s) with a non-positive or non-finite amount sum" in str(info.value)


def test_snapshot_status_reports_a_missed_night_with_a_metric_and_exit_1(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    offline = tmp_path / "off"
    history = steady_history(tmp_path / "h.parquet")
    run(history, offline, nights(8, 12) + nights(14, 15))  # the night of 2020-03-14 (day 13) was missed
    metrics = tmp_path / "velocity.prom"

    def status(today: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "velocity_cli", "features", "snapshot-status", "--offline-dir",
                               str(offline), "--today", today, "--lookback-days", "5", "--metrics-file", str(metrics)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)

    missed = status("2020-03-16")
    assert missed.returncode == 1, missed.stderr
    assert "missed 1 night(s)" in missed.stderr and "2020-03-14" in missed.stderr
    assert "velocity_snapshot_missed_nights 1" in metrics.read_text()
    fine = status("2020-03-16".replace("16", "13"))  # as of the 13th, the last five nights were all published
    assert fine.returncode == 0, fine.stderr
    assert "velocity_snapshot_missed_nights 0" in metrics.read_text()
