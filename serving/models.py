"""The model as the scorer needs it, and a watcher that swaps in a new current model without a restart.

Loading (files, metadata, the check that the current feature definitions can produce the model's features) is
`model/`'s job; this module only adapts what it loads (`ServingModel`) and polls the "current" pointer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from serving.fastpredict import CompiledTrees, RowPredictor, one_calibrator, one_row_predictor

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServingModel:
    """A loaded model: a booster, its input features in order, its threshold, version and calibration."""

    booster: object  # xgboost.Booster (anything with inplace_predict and predict)
    features: tuple[str, ...]
    threshold: float
    version: str
    #: raw probabilities -> calibrated ones (vectorized), or None when the model is not calibrated.
    calibrate: Callable[[np.ndarray], np.ndarray] | None = None
    #: Set when the watcher loads the model: the one-row predictor (None: booster.inplace_predict is used).
    row_predictor: CompiledTrees | RowPredictor | None = field(default=None, compare=False)
    #: Set when the watcher loads the model: `calibrate` for one score (None: `calibrate` on a one-element array).
    row_calibrator: Callable[[float], float] | None = field(default=None, compare=False)


class ModelSource(Protocol):
    """Where the current model comes from."""

    def stamp(self) -> Hashable:
        """Cheap; changes whenever the current model changes (e.g. the pointer file's mtime and content)."""

    def load(self) -> ServingModel:
        """Load the current model; raise with a clear message when there is none or it cannot be served."""


class ModelWatcher:
    """Holds the current model; a background task polls the source's stamp and swaps in a new model.

    The new model is loaded in a thread while requests keep using the old one; the swap is one attribute
    assignment, so no request ever sees a half-loaded model or fails because of a switch. A model that fails to
    load is refused (logged, counted) and the old one stays.
    """

    def __init__(self, source: ModelSource, *, poll_s: float = 0.5,
                 on_change: Callable[[str, ServingModel | None], None] | None = None) -> None:
        self.source = source
        self.poll_s = poll_s
        self.current: ServingModel | None = None
        self.problem: str | None = None  # why there is no model, or why the last switch was refused
        self._stamp: Hashable = None
        self._on_change = on_change
        self._task: asyncio.Task | None = None

    def load_now(self) -> ServingModel | None:
        """Load synchronously (start-up and tests)."""
        stamp = self._safe_stamp()
        self._load(stamp)
        return self.current

    def _safe_stamp(self) -> Hashable:
        try:
            return self.source.stamp()
        except Exception as exc:  # a missing pointer is a state, not a crash
            return ("error", type(exc).__name__, str(exc))

    def _load(self, stamp: Hashable) -> None:
        self._stamp = stamp
        try:
            model = self.source.load()
            _prepare(model)
        except Exception as exc:
            self.problem = f"model not loaded: {exc}"
            if self.current is None:
                log.error("%s; /v1/score answers 503 until a model is made current", self.problem)
            else:
                log.error("%s; still serving model %s", self.problem, self.current.version)
            if self._on_change:
                self._on_change("refused", self.current)
            return
        previous = self.current
        self.current, self.problem = model, None
        if previous is None or previous.version != model.version:
            log.info("serving model %s (%d features, threshold %.4g)%s", model.version, len(model.features),
                     model.threshold, "" if previous is None else f"; was {previous.version}")
        if self._on_change:
            self._on_change("loaded", model)

    async def check(self) -> None:
        stamp = self._safe_stamp()
        if stamp != self._stamp:
            await asyncio.to_thread(self._load, stamp)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.check()
            except Exception:  # never let the watcher die; the next poll tries again
                log.exception("model watcher")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="model-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _prepare(model: ServingModel) -> None:
    """One thread per prediction (a one-row predict only pays thread hand-offs for more), a warm-up predict so
    the first request after a switch is as fast as the rest, and the fastest exact one-row predictor."""
    with contextlib.suppress(Exception):
        model.booster.set_param({"nthread": 1})
    t0 = time.perf_counter()
    model.booster.inplace_predict(np.full((1, len(model.features)), np.nan, dtype=np.float32))
    model.row_predictor = one_row_predictor(model.booster, len(model.features))
    model.row_calibrator = one_calibrator(model.calibrate) if model.calibrate is not None else None
    log.debug("warm-up predict %.2f ms", (time.perf_counter() - t0) * 1e3)
