"""The API's I/O economies (issue 14): one socket write per HTTP answer, and handed-over transactions reaching
Kafka in flushes, without changing a byte, an order or a failure count."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from tests.helpers import topic_messages, wait_until


class _Recording:
    """The transport side the proxy writes to: what was written, in order (a real object, not a mock)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default


@pytest.mark.unit

async def connected(pub, within_s: float = 30.0) -> None:
    """Wait until the publisher's producer is up (the broker may take a moment to give a fresh topic a leader)."""
    for _ in range(int(within_s / 0.05)):
        if pub.state == "connected":
            return
        await asyncio.sleep(0.05)

def test_a_response_head_leaves_with_its_body_or_at_the_end_of_the_loop_turn():
    from serving.http_protocol import CoalescingTransport

    async def scenario():
        loop = asyncio.get_running_loop()
        raw = _Recording()
        t = CoalescingTransport(raw, loop)
        head, body = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n", b"{}"
        t.write(head)
        assert raw.writes == [], "the head waits for its body"
        t.write(body)
        assert raw.writes == [head + body], "head and body in one write"
        await asyncio.sleep(0)
        assert raw.writes == [head + body], "nothing sent twice"
        # A streaming answer whose body comes later: the head leaves at the end of this turn on its own.
        t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await asyncio.sleep(0)
        assert raw.writes[-1].startswith(b"HTTP/1.1 200 OK\r\ntransfer-encoding") and len(raw.writes) == 2
        t.write(b"5\r\nhello\r\n")  # not a head: straight through
        assert raw.writes[-1] == b"5\r\nhello\r\n" and len(raw.writes) == 3
        # Closing sends a held head first; other attributes are the transport's.
        t.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        t.close()
        assert raw.writes[-1] == b"HTTP/1.1 400 Bad Request\r\n\r\n" and raw.closed
        assert t.get_extra_info("peername") == ("127.0.0.1", 1)
        assert b"".join(raw.writes) == (head + body + b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                        + b"5\r\nhello\r\n" + b"HTTP/1.1 400 Bad Request\r\n\r\n")

    asyncio.run(scenario())


@pytest.mark.integration
def test_uvicorn_over_the_coalescing_protocol_answers_whole_and_streams_without_holding_the_head():
    """A real uvicorn server with the protocol `velocity serve` uses: a plain answer arrives complete, and a
    streaming answer's head reaches the client before its body is even produced."""
    import uvicorn

    from serving.http_protocol import HttpProtocol

    release = threading.Event()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await receive()
        if scope["path"] == "/plain":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]})
            await send({"type": "http.response.body", "body": b'{"ok":true}'})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        while not release.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"late"})

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=HttpProtocol, loop="asyncio",
                                          lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=20, what="uvicorn to start")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"GET /plain HTTP/1.1\r\nHost: t\r\n\r\n")
            got = b""
            while not got.endswith(b'{"ok":true}'):
                got += c.recv(4096)
            assert got.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 11\r\n" in got
            c.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
            c.settimeout(3)
            head = c.recv(4096)  # the body is not sent until we say so: only a head not held back arrives
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n"), head
            release.set()
            rest = b""
            while b"late" not in rest:
                rest += c.recv(4096)
    finally:
        release.set()
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.integration
def test_handed_over_transactions_reach_kafka_in_answer_order_and_degraded_ones_are_held_behind(services,
                                                                                              make_topic):
    """With a linger, handed-over messages are PUBLISHED at once and reach Kafka within the linger, each card's in
    the order published; a wait=True publish goes after them; while the producer is degraded, the ones not yet
    flushed are held before the new one (counted once each) and republished in that order."""
    from serving.publisher import PUBLISHED, QUEUED, Publisher

    topic = make_topic("pubflush", partitions=4)
    reasons: list[str] = []
    keys = [f"card-{i}".encode() for i in range(8)]

    async def scenario():
        pub = Publisher(services["bootstrap"], send_timeout_s=5, on_failure=reasons.append, linger_ms=20)
        await pub.start()
        try:
            await connected(pub)
            outcomes = [await pub.publish(topic, keys[i % 8], b"a%d" % i, wait=False) for i in range(40)]
            assert outcomes == [PUBLISHED] * 40 and len(pub._pending) == 40, "handed over, flushed later"
            assert await pub.publish(topic, keys[0], b"waited", wait=True) == PUBLISHED  # the 40 went first
            assert not pub._pending
            t0 = time.monotonic()
            assert await pub.publish(topic, keys[1], b"b0", wait=False) == PUBLISHED
            while pub._pending:
                await asyncio.sleep(0.002)
            assert time.monotonic() - t0 < 1.0, "flushed within the linger (plus scheduling)"
            assert await pub.publish(topic, keys[2], b"c0", wait=False) == PUBLISHED
            assert await pub.publish(topic, keys[2], b"c1", wait=False) == PUBLISHED
            pub.healthy = False  # as after a failed delivery: c0, c1 (not flushed yet) are held before c2
            assert await pub.publish(topic, keys[2], b"c2", wait=False) == QUEUED
            assert pub.hold.depth == 3 and not pub._pending
            for _ in range(600):
                if pub.hold.depth == 0 and pub.healthy:
                    break
                await asyncio.sleep(0.05)
            assert pub.republished == 3
            assert reasons == ["kafka_degraded"] * 3, reasons
        finally:
            await pub.stop()

    asyncio.run(scenario())
    got = wait_until(lambda: (m := topic_messages(services["bootstrap"], topic, idle_ms=1500)) and len(m) >= 45
                     and m, timeout=60, what="45 messages")
    assert len(got) == 45
    by_key: dict[bytes, list[bytes]] = {}
    for m in sorted(got, key=lambda m: (m.partition, m.offset)):
        by_key.setdefault(m.key, []).append(m.value)
    assert by_key[keys[0]] == [b"a%d" % i for i in range(0, 40, 8)] + [b"waited"]
    assert by_key[keys[1]] == [b"a%d" % i for i in range(1, 40, 8)] + [b"b0"]
    assert by_key[keys[2]] == [b"a%d" % i for i in range(2, 40, 8)] + [b"c0", b"c1", b"c2"]
    for k in keys[3:]:
        i = int(k.decode().rsplit("-", 1)[1])
        assert by_key[k] == [b"a%d" % j for j in range(i, 40, 8)]
    assert len({m.partition for m in got}) > 1, "the keys spread over partitions"


