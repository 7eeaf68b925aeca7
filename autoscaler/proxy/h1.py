"""The client-facing HTTP/1.1 server of the proxy: connections, requests and request bodies.

A request through the proxy costs one parse of the client's head, one write of a head to
the machine, one parse of its answer and one write back; a general web framework adds
request and response objects, header multidicts and a task per message around each of
those. Here the head is parsed by llhttp (through ``httptools``, the parser uvicorn uses)
straight into a list of raw header pairs; the proxy builds the upstream head from those
bytes and writes its answers to the transport itself.

One :class:`Connection` per client socket, and one task per connection that serves its
requests in order. A pipelined request waits its turn unread, as in uvicorn and nginx:
once its head is parsed, reading pauses and the bytes after it stay as they came
(``_stash``) until the requests before it are answered (and taken by the client, when it
leaves more than ``WRITE_HIGH_WATER`` unread), so no body is read ahead of a request being
served and no answers pile up. Request bodies are streamed: the parser feeds a
:class:`Body`, which pauses reading from the socket when the handler falls behind, and
counts in the proxy's :class:`BufferBudget`. What this module guards:

- limits: a request target over ``max_header_bytes`` gets 414; a header field over it,
  more than ``MAX_HEADERS`` fields, or a head (or a trailer section) over
  ``HEAD_FACTOR`` times it gets 431; anything llhttp rejects (conflicting Content-Length
  and Transfer-Encoding, bad chunking, bad characters) gets 400, and so does a WebSocket
  handshake with a body or another upgrade request with a chunked one; CONNECT gets 405,
  an HTTP version other than 1.0 and 1.1 505 (whatever its ``Expect``), an ``Expect``
  other than ``100-continue`` (which goes on to the machine) 417, unless in an HTTP/1.0
  request, whose ``Expect`` is ignored (RFC 9110 10.1.1);
- transfer codings: only ``chunked`` (what llhttp decodes); one before it gets 501, a
  Transfer-Encoding that does not end in chunked 400 (RFC 9112 6.3); an HTTP/1.0 request
  with one is served, then its connection closes (RFC 9112 6.1);
- Host: more than one Host header, none in an HTTP/1.1 request, or one that is not
  ``host[:port]`` gets 400 (RFC 9112 3.2); HTTP/1.0 requests without one go to the
  default app;
- request targets in absolute form (``GET http://host/path``): as RFC 9112 asks, the
  target's authority replaces the Host header, for routing and upstream, and the machine
  gets the origin form (``/path``); a scheme other than http(s), user info or an empty
  authority gets 400; the asterisk form (``*``) is for OPTIONS alone (RFC 9112 3.2.4),
  with any other method 400;
- trailer fields after a chunked request body are dropped (a proxy may, RFC 9110 6.5.1);
  they never reach the head the machine gets, nor the routing;
- upgrades: a WebSocket handshake stops the parsing, and once the handler has the
  machine's 101 the socket's bytes go to the tunnel (:mod:`autoscaler.proxy.tunnel`);
  other upgrades (h2c), and any in an HTTP/1.0 request, are served as plain HTTP/1.1
  requests (a server may ignore the offer, RFC 9110 7.8: ``curl --http2`` sends one with
  every request), a body framed by Content-Length included (llhttp leaves it unparsed: it
  is read here by its length);
- slow clients: a head not complete within ``client_timeout_s`` of the connection going
  idle closes the connection (a body too slow is the handler's business, it answers 408);
  the next request waits until the client took the answer before it, and one that takes
  nothing for ``client_timeout_s`` is cut off;
- a client that goes away cancels its request's handler;
- shutdown: stop accepting, close idle connections, let busy ones finish their request
  (answered with ``Connection: close``) until the deadline, then cut them.

After a handler answered early (an error before the body was read), the connection sends
its answer, shuts its write side and reads what the client still sends for a short while
before closing, so a kernel reset does not destroy the answer before the client reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httptools

from autoscaler.aio import cancel_and_wait, dual_stack_socket
from autoscaler.logs import get_logger
from autoscaler.proxy.body import (
    HEAD_FACTOR,
    PARSE_SLICE,
    WRITE_HIGH_WATER,
    Body,
    BufferBudget,
    FlowControlled,
    HeadBudget,
    transfer_coding_problem,
)

_log = get_logger("autoscaler.proxy")

MAX_HEADERS = 128
# How long a connection answered early keeps reading (and dropping) the client's bytes.
LINGER_S = 2.0


class ParseError(Exception):
    """A request the parser or the limits refused: answered with ``status``, then closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(Exception):
    """The client closed its connection, or took nothing for ``client_timeout_s``."""


