"""faust without the per-message work this worker does not need.

The transport: faust's aiokafka transport whose consumer hands each partition's fetched records to the conductor
as one message (a `FetchedBatch`), not one message per record.

faust's `Consumer._drain_messages` turns every fetched record into a faust Message, then delivers it through
`wait_first(callback(message), suspend_flow.wait())` (four new asyncio tasks and an `asyncio.wait` per
message), and the conductor, the channel queue, the stream and the ack bookkeeping each do their part per
message again. On a small machine that was ~60 us of a ~80 us per-event budget (bench/RESULTS.md). Here the
records of one partition from one fetch travel as one message whose offset is the last record's: faust's
bookkeeping (read offsets, seeks after a rebalance, flow control, commits) works unchanged on it, and acking
it marks every offset of the batch done (`ack`). Everything else is faust's own logic: consumer-group
membership, rebalances, committed offsets, the agent and its stream.

A rebalance that begins mid-fetch stops delivery at the next partition's batch; the rest is neither acked nor
committed, and is fetched again by whoever owns its partition afterwards. Redelivery is safe here by design:
the worker's writes are idempotent by `txn_id`.

The consumer also asks the broker to hold an empty fetch for at most FETCH_MAX_WAIT_MS instead of faust's 1.5 s
(see `LeanConsumerThread`). Also here: a schema that hands the agent the raw records, and a Monitor without its
per-message hooks.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

import faust
from faust.sensors.monitor import Monitor
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import ConsumerMessage, TransportT
from faust.types.tuples import ack_lock
from mode.utils.futures import notify


class FetchedBatch(ConsumerMessage):
    """The records one fetch returned for one partition, as one faust message.

    `offset` is the last record's, `first_offset` the first's; `value` is the list of aiokafka ConsumerRecords
    (key, value, partition, offset, timestamp in ms).
    """

    __slots__ = ("first_offset",)


#: How long the broker may hold a fetch that finds no new record (aiokafka's `fetch_max_wait_ms`).
FETCH_MAX_WAIT_MS = 100


class LeanConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """faust's consumer thread, its aiokafka consumer asking the broker to hold an empty fetch for at most
    FETCH_MAX_WAIT_MS (faust hard-codes 1,500 ms).

    aiokafka sends one fetch per broker at a time, and none for the partitions whose fetched records are still
    buffered. So when a fetch names only partitions that are caught up (one partition of a backlog drained before
    the others, a quiet partition), the broker holds it for the whole wait, and the busy partitions on that broker
    are not fetched again until it returns: the agent's channel runs dry and the worker stands still. Traced in the
    stream bench (200,000 events, 4 partitions, one worker): one or two stalls of 0.7-1.0 s per run, 38% of its
    time; at 100 ms none over 30 ms, and the worker 1.4x faster (bench/RESULTS.md). The cost is one empty fetch per
    100 ms on an idle partition set; a fetch that finds records still returns at once.
    """

    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        # aiokafka keeps the setting here until start() hands it to its Fetcher (the constructor's own argument is
        # fixed by faust).
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class LeanDrainConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> LeanConsumerThread:
        return LeanConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def ack(self, message) -> bool:
        """Acking a FetchedBatch marks all its offsets done, so faust commits past it as it would past each record."""
        first = getattr(message, "first_offset", None)
        if first is None:
            return super().ack(message)
        with ack_lock:
            if message.acked:
                return False
            message.acked = True
            tp, last = message.tp, message.offset
            if not self.app.topics.acks_enabled_for(message.topic):
                return False
            committed = self._committed_offset[tp]
            start = first if committed is None else max(first, committed)
            acked_index = self._acked_index[tp]
            try:
                if start in acked_index:  # the previous delivery's last offset (see first_offset)
                    start += 1
                if start > last or last in acked_index:
                    return False
                offsets = range(start, last + 1)
                self._unacked_messages.discard(message)
                acked_index.update(offsets)
                self._acked[tp].extend(offsets)
                self._n_acked += len(offsets)
                return True
            finally:
                notify(self._waiting_for_ack)

    def on_buffer_full(self, tp) -> None:
        """No partition pausing when the agent's channel fills up: a full channel blocks delivery instead.

        faust takes a partition out of the fetch set when the channel passes 80% of its size and puts it back at 40%.
        With a channel of fetched batches that happens within milliseconds at a modest rate, and each round trip
        of that dance stalled aiokafka's fetcher for its whole 1 s poll timeout (p99 freshness ~1.2 s at 5,000/s).
        Blocking is backpressure enough: while delivery waits, nothing is fetched, and aiokafka fetches no more for a
        partition whose records are still buffered.
        """

    def on_buffer_drop(self, tp) -> None:
        """See on_buffer_full: nothing was paused, so nothing to resume."""

    async def _drain_messages(self, fetcher) -> None:  # pragma: no cover - exercised by the stream worker tests
        app = self.app
        callback = self.callback
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        suspended = self.suspend_flow.is_set
        get_read_offset = self._read_offset.get
        set_read_offset = self._read_offset.__setitem__
        set_flag, unset_flag = self.diag.set_flag, self.diag.unset_flag
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                records, active = await self._wait_next_records(1.0)
                await asyncio.sleep(0)  # a fetch can return at once, loop after loop: let other tasks run
                if not records or self.should_stop:
                    continue
                if not self.flow_active:
                    # Fetched while a rebalance stopped the flow: deliver nothing, re-read from committed offsets.
                    await self._seek_back()
                    continue
                generation = app.consumer_generation_id
                for tp, recs in records.items():
                    if suspended() or not self.flow_active or app.consumer_generation_id != generation:
                        break  # a rebalance began: deliver nothing more from this fetch
                    if active is not None and tp not in active and tp not in self._buffered_partitions:
                        continue
                    r_offset = get_read_offset(tp)  # faust's: last delivered, or where a seek moved it
                    if r_offset is not None and recs[0].offset < r_offset:
                        recs = [r for r in recs if r.offset >= r_offset]  # delivered before a seek back
                    if not recs:
                        continue
                    first, last = recs[0], recs[-1]
                    # Offsets between the previous delivery and this one that hold no record (transaction markers,
                    # compaction) are acked with this batch, so commits never stall on them.
                    first_offset = first.offset if r_offset is None else min(first.offset, r_offset)
                    batch = FetchedBatch(tp.topic, tp.partition, last.offset, last.timestamp / 1000.0,
                                         last.timestamp_type, None, None, recs, None, 0, 0, tp,
                                         generation_id=generation)
                    batch.first_offset = first_offset
                    await callback(batch)
                    set_read_offset(tp, last.offset)
                    if self._commit_every is not None and self._n_acked >= self._commit_every:
                        self._n_acked = 0
                        await self.commit()
                unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)

    async def _seek_back(self) -> None:
        try:
            await self.perform_seek()
        except Exception as exc:  # faust logs and carries on here too; the next rebalance seeks again
            self.log.warning("seek to committed offsets failed while the flow was stopped: %r", exc)


class LeanDrainTransport(faust_aiokafka.Transport):
    Consumer: ClassVar = LeanDrainConsumer


class LeanDrainApp(faust.App):
    """A faust App whose consumer uses the lean drain loop; everything else is stock faust."""

    def _new_transport(self) -> TransportT:
        return LeanDrainTransport(self.conf.broker_consumer, self)


class RawBytesSchema(faust.Schema):
    """The agent gets what the consumer delivered, undecoded: for a FetchedBatch, its list of raw records.

    The agent validates and parses each record itself (featurestore.events), so faust's codec lookup is skipped,
    and a record faust could not decode cannot bypass the dead-letter path.
    """

    def loads_key(self, app, message, *, loads=None, serializer=None):  # noqa: ARG002 - faust's signature
        return message.key

    def loads_value(self, app, message, *, loads=None, serializer=None):  # noqa: ARG002 - faust's signature
        return message.value


class WebViewlessMonitor(Monitor):
    """faust's Monitor without its four per-message hooks.

    Those hooks keep per-message statistics for faust's web views, which this worker turns off; its own
    Prometheus metrics (streaming/metrics.py) replace them. Skipping them is ~10% of faust's per-message cost.
    """

    def on_message_in(self, tp, offset, message) -> None:
        pass

    def on_stream_event_in(self, tp, offset, stream, event) -> None:
        return None

    def on_stream_event_out(self, tp, offset, stream, event, state=None) -> None:
        pass

    def on_message_out(self, tp, offset, message) -> None:
        pass
