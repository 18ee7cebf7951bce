"""Entity keys and PAN masking: clear card numbers never leave the edge of the system.

A "PAN-like digit run" (SPEC sections 2 and 3) is a run of 13-19 ASCII digits, not part of a longer run, whose
last digit is a valid Luhn check digit; or such a number printed in groups, its digits separated by single spaces
or dashes (`4539 5787 6362 1486`, `4539-5787-6362-1486`), where any whole groups holding 13-19 digits with a
valid Luhn digit count. Such runs are masked (`************1248`: all but the last 4 digits replaced by `*`,
separators kept, same length) wherever free text is stored or logged: validated events, dead letters, log records.

Entity keys carry a version, so the secret can be rotated (`velocity features rotate-key`). Version 1 is today's
key, 32 lowercase hex characters (the HMAC-SHA256 of the PAN, truncated), so stores written before versions existed
stay valid unchanged; version N >= 2 is `kN.` followed by the 32 hex characters of the HMAC under secret N
(`k2.3f...`). `EntitySecrets` holds the configured secrets by version (`VELOCITY_ENTITY_SECRETS="2:new,1:old"` or
a file; `VELOCITY_ENTITY_SECRET` alone is the single version-1 secret); the highest version signs new keys. During
a rotation (two versions configured) a reader given a PAN uses the current version's key unless the card has no
state under it yet and has some under the previous version's (`EntityKeyer.previous_key` gives that key without
keeping the PAN anywhere but in the keyer's in-memory cache); once `rotate-key` has moved every card, the old
version can be dropped from the configuration. A key of a version not configured is refused (`UnknownKeyVersion`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import sys
from bisect import bisect_right
from collections.abc import Callable, Mapping
from itertools import accumulate

ENTITY_KEY_LEN = 32
#: Highest key version accepted: `kN.` keeps a short, fixed-form prefix (N in 2..999, no leading zero).
MAX_KEY_VERSION = 999
_VERSIONED_KEY = re.compile(r"k([2-9]|[1-9][0-9]{1,2})\.[0-9a-f]{32}")
_HEX_KEY = re.compile(r"[0-9a-f]{32}")
#: The entity-key secret configured by default (featurestore.config.Settings.entity_secret): public, local use only.
DEFAULT_ENTITY_SECRET = "velocity-local-dev-secret"

#: Digits, possibly grouped by single spaces or dashes, 13 or more in all: candidates, checked by `_pan_spans`.
_DIGITS = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,}(?![0-9])")
#: The cheap pre-check: no 13 digits in a row (separators allowed), nothing to mask (most text never gets further).
_RUN13 = re.compile(r"[0-9](?:[ -]?[0-9]){12}").search
#: What every such run contains, a digit and 12 digits or separators, found ~5x faster (one character-class
#: repeat instead of a group per digit): a hex id spends ~0.5 us here instead of ~2.8 us in `_RUN13`, and the
#: stream worker checks three fields of every event.
_MAYBE_RUN13 = re.compile(r"[0-9][0-9 -]{12}").search
_GROUP = re.compile(r"[0-9]+")

log = logging.getLogger(__name__)


class SecretsConfigError(RuntimeError):
    """The configured entity-key secrets are malformed; the message names the entry, never a secret."""


class UnknownKeyVersion(ValueError):
    """An entity key of a version the configuration does not hold (or not an entity key at all): one clear line."""


def key_version(key: str) -> int:
    """The version of an entity key: 1 for 32 lowercase hex characters, N for `kN.<32 hex>`; else ValueError."""
    if len(key) == ENTITY_KEY_LEN and _HEX_KEY.fullmatch(key):
        return 1
    m = _VERSIONED_KEY.fullmatch(key)
    if m is None:
        raise UnknownKeyVersion("not an entity key: 32 lowercase hex characters (version 1) or kN. followed by "
                                "32 lowercase hex characters (version N)")
    return int(m.group(1))


def _hmac_hex(pan: str, secret: str) -> str:
    return hmac.new(secret.encode(), pan.encode(), hashlib.sha256).hexdigest()[:ENTITY_KEY_LEN]


def format_key(version: int, digest: str) -> str:
    """The spelling of a key of `version` (one spelling per key: version 1 is bare hex, never `k1.`)."""
    return digest if version == 1 else f"k{version}.{digest}"


class EntitySecrets(str):
    """The configured entity-key secrets by version. As a string it is the current (highest) version's secret, so
    code that takes `Settings.entity_secret` as a plain secret signs with the current version unchanged."""

    versions: dict[int, str]
    current: int

    def __new__(cls, versions: Mapping[int, str]) -> EntitySecrets:
        if not versions:
            raise ValueError("no entity-key secret configured")
        for v, secret in versions.items():
            if not (type(v) is int and 1 <= v <= MAX_KEY_VERSION):
                raise ValueError(f"entity-key version {v!r} must be a whole number in 1..{MAX_KEY_VERSION}")
            if not secret:
                raise ValueError(f"entity-key version {v} has an empty secret")
        current = max(versions)
        obj = super().__new__(cls, versions[current])
        obj.versions = dict(sorted(versions.items(), reverse=True))
        obj.current = current
        return obj

    def __reduce__(self):  # pickled into replay's producer processes: keep the versions
        return (EntitySecrets, (self.versions,))

    def __repr__(self) -> str:  # never print a secret
        return f"EntitySecrets(versions={sorted(self.versions)}, current={self.current})"

    @classmethod
    def parse(cls, spec: str, v1: str | None = None) -> EntitySecrets:
        """`"2:new,1:old"` (or one `N:secret` per line) -> the ring; `v1` is version 1 unless `spec` names it.

        Raises ValueError naming the bad entry by position (never echoing a secret)."""
        versions: dict[int, str] = {}
        entries = [e.strip() for e in spec.replace("\n", ",").split(",")]
        for i, entry in enumerate((e for e in entries if e and not e.startswith("#")), 1):
            head, sep, secret = entry.partition(":")
            if not sep or not head.strip().isdigit():
                raise ValueError(f"entity secrets: entry {i} is not VERSION:SECRET (e.g. 2:<secret>,1:<old secret>)")
            v = int(head)
            if v in versions:
                raise ValueError(f"entity secrets: version {v} is listed twice")
            versions[v] = secret.strip()
        if v1 is not None and 1 not in versions:
            versions[1] = v1
        return cls(versions)

    @property
    def previous(self) -> int | None:
        """The version just below the current one (readable during a rotation), None when only one is set."""
        older = [v for v in self.versions if v < self.current]
        return max(older) if older else None

    def key(self, pan: str, version: int | None = None) -> str:
        """The entity key of `pan` under `version` (default: the current one)."""
        v = self.current if version is None else version
        if v not in self.versions:
            raise UnknownKeyVersion(self.unknown(v))
        return format_key(v, _hmac_hex(pan, self.versions[v]))

    def version_of(self, key: str) -> int:
        """The version of `key`, which must be configured (else UnknownKeyVersion, one line)."""
        v = key_version(key)
        if v not in self.versions:
            raise UnknownKeyVersion(self.unknown(v))
        return v

    def unknown(self, v: int) -> str:
        known = ", ".join(str(k) for k in sorted(self.versions))
        return (f"entity-key version {v} is not configured (known: {known}); set VELOCITY_ENTITY_SECRETS "
                f"(e.g. \"{self.current}:<secret>,...\") to read it")


def key_version_problem(key: str, secret: str) -> str:
    """Why `key` is not readable under the configured `secret` (a plain secret or `EntitySecrets`), one line."""
    ring = secret if isinstance(secret, EntitySecrets) else EntitySecrets({1: secret})
    try:
        ring.version_of(key)
    except UnknownKeyVersion as exc:
        return str(exc)
    return "ok"


def key_pattern(secret: str) -> str:
    """A regular expression matching exactly the keys of the configured versions (for API schemas)."""
    versions = sorted(secret.versions) if isinstance(secret, EntitySecrets) else [1]
    spellings = (["[0-9a-f]{32}"] if 1 in versions else []) + [f"k{v}[.][0-9a-f]{{32}}" for v in versions if v > 1]
    return f"^({'|'.join(spellings)})$"


def entity_key(pan: str, secret: str, version: int | None = None) -> str:
    """HMAC-SHA256 of the PAN under `secret`, hex, truncated: stable, not reversible without the secret.

    `secret` is a plain version-1 secret or an `EntitySecrets` (the current version unless `version` is given)."""
    if isinstance(secret, EntitySecrets):
        return secret.key(pan, version)
    return format_key(version or 1, _hmac_hex(pan, secret))


class EntityKeyer:
    """Caches PAN -> key for hot paths; a card reappears often, the HMAC need not be recomputed.

    During a rotation (an `EntitySecrets` with a previous version) it also remembers, per key it made, the same
    card's previous-version key (`previous_key`), so code holding only the key can still look up the old state."""

    def __init__(self, secret: str, max_size: int = 200_000) -> None:
        self._secret = secret
        self._cache: dict[str, str] = {}
        self._max = max_size
        ring = secret if isinstance(secret, EntitySecrets) else None
        self.secrets = ring
        self._prev_version = ring.previous if ring is not None else None
        self._previous: dict[str, str] = {}

    @property
    def rotating(self) -> bool:
        """True while two versions are configured: readers may have to fall back to the previous one."""
        return self._prev_version is not None

    def __call__(self, pan: str) -> str:
        key = self._cache.get(pan)
        if key is None:
            if len(self._cache) >= self._max:
                self._cache.clear()
                self._previous.clear()
            key = self._cache[pan] = entity_key(pan, self._secret)
            if self._prev_version is not None:
                self._previous[key] = self.secrets.key(pan, self._prev_version)
        return key

    def previous_key(self, key: str) -> str | None:
        """The previous version's key of the card whose current key is `key` (None: no rotation, or unknown)."""
        return self._previous.get(key)

    def knows(self, key: str) -> bool:
        """Whether `key` is an entity key of a configured version (a plain secret knows version 1 only)."""
        try:
            v = key_version(key)
        except ValueError:
            return False
        return v in self.secrets.versions if self.secrets is not None else v == 1


