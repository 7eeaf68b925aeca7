"""The hop to the machines: HTTP/1.1 over keep-alive connections pooled per machine.

A request is a head written on a pooled connection (its body, if any, streamed after it by
a task); the answer is parsed by llhttp (``httptools``) as it arrives, into a status, the
raw header pairs and a :class:`Body`. There are no request or response objects and no
header multidicts: the proxy relays the raw pairs. A small answer is usually whole by the
time the proxy looks at it, and goes back to the client in one write.

Errors, by what the caller may do about them:

- :class:`ConnectFailed`: no connection (refused, unreachable, timed out, or closed before
  a byte of the request was written). Nothing was sent, so another machine may be tried.
- :class:`ConnectionLost`: the connection closed or reset before the answer's head. A
  replay is safe only for an idempotent request whose body was not consumed.
  :class:`LostAgain` when ``send`` had sent it again already (a pooled connection lost).
- :class:`BadResponse`: what came back is not HTTP (a control character in the reason
  phrase, a status code under 100, or a 1xx other than 100, 102 and 103 with a
  Content-Length or a Transfer-Encoding, after which llhttp reads a body, included), or
  its head is too large (a field over ``max_field_size``, more than ``MAX_HEADERS``
  fields, or more than ``HEAD_FACTOR`` times ``max_field_size`` in all).
- ``TimeoutError``: no answer within ``head_timeout``.
- :class:`CutOff`: the proxy gave up waiting for the answer (``Pool.cut``: the machine goes
  down). The request was sent, or was being sent: a replay is safe only as after a
  :class:`ConnectionLost`; :class:`CutOffAgain` when ``send`` had sent it again already.
- :class:`Abandoned`: the proxy gave up the connection while it was being made
  (``Pool.cut``; ``Pool.halt``: the proxy stops at once). Nothing was sent.

Interim answers (1xx) go to the exchange's ``on_interim`` as they come, before the final
one (RFC 9110 15.2: a proxy forwards them), with the connection, so that a client behind
can hold the machine back. A 100 Continue goes there only for a request that asked for
it (``continued``: the request carries ``Expect: 100-continue``), and only the first, which
also tells the body's sender to go (``continued`` set True; the final answer first sets it
False); any other 100 is dropped. They do not stop ``head_timeout``.

Trailer fields after a chunked answer are dropped. An answer with a transfer coding other
than chunked is a :class:`BadResponse` (the proxy could not relay it unchanged), and so are
bytes after a whole answer (a body after the answer to HEAD, a 204 or a 304 included): the
answer stands as it came, the connection is closed.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import httptools

from autoscaler.aio import cancel_and_wait
from autoscaler.proxy.body import (
    HEAD_FACTOR,
    PARSE_SLICE,
    WRITE_HIGH_WATER,
    Body,
    BufferBudget,
    FlowControl,
    FlowControlled,
    HeadBudget,
    transfer_coding_problem,
)

# A pooled connection idle longer than this is closed rather than reused: servers commonly
# drop idle keep-alive connections after 5-60 s, and reusing one they just dropped costs a
# failed attempt.
IDLE_S = 4.0
MAX_HEADERS = 256
HEAD_TICK_S = 0.05
_NO_BODY_STATUS = frozenset({204, 304})
_NO_DEADLINE = float("inf")
_BAD_REASON = re.compile("[^\t\x20-\x7e\x80-\xff]")


# Told of a machine's interim answer: status, reason, raw headers, HTTP version, and the
# connection it came on (whose reading it may pause: backpressure; the rest of the read
# being parsed then waits too, see ``_InterimHold``). It must not raise (it runs inside
# the parser's callbacks).
InterimSink = Callable[[int, str, list[tuple[bytes, bytes]], str, FlowControl], None]


class UpstreamError(Exception):
    """The exchange with the machine failed."""


class ConnectFailed(UpstreamError):
    """No connection to the machine: nothing was sent."""


class ConnectionLost(UpstreamError):
    """The connection closed before the answer (or its body) was whole."""


class LostAgain(ConnectionLost):
    """Lost on a request already sent again: the pooled connection it first went on was
    lost too, after its head went out (see :func:`send`). Not to be sent a third time."""


class BadResponse(UpstreamError):
    """The machine's answer is not HTTP this proxy accepts."""


class UnexpectedUpgrade(BadResponse):
    """The machine switched protocols on a request that did not ask to (no Upgrade sent)."""


