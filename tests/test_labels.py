"""Fraud labels as a late stream (issue 16, items 1 and 5): the label validator, the replay's label schedule, the
stream worker's label archive on real Kafka, re-labels resolved as of a cut-off, hostile label messages, and an
outside history (unsorted, extra columns, a labeled_at column) carried through replay -> worker -> archive ->
training set.

Oracles are written from the issue's words: "a label is sent when the replay's event-time clock passes its
labeled_at"; "for any cut-off, the latest version with labeled_at <= the cut-off is the label" (fraud wins a tie,
stores/labels.py's contract).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import sys
import time
import uuid

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO
from tests.helpers import topic_messages, wait_until
from tests.stream_harness import SECRET, Worker, committed_all, wait_committed
from tests.synthetic import luhn_pan

DAY = 86_400_000
NOW = int(time.time() * 1000)


# ------------------------------------------------------------------------------------------------ unit


@pytest.mark.unit
def test_label_validation_names_the_field_and_reason():
    from featurestore.entity import EntityKeyer
    from featurestore.events import InvalidEvent
    from featurestore.label_events import field_of, parse_label, validate_label

    keyer = EntityKeyer(SECRET)
    ok = validate_label({"txn_id": "t1", "fraud_label": 1, "labeled_at": NOW, "extra": "x"}, keyer, NOW)
    assert ok == {"txn_id": "t1", "fraud_label": 1, "labeled_at": NOW}
    assert validate_label({"txn_id": "t", "fraud_label": 0, "labeled_at": float(NOW)}, keyer, NOW)["labeled_at"] == NOW
    assert validate_label({"txn_id": "t", "fraud_label": 1}, keyer, NOW, default_labeled_at=NOW)["labeled_at"] == NOW
    pan = luhn_pan(np.random.default_rng(1))
    masked = validate_label({"txn_id": f"id-{pan}", "fraud_label": 1, "labeled_at": NOW}, keyer, NOW)["txn_id"]
    assert pan not in masked and pan[-4:] in masked
    cases = [
        ([1, 2], "body", "not_object"),
        ({"fraud_label": 1, "labeled_at": NOW}, "txn_id", "missing_field"),
        ({"txn_id": "", "fraud_label": 1, "labeled_at": NOW}, "txn_id", "bad_field"),
        ({"txn_id": "x" * 129, "fraud_label": 1, "labeled_at": NOW}, "txn_id", "bad_field"),
        ({"txn_id": 7, "fraud_label": 1, "labeled_at": NOW}, "txn_id", "bad_field"),
        ({"txn_id": "t", "fraud_label": 2, "labeled_at": NOW}, "fraud_label", "bad_field"),
        ({"txn_id": "t", "fraud_label": True, "labeled_at": NOW}, "fraud_label", "bad_field"),
        ({"txn_id": "t", "fraud_label": "1", "labeled_at": NOW}, "fraud_label", "bad_field"),
        ({"txn_id": "t", "fraud_label": 1}, "labeled_at", "missing_field"),
        ({"txn_id": "t", "fraud_label": 1, "labeled_at": "2024-01-01"}, "labeled_at", "bad_field"),
        ({"txn_id": "t", "fraud_label": 1, "labeled_at": 1.5e12 + 0.5}, "labeled_at", "bad_field"),
        ({"txn_id": "t", "fraud_label": 1, "labeled_at": 12}, "labeled_at", "bad_ts"),
        ({"txn_id": "t", "fraud_label": 1, "labeled_at": NOW + DAY + 60_000}, "labeled_at", "future"),
    ]
    for obj, field, reason in cases:
        with pytest.raises(InvalidEvent) as err:
            validate_label(obj, keyer, NOW)
        assert (field_of(err.value), err.value.reason) == (field, reason), obj
    for raw in (None, b"{nope", b"\xff\xfe"):
        with pytest.raises(InvalidEvent) as err:
            parse_label(raw, keyer, NOW)
        assert err.value.reason == "not_json"


@pytest.mark.unit
def test_drawn_delays_are_reproducible_mostly_1_to_14_days_with_a_tail_cut_at_the_max():
    from ingest.labels import LabelDelay

    a, b = LabelDelay(seed=3).draw(20_000), LabelDelay(seed=3).draw(20_000)
    assert (a == b).all() and not (a == LabelDelay(seed=4).draw(20_000)).all()
    days = a / DAY
    assert days.min() >= 1 / 24 and days.max() <= 60
    assert 0.8 <= ((days >= 1) & (days <= 14)).mean() <= 0.95  # "most within 1-14 days"
    assert (days > 30).mean() > 0.002  # "a tail to 60"
    assert LabelDelay(seed=3, max_days=10).draw(1000).max() <= 10 * DAY


def _oracle_send_order(ts: list[int], rows: list[int], labels: dict[int, int]) -> list[tuple[str, int]]:
    """One producer's send order from the issue's words: rows in order; a label goes out as soon as the clock
    (the largest ts sent) has reached its labeled_at and its transaction was sent; the rest at the end."""
    out, sent, clock, pending = [], set(), None, dict(labels)
    for r in rows:
        out.append(("txn", r))
        sent.add(r)
        clock = ts[r] if clock is None else max(clock, ts[r])
        due = sorted((at, row) for row, at in pending.items() if row in sent and at <= clock)
        for _at, row in due:
            out.append(("label", row))
            del pending[row]
    out += [("label", row) for at, row in sorted((at, row) for row, at in pending.items())]
    return out


@pytest.mark.unit
def test_label_schedule_interleaves_by_event_time_clock_and_follows_its_transaction():
    from ingest.labels import LabelPlan, schedule

    rng = np.random.default_rng(11)
    for trial in range(40):
        n = int(rng.integers(1, 40))
        ts = (rng.integers(0, 1000, n) * 10).astype(np.int64)  # unsorted: row order is stream order
        rows = np.sort(rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False))  # one producer's rows
        lab_rows = rng.choice(n, size=int(rng.integers(0, n + 1)), replace=False)
        at = ts[lab_rows] + rng.integers(-200, 3000, lab_rows.size)  # some before their own ts (outside data)
        plan = LabelPlan(lab_rows.astype(np.int64), at.astype(np.int64), np.ones(lab_rows.size, np.int8))
        pick, due = schedule(rows, ts, plan)
        got = []
        li = 0
        for p, r in enumerate(rows.tolist()):
            got.append(("txn", r))
            while li < len(pick) and due[li] <= p:
                got.append(("label", int(plan.rows[pick[li]])))
                li += 1
        got += [("label", int(plan.rows[i])) for i in pick[li:]]
        mine = {int(r): int(a) for r, a in zip(lab_rows, at, strict=True) if r in set(rows.tolist())}
        assert got == _oracle_send_order(ts.tolist(), rows.tolist(), mine), trial


@pytest.mark.unit
def test_label_plan_uses_the_labeled_at_column_else_fraud_rows_only():
    from ingest.labels import LabelDelay, LabelPlanError, plan_labels

    base = {"txn_id": ["a", "b", "c", "d"], "ts": [1_700_000_000_000 + i for i in range(4)],
            "fraud_label": [1, 0, 1, 0]}
    drawn = plan_labels(pa.table(base), LabelDelay(), now_ms=NOW)
    assert drawn.rows.tolist() == [0, 2] and drawn.fraud_label.tolist() == [1, 1]  # legitimate rows: no label
    assert ((drawn.labeled_at - np.array(base["ts"])[[0, 2]]) >= 3_600_000).all()
    given = pa.table({**base, "labeled_at": pa.array([None, 1_700_000_100_000, 1_700_000_200_000, NOW + 9 * DAY],
                                                     pa.int64())})
    plan = plan_labels(given, LabelDelay(), now_ms=NOW)
    assert plan.rows.tolist() == [1, 2] and plan.fraud_label.tolist() == [0, 1] and plan.held_back == 1
    with pytest.raises(LabelPlanError, match="fraud_label"):
        plan_labels(pa.table({"txn_id": ["a"], "ts": [1]}), LabelDelay(), now_ms=NOW)


# ------------------------------------------------------------------------------------------------ integration


_consume_all = topic_messages


def _worker(services, topic: str, tmp_path, group: str) -> Worker:
    return Worker(topic=topic, prefix=f"test:{uuid.uuid4().hex[:12]}", group=group, offline=tmp_path / "offline",
                  bootstrap=services["bootstrap"], redis_port=services["redis_port"], log=tmp_path / "worker.log")


def _wait_labels(kafka_admin, worker: Worker, group: str, topic: str, bootstrap: str) -> None:
    wait_until(lambda: worker.alive() and committed_all(kafka_admin, group, topic, bootstrap), timeout=120,
               interval=0.25, what=f"labels of {topic} committed\n{worker.tail()}")


def _latest(versions: list[tuple[str, int, int]], cutoff: int | None) -> dict[str, int]:
    """The oracle: per txn_id, the version with the largest labeled_at <= cutoff; a tie goes to fraud."""
    best: dict[str, tuple[int, int]] = {}
    for txn, label, at in versions:
        if cutoff is not None and at > cutoff:
            continue
        if txn not in best or (at, label) > best[txn]:
            best[txn] = (at, label)
    return {t: v[1] for t, v in best.items()}


def _resolved(offline, cutoff: int | None) -> dict[str, int]:
    from stores.labels import latest_labels_sql, read_labels

    con = duckdb.connect()
    con.register("lv", read_labels(offline))
    rows = con.execute(latest_labels_sql("lv", None if cutoff is None else str(cutoff))).fetchall()
    con.close()
    return {t: int(lab) for t, lab, _ in rows}


@pytest.mark.integration
def test_relabels_resolve_as_of_a_cutoff_and_hostile_labels_are_dead_lettered(services, make_topic, kafka_admin,
                                                                              tmp_path):
    from kafka import KafkaProducer

    from stores.labels import read_labels

    bootstrap, topic = services["bootstrap"], make_topic("labels", partitions=2)
    labels_topic = f"{topic}.labels"
    base = NOW - 40 * DAY
    versions = [("a", 0, base + DAY), ("a", 1, base + 5 * DAY), ("a", 0, base + 9 * DAY),  # re-labelled twice
                ("b", 0, base + 2 * DAY), ("b", 1, base + 2 * DAY),  # a tie: fraud wins
                ("c", 1, base + 30 * DAY), ("a", 1, base + 5 * DAY)]  # c known late; a duplicate version
    hostile = [b"{not json", b"[1, 2]", b'{"fraud_label": 1, "labeled_at": 1700000000000}',
               orjson.dumps({"txn_id": "x", "fraud_label": 5, "labeled_at": base}),
               orjson.dumps({"txn_id": "x", "fraud_label": 1, "labeled_at": NOW + 30 * DAY}),
               orjson.dumps({"txn_id": "x" * 1000, "fraud_label": 1, "labeled_at": base}),
               b"\xff" * 70_000]
    reasons = ["not_json", "not_object", "missing_field", "bad_field", "future", "bad_field", "not_json"]
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=2 << 20)
    for t, lab, at in versions[:4]:
        producer.send(labels_topic, key=t.encode(), value=orjson.dumps({"txn_id": t, "fraud_label": lab,
                                                                        "labeled_at": at}))
    for raw in hostile:  # in the middle of the stream: what follows must still be archived
        producer.send(labels_topic, key=b"x", value=raw)
    for t, lab, at in versions[4:]:
        producer.send(labels_topic, key=t.encode(), value=orjson.dumps({"txn_id": t, "fraud_label": lab,
                                                                        "labeled_at": at}))
    producer.flush()
    producer.close()

    group = f"g-{uuid.uuid4().hex[:8]}"
    worker = _worker(services, topic, tmp_path, group).start()
    try:
        _wait_labels(kafka_admin, worker, group, labels_topic, bootstrap)
        assert worker.metric('velocity_stream_labels_total{outcome="invalid"}') == len(hostile)
        assert worker.metric('velocity_stream_labels_total{outcome="archived"}') == len(versions)
    finally:
        assert worker.stop() == 0, worker.tail()
    stored = read_labels(tmp_path / "offline").to_pylist()
    assert sorted((r["txn_id"], r["fraud_label"], r["labeled_at"]) for r in stored) == sorted(versions)
    for cutoff in (None, base, base + DAY, base + 2 * DAY, base + 5 * DAY - 1, base + 5 * DAY, base + 9 * DAY,
                   base + 29 * DAY, base + 30 * DAY):
        assert _resolved(tmp_path / "offline", cutoff) == _latest(versions, cutoff), cutoff
    assert _resolved(tmp_path / "offline", base + 29 * DAY).get("c") is None  # known after the cut-off: excluded
    assert _resolved(tmp_path / "offline", base + 6 * DAY)["a"] == 1 and _resolved(tmp_path / "offline", None)["a"] == 0
    dead = _consume_all(bootstrap, f"{labels_topic}.dlq")
    got = sorted(dict(m.headers)["reason"].decode() for m in dead)
    assert got == sorted(reasons)
    assert all(len(m.value) <= 64 * 1024 for m in dead)


def _outside_history(path, rng) -> pa.Table:
    """Not from `velocity generate`: 6 cards, 60 rows 2 s apart, a few rows out of order, extra columns, columns
    in another order, a labeled_at column (fraud labelled 20 s later, one legitimate row confirmed, one fraud row
    never labelled, one label known long after the last row)."""
    start = NOW - 20 * DAY
    pans = [luhn_pan(rng) for _ in range(6)]
    n = 60
    ts = start + np.arange(n, dtype=np.int64) * 2_000
    order = np.arange(n)
    for i in (5, 17, 33, 48):  # out of order: the row order is the stream order
        order[i], order[i + 2] = order[i + 2], order[i]
    fraud = np.zeros(n, dtype=np.int8)
    fraud[[10, 11, 25, 40, 52, 57]] = 1
    labeled_at = [None] * n
    for i in (10, 11, 25, 40, 52):
        labeled_at[i] = int(ts[i]) + 20_000
    labeled_at[57] = None  # a fraud nobody reported
    labeled_at[52] = int(ts[-1]) + 5 * DAY  # known after the history ends
    labeled_at[3] = int(ts[3]) + 30_000  # a legitimate payment confirmed by an analyst
    cols = {
        "channel": [str(c) for c in rng.choice(["web", "pos"], n)],  # extra: ignored
        "ts": ts[order], "amount": np.round(rng.uniform(5, 300, n), 2)[order],
        "cc_num": [pans[i % 6] for i in order], "merchant": [f"m{i % 9}" for i in order],
        "category": ["grocery"] * n, "txn_id": [f"out-{i:03d}" for i in order],
        "fraud_label": fraud[order], "labeled_at": pa.array([labeled_at[i] for i in order], pa.int64()),
        "lat": rng.uniform(-60, 60, n),
    }
    table = pa.table(cols)
    pq.write_table(table, path)
    return table


@pytest.mark.integration
@pytest.mark.slow
def test_outside_history_replays_with_interleaved_labels_archives_and_trains(services, make_topic, kafka_admin,
                                                                            tmp_path):
    from kafka.admin import NewTopic

    from stores.duckdb_offline import training_set
    from stores.kafka_topics import topic_configs
    from stores.labels import read_labels

    bootstrap = services["bootstrap"]
    topic = f"test.outside.{uuid.uuid4().hex[:10]}"
    labels_topic = f"{topic}.labels"
    # Broker time (LogAppendTime) on both topics: the order the replay sent things in is observable.
    kafka_admin.create_topics([NewTopic(t, 2, 1, topic_configs={**topic_configs(),
                                                                 "message.timestamp.type": "LogAppendTime"})
                               for t in (topic, labels_topic)])
    history = tmp_path / "outside.parquet"
    table = _outside_history(history, np.random.default_rng(16))
    env = {**os.environ, "VELOCITY_ENTITY_SECRET": SECRET, "VELOCITY_KAFKA_BOOTSTRAP": bootstrap}
    group = f"g-{uuid.uuid4().hex[:8]}"
    worker = _worker(services, topic, tmp_path, group).start()
    try:
        run = subprocess.run([sys.executable, "-m", "velocity_cli", "replay", "--input", str(history), "--topic", topic,
                              "--labels", "--labels-topic", labels_topic, "--speed", "10"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr
        assert "labels 6 sent, 0 failed" in run.stderr, run.stderr
        wait_committed(kafka_admin, worker, group, topic, bootstrap)
        _wait_labels(kafka_admin, worker, group, labels_topic, bootstrap)
    finally:
        assert worker.stop() == 0, worker.tail()
        txns_sent = _consume_all(bootstrap, topic)
        sent = _consume_all(bootstrap, labels_topic)
        with contextlib.suppress(Exception):
            kafka_admin.delete_topics([topic, labels_topic, f"{topic}.dlq", f"{labels_topic}.dlq"])

    rows = table.to_pylist()
    by_id = {r["txn_id"]: r for r in rows}
    assert sorted(m.key.decode() for m in sent) == sorted(r["txn_id"] for r in rows if r["labeled_at"] is not None)
    # Interleaved (speed 10: 1 s of wall time per 10 s of event time): a label reaches the broker after every
    # transaction whose ts is 20 s (event time) before its labeled_at, and before every transaction 30 s after it;
    # the one known after the history's end, after the transactions (up to the last 20 s).
    appended = {orjson.loads(m.value)["txn_id"]: m.timestamp for m in txns_sent}
    assert sorted(appended) == sorted(by_id)
    last_ts = max(r["ts"] for r in rows)
    for m in sent:
        label = orjson.loads(m.value)
        txn = by_id[m.key.decode()]
        assert label == {"txn_id": txn["txn_id"], "fraud_label": txn["fraud_label"], "labeled_at": txn["labeled_at"]}
        assert appended[txn["txn_id"]] <= m.timestamp, label  # never before its transaction
        at = min(label["labeled_at"], last_ts)
        before = [appended[t] for t, r in by_id.items() if r["ts"] <= at - 20_000]
        after = [appended[t] for t, r in by_id.items() if r["ts"] >= at + 30_000]
        assert max(before, default=0) <= m.timestamp + 300, label
        assert m.timestamp <= min(after, default=m.timestamp), label

    offline = tmp_path / "offline"
    stored = {(r["txn_id"], r["fraud_label"], r["labeled_at"]) for r in read_labels(offline).to_pylist()}
    assert stored == {(r["txn_id"], int(r["fraud_label"]), r["labeled_at"]) for r in rows if r["labeled_at"]}
    day0 = dt.datetime.fromtimestamp(min(r["ts"] for r in rows) / 1000, dt.UTC).date()
    frame = training_set(day0, day0 + dt.timedelta(days=2), offline_dir=offline, secret=SECRET)
    assert sorted(frame["txn_id"]) == sorted(by_id)
    assert {t: int(v) for t, v in zip(frame["txn_id"], frame["fraud_label"], strict=True)} == {
        t: int(r["fraud_label"]) for t, r in by_id.items()}
    counts = dict(zip(frame["txn_id"], frame["num_trans_last_10m"], strict=True))
    assert counts["out-000"] == 1  # the first transaction of its card
    # The file itself trains alike: its row order is the stream order the worker saw.
    direct = training_set(day0, day0 + dt.timedelta(days=2), offline_dir=tmp_path / "none", history=history,
                          secret=SECRET)
    assert dict(zip(direct["txn_id"], direct["num_trans_last_10m"], strict=True)) == counts
    assert dict(zip(direct["txn_id"], direct["fraud_label"], strict=True)) == dict(
        zip(frame["txn_id"], frame["fraud_label"], strict=True))


@pytest.mark.integration
def test_post_labels_validates_like_score_and_publishes_to_the_labels_topic(services, kafka_admin, tmp_path):
    from tests.api_harness import isolated_api

    with isolated_api(services, kafka_admin, tmp_path, "labels", topics=("transactions", "scores", "labels")) as api:
        client, topic = api["client"], api["topics"]["labels"]
        at = NOW - 3 * DAY
        ok = client.post("/v1/labels", json={"txn_id": "t-1", "fraud_label": 1, "labeled_at": at, "note": "x"})
        assert ok.status_code == 202, ok.text
        assert ok.json() == {"txn_id": "t-1", "fraud_label": 1, "labeled_at": at, "published": True,
                             "queued": False}
        before = int(time.time() * 1000)
        now_default = client.post("/v1/labels", json={"txn_id": "t-2", "fraud_label": 0})
        assert now_default.status_code == 202 and before - 5_000 <= now_default.json()["labeled_at"] <= before + 60_000
        pan = luhn_pan(np.random.default_rng(8))
        masked = client.post("/v1/labels", json={"txn_id": f"order-{pan}", "fraud_label": 1, "labeled_at": at})
        assert masked.status_code == 202 and pan not in masked.text

        bad = [
            ({"fraud_label": 1}, "txn_id", "missing_field"),
            ({"txn_id": "", "fraud_label": 1}, "txn_id", "bad_field"),
            ({"txn_id": "x" * 129, "fraud_label": 1}, "txn_id", "bad_field"),
            ({"txn_id": ["t"], "fraud_label": 1}, "txn_id", "bad_field"),
            ({"txn_id": "t"}, "fraud_label", "missing_field"),
            ({"txn_id": "t", "fraud_label": 3}, "fraud_label", "bad_field"),
            ({"txn_id": "t", "fraud_label": "yes"}, "fraud_label", "bad_field"),
            ({"txn_id": "t", "fraud_label": None}, "fraud_label", "bad_field"),
            ({"txn_id": "t", "fraud_label": 1, "labeled_at": "yesterday"}, "labeled_at", "bad_field"),
            ({"txn_id": "t", "fraud_label": 1, "labeled_at": 5}, "labeled_at", "bad_ts"),
            ({"txn_id": "t", "fraud_label": 1, "labeled_at": NOW + 3 * DAY}, "labeled_at", "future"),
            ([{"txn_id": "t", "fraud_label": 1}], "body", "not_object"),
        ]
        for body, field, reason in bad:
            r = client.post("/v1/labels", json=body)
            assert r.status_code == 422, (body, r.text)
            assert (r.json()["field"], r.json()["reason"]) == (field, reason), (body, r.json())
        for raw, reason in ((b"{oops", "not_json"), (b'{"txn_id": "t", "fraud_label": 1, "x": NaN}', "not_json")):
            r = client.post("/v1/labels", content=raw, headers={"content-type": "application/json"})
            assert (r.status_code, r.json()["reason"]) == (422, reason), r.text
        r = client.post("/v1/labels", content=b'{"txn_id": "t", "fraud_label": 1}', headers={"content-type": "text/plain"})
        assert (r.status_code, r.json()["field"]) == (422, "content-type")
        big = {"txn_id": "t", "fraud_label": 1, "pad": "a" * 70_000}
        r = client.post("/v1/labels", json=big)
        assert (r.status_code, r.json()["error"]) == (413, "too_large"), r.text
        assert "velocity_api_labels_total" in client.get("/metrics").text

        def on_topic():
            msgs = _consume_all(api["bootstrap"], topic)
            return msgs if len(msgs) >= 3 else None

        msgs = wait_until(on_topic, timeout=30, what="the labels on the topic")
        values = sorted((m.key.decode(), orjson.loads(m.value)["fraud_label"]) for m in msgs)
        assert len(msgs) == 3 and values[1:] == [("t-1", 1), ("t-2", 0)]
        assert all(m.key.decode() == orjson.loads(m.value)["txn_id"] for m in msgs)
        assert pan not in values[0][0] and values[0][0].startswith("order-")
        assert "Traceback" not in api["server"].log.read_text()


@pytest.mark.unit
def test_replay_labels_without_a_fraud_label_column_is_one_clear_line(tmp_path):
    path = tmp_path / "nolabels.parquet"
    pq.write_table(pa.table({"txn_id": ["a"], "cc_num": [luhn_pan(np.random.default_rng(2))], "amount": [5.0],
                             "ts": [NOW - DAY], "merchant": ["m"], "category": ["c"]}), path)
    run = subprocess.run([sys.executable, "-m", "velocity_cli", "replay", "--input", str(path), "--labels",
                          "--bootstrap", "127.0.0.1:1"], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "VELOCITY_ENTITY_SECRET": SECRET})
    assert run.returncode == 2 and "needs a fraud_label column" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
