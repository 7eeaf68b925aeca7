"""Framing neither side can subvert: what a peer says about a message's length or coding
never makes the proxy and the other side disagree on where a message ends.

- a Connection header naming Content-Length, Host or X-Request-Id does not drop them
  (request smuggling, a response with no end);
- bytes after a machine's whole answer are not taken for part of it, nor relayed;
- transfer codings other than chunked are refused (llhttp decodes chunked only, so the
  body would go on changed), before anything reaches the machine;
- HTTP versions other than 1.0 and 1.1 get 505, a machine's status under 100 a 502, and
  so does an interim (1xx) answer with a body.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

from .conftest import Backend, RawBackend, StartProxy
from .helpers import proxy_for, raw, reply_status, seen_app

BOUND_S = 5  # an upper bound on any single exchange, never an expectation of speed


async def machine_with(raw_backend: RawBackend, answer: bytes, heads: list[bytes]) -> str:
    """A machine that records each request head and answers ``answer`` in one write."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            heads.append(head)
            writer.write(answer)
            await writer.drain()

    return await raw_backend(serve)


async def test_connection_naming_content_length_host_or_request_id_drops_none_of_them(
    raw_backend: RawBackend, start_proxy: StartProxy
) -> None:
    """Without its Content-Length the body would reach the machine as a second request,
    one that skipped the proxy's X-Forwarded-For."""
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    got: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        got.append(head)
        lengths = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
        got.append(await reader.readexactly(int(lengths[0].split(b":")[1])) if lengths else b"")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    addr = await raw_backend(serve)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    reply = await raw(
        proxy.port,
        b"POST /p HTTP/1.1\r\nHost: a.test\r\n"
        b"Connection: close, content-length, host, x-request-id\r\n"
        b"X-Request-Id: r-1\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled,
    )
    assert reply_status(reply) == 200, reply[:200]
    head, body = got
    lines = head.lower().split(b"\r\n")
    assert b"content-length: %d" % len(smuggled) in lines
    assert b"host: a.test" in lines
    assert b"x-request-id: r-1" in lines
    assert body == smuggled  # the machine read it as the body, not as a request


