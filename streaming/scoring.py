"""Stream scoring (SPEC section 7): each batch's transactions are scored right after their window update, with the
serving scorer (same read, same ratios, same model), and the answers go to topic `scores` (`source: stream`);
FRAUD decisions also go to `alerts`.

The stream's answers are the reference for online/offline agreement: a transaction the stream has applied is read
as of its own arrival (its stored arrival position), so its features are exactly its training row's.

On a single Redis node nothing is read back per transaction: the batch's apply returns each transaction's window
statistics (streaming/stream_reads.py), the nightly snapshots are fetched once per batch, the features are folded for the
whole batch (streaming/batch_fold.py: the online read's fold, shared work done once), and the answers go to the
producer as one record batch per partition. Under Redis Cluster each transaction is read with the serving scorer's
read (`Scorer.score_many`). Both give the same features (tests/test_stream_reads.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import orjson

from featurestore.events import Transaction
from featurestore.state import Applied
from serving.models import ModelWatcher
from serving.scorer import FRAUD, ModelUnavailable, RedisUnavailable, Scorer, now_ms, redis_failure
from streaming import metrics
from streaming.batch_fold import BatchFold
from streaming.batch_prep import PreparedBatch
from streaming.stream_reads import BatchReplies

log = logging.getLogger(__name__)

#: Sends one message (topic, key, value) and returns an awaitable that resolves once the broker has it.
Send = Callable[[str, bytes, bytes], Awaitable[Awaitable[object]]]
#: Sends (key, value) messages to a topic; returns awaitables that resolve once the broker has them all.
SendMany = Callable[[str, Sequence[tuple[bytes, bytes]]], Awaitable[Sequence[Awaitable[object]]]]


class StreamScorer:
    """Scores what a batch applied and produces the answers; waits for the broker before the batch is acked."""

    def __init__(self, scorer: Scorer, models: ModelWatcher, send: Send, *, scores_topic: str,
                 alerts_topic: str, send_many: SendMany | None = None) -> None:
        self.scorer = scorer
        self.models = models
        self.send = send
        self.send_many = send_many
        self.scores_topic = scores_topic
        self.alerts_topic = alerts_topic
        self._warned = False
        self.replies = BatchReplies(scorer.store, scorer.reader)
        self.fold = BatchFold(scorer.registry)

    async def _from_apply(self, batch: PreparedBatch, applied: Sequence[Applied]) -> list[dict]:
        """`Scorer.score_many`'s answers for an applied batch, the reads taken from its apply
        (`streaming.stream_reads`): the same fold of the same replies, a column at a time, one prediction over all
        rows."""
        scorer = self.scorer
        try:
            async with asyncio.timeout(scorer.timeout_s):
                reads, hashes = await self.replies.gather(batch.txns, batch.cents, applied, batch.window_stats)
        except Exception as exc:
            if redis_failure(exc):
                raise RedisUnavailable(f"the online store (Redis) did not answer within {scorer.timeout_s:g} s: "
                                       f"{type(exc).__name__}") from None
            raise
        model = scorer._model()
        folded = self.fold.fold(batch.txns, reads, hashes, now_ms())
        raw = model.booster.inplace_predict(folded.matrix(model.features))
        scores = (model.calibrate(raw) if model.calibrate is not None else raw).tolist()
        answer = scorer.answer
        return [answer(t, model, s, v, a)
                for t, s, v, a in zip(batch.txns, scores, folded.values, folded.ages, strict=True)]

    async def score_batch(self, batch: PreparedBatch, applied: Sequence[Applied] | None = None) -> int:
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
            if batch.window_stats is not None and applied is not None:
                answers = await self._from_apply(batch, applied)
            else:
                answers = [s.answer for s in await self.scorer.score_many(txns)]
        except (ModelUnavailable, RedisUnavailable) as exc:
            # The batch is in Redis and archived; its scores are an output, not a reason to stall the partition.
            metrics.UNSCORED.inc(len(txns))
            log.warning("%d transactions not scored: %s", len(txns), exc)
            return 0
        at = time.time_ns() // 1_000_000
        messages, alerts = [], []
        dumps, option = orjson.dumps, orjson.OPT_SERIALIZE_NUMPY
        for txn, answer in zip(txns, answers, strict=True):
            answer["source"], answer["ts"], answer["scored_at_ms"] = "stream", txn.ts, at
            message = (txn.card.encode(), dumps(answer, option=option))
            messages.append(message)
            if answer["decision"] == FRAUD:
                alerts.append(message)
        if self.send_many is not None:  # one batch per partition: no future, no await per message
            pending = [*await self.send_many(self.scores_topic, messages),
                       *(await self.send_many(self.alerts_topic, alerts) if alerts else ())]
        else:
            pending = [await self.send(topic, key, value) for topic, sent in
                       ((self.scores_topic, messages), (self.alerts_topic, alerts)) for key, value in sent]
        for fut in pending:
            await fut
        metrics.ALERTS.inc(len(alerts))
        metrics.SCORED.inc(len(txns))
        return len(txns)
