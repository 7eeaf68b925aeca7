"""The heads a request and its response carry across the proxy, and the streamed body.

Heads are built as bytes from the raw header pairs, in one pass each: hop-by-hop headers
dropped (RFC 9110 §7.6.1: Connection and the headers it names, Keep-Alive, TE, Trailer,
Transfer-Encoding, Upgrade, and ``Proxy-*``), forwarding headers set (those an untrusted client
sent replaced), a request's hop-by-hop and forwarding headers spelled with underscores
(``X_Forwarded_For``, which CGI and WSGI servers read as X-Forwarded-For) dropped from
anyone, every other header kept with its name's case and its value's bytes, repeated ones
(Set-Cookie) included. A machine's interim answers (103 Early Hints...) reach an HTTP/1.1
client before the final one, every one in order (:class:`Interim`: a client behind holds
the machine back), hop-by-hop headers dropped there too. A client's
``Expect: 100-continue`` goes on to the machine: its own 100 tells the client to send the
body, and its final answer before one spares the client the upload (:class:`BodyStream`).
A machine whose last answer said HTTP/1.0 sends no 100: the request goes to it without
Expect, and the client gets the proxy's own 100 at once (RFC 9110 10.1.1; the server's
``_forward``). Any other expectation is answered 417 by the parser (``h1``), before a
machine is asked; an HTTP/1.0 request's ``Expect`` is ignored there (RFC 9110 10.1.1), and
goes nowhere.

Nothing here buffers a whole body: a request body goes upstream chunk by chunk as the
client sends it (:class:`BodyStream`), so memory stays flat for any size.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from autoscaler.proxy.accounting import Failure
from autoscaler.proxy.body import Body, FlowControl
from autoscaler.proxy.h1 import Connection, ParseError, Request

VIA = b"autoscaler"

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by this proxy from what it saw itself (or kept from a trusted proxy in front).
_FORWARDING = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-request-id"}
)
# Expect: 100-continue goes to the machine as the proxy spells it (request_head's
# ``expect``; a request with any other expectation got 417, an HTTP/1.0 request's is
# ignored); Via is rewritten with this hop appended.
_REQUEST_DROP = HOP_BY_HOP | _FORWARDING | {b"expect", b"via"}
_RESPONSE_DROP = HOP_BY_HOP | {b"via"}

# What a head does with a header, by its name as written: classified once per name, then
# memoized (names are few and repeat on every request; the tables are bounded). Kinds
# below _KEEP leave the head; the others stay in it.
_DROP: Final = 0
_CONNECTION: Final = 1
_VIA_NAME: Final = 2
_FORWARDED_FOR: Final = 3
_FORWARDED_PROTO: Final = 4
_FORWARDED_HOST: Final = 5
_FORWARDED: Final = 6
_KEEP: Final = 7
_HOST: Final = 8
_LENGTH: Final = 9
_REQUEST_ID: Final = 10
# The dropped request headers whose values the proxy still reads.
_READ_WHEN_DROPPED = {
    b"connection": _CONNECTION,
    b"via": _VIA_NAME,
    b"x-forwarded-for": _FORWARDED_FOR,
    b"x-forwarded-proto": _FORWARDED_PROTO,
    b"x-forwarded-host": _FORWARDED_HOST,
    b"forwarded": _FORWARDED,
}
_MAX_NAMES = 4096


def _request_class(low: bytes) -> int:
    if low in _REQUEST_DROP or low[:6] == b"proxy-":
        return _READ_WHEN_DROPPED.get(low, _DROP)
    if b"_" in low:
        # CGI and WSGI servers read "X_Forwarded_For" as X-Forwarded-For (both are
        # HTTP_X_FORWARDED_FOR): a client could set what the proxy sets. Dropped, as nginx
        # and Apache drop every name with an underscore.
        dashed = low.replace(b"_", b"-")
        if dashed in _REQUEST_DROP or dashed[:6] == b"proxy-":
            return _DROP
    return _HOST if low == b"host" else _KEEP


def _response_class(low: bytes) -> int:
    if low in _RESPONSE_DROP or low[:6] == b"proxy-":
        return _CONNECTION if low == b"connection" else _VIA_NAME if low == b"via" else _DROP
    if low == b"content-length":
        return _LENGTH
    return _REQUEST_ID if low == b"x-request-id" else _KEEP


def _kind(table: dict[bytes, int], name: bytes, classify: Callable[[bytes], int]) -> int:
    kind = table.get(name)
    if kind is None:
        kind = classify(name.lower())
        if len(table) < _MAX_NAMES:
            table[name] = kind
    return kind


_REQUEST_KINDS: dict[bytes, int] = {}
_RESPONSE_KINDS: dict[bytes, int] = {}


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


def _tokens(value: bytes | None) -> set[bytes]:
    """Header names a Connection header's value declares hop-by-hop."""
    if not value:
        return set()
    return {t.strip().lower() for t in value.split(b",")} - {b""}


