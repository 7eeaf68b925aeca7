"""The wake's pace and what it makes of a start it could not hear the answer of: against
the fake API and fake clock of test_controller's rig."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from structlog.testing import capture_logs

from autoscaler.control.wake import READ_GAP_S
from autoscaler.fly import models as m
from autoscaler.fly.errors import ServerError, TransportError
from autoscaler.scaling.fleet import CORDON_METADATA_KEY

from .fakes import FakeClock, FakeMachinesAPI, settle
from .test_controller import APP, Rig


def _time_lists(
    api: FakeMachinesAPI, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> list[float]:
    """The fake clock's time of each list of the app from now on (the list grows)."""
    read_at: list[float] = []
    list_machines = api.list_machines

    async def timed(app: str) -> list[m.Machine]:
        read_at.append(clock())
        return await list_machines(app)

    monkeypatch.setattr(api, "list_machines", timed)
    return read_at


@pytest.mark.parametrize("lists_fail", [False, True], ids=["lists-answer", "lists-fail"])
async def test_a_wake_through_an_outage_reads_its_app_at_most_once_a_second(
    api: FakeMachinesAPI, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, lists_fail: bool
) -> None:
    """Every lease request refused (an outage): each machine is tried again at its own
    pace (up to 1 s), the next machine at once after one fails, and the app was listed
    after every failed try besides: about three lists a second for three machines (seed
    13 of the chaos soak), where Fly allows app-level calls 1/s. The re-reads are now
    READ_GAP_S apart at least; the tries keep their pace."""
    machines = [api.add(APP, "stopped") for _ in range(3)]
    rig = Rig(api, clock, wake_timeout_s=10)
    await rig.tick()  # the app read once: the wake's reads are all re-reads
    api.calls.clear()
    api.fail["acquire_machine_lease"] = [ServerError(503, "unavailable")] * 1000
    if lists_fail:
        api.fail["list_machines"] = [ServerError(503, "unavailable")] * 1000
    read_at = _time_lists(api, clock, monkeypatch)
    wake = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    tried = api.ops("acquire_machine_lease")
    assert sorted(tried) == machines  # one after the other, at once
    for _ in range(60):
        await clock.advance(0.125)
    assert not wake.done()
    gaps = [b - a for a, b in itertools.pairwise(read_at)]
    assert len(read_at) >= 6  # read on...
    assert min(gaps) >= READ_GAP_S  # ...not faster than 1/s
    tries = api.ops("acquire_machine_lease")
    assert all(tries.count(mid) >= 7 for mid in machines)  # each one still about 1/s
    wake.cancel()
    await asyncio.gather(wake, return_exceptions=True)


