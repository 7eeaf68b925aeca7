"""The live fleet view: where the data path and the control path meet.

The controller writes what the Machines API says (states, cordons, addresses); the proxy
writes load (requests in flight per machine, held requests, last use) and reads which
machines it may route to. Both run on one event loop, so plain attributes suffice; changes
that could let a held request go (a machine became routable, a slot freed up) wake the
waiters through :meth:`AppView.changed`.

The proxy never calls the Machines API: it asks for a wake through :meth:`FleetView.wake`,
which runs the controller's waker once per app however many requests wait, shielded from
the cancellation of any one of them (a client that disconnects must not cancel a wake).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from autoscaler.aio import cancel_and_wait
from autoscaler.config import authority
from autoscaler.scaling.fleet import STARTED
from autoscaler.scaling.window import ConcurrencyMeter

Clock = Callable[[], float]
HUNG_AFTER = 2
"""Ejections in a row by the proxy for the machine's own failures that make a started
machine hung: the first, and the failed probe after it (``Upstream.ejections_in_a_row``:
this process's proxy's, or in cluster mode another replica's as it reports them). A
timeout ejection of an app's last routable machine counts as both (``proxy.health``)."""
# The controller's wake: brings one machine of the app to routable and says how
# ("resume", "start", "uncordon" when a drain was taken back, or "none" when one was
# routable already).
Waker = Callable[[str], Coroutine[Any, Any, str]]
# The proxy's: ends the WebSockets and streams it carries to (app, machine); how many.
Closer = Callable[[str, str, bool], int]


class Upstream:
    """One machine as the proxy sees it (a plain class, not a dataclass: the compiled
    build makes its constructor native, where a dataclass's is generated at run time)."""

    __slots__ = (
        "authority",
        "checks_critical",
        "cordoned",
        "cordoned_by_us",
        "cut_off",
        "ending",
        "failing",
        "held",
        "host",
        "how",
        "http10",
        "id",
        "in_flight",
        "last_used",
        "long_lived",
        "owner",
        "port",
        "probing",
        "remote_failing",
        "remote_in_flight",
        "remote_long_lived",
        "share",
        "started_at",
        "starts",
        "state",
        "trial",
        "unhealthy_until",
    )

    def __init__(self, id: str, host: str, port: int, state: str = STARTED) -> None:
        self.id = id
        self.host = host
        self.port = port
        self.state = state
        self.cordoned = False
        self.cordoned_by_us = False
        """Its cordon is our drain's (``MachineInfo.cordoned_by_us``)."""
        self.ending = False
        """A drain ended its long-lived connections (the proxy's ``end_long_lived``): a
        WebSocket or event stream that begins on it afterwards (a request sent before the
        drain, answered later) ends at once too. Cleared once it is started and uncordoned
        again (the drain taken back, a later start)."""
        self.cut_off = False
        """The drain's time is up (``end_long_lived`` with ``everything``) and the machine
        goes down: any answer whose body is still to come when its head arrives is ended
        at once too, as those under way were (an event stream cleanly, the others cut);
        one that came whole with its head is served. Cleared with ``ending``."""
        self.in_flight = 0
        self.long_lived = 0
        """WebSockets to it (idle ones too, which give their slot back) and answers from it
        whose bodies are still coming, that this process's proxy carries: a drain would
        end them (``end_long_lived``), so a scale-down takes other machines first."""
        self.remote_in_flight = 0
        """Cluster mode: requests in flight to it through the other replicas, as they last
        reported (the balancer's hard limit, and on the leader the policy and the drains,
        count them; this replica's own slots are ``in_flight``)."""
        self.remote_long_lived = 0
        """Cluster mode: the other replicas' ``long_lived`` to it, as they last reported:
        the leader's scale-downs take it last for those too, not only for its own."""
        self.share = 1.0
        """Cluster mode: this replica's share of the machine's hard limit (its demand on
        the app over the whole cluster's, as last reported): it keeps at most
        ``max(1, floor(hard_limit x share))`` requests in flight there. 1.0 alone."""
        self.last_used: float | None = None
        self.started_at: float | None = None
        self.starts = 0
        """How many times the view saw it start (a new process each): the proxy's health
        forgets what it held against the process before (``proxy.health``)."""
        self.unhealthy_until = 0.0
        self.trial = False
        """On trial: it failed (a connection refused or lost: ``AppView.skip``; an
        ejection, ``proxy.health``) and has accepted no connection since. Once it routes
        again the first request handed it is its probe (``probing``), and no other goes to
        it until that one connected (``AppView.probed``): a machine still dead costs one
        request's connect, not one per request held for it."""
        self.probing = False
        """Its probe is under way: the balancer hands it no other request until
        ``AppView.probed``."""
        self.checks_critical = False  # its Fly health checks fail (the proxy ejects it)
        self.how: str | None = None
        """How its current start brings it up (``starting``) or its last one did
        (``started``): "resume" or "start", None when unknown (``MachineInfo.how``)."""
        self.failing = 0
        """Ejections in a row for failing itself (timeouts, resets, refused connections,
        answers that are not HTTP) since it last started or answered well: written by the
        proxy's health, read by the controller, which restarts a machine that hangs."""
        self.remote_failing = 0
        """Cluster mode, on the leader: the most ejections in a row that another replica
        reports for it, counted since it last started (``Replica``)."""
        self.held = False
        """Held out of rotation by the controller: a hung machine until its restart
        (``AppRuntime.hold_hung``); a new start lets it back."""
        self.http10: bool | None = None
        """Whether its last answer said HTTP/1.0 (its server sends no 100): the proxy
        answers a client's ``Expect: 100-continue`` itself, at once, and sends the machine
        none (RFC 9110 10.1.1). None until it answers, and again when it starts again or
        moves (another server may answer): meanwhile its app's word holds
        (``AppView.http10``), as every machine of an app runs the same image."""
        self.authority = authority(host, port)
        self.owner: AppView | None = None
        """The view that counts its load: a request gives its slot back there, even after
        the app left the configuration (a re-added app gets a new view, at zero)."""

    def __repr__(self) -> str:
        return f"Upstream(id={self.id!r}, authority={self.authority!r}, state={self.state!r})"

    def set_address(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.authority = authority(host, port)
        self.http10 = None

    @property
    def ejections_in_a_row(self) -> int:
        """Ejections in a row for its own failures, by this replica's proxy or another's."""
        return max(self.failing, self.remote_failing)


@dataclass(frozen=True, slots=True)
class MachineInfo:
    """What the controller learnt of one machine from the API."""

    id: str
    host: str
    port: int
    state: str
    cordoned: bool
    checks_critical: bool = False  # a Fly health check of the machine is critical
    how: str | None = None
    """How its current start brings it up, or its last one did: "resume" (from its
    snapshot) or "start" (a cold boot); None when unknown. In cluster mode the leader
    publishes it, and a follower's held requests are labelled by it."""
    cordoned_by_us: bool = False
    """Its cordon is a drain's of ours (our metadata key on it, or our cordon ahead of the
    API's), not another party's: lifted while a wake of the app runs, it is a drain taken
    back ("uncordon"), where another party's lifted is no wake of ours ("none")."""


# Every change of any app's machines gets a number never used before (``AppView.version``):
# a reader remembers the number it saw, and a view made again for the same name (an app
# removed and added back) never matches what it remembered of the old one.
_versions = itertools.count(1)


class AppView:
    """One app's machines and load."""

    def __init__(self, name: str, clock: Clock = time.monotonic) -> None:
        self.name = name
        self.clock = clock
        self.upstreams: dict[str, Upstream] = {}
        self.meter = ConcurrencyMeter(clock())
        """Demand: requests in flight plus requests held. The controller samples it."""
        self.in_flight = 0
        self.queued = 0
        self.last_request_at: float | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._routable: list[Upstream] | None = None
        self._routable_until = 0.0
        self.version = next(_versions)
        """Changes with every change of the machines (their list, states, cordons, checks):
        the proxy's health sweep looks again only at apps whose version moved."""
        self.on_machines: Callable[[str], None] | None = None
        """Called with the app's name whenever its machines change (cluster mode: the
        leader pushes its view to the followers)."""
        self.touched: set[str] = set()
        """Where a request that begins or waits leaves the app's name: the fleet's set,
        which tells cluster mode's reports which apps' load may have moved."""
        self.http10 = False
        """Its last answer, from any of its machines, said HTTP/1.0: a machine not heard
        from yet (new, started again, moved; ``Upstream.http10`` None) is taken to be
        HTTP/1.0 too for Expect, so that each new machine of an HTTP/1.0 image does not
        cost its first request with Expect ``CONTINUE_WAIT_S`` (an app redeployed with an
        HTTP/1.1 server: its first answer of 1.1 clears it). Wrongly taken so is safe: the
        proxy sends its own 100 and the body without Expect, which the machine could only
        have refused early. A machine's own answer wins."""
        self.waking: str | None = None
        """How the wake under way brings a machine up ("resume" or "start"), once the
        waker has chosen; None otherwise. A held request served before the wake returns
        (by that machine, or another that came up meanwhile) reads its kind here."""

    # --- written by the controller --------------------------------------------------

    def set_machines(self, machines: Iterable[MachineInfo]) -> None:
        """Replace the machine list, keeping the load counters of machines that remain."""
        now = self.clock()
        fresh: dict[str, Upstream] = {}
        for info in machines:
            up = self.upstreams.get(info.id)
            if up is None:
                up = Upstream(info.id, info.host, info.port)
                up.owner = self
                up.state = ""  # so the started_at bookkeeping below sees a change
            elif (up.host, up.port) != (info.host, info.port):
                up.set_address(info.host, info.port)
            self._apply_state(up, info.state, now)
            up.cordoned = info.cordoned
            up.cordoned_by_us = info.cordoned_by_us
            if up.ending and up.state == STARTED and not up.cordoned:
                up.ending = up.cut_off = False  # routable again: its new connections run
            up.checks_critical = info.checks_critical
            up.how = info.how
            fresh[info.id] = up
        self.upstreams = fresh
        self._routable = None
        self.version = next(_versions)
        self.notify()
        if self.on_machines is not None:
            self.on_machines(self.name)

    def set_remote_in_flight(
        self,
        counts: dict[str, int],
        share: float = 1.0,
        long_lived: dict[str, int] | None = None,
    ) -> None:
        """Cluster mode: the other replicas' requests in flight per machine, this
        replica's share of each machine's hard limit, and the others' long-lived
        connections per machine."""
        changed = False
        for mid, up in self.upstreams.items():
            up.remote_long_lived = 0 if long_lived is None else long_lived.get(mid, 0)
            n = counts.get(mid, 0)
            if up.remote_in_flight != n or up.share != share:
                up.remote_in_flight = n
                up.share = share
                changed = True
        if changed:
            self.notify()  # a drain waiting for the machine to go idle looks again

    def set_state(self, machine_id: str, state: str) -> None:
        up = self.upstreams.get(machine_id)
        if up is not None:
            self._apply_state(up, state, self.clock())
            if up.ending and up.state == STARTED and not up.cordoned:
                up.ending = up.cut_off = False
            self._routable = None
            self.version = next(_versions)
            self.notify()
            if self.on_machines is not None:
                self.on_machines(self.name)

    @staticmethod
    def _apply_state(up: Upstream, state: str, now: float) -> None:
        if state == STARTED and up.state != STARTED:
            up.started_at = now
            up.starts += 1
            up.unhealthy_until = 0.0
            up.trial = up.probing = False
            up.failing = up.remote_failing = 0  # a new process
            up.held = False
            up.http10 = None
        elif state != STARTED:
            up.started_at = None
        up.state = state

    # --- written by the proxy -------------------------------------------------------

    def routable(self) -> list[Upstream]:
        """Machines a request may go to now (read-only: the list is cached, and kept until
        the machines change or a machine's unhealthy backoff ends)."""
        now = self.clock()
        if self._routable is not None and now < self._routable_until:
            return self._routable
        routable = []
        until = math.inf
        for up in self.upstreams.values():
            if up.state == STARTED and not up.cordoned and not up.held:
                if now >= up.unhealthy_until:
                    routable.append(up)
                else:
                    until = min(until, up.unhealthy_until)
        self._routable, self._routable_until = routable, until
        return routable

    def mark_unhealthy(self, up: Upstream, backoff_s: float) -> None:
        up.unhealthy_until = self.clock() + backoff_s
        self._routable = None

    def skip(self, up: Upstream, backoff_s: float) -> None:
        """Route no request to ``up`` for ``backoff_s``, unless a longer skip (an
        ejection) already holds it out; then one request tries it (``Upstream.trial``)."""
        until = self.clock() + backoff_s
        up.trial = True
        if until > up.unhealthy_until:
            up.unhealthy_until = until
            self._routable = None

    def probed(self, up: Upstream, passed: bool) -> None:
        """The probe of ``up`` on trial is over: ``passed`` (its connection was made) ends
        the trial, and the machine takes requests up to its limit again; otherwise (its
        connect failed, and a skip holds the machine out again, or the request went before
        connecting) the next request handed it probes it again."""
        up.probing = False
        if passed:
            up.trial = False
        self.notify()

    def hold_out(self, up: Upstream, held: bool) -> None:
        """Hold ``up`` out of rotation, or let it back (``Upstream.held``); announced as a
        change of the machines (cluster mode: the leader publishes it as cordoned)."""
        if up.held == held:
            return
        up.held = held
        self._routable = None
        self.notify()
        if self.on_machines is not None:
            self.on_machines(self.name)

    def failed_itself(self, up: Upstream, count: int = 1) -> None:
        """The proxy ejected ``up`` for its own failure (``Upstream.failing``, by ``count``
        ejections); in cluster mode the replica's next report says so."""
        up.failing += count
        self.touched.add(self.name)

    def begin(self, up: Upstream) -> None:
        """A request went to ``up``."""
        now = self.clock()
        up.in_flight += 1
        up.last_used = now
        self.in_flight += 1
        self.last_request_at = now
        self.touched.add(self.name)
        self.meter.add(1, now)

    def end(self, up: Upstream) -> None:
        """A request on ``up`` finished; its slot may let a held request go."""
        now = self.clock()
        up.in_flight -= 1
        up.last_used = now
        self.in_flight -= 1
        self.meter.add(-1, now)
        self.notify()

    def hold(self) -> None:
        """A request began to wait (for a wake or for a free slot)."""
        now = self.clock()
        self.queued += 1
        self.last_request_at = now
        self.touched.add(self.name)
        self.meter.add(1, now)

    def release(self) -> None:
        """A held request stopped waiting (sent on, timed out or gone)."""
        self.queued -= 1
        self.meter.add(-1, self.clock())

    # --- change notification --------------------------------------------------------

    def notify(self) -> None:
        # Called at the end of every request: free when nobody waits (the usual case).
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def changed(self) -> None:
        """Return at the next change of machines or load."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter


class _Wake:
    """One app's wake under way (a plain class, as :class:`Upstream` is)."""

    __slots__ = ("asked", "ending", "task")

    def __init__(self, task: asyncio.Task[str]) -> None:
        self.task = task
        self.asked = False
        """This process's proxy asked for it (:meth:`FleetView.asked`)."""
        self.ending = False
        """Cut (``remove_app``, ``end_wake``): a new wake of the app does not join it."""


class FleetView:
    """Every app's view, and the single-flight door to the controller's wake."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.apps: dict[str, AppView] = {}
        self._waker: Waker | None = None
        self._closer: Closer | None = None
        self._wakes: dict[str, _Wake] = {}
        """App -> its wake, until its task is done: one cut (``ending``) stays until then,
        unless a new wake of the app takes its place, so that the cut task, counting
        itself as it ends, still reads whether our proxy asked for it."""
        self._on_machines: Callable[[str], None] | None = None
        self._touched: set[str] = set()

    def app(self, name: str) -> AppView:
        view = self.apps.get(name)
        if view is None:
            view = self.apps[name] = AppView(name, self.clock)
            view.on_machines = self._on_machines
            view.touched = self._touched
        return view

    def take_touched(self) -> set[str]:
        """The apps on which a request began or waited since the previous call."""
        touched = set(self._touched)
        self._touched.clear()
        return touched

    def set_machines_listener(self, listener: Callable[[str], None] | None) -> None:
        """Be told (with the app's name) of every change of any app's machines."""
        self._on_machines = listener
        for view in self.apps.values():
            view.on_machines = listener

    def remove_app(self, name: str) -> None:
        self.apps.pop(name, None)
        wake = self._wakes.get(name)
        if wake is not None:
            wake.ending = True
            wake.task.cancel()

    async def end_wake(self, name: str) -> None:
        """Stop the wake under way for ``name`` (an app a reload took from the controller)
        and return once it has ended, so that it acts on no machine afterwards; the app's
        view stays (a static app of that name routes to its backends there)."""
        wake = self._wakes.get(name)
        if wake is not None:
            wake.ending = True
            await cancel_and_wait([wake.task])

    def set_waker(self, waker: Waker | None) -> None:
        """Install (or, with None, take away) the controller's wake. Installing one is a
        change every app's waiters see: a request held while no waker was installed (a
        leader's controller stopping before the follower's wake is set) found nothing to
        ask, and its gate waits on :meth:`AppView.changed` to ask this one."""
        self._waker = waker
        if waker is not None:
            for view in self.apps.values():
                view.notify()

    def set_closer(self, closer: Closer | None) -> None:
        self._closer = closer

    def end_long_lived(self, app: str, machine_id: str, *, everything: bool = False) -> int:
        """Before a machine is suspended or stopped: the proxy ends what it still carries
        to it that would never end by itself (WebSockets get 1001, event streams end at a
        chunk boundary); with ``everything`` (the drain's time is up), the other streamed
        answers too, cut (their clients must not take them for whole), and requests sent
        there with no answer yet get a 502 at once. What begins there later, its request
        sent before, is ended likewise as soon as its handshake or head comes
        (``Upstream.ending``, ``Upstream.cut_off``)."""
        return self._closer(app, machine_id, everything) if self._closer is not None else 0

    @property
    def can_wake(self) -> bool:
        return self._waker is not None

    def wake(self, app: str, *, asked: bool = True) -> asyncio.Task[str]:
        """Start (or join) the wake of ``app``; await the task through ``asyncio.shield``.
        ``asked=False`` (cluster mode: the leader serving another replica's request): a
        wake that this process's proxy did not ask for, as :meth:`asked` tells the waker
        (it is the other replica's to count), until the proxy joins it."""
        wake = self._wakes.get(app)
        if wake is None or wake.ending or wake.task.done():
            if self._waker is None:
                raise RuntimeError("no waker: static mode cannot wake machines")
            task = asyncio.get_running_loop().create_task(self._waker(app), name=f"wake:{app}")
            wake = self._wakes[app] = _Wake(task)
            task.add_done_callback(lambda t: self._wake_done(app, t))
        if asked:
            wake.asked = True
        return wake.task

    def asked(self, app: str) -> bool:
        """This process's proxy asked for the wake of ``app`` under way (:meth:`wake`)."""
        wake = self._wakes.get(app)
        return wake is not None and wake.asked

    def _wake_done(self, app: str, task: asyncio.Task[str]) -> None:
        wake = self._wakes.get(app)
        if wake is not None and wake.task is task:
            del self._wakes[app]
        if not task.cancelled():
            task.exception()  # retrieved here so a failed wake is never "never retrieved"
        view = self.apps.get(app)
        if view is not None:
            view.waking = None
            view.notify()

    async def close(self) -> None:
        await cancel_and_wait([wake.task for wake in self._wakes.values()])
        self._wakes.clear()
