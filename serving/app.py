"""The scoring HTTP API (SPEC section 6): FastAPI, answered with orjson, one event loop per worker process.

Request bodies are read and validated by hand (orjson + the event contract's validator) rather than by pydantic
models: the hot path then does one parse, and every client error names its field and reason in one format. The
pydantic models below only document the API in /openapi.json. `POST /v1/score` is answered in front of FastAPI
by the same functions (serving/fastpath.py); the FastAPI route answers its other forms and documents it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path as FsPath
from typing import Literal

import orjson
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AliasChoices, BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from featurestore.config import Settings, get_settings
from featurestore.entity import EntityKeyer, install_pan_redaction, key_pattern, key_version_problem, luhn_valid
from featurestore.events import is_entity_key
from serving.auth import BearerAuth, load_tokens
from serving.fastpath import ScoreFastPath, ScoringAPI
from serving.metrics import ApiMetrics, lean
from serving.models import ModelSource, ModelWatcher
from serving.publisher import PUBLISHED, QUEUED, Publisher
from serving.recorder import ScoreRecorder
from serving.redis_reader import ScriptReader
from serving.scorer import ModelUnavailable, RedisUnavailable, Scored, Scorer, now_ms
from serving.spill import HoldCollector, HoldQueue
from serving.validation import BadInput, TooMany, transactions_from_json
from stores.kafka_security import aiokafka_kwargs, explain_kafka_failure
from stores.redis_online import AsyncOnlineStore, _Keys
from stores.rekey_online import RotationResolver

log = logging.getLogger(__name__)


class ORJSONResponse(JSONResponse):
    """JSON via orjson (NaN and infinities become null: a missing feature is null, as SPEC section 6 says). A
    JSONResponse, so that /openapi.json documents each route's response model (for any other response class
    FastAPI documents the answer as a bare string)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content)


class ServeSettings(BaseSettings):
    """Limits and budgets of `velocity serve` (env VELOCITY_SERVE_*)."""

    model_config = SettingsConfigDict(env_prefix="VELOCITY_SERVE_")

    max_body_bytes: int = 64 * 1024
    max_batch: int = 256
    max_batch_body_bytes: int = 1024 * 1024
    #: Budget for the feature read; past it the answer is 503 (the read is cancelled).
    redis_timeout_s: float = 1.0
    #: Longest a request waits for the Kafka producer (and, with publish_wait, for the broker's acknowledgement)
    #: before answering `published: false`.
    publish_timeout_s: float = 0.5
    #: Wait for the broker's acknowledgement before answering (`published` then means acknowledged). Off: the
    #: transaction is handed to a producer whose deliveries succeed and the answer does not wait for Kafka; a
    #: delivery failing afterwards is counted (velocity_api_publish_failures{reason="kafka_delivery"}, /readyz).
    publish_wait: bool = False
    #: How long handed-over transactions gather before they reach the producer together (serving/publisher.py):
    #: one produce request per flush for every partition costs the broker less CPU per score, and no answer waits
    #: for it. With publish_wait the linger is 0: it would be added to every answer.
    kafka_linger_ms: int = 5
    kafka_retry_s: float = 5.0
    model_poll_s: float = 0.5
    #: Record every answer (with reason codes) to the scores topic, marked source: api.
    record_scores: bool = True
    #: Reason codes of the score records: XGBoost's approximate contributions (cheap) or exact TreeSHAP values
    #: (~1-3 ms a row: a core at 500 requests/s). See serving/recorder.py.
    reason_method: Literal["approx", "exact"] = "approx"
    #: Read features over the lean pipelined connection (serving/redis_reader.py) rather than redis-py; same
    #: script and replies. Off: redis-py (also used whenever TLS is configured).
    lean_redis: bool = True
    #: Answer POST /v1/score in a plain ASGI handler in front of FastAPI (serving/fastpath.py); same answers.
    fast_path: bool = True
    #: What Kafka could not take is held (serving/spill.py): this many messages in memory, then spill files in
    #: `spill_dir` (default $VELOCITY_DATA_DIR/api-spill) up to `spill_max_bytes`, fsynced at most every
    #: `spill_fsync_s` (0: before every answer). Memory is lost to a SIGKILL; 0 spills every held message.
    spill_memory_items: int = Field(10_000, ge=0)
    spill_dir: str | None = None
    spill_max_bytes: int = Field(1 << 30, ge=0)
    spill_fsync_s: float = Field(1.0, ge=0)
    #: Bearer-token auth (serving/auth.py): off unless a token or a token file is set.
    api_token: str | None = Field(None, validation_alias=AliasChoices("VELOCITY_API_TOKEN",
                                                                      "VELOCITY_SERVE_API_TOKEN"))
    api_token_file: str | None = Field(None, validation_alias=AliasChoices("VELOCITY_API_TOKEN_FILE",
                                                                           "VELOCITY_SERVE_API_TOKEN_FILE"))
    #: With auth on, also protect /readyz and /metrics (open by default for probes and scrapers).
    auth_ops: bool = False


