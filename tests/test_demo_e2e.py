"""`velocity demo` as a user runs it (issue 15 section 2), on a small generated history, on real Kafka and Redis.

One run for the module, in its own namespace (data and run folders, topics, Redis key prefix, ports). What it
printed and wrote is checked from outside: the JSON table (SPEC section 9), the `scores` topic read by the test
itself (the stream's answers against the endpoint's), `velocity consistency` afterwards, and no card number in any
output or log.

The story's decisions come from a model `velocity train` fits to the generated history by its own rule; nothing
in training knows the story. `test_decisions_follow_the_story` asserts SPEC section 9's decisions as written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import uuid

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO

SECRET = "demo-e2e-secret"
#: Small enough to train in a minute or two on the 2-core machine (the demo's own default is 5,000 x 28).
CARDS, DAYS = 3000, 21
NORMAL, ATTACK = 3, 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_run(services, kafka_admin, redis_settings, tmp_path_factory):
    from kafka.admin import NewTopic

    from stores.kafka_topics import topic_configs
    from stores.redis_online import delete_prefix

    folder = tmp_path_factory.mktemp("demo")
    tag = uuid.uuid4().hex[:10]
    topics = {k: f"test.demo.{tag}.{k}" for k in ("transactions", "dlq", "scores", "alerts")}
    kafka_admin.create_topics([NewTopic(t, 4, 1, topic_configs=topic_configs()) for t in topics.values()])
    prefix = f"test:demo:{tag}"
    env = {**os.environ, "VELOCITY_ENTITY_SECRET": SECRET, "VELOCITY_DATA_DIR": str(folder / "data"),
           "VELOCITY_RUN_DIR": str(folder / "run"), "VELOCITY_REDIS_KEY_PREFIX": prefix,
           "VELOCITY_REDIS_PORT": str(services["redis_port"]), "VELOCITY_KAFKA_BOOTSTRAP": services["bootstrap"],
           "VELOCITY_KAFKA_TOPIC_TRANSACTIONS": topics["transactions"], "VELOCITY_KAFKA_TOPIC_DLQ": topics["dlq"],
           "VELOCITY_KAFKA_TOPIC_SCORES": topics["scores"], "VELOCITY_KAFKA_TOPIC_ALERTS": topics["alerts"],
           "COLUMNS": "200"}
    story = folder / "story.json"
    try:
        res = subprocess.run(
            [sys.executable, "-m", "velocity_cli", "demo", "--cards", str(CARDS), "--days", str(DAYS),
             "--no-realtime", "--json", str(story), "--api-port", str(free_port()),
             "--metrics-port", str(free_port())],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
        output = res.stdout + res.stderr
        # 0: the story as SPEC section 9 says; 1: it ran but a check did not hold (the tests below say which).
        assert res.returncode in (0, 1), f"velocity demo failed (exit {res.returncode}):\n{output[-5000:]}"
        yield {"rc": res.returncode, "out": output, "rows": json.loads(story.read_text()), "env": env,
               "folder": folder, "topics": topics, "bootstrap": services["bootstrap"]}
    finally:
        import redis

        r = redis.Redis(**redis_settings.client_kwargs())
        delete_prefix(r, prefix)
        r.close()
        with contextlib.suppress(Exception):
            kafka_admin.delete_topics(list(topics.values()))


def scores_by_source(run) -> dict[str, dict[str, dict]]:
    """Every answer on the run's scores topic, read by the test itself: source -> txn_id -> answer."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(run["topics"]["scores"], bootstrap_servers=run["bootstrap"],
                             auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=3000)
    out: dict[str, dict[str, dict]] = {"stream": {}, "api": {}}
    try:
        for m in consumer:
            rec = json.loads(m.value)
            out[rec["source"]].setdefault(rec["txn_id"], rec)
    finally:
        consumer.close()
    return out


