"""The client-facing HTTP/1.1 server (h1.py) through a started proxy, on raw sockets.

Limits (414, 431, 405, 400), heads and trailers that never end, trailers dropped, two Host
headers, none or an invalid one, targets in absolute form, pipelining (and a client that
pipelines without reading), HTTP/1.0 keep-alive, close-delimited bodies and chunked
requests, non-WebSocket and HTTP/1.0 upgrades served as plain requests, and idle
keep-alive connections closed by the sweep. Every exchange is bounded by
``asyncio.timeout``; nothing sleeps to assert.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from aiohttp import web
from testkit import until

from autoscaler.metrics import Metrics
from autoscaler.proxy.h1 import MAX_HEADERS, Connection

from .conftest import Backend, StartProxy
from .helpers import (
    BOUND_S,
    Blocking,
    connect,
    parse_head,
    proxy_for,
    raw,
    read_response,
    reply_status,
    seen_app,
    slow_reader,
)
from .inproc import OK, FakeTransport, Harness, _settle


async def at_eof(reader: asyncio.StreamReader) -> bytes:
    """What is left before the proxy closes the connection (bounded)."""
    async with asyncio.timeout(BOUND_S):
        return await reader.read(-1)


# --- limits -------------------------------------------------------------------------


async def test_request_target_over_max_header_bytes_gets_414(
    backend: Backend, start_proxy: StartProxy
) -> None:
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen), max_header_bytes=1024)
    target = b"/" + b"a" * 2000
    reply = await raw(port, b"GET " + target + b" HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert reply_status(reply) == 414, reply[:80]
    _, headers = parse_head(reply.split(b"\r\n\r\n", 1)[0] + b"\r\n")
    assert headers["connection"] == ["close"]
    assert reply.endswith(b"request target too long\n")
    assert seen == []  # refused before any machine saw it

    # A target just under the limit is served.
    ok = b"/" + b"a" * 900
    reply = await raw(
        port, b"GET " + ok + b" HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
    )
    assert reply_status(reply) == 200, reply[:80]
    assert seen[0]["path"] == ok.decode()


async def test_more_than_max_headers_fields_gets_431(
    backend: Backend, start_proxy: StartProxy
) -> None:
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen))
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(MAX_HEADERS))  # + Host: one too many
    reply = await raw(port, b"GET / HTTP/1.1\r\nHost: a.test\r\n" + fields + b"\r\n")
    assert reply_status(reply) == 431, reply[:80]
    assert reply.endswith(b"request header fields too large\n")
    assert seen == []

    # 100 fields are under the limit: they reach the machine.
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(100))
    reply = await raw(
        port, b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n" + fields + b"\r\n"
    )
    assert reply_status(reply) == 200, reply[:80]
    got = dict(map(tuple, seen[0]["headers"]))
    assert got["x-f99"] == "v"


@pytest.mark.parametrize(
    "start",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: ", id="header"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Trailer: ",
            id="trailer",
        ),
    ],
)
async def test_a_field_that_never_ends_gets_431_at_its_bound(
    backend: Backend, start_proxy: StartProxy, start: bytes
) -> None:
    """A header (or trailer) field that never ends: httptools would hold it all, so the
    proxy counts the bytes and refuses past HEAD_FACTOR times max_header_bytes."""
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen), max_header_bytes=1024)
    async with connect(port) as (reader, writer):
        writer.write(start)
        for _ in range(64):  # 1 MiB, far past the 8 KiB bound; the proxy reads and drops
            writer.write(b"a" * 16384)
            await writer.drain()
        reply = await at_eof(reader)
    assert reply_status(reply) == 431, reply[:80]
    assert reply.endswith(b"request header fields too large\n")
    assert seen == []  # (a body that never ends never reached the machine's handler whole)


async def test_trailer_fields_are_dropped_and_never_route_or_reach_the_machine(
    backend: Backend, start_proxy: StartProxy
) -> None:
    """Trailers that come with the head in one read must not join it: a Host among them
    would re-route the request (here to no app: 404), an Upgrade turn it into a tunnel."""
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen))
    reply = await raw(
        port,
        b"POST /t HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n"
        b"Host: b.test\r\nX-Trailer: 1\r\nUpgrade: websocket\r\nX-Request-Id: t1\r\n\r\n",
    )
    assert reply_status(reply) == 200, reply[:80]
    [record] = seen
    assert record["body"] == "hello"
    got = dict(map(tuple, record["headers"]))
    assert got["host"] == "a.test"
    assert "x-trailer" not in got
    assert "upgrade" not in got
    assert got["x-request-id"] != "t1"


async def test_absolute_form_target_routes_by_its_authority_and_goes_on_in_origin_form(
    backend: Backend, start_proxy: StartProxy
) -> None:
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen))
    # RFC 9112 3.2.2: the target's authority wins over the Host header.
    reply = await raw(
        port,
        b"GET http://a.test/p/%2F?q=1 HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
    )
    assert reply_status(reply) == 200, reply[:80]
    # No path (and any case of scheme), no Host header at all.
    reply = await raw(port, b"GET HTTP://A.test?x=2 HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert reply_status(reply) == 200, reply[:80]
    assert [r["path"] for r in seen] == ["/p/%2F?q=1", "/?x=2"]
    for record, host in zip(seen, ["a.test", "A.test"], strict=True):
        hosts = [v for k, v in record["headers"] if k == "host"]
        assert hosts == [host]
        assert dict(map(tuple, record["headers"]))["x-forwarded-host"] == host


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"Host: a.test\r\nHost: b.test\r\n", b"more than one Host header"),
        (b"Host: a.test\r\nhost: a.test\r\n", b"more than one Host header"),
        (b"", b"an HTTP/1.1 request needs a Host header"),
    ],
)
async def test_two_host_headers_or_none_in_http11_get_400(
    backend: Backend, start_proxy: StartProxy, head: bytes, reason: bytes
) -> None:
    """RFC 9112 3.2: the proxy would route by one Host and the machine might read another."""
    seen: list[dict[str, Any]] = []
    addr = await backend(seen_app(seen))
    proxy = await start_proxy(
        [
            {"name": "a", "hosts": ["a.test"], "backends": [addr]},
            {"name": "b", "hosts": ["b.test"], "backends": [addr]},
        ],
        default_app="a",
    )
    reply = await raw(proxy.port, b"GET / HTTP/1.1\r\n" + head + b"Connection: close\r\n\r\n")
    assert reply_status(reply) == 400, reply[:80]
    assert reply.endswith(reason + b"\n")
    assert seen == []


async def test_an_invalid_host_gets_400_and_never_reaches_the_machine(
    backend: Backend, start_proxy: StartProxy
) -> None:
    """RFC 9112 3.2. Routed by its name before the first ':', such a Host went on as it came,
    and a machine building a URL from it (a password reset link) pointed at evil.test."""
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen), default_app="a")
    for head in (
        b"GET / HTTP/1.1\r\nHost: a.test:80@evil.test",
        b"GET / HTTP/1.1\r\nHost: a.test:evil.test",
        b"GET / HTTP/1.1\r\nHost: a.test/evil",
        b"GET / HTTP/1.1\r\nHost: a.test evil.test",
        b"GET http://a.test:evil/ HTTP/1.1\r\nHost: a.test",
    ):
        reply = await raw(port, head + b"\r\nConnection: close\r\n\r\n")
        assert reply_status(reply) == 400, (head, reply[:80])
        assert reply.endswith(b"invalid Host header\n")
    assert seen == []
    # Valid ones pass as they came (a port, none after the colon, trailing blanks, an IP
    # literal, an underscore in a name, the empty value RFC 9110 7.2 allows).
    hosts = [b"A.Test.:8080", b"a.test:", b"a.test ", b"[::1]:80", b"my_app.a.test", b""]
    for host in hosts:
        head = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
        assert reply_status(await raw(port, head)) == 200, host
    assert [[v for k, v in s["headers"] if k == "host"] for s in seen] == [
        [host.decode().strip()] for host in hosts
    ]


@pytest.mark.parametrize("target", [b"ftp://a.test/", b"http://user@a.test/", b"http:///p"])
async def test_absolute_form_targets_without_a_plain_http_authority_get_400(
    backend: Backend, start_proxy: StartProxy, target: bytes
) -> None:
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen))
    reply = await raw(
        port, b"GET " + target + b" HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
    )
    assert reply_status(reply) == 400, reply[:80]
    assert reply.endswith(b"invalid request target\n")
    assert seen == []


async def test_the_asterisk_form_is_for_options_only(
    backend: Backend, start_proxy: StartProxy
) -> None:
    """RFC 9112 3.2.4: "*" is a target of OPTIONS alone; llhttp takes it for any method."""
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen))
    for method in (b"GET", b"POST", b"DELETE"):
        head = method + b" * HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n"
        reply = await raw(port, head + b"Content-Length: 0\r\n\r\n")
        assert reply_status(reply) == 400, (method, reply[:80])
        assert reply.endswith(b"invalid request target\n")
    assert seen == []
    reply = await raw(port, b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    # Forwarded: the machine's web framework answers it (aiohttp routes no "*").
    assert reply.endswith(b"\r\n\r\n404: Not Found"), reply


async def test_connect_gets_405(backend: Backend, start_proxy: StartProxy) -> None:
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen))
    reply = await raw(port, b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n")
    assert reply_status(reply) == 405, reply[:80]
    assert reply.endswith(b"CONNECT is not supported\n")
    assert seen == []


async def test_bad_chunk_size_in_the_request_body_gets_400(
    backend: Backend, start_proxy: StartProxy
) -> None:
    port = await proxy_for(backend, start_proxy, seen_app())
    reply = await raw(
        port,
        b"POST /up HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nabc\r\n0\r\n\r\n",
    )
    assert reply_status(reply) == 400, reply[:80]
    assert b"Connection: close\r\n" in reply


async def test_bad_chunk_size_after_the_body_started_upstream_gets_400(
    backend: Backend, start_proxy: StartProxy
) -> None:
    """The machine already reads the body when the bad chunk comes: still the client's
    fault (400), not the machine's (502)."""
    reading = asyncio.Event()

    async def sink(request: web.Request) -> web.Response:
        reading.set()
        await request.read()
        return web.Response(text="read all")

    app = web.Application()
    app.router.add_post("/up", sink)
    port = await proxy_for(backend, start_proxy, app)
    async with connect(port) as (reader, writer):
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        )
        await writer.drain()
        async with asyncio.timeout(BOUND_S):
            await reading.wait()
        writer.write(b"zz\r\nabc\r\n0\r\n\r\n")
        await writer.drain()
        reply = await at_eof(reader)
    assert reply_status(reply) == 400, reply[:80]