# ---------------------------------------------------------------------------------------------- documentation


class ScoreRequest(BaseModel):
    """A transaction as a payment client sends it. Unknown fields are ignored; `fraud_label` too."""

    txn_id: str = Field(min_length=1, max_length=128, description="Unique id; scoring it twice never counts it twice")
    cc_num: str = Field(pattern=r"^[0-9]{12,19}$", description="The card number (digits, valid Luhn check digit). "
                        "Tokenized at once; never stored, logged or published")
    amount: float = Field(ge=0.01, le=1_000_000_000, multiple_of=0.01, description="Amount, at most 2 decimals")
    ts: int | None = Field(None, ge=946_684_800_000, lt=4_102_444_800_000,
                           description="Event time, epoch ms UTC (default: now); at most 1 day ahead")
    merchant: str = Field(min_length=1, max_length=256)
    category: str = Field(min_length=1, max_length=256)


class ScoreAnswer(BaseModel):
    txn_id: str
    card: str = Field(description="The card's entity key (keyed hash of the card number)")
    score: float = Field(ge=0, le=1)
    decision: Literal["FRAUD", "NOT_FRAUD"]
    threshold: float
    model_version: str
    features: dict[str, float | None] = Field(description="Every feature and ratio by name; null where missing")
    feature_age_ms: dict[str, int | None] = Field(
        description="Per feature group. A stream group (card_agg_10m, ...): now minus the event time of the newest "
                    "stored transaction its window counts (0 when only this one counts); a nightly group "
                    "(card_agg_1w, merchant_agg_7d, ...): now minus the cut-off of the snapshot serving it (null: "
                    "no visible snapshot holds it yet)")
    published: bool = Field(description="Handed to a Kafka producer whose deliveries succeed (with "
                            "VELOCITY_SERVE_PUBLISH_WAIT=true: acknowledged by the broker); false: not published "
                            "yet (see `queued`), or publish=false. A handed-over transaction whose delivery fails "
                            "later is held and republished, never lost")
    queued: bool = Field(description="Not published yet, but held by the API (in memory, or in a spill file "
                         "written before this answer) and published, in order, as soon as Kafka is back. "
                         "published=false with queued=false: not published and not held (publish=false, the "
                         "broker refused it for good, or the hold was full)")


class CardFeatures(BaseModel):
    card: str
    as_of_ms: int
    features: dict[str, float | None]
    snapshot_cutoff_ms: int | None
    complete: bool
    feature_age_ms: dict[str, int | None]


class CardNumber(BaseModel):
    cc_num: str = Field(pattern=r"^[0-9]{12,19}$")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool = Field(description="A model is loaded and Redis answers")
    model: dict = Field(description="loaded, version, problem (why none is loaded, or why a switch was refused)")
    redis: dict = Field(description="ok, error")
    kafka: dict = Field(description="The producer's state, bootstrap, publish failures, last error, `held` (what "
                                    "waits to be republished: depth, in_memory, in_files, spilled, adopted, dropped, "
                                    "republished, rejected), score records; "
                                    "not required for readiness")