@pytest.mark.integration
@pytest.mark.e2e
@pytest.mark.slow
def test_the_table_reads_counts_1_to_10_on_one_attacked_card(demo_run):
    rows = demo_run["rows"]
    assert [r["phase"] for r in rows] == ["normal"] * NORMAL + ["attack"] * ATTACK
    assert [r["num_trans_last_10m"] for r in rows] == [1] * NORMAL + list(range(1, ATTACK + 1))
    cards = [r["card"] for r in rows]
    assert all(re.fullmatch(r"\*{12}\d{4}", c) for c in cards), cards
    assert len(set(cards[:NORMAL])) == NORMAL and len(set(cards[NORMAL:])) == 1
    assert cards[NORMAL] not in cards[:NORMAL]
    assert all(100 <= r["amount"] <= 5000 for r in rows[:NORMAL])
    assert all(1 <= r["amount"] <= 50 for r in rows[NORMAL:])
    # Real 1-week features from today's snapshot: every ratio is a number (a missing snapshot would give null).
    for r in rows:
        assert all(isinstance(r[k], float) and math.isfinite(r[k]) for k in ("amt_ratio1", "amt_ratio2",
                                                                            "count_ratio")), r
        assert 0 <= r["score"] <= 1 and r["decision"] in ("FRAUD", "NOT_FRAUD")
    # The attack's count ratio grows with its count over one fixed weekly count.
    attack = rows[NORMAL:]
    weekly = {round(r["num_trans_last_10m"] / r["count_ratio"], 6) for r in attack}
    assert len(weekly) == 1, weekly
    assert "(exactly 1..10)" in demo_run["out"]


@pytest.mark.integration
@pytest.mark.e2e
@pytest.mark.slow
def test_the_stream_scored_every_story_transaction_exactly_as_the_endpoint_answered(demo_run):
    got = scores_by_source(demo_run)
    assert len(got["api"]) == NORMAL + ATTACK and set(got["stream"]) == set(got["api"])
    compared = 0
    for txn_id, api in got["api"].items():
        stream = got["stream"][txn_id]
        assert stream["features"].keys() == api["features"].keys()
        for name, value in api["features"].items():
            other = stream["features"][name]
            assert (value is None and other is None) or math.isclose(value, other, rel_tol=1e-9), (txn_id, name)
            compared += 1
        assert stream["decision"] == api["decision"] and math.isclose(stream["score"], api["score"], rel_tol=1e-6)
    assert compared >= 8 * (NORMAL + ATTACK)
    # The table is the endpoint's answers, in send order.
    by_time = sorted(got["api"].values(), key=lambda a: (a["scored_at_ms"], a["txn_id"]))
    assert [a["decision"] for a in by_time] == [r["decision"] for r in demo_run["rows"]]
    assert "agree with the endpoint's" in demo_run["out"]


