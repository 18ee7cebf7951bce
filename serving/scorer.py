"""The scorer: one transaction -> its features (one Redis round trip) -> the ratios -> the model's row -> a score.

Everything that defines a feature lives in `featurestore/`: the read script and its fold (`stores.redis_online`),
the ratios (`featurestore.ratios.compute_ratios`, the function training uses). This module only puts the values
in the model's recorded order and predicts the row with the fastest one-row predictor that agrees bit for bit with
the booster's `inplace_predict` (serving/fastpredict.py; no per-request DMatrix). The read script runs on the
store's own client or on a leaner transport of the same script (`reader`, serving/redis_reader.py).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from featurestore.definitions import REGISTRY, Registry
from featurestore.event_time import event_time_values
from featurestore.events import Transaction
from featurestore.ratios import compute_ratios
from featurestore.windows import in_window
from serving.models import ModelWatcher, ServingModel
from stores.redis_online import AsyncOnlineStore, OnlineFeatures, fold_read, newest_counted_ts


class ReplyReader(Protocol):
    async def read_replies(self, requests: Sequence[tuple]) -> list:
        """Raw read-script replies for (card, txn_id, ts[, merchant]) requests, in one round trip."""


FRAUD = "FRAUD"
NOT_FRAUD = "NOT_FRAUD"


class RedisUnavailable(RuntimeError):
    """The online store did not answer within the budget (down, unreachable, or too slow)."""


class ModelUnavailable(RuntimeError):
    """No model is loaded (none trained or made current yet, or the current one was refused)."""


def redis_failure(exc: BaseException) -> bool:
    """A connection-level failure or a timeout, as opposed to a bug in the request."""
    if isinstance(exc, OSError | ConnectionError | TimeoutError):
        return True
    name = type(exc).__name__  # redis-py's ConnectionError/TimeoutError/BusyLoadingError are its own classes
    return "Connection" in name or "Timeout" in name or "BusyLoading" in name


@dataclass(slots=True)
class Scored:
    """One answer, and what produced it (the recorder explains it later with the same model and row)."""

    answer: dict
    model: ServingModel
    row: np.ndarray  # the model's input row (a copy; float32)
    redis_s: float = 0.0  # time spent on the feature read


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Scorer:
    """Scores transactions with the current model over the online store; safe to share across requests."""

    def __init__(self, store: AsyncOnlineStore, models: ModelWatcher, *, timeout_s: float = 1.0,
                 registry: Registry = REGISTRY, reader: ReplyReader | None = None) -> None:
        self.store = store
        #: What runs the read script: the store itself, or a leaner transport of the same script
        #: (`serving.redis_reader.ScriptReader`, the API's).
        self.reader: ReplyReader = reader or store
        self.models = models
        self.timeout_s = timeout_s
        self.registry = registry
        self._stream_windows = tuple((g.name, g.window_ms) for g in registry.stream_groups)
        self._batch_groups = tuple(g.name for g in registry.batch_groups)
        self._all_features = registry.all_features
        self._ratios = registry.ratios
        self._event_time = registry.event_time

    async def _replies(self, requests: Sequence[tuple]) -> list:
        reader = self.reader
        try:
            if getattr(reader, "bounds_waits", False):  # one sweep timer for every request's wait
                return await reader.read_replies(requests, timeout_s=self.timeout_s)
            async with asyncio.timeout(self.timeout_s):
                return await reader.read_replies(requests)
        except Exception as exc:
            if redis_failure(exc):
                raise RedisUnavailable(f"the online store (Redis) did not answer within {self.timeout_s:g} s: "
                                       f"{type(exc).__name__}") from None
            raise

    def _model(self) -> ServingModel:
        model = self.models.current
        if model is None:
            raise ModelUnavailable(self.models.problem or "no model loaded")
        return model

    def features(self, txn: Transaction, reply, at_ms: int) -> tuple[dict[str, float], OnlineFeatures, dict]:
        """Every feature and ratio by name (NaN where missing), the fold, and each group's age in ms."""
        online = fold_read(reply, txn.txn_id, txn.ts, txn.amount_cents, self.registry)
        values = {"amount": txn.amount, **online.values}
        values.update(event_time_values(txn.ts, self._event_time))
        values.update(compute_ratios(values, self._ratios))
        return values, online, self._ages(online, newest_counted_ts(reply, txn.txn_id), at_ms, 0)

    def _ages(self, online: OnlineFeatures, newest: int | None, at_ms: int, nothing_stored) -> dict:
        """Per group: a stream group's age is now minus the event time of the newest stored event its window
        counts (`nothing_stored` when it counts none); a batch group's, now minus the cut-off of the snapshot
        serving it (None: no visible snapshot holds the group yet)."""
        ages = {name: nothing_stored if newest is None or not in_window(newest, online.ts, window)
                else max(0, at_ms - newest) for name, window in self._stream_windows}
        cutoffs = online.group_cutoffs
        for name in self._batch_groups:
            cutoff = cutoffs.get(name)
            ages[name] = None if cutoff is None else max(0, at_ms - cutoff)
        return ages

    def _answer(self, txn: Transaction, model: ServingModel, score: float, values: dict, ages: dict) -> dict:
        return self.answer(txn, model, score, {name: values[name] for name in self._all_features}, ages)

    @staticmethod
    def answer(txn: Transaction, model: ServingModel, score: float, features: dict, ages: dict) -> dict:
        """The answer's shape (SPEC section 6); `features`: every feature by name, in `Registry.all_features`
        order."""
        return {
            "txn_id": txn.txn_id,
            "card": txn.card,
            "score": score,
            "decision": FRAUD if score >= model.threshold else NOT_FRAUD,
            "threshold": model.threshold,
            "model_version": model.version,
            # orjson writes NaN as null, so missing features need no conversion here.
            "features": features,
            "feature_age_ms": ages,
        }

    async def score(self, txn: Transaction) -> Scored:
        """Score one transaction (raises RedisUnavailable / ModelUnavailable)."""
        model = self._model()
        t0 = time.perf_counter()
        reply = (await self._replies([(txn.card, txn.txn_id, txn.ts, txn.merchant)]))[0]
        redis_s = time.perf_counter() - t0
        model = self._model()  # the freshest model after the await: a swap in between is fine either way
        values, _, ages = self.features(txn, reply, now_ms())
        row = np.array([[values[name] for name in model.features]], dtype=np.float32)
        fast = model.row_predictor
        raw = fast.predict_row(row) if fast is not None else float(model.booster.inplace_predict(row)[0])
        if model.calibrate is None:
            score = raw
        else:  # the one-score form, equal to calibrate's (serving/fastpredict.py), where the model has one
            one = model.row_calibrator
            score = one(raw) if one is not None else float(model.calibrate(np.array([raw]))[0])
        return Scored(self._answer(txn, model, score, values, ages), model, row, redis_s)

    async def score_many(self, txns: Sequence[Transaction]) -> list[Scored]:
        """Score several transactions: one pipelined Redis round trip, one prediction over all rows.

        Each is read as if it arrived now and alone: two transactions of one card in the same batch do not see
        each other (the stream, which applies them in order, does; SPEC section 4: the stream is the reference).
        """
        self._model()
        t0 = time.perf_counter()
        replies = await self._replies([(t.card, t.txn_id, t.ts, t.merchant) for t in txns])
        redis_s = time.perf_counter() - t0
        model = self._model()
        at = now_ms()
        rows = np.empty((len(txns), len(model.features)), dtype=np.float32)
        computed = []
        for j, (txn, reply) in enumerate(zip(txns, replies, strict=True)):
            values, _, ages = self.features(txn, reply, at)
            rows[j] = [values[name] for name in model.features]
            computed.append((values, ages))
        raw = model.booster.inplace_predict(rows)
        scores = model.calibrate(raw) if model.calibrate is not None else raw
        return [Scored(self._answer(t, model, float(s), v, a), model, rows[j:j + 1].copy(), redis_s)
                for j, (t, s, (v, a)) in enumerate(zip(txns, scores, computed, strict=True))]

    async def card_features(self, card: str) -> dict:
        """A card's current online features, as of now, without a transaction of its own (inspection)."""
        at = now_ms()
        reply = (await self._replies([(card, "", at)]))[0]
        online = fold_read(reply, "", at, None, self.registry)
        values = dict(online.values)
        values.update(compute_ratios(values, self.registry.ratios))
        return {
            "card": card,
            "as_of_ms": at,
            "features": {n: values.get(n, math.nan) for n in self.registry.all_features if n in values},
            "snapshot_cutoff_ms": online.snapshot_cutoff_ms,
            "complete": online.complete,
            "feature_age_ms": self._ages(online, newest_counted_ts(reply, ""), at, None),
        }
