"""WebSocket tunnel: where frames end (FrameCursor), close frames, and bytes end to end."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import struct
import types
from typing import cast

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from autoscaler.proxy import upstream
from autoscaler.proxy.h1 import Connection
from autoscaler.proxy.tunnel import GOING_AWAY, FrameCursor, Tunnel, close_frame

from .conftest import Backend, RawBackend, StartProxy, url

BOUND_S = 5  # an upper bound on any single exchange, never an expectation of speed

HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
"""A WebSocket handshake of a raw client, to app ``a``."""

# Payload lengths at each edge of the three length encodings: 7-bit (0..125), 16-bit
# (126..65535) and 64-bit (65536..).
LENGTHS = [0, 1, 125, 126, 127, 1000, 65535, 65536, 70000]


def frame(payload: bytes, *, masked: bool, opcode: int = 0x2, fin: bool = True) -> bytes:
    """One WebSocket frame as RFC 6455 section 5.2 lays it out."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", first, mask_bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not masked:
        return head + payload
    key = b"\x37\xfa\x21\x3d"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def header_size(n: int, masked: bool) -> int:
    return (2 if n < 126 else 4 if n < 65536 else 10) + (4 if masked else 0)


def payload(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


# --- FrameCursor ----------------------------------------------------------------------


def test_a_fresh_cursor_is_at_a_boundary() -> None:
    cursor = FrameCursor()
    assert cursor.at_boundary
    assert cursor.advance(b"") == 0
    assert cursor.at_boundary


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("n", LENGTHS)
def test_cursor_moves_over_a_whole_frame(n: int, masked: bool) -> None:
    data = frame(payload(n), masked=masked)
    assert len(data) == header_size(n, masked) + n
    cursor = FrameCursor()
    assert cursor.advance(data) == len(data)
    assert cursor.at_boundary


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("n", LENGTHS)
def test_cursor_is_inside_the_frame_until_its_last_byte(n: int, masked: bool) -> None:
    data = frame(payload(n), masked=masked)
    cursor = FrameCursor()
    assert cursor.advance(data[:-1]) == len(data) - 1
    assert not cursor.at_boundary
    assert cursor.advance(data[-1:]) == 1
    assert cursor.at_boundary


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("n", [0, 125, 126, 65535, 65536])
def test_header_split_byte_by_byte(n: int, masked: bool) -> None:
    data = frame(payload(n), masked=masked)
    size = header_size(n, masked)
    cursor = FrameCursor()
    for i in range(size):
        assert cursor.advance(data[i : i + 1]) == 1
        # Inside the header the cursor is never at a boundary; after its last byte only
        # an empty payload leaves it at one.
        assert cursor.at_boundary == (i == size - 1 and n == 0), i
    # The payload follows in reads of any size; the length came from the split header.
    rest = data[size:]
    for start in range(0, len(rest), 4096):
        assert not cursor.at_boundary
        piece = rest[start : start + 4096]
        assert cursor.advance(piece) == len(piece)
    assert cursor.at_boundary


def test_header_split_across_reads_of_mixed_sizes() -> None:
    """A 64-bit length header (10 bytes + 4 of mask) in reads of 1, 3, 5, then the rest."""
    data = frame(payload(70000), masked=True) + frame(b"tail", masked=True)
    cursor = FrameCursor()
    cuts = [0, 1, 4, 9, 14, 14 + 70000 - 1, len(data) - 3, len(data)]
    for a, b in itertools.pairwise(cuts):
        assert cursor.advance(data[a:b]) == b - a
        assert cursor.at_boundary == (b == len(data)), b
    assert cursor.at_boundary


def test_many_frames_in_one_read() -> None:
    frames = [frame(payload(n), masked=m) for n in LENGTHS for m in (False, True)]
    data = b"".join(frames)
    cursor = FrameCursor()
    assert cursor.advance(data) == len(data)
    assert cursor.at_boundary
    # The same stream in odd-sized reads lands on the same boundary.
    cursor = FrameCursor()
    for start in range(0, len(data), 7919):
        cursor.advance(data[start : start + 7919])
    assert cursor.at_boundary


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("n", [0, 125, 126, 65536])
def test_stop_at_boundary_returns_the_offset_after_the_current_frame(n: int, masked: bool) -> None:
    first = frame(payload(n), masked=masked)
    second = frame(payload(300), masked=masked)
    third = frame(b"x", masked=masked)
    stream = first + second + third

    # Mid-header of the first frame.
    cursor = FrameCursor()
    cursor.advance(stream[:1])
    assert not cursor.at_boundary
    assert cursor.advance(stream[1:], stop_at_boundary=True) == len(first) - 1
    assert cursor.at_boundary

    # Mid-payload of the second frame: stops right after it, not after the third.
    cursor = FrameCursor()
    cursor.advance(stream[: len(first) + 10])
    assert not cursor.at_boundary
    cut = cursor.advance(stream[len(first) + 10 :], stop_at_boundary=True)
    assert cut == len(second) - 10
    assert cursor.at_boundary
    # What follows the cut starts a frame: moving over it from there ends on a boundary.
    rest = stream[len(first) + 10 + cut :]
    assert rest == third
    assert cursor.advance(rest) == len(rest)
    assert cursor.at_boundary


def test_stop_at_boundary_at_a_boundary_moves_nowhere() -> None:
    data = frame(b"abc", masked=False)
    cursor = FrameCursor()
    assert cursor.advance(data, stop_at_boundary=True) == 0
    assert cursor.at_boundary
    cursor.advance(data)
    assert cursor.advance(data, stop_at_boundary=True) == 0


def test_stop_at_boundary_when_the_frame_does_not_end_in_this_read() -> None:
    data = frame(payload(1000), masked=True)
    cursor = FrameCursor()
    cursor.advance(data[:5])
    assert cursor.advance(data[5:500], stop_at_boundary=True) == 495
    assert not cursor.at_boundary
    assert cursor.advance(data[500:] + b"\x81\x00", stop_at_boundary=True) == len(data) - 500
    assert cursor.at_boundary


# --- which frames: data or control --------------------------------------------------

PING, PONG, CLOSE, TEXT, BINARY, CONTINUATION = 0x9, 0xA, 0x8, 0x1, 0x2, 0x0


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_pings_and_pongs_move_no_data(masked: bool) -> None:
    cursor = FrameCursor()
    control = frame(b"", masked=masked, opcode=PING) + frame(b"x" * 125, masked=masked, opcode=PONG)
    assert cursor.advance(control) == len(control)
    assert not cursor.moved_data
    assert cursor.at_boundary
    # Byte by byte, header and payload alike.
    for i in range(len(control)):
        cursor.advance(control[i : i + 1])
        assert not cursor.moved_data, i
    assert cursor.at_boundary


@pytest.mark.parametrize("opcode", [TEXT, BINARY, CONTINUATION])
@pytest.mark.parametrize("n", [0, 1, 126, 70000])
def test_a_data_frame_moves_data_in_every_read_it_spans(opcode: int, n: int) -> None:
    data = frame(payload(n), masked=True, opcode=opcode, fin=opcode != TEXT)
    cursor = FrameCursor()
    for start in range(0, len(data), 1000):
        cursor.advance(data[start : start + 1000])
        assert cursor.moved_data, start
    assert cursor.at_boundary
    # Its header alone, split: each piece is part of a data frame.
    cursor = FrameCursor()
    cursor.advance(data[:1])
    assert cursor.moved_data


def test_a_ping_between_the_fragments_of_a_message_moves_no_data_on_its_own() -> None:
    """A ping may come between two fragments of a message: the read that holds only the
    ping (or only part of it) moves no data; one that holds a fragment's byte does."""
    first = frame(b"a" * 300, masked=False, opcode=TEXT, fin=False)
    ping = frame(b"p" * 200, masked=False, opcode=PING)
    last = frame(b"b" * 300, masked=False, opcode=CONTINUATION)
    cursor = FrameCursor()
    assert cursor.advance(first + ping + last) == len(first + ping + last)
    assert cursor.moved_data
    cursor = FrameCursor()
    cursor.advance(first)
    assert cursor.moved_data
    cursor.advance(ping[:3])  # a split header
    assert not cursor.moved_data
    cursor.advance(ping[3:50])
    assert not cursor.moved_data
    cursor.advance(ping[50:])
    assert not cursor.moved_data
    cursor.advance(last[:1])
    assert cursor.moved_data
    cursor.advance(last[1:])
    assert cursor.moved_data
    assert cursor.at_boundary
    # A read that ends a data frame's payload and holds a ping: data moved.
    cursor = FrameCursor()
    cursor.advance(first[:-1])
    cursor.advance(first[-1:] + ping)
    assert cursor.moved_data


def test_closing_once_a_close_frame_begins() -> None:
    cursor = FrameCursor()
    others = b"".join(frame(b"x", masked=True, opcode=op) for op in (TEXT, PING, PONG, BINARY))
    cursor.advance(others)
    assert not cursor.closing
    close = close_frame(1000, masked=True)
    cursor.advance(close[:1])  # its first byte went by: the handshake is under way
    assert cursor.closing
    assert not cursor.moved_data
    cursor.advance(close[1:])
    assert cursor.closing
    assert cursor.at_boundary


def test_stop_at_boundary_does_not_move_over_a_close_frame_behind_the_cut() -> None:
    cursor = FrameCursor()
    data = frame(b"x" * 10, masked=False)
    cursor.advance(data[:5])
    rest = data[5:] + close_frame(1000, masked=False)
    assert cursor.advance(rest, stop_at_boundary=True) == len(data) - 5
    assert not cursor.closing


# --- close frames ---------------------------------------------------------------------


def test_unmasked_close_frame_is_exact() -> None:
    assert close_frame(GOING_AWAY, masked=False) == b"\x88\x02\x03\xe9"
    assert close_frame(1000, masked=False) == b"\x88\x02\x03\xe8"
    assert close_frame(4321, masked=False) == b"\x88\x02" + struct.pack("!H", 4321)


def test_masked_close_frame_decodes_to_its_code() -> None:
    data = close_frame(GOING_AWAY, masked=True)
    assert len(data) == 8
    assert data[0] == 0x88  # FIN + close
    assert data[1] == 0x80 | 2  # masked, two bytes of payload
    mask, masked_payload = data[2:6], data[6:]
    code = bytes(b ^ mask[i % 4] for i, b in enumerate(masked_payload))
    assert struct.unpack("!H", code)[0] == 1001
    cursor = FrameCursor()
    assert cursor.advance(data) == len(data)
    assert cursor.at_boundary


# --- through the proxy ----------------------------------------------------------------


def echo_ws_app(received: list[tuple[WSMsgType, int]]) -> web.Application:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=4 * 1024 * 1024)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.BINARY:
                received.append((msg.type, len(msg.data)))
                await ws.send_bytes(msg.data[::-1])
            elif msg.type is WSMsgType.TEXT:
                received.append((msg.type, len(msg.data)))
                await ws.send_str("echo:" + msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    return app


async def test_a_1mib_binary_message_passes_intact_both_ways(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    received: list[tuple[WSMsgType, int]] = []
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(echo_ws_app(received))]}]
    )
    message = os.urandom(1024 * 1024)
    async with (
        asyncio.timeout(BOUND_S),
        session.ws_connect(
            url(proxy, "/ws"), headers={"Host": "a.test"}, max_msg_size=4 * 1024 * 1024
        ) as ws,
    ):
        # Sent at once after the handshake, before anything was read from the machine.
        await ws.send_str("first words")
        await ws.send_bytes(message)
        assert await ws.receive_str() == "echo:first words"
        reply = await ws.receive_bytes()
        await ws.close()
    assert reply == message[::-1]
    assert received == [(WSMsgType.TEXT, 11), (WSMsgType.BINARY, len(message))]


