"""Optional bearer-token auth for the API (issue 17 section 3), checked in front of everything, fast path included.

Off unless a token is configured: `VELOCITY_API_TOKEN` (or `VELOCITY_SERVE_API_TOKEN`), or a file named by
`VELOCITY_API_TOKEN_FILE` (a mounted secret; one token a line, so a new token can be added before the old one is
removed). With it on:

- every route needs `Authorization: Bearer <token>`, else 401 with `WWW-Authenticate: Bearer`;
- open: `/healthz` always; `/readyz` and `/metrics` too (orchestrators' probes and Prometheus scrapers rarely carry
  a token, and neither shows a card, a feature or a score) unless `VELOCITY_SERVE_AUTH_OPS=true` protects them;
- the dashboard (`/`, `/dashboard/...`) is protected like the API; a browser cannot add a bearer header, so there
  it also accepts HTTP Basic with the token as the password (any user name): the browser asks for it once;
- tokens are compared in constant time (`hmac.compare_digest`), and no token, right or wrong, is ever logged.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from pathlib import Path

OPEN_ALWAYS = frozenset({"/healthz"})
OPS_PATHS = frozenset({"/readyz", "/metrics"})


class AuthConfigError(ValueError):
    """The token settings are unusable; the message says which one."""


def load_tokens(token: str | None, token_file: str | None) -> list[bytes]:
    """The accepted tokens (empty: auth off). A token file holds one token a line; blank lines are ignored."""
    tokens = [token.strip()] if token and token.strip() else []
    if token_file:
        try:
            text = Path(token_file).read_text()
        except OSError as exc:
            raise AuthConfigError(f"cannot read VELOCITY_API_TOKEN_FILE {token_file}: {exc.strerror}") from None
        tokens += [line.strip() for line in text.splitlines() if line.strip()]
        if not tokens:
            raise AuthConfigError(f"VELOCITY_API_TOKEN_FILE {token_file} holds no token")
    for t in tokens:
        if len(t) < 16:
            raise AuthConfigError("an API token must be at least 16 characters")
    return [t.encode() for t in tokens]


class BearerAuth:
    """Decides, per ASGI scope, whether a request may pass; answers the 401 itself."""

    def __init__(self, tokens: list[bytes], *, protect_ops: bool = False, on_denied=None) -> None:
        self.tokens = tokens
        self.open = OPEN_ALWAYS if protect_ops else OPEN_ALWAYS | OPS_PATHS
        self.on_denied = on_denied or (lambda: None)

    def _valid(self, presented: bytes) -> bool:
        ok = False
        for token in self.tokens:  # every token compared, each in constant time
            ok |= hmac.compare_digest(presented, token)
        return ok

    def allows(self, scope) -> bool:
        if scope["path"] in self.open:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, cred = value.strip().partition(b" ")
                scheme = scheme.lower()
                if scheme == b"bearer":
                    return self._valid(cred.strip())
                if scheme == b"basic" and _browser_page(scope["path"]):
                    try:
                        _, _, password = base64.b64decode(cred.strip(), validate=True).partition(b":")
                    except (binascii.Error, ValueError):
                        return False
                    return self._valid(password)
                return False
        return False

    async def deny(self, scope, send) -> None:
        self.on_denied()
        challenge = b'Bearer realm="velocity"'
        if _browser_page(scope["path"]):
            challenge += b', Basic realm="velocity dashboard"'
        body = (b'{"error":"unauthorized","field":"authorization","reason":"missing_or_invalid_token",'
                b'"detail":"send Authorization: Bearer <token>"}')
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", challenge),
                                (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})


def _browser_page(path: str) -> bool:
    return path == "/" or path.startswith("/dashboard/")
