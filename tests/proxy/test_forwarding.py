"""HTTP forwarding against real upstream servers on loopback: what goes up, what comes back."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from testkit import until

from autoscaler.control.view import FleetView
from autoscaler.metrics import Metrics
from autoscaler.proxy.body import WRITE_HIGH_WATER

from .conftest import Backend, StartProxy, url
from .helpers import Blocking, raw, slow_reader


def echo_app(seen: list[web.Request] | None = None) -> web.Application:
    """Answers with what it received: method, raw path, headers, body length."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if seen is not None:
            seen.append(request)
        body = await request.read()
        resp = web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body_len": len(body),
                "chunked": request.headers.get("Transfer-Encoding") == "chunked",
            }
        )
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; Path=/")
        resp.headers["Keep-Alive"] = "timeout=5"
        resp.headers["Connection"] = "X-Secret-Hop"
        resp.headers["X-Secret-Hop"] = "drop me"
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def headers_of(payload: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in payload["headers"]:
        out.setdefault(key.lower(), []).append(value)
    return out


async def test_raw_path_and_query_pass_byte_for_byte(
    backend: Backend, start_proxy: StartProxy
) -> None:
    addr = await backend(echo_app())
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    path = b"/x/%2F/../y//z;p=1?q=%20a+b&q=%2f&empty=&=#"
    reply = await raw(
        proxy.port, b"GET " + path[:-1] + b" HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 200")
    assert b'"raw_path": "/x/%2F/../y//z;p=1?q=%20a+b&q=%2f&empty=&="' in reply
    # aiohttp's client must not add headers the client never sent.
    for added in (b'"Accept-Encoding"', b'"User-Agent"', b'"Accept"', b'"Content-Type"'):
        assert added not in reply.split(b"\r\n\r\n", 1)[1], added


async def test_set_cookie_hop_by_hop_and_forwarding_headers(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    addr = await backend(echo_app())
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    async with session.get(
        url(proxy, "/h"),
        headers={
            "Host": "a.test",
            "Connection": "keep-alive, X-Private",
            "X-Private": "hop",
            "Keep-Alive": "timeout=1",
            "TE": "trailers",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Host": "evil.test",
            "X-Forwarded-Proto": "https",
            "Forwarded": "for=6.6.6.6",
            "Via": "1.0 earlier",
            "X-Request-Id": "req-123",
            "X-Keep": "yes",
        },
    ) as resp:
        assert resp.status == 200
        assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        assert "Keep-Alive" not in resp.headers
        assert "X-Secret-Hop" not in resp.headers
        assert resp.headers["X-Request-Id"] == "req-123"
        assert resp.headers["Fly-Autoscaler-Wake"] == "none"
        assert resp.headers["Via"].endswith("1.1 autoscaler")
        got = headers_of(await resp.json())
    for hop in ("x-private", "keep-alive", "te", "proxy-authorization", "forwarded"):
        assert hop not in got, hop
    assert got["x-keep"] == ["yes"]
    assert got["host"] == ["a.test"]
    # Untrusted peer: forwarding headers are replaced, not appended to.
    assert got["x-forwarded-for"] == ["127.0.0.1"]
    assert got["x-forwarded-host"] == ["a.test"]
    assert got["x-forwarded-proto"] == ["http"]
    assert got["via"] == ["1.0 earlier, 1.1 autoscaler"]
    assert got["x-request-id"] == ["req-123"]


async def test_forwarding_headers_spelled_with_underscores_are_dropped(
    backend: Backend, start_proxy: StartProxy
) -> None:
    """A CGI or WSGI server reads X_Forwarded_For as X-Forwarded-For (both become
    HTTP_X_FORWARDED_FOR): passed on, a client would choose the address the app sees."""
    seen: list[web.Request] = []
    addr = await backend(echo_app(seen))
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    reply = await raw(
        proxy.port,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nX_Forwarded_For: 6.6.6.6\r\n"
        b"x_forwarded_proto: https\r\nX_Forwarded_Host: evil.test\r\nX_Request_Id: r\r\n"
        b"Proxy_Authorization: Basic c2VjcmV0\r\nX_App_Header: kept\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:80]
    names = [name.lower() for name in seen[0].headers]
    assert not [n for n in names if n.startswith(("x_forwarded", "x_request", "proxy_"))]
    assert seen[0].headers["X_App_Header"] == "kept"  # other underscores are the app's
    assert seen[0].headers.getall("X-Forwarded-For") == ["127.0.0.1"]


async def test_trusted_proxy_forwarding_headers_are_kept(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    addr = await backend(echo_app())
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [addr]}],
        trusted_proxies=["127.0.0.0/8"],
    )
    async with session.get(
        url(proxy),
        headers={
            "Host": "a.test",
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Host": "public.test",
            "X-Forwarded-Proto": "https",
        },
    ) as resp:
        got = headers_of(await resp.json())
        request_id = resp.headers["X-Request-Id"]
    assert got["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
    assert got["x-forwarded-host"] == ["public.test"]
    assert got["x-forwarded-proto"] == ["https"]
    assert len(request_id) == 32
    assert got["x-request-id"] == [request_id]


async def test_request_ids_are_generated_unique_and_kept_when_sane(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    addr = await backend(echo_app())
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    ids = []
    for given in (None, None, "client-id-1", "x" * 129, "id-\u00e9"):
        headers = {"Host": "a.test"} | ({"X-Request-Id": given} if given else {})
        async with session.get(url(proxy), headers=headers) as resp:
            ids.append(resp.headers["X-Request-Id"])
            assert headers_of(await resp.json())["x-request-id"] == [ids[-1]]
    assert ids[2] == "client-id-1"
    generated = [ids[0], ids[1], ids[3], ids[4]]
    assert len(set(generated)) == 4
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in generated)


async def test_head_and_bodies_both_ways(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    addr = await backend(echo_app())
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    host = {"Host": "a.test"}
    async with session.head(url(proxy), headers=host) as resp:
        assert resp.status == 200
        assert int(resp.headers["Content-Length"]) > 0
        assert await resp.read() == b""

    async def gen() -> Any:
        for _ in range(10):
            yield b"x" * 1000

    async with session.post(url(proxy), data=gen(), headers=host) as resp:
        body = await resp.json()
    assert body["body_len"] == 10_000
    assert body["chunked"]
    async with session.put(url(proxy), data=b"y" * 5000, headers=host) as resp:
        body = await resp.json()
    assert body["body_len"] == 5000
    assert not body["chunked"]
    assert headers_of(body)["content-length"] == ["5000"]


async def test_chunked_response_and_sse_flush_each_event(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    step = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: one\n\n")
        await step.wait()  # the client must get "one" before "two" exists
        await resp.write(b"data: two\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/events", events)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(app)]}]
    )
    async with session.get(url(proxy, "/events"), headers={"Host": "a.test"}) as resp:
        assert resp.headers["Transfer-Encoding"] == "chunked"
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
        assert first == b"data: one\n\n"
        step.set()
        assert await resp.content.read() == b"data: two\n\n"


