"""The upstream hop: keep-alive reuse, idle connections the machine closed, early answers,
answers whose head never ends, trailers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from testkit import SlowToEnd, until

from autoscaler.control.view import FleetView, MachineInfo
from autoscaler.proxy import upstream
from autoscaler.proxy.upstream import Abandoned, Pool

from .conftest import Backend, RawBackend, StartProxy, url
from .helpers import connect, read_response, text_app, unanswering_port


async def test_sequential_requests_reuse_one_upstream_connection(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    transports: set[int] = set()

    async def handler(request: web.Request) -> web.Response:
        transports.add(id(request.transport))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handler)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(app)]}]
    )
    for _ in range(20):
        async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
            assert await r.text() == "ok"
    assert len(transports) == 1


async def test_connection_closed_by_the_machine_while_idle_is_not_an_error(
    start_proxy: StartProxy, raw_backend: RawBackend, session: aiohttp.ClientSession
) -> None:
    """A machine that closes every connection right after answering (short keep-alive)."""
    served = 0

    async def one_shot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await reader.readuntil(b"\r\n\r\n")
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # no "Connection: close": the proxy pooled it and learns by EOF

    addr = await raw_backend(one_shot)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    for _ in range(10):
        async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
            assert r.status == 200
            assert await r.text() == "ok"
    assert served == 10


async def test_an_answer_whose_head_never_ends_gets_502_at_its_bound(
    start_proxy: StartProxy, raw_backend: RawBackend, session: aiohttp.ClientSession
) -> None:
    """httptools holds a header field until it ends: the proxy gives up on the machine's
    head past HEAD_FACTOR times the field limit (64 KiB here) instead of holding more."""
    sent = 0
    gave_up = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        try:
            while sent < 64 << 20:  # 64 MiB: only a proxy without a bound reads it all
                writer.write(b"a" * 65536)
                await writer.drain()
                sent += 65536
        except ConnectionError:
            gave_up.set()

    addr = await raw_backend(endless)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
        assert r.status == 502
        assert await r.text() == "the machine failed to answer\n"
    async with asyncio.timeout(10):
        await gave_up.wait()  # the proxy closed the connection
    assert sent < 8 << 20


async def test_a_machine_that_stops_reading_an_upload_times_out_with_504(
    start_proxy: StartProxy, raw_backend: RawBackend, fleet: FleetView
) -> None:
    """upstream_timeout_s ran from the end of the request only: a machine that never read
    the body held the client, the slot and the connection for good."""

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.Event().wait()  # reads no more, answers nothing (cancelled at teardown)

    addr = await raw_backend(deaf)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [addr]}], upstream_timeout_s=0.5
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)

    async def upload() -> None:
        writer.write(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: %d\r\n\r\n" % (64 << 20))
        with contextlib.suppress(ConnectionError):
            for _ in range(1024):  # 64 MiB, far more than the buffers between
                writer.write(b"u" * 65536)
                await writer.drain()

    uploading = asyncio.create_task(upload())
    try:
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 504 "), head
        await until(lambda: fleet.app("a").in_flight == 0)
    finally:
        uploading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await uploading
        writer.close()


async def test_a_machine_that_stalls_mid_body_is_cut_after_upstream_timeout(
    start_proxy: StartProxy, raw_backend: RawBackend, fleet: FleetView
) -> None:
    """The client must not wait for good, nor take the 3 bytes for a whole answer."""

    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        await writer.drain()
        await asyncio.Event().wait()

    addr = await raw_backend(stalls)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [addr]}], upstream_timeout_s=0.5
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        got = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(10):
                while chunk := await reader.read(65536):
                    got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert body == b"abc"  # and then the connection was cut, 97 bytes short
        await until(lambda: fleet.app("a").in_flight == 0)
    finally:
        writer.close()


async def test_trailer_fields_of_a_chunked_answer_are_dropped(
    start_proxy: StartProxy, raw_backend: RawBackend
) -> None:
    """Trailers that arrive with the head must not join the head the client gets."""

    async def with_trailers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
            b"2\r\nok\r\n0\r\nX-Sum: 1\r\nSet-Cookie: t=1\r\n\r\n"
        )
        await writer.drain()

    addr = await raw_backend(with_trailers)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(10):
            reply = await reader.read(-1)
    finally:
        writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"X-Sum" not in head
    assert b"Set-Cookie" not in head
    assert body == b"2\r\nok\r\n0\r\n\r\n"


async def test_early_answer_before_the_body_is_relayed(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    async def reject(request: web.Request) -> web.Response:
        return web.Response(status=401, text="no")  # without reading the body

    app = web.Application()
    app.router.add_post("/", reject)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(app)]}]
    )

    async def small_body() -> AsyncIterator[bytes]:
        yield b"x" * 1000

    async with session.post(url(proxy), data=small_body(), headers={"Host": "a.test"}) as r:
        assert r.status == 401
        assert await r.text() == "no"
    # The proxy still works (the half-used connection was not pooled).
    async with session.post(url(proxy), data=b"y", headers={"Host": "a.test"}) as r:
        assert r.status == 401


async def test_http10_client_without_host_reaches_the_default_app(
    backend: Backend, start_proxy: StartProxy
) -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Host", ""))
        return web.Response(text="default")

    app = web.Application()
    app.router.add_get("/", handler)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(app)]}],
        default_app="a",
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(10):
        reply = await reader.read(-1)  # HTTP/1.0 without keep-alive: closed after
    writer.close()
    # RFC 9110 §2.5: a server answers with the highest minor version it speaks.
    assert reply.startswith(b"HTTP/1.1 200")
    assert reply.endswith(b"default")
    assert seen == ["a.test"]


async def test_unasked_protocol_switch_is_502(
    start_proxy: StartProxy, raw_backend: RawBackend, session: aiohttp.ClientSession
) -> None:
    async def switcher(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n")
        await writer.drain()
        await reader.read(-1)
        writer.close()

    addr = await raw_backend(switcher)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    async with session.get(
        url(proxy), headers={"Host": "a.test", "Connection": "Upgrade", "Upgrade": "h2c"}
    ) as r:
        assert r.status == 502


async def test_machine_address_ipv6_and_app_port_override(
    start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    """private_ip is IPv6 on Fly: the address goes in brackets; apps[].port beats the
    service's internal_port."""

    app = text_app("v6")
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "::1", 0)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        pytest.skip("no IPv6 loopback here")
    port = runner.addresses[0][1]
    try:
        # The controller reports internal_port 1 (wrong on purpose); the app's port wins.
        fleet.app("v6").set_machines([MachineInfo("m1", "::1", 1, "started", False)])
        proxy = await start_proxy([{"name": "v6", "hosts": ["v6.test"], "port": port}])
        async with session.get(url(proxy), headers={"Host": "v6.test"}) as r:
            assert r.status == 200
            assert await r.text() == "v6"
    finally:
        await runner.cleanup()