def luhn_valid(digits: str | bytes) -> bool:
    """True when the last digit of `digits` (ASCII digits only) is a valid Luhn check digit."""
    total = 0
    for i, ch in enumerate(reversed(digits.encode() if isinstance(digits, str) else digits)):
        d = ch - 48
        if i & 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def mask_pan(pan: str) -> str:
    """`4111111111111111` -> `************1111`: the only form of a PAN fit for logs and screens."""
    digits = str(pan)
    return "*" * max(len(digits) - 4, 0) + digits[-4:]


def has_digit_run(text: str) -> bool:
    """The cheap pre-check of `redact_pans`: does `text` hold a run of at least 13 digits?"""
    return len(text) >= 13 and _MAYBE_RUN13(text) is not None and _RUN13(text) is not None


def redact_pans(text: str, tag: Callable[[str], str] | None = None) -> str:
    """Mask every PAN-like digit run (13-19 digits with a valid Luhn digit) in free text.

    With `tag` (e.g. an EntityKeyer), a masked run is followed by `~` and the first 12 characters of tag(run):
    ids stay unique after masking (two PANs with the same last 4 digits would otherwise mask to the same id), and
    nothing about the PAN can be read from them without the secret.
    """
    if not has_digit_run(text):
        return text
    out, at = [], 0
    for m in _DIGITS.finditer(text):
        for a, b in _pan_spans(m.group(), m.start()):
            span = text[a:b]
            digits = span.replace(" ", "").replace("-", "")
            keep = len(span)  # where the last 4 digits start (separators may sit among them)
            for _ in range(4):
                keep -= 1
                while not span[keep].isdigit():
                    keep -= 1
            masked = "".join("*" if c.isdigit() else c for c in span[:keep]) + span[keep:]
            out += (text[at:a], masked if tag is None else f"{masked}~{tag(digits)[:12]}")
            at = b
    return "".join(out) + text[at:] if out else text


