"""The scorer's feature read on one pipelined Redis connection: the online store's own read script, less client.

`AsyncOnlineStore.read_replies` (redis-py) costs ~250 us of CPU per call on the development machine; the same
EVALSHA written on a raw asyncio connection and parsed by hiredis costs ~90 us (measured side by side). The
script, its arguments (`stores.redis_online.read_request_args`) and the fold of its reply (`fold_read`) are the store's,
unchanged: only the transport differs, and a test checks that both give identical replies.

Requests from concurrent HTTP requests share the connection (Redis answers in order, a FIFO of futures matches
them). A request that times out leaves its future in the FIFO, cancelled, so later replies stay aligned; a lost
connection fails everything pending and the next read reconnects (bounded by the caller's timeout). A script
cache flushed by a Redis restart (NOSCRIPT) is answered by sending the script itself once.

Plain TCP with optional AUTH and SELECT; with TLS configured the scorer keeps redis-py (`usable`). Under Redis
Cluster (`usable` is False too) a reader built anyway hands its reads to the store's cluster read (one call per
master involved, in one pipeline), so it answers the same everywhere.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from collections.abc import Sequence

import hiredis

from featurestore.config import RedisSettings
from featurestore.definitions import REGISTRY, Registry
from stores.redis_online import _script, read_request_args


class RedisReplyError(RuntimeError):
    """Redis answered a command with an error (a script error: a bug, not an outage)."""


class RedisBusyError(ConnectionError):
    """Redis cannot serve now (loading its data set, busy with a long script, ...): an outage, like a timeout."""


#: Error replies that mean "Redis cannot serve us now" (loading, busy, failing over, or refusing our credentials:
#: a configuration problem, not the request's) rather than "this command is wrong".
_UNAVAILABLE = ("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS", "READONLY", "NOAUTH",
                "WRONGPASS", "NOPERM")


def check_reply(reply):
    if isinstance(reply, hiredis.ReplyError):
        text = str(reply)
        # A client that has not authenticated may send at most 10 arguments (the read script takes more): Redis
        # answers that with a protocol error instead of NOAUTH. Both are a refused connection, not a bad request.
        if text.startswith(_UNAVAILABLE) or text.startswith("ERR Protocol error: unauthenticated"):
            raise RedisBusyError(f"Redis: {text}")
        raise RedisReplyError(text)
    return reply


def encode_command(*parts) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        b = p if type(p) is bytes else str(p).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _fail_quietly(fut: asyncio.Future, exc: BaseException) -> None:
    """Fail a reply's future without asyncio logging "exception never retrieved" when nobody awaits it any more
    (the other replies of a batch whose first failure was already raised)."""
    fut.set_exception(exc)
    fut.exception()


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future | None = None
        #: Loop time since which a reply has been awaited without any arriving (None: nothing pending).
        self.waiting_since: float | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiters = self.waiters
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:  # garbage on the wire: nothing after it can be trusted
                self.transport.close()
                self._fail(ConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                self.waiting_since = asyncio.get_running_loop().time() if waiters else None
                return
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(reply)

    def connection_lost(self, exc) -> None:
        self._fail(ConnectionError(f"Redis connection lost: {exc or 'closed'}"))
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                _fail_quietly(fut, exc)

    def request(self, payload: bytes, replies: int = 1) -> list[asyncio.Future]:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("Redis connection closed")
        loop = asyncio.get_running_loop()
        if not self.waiters:
            self.waiting_since = loop.time()
        futs = [loop.create_future() for _ in range(replies)]
        self.waiters.extend(futs)
        self.transport.write(payload)
        return futs

    def stalled(self, limit_s: float) -> bool:
        """Replies have been awaited for longer than `limit_s` with none arriving."""
        since = self.waiting_since
        return since is not None and asyncio.get_running_loop().time() - since > limit_s

    def abort(self, reason: str) -> None:
        self._fail(ConnectionError(reason))
        self.transport.abort()


class ScriptReader:
    """`read_replies` of the online store's read script over one pipelined connection."""

    #: `read_replies(..., timeout_s=)` bounds its own wait (one sweep timer for all requests instead of an
    #: `asyncio.timeout` each: ~5% of a request's CPU).
    bounds_waits = True
    sweep_s = 0.02

    def __init__(self, settings: RedisSettings, prefix: str, registry: Registry = REGISTRY) -> None:
        self.settings = settings
        self.prefix = prefix
        self.registry = registry
        self.script = _script("read_features.lua").encode()
        self.sha = hashlib.sha1(self.script).hexdigest().encode()
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Task | None = None
        self._deadlines: collections.deque[tuple[float, asyncio.Future]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._cluster = None
        if settings.cluster:
            from stores.redis_online import AsyncOnlineStore

            self._cluster = AsyncOnlineStore(settings, prefix=prefix, registry=registry)

    @staticmethod
    def usable(settings: RedisSettings) -> bool:
        """This transport speaks plain TCP to one node (TLS and Redis Cluster stay with redis-py: under a cluster a
        read is one call per master involved, `stores.redis_cluster_ops`)."""
        return not settings.ssl and not settings.cluster

    async def _connect(self) -> _Protocol:
        s = self.settings
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(s.connect_timeout_s):
            _, proto = await loop.create_connection(_Protocol, s.host, s.port)
            try:
                setup = []
                if s.password is not None:
                    setup.append(encode_command(b"AUTH", s.username, s.password) if s.username
                                 else encode_command(b"AUTH", s.password))
                if s.db:
                    setup.append(encode_command(b"SELECT", s.db))
                if setup:
                    for reply in await asyncio.gather(*proto.request(b"".join(setup), len(setup))):
                        if isinstance(reply, hiredis.ReplyError):
                            raise ConnectionError(f"Redis refused the connection set-up: {reply}")
            except BaseException:
                proto.transport.close()
                raise
        return proto

    async def connection(self) -> _Protocol:
        proto = self._proto
        if proto is not None and not proto.transport.is_closing():
            if not proto.stalled(self.settings.socket_timeout_s):
                return proto
            # No reply for longer than the socket timeout (a half-open connection): start afresh, as redis-py does.
            proto.abort(f"no reply from Redis within {self.settings.socket_timeout_s:g} s")
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        # Several requests may wait for the same attempt; one timing out must not cancel it for the others.
        proto = self._proto = await asyncio.shield(self._connecting)
        return proto

    async def read_replies(self, requests: Sequence[tuple[str, str, int]], arrival_ms: int | None = None, *,
                           timeout_s: float | None = None) -> list:
        """The read script's raw replies for (card, txn_id, ts[, merchant]) requests, one round trip (as the
        store's): the card's windows and snapshot groups and the merchant's snapshot groups together.

        `timeout_s` bounds the wait for the replies (TimeoutError); a new connection is bounded by the settings'
        connect timeout."""
        if self._cluster is not None:
            async with asyncio.timeout(timeout_s):
                return await self._cluster.read_replies(requests, arrival_ms)
        proto = await self.connection()
        sha, prefix, registry = self.sha, self.prefix, self.registry
        if len(requests) == 1:
            futs = proto.request(encode_command(b"EVALSHA", sha, 0, *read_request_args(prefix, requests[0], arrival_ms,
                                                                                 registry)))
            if timeout_s is not None:
                self._bound(futs, timeout_s)
            replies = [await futs[0]]
        else:
            payload = b"".join(encode_command(b"EVALSHA", sha, 0, *read_request_args(prefix, r, arrival_ms, registry))
                               for r in requests)
            futs = proto.request(payload, len(requests))
            if timeout_s is not None:
                self._bound(futs, timeout_s)
            replies = list(await asyncio.gather(*futs))
        for i, reply in enumerate(replies):
            if isinstance(reply, hiredis.ReplyError):
                if not str(reply).startswith("NOSCRIPT"):
                    check_reply(reply)
                # The script cache was flushed (a Redis restart): EVAL sends the text and caches it again.
                futs = proto.request(encode_command(b"EVAL", self.script, 0,
                                              *read_request_args(prefix, requests[i], arrival_ms, registry)))
                if timeout_s is not None:
                    self._bound(futs, timeout_s)
                replies[i] = check_reply(await futs[0])
        return replies

    def _bound(self, futs: list[asyncio.Future], timeout_s: float) -> None:
        """Fail these futures with TimeoutError if still waiting after `timeout_s` (checked every `sweep_s`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self._deadlines.extend((deadline, f) for f in futs)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.sweep_s, self._sweep)

    def _sweep(self) -> None:
        """Fail the requests past their deadline; forget the answered ones (a few dozen entries at most)."""
        loop = asyncio.get_running_loop()
        now, waiting = loop.time(), collections.deque()
        for deadline, fut in self._deadlines:
            if fut.done():
                continue
            if deadline <= now:  # its reply, if it comes, is skipped (the protocol keeps its place in line)
                _fail_quietly(fut, TimeoutError("no reply from Redis in time"))
            else:
                waiting.append((deadline, fut))
        self._deadlines = waiting
        self._sweeper = loop.call_later(self.sweep_s, self._sweep) if waiting else None

    async def ping(self) -> bool:
        if self._cluster is not None:
            return await self._cluster.ping()
        proto = await self.connection()
        (fut,) = proto.request(encode_command(b"PING"))
        return check_reply(await fut) == b"PONG"

    async def close(self) -> None:
        if self._cluster is not None:
            await self._cluster.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()
            await asyncio.shield(proto.closed)