@pytest.mark.integration
@pytest.mark.e2e
@pytest.mark.slow
def test_consistency_reads_zero_mismatches_after_the_demo(demo_run):
    res = subprocess.run([sys.executable, "-m", "velocity_cli", "consistency", "--since", "2h"],
                         env=demo_run["env"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"stream scores (the reference: 0 mismatches expected): {NORMAL + ATTACK} compared" in res.stdout
    assert "0 mismatches" in res.stdout


@pytest.mark.integration
@pytest.mark.e2e
@pytest.mark.slow
def test_no_card_number_in_any_output_or_log(demo_run):
    history = demo_run["folder"] / "data" / "demo" / "history.parquet"
    pans = set(pq.read_table(history, columns=["cc_num"]).column(0).to_pylist())
    texts = [demo_run["out"]] + [p.read_text(errors="replace") for p in (demo_run["folder"] / "run").rglob("*.log")]
    runs = {m for t in texts for m in re.findall(r"\d{13,19}", t)}
    assert not runs & pans


@pytest.mark.integration
@pytest.mark.e2e
@pytest.mark.slow
def test_decisions_follow_the_story(demo_run):
    """SPEC section 9: the normal cards and the attack's first NOT FRAUD, the other nine FRAUD."""
    want = ["NOT_FRAUD"] * (NORMAL + 1) + ["FRAUD"] * (ATTACK - 1)
    got = [r["decision"] for r in demo_run["rows"]]
    assert got == want, "\n" + "\n".join(
        f"{r['phase']:6} {r['card']} {r['amount']:>8} n10m={r['num_trans_last_10m']:>2} score={r['score']:.4f} "
        f"{r['decision']}" for r in demo_run["rows"])
    assert demo_run["rc"] == 0


# ------------------------------------------------------------------------------------------------ the rule (unit)


def _snapshot(n: int = 40):
    import pandas as pd

    cards = [f"{i:032x}" for i in range(n)]
    return pd.DataFrame({"card": cards, "num_trans_last_1w": [i % 20 + 1 for i in range(n)],
                         "avg_amt_last_1w": [50.0 + 25 * (i % 9) for i in range(n)]})


@pytest.mark.unit
def test_the_rule_takes_ordinary_quiet_never_attacked_cards_in_key_order():
    from demo.story import NORMAL_AMOUNT_RANGE, candidates, choose_cards

    snap = _snapshot()
    pans = {c: f"4{i:015d}" for i, c in enumerate(snap["card"])}
    lo, hi = snap["num_trans_last_1w"].quantile([0.25, 0.75])
    pool = candidates(snap, pans, fraud_cards=[snap["card"][10]])
    assert len(pool) and list(pool["card"]) == sorted(pool["card"])
    assert pool["num_trans_last_1w"].between(lo, hi).all()
    assert pool["avg_amt_last_1w"].between(*NORMAL_AMOUNT_RANGE).all()
    assert snap["card"][10] not in set(pool["card"])
    busy = set(pool["card"][:2])
    chosen = choose_cards(snap, pans, [snap["card"][10]], quiet=lambda c: c not in busy)
    assert [c.card for c in chosen] == list(pool["card"][2:6])
    assert all(c.pan == pans[c.card] and c.masked.endswith(c.pan[-4:]) and "*" * 12 in c.masked for c in chosen)


@pytest.mark.unit
def test_too_few_quiet_cards_is_a_clear_error():
    from demo.story import StoryError, choose_cards

    snap = _snapshot()
    pans = {c: f"4{i:015d}" for i, c in enumerate(snap["card"])}
    with pytest.raises(StoryError, match="--cards"):
        choose_cards(snap, pans, [], quiet=lambda c: False)


@pytest.mark.unit
def test_the_plan_is_the_story():
    from demo.story import Outcome, StoryCard, normal_amount, plan, verdict

    cards = [StoryCard(f"4{i:015d}", f"{i:032x}", 10 + i, 120.0 + i) for i in range(4)]
    txns = plan(cards, seed=3)
    assert [t.phase for t in txns] == ["normal"] * 3 + ["attack"] * 10
    assert [t.card for t in txns[3:]] == [cards[3]] * 10 and [t.card for t in txns[:3]] == cards[:3]
    attack = txns[3:]
    assert all(1 <= t.amount <= 50 for t in attack)
    gaps = [b.offset_ms - a.offset_ms for a, b in zip(attack, attack[1:], strict=False)]
    assert all(1000 <= g <= 2000 for g in gaps), gaps
    assert len({t.txn_id for t in txns}) == 13
    assert [t.expected for t in txns] == ["NOT_FRAUD"] * 4 + ["FRAUD"] * 9
    assert plan(cards, seed=3)[5].amount == txns[5].amount  # the seed decides the attack
    assert normal_amount(cards[0], [30.0, 250.0, 9000.0, 60.0]) == 250.0
    assert normal_amount(cards[0], [30.0]) == 120.0
    body = txns[0].body(123)
    assert body["cc_num"] == cards[0].pan and body["ts"] == 123 and "card" not in body

    def answer(n, decision):
        return {"features": {"num_trans_last_10m": float(n)}, "score": 0.5, "decision": decision}

    good = [Outcome(t, 0, answer(1 if t.phase == "normal" else t.position, t.expected)) for t in txns]
    assert verdict(good).ok
    lagged = [Outcome(t, 0, answer(min(t.position, 3) if t.phase == "attack" else 1, t.expected)) for t in txns]
    assert not verdict(lagged).counts_ok and verdict(lagged).decisions_ok
    wrong = [Outcome(t, 0, answer(1 if t.phase == "normal" else t.position, "NOT_FRAUD")) for t in txns]
    assert len(verdict(wrong).wrong) == 9
