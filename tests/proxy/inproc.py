"""The client side of the proxy (h1.py) in process: bytes go to ``data_received`` of a
:class:`Connection` on a fake transport, as uvicorn's protocol tests do; no socket, no
upstream. The handler records each request as the machine would get it (the head
``forward.request_head`` builds, and the body read through) and answers 200.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from autoscaler.proxy import forward
from autoscaler.proxy.body import BufferBudget
from autoscaler.proxy.h1 import Connection, H1Server, ParseError, Request

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class FakeTransport(asyncio.Transport):
    """What a Connection uses of its transport, recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.paused = False
        self.protocol: Connection | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.protocol is not None:
                asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_reading(self) -> bool:
        return not self.paused

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


class Seen:
    """One request as the machine would receive it (head bytes, then the body)."""

    def __init__(self, head: bytes, body: bytes, request: Request) -> None:
        self.head = head
        self.body = body
        self.request = request


class Harness:
    """An H1Server with no listener, one connection at a time, recording what it serves."""

    def __init__(
        self,
        *,
        max_header_bytes: int = 8190,
        budget: BufferBudget | None = None,
        read_bodies: bool = True,
    ) -> None:
        self.seen: list[Seen] = []
        self.errors: list[int] = []
        self.read_bodies = read_bodies
        self.gate: asyncio.Event = asyncio.Event()
        self.gate.set()
        self.server = H1Server(
            self._handle,
            self._error_page,
            max_connections=100,
            max_header_bytes=max_header_bytes,
            client_timeout_s=30.0,
        )
        self.server.loop = asyncio.get_running_loop()
        self.server.budget = budget
        self.trust = forward.Trust(())

    async def _handle(self, request: Request) -> None:
        await self.gate.wait()
        head = forward.request_head(request, "id", self.trust, "default.test")
        body = b""
        if request.body is not None and self.read_bodies:
            chunks = []
            try:
                while chunk := await request.body.read():
                    chunks.append(chunk)
            except ParseError as exc:  # the body broke the rules: the client gets it
                self.errors.append(exc.status)
                request.conn.write(self._error_page(exc.status, exc.message))
                request.keep_alive = False
                return
            body = b"".join(chunks)
        self.seen.append(Seen(head, body, request))
        request.conn.write(OK)

    def _error_page(self, status: int, message: str) -> bytes:
        self.errors.append(status)
        return b"HTTP/1.1 %d X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % status

    def connect(self) -> tuple[Connection, FakeTransport]:
        conn = Connection(self.server)
        transport = FakeTransport()
        transport.protocol = conn
        conn.connection_made(transport)
        return conn, transport

    async def run(self, pieces: Iterable[bytes]) -> tuple[list[Seen], list[int], bytes]:
        """Feed ``pieces`` one by one (letting the handlers run between them, and waiting
        while the connection paused reading), then let it settle; the requests served,
        the statuses of the proxy's own errors, and the bytes written back."""
        conn, transport = self.connect()
        for piece in pieces:
            if transport.closed:
                break
            for _ in range(1000):  # the client's bytes wait while reading is paused
                if not transport.paused or transport.closed:
                    break
                await asyncio.sleep(0)
            conn.data_received(piece)
            await _settle()
        if not transport.closed:
            conn.eof_received()
        await _settle()
        transport.close()
        await _settle()
        return self.seen, self.errors, bytes(transport.out)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)
