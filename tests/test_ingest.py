"""Ingest: the generator's guarantees, and replay through the real broker consumed back and compared."""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from featurestore.entity import EntityKeyer
from ingest.generate import SCHEMA, GenerateConfig, generate_history, write_history
from ingest.profiles import luhn_valid
from ingest.replay import ReplayError, check_rows, native_crc_available, replay_table
from stores.history import HistoryError, load_history
from tests.conftest import REPO

SMALL = GenerateConfig(cards=300, days=20, start=dt.date(2020, 3, 1), seed=5, fraud_rate=0.01)


@pytest.fixture(scope="module")
def small():
    return generate_history(SMALL)


@pytest.mark.unit
def test_replay_producer_uses_the_native_crc():
    # kafka-python silently falls back to a pure-Python CRC-32C that caps replay near 36k msg/s.
    assert native_crc_available(), "the pinned crc32c package is not installed"


@pytest.mark.unit
def test_same_seed_gives_identical_file(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_history(generate_history(SMALL).table, a)
    write_history(generate_history(SMALL).table, b)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    other = generate_history(GenerateConfig(**{**SMALL.__dict__, "seed": 6})).table
    assert not other.equals(pq.read_table(a))


@pytest.mark.unit
def test_schema_sorted_unique_and_luhn(small):
    t = small.table
    assert t.schema.equals(SCHEMA)
    ts = t.column("ts").to_numpy()
    assert (np.diff(ts) >= 0).all()
    assert len(set(t.column("txn_id").to_pylist())) == t.num_rows
    pans = set(t.column("cc_num").to_pylist())
    assert len(pans) <= SMALL.cards and all(len(p) == 16 and p[0] == "4" and luhn_valid(p) for p in pans)
    amounts = t.column("amount").to_numpy()
    assert (amounts > 0).all() and np.allclose(amounts, np.round(amounts, 2))
    start = int(dt.datetime(2020, 3, 1, tzinfo=dt.UTC).timestamp() * 1000)
    assert ts.min() >= start and ts.max() < start + SMALL.days * 86_400_000 + 3_600_000


@pytest.mark.unit
def test_fraud_rate_and_chains_within_bounds(small):
    t = small.table
    labels = t.column("fraud_label").to_numpy()
    chain = small.chain_of_row
    rate = np.mean(chain >= 0)
    assert 0.006 < rate < 0.015  # configured 1% of rows in chains
    assert ((chain >= 0) <= (labels == 1)).all()  # every chain row is fraud (compromised merchants are the rest)
    cards = t.column("cc_num").to_numpy(zero_copy_only=False)
    ts = t.column("ts").to_numpy()
    fast = small.chains.column("fast").to_numpy()
    for cid in np.unique(chain[chain >= 0]):
        rows = np.flatnonzero(chain == cid)
        assert SMALL.chain_min <= rows.size <= SMALL.chain_max
        assert len(set(cards[rows])) == 1, "a chain stays on its victim card"
        gaps = np.diff(ts[rows]) / 1000
        lo, hi = (1, 10) if fast[cid] else (SMALL.gap_min_s, SMALL.gap_max_s)
        assert ((gaps >= lo - 0.001) & (gaps <= hi + 0.001)).all(), (cid, gaps)


@pytest.mark.unit
def test_legitimate_rows_untouched_by_fraud():
    clean = generate_history(GenerateConfig(**{**SMALL.__dict__, "fraud_rate": 0.0, "compromise_rate": 0.0})).table
    with_fraud = generate_history(SMALL)
    legit = with_fraud.table.filter(pc.equal(with_fraud.table.column("fraud_label"), 0))
    assert legit.num_rows == clean.num_rows
    for col in ("cc_num", "amount", "ts", "merchant", "category"):
        assert legit.column(col).to_pylist() == clean.column(col).to_pylist()


@pytest.mark.unit
def test_distinct_ids_are_counted_across_chunks_without_nulls():
    from stores.history import distinct_count

    column = pa.chunked_array([["a", "b", None, "c"], ["c", "d"], [], ["a", None, "e"]])
    assert distinct_count(column) == len({"a", "b", "c", "d", "e"})
    assert distinct_count(pa.chunked_array([[f"t{i}" for i in range(3000)]] * 2)) == 3000


@pytest.mark.unit
@pytest.mark.parametrize("problem", ["missing", "not_parquet", "missing_column", "dup_ids", "negative"])
def test_bad_input_files_give_clear_errors(tmp_path, small, problem):
    path = tmp_path / "h.parquet"
    t = small.table.slice(0, 50)
    if problem == "not_parquet":
        path.write_text("hello")
    elif problem == "missing_column":
        pq.write_table(t.drop(["amount"]), path)
    elif problem == "dup_ids":
        ids = t.column("txn_id").to_pylist()
        ids[3] = ids[2]
        pq.write_table(t.set_column(0, "txn_id", pa.array(ids)), path)
    elif problem == "negative":
        pq.write_table(t.set_column(2, "amount", pa.array([-1.0] * 50)), path)
    with pytest.raises(HistoryError) as info:
        load_history(path)
    assert str(path) in str(info.value)
    res = subprocess.run([sys.executable, "-m", "velocity_cli", "replay", "--input", str(path), "--topic",
                          "never-created-topic"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 2 and str(path) in res.stderr.replace("\n", "") and "Traceback" not in res.stderr


@pytest.mark.integration
def test_replay_delivers_every_row_once_in_order_with_keys_and_timestamps(services, make_topic, small):
    from kafka import KafkaConsumer

    from ingest.replay import replay_table

    topic = make_topic("replay")
    table = small.table
    stats = replay_table(table, bootstrap=services["bootstrap"], topic=topic, secret="k")
    assert (stats.sent, stats.failed) == (table.num_rows, 0)
    consumer = KafkaConsumer(topic, bootstrap_servers=services["bootstrap"], auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=10_000, max_poll_records=5000)
    import orjson

    got = [(m.key, orjson.loads(m.value), m.timestamp, m.partition) for m in consumer]
    consumer.close()
    assert len(got) == table.num_rows
    assert sorted(v["txn_id"] for _, v, _, _ in got) == sorted(table.column("txn_id").to_pylist())
    keyer = EntityKeyer("k")
    position = {t: i for i, t in enumerate(table.column("txn_id").to_pylist())}
    pan_of = dict(zip(table.column("txn_id").to_pylist(), table.column("cc_num").to_pylist(), strict=True))
    per_card: dict[str, list[int]] = {}
    partition_of: dict[bytes, int] = {}
    for key, v, ts, part in got:
        pan = pan_of[v["txn_id"]]
        assert "cc_num" not in v and v["card"] == keyer(pan) and v["pan_last4"] == pan[-4:], "no PAN on Kafka"
        assert key == v["card"].encode() and ts == v["ts"]
        assert partition_of.setdefault(key, part) == part, "a card lives in one partition"
        per_card.setdefault(v["card"], []).append(position[v["txn_id"]])
    assert all(rows == sorted(rows) for rows in per_card.values()), "per-card stream order is the file order"


@pytest.mark.integration
def test_replay_limit_and_start_at(services, make_topic, small):
    from kafka import KafkaConsumer

    from ingest.replay import replay_table

    topic = make_topic("replay-limit")
    stats = replay_table(small.table, bootstrap=services["bootstrap"], topic=topic, secret="k", limit=100,
                         start_at=1000)
    assert stats.sent == 100
    consumer = KafkaConsumer(topic, bootstrap_servers=services["bootstrap"], auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=8000)
    import orjson

    ids = sorted(orjson.loads(m.value)["txn_id"] for m in consumer)
    consumer.close()
    assert ids == sorted(small.table.column("txn_id").to_pylist()[1000:1100])


@pytest.mark.integration
def test_replay_to_unreachable_broker_fails_bounded(small, tmp_path):
    path = tmp_path / "h.parquet"
    write_history(small.table.slice(0, 20), path)
    res = subprocess.run([sys.executable, "-m", "velocity_cli", "replay", "--input", str(path)],
                         capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**__import__("os").environ, "VELOCITY_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
    assert res.returncode == 1 and "Traceback" not in res.stderr and "not reachable" in res.stderr


def _topic_size(bootstrap: str, topic: str) -> int:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic) or []]
        return sum(c.end_offsets(tps).values()) if tps else 0
    finally:
        c.close()


@pytest.mark.integration
def test_replay_ctrl_c_flushes_reports_and_resumes_without_loss(services, make_topic, small, tmp_path):
    import os
    import re
    import signal

    import orjson
    from kafka import KafkaConsumer

    from tests.helpers import wait_until

    topic = make_topic("replay-int")
    path = tmp_path / "h.parquet"
    write_history(small.table, path)
    env = {**os.environ, "VELOCITY_KAFKA_BOOTSTRAP": services["bootstrap"], "VELOCITY_ENTITY_SECRET": "k"}
    cmd = [sys.executable, "-m", "velocity_cli", "replay", "--input", str(path), "--topic", topic]
    # 20 days at 3600x would take minutes: interrupt it part-way, as Ctrl-C does (SIGINT to the process group).
    proc = subprocess.Popen([*cmd, "--speed", "3600"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_until(lambda: _topic_size(services["bootstrap"], topic) >= 200, timeout=60, what="first rows replayed")
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    sent = int(re.search(r"sent ([\d,]+)", stderr).group(1).replace(",", ""))
    resume = int(re.search(r"--start-at (\d+)", stderr).group(1))
    assert 200 <= sent < small.table.num_rows and 0 < resume <= sent

    def delivered() -> list[str]:
        consumer = KafkaConsumer(topic, bootstrap_servers=services["bootstrap"], auto_offset_reset="earliest",
                                 enable_auto_commit=False, consumer_timeout_ms=8000, max_poll_records=5000)
        ids = [orjson.loads(m.value)["txn_id"] for m in consumer]
        consumer.close()
        return ids

    first_run = delivered()
    all_ids = small.table.column("txn_id").to_pylist()
    assert len(first_run) == sent, "what the summary reports is exactly what reached the broker"
    assert set(all_ids[:resume]) <= set(first_run), "every row before the resume point was delivered"

    res = subprocess.run([*cmd, "--start-at", str(resume)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    both = delivered()
    assert set(both) == set(all_ids)
    resent = [t for t, n in collections.Counter(both).items() if n > 1]
    assert set(resent) <= set(all_ids[resume:]), "only rows at or after the resume point may be sent twice"


def _free_port_pair() -> int:
    import socket

    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two adjacent free ports")


@pytest.mark.integration
def test_replay_survives_a_broker_restart_mid_run(services, small, tmp_path):
    """A second, private broker is stopped mid-replay and started again: every row arrives, in order."""
    import os
    import time

    import orjson
    from kafka import KafkaConsumer

    from services.manager import ServiceConfig, _stop, kafka_up, port_open
    from tests.helpers import wait_until

    port = _free_port_pair()
    cfg = ServiceConfig(run_dir=tmp_path / "svc", kafka_port=port, controller_port=port + 1, kafka_heap="256m",
                        jars_dir=Path(os.environ.get("VELOCITY_RUN_DIR", REPO / ".velocity")) / "kafka-jars-3.9.1")
    cfg.logs_dir.mkdir(parents=True)
    bootstrap = f"127.0.0.1:{port}"
    kafka_up(cfg)
    path = tmp_path / "h.parquet"
    write_history(small.table, path)
    env = {**os.environ, "VELOCITY_KAFKA_BOOTSTRAP": bootstrap, "VELOCITY_ENTITY_SECRET": "k"}
    # 20 days at 86,400x: about 20 s of replay, so the outage lands mid-run.
    proc = subprocess.Popen([sys.executable, "-m", "velocity_cli", "replay", "--input", str(path), "--topic", "tx",
                             "--speed", "86400"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _topic_size(bootstrap, "tx") >= 300, timeout=60, what="first rows replayed")
        _stop(cfg.kafka_dir / "kafka.pid", "Kafka", 30)
        wait_until(lambda: not port_open(port), timeout=30, what="broker down")
        time.sleep(4)  # the outage itself: the replay keeps going and must hold its rows meanwhile
        assert proc.poll() is None, "the replay gave up during a short outage"
        kafka_up(cfg)
        _, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr
        assert "retrying with backoff" in stderr and "every one was acknowledged" in stderr, stderr
        assert stderr.count("ECONNREFUSED") <= 20, "the outage is reported in a few throttled lines, not a flood"
        consumer = KafkaConsumer("tx", bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                 enable_auto_commit=False, consumer_timeout_ms=10_000, max_poll_records=5000)
        got = [(m.partition, orjson.loads(m.value)["txn_id"]) for m in consumer]
        consumer.close()
        # Nothing lost. Across a broker restart delivery is at-least-once: a batch the broker wrote but could not
        # acknowledge before going down may be written again once it is back (the stream dedupes by txn_id).
        ids = [t for _, t in got]
        assert set(ids) == set(small.table.column("txn_id").to_pylist()), stderr
        # First copies keep each partition's (hence each card's) input order.
        order = {t: i for i, t in enumerate(small.table.column("txn_id").to_pylist())}
        for part in {p for p, _ in got}:
            firsts = list(dict.fromkeys(t for p, t in got if p == part))
            assert firsts == sorted(firsts, key=order.__getitem__), f"partition {part} out of input order"
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop(cfg.kafka_dir / "kafka.pid", "Kafka", 30)


PAN = "4111111111111111"


def _bad(table: pa.Table, row: int, **values) -> pa.Table:
    """`table` with the given columns of one row replaced (types kept)."""
    for name, value in values.items():
        col = table.column(name).to_pylist()
        col[row] = value
        table = table.set_column(table.column_names.index(name), name, pa.array(col, table.schema.field(name).type))
    return table


NOW_MS = int(__import__("time").time() * 1000)  # replay_table judges "future" by the clock, as the worker does


@pytest.mark.unit
@pytest.mark.parametrize("values,reason", [
    ({"cc_num": ""}, "bad_field"),
    ({"cc_num": "4111-1111-1111"}, "bad_field"),
    ({"cc_num": "12345"}, "bad_field"),
    ({"amount": 1e-9}, "bad_amount"),
    ({"amount": 0.004}, "bad_amount"),
    ({"amount": 1.234}, "bad_amount"),
    ({"amount": float("inf")}, "bad_amount"),
    ({"ts": 4_070_908_800_000}, "future"),  # 2099
    ({"ts": NOW_MS + 2 * 86_400_000}, "future"),
    ({"ts": 4_200_000_000_000}, "bad_ts"),
    ({"ts": 900_000_000_000}, "bad_ts"),  # 1998
    ({"merchant": ""}, "bad_field"),
    ({"txn_id": "x" * 129}, "bad_field"),
    ({"fraud_label": 3}, "bad_field"),
])
def test_replay_refuses_rows_the_worker_would_reject_before_sending_anything(small, values, reason):
    table = _bad(small.table.slice(0, 50), 17, **values)
    with pytest.raises(ReplayError) as info:
        check_rows(table, now_ms=NOW_MS)
    message = str(info.value)
    assert "row 17 " in message and reason in message and "Nothing was sent" in message
    assert PAN not in message
    # Nothing is produced: the refusal comes before any connection (this broker address is unreachable).
    with pytest.raises(ReplayError):
        replay_table(table, bootstrap="127.0.0.1:1", topic="never", secret="k")
    check_rows(table, 18, 50, now_ms=NOW_MS)  # a range without the bad row is fine
    check_rows(table, 0, 17, now_ms=NOW_MS)


@pytest.mark.unit
def test_replay_refuses_a_negative_limit_or_start(small):
    for kwargs in ({"limit": -1}, {"start_at": -5}):
        with pytest.raises(ReplayError, match="0 or more"):
            replay_table(small.table.slice(0, 10), bootstrap="127.0.0.1:1", topic="never", secret="k", **kwargs)


@pytest.mark.unit
def test_replay_cli_refusals_exit_2_with_the_row_and_warn_about_the_default_secret(small, tmp_path):
    import os

    path = tmp_path / "h.parquet"
    write_history(_bad(small.table.slice(0, 30), 4, amount=1e-9), path)
    env = {k: v for k, v in os.environ.items() if k != "VELOCITY_ENTITY_SECRET"}
    env["VELOCITY_KAFKA_BOOTSTRAP"] = "127.0.0.1:1"  # nothing may be sent anywhere
    cmd = [sys.executable, "-m", "velocity_cli", "replay", "--input", str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60, env=env)
    err = " ".join(res.stderr.split())
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "row 4 " in err and "bad_amount" in err and "Nothing was sent" in err, res.stderr
    assert "WARNING" in err and "DEFAULT entity-key secret" in err and "VELOCITY_ENTITY_SECRET" in err
    res = subprocess.run([*cmd, "--limit", "-1"], capture_output=True, text=True, cwd=REPO, timeout=60, env=env)
    assert res.returncode == 2 and "--limit" in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={**env, "VELOCITY_ENTITY_SECRET": "a-real-secret"})
    assert "DEFAULT entity-key secret" not in res.stderr


@pytest.mark.integration
def test_replay_sends_an_unsorted_file_in_file_order_without_waiting_when_ts_goes_back(services, make_topic, small,
                                                                                       tmp_path):
    """File order is stream order: rows go out as the file has them, and a row behind the pace is not waited for.

    The file runs backwards in time over hours; at real-time speed a replay that sorted it, or paced from the
    smallest ts, would take hours. PAN-like runs in free text are masked before Kafka.
    """
    import orjson
    from kafka import KafkaConsumer

    table = small.table.slice(0, 400)
    table = table.take(pa.array(np.arange(table.num_rows)[::-1]))
    table = _bad(table, 3, merchant=f"shop {PAN}", txn_id=f"id-{PAN}")
    assert (np.diff(table.column("ts").to_numpy()) <= 0).all() and table.column("ts")[0].as_py() > \
        table.column("ts")[399].as_py() + 3_600_000
    path = tmp_path / "backwards.parquet"
    pq.write_table(table, path)
    topic = make_topic("replay-order")
    stats = replay_table(load_history(path), bootstrap=services["bootstrap"], topic=topic,
                         secret="k", speed=1.0)
    assert (stats.sent, stats.failed) == (table.num_rows, 0) and stats.elapsed_s < 60
    consumer = KafkaConsumer(topic, bootstrap_servers=services["bootstrap"], auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=8000)
    got = [(m.partition, m.value) for m in consumer]
    consumer.close()
    assert len(got) == table.num_rows
    assert not any(PAN.encode() in v for _, v in got), "no clear PAN on Kafka, not even in free text"
    position = {t: i for i, t in enumerate(table.column("txn_id").to_pylist())}
    masked = [orjson.loads(v) for _, v in got if b'"merchant":"shop ' in v]
    assert len(masked) == 1 and masked[0]["merchant"] == "shop ************1111" and masked[0]["txn_id"].startswith("id-************1111~")
    position[masked[0]["txn_id"]] = 3
    for part in {p for p, _ in got}:
        order = [position[orjson.loads(v)["txn_id"]] for p, v in got if p == part]
        assert order == sorted(order), f"partition {part} is not in file order"