@pytest.mark.integration
def test_handed_over_transactions_not_yet_flushed_are_held_when_the_publisher_stops(services, make_topic):
    """Stopping with messages inside the linger: they reach Kafka (the stop flushes them), none is lost."""
    from serving.publisher import PUBLISHED, Publisher

    topic = make_topic("pubstop", partitions=2)

    async def scenario():
        pub = Publisher(services["bootstrap"], send_timeout_s=5, linger_ms=10_000)
        await pub.start()
        for _ in range(600):
            if pub.state == "connected":
                break
            await asyncio.sleep(0.05)
        assert [await pub.publish(topic, b"k", b"m%d" % i, wait=False) for i in range(5)] == [PUBLISHED] * 5
        await pub.stop()

    asyncio.run(scenario())
    got = wait_until(lambda: (m := topic_messages(services["bootstrap"], topic, idle_ms=1500)) and len(m) >= 5 and m,
                     timeout=60, what="5 messages")
    assert [m.value for m in got] == [b"m%d" % i for i in range(5)]


@pytest.mark.unit
def test_lean_metric_updates_expose_exactly_what_prometheus_client_would():
    """The hot path's lock-free counter and histogram updates against prometheus_client's own `inc`/`observe` on
    a second registry: the same /metrics text (bucket edges included), `_created` timestamps aside."""
    from prometheus_client import generate_latest

    from serving.metrics import ApiMetrics, lean

    fast, ref = ApiMetrics(), ApiMetrics()
    values = [0.0, 1e-9, 0.0001, 0.0005, 0.00051, 0.003, 0.0049, 0.0075, 0.01, 2.5, 2.6, 100.0]
    for v in values:
        fast.score_latency.observe(v)
        fast.stage_parse.observe(v)
        ref.latency.labels("/v1/score").observe(v)
        ref.stage.labels("parse").observe(v)
    lean(fast.requests.labels("/v1/score", "200")).inc()
    lean(fast.decisions.labels("FRAUD")).inc(3)
    ref.requests.labels("/v1/score", "200").inc()
    ref.decisions.labels("FRAUD").inc(3)

    def text(m):
        return [line for line in generate_latest(m.registry).decode().splitlines() if "_created" not in line]

    assert text(fast) == text(ref)
    assert 'velocity_api_request_seconds_bucket{endpoint="/v1/score",le="0.0005"} 4.0' in text(fast)


@pytest.mark.unit
def test_the_one_score_calibration_returns_exactly_what_the_models_calibration_does():
    """The scorer's one-score Platt calibration against `Calibration.apply` on a one-element array (what the scorer
    called before) at scores its own load-time check never saw; another method gets no one-score form."""
    import numpy as np

    from model.calibration import Calibration
    from serving.fastpredict import one_calibrator

    rng = np.random.default_rng(2026)
    for a, b in ((1.0871234, -0.3123), (0.25, 2.5), (3.9, -4.1)):
        cal = Calibration("platt", {"a": a, "b": b})
        one = one_calibrator(cal.apply)
        assert one is not None
        scores = np.concatenate([rng.random(3_000, dtype=np.float32), rng.random(1_000, dtype=np.float32) ** 12,
                                 np.float32(1) - rng.random(1_000, dtype=np.float32) ** 12])
        for s in scores.tolist():
            assert one(s) == float(cal.apply(np.array([s]))[0]), s
    isotonic = Calibration("isotonic", {"x": [0.0, 0.5, 1.0], "y": [0.0, 0.4, 1.0]})
    assert one_calibrator(isotonic.apply) is None


@pytest.mark.integration
def test_overlapping_flushes_keep_a_cards_order(services, make_topic):
    """Large messages fill the producer's batch, so a flush waits inside send() while the next linger expires: the
    later flush must not overtake it (one card, one partition: Kafka's order is the publish order)."""
    from serving.publisher import PUBLISHED, Publisher

    topic = make_topic("pubrace", partitions=1)
    n = 40

    async def scenario():
        pub = Publisher(services["bootstrap"], send_timeout_s=10, linger_ms=1)
        await pub.start()
        try:
            await connected(pub)
            for i in range(n):
                assert await pub.publish(topic, b"card", b"%03d" % i + b"x" * 9_000, wait=False) == PUBLISHED
                if i % 3 == 2:
                    await asyncio.sleep(0.0015)
            assert await pub.publish(topic, b"card", b"%03d" % n, wait=True) == PUBLISHED
        finally:
            await pub.stop()

    asyncio.run(scenario())
    got = wait_until(lambda: (m := topic_messages(services["bootstrap"], topic, idle_ms=1500)) and len(m) > n and m,
                     timeout=60, what=f"{n + 1} messages")
    assert [m.value[:3] for m in got] == [b"%03d" % i for i in range(n + 1)]
