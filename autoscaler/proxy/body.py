"""Message bodies in flight through the proxy, with flow control towards their source; the
bound on what a parser holds between them; which transfer codings the proxy relays."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Protocol

# A consumer reading slower than the peer sends: above this much buffered, reading from
# the socket pauses until the consumer caught up to half of it. Low, so that thousands of
# slow peers hold little (see docs/benchmarks.md, "Proxy memory").
BODY_HIGH_WATER = 64 * 1024
# A connection's transport buffers at most about this much before its writer waits
# (asyncio's default is 64 KiB): what a peer slow to take its bytes holds in the proxy
# beyond the bodies' own buffers.
WRITE_HIGH_WATER = 16 * 1024
# A read larger than this is parsed in slices of it: a body's chunks stay small, so each
# write of one to a slow peer adds little to what its transport holds; and on the client
# side, parsing stops soon after a pipelined head.
PARSE_SLICE = 16 * 1024
# A whole head (or trailer section) may hold this many times the limit of one header
# field: 64 KiB with the default 8 KiB fields, near Envoy's 60 KiB, above nginx's 32 KiB.
HEAD_FACTOR = 8


class FlowControl(Protocol):
    """A connection whose reading can be paused on behalf of several holders."""

    def pause_reading(self, by: object) -> None: ...

    def resume_reading(self, by: object) -> None: ...


class FlowControlled:
    """Flow control of a protocol, both ways: a mixin for the proxy's protocols.

    Reading from ``transport`` is paused while at least one holder (a full body, a full
    pipeline queue, a tunnel's other side) wants it paused. Writing: ``drain()`` waits
    while the transport's buffer is over its high-water mark, and ``on_writable`` (a
    tunnel) hears when that changes. Subclasses call ``_init_flow()`` and, when the
    connection is lost, ``_writer_gone(exc)``.
    """

    transport: asyncio.Transport | None

    def _init_flow(self) -> None:
        self._paused_by: set[object] = set()
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None
        self.on_writable: Callable[[bool], None] | None = None

    def pause_reading(self, by: object) -> None:
        if not self._paused_by and self.transport is not None:
            with contextlib.suppress(RuntimeError, NotImplementedError):
                self.transport.pause_reading()
        self._paused_by.add(by)

    def resume_reading(self, by: object) -> None:
        if by in self._paused_by:
            self._paused_by.discard(by)
            if not self._paused_by and self.transport is not None:
                with contextlib.suppress(RuntimeError, NotImplementedError):
                    self.transport.resume_reading()

    def resume_all_reading(self) -> None:
        """Read again whoever held it (the connection changes hands or is closing)."""
        self._paused_by.clear()
        if self.transport is not None:
            with contextlib.suppress(RuntimeError, NotImplementedError):
                self.transport.resume_reading()

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.on_writable is not None:
            self.on_writable(False)

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.on_writable is not None:
            self.on_writable(True)
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    @property
    def writing_paused(self) -> bool:
        """The peer is behind: ``drain()`` would wait."""
        return self._writing_paused

    async def _wait_writable(self) -> None:
        if self._writing_paused:
            if self._drain is None:
                self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def _writer_gone(self, exc: BaseException) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(exc)


def transfer_coding_problem(codings: bytes) -> tuple[int, str] | None:
    """What keeps the proxy from relaying a message's Transfer-Encoding (its headers'
    values, comma-joined), as the status a request gets and why; None when it is exactly
    ``chunked``.

    llhttp decodes chunked and nothing else; the body would go on re-framed without the
    other codings, so changed. A request whose final coding is not chunked has no length
    (RFC 9112 6.3: 400); one with other codings before it gets 501, as nginx answers.
    """
    names = [name for name in (c.strip().lower() for c in codings.split(b",")) if name]
    if not names or names[-1] != b"chunked":
        return 400, "chunked is not the final transfer coding"
    if len(names) > 1:
        return 501, "transfer codings other than chunked are not supported"
    return None


class HeadBudget:
    """A bound on the bytes a parser holds outside bodies: a head, a trailer section, a
    chunk-size line.

    httptools hands a header field over only once it is whole and keeps its bytes until
    then, and llhttp sets no limit of its own, so a peer that never ends a field would grow
    that buffer without end. A protocol tells where a stretch of such bytes starts (a
    message begins: :meth:`begin`, its head is complete: :meth:`head_done`, body bytes
    came: :meth:`mark`) and calls :meth:`over` after each read. A read in which a stretch
    started is not counted: the count falls short of the bytes held by less than one read,
    and never exceeds them. ``in_head`` tells a head's fields from trailer fields.
    """

    __slots__ = ("in_head", "marks", "spent")

    def __init__(self) -> None:
        self.marks = 0
        self.spent = 0
        self.in_head = False  # between a message's start and the end of its head

    def begin(self) -> None:
        self.in_head = True
        self.mark()

    def head_done(self) -> None:
        self.in_head = False
        self.mark()

    def mark(self) -> None:
        self.marks += 1
        self.spent = 0

    def over(self, marks: int, size: int, limit: int) -> bool:
        """After a read of ``size`` bytes (``marks`` as it was before): whether the stretch
        under way now holds more than ``limit`` bytes."""
        if marks != self.marks:
            return False
        self.spent += size
        return self.spent > limit


class BufferBudget:
    """All the bytes of request and response bodies the proxy holds at once, against one
    limit (``proxy.max_buffer_bytes``).

    Over the limit, the connection whose bytes went over is paused (backpressure: its peer
    waits, nobody is dropped) until the total is back under three quarters of it; bodies
    are read by their consumers meanwhile, so the total falls.
    """

    __slots__ = ("_paused", "held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._paused: set[FlowControl] = set()

    def add(self, size: int, source: FlowControl) -> None:
        self.held += size
        if self.held > self.limit:
            source.pause_reading(self)
            self._paused.add(source)

    def sub(self, size: int) -> None:
        self.held -= size
        if self._paused and self.held <= self.limit - self.limit // 4:
            paused, self._paused = self._paused, set()
            for source in paused:
                source.resume_reading(self)

    @property
    def paused(self) -> int:
        """Connections held back for the budget now."""
        return len(self._paused)


class Body:
    """A message body as the peer sends it: fed by a parser, read by one consumer.

    ``source`` is the connection it comes from: reading from its socket is paused while
    more than ``BODY_HIGH_WATER`` bytes wait here, and resumed once half of that was read,
    so a slow consumer holds a bounded amount of memory for any body size. The bytes held
    count in ``budget``; whoever owns the body calls :meth:`drop` when done with it.
    """

    __slots__ = (
        "_budget",
        "_chunks",
        "_eof",
        "_error",
        "_size",
        "_source",
        "_waiter",
        "cut",
        "on_eof",
        "received",
    )

    def __init__(self, source: FlowControl, budget: BufferBudget | None = None) -> None:
        self._source = source
        self._budget = budget
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.received = 0
        self.cut = False
        """Ended early on purpose (its machine is drained): reads return ``b""``."""
        # Called once the peer sent the whole body (it may still be unread here).
        self.on_eof: Callable[[], None] | None = None

    @property
    def done(self) -> bool:
        """Every byte of the body has been received (whether or not it was read)."""
        return self._eof

    def feed(self, data: bytes) -> None:
        if self.cut:
            return  # ended for its reader: nothing more is kept
        size = len(data)
        self._chunks.append(data)
        self._size += size
        self.received += size
        if self._size > BODY_HIGH_WATER:
            self._source.pause_reading(self)
        budget = self._budget
        if budget is not None:
            budget.add(size, self._source)
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()
        on_eof = self.on_eof
        if on_eof is not None:
            self.on_eof = None
            on_eof()

    def fail(self, exc: BaseException) -> None:
        if not self._eof:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def end_early(self) -> None:
        """End the body for its reader now, between two chunks (the bytes not read yet
        are dropped): a stream from a machine about to sleep ends cleanly."""
        self.cut = True
        self._chunks.clear()
        if self._budget is not None and self._size:
            self._budget.sub(self._size)  # else held for good: later uploads would stall
        self._size = 0
        self._source.resume_reading(self)
        self._wake()

    async def read(self) -> bytes:
        """The next chunk as it came off the socket; ``b""`` at the end of the body."""
        if self.cut:
            return b""
        while not self._chunks:
            if self._eof:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            if self.cut:
                return b""
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        if self._budget is not None:
            self._budget.sub(len(chunk))
        if self._size <= BODY_HIGH_WATER // 2:
            self._source.resume_reading(self)
        return chunk

    def take(self) -> bytes:
        """Everything buffered so far, at once (a small body that came whole)."""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._budget is not None:
            self._budget.sub(self._size)
        self._size = 0
        self._source.resume_reading(self)
        return data

    def drop(self) -> None:
        """Let go of what was never read (the exchange or the request is over), and let
        the source read again: a buffer that had filled paused it, and the connection may
        carry the next exchange (a pooled upstream, a kept-alive client)."""
        if self._size:
            self._chunks.clear()
            if self._budget is not None:
                self._budget.sub(self._size)
            self._size = 0
        self._source.resume_reading(self)
