"""The stream worker end to end on the real broker and Redis: oracle equality, SIGKILL recovery, DLQ."""

from __future__ import annotations

import uuid

import orjson
import pytest
from kafka import KafkaConsumer

from featurestore.entity import EntityKeyer, redact_pans_bytes
from stores.archive import read_archive
from stores.redis_online import OnlineStore
from tests import oracle, synthetic
from tests.helpers import wait_until
from tests.stream_harness import SECRET, Worker, stable_members, wait_committed

pytestmark = pytest.mark.integration
W = 600_000
RETAIN_ALL_MS = 30 * 86_400_000


@pytest.fixture
def stream_env(services, make_topic, key_prefix, redis_settings, tmp_path):
    topic = make_topic("txn", partitions=4)
    make_topic_name = f"{topic}.dlq"
    from stores.kafka_topics import ensure_topics

    ensure_topics(services["bootstrap"], {make_topic_name: 4})
    group = f"g-{uuid.uuid4().hex[:8]}"

    def worker(retention_ms: int | None = None) -> Worker:
        return Worker(topic=topic, prefix=key_prefix, group=group, offline=tmp_path,
                      bootstrap=services["bootstrap"], redis_port=services["redis_port"], log=tmp_path / "worker.log",
                      retention_ms=retention_ms)

    store = OnlineStore(redis_settings, prefix=key_prefix)
    yield {"topic": topic, "group": group, "worker": worker, "store": store, "offline": tmp_path,
           "bootstrap": services["bootstrap"]}
    store.close()


def assert_online_equals_oracle(store: OnlineStore, rows: list[dict]) -> int:
    keyer = EntityKeyer(SECRET)
    rows_ = oracle.window_10m(synthetic.arrivals(rows, keyer), W)
    mismatches = []
    for r in rows_:
        f = store.read_features(r.card, r.txn_id, r.ts, r.amount_cents)
        if (f.num_trans_last_10m, f.sum_cents_last_10m) != (r.count, r.sum_cents):
            mismatches.append((r.txn_id, (f.num_trans_last_10m, f.sum_cents_last_10m), (r.count, r.sum_cents)))
    assert not mismatches, f"{len(mismatches)} of {len(rows_)} differ, e.g. {mismatches[:5]}"
    return sum(r.late for r in rows_)


def assert_archive_exactly_once(offline, rows: list[dict]) -> None:
    keyer = EntityKeyer(SECRET)
    want = {r.txn_id: r for r in oracle.window_10m(synthetic.arrivals(rows, keyer), W)}
    archived = read_archive(offline)
    assert sorted(archived["txn_id"]) == sorted(want), "archive must hold every transaction exactly once"
    late = dict(zip(archived["txn_id"], archived["late"], strict=True))
    assert all(late[t] == r.late for t, r in want.items())
    # Each card's archived arrival positions follow the order the stream delivered its transactions.
    position = {t: r.position for t, r in want.items()}
    for _, card_rows in archived.groupby("card"):
        by_seq = card_rows.sort_values("seq")["txn_id"].tolist()
        assert by_seq == sorted(by_seq, key=position.__getitem__)
    assert set(archived["card"]) <= {keyer(r["cc_num"]) for r in rows}  # entity keys, never PANs


def test_replayed_history_online_state_equals_oracle(stream_env, kafka_admin):
    rows = synthetic.history(n=3000, cards=40, seed=11)
    synthetic.produce(stream_env["bootstrap"], stream_env["topic"], rows, EntityKeyer(SECRET))
    worker = stream_env["worker"]().start()
    try:
        wait_committed(kafka_admin, worker, stream_env["group"], stream_env["topic"], stream_env["bootstrap"])
    finally:
        assert worker.stop() == 0, worker.tail()
    late = assert_online_equals_oracle(stream_env["store"], rows)
    assert late > 0, "the history should exercise lateness"
    assert_archive_exactly_once(stream_env["offline"], rows)


def test_sigkill_mid_stream_loses_and_double_counts_nothing(stream_env, kafka_admin):
    rows = synthetic.history(n=6000, cards=60, seed=23)
    synthetic.produce(stream_env["bootstrap"], stream_env["topic"], rows, EntityKeyer(SECRET))
    worker = stream_env["worker"]().start()
    wait_until(lambda: (worker.metric("velocity_stream_events_total") or 0) >= 1500, timeout=90,
               what="the worker to be mid-stream")
    worker.kill()
    processed_before = len(list(stream_env["store"].redis.scan_iter(match=f"{stream_env['store'].keys.prefix}:card:*")))
    assert processed_before > 0
    restarted = stream_env["worker"]().start()
    try:
        wait_committed(kafka_admin, restarted, stream_env["group"], stream_env["topic"], stream_env["bootstrap"])
        # The restart re-read at least what the killed worker had not committed: redeliveries were absorbed.
    finally:
        assert restarted.stop() == 0, restarted.tail()
    assert_online_equals_oracle(stream_env["store"], rows)
    assert_archive_exactly_once(stream_env["offline"], rows)