def _without(parts: list[bytes], named: set[bytes]) -> list[bytes]:
    """``parts`` (a line, then name, ": ", value, CRLF per header) minus ``named`` headers."""
    out = parts[:1]
    for i in range(1, len(parts), 4):
        if parts[i].lower() not in named:
            out += parts[i : i + 4]
    return out


def _drop_named(parts: list[bytes], connection: bytes | None) -> list[bytes]:
    """``parts`` without the headers the Connection header(s) named (rare)."""
    named = _tokens(connection) - _KEEP_NAMED
    return _without(parts, named) if named else parts


def _add_via(parts: list[bytes], earlier: list[bytes], version: str) -> None:
    """Via with this hop appended to the ones before it."""
    if earlier:
        parts.append(b"Via: %b\r\n" % _join(earlier, _VIA[version]))
    else:
        parts.append(_VIA_LINE[version])


def _join(values: list[bytes], last: bytes) -> bytes:
    return b", ".join([*values, last]) if values else last


def request_head(
    request: Request,
    request_id: str,
    trust: Trust,
    default_host: str,
    *,
    websocket: bool = False,
    expect: bool = False,
) -> bytes:
    """The head sent upstream: request line, kept headers, forwarding headers, framing.

    One pass over the headers, kept ones appended as they come; the headers a Connection
    header names (rare) are taken out afterwards. With ``expect``, the client's
    ``Expect: 100-continue`` goes on: the machine says whether it wants the body.
    """
    parts = [f"{request.method} {request.target} HTTP/1.1\r\n".encode("latin-1")]
    forwarded_for: list[bytes] = []
    forwarded: list[bytes] = []
    via: list[bytes] = []
    connection = proto = fwd_host = host = None
    for key, value in request.headers:
        kind = _kind(_REQUEST_KINDS, key, _request_class)
        if kind < _KEEP:
            if kind == _CONNECTION:
                connection = value if connection is None else connection + b"," + value
            elif kind == _FORWARDED_FOR:
                forwarded_for.append(value)
            elif kind == _FORWARDED_PROTO:
                proto = proto or value
            elif kind == _FORWARDED_HOST:
                fwd_host = fwd_host or value
            elif kind == _FORWARDED:
                forwarded.append(value)
            elif kind == _VIA_NAME:
                via.append(value)
            continue
        if kind == _HOST:
            host = value
        parts += (key, b": ", value, b"\r\n")
    if connection is not None:
        parts = _drop_named(parts, connection)
    peer = request.conn.peer_bytes
    if trust and trust.trusted(request.peer):
        parts.append(b"X-Forwarded-For: %b\r\n" % _join(forwarded_for, peer))
        parts.append(b"X-Forwarded-Proto: %b\r\n" % (proto or b"http"))
        parts.append(b"X-Forwarded-Host: %b\r\n" % (fwd_host or host or b""))
        parts.extend(b"Forwarded: %b\r\n" % value for value in forwarded)
    else:
        parts += (b"X-Forwarded-For: ", peer, b"\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: ")
        parts += (host or b"", b"\r\n")
    if host is None:  # an HTTP/1.0 client; an HTTP/1.1 request needs one
        parts.append(b"Host: %b\r\n" % default_host.encode("latin-1"))
    _add_via(parts, via, request.version)
    parts += (b"X-Request-Id: ", request_id.encode("latin-1"), b"\r\n")
    if expect:
        parts.append(b"Expect: 100-continue\r\n")
    if websocket:
        parts.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    elif request.body is not None and request.content_length is None:
        parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
    else:
        parts.append(b"\r\n")
    return b"".join(parts)


