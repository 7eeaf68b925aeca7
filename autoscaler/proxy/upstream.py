"""A lean HTTP/1.1 client for the hop to the machines, with keep-alive pools per machine.

aiohttp's ``ClientSession.request`` spends ~160 µs of CPU per request on things a proxy
does not use (URL handling, cookies, redirects, tracing, auto headers, timers); the same
exchange over a raw keep-alive connection costs ~25 µs. This module keeps aiohttp's
protocol pieces, the C response parser (``ResponseHandler``) and the request writer
(``StreamWriter``), and drops the rest: a request is a head written on a pooled connection,
a body streamed by a task, and the response read off the parser.

Errors keep aiohttp's exception classes so callers classify them one way:
``ClientConnectorError`` / ``ConnectionTimeoutError`` (nothing was sent), and
``ClientConnectionError`` subclasses for a connection lost before the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import ClientConnectionError, ClientError
from aiohttp.client_exceptions import (
    ClientConnectorError,
    ClientOSError,
    ConnectionTimeoutError,
    ServerDisconnectedError,
)
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.http_parser import RawResponseMessage
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

# A pooled connection idle longer than this is closed rather than reused: servers commonly
# drop idle keep-alive connections after 5-60 s, and reusing one they just dropped costs a
# failed attempt.
IDLE_S = 4.0


class UnexpectedUpgrade(ClientError):
    """The machine switched protocols on a request that did not ask to (no Upgrade sent)."""


@dataclass(slots=True)
class _Idle:
    proto: ResponseHandler
    since: float


class Exchange:
    """One request on one connection: the response, its body, and the connection's fate."""

    __slots__ = ("_body_task", "_pool", "_proto", "authority", "message", "payload", "reused")

    def __init__(self, pool: Pool, authority: str, proto: ResponseHandler, reused: bool) -> None:
        self._pool = pool
        self._proto: ResponseHandler | None = proto
        self._body_task: asyncio.Task[None] | None = None
        self.authority = authority
        self.reused = reused
        self.message: RawResponseMessage | None = None
        self.payload: StreamReader | None = None

    def release(self) -> None:
        """Back to the pool if the exchange finished cleanly, else closed."""
        proto, self._proto = self._proto, None
        if proto is None:
            return
        task = self._body_task
        clean = (
            self.message is not None
            and not self.message.should_close
            and self.payload is not None
            and self.payload.is_eof()
            and (
                task is None or (task.done() and not task.cancelled() and task.exception() is None)
            )
            and not proto.should_close
        )
        if task is not None and not task.done():
            task.cancel()
        if clean:
            self._pool.put(self.authority, proto)
        else:
            proto.close()


class Pool:
    """Keep-alive connections per machine (``host:port``), at most ``size`` idle each."""

    def __init__(self, size: int, connect_timeout_s: float) -> None:
        self.size = size
        self.connect_timeout_s = connect_timeout_s
        self._idle: dict[str, list[_Idle]] = {}
        self._closed = False
        self._puts = 0

    def put(self, authority: str, proto: ResponseHandler) -> None:
        idle = self._idle.setdefault(authority, [])
        if self._closed or len(idle) >= self.size or not proto.is_connected():
            proto.close()
            return
        idle.append(_Idle(proto, time.monotonic()))
        self._puts += 1
        if self._puts % 1024 == 0:
            self._sweep()

    def _sweep(self) -> None:
        """Forget machines gone quiet (suspended, removed): their sockets and dict keys."""
        now = time.monotonic()
        for authority in list(self._idle):
            keep = []
            for entry in self._idle[authority]:
                if now - entry.since < IDLE_S and entry.proto.is_connected():
                    keep.append(entry)
                else:
                    entry.proto.close()
            if keep:
                self._idle[authority] = keep
            else:
                del self._idle[authority]

    async def connect(
        self, host: str, port: int, authority: str, *, fresh: bool = False
    ) -> tuple[ResponseHandler, bool]:
        """A connection to the machine: the newest idle one, else a new one."""
        idle = self._idle.get(authority)
        if idle and not fresh:
            now = time.monotonic()
            while idle:
                entry = idle.pop()  # newest first: the least likely to have been dropped
                if now - entry.since < IDLE_S and entry.proto.is_connected():
                    for stale in idle:  # older ones would expire first anyway
                        if now - stale.since >= IDLE_S:
                            stale.proto.close()
                    idle[:] = [s for s in idle if now - s.since < IDLE_S]
                    return entry.proto, True
                entry.proto.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, proto = await loop.create_connection(lambda: ResponseHandler(loop), host, port)
        except TimeoutError:
            raise ConnectionTimeoutError(f"connecting to {authority} timed out") from None
        except OSError as exc:
            key = ConnectionKey(host, port, False, True, None, None, None)
            raise ClientConnectorError(key, exc) from exc
        return proto, False

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for entry in idle:
                entry.proto.close()
        self._idle.clear()


