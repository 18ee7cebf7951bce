import logging
import logging.config
import math
import time

import numpy as np
import orjson
import pytest

from featurestore.definitions import ALL_FEATURES, DEFAULT_MAX_FUTURE_MS, MODEL_FEATURES, RATIO_FEATURES
from featurestore.entity import (
    DEFAULT_ENTITY_SECRET,
    EntityKeyer,
    RedactPANFilter,
    entity_key,
    install_pan_redaction,
    luhn_valid,
    mask_pan,
    redact_pans,
    redact_pans_bytes,
    warn_if_default_secret,
)
from featurestore.events import (
    DLQ_MAX_KEY_BYTES,
    DLQ_MAX_VALUE_BYTES,
    DLQ_REASONS,
    InvalidEvent,
    _validate_slowly,
    dead_letter,
    parse_transaction,
    validate_transaction,
)
from featurestore.ratios import compute_ratios, safe_ratio
from streaming.batch_prep import RawMessage, prepare_batch

pytestmark = pytest.mark.unit


def test_safe_ratio_nan_for_missing_zero_and_infinite():
    assert safe_ratio(3.0, 2.0) == 1.5
    for den in (0.0, math.nan, math.inf, None):
        assert math.isnan(safe_ratio(1.0, math.nan if den is None else den))
    arr = safe_ratio(np.array([1.0, 2.0, 3.0]), np.array([2.0, 0.0, np.nan]))
    assert arr[0] == 0.5 and np.isnan(arr[1:]).all()


def test_scalar_and_vector_ratio_bitwise_equal():
    """The scorer's scalar path and training's vector path give the same bits, specials included."""
    rng = np.random.default_rng(1)
    special = np.array([0.0, -0.0, math.nan, math.inf, -math.inf, 1e-300, 1e300, 3.0, 7.0, -2.5])
    num = np.concatenate([rng.random(1000) * 100, np.repeat(special, len(special)), rng.integers(0, 50, 100)])
    den = np.concatenate([rng.random(1000) * 100, np.tile(special, len(special)), rng.integers(0, 50, 100)])
    vec = safe_ratio(num, den)
    for i in range(len(num)):
        whole = math.isfinite(num[i]) and num[i] == math.floor(num[i])
        for n, d in ((float(num[i]), float(den[i])), (num[i], den[i]), (int(num[i]) if whole else num[i], den[i])):
            one = safe_ratio(n, d)
            assert isinstance(one, float)
            assert (math.isnan(one) and math.isnan(vec[i])) or one == vec[i], (n, d, one, vec[i])


def test_compute_ratios_names_match_definitions():
    out = compute_ratios({"amount": 50.0, "avg_amt_last_10m": 20.0, "avg_amt_last_1w": 10.0,
                          "num_trans_last_10m": 3, "num_trans_last_1w": 0})
    assert set(out) == {r.name for r in RATIO_FEATURES}
    assert out["amt_ratio1"] == 2.0 and out["amt_ratio2"] == 5.0 and math.isnan(out["count_ratio"])
    assert set(MODEL_FEATURES) <= set(ALL_FEATURES)


PAN = "4111111111111111"  # Luhn-valid
PAN2 = "5500005555555559"
KEYER = EntityKeyer("unit-secret")
NOW = 1_700_000_000_000  # the validating clock, fixed
DAY = 86_400_000


def test_entity_key_and_masking():
    k = entity_key(PAN, "s")
    assert len(k) == 32 and PAN not in k and k == entity_key(PAN, "s") != entity_key(PAN, "t")
    assert mask_pan(PAN) == "************1111"
    assert redact_pans(f"card {PAN} failed, id 1234") == "card ************1111 failed, id 1234"


def test_redaction_rule_is_13_to_19_digits_with_a_valid_luhn_digit():
    assert luhn_valid(PAN) and luhn_valid(PAN2) and not luhn_valid("4111111111111112")
    pan13, pan19 = "4222222222222", "6011000990139424009"
    assert luhn_valid(pan13) and luhn_valid(pan19)
    assert redact_pans(f"a{pan13}b") == "a*********2222b"
    assert redact_pans(f"x {pan19} y") == f"x {'*' * 15}4009 y"
    assert redact_pans("4111111111111112") == "4111111111111112"  # Luhn fails: not PAN-like
    assert redact_pans("411111111116") == "411111111116"  # 12 digits: too short
    assert redact_pans("41111111111111111111") == "41111111111111111111"  # 20 digits: not one PAN
    assert redact_pans(f"{PAN}/{PAN2}") == "************1111/************5559"
    assert redact_pans("ts 1577836800000 amount 12.50") == "ts 1577836800000 amount 12.50"  # not Luhn-valid
    assert redact_pans_bytes(b'\xff{"cc_num":"' + PAN.encode() + b'"}\xfe') == b'\xff{"cc_num":"************1111"}\xfe'
    tagged = redact_pans(f"id-{PAN}", KEYER)
    assert PAN not in tagged and tagged.startswith("id-************1111~") and tagged == redact_pans(f"id-{PAN}", KEYER)
    other = "4000000000061111"  # same last 4 as PAN, also Luhn-valid: the tag keeps the ids apart
    assert luhn_valid(other) and redact_pans(f"id-{other}", KEYER) != tagged


