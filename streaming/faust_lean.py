"""faust without the per-message work this worker does not need.

The transport: faust's aiokafka transport with a drain loop that does not start four asyncio tasks per message.

faust's `Consumer._drain_messages` hands every fetched message to the conductor through
`wait_first(callback(message), suspend_flow.wait())`, which wraps the callback, the suspend event and the
service's stopped/crashed events in four new tasks and an `asyncio.wait`, only to notice a rebalance that
starts while a message is being delivered. That is most of faust's per-message cost on this worker
(bench/RESULTS.md). This loop awaits the callback directly and checks the suspend flag before each message
instead: a rebalance that begins mid-batch stops delivery at the next message; the rest is neither acked nor
committed, and is fetched again by whoever owns its partition afterwards. Everything else (read offsets, gap
tracking, count-triggered commits, stop and error handling) is faust's own logic, unchanged.

Redelivery is safe here by design: the worker's writes are idempotent by `txn_id`.

Also here: a schema that hands the agent raw bytes, and a Monitor without its per-message hooks.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

import faust
from faust.sensors.monitor import Monitor
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TransportT


class LeanDrainConsumer(faust_aiokafka.Consumer):
    async def _drain_messages(self, fetcher) -> None:  # pragma: no cover - exercised by the stream worker tests
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        suspended = self.suspend_flow.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag, unset_flag = self.diag.set_flag, self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        sleep = asyncio.sleep
        yield_every, since_yield = 100, 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                batch = getmany(timeout=1.0)
                await sleep(0)  # getmany can return at once, loop after loop: let other tasks run
                if self.should_stop:
                    continue
                async for tp, message in batch:
                    since_yield += 1
                    if since_yield > yield_every:
                        await sleep(0)
                        since_yield = 0
                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    if r_offset is not None and offset < r_offset:
                        continue  # already delivered before a seek back; faust drops these too
                    if r_offset and offset - r_offset > 1 and acks_enabled_for(message.topic):
                        await self._add_gap(tp, r_offset + 1, offset)
                    if commit_every is not None and self._n_acked >= commit_every:
                        self._n_acked = 0
                        await self.commit()
                    if suspended():
                        break  # a rebalance began: deliver nothing more from this fetch
                    await callback(message)
                    set_read_offset(tp, offset)
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


class LeanDrainTransport(faust_aiokafka.Transport):
    Consumer: ClassVar = LeanDrainConsumer


class LeanDrainApp(faust.App):
    """A faust App whose consumer uses the lean drain loop; everything else is stock faust."""

    def _new_transport(self) -> TransportT:
        return LeanDrainTransport(self.conf.broker_consumer, self)


class RawBytesSchema(faust.Schema):
    """Key and value reach the agent as the bytes on the wire.

    The agent validates and parses them itself (featurestore.events), so faust's per-message codec lookup is
    skipped, and a message faust could not decode cannot bypass the dead-letter path.
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