class _Memo(dict[str, bytes]):
    """Bytes made once per key (a protocol version, a wake kind: a handful of values)."""

    def __init__(self, make: Callable[[str], bytes]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, key: str) -> bytes:
        value = self[key] = self._make(key)
        return value


_VIA = _Memo(lambda version: version.encode("latin-1") + b" " + VIA)  # "1.1 autoscaler"
_VIA_LINE = _Memo(lambda version: b"Via: %b\r\n" % _VIA[version])  # when no hop came before
# Connection tokens that drop nothing. keep-alive, close and upgrade name no header beyond
# the usual ones. The rest name headers the message's framing, routing or tracing rest on:
# a peer could otherwise strip a request's Content-Length and have its body read upstream
# as a second request (smuggling), or a response's and leave the client unable to tell
# where it ends.
_KEEP_NAMED = frozenset(
    {b"keep-alive", b"close", b"upgrade", b"content-length", b"host", b"x-request-id"}
)


class ResponseHead:
    """The head sent to the client, and how its body is framed (a plain class, for a
    native constructor in the compiled build)."""

    __slots__ = ("chunked", "close", "data")

    def __init__(self, data: bytes, chunked: bool, close: bool) -> None:
        self.data = data
        self.chunked = chunked  # the body is re-framed in chunks (its length is unknown)
        self.close = close  # the connection closes after this response


def response_head(
    status: int,
    reason: str,
    raw: Iterable[tuple[bytes, bytes]],
    *,
    upstream_version: str,
    request_id: str,
    wake: str | None,
    client_version: str,
    keep_alive: bool,
    with_body: bool,
    websocket: bool = False,
    interim: bool = False,
) -> ResponseHead:
    """The machine's response head for the client: hop-by-hop headers dropped, every
    Set-Cookie kept as sent, Via appended, and framing for this client's connection.
    An ``interim`` (1xx) head ends after Via: no Content-Length (a 1xx has no content,
    RFC 9110 8.6), no X-Request-Id, no framing (the final answer carries those)."""
    parts = [_status_line(status, reason)]
    length = has_id = False
    via: list[bytes] = []
    connection = None
    for key, value in raw:
        kind = _kind(_RESPONSE_KINDS, key, _response_class)
        if kind < _KEEP:
            if kind == _CONNECTION:
                connection = value if connection is None else connection + b"," + value
            elif kind == _VIA_NAME:
                via.append(value)
            continue
        if kind == _LENGTH:
            if status == 204 or interim:
                continue  # a 1xx or 204 never has one (RFC 9110 8.6), though one was sent
            length = True
        elif kind == _REQUEST_ID:
            has_id = True
        parts += (key, b": ", value, b"\r\n")
    if connection is not None:
        parts = _drop_named(parts, connection)
    _add_via(parts, via, upstream_version)
    if interim:
        parts.append(b"\r\n")
        return ResponseHead(b"".join(parts), False, False)
    if not has_id:
        parts += (b"X-Request-Id: ", request_id.encode("latin-1"), b"\r\n")
    if wake is not None:
        parts.append(_WAKE_LINE[wake])
    chunked = False
    if websocket:
        parts.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
    else:
        if with_body and not length:
            if client_version == "1.1":
                chunked = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                keep_alive = False  # an HTTP/1.0 client reads until the connection closes
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
        elif client_version == "1.0":
            parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return ResponseHead(b"".join(parts), chunked, not keep_alive)


def interim_head(
    status: int, reason: str, raw: Iterable[tuple[bytes, bytes]], upstream_version: str
) -> bytes:
    """A machine's interim (1xx) head for the client: its headers as a final head's are
    (``response_head``), without Content-Length."""
    return response_head(
        status,
        reason,
        raw,
        upstream_version=upstream_version,
        request_id="",
        wake=None,
        client_version="1.1",
        keep_alive=True,
        with_body=False,
        interim=True,
    ).data