async def test_a_frame_sent_with_the_handshake_is_relayed(
    backend: Backend, start_proxy: StartProxy
) -> None:
    """The client's first frame in the same write as its handshake: those bytes arrive
    before the machine's 101, and must wait for the tunnel rather than be lost."""
    received: list[tuple[WSMsgType, int]] = []
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(echo_ws_app(received))]}]
    )
    key = base64.b64encode(os.urandom(16))
    handshake = (
        b"GET /ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    hello = frame(b"early bird", masked=True, opcode=0x1)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(handshake + hello)
        await writer.drain()
        async with asyncio.timeout(BOUND_S):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
            first, second = await reader.readexactly(2)
            assert first == 0x81  # FIN + text, from the machine: unmasked
            assert second & 0x80 == 0
            text = await reader.readexactly(second & 0x7F)
            assert text == b"echo:early bird"
            writer.write(close_frame(1000, masked=True))
            await writer.drain()
            closing = await reader.readexactly(4)
            assert closing[:2] == b"\x88\x02"
            assert await reader.read(-1) == b""
    finally:
        writer.close()
        await writer.wait_closed()
    assert received == [(WSMsgType.TEXT, len(b"early bird"))]


async def test_going_away_waits_for_the_frame_in_flight_to_end(
    start_proxy: StartProxy, raw_backend: RawBackend
) -> None:
    """On shutdown, a frame the machine is halfway through reaches the client whole, and
    the close 1001 comes right after it, not inside it; the machine, whose side is at a
    boundary, gets its masked close 1001 at once."""
    told: list[bytes] = []
    after: list[bytes] = []
    half_sent, machine_done = asyncio.Event(), asyncio.Event()
    data = frame(payload(5000), masked=False)

    async def machine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n" + data[:1000]
            )
            await writer.drain()
            half_sent.set()
            told.append(await reader.readexactly(8))  # the proxy's close, mid our frame
            writer.write(data[1000:])
            await writer.drain()
            after.append(await reader.read(-1))
        finally:
            writer.close()
            machine_done.set()

    addr = await raw_backend(machine)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(HANDSHAKE)
        await writer.drain()
        async with asyncio.timeout(BOUND_S):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
            await half_sent.wait()
            assert await reader.readexactly(1000) == data[:1000]
            stopping = asyncio.create_task(proxy.stop())
            rest = await reader.read(-1)
            await stopping
            await machine_done.wait()
    finally:
        writer.close()
        await writer.wait_closed()
    assert rest == data[1000:] + b"\x88\x02\x03\xe9"
    # To the machine: one masked close 1001, then the end of the connection.
    (close,) = told
    assert close[:2] == b"\x88\x82"
    mask = close[2:6]
    assert bytes(b ^ mask[i % 4] for i, b in enumerate(close[6:])) == b"\x03\xe9"
    assert after == [b""]


