"""Cordons are always ours to find: a drain (or the lifting of a cordon) cut at any API call,
with that request lost or landing anyway, never leaves a cordon without our key, and what it
leaves is finished or undone within a few ticks, by this process or the next one.

``Wire`` puts the fake API behind a wire on which call number N hangs. The test then cuts
the sequence there (the process dies, or a wake takes the drain back) and either drops the
request or lets it land, as a server that got it would, whatever became of the caller.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import math
import warnings
from typing import Any

import pytest

from autoscaler.control.actions import CORDON_UNSURE_S, MARK_BOUND_S
from autoscaler.control.fencing import Fenced
from autoscaler.control.leases import LEASE_TTL_S
from autoscaler.control.runtime import mark_by, mark_until, mark_value
from autoscaler.fly.errors import TransportError
from autoscaler.scaling.fleet import CORDON_METADATA_KEY
from autoscaler.scaling.policy import Action

from .fakes import FakeClock, FakeMachinesAPI, settle
from .test_controller import APP, EPOCH, Rig, meta

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


async def start_cleanup(rig: Rig, clock: FakeClock) -> None:
    """A suspended machine with our key and no cordon (a cordon request may be on its
    way): once that cannot land any more, a tick drops the key."""
    await rig.tick()
    await rig.ctl.idle()
    await clock.advance(CORDON_UNSURE_S)
    assert (await rig.tick()).actions == ()  # the cleanup is the tick's, not the policy's


OUR_KEY = {CORDON_METADATA_KEY: "drain"}
SEQUENCES = {
    "drain": (dict(state="started"), start_drain),
    "lift": (dict(state="suspended", cordoned=True, metadata=OUR_KEY), start_lift),
    "cleanup": (dict(state="suspended", metadata=OUR_KEY), start_cleanup),
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
    cleanup = [name for seq, _, name in CASES if seq == "cleanup"]
    assert cleanup == ["acquire_machine_lease", "delete_machine_metadata", "release_machine_lease"]


async def tick_for(rig: Rig, api: FakeMachinesAPI, clock: FakeClock, n: int) -> None:
    """``n`` ticks a second apart; no cordon without our key after any of them."""
    for _ in range(n):
        await rig.tick()
        await rig.ctl.idle()
        assert orphan_cordons(api) == []
        await clock.advance(1)


async def end(old: Rig, wire: Wire, how: str) -> asyncio.Future[None]:
    """The process ends with a request on the wire: it dies (nothing more leaves it), or
    it is stopped (its tasks cancelled, its cordon requests cut off, its leases given back;
    none of that calls back the request on the wire). Its stop, which may wait for that
    request (a lease's release), goes on while the test does."""
    if how == "dies":
        wire.die()
        for run in list(old.ctl.apps[APP].running.values()):
            run.task.cancel()
        await settle()
    stopping = asyncio.ensure_future(old.ctl.stop())
    await settle()
    return stopping


LANDINGS = ["lost", "landed", "late", "later"]
"""The request on the wire never reaches the server; reaches it before the next process
starts; after the next process's first tick and what it did; after 8 ticks of it (past
the idle time after which it would drain a started machine, and does, where no cordon
request of the process before may land)."""


@pytest.mark.parametrize("how", ["dies", "stopped"])
@pytest.mark.parametrize("landing", LANDINGS)
@pytest.mark.parametrize(
    ("sequence", "cut_at", "name"), CASES, ids=[f"{s}-{n}-{c}" for s, n, c in CASES]
)
async def test_a_process_ending_at_any_call_leaves_what_the_next_one_finishes(
    sequence: str, cut_at: int, name: str, landing: str, how: str
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
    sent_at = clock()
    stopping = await end(old, wire, how)
    if landing in ("lost", "landed"):
        await (wire.land() if landing == "landed" else wire.drop())
        await stopping
    assert orphan_cordons(api) == []
    # The next process (on the same host) sees only the API.
    new = Rig(api, clock, idle_to_zero_s=5)
    if landing in ("late", "later"):
        await tick_for(new, api, clock, 1 if landing == "late" else 8)
        await wire.land()
        await stopping
        assert orphan_cordons(api) == []
    # A cordon of the process before may land until CORDON_UNSURE_S after it was sent.
    await tick_for(new, api, clock, 3)
    await clock.advance(max(0.0, sent_at + CORDON_UNSURE_S - clock()))
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
    assert await rig.ctl.wake(APP) == "uncordon"
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


async def _a_drain_taken_back_its_cordon_unanswered() -> tuple[
    FakeClock, FakeMachinesAPI, Rig, str, asyncio.Event
]:
    """One started machine whose drain a wake took back while its cordon request hangs
    (``gate``), to fail once let go without an answer (sent, then the connection died):
    it may still land."""
    clock = FakeClock()
    api = FakeMachinesAPI(clock=clock)
    mid = api.add(APP, "started")
    rig = Rig(api, clock, idle_to_zero_s=5)
    api.gates["cordon_machine"] = gate = asyncio.Event()
    api.fail["cordon_machine"] = [TransportError("read timeout", sent=True)]
    await start_drain(rig, clock)
    assert await rig.ctl.wake(APP) == "uncordon"
    return clock, api, rig, mid, gate


async def test_a_cordon_landing_late_after_a_lost_answer_keeps_our_key() -> None:
    """The cordon request of a drain taken back fails without an answer (sent, then the
    connection died): it may still land. Our key stays on the machine until that cannot
    happen any more, and cleanup drops it only once a fresh list shows no cordon."""
    clock, api, rig, mid, gate = await _a_drain_taken_back_its_cordon_unanswered()
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


async def test_no_second_drain_while_a_cordon_request_may_land() -> None:
    """One cordon request of ours per machine may be outstanding, never two: with a second
    one landed (cordoned, our key), a process dying then leaves what the next one takes
    for a drain to finish, and the first request's cordon landed after it was lifted."""
    clock, api, rig, mid, gate = await _a_drain_taken_back_its_cordon_unanswered()
    gate.set()
    await rig.ctl.idle()
    assert api.ops("cordon_machine") == [mid]
    # Idle again: the policy wants it drained, but not while that request may land.
    for _ in range(10):
        await clock.advance(1)
        await rig.tick()
        await rig.ctl.idle()
    assert api.ops("cordon_machine") == [mid]
    assert api.get(APP, mid).state == "started"
    await clock.advance(CORDON_UNSURE_S)  # then it is (the first tick drops the key)
    await tick_for(rig, api, clock, 3)
    assert api.ops("cordon_machine") == [mid, mid]
    assert settled_well(api, rig, mid)
    assert api.get(APP, mid).state == "suspended"
    await rig.ctl.stop()


async def cordon_on_the_wire(clock: FakeClock, api: FakeMachinesAPI) -> tuple[str, Wire]:
    """A process drains the app's only machine and dies with its cordon request on the
    wire (our key is on the machine, the cordon not yet)."""
    mid, wire, old = await cordon_sent(clock, api)
    await end(old, wire, "dies")
    return mid, wire


async def cordon_sent(
    clock: FakeClock, api: FakeMachinesAPI, writer: str | None = None
) -> tuple[str, Wire, Rig]:
    """A process drains the app's only machine and has sent its cordon request, not yet
    answered: the machine, the wire and the process (whose key names ``writer``)."""
    mid = api.add(APP, "started")
    wire = Wire(api, 3)
    old = Rig(wire, clock, idle_to_zero_s=5)  # type: ignore[arg-type]
    old.ctl.actuator.writer = lambda: writer
    await start_drain(old, clock)
    await asyncio.wait_for(wire.reached.wait(), 5)
    assert wire.sent[-1] == "cordon_machine"
    return mid, wire, old


async def test_a_cordon_of_the_process_before_the_one_before_is_ours_too() -> None:
    """The next process stops before the dead one's cordon request lands, and a third one
    starts: that one finds our key and keeps it as long as the request may come."""
    clock = FakeClock()
    api = FakeMachinesAPI(clock=clock)
    mid, wire = await cordon_on_the_wire(clock, api)
    sent_at = clock()
    second = Rig(api, clock, idle_to_zero_s=600)
    await tick_for(second, api, clock, 30)
    await second.ctl.stop()
    third = Rig(api, clock, idle_to_zero_s=600)
    await tick_for(third, api, clock, 20)
    assert clock() < sent_at + CORDON_UNSURE_S
    await wire.land()
    assert orphan_cordons(api) == []
    await clock.advance(CORDON_UNSURE_S)
    await run_ticks(third, api, clock, mid)
    await third.ctl.stop()


async def test_a_controller_that_starts_deciding_late_keeps_the_keys_it_finds() -> None:
    """In cluster mode a replica's controller is made when the process starts and begins
    to decide when it wins the lease, maybe much later: the cordon requests of the leader
    before it may still land then."""
    clock = FakeClock()
    api = FakeMachinesAPI(clock=clock)
    rig = Rig(api, clock, idle_to_zero_s=600)  # a follower's, long before it leads
    await clock.advance(10 * CORDON_UNSURE_S)
    mid, wire = await cordon_on_the_wire(clock, api)  # the leader's drain, cut short
    await rig.ctl.start()  # this replica leads now
    try:
        for _ in range(3):
            await clock.advance(1)
            await rig.ctl.idle()
            assert orphan_cordons(api) == []
        assert rig.ctl.apps[APP].read_once
        await wire.land()
        assert orphan_cordons(api) == []
        assert api.get(APP, mid).cordoned is True  # ours: the policy lifts or finishes it
    finally:
        await rig.ctl.stop()


async def test_a_follower_keeps_our_key_when_it_wakes_a_machine_itself() -> None:
    """A follower (cluster mode) that wakes a machine itself (no leader answered) lifts
    our cordon there but leaves our key: the leader's cordon request may still land."""
    clock = FakeClock()
    api = FakeMachinesAPI(clock=clock)
    follower = Rig(api, clock)
    follower.ctl.actuator.drains_all = lambda: False
    await clock.advance(10 * CORDON_UNSURE_S)  # long past its own start
    # The leader's drain: suspended, uncordoned, our key kept (its cordon request of an
    # earlier drain, taken back, ended without an answer).
    mid = api.add(APP, "suspended", metadata=dict(OUR_KEY))
    assert await follower.ctl.wake(APP) == "resume"
    await follower.ctl.idle()
    assert follower.routable() == {mid}
    assert CORDON_METADATA_KEY in meta(api, mid)
    api.set(APP, mid, cordoned=True)  # that request lands
    assert orphan_cordons(api) == []
    await follower.ctl.stop()


async def test_without_the_api_s_cordon_flag_a_woken_machine_routes_at_once() -> None:
    """An API that leaves ``cordoned`` out shows our cordon by our key alone: a key kept
    there would keep the machine the next process woke out of routing. There the key goes
    with the cordon, as before."""
    clock = FakeClock()
    api = FakeMachinesAPI(clock=clock, report_cordon=False)
    mid = api.add(APP, "suspended", cordoned=True, metadata=dict(OUR_KEY))
    rig = Rig(api, clock)
    await rig.tick()
    await rig.ctl.idle()
    assert rig.routable() == set()  # asleep
    assert await rig.ctl.wake(APP) == "resume"
    await rig.ctl.idle()
    await clock.advance(1)
    await rig.tick()
    assert rig.routable() == {mid}
    assert CORDON_METADATA_KEY not in meta(api, mid)
    assert api.get(APP, mid).cordoned is False
    await rig.ctl.stop()


async def test_an_action_cancelled_before_it_began_leaves_no_call_unawaited() -> None:
    """Its task cancelled before its first step (a stop, a reload or a drain taken back in
    the same turn of the loop as its launch), the action's call was never closed: a
    "coroutine 'Actuator.release' was never awaited" warning, seen once in CI."""
    clock = FakeClock()
    api = FakeMachinesAPI(clock=clock)
    mid = api.add(APP, "suspended")
    rig = Rig(api, clock, idle_to_zero_s=5)
    await rig.tick()
    rt = rig.ctl.apps[APP]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kind in ("resume", "uncordon"):
            run = rig.ctl.actuator.launch(rt, Action(kind, mid, "test"))
            assert run is not None
            run.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run.task
        del run
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
    assert api.ops("acquire_machine_lease") == []
    await rig.ctl.stop()


async def test_a_step_down_lets_its_cordon_request_answer() -> None:
    """A leader that steps down (cluster mode: ``stop(handover=True)``) with a drain's
    cordon request on its way lets that request answer, within its stop's bound, instead
    of cutting it off: the next leader, which takes over once the step-down is over, then
    finds the machine cordoned with our key and finishes the drain at once. Cut off, the
    request could land at any time in the next CORDON_UNSURE_S, and the next leader held
    that machine (and every one it found with our key and no cordon) for that long."""
    clock = FakeClock()
    api = FakeMachinesAPI(clock=clock)
    mid, wire, old = await cordon_sent(clock, api)
    sent_at = clock()
    stopping = asyncio.ensure_future(old.ctl.stop(handover=True))
    await settle()
    assert not stopping.done()  # it waits for the cordon's answer
    await wire.land()
    await stopping
    assert api.get(APP, mid).cordoned is True
    assert CORDON_METADATA_KEY in meta(api, mid)
    new = Rig(api, clock, idle_to_zero_s=5)
    await run_ticks(new, api, clock, mid)
    assert clock() < sent_at + CORDON_UNSURE_S
    assert api.get(APP, mid).state == "suspended"
    await new.ctl.stop()


async def test_a_key_whose_cordon_can_no_longer_land_is_dropped_at_once_after_a_restart() -> None:
    """Our key says until when its drain's cordon request may land (sent within
    MARK_BOUND_S of the key, landing within CORDON_UNSURE_S of that). A process that
    died between a drain's uncordon and the key's removal, long enough ago, left a key
    that fronts no cordon: the next process drops it at its first tick and drains the
    idle machine at once, instead of holding it for CORDON_UNSURE_S. A key written
    recently (a cordon may still come) is kept, as one without a time is."""
    clock = FakeClock()
    api = FakeMachinesAPI(clock=clock)
    rig = Rig(api, clock, idle_to_zero_s=5)
    now = rig.ctl.actuator.wall()
    old = api.add(APP, "started", metadata={CORDON_METADATA_KEY: mark_value(now - 1)})
    fresh = api.add(APP, "started", metadata={CORDON_METADATA_KEY: mark_value(now + 30)})
    untimed = api.add(APP, "started", metadata=dict(OUR_KEY))
    await rig.tick()
    await rig.ctl.idle()
    assert CORDON_METADATA_KEY not in meta(api, old)
    assert CORDON_METADATA_KEY in meta(api, fresh)
    assert CORDON_METADATA_KEY in meta(api, untimed)
    await tick_for(rig, api, clock, 8)  # past idle_to_zero_s
    assert clock() < now - EPOCH + CORDON_UNSURE_S
    assert api.get(APP, old).state == "suspended"
    assert settled_well(api, rig, old)
    assert api.ops("cordon_machine") == [old]
    await rig.ctl.stop()


async def test_a_drain_s_key_says_until_when_its_cordon_may_land() -> None:
    clock = FakeClock()
    api = FakeMachinesAPI(clock=clock)
    mid = api.add(APP, "started")
    api.gates["cordon_machine"] = asyncio.Event()  # hangs: the key is on, the cordon not
    rig = Rig(api, clock, idle_to_zero_s=5)
    await start_drain(rig, clock)
    await settle()
    written = mark_until(meta(api, mid)[CORDON_METADATA_KEY])
    assert written == math.ceil(rig.ctl.actuator.wall() + MARK_BOUND_S + CORDON_UNSURE_S)
    await rig.ctl.stop()


async def test_a_leader_fenced_before_its_cordon_frees_the_machine_for_the_next_one() -> None:
    """Cluster mode: the leader loses its lead between our key's answer and its cordon,
    which the fence then refuses (never sent). Our key names the leader (its process and
    fencing token), and the leader, its step-down over, says that no cordon request of
    its own can land (``settled_until``, in its report): the next leader drains the idle
    machine at once instead of holding it until the key's time (up to MARK_BOUND_S +
    CORDON_UNSURE_S), the app unable to drain it meanwhile."""
    clock = FakeClock()
    api = FakeMachinesAPI(clock=clock)
    mid = api.add(APP, "started")
    api.fail["cordon_machine"] = [Fenced("cordon_machine")]
    old = Rig(api, clock, idle_to_zero_s=5)
    old.ctl.actuator.writer = lambda: "0ld.7"
    await start_drain(old, clock)
    await old.ctl.idle()
    assert mark_by(meta(api, mid)[CORDON_METADATA_KEY]) == "0ld.7"
    assert api.get(APP, mid).cordoned is False
    written_at = clock()
    await old.ctl.stop(handover=True)
    said = old.ctl.actuator.settled_until()
    assert said == 0.0
    new = Rig(api, clock, idle_to_zero_s=5)
    new.ctl.actuator.settled_by = lambda by: said if by == "0ld.7" else None
    await tick_for(new, api, clock, 8)
    assert clock() < written_at + CORDON_UNSURE_S
    assert api.get(APP, mid).state == "suspended"
    assert settled_well(api, new, mid)
    await new.ctl.stop()


async def test_a_leader_whose_cordon_may_still_land_says_so_and_is_waited_for() -> None:
    """The leader stops with its cordon request on the wire, cut off: it says that a
    cordon of its own may land until CORDON_UNSURE_S from then, and the next leader holds
    the machine that long; the request lands meanwhile and finds our key."""
    clock = FakeClock()
    api = FakeMachinesAPI(clock=clock)
    mid, wire, old = await cordon_sent(clock, api, writer="0ld.7")
    await old.ctl.stop()
    said = old.ctl.actuator.settled_until()
    assert said is not None
    assert said >= old.ctl.actuator.wall() + CORDON_UNSURE_S
    new = Rig(api, clock, idle_to_zero_s=5)
    new.ctl.actuator.settled_by = lambda by: said if by == "0ld.7" else None
    await tick_for(new, api, clock, 20)
    assert api.get(APP, mid).state == "started"  # held: not drained under that request
    await wire.land()
    assert orphan_cordons(api) == []
    await clock.advance(CORDON_UNSURE_S)
    await run_ticks(new, api, clock, mid)
    await new.ctl.stop()