# --- connections ----------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order_on_one_connection(
    backend: Backend, start_proxy: StartProxy
) -> None:
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen))
    async with connect(port) as (reader, writer):
        writer.write(
            b"GET /first HTTP/1.1\r\nHost: a.test\r\n\r\n"
            b"POST /second HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /third HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        answers = [await read_response(reader) for _ in range(3)]
        assert await at_eof(reader) == b""  # the third asked to close; nothing more came
    assert [json.loads(body)["path"] for _, _, body in answers] == ["/first", "/second", "/third"]
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert json.loads(answers[1][2])["body"] == "abc"
    assert [s["path"] for s in seen] == ["/first", "/second", "/third"]
    assert "connection" not in answers[0][1]  # HTTP/1.1 keep-alive needs no header
    assert answers[2][1]["connection"] == ["close"]


async def test_pipelined_malformed_request_gets_400_and_nothing_after_it_is_served(
    backend: Backend, start_proxy: StartProxy
) -> None:
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen))
    async with connect(port) as (reader, writer):
        writer.write(
            b"GET /first HTTP/1.1\r\nHost: a.test\r\n\r\n"
            b"GET /bad HTTP/1.1\r\nHost a.test\r\n\r\n"  # no colon: not a header
            b"GET /never HTTP/1.1\r\nHost: a.test\r\n\r\n"
        )
        await writer.drain()
        status, _headers, body = await read_response(reader)
        rest = await at_eof(reader)
    # The request before the bad one is answered, the bad one gets its 400 and the
    # connection ends there: nothing after the bad bytes reaches a machine.
    assert status == 200
    assert json.loads(body)["path"] == "/first"
    assert reply_status(rest) == 400, rest[:80]
    assert b"\r\nConnection: close\r\n" in rest
    assert [s["path"] for s in seen] == ["/first"]