def test_log_filter_redacts_pans(caplog):
    logger = logging.getLogger("velocity.test.redact")
    caplog.handler.addFilter(RedactPANFilter())
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("bad message for %s", "5500005555555559")
    assert "5500005555555559" not in caplog.text and "5559" in caplog.text


def test_redaction_survives_a_logging_reconfiguration(tmp_path):
    """faust's worker replaces the root handlers with dictConfig; records are still masked, tracebacks too."""
    previous_factory = logging.getLogRecordFactory()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    out = tmp_path / "log.txt"
    try:
        install_pan_redaction()
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
                                   "handlers": {"f": {"class": "logging.FileHandler", "filename": str(out)}},
                                   "root": {"level": "INFO", "handlers": ["f"]}})
        log = logging.getLogger("velocity.test.reconfigured")
        log.warning("merchant %s", f"shop {PAN}")
        try:
            raise ValueError(f"bad card {PAN2}")
        except ValueError:
            log.exception("failed")
        for h in root.handlers:
            h.flush()
        text = out.read_text()
        assert PAN not in text and PAN2 not in text, text
        assert "shop ************1111" in text and "bad card ************5559" in text
    finally:
        logging.setLogRecordFactory(previous_factory)
        for h in root.handlers:
            h.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_default_secret_warns_loudly(caplog):
    from featurestore.config import Settings

    assert Settings.model_fields["entity_secret"].default == DEFAULT_ENTITY_SECRET
    with caplog.at_level(logging.WARNING, logger="featurestore.entity"):
        assert warn_if_default_secret(DEFAULT_ENTITY_SECRET, "stream")
        assert not warn_if_default_secret("a-real-secret", "stream")
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.WARNING
    assert "VELOCITY_ENTITY_SECRET" in caplog.text and "velocity stream" in caplog.text


GOOD = {"txn_id": "t1", "cc_num": PAN, "amount": 12.5, "ts": 1_577_836_800_000,
        "merchant": "m", "category": "grocery_pos"}
CARD = {**{k: v for k, v in GOOD.items() if k != "cc_num"}, "card": KEYER(PAN), "pan_last4": "1111"}


