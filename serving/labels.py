"""`POST /v1/labels`: an analyst's verdict on a transaction, published to topic `labels` (SPEC section 4).

The body is one label `{"txn_id", "fraud_label", "labeled_at"?}` (labeled_at: epoch ms, default now). It is
validated by the same rules as every other door a label comes in by (featurestore.label_events) and answered like
`/v1/score`: 422 names the field and the reason, an oversize body is 413, nothing a client sends gives a 500.
A valid label is published through the API's Kafka producer (key txn_id), acknowledged by the broker within the
publish budget, and answered 202 with what was accepted and whether it was published (or held by the API for
Kafka, `queued`); the stream worker archives it to the label store. A label answered with neither was not stored:
the client sends it again (a repeated version is harmless, the latest `labeled_at` wins).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, Field

from featurestore.config import Settings
from featurestore.entity import EntityKeyer
from featurestore.events import MAX_TS_MS, MAX_TXN_ID_LEN, MIN_TS_MS, InvalidEvent
from featurestore.label_events import field_of, label_message, validate_label
from serving.app import _ERRORS, ApiError, ORJSONResponse, _body_schema, _read_body
from serving.publisher import Publisher
from serving.scorer import now_ms
from serving.validation import BadInput, _Lenient, decode_json


class LabelRequest(BaseModel):
    """A fraud verdict on a transaction, known now (or at `labeled_at`). Unknown fields are ignored."""

    txn_id: str = Field(min_length=1, max_length=MAX_TXN_ID_LEN, description="The transaction's id")
    fraud_label: Literal[0, 1] = Field(description="1 = fraud, 0 = legitimate")
    labeled_at: int | None = Field(None, ge=MIN_TS_MS, lt=MAX_TS_MS,
                                   description="When the verdict became known, epoch ms UTC (default: now); at most "
                                               "1 day ahead")


class LabelAccepted(BaseModel):
    txn_id: str = Field(description="As stored (PAN-like digit runs masked, as in the transaction's own id)")
    fraud_label: Literal[0, 1]
    labeled_at: int
    published: bool = Field(description="Acknowledged by Kafka on the labels topic")
    queued: bool = Field(description="Not published yet, but held by the API and published as soon as Kafka is "
                                     "back. published=false with queued=false: not stored; send it again")


def router(settings: Settings, publisher: Publisher, *, max_body_bytes: int,
           registry: CollectorRegistry | None = None) -> APIRouter:
    """The labels route, publishing with the API's own producer to `settings.kafka.topic_labels`."""
    api = APIRouter()
    keyer = EntityKeyer(settings.entity_secret)
    topic = settings.kafka.topic_labels
    published_total = Counter("velocity_api_labels", "Labels accepted by POST /v1/labels, by outcome (published, "
                              "queued, dropped)", ["outcome"], registry=registry)

    @api.post("/v1/labels", status_code=202, response_model=LabelAccepted, responses=_ERRORS,
              openapi_extra=_body_schema(LabelRequest.model_json_schema()), summary="Record a fraud label")
    async def post_label(request: Request):
        """An analyst's verdict: validated, then published to the labels topic (archived by the stream worker).
        The latest `labeled_at` of a transaction's labels wins wherever labels are read."""
        body = await _read_body(request, max_body_bytes)
        now = now_ms()
        try:
            obj = decode_json(body)
            lenient = isinstance(obj, _Lenient)  # NaN/Infinity: a bad field is named, else it is not JSON
            label = validate_label(obj.value if lenient else obj, keyer, now, settings.max_future_ms,
                                   default_labeled_at=now)
            if lenient:
                raise BadInput("body", "not_json", "the body is not valid JSON (NaN, Infinity or an out-of-range "
                                                   "number)")
        except BadInput as exc:
            raise ApiError(422, "invalid_request", exc.detail, exc.field, exc.reason) from None
        except InvalidEvent as exc:
            raise ApiError(422, "invalid_request", exc.detail, field_of(exc), exc.reason) from None
        key, value = label_message(label)
        outcome = await publisher.publish(topic, key, value, label["labeled_at"], wait=True)
        published = outcome is True or outcome == "published"  # the publisher's outcome: published|queued|dropped
        queued = outcome == "queued"
        published_total.labels("published" if published else "queued" if queued else "dropped").inc()
        return ORJSONResponse({**label, "published": published, "queued": queued}, status_code=202)

    return api
