"""One replica of a cluster (``cluster.redis_url`` set): the glue between the Redis side
(:mod:`autoscaler.state`) and this process's controller and fleet view.

Every ``REPORT_S`` (250 ms) the replica:

- steps its lease every ``lease_ttl_s / 3`` (renew, or try to acquire), and checks the
  lease's local deadline every round: leadership gained starts the controller (its loops,
  its drains, its wake path); leadership lost (not renewed, Redis unreachable, a stale
  token) stops it at once, so a leader that cannot renew stops deciding within the TTL
  (the machine leases its cancelled actions were taking are let answer and given back:
  the next leader, another owner, would not adopt them). The step-down's waits for the
  API run beside the rounds, which go on refreshing our report; our proxy's held requests
  ask the follower's wake path meanwhile;
- publishes its own load per app, and, as leader, the fleet view it routes with;
- reads the other replicas' reports. The leader's ticks decide on the sum (the controller's
  ``load`` hook, :meth:`Replica.load`). Every replica writes the others' requests in flight
  per machine into ``Upstream.remote_in_flight`` (as last reported): the balancer's
  ``hard_limit`` counts them everywhere, the leader's policy and drains too; and their
  long-lived connections per machine into ``Upstream.remote_long_lived``, which the
  leader's scale-downs count as its own proxy's (a machine carrying a follower's
  WebSockets is taken last, as one carrying the leader's). It also
  writes its share of each machine's ``hard_limit`` (``Upstream.share``: its demand on the
  app over the cluster's), which its balancer keeps to, and the others' ejections in a
  row per machine into ``Upstream.remote_failing`` (counted from the machine's last
  start), so the leader restarts a machine that hangs for anyone's requests.
  A follower routes with the fleet view the leader published (it never calls the Machines
  API), and asks the leader for wakes through Redis.

Besides the rounds, the leader pushes every change of its view at once (pub/sub), and
every replica listens: a follower applies a push as it arrives; the rounds' reads are the
fallback that repairs a lost push within one round.

Every wake, the leader's or a follower's, runs under the app's wake claim
(:mod:`autoscaler.state.claim`): one wake per app at a time across the cluster. A follower
whose held requests see no routable machine within ``cluster.self_wake_after_s`` (no leader
served its request: none is elected, or it died, or it hangs) takes the claim itself and
wakes through the API; one that finds the claim taken waits for the claimant's machine.

Every action the leader's controller sends goes through :class:`FencedAPI`: no valid
lease (or, in a wake, no valid wake claim), no action.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from autoscaler.aio import cancel_and_wait, tcp_probe
from autoscaler.config import Settings
from autoscaler.control.actions import CORDON_UNSURE_S, MARK_BOUND_S, Probe
from autoscaler.control.controller import Controller
from autoscaler.control.fencing import WAKE_FENCE, Fence, FencedAPI
from autoscaler.control.leases import owner_of
from autoscaler.control.runtime import AppRuntime
from autoscaler.control.schedule import Budget
from autoscaler.control.view import AppView, Clock, FleetView, MachineInfo, Upstream
from autoscaler.control.wake import AppMissing, WakeAbandoned, WakeError, app_missing
from autoscaler.fly.client import MachinesAPI, one_attempt
from autoscaler.fly.errors import FlyError, NotFound
from autoscaler.logs import get_logger
from autoscaler.metrics import WAKE_UNCORDON, Metrics
from autoscaler.scaling.fleet import GOING_DOWN_STATES, STARTED, boot_kind
from autoscaler.scaling.window import Sample
from autoscaler.state.claim import Claim
from autoscaler.state.cluster import REPORT_S, AppFleet, AppLoad, Cluster, ViewPush

_log = get_logger("autoscaler.control.replica")


@dataclass(slots=True)
class _FailingBase:
    """One machine's ejections in a row as other replicas reported them when it last
    started (as our view saw it): counts of its previous process."""

    started_at: float | None
    base: dict[str, int]

    def count(self, counts: dict[str, int]) -> int:
        """The most that a replica added to its base (replica -> its count now)."""
        most = 0
        for rid in [r for r in self.base if r not in counts]:
            del self.base[rid]  # it counts zero now: it saw the start, or a good answer
        for rid, n in counts.items():
            base = self.base.get(rid, 0)
            if n < base:  # it counts again from zero
                base = self.base[rid] = 0
            most = max(most, n - base)
        return most


def _both(first: Fence, second: Fence) -> Fence:
    """A fence that holds when both do (checked in order: the second only if the first)."""

    async def check() -> bool:
        return await first() and await second()

    return check


def _waited_for(before: dict[str, tuple[str, bool]], up: Upstream) -> str:
    """What a follower's held requests waited for: "none" if the machine that came up was
    started already when the wake began, "uncordon" if a drain of the leader's had it
    cordoned then (``Upstream.cordoned_by_us``: a drain the leader took back, as the
    leader's own wake says; another party's cordon lifted meanwhile, or a hung machine
    let back, is no wake of ours: "none"), else how it came up as the leader
    publishes it (:attr:`Upstream.how`: a resume under way is listed ``starting``, as a
    cold start is), else by the state it was in then ("resume" from suspended or
    suspending)."""
    was, cordoned = before.get(up.id, (None, False))
    if was == STARTED:
        return WAKE_UNCORDON if cordoned else "none"
    if up.how is not None:
        return up.how
    return boot_kind(was)


class _Ours:
    """The app's wake claim is held by another task of this replica."""


class _Yielded:
    """A claimed wake (``Replica._claimed_wake``) that woke nothing, and why: the caller
    tries again, and says the last reason if its wake timeout passes first."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


_HELD_BY_OTHER = "held by another replica"


class _ClaimLock:
    """One app's lock for taking its wake claim (``Replica._take_claim``), and how many
    takes hold it or wait for it: it is kept only while one does."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


_OURS = _Ours()


