"""Small helpers shared by the proxy tests."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any

import aiohttp
from aiohttp import web
from testkit import until

from autoscaler.proxy.h1 import Connection
from autoscaler.proxy.server import ProxyServer

from .conftest import Backend, StartProxy

BOUND_S = 5  # an upper bound on any single exchange, never an expectation of speed

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def connect(port: int) -> AsyncIterator[Conn]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()


def parse_head(head: bytes) -> tuple[int, dict[str, list[str]]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if line:
            key, _, value = line.partition(":")
            headers.setdefault(key.strip().lower(), []).append(value.strip())
    return status, headers


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, list[str]], bytes]:
    """One response framed by Content-Length (what the proxy relays from aiohttp here)."""
    async with asyncio.timeout(BOUND_S):
        head = await reader.readuntil(b"\r\n\r\n")
        status, headers = parse_head(head)
        body = await reader.readexactly(int(headers["content-length"][0]))
    return status, headers, body


async def status_of(session: aiohttp.ClientSession, target: str, host: str) -> int:
    """The status of one GET of ``target`` with ``Host: host`` (the body is not read)."""
    async with session.get(target, headers={"Host": host}) as resp:
        return resp.status


async def answer_of(session: aiohttp.ClientSession, target: str, host: str) -> tuple[int, str]:
    """The status and body of one GET of ``target`` with ``Host: host``."""
    async with session.get(target, headers={"Host": host}) as resp:
        return resp.status, await resp.text()


def text_app(text: str) -> web.Application:
    """A machine that answers GET / with ``text``."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=text)

    app = web.Application()
    app.router.add_get("/", handler)
    return app


async def raw(port: int, data: bytes) -> bytes:
    """Send bytes as-is and read until the proxy closes (requests say Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await reader.read(-1)
    finally:
        writer.close()
        await writer.wait_closed()


def seen_app(seen: list[dict[str, Any]] | None = None) -> web.Application:
    """Answers with a JSON of what it received (method, path, version, headers, body)."""

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        record = {
            "method": request.method,
            "path": request.raw_path,
            "version": f"{request.version.major}.{request.version.minor}",
            "headers": [[k.lower(), v] for k, v in request.headers.items()],
            "body": body.decode("latin-1"),
        }
        if seen is not None:
            seen.append(record)
        return web.json_response(record)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


async def proxy_for(
    backend: Backend, start_proxy: StartProxy, app: web.Application, **knobs: Any
) -> int:
    addr = await backend(app)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}], **knobs)
    return proxy.port


def reply_status(reply: bytes) -> int:
    """The status code of a raw reply's status line."""
    return int(reply.split(b" ", 2)[1])


class Blocking:
    """An upstream whose requests wait until released; records arrival order."""

    def __init__(self, name: str = "m") -> None:
        self.name = name
        self.order: list[str] = []
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        async def handler(request: web.Request) -> web.Response:
            self.order.append(request.query.get("id", ""))
            await self.release.wait()
            return web.Response(text=self.name)

        app = web.Application()
        app.router.add_get("/", handler)
        return app


@asynccontextmanager
async def slow_reader(proxy: ProxyServer) -> AsyncIterator[tuple[socket.socket, Connection]]:
    """A raw client socket to ``proxy`` (an asyncio stream would read for us) that takes
    nothing unless told, with small kernel buffers on both sides (loopback autotunes them
    to megabytes): what the client does not take waits in the proxy, as on a slow network.
    Yields the socket and the proxy's connection for it."""
    clients = proxy._server.connections  # the listener's open client connections
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
        await until(lambda: len(clients) == 1)
        (conn,) = clients
        assert conn.transport is not None
        proxy_side = conn.transport.get_extra_info("socket")
        proxy_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        yield sock, conn


@contextmanager
def unanswering_port() -> Iterator[tuple[int, Callable[[], None]]]:
    """A loopback port whose accept queue is full: a connect to it hangs (the SYN is
    dropped) until the returned ``refuse()`` closes the listener, after which the SYN sent
    again is refused."""
    listener = socket.socket()
    fillers = [socket.socket() for _ in range(3)]
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for filler in fillers:  # the accept queue full: a connect hangs until refused
            filler.setblocking(False)
            with suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield port, listener.close
    finally:
        listener.close()
        for filler in fillers:
            filler.close()