class CutOff(UpstreamError):
    """No answer yet, and none waited for: the machine goes down (``Pool.cut``)."""


class CutOffAgain(CutOff):
    """Cut off on a request already sent again (as :class:`LostAgain`): not to be sent a
    third time."""


class Abandoned(UpstreamError):
    """No connection: the proxy gave it up while it was being made (``Pool.cut``: the
    machine goes down; ``Pool.halt``: the proxy stops at once). Nothing was sent."""


class Exchange:
    """One request on one connection: the answer's head, its body, the connection's fate."""

    __slots__ = (
        "_body_task",
        "_conn",
        "_head",
        "_pool",
        "body",
        "complete",
        "continued",
        "head_only",
        "headers",
        "keep_alive",
        "machine",
        "on_interim",
        "reason",
        "status",
        "until_eof",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        pool: Pool,
        conn: Connection,
        head_only: bool,
        upgrade: bool,
        on_interim: InterimSink | None,
        machine: str = "",
        continued: asyncio.Future[bool] | None = None,
    ) -> None:
        self._pool = pool
        self.machine = machine  # its id: ``Pool.cut`` finds the exchange by it
        self._conn: Connection | None = conn
        self._head: asyncio.Future[None] = pool.loop.create_future()
        self._body_task: asyncio.Task[None] | None = None
        self.head_only = head_only  # a HEAD request: the answer has no body
        self.upgrade = upgrade  # a WebSocket handshake: a 101 hands the connection over
        self.on_interim = on_interim  # told of each 1xx but 101 (100: once, if asked for)
        self.continued = continued  # the machine's word on the body, with Expect sent
        self.status = 0
        self.reason = ""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.until_eof = False  # no length and not chunked: the body ends with the connection
        self.body = Body(conn, pool.budget)
        self.complete = False

    def detach(self) -> Connection:
        """After a 101: the connection, now the caller's (bytes that followed the answer's
        head wait in ``connection.early``)."""
        conn, self._conn = self._conn, None
        assert conn is not None
        assert self.status == 101
        conn.exchange = None
        return conn

    def release(self) -> None:
        """Back to the pool if the exchange finished cleanly, else closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self.body.drop()
        self._pool.unwatch(self)  # no longer waiting for a head, if it still was
        conn.exchange = None
        task = self._body_task
        if task is not None and not task.done():
            task.cancel()
            conn.close()
            return
        clean = (
            self.complete
            and self.keep_alive
            and (task is None or (not task.cancelled() and task.exception() is None))
        )
        if clean:
            self._pool.put(conn)
        else:
            conn.close()

    # called by the connection ------------------------------------------------------

    def got_head(self) -> None:
        if not self._head.done():
            self._pool.unwatch(self)
            self._head.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if not self._head.done():
            self._pool.unwatch(self)
            self._head.set_exception(exc)
        else:
            self.body.fail(exc)


class Connection(FlowControlled, asyncio.Protocol):
    """One keep-alive connection to a machine, carrying one exchange at a time."""

    def __init__(self, authority: str, max_field_size: int) -> None:
        self.authority = authority
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.idle_since = 0.0
        self.closed = False
        self._max_field_size = max_field_size
        self._max_head = HEAD_FACTOR * max_field_size
        self._budget = HeadBudget()
        self._parser = httptools.HttpResponseParser(self)
        self._error: UpstreamError | None = None
        self._interim = False
        # The answer to HEAD came whole inside the read being parsed: the rest of that read
        # still goes to the old parser, which takes it for the body the head announced.
        self._head_tail = False
        self._holder: object | None = None
        """Who holds reading paused for the interim answers (their client is behind)."""
        self._rest = b""
        """What was left of a read when the interim answers' holder paused it: parsed once
        it lets go, so that no more 1xx answers are relayed past the client's high-water
        mark than one slice of a read (``PARSE_SLICE``) brings. Counted in the pool's
        budget."""
        self._rest_budget: BufferBudget | None = None
        self._interim_hold: _InterimHold | None = None
        self._init_flow()
        # After a 101 (a WebSocket), bytes go to ``on_data``; until someone takes over,
        # they wait in ``early``.
        self.early: list[bytes] = []
        self.on_data: Callable[[bytes], None] | None = None
        self.on_closed: Callable[[], None] | None = None

    # asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self._holder is not None:
            self._drop_rest()
        if self.on_closed is not None:
            self.on_closed()
        ex = self.exchange
        if ex is not None:
            if ex.until_eof and not ex.complete and exc is None and ex._head.done():
                ex.complete = True  # the body was delimited by the connection's end
                ex.body.feed_eof()
            elif not ex.complete:
                ex.fail(ConnectionLost("the machine closed the connection"))
        self._writer_gone(ConnectionLost("the machine closed the connection"))

    def data_received(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)
            return
        ex = self.exchange
        if ex is None or ex.complete:
            self.close()  # bytes nobody asked for: this connection cannot be trusted
            return
        if len(data) > PARSE_SLICE and not ex.upgrade:
            view = memoryview(data)
            for start in range(0, len(data), PARSE_SLICE):
                if self.closed:
                    return
                if self._holder is not None:  # the client is behind the 1xx relayed
                    self._keep_rest(ex, data[start:])
                    return
                self._parse(ex, bytes(view[start : start + PARSE_SLICE]))
            return
        self._parse(ex, data)

    def _keep_rest(self, ex: Exchange, rest: bytes) -> None:
        self._rest = rest
        budget = self._rest_budget = ex._pool.budget
        if budget is not None:
            budget.add(len(rest), self)

    def _drop_rest(self) -> bytes:
        rest, self._rest = self._rest, b""
        self._holder = None
        budget, self._rest_budget = self._rest_budget, None
        if rest and budget is not None:
            budget.sub(len(rest))
        return rest

    def _let_go(self, by: object) -> None:
        """The interim answers' holder lets reading go: the rest of the read it held
        back is parsed now (and may be held back again)."""
        self.resume_reading(by)
        if by is self._holder:
            rest = self._drop_rest()
            if rest and not self.closed:
                self.data_received(rest)

    def _parse(self, ex: Exchange, data: bytes) -> None:
        budget = self._budget
        marks = budget.marks
        try:
            self._parser.feed_data(data)
            self._head_tail = False
        except httptools.HttpParserCallbackError:
            assert self._error is not None
            ex.fail(self._error)
            self.close()
        except httptools.HttpParserUpgrade as upgrade:
            # Only a 101 to a handshake gets here (see on_headers_complete).
            tail = data[upgrade.args[0] :]
            self.early = [tail] if tail else []
            self.on_data = self.early.append
        except httptools.HttpParserError as exc:
            ex.fail(BadResponse(f"bad answer from the machine: {exc}"))
            self.close()
        else:
            if budget.over(marks, len(data), self._max_head):
                ex.fail(BadResponse("the machine's answer has too large a head"))
                self.close()

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost tells the exchange

    # httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        ex = self.exchange
        assert ex is not None
        if ex.complete or ex._head.done():
            # Bytes after the whole answer (a second response, a 204's body): never
            # relayed, and the head already taken stays as it was.
            self._more_than_the_answer()
        ex.reason = ""
        ex.headers = []
        self._budget.begin()

    def on_status(self, status: bytes) -> None:
        ex = self.exchange
        assert ex is not None
        ex.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._budget.in_head:
            return  # a trailer field, after a chunked body: dropped
        ex = self.exchange
        assert ex is not None
        if len(name) + len(value) > self._max_field_size or len(ex.headers) >= MAX_HEADERS:
            self._error = BadResponse("the machine's answer has too large a head")
            raise self._error
        ex.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._budget.head_done()
        ex = self.exchange
        assert ex is not None
        if _BAD_REASON.search(ex.reason) is not None:
            # Relayed as it came, a control character would make the client's status line
            # one a strict client refuses (RFC 9112 4: HTAB, SP, VCHAR, obs-text only).
            self._error = BadResponse("the machine's answer has a bad reason phrase")
            raise self._error
        parser = self._parser
        status = parser.get_status_code()
        if status < 100:
            # llhttp reads "099" as 99: relayed, it would be a status line of two digits,
            # one a client refuses (RFC 9112 4: three digits; RFC 9110 15: 100-599).
            self._error = BadResponse("the machine's answer has an invalid status code")
            raise self._error
        if status == 101 and not ex.upgrade:
            self._error = UnexpectedUpgrade("the machine switched protocols unasked")
            raise self._error
        if 100 <= status < 200 and status != 101:
            if status > 103 and _framing(ex.headers)[0]:
                # A 1xx ends at its head whatever its headers say (RFC 9112 6.3), but
                # llhttp reads a body after one it does not know by its Content-Length or
                # chunks: bytes of the final answer, or more than its length announces.
                self._error = BadResponse("the machine's interim answer has a body")
                raise self._error
            self._interim = True  # 100 Continue, 103 Early Hints: no body, no final answer
            if status == 100:
                go = ex.continued
                if go is None or go.done():
                    return  # unasked (no Expect sent), or one too many: not relayed
                go.set_result(True)  # the body may go (the sink relays the 100 first)
            sink = ex.on_interim
            if sink is not None:
                hold = self._interim_hold
                if hold is None:
                    hold = self._interim_hold = _InterimHold(self)
                sink(status, ex.reason, ex.headers, parser.get_http_version(), hold)
            return
        ex.status = status
        ex.version = parser.get_http_version()
        ex.keep_alive = parser.should_keep_alive() and status != 101
        if ex.head_only or status in _NO_BODY_STATUS or status == 101:
            ex.complete = True
            ex.body.feed_eof()
            if ex.head_only:
                # llhttp cannot be told that the answer to HEAD has no body (httptools
                # has no way to), so it would wait for Content-Length bytes: parse the
                # next answer with a fresh parser. The old one parses the rest of this read:
                # any byte of it is more than the answer (see on_body).
                self._parser = httptools.HttpResponseParser(self)
                self._head_tail = True
        else:
            framed, te = _framing(ex.headers)
            problem = None if te is None else transfer_coding_problem(te)
            if problem is not None:
                self._error = BadResponse(f"the machine's answer: {problem[1]}")
                raise self._error
            ex.until_eof = not framed
            if ex.until_eof:
                ex.keep_alive = False
        ex.got_head()

    def _more_than_the_answer(self) -> None:
        ex = self.exchange
        assert ex is not None
        ex.keep_alive = False
        self._error = BadResponse("the machine sent more than its answer")
        raise self._error

    def on_body(self, body: bytes) -> None:
        if self._head_tail:
            self._more_than_the_answer()  # a body after the answer to HEAD
        self._budget.mark()
        ex = self.exchange
        if ex is not None and not ex.complete:
            ex.body.feed(body)

    def on_message_complete(self) -> None:
        if self._head_tail:
            ex = self.exchange
            assert ex is not None
            if _framing(ex.headers)[1] is not None:
                # The old parser read the end of a chunked body (a last chunk with no
                # data before it): bytes after the answer to HEAD all the same.
                self._more_than_the_answer()
            return
        if self._interim:
            self._interim = False
            return
        ex = self.exchange
        if ex is not None and not ex.complete:
            ex.complete = True
            ex.body.feed_eof()

    # flow control --------------------------------------------------------------------

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionLost("the machine closed the connection")
        await self._wait_writable()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self._holder is not None:
            self._drop_rest()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self._holder is not None:
            self._drop_rest()
        if self.transport is not None:
            self.transport.abort()

    @property
    def reusable(self) -> bool:
        transport = self.transport
        return not self.closed and transport is not None and not transport.is_closing()


class _InterimHold:
    """The connection as an interim answer's sink sees it (``FlowControl``): while the
    sink holds its reading paused, the rest of the read being parsed waits unparsed too
    (``Connection._rest``), and is parsed when the sink lets go. Not the connection
    itself: its ``resume_reading``, which every body's reader calls, stays as cheap."""

    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def pause_reading(self, by: object) -> None:
        conn = self.conn
        conn.pause_reading(by)
        conn._holder = by

    def resume_reading(self, by: object) -> None:
        self.conn._let_go(by)


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[bool, bytes | None]:
    """Whether the body's end is marked (a length, or chunks) rather than the close, and
    the Transfer-Encoding values, comma-joined (None without one)."""
    framed = False
    te: bytes | None = None
    for key, value in headers:
        low = key.lower()
        if low == b"content-length":
            framed = True
        elif low == b"transfer-encoding":
            framed = True
            te = value if te is None else te + b"," + value
    return framed, te


