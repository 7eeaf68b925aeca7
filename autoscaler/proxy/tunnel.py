"""WebSockets through the proxy: the handshake is forwarded, then bytes flow both ways.

The proxy does not terminate WebSockets. It forwards the client's handshake (with its
``Sec-WebSocket-*`` headers) to the machine on a connection of its own, relays the
machine's ``101`` and from then on copies bytes in both directions, as nginx and Go's
``httputil.ReverseProxy`` do. Subprotocols, extensions, messages of any size and close
codes therefore pass end to end, untouched and without a copy into message objects.

The proxy reads the frame headers going by (payloads are skipped, not parsed) for one
reason: on shutdown it closes open WebSockets properly, with a close frame 1001 ("going
away") sent to each side at a frame boundary, so clients know to reconnect elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from typing import cast

import httptools

from autoscaler.proxy.h1 import Connection

GOING_AWAY = 1001
_HEAD_LIMIT = 64 * 1024


class HandshakeError(Exception):
    """The machine's answer to the handshake was not HTTP, or too large."""


class ConnectFailed(Exception):
    """No connection to the machine (refused, unreachable, timed out): nothing was sent."""


class FrameCursor:
    """Where WebSocket frames end in one direction of a stream: headers are read, payloads
    skipped, so a frame can be slipped in between two of them."""

    __slots__ = ("_head", "_left")

    def __init__(self) -> None:
        self._head = b""
        self._left = 0

    @property
    def at_boundary(self) -> bool:
        return self._left == 0 and not self._head

    def advance(self, data: bytes, stop_at_boundary: bool = False) -> int:
        """Move over ``data``; return how much was moved over, which is less than all of
        it only with ``stop_at_boundary`` (then the offset of the first frame boundary)."""
        i, n = 0, len(data)
        while i < n:
            if stop_at_boundary and self.at_boundary:
                return i
            if self._left:
                step = min(self._left, n - i)
                self._left -= step
                i += step
                continue
            had = len(self._head)
            buf = self._head + data[i : i + 14]
            size = _header_size(buf)
            if size is None or len(buf) < size:
                self._head = buf  # the rest of the header comes with the next read
                return n
            self._head = b""
            length = buf[1] & 0x7F
            if length == 126:
                length = struct.unpack_from("!H", buf, 2)[0]
            elif length == 127:
                length = struct.unpack_from("!Q", buf, 2)[0]
            self._left = length
            i += size - had
        return i


def _header_size(buf: bytes) -> int | None:
    if len(buf) < 2:
        return None
    length = buf[1] & 0x7F
    size = 2 + (2 if length == 126 else 8 if length == 127 else 0)
    return size + 4 if buf[1] & 0x80 else size


def close_frame(code: int, masked: bool) -> bytes:
    """A close frame with ``code``; frames from a client (to the machine) are masked."""
    payload = struct.pack("!H", code)
    if not masked:
        return b"\x88\x02" + payload
    mask = os.urandom(4)
    return b"\x88\x82" + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Upstream(asyncio.Protocol):
    """The machine's side: first its answer to the handshake, then tunnel bytes."""

    def __init__(self, max_field_size: int) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.tail = b""
        self.answered: asyncio.Future[None] = loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._size = 0
        self._max_field_size = max_field_size
        self._tunnel: Tunnel | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.from_upstream(data)
            return
        if self.answered.done():
            return  # a refused handshake's body: not relayed
        self._size += len(data)
        try:
            if self._size > _HEAD_LIMIT:
                raise HandshakeError("the machine's answer head is too large")
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.tail = data[upgrade.args[0] :]
            self._answer(None)
        except (httptools.HttpParserError, HandshakeError) as exc:
            self._answer(HandshakeError(f"bad answer from the machine: {exc}"))

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > self._max_field_size:
            raise HandshakeError("header field too large")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if self.status != 101:
            self._answer(None)  # refused: the caller answers 502 and closes

    def _answer(self, exc: BaseException | None) -> None:
        if not self.answered.done():
            if exc is None:
                self.answered.set_result(None)
            else:
                self.answered.set_exception(exc)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._answer(ConnectionResetError("the machine closed the connection"))
        if self._tunnel is not None:
            self._tunnel.closed()

    def pause_writing(self) -> None:
        if self._tunnel is not None:
            self._tunnel.client.pause_tunnel()

    def resume_writing(self) -> None:
        if self._tunnel is not None:
            self._tunnel.client.resume_tunnel()