def parse(raw: bytes) -> object:
    return parse_transaction(raw, KEYER, NOW)


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"not json", "not_json"),
        (b"\xff\xfe", "not_json"),
        (b"\xff\xfe" + orjson.dumps(GOOD), "not_json"),
        (b"[1,2]", "not_object"),
        (b"[" * 100_000 + b"]" * 100_000, "not_json"),  # deeper than any parser's limit: refused, no crash
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "not_json"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "ts"}), "missing_field"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "cc_num"}), "missing_field"),
        (orjson.dumps({k: v for k, v in CARD.items() if k != "pan_last4"}), "missing_field"),
        (orjson.dumps({**GOOD, "amount": -1}), "bad_amount"),
        (orjson.dumps({**GOOD, "amount": 0}), "bad_amount"),
        (orjson.dumps({**GOOD, "amount": 1e-9}), "bad_amount"),  # rounds to 0 cents
        (orjson.dumps({**CARD, "amount": 1e-9}), "bad_amount"),
        (orjson.dumps({**GOOD, "amount": 0.004}), "bad_amount"),
        (orjson.dumps({**GOOD, "amount": 4e-7}), "bad_amount"),
        (b'{"txn_id":"t","cc_num":"4111111111111111","amount":1e999,"ts":1577836800000,"merchant":"m","category":"c"}',
         "bad_amount"),
        (b'{"txn_id":"t","cc_num":"4111111111111111","amount":NaN,"ts":1577836800000,"merchant":"m","category":"c"}',
         "bad_amount"),
        (b'{"txn_id":"t","cc_num":"4111111111111111","amount":' + b"9" * 400
         + b',"ts":1577836800000,"merchant":"m","category":"c"}', "bad_amount"),
        (orjson.dumps({**GOOD, "amount": "12"}), "bad_amount"),
        (orjson.dumps({**GOOD, "amount": 1.234}), "bad_amount"),
        (orjson.dumps({**GOOD, "ts": 1_577_836_800}), "bad_ts"),
        (orjson.dumps({**GOOD, "ts": "2020-01-01"}), "bad_ts"),
        (orjson.dumps({**GOOD, "ts": 4_102_444_800_000}), "bad_ts"),  # 2100
        (orjson.dumps({**GOOD, "ts": 4_070_908_800_000}), "future"),  # 2099
        (orjson.dumps({**CARD, "ts": NOW + 2 * DAY}), "future"),
        (orjson.dumps({**GOOD, "ts": NOW + DAY + 1}), "future"),
        (orjson.dumps({**GOOD, "cc_num": "4111-1111"}), "bad_field"),
        (orjson.dumps({**GOOD, "cc_num": ""}), "bad_field"),
        (orjson.dumps({**GOOD, "cc_num": 4111111111111111}), "bad_field"),
        (orjson.dumps({**GOOD, "fraud_label": 2}), "bad_field"),
        (orjson.dumps({**CARD, "card": CARD["card"].upper()}), "bad_field"),
        (orjson.dumps({**CARD, "card": CARD["card"][:31]}), "bad_field"),
        (orjson.dumps({**CARD, "card": PAN}), "bad_field"),  # a PAN where the key belongs
        (orjson.dumps({**CARD, "card": CARD["card"][:28] + "1111"[:3] + "g"}), "bad_field"),
        (orjson.dumps({**CARD, "pan_last4": "111"}), "bad_field"),
        (orjson.dumps({**CARD, "pan_last4": 1111}), "bad_field"),
        (orjson.dumps({**CARD, "merchant": ""}), "bad_field"),
        (orjson.dumps({**CARD, "merchant": {"nested": [1]}}), "bad_field"),
        (b'{"txn_id":"t","cc_num":"4111111111111111","amount":1,"ts":1577836800000,"merchant":"\\ud800",'
         b'"category":"c"}', "not_json"),  # a lone surrogate: never accepted
    ],
)
def test_invalid_events_have_reasons(raw, reason):
    assert reason in DLQ_REASONS
    with pytest.raises(InvalidEvent) as info:
        parse(raw)
    assert info.value.reason == reason


def test_valid_event_roundtrip_ignores_extra_fields():
    txn = parse(orjson.dumps({**GOOD, "extra": [1], "fraud_label": 1}))
    assert txn.amount_cents == 1250 and txn.fraud_label == 1
    assert txn.card == KEYER(PAN) and txn.pan_last4 == "1111"
    assert PAN not in repr(txn) and "cc_num" not in txn.to_dict()
    assert parse(txn.to_json()) == txn  # Velocity's form: card + pan_last4
    assert parse(orjson.dumps({**CARD, "fraud_label": 1, "extra": {"x": 1}})) == txn


def test_card_wins_over_cc_num_which_is_ignored():
    other = "4000000000000002"
    txn = parse(orjson.dumps({**CARD, "cc_num": other}))
    assert txn.card == CARD["card"] and txn.pan_last4 == "1111"
    assert other not in repr(txn)


def test_smallest_amount_and_the_future_bound_are_inclusive():
    assert parse(orjson.dumps({**GOOD, "amount": 0.01})).amount_cents == 1
    assert parse(orjson.dumps({**GOOD, "ts": NOW + DAY})).ts == NOW + DAY
    assert parse_transaction(orjson.dumps({**GOOD, "ts": NOW + 3 * DAY}), KEYER, NOW, max_future_ms=4 * DAY)
    with pytest.raises(InvalidEvent, match="future"):
        parse_transaction(orjson.dumps({**GOOD, "ts": NOW + 2 * DAY}), KEYER, NOW, max_future_ms=DAY)
    assert DEFAULT_MAX_FUTURE_MS == DAY
    # Without a clock, validation reads one: a 2099 event is refused today too.
    with pytest.raises(InvalidEvent, match="future"):
        parse_transaction(orjson.dumps({**GOOD, "ts": 4_070_908_800_000}), KEYER)
    assert parse_transaction(orjson.dumps({**GOOD, "ts": int(time.time() * 1000)}), KEYER)