class Replica:
    """This process as one member of the cluster."""

    def __init__(
        self,
        settings: Settings,
        api: MachinesAPI,
        view: FleetView,
        metrics: Metrics,
        *,
        clock: Clock = time.monotonic,
        cluster: Cluster | None = None,
        probe: Probe = tcp_probe,
        budget: Budget | None = None,
        freeze_heap: Callable[[], None] | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        """``freeze_heap`` (``autoscaler run``: :func:`~autoscaler.control.controller.
        freeze_heap`) runs once, when this replica first knows every app's machines: as
        leader, once its controller read them all; as follower, at its first view.
        ``rng``: the controller's draws for its loops' offsets and jitter (tests fix it)."""
        self.settings = settings
        self._freeze_heap = freeze_heap
        self.view = view
        self.metrics = metrics
        self.clock = clock
        self.cluster = cluster if cluster is not None else Cluster(settings.cluster, clock=clock)
        metrics.set_replica(self.cluster.replica_id)
        self.api = FencedAPI(api, self.cluster.lease.check)
        self.controller = Controller(
            self.api,
            view,
            settings,
            metrics,
            clock=clock,
            probe=probe,
            load=self.load,
            budget=budget,
            freeze_heap=self._freeze_once if freeze_heap is not None else None,
            rng=rng,
            # Replicas on one host (``--workers``) are concurrent deciders: each adopts
            # only its own lost leases, never a live one's (control/leases.py).
            lease_owner=owner_of(self.cluster.replica_id),
        )
        self.controller.actuator.leases.former = self._gone_holder
        self.controller.actuator.wake_claim = self._tick_wake_claim
        self.controller.actuator.drains_all = lambda: self.leading
        self.controller.actuator.writer = self._key_writer
        self.controller.actuator.settled_by = self._settled_by
        self.controller.on_removed = self._app_removed
        self.leading = False
        self._led_token: int | None = None
        """The fencing token of our last lead (what ``Cluster.settled`` says it of)."""
        self.view_known = False
        """A follower has applied a fleet view from the leader (readiness)."""
        self._task: asyncio.Task[None] | None = None
        self._stepping_down: asyncio.Task[None] | None = None
        """The step-down a round began, while it runs (:meth:`_finish_step_down`)."""
        self._pusher: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()
        """Set while this replica listens to the leader's pushed view changes."""
        self.pushes_applied = 0
        """Pushed view changes applied (status, tests)."""
        self.self_wakes = 0
        """Wakes this replica made as a follower under a wake claim (status, tests)."""
        self.claim_waits = 0
        """Times a wake of ours found the app's claim held by another replica."""
        self.claim_errors = 0
        """Times a wake of ours could not reach Redis to take the app's claim."""
        self.unknown_to_leader: set[str] = set()
        """Our apps that the leader publishes no view of (its config lacks them)."""
        self.tick_wakes_yielded = 0
        """Wakes by our ticks skipped: another replica held the app's claim (or Redis could
        not be reached to take it)."""
        self._claimed: set[str] = set()
        """Apps whose wake claim this replica holds now."""
        self._claim_locks: dict[str, _ClaimLock] = {}
        """Per app whose wake claim a task of ours is taking or waits to take, the lock
        of those takes; dropped once none is left (kept, one per app ever woken, they
        grew with every app a reload removed)."""
        self._read_owed: set[str] = set()
        """Apps whose read under a wake claim did not complete (failed, cancelled): the
        next claimed wake reads them, whoever Redis names as their last claimant."""
        self._applied: dict[str, tuple[int, int]] = {}
        """Per app, the (fencing token, sequence) of the leader's view applied last."""
        self._seq = 0
        self._dirty: set[str] = set()
        self._push_wanted = asyncio.Event()
        self._redis_ok = True
        self._leader_seen_at = self.clock()
        """When a round last found a leader (ours or another's): see decider_problems."""
        self._next_lease_step = 0.0
        self._reported: dict[str, AppLoad] = {}
        """Per app, the load reported last (an app at rest is not measured again)."""
        self._moving: set[str] = set()
        """Apps whose last report was not of an app at rest: measured again next round."""
        self._published: dict[str, AppFleet] = {}
        """Per app, its fleet view as of its last change, numbered (``_machines_changed``)."""
        self._missing: dict[str, float | None] = {}
        """Leader: per app whose last wake found that the Machines API has no such app,
        the time of the app's last list then (``AppRuntime.listed_at``): a list since says
        otherwise (``AppFleet.missing``)."""
        self._missing_at: dict[str, tuple[int, int]] = {}
        """Follower: per app, the (fencing token, sequence) of the leader's view applied
        last, if that view says the app is missing (``AppFleet.missing``)."""
        self._remote_busy: set[str] = set()
        """Apps on which other replicas had requests at the last read."""
        self._applied_apps: set[str] = set()
        """The apps the fleet view was last applied for (a reload adds some: apply all)."""
        self._failing_bases: dict[str, dict[str, _FailingBase]] = {}
        """Per app others report failing machines of, per machine: what each replica
        reported when the machine last started (``_apply_remote_failing``)."""

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, *, rounds: bool = True) -> None:
        """Join the cluster as a follower; the first round may make us leader.
        ``rounds=False`` (tests): the caller runs :meth:`round` by hand."""
        self.view.set_waker(self._follower_waker)
        self.view.set_machines_listener(self._machines_changed)
        self.metrics.cluster_leader.set(0)
        loop = asyncio.get_running_loop()
        self._pusher = loop.create_task(self._push_changes(), name="cluster-push")
        self._watcher = loop.create_task(
            self.cluster.watch_views(self._on_push, self._on_subscribed, self._on_wake),
            name="cluster-watch",
        )
        if rounds:
            self._task = loop.create_task(self._run(), name="cluster")

    async def stop(self) -> None:
        """Stop deciding, give the lease up (a follower takes over without waiting for the
        TTL), take our report out."""
        tasks = [t for t in (self._task, self._pusher, self._watcher) if t is not None]
        await cancel_and_wait(tasks)
        self._task = self._pusher = self._watcher = None
        self.subscribed.clear()
        await self.stepped_down()
        if self.leading:
            await self._step_down(follow=False)
        # What a wake of ours (a self-wake) left running, and the machine leases a step
        # down let answer.
        await self.controller.stop()
        self.view.set_waker(None)
        self.view.set_machines_listener(None)
        # What the next leader needs of a lead of ours stays behind our report: a cordon
        # key of ours that it finds is waited on up to the key's time (MARK_BOUND_S +
        # CORDON_UNSURE_S from its writing) unless we say no request of ours can land.
        self.cluster.settled = self._settled()
        await self.cluster.close(keep_settled_s=MARK_BOUND_S + CORDON_UNSURE_S)

    async def _run(self) -> None:
        while True:
            await self.round()
            await asyncio.sleep(REPORT_S)

    async def round(self) -> None:
        """One round: lease, transitions, publish, read, then wakes (leader) or the fleet
        view (follower). Public so tests can drive rounds by hand."""
        now = self.clock()
        if now >= self._next_lease_step and self.settings.cluster.lead:
            self._next_lease_step = now + self.settings.cluster.lease_ttl_s / 3
            try:
                await self.cluster.lease.step()
            except Exception as exc:  # redis' errors: the lease lapses by its deadline
                self._redis_trouble(exc)
        leading = self.cluster.lease.held()
        if leading and not self.leading:
            if self._stepping_down is None:
                await self._step_up()
            else:
                leading = False  # we lead once the step-down of our last lead is over
        elif not leading and self.leading:
            # Its waits (the machine leases of the cancelled actions, given back within
            # control.api_timeout_s) run beside the rounds: our report must not lapse.
            self._begin_step_down()
            self._stepping_down = asyncio.get_running_loop().create_task(
                self._finish_step_down(), name="cluster-step-down"
            )
            self._stepping_down.add_done_callback(self._step_down_done)
        self.cluster.settled = self._settled()
        try:
            loads, measured = self._loads()
            # A round is a few milliseconds of work in pieces; the data path's requests
            # go in between them instead of waiting for the whole round.
            await asyncio.sleep(0)
            await self.cluster.publish(loads, self._fleet() if leading else None, measured)
            # Only the apps we scale: another's peaks, reported by a replica still on a
            # config that has it, must not come back after our reload forgot it.
            await self.cluster.read(self.controller.apps)
            if leading or self.cluster.leader_id is not None:
                self._leader_seen_at = self.clock()
            if leading:
                self._applied_apps = set()  # once we follow again, apply the whole view
            else:
                self._apply_fleet()
            busy, failing = self._remote_apps()
            self._apply_remote_load(busy)
            self._apply_remote_failing(failing)
            if leading:
                for app in await self.cluster.pop_wakes():
                    self._serve_wake(app)
        except Exception as exc:
            self._redis_trouble(exc)
        else:
            if not self._redis_ok:
                _log.info("cluster_redis_back", replica=self.cluster.replica_id)
            self._redis_ok = True
        self.metrics.cluster_replicas.set(1 + len(self.cluster.others))

    def _redis_trouble(self, exc: Exception) -> None:
        self._applied_apps = set()  # a read may have gone unapplied: apply all next time
        if self._redis_ok:
            _log.warning("cluster_redis_unreachable", error=str(exc))
        self._redis_ok = False

    async def _step_up(self) -> None:
        self.leading = True
        self._led_token = self.cluster.lease.token
        self.unknown_to_leader = set()  # our apps are the leader's now
        self.cluster.lead_begins()  # before the controller's first sample
        self.metrics.cluster_leader.set(1)
        _log.info("cluster_leader", replica=self.cluster.replica_id, fence=self.cluster.lease.token)
        await self.controller.start()
        # The controller's wake, under the wake claim. Installing it wakes every app's
        # waiters: a follower's wake still waiting now goes through our own path.
        self.view.set_waker(self._leader_waker)

    async def _gone_holder(self, app: str, description: str) -> str | None:
        """``Leases.former``: the replica of this cluster that a lease's ``description``
        names, if it is known gone (``Cluster.gone``) and Redis lets it act on ``app``'s
        machines no more; None for a live replica (``--workers`` on one host decide
        concurrently: a live one's drain is never taken over), a holder that is not one
        of ours (a ``fly deploy``), one Redis never named to us (another cluster's, or gone
        for longer than ``GONE_KEPT_S``), or on any doubt (Redis errors)."""

        def names(rid: str) -> bool:
            return description.startswith(f"{owner_of(rid)}: ")

        live = [self.cluster.replica_id, *self.cluster.others]
        gone = [rid for rid in self.cluster.gone if names(rid)]
        # (A live one named too: ids that are prefixes of each other, "a" and "a: b".)
        if len(gone) != 1 or any(names(rid) for rid in live):
            return None
        try:
            if await self.cluster.may_act(gone[0], app):
                return None  # hung or cut off from its reports, not from its lease or claim
        except Exception:  # redis' errors (the rounds log them): no proof it cannot act
            return None
        return gone[0]

    def _key_writer(self) -> str | None:
        """Who our cordon key names as its writer (``mark_value``): this process (its
        boot id, unique to it, unlike a configured replica id) and the fencing token of
        this lead."""
        token = self.cluster.lease.token
        return f"{self.cluster.boot}.{token}" if self.leading and token is not None else None

    def _settled(self) -> str:
        """``Cluster.settled``: once a lead of ours and its step-down are over, until
        when a cordon request of ours may still land; nothing before (while we decide,
        or a step-down cuts or answers requests, nothing we say would hold)."""
        if self.leading or self._stepping_down is not None or self._led_token is None:
            return ""
        until = self.controller.actuator.settled_until()
        return "" if until is None else f"{self._led_token} {until!r}"

    def _settled_by(self, by: str) -> float | None:
        """``Actuator.settled_by``: until when a cordon request of the writer that a key
        names may still land, as its report says (or, once it stopped, what it left
        behind: ``Cluster.departed``): only what that process said once a lead no older
        than the key's was over. Our own keys: 0.0, our actuator knows our own requests
        (``cordon_unsure``)."""
        boot, _, token = by.partition(".")
        if boot == self.cluster.boot:
            return 0.0
        said = self.cluster.departed.get(boot)  # it stopped (Replica.stop)
        for report in self.cluster.others.values():
            if report.boot == boot:
                said = report.settled
        if said is not None and said[0] >= int(token):
            return said[1]
        return None

    async def _step_down(self, *, follow: bool = True) -> None:
        self._begin_step_down(follow=follow)
        await self._finish_step_down()

    def _begin_step_down(self, *, follow: bool = True) -> None:
        """Stop leading at once: the round goes on as a follower's, and a wake begins
        through the follower's path from now on, not ours. A wake of ours under way goes
        on until the controller's stop ends it; our proxy's held requests then ask the
        follower's wake (the new leader, or a self-wake), not after the step-down's waits
        (lease releases, a reload's removal: up to ``control.api_timeout_s`` and more).
        ``follow=False`` (:meth:`stop`): no wake at all begins any more; and, a step-down
        we chose (a clean stop, a rolling restart), it is logged at info, not warning."""
        self.leading = False
        if all(rt.read_once for rt in self.controller.apps.values()):
            # Our own view is whole and routes on (Redis out of reach, say): ready as a
            # follower with a leader's view would be, until one publishes.
            self.view_known = True
        self.metrics.cluster_leader.set(0)
        if follow:  # our lease was lost or expired
            _log.warning("cluster_follower", replica=self.cluster.replica_id)
        else:  # we stop: expected
            _log.info("cluster_follower", replica=self.cluster.replica_id)
        self.view.set_waker(self._follower_waker if follow else None)

    async def _finish_step_down(self) -> None:
        """After :meth:`_begin_step_down`: stop the controller (its loops and actions; the
        machine leases they held or were taking are given back; it leaves the follower's
        wake in place). From the rounds it runs in a task of its own (``_stepping_down``):
        the lease releases may take ``control.api_timeout_s``, and meanwhile the rounds
        refresh our report (a lapsed one hid our requests from the leader) and read the
        new leader's view. We lead again only once it is over."""
        await self.controller.stop(handover=True)
        for rt in self.controller.apps.values():
            rt.hold_hung(self.view.app(rt.name), set())  # a hold would outlive our lead
        self.metrics.forget_decisions()

    def _step_down_done(self, task: asyncio.Task[None]) -> None:
        if self._stepping_down is task:
            self._stepping_down = None
        if not task.cancelled() and (exc := task.exception()) is not None:
            _log.error("cluster_step_down_failed", error=repr(exc))

    async def stepped_down(self) -> None:
        """Wait for the step-down under way, if any (:meth:`stop`, tests)."""
        if self._stepping_down is not None:
            await asyncio.wait({self._stepping_down})

    # --- load ---------------------------------------------------------------------------

    def load(self, app: str, now: float) -> tuple[Sample, float | None]:
        """The controller's load hook: the whole cluster's sample and last request."""
        view = self.view.app(app)
        sample = self.cluster.sample(app, view.meter, now)
        return sample, self.cluster.last_request_at(app, view.last_request_at, now)

    def _share(self, app: str, view: AppView) -> float:
        """Our share of each machine's hard limit on ``app``: our demand (in flight plus
        held, now) over the whole cluster's (the others' as last reported), so the shares
        follow where the traffic is and add up to one. Nobody else busy: all of it."""
        others = self.cluster.remote_demand(app)
        if others == 0:
            return 1.0
        mine = view.in_flight + view.queued
        return mine / (mine + others)

    def _freeze_once(self) -> None:
        freeze, self._freeze_heap = self._freeze_heap, None
        if freeze is not None:
            freeze()

    def _remote_apps(self) -> tuple[set[str], set[str]]:
        """The apps other replicas are busy on, and those they report failing machines
        of: one pass over every report's loads (a thousand apps each)."""
        busy: set[str] = set()
        failing: set[str] = set()
        for report in self.cluster.others.values():
            for app, load in report.loads.items():
                if load.in_flight or load.held or load.machines or load.long_lived:
                    busy.add(app)
                if load.failing:
                    failing.add(app)
        return busy, failing

    def _apply_remote_load(self, busy: set[str]) -> None:
        """Write the other replicas' requests in flight and long-lived connections per
        machine, and our share of each machine's hard limit, into the view: for every
        app, static ones too (their machines are the same "host:port" on every replica,
        and their hard_limit is as cluster-wide as a scaled app's). Only the apps others
        are ``busy`` on, or were at the last read, can have anything to change."""
        for name in busy | self._remote_busy:
            app_view = self.view.apps.get(name)
            if app_view is not None:
                app_view.set_remote_in_flight(
                    self.cluster.remote_in_flight(name),
                    self._share(name, app_view),
                    self.cluster.remote_long_lived(name),
                )
        self._remote_busy = busy

    def _apply_remote_failing(self, failing_apps: set[str]) -> None:
        """Write into ``Upstream.remote_failing`` the most ejections in a row for its own
        failures that another replica reports for each machine: the leader then restarts a
        machine that hangs also when the requests to it go through other replicas (a
        proxy-only replica in front, the leader behind).

        Counted from the machine's last start in our view: a replica that missed its stop
        (a lost push, a stop and start within one round) still reports its previous
        process's ejections. So each replica's report when the machine started is its
        base, and only what it adds counts; a report under its base (it saw the start and
        counts again from zero) drops the base. Every replica keeps the bases, so a
        follower that comes to lead has them; one that just started has none, and takes
        what others report whole. ``failing_apps``: the apps others report failing
        machines of."""
        for name in failing_apps | self._failing_bases.keys():
            view = self.view.apps.get(name)
            if view is None:  # a reload took the app away, and its machines with it
                self._failing_bases.pop(name, None)
                continue
            reported = self.cluster.remote_failing(name)
            before = self._failing_bases.get(name, {})
            bases = {}
            for up in view.upstreams.values():
                counts = {rid: c[up.id] for rid, c in reported.items() if up.id in c}
                base = before.get(up.id)
                if base is None:
                    base = _FailingBase(up.started_at, {})
                elif base.started_at != up.started_at:  # started again: older counts are spent
                    base = _FailingBase(up.started_at, counts)
                up.remote_failing = base.count(counts)
                if counts:
                    bases[up.id] = base
            self._failing_bases[name] = bases
        for name in [n for n, bases in self._failing_bases.items() if not bases]:
            del self._failing_bases[name]

    def _loads(self) -> tuple[dict[str, AppLoad], set[str]]:
        """This replica's load per app, and the apps whose load was measured again: those
        new here, those on which a request began or waited since the last report, and
        those whose last report was not of an app at rest (requests in flight, held, or
        seen). The others, at rest before and untouched since, keep their report: their
        meters have nothing to add, and :meth:`Cluster.publish` does not write them again.
        """
        now = self.clock()
        apps, reported = self.view.apps, self._reported
        measure = self.view.take_touched() | self._moving
        if reported.keys() != apps.keys():
            for name in reported.keys() - apps.keys():
                del reported[name]
                self.cluster.forget(name)  # a static app too, which the controller never had
            measure |= apps.keys() - reported.keys()
        moving = set()
        for name in measure:
            view = apps.get(name)
            if view is None:
                continue
            scaled = name in self.controller.apps  # a static app's peaks: no sample's
            area, peak = self.cluster.local.take(name, view.meter, now, sampled=scaled)
            load = reported[name] = AppLoad(
                area=area,
                level=view.meter.level,
                in_flight=view.in_flight,
                held=view.queued,
                peak=peak,
                at=view.last_request_at,
                machines={u.id: u.in_flight for u in view.upstreams.values() if u.in_flight},
                long_lived={u.id: u.long_lived for u in view.upstreams.values() if u.long_lived},
                failing={u.id: u.failing for u in view.upstreams.values() if u.failing},
            )
            if not load.idle():
                moving.add(name)
        self._moving = moving
        return reported, measure

    # --- the fleet view -----------------------------------------------------------------

    def _fleet(self) -> dict[str, AppFleet]:
        fleet = {}
        for name in self.view.apps:
            if name in self.controller.apps:
                last = self._published.get(name)
                if last is None:  # unchanged since we started: sequence 0
                    last = self._published[name] = self._fleet_of(name, 0)
                fleet[name] = last
        return fleet

    def _machines_of(self, app: str) -> list[list[Any]]:
        """The published lists; a hung machine held out of rotation until its restart
        (``Upstream.held``) goes as cordoned: no replica's proxy probes it."""
        return [
            [u.id, u.host, u.port, u.state, u.cordoned or u.held]
            for u in self.view.app(app).upstreams.values()
        ]

    def _critical_of(self, app: str) -> tuple[str, ...]:
        return tuple(u.id for u in self.view.app(app).upstreams.values() if u.checks_critical)

    def _how_of(self, app: str) -> dict[str, str]:
        return {u.id: u.how for u in self.view.app(app).upstreams.values() if u.how is not None}

    def _ours_of(self, app: str) -> tuple[str, ...]:
        """The machines cordoned by a drain of ours (``AppFleet.ours``)."""
        return tuple(u.id for u in self.view.app(app).upstreams.values() if u.cordoned_by_us)

    def _down_sick_of(self, app: str) -> tuple[str, ...]:
        rt = self.controller.apps.get(app)
        return () if rt is None else tuple(sorted(rt.down_sick))

    def _fleet_of(self, app: str, seq: int) -> AppFleet:
        """The app's view as published, numbered ``seq``."""
        return AppFleet(
            seq,
            self._machines_of(app),
            self._critical_of(app),
            self._how_of(app),
            self._down_sick_of(app),
            self._missing_now(app),
            self._ours_of(app),
        )

    def _machines_changed(self, app: str, *, again: bool = False) -> None:
        """The view's listener: number the change, and (leader) push it. A list that
        found the machines as they were (most of them) is no change to the followers.
        ``again``: numbered and pushed even so (``_app_missing``). Only the apps we scale
        are published: a static app's backends, or the view of an app a reload is taking
        away (its cordons lifted), are not kept (:meth:`_app_removed`)."""
        if app not in self.controller.apps:
            return
        fleet = self._fleet_of(app, self._seq + 1)
        last = self._published.get(app)
        if (
            not again
            and last is not None
            and last.machines == fleet.machines
            and last.critical == fleet.critical
            and last.how == fleet.how
            and last.down_sick == fleet.down_sick
            and last.missing == fleet.missing
            and last.ours == fleet.ours
        ):
            return
        self._seq += 1
        self._published[app] = fleet
        if self.leading:
            self._dirty.add(app)
            self._push_wanted.set()

    def _app_removed(self, app: str) -> None:
        """A reload took ``app`` from the controller (``Controller.on_removed``): one
        added back starts clean. Forget what we published of it and whether our wake
        found it missing (kept, the leader published its old view, machines since gone or
        "missing", until its first list); and what we applied of the leader's view of it,
        and whether that said missing (kept, a follower's new view of it, with no
        machines, was not given the leader's, of the version applied before, until that
        changed), and apply the whole view next round; and its load (``Cluster.forget``).
        Here, not when a round finds the app gone: a reload that added it back before the
        next round left all that."""
        self.cluster.forget(app)
        self._published.pop(app, None)
        self._missing.pop(app, None)
        self._applied.pop(app, None)
        self._missing_at.pop(app, None)
        self._applied_apps = set()

    async def _push_changes(self) -> None:
        """The leader's pusher: every change of its view, at once (changes made together,
        in one pass of the event loop, go in one message)."""
        while True:
            await self._push_wanted.wait()
            self._push_wanted.clear()
            dirty, self._dirty = self._dirty, set()
            await self._push(dirty)

    async def _push(self, dirty: Iterable[str]) -> None:
        """Push what we publish of the ``dirty`` apps, if we lead. A follower applies a
        version once (``_apply``): a view pushed twice, or an older one landing after a
        newer, changes nothing."""
        token = self.cluster.lease.token
        if not self.leading or token is None or not self.cluster.lease.held():
            return
        apps = {
            app: fleet
            for app in dirty
            if app in self.controller.apps
            and app in self.view.apps
            and (fleet := self._published.get(app)) is not None
        }
        if not apps:
            return
        try:
            await self.cluster.push_view(ViewPush(self.cluster.replica_id, token, apps))
        except Exception as exc:  # the followers' next read has it
            self._redis_trouble(exc)

    async def _on_subscribed(self) -> None:
        self.subscribed.set()

    def _on_wake(self, app: str) -> None:
        """A follower's wake request, as it publishes it: the leader wakes at once."""
        self._serve_wake(app)

    def _on_push(self, push: ViewPush) -> None:
        self.cluster.lease.observe(push.fence)
        if self.leading:
            return
        for app, fleet in push.apps.items():
            if self._apply(app, push.fence, fleet):
                self.pushes_applied += 1

    def _apply(self, app: str, fence: int, fleet: AppFleet, *, current: bool = False) -> bool:
        """Apply the leader's view of ``app`` if it is newer than what we applied last.
        ``current``: read from the report of the replica Redis names leader now, whose
        fence is then this leadership's even if lower than the last one applied (a
        leader that never saw the fences before a Redis that came back empty, with a
        clock behind the old one's)."""
        if app not in self.controller.apps:
            return False
        version = (fence, fleet.seq)
        applied = self._applied.get(app)
        if applied is not None and version <= applied and not (current and fence != applied[0]):
            return False
        critical = set(fleet.critical)
        ours = set(fleet.ours)
        # Fly's list no longer says which stopped machines were sick: a wake of ours (by
        # ourselves, or once we lead) tries them last as the leader's does (rule 2).
        self.controller.apps[app].down_sick = set(fleet.down_sick)
        view = self.view.app(app)
        before = {u.id: (u.cordoned, u.state) for u in view.upstreams.values()}
        view.set_machines(
            MachineInfo(
                id=str(i),
                host=str(h),
                port=int(p),
                state=str(s),
                cordoned=bool(c),
                checks_critical=str(i) in critical,
                how=fleet.how.get(str(i)),
                cordoned_by_us=bool(c) and str(i) in ours,
            )
            for i, h, p, s, c in fleet.machines
        )
        self._applied[app] = version
        if fleet.missing:
            self._missing_at[app] = version
        else:
            self._missing_at.pop(app, None)
        # The leader's drain of a machine ends what the leader's proxy carries there; what
        # ours carries ends as the drain shows in its view: WebSockets and event streams
        # at its cordon, the rest once the machine goes down (suspend, stop).
        for i, _, _, s, c in fleet.machines:
            was = before.get(str(i))
            if was is None:
                continue
            if s in GOING_DOWN_STATES and was[1] not in GOING_DOWN_STATES:
                self.view.end_long_lived(app, str(i), everything=True)
            elif c and not was[0]:
                self.view.end_long_lived(app, str(i))
        return True

    def _apply_fleet(self) -> None:
        """Apply the leader's view as read this round: the apps the read found changed,
        or every app after a whole read or a change of our own apps (a reload)."""
        published = self.cluster.leader_fleet()
        if published is None:
            self._applied_apps = set()
            return
        fence, fleet, changed = published
        apps = self.controller.apps.keys()
        if changed is None or apps != self._applied_apps:
            changed = frozenset(fleet)
            self._applied_apps = set(apps)
            self._note_unknown_to_leader(set(apps) - fleet.keys())
        for app in changed:
            machines = fleet.get(app)
            if machines is not None:
                self._apply(app, fence, machines, current=True)
        if not self.view_known:
            self.view_known = True
            self._freeze_once()  # a follower's views are built: they live as long as we do

    def _note_unknown_to_leader(self, missing: set[str]) -> None:
        """Apps of ours that the leader publishes no view of: its config lacks them (a
        config rolled out to some replicas first). Nobody scales them, and we route them
        with what we read ourselves: said once per app, and on /status."""
        for app in sorted(missing - self.unknown_to_leader):
            _log.warning(
                "app_unknown_to_leader",
                app=app,
                problem="the leader's config does not have this app: it neither scales it"
                " nor publishes its machines; give every replica the same apps",
            )
        self.unknown_to_leader = missing

    # --- wakes --------------------------------------------------------------------------

    def _scaled(self, app: str) -> AppRuntime:
        rt = self.controller.apps.get(app)
        if rt is None:
            raise WakeError(f"app {app} is not scaled by this replica")
        return rt

    async def _leader_waker(self, app: str) -> str:
        """:meth:`leader_wake`, counted as the controller counts its own (a wake that
        ends here without the controller's, or fails before it, counts too), if our
        proxy asked for it: one served for another replica only (``_serve_wake``) is
        counted there, by the wake that asked us (:meth:`Controller.counted`)."""
        try:
            return await self.controller.counted(
                app, self.leader_wake(app), asked=lambda: self.view.asked(app)
            )
        except AppMissing:
            self._app_missing(app)
            raise

    def _app_missing(self, app: str) -> None:
        """Our wake found that the Machines API has no such app: our view says so (a new
        sequence number even if it said so already: the followers' wakes that asked
        since wait for a view newer than the one they had), and is pushed at once."""
        rt = self.controller.apps.get(app)
        if rt is not None:
            self._missing[app] = rt.listed_at
            self._machines_changed(app, again=True)

    def _missing_now(self, app: str) -> bool:
        """Our last wake of ``app`` found it missing, and no list of it since said
        otherwise (``_app_missing``)."""
        if app not in self._missing:
            return False
        rt = self.controller.apps.get(app)
        if rt is not None and rt.listed_at == self._missing[app]:
            return True
        del self._missing[app]
        return False

    def _serve_wake(self, app: str) -> None:
        """Another replica's wake request: the leader wakes at once (or joins the wake
        under way), not as one asked by our proxy."""
        if self.leading and app in self.controller.apps:
            self.view.wake(app, asked=False)

    async def _follower_waker(self, app: str) -> str:
        """:meth:`remote_wake`, counted: the wakes our proxy's held requests ask for."""
        return await self.controller.counted(app, self.remote_wake(app))

    async def leader_wake(self, app: str) -> str:
        """The leader's wake: the controller's, under the app's wake claim. While a
        follower holds the claim (it woke by itself, thinking us lost), wait for it."""
        view = self.view.app(app)
        if view.routable():
            return "none"
        rt = self._scaled(app)
        deadline = self.clock() + rt.config.wake_timeout_s
        while True:
            result = await self._claimed_wake(app)
            if isinstance(result, str):
                return result
            if view.routable():
                return "none"
            left = deadline - self.clock()
            if left <= 0:
                # What kept the wake from a machine, as the last try found it: another
                # replica's claim (named, as Redis says now), or ours with every machine
                # refused, and so on; not "the claim was not free" whatever happened.
                why = result.why
                if why == _HELD_BY_OTHER:
                    why = await self._claim_holder(app)
                raise WakeError(f"app {app}: no machine woken within the wake timeout: {why}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(REPORT_S, left)):
                    await view.changed()

    async def _claimed_wake(self, app: str) -> str | _Yielded:
        """Take the app's wake claim and wake under it; :class:`_Yielded` (saying why) if
        another replica holds the claim or Redis cannot be reached (no claim, no wake:
        nothing proves it is ours), or the wake's take-back was refused (no machine
        routes: the caller wakes again)."""
        try:
            claim = await self._take_claim(app)
        except Exception as exc:
            self.claim_errors += 1
            self._redis_trouble(exc)
            return _Yielded(
                f"Redis could not be reached to take its wake claim ({type(exc).__name__})"
            )
        if claim is None or isinstance(claim, _Ours):
            self.claim_waits += 1
            if claim is None:
                return _Yielded(_HELD_BY_OTHER)
            return _Yielded("its wake claim was held by another wake of this replica")
        async with self._holding(claim):
            rt = self.controller.apps.get(app)
            if rt is None:
                raise WakeError(f"app {app} is not scaled by this replica")
            if not self.leading and self.view.app(app).routable():
                # The leader's push of the machine it woke came while we took the claim
                # (its release and the push travel apart): nothing to wake by ourselves.
                return "none"
            # What the API says now, unless we lead and Redis names us as the app's last
            # waker (then our ticks' view is as fresh as it gets). Nobody named is no proof
            # that nobody else woke it: Redis may have lost the record (a FLUSHALL, a
            # failover to an empty replica) after a follower's self-wake.
            # Nor is our own name, after a wake of ours whose read failed: its take named
            # us, and the view it should have refreshed is as stale as before.
            if (
                not self.leading
                or claim.previous != self.cluster.replica_id
                or not rt.read_once
                or app in self._read_owed
            ):
                self._read_owed.add(app)
                await self._read_under_claim(rt)
                self._read_owed.discard(app)
            result = await self.controller.wake_uncounted(app)
            # A drain taken back routes in our view at once and the wake returns, while
            # its uncordon is still on its way to the API: the claim fences that call, so
            # it is held until the call is done (released first, the call was refused,
            # and the next list cordoned the machine again).
            lifting = [run.task for run in rt.running.values() if run.kind == "uncordon"]
            if lifting:
                await asyncio.wait(lifting)
            if result == WAKE_UNCORDON and not self.view.app(app).routable():
                # That uncordon was skipped: another holder's lease refused it, and the
                # machine is cordoned again (``Actuator._uncordon_refused``). No wake came
                # of it: None, as when the claim is not ours, so the caller wakes again
                # (the machine is busy for its skip: another one). "uncordon" ended the
                # wake with nothing routable; the leader's proxy asked again after
                # WAKE_RETRY_S, and a follower's request it served, only at its next ask.
                # (The waker goes on to another machine itself when the refusal comes
                # before it returns: ``Waker.wake``.)
                return _Yielded(
                    "every machine that could be woken was refused: its uncordon, by"
                    " another party's lease"
                )
            if self.leading:
                # The followers hear of the machine before the claim is free: the pusher
                # sends it a moment later, and a follower whose requests waited past
                # self_wake_after_s for our wake (a cold start of Fly's takes longer)
                # took the claim in between and read the API for a machine we woke.
                self._dirty.discard(app)
                await self._push((app,))
            else:
                self.self_wakes += 1
                _log.info("cluster_self_wake", app=app, how=result, fence=claim.token)
            return result

    async def _claim_holder(self, app: str) -> str:
        """Who holds the app's wake claim, as Redis says now, for an error's text."""
        try:
            async with asyncio.timeout(REPORT_S):
                holder = await self.cluster.claims.holder_of(app)
        except Exception:  # (TimeoutError too) the text says less, that is all
            holder = None
        if holder is None:
            return f"its wake claim was {_HELD_BY_OTHER}"
        return f"its wake claim was held by replica {holder}"

    async def _read_under_claim(self, rt: AppRuntime) -> None:
        """The app's machines as the API lists them now, read once within
        ``control.api_timeout_s`` (as the wake's other reads): with the client's retries
        (up to ``fly.retry_deadline_s``) a slow API held the claim, which every other
        replica waits for, that long. A failed read of an app read before fails the wake
        (released at once, the claim is free; the proxy asks again): waking from a view
        that may miss another replica's wake could start a second machine. An app never
        read is read by the wake itself, one attempt at a time until its deadline."""
        waker = self.controller.waker
        try:
            with one_attempt(waker.api_timeout_s):
                await waker.refresh(rt)
        except NotFound as exc:
            raise app_missing(rt, exc) from exc  # as the wake's own reads: 502 at once
        except FlyError as exc:
            if rt.read_once or not exc.transient:
                raise
            _log.warning("wake_refresh_failed", app=rt.name, error=str(exc))

    async def _take_claim(self, app: str) -> Claim | _Ours | None:
        """The app's wake claim; ``_OURS`` if a task of this replica holds it already, None
        if another replica does (Redis errors propagate). One take per app at a time, so
        that two of our tasks never find each other's claim and take it for another's."""
        entry = self._claim_locks.get(app)
        if entry is None:
            entry = self._claim_locks[app] = _ClaimLock()
        entry.users += 1
        try:
            async with entry.lock:
                if app in self._claimed:
                    return _OURS
                claim = await self.cluster.claims.take(app)
                if claim is not None:
                    self._claimed.add(app)
                return claim
        finally:
            entry.users -= 1
            if not entry.users:  # nobody holds or waits for it: a new take makes one
                del self._claim_locks[app]

    @contextlib.asynccontextmanager
    async def _holding(self, claim: Claim, *, leading: bool = False) -> AsyncIterator[None]:
        """Act under ``claim`` (from ``_take_claim``): the API calls made here, and by the
        tasks started here, are fenced by it (with ``leading``, a tick's decision, by the
        leader lease too); renewed while held, released at the end."""
        fence = WAKE_FENCE.set(
            _both(self.cluster.lease.check, claim.check) if leading else claim.check
        )
        keeper = asyncio.get_running_loop().create_task(
            self._keep(claim), name=f"claim:{claim.app}"
        )
        try:
            yield
        finally:
            self._claimed.discard(claim.app)
            WAKE_FENCE.reset(fence)
            await cancel_and_wait([keeper])
            await claim.release()

    @contextlib.asynccontextmanager
    async def _tick_wake_claim(self, app: str) -> AsyncIterator[bool]:
        """For a start or resume that a tick of ours makes while nothing of ``app`` is
        routable (the actuator asks): the app's wake claim, so that a follower waking the
        app by itself (it could not reach us) and our tick do not each start a machine for
        one need. False, and the start is skipped, while another replica holds the claim
        or Redis cannot be reached; a claim this replica holds already (its own wake, or
        another start of the same tick) covers it. The start comes from a tick's decision,
        which only the leader may act on: it is fenced by the lease as well as the claim (a
        leader that hung past its lease must not send its stale decision under a claim)."""
        if not await self.cluster.lease.check():
            _log.warning("tick_wake_fenced", app=app, reason="this replica does not lead")
            yield False
            return
        claim: Claim | _Ours | None = None
        try:
            claim = await self._take_claim(app)
        except Exception as exc:
            self.claim_errors += 1
            self._redis_trouble(exc)
        if isinstance(claim, _Ours):
            yield True
            return
        if claim is None:
            self.tick_wakes_yielded += 1
            _log.info("tick_wake_yielded", app=app)
            yield False
            return
        async with self._holding(claim, leading=True):
            yield True

    async def _keep(self, claim: Claim) -> None:
        """Renew a wake claim every TTL/3 while its wake runs."""
        while True:
            await asyncio.sleep(self.settings.cluster.lease_ttl_s / 3)
            try:
                if not await claim.renew():
                    return
            except Exception as exc:  # the claim lapses by its local deadline
                self._redis_trouble(exc)

    async def remote_wake(self, app: str) -> str:
        """A follower's wake: ask the leader through Redis, then wait until the fleet view
        it publishes shows a routable machine. After ``cluster.self_wake_after_s`` without
        one (or half the app's ``wake_timeout_s``, if shorter: each wake starts the count
        again, and a wake timeout shorter than it never reached it), wake by itself under
        the app's wake claim (unless another replica holds it: then keep waiting). Once no
        request waits any more, neither: a machine is not woken for clients that left.
        "resume" or "start" by how the machine that came up did, as the leader publishes
        it (else by the state it was in before; or as our own wake says); "uncordon" if
        it was up but cordoned by the leader's drain (a drain taken back); "none" if one
        was routable already (or was up, under another party's cordon)."""
        view = self.view.app(app)
        if view.routable():
            return "none"
        rt = self._scaled(app)
        before = {u.id: (u.state, u.cordoned_by_us) for u in view.upstreams.values()}
        now = self.clock()
        deadline = now + rt.config.wake_timeout_s
        after = min(self.settings.cluster.self_wake_after_s, rt.config.wake_timeout_s / 2)
        self_wake_at = now + after
        ttl = self.settings.cluster.lease_ttl_s
        ask_at = now
        asked_from = self._applied.get(app)  # a view that says missing from before: stale
        while True:
            if self.leading:
                # We took the lease while waiting: our own wake path serves it now (the
                # request we queued would only join this very wake).
                return await self.leader_wake(app)
            routable = view.routable()
            if routable:
                return _waited_for(before, routable[0])
            missing = self._missing_at.get(app)
            if missing is not None and missing != asked_from:
                # The leader's wake since we asked found no such app: as its proxy does,
                # ours answers at once (502), not at wake_timeout_s.
                raise AppMissing(
                    f"app {app}: the Machines API has no such app (as the leader's wake found)"
                )
            now = self.clock()
            if now >= ask_at:
                # Asked again every lease TTL: a request the old leader popped and never
                # served (it died) reaches the next one.
                ask_at = now + ttl
                try:
                    await self.cluster.request_wake(app)
                except Exception as exc:  # Redis down: no leader hears us, nor any claim
                    self._redis_trouble(exc)
            elif now >= self_wake_at:
                if view.queued == 0:  # the clients left: wake nothing for them
                    raise WakeAbandoned(f"no request of {app} waits for a machine any more")
                result = await self._claimed_wake(app)
                if result == "none" and (routable := view.routable()):
                    # Its read found a machine up that another replica woke meanwhile:
                    # the requests still waited for that wake.
                    return _waited_for(before, routable[0])
                if isinstance(result, str):
                    return result
                self_wake_at = self.clock() + REPORT_S  # taken: look again (and at the view)
            now = self.clock()
            if now >= deadline:
                raise WakeError(
                    f"no machine of {app} came up within the wake timeout (no leader woke"
                    " it, and its wake claim could not be taken)"
                )
            left = min(ask_at, self_wake_at, deadline) - now
            if left > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await view.changed()

    # --- status -------------------------------------------------------------------------

    def decider_problems(self) -> list[str]:
        """Why no replica may be deciding, as a follower sees it (``/readyz?control=1``,
        ``autoscaler_control_healthy``): Redis out of reach, or no leader for longer
        than a lease takes to change hands. Empty while leading."""
        if self.leading:
            return []
        if not self._redis_ok:
            return ["Redis unreachable: no replica decides (no wake, no scaling) until it answers"]
        quiet = self.clock() - self._leader_seen_at
        if quiet > 2 * self.settings.cluster.lease_ttl_s:
            return [f"no replica has led for {quiet:.0f}s: nothing decides"]
        return []

    def status_document(self) -> dict[str, Any]:
        """The ``cluster`` section of ``/status``: replicas, leader, loads, report ages."""
        now = self.clock()
        doc = self.cluster.status(now)
        doc["may_lead"] = self.settings.cluster.lead
        doc["redis_ok"] = self._redis_ok
        doc["actions_fenced"] = self.api.refused
        doc["view_pushes_applied"] = self.pushes_applied
        doc["self_wakes"] = self.self_wakes
        doc["tick_wakes_yielded"] = self.tick_wakes_yielded
        doc["apps_unknown_to_leader"] = sorted(self.unknown_to_leader)
        mine = doc["replicas"][0]
        mine["apps"] = {
            name: {
                "in_flight": view.in_flight,
                "held": view.queued,
                "idle_s": None
                if view.last_request_at is None
                else round(now - view.last_request_at, 3),
            }
            for name, view in self.view.apps.items()
        }
        return doc
