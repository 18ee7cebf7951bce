"""POST /v1/score as a plain ASGI handler, in front of FastAPI: the same code, without the framework per request.

FastAPI's per-request machinery (its telemetry check, three middlewares, routing over every route, dependency
solving for one `publish` query flag, response classes) costs ~0.3-0.4 ms of CPU per request on the development
machine: more than the feature read and the prediction together (a GET /healthz costs 0.63 ms of server CPU where
uvicorn with a bare ASGI app costs 0.22 ms). `ScoringAPI` (a FastAPI) hands `POST /v1/score` with no query string
or a plain `publish=true|false|1|0` to `ScoreFastPath` before any of that, and it runs the very functions the
FastAPI route runs (`handle(body, publish) -> answer bytes`, errors as `ApiError`), so answers, error bodies and
metrics are the same. Everything else, including any other query string (e.g. `publish=maybe`, which FastAPI
refuses naming the field), goes through FastAPI, which also keeps documenting the route in /openapi.json.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI

from serving.metrics import lean

log = logging.getLogger(__name__)

PATH = "/v1/score"
#: The query strings answered here, and the publish flag each means (pydantic's reading of the same values).
QUERIES = {b"": True, b"publish=true": True, b"publish=false": False, b"publish=1": True, b"publish=0": False}
_JSON = [(b"content-type", b"application/json")]


class ScoringAPI(FastAPI):
    """FastAPI, with `fast_path.takes(scope)` requests answered by `fast_path` before FastAPI sees them, and every
    HTTP request first checked by `auth` (serving/auth.py) when a token is configured: the fast path included."""

    fast_path: ScoreFastPath | None = None
    auth = None  # a serving.auth.BearerAuth, or None: no auth

    async def __call__(self, scope, receive, send) -> None:
        auth = self.auth
        if auth is not None and scope["type"] == "http" and not auth.allows(scope):
            return await auth.deny(scope, send)
        fast = self.fast_path
        if fast is not None and fast.takes(scope):
            return await fast.answer(scope, receive, send)
        return await super().__call__(scope, receive, send)


class ScoreFastPath:
    """`POST /v1/score` (plain query strings only) answered by `handle`, as the FastAPI route would."""

    def __init__(self, *, handle: Callable[[bytes, bool], Awaitable[bytes]], read_limit: int, metrics,
                 api_error: type[Exception], error_body: Callable[[Exception], tuple[int, bytes]],
                 internal_body: bytes) -> None:
        self.handle = handle
        self.limit = read_limit
        self.metrics = metrics
        self.api_error = api_error
        self.error_body = error_body
        self.internal_body = internal_body
        self._requests = {}  # status -> bound counter child
        self._latency = metrics.score_latency

    @staticmethod
    def takes(scope) -> bool:
        return (scope["type"] == "http" and scope["path"] == PATH and scope["method"] == "POST"
                and scope["query_string"] in QUERIES)

    async def answer(self, scope, receive, send) -> None:
        publish = QUERIES[scope["query_string"]]
        start = time.perf_counter()
        try:
            body = await self._body(scope, receive)
            if body is None:  # the client went away before sending its body: nobody to answer
                return
            status, payload = 200, await self.handle(body, publish)
        except self.api_error as exc:
            status, payload = self.error_body(exc)
        except Exception:
            self.metrics.errors.labels("internal").inc()
            log.exception("internal error on %s", PATH)
            status, payload = 500, self.internal_body
        await send({"type": "http.response.start", "status": status,
                    "headers": [*_JSON, (b"content-length", b"%d" % len(payload))]})
        await send({"type": "http.response.body", "body": payload})
        counter = self._requests.get(status)
        if counter is None:
            counter = self._requests[status] = lean(self.metrics.requests.labels(PATH, str(status)))
        counter.inc()
        self._latency.observe(time.perf_counter() - start)

    async def _body(self, scope, receive) -> bytes | None:
        """The request body, after the same content-type and size checks as the FastAPI route's."""
        ctype = length = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                if ctype is None:
                    ctype = value
            elif name == b"content-length" and length is None:
                length = value
        err = self.api_error
        if ctype is None or ctype.split(b";", 1)[0].strip().lower() != b"application/json":
            raise err(422, "invalid_request", "the body must be JSON sent with Content-Type: application/json",
                      "content-type", "bad_content_type")
        limit = self.limit
        if length is not None and length.isdigit() and int(length) > limit:
            declared = length.decode("latin-1")
            raise err(413, "too_large", f"the body is {declared} bytes; the limit is {limit}", "body", "too_large")
        message = await receive()
        if message["type"] != "http.request":
            return None
        body = message.get("body", b"")
        if not message.get("more_body", False):
            if len(body) > limit:
                raise err(413, "too_large", f"the body exceeds the limit of {limit} bytes", "body", "too_large")
            return body
        chunks, size = [body], len(body)
        while True:
            if size > limit:
                raise err(413, "too_large", f"the body exceeds the limit of {limit} bytes", "body", "too_large")
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                if size > limit:
                    raise err(413, "too_large", f"the body exceeds the limit of {limit} bytes", "body",
                              "too_large")
                return b"".join(chunks)
