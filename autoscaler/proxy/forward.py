"""Headers, streamed bodies and the WebSocket relay between a client and one machine.

Nothing here buffers a whole body: request bodies go upstream chunk by chunk as the client
sends them (an async generator handed to aiohttp's client, which waits for the socket to
drain), and responses come back the same way, so memory stays flat for any body size.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from aiohttp import ClientWebSocketResponse, WSCloseCode, WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy

VIA = "autoscaler"

# RFC 9110 §7.6.1, plus the non-standard Proxy-Connection; Proxy-* are the proxy's own.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP)
# Set by this proxy from what it saw itself (or kept from a trusted proxy in front).
_FORWARDING = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-request-id"}
)
# The WebSocket handshake is made anew on the upstream hop.
_WS_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
    }
)
# Expect is answered by this proxy when the body is first read (see BodyStream).
_REQUEST_DROP = HOP_BY_HOP | _FORWARDING | {"expect"}

WS_MAX_MESSAGE = 16 * 1024 * 1024


class Trust:
    """Which peers may set X-Forwarded-* (``proxy.trusted_proxies``)."""

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusted(self, peer: str | None) -> bool:
        if not self._networks or not peer:
            return False
        known = self._cache.get(peer)
        if known is None:
            try:
                addr = ipaddress.ip_address(peer)
            except ValueError:
                known = False
            else:
                known = any(addr in net for net in self._networks)
            if len(self._cache) > 4096:  # peers are unbounded; keep the cache small
                self._cache.clear()
            self._cache[peer] = known
        return known


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    values = headers.getall("Connection", ())
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def request_headers(
    request: web.BaseRequest,
    request_id: str,
    trust: Trust,
    *,
    websocket: bool = False,
) -> CIMultiDict[str]:
    """The headers sent upstream: hop-by-hop gone, forwarding headers set, Host kept."""
    src = request.headers
    named = _connection_tokens(src)
    drop = _REQUEST_DROP | _WS_HANDSHAKE if websocket else _REQUEST_DROP
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in src.items():
        low = key.lower()
        if low in drop or low in named or low.startswith("proxy-"):
            continue
        out.add(key, value)
    peer = request.remote or ""
    if trust.trusted(peer):
        chain = src.getall("X-Forwarded-For", ())
        out["X-Forwarded-For"] = ", ".join([*chain, peer]) if chain else peer
        out["X-Forwarded-Proto"] = src.get("X-Forwarded-Proto") or _scheme(request)
        out["X-Forwarded-Host"] = src.get("X-Forwarded-Host") or src.get("Host") or ""
        for forwarded in src.getall("Forwarded", ()):
            out.add("Forwarded", forwarded)
    else:
        out["X-Forwarded-For"] = peer
        out["X-Forwarded-Proto"] = _scheme(request)
        out["X-Forwarded-Host"] = src.get("Host", "")
    version = request.version
    via = f"{version.major}.{version.minor} {VIA}"
    earlier = src.get("Via")
    out["Via"] = f"{earlier}, {via}" if earlier else via
    out["X-Request-Id"] = request_id
    return out


def _scheme(request: web.BaseRequest) -> str:
    return "https" if request.transport is not None and request.secure else "http"


def response_headers(
    raw: Iterable[tuple[bytes, bytes]], request_id: str, wake: str | None, version: str
) -> CIMultiDict[str]:
    """Upstream response headers minus hop-by-hop ones; every Set-Cookie kept as sent."""
    out: CIMultiDict[str] = CIMultiDict()
    named: list[str] = []
    # One pass over the raw bytes (this runs for every response): names compared as bytes,
    # only kept headers decoded.
    for key, value in raw:
        low = key.lower()
        if low in _HOP_BY_HOP_BYTES or low.startswith(b"proxy-"):
            if low == b"connection":
                named.extend(t.strip().lower() for t in value.decode("latin-1").split(","))
            continue
        out.add(key.decode("latin-1"), value.decode("latin-1"))
    for name in named:  # headers the machine declared hop-by-hop through Connection
        if name:
            out.popall(name, None)
    via = f"{version} {VIA}"
    earlier = out.get("Via")
    out["Via"] = f"{earlier}, {via}" if earlier else via
    if "X-Request-Id" not in out:
        out["X-Request-Id"] = request_id
    if wake is not None:
        out["Fly-Autoscaler-Wake"] = wake
    return out


class BodyTooLarge(Exception):
    """The client sent more than the app's ``max_body_bytes``."""