@pytest.mark.parametrize("form", [GOOD, CARD])
def test_pans_in_free_text_are_masked_on_fast_and_slow_paths(form):
    obj = {**form, "txn_id": f"order-{PAN}", "merchant": f"shop {PAN2} ltd", "category": f"cat{PAN}"}
    fast = validate_transaction(obj, KEYER, NOW)
    slow = _validate_slowly(obj, KEYER, NOW, DEFAULT_MAX_FUTURE_MS)
    assert fast == slow
    stored = repr(fast) + fast.to_json().decode()
    assert PAN not in stored and PAN2 not in stored
    assert fast.merchant == "shop ************5559 ltd" and fast.category == "cat************1111"
    assert fast.txn_id.startswith("order-************1111~")
    # Masking is stable (redeliveries dedupe) and keeps ids apart that share the last 4 digits.
    other = validate_transaction({**obj, "txn_id": "order-4000000000061111"}, KEYER, NOW)
    assert validate_transaction(obj, KEYER, NOW).txn_id == fast.txn_id != other.txn_id
    # Not PAN-like: left alone.
    plain = validate_transaction({**obj, "txn_id": "order-4111111111111112", "merchant": "m 123456789012"}, KEYER, NOW)
    assert plain.txn_id == "order-4111111111111112" and plain.merchant == "m 123456789012"


def test_fast_and_slow_paths_agree_on_valid_events():
    for obj in (GOOD, CARD, {**GOOD, "amount": 7, "fraud_label": 0}, {**CARD, "cc_num": PAN2}):
        assert validate_transaction(obj, KEYER, NOW) == _validate_slowly(obj, KEYER, NOW, DEFAULT_MAX_FUTURE_MS)


def test_prepare_batch_uses_one_clock_and_holds_no_pan():
    values = [orjson.dumps({**GOOD, "txn_id": "a", "merchant": f"m {PAN}"}),
              orjson.dumps({**CARD, "txn_id": "b", "ts": NOW + 2 * DAY}),
              orjson.dumps({**CARD, "txn_id": "c", "amount": 1e-9}),
              orjson.dumps({**CARD, "txn_id": "d", "ts": NOW})]
    msgs = [RawMessage(b"k", v, 0, i, 0) for i, v in enumerate(values)]
    batch = prepare_batch(msgs, KEYER, now_ms=NOW, max_future_ms=DAY)
    assert [t.txn_id for t in batch.txns] == ["a", "d"]
    assert [(m.offset, e.reason) for m, e in batch.rejects] == [(1, "future"), (2, "bad_amount")]
    assert [w.card for w in batch.writes] == [KEYER(PAN)] * 2
    assert PAN not in repr(batch.writes) + repr(batch.txns)
    # The same event is accepted by a clock that has caught up.
    later = prepare_batch(msgs[1:2], KEYER, now_ms=NOW + DAY, max_future_ms=DAY)
    assert not later.rejects and later.txns[0].ts == NOW + 2 * DAY


def test_dead_letter_is_bounded_masked_and_says_where_it_came_from():
    big = b'{"merchant":"' + PAN.encode() + b'","pad":"' + b"x" * (1 << 20) + b'"}'
    key, value, headers = dead_letter(big, b"\x00" * 10_000, reason="not_json", detail=f"bad {PAN}",
                                      topic="transactions", partition=3, offset=77)
    h = dict(headers)
    assert len(value) == DLQ_MAX_VALUE_BYTES and len(key) == DLQ_MAX_KEY_BYTES
    assert PAN.encode() not in value and b"************1111" in value
    assert h["reason"] == b"not_json" and h["detail"] == b"bad ************1111"
    assert (h["source_topic"], h["source_partition"], h["source_offset"]) == (b"transactions", b"3", b"77")
    assert h["source"] == b"transactions/3/77"
    assert h["original_size"] == str(len(big)).encode() and h["truncated"] == b"1"
    assert h["original_key_size"] == b"10000"
    # A PAN across the cut is masked before the cut; small messages are copied whole.
    cut = b"x" * (DLQ_MAX_VALUE_BYTES - 8) + PAN.encode() + b"}"
    _, value, headers = dead_letter(cut, None, reason="not_json", detail="", topic="t", partition=0, offset=0)
    assert value.endswith(b"********") and PAN[:8].encode() not in value[-16:]
    _, value, headers = dead_letter(b"short", None, reason="bad_ts", detail="", topic="t", partition=0, offset=0)
    assert value == b"short" and dict(headers)["truncated"] == b"0" and dict(headers)["original_size"] == b"5"
    _, value, _ = dead_letter(None, None, reason="not_json", detail="empty message", topic="t", partition=0,
                              offset=0)
    assert value == b""
