"""The asyncio Redis client writes a command in the caller's step (stores/redis_async_client.py), on a private
real redis-server: the stream worker's next batch is prepared while Redis already runs the current one, and a
Redis that stops answering still fails a call within the socket timeout."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from featurestore.config import RedisSettings
from tests.helpers import wait_until
from tests.test_serving import _port_open, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def private_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (make install installs it)")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: _port_open(port), timeout=10, what="redis-server")
    yield proc, RedisSettings(port=port, socket_timeout_s=1.0)
    os.kill(proc.pid, signal.SIGCONT)
    proc.terminate()
    proc.wait(10)


def _seen_while_blocking(client: aioredis.Redis, port: int, key: str, block_s: float) -> bool:
    """Starts SET key as a task, lets it take one step, then blocks the event loop (as a batch's CPU work does)
    polling Redis from a second, synchronous client: did the command reach Redis before the loop was free?"""
    probe = redis.Redis(port=port)

    async def scenario() -> bool:
        await client.ping()  # connected: the write path under test, not the connect
        task = asyncio.create_task(client.set(key, "1"))
        await asyncio.sleep(0)
        deadline = time.monotonic() + block_s
        seen = False
        while time.monotonic() < deadline and not seen:  # no await: the loop stays blocked
            seen = bool(probe.exists(key))
        await task
        assert probe.get(key) == b"1"
        await client.aclose()
        return seen

    try:
        return asyncio.run(scenario())
    finally:
        probe.close()


def test_the_stores_client_sends_a_command_before_the_caller_yields(private_redis):
    from stores.redis_online import AsyncOnlineStore

    _, settings = private_redis
    store = AsyncOnlineStore(settings, prefix="t")
    assert _seen_while_blocking(store.redis, settings.port, "inline", block_s=2.0), (
        "the command only reached Redis after the event loop was free: Redis idles while the worker prepares")


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="Python 3.12's wait_for no longer starts a task")
def test_the_stock_client_with_a_socket_timeout_sends_only_after_the_caller_yields(private_redis):
    """The control: why the module exists (on the Python 3.11 this project pins, with redis-py's own write)."""
    _, settings = private_redis
    stock = aioredis.Redis(**settings.client_kwargs())
    assert not _seen_while_blocking(stock, settings.port, "stock", block_s=0.3)


@pytest.mark.timeout(60)
def test_a_stopped_redis_fails_a_write_or_a_read_within_the_socket_timeout_then_recovers(private_redis):
    """One connection, no client retries: a write that cannot drain and a reply that never comes each fail in
    about the socket timeout (1 s here); once Redis runs again the client answers."""
    from stores.redis_async_client import async_redis

    proc, settings = private_redis
    client = async_redis(settings)
    big = b"x" * (64 << 20)  # more than the socket buffers hold: the write itself must wait, and time out

    async def timed(call) -> float:
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await call
        return time.monotonic() - started

    async def scenario() -> list[float]:
        writer, reader = client.connection_pool.make_connection(), client.connection_pool.make_connection()
        await writer.connect()
        await reader.connect()
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            took = [await timed(writer.send_packed_command(writer.pack_command("SET", "k", big)))]
            await reader.send_packed_command(reader.pack_command("PING"))  # a few bytes: sent at once
            took.append(await timed(reader.read_response()))
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert not writer.is_connected, "a half-written command must not be reused"
        assert await client.set("k", b"back")
        assert await client.get("k") == b"back"
        await client.aclose()
        return took

    took = asyncio.run(scenario())
    assert all(0.9 <= t <= 2.5 for t in took), took