async def test_http10_keep_alive_client_keeps_its_connection(
    backend: Backend, start_proxy: StartProxy
) -> None:
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen))
    async with connect(port) as (reader, writer):
        writer.write(b"GET /one HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n")
        await writer.drain()
        status, headers, body = await read_response(reader)
        assert status == 200
        assert headers["connection"] == ["keep-alive"]
        assert json.loads(body)["path"] == "/one"
        # Same socket, a second request; without keep-alive this one ends the connection.
        writer.write(b"GET /two HTTP/1.0\r\nHost: a.test\r\n\r\n")
        await writer.drain()
        status, headers, body = await read_response(reader)
        assert status == 200
        assert headers["connection"] == ["close"]
        assert json.loads(body)["path"] == "/two"
        assert await at_eof(reader) == b""
    assert [s["path"] for s in seen] == ["/one", "/two"]
    # Upstream the proxy speaks HTTP/1.1 (Via names the client's version).
    assert seen[0]["version"] == "1.1"
    assert dict(map(tuple, seen[0]["headers"]))["via"] == "1.0 autoscaler"


async def test_an_http10_request_with_transfer_encoding_closes_its_connection(
    backend: Backend, start_proxy: StartProxy
) -> None:
    """RFC 9112 6.1: its framing is faulty (an HTTP/1.0 hop before the proxy may have read
    the body otherwise); served, then the connection closes, and what followed is not
    read as a request."""
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen))
    async with connect(port) as (reader, writer):
        writer.write(
            b"POST /one HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n"
            b"GET /two HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n"
        )
        await writer.drain()
        status, headers, body = await read_response(reader)
        assert status == 200
        assert headers["connection"] == ["close"]
        assert json.loads(body)["body"] == "ab"
        assert await at_eof(reader) == b""
    assert [s["path"] for s in seen] == ["/one"]


