"""The transaction event (SPEC section 2): parsing and validation shared by the stream worker and the API.

The clear PAN stops here. A message carries either `card` (the entity key, 32 lowercase hex characters, which
also guarantees no PAN hides in it) with `pan_last4`, as Velocity's own producers write it, or an outside
producer's `cc_num` (12-19 digits), which validation tokenizes with the keyer it is given (pan_last4 = its last 4
digits). A message with both uses `card` and `pan_last4` and ignores `cc_num` (extra fields are ignored; it is
never stored). A validated Transaction holds no clear PAN: PAN-like digit runs in its free-text fields (txn_id,
merchant, category) are masked (`featurestore.entity.redact_pans`), so Redis, the archive and logs get masked text.
A masked txn_id keeps a keyed tag after the mask, so distinct ids stay distinct.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from featurestore.definitions import DEFAULT_MAX_FUTURE_MS
from featurestore.entity import ENTITY_KEY_LEN, has_digit_run, key_version, redact_pans, redact_pans_bytes
from featurestore.windows import to_cents

MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z
MAX_AMOUNT = 1_000_000_000.0
MAX_TXN_ID_LEN = 128
MAX_TEXT_LEN = 256
#: Fields every message needs, besides the card: `card` + `pan_last4`, or `cc_num`.
REQUIRED_FIELDS = ("txn_id", "amount", "ts", "merchant", "category")

#: Reasons a message is rejected, as they appear in the DLQ and in the metrics.
DLQ_REASONS = ("not_json", "not_object", "missing_field", "bad_field", "bad_amount", "bad_ts", "future", "late")

#: A dead letter's copy of the original value is cut to this size (the broker's default limit is ~1 MB).
DLQ_MAX_VALUE_BYTES = 64 * 1024
#: ... and of its key (a key is an entity key, 32 bytes, when it comes from Velocity).
DLQ_MAX_KEY_BYTES = 256
DLQ_MAX_DETAIL_BYTES = 512

_HEX = "0123456789abcdef"

Keyer = Callable[[str], str]


class InvalidEvent(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~2 us per event on this path
class Transaction:
    """A validated event. Treat as read-only; it holds no clear PAN (entity key, last 4 digits, masked text)."""

    txn_id: str
    card: str  # entity key
    pan_last4: str
    amount: float
    ts: int
    merchant: str
    category: str
    fraud_label: int | None = None

    @property
    def amount_cents(self) -> int:
        return to_cents(self.amount)

    def to_dict(self) -> dict:
        """The message as Velocity's producers write it (SPEC section 2): `card` and `pan_last4`, no PAN."""
        # Spelled out, in field order (dataclasses.asdict's deep copy cost ~20 us per scored transaction).
        d = {"txn_id": self.txn_id, "card": self.card, "pan_last4": self.pan_last4, "amount": self.amount,
             "ts": self.ts, "merchant": self.merchant, "category": self.category}
        if self.fraud_label is not None:
            d["fraud_label"] = self.fraud_label
        return d

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


def is_entity_key(value: object) -> bool:
    """Exactly 32 lowercase hex characters (an HMAC's hex prefix), or `kN.` and those for a key of version N >= 2
    (featurestore/entity.py): no PAN, nor anything else, can hide in it."""
    if type(value) is not str:
        return False
    if len(value) == ENTITY_KEY_LEN:
        return not value.strip(_HEX)
    try:
        return key_version(value) > 1
    except ValueError:
        return False


def _known_versioned(card: str, keyer: Keyer) -> bool:
    """A versioned key (`kN.<hex>`) of a version the keyer's secrets hold (any version for a plain callable)."""
    if not is_entity_key(card) or len(card) == ENTITY_KEY_LEN:
        return False
    knows = getattr(keyer, "knows", None)
    return knows is None or knows(card)


def mask_text_fields(txn_id: str, merchant: str, category: str, keyer: Keyer) -> tuple[str, str, str]:
    """PAN-like runs masked in the free-text fields; txn_id keeps a keyed tag so it stays unique."""
    return redact_pans(txn_id, keyer), redact_pans(merchant), redact_pans(category)


