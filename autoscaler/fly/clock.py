"""Fly's clock, as the Machines API's answers show it: Fly's time now, never ahead of it.

Fly stamps a machine's events with its own clock (``timestamp``, ms since the epoch), and
the wake reads how long ago another party's start began from them (control/wake.py,
``Waker.patience_from``). Read against our time of day, that age is off by however far
our clock runs ahead of Fly's: 2 s of it passed another party's resume at once (its
patience is 2 s) and started a second machine for one need, 10 s any start. Rather than
trust the two clocks to agree, the client measures Fly's against ours from every answer
it reads: an answer's ``Date`` header is Fly's time when it was made, floored to the
second (``D``), made at some moment between our send and our receipt of the answer. On
our monotonic clock, with ``c`` = our clock minus Fly's (constant while neither is
stepped):

    sent - (D + 1)  <  c  <=  received - D

Only the upper bound matters for the wake, and it errs the safe way: Fly's time taken
as ``clock() - (received - D)`` is never ahead of Fly's, so an age read from it is never
longer than the true one and a start is never passed early. It is at most the answer's
return trip plus the fraction of the second ``D`` dropped late; :class:`FlyClock` keeps
the least of the bounds its answers gave over the last :data:`WINDOW_S`, which, as the
answers' fractions of a second fall anywhere, comes within a few tenths of a second of
``c`` after a handful of calls (the controller makes one a tick). The window forgets a
bound as clocks drift; a bound that the lower one of a new answer contradicts (Fly's
clock stepped, ours are monotonic) is dropped at once with all the others.

Our monotonic clock, not our time of day, carries the estimate: a wrong time of day
(the host whose clock runs ahead) does not enter it at all. The events' stamps come from
the machine's host, the ``Date`` from Fly's API servers; Fly keeps its hosts by NTP, well
within a second of each other. Without any ``Date`` read (an API that sends none), Fly's
time is taken to be our time of day, as before this estimate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime

Clock = Callable[[], float]

WINDOW_S = 300.0
"""How long a bound of one answer is kept: monotonic clocks and Fly's drift apart by a
few ms in that time (tens of parts per million), far below the bound's own error."""
SLOTS = 10
"""The window in slots of ``WINDOW_S / SLOTS`` seconds, each with the tightest bounds of
its answers: memory and time per answer stay constant however many calls are made."""
EARLIEST_S = 1_577_836_800.0
"""2020-01-01: a ``Date`` before it is garbage, not a clock (as ``models.EARLIEST_S``)."""


class FlyClock:
    """Fly's time of day, estimated from the answers' ``Date`` headers (module docstring);
    ``clock``: the monotonic clock the send and receive times are read on (the client's),
    ``wall``: our time of day, used only until an answer has carried a ``Date``."""

    __slots__ = ("_clock", "_last_date", "_slots", "_wall")

    def __init__(self, clock: Clock = time.monotonic, wall: Clock = time.time) -> None:
        self._clock = clock
        self._wall = wall
        # slot number (received // slot length) -> (least upper bound, greatest lower bound)
        self._slots: dict[int, tuple[float, float]] = {}
        self._last_date: tuple[str, float | None] = ("", None)  # one parse per second

    def observe(self, sent: float, received: float, date: str | None) -> None:
        """Take the ``Date`` of an answer to a request sent at ``sent`` and answered at
        ``received`` (on ``clock``). A missing or unreadable one is ignored."""
        fly = self._parse(date)
        if fly is None or received < sent:
            return
        upper, lower = received - fly, sent - (fly + 1.0)
        self._expire(received)
        if self._slots and (
            lower >= min(u for u, _ in self._slots.values())
            or upper <= max(lo for _, lo in self._slots.values())
        ):
            self._slots.clear()  # Fly's clock was stepped: what was measured before is off
        key = math.floor(received / (WINDOW_S / SLOTS))
        held = self._slots.get(key)
        self._slots[key] = (
            (upper, lower) if held is None else (min(held[0], upper), max(held[1], lower))
        )

    def offset(self) -> float | None:
        """The least upper bound of (our monotonic clock minus Fly's) the window holds;
        None without one."""
        self._expire(self._clock())
        return min((u for u, _ in self._slots.values()), default=None)

    def now(self) -> float:
        """Fly's time now (Unix seconds), never ahead of it as far as its answers tell;
        our time of day until an answer carried a ``Date``."""
        offset = self.offset()
        return self._wall() if offset is None else self._clock() - offset

    def _expire(self, now: float) -> None:
        oldest = math.floor((now - WINDOW_S) / (WINDOW_S / SLOTS))
        for key in [k for k in self._slots if k <= oldest]:
            del self._slots[key]

    def _parse(self, date: str | None) -> float | None:
        if not date:
            return None
        if date == self._last_date[0]:
            return self._last_date[1]
        try:
            stamp = parsedate_to_datetime(date)
        except (TypeError, ValueError, IndexError, OverflowError):
            value = None
        else:
            value = stamp.timestamp() if stamp.tzinfo is not None else None  # GMT, always
            if value is not None and value < EARLIEST_S:
                value = None
        self._last_date = (date, value)
        return value