@pytest.mark.parametrize("via", ["stop", "drain"])
async def test_going_away_after_the_clients_fin_does_not_write_past_the_eof(
    via: str, raw_backend: RawBackend, start_proxy: StartProxy
) -> None:
    """The client half-closed (FIN, passed on to the machine as EOF) and the machine is
    slow to close its side: a shutdown's or a drain's 1001 to the machine was written
    after write_eof() and raised, out of ProxyServer.stop (the listener never closed,
    the other WebSockets were not told) and out of the drain."""
    got_eof, done = asyncio.Event(), asyncio.Event()

    async def machine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n"
        )
        await writer.drain()
        await reader.read()  # the client's FIN, passed on
        got_eof.set()
        await done.wait()  # a machine slow to close its side

    addr = await raw_backend(machine)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(HANDSHAKE)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
        assert head.startswith(b"HTTP/1.1 101")
        writer.write_eof()
        await asyncio.wait_for(got_eof.wait(), BOUND_S)
        if via == "stop":
            await proxy.stop()
            assert not proxy.accepting
        else:
            assert proxy.end_long_lived("a", addr) == 1
        # The client still gets its 1001 (its side is open for reading).
        frame = await asyncio.wait_for(reader.readexactly(4), BOUND_S)
        assert frame == close_frame(GOING_AWAY, masked=False)
    finally:
        done.set()
        writer.close()


class _ResetTransport:
    """The machine's socket, reset before the loop heard of it: ``write_eof`` fails as
    the kernel's ``shutdown()`` does (ENOTCONN)."""

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        raise OSError(107, "Transport endpoint is not connected")


async def test_a_clients_fin_to_a_machine_that_reset_ends_the_tunnel() -> None:
    """Passing the client's FIN on must not raise out of the client's eof_received (the
    protocol callback), and the tunnel is over: nothing can reach the machine."""
    machine = types.SimpleNamespace(transport=_ResetTransport())
    tunnel = Tunnel(cast(Connection, None), cast(upstream.Connection, machine))
    tunnel.client_eof()
    assert tunnel._done.done()
