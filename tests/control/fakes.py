"""A fake clock and a fake Machines API for controller tests: nothing sleeps for real.

``FakeClock.sleep`` parks the caller until a test moves time past its deadline with
``advance``. ``FakeMachinesAPI`` keeps machines in memory and applies actions at once (a
``gate`` per operation can hold an action open, ``fail`` makes the next calls raise), and
records every call so tests can assert what the controller did. Machine leases work as on
the real API: while one is held, a change without its nonce raises LeaseHeld (409).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from autoscaler.fly import models as m
from autoscaler.fly.client import MachinesAPI
from autoscaler.fly.errors import Conflict, FlyError, LeaseHeld, NotFound, WaitTimeout


class FakeClock:
    """Monotonic time that moves only when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        if delay <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + delay, next(self._seq), fut))
        await fut

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper at its own deadline, in order."""
        target = self.now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, fut = heapq.heappop(self._sleepers)
            self.now = max(self.now, when)
            if not fut.done():
                fut.set_result(None)
            await settle()
        self.now = target
        await settle()


async def settle(rounds: int = 20) -> None:
    """Let every ready task run until the loop has nothing left to do right now."""
    for _ in range(rounds):
        await asyncio.sleep(0)


@dataclass
class Call:
    op: str
    machine_id: str | None = None
    arg: str | None = None
    nonce: str | None = None


@dataclass
class FakeMachinesAPI:
    """In-memory machines of one or more apps. Actions take effect at once."""

    machines: dict[str, dict[str, m.Machine]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    fail: dict[str, list[FlyError]] = field(default_factory=dict)
    """Operation name -> errors to raise on its next calls, one per call."""
    boot_fails: set[str] = field(default_factory=set)
    """Machine ids whose next start ends in the state "failed" (a boot that crashed)."""
    broken: set[str] = field(default_factory=set)
    """Machine ids whose every start ends in "failed"."""
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    """Operation name -> an event the operation waits for before it acts."""
    slow_transitions: bool = False
    """True: suspend and stop leave the machine suspending/stopping until ``finish``."""
    report_cordon: bool = True
    """False: list and get leave ``cordoned`` out, as the real API may."""
    leases: dict[tuple[str, str], m.Lease] = field(default_factory=dict)
    """(app, machine) -> the lease held on it; ``expires_at`` on ``clock``."""
    clock: Callable[[], float] | None = None
    """What leases expire by; None: they never expire on their own."""
    lapsed_refresh_renews: bool = False
    """True: a refresh of a lease that lapsed takes a new one, under a new nonce, as the
    emulator does (Fly does not say); False: 404."""
    started_start_ok: bool = False
    """True: a start of a started machine answers ``{"previous_state": "started"}``;
    False: 412, as the emulator answers (Fly does not say: docs/fly-api-notes.md)."""
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def add(
        self,
        app: str,
        state: str = "stopped",
        *,
        machine_id: str | None = None,
        cordoned: bool = False,
        metadata: dict[str, str] | None = None,
        port: int = 8080,
    ) -> str:
        n = next(self._ids)
        mid = machine_id or f"m{n:02d}"
        config = m.MachineConfig(
            image="demo",
            services=[m.MachineService(internal_port=port)],
            metadata=dict(metadata or {}),
        )
        self.machines.setdefault(app, {})[mid] = m.Machine(
            id=mid,
            state=state,
            private_ip=f"127.0.0.{n + 1}",
            instance_id=f"inst{n}",
            config=config,
            cordoned=cordoned,
        )
        return mid

    def get(self, app: str, mid: str) -> m.Machine:
        try:
            return self.machines[app][mid]
        except KeyError:
            raise NotFound(404, f"machine {mid} not found") from None

    def set(self, app: str, mid: str, **update: object) -> None:
        self.machines[app][mid] = self.get(app, mid).model_copy(update=update)
        self._changed.set()
        self._changed = asyncio.Event()

    def ops(self, op: str) -> list[str | None]:
        return [c.machine_id for c in self.calls if c.op == op]

    async def _enter(
        self,
        op: str,
        mid: str | None = None,
        arg: str | None = None,
        *,
        nonce: str | None = None,
        app: str | None = None,
    ) -> None:
        """Record the call, wait at its gate, raise an injected error; a change (``app``
        given) of a machine leased by another is refused when it lands, as on Fly."""
        self.calls.append(Call(op, mid, arg, nonce))
        gate = self.gates.get(op)
        if gate is not None:
            await gate.wait()
        errors = self.fail.get(op)
        if errors:
            raise errors.pop(0)
        if app is not None and mid is not None:
            lease = self.lease(app, mid)
            if lease is not None and lease.nonce != nonce:
                raise LeaseHeld(409, f"machine {mid} is leased by {lease.owner}")

    def lease(self, app: str, mid: str) -> m.Lease | None:
        """The live lease on the machine, if any."""
        lease = self.leases.get((app, mid))
        now = self.clock() if self.clock else None
        if lease is not None and now is not None and (lease.expires_at or 0) <= now:
            del self.leases[(app, mid)]
            return None
        return lease

    def _out(self, machine: m.Machine) -> m.Machine:
        return machine if self.report_cordon else machine.model_copy(update={"cordoned": None})

    # --- the MachinesAPI protocol -------------------------------------------------------

    def fly_time(self) -> float:
        """Fly's time of day: the host's (tests that need another pass ``wall=``)."""
        return time.time()

    async def list_machines(self, app: str) -> list[m.Machine]:
        await self._enter("list_machines", arg=app)
        return [self._out(x) for x in self.machines.get(app, {}).values()]

    async def get_machine(self, app: str, machine_id: str) -> m.Machine:
        await self._enter("get_machine", machine_id)
        return self._out(self.get(app, machine_id))

    async def start_machine(
        self, app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> m.StartResult:
        await self._enter("start_machine", machine_id, nonce=lease_nonce, app=app)
        machine = self.get(app, machine_id)
        if machine.state == "started" and self.started_start_ok:
            return m.StartResult(previous_state="started")
        # Fly starts a failed machine again, and takes back a suspend under way.
        if machine.state not in ("stopped", "suspended", "created", "failed", "suspending"):
            raise Conflict(412, f"cannot start a {machine.state} machine")
        failed = machine_id in self.boot_fails or machine_id in self.broken
        self.boot_fails.discard(machine_id)
        self.set(app, machine_id, state="failed" if failed else "started")
        return m.StartResult(previous_state=machine.state)

    async def stop_machine(
        self,
        app: str,
        machine_id: str,
        *,
        signal: str | None = None,
        timeout_s: float | None = None,
        lease_nonce: str | None = None,
    ) -> None:
        await self._enter("stop_machine", machine_id, signal, nonce=lease_nonce, app=app)
        machine = self.get(app, machine_id)
        if machine.state not in ("started", "suspended"):
            raise Conflict(412, f"cannot stop a {machine.state} machine")
        self.set(app, machine_id, state="stopping" if self.slow_transitions else "stopped")

    async def suspend_machine(
        self, app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> None:
        await self._enter("suspend_machine", machine_id, nonce=lease_nonce, app=app)
        if self.get(app, machine_id).state != "started":
            raise Conflict(412, "only a started machine can be suspended")
        self.set(app, machine_id, state="suspending" if self.slow_transitions else "suspended")

    def finish(self, app: str, machine_id: str) -> None:
        """End a slow suspend or stop."""
        done = {"suspending": "suspended", "stopping": "stopped"}
        self.set(app, machine_id, state=done[self.get(app, machine_id).state])

    async def wait_for_machine_state(
        self,
        app: str,
        machine_id: str,
        state: str | Sequence[str] = "started",
        timeout_s: float = 60,
        instance_id: str | None = None,
    ) -> m.WaitResult:
        wanted = {state} if isinstance(state, str) else set(state)
        await self._enter("wait_for_machine_state", machine_id, ",".join(sorted(wanted)))
        while self.get(app, machine_id).state not in wanted:
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=5)
            except TimeoutError:
                raise WaitTimeout(408, "fake: state not reached") from None
        return m.WaitResult(ok=True, state=self.get(app, machine_id).state)

    async def cordon_machine(
        self, app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> None:
        await self._enter("cordon_machine", machine_id, nonce=lease_nonce, app=app)
        self.set(app, machine_id, cordoned=True)

    async def uncordon_machine(
        self, app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> None:
        await self._enter("uncordon_machine", machine_id, nonce=lease_nonce, app=app)
        self.set(app, machine_id, cordoned=False)

    async def get_machine_metadata(self, app: str, machine_id: str, key: str) -> str:
        await self._enter("get_machine_metadata", machine_id, key)
        config = self.get(app, machine_id).config
        meta = (config.metadata if config else None) or {}
        if key not in meta:
            raise NotFound(404, f"no metadata key {key}")
        return meta[key]

    async def set_machine_metadata(
        self, app: str, machine_id: str, key: str, value: str, *, lease_nonce: str | None = None
    ) -> None:
        await self._enter("set_machine_metadata", machine_id, key, nonce=lease_nonce, app=app)
        self._meta(app, machine_id, key, value)

    async def delete_machine_metadata(
        self, app: str, machine_id: str, key: str, *, lease_nonce: str | None = None
    ) -> None:
        await self._enter("delete_machine_metadata", machine_id, key, nonce=lease_nonce, app=app)
        config = self.get(app, machine_id).config
        if key not in ((config.metadata if config else None) or {}):
            raise NotFound(404, f"metadata key not found: {key}")
        self._meta(app, machine_id, key, None)

    def _meta(self, app: str, mid: str, key: str, value: str | None) -> None:
        machine = self.get(app, mid)
        assert machine.config is not None
        meta = dict(machine.config.metadata or {})
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
        self.set(app, mid, config=machine.config.model_copy(update={"metadata": meta}))

    # --- leases ---------------------------------------------------------------------------

    def take_lease(self, app: str, mid: str, owner: str, ttl_s: float = 3600) -> m.Lease:
        """Someone else (a ``fly deploy``) takes the machine's lease, bypassing the calls."""
        now = self.clock() if self.clock else 0.0
        nonce = f"nonce-{next(self._nonces)}"
        lease = m.Lease(nonce=nonce, expires_at=int(now + ttl_s), owner=owner, description=owner)
        self.leases[(app, mid)] = lease
        return lease

    async def acquire_machine_lease(
        self, app: str, machine_id: str, *, ttl_s: int = 30, description: str | None = None
    ) -> m.Lease:
        await self._enter("acquire_machine_lease", machine_id, description)
        self.get(app, machine_id)
        held = self.lease(app, machine_id)
        if held is not None:
            raise LeaseHeld(409, f"lease currently held by {held.owner}")
        return self.take_lease(app, machine_id, description or "", ttl_s)

    async def get_machine_lease(self, app: str, machine_id: str) -> m.Lease:
        await self._enter("get_machine_lease", machine_id)
        held = self.lease(app, machine_id)
        if held is None:
            raise NotFound(404, "no lease")
        return held

    async def refresh_machine_lease(
        self,
        app: str,
        machine_id: str,
        nonce: str,
        *,
        ttl_s: int = 30,
        description: str | None = None,
    ) -> m.Lease:
        await self._enter("refresh_machine_lease", machine_id, description, nonce=nonce)
        held = self.lease(app, machine_id)
        if held is None and self.lapsed_refresh_renews:
            return self.take_lease(app, machine_id, description or "autoscaler", ttl_s)
        if held is None:
            raise NotFound(404, "no lease")
        if held.nonce != nonce:
            raise LeaseHeld(409, f"lease currently held by {held.owner}")
        now = self.clock() if self.clock else 0.0
        held.expires_at = int(now + ttl_s)
        return held

    async def release_machine_lease(self, app: str, machine_id: str, nonce: str) -> None:
        await self._enter("release_machine_lease", machine_id, nonce=nonce)
        held = self.lease(app, machine_id)
        if held is None:
            raise NotFound(404, "no lease")
        if held.nonce != nonce:
            raise LeaseHeld(409, "the lease nonce does not match the current lease")
        del self.leases[(app, machine_id)]


def _satisfies(api: FakeMachinesAPI) -> MachinesAPI:
    return api  # mypy proves the fake has the real interface