def _pan_spans(run: str, offset: int) -> list[tuple[int, int]]:
    """The PAN-like spans of one candidate run (digits, maybe grouped): the whole run when it is 13-19 plain
    digits with a valid Luhn digit (a longer plain run is an id, not a PAN); for a grouped one, the longest
    Luhn-valid sequences of whole groups holding 13-19 digits, left to right, not overlapping.

    A grouped run's Luhn sums come from prefix sums of its digits, so each candidate costs O(1): a dead letter of
    64 KiB of "1-1-1-..." took ~1.5 s when each candidate's digits were joined and checked afresh.
    """
    if run.isdigit():
        return [(offset, offset + len(run))] if len(run) <= 19 and luhn_valid(run) else []
    bounds = [(g.start(), g.end()) for g in _GROUP.finditer(run)]
    ends = list(accumulate(b - a for a, b in bounds))  # digit position where each group ends
    sums = _luhn_prefix_sums(run.replace(" ", "").replace("-", ""))
    spans, i = [], 0
    while i < len(bounds):
        first = ends[i - 1] if i else 0
        j = bisect_right(ends, first + 19, i) - 1  # the last group keeping the sequence within 19 digits
        while j >= i and ends[j] - first >= 13:
            end = ends[j]
            row = sums[(end - 1) & 1]  # a digit is doubled when its distance from the check digit is odd
            if (row[end] - row[first]) % 10 == 0:
                break
            j -= 1
        else:
            i += 1
            continue
        spans.append((offset + bounds[i][0], offset + bounds[j][1]))
        i = j + 1
    return spans