def _iso(ts_ms: int) -> str:
    return dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate_transaction(obj: object, keyer: Keyer, now_ms: int | None = None,
                         max_future_ms: int = DEFAULT_MAX_FUTURE_MS) -> Transaction:
    """Check a decoded message against the contract; raise InvalidEvent(reason, detail) if it breaks it.

    `keyer` maps an outside producer's `cc_num` to its entity key. `now_ms` is the validating clock (the stream
    worker reads it once per batch; None reads it now): event times more than `max_future_ms` ahead are refused
    (reason `future`). The stream worker calls this for every message, so well-formed events take one flat path
    of cheap checks; anything unusual falls through to `_validate_slowly`, which names the exact problem.
    """
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    ts_limit = now_ms + max_future_ms
    if type(obj) is dict:
        try:
            txn_id, amount, ts = obj["txn_id"], obj["amount"], obj["ts"]
            merchant, category = obj["merchant"], obj["category"]
        except KeyError:
            pass
        else:
            card = obj.get("card")
            if card is not None:
                last4 = obj.get("pan_last4")
                card_ok = (type(card) is str and (len(card) == ENTITY_KEY_LEN and not card.strip(_HEX)
                                                  or _known_versioned(card, keyer))
                           and type(last4) is str and len(last4) == 4 and last4.isdigit() and last4.isascii())
            else:
                cc = obj.get("cc_num")
                card_ok = type(cc) is str and 12 <= len(cc) <= 19 and cc.isdigit() and cc.isascii()
                if card_ok:
                    card, last4 = keyer(cc), cc[-4:]
            label = obj.get("fraud_label")
            if (
                card_ok
                and type(txn_id) is str and 0 < len(txn_id) <= MAX_TXN_ID_LEN
                and type(amount) in (float, int) and 0 < amount <= MAX_AMOUNT
                and (cents := round(amount * 100)) >= 1
                and abs(amount * 100 - cents) <= 1e-6 * max(1.0, amount)
                and type(ts) is int and MIN_TS_MS <= ts < MAX_TS_MS and ts <= ts_limit
                and type(merchant) is str and 0 < len(merchant) <= MAX_TEXT_LEN
                and type(category) is str and 0 < len(category) <= MAX_TEXT_LEN
                and (label is None or (type(label) is int and label in (0, 1)))
            ):
                if has_digit_run(txn_id) or has_digit_run(merchant) or has_digit_run(category):
                    txn_id, merchant, category = mask_text_fields(txn_id, merchant, category, keyer)
                return Transaction(txn_id, card, last4, float(amount), ts, merchant, category, label)
    return _validate_slowly(obj, keyer, now_ms, max_future_ms)


def _text(obj: dict, name: str, max_len: int = MAX_TEXT_LEN) -> str:
    value = obj[name]
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise InvalidEvent("bad_field", f"{name} must be a non-empty string of at most {max_len} chars")
    return value


def _card(obj: dict, keyer: Keyer) -> tuple[str, str]:
    card = obj.get("card")
    if card is not None:
        if not is_entity_key(card):
            raise InvalidEvent("bad_field", f"card must be the entity key: {ENTITY_KEY_LEN} lowercase hex "
                                            "characters (send an outside PAN as cc_num instead)")
        if len(card) != ENTITY_KEY_LEN and not _known_versioned(card, keyer):
            raise InvalidEvent("bad_field", f"card: entity-key version {key_version(card)} is not configured here")
        last4 = obj.get("pan_last4")
        if last4 is None:
            raise InvalidEvent("missing_field", "missing pan_last4 (required with card)")
        if not (isinstance(last4, str) and len(last4) == 4 and last4.isdigit() and last4.isascii()):
            raise InvalidEvent("bad_field", "pan_last4 must be a string of 4 digits")
        return card, last4
    cc_num = obj.get("cc_num")
    if cc_num is None:
        raise InvalidEvent("missing_field", "missing card (or an outside producer's cc_num)")
    if not isinstance(cc_num, str) or not (cc_num.isdigit() and cc_num.isascii()) or not 12 <= len(cc_num) <= 19:
        raise InvalidEvent("bad_field", "cc_num must be a string of 12-19 digits")
    return keyer(cc_num), cc_num[-4:]