class Request:
    """One request head as the client sent it: bytes, not decoded unless asked."""

    __slots__ = (
        "authority",
        "body",
        "conn",
        "content_length",
        "expect_continue",
        "headers",
        "host",
        "keep_alive",
        "method",
        "request_id",
        "target",
        "transfer_encoding",
        "upgrade",
        "version",
    )

    def __init__(self, conn: Connection, method: str, target: str, version: str) -> None:
        self.conn = conn
        self.method = method
        self.target = target  # path and query, exactly as sent (origin form)
        self.version = version  # "1.1" or "1.0"
        self.authority: str | None = None  # from a target in absolute form
        self.headers: list[tuple[bytes, bytes]] = []
        self.host: str | None = None
        self.request_id: str | None = None
        self.content_length: int | None = None
        self.transfer_encoding: bytes | None = None  # every value, comma-joined
        self.expect_continue = False
        self.keep_alive = True
        self.upgrade: str | None = None  # "websocket", lowercased, when asked
        self.body: Body | None = None

    @property
    def peer(self) -> str:
        return self.conn.peer


Handler = Callable[[Request], Awaitable[None]]
# (status, message) -> a whole response, for requests refused before any handler ran.
ErrorPage = Callable[[int, str], bytes]


class Connection(FlowControlled, asyncio.Protocol):
    """One client socket: parses requests, hands them to the handler one at a time."""

    def __init__(self, server: H1Server) -> None:
        self._server = server
        self._loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.peer_bytes = b""
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[Request | ParseError] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._current: Request | None = None  # being parsed
        self._serving: Request | None = None  # being answered
        self._url: list[bytes] = []
        self._head_size = 0
        self._budget = HeadBudget()
        self._error: ParseError | None = None
        self._task: asyncio.Task[None] | None = None
        self.idle_deadline = 0.0  # waiting for a request head until then (0: not waiting)
        self._init_flow()
        self._lost = False
        self._discarding = False  # answered and closing: bytes from the client are dropped
        self._tunnel: Callable[[bytes], None] | None = None
        self._tunnel_closed: Callable[[], None] | None = None
        self._tunnel_eof: Callable[[], None] | None = None
        self._eof = False  # the client sent FIN
        self._pending: list[bytes] = []  # bytes after a WebSocket handshake, before the tunnel
        self._raw_body: Body | None = None  # an upgrade offer's body, read by its length
        self._raw_left = 0
        self.response_started = False
        self._held = False  # a pipelined head waits: what follows stays unparsed
        self._stash: list[bytes] = []

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER)
        server = self._server
        if len(server.connections) >= server.max_connections or server.closing:
            self._lost = True
            transport.close()  # over the cap: refuse rather than queue unbounded sockets
            return
        server.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        self.peer_bytes = self.peer.encode("latin-1")
        self._arm_idle()
        self._task = self._loop.create_task(self._run())

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        server = self._server
        server.connections.discard(self)
        if server.closing and not server.connections:
            server.all_closed.set()
        self._disarm_idle()
        if self._tunnel_closed is not None:
            self._tunnel_closed()
        gone = ClientGone("the client closed the connection")
        for request in (self._current, self._serving):
            if request is not None and request.body is not None:
                request.body.fail(gone)
        for item in self._queue:
            if isinstance(item, Request) and item.body is not None:
                item.body.drop()
        self._unstash()
        self._writer_gone(gone)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self._serving is not None and self._task is not None and self._tunnel_closed is None:
            self._task.cancel()  # nobody is left to answer: stop the work for it

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel(data)
            return
        if self._discarding or self._error is not None:
            return
        if self._held:
            self._keep(data)
        elif len(data) > PARSE_SLICE:
            self._feed_slices(data)
        else:
            self._feed(data)

    def _feed_slices(self, data: bytes) -> None:
        view = memoryview(data)
        size = len(data)
        for start in range(0, size, PARSE_SLICE):
            end = start + PARSE_SLICE
            self._feed(bytes(view[start:end]))
            if end >= size:
                return
            if self._tunnel is not None:
                self._tunnel(bytes(view[end:]))
                return
            if self._discarding or self._error is not None:
                return
            if self._held:
                self._keep(bytes(view[end:]))
                return

    def _keep(self, data: bytes) -> None:
        """Bytes after a pipelined head, kept unparsed until its turn."""
        self._stash.append(data)
        budget = self._server.budget
        if budget is not None:
            budget.add(len(data), self)

    def _unstash(self) -> bytes:
        stash = b"".join(self._stash)
        self._stash.clear()
        budget = self._server.budget
        if stash and budget is not None:
            budget.sub(len(stash))
        return stash

    def _feed(self, data: bytes) -> None:
        budget = self._budget
        marks = budget.marks
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded(data[upgrade.args[0] :])
        except httptools.HttpParserCallbackError:
            self._refuse_raised()
        except httptools.HttpParserError as exc:
            self._refuse(ParseError(400, f"bad request: {str(exc)[:120]}"))
        else:
            if budget.over(marks, len(data), self._server.max_head_bytes):
                self._refuse(ParseError(431, "request header fields too large"))

    def _refuse_raised(self) -> None:
        # A callback set ``_error`` and raised it. (Read here, not in data_received: there
        # the type checker, and so the compiled code, takes ``_error`` for None still.)
        assert self._error is not None
        self._refuse(self._error)

    def eof_received(self) -> bool | None:
        self._eof = True
        if self._raw_body is not None:
            self._raw_body.fail(ConnectionResetError("the client closed mid-body"))
            return None
        if self._tunnel is not None:
            # The tunnel decides (it passes the half-close on to the machine); a handshake
            # still under way hears of it when its tunnel opens.
            if self._tunnel_eof is not None:
                self._tunnel_eof()
            return True
        if self._current is not None and self._current.body is not None:
            self._current.body.fail(ConnectionResetError("the client closed mid-body"))
        return None  # close: nothing more will come

    # --- parser callbacks (httptools) -------------------------------------------------

    def on_message_begin(self) -> None:
        self._url.clear()
        self._head_size = 0
        self._budget.begin()

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        if self._head_size > self._server.max_header_bytes:
            self._error = ParseError(414, "request target too long")
            raise self._error
        self._url.append(url)

    def _request(self) -> Request:
        """The request being parsed, made at its first header (or at the end of a head
        with none: an HTTP/1.0 request may have no header at all)."""
        request = self._current
        if request is None:
            target = b"".join(self._url).decode("latin-1")
            method = self._parser.get_method().decode("ascii", "replace")
            authority = None
            if target == "*" and method != "OPTIONS":  # asterisk form (RFC 9112 3.2.4)
                self._error = ParseError(400, "bad request: invalid request target")
                raise self._error
            if target[:1] != "/" and target != "*" and method != "CONNECT":  # (405 later)
                split = _absolute_form(target)
                if split is None:
                    self._error = ParseError(400, "bad request: invalid request target")
                    raise self._error
                authority, target = split
            request = self._current = Request(self, method, target, "1.1")
            request.authority = authority
        return request

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._budget.in_head:
            return  # a trailer field, after a chunked body: dropped
        request = self._current or self._request()
        if len(name) + len(value) > self._server.max_header_bytes:
            self._error = ParseError(431, "request header fields too large")
            raise self._error
        headers = request.headers
        headers.append((name, value))
        if len(headers) > MAX_HEADERS:
            self._error = ParseError(431, "request header fields too large")
            raise self._error
        low = name.lower()
        if low == b"host":
            if request.host is not None:  # which one would the machine take? (RFC 9112 3.2)
                self._error = ParseError(400, "bad request: more than one Host header")
                raise self._error
            request.host = value.decode("latin-1")
        elif low == b"content-length":
            try:
                request.content_length = int(value)
            except ValueError:
                self._error = ParseError(400, "bad request: invalid Content-Length")
                raise self._error from None
        elif low == b"transfer-encoding":
            te = request.transfer_encoding
            request.transfer_encoding = value if te is None else te + b"," + value
        elif low == b"x-request-id":
            request.request_id = value.decode("latin-1")
        elif low == b"expect" and self._parser.get_http_version() == "1.1":
            # Expect is HTTP/1.1's: in an HTTP/1.0 request, whose client waits for no 100,
            # any expectation is ignored (RFC 9110 10.1.1), neither met nor refused. In one
            # of another version (2.0, 0.9) it is not looked at either: the version is
            # refused (505, at the end of the head), whatever the client expects, not the
            # expectation (its 417 told the client to drop it, and try again in vain).
            expectation = value.lower()
            # A list, or any other expectation (417), is looked into; the usual one is not.
            if expectation == b"100-continue" or self._expects_continue(expectation):
                request.expect_continue = True
        elif low == b"upgrade":
            request.upgrade = value.decode("latin-1").strip().lower()

    def _expects_continue(self, expectation: bytes) -> bool:
        """An Expect value other than a lone ``100-continue`` (lowercased): whether it
        holds 100-continue. Any other expectation is refused with 417 (RFC 9110 10.1.1
        allows it), as Apache httpd, Go's and Node's servers do: the proxy cannot meet an
        expectation it does not know, nor tell whether the machine would, and dropping it
        (as it did) let the machine handle a request whose client required more. Empty
        list members are none (RFC 9110 5.6.1)."""
        members = {member.strip(b" \t") for member in expectation.split(b",")} - {b""}
        if members - {b"100-continue"}:
            self._error = ParseError(417, "expectation failed: only 100-continue is supported")
            raise self._error
        return bool(members)

    def on_headers_complete(self) -> None:
        self._budget.head_done()
        parser = self._parser
        request = self._request()
        if request.authority is not None:
            _take_authority(request, request.authority)
        version = request.version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._error = ParseError(505, f"HTTP/{version} is not supported")
            raise self._error
        host = request.host
        if host is None:
            if version == "1.1":
                message = "bad request: an HTTP/1.1 request needs a Host header"
                self._error = ParseError(400, message)
                raise self._error
        elif not _valid_host(host):
            # The machine would take it for its own: a URL built from "a.test:80@evil" or
            # "a.test:1/x" points elsewhere, though the request was routed to a.test.
            self._error = ParseError(400, "bad request: invalid Host header")
            raise self._error
        te = request.transfer_encoding
        if te is not None:
            problem = transfer_coding_problem(te)
            if problem is not None:
                self._error = ParseError(*problem)
                raise self._error
        # An HTTP/1.0 message with a Transfer-Encoding has faulty framing: it is served,
        # then the connection closes (RFC 9112 6.1): an HTTP/1.0 hop before this one may
        # not have read the body as chunked.
        request.keep_alive = parser.should_keep_alive() and (te is None or version == "1.1")
        has_body = bool(request.content_length) or (
            request.content_length is None and te is not None
        )
        if not parser.should_upgrade():
            request.upgrade = None
        else:
            if version == "1.0":
                # Ignored (RFC 9110 7.8): served as a plain request, as other upgrades are.
                request.upgrade = None
            if has_body and (request.upgrade == "websocket" or te is not None):
                # llhttp ends an upgrade request at its head; a body by its length is read
                # on (_upgraded), a chunked one is not decoded here, a handshake has none.
                self._error = ParseError(400, "protocol upgrade with a body is not supported")
                raise self._error
        if has_body:
            request.body = Body(self, self._server.budget)
        else:
            request.expect_continue = False
        if request.method == "CONNECT":
            self._error = ParseError(405, "CONNECT is not supported")
            raise self._error
        self._disarm_idle()
        self._push(request)

    def on_body(self, body: bytes) -> None:
        self._budget.mark()
        request = self._current
        if request is not None and request.body is not None:
            request.body.feed(body)

    def on_message_complete(self) -> None:
        request = self._current
        self._current = None
        # An upgrade request ends at its head for llhttp; its body, if any, comes after.
        if request is not None and request.body is not None and request.upgrade is None:
            request.body.feed_eof()

    # --- the request loop -------------------------------------------------------------

    def _push(self, item: Request | ParseError) -> None:
        if (self._serving is not None or self._queue) and not self._held:
            # Pipelined: it waits its turn, and nothing after it is read until then.
            self._held = True
            self.pause_reading("pipeline")
        self._queue.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _refuse(self, error: ParseError) -> None:
        """The parser refused the input: answer once the requests before it are served."""
        self._error = error
        if self._current is not None and self._current.body is not None:
            self._current.body.fail(error)  # its handler answers with the error
        self._current = None
        self._disarm_idle()
        self._push(error)

    def _upgraded(self, tail: bytes) -> None:
        """llhttp stops at a request asking to switch protocols (the head was queued)."""
        request = self._queue[-1] if self._queue else None
        if isinstance(request, Request) and request.upgrade == "websocket":
            # Until the handler opens the tunnel (or refuses), bytes wait here.
            if tail:
                self._pending.append(tail)
            self._tunnel = self._pending.append
            self.pause_reading("upgrade")
            return
        # Another protocol (h2c, ...): served as a plain request, Upgrade dropped. Its
        # body (by Content-Length: a chunked one was refused at its head) is read by its
        # length before parsing goes on.
        self._parser = httptools.HttpRequestParser(self)
        if isinstance(request, Request):
            request.upgrade = None
            if request.body is not None and request.content_length:
                self._raw_body = request.body
                self._raw_left = request.content_length
                self._tunnel = self._feed_raw_body
        if tail:
            self.data_received(tail)

    def _feed_raw_body(self, data: bytes) -> None:
        """The body of an upgrade offer (in ``_tunnel``'s place: no parsing until its end)."""
        body = self._raw_body
        if body is None:
            return
        left = self._raw_left
        if len(data) < left:
            self._raw_left = left - len(data)
            body.feed(data)
            return
        self._raw_body = None
        self._raw_left = 0
        self._tunnel = None
        body.feed(data[:left])
        body.feed_eof()
        if len(data) > left:
            self.data_received(data[left:])

    async def _run(self) -> None:
        server = self._server
        queue = self._queue
        try:
            while True:
                while not queue:  # (inlined: this runs once per request)
                    if self._lost:
                        return
                    self._waiter = self._loop.create_future()
                    await self._waiter
                item = queue.popleft()
                if self._lost:
                    return
                if isinstance(item, ParseError):
                    self.write(server.error_page(item.status, item.message))
                    self._linger()
                    return
                self._serving = item
                self.response_started = False
                if self._held and not queue:
                    # Its turn: read on (its body, and what the client sent after it).
                    self._held = False
                    self.resume_reading("pipeline")
                    stash = self._unstash()
                    if stash:
                        self.data_received(stash)
                try:
                    await server.handler(item)
                except asyncio.CancelledError:
                    if self._lost:
                        return
                    raise
                except ClientGone:
                    return  # (aborted: nobody to answer)
                except Exception as exc:  # a bug in the handler: the client still gets an answer
                    _log.error("proxy_handler_failed", exc_info=exc)
                    if not self.response_started:
                        self.write(server.error_page(500, "internal proxy error"))
                    self.close()
                    return
                finally:
                    self._serving = None
                    if item.body is not None:
                        item.body.drop()
                if self.transport is None or self.transport.is_closing():
                    return
                if not self.keeps_alive(item):
                    self._linger()
                    return
                if self.writing_paused:
                    # The next request waits until the client took this answer: one that
                    # pipelines requests and reads nothing would pile answers up here
                    # without end (a 404 is answered without a wait for anything else).
                    try:
                        await self.drain()
                    except ClientGone:
                        return
                if not self._queue:
                    self._arm_idle()
        finally:
            self._disarm_idle()

    def keeps_alive(self, request: Request) -> bool:
        """Whether the connection stays open after this request's response."""
        return (
            request.keep_alive
            and not self._server.closing
            and self._tunnel is None
            and (request.body is None or request.body.done)
        )

    def _linger(self) -> None:
        """Close after the answer went out, reading (and dropping) what still comes."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._discarding = True
        if self._tunnel_closed is None:  # a refused WebSocket: its early bytes are dropped
            self._tunnel = None
            self._pending.clear()
        self.resume_all_reading()
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:  # the client reset the connection before the loop heard of it
                transport.abort()
                return
        self._loop.call_later(min(LINGER_S, self._server.client_timeout_s), transport.close)

    # --- timers and flow control ------------------------------------------------------

    def _arm_idle(self) -> None:
        # A deadline the server's sweep reads, rather than a timer per request: arming and
        # cancelling a loop timer twice per request costs more than the sweep.
        self.idle_deadline = self._loop.time() + self._server.client_timeout_s

    def _disarm_idle(self) -> None:
        self.idle_deadline = 0.0

    def idle_expired(self) -> None:
        self.idle_deadline = 0.0
        transport = self.transport
        if self._serving is None and not self._queue and transport is not None:
            # Idle keep-alive, or a head that never finished. The end of an answer the
            # client never read would keep a plain close() waiting: cut it.
            if transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()

    # --- writing ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self.response_started = True
            transport.write(data)

    def write_interim(self, data: bytes) -> None:
        """A 1xx response: the final one is still to come."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def drain(self) -> None:
        """Wait until the client took what was written (flow control). A client that takes
        nothing for ``client_timeout_s`` is cut off, as one that sends nothing: otherwise
        it would hold its request's machine slot for as long as it liked."""
        if self._lost:
            raise ClientGone("the client closed the connection")
        if not self.writing_paused:
            return
        timeout = self._server.client_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await self._wait_writable()
        except TimeoutError:
            self.abort()
            raise ClientGone(f"the client took nothing for {timeout:g}s") from None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def idle(self) -> bool:
        return self._serving is None and not self._queue

    # --- tunnels (WebSockets) ---------------------------------------------------------

    def start_tunnel(
        self,
        on_data: Callable[[bytes], None],
        on_closed: Callable[[], None],
        on_eof: Callable[[], None],
    ) -> list[bytes]:
        """Hand the socket's bytes to ``on_data`` from now on, its end to ``on_eof`` (the
        client sent FIN) and ``on_closed``; returns what came early."""
        pending, self._pending = self._pending, []
        self._tunnel = on_data
        self._tunnel_closed = on_closed
        self._tunnel_eof = on_eof
        self.resume_all_reading()
        if self._eof:
            on_eof()
        return pending


