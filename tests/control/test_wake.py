"""The wake's pace: against the fake API and fake clock of test_controller's rig."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from autoscaler.control.wake import READ_GAP_S
from autoscaler.fly import models as m
from autoscaler.fly.errors import ServerError

from .fakes import FakeClock, FakeMachinesAPI, settle
from .test_controller import APP, Rig


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def api() -> FakeMachinesAPI:
    return FakeMachinesAPI()


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
    read_at: list[float] = []
    list_machines = api.list_machines

    async def timed(app: str) -> list[m.Machine]:
        read_at.append(clock())
        return await list_machines(app)

    monkeypatch.setattr(api, "list_machines", timed)
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
