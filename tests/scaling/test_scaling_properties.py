"""Properties of the policy over random fleets, knobs and load, tick after tick.

Each example runs a short loop in virtual time: decide, apply the actions at once (as a
perfect controller would), advance one second. Whatever happens, desired stays within
[min_machines, max_machines], panic never removes a machine nor lowers its desired count,
and the policy never touches machines it must leave alone.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoscaler.config import AppConfig
from autoscaler.scaling.fleet import Fleet, MachineSnapshot
from autoscaler.scaling.policy import Decision, PolicyState, decide
from autoscaler.scaling.window import LoadWindows, Sample

STATES = [
    "started",
    "stopped",
    "suspended",
    "starting",
    "stopping",
    "suspending",
    "failed",
    "created",
]


@st.composite
def machines(draw: st.DrawFn, index: int) -> MachineSnapshot:
    state = draw(st.sampled_from(STATES))
    cordoned = draw(st.booleans())
    ours = cordoned and draw(st.booleans())
    busy = draw(st.integers(0, 4)) == 0
    kinds = st.sampled_from(["start", "resume", "uncordon", "drain", "stop"])
    return MachineSnapshot(
        id=f"m{index}",
        state=state,
        cordoned=cordoned,
        cordoned_by_us=ours,
        draining=ours and state == "started" and draw(st.booleans()),
        busy=busy,
        pending=draw(st.none() | kinds) if busy else None,
        in_flight=draw(st.integers(0, 30)) if state == "started" else 0,
        last_used=draw(st.none() | st.floats(0, 100)),
        started_at=draw(st.floats(0, 100)) if state == "started" else None,
        state_since=draw(st.none() | st.floats(0, 100)),
        restartable=state == "failed" and draw(st.booleans()),
    )


@st.composite
def fleets(draw: st.DrawFn) -> Fleet:
    n = draw(st.integers(0, 12))
    return Fleet.of("app", [draw(machines(i)) for i in range(n)])


@st.composite
def apps(draw: st.DrawFn) -> AppConfig:
    low = draw(st.integers(0, 3))
    stable = draw(st.sampled_from([5.0, 20.0, 60.0]))
    knobs: dict[str, Any] = {
        "min_machines": low,
        "max_machines": draw(st.integers(max(1, low), 8)),
        "target_concurrency": draw(st.sampled_from([1.0, 5.0, 10.0, 33.0])),
        "target_utilization": draw(st.sampled_from([0.1, 0.5, 0.7, 1.0])),
        "stable_window_s": stable,
        "panic_window_s": draw(st.sampled_from([1.0, 2.0, stable])),
        "panic_threshold": draw(st.sampled_from([1.1, 2.0, 5.0])),
        "scale_down_delay_s": draw(st.sampled_from([0.0, 3.0, 30.0])),
        "scale_down_step": draw(st.integers(1, 3)),
        "idle_to_zero_s": draw(st.sampled_from([0.0, 10.0, 300.0])),
        "min_lifetime_s": draw(st.sampled_from([0.0, 5.0, 30.0])),
        "stop_suspended_after_s": draw(st.sampled_from([None, 0.0, 20.0])),
    }
    return AppConfig(name="app", **knobs)


def apply(fleet: Fleet, d: Decision, now: float) -> Fleet:
    """Carry the actions out at once, as a perfect controller would."""
    todo = {a.machine_id: a.kind for a in d.actions}
    out = []
    for m in fleet:
        kind = todo.get(m.id)
        if kind in ("resume", "start"):
            m = replace(m, state="started", started_at=now, state_since=now)
        elif kind == "uncordon":
            m = replace(m, cordoned=False, cordoned_by_us=False, draining=False)
        elif kind == "drain":
            m = replace(
                m,
                state="suspended",
                cordoned=False,
                cordoned_by_us=False,
                draining=False,
                in_flight=0,
                started_at=None,
                state_since=now,
            )
        elif kind == "stop":
            m = replace(m, state="stopped", state_since=now)
        out.append(m)
    return Fleet.of(fleet.app, out)


def check_one(fleet: Fleet, d: Decision, app: AppConfig, now: float, recent: bool) -> None:
    assert app.min_machines <= d.desired <= app.max_machines
    if recent:
        assert d.desired >= 1, "a recent request keeps at least one machine"
    elif d.current == 0:
        assert d.desired == app.min_machines, "nothing is woken for traffic that never came"
    assert d.shortfall >= 0
    by_id = {m.id: m for m in fleet}
    seen: set[str] = set()
    serving_drains = 0
    for a in d.actions:
        m = by_id[a.machine_id]
        assert a.machine_id not in seen
        seen.add(a.machine_id)
        # Busy machines are left alone, but for our own drain taken back in its suspend.
        assert not m.busy or (a.kind == "resume" and m.state == "suspending")
        assert not m.cordoned_by_others
        if a.kind == "resume":
            assert m.state in ("suspended", "suspending")
        elif a.kind == "stop":
            assert m.state == "suspended"
        elif a.kind == "start":
            assert m.state == "stopped" or (m.state == "failed" and m.restartable)
        elif a.kind == "drain":
            assert m.state == "started"
            if not m.cordoned:
                serving_drains += 1
                assert m.started_at is None or now - m.started_at >= app.min_lifetime_s
        elif a.kind == "uncordon":
            assert m.cordoned or m.draining
    assert serving_drains <= app.scale_down_step
    if d.panic:
        assert all(a.kind not in ("drain", "stop") for a in d.actions)
    adds = sum(a.kind in ("resume", "start") or a.kind == "uncordon" for a in d.actions)
    assert adds <= max(0, d.desired - d.current) + len(fleet)  # bounded; never runaway


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fleet=fleets(),
    app=apps(),
    levels=st.lists(st.floats(0, 300, allow_nan=False), min_size=1, max_size=25),
    gaps=st.lists(st.booleans(), min_size=25, max_size=25),
)
def test_policy_invariants_over_a_run(
    fleet: Fleet, app: AppConfig, levels: list[float], gaps: list[bool]
) -> None:
    windows = LoadWindows.for_app(app)
    state = PolicyState()
    last_request: float | None = None
    previous: Decision | None = None
    now = 100.0
    for level, quiet in zip(levels, gaps, strict=False):
        if quiet:
            level = 0.0
        else:
            last_request = now
        windows.add(Sample(now - 1, now, level, int(level + 0.999)))
        d = decide(fleet, windows, app, now, state, last_request)
        seen = [t for t in (last_request, windows.last_active) if t is not None]
        recent = fleet.in_flight > 0 or any(now == t or now - t < app.idle_to_zero_s for t in seen)
        check_one(fleet, d, app, now, recent)
        if previous is not None and previous.panic and d.panic:
            assert d.desired >= previous.desired, "panic never scales down"
        previous, state = d, d.state
        fleet = apply(fleet, d, now)
        now += 1.0


def test_a_burst_from_zero_and_back_to_sleep() -> None:
    """One burst, told tick by tick with a perfect controller: up at once, down slowly."""
    app = AppConfig(name="app")
    fleet = Fleet.of("app", [MachineSnapshot(f"m{i}", "suspended") for i in range(10)])
    windows = LoadWindows.for_app(app)
    state = PolicyState()
    last_request: float | None = None
    log: list[tuple[float, Decision]] = []
    for tick in range(1, 500):
        now = float(tick)
        level = 50.0 if 10 < now <= 40 else 0.0  # 50 concurrent clients for 30 s
        if level:
            last_request = now
        windows.add(Sample(now - 1, now, level, int(level)))
        d = decide(fleet, windows, app, now, state, last_request)
        log.append((now, d))
        state = d.state
        fleet = apply(fleet, d, now)

    def at(t: float) -> Decision:
        return next(d for now, d in log if now == t)

    resumes = [now for now, d in log for a in d.actions if a.kind == "resume"]
    drains = [now for now, d in log for a in d.actions if a.kind == "drain"]
    panic_ticks = [now for now, d in log if d.panic]
    assert at(10).desired == 0  # nothing woken before the first request
    assert at(11).desired == 1  # the first request wakes one at once
    assert panic_ticks[0] == 12  # the 6 s average reached 2 x 7 (one machine's worth)
    assert panic_ticks == [float(t) for t in range(12, 12 + len(panic_ticks))]
    assert len(panic_ticks) >= app.stable_window_s
    assert max(d.desired for _, d in log) == 8  # ceil(50 / 7)
    assert len(resumes) == 8
    assert max(resumes) <= 16, "no flapping: nothing woken after the burst's first seconds"
    assert min(drains) >= panic_ticks[-1] + app.scale_down_delay_s
    assert len(set(drains)) == len(drains)  # one a tick (scale_down_step 1)
    assert len(drains) == 8
    assert max(drains) == 40 + app.idle_to_zero_s  # the last one goes when idle
    assert at(300).desired == 1
    assert [m.state for m in fleet] == ["suspended"] * 10
