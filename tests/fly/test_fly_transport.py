"""The client against a real loopback HTTP server that misbehaves: an answer that trickles
in, a call cancelled in flight, an answer too large to hold. httpx's timeouts bound each
read, not the whole answer, and nothing bounded its size."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from flyfakes import Script, make_client
from structlog.testing import capture_logs

from autoscaler.fly.client import MachinesClient, one_attempt
from autoscaler.fly.errors import FlyError, ServerError, TransportError

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def http_server(handler: Handler) -> AsyncIterator[str]:
    """A bare HTTP/1.1 server on 127.0.0.1: ``handler(request_line, writer)`` answers
    each request of a connection; its URL. Its connections are closed on the way out."""
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            while line := await reader.readline():
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                await handler(line, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            tasks.discard(task)
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def answer(writer: asyncio.StreamWriter, body: bytes = b"[]") -> None:
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    writer.write(head.encode() + b"\r\n" + body)
    await writer.drain()


async def test_an_answer_that_trickles_in_is_cut_off_at_the_call_timeout() -> None:
    """A proxy or API that sends its answer a byte at a time, each well within the read
    timeout, held a call (and a control tick's "one bounded attempt") until it was done:
    httpx's timeout bounds each read, not the exchange. The whole attempt is bounded now,
    and the connection pool is usable afterwards."""

    async def handler(line: bytes, writer: asyncio.StreamWriter) -> None:
        if b"/apps/slow/" not in line:
            await answer(writer)
            return
        body = b" " * 38 + b"[]"  # valid JSON, in 40 steps of 0.1 s: 4 s in all
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
        )
        for byte in body:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.1)

    async with (
        http_server(handler) as url,
        MachinesClient(url, "tok-0123456789abcdef", timeout_s=0.5, rate_limit=False) as api,
    ):
        with one_attempt(0.5), pytest.raises(TransportError) as info:
            await api.list_machines("slow")
        assert info.value.sent
        assert await api.list_machines("fast") == []


async def chunked(writer: asyncio.StreamWriter, status: str, body: bytes, step: int) -> None:
    """An answer of ``body`` in chunks of ``step`` bytes, with no content-length."""
    writer.write(f"HTTP/1.1 {status}\r\ntransfer-encoding: chunked\r\n\r\n".encode())
    for i in range(0, len(body), step):
        piece = body[i : i + step]
        writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def test_an_answer_larger_than_max_response_bytes_fails_the_call_unread() -> None:
    """The whole body was read into memory, however large: a proxy or API gone wrong
    could fill it. An answer over the cap (here 64 KiB; by default 32 MiB) fails the
    call with a FlyError that says so, read no further than the cap."""
    token = "tok-0123456789abcdef"

    async def handler(line: bytes, writer: asyncio.StreamWriter) -> None:
        if b"/apps/huge/" in line:  # valid JSON, 4 MiB, in chunks: no length up front
            await chunked(writer, "200 OK", b"[" + b" " * (4 << 20) + b"]", 65536)
        elif b"/apps/page/" in line:  # a 4 MiB error page
            page = b"<html><title>502 Bad Gateway</title>" + b"<p>x</p>" * (1 << 19)
            await chunked(writer, "502 Bad Gateway", page, 65536)
        else:
            await answer(writer)

    async with (
        http_server(handler) as url,
        MachinesClient(
            url, token, rate_limit=False, max_retries=0, max_response_bytes=65536
        ) as api,
    ):
        with pytest.raises(FlyError) as info:
            await api.list_machines("huge")
        assert type(info.value) is FlyError
        assert info.value.status == 200
        assert "over 65536 bytes" in str(info.value)
        assert token not in str(info.value)
        with pytest.raises(ServerError) as page:
            await api.list_machines("page")
        assert page.value.message == "HTML page: 502 Bad Gateway"
        assert await api.list_machines("fast") == []  # the client is fine afterwards


@pytest.mark.parametrize("how", ["content-length", "gzip"])
async def test_a_large_answer_is_refused_by_its_length_or_once_decompressed(how: str) -> None:
    """A declared length over the cap is refused before reading; a small gzip body that
    would decompress past it (a 4 MiB list in 4 kB) is cut where it crosses it."""
    body = b"[" + b" " * (4 << 20) + b"]"
    if how == "gzip":
        packed = gzip.compress(body)
        assert len(packed) < 65536
        reply = httpx.Response(200, content=packed, headers={"content-encoding": "gzip"})
    else:
        reply = httpx.Response(200, content=body)
    with capture_logs() as captured:
        async with make_client(Script([reply]), max_retries=0, max_response_bytes=65536) as api:
            with pytest.raises(FlyError, match="over 65536 bytes"):
                await api.list_machines("web")
    assert [e["log_level"] for e in captured if e["event"] == "fly_api"] == ["warning"]
    async with make_client(Script([reply]), max_retries=0) as api:
        assert await api.list_machines("web") == []  # within the default 32 MiB
