"""WebSockets through the proxy: the handshake is forwarded, then bytes flow both ways.

The proxy does not terminate WebSockets. It forwards the client's handshake (with its
``Sec-WebSocket-*`` headers) to the machine like any request (:mod:`.upstream`), relays
the machine's ``101``, takes that connection out of the pool and from then on copies bytes
in both directions, as nginx and Go's
``httputil.ReverseProxy`` do. Subprotocols, extensions, messages of any size and close
codes therefore pass end to end, untouched and without a copy into message objects.

The proxy reads the frame headers going by (payloads are skipped, not parsed) for two
reasons. On shutdown or a drain it closes open WebSockets properly, with a close frame 1001
("going away") sent to each side at a frame boundary, so clients know to reconnect
elsewhere; unless a close frame went by already: that closing handshake is left to its two
ends (RFC 6455 allows one close frame each way). And only data frames (text, binary,
continuation) count as use of a WebSocket: control frames (ping, pong) are what keeps a
connection alive, not what makes it busy (``connection_idle_s``).
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable

from autoscaler.proxy import upstream
from autoscaler.proxy.h1 import Connection

GOING_AWAY = 1001
# How long a tunnel stays open for the machine's last bytes once the client sent FIN.
EOF_LINGER_S = 2.0
# How long a closing handshake may take once a close frame went by, either way: a side that
# never answers (or never closes its socket after) would hold both sockets for good. The
# close timeout of aiohttp's and of the websockets library's WebSockets.
CLOSE_TIMEOUT_S = 10.0


class FrameCursor:
    """Where WebSocket frames end in one direction of a stream: headers are read, payloads
    skipped, so a frame can be slipped in between two of them; and which kind of frame
    the bytes moved over belong to."""

    __slots__ = ("_data", "_head", "_left", "closing", "moved_data")

    def __init__(self) -> None:
        self._head = b""
        self._left = 0
        self._data = False  # the payload under way is a data frame's
        self.moved_data = False
        """Whether the last ``advance`` moved over a byte of a data frame (text, binary,
        continuation), not only of control frames (ping, pong, close)."""
        self.closing = False
        """Whether a close frame began here: this side started or answered a closing
        handshake, and sends no more frames."""

    @property
    def at_boundary(self) -> bool:
        return self._left == 0 and not self._head

    def advance(self, data: bytes, stop_at_boundary: bool = False) -> int:
        """Move over ``data``; return how much was moved over, which is less than all of
        it only with ``stop_at_boundary`` (then the offset of the first frame boundary)."""
        i, n = 0, len(data)
        moved_data = False
        while i < n:
            if stop_at_boundary and self.at_boundary:
                break
            if self._left:
                step = min(self._left, n - i)
                self._left -= step
                i += step
                moved_data = moved_data or self._data
                continue
            had = len(self._head)
            buf = self._head + data[i : i + 14]
            # The first byte says which frame this is: FIN, RSV1-3, then the opcode, whose
            # high bit marks a control frame (0x8 close, 0x9 ping, 0xA pong).
            opcode = buf[0] & 0x0F
            self._data = not opcode & 0x08
            moved_data = moved_data or self._data
            if opcode == 0x08:
                self.closing = True
            size = _header_size(buf)
            if size is None or len(buf) < size:
                self._head = buf  # the rest of the header comes with the next read
                i = n
                break
            self._head = b""
            length = buf[1] & 0x7F
            if length == 126:
                length = struct.unpack_from("!H", buf, 2)[0]
            elif length == 127:
                length = struct.unpack_from("!Q", buf, 2)[0]
            self._left = length
            i += size - had
        self.moved_data = moved_data
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


class Tunnel:
    """Bytes both ways between a client connection and a machine, until either closes."""

    def __init__(
        self, client: Connection, machine: upstream.Connection, machine_id: str = ""
    ) -> None:
        self.client = client
        self.machine = machine
        self.machine_id = machine_id
        self.app = ""
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = self._loop.create_future()
        self.last_active = self._loop.time()
        """When a data frame last went either way (an idle WebSocket stops counting as
        load; pings and pongs do not make it busy)."""
        self.dormant = False
        self.on_dormant: Callable[[], None] | None = None
        """Called when the proxy finds it idle for ``connection_idle_s``."""
        self.on_active: Callable[[], None] | None = None
        """Called when data frames flow again on a dormant tunnel."""
        self._to_client = FrameCursor()  # frames from the machine
        self._to_machine = FrameCursor()  # frames from the client
        self._going_away = False
        self._client_told = False
        self._machine_told = False
        self._machine_eof = False  # the client's FIN passed on: nothing more goes there
        self._closing = False  # a close frame went by: the handshake's timeout runs
        self._timers: list[asyncio.TimerHandle] = []  # deadlines that end the tunnel
        self._client_fin = False

    async def run(self) -> None:
        """Relay until one side closes, then close the other; returns when both are."""
        machine, client = self.machine, self.client
        early_from_client = client.start_tunnel(self.from_client, self.closed, self.client_eof)
        early_from_machine, machine.early = machine.early, []
        machine.on_data = self.from_machine
        machine.on_closed = self.closed
        machine.on_writable = self._machine_writable
        client.on_writable = self._client_writable
        for data in early_from_machine:
            self.from_machine(data)
        for data in early_from_client:
            self.from_client(data)
        if not machine.reusable:
            self.closed()
        try:
            await self._done
        finally:
            for timer in self._timers:  # (each held the tunnel, both sockets and all)
                timer.cancel()
            client.on_writable = machine.on_writable = None
            machine.close()
            client.close()

    def from_client(self, data: bytes) -> None:
        if not self._machine_told and self.machine.reusable:
            self._pass(data, self._to_machine, self.machine.write, self._tell_machine)
        elif self._client_told:
            self._to_machine.advance(data)  # dropped: only the client's close is looked for
        if self._client_told and self._machine_told and self._to_machine.closing:
            self.closed()  # the client answered our close (RFC 6455 7.1.1)

    def from_machine(self, data: bytes) -> None:
        if not self._client_told:
            self._pass(data, self._to_client, self.client.write, self._tell_client)

    def _touch(self) -> None:
        self.last_active = self._loop.time()
        if self.dormant:
            self.dormant = False
            if self.on_active is not None:
                self.on_active()

    def _pass(
        self,
        data: bytes,
        cursor: FrameCursor,
        write: Callable[[bytes], None],
        tell: Callable[[], None],
    ) -> None:
        """Relay ``data`` one way; shutting down, only up to the end of the frame under way,
        then the close frame (``tell``)."""
        if self._going_away:
            cut = cursor.advance(data, stop_at_boundary=True)
            write(data[:cut])
            if cursor.at_boundary:
                tell()
                cursor.advance(data[cut:])  # not relayed: read for a close frame only
        else:
            cursor.advance(data)
            write(data)
        if cursor.moved_data:
            self._touch()
        if cursor.closing and not self._closing:
            self._closing = True
            self._timers.append(self._loop.call_later(CLOSE_TIMEOUT_S, self.closed))

    # Flow control: a side that cannot take more stops reading from the other.

    def _client_writable(self, writable: bool) -> None:
        if writable:
            self.machine.resume_reading(self)
        else:
            self.machine.pause_reading(self)

    def _machine_writable(self, writable: bool) -> None:
        if writable:
            self.client.resume_reading(self)
        else:
            self.client.pause_reading(self)

    def client_eof(self) -> None:
        """The client sent FIN, after a close frame or (a process gone) without one: the
        machine hears it as EOF, and the tunnel ends once the machine closes, or
        ``EOF_LINGER_S`` later. Left half-open, an idle WebSocket would hold its slot and
        both sockets for good."""
        self._client_fin = True
        if self._client_told and self._machine_told:
            self.closed()  # our close went out both ways: the client is done too
            return
        transport = self.machine.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:  # the machine reset the connection: the tunnel is over
                self.closed()
                return
            self._machine_eof = True
        self._timers.append(self._loop.call_later(EOF_LINGER_S, self.closed))

    def closed(self) -> None:
        """One side's socket closed: the tunnel is over."""
        if not self._done.done():
            self._done.set_result(None)

    def going_away(self) -> None:
        """Shutting down: send both sides a close frame 1001 at their next frame boundary.

        Unless a close frame went by already: the closing handshake is under way, and a
        second close would break it (to the side that got one, a second close frame; to
        the other, a close that is not its peer's). Its two ends finish it, and the tunnel
        ends when a side closes its socket then, or ``EOF_LINGER_S`` later."""
        if self._to_client.closing or self._to_machine.closing:
            self._timers.append(self._loop.call_later(EOF_LINGER_S, self.closed))
            return
        self._going_away = True
        if self._to_client.at_boundary:
            self._tell_client()
        if self._to_machine.at_boundary:
            self._tell_machine()

    def _tell_client(self) -> None:
        if not self._client_told:
            self._client_told = True
            self.client.write(close_frame(GOING_AWAY, masked=False))
            self._maybe_done()

    def _tell_machine(self) -> None:
        if not self._machine_told and self.machine.reusable:
            self._machine_told = True
            if not self._machine_eof:  # (after the client's FIN it hears nothing more)
                self.machine.write(close_frame(GOING_AWAY, masked=True))
            self._maybe_done()

    def _maybe_done(self) -> None:
        """Our close went out both ways: the machine's side is done, and the client's ends
        with its answering close frame, its FIN or ``EOF_LINGER_S`` later (RFC 6455 7.1.1).
        Closed at once, a client that sent a frame before reading ours found its socket
        reset (aiohttp: "Cannot write to closing transport")."""
        if self._client_told and self._machine_told:
            self.machine.on_closed = None  # the machine closing after our close is expected
            if self._client_fin or self._to_machine.closing:
                self.closed()
            else:
                self._timers.append(self._loop.call_later(EOF_LINGER_S, self.closed))
