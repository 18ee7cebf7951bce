"""What the API served, recorded to topic `scores` (`source: api`) with reason codes, off the request path.

Reason codes are the features with the largest XGBoost per-feature contributions (`pred_contribs`) for the very
row and model that produced the answer, computed for many answers at once in a background task every `flush_s`,
not per request. Only XGBoost's computation runs in a thread (it releases the GIL); the Python part (picking the top
features, building the records) stays on the event loop in small batches (every 50 ms): a thread running Python
holds the GIL, and the loop then waits up to the interpreter's switch interval (5 ms) for it, which showed in the
answers' latency tail. Two kinds, `VELOCITY_SERVE_REASON_METHOD`:

- `approx` (default): XGBoost's approximate contributions (`approx_contribs=True`, the Saabas attribution: each
  split's change of the expected value along the row's path, credited to the split's feature). Like SHAP values
  they add up to the margin. ~40-60 us a row in batches on the development machine.
- `exact`: TreeSHAP values. ~1-3 ms a row for the trained model (87 trees of depth 6) on the same machine: at
  500 requests/s that alone is a whole core, so it is opt-in.

Each record names its method (`reason_method`); a record holds the model version and every feature, so exact
values can always be recomputed later for any record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import numpy as np
import orjson

from serving.publisher import Publisher
from serving.scorer import Scored

log = logging.getLogger(__name__)


REASON_METHODS = ("approx", "exact")


def contributions(model, rows: np.ndarray, method: str = "approx") -> np.ndarray:
    """Per row, XGBoost's per-feature contributions to the margin (the bias column dropped). XGBoost computes them
    without the GIL, so this is the part worth running in a thread."""
    import xgboost as xgb

    if method not in REASON_METHODS:
        raise ValueError(f"reason method {method!r}: one of {REASON_METHODS}")
    data = xgb.DMatrix(rows, feature_names=list(model.features), nthread=1)
    contribs = model.booster.predict(data, pred_contribs=True, approx_contribs=method == "approx")
    return contribs[:, :-1]  # the last column is the bias


def top_reasons(model, rows: np.ndarray, per_feature: np.ndarray, top: int = 3) -> list[list[dict]]:
    """Per row, the `top` features by absolute contribution: name, contribution, value (Python work: run it on
    the event loop, in small batches, not in a thread that would hold the GIL against the loop)."""
    order = np.argsort(-np.abs(per_feature), axis=1, kind="stable")[:, :top]
    picked = np.take_along_axis(per_feature, order, axis=1).tolist()
    values = np.take_along_axis(np.asarray(rows, dtype=np.float32), order, axis=1).tolist()
    names = model.features
    return [[{"feature": names[i], "contribution": c, "value": v} for i, c, v in zip(o, cs, vs, strict=True)]
            for o, cs, vs in zip(order.tolist(), picked, values, strict=True)]


def reason_codes(model, rows: np.ndarray, top: int = 3, method: str = "approx") -> list[list[dict]]:
    """Per row, the `top` features by absolute contribution to the margin: name, contribution, value."""
    return top_reasons(model, rows, contributions(model, rows, method), top)


class ScoreRecorder:
    """Buffers served answers; a background task explains them in bulk and produces them to `scores`."""

    def __init__(self, publisher: Publisher, topic: str, *, flush_s: float = 0.05, max_pending: int = 20_000,
                 top: int = 3, method: str = "approx", on_drop: Callable[[int], None] | None = None) -> None:
        if method not in REASON_METHODS:
            raise ValueError(f"reason method {method!r}: one of {REASON_METHODS}")
        self.publisher = publisher
        self.topic = topic
        self.flush_s = flush_s
        self.max_pending = max_pending
        self.top = top
        self.method = method
        self.recorded = 0
        self.dropped = 0
        self._pending: list[tuple[Scored, dict]] = []
        self._task: asyncio.Task | None = None
        self._on_drop = on_drop or (lambda n: None)

    def record(self, scored: Scored, extra: dict) -> None:
        if len(self._pending) >= self.max_pending:  # Kafka is down or slow: keep memory bounded
            self._drop(1)
            return
        self._pending.append((scored, extra))

    def _drop(self, n: int) -> None:
        self.dropped += n
        self._on_drop(n)

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        by_model: dict[int, list[tuple[Scored, dict]]] = {}
        for item in pending:
            by_model.setdefault(id(item[0].model), []).append(item)
        records: list[tuple[bytes, bytes]] = []
        for items in by_model.values():
            model = items[0][0].model
            try:
                # In a thread: XGBoost computes without the GIL, so requests are served meanwhile (on the event
                # loop, ~2-5 ms of contributions every flush would sit in the latency tail).
                rows = np.vstack([s.row for s, _ in items])
                per_feature = await asyncio.to_thread(contributions, model, rows, self.method)
                reasons = top_reasons(model, rows, per_feature, self.top)
            except Exception:
                log.exception("reason codes for model %s", model.version)
                reasons = [[] for _ in items]
            for (scored, extra), why in zip(items, reasons, strict=True):
                record = {**scored.answer, **extra, "reasons": why, "reason_method": self.method}
                records.append((scored.answer["card"].encode(), orjson.dumps(record)))
        sent = await self.publisher.send_many_nowait(self.topic, records)
        self.recorded += sent
        if sent < len(records):
            self._drop(len(records) - sent)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except Exception:
                log.exception("score recorder")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="score-recorder")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.flush()