class _Connect:
    """A connection to a machine being made (``Pool.open``), which ``Pool.cut`` and
    ``Pool.halt`` end: its connect timeout is moved to now, and ``why`` says what to raise
    instead of a timeout."""

    __slots__ = ("machine", "task", "timeout", "why")

    def __init__(
        self, machine: str, task: asyncio.Task[Any] | None, timeout: asyncio.Timeout
    ) -> None:
        self.machine = machine
        self.task = task  # the request's: ``Pool.halt`` waits for its answer
        self.timeout = timeout
        self.why: UpstreamError | None = None


class Pool:
    """Keep-alive connections per machine (``host:port``), at most ``size`` idle each.

    Made inside the running loop, which it keeps: on Python 3.11 every
    ``asyncio.get_running_loop()`` is a ``getpid()`` system call, and the hot path would
    make several per request.
    """

    def __init__(
        self, size: int, connect_timeout_s: float, budget: BufferBudget | None = None
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.budget = budget  # response bytes held, with the proxy's others
        self.size = size
        self.connect_timeout_s = connect_timeout_s
        self._idle: dict[str, list[Connection]] = {}
        self._closed = False
        self._puts = 0
        # Exchanges waiting for an answer's head, and until when (no deadline yet while
        # their request's body is sent: ``head_timeout`` runs from its end). One sweep every
        # HEAD_TICK_S times them out, rather than a loop timer armed and cancelled per
        # request; a 504 may come up to HEAD_TICK_S late. ``cut`` ends them by machine.
        self._waiting: dict[Exchange, float] = {}
        self._sweeper: asyncio.Task[None] | None = None
        # Connections being made: ``cut`` ends them by machine, ``halt`` all of them.
        self._connecting: dict[_Connect, None] = {}
        self._halted = False

    def wait_head(self, ex: Exchange, timeout: float) -> None:
        loop = self.loop
        self._waiting[ex] = loop.time() + timeout
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._time_out_heads())

    def unwatch(self, ex: Exchange) -> None:
        self._waiting.pop(ex, None)

    def cut(self, machine: str) -> int:
        """The machine (its id, as given to :func:`send`) goes down: every exchange with it
        still waiting for its answer's head (its request sent, or being sent) fails at once
        with :class:`CutOff`, rather than waiting for ``head_timeout``; its connection
        closes as it is released. A connection to it still being made is given up, and its
        request fails with :class:`Abandoned` (nothing was sent). Found by the machine,
        not by its address: one that changed meanwhile (a reload's ``apps[].port``, a new
        address from the API) still has requests at the old one. A scan of the waiting
        exchanges, once per drain: a request pays nothing more for it, but one with a body
        a dict entry while that is sent. The number cut or given up."""
        cut = [ex for ex in self._waiting if ex.machine == machine]
        for ex in cut:
            ex.fail(CutOff("the machine goes down"))
        connecting = [attempt for attempt in self._connecting if attempt.machine == machine]
        for attempt in connecting:
            self._give_up(attempt, Abandoned("the machine goes down"))
        return len(cut) + len(connecting)

    def halt(self) -> list[asyncio.Task[Any]]:
        """The proxy stops at once: every connection still being made is given up, and
        none is made from then on; their requests fail with :class:`Abandoned` (nothing
        was sent). Returns the tasks of those requests, to wait for their answers."""
        self._halted = True
        tasks = []
        for attempt in list(self._connecting):
            self._give_up(attempt, Abandoned("the proxy stops"))
            if attempt.task is not None:
                tasks.append(attempt.task)
        return tasks

    def _give_up(self, attempt: _Connect, why: UpstreamError) -> None:
        del self._connecting[attempt]  # ended once: its timeout is moved only while entered
        attempt.why = why
        if not attempt.timeout.expired():
            # (Fired already, its task not yet told: asyncio refuses to move it again, and
            # the task's TimeoutError is read as ``why`` all the same.)
            attempt.timeout.reschedule(self.loop.time())

    async def _time_out_heads(self) -> None:
        loop = self.loop
        while not self._closed:
            await asyncio.sleep(HEAD_TICK_S)
            now = loop.time()
            late = [ex for ex, deadline in self._waiting.items() if deadline <= now]
            for ex in late:
                del self._waiting[ex]
                ex.fail(TimeoutError())

    def take(self, authority: str) -> Connection | None:
        """The newest idle connection to the machine that is still fit, if any."""
        idle = self._idle.get(authority)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # newest first: the least likely to have been dropped
            if now - conn.idle_since < IDLE_S and conn.reusable:
                if idle and now - idle[0].idle_since >= IDLE_S:
                    self._expire(idle, now)  # older ones would expire first anyway
                return conn
            conn.close()
        return None

    def put(self, conn: Connection) -> None:
        idle = self._idle.setdefault(conn.authority, [])
        if self._closed or len(idle) >= self.size or not conn.reusable:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)
        self._puts += 1
        if self._puts % 1024 == 0:
            self._sweep()

    def forget(self, authority: str) -> None:
        """Close the idle connections to a machine that just broke one: when its process
        died, they are dead too, and a request written on one before its reset arrives
        could not go elsewhere."""
        for conn in self._idle.pop(authority, ()):
            conn.close()

    @staticmethod
    def _expire(idle: list[Connection], now: float) -> None:
        keep = []
        for conn in idle:
            if now - conn.idle_since < IDLE_S and conn.reusable:
                keep.append(conn)
            else:
                conn.close()
        idle[:] = keep

    def _sweep(self) -> None:
        """Forget machines gone quiet (suspended, removed): their sockets and dict keys."""
        now = time.monotonic()
        for authority in list(self._idle):
            idle = self._idle[authority]
            self._expire(idle, now)
            if not idle:
                del self._idle[authority]

    async def open(
        self, host: str, port: int, authority: str, max_field_size: int, machine: str = ""
    ) -> Connection:
        """A new connection to the machine (``machine``: its id, for ``cut``)."""
        if self._halted:
            raise Abandoned("the proxy stops")
        loop = self.loop
        timeout = asyncio.timeout(self.connect_timeout_s)
        attempt = _Connect(machine, asyncio.current_task(loop), timeout)
        try:
            async with timeout:
                self._connecting[attempt] = None
                try:
                    _, conn = await loop.create_connection(
                        lambda: Connection(authority, max_field_size), host, port
                    )
                finally:
                    self._connecting.pop(attempt, None)
        except TimeoutError:
            if attempt.why is not None:
                raise attempt.why from None
            raise ConnectFailed(f"connecting to {authority} timed out") from None
        except OSError as exc:
            raise ConnectFailed(f"connecting to {authority}: {exc.strerror or exc}") from None
        if attempt.why is not None:
            # Given up as the connect ended, before its timeout fired: nothing is sent.
            conn.close()
            raise attempt.why
        return conn

    async def close(self) -> None:
        """Stop the head sweeper and close the idle connections (those too when the close
        is cancelled: a stop cut short)."""
        self._closed = True
        sweeper, self._sweeper = self._sweeper, None
        try:
            if sweeper is not None:
                # Not awaited under suppress(CancelledError): that also swallowed a
                # cancellation of this close in that turn (a second SIGTERM), and the
                # service's stop went on as if none had come.
                await cancel_and_wait([sweeper])
        finally:
            for idle in self._idle.values():
                for conn in idle:
                    conn.close()
            self._idle.clear()


