"""The scoring API (issue 14): a real server process on real Redis and Kafka, observed from outside.

The features an answer carries are checked against the brute-force oracle (tests/oracle.py) and against the
training path (`OnlineStore.read_features` + `featurestore.ratios.compute_ratios`); the score against the booster's
own prediction of the row; every bad body against its 4xx and field; outages against their bounded answers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import httpx
import numpy as np
import orjson
import pytest

from featurestore.definitions import REGISTRY
from featurestore.entity import EntityKeyer
from tests.api_harness import SECRET, Server, free_port, isolated_api
from tests.conftest import REPO
from tests.helpers import wait_until
from tests.synthetic import luhn_pan
from tests.toy_models import save_model, toy_booster

FEATURES = REGISTRY.model_features
MINUTE = 60_000
RNG = np.random.default_rng(14)
PANS = [luhn_pan(RNG) for _ in range(8)]
KEYER = EntityKeyer(SECRET)


# ------------------------------------------------------------------------------------------ the server process




def body(pan: str, txn_id: str | None = None, amount: float = 42.5, ts: int | None = None, **extra) -> dict:
    out = {"txn_id": txn_id or uuid.uuid4().hex, "cc_num": pan, "amount": amount, "merchant": "m-1",
           "category": "grocery", **extra}
    if ts is not None:
        out["ts"] = ts
    return out


@pytest.fixture(scope="module")
def stack(services, kafka_admin, tmp_path_factory):
    """One server process for the module, with its own Redis prefix, topics and model directory."""
    with isolated_api(services, kafka_admin, tmp_path_factory.mktemp("serving"), "serve",
                      env={"VELOCITY_SERVE_MAX_BATCH": "8"}) as api:
        yield api


def consume(bootstrap: str, topic: str, until, timeout: float = 30.0) -> list:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=500)
    got: list = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not until(got):
            got.extend(consumer)
    finally:
        consumer.close()
    return got


def same(a: float | None, b: float | None) -> bool:
    a = math.nan if a is None else a
    b = math.nan if b is None else b
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9)


# ------------------------------------------------------------------------------------------ unit


@pytest.mark.unit
def test_one_row_predictors_equal_inplace_predict_bit_for_bit():
    import xgboost as xgb

    from serving.fastpredict import (
        CompiledTrees,
        RowPredictor,
        _check_rows,
        compiled_trees,
        one_row_predictor,
        row_predictor,
    )

    for booster in (toy_booster(3), toy_booster(5, rounds=60)):
        rng = np.random.default_rng(5)
        rows = rng.normal(0, 50, (400, len(FEATURES))).astype(np.float32)
        rows[::3, 1] = np.nan
        rows[::7] = np.nan  # a row with nothing known
        rows[::11, 0] = np.inf
        # Every split threshold, and its float32 neighbours on either side.
        rows = np.vstack([rows, _check_rows(booster, len(FEATURES), random_rows=64)])
        expected = booster.inplace_predict(rows)
        compiled = compiled_trees(booster, len(FEATURES))
        assert isinstance(compiled, CompiledTrees)
        assert isinstance(one_row_predictor(booster, len(FEATURES)), CompiledTrees)
        c_call = row_predictor(booster, len(FEATURES))
        assert c_call is not None
        for i in range(len(rows)):
            assert compiled.predict_row(rows[i:i + 1]) == float(expected[i]), rows[i]
            assert c_call.predict_row(rows[i:i + 1]) == float(expected[i]), rows[i]
    # What the generated code does not cover (here a regression objective) keeps XGBoost's own predictor.
    x = np.random.default_rng(1).random((500, 4)).astype(np.float32)
    reg = xgb.train({"objective": "reg:squarederror", "max_depth": 3, "nthread": 1}, xgb.DMatrix(x, x[:, 0]), 5)
    assert compiled_trees(reg, 4) is None and isinstance(one_row_predictor(reg, 4), RowPredictor)
    dart = xgb.train({"objective": "binary:logistic", "booster": "dart", "max_depth": 3, "nthread": 1},
                     xgb.DMatrix(x, (x[:, 0] > 0.5).astype(int)), 5)
    assert compiled_trees(dart, 4) is None


@pytest.mark.unit
def test_fast_path_takes_only_plain_score_requests_and_reads_chunked_bodies():
    import asyncio

    from serving.app import ApiError
    from serving.fastpath import ScoreFastPath
    from serving.metrics import ApiMetrics

    handled = []

    async def handle(body: bytes, publish: bool) -> bytes:
        handled.append((body, publish))
        return b"{}"

    def error_body(exc):
        return exc.status, orjson.dumps(exc.payload())

    fast = ScoreFastPath(handle=handle, read_limit=10, metrics=ApiMetrics(), api_error=ApiError,
                         error_body=error_body, internal_body=b"{}")

    def scope(path="/v1/score", query=b"", method="POST",
              headers=((b"content-type", b"application/json; charset=utf-8"),)):
        return {"type": "http", "method": method, "path": path, "query_string": query, "headers": list(headers)}

    assert fast.takes(scope()) and fast.takes(scope(query=b"publish=false")) and fast.takes(scope(query=b"publish=1"))
    for other in (scope(query=b"publish=maybe"), scope(query=b"publish=false&x=1"), scope(path="/v1/score/batch"),
                  scope(method="GET"), {**scope(), "type": "websocket"}):
        assert not fast.takes(other)  # FastAPI answers these

    def call(chunks, **kw):
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                    for i, c in enumerate(chunks)] or [{"type": "http.disconnect"}]
        sent = []

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        asyncio.run(fast.answer(scope(**kw), receive, send))
        return sent

    sent = call([b'{"a"', b":1}"], query=b"publish=false")
    assert handled[-1] == (b'{"a":1}', False) and sent[0]["status"] == 200 and sent[1]["body"] == b"{}"
    assert dict(sent[0]["headers"]) == {b"content-type": b"application/json", b"content-length": b"2"}
    sent = call([b"123456", b"789012"])
    assert sent[0]["status"] == 413 and orjson.loads(sent[1]["body"])["field"] == "body"
    sent = call([b"{}"], headers=((b"content-type", b"text/plain"),))
    assert sent[0]["status"] == 422 and orjson.loads(sent[1]["body"])["field"] == "content-type"
    sent = call([b"{}"], headers=((b"content-type", b"application/json"), (b"content-length", b"999")))
    assert sent[0]["status"] == 413
    assert call([]) == []  # the client left before its body: nobody to answer
    assert len(handled) == 1


@pytest.mark.unit
def test_reason_codes_are_the_largest_contributions():
    import xgboost as xgb

    from serving.models import ServingModel
    from serving.recorder import reason_codes

    booster = toy_booster(4)
    model = ServingModel(booster, FEATURES, 0.5, "t")
    rows = np.array([[10, 1, 3.5, 0.9], [400, np.nan, 0.1, 0.1]], dtype=np.float32)
    for method in ("exact", "approx"):  # TreeSHAP values, or XGBoost's approximate (Saabas) contributions
        codes = reason_codes(model, rows, top=2, method=method)
        contribs = booster.predict(xgb.DMatrix(rows, feature_names=list(FEATURES)), pred_contribs=True,
                                   approx_contribs=method == "approx")
        for row_codes, c, row in zip(codes, contribs, rows, strict=True):
            assert len(row_codes) == 2
            assert [r["feature"] for r in row_codes] == [FEATURES[i] for i in np.argsort(-np.abs(c[:-1]), kind="stable")[:2]]
            assert [r["contribution"] for r in row_codes] == [float(c[FEATURES.index(r["feature"])])
                                                              for r in row_codes]
            assert all(same(r["value"], float(row[FEATURES.index(r["feature"])])) for r in row_codes)
    with pytest.raises(ValueError):
        reason_codes(model, rows, method="guess")


@pytest.mark.unit
def test_validation_names_field_and_ignores_extras():
    from serving.validation import BadInput, transactions_from_json

    now = int(time.time() * 1000)
    ok = body(PANS[0], "t-1", card="f" * 32, pan_last4="0000", fraud_label=7, surprise={"x": 1})
    (txn,) = transactions_from_json(orjson.dumps(ok), KEYER, now, batch=False)
    assert txn.card == KEYER(PANS[0]) and txn.pan_last4 == PANS[0][-4:] and txn.ts == now
    assert txn.fraud_label is None and PANS[0] not in txn.to_json().decode()
    # An integral JSON number is that integer, however written (JSON Schema agrees); a fraction is refused.
    for written in (f"{now}.0".encode(), f"{now / 1e12!r}e12".encode()):
        raw = orjson.dumps(body(PANS[0], "t-2")).replace(b'"amount"', b'"ts":' + written + b',"amount"')
        (txn,) = transactions_from_json(raw, KEYER, now, batch=False)
        assert type(txn.ts) is int and txn.ts == now, written
    with pytest.raises(BadInput) as err:
        transactions_from_json(orjson.dumps(body(PANS[0], ts=now + 0.5)), KEYER, now, batch=False)
    assert err.value.field == "ts"
    with pytest.raises(BadInput) as err:
        transactions_from_json(b'[{"txn_id": "a"}, 3]', KEYER, now, batch=True, max_batch=5)
    assert err.value.field == "[0].cc_num"


# ------------------------------------------------------------------------------------------ integration


def _bad_cases(now: int) -> list[tuple[str, bytes | dict, dict, int, str]]:
    """(what, body, headers, status, field)"""
    good = body(PANS[1])
    j = {"content-type": "application/json"}

    def without(k):
        return {key: v for key, v in good.items() if key != k}

    cases = [(f"missing {k}", without(k), j, 422, k) for k in ("txn_id", "cc_num", "amount", "merchant", "category")]
    cases += [
        ("amount a string", {**good, "amount": "12"}, j, 422, "amount"),
        ("amount a bool", {**good, "amount": True}, j, 422, "amount"),
        ("amount zero", {**good, "amount": 0}, j, 422, "amount"),
        ("amount negative", {**good, "amount": -5}, j, 422, "amount"),
        ("amount absurd", {**good, "amount": 1e15}, j, 422, "amount"),
        ("amount 3 decimals", {**good, "amount": 1.234}, j, 422, "amount"),
        ("amount NaN", orjson.dumps(good).replace(b'42.5', b'NaN'), j, 422, "amount"),
        ("amount Infinity", orjson.dumps(good).replace(b'42.5', b'Infinity'), j, 422, "amount"),
        ("amount -Infinity", orjson.dumps(good).replace(b'42.5', b'-Infinity'), j, 422, "amount"),
        ("amount 1e999", orjson.dumps(good).replace(b'42.5', b'1e999'), j, 422, "amount"),
        ("cc_num letters", {**good, "cc_num": "4111abcd11111111"}, j, 422, "cc_num"),
        ("cc_num a number", {**good, "cc_num": int(PANS[1])}, j, 422, "cc_num"),
        ("cc_num fails Luhn", {**good, "cc_num": PANS[1][:-1] + str((int(PANS[1][-1]) + 1) % 10)}, j, 422,
         "cc_num"),
        ("cc_num too short", {**good, "cc_num": "4111"}, j, 422, "cc_num"),
        ("txn_id a number", {**good, "txn_id": 5}, j, 422, "txn_id"),
        ("txn_id empty", {**good, "txn_id": ""}, j, 422, "txn_id"),
        ("merchant null", {**good, "merchant": None}, j, 422, "merchant"),
        ("category too long", {**good, "category": "c" * 300}, j, 422, "category"),
        ("ts a string", {**good, "ts": "yesterday"}, j, 422, "ts"),
        ("ts a float", {**good, "ts": now + 0.5}, j, 422, "ts"),
        ("ts in 1970", {**good, "ts": 5}, j, 422, "ts"),
        ("ts two days ahead", {**good, "ts": now + 2 * 86_400_000}, j, 422, "ts"),
        ("not JSON", b'{"txn_id": ', j, 422, "body"),
        ("not UTF-8", b'{"txn_id": "\xff\xfe"}', j, 422, "body"),
        ("an array", [good], j, 422, "body"),
        ("a string", "hello", j, 422, "body"),
        ("empty body", b"", j, 422, "body"),
        ("deeply nested", b"[" * 100_000 + b"]" * 100_000, j, 413, "body"),
        ("nested under the limit", b"[" * 5_000 + b"]" * 5_000, j, 422, "body"),
        ("no content type", orjson.dumps(good), {}, 422, "content-type"),
        ("text/plain", orjson.dumps(good), {"content-type": "text/plain"}, 422, "content-type"),
        ("form", orjson.dumps(good), {"content-type": "application/x-www-form-urlencoded"}, 422, "content-type"),
        ("oversize", {**good, "pad": "x" * 70_000}, j, 413, "body"),
    ]
    return cases


@pytest.mark.integration
def test_every_bad_body_gets_its_4xx_naming_the_field(stack):
    client: httpx.Client = stack["client"]
    failures = []
    for what, payload, headers, status, field in _bad_cases(int(time.time() * 1000)):
        content = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        r = client.post("/v1/score", content=content, headers=headers)
        got = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != status or got.get("field") != field or not got.get("detail"):
            failures.append((what, r.status_code, r.text[:200]))
    assert not failures, failures
    assert client.post("/v1/score?publish=maybe", json=body(PANS[1])).json()["field"] == "publish"
    # Unknown fields and fraud_label are ignored; a client's own card/pan_last4 too (the API tokenizes).
    r = client.post("/v1/score?publish=false", json=body(PANS[1], fraud_label="yes", card="0" * 32, whatever=[1]))
    assert r.status_code == 200 and r.json()["card"] == KEYER(PANS[1])
    metrics = client.get("/metrics").text
    assert 'velocity_api_errors_total{kind="invalid_request"}' in metrics
    assert 'velocity_api_errors_total{kind="too_large"}' in metrics
    assert 'kind="internal"' not in metrics and 'status="500"' not in metrics


@pytest.mark.integration
def test_features_equal_oracle_and_training_path_and_score_equals_booster(stack, redis_settings):
    from featurestore.event_time import event_time_values
    from featurestore.ratios import compute_ratios
    from featurestore.state import EventWrite
    from stores.redis_online import OnlineStore
    from tests.oracle import Arrival, snapshot_1w, unseen_window

    client: httpx.Client = stack["client"]
    pan, card = PANS[2], KEYER(PANS[2])
    store = OnlineStore(redis_settings, prefix=stack["prefix"])
    t = int(time.time() * 1000) - 60_000
    history = [Arrival(card, f"h{i}", t - dt, cents) for i, (dt, cents) in enumerate(
        [(9 * MINUTE, 1250), (4 * MINUTE, 399), (MINUTE, 10_000), (10 * MINUTE, 77), (11 * MINUTE, 5000)])]
    store.apply_events([EventWrite(a.card, a.txn_id, a.ts, a.amount_cents) for a in history])
    cutoff = t - 3_600_000
    week = [Arrival(card, f"w{i}", cutoff - (i + 1) * 3_600_000, 2000 + i) for i in range(6)]
    stats = snapshot_1w(week, cutoff)
    store.write_snapshot(cutoff, [(c, n, s) for c, (n, s) in stats.items()])

    r = client.post("/v1/score?publish=false", json=body(pan, "probe-1", amount=12.34, ts=t))
    assert r.status_code == 200, r.text
    answer = r.json()
    count, cents = unseen_window(history, card, t, 1234, REGISTRY.longest_stream_window_ms)
    n1w, s1w = stats[card]
    oracle = {"amount": 12.34, "num_trans_last_10m": count, "avg_amt_last_10m": cents / 100 / count,
              "num_trans_last_1w": n1w, "avg_amt_last_1w": s1w / 100 / n1w,
              "hour_of_day": float(dt.datetime.fromtimestamp(t / 1000, dt.UTC).hour)}
    oracle.update(compute_ratios(oracle))
    assert count == 5  # the event at exactly t - 10 min counts, the one at t - 11 min does not
    assert set(answer["features"]) == set(REGISTRY.all_features)
    assert all(same(answer["features"][k], v) for k, v in oracle.items()), (answer["features"], oracle)
    # The training code path for the same transaction gives the same vector.
    online = store.read_features(card, "probe-1", t, 1234)
    path = {"amount": 12.34, **online.values, **event_time_values(t)}
    path.update(compute_ratios(path))
    assert all(same(answer["features"][k], path[k]) for k in REGISTRY.all_features)
    # The score is the booster's prediction of the row in the model's order; the decision follows the threshold.
    import xgboost as xgb

    booster = xgb.Booster()
    booster.load_model(str(stack["models"] / "v1" / "model.ubj"))
    row = np.array([[path[f] for f in FEATURES]], dtype=np.float32)
    assert answer["score"] == float(booster.inplace_predict(row)[0])  # bit for bit (serving/fastpredict.py)
    assert answer["decision"] == ("FRAUD" if answer["score"] >= answer["threshold"] else "NOT_FRAUD")
    assert answer["model_version"] == "v1" and answer["published"] is False
    ages = answer["feature_age_ms"]
    assert set(ages) == {g.name for g in REGISTRY.groups}  # every declared group's age, the merchant's too
    for g in REGISTRY.stream_groups:  # the newest stored event counted, at t - 1 min, is in every window >= 1 min
        assert ages[g.name] == (ages["card_agg_10m"] if g.window_ms >= MINUTE else 0), g.name
    now = int(time.time() * 1000)
    assert now - (t - MINUTE) - 5_000 <= ages["card_agg_10m"] <= now - (t - MINUTE)
    assert now - cutoff - 5_000 <= ages["card_agg_1w"] <= now - cutoff
    # A card never seen: only the transaction itself, 1-week features missing -> null, age 0 / null.
    fresh = client.post("/v1/score?publish=false", json=body(PANS[3], amount=5)).json()
    assert fresh["features"]["num_trans_last_10m"] == 1 and fresh["features"]["count_ratio"] is None
    assert fresh["feature_age_ms"]["card_agg_10m"] == 0
    # The card's current features, by key and by card number (a PAN in a URL is refused).
    by_key = client.get(f"/v1/features/{card}").json()
    by_pan = client.post("/v1/features", json={"cc_num": pan}).json()
    assert by_key["card"] == by_pan["card"] == card and by_key["features"]["num_trans_last_1w"] == n1w
    r = client.get(f"/v1/features/{pan}")
    assert r.status_code == 422 and r.json()["field"] == "card"
    store.close()


@pytest.mark.integration
def test_publish_is_tokenized_counted_once_and_recorded(stack, redis_settings):
    from featurestore.events import parse_transaction
    from featurestore.state import EventWrite
    from stores.redis_online import OnlineStore

    client: httpx.Client = stack["client"]
    pan, card = PANS[4], KEYER(PANS[4])
    t = int(time.time() * 1000)
    sent = body(pan, f"pub-{uuid.uuid4().hex[:6]}-{pan}", amount=19.99, ts=t)  # a PAN inside free text too
    first = client.post("/v1/score", json=sent).json()
    again = client.post("/v1/score", json=sent).json()
    assert first["published"] is True and again["published"] is True
    assert first["features"] == again["features"]
    msgs = consume(stack["bootstrap"], stack["topics"]["transactions"],
                   lambda got: sum(m.key == card.encode() for m in got) >= 2)
    mine = [m for m in msgs if m.key == card.encode()]
    assert len(mine) == 2
    for m in mine:
        raw = m.value.decode()
        assert pan not in raw and "cc_num" not in raw
        event = orjson.loads(m.value)
        assert event["card"] == card and event["pan_last4"] == pan[-4:] and "fraud_label" not in event
        assert m.timestamp == t
    # The stream's write path applies both copies: the transaction counts once.
    store = OnlineStore(redis_settings, prefix=stack["prefix"])
    events = [parse_transaction(m.value, KEYER) for m in mine]
    store.apply_events([EventWrite(e.card, e.txn_id, e.ts, e.amount_cents) for e in events])
    assert store.read_features(card, "next", t + 1, 100).num_trans_last_10m == 2  # the transaction + the next
    third = client.post("/v1/score?publish=false", json=sent).json()  # now read as stored, as of its arrival
    assert third["features"] == first["features"]
    store.close()
    # Every answer is recorded to `scores` (source: api) with reason codes; no PAN there either.
    records = consume(stack["bootstrap"], stack["topics"]["scores"],
                      lambda got: sum(m.key == card.encode() for m in got) >= 3)
    mine = [orjson.loads(m.value) for m in records if m.key == card.encode()]
    assert len(mine) == 3 and all(pan not in json.dumps(r) for r in mine)
    rec = mine[0]
    assert rec["source"] == "api" and rec["txn_id"] == first["txn_id"] and rec["score"] == first["score"]
    assert rec["features"] == first["features"] and rec["ts"] == t and len(rec["reasons"]) == 3
    assert rec["reason_method"] == "approx"
    assert {r["feature"] for r in rec["reasons"]} <= set(FEATURES)


@pytest.mark.integration
def test_batch_answers_in_order_and_is_bounded(stack):
    client: httpx.Client = stack["client"]
    items = [body(PANS[i % 3 + 5], f"b{i}-{uuid.uuid4().hex[:6]}", amount=10 + i) for i in range(8)]
    r = client.post("/v1/score/batch?publish=false", json=items)
    assert r.status_code == 200, r.text
    assert [a["txn_id"] for a in r.json()] == [i["txn_id"] for i in items]
    assert [a["features"]["amount"] for a in r.json()] == [10 + i for i in range(8)]
    single = client.post("/v1/score?publish=false", json=items[3]).json()
    assert single["features"] == r.json()[3]["features"] and single["score"] == r.json()[3]["score"]
    assert client.post("/v1/score/batch", json=[]).json() == []
    r = client.post("/v1/score/batch", json=[*items, items[0]])
    assert r.status_code == 413 and r.json()["field"] == "body"
    bad = [*items[:2], {**items[2], "amount": -1}]
    r = client.post("/v1/score/batch", json=bad)
    assert r.status_code == 422 and r.json()["field"] == "[2].amount"
    r = client.post("/v1/score/batch", json=items[0])
    assert r.status_code == 422 and r.json()["field"] == "body"


@pytest.mark.integration
def test_model_switch_under_load_fails_no_request(stack):
    client: httpx.Client = stack["client"]
    statuses: list[int] = []
    versions: set[str] = set()
    stop = threading.Event()

    def hammer():
        with httpx.Client(base_url=stack["server"].url, timeout=10) as c:
            while not stop.is_set():
                r = c.post("/v1/score?publish=false", json=body(PANS[0], amount=25))
                statuses.append(r.status_code)
                if r.status_code == 200:
                    versions.add(r.json()["model_version"])

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        wait_until(lambda: len(statuses) >= 20, what="requests before the switch")
        save_model(stack["models"], "v2", toy_booster(2, rounds=30), threshold=0.7,
                   calibration={"method": "platt", "params": {"a": 0.5, "b": -1.0}})
        wait_until(lambda: "v2" in versions, timeout=15, what="answers from the new model")
        # A broken model made current is refused; the old one keeps serving.
        broken = stack["models"] / "v3"
        broken.mkdir()
        (broken / "metadata.json").write_text("{not json")
        (broken / "model.ubj").write_bytes(b"")
        (stack["models"] / "CURRENT").write_text("v3")
        wait_until(lambda: client.get("/readyz").json()["model"]["problem"], timeout=15, what="refusal")
        n = len(statuses)
        wait_until(lambda: len(statuses) >= n + 20, what="requests after the refusal")
    finally:
        stop.set()
        thread.join()
    assert set(statuses) == {200}, sorted(set(statuses))
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["model"]["version"] == "v2"
    r = client.post("/v1/score?publish=false", json=body(PANS[0])).json()
    assert r["model_version"] == "v2" and r["threshold"] == 0.7
    # v2 is calibrated (Platt): the answer is the calibrated probability of the booster's raw one.
    import xgboost as xgb

    from model.calibration import Calibration

    booster = xgb.Booster()
    booster.load_model(str(stack["models"] / "v2" / "model.ubj"))
    row = np.array([[np.nan if r["features"][f] is None else r["features"][f] for f in FEATURES]], dtype=np.float32)
    expected = Calibration("platt", {"a": 0.5, "b": -1.0}).apply(booster.inplace_predict(row))[0]
    assert r["score"] == pytest.approx(float(expected), abs=1e-7)
    metrics = client.get("/metrics").text
    assert 'velocity_api_model_info{version="v2"} 1.0' in metrics
    assert 'velocity_api_model_reloads_total{outcome="refused"}' in metrics
    save_model(stack["models"], "v1", toy_booster(1))  # back to v1 for whatever runs next


@pytest.mark.integration
def test_health_metrics_openapi_and_no_pan_in_logs(stack):
    client: httpx.Client = stack["client"]
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["redis"]["ok"] and ready["kafka"]["state"] == "connected"
    metrics = client.get("/metrics").text
    for name in ("velocity_api_requests_total", "velocity_api_request_seconds_bucket", "velocity_api_errors_total",
                 "velocity_api_model_info", "velocity_api_stage_seconds_bucket"):
        assert name in metrics
    schema = client.get("/openapi.json").json()
    assert {"/v1/score", "/v1/score/batch", "/v1/features/{card}", "/v1/features", "/healthz", "/readyz",
            "/metrics"} <= set(schema["paths"])
    assert "cc_num" in json.dumps(schema["paths"]["/v1/score"]["post"]["requestBody"])
    assert client.get("/docs").status_code == 200
    # A PAN a client wrongly puts in a URL or a query is masked in the access log like everywhere else.
    client.get(f"/v1/features/{PANS[6]}")
    client.post(f"/v1/score?publish=false&note={PANS[7]}", json=body(PANS[7]))
    log = wait_until(lambda: "/v1/features/" in stack["server"].log.read_text() and stack["server"].log.read_text(),
                     what="the access log line")
    assert "POST /v1/score" in log
    leaked = [p for p in PANS if p in log]
    assert not leaked, "a card number reached the server log"
    assert "*" * 12 + PANS[6][-4:] in log


@pytest.mark.integration
def test_redis_down_is_503_in_time_then_recovers_and_kafka_down_still_answers(services, tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    redis_port = free_port()

    def start_redis():
        proc = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_until(lambda: _port_open(redis_port), timeout=10, what="redis-server")
        return proc

    redis_proc = start_redis()
    models = tmp_path / "models"  # empty: no model trained yet
    server = Server(env={"VELOCITY_REDIS_PORT": str(redis_port), "VELOCITY_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
                         "VELOCITY_SERVE_REDIS_TIMEOUT_S": "0.5", "VELOCITY_DATA_DIR": str(tmp_path),
                         "VELOCITY_REDIS_KEY_PREFIX": f"test:serve:{uuid.uuid4().hex[:8]}"},
                    log=tmp_path / "server.log").start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            # No model yet: not ready, scores refused with a clear 503; a model made current is picked up.
            r = client.post("/v1/score", json=body(PANS[0]))
            assert r.status_code == 503 and r.json()["error"] == "model_unavailable" and "velocity train" in r.text
            assert client.get("/readyz").status_code == 503
            save_model(models, "v1", toy_booster(1))
            wait_until(lambda: client.get("/readyz").json()["model"]["loaded"], timeout=15, what="the new model")
            ready = wait_until(lambda: (j := client.get("/readyz").json())["kafka"]["state"] == "unavailable" and j,
                               timeout=30, what="Kafka reported unavailable")
            assert ready["ready"] is True and ready["kafka"]["required"] is False
            r = client.post("/v1/score", json=body(PANS[0]))
            assert r.status_code == 200 and r.json()["published"] is False
            assert "velocity_api_publish_failures_total" in client.get("/metrics").text
            assert client.get("/readyz").json()["kafka"]["publish_failures"] >= 1

            # A hung Redis (stopped, connections open): the budget bounds the answer.
            redis_proc.send_signal(signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                r = client.post("/v1/score", json=body(PANS[0]))
                assert r.status_code == 503 and r.json()["error"] == "redis_unavailable", r.text
                assert 0.4 < time.monotonic() - t0 < 0.5 + 0.5
            finally:
                redis_proc.send_signal(signal.SIGCONT)
            wait_until(lambda: client.post("/v1/score", json=body(PANS[0])).status_code == 200, timeout=10,
                       what="answers after Redis resumes")
            # Redis gone (connections refused).
            redis_proc.kill()
            redis_proc.wait()
            for _ in range(3):
                t0 = time.monotonic()
                r = client.post("/v1/score", json=body(PANS[0]))
                assert r.status_code == 503 and r.json()["error"] == "redis_unavailable", r.text
                assert time.monotonic() - t0 < 0.5 + 0.5
            assert client.get("/readyz").status_code == 503
            assert client.get(f"/v1/features/{KEYER(PANS[0])}").status_code == 503

            redis_proc = start_redis()
            wait_until(lambda: client.post("/v1/score", json=body(PANS[0])).status_code == 200, timeout=10,
                       what="recovery after Redis is back")
            assert client.get("/readyz").status_code == 200
            assert 'velocity_api_errors_total{kind="redis_unavailable"}' in client.get("/metrics").text
    finally:
        server.stop()
        redis_proc.kill()
        redis_proc.wait()


@pytest.mark.integration
def test_fast_path_answers_exactly_as_the_fastapi_route(stack):
    """POST /v1/score without a query (or with publish=true|false) is answered in front of FastAPI
    (serving/fastpath.py); any other query string reaches the FastAPI route. Both give the same answers."""
    client: httpx.Client = stack["client"]
    for what, payload, headers, _, _ in _bad_cases(int(time.time() * 1000)):
        content = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        fast = client.post("/v1/score?publish=false", content=content, headers=headers)
        slow = client.post("/v1/score?publish=no", content=content, headers=headers)  # FastAPI's bool parsing
        assert (fast.status_code, fast.json()) == (slow.status_code, slow.json()), what
        assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json", what
    t = int(time.time() * 1000) - 5_000
    sent = body(PANS[5], f"same-{uuid.uuid4().hex[:6]}", amount=77.7, ts=t)
    fast = client.post("/v1/score?publish=false", json=sent).json()
    slow = client.post("/v1/score?publish=off", json=sent).json()
    for a in (fast, slow):
        a.pop("feature_age_ms")  # measured from now
    assert fast == slow and fast["published"] is False


@pytest.mark.integration
def test_publisher_hands_over_or_waits_holds_while_degraded_and_counts_every_failure(services, kafka_admin):
    """Handed over (the API's default): PUBLISHED at once while deliveries succeed. A message the broker refuses
    for good is DROPPED and counted, not held (it would block the queue). While the producer is degraded, messages
    are QUEUED (held) and republished in order by the background task. A dead broker: QUEUED, held."""
    import asyncio

    from kafka.admin import NewTopic

    from serving.publisher import DROPPED, PUBLISHED, QUEUED, Publisher
    from stores.kafka_topics import topic_configs

    # The broker refuses record batches over 2,000 bytes on this topic (the client's own limit is 1 MB).
    topic = f"test.pub.{uuid.uuid4().hex[:10]}"
    kafka_admin.create_topics([NewTopic(topic, 1, 1, topic_configs={**topic_configs(), "max.message.bytes": "2000"})])
    reasons: list[str] = []

    async def scenario():
        pub = Publisher(services["bootstrap"], send_timeout_s=5, on_failure=reasons.append)
        await pub.start()
        try:
            await asyncio.wait_for(_until(lambda: pub.state == "connected"), 30)
            assert await pub.publish(topic, b"k", b"acknowledged", wait=True) == PUBLISHED
            assert await pub.publish(topic, b"k", b"handed over", wait=False) == PUBLISHED
            assert await pub.publish(topic, b"k", b"acknowledged after", wait=True) == PUBLISHED
            # Waited for: the broker refuses the record batch (over the topic's limit) and the answer says so.
            assert await pub.publish(topic, b"k", b"x" * 5_000, wait=True) == DROPPED
            # Handed over: PUBLISHED at once; the refusal comes later and is counted.
            assert await pub.publish(topic, b"k", b"y" * 5_000, wait=False) == PUBLISHED
            await asyncio.wait_for(_until(lambda: reasons.count("kafka_rejected") == 2), 30)
            assert pub.healthy, "a refused message is not an outage"
            pub.healthy = False  # as after a failed delivery: later messages are held, then republished in order
            assert await pub.publish(topic, b"k", b"held 1", wait=False) == QUEUED
            assert await pub.publish(topic, b"k", b"held 2", wait=True) == QUEUED
            await asyncio.wait_for(_until(lambda: pub.hold.depth == 0 and pub.healthy), 30)
            assert pub.republished == 2 and pub.report()["held"]["republished"] == 2
            assert await pub.publish(topic, b"k", b"acknowledged again", wait=True) == PUBLISHED
            assert await pub.publish(topic, b"k", b"handed over again", wait=False) == PUBLISHED
            assert reasons == ["kafka_rejected", "kafka_rejected", "kafka_degraded", "kafka_degraded"], reasons
            assert pub.report()["publish_failures"] == 4
        finally:
            await pub.stop()
        dead = Publisher(f"127.0.0.1:{free_port()}", send_timeout_s=0.2, retry_s=5)
        await dead.start()
        try:
            assert await dead.publish(topic, b"k", b"nobody there", wait=False) == QUEUED
            assert await dead.publish(topic, b"k", b"nobody there", wait=True) == QUEUED
            assert dead.report()["held"]["depth"] == 2
        finally:
            await dead.stop(drain_s=0)

    try:
        asyncio.run(scenario())
        values = [m.value for m in consume(services["bootstrap"], topic, lambda got: len(got) >= 7)]
    finally:
        with contextlib.suppress(Exception):
            kafka_admin.delete_topics([topic])
    assert values == [b"acknowledged", b"handed over", b"acknowledged after", b"held 1", b"held 2",
                      b"acknowledged again", b"handed over again"]


async def _until(condition, interval: float = 0.05) -> None:
    import asyncio

    while not condition():
        await asyncio.sleep(interval)


@pytest.mark.integration
def test_lean_redis_reader_gives_the_stores_replies(redis_settings, key_prefix):
    import asyncio

    from featurestore.state import EventWrite
    from serving.redis_reader import ScriptReader
    from stores.redis_online import AsyncOnlineStore, OnlineStore

    cards = [KEYER(p) for p in PANS[:3]]
    t = int(time.time() * 1000) - 60_000
    store = OnlineStore(redis_settings, prefix=key_prefix)
    store.apply_events([EventWrite(c, f"e{i}-{j}", t - j * 30_000, 100 + i * 10 + j) for i, c in enumerate(cards)
                        for j in range(i + 2)])
    store.write_snapshot(t - 3_600_000, [(cards[0], 4, 4_000), (cards[1], 2, 900)])
    store.close()
    requests = [(cards[0], "e0-1", t), (cards[1], "unseen", t + 5), (cards[2], "", t), ("f" * 32, "x", t),
                (cards[2], "e2-0|odd|id", t - 1)]

    async def compare():
        lean = ScriptReader(redis_settings, key_prefix)
        stock = AsyncOnlineStore(redis_settings, prefix=key_prefix)
        try:
            for arrival in (None, t + 1):
                assert await lean.read_replies(requests, arrival) == await stock.read_replies(requests, arrival)
                for r in requests:
                    assert await lean.read_replies([r], arrival) == await stock.read_replies([r], arrival)
            assert await lean.ping()
        finally:
            await lean.close()
            await stock.close()

    asyncio.run(compare())


@pytest.mark.integration
def test_lean_redis_reader_survives_script_flush_stall_and_restart(tmp_path):
    """NOSCRIPT after a flush, replies kept in order across timed-out requests, and a reconnect after a
    restart, on a private redis-server (the shared one is never stopped or flushed)."""
    import asyncio

    import redis

    from featurestore.config import RedisSettings
    from featurestore.state import EventWrite
    from serving.redis_reader import ScriptReader
    from serving.scorer import redis_failure
    from stores.redis_online import OnlineStore

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    port = free_port()

    def start_redis():
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_until(lambda: _port_open(port), timeout=10, what="redis-server")
        return proc

    settings = RedisSettings(port=port, socket_timeout_s=1.0)
    prefix = "t"
    cards = [KEYER(p) for p in PANS[:4]]
    t = int(time.time() * 1000)

    def seed():
        store = OnlineStore(settings, prefix=prefix)
        store.apply_events([EventWrite(c, f"s{i}-{j}", t - 1_000 * (j + 1), 100) for i, c in enumerate(cards)
                            for j in range(i + 1)])  # card i holds i + 1 events: a reply says whose it is
        store.close()

    def count(reply) -> int:
        return len(reply[1]) // 2

    proc = start_redis()
    try:
        seed()

        async def scenario():
            nonlocal proc
            reader = ScriptReader(settings, prefix)
            try:
                assert count((await reader.read_replies([(cards[2], "x", t)]))[0]) == 3
                redis.Redis(port=port).script_flush()
                assert [count(r) for r in await reader.read_replies([(c, "x", t) for c in cards])] == [1, 2, 3, 4]
                # Stalled: requests time out; once Redis resumes, each later reply still goes to its own request.
                proc.send_signal(signal.SIGSTOP)
                try:
                    for c in cards[:2]:  # the caller's own timeout
                        with pytest.raises(TimeoutError):
                            async with asyncio.timeout(0.2):
                                await reader.read_replies([(c, "x", t)])
                    for c in cards[2:]:  # the reader's (how the scorer calls it)
                        t0 = time.monotonic()
                        with pytest.raises(TimeoutError):
                            await reader.read_replies([(c, "x", t)], timeout_s=0.2)
                        assert 0.19 < time.monotonic() - t0 < 0.2 + 2 * reader.sweep_s + 0.1
                    with pytest.raises(TimeoutError):
                        await reader.read_replies([(c, "x", t) for c in cards], timeout_s=0.2)
                finally:
                    proc.send_signal(signal.SIGCONT)
                for i in (3, 0, 2, 1):
                    assert count((await reader.read_replies([(cards[i], "x", t)]))[0]) == i + 1
                # Killed: a connection error (an outage to the scorer), then a reconnect when it is back.
                proc.kill()
                proc.wait()
                with pytest.raises(Exception) as err:
                    async with asyncio.timeout(2):
                        await reader.read_replies([(cards[0], "x", t)])
                assert redis_failure(err.value), err.value
                proc = start_redis()
                seed()  # a fresh server: empty, and no script cached
                assert count((await reader.read_replies([(cards[1], "x", t)]))[0]) == 2
            finally:
                await reader.close()

        asyncio.run(scenario())
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.integration
def test_lean_redis_reader_authenticates_and_selects_its_database(tmp_path):
    """AUTH (password, or ACL user and password) and SELECT on connect, as redis-py does; a refused AUTH is a
    connection failure (an outage to the scorer, 503), never a wrong answer."""
    import asyncio

    import redis

    from featurestore.config import RedisSettings
    from featurestore.state import EventWrite
    from serving.redis_reader import ScriptReader
    from serving.scorer import redis_failure
    from stores.redis_online import OnlineStore

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", str(tmp_path), "--requirepass", "s3cret"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _port_open(port), timeout=10, what="redis-server")
        admin = redis.Redis(port=port, password="s3cret")
        admin.acl_setuser("reader", enabled=True, passwords=["+r3ader"], keys=["*"], commands=["+@all"])
        admin.close()
        card, t = KEYER(PANS[0]), int(time.time() * 1000)
        store = OnlineStore(RedisSettings(port=port, password="s3cret", db=3), prefix="p")
        store.apply_events([EventWrite(card, "a", t - 1_000, 100), EventWrite(card, "b", t - 500, 200)])
        store.close()

        async def read(settings):
            reader = ScriptReader(settings, "p")
            try:
                return await reader.read_replies([(card, "x", t)], timeout_s=2)
            finally:
                await reader.close()

        for settings in (RedisSettings(port=port, password="s3cret", db=3),
                         RedisSettings(port=port, username="reader", password="r3ader", db=3)):
            (reply,) = asyncio.run(read(settings))
            assert len(reply[1]) == 4  # both events, from database 3
        (reply,) = asyncio.run(read(RedisSettings(port=port, password="s3cret")))
        assert reply[1] == []  # database 0 holds nothing
        for wrong in (RedisSettings(port=port, password="nope"), RedisSettings(port=port)):
            with pytest.raises(Exception) as err:
                asyncio.run(read(wrong))
            assert redis_failure(err.value), err.value
    finally:
        proc.kill()
        proc.wait()


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


@pytest.mark.e2e
def test_velocity_serve_help():
    out = subprocess.run([sys.executable, "-m", "velocity_cli", "serve", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0
    for flag in ("--host", "--port", "--workers", "--access-log"):
        assert flag in out.stdout