def stream_app(step: asyncio.Event) -> web.Application:
    """Bodies of unknown length: aiohttp sends them chunked to the proxy (HTTP/1.1)."""

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"part one;")
        if request.path == "/slow":
            await step.wait()  # the proxy relays the first part before the second exists
        await resp.write(b"part two")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/{name}", stream)
    return app


async def test_http10_client_gets_an_unknown_length_body_close_delimited(
    backend: Backend, start_proxy: StartProxy
) -> None:
    step = asyncio.Event()
    port = await proxy_for(backend, start_proxy, stream_app(step))
    # /fast usually reaches the proxy whole (one write), /slow in two reads.
    for path in (b"/fast", b"/slow"):
        async with connect(port) as (reader, writer):
            writer.write(b"GET " + path + b" HTTP/1.0\r\nHost: a.test\r\n\r\n")
            await writer.drain()
            async with asyncio.timeout(BOUND_S):
                head = await reader.readuntil(b"\r\n\r\n")
                if path == b"/slow":
                    assert await reader.readuntil(b";") == b"part one;"
                    step.set()
                    body = b"part one;" + await reader.read(-1)
                else:
                    body = await reader.read(-1)
        status, headers = parse_head(head)
        assert status == 200
        assert "transfer-encoding" not in headers, head
        assert "content-length" not in headers, head
        assert headers["connection"] == ["close"]
        assert body == b"part one;part two"  # raw bytes, no chunk framing, ended by the close