async def send(
    pool: Pool,
    host: str,
    port: int,
    authority: str,
    method: str,
    head: bytes,
    body: AsyncIterator[bytes] | None,
    *,
    chunked: bool = False,
    replayable: bool = False,
    max_field_size: int = 8190,
    head_timeout: float | None = None,
    upgrade: bool = False,
    on_interim: InterimSink | None = None,
    machine: str = "",
    continued: asyncio.Future[bool] | None = None,
    connected: Callable[[], None] | None = None,
) -> Exchange:
    """Send the request ``head`` (whole, as bytes) and start streaming the body, in chunks
    when ``chunked`` (the head says so); return once the answer's head arrived. The caller
    reads ``exchange.body`` and must call ``release()``.

    ``head_timeout`` runs from the end of the request: a slow upload is the client's
    time (each of its reads is bounded by the proxy's client timeout), not the machine's.
    A machine that takes nothing of the body for ``head_timeout`` times out as well.
    With ``upgrade`` (a WebSocket handshake), a 101 answer leaves the connection to the
    caller: ``exchange.detach()``. ``on_interim`` hears of each 1xx but 100 and 101 (its
    status, reason, raw headers and HTTP version), before the final answer; of the first
    100 too when ``continued`` is given (the head carries ``Expect: 100-continue``): that
    100 sets it True, a final answer before it False (the body's iterator waits for it).
    ``machine`` (its id) is how ``Pool.cut`` finds the request, whatever its address.
    ``connected`` is called as soon as a new connection to the machine is made (before
    the head goes out on it): a machine on trial takes other requests from then on.

    A pooled connection the machine closed while idle fails at once; a ``replayable``
    request (idempotent, no body) is then sent again on a new connection to the same
    machine, as browsers and aiohttp do; lost there too, it fails with :class:`LostAgain`
    (cut off there, with :class:`CutOffAgain`).
    """
    args = (method, head, body, chunked, head_timeout, upgrade, on_interim, machine, continued)
    conn = pool.take(authority)
    pooled = conn is not None
    resent = False  # after a lost pooled connection: its head had gone out
    while True:
        if conn is None:
            conn = await pool.open(host, port, authority, max_field_size, machine)
            if connected is not None:
                connected()
        ex = _start(pool, conn, *args)
        try:
            await ex._head
        except BaseException as exc:
            ex.release()
            if resent and type(exc) is ConnectionLost:
                raise LostAgain(str(exc)) from None
            if resent and type(exc) is CutOff:
                raise CutOffAgain(str(exc)) from None
            # A pooled connection the machine had closed: nothing was sent (ConnectFailed),
            # or the head went out as the close crossed it (ConnectionLost: replayed only if
            # idempotent, RFC 9110 9.2.2). Once more, on a new connection.
            if not pooled or not (
                isinstance(exc, ConnectFailed) or (replayable and isinstance(exc, ConnectionLost))
            ):
                raise
            resent = isinstance(exc, ConnectionLost)
            pooled, conn = False, None
            continue
        return ex