async def test_a_pooled_connection_left_with_an_unread_answer_reads_the_next_one(
    raw_backend: RawBackend, start_proxy: StartProxy
) -> None:
    """A client leaves a download once the machine's whole answer reached the proxy, more
    than the body buffer's high-water mark of it unread: the connection is clean and goes
    back to the pool, and it must go back reading (the full buffer had paused it), or the
    next request on it, another client's, gets 504 and the machine takes the blame."""
    sent = asyncio.Event()
    blocked = asyncio.Event()
    connections = 0

    async def machine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /big"):
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    piece = b"y" * 8192
                    while not blocked.is_set():  # until the client stopped taking
                        writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                        await writer.drain()
                        await asyncio.sleep(0.01)
                    last = b"z" * (80 * 1024)  # the end, in one write
                    writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(last), last))
                    await writer.drain()
                    sent.set()
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmall")
                    await writer.drain()

    addr = await raw_backend(machine)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [addr]}], upstream_timeout_s=2.0
    )
    server = proxy._server
    pool = proxy._pool
    assert server is not None
    assert pool is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
        await loop.sock_sendall(sock, b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n")
        await until(
            lambda: any(c.writing_paused for c in server.connections),
            what="the client taking nothing more",
        )
        blocked.set()
        await sent.wait()
        await until(
            lambda: any(body.done for bodies in proxy._streams.values() for body in bodies),
            what="the machine's whole answer in the proxy",
        )
    finally:
        sock.close()  # the client goes away
    await until(lambda: any(pool._idle.values()), what="the clean connection back in the pool")
    async with connect(proxy.port) as (reader, writer):
        writer.write(b"GET /small HTTP/1.1\r\nHost: a.test\r\n\r\n")
        await writer.drain()
        status, _, body = await read_response(reader)
    assert (status, body) == (200, b"small")
    assert connections == 1  # it went over the pooled connection


async def test_a_close_cancelled_while_its_sweeper_ends_is_cancelled() -> None:
    """The pool's close cancels its head sweeper and waits for its end. Awaited under
    suppress(CancelledError), that wait also swallowed a cancellation of the close itself
    (the proxy's stop cut short by a second SIGTERM): the proxy's stop, then the
    service's, ended as if none had come (no stopped_at_once, no forced close)."""
    pool = Pool(1, 1.0)
    slow = SlowToEnd()
    pool._sweeper = slow.task  # (a sweeper that takes its time to end)
    closing = await slow.cut_short(pool.close())
    assert closing.cancelled()


@pytest.mark.parametrize("end", ["cut", "halt"])
async def test_a_connect_given_up_as_it_times_out_raises_nothing_where_it_was_given_up(
    end: str,
) -> None:
    """A drain's cut (or the proxy's halt) that came after the connect's timeout fired but
    before the request's task saw it (the same turn of the loop) moved that expired
    timeout again: asyncio raises RuntimeError then, out of ``end_long_lived`` (the drain)
    or the stop, and the other connects were not given up. The connect ends as given up
    (nothing sent), and the cut counts it."""
    pool = Pool(1, 0.05)
    with unanswering_port() as (port, _):
        opening = asyncio.create_task(pool.open("127.0.0.1", port, f"127.0.0.1:{port}", 8190, "m1"))
        await asyncio.sleep(0)  # its first step: the connect under way, its timeout armed
        (attempt,) = pool._connecting
        # Every turn of the loop, until the timeout fires (no event says so; a bounded spin).
        while not attempt.timeout.expired():  # noqa: ASYNC110 - one turn at a time
            await asyncio.sleep(0)
        assert attempt in pool._connecting  # its task has not run since: still registered
        if end == "cut":
            assert pool.cut("m1") == 1
        else:
            assert pool.halt() == [opening]
        with pytest.raises(Abandoned):
            await opening
    assert pool._connecting == {}
    await pool.close()


async def test_a_request_lost_on_a_pooled_connection_and_on_the_new_one_is_lost_again(
    raw_backend: RawBackend,
) -> None:
    """``send`` sends an idempotent request lost on a pooled connection again, on a new
    one: lost there too, it says so (``LostAgain``), and the proxy sends it nowhere else
    (one replay per request)."""
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await reader.readuntil(b"\r\n\r\n")
        served += 1
        if served == 1:  # the first answered, its connection kept: the next goes on it
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
            served += 1
        writer.transport.abort()

    host, _, port = (await raw_backend(handler)).partition(":")
    pool = Pool(1, 1.0)
    head = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"

    async def get() -> upstream.Exchange:
        return await upstream.send(
            pool, host, int(port), f"{host}:{port}", "GET", head, None, replayable=True
        )

    try:
        first = await get()
        assert await first.body.read() == b"ok"
        first.release()
        with pytest.raises(upstream.LostAgain):
            await get()
        assert served == 3  # on the pooled connection, then on a new one
    finally:
        await pool.close()