class ApiErrorBody(BaseModel):
    error: str = Field(description="invalid_request, too_large, redis_unavailable, model_unavailable, internal")
    field: str | None = Field(None, description="The offending field (batch items: [index].field)")
    reason: str | None = None
    detail: str


NOT_SENT = "not_sent"
_INTERNAL = {"error": "internal", "field": None, "reason": None, "detail": "internal error"}
_ERRORS = {413: {"model": ApiErrorBody, "description": "Body or batch too large"},
           422: {"model": ApiErrorBody, "description": "Invalid input: the field and the reason"},
           503: {"model": ApiErrorBody, "description": "Redis unreachable or no model loaded"}}


def _body_schema(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# ---------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, field: str | None = None,
                 reason: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.field, self.reason = status, error, detail, field, reason

    def payload(self) -> dict:
        return {"error": self.error, "field": self.field, "reason": self.reason, "detail": self.detail}

    def response(self) -> ORJSONResponse:
        return ORJSONResponse(self.payload(), status_code=self.status)


def _bad(exc: BadInput) -> ApiError:
    return ApiError(422, "invalid_request", exc.detail, exc.field, exc.reason)


async def _read_body(request: Request, limit: int) -> bytes:
    ctype = request.headers.get("content-type")
    if ctype is None or ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise ApiError(422, "invalid_request", "the body must be JSON sent with Content-Type: application/json",
                       "content-type", "bad_content_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"the body is {declared} bytes; the limit is {limit}", "body", "too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"the body exceeds the limit of {limit} bytes", "body", "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class MetricsMiddleware:
    """Requests and latency per route template (never the raw path: it may hold a card's key), pure ASGI."""

    def __init__(self, app, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "other") if route is not None else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- the app


def create_app(settings: Settings | None = None, serve: ServeSettings | None = None,
               model_source: ModelSource | None = None) -> FastAPI:
    """The API. `model_source` defaults to the current model of the model directory (model/)."""
    settings = settings or get_settings()
    serve = serve or ServeSettings()
    install_pan_redaction()  # also in worker processes uvicorn spawns; the access log included
    _mask_safe_access_log()
    metrics = ApiMetrics()
    if model_source is None:
        from serving.model_source import current_model_source

        model_source = current_model_source(settings)
    keyer = EntityKeyer(settings.entity_secret)
    rotation = RotationResolver(_Keys(settings.redis.key_prefix), keyer) if keyer.rotating else None
    kafka = settings.kafka
    spill_dir = FsPath(serve.spill_dir) if serve.spill_dir else settings.data_dir / "api-spill"
    hold = HoldQueue(spill_dir, memory_items=serve.spill_memory_items, max_file_bytes=serve.spill_max_bytes,
                     fsync_s=serve.spill_fsync_s)
    publisher = Publisher(kafka.bootstrap, send_timeout_s=serve.publish_timeout_s, retry_s=serve.kafka_retry_s,
                          on_failure=lambda reason: metrics.publish_failures.labels(reason).inc(), hold=hold,
                          security=aiokafka_kwargs(kafka), explain_failure=partial(explain_kafka_failure, kafka),
                          linger_ms=0 if serve.publish_wait else serve.kafka_linger_ms)
    metrics.registry.register(HoldCollector(publisher))
    recorder = ScoreRecorder(publisher, kafka.topic_scores, method=serve.reason_method,
                             on_drop=metrics.records_dropped.inc)
    watcher = ModelWatcher(model_source, poll_s=serve.model_poll_s, on_change=metrics.model_changed)
    state: dict = {}
    from serving.store_watch import StoreLossWatch  # reports an emptied Redis, points to the rebuild

    loss_watch = StoreLossWatch(f"{settings.redis.host}:{settings.redis.port}", metrics.registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store = AsyncOnlineStore(settings.redis, allowed_lateness_ms=settings.allowed_lateness_ms,
                                 retention_ms=settings.event_retention_ms)
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # One immediate retry (a pooled connection Redis closed); no backoff sleeps: the request budget is small.
        store.redis.set_retry(Retry(NoBackoff(), 1))
        reader = None
        if serve.lean_redis and ScriptReader.usable(settings.redis):
            reader = ScriptReader(settings.redis, store.keys.prefix, store.registry)
        state["store"] = store
        state["scorer"] = Scorer(store, watcher, timeout_s=serve.redis_timeout_s, reader=reader,
                                 registry=store.registry)
        loss_watch.start(store.redis, store.keys.prefix)
        await asyncio.to_thread(watcher.load_now)
        watcher.start()
        await publisher.start()
        topics_task = asyncio.get_running_loop().create_task(_ensure_topics(settings))
        if serve.record_scores:
            recorder.start()
        _settle_gc()
        try:
            yield
        finally:
            topics_task.cancel()
            await loss_watch.stop()
            await watcher.stop()
            await recorder.stop()
            await publisher.stop()
            if reader is not None:
                await reader.close()
            await store.close()

    app = ScoringAPI(title="Velocity scoring API", version="1", default_response_class=ORJSONResponse,
                     lifespan=lifespan,
                     description="Real-time card-fraud scores over a streaming feature store. A card number travels "
                                 "only in request bodies, never in a URL; it is tokenized at once.")
    app.state.metrics, app.state.publisher, app.state.watcher, app.state.recorder = metrics, publisher, watcher, recorder
    app.state.runtime = state
    tokens = load_tokens(serve.api_token, serve.api_token_file)
    if tokens:
        app.auth = BearerAuth(tokens, protect_ops=serve.auth_ops,
                              on_denied=metrics.errors.labels("unauthorized").inc)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    from serving import dashboard  # the live page at / (routes, and its Kafka feed joined to the lifespan)

    dashboard.install(app, settings)
    from serving import labels as label_api  # POST /v1/labels: analysts' verdicts, published to `labels`

    app.include_router(label_api.router(settings, publisher, max_body_bytes=serve.max_body_bytes,
                                        registry=metrics.registry))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        metrics.errors.labels(exc.error).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def query_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body")]
        metrics.errors.labels("invalid_request").inc()
        return ApiError(422, "invalid_request", first.get("msg", "invalid request"), ".".join(loc) or "request",
                        first.get("type", "invalid")).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        metrics.errors.labels("internal").inc()
        log.exception("internal error on %s", request.url.path)
        return ORJSONResponse(_INTERNAL, status_code=500)

    decisions = {d: lean(metrics.decisions.labels(d)) for d in ("FRAUD", "NOT_FRAUD")}

    async def _score(txns, batch: bool, publish: bool) -> list[Scored]:
        scorer: Scorer = state["scorer"]
        t0 = time.perf_counter()
        try:
            if rotation is not None:  # a key rotation: a card not yet under the new key is read and written as before
                for t, key in zip(txns, await rotation.resolve(state["store"], [t.card for t in txns]), strict=True):
                    t.card = key
            scored = await scorer.score_many(txns) if batch else [await scorer.score(txns[0])]
        except RedisUnavailable as exc:
            raise ApiError(503, "redis_unavailable", str(exc)) from None
        except ModelUnavailable as exc:
            raise ApiError(503, "model_unavailable", str(exc)) from None
        t1 = time.perf_counter()
        metrics.stage_redis.observe(scored[0].redis_s)
        metrics.stage_predict.observe(t1 - t0 - scored[0].redis_s)
        published = [NOT_SENT] * len(txns)
        if publish:
            topic = kafka.topic_transactions
            wait = serve.publish_wait
            if batch:
                published = list(await asyncio.gather(*(
                    publisher.publish(topic, t.card.encode(), t.to_json(), t.ts, wait=wait) for t in txns)))
            else:
                published[0] = await publisher.publish(topic, txns[0].card.encode(), txns[0].to_json(), txns[0].ts,
                                                       wait=wait)
            metrics.stage_publish.observe(time.perf_counter() - t1)
        at = now_ms()
        for s, txn, outcome in zip(scored, txns, published, strict=True):
            s.answer["published"] = outcome == PUBLISHED
            s.answer["queued"] = outcome == QUEUED
            decisions[s.answer["decision"]].inc()
            if serve.record_scores:
                recorder.record(s, {"source": "api", "ts": txn.ts, "scored_at_ms": at})
        return scored

    def _parse(body: bytes, batch: bool) -> list:
        t0 = time.perf_counter()
        try:
            txns = transactions_from_json(body, keyer, now_ms(), batch=batch, max_batch=serve.max_batch,
                                          max_future_ms=settings.max_future_ms)
        except BadInput as exc:
            raise _bad(exc) from None
        except TooMany as exc:
            raise ApiError(413, "too_large", str(exc), "body", "too_many") from None
        metrics.stage_parse.observe(time.perf_counter() - t0)
        return txns

    async def score_body(body: bytes, publish: bool) -> bytes:
        """POST /v1/score after its body is read: the answer's JSON (raises ApiError). Both the FastAPI route
        below and the plain ASGI handler in front of it (serving/fastpath.py) answer with this."""
        txns = _parse(body, batch=False)
        scored = await _score(txns, batch=False, publish=publish)
        return orjson.dumps(scored[0].answer)

    def error_body(exc: ApiError) -> tuple[int, bytes]:
        metrics.errors.labels(exc.error).inc()
        return exc.status, orjson.dumps(exc.payload())

    if serve.fast_path:
        app.fast_path = ScoreFastPath(handle=score_body, read_limit=serve.max_body_bytes, metrics=metrics,
                                      api_error=ApiError, error_body=error_body, internal_body=orjson.dumps(_INTERNAL))

    @app.post("/v1/score", response_model=ScoreAnswer, responses=_ERRORS,
              openapi_extra=_body_schema(ScoreRequest.model_json_schema()), summary="Score one transaction")
    async def score(request: Request,
                    publish: bool = Query(True, description="Publish the tokenized transaction to `transactions`")):
        """Features from the online store (the transaction folded in), the model's score and decision. The
        tokenized transaction is published to `transactions` unless `publish=false`."""
        body = await score_body(await _read_body(request, serve.max_body_bytes), publish)
        return Response(body, media_type="application/json")

    @app.post("/v1/score/batch", response_model=list[ScoreAnswer], responses=_ERRORS,
              openapi_extra=_body_schema({"type": "array", "items": ScoreRequest.model_json_schema(),
                                          "maxItems": serve.max_batch}),
              summary="Score a list of transactions, answered in order")
    async def score_batch(request: Request, publish: bool = Query(True)):
        """Up to `VELOCITY_SERVE_MAX_BATCH` transactions (one pipelined Redis round trip, one prediction). The
        whole batch is refused (422, naming `[index].field`) if any item is invalid."""
        txns = _parse(await _read_body(request, serve.max_batch_body_bytes), batch=True)
        if not txns:
            return ORJSONResponse([])
        scored = await _score(txns, batch=True, publish=publish)
        return ORJSONResponse([s.answer for s in scored])

    async def _card_features(card: str) -> ORJSONResponse:
        try:
            if rotation is not None:
                card = (await rotation.resolve(state["store"], [card]))[0]
            return ORJSONResponse(await state["scorer"].card_features(card))
        except RedisUnavailable as exc:
            raise ApiError(503, "redis_unavailable", str(exc)) from None

    @app.get("/v1/features/{card}", response_model=CardFeatures, responses=_ERRORS,
             summary="A card's current online features, by entity key")
    async def features_by_key(card: str = Path(description="The card's entity key", json_schema_extra={
            "pattern": key_pattern(settings.entity_secret)})):
        """`card` is the entity key (32 hex characters; `kN.` before them for a key of version N, during and after a
        key rotation). A card number never goes in a URL: POST /v1/features."""
        if not is_entity_key(card):
            detail = ("a card number never goes in a URL: POST /v1/features with {\"cc_num\": ...}" if card.isdigit()
                      else "card must be the entity key: 32 lowercase hex characters")
            raise ApiError(422, "invalid_request", detail, "card", "bad_field")
        if not keyer.knows(card):
            raise ApiError(422, "invalid_request", key_version_problem(card, settings.entity_secret), "card",
                           "unknown_key_version")
        return await _card_features(card)

    @app.post("/v1/features", response_model=CardFeatures, responses=_ERRORS,
              openapi_extra=_body_schema(CardNumber.model_json_schema()),
              summary="A card's current online features, by card number")
    async def features_by_pan(request: Request):
        obj = _decode_object(await _read_body(request, serve.max_body_bytes))
        cc = obj.get("cc_num")
        if cc is None:
            raise ApiError(422, "invalid_request", "missing cc_num (the card number)", "cc_num", "missing_field")
        if not (type(cc) is str and 12 <= len(cc) <= 19 and cc.isdigit() and cc.isascii()):
            raise ApiError(422, "invalid_request", "cc_num must be a string of 12-19 digits", "cc_num", "bad_field")
        if not luhn_valid(cc):
            raise ApiError(422, "invalid_request", "cc_num is not a valid card number (Luhn check)", "cc_num",
                           "bad_field")
        return await _card_features(keyer(cc))

    @app.get("/healthz", summary="The process is up", response_model=Health)
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Ready to score: a model loaded and Redis reachable (Kafka reported)",
             response_model=Readiness, responses={503: {"model": Readiness, "description": "Not ready"}})
    async def readyz():
        model = watcher.current
        redis_ok, redis_error = False, None
        scorer = state.get("scorer")
        if scorer is not None:
            try:
                async with asyncio.timeout(serve.redis_timeout_s):
                    redis_ok = await scorer.reader.ping()  # the connection scores are read over
            except Exception as exc:
                redis_error = type(exc).__name__
        kafka_report = publisher.report()
        metrics.kafka_up.set(1 if kafka_report["state"] == "connected" else 0)
        ready = model is not None and redis_ok
        body = {
            "ready": ready,
            "model": {"loaded": model is not None, "version": model.version if model else None,
                      "problem": watcher.problem},
            "redis": {"ok": redis_ok, "error": redis_error},
            "kafka": {**kafka_report, "required": False,
                      "score_records": {"recorded": recorder.recorded, "dropped": recorder.dropped}},
        }
        return ORJSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus():
        metrics.kafka_up.set(1 if publisher.report()["state"] == "connected" else 0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _settle_gc() -> None:
    """After start-up: move everything loaded so far (frameworks, the model, NumPy) out of the collector's way,
    so a full collection scans only what requests allocate (a full scan of the start-up heap takes tens of ms,
    straight into the latency tail), and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def _decode_object(body: bytes) -> dict:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(422, "invalid_request", f"the body is not valid UTF-8 JSON ({exc.msg})", "body",
                       "not_json") from None
    if type(obj) is not dict:
        raise ApiError(422, "invalid_request", "expected a JSON object", "body", "not_object")
    return obj


def _mask_safe_access_log() -> None:
    """uvicorn's access formatter unpacks the record's five arguments; a record whose PAN was masked has its
    message already formatted (no arguments left), so print that line as it is instead of failing on it."""
    with contextlib.suppress(ImportError):
        from uvicorn.logging import AccessFormatter

        class MaskedAccessFormatter(AccessFormatter):
            def formatMessage(self, record: logging.LogRecord) -> str:
                if isinstance(record.args, tuple) and len(record.args) == 5:
                    return super().formatMessage(record)
                return f"{record.levelname}:     {record.getMessage()}"

        for handler in logging.getLogger("uvicorn.access").handlers:
            f = handler.formatter
            if isinstance(f, AccessFormatter) and not isinstance(f, MaskedAccessFormatter):
                handler.setFormatter(MaskedAccessFormatter(fmt=f._fmt, datefmt=f.datefmt, use_colors=f.use_colors))


async def _ensure_topics(settings: Settings) -> None:
    """Create the product's topics if missing (best effort, in the background: Kafka is not required)."""
    from stores.kafka_topics import ensure_topics, product_topics

    with contextlib.suppress(Exception):
        await asyncio.to_thread(ensure_topics, settings.kafka.bootstrap, product_topics(settings.kafka), 5_000,
                                settings.kafka.topic_retention_ms)