def _absolute_form(target: str) -> tuple[str, str] | None:
    """``http://host:port/path?query`` as (authority, origin form), or None when it is not
    an http(s) URI with a plain authority. (llhttp checked the characters.)"""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    end = len(rest)
    for stop in ("/", "?"):
        at = rest.find(stop)
        if at != -1 and at < end:
            end = at
    authority, path = rest[:end], rest[end:]
    if not authority or "@" in authority:
        return None  # user info has no place in a request (RFC 9110 4.2.4)
    return authority, path if path.startswith("/") else "/" + path


# A Host field value, or the authority of a target in absolute form: uri-host [":" port]
# (RFC 9112 3.2, RFC 3986 3.2.2), as a reg-name (percent-encoded bytes and sub-delims
# included) or an IP literal in brackets; trailing blanks, which llhttp leaves in a value,
# are allowed. Anything else gets 400 (RFC 9112 3.2).
_HOST_SYNTAX = re.compile(
    r"(?:\[[0-9A-Za-z\-._~%!$&'()*+,;=:]+\]|[0-9A-Za-z\-._~%!$&'()*+,;=]*)(?::[0-9]*)?[ \t]*"
)
# Verdicts by value: host names are few and repeat on every request (kept small: clients
# choose them).
_HOST_VERDICTS: dict[str, bool] = {}