async def test_a_machine_naming_content_length_in_connection_keeps_the_length(
    raw_backend: RawBackend, start_proxy: StartProxy
) -> None:
    """Without it the client could not tell where the answer ends on a kept connection."""
    heads: list[bytes] = []
    answer = b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello"
    addr = await machine_with(raw_backend, answer, heads)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        async with asyncio.timeout(BOUND_S):
            for _ in range(2):  # two answers on one connection, each whole
                writer.write(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 OK\r\n")
                assert b"\r\nContent-Length: 5\r\n" in head
                assert await reader.readexactly(5) == b"hello"
    finally:
        writer.close()
    assert len(heads) == 2


@pytest.mark.parametrize(
    ("answer", "status_line", "kept"),
    [
        (  # a second, unasked answer right after the first
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
            b"HTTP/1.1 302 Found\r\nLocation: http://evil.example/\r\nSet-Cookie: x=evil\r\n"
            b"Content-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK",
            b"",
        ),
        (  # a 204 with a body (a common machine bug): the body must not end the head
            b'HTTP/1.1 204 No Content\r\nSet-Cookie: session=abc\r\nETag: "v1"\r\n'
            b"Content-Length: 5\r\n\r\nhello",
            b"HTTP/1.1 204 No Content",
            b"Set-Cookie: session=abc",  # (its Content-Length is dropped: RFC 9110 8.6)
        ),
    ],
)
async def test_bytes_after_a_whole_answer_are_dropped_and_the_answer_stands(
    raw_backend: RawBackend, start_proxy: StartProxy, answer: bytes, status_line: bytes, kept: bytes
) -> None:
    heads: list[bytes] = []
    addr = await machine_with(raw_backend, answer, heads)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    for _ in range(2):  # the second on a new machine connection: the first was not pooled
        reply = await raw(
            proxy.port, b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
        )
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(status_line + b"\r\n"), reply[:200]
        assert kept in head
        assert b"evil" not in reply
        assert (b"Content-Length" in head) == status_line.endswith(b"200 OK")
        assert body == (b"hello" if status_line.endswith(b"200 OK") else b"")
    assert len(heads) == 2


@pytest.mark.parametrize(
    ("codings", "status"),
    [
        (b"Transfer-Encoding: gzip, chunked\r\n", 501),
        (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", 501),
        (b"Transfer-Encoding: gzip\r\n", 400),
        (b"Transfer-Encoding: chunked, gzip\r\n", 400),
    ],
)
async def test_request_transfer_codings_other_than_chunked_are_refused_before_the_machine(
    backend: Backend, start_proxy: StartProxy, codings: bytes, status: int
) -> None:
    """Re-chunked without its gzip coding the body would change; without chunked last it
    has no length at all (RFC 9112 6.3)."""
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen))
    reply = await raw(
        port, b"POST / HTTP/1.1\r\nHost: a.test\r\n" + codings + b"\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert reply_status(reply) == status, reply[:200]
    assert reply.count(b"HTTP/1.1 ") == 1  # nothing answered before the refusal
    assert seen == []


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nhello",
    ],
)
async def test_answers_with_transfer_codings_other_than_chunked_get_502(
    raw_backend: RawBackend, start_proxy: StartProxy, answer: bytes
) -> None:
    """Relayed re-chunked, the client would take gzip bytes for the body (nginx: 502)."""
    heads: list[bytes] = []
    addr = await machine_with(raw_backend, answer, heads)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    reply = await raw(proxy.port, b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    assert reply_status(reply) == 502, reply[:200]
    assert reply.endswith(b"the machine failed to answer\n")


@pytest.mark.parametrize("status", [b"099", b"000"])
async def test_an_answer_with_a_status_under_100_gets_502(
    raw_backend: RawBackend, start_proxy: StartProxy, status: bytes
) -> None:
    """llhttp reads "099" as 99: relayed, the client's status line had two digits, which
    a strict client refuses (RFC 9112 4)."""
    heads: list[bytes] = []
    answer = b"HTTP/1.1 " + status + b" Odd\r\nContent-Length: 2\r\n\r\nok"
    addr = await machine_with(raw_backend, answer, heads)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    reply = await raw(proxy.port, b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    assert reply_status(reply) == 502, reply[:200]
    assert reply.endswith(b"the machine failed to answer\n")


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 150 Odd\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 199 Odd\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ],
)
async def test_an_interim_answer_with_a_body_gets_502_and_none_of_it_is_relayed(
    raw_backend: RawBackend, start_proxy: StartProxy, interim: bytes
) -> None:
    """A 1xx ends at its head whatever its headers say (RFC 9112 6.3); llhttp reads a
    body after one it does not know, by its length or chunks, and would have put those
    bytes before the final answer's body, past the length its head announced."""
    answer = interim + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    addr = await machine_with(raw_backend, answer, [])
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    reply = await raw(proxy.port, b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 502 "), reply[:300]
    assert b"hello" not in reply
    assert b" Odd" not in reply


async def test_an_http_version_other_than_1_0_and_1_1_gets_505(
    backend: Backend, start_proxy: StartProxy
) -> None:
    seen: list[dict[str, Any]] = []
    port = await proxy_for(backend, start_proxy, seen_app(seen))
    with capture_logs() as logged:
        reply = await raw(port, b"GET / HTTP/2.0\r\nHost: a.test\r\n\r\n")
    assert reply_status(reply) == 505, reply[:200]
    assert reply.endswith(b"HTTP/2.0 is not supported\n")
    assert seen == []
    # The client's mistake, not ours: no error line for any scanner to set off.
    errors = [e for e in logged if e["event"] == "proxy_error"]
    assert [e["log_level"] for e in errors] == ["warning"], errors


async def test_the_proxys_own_errors_to_head_have_no_body(
    backend: Backend, start_proxy: StartProxy
) -> None:
    """A HEAD answered with a body: the client reads no body after a HEAD's head, so the
    body's bytes would be taken for the start of the next response on the connection."""
    addr = await backend(seen_app())
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    reply = await raw(
        proxy.port,
        b"HEAD / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    first, _, rest = reply.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 404 ")
    assert b"\r\ncontent-length: 35" in first.lower()  # the length a GET's body would have
    assert rest.startswith(b"HTTP/1.1 200 "), rest[:80]