async def handshake(
    host: str, port: int, head: bytes, connect_timeout_s: float, max_field_size: int
) -> Upstream:
    """Connect to the machine, send the handshake, wait for the head of its answer.

    Raises :class:`ConnectFailed` when nothing was sent, ``ConnectionError`` for a
    connection lost before the answer, :class:`HandshakeError` for an answer that is not
    HTTP.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout_s):
            _, upstream = await loop.create_connection(lambda: Upstream(max_field_size), host, port)
    except (OSError, TimeoutError) as exc:
        raise ConnectFailed(str(exc) or type(exc).__name__) from exc
    try:
        assert upstream.transport is not None
        upstream.transport.write(head)
        await upstream.answered
    except BaseException:
        if upstream.transport is not None:
            upstream.transport.abort()
        raise
    return upstream


class Tunnel:
    """Bytes both ways between a client connection and a machine, until either closes."""

    def __init__(self, client: Connection, upstream: Upstream) -> None:
        self.client = client
        self.upstream = upstream
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._to_client = FrameCursor()  # frames from the machine
        self._to_upstream = FrameCursor()  # frames from the client
        self._going_away = False
        self._client_told = False
        self._upstream_told = False

    async def run(self) -> None:
        """Relay until one side closes, then close the other; returns when both are."""
        upstream = self.upstream
        assert upstream.transport is not None
        early = self.client.start_tunnel(self.from_client, self.closed)
        upstream._tunnel = self
        self.client.on_writable = self._client_writable
        if upstream.tail:
            self.from_upstream(upstream.tail)
        for data in early:
            self.from_client(data)
        if upstream.transport.is_closing():
            self.closed()
        try:
            await self._done
        finally:
            self.client.on_writable = None
            upstream.transport.close()
            self.client.close()

    def from_client(self, data: bytes) -> None:
        transport = self.upstream.transport
        if transport is None or self._upstream_told:
            return
        if self._going_away:
            cut = self._to_upstream.advance(data, stop_at_boundary=True)
            transport.write(data[:cut])
            if self._to_upstream.at_boundary:
                self._tell_upstream()
            return
        self._to_upstream.advance(data)
        transport.write(data)

    def from_upstream(self, data: bytes) -> None:
        if self._client_told:
            return
        if self._going_away:
            cut = self._to_client.advance(data, stop_at_boundary=True)
            self.client.write(data[:cut])
            if self._to_client.at_boundary:
                self._tell_client()
            return
        self._to_client.advance(data)
        self.client.write(data)

    def _client_writable(self, writable: bool) -> None:
        transport = self.upstream.transport
        if transport is None:
            return
        with contextlib.suppress(RuntimeError, NotImplementedError):
            if writable:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def closed(self) -> None:
        """One side's socket closed: the tunnel is over."""
        if not self._done.done():
            self._done.set_result(None)

    def going_away(self) -> None:
        """Shutting down: send both sides a close frame 1001 at their next frame boundary."""
        self._going_away = True
        if self._to_client.at_boundary:
            self._tell_client()
        if self._to_upstream.at_boundary:
            self._tell_upstream()

    def _tell_client(self) -> None:
        if not self._client_told:
            self._client_told = True
            self.client.write(close_frame(GOING_AWAY, masked=False))
            self._maybe_done()

    def _tell_upstream(self) -> None:
        transport = self.upstream.transport
        if not self._upstream_told and transport is not None:
            self._upstream_told = True
            transport.write(close_frame(GOING_AWAY, masked=True))
            self._maybe_done()

    def _maybe_done(self) -> None:
        if self._client_told and self._upstream_told:
            self.closed()  # run() closes both sockets once their close frames are out
