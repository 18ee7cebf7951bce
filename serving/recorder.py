"""What the API served, recorded to topic `scores` (`source: api`) with reason codes, off the request path.

Reason codes are the features with the largest XGBoost per-feature contributions (SHAP values, `pred_contribs`)
for the very row and model that produced the answer. Computing them needs a DMatrix, so they are computed for
many answers at once in a background task every `flush_s`, not per request.
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


def reason_codes(model, rows: np.ndarray, top: int = 3) -> list[list[dict]]:
    """Per row, the `top` features by absolute contribution to the margin: name, contribution, value."""
    import xgboost as xgb

    contribs = model.booster.predict(xgb.DMatrix(rows, feature_names=list(model.features)), pred_contribs=True)
    out = []
    for row, c in zip(rows, contribs, strict=True):
        per_feature = c[:-1]  # the last column is the bias
        order = np.argsort(-np.abs(per_feature), kind="stable")[:top]
        out.append([{"feature": model.features[i], "contribution": float(per_feature[i]),
                     "value": float(row[i])} for i in order])
    return out


class ScoreRecorder:
    """Buffers served answers; a background task explains them in bulk and produces them to `scores`."""

    def __init__(self, publisher: Publisher, topic: str, *, flush_s: float = 0.05, max_pending: int = 20_000,
                 top: int = 3, on_drop: Callable[[int], None] | None = None) -> None:
        self.publisher = publisher
        self.topic = topic
        self.flush_s = flush_s
        self.max_pending = max_pending
        self.top = top
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
        for items in by_model.values():
            model = items[0][0].model
            try:
                reasons = reason_codes(model, np.vstack([s.row for s, _ in items]), self.top)
            except Exception:
                log.exception("reason codes for model %s", model.version)
                reasons = [[] for _ in items]
            for (scored, extra), why in zip(items, reasons, strict=True):
                record = {**scored.answer, **extra, "reasons": why}
                ok = await self.publisher.send_nowait(self.topic, scored.answer["card"].encode(),
                                                      orjson.dumps(record))
                if ok:
                    self.recorded += 1
                else:
                    self._drop(1)

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
