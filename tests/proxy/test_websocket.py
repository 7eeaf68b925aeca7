"""WebSockets through the proxy: both directions, close codes, counted in flight while open."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import socket

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from testkit import until

from autoscaler.control.view import FleetView
from autoscaler.proxy import tunnel
from autoscaler.proxy.tunnel import close_frame

from .conftest import Backend, RawBackend, StartProxy, url
from .helpers import raw
from .test_tunnel import frame


def ws_app(seen_close: list[int | None]) -> web.Application:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat.v2",))
        await ws.prepare(request)
        await ws.send_str(f"hello {request.headers.get('X-Forwarded-For')}")
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                if msg.data == "bye":
                    await ws.close(code=4001, message=b"server says bye")
                    break
                await ws.send_str(msg.data.upper())
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        seen_close.append(ws.close_code)
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    return app


async def test_websocket_relay_both_ways_and_close_codes(
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
) -> None:
    seen_close: list[int | None] = []
    addr = await backend(ws_app(seen_close))
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    view = fleet.app("a")

    async with session.ws_connect(
        url(proxy, "/ws"), headers={"Host": "a.test"}, protocols=("chat.v1", "chat.v2")
    ) as ws:
        assert ws.protocol == "chat.v2"
        assert await ws.receive_str() == "hello 127.0.0.1"
        assert view.in_flight == 1  # an open WebSocket is a request in flight
        await ws.send_str("ping me")
        assert await ws.receive_str() == "PING ME"
        await ws.send_bytes(b"\x00\x01\x02")
        assert await ws.receive_bytes() == b"\x02\x01\x00"
        # The client closes with its own code; the machine must see that code.
        await ws.close(code=4321, message=b"client done")
    await until(lambda: bool(seen_close) and view.in_flight == 0)
    assert seen_close == [4321]

    async with session.ws_connect(url(proxy, "/ws"), headers={"Host": "a.test"}) as ws:
        await ws.receive_str()
        await ws.send_str("bye")
        msg = await ws.receive()
        assert msg.type is WSMsgType.CLOSE
        assert msg.data == 4001  # the machine's close code reaches the client
        assert msg.extra == "server says bye"
    await until(lambda: view.in_flight == 0)


HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


async def test_a_client_gone_without_a_close_frame_ends_the_tunnel(
    backend: Backend, start_proxy: StartProxy, fleet: FleetView
) -> None:
    """A killed process or a crashed tab sends FIN and no close frame: the machine must hear
    of it, and the slot must come back, though the machine would wait silently for ever."""
    machine_done = asyncio.Event()

    async def silent(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        try:
            await ws.send_str("hi")
            async for _ in ws:  # says nothing more: only the end of the stream ends this
                pass
        finally:  # (cancelled or not)
            machine_done.set()
        return ws

    app = web.Application()
    app.router.add_get("/ws", silent)
    addr = await backend(app)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    view = fleet.app("a")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(HANDSHAKE)
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            assert await reader.readexactly(4) == b"\x81\x02hi"
        assert view.in_flight == 1
        writer.write_eof()  # FIN, no close frame
        async with asyncio.timeout(10):
            await machine_done.wait()
            await reader.read()  # the proxy closed the client's side too
        await until(lambda: view.in_flight == 0)
    finally:
        writer.close()


async def test_stop_cuts_a_websocket_client_that_takes_nothing(
    backend: Backend, start_proxy: StartProxy
) -> None:
    """Its 1001 cannot go out behind the frames it never read, and a close() would wait
    for them for good (with Python 3.12's wait_closed(): stop() never returned). stop() must
    cut the socket. (This guards the outcome; the hang itself needs the machine idle at a
    frame boundary and Python 3.12, and was reproduced outside the suite.)"""

    async def burst(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(100000):  # 10 MB: more than the socket buffers hold
                await ws.send_str("x" * 100)
        await ws.receive()
        return ws

    app = web.Application()
    app.router.add_get("/ws", burst)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(app)]}],
        shutdown_timeout_s=0.5,
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proxy.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(HANDSHAKE)
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        clients = proxy._server.connections  # the listener's open client connections
        [client] = clients
        await until(lambda: client.writing_paused)  # the proxy holds bytes it cannot send
        async with asyncio.timeout(10):
            await proxy.stop()
        await until(lambda: not clients, timeout_s=5)  # the client read nothing meanwhile
    finally:
        writer.close()


async def test_a_handshake_under_way_when_stop_begins_gets_going_away_too(
    start_proxy: StartProxy, raw_backend: RawBackend, fleet: FleetView
) -> None:
    """stop() tells the open WebSockets 1001; one whose 101 comes later must hear it too,
    not be cut without a close frame at the deadline."""
    answer = asyncio.Event()

    async def late_101(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await answer.wait()
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        )
        await writer.drain()
        await reader.read()  # until the proxy closes

    addr = await raw_backend(late_101)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [addr]}], shutdown_timeout_s=5.0
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(HANDSHAKE)
        await writer.drain()
        await until(lambda: fleet.app("a").in_flight == 1)
        stopping = asyncio.create_task(proxy.stop())
        await until(lambda: not proxy.accepting)
        answer.set()
        async with asyncio.timeout(4):  # well before the 5 s deadline would cut it
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            assert await reader.readexactly(4) == b"\x88\x02\x03\xe9"  # close, 1001
            await stopping
    finally:
        writer.close()


async def test_a_refused_handshake_gets_the_machines_own_answer(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    """A machine that answers a handshake with something else than 101 (401 to ask for
    credentials, 426, a plain page) is heard as it answered, as nginx relays it."""

    async def login_first(request: web.Request) -> web.Response:
        return web.Response(status=401, text="log in first", headers={"WWW-Authenticate": "Bearer"})

    app = web.Application()
    app.router.add_get("/ws", login_first)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(app)]}]
    )
    with pytest.raises(aiohttp.WSServerHandshakeError) as failed:
        await session.ws_connect(url(proxy, "/ws"), headers={"Host": "a.test"})
    assert failed.value.status == 401
    assert failed.value.headers is not None
    assert failed.value.headers["WWW-Authenticate"] == "Bearer"
    # On the wire: the machine's body, and the connection closed after it (the client's
    # bytes after a handshake are not HTTP the proxy could read on).
    reply = await raw(proxy.port, HANDSHAKE)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"\r\nConnection: close" in head
    assert body == b"log in first"


async def test_shutdown_closes_open_websockets_with_going_away(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    seen_close: list[int | None] = []
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(ws_app(seen_close))]}]
    )
    async with session.ws_connect(url(proxy, "/ws"), headers={"Host": "a.test"}) as ws:
        await ws.receive_str()
        stopping = asyncio.create_task(proxy.stop())
        msg = await ws.receive()
        assert msg.type is WSMsgType.CLOSE
        assert msg.data == 1001
        await stopping


@pytest.mark.parametrize("answered", [True, False], ids=["answered", "unanswered"])
@pytest.mark.parametrize("via", ["stop", "drain"])
async def test_going_away_after_the_machines_close_sends_no_second_close(
    via: str, answered: bool, backend: Backend, start_proxy: StartProxy, fleet: FleetView
) -> None:
    """The machine sent its close frame and waits for the client's: a shutdown or a drain
    then must not send the client a second close (1001), nor the machine a close that is
    not the client's. The handshake finishes end to end; a client that never answers is
    cut EOF_LINGER_S later, not at shutdown_timeout_s."""
    seen_close: list[int | None] = []
    addr = await backend(ws_app(seen_close))
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [addr]}], shutdown_timeout_s=30
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(HANDSHAKE)
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
            assert await reader.readexactly(17) == b"\x81\x0fhello 127.0.0.1"
            writer.write(frame(b"bye", masked=True, opcode=0x1))
            machine_close = b"\x88\x11" + (4001).to_bytes(2) + b"server says bye"
            assert await reader.readexactly(len(machine_close)) == machine_close
        stopping = None
        if via == "stop":
            stopping = asyncio.create_task(proxy.stop())
            await until(lambda: not proxy.accepting)
        else:
            assert proxy.end_long_lived("a", addr) == 1
        if answered:
            writer.write(close_frame(1000, masked=True))  # the client's answer
        async with asyncio.timeout(10):  # well before shutdown_timeout_s
            assert await reader.read(-1) == b""  # the end of the connection, no 1001
            if stopping is not None:
                await stopping
        await until(lambda: fleet.app("a").in_flight == 0, what="the slot given back")
        if answered:  # the client's own answer reached the machine, not a 1001
            await until(lambda: bool(seen_close), what="the machine's close to finish")
            assert seen_close == [1000]
    finally:
        writer.close()


def accept(head: bytes) -> bytes:
    """The Sec-WebSocket-Accept for a handshake's Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    [key] = [
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    ]
    digest = hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()  # noqa: S324 - the protocol's
    return base64.b64encode(digest)


