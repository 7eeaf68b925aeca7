"""The control loop: one task per scaled app, ticking every ``control.tick_s``.

A tick reads the fleet from the API (one list call, within the client's rate limits),
merges it with the live load from the proxy's view, asks the pure policy what to do, and
hands the actions to the :class:`~autoscaler.control.actions.Actuator` (one task per
machine at most). The loop's ticks of an app whose machines all hold still read only every
``control.steady_list_s`` and decide from the last list in between; any sign of change
(an action of ours, a wake, a machine the proxy could not reach, a failed tick) and any
decision to act reads at once (control/schedule.py). API errors back off, doubling up to
``control.api_backoff_max_s`` (longer if the API asked with Retry-After); the next tick
reads the truth again, so nothing is remembered from a failed one.

A new process knows nothing but the API: its first tick rebuilds the view from the list,
counts machines that are already started or starting (so it starts nothing twice), and the
policy finishes the drains our metadata key marks (or lifts our cordon from machines that
are asleep already); ``Actuator.cleanup`` drops a key left without its cordon.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from autoscaler.aio import cancel_and_wait, tcp_probe
from autoscaler.config import AppConfig, Settings
from autoscaler.control.actions import Actuator, Probe, Sleep
from autoscaler.control.leases import Leases
from autoscaler.control.recheck import Rechecker
from autoscaler.control.runtime import AppRuntime, MachineRecord, ours
from autoscaler.control.schedule import (
    Budget,
    Pacer,
    Unlimited,
    asleep,
    must_list,
    note_listed,
    overdue,
)
from autoscaler.control.view import AppView, Clock, FleetView
from autoscaler.control.wake import WakeAbandoned, WakeError, Waker
from autoscaler.fly.client import MachinesAPI, one_attempt
from autoscaler.fly.errors import FlyError, RateLimited, Unauthorized
from autoscaler.fly.models import Machine
from autoscaler.logs import get_logger
from autoscaler.metrics import Metrics
from autoscaler.scaling.fleet import Fleet
from autoscaler.scaling.policy import Decision, decide
from autoscaler.scaling.window import Sample

__all__ = ["AppStatus", "Controller", "MachineStatus", "WakeError", "freeze_heap"]

_log = get_logger("autoscaler.control")
WAKE_FAILED_LOG_S = 60.0
"""The same error of an app's failed wakes is logged at most once in this long."""
MAX_RETRY_AFTER_S = 60.0
"""The longest Retry-After a failed tick honours. Fly's limits are per second: a longer
one is a mistake or a date on a skewed clock, and would stop the app's loop (its
scale-downs, its restarts) that long."""
LEASE_REPORT_S = 60.0  # /status names a machine leased by another this long after a skip
# Cluster mode: the whole cluster's load sample and last request time for (app, now), in
# place of this process's own meter (autoscaler/state/cluster.py).
LoadSource = Callable[[str, float], tuple[Sample, float | None]]


@dataclass(frozen=True, slots=True)
class MachineStatus:
    id: str
    state: str
    cordoned: bool
    in_flight: int
    last_used: float | None
    failures: int = 0
    """Our starts of it that failed in a row."""
    next_retry_at: float | None = None
    """When a failed machine may be started again (None: not failed, or left alone)."""
    left_alone: bool = False
    """Failed past ``max_restart_attempts``: not started again until its state changes
    (hung: ``restart_failed`` is off)."""
    failing: int = 0
    """Ejections in a row by the proxy (any replica's) for its own failures: timeouts,
    resets, refused connections, answers that are not HTTP."""
    hung: bool = False
    """Started, and ``failing`` reached HUNG_AFTER: it accepts and never answers. Restarted
    (``next_retry_at`` None: at the next tick; else once the restart budget allows)."""
    hung_restarts: int = 0
    """Our restarts of it for hanging, in a row (each within RESTART_MAX_S of the last)."""
    host_unreachable: bool = False
    """The last list said Fly cannot reach its host: actions on it wait for the host."""
    sick_since: float | None = None
    """Started, and Fly's health checks of it critical since then (by the lists)."""
    checks_passed_on_recheck: tuple[str, ...] = ()
    """Checks that Fly's list says critical and that our own run of them saw pass since
    (control/recheck.py): they do not count until Fly runs them again."""
    checks_critical_unrouted: tuple[str, ...] = ()
    """Critical checks that Fly does not route by (top-level ones not of kind readiness):
    for monitoring; neither the proxy nor the policy acts on them."""


