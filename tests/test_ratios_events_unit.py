import logging
import math

import numpy as np
import orjson
import pytest

from featurestore.definitions import ALL_FEATURES, MODEL_FEATURES, RATIO_FEATURES
from featurestore.entity import RedactPANFilter, entity_key, mask_pan, redact_pans
from featurestore.events import InvalidEvent, parse_transaction
from featurestore.ratios import compute_ratios, safe_ratio

pytestmark = pytest.mark.unit


def test_safe_ratio_nan_for_missing_zero_and_infinite():
    assert safe_ratio(3.0, 2.0) == 1.5
    for den in (0.0, math.nan, math.inf, None):
        assert math.isnan(safe_ratio(1.0, math.nan if den is None else den))
    arr = safe_ratio(np.array([1.0, 2.0, 3.0]), np.array([2.0, 0.0, np.nan]))
    assert arr[0] == 0.5 and np.isnan(arr[1:]).all()


def test_scalar_and_vector_ratio_bitwise_equal():
    rng = np.random.default_rng(1)
    num, den = rng.random(1000) * 100, rng.random(1000) * 100
    vec = safe_ratio(num, den)
    assert all(vec[i] == safe_ratio(float(num[i]), float(den[i])) for i in range(1000))


def test_compute_ratios_names_match_definitions():
    out = compute_ratios({"amount": 50.0, "avg_amt_last_10m": 20.0, "avg_amt_last_1w": 10.0,
                          "num_trans_last_10m": 3, "num_trans_last_1w": 0})
    assert set(out) == {r.name for r in RATIO_FEATURES}
    assert out["amt_ratio1"] == 2.0 and out["amt_ratio2"] == 5.0 and math.isnan(out["count_ratio"])
    assert set(MODEL_FEATURES) <= set(ALL_FEATURES)


def test_entity_key_and_masking():
    pan = "4111111111111111"
    k = entity_key(pan, "s")
    assert len(k) == 32 and pan not in k and k == entity_key(pan, "s") != entity_key(pan, "t")
    assert mask_pan(pan) == "************1111"
    assert redact_pans(f"card {pan} failed, id 1234") == "card ************1111 failed, id 1234"


def test_log_filter_redacts_pans(caplog):
    logger = logging.getLogger("velocity.test.redact")
    caplog.handler.addFilter(RedactPANFilter())
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("bad message for %s", "5500005555555559")
    assert "5500005555555559" not in caplog.text and "5559" in caplog.text


GOOD = {"txn_id": "t1", "cc_num": "4111111111111111", "amount": 12.5, "ts": 1_577_836_800_000,
        "merchant": "m", "category": "grocery_pos"}


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"not json", "not_json"),
        (b"\xff\xfe", "not_json"),
        (b"[1,2]", "not_object"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "ts"}), "missing_field"),
        (orjson.dumps({**GOOD, "amount": -1}), "bad_amount"),
        (orjson.dumps({**GOOD, "amount": 0}), "bad_amount"),
        (b'{"txn_id":"t","cc_num":"4111111111111111","amount":1e999,"ts":1577836800000,"merchant":"m","category":"c"}', "bad_amount"),
        (orjson.dumps({**GOOD, "amount": "12"}), "bad_amount"),
        (orjson.dumps({**GOOD, "amount": 1.234}), "bad_amount"),
        (orjson.dumps({**GOOD, "ts": 1_577_836_800}), "bad_ts"),
        (orjson.dumps({**GOOD, "ts": "2020-01-01"}), "bad_ts"),
        (orjson.dumps({**GOOD, "cc_num": "4111-1111"}), "bad_field"),
        (orjson.dumps({**GOOD, "fraud_label": 2}), "bad_field"),
    ],
)
def test_invalid_events_have_reasons(raw, reason):
    with pytest.raises(InvalidEvent) as info:
        parse_transaction(raw)
    assert info.value.reason == reason


def test_valid_event_roundtrip_ignores_extra_fields():
    txn = parse_transaction(orjson.dumps({**GOOD, "extra": [1], "fraud_label": 1}))
    assert txn.amount_cents == 1250 and txn.fraud_label == 1
    assert parse_transaction(txn.to_json()) == txn