async def test_expect_100_continue(backend: Backend, start_proxy: StartProxy) -> None:
    addr = await backend(echo_app())
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        assert b"\r\nVia: 1.1 autoscaler\r\n" in interim  # the machine's (aiohttp's)
        writer.write(b"hello")
        await writer.drain()
        reply = await reader.read(-1)
    finally:
        writer.close()
    assert reply.startswith(b"HTTP/1.1 200")
    assert b'"body_len": 5' in reply
    # The expectation went on: the machine sent the 100 (see tests/proxy/test_expect.py).
    assert reply.split(b"\r\n\r\n", 1)[1].lower().count(b'["expect", "100-continue"]') == 1


async def test_unknown_host_gets_404(start_proxy: StartProxy, metrics: Metrics) -> None:
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": ["127.0.0.1:9"]}])
    reply = await raw(proxy.port, b"GET / HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 404")
    assert reply.endswith(b"no app is configured for this host\n")
    assert b"X-Request-Id: " in reply
    assert isinstance(metrics.registry, CollectorRegistry)
    assert (
        metrics.registry.get_sample_value(
            "autoscaler_requests_total", {"app": "", "code": "404", "wake": "none"}
        )
        == 1
    )


async def test_in_flight_gauge_counts_requests_at_a_machine(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession, metrics: Metrics
) -> None:
    up = Blocking("done")
    addr = await backend(up.app())
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])

    def in_flight() -> float | None:
        return metrics.registry.get_sample_value("autoscaler_inflight_requests", {"app": "a"})

    request = asyncio.create_task(session.get(url(proxy), headers={"Host": "a.test"}))
    await until(lambda: len(up.order) == 1)  # at the machine
    assert in_flight() == 1
    up.release.set()
    async with await request as resp:
        assert await resp.text() == "done"
    assert in_flight() == 0