class ClientTimeout(Exception):
    """The client stopped sending its body for ``client_timeout_s``."""


@dataclass(slots=True)
class BodyStream:
    """The client's request body as an async iterator, read only as upstream takes it.

    Records what happened, because aiohttp's client wraps exceptions raised by a body:
    the proxy reads these flags to tell a 413 or a slow client from a machine failure,
    and ``started`` to know whether a retry could replay the request.
    """

    request: web.BaseRequest
    limit: int | None
    timeout: float
    expect_continue: bool
    on_done: asyncio.Timeout | None = None  # the upstream timeout starts when the body ends
    upstream_timeout: float = 0.0
    started: bool = False
    too_large: bool = False
    timed_out: bool = False
    received: int = field(default=0)

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        request = self.request
        if self.expect_continue:
            # The client waits for this before sending; it goes out only once a machine
            # was chosen and wants the body.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        content = request.content
        limit = self.limit
        while True:
            try:
                async with asyncio.timeout(self.timeout):
                    chunk = await content.readany()
            except TimeoutError:
                self.timed_out = True
                raise ClientTimeout from None
            if not chunk:
                break
            self.received += len(chunk)
            if limit is not None and self.received > limit:
                self.too_large = True
                raise BodyTooLarge
            yield chunk
        if self.on_done is not None:
            loop = asyncio.get_running_loop()
            self.on_done.reschedule(loop.time() + self.upstream_timeout)


# --- WebSockets -----------------------------------------------------------------------

# Codes that may not travel in a close frame (RFC 6455 §7.4.1), and what is sent instead.
_UNSENDABLE = {0, 1004, 1005, 1006, 1015}


def _close_code(code: int | None, fallback: int) -> int:
    if code is None or code in _UNSENDABLE or not 1000 <= code <= 4999:
        return fallback
    return code


async def relay_websocket(client: web.WebSocketResponse, upstream: ClientWebSocketResponse) -> None:
    """Relay messages both ways until either side closes; pass the close code on.

    The side whose peer closes first runs the closing handshake on both hops; aiohttp then
    hands the other direction's pending ``receive()`` a CLOSING message, which must not
    start a second close with another code, hence ``closer``.
    """
    closer: list[str] = []

    async def pump(
        src: web.WebSocketResponse | ClientWebSocketResponse,
        dst: web.WebSocketResponse | ClientWebSocketResponse,
        name: str,
        abnormal: int,
    ) -> None:
        while True:
            msg = await src.receive()
            kind = msg.type
            if kind is WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif kind is WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif kind is WSMsgType.CLOSE:
                if closer:
                    return
                closer.append(name)
                code = _close_code(msg.data, WSCloseCode.OK)
                await dst.close(code=code, message=(msg.extra or "").encode())
                await src.close(code=code)
                return
            elif kind in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                if not closer:  # this peer vanished without a close frame
                    closer.append(name)
                    await dst.close(code=abnormal)
                return

    tasks = [
        asyncio.ensure_future(pump(client, upstream, "client", WSCloseCode.GOING_AWAY)),
        asyncio.ensure_future(pump(upstream, client, "upstream", WSCloseCode.INTERNAL_ERROR)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.wait(tasks)  # the closing handshake ends the other direction too
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not upstream.closed:
            await upstream.close(code=WSCloseCode.GOING_AWAY)
        if not client.closed:
            await client.close(code=WSCloseCode.GOING_AWAY)