def _validate_slowly(obj: object, keyer: Keyer, now_ms: int, max_future_ms: int) -> Transaction:
    if not isinstance(obj, dict):
        raise InvalidEvent("not_object", f"expected a JSON object, got {type(obj).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in obj]
    if missing:
        raise InvalidEvent("missing_field", "missing " + ", ".join(missing))
    card, last4 = _card(obj, keyer)
    txn_id = _text(obj, "txn_id", MAX_TXN_ID_LEN)
    amount = obj["amount"]
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise InvalidEvent("bad_amount", "amount must be a number")
    if not 0 < amount <= MAX_AMOUNT:  # before float(): a huge integer would overflow it
        if isinstance(amount, float) and not math.isfinite(amount):
            raise InvalidEvent("bad_amount", f"amount must be finite, > 0 and <= {MAX_AMOUNT:.0f}")
        raise InvalidEvent("bad_amount", f"amount must be > 0 and <= {MAX_AMOUNT:.0f}")
    amount = float(amount)
    cents = round(amount * 100)
    if abs(amount * 100 - cents) > 1e-6 * max(1.0, amount):
        raise InvalidEvent("bad_amount", "amount must have at most 2 decimals")
    if cents < 1:
        raise InvalidEvent("bad_amount", "amount rounds to 0 cents (the smallest amount is 0.01)")
    ts = obj["ts"]
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise InvalidEvent("bad_ts", "ts must be an integer (epoch milliseconds, UTC)")
    if not MIN_TS_MS <= ts < MAX_TS_MS:
        raise InvalidEvent("bad_ts", "ts must be epoch milliseconds between 2000-01-01 and 2100-01-01")
    if ts > now_ms + max_future_ms:
        raise InvalidEvent("future", f"event time {_iso(ts)} is more than {max_future_ms / 3_600_000:g} h ahead "
                                     f"of the worker's clock ({_iso(now_ms)})")
    label = obj.get("fraud_label")
    if label is not None and (isinstance(label, bool) or label not in (0, 1)):
        raise InvalidEvent("bad_field", "fraud_label must be 0 or 1")
    merchant, category = _text(obj, "merchant"), _text(obj, "category")
    txn_id, merchant, category = mask_text_fields(txn_id, merchant, category, keyer)
    return Transaction(txn_id, card, last4, amount, ts, merchant, category, None if label is None else int(label))


def parse_transaction(raw: bytes | str | None, keyer: Keyer, now_ms: int | None = None,
                      max_future_ms: int = DEFAULT_MAX_FUTURE_MS) -> Transaction:
    """Decode one Kafka message value (UTF-8 JSON) into a validated Transaction (see `validate_transaction`)."""
    if raw is None:
        raise InvalidEvent("not_json", "empty message")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson refuses NaN, Infinity and 1e999; the standard parser reads them, so such an amount is reported as
        # the bad amount it is rather than as broken JSON. The fallback only refines the reason: what orjson
        # refuses (also lone surrogates, nesting deeper than 1024) is never accepted. Only rejects pay for this.
        not_json = InvalidEvent("not_json", f"not valid UTF-8 JSON ({exc.msg})")
        try:
            obj = json.loads(raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else raw)
        except (ValueError, TypeError, RecursionError):
            raise not_json from None
        validate_transaction(obj, keyer, now_ms, max_future_ms)
        raise not_json from None
    return validate_transaction(obj, keyer, now_ms, max_future_ms)


_TS_FIELD = re.compile(rb'"ts"\s*:\s*(\d{13})(?![\d.eE])')


def _mask_keeping_times(data: bytes) -> bytes:
    """`redact_pans_bytes`, except for the `ts` field's value when it is an event time in the valid range.

    One 13-digit epoch-millisecond time in ten passes the Luhn check, so plain masking turned a tenth of dead
    letters into broken JSON that `velocity dlq replay` could not read back. A number in that field and range is
    a time whatever its digits; every other digit run is masked as before (masking keeps lengths, so the kept
    spans are restored in place).
    """
    keep = [m.span(1) for m in _TS_FIELD.finditer(data) if MIN_TS_MS <= int(m.group(1)) < MAX_TS_MS]
    masked = redact_pans_bytes(data)
    if not keep or masked == data:
        return masked
    out = bytearray(masked)
    for a, b in keep:
        out[a:b] = data[a:b]
    return bytes(out)


def dead_letter(value: bytes | None, key: bytes | None, *, reason: str, detail: str, topic: str, partition: int,
                offset: int) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """The (key, value, headers) of a message's dead letter: a bounded copy with PAN-like digit runs masked.

    Whatever the original's size or content, the copy fits any broker: the value is cut to DLQ_MAX_VALUE_BYTES
    and the key to DLQ_MAX_KEY_BYTES. Masking runs on a slightly longer prefix than is kept, so a PAN that
    crosses the cut is masked as a whole before the cut. Headers: reason, detail (masked), source
    topic/partition/offset, the original sizes and whether the copy was truncated.
    """
    raw = value if value is not None else b""
    size = len(raw)
    copy = _mask_keeping_times(bytes(raw[:DLQ_MAX_VALUE_BYTES + 20]))[:DLQ_MAX_VALUE_BYTES]
    key_size = len(key) if key is not None else 0
    key_copy = None
    if key is not None:
        key_copy = redact_pans_bytes(bytes(key[:DLQ_MAX_KEY_BYTES + 20]))[:DLQ_MAX_KEY_BYTES]
    topic_masked = redact_pans(topic)
    headers = [
        ("reason", reason.encode()),
        ("detail", redact_pans(detail).encode("utf-8", "replace")[:DLQ_MAX_DETAIL_BYTES]),
        ("source", f"{topic_masked}/{partition}/{offset}".encode()),
        ("source_topic", topic_masked.encode()),
        ("source_partition", str(partition).encode()),
        ("source_offset", str(offset).encode()),
        ("original_size", str(size).encode()),
        ("truncated", b"1" if size > DLQ_MAX_VALUE_BYTES else b"0"),
        ("original_key_size", str(key_size).encode()),
    ]
    return key_copy, copy, headers
