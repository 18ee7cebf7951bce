"""Entity keys and PAN masking: clear card numbers never leave the edge of the system."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re

ENTITY_KEY_LEN = 32
_PAN_RE = re.compile(r"(?<!\d)(\d{8,15})(\d{4})(?!\d)")


def entity_key(pan: str, secret: str) -> str:
    """HMAC-SHA256 of the PAN under `secret`, hex, truncated: stable, not reversible without the secret."""
    digest = hmac.new(secret.encode(), pan.encode(), hashlib.sha256).hexdigest()
    return digest[:ENTITY_KEY_LEN]


class EntityKeyer:
    """Caches PAN -> key for hot paths; a card reappears often, the HMAC need not be recomputed."""

    def __init__(self, secret: str, max_size: int = 200_000) -> None:
        self._secret = secret
        self._cache: dict[str, str] = {}
        self._max = max_size

    def __call__(self, pan: str) -> str:
        key = self._cache.get(pan)
        if key is None:
            if len(self._cache) >= self._max:
                self._cache.clear()
            key = self._cache[pan] = entity_key(pan, self._secret)
        return key


def mask_pan(pan: str) -> str:
    """`4111111111111111` -> `************1111`: the only form of a PAN fit for logs and screens."""
    digits = str(pan)
    return "*" * max(len(digits) - 4, 0) + digits[-4:]


def redact_pans(text: str) -> str:
    """Mask every 12–19 digit run in free text (error messages, raw payloads in logs)."""
    return _PAN_RE.sub(lambda m: "*" * len(m.group(1)) + m.group(2), text)


class RedactPANFilter(logging.Filter):
    """Logging filter that masks PAN-like digit runs in every record, whatever the caller formatted."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_pans(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def install_pan_redaction(logger: logging.Logger | None = None) -> None:
    """Attach the redaction filter to every handler of `logger` (root by default)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactPANFilter) for f in handler.filters):
            handler.addFilter(RedactPANFilter())