async def send(
    pool: Pool,
    host: str,
    port: int,
    authority: str,
    method: str,
    target: str,
    headers: CIMultiDict[str],
    body: AsyncIterator[bytes] | None,
    *,
    replayable: bool = False,
    max_field_size: int = 8190,
) -> Exchange:
    """Send the request head (and start streaming the body); return once the response's
    head arrived. The caller reads ``exchange.payload`` and must call ``release()``.

    A pooled connection the machine closed while idle fails at once; a ``replayable``
    request (idempotent, no body) is then sent again on a new connection to the same
    machine, as browsers and aiohttp do.
    """
    try:
        return await _send(
            pool, host, port, authority, method, target, headers, body, False, max_field_size
        )
    except _StaleConnection as stale:
        if not replayable:
            raise stale.error from None
    return await _send(
        pool, host, port, authority, method, target, headers, body, True, max_field_size
    )


class _StaleConnection(Exception):
    def __init__(self, error: ClientConnectionError) -> None:
        super().__init__(str(error))
        self.error = error


async def _send(
    pool: Pool,
    host: str,
    port: int,
    authority: str,
    method: str,
    target: str,
    headers: CIMultiDict[str],
    body: AsyncIterator[bytes] | None,
    fresh: bool,
    max_field_size: int,
) -> Exchange:
    proto, reused = await pool.connect(host, port, authority, fresh=fresh)
    exchange = Exchange(pool, authority, proto, reused)
    try:
        proto.set_response_params(
            skip_payload=method == "HEAD",
            read_until_eof=True,
            auto_decompress=False,
            max_line_size=max_field_size,
            max_field_size=max_field_size,
        )
        loop = asyncio.get_running_loop()
        writer = StreamWriter(proto, loop)
        if body is not None and "Content-Length" not in headers:
            headers["Transfer-Encoding"] = "chunked"
            writer.enable_chunking()
        await writer.write_headers(f"{method} {target} HTTP/1.1", headers)
        if body is None:
            await writer.write_eof()
        else:
            writer.send_headers()
            exchange._body_task = loop.create_task(_send_body(writer, body, proto))
            exchange._body_task.add_done_callback(_retrieved)
        while True:
            message, payload = await _read(proto, exchange._body_task)
            if message.code == 101:
                raise UnexpectedUpgrade("the machine switched protocols unasked")
            # 1xx interim responses (100 Continue, 103 Early Hints) are the hop's own.
            if not 100 <= message.code < 200:
                break
        exchange.message, exchange.payload = message, payload
        return exchange
    except ClientConnectionError as exc:
        exchange.release()
        if reused and body is None:
            raise _StaleConnection(exc) from exc
        raise
    except BaseException:
        exchange.release()
        raise


async def _read(
    proto: ResponseHandler, body_task: asyncio.Task[None] | None
) -> tuple[RawResponseMessage, StreamReader]:
    try:
        return await proto.read()
    except ClientConnectionError:
        raise
    except OSError as exc:
        raise ClientOSError(*exc.args) from exc
    except asyncio.CancelledError:
        raise
    except Exception:
        # A body failure closed the connection; let the caller see why (413, 408, ...).
        if body_task is not None and body_task.done() and not body_task.cancelled():
            failure = body_task.exception()
            if failure is not None:
                raise ServerDisconnectedError() from failure
        raise


def _retrieved(task: asyncio.Task[None]) -> None:
    """Mark a body failure as seen: it reaches the client through the response path (408,
    413, 502), and an unread one would be logged as "Task exception was never retrieved"."""
    if not task.cancelled():
        task.exception()


async def _send_body(
    writer: StreamWriter, body: AsyncIterator[bytes], proto: ResponseHandler
) -> None:
    try:
        async for chunk in body:
            await writer.write(chunk)
        await writer.write_eof()
    except asyncio.CancelledError:
        raise
    except BaseException:
        # The client's body failed (too large, too slow, gone) or the machine stopped
        # reading: the request is incomplete, so this connection can never be reused.
        proto.abort()
        raise
    finally:
        with contextlib.suppress(Exception):
            await body.aclose()  # type: ignore[attr-defined]
