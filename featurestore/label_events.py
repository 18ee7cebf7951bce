"""The fraud-label event (topic `labels`, SPEC section 4): `{"txn_id", "fraud_label", "labeled_at"}`, key txn_id.

A label arrives days or weeks after its transaction (a chargeback, a complaint, an analyst's verdict). One
validator serves every door a label comes in by: the stream worker (messages on `labels`), the API (`POST
/v1/labels`) and the replay (labels it derives from a history), so a label refused at one door is refused at all.

The txn_id is masked as the transaction validator masks it (PAN-like digit runs, with the same keyed tag), so a
label joins the archived transaction it is about, and no clear PAN reaches the label store.
"""

from __future__ import annotations

import orjson

from featurestore.definitions import DEFAULT_MAX_FUTURE_MS
from featurestore.entity import redact_pans
from featurestore.events import MAX_TS_MS, MAX_TXN_ID_LEN, MIN_TS_MS, InvalidEvent, Keyer

LABEL_FIELDS = ("txn_id", "fraud_label", "labeled_at")
#: Reasons a label message is refused (in `labels.dlq` headers, metrics and the API's 422 answers).
LABEL_REASONS = ("not_json", "not_object", "missing_field", "bad_field", "bad_ts", "future")


def validate_label(obj: object, keyer: Keyer, now_ms: int, max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
                   *, default_labeled_at: int | None = None) -> dict:
    """A decoded label -> `{"txn_id", "fraud_label", "labeled_at"}` (txn_id masked), or InvalidEvent whose detail
    starts with the offending field's name.

    `labeled_at` (epoch ms) must lie in 2000..2100 and at most `max_future_ms` ahead of `now_ms`, the bound the
    worker applies to transactions; an integral JSON float (1.7e12) is that integer. `default_labeled_at` fills a
    missing one (the API: now). Extra fields are ignored.
    """
    if type(obj) is not dict:
        raise InvalidEvent("not_object", "body must be a JSON object {txn_id, fraud_label, labeled_at}")
    missing = [f for f in LABEL_FIELDS if f not in obj and not (f == "labeled_at" and default_labeled_at is not None)]
    if missing:
        raise InvalidEvent("missing_field", f"{missing[0]} is missing (need {', '.join(missing)})")
    txn_id = obj["txn_id"]
    if type(txn_id) is not str or not txn_id or len(txn_id) > MAX_TXN_ID_LEN:
        raise InvalidEvent("bad_field", f"txn_id must be a non-empty string of at most {MAX_TXN_ID_LEN} chars")
    label = obj["fraud_label"]
    if type(label) is float and label in (0.0, 1.0):  # JSON's 1.0 is the number 1
        label = int(label)
    if type(label) is not int or label not in (0, 1):
        raise InvalidEvent("bad_field", "fraud_label must be 0 or 1")
    at = obj.get("labeled_at", default_labeled_at)
    if at is None and default_labeled_at is not None:
        at = default_labeled_at
    if type(at) is float and at.is_integer():
        at = int(at)
    if type(at) is not int:
        raise InvalidEvent("bad_field", "labeled_at must be an integer (epoch milliseconds, UTC)")
    if not MIN_TS_MS <= at < MAX_TS_MS:
        raise InvalidEvent("bad_ts", "labeled_at must be epoch ms between 2000 and 2100")
    if at > now_ms + max_future_ms:
        raise InvalidEvent("future", f"labeled_at is more than {max_future_ms / 3_600_000:g} h ahead of now")
    return {"txn_id": redact_pans(txn_id, keyer), "fraud_label": label, "labeled_at": at}


def parse_label(raw: bytes | None, keyer: Keyer, now_ms: int, max_future_ms: int = DEFAULT_MAX_FUTURE_MS) -> dict:
    """A raw `labels` message -> a validated label (raises InvalidEvent; `not_json` for bytes that are not JSON)."""
    if raw is None:
        raise InvalidEvent("not_json", "empty message (no value)")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidEvent("not_json", "the value is not UTF-8 JSON") from None
    return validate_label(obj, keyer, now_ms, max_future_ms)


def label_message(label: dict) -> tuple[bytes, bytes]:
    """(key, value) of a label on topic `labels`: key = txn_id, so every version of one label shares a partition."""
    return label["txn_id"].encode(), orjson.dumps({f: label[f] for f in LABEL_FIELDS})


def field_of(exc: InvalidEvent) -> str:
    """The field an InvalidEvent from `validate_label` is about ("body" for the whole message)."""
    first = exc.detail.split(" ", 1)[0]
    return first if first in LABEL_FIELDS else "body"