def start_lands_unheard(
    api: FakeMachinesAPI, monkeypatch: pytest.MonkeyPatch, state: str
) -> list[str]:
    """The next start of a machine lands (it is then ``state``), and its answer is lost:
    the connection fails after the request was sent."""
    start_machine = api.start_machine
    lost: list[str] = []

    async def lands_unheard(
        app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> m.StartResult:
        result = await start_machine(app, machine_id, lease_nonce=lease_nonce)
        if lost:
            return result
        lost.append(machine_id)
        api.set(app, machine_id, state=state)
        raise TransportError("read error: connection reset", sent=True)

    monkeypatch.setattr(api, "start_machine", lands_unheard)
    return lost


@pytest.mark.parametrize("state", ["starting", "started"])
@pytest.mark.parametrize(("asleep", "how"), [("stopped", "start"), ("suspended", "resume")])
async def test_a_start_whose_answer_was_lost_is_found_up_and_routed(
    api: FakeMachinesAPI,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    state: str,
    asleep: str,
    how: str,
) -> None:
    """The start (or resume) of the first machine lands but its answer is lost (a
    transient error after the request was sent), and the read of the machine fails too.
    The wake set it aside as failed and woke the other machine as well: two machines for
    one need. Its next list shows the machine coming up (or up): it is our start, waited
    for (a resume as a resume: not beaten by a resume of the other) and routed, and the
    wake is named by it."""
    api.add(APP, asleep)
    api.add(APP, asleep)
    rig = Rig(api, clock, wake_timeout_s=30)
    await rig.tick()
    lost = start_lands_unheard(api, monkeypatch, state)
    api.fail["get_machine"] = [ServerError(503, "unavailable")]  # no answer there either
    wake = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    [first] = lost
    for _ in range(4):
        await clock.advance(0.25)
    api.set(APP, first, state="started")
    for _ in range(4):
        await clock.advance(0.25)
    assert await wake == how
    assert set(api.ops("start_machine")) == {first}  # the other one left asleep
    assert rig.routable() == {first}
    assert rig.metric("autoscaler_wake_duration_seconds_count", kind=how) == 1


async def test_a_start_whose_answer_was_lost_is_read_back_before_another_is_woken(
    api: FakeMachinesAPI, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start's answer is lost right after the wake's first read of the app, so its
    next list is not due yet (READ_GAP_S): the actuator reads the machine back at once,
    finds it starting, and goes on with that start, rather than fail it and leave the
    wake to start the other machine. Counted a start done, not a failed one."""
    api.add(APP, "stopped")
    api.add(APP, "stopped")
    rig = Rig(api, clock, wake_timeout_s=30)
    lost = start_lands_unheard(api, monkeypatch, "starting")
    wake = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    [first] = lost
    api.set(APP, first, state="started")
    assert await wake == "start"
    assert api.ops("start_machine") == [first]
    assert api.ops("get_machine") == [first]
    assert rig.routable() == {first}
    assert rig.metric("autoscaler_scaling_actions_total", action="start", result="ok") == 1
    assert rig.metric("autoscaler_scaling_actions_total", action="start", result="error") == 0


@pytest.mark.parametrize("moving", ["starting", "stopping"])
async def test_a_wake_that_watches_another_party_s_change_reads_at_most_once_a_second_in_an_outage(
    api: FakeMachinesAPI, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, moving: str
) -> None:
    """The app's only machine is being started (or stopped) by another party, and every
    list fails: the wake watched it with a list every RECHECK_S (0.25 s), each one
    failing, four app-level calls a second where Fly allows one. After a read that
    failed, the next is READ_GAP_S after it; once a list answers, the watch reads at its
    own pace again and sees the machine up."""
    mid = api.add(APP, moving)
    rig = Rig(api, clock, wake_timeout_s=30)
    await rig.tick()  # the app read once: the wake's reads are all re-reads
    api.fail["list_machines"] = [ServerError(503, "unavailable")] * 1000
    read_at = _time_lists(api, clock, monkeypatch)
    wake = asyncio.ensure_future(rig.ctl.wake(APP))
    for _ in range(48):  # 6 s, under START_PATIENCE_S
        await clock.advance(0.125)
    assert not wake.done()
    gaps = [b - a for a, b in itertools.pairwise(read_at)]
    assert len(read_at) >= 5  # read on...
    assert min(gaps) >= READ_GAP_S  # ...not faster than 1/s
    api.fail["list_machines"].clear()  # the API answers again
    api.set(APP, mid, state="stopped" if moving == "stopping" else "started")
    for _ in range(24):
        await clock.advance(0.125)
    assert await wake == "start"
    assert rig.routable() == {mid}


async def test_a_drain_taken_back_is_timed_as_an_uncordon_wake(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A wake that took a drain back (a cordon of ours left on a started machine, lifted)
    said so in its answer and line, but the wake duration histogram left it out: the
    0.5 s its held requests waited for the app's first read showed on no dashboard. It
    is observed with kind "uncordon", and its line says what it took."""
    api.add(APP, "started", cordoned=True, metadata={CORDON_METADATA_KEY: "drain"})
    rig = Rig(api, clock)
    assert rig.metric("autoscaler_wake_duration_seconds_count", kind="uncordon") == 0
    api.gates["list_machines"] = listed = asyncio.Event()
    with capture_logs() as logs:
        wake = asyncio.ensure_future(rig.ctl.wake(APP))
        await settle()
        assert api.ops("list_machines") == [None]  # the first read, not answered yet
        await clock.advance(0.5)
        listed.set()
        assert await wake == "uncordon"
    assert [(e["how"], e["took_s"]) for e in logs if e["event"] == "wake"] == [("uncordon", 0.5)]
    assert rig.metric("autoscaler_wake_duration_seconds_count", kind="uncordon") == 1
    assert rig.metric("autoscaler_wake_duration_seconds_sum", kind="uncordon") == 0.5


async def test_a_wake_that_joins_the_tick_s_start_says_so_in_its_line(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A wake asked for while a start of the tick's is under way joins it: timed as the
    others, but it wrote no line, where every other wake that brought a machine up
    writes one (docs/logs.md). Its line names the machine and what it waited for."""
    [mid] = [api.add(APP, "stopped")]
    rig = Rig(api, clock, min_machines=1)
    api.gates["start_machine"] = go = asyncio.Event()
    await rig.tick()  # min_machines: the tick starts the machine, held at the API
    await settle()
    assert api.ops("start_machine") == [mid]
    with capture_logs() as logs:
        wake = asyncio.ensure_future(rig.ctl.wake(APP))
        await settle()
        await clock.advance(0.25)
        go.set()
        assert await wake == "start"
    lines = [e for e in logs if e["event"] == "wake"]
    assert [(e["machine"], e["how"], e["waited_for"], e["took_s"]) for e in lines] == [
        (mid, "start", "our start", 0.25)
    ]
    assert rig.metric("autoscaler_wake_duration_seconds_count", kind="start") == 1