def test_second_worker_joining_and_leaving_loses_and_double_counts_nothing(stream_env, kafka_admin):
    """Partitions move to a worker that joins mid-stream, and back when it leaves, while events keep flowing."""
    rows = synthetic.history(n=9000, cards=80, seed=37)  # ~2 days: keep every event online to read it back
    keyer = EntityKeyer(SECRET)
    thirds = [rows[:3000], rows[3000:6000], rows[6000:]]
    synthetic.produce(stream_env["bootstrap"], stream_env["topic"], thirds[0], keyer)
    first = stream_env["worker"](RETAIN_ALL_MS).start()
    second = None
    try:
        wait_until(lambda: (first.metric("velocity_stream_events_total") or 0) >= 1000, timeout=90,
                   what="the first worker to be mid-stream")
        second = stream_env["worker"](RETAIN_ALL_MS).start()
        wait_until(lambda: stable_members(kafka_admin, stream_env["group"]) == 2, timeout=90,
                   what="the group to rebalance onto two workers")
        synthetic.produce(stream_env["bootstrap"], stream_env["topic"], thirds[1], keyer)
        wait_until(lambda: (second.metric("velocity_stream_events_total") or 0) > 0, timeout=90,
                   what="the joining worker to take over partitions and process events")
        assert second.stop() == 0, second.tail()  # leaves: its partitions go back to the first worker
        synthetic.produce(stream_env["bootstrap"], stream_env["topic"], thirds[2], keyer)
        wait_committed(kafka_admin, first, stream_env["group"], stream_env["topic"], stream_env["bootstrap"])
    finally:
        if second is not None and second.alive():
            second.stop()
        assert first.stop() == 0, first.tail()
    assert_online_equals_oracle(stream_env["store"], rows)
    assert_archive_exactly_once(stream_env["offline"], rows)


def test_malformed_and_late_messages_go_to_dlq_with_reason(stream_env, kafka_admin):
    keyer = EntityKeyer(SECRET)
    base = {"cc_num": "4539578763621486", "merchant": "m", "category": "c"}
    good = [{**base, "txn_id": f"g{i}", "amount": 10.0 + i, "ts": synthetic.T0 + i * 60_000} for i in range(20)]
    late = {**base, "txn_id": "late-1", "amount": 5.0, "ts": synthetic.T0 + 19 * 60_000 - W - 1}
    bad = {
        b"not json at all": "not_json",
        b"[1, 2, 3]": "not_object",
        orjson.dumps({**base, "txn_id": "b1", "ts": synthetic.T0}): "missing_field",
        orjson.dumps({**base, "txn_id": "b2", "amount": -3, "ts": synthetic.T0}): "bad_amount",
        b'{"txn_id":"b3","cc_num":"4539578763621486","amount":NaN,"ts":1577836800000,"merchant":"m","category":"c"}':
            "bad_amount",
        orjson.dumps({**base, "txn_id": "b4", "amount": 1.0, "ts": 42}): "bad_ts",
        orjson.dumps({**base, "txn_id": "b5", "amount": 1.0, "ts": synthetic.T0, "cc_num": "12ab"}): "bad_field",
    }
    synthetic.produce(stream_env["bootstrap"], stream_env["topic"], good + [late], keyer,
                      extra=[(b"k", raw) for raw in bad], send_pan=True)  # as an outside producer would
    worker = stream_env["worker"]().start()
    try:
        wait_committed(kafka_admin, worker, stream_env["group"], stream_env["topic"], stream_env["bootstrap"])
        assert worker.metric('velocity_stream_dlq_total{reason="late"}') == 1
        assert worker.metric("velocity_stream_dlq_total") == len(bad) + 1
    finally:
        assert worker.stop() == 0, worker.tail()

    consumer = KafkaConsumer(f"{stream_env['topic']}.dlq", bootstrap_servers=stream_env["bootstrap"],
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    dlq = {}
    for msg in consumer:
        headers = dict(msg.headers)
        dlq[msg.value] = headers["reason"].decode()
    consumer.close()
    # The original bytes with PAN-like digit runs masked (the `ts` field's event time is kept: one time in ten
    # passes the Luhn check, and masking it broke the dead letter's JSON), and the reason.
    def masked(raw: bytes, ts: int | None) -> bytes:
        out = redact_pans_bytes(raw)
        return out if ts is None else out.replace(redact_pans_bytes(str(ts).encode()), str(ts).encode())

    expected = {masked(raw, None): reason for raw, reason in bad.items()} | {masked(orjson.dumps(late), late["ts"]): "late"}
    assert dlq == expected
    assert b"************1486" in masked(orjson.dumps(late), late["ts"])  # the PAN itself is masked
    store = stream_env["store"]
    last = good[-1]
    f = store.read_features(keyer(last["cc_num"]), last["txn_id"], last["ts"], 2900)
    assert f.num_trans_last_10m == 11  # g9..g19 (g9 exactly on the 10-minute edge); the late one not counted
    archived = read_archive(stream_env["offline"])
    assert set(archived["txn_id"]) == {r["txn_id"] for r in good} | {"late-1"}
    assert archived.set_index("txn_id").loc["late-1", "late"]
