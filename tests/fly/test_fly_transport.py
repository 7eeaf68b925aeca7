"""The client against a real loopback HTTP server that misbehaves: an answer that trickles
in, a call cancelled in flight. httpx's timeouts bound each read, not the whole answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from autoscaler.fly.client import MachinesClient, one_attempt
from autoscaler.fly.errors import TransportError

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