def _luhn_prefix_sums(digits: str) -> tuple[list[int], list[int]]:
    """Two prefix sums of Luhn terms: row p counts a digit at an even position as is and at an odd one doubled
    when p is 0, the other way round when p is 1; a sequence ending at position e is summed by row e % 2."""
    rows: tuple[list[int], list[int]] = ([0], [0])
    as_is, doubled = rows[0][0], rows[1][0]
    for k, ch in enumerate(digits):
        d = ord(ch) - 48
        twice = d * 2 - 9 if d > 4 else d * 2
        as_is, doubled = (as_is + d, doubled + twice) if not k & 1 else (as_is + twice, doubled + d)
        rows[0].append(as_is)
        rows[1].append(doubled)
    return rows


def redact_pans_bytes(data: bytes) -> bytes:
    """`redact_pans` on raw bytes (any encoding, or none): PAN-like ASCII digit runs masked, length unchanged."""
    if len(data) < 13:
        return data
    text = data.decode("latin-1")  # one character per byte: positions and lengths carry over
    masked = redact_pans(text)
    return data if masked is text else masked.encode("latin-1")


def _redact_record(record: logging.LogRecord) -> None:
    """Mask PANs in a log record's message, exception text and stack (once per record)."""
    if getattr(record, "_pans_redacted", False):
        return
    try:
        message = record.getMessage()
    except Exception:  # a malformed logging call: keep what it said, masked (logging's error report prints it)
        record.msg, record.args = redact_pans(f"{record.msg!s} {record.args!r}"), ()
    else:
        redacted = redact_pans(message)
        if redacted != message:
            record.msg, record.args = redacted, ()  # () not None: mode's formatter wraps None in a tuple
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact_pans(record.exc_text)
    if record.stack_info:
        record.stack_info = redact_pans(record.stack_info)
    record._pans_redacted = True


class RedactPANFilter(logging.Filter):
    """Logging filter that masks PAN-like digit runs in every record, whatever the caller formatted."""

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record)
        return True


def _redacting_factory(previous: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _redact_record(record)
        return record

    factory._velocity_redacts_pans = True  # type: ignore[attr-defined]
    return factory


def install_pan_redaction(logger: logging.Logger | None = None) -> None:
    """Mask PANs in every log record of this process, whoever configures the handlers afterwards.

    Two layers: the log-record factory masks each record as it is created (this survives any later logging
    set-up, such as faust's `dictConfig` that replaces the root handlers when the worker starts), and the
    redaction filter goes on every handler of `logger` (root by default). Idempotent.
    """
    current = logging.getLogRecordFactory()
    if not getattr(current, "_velocity_redacts_pans", False):
        logging.setLogRecordFactory(_redacting_factory(current))
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactPANFilter) for f in handler.filters):
            handler.addFilter(RedactPANFilter())


def install_excepthook_redaction() -> None:
    """Uncaught exceptions are printed by the interpreter, not by logging: mask PANs in that output too."""
    if getattr(sys.excepthook, "_velocity_redacts_pans", False):
        return

    def hook(exc_type, exc, tb) -> None:
        import traceback

        text = "".join(traceback.format_exception(exc_type, exc, tb))
        sys.stderr.write(redact_pans(text))

    hook._velocity_redacts_pans = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def warn_if_default_secret(secret: str, command: str) -> bool:
    """Log a loud WARNING when `secret` is the public default entity secret; True if it is."""
    if secret != DEFAULT_ENTITY_SECRET:
        return False
    bar = "!" * 78
    log.warning(
        "\n%s\n`velocity %s` is using the DEFAULT entity-key secret (%r).\nIt is public: anyone can turn a card "
        "number into its entity key and look the card up in Kafka, Redis and the archive.\nSet "
        "VELOCITY_ENTITY_SECRET to a long random value (e.g. `python -c \"import secrets; "
        "print(secrets.token_hex(32))\"`) before real card data flows; every entity key changes with it.\n%s",
        bar, command, DEFAULT_ENTITY_SECRET, bar,
    )
    return True
