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
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

from autoscaler.control.runtime import AppRuntime, Running, TaskKind, ours
from autoscaler.control.view import Clock, FleetView
from autoscaler.fly.client import MachinesAPI
from autoscaler.fly.errors import BadRequest, Conflict, FlyError, NotFound
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
BOOT_WAIT_MIN_S = 60.0  # a cold boot may outlast the wake timeout; the machine still counts
PROBE_INTERVAL_S = 0.05
_log = get_logger("autoscaler.control")


class ActionError(Exception):
    """An action that did not reach its goal for a reason other than an API error."""


async def tcp_probe(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True if ``host:port`` accepts a TCP connection (the machine's server is up)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


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
    ) -> None:
        self.api = api
        self.backoff_max_s = backoff_max_s
        self.view = view
        self.metrics = metrics
        self.clock = clock
        self.sleep = sleep
        self.probe = probe

    # --- bookkeeping ------------------------------------------------------------------

    def publish(self, rt: AppRuntime) -> None:
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
        """Start ``action`` as the machine's task; None if the machine is busy or unknown."""
        mid = action.machine_id
        if mid not in rt.machines:
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
            return None
        kind: TaskKind = action.kind
        if kind == "resume" or kind == "start":
            coro = self.bring_up(rt, mid, kind)
        elif kind == "drain":
            coro = self.drain(rt, mid)
        elif kind == "stop":
            coro = self.stop_suspended(rt, mid)
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
            if rt.running.get(mid) is run:
                del rt.running[mid]

        task.add_done_callback(done)
        return run

    async def _guard(
        self, rt: AppRuntime, mid: str, kind: TaskKind, coro: Coroutine[Any, Any, bool]
    ) -> bool:
        """Turn an action's failure into a log line, a backoff and False; the next tick
        reads the truth and decides again (about another machine while this one cools)."""
        try:
            done = await coro
        except (FlyError, ActionError) as exc:
            rt.last_error = f"{kind} {mid}: {exc}"
            rt.failed(mid, self.clock(), self.backoff_max_s)
            _log.warning("action_failed", app=rt.name, machine=mid, action=kind, error=str(exc))
            return False
        rt.cooldown.pop(mid, None)
        return done

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

    def interrupt(self, rt: AppRuntime, mid: str) -> Running:
        """Take back a drain in its suspend step: cancel it and start the machine, which
        Fly allows while it is suspending (faster than waking any other machine)."""
        current = rt.running.pop(mid)
        current.task.cancel()
        rt.cordon_held.discard(mid)
        _log.info("suspend_taken_back", app=rt.name, machine=mid)
        return self._spawn(rt, mid, "resume", self.bring_up(rt, mid, "resume"))

    # --- the actions --------------------------------------------------------------------

    async def bring_up(self, rt: AppRuntime, mid: str, kind: TaskKind) -> bool:
        """Start (or resume) a machine; True once the API says started and its port answers.

        A cordon of ours on it (a drain taken back, or left behind) is lifted in our view
        at once and in the API once the machine is up, so the wake waits for no more than
        the boot. A failed machine's start counts against its restart budget.
        """
        app = rt.name
        machine = rt.machines[mid]
        deadline = self.clock() + max(rt.config.wake_timeout_s, BOOT_WAIT_MIN_S)
        restart = machine.state == FAILED
        cordon_ours = ours(machine)
        if cordon_ours:
            rt.record(mid, self.clock(), cordoned=False)
        try:
            up = await self._boot(rt, mid, kind, deadline)
        except (FlyError, ActionError):
            if rt.machines.get(mid) is not None and rt.machines[mid].state == FAILED:
                self._restart_failed(rt, mid, restart)
            raise
        if restart:
            self.metrics.machine_restarts.labels(app=app, result="ok").inc()
        rt.restarts.pop(mid, None)
        if cordon_ours:
            # A cordon we left behind would keep the woken machine out of Fly's routing.
            await self.release(rt, mid, force=True)
        return up

    def _restart_failed(self, rt: AppRuntime, mid: str, restart: bool) -> None:
        rec = rt.boot_failed(mid, self.clock())
        if restart:
            self.metrics.machine_restarts.labels(app=rt.name, result="failed").inc()
        if rec.exhausted:
            self.metrics.machine_restarts.labels(app=rt.name, result="exhausted").inc()
            _log.warning(
                "restart_budget_spent",
                app=rt.name,
                machine=mid,
                failures=rec.failures,
                hint="left alone until its state changes; see fly machine status",
            )

    async def _boot(self, rt: AppRuntime, mid: str, kind: TaskKind, deadline: float) -> bool:
        app = rt.name
        machine = rt.machines[mid]
        with self.counting_failure(rt, kind):
            try:
                await self.api.start_machine(app, mid)
            except Conflict:
                # 412: not startable from where it is; fine if it is starting or started.
                got = await self.api.get_machine(app, mid)
                if got.state not in (STARTED, "starting"):
                    raise
        rt.record(mid, self.clock(), state="starting")
        self.publish(rt)
        with self.counting_failure(rt, kind):
            # "failed" too, so a machine that cannot boot costs its boot, not the whole wait.
            reached = await self.api.wait_for_machine_state(
                app, mid, [STARTED, FAILED], timeout_s=max(1.0, deadline - self.clock())
            )
            if reached.state == FAILED:
                rt.record(mid, self.clock(), state=FAILED)
                raise ActionError(f"machine {mid} failed to boot")
            host, port = rt.address(machine)
            if not host:  # no address until it was placed: ask for it now
                fresh = await self.api.get_machine(app, mid)
                rt.machines[mid] = fresh.model_copy(update={"state": rt.machines[mid].state})
                host, port = rt.address(fresh)
            if not host:
                raise ActionError(f"machine {mid} has no private_ip to reach it on")
            while not await self.probe(host, port):
                if self.clock() >= deadline:
                    raise ActionError(f"port {port} of machine {mid} did not open in time")
                await self.sleep(PROBE_INTERVAL_S)
        self.count(rt, kind, True)
        rt.record(mid, self.clock(), state=STARTED)
        self.publish(rt)
        _log.info("machine_up", app=app, machine=mid, how=kind)
        return True

    async def drain(self, rt: AppRuntime, mid: str) -> bool:
        app = rt.name
        rt.cordon_held.add(mid)
        self.publish(rt)
        try:
            with self.counting_failure(rt, "cordon"):
                await self.api.set_machine_metadata(app, mid, CORDON_METADATA_KEY, "drain")
                rt.record(mid, self.clock(), marked=True)
                await self.api.cordon_machine(app, mid)
            self.count(rt, "cordon", True)
            rt.record(mid, self.clock(), cordoned=True)
            # WebSockets and streams would never end by themselves, and a suspend would
            # freeze them: they are told to go now (1001 / end of stream), clients reconnect
            # to machines that stay.
            self.view.end_long_lived(app, mid)
            idle = await self._wait_idle(rt, mid, rt.config.drain_timeout_s)
            run = rt.running.get(mid)
            if run is not None and run.kind == "drain":
                run.waiting = False  # from here on the drain cannot be taken back
            how = rt.config.scale_down_action
            _log.info("drain_done", app=app, machine=mid, idle=idle, then=how)
            await self._sleep_machine(rt, mid, how)
            await self.release(rt, mid)
        finally:
            rt.cordon_held.discard(mid)
            self.publish(rt)
        return True

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

    async def _sleep_machine(self, rt: AppRuntime, mid: str, how: str) -> None:
        """Suspend (falling back to stop where suspend is refused) or stop, and wait."""
        app = rt.name
        machine = rt.machines[mid]
        if how == "suspend":
            try:
                await self.api.suspend_machine(app, mid)
            except (BadRequest, Conflict) as exc:
                # Suspend is refused for some machines (large memory, volumes): stop then.
                self.count(rt, "suspend", False)
                _log.warning("suspend_refused", app=app, machine=mid, error=str(exc))
                how = "stop"
            except FlyError:
                self.count(rt, "suspend", False)
                raise
        if how == "stop":
            with self.counting_failure(rt, "stop"):
                await self.api.stop_machine(app, mid)
        target = SUSPENDED if how == "suspend" else STOPPED
        rt.record(mid, self.clock(), state="suspending" if how == "suspend" else "stopping")
        self.publish(rt)
        with self.counting_failure(rt, how):
            await self.api.wait_for_machine_state(
                app, mid, target, timeout_s=STATE_WAIT_S, instance_id=machine.instance_id
            )
        self.count(rt, how, True)
        rt.record(mid, self.clock(), state=target)
        self.publish(rt)

    async def stop_suspended(self, rt: AppRuntime, mid: str) -> bool:
        """A machine suspended past stop_suspended_after_s: stop it (its snapshot goes)."""
        await self._sleep_machine(rt, mid, "stop")
        return True

    async def release(self, rt: AppRuntime, mid: str, *, force: bool = False) -> bool:
        """Lift our cordon in the API and drop our key (undo a drain, or finish one).

        ``force``: do both whatever our record says (a cancelled drain may have cordoned
        without our hearing of it).
        """
        app = rt.name
        machine = rt.machines.get(mid)
        with self.counting_failure(rt, "uncordon"):
            if force or machine is None or machine.cordoned is not False:
                await self.api.uncordon_machine(app, mid)
            rt.record(mid, self.clock(), cordoned=False)
            if force or machine is None or ours(machine):
                with contextlib.suppress(NotFound):  # never set (a drain cut short): fine
                    await self.api.delete_machine_metadata(app, mid, CORDON_METADATA_KEY)
            rt.record(mid, self.clock(), marked=False)
        self.count(rt, "uncordon", True)
        self.publish(rt)
        return True

    def cleanup(self, rt: AppRuntime) -> None:
        """Drop our key where the API says the machine is not cordoned (a process that died
        between uncordon and the key's removal), so a later cordon by someone else is never
        taken for ours. Cordons that do carry our key are the policy's: it finishes the
        drain of a started machine and lifts the cordon of a sleeping one."""
        for mid, machine in list(rt.machines.items()):
            if mid in rt.running or not ours(machine) or machine.cordoned is not False:
                continue
            _log.info("stale_cordon_key", app=rt.name, machine=mid, state=machine.state)
            self._spawn(rt, mid, "cleanup", self.release(rt, mid))