class Interim:
    """Relays a machine's interim answers (103 Early Hints...) to an HTTP/1.1 client,
    before the final one and in order (RFC 9110 15.2: a proxy MUST forward them); an
    HTTP/1.0 client, which knows no 1xx, gets none (no relay is made for it).

    None is dropped. While the client is behind (its connection's buffer over its
    high-water mark), reading from the machine pauses until the client has caught up, as
    for a body, and so does the parsing of what the machine's last read brought beyond
    the slice being parsed (it waits, counted in the buffer budget): a machine that sends
    1xx without end holds at most one read of its in the proxy, and the client's buffer
    at most one slice (``PARSE_SLICE``) past its mark; its own writes wait, and its
    exchange ends at ``upstream_timeout_s`` as one that never answers. ``release`` (once
    the exchange has its final head, or failed) lets the machine be read again."""

    __slots__ = ("conn", "held", "relayed")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.held: FlowControl | None = None
        """The machine's connection, paused until the client catches up."""
        self.relayed = False
        """Whether an interim answer went to the client (its request is then never sent
        again: the client has heard from this machine)."""

    def __call__(
        self,
        status: int,
        reason: str,
        raw: list[tuple[bytes, bytes]],
        version: str,
        source: FlowControl,
    ) -> None:
        conn = self.conn
        if conn.response_started:
            return  # the final answer went out: never a 1xx after it
        conn.write_interim(interim_head(status, reason, raw, version))
        self.relayed = True
        if conn.writing_paused and self.held is None:
            self.held = source
            source.pause_reading(self)
            conn.on_writable = self._writable

    def _writable(self, writable: bool) -> None:
        if writable:
            self.release()

    def release(self) -> None:
        held = self.held
        if held is not None:
            self.held = None
            conn = self.conn
            if conn.on_writable == self._writable:
                conn.on_writable = None
            held.resume_reading(self)


def _status_line(status: int, reason: str) -> bytes:
    line = _STATUS_LINES.get((status, reason))
    if line is None:
        line = f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")
        if len(_STATUS_LINES) < 1024:  # reasons come from machines: keep the cache small
            _STATUS_LINES[(status, reason)] = line
    return line


_STATUS_LINES: dict[tuple[int, str], bytes] = {}


_WAKE_LINE = _Memo(lambda wake: b"Fly-Autoscaler-Wake: %b\r\n" % wake.encode("latin-1"))


def last_hop(request: Request) -> bool:
    """For an OPTIONS or TRACE request (RFC 9110 7.6.2): whether its ``Max-Forwards`` is
    0, so that this proxy answers it itself and sends it nowhere. Any other count goes on
    one less (changed in ``request.headers``, which ``request_head`` copies); a value that
    is not a count goes on as it came, and so do the headers after the first."""
    headers = request.headers
    for i, (key, value) in enumerate(headers):
        if key.lower() == b"max-forwards":
            count = value.strip()
            if not count.isdigit() or len(count) > 18:
                return False
            left = int(count)
            if left == 0:
                return True
            headers[i] = (key, b"%d" % (left - 1))
            return False
    return False


def error_response(
    status: int,
    reason: str,
    message: str,
    headers: dict[str, str],
    *,
    close: bool,
    version: str = "1.1",
    with_body: bool = True,
) -> bytes:
    """A short plain-text answer of the proxy's own (with an empty ``message``, none:
    ``Content-Length: 0``); to a HEAD request (``with_body`` False) the same head without
    the body, which the client will not read: sent, it would be taken for the start of
    the next response on the connection."""
    body = (message + "\n").encode() if message else b""
    out = [
        f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1"),
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body)
        if body
        else b"Content-Length: 0\r\n",
    ]
    out.extend(f"{key}: {value}\r\n".encode("latin-1") for key, value in headers.items())
    if close:
        out.append(b"Connection: close\r\n")
    elif version == "1.0":
        out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    if with_body:
        out.append(body)
    return b"".join(out)


class BodyTooLarge(Exception):
    """The client sent more than the app's ``max_body_bytes``."""


class ClientTimeout(Exception):
    """The client stopped sending its body for ``client_timeout_s``."""


