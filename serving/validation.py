"""A payment client's request body -> a validated, tokenized Transaction, or the field and reason it is wrong.

The rules are the event contract's (`featurestore.events.validate_transaction`, shared with the stream worker);
the API adds what only the edge can check: the card number comes as `cc_num` and must pass the Luhn check, `ts`
defaults to now (and an integral JSON number written as 1.7e12 or 1700000000000.0 is that integer), `fraud_label`
is ignored, and so is any `card`/`pan_last4` a client sends (the API tokenizes).
"""

from __future__ import annotations

import json

import orjson

from featurestore.definitions import DEFAULT_MAX_FUTURE_MS
from featurestore.entity import luhn_valid
from featurestore.events import InvalidEvent, Keyer, Transaction, validate_transaction

#: The fields of a scoring request (SPEC section 6); anything else in the body is ignored.
API_FIELDS = ("txn_id", "cc_num", "amount", "ts", "merchant", "category")
_FIELD_OF_REASON = {"bad_amount": "amount", "bad_ts": "ts", "future": "ts", "not_object": "body"}


class BadInput(ValueError):
    """A client error: which field, the machine-readable reason, and a sentence for people (never the PAN)."""

    def __init__(self, field: str, reason: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.reason = reason
        self.detail = detail

    def at(self, index: int) -> BadInput:
        """The same error for item `index` of a batch."""
        return BadInput(f"[{index}].{self.field}" if self.field != "body" else f"[{index}]", self.reason, self.detail)


def field_of(exc: InvalidEvent) -> str:
    """The request field an InvalidEvent is about (its reason, or the field its detail starts with)."""
    if exc.reason in _FIELD_OF_REASON:
        return _FIELD_OF_REASON[exc.reason]
    words = exc.detail.removeprefix("missing ").replace(",", " ").split()
    first = words[0] if words else ""
    return "cc_num" if first in ("card", "pan_last4") else first if first in API_FIELDS else "body"


def transaction_from_body(obj: object, keyer: Keyer, now_ms: int,
                          max_future_ms: int = DEFAULT_MAX_FUTURE_MS) -> Transaction:
    """Validate one decoded request body and tokenize its card number (raises BadInput)."""
    if type(obj) is not dict:
        raise BadInput("body", "not_object", f"expected a JSON object (a transaction), got {_json_type(obj)}")
    clean = {k: obj[k] for k in API_FIELDS if k in obj}
    ts = clean.get("ts")
    if ts is None:
        clean["ts"] = now_ms
    elif type(ts) is float and ts.is_integer():  # 1700000000000.0 is the JSON number 1700000000000 (JSON Schema
        clean["ts"] = int(ts)                    # agrees); the stream's contract then sees an integer
    cc = clean.get("cc_num")
    if cc is None:
        raise BadInput("cc_num", "missing_field", "missing cc_num (the card number, digits only)")
    if type(cc) is str and 12 <= len(cc) <= 19 and cc.isdigit() and cc.isascii() and not luhn_valid(cc):
        raise BadInput("cc_num", "bad_field", "cc_num is not a valid card number (its check digit fails the Luhn "
                                              "check)")
    try:
        return validate_transaction(clean, keyer, now_ms, max_future_ms)
    except InvalidEvent as exc:
        raise BadInput(field_of(exc), exc.reason, exc.detail) from None


def decode_json(body: bytes) -> object:
    """Parse a request body; BadInput("body", "not_json") when it is not JSON.

    orjson refuses NaN/Infinity; the standard parser reads them, so `{"amount": NaN}` is reported as the bad
    amount it is (the caller validates what this returns) rather than as broken JSON.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        problem = BadInput("body", "not_json", f"the body is not valid UTF-8 JSON ({exc.msg})")
        try:
            return _Lenient(json.loads(body.decode("utf-8")))
        except (ValueError, TypeError, RecursionError):
            raise problem from None


class _Lenient:
    """A body only the lenient parser could read: validation names its bad field, else it is broken JSON."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value


def transactions_from_json(body: bytes, keyer: Keyer, now_ms: int, *, batch: bool, max_batch: int = 0,
                           max_future_ms: int = DEFAULT_MAX_FUTURE_MS) -> list[Transaction]:
    """The transaction(s) of a /v1/score (one object) or /v1/score/batch (a list) body; raises BadInput, or
    TooMany for a batch over `max_batch`."""
    obj = decode_json(body)
    lenient = isinstance(obj, _Lenient)
    if lenient:
        obj = obj.value
    if batch:
        if type(obj) is not list:
            raise BadInput("body", "not_list", f"expected a JSON array of transactions, got {_json_type(obj)}")
        if len(obj) > max_batch:
            raise TooMany(len(obj), max_batch)
        out = []
        for i, item in enumerate(obj):
            try:
                out.append(transaction_from_body(item, keyer, now_ms, max_future_ms))
            except BadInput as exc:
                raise exc.at(i) from None
    else:
        out = [transaction_from_body(obj, keyer, now_ms, max_future_ms)]
    if lenient:  # valid once NaN/Infinity are read as numbers, yet orjson refused it: it is not JSON
        raise BadInput("body", "not_json", "the body is not valid JSON (NaN, Infinity or an out-of-range number)")
    return out


class TooMany(ValueError):
    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"a batch holds at most {limit} transactions, got {count}")
        self.count = count
        self.limit = limit


def _json_type(obj: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(obj), type(obj).__name__)