async def switch_protocols(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A machine's side of the handshake: the client's head read, the 101 answered."""
    head = await reader.readuntil(b"\r\n\r\n")
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept(head) + b"\r\n\r\n"
    )
    await writer.drain()


@pytest.mark.parametrize("via", ["stop", "drain"])
async def test_going_away_after_the_clients_close_sends_no_second_close(
    via: str, raw_backend: RawBackend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    """The client sent its close frame and waits for the machine's: a shutdown or a drain
    then must not send the machine a close after the client's own, nor the client a 1001
    in place of the machine's answer."""
    got_close, answer = asyncio.Event(), asyncio.Event()
    heard: list[bytes] = []

    async def machine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await switch_protocols(reader, writer)
        heard.append(await reader.readexactly(8))  # the client's close: masked, a code
        got_close.set()
        await answer.wait()
        writer.write(close_frame(4321, masked=False))
        await writer.drain()
        heard.append(await reader.read())  # whatever comes until the proxy closes

    addr = await raw_backend(machine)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    ws = await session.ws_connect(url(proxy, "/ws"), headers={"Host": "a.test"})
    closing = asyncio.create_task(ws.close(code=4321))
    async with asyncio.timeout(5):
        await got_close.wait()
    stopping = None
    if via == "stop":
        stopping = asyncio.create_task(proxy.stop())
        await until(lambda: not proxy.accepting)
    else:
        assert proxy.end_long_lived("a", addr) == 1
    answer.set()
    async with asyncio.timeout(5):
        await closing
        if stopping is not None:
            await stopping
    assert ws.close_code == 4321  # the machine's answer, not a 1001 of the proxy's
    await until(lambda: len(heard) == 2, what="the machine's connection to end")
    mask = heard[0][2:6]
    assert bytes(b ^ mask[i % 4] for i, b in enumerate(heard[0][6:])) == (4321).to_bytes(2)
    assert heard[1] == b""  # nothing after the client's close


async def test_a_close_never_answered_ends_the_tunnel_after_the_close_timeout(
    raw_backend: RawBackend,
    start_proxy: StartProxy,
    fleet: FleetView,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client sent its close frame and the machine neither answers nor closes its
    socket (hung, or a bug): both sockets and the slot were held for good. The closing
    handshake gets CLOSE_TIMEOUT_S, then the tunnel ends."""
    monkeypatch.setattr(tunnel, "CLOSE_TIMEOUT_S", 0.3)
    got_close, done = asyncio.Event(), asyncio.Event()

    async def machine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await switch_protocols(reader, writer)
        await reader.readexactly(8)  # the client's close: masked, a code
        got_close.set()
        await done.wait()  # never answers, never closes

    addr = await raw_backend(machine)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(HANDSHAKE)
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
            writer.write(close_frame(1000, masked=True))
            await got_close.wait()
            assert await reader.read(-1) == b""  # the proxy closed the connection
        await until(lambda: fleet.app("a").in_flight == 0, what="the slot given back")
    finally:
        done.set()
        writer.close()
