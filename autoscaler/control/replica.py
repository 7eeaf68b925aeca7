"""One replica of a cluster (``cluster.redis_url`` set): the glue between the Redis side
(:mod:`autoscaler.state`) and this process's controller and fleet view.

Every ``REPORT_S`` (250 ms) the replica:

- steps its lease every ``lease_ttl_s / 3`` (renew, or try to acquire), and checks the
  lease's local deadline every round: leadership gained starts the controller (its loops,
  its drains, its wake path); leadership lost (not renewed, Redis unreachable, a stale
  token) stops it at once, so a leader that cannot renew stops deciding within the TTL;
- publishes its own load per app, and, as leader, the fleet view it routes with;
- reads the other replicas' reports. The leader's ticks decide on the sum (the controller's
  ``load`` hook, :meth:`Replica.load`). Every replica writes the others' requests in flight
  per machine into ``Upstream.remote_in_flight`` (as last reported): the balancer's
  ``hard_limit`` counts them everywhere, the leader's policy and drains too.
  A follower routes with the fleet view the leader published (it never calls the Machines
  API), and asks the leader for wakes through Redis.

Every action the leader's controller sends goes through :class:`FencedAPI`: no valid
lease, no action.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from autoscaler.config import Settings
from autoscaler.control.actions import Probe, tcp_probe
from autoscaler.control.controller import Controller
from autoscaler.control.fencing import FencedAPI
from autoscaler.control.schedule import Budget
from autoscaler.control.view import Clock, FleetView, MachineInfo
from autoscaler.control.wake import WakeError
from autoscaler.fly.client import MachinesAPI
from autoscaler.logs import get_logger
from autoscaler.metrics import Metrics
from autoscaler.scaling.fleet import STARTED, SUSPENDED
from autoscaler.scaling.window import Sample
from autoscaler.state.cluster import REPORT_S, AppLoad, Cluster, idle_s

_log = get_logger("autoscaler.control.replica")


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
    ) -> None:
        self.settings = settings
        self.view = view
        self.metrics = metrics
        self.clock = clock
        self.cluster = cluster if cluster is not None else Cluster(settings.cluster, clock=clock)
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
        )
        self.leading = False
        self.view_known = False
        """A follower has applied a fleet view from the leader (readiness)."""
        self._task: asyncio.Task[None] | None = None
        self._applied: dict[str, list[list[Any]]] = {}
        self._redis_ok = True
        self._next_lease_step = 0.0

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, *, rounds: bool = True) -> None:
        """Join the cluster as a follower; the first round may make us leader.
        ``rounds=False`` (tests): the caller runs :meth:`round` by hand."""
        self.view.set_waker(self.remote_wake)
        self.metrics.cluster_leader.set(0)
        if rounds:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="cluster")

    async def stop(self) -> None:
        """Stop deciding, give the lease up (a follower takes over without waiting for the
        TTL), take our report out."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.leading:
            await self._step_down()
        self.view.set_waker(None)
        await self.cluster.close()

    async def _run(self) -> None:
        while True:
            await self.round()
            await asyncio.sleep(REPORT_S)

    async def round(self) -> None:
        """One round: lease, transitions, publish, read, then wakes (leader) or the fleet
        view (follower). Public so tests can drive rounds by hand."""
        now = self.clock()
        if now >= self._next_lease_step:
            self._next_lease_step = now + self.settings.cluster.lease_ttl_s / 3
            try:
                await self.cluster.lease.step()
            except Exception as exc:  # redis' errors: the lease lapses by its deadline
                self._redis_trouble(exc)
        leading = self.cluster.lease.held()
        if leading and not self.leading:
            await self._step_up()
        elif not leading and self.leading:
            await self._step_down()
        try:
            await self.cluster.publish(self._loads(), self._fleet() if leading else None)
            await self.cluster.read()
            if not leading:
                self._apply_fleet()
            for name in self.controller.apps:
                self.view.app(name).set_remote_in_flight(self.cluster.remote_in_flight(name))
            if leading:
                for app in await self.cluster.pop_wakes():
                    if app in self.controller.apps:
                        self.view.wake(app)
        except Exception as exc:
            self._redis_trouble(exc)
        else:
            if not self._redis_ok:
                _log.info("cluster_redis_back", replica=self.cluster.replica_id)
            self._redis_ok = True
        self.metrics.cluster_replicas.set(1 + len(self.cluster.others))

    def _redis_trouble(self, exc: Exception) -> None:
        if self._redis_ok:
            _log.warning("cluster_redis_unreachable", error=str(exc))
        self._redis_ok = False

    async def _step_up(self) -> None:
        self.leading = True
        self.metrics.cluster_leader.set(1)
        _log.info("cluster_leader", replica=self.cluster.replica_id, fence=self.cluster.lease.token)
        await self.controller.start()
        for view in self.view.apps.values():
            view.notify()  # a follower's wake still waiting now goes through our own path

    async def _step_down(self) -> None:
        self.leading = False
        self.metrics.cluster_leader.set(0)
        _log.warning("cluster_follower", replica=self.cluster.replica_id)
        await self.controller.stop()
        self.view.set_waker(self.remote_wake)

    # --- load ---------------------------------------------------------------------------

    def load(self, app: str, now: float) -> tuple[Sample, float | None]:
        """The controller's load hook: the whole cluster's sample and last request."""
        view = self.view.app(app)
        sample = self.cluster.sample(app, view.meter, now)
        return sample, self.cluster.last_request_at(app, view.last_request_at, now)

    def _loads(self) -> dict[str, AppLoad]:
        now = self.clock()
        loads = {}
        for name, view in self.view.apps.items():
            area, peak = self.cluster.local.take(name, view.meter, now)
            loads[name] = AppLoad(
                area=area,
                level=view.meter.level,
                in_flight=view.in_flight,
                held=view.queued,
                peak=peak,
                idle_s=idle_s(view.last_request_at, now),
                machines={u.id: u.in_flight for u in view.upstreams.values() if u.in_flight},
            )
        return loads

    # --- the fleet view -----------------------------------------------------------------

    def _fleet(self) -> dict[str, list[list[Any]]]:
        return {
            name: [[u.id, u.host, u.port, u.state, u.cordoned] for u in view.upstreams.values()]
            for name, view in self.view.apps.items()
            if name in self.controller.apps
        }

    def _apply_fleet(self) -> None:
        fleet = self.cluster.leader_fleet()
        if fleet is None:
            return
        for app, machines in fleet.items():
            if app not in self.controller.apps or self._applied.get(app) == machines:
                continue
            self.view.app(app).set_machines(
                MachineInfo(id=str(i), host=str(h), port=int(p), state=str(s), cordoned=bool(c))
                for i, h, p, s, c in machines
            )
            self._applied[app] = machines
        self.view_known = True

    async def remote_wake(self, app: str) -> str:
        """A follower's wake: ask the leader through Redis, then wait until the fleet view
        it publishes shows a routable machine. "resume" or "start" by the state the machine
        was in before; "none" if one was routable already."""
        view = self.view.app(app)
        if view.routable():
            return "none"
        rt = self.controller.apps.get(app)
        if rt is None:
            raise WakeError(f"app {app} is not scaled by this replica")
        before = {u.id: u.state for u in view.upstreams.values()}
        deadline = self.clock() + rt.config.wake_timeout_s
        ttl = self.settings.cluster.lease_ttl_s
        while True:
            if self.leading:
                # We took the lease while waiting: our own wake path serves it now (the
                # request we queued would only join this very wake).
                return await self.controller.wake(app)
            # Asked again every lease TTL: a request the old leader popped and never served
            # (it died) reaches the next one.
            await self.cluster.request_wake(app)
            asked_at = self.clock()
            while self.clock() - asked_at < ttl and not self.leading:
                routable = view.routable()
                if routable:
                    was = before.get(routable[0].id)
                    if was == SUSPENDED:
                        return "resume"
                    return "none" if was == STARTED else "start"
                left = min(ttl - (self.clock() - asked_at), deadline - self.clock())
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(view.changed(), timeout=left)
            if self.clock() >= deadline:
                raise WakeError(f"no leader woke a machine of {app} within the wake timeout")

    # --- status -------------------------------------------------------------------------

    def status_document(self) -> dict[str, Any]:
        """The ``cluster`` section of ``/status``: replicas, leader, loads, report ages."""
        now = self.clock()
        doc = self.cluster.status(now)
        doc["redis_ok"] = self._redis_ok
        doc["actions_fenced"] = self.api.refused
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
