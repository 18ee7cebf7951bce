"""The transaction event (SPEC section 2): parsing and validation shared by the stream worker and the API."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import orjson

from featurestore.windows import to_cents

MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z
MAX_AMOUNT = 1_000_000_000.0
REQUIRED_FIELDS = ("txn_id", "cc_num", "amount", "ts", "merchant", "category")

#: Reasons a message is rejected, as they appear in the DLQ and in the metrics.
DLQ_REASONS = ("not_json", "not_object", "missing_field", "bad_field", "bad_amount", "bad_ts", "late")


class InvalidEvent(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Transaction:
    txn_id: str
    cc_num: str
    amount: float
    ts: int
    merchant: str
    category: str
    fraud_label: int | None = None

    @property
    def amount_cents(self) -> int:
        return to_cents(self.amount)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["fraud_label"] is None:
            del d["fraud_label"]
        return d

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


def _text(obj: dict, name: str, max_len: int = 256) -> str:
    value = obj[name]
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise InvalidEvent("bad_field", f"{name} must be a non-empty string of at most {max_len} chars")
    return value


def validate_transaction(obj: object) -> Transaction:
    """Check a decoded message against the contract; raise InvalidEvent(reason, detail) if it breaks it.

    The stream worker calls this for every message, so well-formed events take one flat path of cheap type
    checks; anything unusual falls through to `_validate_slowly`, which names the exact problem.
    """
    if type(obj) is dict:
        try:
            txn_id, cc, amount, ts = obj["txn_id"], obj["cc_num"], obj["amount"], obj["ts"]
            merchant, category = obj["merchant"], obj["category"]
        except KeyError:
            pass
        else:
            label = obj.get("fraud_label")
            if (
                type(txn_id) is str and 0 < len(txn_id) <= 128
                and type(cc) is str and 12 <= len(cc) <= 19 and cc.isdigit() and cc.isascii()
                and type(amount) in (float, int) and 0 < amount <= MAX_AMOUNT
                and abs(amount * 100 - round(amount * 100)) <= 1e-6 * max(1.0, amount)
                and type(ts) is int and MIN_TS_MS <= ts < MAX_TS_MS
                and type(merchant) is str and 0 < len(merchant) <= 256
                and type(category) is str and 0 < len(category) <= 256
                and (label is None or (type(label) is int and label in (0, 1)))
            ):
                return Transaction(txn_id, cc, float(amount), ts, merchant, category, label)
    return _validate_slowly(obj)


def _validate_slowly(obj: object) -> Transaction:
    if not isinstance(obj, dict):
        raise InvalidEvent("not_object", f"expected a JSON object, got {type(obj).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in obj]
    if missing:
        raise InvalidEvent("missing_field", "missing " + ", ".join(missing))
    txn_id = _text(obj, "txn_id", 128)
    cc_num = obj["cc_num"]
    if not isinstance(cc_num, str) or not (cc_num.isdigit() and cc_num.isascii()) or not 12 <= len(cc_num) <= 19:
        raise InvalidEvent("bad_field", "cc_num must be a string of 12-19 digits")
    amount = obj["amount"]
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise InvalidEvent("bad_amount", "amount must be a number")
    amount = float(amount)
    if not math.isfinite(amount) or amount <= 0 or amount > MAX_AMOUNT:
        raise InvalidEvent("bad_amount", f"amount must be finite, > 0 and <= {MAX_AMOUNT:.0f}")
    if abs(amount * 100 - round(amount * 100)) > 1e-6 * max(1.0, amount):
        raise InvalidEvent("bad_amount", "amount must have at most 2 decimals")
    ts = obj["ts"]
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise InvalidEvent("bad_ts", "ts must be an integer (epoch milliseconds, UTC)")
    if not MIN_TS_MS <= ts < MAX_TS_MS:
        raise InvalidEvent("bad_ts", "ts must be epoch milliseconds between 2000-01-01 and 2100-01-01")
    label = obj.get("fraud_label")
    if label is not None and (isinstance(label, bool) or label not in (0, 1)):
        raise InvalidEvent("bad_field", "fraud_label must be 0 or 1")
    return Transaction(
        txn_id, cc_num, amount, ts, _text(obj, "merchant"), _text(obj, "category"),
        None if label is None else int(label),
    )


def parse_transaction(raw: bytes | str | None) -> Transaction:
    """Decode one Kafka message value (UTF-8 JSON) into a validated Transaction."""
    if raw is None:
        raise InvalidEvent("not_json", "empty message")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson refuses NaN, Infinity and 1e999; the standard parser reads them, so such an amount is
        # reported as the bad amount it is rather than as broken JSON. Only rejected messages pay for this.
        try:
            obj = json.loads(raw)
        except (ValueError, TypeError):
            raise InvalidEvent("not_json", f"not valid UTF-8 JSON ({exc.msg})") from None
    return validate_transaction(obj)