def _start(
    pool: Pool,
    conn: Connection,
    method: str,
    head: bytes,
    body: AsyncIterator[bytes] | None,
    chunked: bool,
    head_timeout: float | None,
    upgrade: bool,
    on_interim: InterimSink | None,
    machine: str = "",
    continued: asyncio.Future[bool] | None = None,
) -> Exchange:
    """Send the head and start the body; the caller awaits ``ex._head`` (and releases
    the exchange if that fails)."""
    ex = Exchange(pool, conn, method == "HEAD", upgrade, on_interim, machine, continued)
    conn.exchange = ex
    if not conn.reusable:
        ex.fail(ConnectFailed("the machine closed the connection before the request"))
        return ex
    conn.write(head)
    if body is not None:
        # Waiting for the answer too (one may come early), with no deadline until the body
        # is sent: ``Pool.cut`` finds it.
        pool._waiting[ex] = _NO_DEADLINE
        if continued is not None:
            ex._head.add_done_callback(functools.partial(_final_first, continued))
        ex._body_task = pool.loop.create_task(_send_body(pool, ex, body, chunked, head_timeout))
        ex._body_task.add_done_callback(_retrieved)
    elif head_timeout is not None:
        pool.wait_head(ex, head_timeout)
    else:
        pool._waiting[ex] = _NO_DEADLINE  # for Pool.cut
    return ex