# How long a request with Expect: 100-continue waits for its machine's 100 (or final
# answer) before the proxy sends its own 100 and the body goes anyway: a machine that
# ignores Expect waits for the body, and a client that waits for the 100 without end
# (RFC 9110 10.1.1 says it should not) would wait with it. curl's own wait, 1 s.
CONTINUE_WAIT_S = 1.0
# The proxy's own 100: after that wait, or at once for a machine whose server answered
# HTTP/1.0 (``Upstream.http10``: it sends none, and gets no Expect), or one not heard from
# yet of an app whose last answer, from any machine, was HTTP/1.0 (``AppView.http10``).
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(slots=True)
class BodyStream:
    """The client's request body as an async iterator, read only as upstream takes it.

    Records what happened: the proxy reads these flags to tell a 413 or a slow client from
    a machine failure, and ``started`` to know whether a retry could replay the request.

    ``continued``, for a request with ``Expect: 100-continue`` (sent on to the machine),
    is the machine's word on the body: True once it sent its 100 (relayed to the client,
    see :class:`Interim`), False once its final answer came first (``upstream``). Until
    then no byte of the body is read, unless the client sends it without waiting.
    """

    request: Request
    limit: int | None
    timeout: float
    continued: asyncio.Future[bool] | None = None
    started: bool = False
    too_large: bool = False
    timed_out: bool = False
    refused: ParseError | None = None  # the body broke HTTP's rules (bad chunking)
    gone: bool = False  # the client's connection ended before its body did
    received: int = field(default=0)

    @property
    def failed(self) -> bool:
        """The body failed on the client's side (what the machine then saw is not its
        fault: the proxy cut the request off)."""
        return self.too_large or self.timed_out or self.refused is not None or self.gone

    def raise_for_client(self) -> None:
        """When the body failed on the client's side, raise the answer that deserves."""
        if self.too_large:
            raise Failure(413, f"request body over {self.limit} bytes")
        if self.timed_out:
            raise Failure(408, "the client sent its body too slowly")
        if self.refused is not None:
            raise Failure(self.refused.status, self.refused.message)

    def chunks(self) -> AsyncIterator[bytes]:
        """The body's chunks; with ``continued``, the first waits for the machine's word."""
        return _Chunks(self)


class _Chunks:
    """``BodyStream.chunks()``: an async iterator written out as a class (compiled
    modules cannot hold async generators)."""

    def __init__(self, stream: BodyStream) -> None:
        self._stream = stream

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        stream = self._stream
        request = stream.request
        body = request.body
        assert body is not None
        first: asyncio.Task[bytes] | None = None
        if not stream.started:
            stream.started = True
            if stream.continued is not None:
                first = await _continued(stream, body)
        try:
            async with asyncio.timeout(stream.timeout):
                chunk = await (body.read() if first is None else first)
        except TimeoutError:
            stream.timed_out = True
            raise ClientTimeout from None
        except ParseError as exc:
            stream.refused = exc
            raise
        except asyncio.CancelledError:
            raise
        except BaseException:
            stream.gone = True
            raise
        if not chunk:
            raise StopAsyncIteration
        stream.received += len(chunk)
        limit = stream.limit
        if limit is not None and stream.received > limit:
            stream.too_large = True
            raise BodyTooLarge
        return chunk


async def _continued(stream: BodyStream, body: Body) -> asyncio.Task[bytes]:
    """For a request with ``Expect: 100-continue``: wait until its body may go, and return
    the first read of it, under way.

    The body goes once the machine sent its 100 (relayed to the client as it came), once
    the client sends it without waiting (RFC 9110 10.1.1 lets it), or after
    ``CONTINUE_WAIT_S`` without a word from the machine: the proxy then sends the client a
    100 of its own. When the machine's final answer came first, the body never goes: this
    waits until the exchange ends (it cancels the body's sending, and closes the
    connection to the machine, which may still expect the body); the client's connection
    closes after the answer, unless its whole body had come (``Connection.keeps_alive``).
    """
    go = stream.continued
    assert go is not None
    reading = asyncio.ensure_future(body.read())
    try:
        if not go.done():
            await asyncio.wait(
                (go, reading), timeout=CONTINUE_WAIT_S, return_when=asyncio.FIRST_COMPLETED
            )
        if not go.done():
            if not reading.done():
                # The machine said nothing: it may ignore Expect and wait for the body.
                stream.request.conn.write_interim(CONTINUE)
            go.set_result(True)  # a 100 from the machine now would be one too many
        elif not go.result():
            _drop(reading)
            await asyncio.get_running_loop().create_future()  # until cancelled
    except BaseException:
        _drop(reading)
        raise
    return reading


def _drop(task: asyncio.Task[bytes]) -> None:
    """A read not wanted after all: cancelled, or its failure (the client left) seen."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()