async def test_http10_keep_alive_client_gets_an_unknown_length_body_close_delimited(
    backend: Backend, start_proxy: StartProxy
) -> None:
    step = asyncio.Event()
    step.set()
    port = await proxy_for(backend, start_proxy, stream_app(step))
    async with connect(port) as (reader, writer):
        # The client asks for keep-alive, but only the close can end this body.
        writer.write(b"GET /fast HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(BOUND_S):
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.readexactly(len(b"part one;part two"))
        status, headers = parse_head(head)
        assert status == 200
        assert "transfer-encoding" not in headers, head
        assert headers["connection"] == ["close"]
        assert body == b"part one;part two"
        # The proxy said close, so it must close: a request sent now is not answered, and
        # nothing more arrives as part of the body.
        writer.write(b"GET /next HTTP/1.0\r\nHost: a.test\r\n\r\n")
        try:
            await writer.drain()
            rest = await at_eof(reader)
        except ConnectionError:  # closed (reset, broken pipe): nothing more, as expected
            rest = b""
    assert rest == b"", rest[:80]


async def test_h2c_upgrade_without_body_is_served_as_a_plain_request(
    backend: Backend, start_proxy: StartProxy
) -> None:
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen))
    async with connect(port) as (reader, writer):
        # The h2c request and a follow-up in one write: the bytes after the upgrade
        # request's head are parsed as the next request.
        writer.write(
            b"GET /h2c HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
            b"GET /next HTTP/1.1\r\nHost: a.test\r\nX-Next: 1\r\n\r\n"
        )
        await writer.drain()
        first = await read_response(reader)
        second = await read_response(reader)
        # And one more on the same connection, in a write of its own.
        writer.write(b"GET /last HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        await writer.drain()
        third = await read_response(reader)
    assert [status for status, _, _ in (first, second, third)] == [200, 200, 200]
    assert [s["path"] for s in seen] == ["/h2c", "/next", "/last"]
    got = dict(map(tuple, seen[0]["headers"]))
    assert "upgrade" not in got
    assert "http2-settings" not in got  # named by Connection: hop-by-hop
    assert got.get("connection", "").lower() != "upgrade"
    assert "upgrade" not in first[1]
    # The follow-up is a request of its own, not headers glued onto the h2c one.
    assert "x-next" not in got
    assert dict(map(tuple, seen[1]["headers"]))["x-next"] == "1"


async def test_an_http10_upgrade_offer_is_served_as_a_plain_request(
    backend: Backend, start_proxy: StartProxy
) -> None:
    """RFC 9110 7.8: a server must ignore Upgrade in an HTTP/1.0 request; the machine
    gets no handshake, and the proxy opens no tunnel."""
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen))
    reply = await raw(
        port,
        b"GET /ws HTTP/1.0\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    assert reply_status(reply) == 200, reply[:80]
    assert [s["path"] for s in seen] == ["/ws"]
    got = dict(map(tuple, seen[0]["headers"]))
    assert "upgrade" not in got
    assert got.get("connection", "").lower() != "upgrade"


def echo_app(called: list[str]) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        called.append(request.path)
        return web.Response(text=(await request.read()).decode())

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@pytest.mark.parametrize(
    "upgrade",
    [b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Upgrade: h2c"],
    ids=["websocket", "h2c"],
)
async def test_a_websocket_handshake_or_chunked_upgrade_offer_with_a_body_gets_400(
    backend: Backend, start_proxy: StartProxy, upgrade: bytes
) -> None:
    """A handshake has no body; a chunked body after an upgrade offer is left undecoded by
    llhttp: both are refused, not forwarded with their bodies lost."""
    called: list[str] = []
    # A short upstream timeout only bounds how long the wrong outcome takes.
    port = await proxy_for(backend, start_proxy, echo_app(called), upstream_timeout_s=0.5)
    framing = (
        b"Content-Length: 5\r\n\r\nhello"
        if upgrade.startswith(b"Upgrade: websocket")
        else b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    reply = await raw(
        port,
        b"POST /up HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\n"
        + upgrade
        + b"\r\n"
        + framing,
    )
    assert reply_status(reply) == 400, reply[:80]
    assert reply.endswith(b"protocol upgrade with a body is not supported\n")
    assert called == []


@pytest.mark.parametrize("split", [False, True], ids=["whole", "body-in-two"])
async def test_an_h2c_offer_with_a_body_is_served_as_http11_and_the_next_request_too(
    backend: Backend, start_proxy: StartProxy, split: bool
) -> None:
    """What ``curl --http2 -d hello http://...`` sends: an h2c upgrade offer on a POST with
    a body. A server that does not switch may ignore the offer (RFC 9110 7.8; nginx and
    Go do): the POST is served as HTTP/1.1, its body whole, and the request after it on
    the connection is parsed as usual (also when the bytes come in pieces)."""
    called: list[str] = []
    port = await proxy_for(backend, start_proxy, echo_app(called))
    data = (
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: 5\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n\r\nhello"
        b"GET /next HTTP/1.1\r\nHost: a.test\r\n\r\n"
    )
    async with connect(port) as (reader, writer):
        if split:  # the head and 3 bytes of the body; the rest once the machine has the head
            cut = data.index(b"hello") + 3
            writer.write(data[:cut])
            await writer.drain()
            await until(lambda: called == ["/x"], what="the POST at the machine")
            writer.write(data[cut:])
        else:
            writer.write(data)
        await writer.drain()
        first = await read_response(reader)
        second = await read_response(reader)
    assert (first[0], first[2]) == (200, b"hello")
    assert "upgrade" not in first[1]
    assert (second[0], second[2]) == (200, b"")
    assert called == ["/x", "/next"]


async def test_idle_keep_alive_connection_is_closed_after_client_timeout(
    backend: Backend, start_proxy: StartProxy
) -> None:
    port = await proxy_for(backend, start_proxy, seen_app(), client_timeout_s=0.3)
    async with connect(port) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        await writer.drain()
        status, headers, _ = await read_response(reader)
        assert status == 200
        assert "connection" not in headers  # kept alive...
        assert await at_eof(reader) == b""  # ...until idle for client_timeout_s


async def test_a_client_that_pipelines_and_never_reads_is_cut_off(
    backend: Backend, start_proxy: StartProxy, metrics: Metrics
) -> None:
    """Requests answered at once (404 here: no machine to wait for) went on being read and
    answered while the client read nothing, their answers piling up in the proxy without
    bound. The next request waits until the client took the answer before it, and a
    client that takes nothing for ``client_timeout_s`` is cut off, as for a long answer."""
    addr = await backend(seen_app())
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [addr]}], client_timeout_s=0.5
    )
    clients = proxy._server.connections  # the listener's open client connections
    request = b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n"
    sent = 20_000  # their answers are some 3 MB, far more than the socket buffers hold
    loop = asyncio.get_running_loop()
    async with slow_reader(proxy) as (sock, _):
        with contextlib.suppress(ConnectionError):  # (the proxy may cut it meanwhile)
            async with asyncio.timeout(BOUND_S):
                await loop.sock_sendall(sock, request * sent)
        await until(lambda: not clients, timeout_s=BOUND_S)  # cut, without a byte read
    answered = sum(n for (_, code, _), n in metrics.proxy._counts.items() if code == 404)
    assert 0 < answered < sent // 2