def _final_first(continued: asyncio.Future[bool], head: asyncio.Future[None]) -> None:
    """The exchange has its final answer (or failed) before the machine's 100: the body
    of a request with Expect is not to be sent (see ``forward.BodyStream``)."""
    if not continued.done():
        continued.set_result(False)


def _retrieved(task: asyncio.Task[None]) -> None:
    """Mark a body failure as seen: it reaches the client through the response path (408,
    413, 502), and an unread one would be logged as "Task exception was never retrieved"."""
    if not task.cancelled():
        task.exception()


async def _send_body(
    pool: Pool,
    ex: Exchange,
    body: AsyncIterator[bytes],
    chunked: bool,
    head_timeout: float | None,
) -> None:
    conn = ex._conn
    assert conn is not None
    try:
        async for chunk in body:
            if chunked:
                conn.write(b"%x\r\n" % len(chunk))
                conn.write(chunk)
                conn.write(b"\r\n")
            else:
                conn.write(chunk)
            if conn.writing_paused:  # the machine is behind: head_timeout to take more
                try:
                    async with asyncio.timeout(head_timeout):
                        await conn.drain()
                except TimeoutError:
                    ex.fail(TimeoutError())  # 504 if no answer came yet
                    raise
            else:
                await conn.drain()
        if chunked:
            conn.write(b"0\r\n\r\n")
        if head_timeout is not None and not ex._head.done():
            pool.wait_head(ex, head_timeout)  # the request is whole: the machine's turn
    except asyncio.CancelledError:
        raise
    except BaseException:
        # The client's body failed (too large, too slow, gone) or the machine stopped
        # reading: the request is incomplete, so this connection can never be reused.
        conn.abort()
        raise
