"""uvicorn's httptools protocol, with each response's head and body leaving in one socket write.

uvicorn writes a response's status line and headers (`http.response.start`) in one `transport.write` and the body
in another: two `send()` system calls per answer, and on loopback each of them runs the peer's TCP receive path
and wakes the peer, so the client is woken twice for one answer. Here a write that starts a response (`HTTP/1.1
...`) is held and sent together with the next write, which for every non-streaming answer comes in the same
event-loop turn; if none comes in that turn (a streaming response that waits between its parts), the held head
leaves at the end of the turn on its own. Bytes, their order and every other transport call are unchanged.

`velocity serve` uses it (`http=`), and so does the serving bench (`--http serving.http_protocol:HttpProtocol`).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_HEAD = b"HTTP/1.1 "


class CoalescingTransport:
    """A transport proxy that holds a response head until the body's write (or the end of the loop turn)."""

    __slots__ = ("_transport", "_loop", "_held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif data[:9] == _HEAD and not self._transport.is_closing():
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Send a held head now (the end of the loop turn, or before the transport closes)."""
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def writelines(self, chunks) -> None:
        self.write(b"".join(chunks))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` over a `CoalescingTransport` (one write per answer)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))
