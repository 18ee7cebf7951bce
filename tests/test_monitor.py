"""Live model quality (issue 16, item 7): the scorer's decisions joined with the labels known at the as-of time
(precision and recall at the threshold per day), and input drift per feature (PSI against the training window),
checked against figures computed by hand from the definitions (batch/monitor_quality.py's docstring):

- truth = the latest label with labeled_at <= as-of (fraud wins a tie); no label = legitimate;
- one decision per transaction, the stream's when there is one;
- PSI = sum over bins of (a - e) ln(a / e), shares floored at 1e-4; bins: the deciles of the training values,
  plus one bin for missing values.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import subprocess
import sys

import numpy as np
import orjson
import pandas as pd
import pytest

from tests.conftest import REPO

DAY = 86_400_000
D1 = int(dt.datetime(2024, 3, 4, tzinfo=dt.UTC).timestamp() * 1000)  # two days of decisions
D2 = D1 + DAY
AS_OF = D1 + 20 * DAY
FLOOR = 1e-4


def _decision(txn_id, ts, fraud, source="stream", features=None, version="v1"):
    return {"txn_id": txn_id, "ts": ts, "decision": "FRAUD" if fraud else "NOT_FRAUD", "score": 0.9 if fraud else 0.1,
            "threshold": 0.5, "model_version": version, "source": source, "card": "0" * 32,
            "features": features or {}, "feature_age_ms": {}}


# Day 1: a (flagged, fraud), b (flagged, legitimate: relabelled 1 -> 0), c (missed fraud), d (clean);
# e is flagged by the API and missed by the stream (the stream's decision counts), f's fraud label comes after as-of.
# Day 2: g (flagged, fraud by a tie of 0 and 1 at one labeled_at), h (flagged, no label), i (missed fraud).
DECISIONS = [
    _decision("a", D1 + 1, True), _decision("b", D1 + 2, True), _decision("c", D1 + 3, False),
    _decision("d", D1 + 4, False), _decision("e", D1 + 5, True, source="api"), _decision("e", D1 + 5, False),
    _decision("f", D1 + 6, False), _decision("a", D1 + 1, True),  # a redelivered stream answer
    _decision("g", D2 + 1, True), _decision("h", D2 + 2, True), _decision("i", D2 + 3, False),
]
LABELS = [("a", 1, D1 + 3 * DAY), ("b", 1, D1 + 2 * DAY), ("b", 0, D1 + 9 * DAY), ("c", 1, D1 + DAY),
          ("e", 1, D1 + 4 * DAY), ("f", 1, AS_OF + 1), ("g", 0, D2 + DAY), ("g", 1, D2 + DAY), ("i", 1, D2 + 5 * DAY)]
# By hand. Day 1: TP a; FP b; FN c, e; (f: no label known yet, d clean) -> precision 1/2, recall 1/3.
# Day 2: TP g; FP h; FN i -> precision 1/2, recall 1/2.
EXPECTED_DAYS = [
    {"day": "2024-03-04", "decisions": 6, "flagged": 2, "frauds_known": 3, "tp": 1, "fp": 1, "fn": 2,
     "precision": 0.5, "recall": 1 / 3},
    {"day": "2024-03-05", "decisions": 3, "flagged": 2, "frauds_known": 2, "tp": 1, "fp": 1, "fn": 1,
     "precision": 0.5, "recall": 0.5},
]

# Training values of `amount`: ten values 0..9, ten rows each -> every decile bin holds 10%, none missing.
TRAIN_AMOUNT = np.repeat(np.arange(10.0), 10)
# Live `amount`: half 0, a quarter 9, a quarter missing.
LIVE_AMOUNTS = [0.0, 0.0, 0.0, 0.0, 9.0, 9.0, None, None]
EXPECTED_PSI = ((0.5 - 0.1) * math.log(0.5 / 0.1) + (0.25 - 0.1) * math.log(0.25 / 0.1)
                + 8 * (FLOOR - 0.1) * math.log(FLOOR / 0.1) + (0.25 - FLOOR) * math.log(0.25 / FLOOR))


def _same_days(got: list[dict], want: list[dict]) -> bool:
    return len(got) == len(want) and all(
        g.keys() == w.keys() and all(g[k] == w[k] or (isinstance(w[k], float) and math.isclose(g[k], w[k]))
                                     for k in w) for g, w in zip(got, want, strict=True))


def _latest(cutoff: int) -> dict[str, int]:
    best: dict[str, tuple[int, int]] = {}
    for t, lab, at in LABELS:
        if at <= cutoff and (t not in best or (at, lab) > best[t]):
            best[t] = (at, lab)
    return {t: v[1] for t, v in best.items()}


@pytest.mark.unit
def test_daily_precision_recall_and_psi_match_the_hand_computed_figures():
    from batch.monitor_quality import daily_quality, feature_drift, one_per_transaction, reference_bins, total
    from batch.monitor_sources import parse_decision

    decisions = one_per_transaction(parse_decision(orjson.dumps(d)) for d in DECISIONS)
    days = [q.as_dict() for q in daily_quality(decisions, _latest(AS_OF))]
    assert _same_days(days, EXPECTED_DAYS), days
    overall = total(daily_quality(decisions, _latest(AS_OF)))
    assert (overall.precision, overall.recall) == pytest.approx((2 / 4, 2 / 5))
    # Before b's re-label and i's label: b counts as fraud, i as legitimate.
    early = {q.day: q for q in daily_quality(decisions, _latest(D2 + 2 * DAY))}
    assert (early["2024-03-04"].tp, early["2024-03-05"].fn) == (2, 0)

    ref = {"amount": reference_bins(TRAIN_AMOUNT)}
    assert ref["amount"]["shares"] == pytest.approx([0.1] * 10 + [0.0])
    live = [parse_decision(orjson.dumps(_decision(f"x{i}", D1, False, features={"amount": v})))
            for i, v in enumerate(LIVE_AMOUNTS)]
    drift = feature_drift(live, ref)
    assert drift["amount"]["psi"] == pytest.approx(EXPECTED_PSI, rel=1e-9)
    same = [parse_decision(orjson.dumps(_decision(f"y{i}", D1, False, features={"amount": float(v)})))
            for i, v in enumerate(TRAIN_AMOUNT)]
    assert feature_drift(same, ref)["amount"]["psi"] == pytest.approx(0.0, abs=1e-12)
    assert parse_decision(b'{"source": "stream"}') is None and parse_decision(b"nope") is None


@pytest.mark.integration
def test_velocity_monitor_reports_metrics_and_alerts_on_drift(services, make_topic, tmp_path):
    from kafka import KafkaProducer

    from stores.labels import write_labels
    from tests.toy_models import FEATURES, save_model, toy_booster

    bootstrap, topic = services["bootstrap"], make_topic("monitor", partitions=2)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    amounts = iter(LIVE_AMOUNTS + [0.0] * 20)
    for d in DECISIONS:
        d = {**d, "features": {**{f: 0.5 for f in FEATURES}, "amount": next(amounts)}}
        producer.send(topic, key=d["txn_id"].encode(), value=orjson.dumps(d))
    producer.send(topic, key=b"x", value=b"not a decision")
    producer.flush()
    producer.close()
    offline, models, out = tmp_path / "offline", tmp_path / "models", tmp_path / "monitor"
    write_labels(offline, [{"txn_id": t, "fraud_label": lab, "labeled_at": at} for t, lab, at in LABELS])
    save_model(models, "v1", toy_booster(1), threshold=0.5)
    train = pd.DataFrame({f: np.full(100, 0.5) for f in FEATURES})
    train["amount"] = TRAIN_AMOUNT
    train.to_parquet(tmp_path / "train.parquet")

    def run(*flags: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "VELOCITY_KAFKA_BOOTSTRAP": bootstrap, "VELOCITY_DATA_DIR": str(tmp_path / "data")}
        return subprocess.run([sys.executable, "-m", "velocity_cli", "monitor", "--scores-topic", topic,
                               "--offline-dir", str(offline), "--models-dir", str(models), "--out", str(out),
                               "--as-of", dt.datetime.fromtimestamp(AS_OF / 1000, dt.UTC).isoformat(), *flags],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=180)

    first = run("--training-set", str(tmp_path / "train.parquet"), "--psi-threshold", "0.5")
    assert first.returncode == 1, first.stderr  # amount drifted
    assert "drift" in first.stderr and "amount" in first.stderr and "Traceback" not in first.stderr
    report = json.loads((out / "report.json").read_text())
    assert _same_days(report["days"], EXPECTED_DAYS), report["days"]
    assert report["decisions"] == 9 and report["not_decisions"] == 1 and report["model_version"] == "v1"
    assert report["drifted"] == ["amount"] and report["drift_alert"] is True
    assert report["drift"]["count_ratio"]["psi"] == pytest.approx(0.0, abs=1e-12)  # as in training
    assert (models / "v1" / "drift_reference.json").exists()  # kept beside the model
    metrics = (out / "metrics.prom").read_text()
    assert 'velocity_model_precision{day="2024-03-04"} 0.5' in metrics
    assert 'velocity_model_recall{day="2024-03-05"} 0.5' in metrics
    assert "velocity_model_drift_alert 1" in metrics
    assert 'velocity_model_feature_psi{feature="amount",model="v1"}' in metrics
    assert "| 2024-03-04 | 6 | 2 | 3 | 1 | 1 | 2 | 0.500 | 0.333 |" in (out / "report.md").read_text()

    calm = run("--psi-threshold", "100")  # the reference now comes from beside the model
    assert calm.returncode == 0, calm.stderr
    assert "velocity_model_drift_alert 0" in (out / "metrics.prom").read_text()
    missing = run("--models-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no current model" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.unit
def test_dashboard_shows_the_latest_monitor_report(tmp_path):
    from batch.monitor_report import write_outputs
    from serving.dashboard import live_quality

    assert live_quality(tmp_path / "report.json") is None
    report = {"as_of_ms": AS_OF, "as_of": "2024-03-24T00:00:00+00:00", "model_version": "v1", "scores_topic": "s",
              "decisions": 9, "labels_known": 7, "threshold": 0.5, "days": EXPECTED_DAYS,
              "total": {**EXPECTED_DAYS[0], "day": "all", "precision": 0.5, "recall": 0.4},
              "drift": {"amount": {"psi": 3.5, "rows": 8}}, "psi_threshold": 0.2, "drifted": ["amount"],
              "drift_alert": True, "reference": "train.parquet"}
    write_outputs(report, tmp_path, None, days=30)
    live = live_quality(tmp_path / "report.json")
    assert live["precision"] == 0.5 and live["recall"] == 0.4 and live["drifted"] == ["amount"]
    assert live["psi"] == {"amount": 3.5} and [d["day"] for d in live["days"]] == ["2024-03-04", "2024-03-05"]