def _valid_host(host: str) -> bool:
    valid = _HOST_VERDICTS.get(host)
    if valid is None:
        valid = _HOST_SYNTAX.fullmatch(host) is not None
        if len(_HOST_VERDICTS) >= 1024:
            _HOST_VERDICTS.clear()
        _HOST_VERDICTS[host] = valid
    return valid


def _take_authority(request: Request, authority: str) -> None:
    """A target in absolute form: its authority is the request's Host (RFC 9112 3.2.2)."""
    request.host = authority
    headers = [(b"Host", authority.encode("latin-1"))]
    headers += [(k, v) for k, v in request.headers if k.lower() != b"host"]
    request.headers = headers


class H1Server:
    """Listens, accepts within ``max_connections``, and stops gracefully."""

    loop: asyncio.AbstractEventLoop  # set by start(), before any connection exists

    def __init__(
        self,
        handler: Handler,
        error_page: ErrorPage,
        *,
        max_connections: int,
        max_header_bytes: int,
        client_timeout_s: float,
    ) -> None:
        self.handler = handler
        self.error_page = error_page
        self.budget: BufferBudget | None = None  # request bytes held, with the proxy's others
        self.configure(max_connections, max_header_bytes, client_timeout_s)
        self.connections: set[Connection] = set()
        self.closing = False
        self.all_closed = asyncio.Event()  # set once closing and the last connection is gone
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def configure(
        self, max_connections: int, max_header_bytes: int, client_timeout_s: float
    ) -> None:
        """Set the limits; a reload's take effect at once (each is read where it applies:
        a new connection, a head being read, a wait for the client)."""
        self.max_connections = max_connections
        self.max_header_bytes = max_header_bytes
        self.max_head_bytes = HEAD_FACTOR * max_header_bytes
        self.client_timeout_s = client_timeout_s

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen; ``reuse_port`` shares the port with other processes (SO_REUSEPORT: the
        kernel spreads new connections over them; ``run --workers``)."""
        self.loop = asyncio.get_running_loop()
        # [::] takes IPv4 too: a socket of our own, as create_server sets IPV6_V6ONLY.
        listening = dual_stack_socket(host, port, reuse_port=reuse_port)
        where: dict[str, Any] = (
            {"host": host, "port": port, "reuse_address": True, "reuse_port": reuse_port or None}
            if listening is None
            else {"sock": listening}
        )
        try:
            self._server = await self.loop.create_server(
                lambda: Connection(self), backlog=1024, **where
            )
        except BaseException:
            if listening is not None:
                listening.close()
            raise
        self._sweeper = self.loop.create_task(self._sweep())
        server: Any = self._server  # uvloop lists its sockets (typeshed says tuple)
        sock = server.sockets[0]
        return int(sock.getsockname()[1])

    async def _sweep(self) -> None:
        """Close connections that waited too long for a request head (idle keep-alive, or a
        head sent too slowly), a few times per ``client_timeout_s``."""
        while True:
            await asyncio.sleep(min(1.0, max(0.02, self.client_timeout_s / 4)))
            now = self.loop.time()
            for conn in list(self.connections):
                if 0.0 < conn.idle_deadline <= now:
                    conn.idle_expired()

    @property
    def accepting(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def stop(self, deadline_s: float) -> None:
        """Stop accepting; finish requests in flight within ``deadline_s``; close the rest."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            # Not `suppress(CancelledError)` around awaiting it: that also swallowed a
            # cancellation of this stop in that turn (a second SIGTERM), which then went
            # on to wait the whole deadline.
            await cancel_and_wait([self._sweeper])
            self._sweeper = None
        for conn in list(self.connections):
            if conn.idle:
                conn.close()
        tasks = [c._task for c in self.connections if c._task is not None and not c._task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=deadline_s)
        for conn in list(self.connections):
            if conn._task is not None and not conn._task.done():
                conn._task.cancel()  # past the deadline: cut
                conn.abort()
            else:
                conn.close()  # answered: let the last bytes go out
        tasks = [c._task for c in self.connections if c._task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        # A client that takes nothing keeps a closing socket open with bytes unsent, and
        # wait_closed() (Python 3.12) waits for every connection: cut what is left.
        if self.connections:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.all_closed.wait()
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
