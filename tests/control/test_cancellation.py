"""Cordons are always ours to find: a drain (or the lifting of a cordon) cut at any API call,
with that request lost or landing anyway, never leaves a cordon without our key, and what it
leaves is finished or undone within a few ticks, by this process or the next one.

``Wire`` puts the fake API behind a wire on which call number N hangs. The test then cuts
the sequence there (the process dies, or a wake takes the drain back) and either drops the
request or lets it land, as a server that got it would, whatever became of the caller.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

from autoscaler.control.actions import CORDON_UNSURE_S
from autoscaler.control.leases import LEASE_TTL_S
from autoscaler.fly.errors import TransportError
from autoscaler.scaling.fleet import CORDON_METADATA_KEY

from .fakes import FakeClock, FakeMachinesAPI, settle
from .test_controller import APP, Rig, meta

TICKS = 4  # "within a few ticks"


class Wire:
    """``api`` behind a wire: call ``cut_at`` (1-based, list calls not counted) hangs until
    ``land`` or ``drop``; after ``die`` every call fails as if never sent."""

    def __init__(self, api: FakeMachinesAPI, cut_at: int | None = None) -> None:
        self.api = api
        self.cut_at = cut_at
        self.sent: list[str] = []
        self.reached = asyncio.Event()
        self.dead = False
        self._land = asyncio.Event()
        self._lost = False
        self._inflight: asyncio.Future[Any] | None = None

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.api, name)
        if name == "list_machines" or not inspect.iscoroutinefunction(target):
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.dead:
                raise TransportError("the process is gone", sent=False, operation=name)
            self.sent.append(name)
            if len(self.sent) != self.cut_at:
                return await target(*args, **kwargs)
            self._inflight = asyncio.ensure_future(self._on_the_wire(target, args, kwargs))
            self.reached.set()
            return await asyncio.shield(self._inflight)

        return call

    async def _on_the_wire(self, target: Any, args: Any, kwargs: Any) -> Any:
        await self._land.wait()
        if self._lost:  # what the caller sees of a request lost on the way, if it waits
            raise TransportError("connection reset", sent=True)
        return await target(*args, **kwargs)

    async def land(self) -> None:
        """The request reaches the server after all."""
        self._land.set()
        await self._settled()

    async def drop(self) -> None:
        """The request never reaches the server."""
        self._lost = True
        self._land.set()
        await self._settled()

    async def _settled(self) -> None:
        assert self._inflight is not None
        await asyncio.wait({self._inflight})
        if not self._inflight.cancelled():
            self._inflight.exception()  # retrieved: its caller may be gone
        await settle()

    def die(self) -> None:
        self.dead = True


def orphan_cordons(api: FakeMachinesAPI) -> list[str]:
    """Machines cordoned in the API without our key: nobody would ever lift those."""
    return [
        mid
        for mid, machine in api.machines[APP].items()
        if machine.cordoned and CORDON_METADATA_KEY not in meta(api, mid)
    ]


def settled_well(api: FakeMachinesAPI, rig: Rig, mid: str) -> bool:
    """Uncordoned, without our key, and either routable or asleep."""
    machine = api.get(APP, mid)
    if machine.cordoned or CORDON_METADATA_KEY in meta(api, mid):
        return False
    if machine.state == "started":
        return mid in rig.routable()
    return machine.state in ("suspended", "stopped")


async def run_ticks(rig: Rig, api: FakeMachinesAPI, clock: FakeClock, mid: str) -> None:
    for _ in range(TICKS):
        await rig.tick()
        await rig.ctl.idle()
        assert orphan_cordons(api) == []
        if settled_well(api, rig, mid) and not rig.ctl.apps[APP].running:
            return
        await clock.advance(1)
    raise AssertionError(f"not finished or undone in {TICKS} ticks: {api.get(APP, mid)}")


# -- the sequences and where they can be cut ------------------------------------------------


async def start_drain(rig: Rig, clock: FakeClock) -> None:
    """An idle started machine: the second tick drains it."""
    await rig.tick()
    await clock.advance(6)
    [action] = (await rig.tick()).actions
    assert action.kind == "drain"


async def start_lift(rig: Rig, clock: FakeClock) -> None:
    """A suspended machine with our cordon left on it: the tick lifts the cordon."""
    [action] = (await rig.tick()).actions
    assert action.kind == "uncordon"


SEQUENCES = {
    "drain": (dict(state="started"), start_drain),
    "lift": (
        dict(state="suspended", cordoned=True, metadata={CORDON_METADATA_KEY: "drain"}),
        start_lift,
    ),
}


async def calls_of(sequence: str) -> list[str]:
    """The API calls the sequence makes when nothing cuts it."""
    clock = FakeClock()
    api = FakeMachinesAPI(clock=clock)
    machine, start = SEQUENCES[sequence]
    api.add(APP, **machine)  # type: ignore[arg-type]
    wire = Wire(api)
    rig = Rig(wire, clock, idle_to_zero_s=5)  # type: ignore[arg-type]
    await start(rig, clock)
    await rig.ctl.idle()
    return wire.sent


CASES = [
    (sequence, n, name)
    for sequence in SEQUENCES
    for n, name in enumerate(asyncio.run(calls_of(sequence)), start=1)
]


def test_the_sequences_are_the_expected_calls() -> None:
    """If the drain gains a call, the cut points below follow; this pins what they are."""
    drain = [name for seq, _, name in CASES if seq == "drain"]
    assert drain == [
        "acquire_machine_lease",
        "set_machine_metadata",
        "cordon_machine",
        "suspend_machine",
        "wait_for_machine_state",
        "uncordon_machine",
        "delete_machine_metadata",
        "release_machine_lease",
    ]
    lift = [name for seq, _, name in CASES if seq == "lift"]
    assert lift == [
        "acquire_machine_lease",
        "uncordon_machine",
        "delete_machine_metadata",
        "release_machine_lease",
    ]


@pytest.mark.parametrize("landed", [False, True], ids=["lost", "landed"])
@pytest.mark.parametrize(
    ("sequence", "cut_at", "name"), CASES, ids=[f"{s}-{n}-{c}" for s, n, c in CASES]
)
async def test_a_process_dying_at_any_call_leaves_what_the_next_one_finishes(
    sequence: str, cut_at: int, name: str, landed: bool
) -> None:
    clock = FakeClock()
    api = FakeMachinesAPI(clock=clock)
    machine, start = SEQUENCES[sequence]
    mid = api.add(APP, **machine)  # type: ignore[arg-type]
    wire = Wire(api, cut_at)
    old = Rig(wire, clock, idle_to_zero_s=5)  # type: ignore[arg-type]
    await start(old, clock)
    await asyncio.wait_for(wire.reached.wait(), 5)
    assert wire.sent[-1] == name
    # The process dies with that request on the wire: nothing more leaves it.
    wire.die()
    for run in list(old.ctl.apps[APP].running.values()):
        run.task.cancel()
    await settle()
    await (wire.land() if landed else wire.drop())
    await old.ctl.stop()
    assert orphan_cordons(api) == []
    # The next process (on the same host) sees only the API.
    new = Rig(api, clock, idle_to_zero_s=5)
    await run_ticks(new, api, clock, mid)
    await new.ctl.stop()
    # A lease the dead process held lapses on its own, soon: it blocks nobody for long.
    lease = api.lease(APP, mid)
    if lease is not None:
        assert (lease.description or "").startswith(new.ctl.actuator.leases.owner)
        assert (lease.expires_at or 0) <= clock() + LEASE_TTL_S


TAKE_BACK_POINTS = [(n, name) for seq, n, name in CASES if seq == "drain" and n <= 3]


@pytest.mark.parametrize("landed", [False, True], ids=["lost", "landed"])
@pytest.mark.parametrize(
    ("cut_at", "name"), TAKE_BACK_POINTS, ids=[f"{n}-{c}" for n, c in TAKE_BACK_POINTS]
)
async def test_a_drain_taken_back_at_any_call_leaves_the_machine_routable(
    cut_at: int, name: str, landed: bool
) -> None:
    """A wake takes the drain back while its request is on the wire; the request is lost,
    or lands only after the take-back has begun its own calls."""
    clock = FakeClock()
    api = FakeMachinesAPI(clock=clock)
    mid = api.add(APP, "started")
    wire = Wire(api, cut_at)
    rig = Rig(wire, clock, idle_to_zero_s=5)  # type: ignore[arg-type]
    await start_drain(rig, clock)
    await asyncio.wait_for(wire.reached.wait(), 5)
    assert wire.sent[-1] == name
    assert await rig.ctl.wake(APP) == "none"
    assert rig.routable() == {mid}  # at once
    rig.app.begin(rig.app.upstreams[mid])  # the woken request keeps it in use from here
    await settle()
    await (wire.land() if landed else wire.drop())
    await rig.ctl.idle()
    assert orphan_cordons(api) == []
    assert api.get(APP, mid).cordoned is False
    assert rig.routable() == {mid}
    # A cordon request lost without an answer may still land for a while: our key waits
    # that long (harmless: the key alone routes no differently), then goes.
    await clock.advance(CORDON_UNSURE_S)
    await run_ticks(rig, api, clock, mid)
    assert api.get(APP, mid).state == "started"
    assert rig.routable() == {mid}
    await rig.ctl.stop()
    assert api.lease(APP, mid) is None


async def test_a_cordon_landing_late_after_a_lost_answer_keeps_our_key() -> None:
    """The cordon request of a drain taken back fails without an answer (sent, then the
    connection died): it may still land. Our key stays on the machine until that cannot
    happen any more, and cleanup drops it only once a fresh list shows no cordon."""
    clock = FakeClock()
    api = FakeMachinesAPI(clock=clock)
    mid = api.add(APP, "started")
    rig = Rig(api, clock, idle_to_zero_s=5)
    api.gates["cordon_machine"] = gate = asyncio.Event()
    api.fail["cordon_machine"] = [TransportError("read timeout", sent=True)]
    await start_drain(rig, clock)
    assert await rig.ctl.wake(APP) == "none"
    rig.app.begin(rig.app.upstreams[mid])
    gate.set()
    await rig.ctl.idle()
    assert api.get(APP, mid).cordoned is False
    assert CORDON_METADATA_KEY in meta(api, mid)  # kept: the cordon may yet come
    # It does come, late: the key tells everyone it is ours, and it is lifted.
    api.set(APP, mid, cordoned=True)
    await clock.advance(1)
    await rig.tick()
    await rig.ctl.idle()
    assert orphan_cordons(api) == []
    await clock.advance(CORDON_UNSURE_S)  # past the time such a request could still land
    await run_ticks(rig, api, clock, mid)
    assert rig.routable() == {mid}
    await rig.ctl.stop()