async def test_a_kept_alive_connection_reads_on_after_an_error_to_an_unread_large_body(
    backend: Backend, start_proxy: StartProxy
) -> None:
    """A POST whose body (over the buffer's high-water mark) arrived whole but was never
    read, answered 504 (the app stayed busy past wake_timeout_s) without
    ``Connection: close``: the connection is kept, so it must read the client's next
    request (the full buffer had paused it), not leave it to the idle sweep's reset."""
    blocking = Blocking()
    addr = await backend(blocking.app())
    app = {"name": "a", "hosts": ["a.test"], "backends": [addr]}
    proxy = await start_proxy(
        [{**app, "hard_limit": 1, "wake_timeout_s": 0.5}], client_timeout_s=4.0
    )
    async with connect(proxy.port) as (r1, w1), connect(proxy.port) as (reader, writer):
        w1.write(b"GET /?id=busy HTTP/1.1\r\nHost: a.test\r\n\r\n")  # takes the one slot
        await w1.drain()
        await until(lambda: bool(blocking.order), what="the first request at the machine")
        body = b"x" * (80 * 1024)
        head = b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: %d\r\n\r\n" % len(body)
        writer.write(head + body)
        await writer.drain()
        status, headers, _ = await read_response(reader)
        assert status == 504
        assert headers.get("connection") != ["close"]
        blocking.release.set()
        await read_response(r1)
        writer.write(b"GET /?id=next HTTP/1.1\r\nHost: a.test\r\n\r\n")
        await writer.drain()
        status, _, answer = await read_response(reader)
    assert (status, answer) == (200, b"m")


class _ResetTransport(FakeTransport):
    """A connection the client reset while reading was paused: the loop has not heard of
    it yet, and ``write_eof`` fails as the kernel's ``shutdown()`` does (ENOTCONN)."""

    def write_eof(self) -> None:
        raise OSError(107, "Transport endpoint is not connected")


async def test_a_reset_seen_only_at_the_closing_write_eof_closes_the_connection() -> None:
    harness = Harness()
    conn = Connection(harness.server)
    transport = _ResetTransport()
    transport.protocol = conn
    conn.connection_made(transport)
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        conn.data_received(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        await until(lambda: transport.closed)  # not left to the client's idle timeout
        await _settle()
    finally:
        loop.set_exception_handler(None)
    assert transport.out.startswith(OK)
    assert errors == []  # the connection's task did not die on the OSError