async def test_parse_errors_431_400_and_413(backend: Backend, start_proxy: StartProxy) -> None:
    addr = await backend(echo_app())
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [addr], "max_body_bytes": 100}],
        max_header_bytes=1024,
    )
    big = b"X-Big: " + b"a" * 2000 + b"\r\n"
    reply = await raw(proxy.port, b"GET / HTTP/1.1\r\nHost: a.test\r\n" + big + b"\r\n")
    assert reply.split(b" ", 2)[1] == b"431", reply[:60]
    assert b"request header fields too large" in reply

    reply = await raw(
        proxy.port,
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    assert reply.split(b" ", 2)[1] == b"400", reply[:60]
    assert len(reply.split(b"\r\n\r\n", 1)[1]) < 200

    reply = await raw(
        proxy.port,
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 101\r\nConnection: close\r\n\r\n"
        + b"z" * 101,
    )
    assert reply.startswith(b"HTTP/1.1 413"), reply[:60]
    # Without a length the limit is enforced while streaming.
    chunk = b"64\r\n" + b"z" * 100 + b"\r\n"
    reply = await raw(
        proxy.port,
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + chunk * 3 + b"0\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 413"), reply[:60]


async def test_slow_clients_time_out(backend: Backend, start_proxy: StartProxy) -> None:
    addr = await backend(echo_app())
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [addr]}], client_timeout_s=0.3
    )
    # Headers that never finish: the connection is closed.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Slow: ")
    await writer.drain()
    async with asyncio.timeout(10):
        assert await reader.read(-1) == b""
    writer.close()
    # A body that stops coming: 408 with a short body.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\n\r\nab")
    await writer.drain()
    async with asyncio.timeout(10):
        reply = await reader.readuntil(b"slowly\n")
    writer.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:60]
    assert reply.endswith(b"the client sent its body too slowly\n")


def big_app(chunks: int, size: int = 65536) -> web.Application:
    """GET /big: ``chunks`` x ``size`` bytes, streamed."""

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(chunks):
            await response.write(b"x" * size)
        return response

    app = web.Application()
    app.router.add_get("/big", big)
    return app


async def test_a_client_that_stops_reading_is_cut_off_and_frees_its_slot(
    backend: Backend, start_proxy: StartProxy, fleet: FleetView
) -> None:
    """Without a bound, a client that never reads its answer would hold the machine's slot
    (and the upstream connection) for good: a few of them starve an app."""
    addr = await backend(big_app(chunks=400))  # 25 MiB, far more than the socket buffers
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [addr]}], client_timeout_s=0.5
    )
    view = fleet.app("a")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proxy.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n")
        await until(lambda: view.in_flight == 1)
        await until(lambda: view.in_flight == 0, timeout_s=10)  # without reading a byte
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(10):
                while await reader.read(65536):  # what was sent, then the cut
                    pass
    finally:
        writer.close()


async def test_an_answer_left_unread_on_an_idle_connection_is_cut_by_the_idle_sweep(
    backend: Backend, start_proxy: StartProxy
) -> None:
    """An answer under the write buffer's high-water mark does not make the handler wait
    for the client, so a client that never reads it leaves the connection idle with bytes
    still to send. When its keep-alive wait ends, a plain close() would wait for those bytes
    for ever (and keep the socket); the sweep must cut the connection instead."""
    body = b"x" * (WRITE_HIGH_WATER - 512)  # under the transport's high-water mark

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/page", page)
    addr = await backend(app)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [addr]}], client_timeout_s=0.5
    )
    clients = proxy._server.connections  # the listener's open client connections
    loop = asyncio.get_running_loop()
    # Most of the answer then waits in the proxy's transport.
    async with slow_reader(proxy) as (sock, conn):
        assert conn.transport is not None
        await loop.sock_sendall(sock, b"GET /page HTTP/1.1\r\nHost: a.test\r\n\r\n")
        # The answer is done, part of it still unsent: the case meant here.
        await until(lambda: conn.idle and conn.transport.get_write_buffer_size() > 0)
        await until(lambda: not clients, timeout_s=10)  # cut, without reading a byte
        received = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(10):
                while chunk := await loop.sock_recv(sock, 65536):
                    received += chunk
        assert len(received) < len(body)  # the rest was dropped with the connection
