"""Carrying out the policy's actions on machines, one task per machine at most.

Each action runs as its own task so that a slow suspend (15 s on a large machine) does not
hold up the app's loop or other machines. ``launch`` refuses a second action on a machine
that has one under way; the next tick sees the outcome and decides again.

The drain sequence, and why each step is where it is:

1. our metadata key, then cordon, in the API; out of the proxy's routing at once (the view),
   before the API calls, so no new request lands on a machine about to sleep;
2. end its WebSockets (close frame 1001) and streamed responses (at a chunk boundary) in
   the proxy, then wait until nothing is in flight there, or ``drain_timeout_s``; until here
   the drain can be taken back (a wake cancels it and uncordons: the machine is still warm);
3. suspend or stop, and wait for the state;
4. uncordon in the API and drop our key, so that a later start serves traffic at once.

A failure anywhere ends the task with the machine as it is; the next tick reads the truth,
and the policy finishes a drain left behind (a started machine cordoned with our key) or
lifts our cordon from a machine that is already asleep.

Every task holds a Fly machine lease on its machine for its whole run and sends the nonce
with each change (``leases.py``). A machine leased by someone else (a ``fly deploy``) is
skipped: the task ends at once, the machine counts as busy until the next tick has passed
(the policy picks another one meanwhile), the skip is counted in
``autoscaler_lease_conflicts_total`` and shown in ``/status``, and a later tick tries again.
A drain taken back hands its lease to the uncordon task that follows it; a cleanup taken
over by a start or resume (a wake must not wait for it) hands its lease to that task.

A task ends in one log line with ``app``, ``machine``, ``action``, ``result`` and
``duration_s`` (from when its lease was asked for): ``action_done`` (result ``ok``, or
``error`` for a sequence that ended short of its goal without raising),
``action_failed`` (an API error or an :class:`ActionError`, with ``error``),
``machine_leased_by_other`` (``skipped``) or ``action_cancelled`` (also while it waits
for its lease). A tick's start or resume that yields to another replica's wake claim never
began: the replica logs ``tick_wake_yielded`` for the app.

Cordons are always ours to find: our key is set before the cordon is asked for, and taken
off only once no cordon request of ours can still land. A drain cancelled while its cordon
request is in flight (taken back by a wake, or the process stopping) does not cancel that
request: it runs on in a task of its own (``cordoning``), and the uncordon that follows
waits for its answer first, so the cordon cannot land after the uncordon and outlive our
key. A cordon request whose fate is unknown (a transport error after it was sent, or cut
off at shutdown) keeps our key on the machine for ``CORDON_UNSURE_S``; after that
``cleanup`` drops the key once a fresh list shows the machine uncordoned.

A process knows only its own requests. One that died or stopped (in cluster mode, the
leader before us) may have left a cordon request on its way. No drain begins on a machine
while a cordon request of ours may still land there, so at most one is ever outstanding
per machine, and the next process finds that machine with our key and without a cordon
(the key was answered before the request was sent). So a key of ours on a machine that
the first list after this process began to decide (``deciding``, ``listed``) shows
uncordoned is kept for ``CORDON_UNSURE_S`` from then, whatever this process does with the
machine meanwhile (wakes it, lifts the cordon when it lands), and the machine is not
drained till then, or till the time the key's value names, if sooner (a drain sends its
key and cordon within ``MARK_BOUND_S`` of the key and writes that bound plus
``CORDON_UNSURE_S`` into it, ``mark_value``: a key left long enough ago fronts nothing and
goes at once; in cluster mode also once the leader that the key names as its writer
says, its lead over, that no cordon request of its own can land any more:
``_inherited_until``); a follower (cluster mode) never drops a key: the leader's requests
are not known there. Both only where the list says whether a machine is cordoned: an API
that leaves the flag out shows our cordons by our key alone, and a key kept there would
keep the machine out of our routing.

Every other cancellation point leaves either our key with or without a cordon, which the
next tick (of this process or the next) finishes or undoes, or nothing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import replace
from typing import Any

from autoscaler.aio import cancel_and_wait
from autoscaler.control.fencing import WAKE_FENCE
from autoscaler.control.leases import Held, Leases
from autoscaler.control.runtime import (
    AppRuntime,
    MachineRecord,
    Running,
    TaskKind,
    mark_value,
    ours,
)
from autoscaler.control.view import Clock, FleetView
from autoscaler.fly.client import MachinesAPI
from autoscaler.fly.errors import (
    BadRequest,
    Conflict,
    FlyError,
    LeaseHeld,
    NotFound,
    TransportError,
    Unauthorized,
    may_have_landed,
)
from autoscaler.fly.models import Machine
from autoscaler.logs import get_logger
from autoscaler.metrics import Metrics
from autoscaler.scaling.fleet import (
    CORDON_METADATA_KEY,
    FAILED,
    STARTED,
    STOPPED,
    SUSPENDED,
    SUSPENDING,
)
from autoscaler.scaling.policy import Action

Sleep = Callable[[float], Awaitable[None]]
Probe = Callable[[str, int], Awaitable[bool]]

STATE_WAIT_S = 120.0  # suspending a large machine can take well over 15 s
# A hung machine's stop signal: a hung app never handles the default one (SIGINT, or its
# stop_config's), so Fly would kill it only when the stop's timeout ran out (the machine's
# kill_timeout, up to minutes) while the app has no machine. Killed at once instead: Fly
# takes SIGKILL as a stop signal ("kill_signal ... also accepts ... SIGKILL",
# https://fly.io/blog/graceful-vm-exits-some-dials/), and an app that its requests and
# the probe after them both timed out on has nothing graceful left to finish.
HUNG_STOP_SIGNAL = "SIGKILL"
BOOT_WAIT_MIN_S = 60.0  # a cold boot may outlast the wake timeout; the machine still counts
PROBE_INTERVAL_S = 0.05
MACHINE_REFUSALS = (BadRequest, NotFound, Conflict)
"""An action's errors that are the API's answer about the machine (its config, its state,
a lease, a machine gone): no sign that the Machines API is out of reach
(``AppRuntime.api_error``)."""
LAST_BOOT_READ_S = 10.0
"""How long the read of a resumed machine's events (did it fall back to a cold boot?) may
take; it goes on after the machine routes (``Actuator._read_late``)."""
REREAD_AFTER_S = 1.0
"""A started machine whose port stays shut this long is read again, once: a deploy may
have moved it (a new ``internal_port``) since our last list."""
CORDON_UNSURE_S = 60.0  # a request that timed out (30 s) has surely landed or died by then
MARK_BOUND_S = 30.0
"""A drain's key and cordon requests are answered within this of the key's sending, or
cut (a cordon whose fate is then unknown): so our key's value can say until when its
drain's cordon request may land (``mark_value``), which the next process reads."""
_log = get_logger("autoscaler.control")