@dataclass(frozen=True, slots=True)
class AppStatus:
    """One app as ``/status`` shows it; times on the controller's clock."""

    app: str
    desired: int
    panic: bool
    last_reason: str
    last_decision_at: float | None
    last_tick_at: float | None
    last_error: str | None
    machines: tuple[MachineStatus, ...]
    leased_by_others: tuple[str, ...] = ()
    """Machines skipped in the last minute because another holder had their lease."""


@dataclass(frozen=True, slots=True)
class AppHealth:
    """What readiness and control health read of an app: no machine's status (a load
    balancer's probe of ``/readyz`` and every scrape of ``/metrics`` ask for it, and with
    1,000 apps building every machine's status held the loop for tens of milliseconds)."""

    app: str
    last_tick_at: float | None
    last_error: str | None
    api_error: str | None
    """``last_error`` when it came from the Machines API (AppRuntime.api_error)."""
    api_refused: bool
    """``api_error`` is the API refusing the token (AppRuntime.api_refused)."""
    machines_known: bool
    """A list of its machines was read (or, where no loop of ours reads, routed)."""


def _routed(view: AppView) -> list[MachineStatus]:
    """An app's machines as the view routes them, where no loop of ours reads the API (a
    follower in cluster mode, whose view is the leader's; a former leader's list is stale)."""
    return [
        MachineStatus(
            id=up.id,
            state=up.state,
            cordoned=up.cordoned,
            in_flight=up.in_flight,
            last_used=up.last_used,
            failing=up.ejections_in_a_row,
        )
        for up in view.upstreams.values()
    ]


def freeze_heap() -> None:
    """Move everything the process holds now out of the garbage collector's sight.

    What a process built to serve many apps (their configs, views, runtimes, metrics, the
    settings) lives as long as the process, and every full collection walked all of it on
    the event loop the data path shares: with 1,000 apps, pauses of 0.1-0.3 s on a shared
    2-core VM and a proxy p99 in the hundreds of milliseconds (docs/benchmarks.md, "Many
    apps"). ``gc.freeze`` moves what exists into a generation that collections skip; what
    is made later (new lists, requests) is collected as before, and frozen objects are
    still freed when nothing refers to them. One full collection first, so no garbage is
    frozen. For a process of its own only (``autoscaler run``), never a shared one (tests).
    """
    took = time.perf_counter()
    gc.collect()
    gc.freeze()
    _log.info(
        "heap_frozen",
        objects=gc.get_freeze_count(),
        took_ms=round((time.perf_counter() - took) * 1000, 1),
    )


def _decide(
    rt: AppRuntime, view: AppView, now: float, last_request_at: float | None
) -> tuple[Decision, Fleet]:
    """The policy's decision for ``rt`` on what it knows now, and the snapshot it read."""
    fleet = rt.fleet(view, now)
    decision = decide(fleet, rt.windows, rt.config, now, rt.policy_state, last_request_at)
    return decision, fleet


