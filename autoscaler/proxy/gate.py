"""One app's admission: a machine slot now, or a place in a bounded FIFO until one frees up.

A request takes a slot at once when nobody is waiting and some routable machine is under
its ``hard_limit``. Otherwise it waits in the app's FIFO: for a slot on a busy machine, or
for a machine at all, in which case the gate asks the control path for a wake
(:meth:`FleetView.wake`, single-flight per app). One pump task per app hands slots to the
head of the queue whenever the view changes (a request ended, a machine became routable, a
wake finished), so waiting requests leave in arrival order. A request that had a machine
and comes back (it refused the connection: nothing was sent) takes its place by its
arrival, ahead of those that came after it (``acquire``'s ``arrived``).

A machine on trial (``Upstream.trial``: it refused or lost a connection, or was ejected,
and has accepted none since) is handed to one request when it routes again, its probe,
marked so on the request (``Held.trial``); the balancer hands it no other until the probe
connected (``probed``), so the requests held for it go one, not all at once, to a machine
that may still be dead. The fast path (``try_acquire``) keeps to that too.

Slots move from "held" to "in flight" inside the pump (``release()`` then ``begin()``), so
the controller's demand meter never sees a request twice or not at all. A waiter that gives
up (deadline, client gone) leaves the queue; if the pump had just handed it a slot, the
slot is returned. Neither ever cancels the wake: only the gate's own bookkeeping is torn
down. Nor does a request wait for the wake once a machine routes: the wake's answer only
names it, when it comes (``wake_label``).
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from autoscaler.config import AppConfig
from autoscaler.control.view import AppView, FleetView, Upstream
from autoscaler.control.wake import AppMissing
from autoscaler.logs import get_logger
from autoscaler.metrics import NO_WAKE, WAKE_FAILED, WAKE_UNCORDON, Metrics
from autoscaler.proxy.balancer import pick
from autoscaler.scaling.fleet import COMING_UP_STATES, STARTED, boot_kind

_log = get_logger("autoscaler.proxy")

# After a wake that failed, or succeeded without leaving a machine routable (it refused
# connections, say), ask again after this long rather than in a tight loop.
WAKE_RETRY_S = 1.0

# How a request was served, as the fly-autoscaler-wake header, the access log's ``wake``
# and autoscaler_requests_total's wake label say: a fixed set, "resume", "start" and
# "uncordon" (what a wake returns: a boot, or a drain taken back) beside these two. None
# was needed, or its wake brought no machine up before the request's wake_timeout_s (its
# 504: the wake failed, or was too slow). NO_WAKE ("none") and WAKE_FAILED ("failed") are
# autoscaler.metrics', which exports series of both at 0.


class Held(Protocol):
    """Where ``Gate.acquire`` names the wake a request was held for, should its client
    leave first (the request's context); and, for a request handed a machine before its
    wake could say how it brought one up, that wake (``wake_pending``): its answer names
    the request once it has come (:func:`wake_label`)."""

    wake: str
    wake_pending: asyncio.Task[str] | None
    trial: bool
    """Handed a machine on trial, as its probe: its connection's outcome is to be told
    (``Gate.probed``), whatever becomes of the request."""


class QueueFull(Exception):
    """The app's queue holds ``max_queue`` requests already: none came after this one
    (otherwise the latest of them gives up its place, ``Gate._readmit``)."""


class ShuttingDown(QueueFull):
    """The proxy is stopping: a held request leaves the queue, never sent anywhere. A
    QueueFull, so that a waiter that handles no room in the queue handles this too."""


class AppRemoved(QueueFull):
    """The app left the configuration while the request was held (a 503 to retry)."""


class NoSuchApp(Exception):
    """The wake a request was held for found that the Machines API has no such app
    (``AppMissing``): answered at once, as no wake will bring a machine up."""


class HoldTimeout(Exception):
    """No slot within the deadline."""

    def __init__(self, waking: bool) -> None:
        super().__init__("waking" if waking else "busy")
        self.waking = waking


@dataclass(eq=False, slots=True)
class _Waiter:
    future: asyncio.Future[Upstream]
    view: AppView  # where it was counted as held, released on the same one
    task: asyncio.Task[Any] | None  # the one that waits: it answers a shed request
    arrived: float | None  # a request back: when it came (``Gate._readmit``), else None
    held: Held | None  # marked as a machine's probe (``Held.trial``) when it is one
    wake: asyncio.Task[str] | None = None


class Gate:
    """Admission for one app; ``config`` is replaced on reload, the queue carries over."""

    def __init__(
        self,
        config: AppConfig,
        fleet: FleetView,
        metrics: Metrics,
        rng: random.Random,
    ) -> None:
        self.name = config.name  # gates are per app name: it never changes
        self.config = config
        self.fleet = fleet
        self.rng = rng
        self._queued_gauge = metrics.queued.labels(app=config.name)
        self._queue: deque[_Waiter] = deque()
        self._pump_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Task[str] | None = None
        self._wake_failed_at: float | None = None
        self._wake_since = 0.0
        """When ``_wake`` was asked for, by the view's clock (as ``Upstream.started_at``)."""
        self._drained_at_wake: frozenset[str] = frozenset()
        """The machines up but cordoned by a drain of ours when ``_wake`` was asked for:
        one of them routed again during the wake is a drain taken back."""
        self._shed: type[QueueFull] | None = None
        """Set by ``shed``: a request that would wait from then on is sent away at once."""

    @property
    def config(self) -> AppConfig:
        return self._config

    @config.setter
    def config(self, config: AppConfig) -> None:
        self._config = config
        # Read per request, kept as plain attributes (pydantic's cost several times more).
        self._hard_limit = config.hard_limit

    @property
    def view(self) -> AppView:
        # Looked up each time: the controller may replace an app's view (remove_app on a
        # reload), and a gate holding the old one would never see its machines again.
        return self.fleet.app(self.name)

    @property
    def shed_with(self) -> type[QueueFull] | None:
        """Why the gate sheds every request that would wait (``shed``), or None."""
        return self._shed

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def can_wake(self) -> bool:
        return not self.config.static and self.fleet.can_wake

    # --- taking and giving back slots ----------------------------------------------

    def try_acquire(
        self,
        exclude: tuple[Upstream, ...] = (),
        *,
        jump: bool = False,
        held: Held | None = None,
    ) -> Upstream | None:
        """A slot now, or None. Only ``jump`` (a retry already admitted) passes waiters.
        A machine on trial makes ``held``'s request its probe (``Held.trial``); without
        ``held`` nobody tells the probe's outcome, and it is handed as any machine."""
        if self._queue and not jump:
            return None
        view = self.view
        up = pick(view.routable(), self._hard_limit, self.rng, exclude)
        if up is not None:
            view.begin(up)
            if up.trial and held is not None:
                _probe(up, held)
        return up

    def done(self, up: Upstream) -> None:
        """Give back the slot of a finished request, to the view that lent it."""
        (up.owner or self.view).end(up)

    def probed(self, up: Upstream, held: Held, passed: bool) -> None:
        """``held``'s request, if it is the probe of ``up`` on trial, connected to it
        (``passed``), or failed to, or let it go without trying: the machine takes
        requests again up to its limit, or the next request handed it probes it again
        (``AppView.probed``)."""
        if held.trial:
            held.trial = False
            (up.owner or self.view).probed(up, passed)

    async def acquire(
        self, wait_s: float, held: Held | None = None, *, arrived: float | None = None
    ) -> tuple[Upstream, str]:
        """Wait in the FIFO for a slot; the wake kind tells whether this request waited
        for a wake ("resume", "start", "uncordon") or only for a busy machine ("none").
        Once the gate has shed its queue (``shed``), nobody waits: the request gets the
        same answer.
        Should the client leave, or the request be shed (its 503), while a wake was asked
        for it, ``held.wake`` says which (``_kind_so_far``): its answer is told from one
        that never needed a wake.
        ``arrived`` (the loop's time it came) is given for a request admitted already,
        back because its machine refused it: it waits ahead of those that came after it
        (``_readmit``), not at the end of the queue behind them."""
        if self._shed is not None:
            raise self._shed
        loop = asyncio.get_running_loop()
        if arrived is None and len(self._queue) >= self.config.max_queue:
            raise QueueFull
        waiter = _Waiter(loop.create_future(), self.view, asyncio.current_task(loop), arrived, held)
        if arrived is None:
            self._queue.append(waiter)
        else:
            self._readmit(waiter, arrived)
        view = waiter.view
        view.hold()
        self._queued_gauge.inc()
        if not view.routable():
            self._ask_wake()
        if self._wake is not None and not self._wake.done():
            waiter.wake = self._wake
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = loop.create_task(self._pump(), name=f"gate:{self.name}")
            self._pump_task.add_done_callback(self._pump_done)
        deadline = loop.time() + wait_s
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    up = await waiter.future
            except (TimeoutError, asyncio.CancelledError) as exc:
                fut = waiter.future
                if fut.done() and not fut.cancelled():
                    shed = fut.exception()  # shed (stop, app removed) just as we gave up
                    if shed is not None:
                        if isinstance(exc, asyncio.CancelledError):
                            raise  # a cancellation is never swallowed (nor answered: gone)
                        raise shed from None
                    up = fut.result()  # handed a slot just as we gave up
                    if isinstance(exc, asyncio.CancelledError):
                        self.done(up)
                        if held is not None:
                            self.probed(up, held, False)  # (its probe, perhaps: tried by none)
                        raise
                else:
                    fut.cancel()
                    self._leave(waiter)
                    if isinstance(exc, TimeoutError):
                        raise HoldTimeout(
                            waiter.wake is not None or not self.view.routable()
                        ) from None
                    raise
            return up, self._wake_kind(waiter.wake, up, held)
        except (asyncio.CancelledError, QueueFull):  # (a QueueFull here: shed)
            if held is not None and waiter.wake is not None:
                held.wake = self._kind_so_far(waiter.wake)  # gave up on a wake, or shed
            raise

    def _wake_kind(self, wake: asyncio.Task[str] | None, up: Upstream, held: Held | None) -> str:
        if wake is None:
            return NO_WAKE
        if wake.done():
            return served_by(wake)
        # A machine became routable before the waker returned: the one it brings up, or
        # another. The kind of the boot under way names this request's cold start. Until
        # the waker has chosen one, the request goes all the same (waiting for the answer
        # held it back, its machine up, as long as the waker took to return), named as
        # far as known now: by how the machine that serves it came up, if it did during
        # the wake; "none" if it was up before (another party's cordon lifted, a skip
        # over: no boot). The waker's answer names it instead if it comes in time
        # (``wake_label``). Never cancel the wake.
        if self.view.waking is not None:
            return self.view.waking
        up_before = up.started_at is None or up.started_at < self._wake_since
        if up_before and up.id in self._drained_at_wake:
            # Our drain's cordon lifted: a drain taken back, which the waker (or on a
            # follower the leader's) says "uncordon". Named so at once, for good: named
            # "none" until the answer came, the header said "none" where the line and the
            # count, written after the answer, said "uncordon".
            return WAKE_UNCORDON
        if held is not None:
            held.wake_pending = wake
        if up_before:
            return NO_WAKE
        return up.how if up.how is not None else self._kind_so_far(wake)

    def _kind_so_far(self, wake: asyncio.Task[str]) -> str:
        """The wake a request whose client left (or that was shed) was held for, as far as
        it is known now (it is not waited for: nobody is left to answer, and the line is
        due). Once over,
        what it returned, or WAKE_FAILED if it brought no machine up; while under way, the
        boot it chose (``AppView.waking``, or on a follower the leader's, published with
        the machine coming up), else the one the app's machines point to: a drain of ours
        still up, which the wake takes back ("uncordon"; the waker names no boot for it),
        else a resume if a machine is suspended, as a follower names a wake its leader did
        not describe."""
        if wake.done():
            if wake.cancelled() or wake.exception() is not None:
                return WAKE_FAILED
            return wake.result()
        view = self.view
        if view.waking is not None:
            return view.waking
        upstreams = view.upstreams.values()
        for up in upstreams:
            if up.state in COMING_UP_STATES and up.how is not None:
                return up.how
        if wake is self._wake and any(
            up.id in self._drained_at_wake and up.state == STARTED for up in upstreams
        ):
            return WAKE_UNCORDON
        return "resume" if any(boot_kind(up.state) == "resume" for up in upstreams) else "start"

    def _readmit(self, waiter: _Waiter, arrived: float) -> None:
        """Queue a request admitted before at its place by arrival: after the others
        back that came before it (all those a machine still booting refused, say), ahead
        of every request queued on arrival. Those all came after it: it had its machine
        when the queue was empty, or was handed it ahead of them (FIFO). (Their times
        are not compared: uvloop's clock counts milliseconds, a tie would be common.)
        The queue stays bounded by ``max_queue``, holding those that came first: in a
        full queue the latest arrival gives up its place, with the QueueFull (its 503)
        it would have had coming to a queue so full; when that is this request (a queue
        full of others back before it, or ``max_queue`` 0), it is refused itself. It
        waited at the end of the queue, behind those that came after it, or got a 502
        (no machine reachable) for a queue they filled."""
        queue = self._queue
        place = 0
        for other in queue:  # those back come first, in the order they came
            if other.arrived is None or other.arrived > arrived:
                break
            place += 1
        if len(queue) >= self.config.max_queue:
            if place >= len(queue):
                raise QueueFull
            latest = queue[-1]
            if not latest.future.done():
                latest.future.set_exception(QueueFull())
            self._leave(latest)
        queue.insert(place, waiter)

    def _leave(self, waiter: _Waiter) -> None:
        try:
            self._queue.remove(waiter)
        except ValueError:
            return
        waiter.view.release()
        self._queued_gauge.dec()
        if not self._queue and self._pump_task is not None:
            self._pump_task.cancel()
            self._pump_task = None

    # --- waking and handing out slots ----------------------------------------------

    def _ask_wake(self) -> None:
        if not self.can_wake or (self._wake is not None and not self._wake.done()):
            return
        now = asyncio.get_running_loop().time()
        if self._wake_failed_at is not None and now - self._wake_failed_at < WAKE_RETRY_S:
            return
        self._wake_failed_at = None
        wake = self.fleet.wake(self.name)
        self._wake = wake
        view = self.view
        self._wake_since = view.clock()
        self._drained_at_wake = frozenset(
            up.id for up in view.upstreams.values() if up.state == STARTED and up.cordoned_by_us
        )
        for waiter in self._queue:
            if waiter.wake is None or waiter.wake.done():
                waiter.wake = wake

    def _dispatch(self) -> None:
        queue = self._queue
        if not queue:
            return
        view = self.view
        routable = view.routable()
        limit = self._hard_limit
        while queue:
            waiter = queue[0]
            if waiter.future.done():  # its request gave up a moment ago
                queue.popleft()
                waiter.view.release()
                self._queued_gauge.dec()
                continue
            up = pick(routable, limit, self.rng)
            if up is None:
                return
            queue.popleft()
            waiter.view.release()
            self._queued_gauge.dec()
            view.begin(up)
            if up.trial and waiter.held is not None:
                _probe(up, waiter.held)  # the next ``pick`` passes it over
            waiter.future.set_result(up)

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            self._dispatch()
            if not self._queue:
                break
            # A machine whose backoff ends later brings the queue back to life by itself.
            delay = self._next_healthy()
            routable = self.view.routable()
            if routable and pick(routable, self._hard_limit, self.rng) is not None:
                continue  # room appeared since _dispatch looked (a backoff just ended)
            if not routable:
                wake = self._wake
                if wake is not None and wake.done():
                    # The wake is over and still nothing is routable: ask again shortly.
                    self._wake_failed_at = loop.time()
                    self._wake = None
                    self._answer_missing(wake)
                self._ask_wake()
                if self.can_wake and self._wake is None:
                    delay = _min(delay, WAKE_RETRY_S)
            changed = self.view.changed()
            try:
                async with asyncio.timeout(delay):
                    await changed
            except TimeoutError:
                pass

    def _answer_missing(self, wake: asyncio.Task[str]) -> None:
        """Send away the requests held for ``wake`` if it found the app missing from the
        Machines API: they waited on, each wake after it failing the same way, until
        their 504 at ``wake_timeout_s``. (A later request asks a wake of its own: the app
        may exist by then.)"""
        if wake.cancelled() or not isinstance(wake.exception(), AppMissing):
            return
        for waiter in list(self._queue):
            if waiter.wake is wake and not waiter.future.done():
                waiter.future.set_exception(NoSuchApp(self.name))
                self._leave(waiter)

    def _pump_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # a bug: held requests would wait for nothing until 504
            _log.error("gate_pump_failed", app=self.name, exc_info=exc)

    def _next_healthy(self) -> float | None:
        """Seconds until a machine skipped for failing comes back into rotation."""
        now = self.view.clock()
        soonest: float | None = None
        for up in self.view.upstreams.values():
            if up.unhealthy_until > now and up.state == STARTED and not up.cordoned:
                wait = up.unhealthy_until - now
                soonest = wait if soonest is None else min(soonest, wait)
        return soonest

    def shed(
        self, why: type[QueueFull] = ShuttingDown, *, hand_out: bool = False
    ) -> list[asyncio.Task[Any]]:
        """Send every held request away with ``why`` (the proxy stops, or the app left the
        configuration): they were sent nowhere yet, so a 503 that says to retry is right.
        So is every request that would wait from now on (one whose machine refused its
        connection, say): nobody would shed it again. Returns the tasks that answer the
        held ones (a stop cut short waits for those alone).

        With ``hand_out`` (a graceful stop's shed, which leaves time to serve), those
        that can have a slot now take it first, as the pump would have in its next turn:
        their machine became routable, or freed a slot, in this very turn of the loop,
        and they got the 503 where one a turn earlier was sent."""
        if hand_out:
            self._dispatch()
        self._shed = why
        answering = []
        for waiter in list(self._queue):
            if not waiter.future.done():
                waiter.future.set_exception(why())
                if waiter.task is not None:
                    answering.append(waiter.task)
            self._leave(waiter)
        return answering

    async def close(self) -> None:
        """Stop the pump (on shutdown or when the app leaves the configuration)."""
        task, self._pump_task = self._pump_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def served_by(wake: asyncio.Task[str]) -> str:
    """How a request handed a machine was served, once the wake it was held for is over:
    what the wake returned; "none" if it failed (another machine served the request)."""
    if wake.cancelled() or wake.exception() is not None:
        return NO_WAKE
    return wake.result()


def wake_label(held: Held) -> str:
    """The request's wake label as known now (for its answer's header; at its end, for
    its line and its count): the answer of the wake it still waited for when handed its
    machine, once that has come (``Gate._wake_kind``), else the name it was given then."""
    wake = held.wake_pending
    if wake is not None and wake.done():
        held.wake_pending = None
        held.wake = served_by(wake)
    return held.wake


def _probe(up: Upstream, held: Held) -> None:
    """``up`` is on trial and goes to ``held``'s request: its probe, the only request it
    is handed until the probe connected (``Gate.probed``)."""
    up.probing = True
    held.trial = True


def _min(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
