"""Stream scoring (SPEC section 7): each batch's transactions are scored right after their window update, with the
serving scorer (same read, same ratios, same model), and the answers go to topic `scores` (`source: stream`);
FRAUD decisions also go to `alerts`.

The stream's answers are the reference for online/offline agreement: a transaction the stream has applied is read
back as of its own arrival (its stored arrival position), so its features are exactly its training row's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import orjson

from featurestore.events import Transaction
from serving.models import ModelWatcher
from serving.scorer import FRAUD, ModelUnavailable, RedisUnavailable, Scorer
from streaming import metrics
from streaming.batch_prep import PreparedBatch

log = logging.getLogger(__name__)

#: Sends one message (topic, key, value) and returns an awaitable that resolves once the broker has it.
Send = Callable[[str, bytes, bytes], Awaitable[Awaitable[object]]]


class StreamScorer:
    """Scores what a batch applied and produces the answers; waits for the broker before the batch is acked."""

    def __init__(self, scorer: Scorer, models: ModelWatcher, send: Send, *, scores_topic: str,
                 alerts_topic: str) -> None:
        self.scorer = scorer
        self.models = models
        self.send = send
        self.scores_topic = scores_topic
        self.alerts_topic = alerts_topic
        self._warned = False

    async def score_batch(self, batch: PreparedBatch) -> int:
        """Score every valid transaction of the batch, late ones too (they get their own window, SPEC section 4).

        Duplicates are scored again: a redelivered batch (a worker killed after its Redis write, before its scores
        reached the broker) must not lose them, and a stored transaction is read as of its own arrival, so the
        answer is the same each time. Scores are at-least-once; consumers keep one per txn_id.
        """
        txns: list[Transaction] = list(batch.txns)
        if not txns:
            return 0
        if self.models.current is None:
            metrics.UNSCORED.inc(len(txns))
            if not self._warned:
                self._warned = True
                log.warning("stream scoring is on but no model is current (%s): transactions are aggregated and "
                            "archived but not scored until `velocity train` / `velocity models use` provide one",
                            self.models.problem or "none trained yet")
            return 0
        self._warned = False
        try:
            scored = await self.scorer.score_many(txns)
        except (ModelUnavailable, RedisUnavailable) as exc:
            # The batch is in Redis and archived; its scores are an output, not a reason to stall the partition.
            metrics.UNSCORED.inc(len(txns))
            log.warning("%d transactions not scored: %s", len(txns), exc)
            return 0
        at = time.time_ns() // 1_000_000
        pending = []
        for txn, s in zip(txns, scored, strict=True):
            answer = {**s.answer, "source": "stream", "ts": txn.ts, "scored_at_ms": at}
            value = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
            key = txn.card.encode()
            pending.append(await self.send(self.scores_topic, key, value))
            if answer["decision"] == FRAUD:
                pending.append(await self.send(self.alerts_topic, key, value))
                metrics.ALERTS.inc()
        for fut in pending:
            await fut
        metrics.SCORED.inc(len(txns))
        return len(txns)
