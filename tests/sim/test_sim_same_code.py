"""The simulator and the live controller make the same decisions for the same inputs.

Three links: (1) both call the one ``decide`` and ``choose_wake`` of autoscaler.scaling;
(2) the snapshot the simulator hands to ``decide`` is, field by field, the one the
controller's AppRuntime builds for the same machines and load; (3) what the simulator
does is exactly what those calls returned, and ``decide`` on the recorded inputs gives
the recorded decisions again.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from autoscaler.config import AppConfig
from autoscaler.control import controller, runtime, wake
from autoscaler.control import view as view_mod
from autoscaler.fly import models as fm
from autoscaler.scaling import policy, window
from autoscaler.scaling.fleet import CORDON_METADATA_KEY, STARTED, STOPPED, SUSPENDED
from autoscaler.sim.engine import AppSim
from autoscaler.sim.model import Timings
from autoscaler.sim.ours import PolicyStrategy, snapshot

from .conftest import replay


def test_controller_and_simulator_import_the_same_policy_functions() -> None:
    assert controller.decide is policy.decide
    assert wake.choose_wake is policy.choose_wake
    assert runtime.LoadWindows is window.LoadWindows


def test_simulator_acts_on_exactly_what_decide_and_choose_wake_return(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_decide, real_wake = policy.decide, policy.choose_wake
    calls: list[tuple[tuple[Any, ...], policy.Decision]] = []
    wakes: list[policy.Action] = []

    def recording_decide(*args: Any) -> policy.Decision:
        decision = real_decide(*args)
        # The load windows go on filling; the fleet and the state are frozen (and cannot
        # be deep-copied in the compiled build, where a frozen class refuses copy's way
        # of rebuilding it).
        fleet, load, *rest = args
        calls.append(((fleet, copy.deepcopy(load), *rest), decision))
        return decision

    def recording_wake(fleet: Any) -> policy.Action | None:
        action = real_wake(fleet)
        if action is not None:
            wakes.append(action)
        return action

    monkeypatch.setattr(policy, "decide", recording_decide)
    monkeypatch.setattr(policy, "choose_wake", recording_wake)

    # Quiet, a burst that needs several machines, quiet again.
    requests = [(100.0 + i * 0.05, 2.0) for i in range(2000)] + [(900.0, 0.5)]
    ours = PolicyStrategy(record=True)
    stats = replay(requests, ours, horizon=1500.0, idle_to_zero_s=120, scale_down_delay_s=20)

    assert ours.history is not None
    assert stats.decisions == len(ours.history) > 100
    acted = [d for _, d in ours.history]
    assert all(any(d is c for _, c in calls) for d in acted), "every decision came from decide"
    assert wakes, "the first request needed a wake"
    # Every action the simulator carried out came from decide or choose_wake.
    planned = [(a.kind, a.machine_id) for a in wakes] + [
        (a.kind, a.machine_id) for d in acted for a in d.actions
    ]
    assert ours.carried_out is not None
    done = ours.carried_out
    assert sorted(done) == sorted(planned)
    assert any(kind == "drain" for kind, _ in done)
    assert len({mid for _, mid in done}) > 2
    # Pure: the recorded inputs give the recorded decisions again.
    for args, decision in calls[:: max(1, len(calls) // 200)]:
        assert real_decide(*args) == decision


async def test_snapshot_matches_the_controllers_for_the_same_machines_and_load() -> None:
    cfg = AppConfig(name="app", max_machines=4)
    now = [10.0]
    view = view_mod.AppView("app", clock=lambda: now[0])
    rt = runtime.AppRuntime.of(cfg)

    def fly_machine(mid: str, state: str, *, ours: bool = False) -> fm.Machine:
        meta = {CORDON_METADATA_KEY: "drain"} if ours else {}
        return fm.Machine(
            id=mid,
            state=state,
            private_ip=f"127.0.0.{len(rt.machines) + 2}",
            config=fm.MachineConfig(image="demo", metadata=meta),
            cordoned=ours,
        )

    # a: serving, 2 in flight. b: a drain still waiting for its request. c: suspended,
    # a resume of ours under way. d: stopped, never used.
    listed = [
        fly_machine("app-m0", STARTED),
        fly_machine("app-m1", STARTED, ours=True),
        fly_machine("app-m2", SUSPENDED),
        fly_machine("app-m3", STOPPED),
    ]
    rt.merge(listed, listed_at=10.0, now=10.0)
    rt.cordon_held.add("app-m1")
    view.set_machines(rt.infos())  # a and b became started at 10.0 in the view
    now[0] = 12.0
    a, b = view.upstreams["app-m0"], view.upstreams["app-m1"]
    view.begin(a)
    view.begin(b)
    now[0] = 13.5
    view.begin(a)
    idle = asyncio.get_running_loop().create_future()
    idle.set_result(True)
    task: asyncio.Task[bool] = asyncio.ensure_future(idle)
    rt.running["app-m1"] = runtime.Running("drain", task, waiting=True)
    rt.running["app-m2"] = runtime.Running("resume", task)
    live = rt.fleet(view)

    sim = AppSim("app", [], cfg, Timings(), PolicyStrategy(), horizon=0.0)
    m0, m1, m2, m3 = sim.machines
    for m in (m0, m1, m2, m3):
        m.state_since = 10.0
    sim.set_state(m0, STARTED, 10.0)
    sim.set_state(m1, STARTED, 10.0)
    m2.state, m2.busy = SUSPENDED, "resume"
    m0.in_flight, m0.last_used = 2, 13.5
    m1.in_flight, m1.last_used = 1, 12.0
    m1.busy, m1.draining, m1.cordoned, m1.ours = "drain", True, True, True
    simulated = snapshot("app", sim.machines)

    assert [m.id for m in simulated] == [m.id for m in live]
    for ours, theirs in zip(simulated, live, strict=True):
        assert ours == theirs, ours.id
    task.cancel()