class ActionError(Exception):
    """An action that did not reach its goal for a reason other than an API error."""


class BootFailed(ActionError):
    """A start the API accepted ended with the machine ``failed``."""


class CordonUnanswered(ActionError):
    """A drain's key and cordon requests not answered within ``MARK_BOUND_S``: cut."""


class Actuator:
    """Runs actions against the API and mirrors their effect into the runtime and view."""

    def __init__(
        self,
        api: MachinesAPI,
        view: FleetView,
        metrics: Metrics,
        *,
        clock: Clock,
        sleep: Sleep,
        probe: Probe,
        backoff_max_s: float = 30.0,
        lease_skip_s: float = 1.0,
        leases: Leases | None = None,
        wall: Clock | None = None,
    ) -> None:
        self.api = api
        self.wall: Clock = wall if wall is not None else api.fly_time
        """Fly's time of day (Unix seconds; ``api.fly_time``, from its answers' ``Date``,
        unless given): what our key's value is written and read in, so the process that
        writes it and the one that reads it, maybe on other hosts, share one clock, and
        what the wake reads Fly's times of a machine's events against."""
        self.backoff_max_s = backoff_max_s
        self.lease_skip_s = lease_skip_s
        """How long a machine leased by another counts as busy: one tick."""
        self.leases = leases or Leases(api, sleep=sleep, clock=clock)
        self.held: dict[tuple[str, str], Held] = {}
        """(app, machine) -> our lease, while a task of ours works on the machine."""
        self.reading: set[asyncio.Task[str | None]] = set()
        """Reads of a machine's events that its start did not wait for (``_read_late``)."""
        self.cordoning: dict[tuple[str, str], asyncio.Task[None]] = {}
        """(app, machine) -> our key-then-cordon requests, while they are under way."""
        self.cordon_unsure: dict[tuple[str, str], float] = {}
        """(app, machine) -> until when a cordon request of ours may still land."""
        self.inherited: dict[tuple[str, str], float] = {}
        """(app, machine) -> until when a cordon request of the process that decided
        before this one may still land there (``listed``)."""
        self.inherited_by: dict[tuple[str, str], str] = {}
        """(app, machine) -> the writer that the key behind an ``inherited`` entry names
        (``MachineRecord.mark_by``), where it names one."""
        self.writer: Callable[[], str | None] = lambda: None
        """Cluster mode: who our key names as its writer (``mark_value``): this process
        and the fencing token of its lead; None (one process): nobody."""
        self.settled_by: Callable[[str], float | None] = lambda by: None
        """Cluster mode: until when (Fly's time, Unix seconds) a cordon request of the
        writer ``by`` (a key's ``mark_by``) may still land, as that process says once
        its lead is over (:meth:`settled_until`); None while that is not known (it still
        leads or steps down, it is gone, or its report is older than that lead)."""
        self.deciding_since = clock()
        self._listed_since: set[str] = set()
        """The apps listed since ``deciding_since``."""
        self.view = view
        self.metrics = metrics
        self.clock = clock
        self.sleep = sleep
        self.probe = probe
        self.wake_claim: Callable[[str], contextlib.AbstractAsyncContextManager[bool]] | None = None
        """Cluster mode: the app's wake claim, for a start or resume that wakes an app
        with nothing routable outside a wake (a leader's tick); yields False when another
        replica holds it (that replica is waking the app: the start is skipped)."""
        self.drains_all: Callable[[], bool] = lambda: True
        """Whether this process decides, so every drain there is runs here (one process;
        in cluster mode, while this replica leads): a cordon of ours with no task here is
        then a drain left behind, never one under way elsewhere (a leader's, seen by a
        follower); and the controller's machine list is current (else /status shows the
        leader's view)."""

    # --- bookkeeping ------------------------------------------------------------------

    def deciding(self) -> None:
        """This process begins to decide (start-up, or leadership won): the one that
        decided before may have left cordon requests on their way, sent before now."""
        self.deciding_since = self.clock()
        self._listed_since.clear()

    def listed(self, rt: AppRuntime) -> None:
        """``rt`` took a fresh list. The first one asked since ``deciding``: a key of ours
        on an uncordoned machine may front a cordon request of the process before us,
        which lands within ``CORDON_UNSURE_S`` of its sending, before ``deciding_since``.
        (A cordoned one has none outstanding: that process sent no second cordon while
        one could land.)"""
        now = self.clock()
        for key in [k for k, until in self.inherited.items() if now >= until]:
            del self.inherited[key]  # past: nothing of that process can land any more
            self.inherited_by.pop(key, None)
        asked = rt.listed_at
        if rt.name in self._listed_since or asked is None or asked < self.deciding_since:
            return
        self._listed_since.add(rt.name)
        until = self.deciding_since + CORDON_UNSURE_S
        for mid, machine in rt.machines.items():
            if ours(machine) and machine.cordoned is False and now < until:
                bound = until
                if machine.mark_until is not None:
                    # The key says when its drain's cordon request could land at the
                    # latest: one written long enough ago fronts none (a process that
                    # died between the uncordon and the key's removal), dropped at once.
                    bound = min(until, now + machine.mark_until - self.wall())
                if now < bound:
                    key = (rt.name, mid)
                    if key in self.inherited and self.inherited_by.get(key) != machine.mark_by:
                        self.inherited_by.pop(key, None)  # two writers: neither says for both
                    elif machine.mark_by is not None:
                        self.inherited_by[key] = machine.mark_by
                    self.inherited[key] = max(bound, self.inherited.get(key, bound))
                    self._inherited_until(key)  # its writer may have said already

    def _inherited_until(self, key: tuple[str, str]) -> float | None:
        """Until when a cordon request of the process before us may still land on the
        machine (``inherited``); None once none may.

        Sooner than the key's time when the key names its writer and that writer says
        until when a request of its own may still land (``settled_by``). That is safe:
        a cordon request of ours may be outstanding on a machine only from the drain that
        wrote its key (no drain begins while one may land: ``launch``), so only the key's
        writer can have one; and the writer says it only once its lead that wrote the key
        is over and its step-down done: every cordon request it sent by then was
        answered (it landed, or surely never will), or is counted in what it says
        (``settled_until``: cut off, or unanswered), and, no longer leading, it sends
        none (its calls are fenced). A writer that died says nothing, and its request
        in flight is waited for as before, till the key's time. This frees at once the
        machine of a leader that lost its lead between our key's answer and its cordon
        (the fence refused the cordon: it was never sent), which was held until the
        key's time, up to ``MARK_BOUND_S`` + ``CORDON_UNSURE_S``."""
        until = self.inherited.get(key)
        if until is None:
            return None
        by = self.inherited_by.get(key)
        settled = self.settled_by(by) if by is not None else None
        now = self.clock()
        if settled is not None:
            until = self.inherited[key] = min(until, now + settled - self.wall())
        if now >= until:
            del self.inherited[key]
            self.inherited_by.pop(key, None)
            return None
        return until

    def settled_until(self) -> float | None:
        """Until when (Fly's time, Unix seconds) a cordon request of this process may
        still land on any machine: 0.0 if none may; None while one is under way (not
        answered yet). A replica whose lead is over says it in its report, so that the
        next leader need not hold the machines our keys name it on (``settled_by``)."""
        if self.cordoning:
            return None
        now = self.clock()
        latest = max((u for u in self.cordon_unsure.values() if u > now), default=None)
        return 0.0 if latest is None else self.wall() + (latest - now)

    def publish(self, rt: AppRuntime) -> None:
        if not rt.retired:
            self.view.app(rt.name).set_machines(rt.infos())

    def count(self, rt: AppRuntime, action: str, ok: bool) -> None:
        result = "ok" if ok else "error"
        self.metrics.scaling_actions.labels(app=rt.name, action=action, result=result).inc()

    @contextlib.contextmanager
    def counting_failure(self, rt: AppRuntime, action: str) -> Iterator[None]:
        """Count ``action`` as failed when the block raises FlyError or ActionError."""
        try:
            yield
        except (FlyError, ActionError):
            self.count(rt, action, False)
            raise

    def launch(self, rt: AppRuntime, action: Action) -> Running | None:
        """Start ``action`` as the machine's task; None if the machine is busy or unknown,
        or its app is no longer ours (a reload took it away)."""
        mid = action.machine_id
        if rt.retired or mid not in rt.machines:
            return None
        current = rt.running.get(mid)
        if current is not None:
            if action.kind == "uncordon" and current.kind == "drain" and current.waiting:
                self.take_back(rt, mid)
                return rt.running.get(mid)
            if (
                action.kind == "resume"
                and current.kind == "drain"
                and rt.machines[mid].state == SUSPENDING
            ):
                return self.interrupt(rt, mid)
            if current.kind == "cleanup" and action.kind in ("resume", "start"):
                return self.take_over(rt, mid, action.kind)
            return None
        kind: TaskKind = action.kind
        if kind == "resume" or kind == "start":
            coro = self.bring_up(rt, mid, kind)
        elif kind == "drain":
            if self._cordon_may_land(rt, mid):
                # One outstanding cordon request per machine at most: a process that comes
                # after us finds it behind our key on an uncordoned machine (``listed``).
                _log.debug("drain_deferred", app=rt.name, machine=mid, reason="cordon may land")
                return None
            # Out of the proxy's routing at once, before the lease and the API calls.
            rt.cordon_held.add(mid)
            self.publish(rt)
            coro = self.drain(rt, mid)
        elif kind == "stop":
            coro = self.stop_suspended(rt, mid)
        elif kind == "restart":
            coro = self.restart_hung(rt, mid)
        elif (
            kind == "uncordon"
            and rt.machines[mid].state == STARTED
            and ours(rt.machines[mid])
            and self.drains_all()
        ):
            # A cordon of ours left on a started machine (a drain cut short by a crash, or
            # by an outage between its cordon and its suspend): the machine serves, so it
            # routes at once, as a drain taken back does, and the API's cordon is lifted
            # after (an outage must not keep a warm machine out of our routing). Not on a
            # follower: the leader's drain may be under way (its lease then refuses us).
            rt.record(mid, self.clock(), cordoned=False)
            self.publish(rt)
            coro = self.release(rt, mid, force=True)
        else:
            coro = self.release(rt, mid)
        return self._spawn(rt, mid, kind, coro)

    def _spawn(
        self, rt: AppRuntime, mid: str, kind: TaskKind, coro: Coroutine[Any, Any, bool]
    ) -> Running:
        task = asyncio.get_running_loop().create_task(
            self._guard(rt, mid, kind, coro), name=f"{kind}:{rt.name}:{mid}"
        )
        run = Running(kind, task, waiting=kind == "drain")
        rt.running[mid] = run

        def done(t: asyncio.Task[bool]) -> None:
            # The action's call, if it never ran: no lease, another replica's claim, or
            # the task cancelled before its first step (a no-op once it ran).
            coro.close()
            if rt.running.get(mid) is run:
                del rt.running[mid]
            rt.changed_at = self.clock()  # the next tick reads what the action left

        task.add_done_callback(done)
        return run

    async def _guard(
        self, rt: AppRuntime, mid: str, kind: TaskKind, coro: Coroutine[Any, Any, bool]
    ) -> bool:
        """Run ``coro`` inside our lease on the machine (and, for a tick's wake in cluster
        mode, the app's wake claim). Turn a failure into a log line, a backoff and False,
        and a lease or claim held by another into a skip; the next tick reads the truth and
        decides again (about another machine while this one cools)."""
        if (
            self.wake_claim is not None
            and (kind == "start" or kind == "resume")
            and WAKE_FENCE.get() is None
            and not self.view.app(rt.name).routable()
        ):
            async with self.wake_claim(rt.name) as ours:
                if not ours:
                    self._not_begun(rt, mid)  # (the replica logs tick_wake_yielded)
                    return False
                return await self._leased(rt, mid, kind, coro)
        return await self._leased(rt, mid, kind, coro)

    async def _leased(
        self, rt: AppRuntime, mid: str, kind: TaskKind, coro: Coroutine[Any, Any, bool]
    ) -> bool:
        key = (rt.name, mid)
        began = self.clock()
        if key not in self.held:  # else handed over by a drain taken back
            try:
                self.held[key] = await self.leases.take(rt.name, mid, kind)
            except LeaseHeld as exc:
                self._not_begun(rt, mid)
                if kind == "uncordon":
                    self._uncordon_refused(rt, mid)
                self._skip_leased(rt, mid, kind, exc, began)
                return False
            except FlyError as exc:
                self._not_begun(rt, mid)
                self._failed(rt, mid, kind, exc, began)
                return False
            except asyncio.CancelledError:
                self._not_begun(rt, mid)
                self._cancelled(rt, mid, kind, began)
                raise
        rt.leased_by_others.pop(mid, None)
        try:
            done = await coro
        except asyncio.CancelledError:
            self._let_go(rt, mid)
            self._cancelled(rt, mid, kind, began)
            raise
        except LeaseHeld as exc:
            # Our lease lapsed and another holder took the machine mid-sequence.
            self._let_go(rt, mid)
            self._skip_leased(rt, mid, kind, exc, began)
            return False
        except (FlyError, ActionError) as exc:
            self._let_go(rt, mid)
            self._failed(rt, mid, kind, exc, began)
            return False
        self._let_go(rt, mid)
        rt.cooldown.pop(mid, None)
        self._ended(logging.INFO, "action_done", rt, mid, kind, "ok" if done else "error", began)
        return done

    def _cancelled(self, rt: AppRuntime, mid: str, kind: TaskKind, began: float) -> None:
        self._ended(logging.INFO, "action_cancelled", rt, mid, kind, "cancelled", began)

    def _ended(
        self,
        level: int,
        event: str,
        rt: AppRuntime,
        mid: str,
        kind: TaskKind,
        result: str,
        began: float,
        **extra: str,
    ) -> None:
        """The one line an action ends in (module docstring)."""
        took = round(self.clock() - began, 3)
        fields = {"app": rt.name, "machine": mid, "action": kind, "result": result}
        _log.log(level, event, **fields, duration_s=took, **extra)

    def _not_begun(self, rt: AppRuntime, mid: str) -> None:
        """The action never began (no lease): undo what ``launch`` did ahead of it (its
        call is closed when its task ends: ``_spawn``)."""
        run = rt.running.get(mid)
        if run is not None and run.kind == "drain" and run.task is asyncio.current_task():
            rt.cordon_held.discard(mid)
            self.publish(rt)

    def _uncordon_refused(self, rt: AppRuntime, mid: str) -> None:
        """Another holder's lease refused our uncordon (at its take, or at its call): the
        API still has the machine cordoned, so our record says so again, and it leaves
        our routing. ``launch`` and ``take_back`` route it ahead of the call (an outage
        must not keep a warm machine out), but a holder that is not us (a deploy, a
        leader gone whose lease is not ours to adopt) has the machine, and the record
        left uncordoned routed it and counted it as serving until the next list. The
        next tick decides on it again (its skip makes it busy for one tick)."""
        rt.record(mid, self.clock(), cordoned=True)
        self.publish(rt)

    def _failed(
        self, rt: AppRuntime, mid: str, kind: TaskKind, exc: Exception, began: float
    ) -> None:
        rt.last_error = f"{kind} {mid}: {exc}"
        if isinstance(exc, FlyError) and not isinstance(exc, MACHINE_REFUSALS):
            # The API's own trouble (5xx, 429, a transport error, a token refused), which
            # control health counts: not a boot that failed, nor a refusal about the
            # machine (the API answered, a start refused in a 200 too).
            rt.api_error = rt.last_error
            rt.api_refused = isinstance(exc, Unauthorized)
        run = rt.running.get(mid)
        if run is not None and run.task is asyncio.current_task():
            run.error = exc
        rt.failed(mid, self.clock(), self.backoff_max_s)
        self._ended(logging.WARNING, "action_failed", rt, mid, kind, "error", began, error=str(exc))

    def _skip_leased(
        self, rt: AppRuntime, mid: str, kind: TaskKind, exc: LeaseHeld, began: float
    ) -> None:
        """Another holder has the machine: no backoff, no error; busy for one tick."""
        now = self.clock()
        rt.leased_by_others[mid] = (now, now + self.lease_skip_s)
        self.metrics.lease_conflicts.labels(app=rt.name).inc()
        self._ended(
            logging.INFO, "machine_leased_by_other", rt, mid, kind, "skipped", began, error=str(exc)
        )

    def nonce(self, rt: AppRuntime, mid: str) -> str | None:
        """The nonce our changes of the machine carry (None: no lease of ours on it)."""
        held = self.held.get((rt.name, mid))
        return held.nonce if held is not None else None

    def _let_go(self, rt: AppRuntime, mid: str) -> None:
        """The ending task's lease: to the task that took over the machine, if any (a
        drain taken back), else released (in the background: see ``leases.py``)."""
        run = rt.running.get(mid)
        if run is not None and run.task is not asyncio.current_task():
            return
        held = self.held.pop((rt.name, mid), None)
        if held is not None:
            self.leases.release_soon(held)

    def take_back(self, rt: AppRuntime, mid: str) -> Running | None:
        """Cancel a drain that still waits for requests and return the machine to routing.

        The machine is routable in the view at once (it is started and warm); the API's
        cordon and our key are lifted by the uncordon task that follows.
        """
        current = rt.running.get(mid)
        if current is None or current.kind != "drain" or not current.waiting:
            return None
        current.task.cancel()
        del rt.running[mid]
        rt.cordon_held.discard(mid)
        rt.record(mid, self.clock(), cordoned=False)
        self.publish(rt)
        _log.info("drain_taken_back", app=rt.name, machine=mid)
        return self._spawn(rt, mid, "uncordon", self.release(rt, mid, force=True))

    async def settled(self) -> None:
        """Wait for what outlives an action task: cordon requests of drains taken back,
        reads of machines' events, and lease releases."""
        while self.cordoning or self.reading:
            await asyncio.wait({*self.cordoning.values(), *self.reading})
        await self.leases.settled()

    async def aclose(self, timeout_s: float | None = None, *, cut: bool = True) -> None:
        """On shutdown, after the action tasks were cancelled: cut the cordon requests
        still under way (our key is on those machines already: the next process finds
        them) and wait for the lease releases, within ``timeout_s``. ``cut=False``
        (leadership lost, a step-down): the cordon requests under way and the machine
        leases being taken are let answer within ``timeout_s`` too (those leases are
        given back then: ``Leases.aclose``). A cordon request cut off may land at any time
        in the next ``CORDON_UNSURE_S``, so the next leader, which cannot know of it,
        kept every machine that it found with our key and no cordon out of its drains
        for that long; answered, it leaves the machine cordoned with our key (or not
        cordoned at all), which the next leader finishes or undoes at once. Reads of
        machines' events that their starts did not wait for (``_read_late``) are cut too,
        or let answer likewise."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        if not cut and (self.cordoning or self.reading):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    while self.cordoning or self.reading:
                        await asyncio.wait({*self.cordoning.values(), *self.reading})
        # Each one's entry goes with it.
        await cancel_and_wait([*self.cordoning.values(), *self.reading])
        left = None if deadline is None else max(0.0, deadline - loop.time())
        await self.leases.aclose(left, cut=cut)

    def interrupt(self, rt: AppRuntime, mid: str) -> Running:
        """Take back a drain in its suspend step: cancel it and start the machine, which
        Fly allows while it is suspending (faster than waking any other machine)."""
        current = rt.running.pop(mid)
        current.task.cancel()
        rt.cordon_held.discard(mid)
        _log.info("suspend_taken_back", app=rt.name, machine=mid)
        return self._spawn(rt, mid, "resume", self.bring_up(rt, mid, "resume"))

    def take_over(self, rt: AppRuntime, mid: str, kind: TaskKind) -> Running:
        """Wake a machine whose stale key of ours a cleanup is dropping: the cleanup is
        cancelled and the start or resume goes ahead under its lease (a request must not
        wait for it). The start finishes the cleanup's work: a machine that carries our
        key is uncordoned, and the key dropped, once it is up (``bring_up``)."""
        current = rt.running.pop(mid)
        current.task.cancel()
        _log.info("cleanup_taken_over", app=rt.name, machine=mid, action=kind)
        return self._spawn(rt, mid, kind, self.bring_up(rt, mid, kind))

    # --- the actions --------------------------------------------------------------------

    async def bring_up(self, rt: AppRuntime, mid: str, kind: TaskKind) -> bool:
        """Start (or resume) a machine; True once the API says started (or cannot say, and
        the machine answers: ``_wait_started``) and its port answers.

        A cordon of ours on it (a drain taken back, or left behind) is lifted in our view
        at once and in the API once the machine is up, so the wake waits for no more than
        the boot; a boot that fails (or is refused, or cut short) leaves it on the machine,
        and our record says so again. A failed machine's start counts against its restart
        budget.
        """
        app = rt.name
        machine = rt.machines[mid]
        deadline = self.clock() + max(rt.config.wake_timeout_s, BOOT_WAIT_MIN_S)
        restart = machine.state == FAILED
        cordon_ours = ours(machine)
        # (A flag the API left out reads from our key, which the machine carries.)
        was_cordoned = machine.cordoned is not False
        ahead_at = self.clock()
        if cordon_ours:
            rt.record(mid, ahead_at, cordoned=False)
        try:
            up = await self._boot(rt, mid, kind, deadline)
        except BaseException as exc:
            # The machine's doing: its boot failed, or it cannot be started from where it
            # is. Someone else's lease is not (skipped), nor a refused or lost call (429,
            # 5xx, a timeout, fencing): the API's, retried after the action's cooldown, and
            # costs none of the budget.
            mine = isinstance(exc, (BootFailed, Conflict)) and not isinstance(exc, LeaseHeld)
            if mine and rt.machines.get(mid) is not None and rt.machines[mid].state == FAILED:
                self._restart_failed(rt, mid, restart)
            if cordon_ours:
                # Not up, so our cordon was not lifted: the record left uncordoned said
                # otherwise until the next list (a lapsed lease refusing the start, a
                # 5xx, a failed boot, a stop cutting it short).
                self._put_back_cordon(rt, mid, was_cordoned, ahead_at)
            raise
        if restart:
            self.metrics.machine_restarts.labels(app=app, result="ok").inc()
        rt.restarts.pop(mid, None)
        if cordon_ours:
            # A cordon we left behind would keep the woken machine out of Fly's routing.
            await self.release(rt, mid, force=True)
        return up

    def _put_back_cordon(
        self, rt: AppRuntime, mid: str, was_cordoned: bool, ahead_at: float
    ) -> None:
        """A start that failed puts back the cordon it recorded lifted at ``ahead_at``:
        as it was then, unless a list asked for since (merged while the start ran, which
        kept our record: ``AppRuntime.listed_busy``) says how the API has it; the start
        changed no cordon there, so that list is newer than what we knew, and a cordon
        lifted by someone else meanwhile (our key with it) is not put back until the
        next list."""
        seen = rt.listed_busy.get(mid)
        if seen is not None and seen[0] >= ahead_at and seen[1].cordoned is not None:
            listed = seen[1]
            rt.record(mid, self.clock(), cordoned=listed.cordoned, marked=listed.marked)
            record = rt.machines.get(mid)
            if record is not None:
                rt.machines[mid] = replace(
                    record, mark_until=listed.mark_until, mark_by=listed.mark_by
                )
        else:
            rt.record(mid, self.clock(), cordoned=was_cordoned)
        self.publish(rt)

    def _restart_failed(self, rt: AppRuntime, mid: str, restart: bool) -> None:
        rec = rt.boot_failed(mid, self.clock())
        if restart:
            self.metrics.machine_restarts.labels(app=rt.name, result="failed").inc()
        if rec.exhausted:
            self._budget_spent(
                rt, mid, rec.failures, "left alone until its state changes; see fly machine status"
            )

    def _budget_spent(self, rt: AppRuntime, mid: str, failures: int, hint: str) -> None:
        self.metrics.machine_restarts.labels(app=rt.name, result="exhausted").inc()
        _log.warning("restart_budget_spent", app=rt.name, machine=mid, failures=failures, hint=hint)

    async def _boot(self, rt: AppRuntime, mid: str, kind: TaskKind, deadline: float) -> bool:
        app = rt.name
        with self.counting_failure(rt, kind):
            try:
                await self.api.start_machine(app, mid, lease_nonce=self.nonce(rt, mid))
            except LeaseHeld:
                raise
            except Conflict:
                # 412: not startable from where it is; fine if it is starting or started.
                got = await self.api.get_machine(app, mid)
                if got.state not in (STARTED, "starting"):
                    raise
            except FlyError as exc:
                if not may_have_landed(exc):
                    raise
                # Sent, but its answer lost: the machine may be starting from it, and
                # another machine woken meanwhile is one too many. Its state says; a read
                # that fails too leaves the start failed, and the wake's next list of the
                # app finds it coming up (wake.py).
                try:
                    got = await self.api.get_machine(app, mid)
                except FlyError:
                    raise exc from None
                if got.state not in (STARTED, "starting"):
                    raise
        rt.record(mid, self.clock(), state="starting", how=kind)
        self.publish(rt)
        with self.counting_failure(rt, kind):
            if await self._wait_started(rt, mid, deadline) == FAILED:
                rt.record(mid, self.clock(), state=FAILED)
                raise BootFailed(f"machine {mid} failed to boot")
        # Fly bills it from here, by the second it is started, whatever its app does; our
        # record says starting (not routed) until its port answers, which can be seconds
        # later (an app's own start-up: docs/emulator.md, timing.listen_s).
        if (machine := rt.machines.get(mid)) is not None:
            rt.billing.reached(mid, machine.state, STARTED, self.clock())
        told: asyncio.Task[str | None] | None = None
        if kind == "resume":
            # Resumed, or fell back to a cold boot (an unusable snapshot)? The machine's
            # events say, read while its port is probed.
            told = asyncio.get_running_loop().create_task(
                self._last_boot(app, mid), name=f"last-boot:{app}:{mid}"
            )
        try:
            await self._reach(rt, mid, kind, deadline)
            how: str = kind
            if told is not None and told.done():
                # Routing never waits for the label: a cold boot's port answers long after
                # the read does, while a resumed machine's port, answering at once, may beat
                # it (then it is named a resume, which it nearly always is, until the read
                # answers: ``_read_late``).
                how = told.result() or kind
        finally:
            if told is not None and not told.done():
                self._read_late(rt, mid, kind, told)
        self.count(rt, kind, True)
        view = self.view.app(app)
        if how != kind and view.waking == kind:
            view.waking = how  # the wake under way is named by what happened
        rt.record(mid, self.clock(), state=STARTED, how=how)
        self.publish(rt)
        _log.info("machine_up", app=app, machine=mid, how=how)
        return True

    async def _wait_started(self, rt: AppRuntime, mid: str, deadline: float) -> str:
        """STARTED or FAILED ("failed" too, so a machine that cannot boot costs its boot,
        not the whole wait), as Fly's /wait says; STARTED also when the machine's port
        answers while the wait cannot be had. Its start was accepted: a wait the API
        fails (an outage begun mid-boot, a 429) does not end it. The port is probed for
        ``REREAD_AFTER_S`` and the wait asked again, until ``deadline``. Before, the wait's
        error failed the boot, and with the API down no list showed the machine up: the
        app answered 504 while its machine served."""
        app = rt.name
        host, port = rt.address(rt.machines[mid])
        while True:
            try:
                reached = await self.api.wait_for_machine_state(
                    app, mid, [STARTED, FAILED], timeout_s=max(1.0, deadline - self.clock())
                )
            except FlyError as exc:
                if not exc.transient or self.clock() >= deadline:
                    raise
            else:
                return reached.state or STARTED
            ask_again = min(deadline, self.clock() + REREAD_AFTER_S)
            while self.clock() < ask_again:
                if host and await self.probe(host, port):
                    return STARTED  # its app answers: it runs, whatever the API can say
                await self.sleep(PROBE_INTERVAL_S)

    async def _last_boot(self, app: str, mid: str) -> str | None:
        """How the start of ``mid`` just done brought it up, as its events say
        (:meth:`Machine.last_boot`); None when they do not say, or the read failed or
        took over ``LAST_BOOT_READ_S``."""
        try:
            async with asyncio.timeout(LAST_BOOT_READ_S):
                return (await self.api.get_machine(app, mid)).last_boot()
        except (FlyError, TimeoutError):
            return None

    def _read_late(
        self, rt: AppRuntime, mid: str, kind: TaskKind, told: asyncio.Task[str | None]
    ) -> None:
        """Let the read of a machine's events that its start did not wait for finish on
        its own (within ``LAST_BOOT_READ_S``): cancelled mid-answer, the client's
        connection would be closed, not pooled (httpx), and the next call would pay a
        new one. Its answer then names the start in our record, if the machine is still
        up from it as we recorded it (``bring_up``'s ``how``, not yet corrected)."""
        self.reading.add(told)

        def done(task: asyncio.Task[str | None]) -> None:
            self.reading.discard(task)
            if task.cancelled():
                return  # the process stops (``aclose``)
            how = task.result()
            record = rt.machines.get(mid)
            if how is None or record is None or record.state != STARTED or record.how != kind:
                return
            if how != kind:
                rt.machines[mid] = replace(record, how=how)
                self.publish(rt)

        told.add_done_callback(done)

    async def _reach(self, rt: AppRuntime, mid: str, kind: TaskKind, deadline: float) -> None:
        """Wait for the port of ``mid``, started, to answer."""
        app = rt.name
        machine = rt.machines[mid]
        with self.counting_failure(rt, kind):
            host, port = rt.address(machine)
            if not host:  # no address until it was placed: ask for it now
                fresh = replace(
                    MachineRecord.of(await self.api.get_machine(app, mid)),
                    state=rt.machines[mid].state,
                    how=rt.machines[mid].how,
                )
                rt.machines[mid] = fresh
                host, port = rt.address(fresh)
            if not host:
                raise ActionError(f"machine {mid} has no private_ip to reach it on")
            shut_since, reread = self.clock(), False
            read: asyncio.Task[Machine] | None = None
            try:
                while not await self.probe(host, port):
                    now = self.clock()
                    if now >= deadline:
                        raise ActionError(f"port {port} of machine {mid} did not open in time")
                    if read is not None and read.done():
                        error = read.exception()
                        if error is None:
                            reread = True
                            host, port = self._readdress(rt, mid, read.result())
                        elif isinstance(error, FlyError):
                            shut_since = now  # the API's failure: read again in a second
                        else:
                            raise error
                        read = None
                    if not reread and read is None and now - shut_since >= REREAD_AFTER_S:
                        # Our record may be older than a deploy that moved the machine's
                        # port (or address) while it slept: read it once, not probe the
                        # old one. Beside the probe: the port may open meanwhile, and an
                        # API that fails or hangs (an outage begun mid-wake) must not end
                        # or hold up a boot that needs nothing more from it.
                        read = asyncio.get_running_loop().create_task(
                            self.api.get_machine(app, mid), name=f"reread:{app}:{mid}"
                        )
                    await self.sleep(PROBE_INTERVAL_S)
            finally:
                if read is not None:  # the port opened first: its answer no longer matters
                    await cancel_and_wait([read])

    def _readdress(self, rt: AppRuntime, mid: str, machine: Machine) -> tuple[str, int]:
        """Take the address, port, version and what its config says of a suspend of
        ``machine`` as the API gives them now (the rest of our record stands: a cordon of
        ours lifted ahead of the API stays lifted); the view routes there from the next
        publish."""
        current = rt.machines[mid]
        before = rt.address(current)
        got = MachineRecord.of(machine)
        record = rt.machines[mid] = replace(
            current,
            private_ip=got.private_ip or current.private_ip,
            internal_port=got.internal_port,
            instance_id=got.instance_id or current.instance_id,
            unsuspendable=got.unsuspendable,
        )
        after = rt.address(record)
        if after != before:
            _log.info("machine_readdressed", app=rt.name, machine=mid, was=before, now=after)
        return after

    async def drain(self, rt: AppRuntime, mid: str) -> bool:
        app = rt.name
        rt.cordon_held.add(mid)  # launch did it already; a drain called directly needs it
        self.publish(rt)
        try:
            with self.counting_failure(rt, "cordon"):
                key = (app, mid)
                task = asyncio.get_running_loop().create_task(
                    self._mark_and_cordon(rt, mid), name=f"cordon:{app}:{mid}"
                )
                self.cordoning[key] = task
                task.add_done_callback(lambda t: self._cordon_done(key, t))
                # Shielded: cancelling the drain must not cut the cordon request off in
                # flight (it could land after the take-back's uncordon, without our key).
                await asyncio.shield(task)
            self.count(rt, "cordon", True)
            rt.record(mid, self.clock(), cordoned=True)
            # WebSockets and event streams would never end by themselves, and a suspend
            # would freeze them: they are told to go now (1001 / end of stream), clients
            # reconnect to machines that stay. Other answers, streamed downloads too, get
            # the drain's time to end; what is left then is cut before the suspend.
            self.view.end_long_lived(app, mid)
            idle = await self._wait_idle(rt, mid, rt.config.drain_timeout_s)
            if not idle:
                self.view.end_long_lived(app, mid, everything=True)
            run = rt.running.get(mid)
            if run is not None and run.kind == "drain":
                run.waiting = False  # from here on the drain cannot be taken back
            # A sick machine (Fly's checks critical) is stopped: a snapshot would bring its
            # trouble back with the next resume, a cold start may not.
            how = "stop" if mid in rt.sick_since else rt.config.scale_down_action
            _log.info("drain_done", app=app, machine=mid, idle=idle, then=how)
            await self._sleep_machine(rt, mid, how)
            await self.release(rt, mid)
        finally:
            rt.cordon_held.discard(mid)
            self.publish(rt)
        return True

    async def _mark_and_cordon(self, rt: AppRuntime, mid: str) -> None:
        """Our key first, then the cordon: a cordon of ours never exists without the key.
        Both within ``MARK_BOUND_S`` of the key's sending, or cut, so the key's value can
        say until when the cordon may land: ``CORDON_UNSURE_S`` after that bound."""
        nonce = self.nonce(rt, mid)
        value = mark_value(self.wall() + MARK_BOUND_S + CORDON_UNSURE_S, self.writer())
        try:
            async with asyncio.timeout(MARK_BOUND_S):
                await self.api.set_machine_metadata(
                    rt.name, mid, CORDON_METADATA_KEY, value, lease_nonce=nonce
                )
                rt.record(mid, self.clock(), marked=True)
                if mid not in rt.cordon_held:
                    return  # the drain was taken back (or cut short) meanwhile: no cordon now
                await self.api.cordon_machine(rt.name, mid, lease_nonce=nonce)
        except TimeoutError:
            raise CordonUnanswered(
                f"our key and cordon of machine {mid} not answered within {MARK_BOUND_S:g}s"
            ) from None

    def _cordon_done(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        if self.cordoning.get(key) is task:
            del self.cordoning[key]
        # A request that may have reached Fly without our hearing back may yet land.
        unsure = task.cancelled()
        if not unsure:
            exc = task.exception()  # retrieved here: the drain may be gone already
            unsure = (isinstance(exc, TransportError) and exc.sent) or isinstance(
                exc, CordonUnanswered
            )
        if unsure:
            self.cordon_unsure[key] = self.clock() + CORDON_UNSURE_S
        else:
            self.cordon_unsure.pop(key, None)

    def _cordon_may_land(self, rt: AppRuntime, mid: str) -> bool:
        key = (rt.name, mid)
        if key in self.cordoning:
            return True
        if rt.cordon_listed and (not self.drains_all() or self._inherited_until(key) is not None):
            return True  # another process's request, which we know nothing of, may land
        until = self.cordon_unsure.get(key)
        if until is not None and self.clock() >= until:
            del self.cordon_unsure[key]
            return False
        return until is not None

    def cordon_may_land_until(self, app: str, mid: str) -> float | None:
        """Until when a cordon request we know of (ours, or the process's before us) may
        still land on the machine; None if none may (or, on a follower, if that is
        unknown: the leader's requests are not known there)."""
        if not self.drains_all():
            return None
        key = (app, mid)
        until = max(self.cordon_unsure.get(key, 0.0), self._inherited_until(key) or 0.0)
        return until if until > self.clock() else None

    async def _wait_idle(self, rt: AppRuntime, mid: str, timeout_s: float) -> bool:
        """Until the machine has no request in flight (True) or the timeout passed (False)."""
        view = self.view.app(rt.name)
        deadline = self.clock() + timeout_s
        while True:
            up = view.upstreams.get(mid)
            if up is None or up.in_flight + up.remote_in_flight <= 0:
                return True
            remaining = deadline - self.clock()
            if remaining <= 0:
                return False
            changed = asyncio.ensure_future(view.changed())
            timer = asyncio.ensure_future(self.sleep(remaining))
            try:
                await asyncio.wait({changed, timer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
                timer.cancel()

    async def _sleep_machine(
        self, rt: AppRuntime, mid: str, how: str, *, stop_signal: str | None = None
    ) -> None:
        """Suspend (falling back to stop where suspend is refused) or stop, and wait.
        ``stop_signal``: the stop's signal (None: the machine's stop_config's)."""
        app = rt.name
        machine = rt.machines[mid]
        version = machine.instance_id
        if how == "suspend":
            # Fly will not suspend this machine: its config says so (swap, a schedule, a
            # GPU), or it refused this version before for a reason the config does not
            # show (runtime.py, suspend_refused). Stopped without asking.
            why = machine.unsuspendable
            if why is None and version is not None and rt.suspend_refused.get(mid) == version:
                why = "refused before for this version"
            if why is not None:
                _log.info("suspend_skipped", app=app, machine=mid, version=version, reason=why)
                how = "stop"
        call = True
        if how == "suspend":
            try:
                await self.api.suspend_machine(app, mid, lease_nonce=self.nonce(rt, mid))
            except LeaseHeld:
                self.count(rt, "suspend", False)
                raise
            except (BadRequest, Conflict) as exc:
                # A refusal the config did not predict. A 400 or 422 is the machine's
                # config, which retrying will not change: remembered for this version. A
                # 412 is a state: maybe a suspend or stop already under way (another
                # party's), waited for as it is, since a stop of a suspending machine
                # would throw its snapshot away; that wait's outcome is the one count of
                # the action (our refused call is no failure of it).
                going = None if isinstance(exc, BadRequest) else await self._going_down(app, mid)
                if going is not None:
                    _log.info("suspend_under_way", app=app, machine=mid, going=going)
                    how, call = going, False
                else:
                    self.count(rt, "suspend", False)
                    _log.warning("suspend_refused", app=app, machine=mid, error=str(exc))
                    if isinstance(exc, BadRequest) and version is not None:
                        rt.suspend_refused[mid] = version
                    how = "stop"
            except FlyError:
                self.count(rt, "suspend", False)
                raise
        if how == "stop" and call:
            with self.counting_failure(rt, "stop"):
                await self.api.stop_machine(
                    app, mid, signal=stop_signal, lease_nonce=self.nonce(rt, mid)
                )
        target = SUSPENDED if how == "suspend" else STOPPED
        rt.record(mid, self.clock(), state="suspending" if how == "suspend" else "stopping")
        self.publish(rt)
        with self.counting_failure(rt, how):
            await self.api.wait_for_machine_state(
                app, mid, target, timeout_s=STATE_WAIT_S, instance_id=version
            )
        self.count(rt, how, True)
        rt.record(mid, self.clock(), state=target)
        self.publish(rt)

    async def _going_down(self, app: str, mid: str) -> str | None:
        """ "suspend" or "stop" when the machine reads as already going that way (or gone),
        None when it does not or cannot be read (the caller stops it then)."""
        try:
            state = (await self.api.get_machine(app, mid)).state
        except FlyError:
            return None
        if state in ("suspending", SUSPENDED):
            return "suspend"
        if state in ("stopping", STOPPED):
            return "stop"
        return None

    async def stop_suspended(self, rt: AppRuntime, mid: str) -> bool:
        """A machine suspended past stop_suspended_after_s: stop it (its snapshot goes)."""
        await self._sleep_machine(rt, mid, "stop")
        return True

    async def restart_hung(self, rt: AppRuntime, mid: str) -> bool:
        """A started machine that hangs (``MachineSnapshot.hung``): stop it and start it
        again, a new process. Stopped, not suspended: a snapshot would keep the hang; by
        SIGKILL (HUNG_STOP_SIGNAL): a hung app would ignore the stop's own signal until
        the stop's timeout, the machine serving nothing meanwhile.
        The restart counts against the budget once the API took the stop: a refused one
        (429, 5xx) is the API's doing, tried again after the action's cooldown."""
        _log.warning(
            "machine_hung",
            app=rt.name,
            machine=mid,
            hint="the proxy's requests to it timed out or were reset; restarting it",
        )
        await self._sleep_machine(rt, mid, "stop", stop_signal=HUNG_STOP_SIGNAL)
        count = rt.restarting_hung(mid, self.clock())
        _log.info(
            "hung_machine_stopped",
            app=rt.name,
            machine=mid,
            restart=count,
            of=rt.config.max_restart_attempts,
        )
        try:
            up = await self.bring_up(rt, mid, "start")
        except Exception:
            self.metrics.machine_restarts.labels(app=rt.name, result="failed").inc()
            raise
        self.metrics.machine_restarts.labels(app=rt.name, result="ok").inc()
        if count >= rt.config.max_restart_attempts:
            hint = "hung again after each restart: left alone for a while if it hangs again"
            self._budget_spent(rt, mid, count, hint)
        return up

    async def release(self, rt: AppRuntime, mid: str, *, force: bool = False) -> bool:
        """Lift our cordon in the API and drop our key (undo a drain, or finish one).

        ``force``: do both whatever our record says (a cancelled drain may have cordoned
        without our hearing of it).
        """
        app = rt.name
        pending = self.cordoning.get((app, mid))
        if pending is not None:
            # A drain taken back while its cordon was on the way: that answer first, so the
            # cordon cannot land after this uncordon.
            await asyncio.wait({pending})
        machine = rt.machines.get(mid)
        nonce = self.nonce(rt, mid)
        with self.counting_failure(rt, "uncordon"):
            if force or machine is None or machine.cordoned is not False:
                try:
                    await self.api.uncordon_machine(app, mid, lease_nonce=nonce)
                except LeaseHeld:
                    self._uncordon_refused(rt, mid)
                    raise
            rt.record(mid, self.clock(), cordoned=False)
            if self._cordon_may_land(rt, mid):
                # Our key stays until that cordon surely came or went; cleanup drops it.
                _log.info("cordon_key_kept", app=app, machine=mid)
            elif force or machine is None or ours(machine):
                with contextlib.suppress(NotFound):  # never set (a drain cut short): fine
                    await self.api.delete_machine_metadata(
                        app, mid, CORDON_METADATA_KEY, lease_nonce=nonce
                    )
                rt.record(mid, self.clock(), marked=False)
        self.count(rt, "uncordon", True)
        self.publish(rt)
        return True

    def cleanup(self, rt: AppRuntime) -> None:
        """Drop our key where the API says the machine is not cordoned (a process that died
        between uncordon and the key's removal), so a later cordon by someone else is never
        taken for ours. Cordons that do carry our key are the policy's: it finishes the
        drain of a started machine and lifts the cordon of a sleeping one.

        A machine whose record we changed after the list was asked for is left alone: the
        list kept our record (``AppRuntime.merge``), so "not cordoned" is ours, not the
        API's (an uncordon recorded ahead of its call, which an outage then failed), and
        dropping the key would leave Fly's cordon with nothing to say it is ours."""
        listed_at = rt.listed_at
        for mid, machine in list(rt.machines.items()):
            if mid in rt.running or not ours(machine) or machine.cordoned is not False:
                continue
            if listed_at is not None and rt.recorded_since(mid, listed_at):
                continue
            if self._cordon_may_land(rt, mid):
                continue  # a cordon of ours may still come: it must find our key
            _log.info("stale_cordon_key", app=rt.name, machine=mid, state=machine.state)
            self._spawn(rt, mid, "cleanup", self.release(rt, mid))