class Controller:
    """Every scaled app's loop, the wake path, and the status the admin server reads."""

    def __init__(
        self,
        api: MachinesAPI,
        view: FleetView,
        settings: Settings,
        metrics: Metrics,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        probe: Probe = tcp_probe,
        budget: Budget | None = None,
        rng: Callable[[], float] = random.random,
        load: LoadSource | None = None,
        freeze_heap: Callable[[], None] | None = None,
        lease_owner: str | None = None,
        wall: Clock | None = None,
    ) -> None:
        self.api = api
        self.load = load
        self.view = view
        self.metrics = metrics
        self.clock = clock
        self.sleep = sleep
        self.settings = settings
        self.actuator = Actuator(
            api,
            view,
            metrics,
            clock=clock,
            sleep=sleep,
            probe=probe,
            backoff_max_s=settings.control.api_backoff_max_s,
            lease_skip_s=settings.control.tick_s,
            leases=Leases(api, sleep=sleep, clock=clock, owner=lease_owner),
            wall=wall,
        )
        self.waker = Waker(api, self.actuator, metrics, settings.control.api_timeout_s)
        self._rechecker = Rechecker(clock, sleep, self._rechecked)
        self.apps: dict[str, AppRuntime] = {}
        self.on_first_list: Callable[[str, list[Machine]], None] | None = None
        """Called with each app's first list, whichever read it (a tick or a wake)."""
        self.on_removed: Callable[[str], None] | None = None
        """Called with the name of each app a reload takes from us (removed, or made
        static) as it is taken, before its removal's first await (cluster mode: the
        replica forgets what it published of it, so an app added back starts fresh)."""
        self.last_tick_at: float | None = None
        self._running = False
        self._gauged: dict[str, set[str]] = {}
        self._gauge_last: dict[str, tuple[object, ...]] = {}
        self._late_lifts: dict[tuple[str, str], tuple[asyncio.Task[None], list[bool]]] = {}
        """(app, machine) -> a removed app's cordon lifted again once no cordon request
        of ours can land there any more (:meth:`_hand_back`), and whether its calls began."""
        self._removals: set[asyncio.Future[list[None]]] = set()
        """The letting go of apps a reload removed (:meth:`_remove`), while under way."""
        # The loops' timing (control/schedule.py): the org budget that sleeping apps' polls
        # leave to busy apps, and each loop's pacer.
        self.budget: Budget = budget if budget is not None else Unlimited()
        self._rng = rng
        self._pacers: dict[str, Pacer] = {}
        self._wake_failed: dict[str, tuple[str, float]] = {}
        """App -> the last failed wake's error logged, and when: a wake asked again every
        second while requests wait logs the same error once a minute, not each time."""
        self._freeze_heap = freeze_heap
        """Called once, when every app has been read for the first time (``autoscaler
        run`` passes :func:`freeze_heap`)."""
        self._sync_apps(settings.apps)

    # --- lifecycle ----------------------------------------------------------------------

    def _sync_apps(self, configs: list[AppConfig]) -> list[str]:
        """Make the runtimes match the config; the names of apps that went away."""
        wanted = {c.name: c for c in configs if not c.static}
        gone = [name for name in self.apps if name not in wanted]
        for name, config in wanted.items():
            rt = self.apps.get(name)
            if rt is None:
                rt = self.apps[name] = AppRuntime.of(config)
                rt.on_first_list = self._first_list
                self.view.app(name)
            else:
                rt.reconfigure(config)
        return gone

    def _first_list(self, app: str, machines: list[Machine]) -> None:
        if self.on_first_list is not None:
            self.on_first_list(app, machines)

    async def start(self) -> None:
        """Start every app's loop and offer the wake path to the proxy; each app's load
        windows and policy state begin afresh (``AppRuntime.lead_begins``)."""
        self._running = True
        self.actuator.deciding()
        self.view.set_waker(self.wake)
        now = self.clock()
        for rt in self.apps.values():
            rt.lead_begins(now)  # a replica leading again: its last lead's load is past
            self._start_loop(rt)

    def _start_loop(self, rt: AppRuntime) -> None:
        if rt.loop is None or rt.loop.done():
            self._pacers[rt.name] = Pacer(self._rng, self.sleep)
            rt.loop = asyncio.get_running_loop().create_task(self._run(rt), name=f"loop:{rt.name}")

    async def stop(self, *, handover: bool = False) -> None:
        """Stop the loops and cancel actions under way. A drain cut short leaves a cordon
        with our key; the next process (or the next start) finishes or undoes it. Apps a
        reload is letting go are let go first: no process will scale them after us.
        ``handover`` (cluster mode: this replica stops leading and lives on): the machine
        leases that cancelled actions were taking are given back once their answers come,
        not left under our name for their TTL (``Leases.aclose``), and the proxy's wake is
        left as it is (the replica put the follower's in place already: the held requests
        ask it while this stop waits for the API). Nor does it wait for a reload's removals
        under way: this process lives on, and they with it (the reload awaits them, and
        the last stop does); their calls are fenced now, as any of ours, and go through
        again if we lead again. Waited for, they held the step-down, and with it our next
        lead (the replica leads once the step-down is over), up to twice
        ``control.api_timeout_s`` for apps no longer ours."""
        self._running = False
        if not handover:
            self.view.set_waker(None)
        await asyncio.gather(*(self._stop_app(rt) for rt in list(self.apps.values())))
        if not handover:
            await self._removals_done()
        await self._call_off_late_lifts()
        # What the actions cancelled just now leave running: the lease releases, together
        # within one call's time of a tick (an API that hangs does not hold the stop).
        await self.actuator.aclose(self.settings.control.api_timeout_s, cut=not handover)
        # Started again (a replica that leads again), it writes every gauge anew (a
        # follower drops them: Metrics.forget_decisions) and bills machine time from its
        # first tick on: the time between was another leader's to bill. Until now is ours.
        self._gauge_last.clear()
        self._gauged.clear()
        now = self.clock()
        for rt in self.apps.values():
            self._account(rt, now)
            rt.billing.off()

    async def _stop_app(self, rt: AppRuntime) -> None:
        tasks: list[asyncio.Future[Any]] = [run.task for run in rt.running.values()]
        tasks.extend(rt.rechecks.values())
        if rt.loop is not None:
            tasks.append(rt.loop)
        await cancel_and_wait(tasks)
        rt.loop = None

    async def update_settings(self, settings: Settings) -> None:
        """Apply a reloaded configuration: new knobs, new apps, removed apps.

        The apps that stay or come tick at once; the removed ones are let go all together,
        each within about twice ``control.api_timeout_s`` (:meth:`_remove`), so that a
        reload that removes many apps takes no longer than one that removes one. It
        returns once they are let go: no call of ours on their machines comes after, but
        the lifts of cordons of ours that may still land there (:meth:`_lift_later`)."""
        self.settings = settings
        self.actuator.backoff_max_s = settings.control.api_backoff_max_s
        self.actuator.lease_skip_s = settings.control.tick_s
        self.waker.api_timeout_s = settings.control.api_timeout_s
        static = {c.name for c in settings.apps if c.static}
        removed = [self.apps.pop(name) for name in self._sync_apps(settings.apps)]
        for rt in removed:
            # Before any await: the actuator launches nothing more for it, and its loop,
            # should it fall due while the app is let go, ends instead of ticking it.
            rt.retired = True
            self._pacers.pop(rt.name, None)
            self._wake_failed.pop(rt.name, None)
            if self.on_removed is not None:
                self.on_removed(rt.name)
        # Under way before the reload's first await, and shielded: a stop during the
        # reload (SIGTERM: the service cancels the reload) waits for it (:meth:`stop`).
        # Cut short, it left the apps' tasks running past the stop, and our cordons on
        # their machines for good (no later process scales them).
        removal = asyncio.gather(*(self._remove(rt, rt.name in static) for rt in removed))
        self._removals.add(removal)
        removal.add_done_callback(self._removals.discard)
        for name in {app for app, _ in self._late_lifts} & set(self.apps):
            await self._call_off_late_lifts(name)  # back: before its first tick
        if self._running:
            for rt in self.apps.values():
                self._start_loop(rt)
        await asyncio.shield(removal)

    async def _removals_done(self) -> None:
        """Wait for the reloads' removals under way (each bounded, :meth:`_remove`)."""
        removals = set(self._removals)
        if not removals:
            return
        try:
            await asyncio.wait(removals)
        except asyncio.CancelledError:
            for removal in removals:
                removal.cancel()  # a stop cut short (a second SIGTERM): no wait then
            raise
        for removal in removals:
            if not removal.cancelled() and removal.exception() is not None:
                _log.error("app_removal_failed", error=repr(removal.exception()))

    async def _remove(self, rt: AppRuntime, static: bool) -> None:
        """Let go of an app a reload took away (removed, or made ``static``): its wake, its
        tasks, the leases they held or had asked for, our cordons on its machines."""
        name = rt.name
        # The wake first: it launches actions and reads the app; stopped after the
        # app's tasks, it could launch one that nothing stops (and, the app made
        # static, it ran on until its deadline, a re-added app joining it).
        await self.view.end_wake(name)
        draining = {mid for mid, run in rt.running.items() if run.kind == "drain"}
        await self._stop_app(rt)
        self._account(rt, self.clock())  # its machine time up to now: a total is a total
        # The leases its cancelled actions held or had asked for: given back now, not
        # by calls on its machines after the reload (bounded: else they lapse), and
        # before the cordons are lifted, which a lease of ours not yet given back
        # would refuse (409: a lifting call carries no nonce).
        # Those whose release failed before (remembered for our next take) go too: left,
        # the lift met our own lease (409) and the cordon stayed for good.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.control.api_timeout_s):
                await self.actuator.leases.settled(name)
                self.actuator.leases.release_remembered(name)
                await self.actuator.leases.settled(name)
        await self._hand_back(rt, draining)
        if not static:
            # A static app of the same name keeps its view: the proxy put its
            # backends there (it is updated first); dropped, every request waited
            # for a wake that no loop would ever make.
            self.view.remove_app(name)
        self.metrics.forget_app_decisions(name, self._gauged.pop(name, ()))
        self._gauge_last.pop(name, None)

    async def _hand_back(self, rt: AppRuntime, draining: set[str]) -> None:
        """An app no longer ours to scale: lift the cordons of ours on its machines (a
        drain the reload cut short, a sleeping machine's), once each, all at once, each
        within ``control.api_timeout_s``. No later tick of any process will: left, Fly's
        proxy would never route to those machines again, whoever manages the app now."""
        marked = draining | {mid for mid, m in rt.machines.items() if ours(m)}
        marked |= {mid for app, mid in self.actuator.cordoning if app == rt.name}

        async def lift(mid: str) -> None:
            try:
                with one_attempt(self.settings.control.api_timeout_s):
                    await self.actuator.release(rt, mid, force=True)
            except FlyError as exc:
                _log.warning("cordon_left_on_removed_app", app=rt.name, machine=mid, error=str(exc))
                return
            until = self.actuator.cordon_may_land_until(rt.name, mid)
            if until is not None:
                self._lift_later(rt, mid, until)

        await asyncio.gather(*(lift(mid) for mid in sorted(marked)))

    def _lift_later(self, rt: AppRuntime, mid: str, until: float) -> None:
        """A cordon request of ours may still land on a removed app's machine (its answer
        was lost, or the process before us sent it): the lift just made kept our key, so
        that cordon is ours to find, but no tick of ours will look again. Once it cannot
        land any more, the cordon is lifted once more and the key dropped, from a task of
        its own (the reload does not wait a minute for it), each call within
        ``control.api_timeout_s``. Called off if the app comes back (its ticks do that
        work then) and at stop (the key stays: harmless without a cordon)."""
        key = (rt.name, mid)
        began = [False]

        async def later() -> None:
            await self.sleep(max(0.0, until - self.clock()))
            began[0] = True
            _log.info("cordon_lifted_late", app=rt.name, machine=mid)
            try:
                with one_attempt(self.settings.control.api_timeout_s):
                    await self.actuator.release(rt, mid, force=True)
            except FlyError as exc:
                _log.warning("cordon_left_on_removed_app", app=rt.name, machine=mid, error=str(exc))

        task = asyncio.get_running_loop().create_task(later(), name=f"lift-later:{key}")
        self._late_lifts[key] = (task, began)

        def done(t: asyncio.Task[None]) -> None:
            if self._late_lifts.get(key, (None,))[0] is t:
                del self._late_lifts[key]

        task.add_done_callback(done)

    async def _call_off_late_lifts(self, app: str | None = None) -> None:
        """Cancel the late lifts (of ``app``, or all) still waiting; wait for those whose
        calls began: cut off, a key deletion could land on a drain of the app come back."""
        waiting: list[asyncio.Task[None]] = []
        calling: list[asyncio.Task[None]] = []
        for (name, _), (task, began) in list(self._late_lifts.items()):
            if app is None or name == app:
                (calling if began[0] and app is not None else waiting).append(task)
        await cancel_and_wait(waiting)
        if calling:
            await asyncio.wait(calling)

    async def idle(self) -> None:
        """Wait until no action is under way (tests; a graceful stop could use it too)."""
        while True:
            tasks = [run.task for rt in self.apps.values() for run in rt.running.values()]
            if not tasks:
                await self.actuator.settled()
                return
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- the loop -----------------------------------------------------------------------

    async def _run(self, rt: AppRuntime) -> None:
        """Tick ``rt`` for as long as it is scaled: every ``control.tick_s`` while it is in
        use, every ``control.idle_poll_s`` while it sleeps, starting at a random offset and
        with jittered pauses (control/schedule.py)."""
        pacer = self._pacers[rt.name]
        await self.sleep(pacer.offset(self.settings.control.tick_s))
        while not rt.retired:
            control = self.settings.control
            tick_s = control.tick_s
            pacer.settle()
            now = self.clock()
            view = self.view.app(rt.name)
            if (
                asleep(rt, view, now, control.idle_poll_s)
                and not self.budget.spare()
                and not overdue(rt, now, control.idle_poll_s)
                and not (rt.next_check is not None and now >= rt.next_check)
            ):
                # The org budget runs short: apps in use and wakes go first. A request for
                # this app nudges the pause (the wake itself does not wait for the loop).
                await pacer.pause(pacer.period(tick_s, control.tick_jitter), nudgeable=False)
                continue
            slow = False
            try:
                with one_attempt(self.settings.control.api_timeout_s):
                    await self._tick(rt, lazy=True)
                rt.backoff_s = 0.0
                now = self.clock()
                slow = asleep(rt, view, now, control.idle_poll_s)
                delay = pacer.next_pause(slow, tick_s, control.idle_poll_s, control.tick_jitter)
                if rt.next_check is not None and now < rt.next_check < now + delay:
                    # The decision changes by itself then (a pre-warm window opens): a
                    # slow poll must not sleep through it.
                    delay = rt.next_check - now
            except Exception as exc:
                # FlyError is the expected case; anything else is a bug, but one bad tick
                # must not end the app's loop for good.
                rt.last_error = rt.api_error = str(exc)
                rt.api_refused = isinstance(exc, Unauthorized)
                rt.changed_at = self.clock()  # the next tick reads, whatever it knows
                cap = self.settings.control.api_backoff_max_s
                rt.backoff_s = min(cap, max(2 * tick_s, 2 * rt.backoff_s))
                delay = rt.backoff_s
                if isinstance(exc, RateLimited) and exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, MAX_RETRY_AFTER_S))
                # Apps that failed together (an outage) must not retry together.
                delay = pacer.period(delay, control.tick_jitter)
                if isinstance(exc, FlyError):
                    _log.warning("tick_failed", app=rt.name, error=str(exc), retry_in_s=delay)
                else:
                    _log.exception("tick_crashed", app=rt.name, retry_in_s=delay)
            await pacer.pause(delay, nudgeable=slow)

    async def tick(self, app: str, *, lazy: bool = False) -> Decision:
        """One reconcile of ``app``: read, merge, decide, act. Raises FlyError on a failed read.

        ``lazy`` (the app's own loop): a steady app decides from its last list when that is
        younger than ``control.steady_list_s`` (:func:`~autoscaler.control.schedule.must_list`),
        and reads first only if the decision is to act.

        Every API call of the tick, and of the actions it launches, is tried once within
        ``control.api_timeout_s``: the next tick is the retry, so an outage costs a tick
        a timeout at most, never a retry loop.
        """
        with one_attempt(self.settings.control.api_timeout_s):
            return await self._tick(self.apps[app], lazy)

    async def _read(self, rt: AppRuntime) -> float:
        """List ``rt``'s machines, merge them and drop stale cordon keys of ours that the
        list shows (``Actuator.cleanup``); the time after the answer."""
        listed_at = self.clock()
        machines = await self.api.list_machines(rt.name)
        now = self.clock()
        rt.merge(machines, listed_at, now)
        note_listed(rt, self.view.app(rt.name))
        self.actuator.listed(rt)
        self.actuator.cleanup(rt)
        self._rechecker.follow(rt, now)
        if self._freeze_heap is not None and all(r.read_once for r in self.apps.values()):
            freeze, self._freeze_heap = self._freeze_heap, None
            freeze()
        return now

    def _rechecked(self, rt: AppRuntime, machine: MachineRecord, passed: bool) -> None:
        """Our runs of a machine's critical checks passed, or did not by the end of its
        first round of them (control/recheck.py)."""
        result = "passed" if passed else "failed"
        self.metrics.check_rechecks.labels(app=rt.name, result=result).inc()
        if passed:
            self.actuator.publish(rt)
        _log.info(
            "checks_passed_on_recheck" if passed else "checks_failed_on_recheck",
            app=rt.name,
            machine=machine.id,
            checks=sorted(name for name, _ in machine.critical),
        )

    async def _tick(self, rt: AppRuntime, lazy: bool) -> Decision:
        app = rt.name
        view = self.view.app(app)
        now = self.clock()
        fresh = not lazy or must_list(rt, view, now, self.settings.control.steady_list_s)
        if fresh:
            now = await self._read(rt)
        if self.load is None:
            sample, last_request_at = view.meter.take(now), view.last_request_at
        else:
            sample, last_request_at = self.load(app, now)
        rt.windows.add(sample)
        self._account(rt, now)
        decision, fleet = _decide(rt, view, now, last_request_at)
        if decision.actions and not fresh:
            # Act on what the API says now, not on a list up to steady_list_s old: read,
            # and decide again from the same policy state (this decision is dropped).
            fresh = True
            now = await self._read(rt)
            decision, fleet = _decide(rt, view, now, last_request_at)
        self._log_decision(rt, decision)
        rt.note_decision(decision, now)
        if decision.prewarm is not None:
            self.metrics.prewarms.labels(app=rt.name, result=decision.prewarm).inc()
        for action in decision.actions:
            self.actuator.launch(rt, action)
        rt.hold_hung(view, {m.id for m in fleet.machines if m.hung})
        if fresh:
            # Between reads the machines change only through our actions, which publish
            # their own changes: a tick that did not read has nothing new to show.
            self.actuator.publish(rt)
            rt.last_error = rt.api_error = None  # the API answered (a tick that read)
            rt.api_refused = False
        self._gauge(rt, decision)
        rt.last_tick_at = self.last_tick_at = now
        return decision

    def _log_decision(self, rt: AppRuntime, decision: Decision) -> None:
        changed = decision.actions or decision.desired != rt.desired or decision.panic != rt.panic
        (_log.info if changed else _log.debug)(
            "decision",
            app=rt.name,
            desired=decision.desired,
            panic=decision.panic,
            actions=[f"{a.kind}:{a.machine_id}" for a in decision.actions],
            reason=decision.reason,
            shortfall=decision.shortfall,
        )

    def _account(self, rt: AppRuntime, now: float) -> None:
        """Machine-seconds up to ``now``, by the time each machine spent in each state as
        far as we know it (``MachineTime``); billing starts at the first tick."""
        if not rt.billing.on and not rt.read_once:
            return  # nothing known to bill from yet
        for state, seconds in rt.billing.take(rt.machines.values(), now).items():
            self.metrics.machine_seconds.labels(app=rt.name, state=state).inc(seconds)

    def _gauge(self, rt: AppRuntime, decision: Decision) -> None:
        counts: dict[str, int] = {}
        cordoned = 0
        for machine in rt.machines.values():
            counts[machine.state] = counts.get(machine.state, 0) + 1
            cordoned += rt.cordoned(machine)
        counts["cordoned"] = cordoned
        key = (tuple(sorted(counts.items())), decision.desired, decision.panic)
        if self._gauge_last.get(rt.name) == key:
            return  # unchanged since the last tick (the usual case): nothing to write
        self._gauge_last[rt.name] = key
        seen = self._gauged.setdefault(rt.name, set())
        for state in seen - counts.keys():
            self.metrics.machines.labels(app=rt.name, state=state).set(0)
        for state, n in counts.items():
            self.metrics.machines.labels(app=rt.name, state=state).set(n)
        # update(), not |=: "seen |= counts.keys()" binds a new set to the local name
        # (set.__ior__ refuses dict keys), and the states left were never set back to 0.
        seen.update(counts)
        self.metrics.desired_machines.labels(app=rt.name).set(decision.desired)
        self.metrics.panic_mode.labels(app=rt.name).set(1 if decision.panic else 0)

    # --- the wake path ------------------------------------------------------------------

    async def wake(self, app: str) -> str:
        """Bring one machine of ``app`` to routable; "resume", "start", "uncordon" (a
        drain taken back) or "none" (one was routable already).

        Raises WakeError when no machine can be woken (or FlyError when the API fails).
        Counted (:meth:`counted`): the waker the fleet view calls in a single process.
        """
        return await self.counted(app, self.wake_uncounted(app))

    async def wake_uncounted(self, app: str) -> str:
        """:meth:`wake` without its count, for a caller that counts its own wake (a
        cluster replica's, which may end before it comes here, or never come)."""
        rt = self.apps.get(app)
        if rt is None:
            raise WakeError(f"app {app} is not scaled by this controller")
        pacer = self._pacers.get(app)
        if pacer is not None:
            pacer.nudge()  # a sleeping app's loop ticks again every tick_s from now on
        return await self.waker.wake(rt)

    async def counted(
        self, app: str, wake: Awaitable[str], *, asked: Callable[[], bool] | None = None
    ) -> str:
        """Await a wake of ``app`` and count it in ``autoscaler_wakes_total`` by how it
        ended: ok (it returned, "none" and "uncordon" included: a machine was routable
        already, or a drain was taken back), failed (it raised; logged as
        ``wake_failed``) or cancelled (a stop, a step-down, a reload that removed the
        app; a follower's wake whose requests all left: WakeAbandoned, not logged). An
        app not scaled here when the wake began is not counted: its series are not ours
        to make. One that was is counted however it ends: a reload that removes the app
        lets go of it before it cuts its wake short, and that wake, read as no longer
        ours, went uncounted.

        ``asked`` (a cluster leader's): whether this process's proxy asked for the wake,
        as it ends. One it made only for another replica's held requests is not counted
        here: that replica's own wake, which asked for it, counts it, so a sum over the
        replicas counts each proxy's wake once. Its failure is logged all the same (the
        error is known here only)."""
        if app not in self.apps:
            return await wake
        try:
            how = await wake
        except (asyncio.CancelledError, WakeAbandoned):
            self._count_wake(app, "cancelled", asked)
            raise
        except Exception as exc:
            self._count_wake(app, "failed", asked)
            if app in self.apps:  # a removed app's wake_failed would outlive it
                self._log_wake_failed(app, exc)
            raise
        self._count_wake(app, "ok", asked)
        self._wake_failed.pop(app, None)
        return how

    def _count_wake(self, app: str, result: str, asked: Callable[[], bool] | None) -> None:
        """Count the wake of an app that was scaled here when it began, if it is ours to
        (see :meth:`counted`)."""
        if asked is None or asked():
            self.metrics.wakes.labels(app=app, result=result).inc()

    def _log_wake_failed(self, app: str, exc: Exception) -> None:
        error = str(exc) or type(exc).__name__
        # An API error is the same error whatever its request id (Fly gives every answer
        # its own, and str() carries it): compared with it, each was a new one. So is the
        # wake's own error that carries one (AppMissing: the 404 of the app's list).
        api = exc if isinstance(exc, FlyError) else exc.__cause__
        same = (
            repr((type(api).__name__, api.operation, api.status, api.message, api.code))
            if isinstance(api, FlyError)
            else error
        )
        now = self.clock()
        last = self._wake_failed.get(app)
        if last is not None and last[0] == same and now - last[1] < WAKE_FAILED_LOG_S:
            return
        self._wake_failed[app] = (same, now)
        _log.warning("wake_failed", app=app, error=error)

    # --- status -------------------------------------------------------------------------

    def _machines(self, rt: AppRuntime, view: AppView, now: float) -> list[MachineStatus]:
        """The app's machines as this controller's lists and actions know them."""
        machines = []
        hung_ids = rt.hung(view)
        for machine in rt.machines.values():
            up = view.upstreams.get(machine.id)
            restarts = rt.restarts.get(machine.id)
            hung = machine.id in hung_ids
            hung_restarts, hung_retry_at = rt.hung_restarts_in_a_row(machine.id, now)
            machines.append(
                MachineStatus(
                    id=machine.id,
                    state=machine.state,
                    cordoned=rt.cordoned(machine),
                    in_flight=up.in_flight if up else 0,
                    last_used=up.last_used if up else None,
                    failures=restarts.failures if restarts else 0,
                    next_retry_at=hung_retry_at
                    if hung
                    else (restarts.retry_at if restarts and not restarts.exhausted else None),
                    left_alone=not rt.config.restart_failed
                    if hung
                    else (restarts.exhausted if restarts else False),
                    failing=up.ejections_in_a_row if up else 0,
                    hung=hung,
                    hung_restarts=hung_restarts,
                    host_unreachable=machine.host_unreachable,
                    sick_since=rt.sick_since.get(machine.id),
                    checks_passed_on_recheck=tuple(
                        sorted(name for name, _ in rt.rechecked.get(machine.id, ()))
                    ),
                    checks_critical_unrouted=machine.unrouted,
                )
            )
        return machines

    def health(self) -> list[AppHealth]:
        deciding = self.actuator.drains_all()
        return [
            AppHealth(
                app=rt.name,
                last_tick_at=rt.last_tick_at,
                last_error=rt.last_error,
                api_error=rt.api_error,
                api_refused=rt.api_refused,
                machines_known=bool(rt.machines if deciding else self.view.app(rt.name).upstreams),
            )
            for rt in self.apps.values()
        ]

    def status(self) -> list[AppStatus]:
        out = []
        now = self.clock()
        for rt in self.apps.values():
            view = self.view.app(rt.name)
            # Not deciding (a follower): the machines as the leader's view has them.
            deciding = self.actuator.drains_all()
            machines = self._machines(rt, view, now) if deciding else _routed(view)
            out.append(
                AppStatus(
                    app=rt.name,
                    desired=rt.desired or 0,
                    panic=rt.panic,
                    last_reason=rt.last_reason,
                    last_decision_at=rt.last_decision_at,
                    last_tick_at=rt.last_tick_at,
                    last_error=rt.last_error,
                    machines=tuple(machines),
                    leased_by_others=tuple(
                        sorted(
                            mid
                            for mid, (seen, _) in rt.leased_by_others.items()
                            if self.clock() - seen < LEASE_REPORT_S
                        )
                    ),
                )
            )
        return out
