"""The scaling policy, rule by rule, with explicit times (no clock, no sleeps).

Defaults unless a test says otherwise: target_concurrency 10 x target_utilization 0.7, so
one machine is planned for 7 requests in flight (the "unit"); panic at 2 x capacity.
"""

from __future__ import annotations

from typing import Any

import pytest

from autoscaler.config import AppConfig
from autoscaler.scaling.fleet import Fleet, MachineSnapshot
from autoscaler.scaling.policy import Action, Decision, PolicyState, choose_wake, decide
from autoscaler.scaling.window import LoadWindows, Sample

CALM = 100.0  # a panic_threshold that never triggers, to test normal mode alone


def cfg(**knobs: Any) -> AppConfig:
    return AppConfig(name="app", **knobs)


def m(mid: str, state: str = "started", **kw: Any) -> MachineSnapshot:
    if state == "started":
        kw.setdefault("started_at", 0.0)
    return MachineSnapshot(mid, state, **kw)


def fleet(*machines: MachineSnapshot) -> Fleet:
    return Fleet.of("app", machines)


def load(
    level: float, until: float, *, since: float | None = None, app: AppConfig | None = None
) -> LoadWindows:
    """A constant ``level`` over the stable window ending at ``until`` (one sample a second)."""
    app = app or cfg()
    w = LoadWindows.for_app(app)
    start = since if since is not None else until - app.stable_window_s
    t = start
    while t < until:
        w.add(Sample(t, t + 1, level, int(level + 0.999)))
        t += 1
    return w


def run(
    app: AppConfig,
    machines: Fleet,
    windows: LoadWindows,
    now: float,
    state: PolicyState | None = None,
    last_request_at: float | None = None,
) -> Decision:
    """``decide`` with a recent request by default, checking invariants every call makes."""
    if last_request_at is None:
        last_request_at = now
    d = decide(machines, windows, app, now, state or PolicyState(born=0.0), last_request_at)
    assert app.min_machines <= d.desired <= app.max_machines
    assert "\n" not in d.reason
    assert d.reason
    ids = [a.machine_id for a in d.actions]
    assert len(ids) == len(set(ids)), "at most one action per machine per tick"
    by_id = {x.id: x for x in machines}
    for a in d.actions:
        target = by_id[a.machine_id]
        takes_back = a.kind == "resume" and target.state == "suspending"
        assert not target.busy or takes_back, "busy machines are left alone (but our suspend)"
        assert not by_id[a.machine_id].cordoned_by_others, "others' cordons are left alone"
    if d.panic:
        # Panic removes nothing, but a sick machine whose replacement took the app over
        # max_machines.
        started = [x for x in machines if x.state == "started" and not x.cordoned]
        for a in d.actions:
            assert a.kind != "stop"
            if a.kind == "drain":
                assert by_id[a.machine_id].sick_since is not None
                assert len(started) > app.max_machines
    return d


def acts(d: Decision) -> list[tuple[str, str]]:
    return [(a.kind, a.machine_id) for a in d.actions]


def serving(n: int, **kw: Any) -> list[MachineSnapshot]:
    return [m(f"s{i}", **kw) for i in range(n)]


# --- rule 1: how many ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("up", "level", "knobs", "desired"),
    [
        (1, 0.0, {}, 1),  # min 0, but a request was recent: at least 1
        (1, 7.0, {}, 1),  # exactly one unit
        (1, 7.01, {}, 2),
        (2, 13.9, {}, 2),
        (2, 14.0, {}, 2),
        (3, 14.1, {}, 3),
        (2, 20.0, {"target_concurrency": 5, "target_utilization": 1.0}, 4),
        (3, 0.0, {"min_machines": 3}, 3),
        (3, 500.0, {"max_machines": 4}, 4),
        (0, 0.0, {"min_machines": 2}, 2),
        # hard_limit under the unit: a machine never gets more than 5, so 20 needs 4 (on
        # a unit of 7, 3 machines would leave 5 requests queued for good).
        (3, 20.0, {"hard_limit": 5}, 4),
    ],
)
def test_desired_is_demand_over_unit_clamped(
    up: int, level: float, knobs: dict[str, Any], desired: int
) -> None:
    app = cfg(panic_threshold=CALM, **knobs)
    spare = [m(f"z{i}", "suspended") for i in range(6)]
    d = run(app, fleet(*serving(up), *spare), load(level, 100, app=app), 100)
    assert d.desired == desired
    assert not d.panic
    assert d.current == up
    resumes = [a for a in d.actions if a.kind == "resume"]
    assert len(resumes) == max(0, desired - up)  # scale up at once


def test_float_noise_does_not_add_a_machine() -> None:
    app = cfg(target_concurrency=10, target_utilization=0.7, panic_threshold=CALM)
    d = run(app, fleet(*serving(3)), load(21.000000000000004, 100, app=app), 100)
    assert d.desired == 3


def test_scale_up_from_zero_on_a_recent_request_with_no_load_recorded_yet() -> None:
    app = cfg()
    d = run(app, fleet(m("a", "suspended")), LoadWindows.for_app(app), 10)
    assert (d.desired, acts(d)) == (1, [("resume", "a")])


def test_held_requests_are_demand() -> None:
    app = cfg()
    w = LoadWindows.for_app(app)
    w.add(Sample(0, 1, 20.0, 20))  # 20 requests held for a wake, none in flight
    d = run(app, fleet(*[m(f"z{i}", "stopped") for i in range(5)]), w, 1)
    assert d.desired == 3
    assert d.panic  # 20 >= 2 x 7 with nothing ready


# --- idle to zero ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last_request", "in_flight", "now", "desired", "actions"),
    [
        (0.0, 0, 299.0, 1, []),
        (0.0, 0, 300.0, 0, [("drain", "s0")]),
        (100.0, 0, 300.0, 1, []),
        (0.0, 1, 400.0, 1, []),  # a long request in flight is not idleness
    ],
)
def test_idle_to_zero(
    last_request: float, in_flight: int, now: float, desired: int, actions: list[tuple[str, str]]
) -> None:
    app = cfg()
    machines = fleet(m("s0", in_flight=in_flight, last_used=last_request))
    d = run(app, machines, load(0.0, now, app=app), now, last_request_at=last_request)
    assert d.desired == desired
    assert acts(d) == actions


def test_a_request_in_flight_is_never_idle_even_with_zero_idle_time() -> None:
    app = cfg(idle_to_zero_s=0)
    w = load(0.0, 100, app=app)
    assert run(app, fleet(m("s0", in_flight=1)), w, 100, last_request_at=0.0).desired == 1
    assert run(app, fleet(m("s0")), w, 100, last_request_at=100.0).desired == 1
    assert run(app, fleet(m("s0")), w, 100, last_request_at=99.0).desired == 0


def test_idle_counts_from_the_first_decision_when_nothing_is_known() -> None:
    """After a restart with no request seen yet, machines are not stopped at once."""
    app = cfg()
    machines = fleet(m("s0"))
    w = load(0.0, 1000, app=app)
    first = decide(machines, w, app, 1000, PolicyState(), None)
    assert first.desired == 1
    assert first.actions == ()
    assert first.state.born == 1000
    later = decide(machines, w, app, 1300, first.state, None)
    assert later.desired == 0
    assert acts(later) == [("drain", "s0")]


@pytest.mark.parametrize(
    ("last_request", "expected"),
    [(None, 0), (800.0, 1), (700.0, 0), (1000.0, 1)],
)
def test_nothing_up_and_no_recent_request_stays_at_zero(
    last_request: float | None, expected: int
) -> None:
    """A fresh autoscaler wakes nothing for traffic that never came (or came long ago)."""
    app = cfg()
    machines = fleet(m("z", "suspended"))
    d = decide(machines, load(0.0, 1000, app=app), app, 1000, PolicyState(), last_request)
    assert d.desired == expected
    assert len(d.actions) == expected


def test_idle_counts_from_the_latest_busy_sample() -> None:
    app = cfg()
    w = load(0.0, 400, app=app)
    w.add(Sample(400, 401, 0.5, 1))  # a request came and went within this tick
    d = run(app, fleet(m("s0")), w, 401, last_request_at=0.0)
    assert d.desired == 1


def test_min_machines_survive_idleness() -> None:
    app = cfg(min_machines=1)
    d = run(app, fleet(*serving(2)), load(0.0, 1000, app=app), 1000, last_request_at=0.0)
    assert d.desired == 1
    assert acts(d) == [("drain", "s0")]


# --- scale-down delay and step ------------------------------------------------------------


def test_scale_down_waits_for_the_delay() -> None:
    app = cfg(panic_threshold=CALM)  # scale_down_delay_s 30
    machines = fleet(*serving(3))
    state = PolicyState(born=0.0)
    for now in (100.0, 110.0, 129.0):
        d = run(app, machines, load(0.0, now, app=app), now, state)
        assert (d.desired, d.actions) == (3, ()), now
        assert "hold 3" in d.reason
        state = d.state
    assert state.lower_since == 100.0
    d = run(app, machines, load(0.0, 130, app=app), 130, state)
    assert d.desired == 1
    assert acts(d) == [("drain", "s0")]  # one per tick (scale_down_step 1)


def test_a_hold_after_the_delay_says_what_demand_wanted_within_it() -> None:
    # Demand has wanted fewer than are up for longer than the delay, but 2 of them 5 s
    # ago (when 3 were up): 2 stay. The reason said "demand wants 1 for 31s of 30s".
    app = cfg(panic_threshold=CALM)  # scale_down_delay_s 30
    state = PolicyState(born=0.0, lower_since=100.0, lower_history=((126.0, 2),))
    d = run(app, fleet(*serving(2)), load(0.0, 131, app=app), 131, state)
    assert (d.desired, d.actions) == (2, ())
    assert d.reason == "normal: hold 2: demand wanted 2 within the last 30s, 1 now (60s avg 0.0)"


def test_demand_back_up_resets_the_delay() -> None:
    app = cfg(panic_threshold=CALM)
    machines = fleet(*serving(2))
    d = run(app, machines, load(0.0, 100, app=app), 100)
    assert d.state.lower_since == 100.0
    d = run(app, machines, load(14.0, 120, app=app), 120, d.state)
    assert d.state.lower_since is None
    d = run(app, machines, load(0.0, 140, app=app), 140, d.state)
    assert d.state.lower_since == 140.0
    assert d.actions == ()


def test_scale_down_goes_only_to_the_most_wanted_during_the_delay() -> None:
    app = cfg(panic_threshold=CALM)
    machines = fleet(*serving(4))
    state = PolicyState(born=0.0, lower_since=90.0, lower_history=((85.0, 1), (110.0, 2)))
    d = run(app, machines, load(0.0, 130, app=app), 130, state)
    assert d.desired == 2  # (85, 1) fell out of the 30 s delay; (110, 2) did not
    assert len(d.actions) == 1


@pytest.mark.parametrize(("step", "drains"), [(1, 1), (2, 2), (5, 4)])
def test_at_most_scale_down_step_machines_per_tick(step: int, drains: int) -> None:
    app = cfg(panic_threshold=CALM, scale_down_step=step)
    machines = fleet(*serving(5))
    state = PolicyState(born=0.0, lower_since=0.0)
    d = run(app, machines, load(0.0, 100, app=app), 100, state)
    assert d.desired == 1
    assert [k for k, _ in acts(d)] == ["drain"] * drains


def test_above_max_machines_scales_down_without_the_delay_one_step_at_a_time() -> None:
    app = cfg(panic_threshold=CALM, max_machines=2)
    d = run(app, fleet(*serving(4)), load(14.0, 100, app=app), 100)
    assert d.desired == 2
    assert len(d.actions) == 1
    assert "above max_machines" in d.reason


def test_min_lifetime_protects_young_machines() -> None:
    app = cfg(panic_threshold=CALM)  # min_lifetime_s 30
    machines = fleet(m("young", started_at=71.0), m("old", started_at=70.0, in_flight=3))
    state = PolicyState(born=0.0, lower_since=0.0)
    d = run(app, machines, load(0.0, 100, app=app), 100, state)
    assert acts(d) == [("drain", "old")]  # old goes despite its requests: young may not
    alone = fleet(m("young", started_at=371.0))
    d = run(app, alone, load(0.0, 400, app=app), 400, state, last_request_at=0.0)
    assert d.desired == 0
    assert d.actions == ()
    assert "min_lifetime" in d.reason


def test_removal_order_fewest_in_flight_then_longest_idle() -> None:
    app = cfg(panic_threshold=CALM, scale_down_step=3, min_machines=1)
    machines = fleet(
        m("busy2", in_flight=2, last_used=99.0),
        m("quiet-recent", last_used=95.0),
        m("quiet-old", last_used=10.0),
        m("never-used"),
        m("one", in_flight=1, last_used=99.0),
    )
    state = PolicyState(born=0.0, lower_since=0.0)
    d = run(app, machines, load(0.0, 100, app=app), 100, state, last_request_at=0.0)
    assert acts(d) == [("drain", "never-used"), ("drain", "quiet-old"), ("drain", "quiet-recent")]


def test_removal_takes_machines_without_long_lived_connections_first() -> None:
    """A drain ends the WebSockets and streams a machine carries (1001, an event stream's
    end, a download cut at the deadline): a machine with none goes first, whatever the
    order by load says. An idle WebSocket gave its slot back (in flight 0, idle long):
    it was the first one drained, its client cut off while a quiet machine stayed."""
    app = cfg(panic_threshold=CALM, scale_down_step=3, min_machines=1)
    machines = fleet(
        m("websocket", long_lived=1, last_used=10.0),
        m("stream", long_lived=1, in_flight=1, last_used=99.0),
        m("requests", in_flight=2, last_used=99.0),
        m("recent", last_used=95.0),
    )
    state = PolicyState(born=0.0, lower_since=0.0)
    d = run(app, machines, load(0.0, 100, app=app), 100, state, last_request_at=0.0)
    assert acts(d) == [("drain", "recent"), ("drain", "requests"), ("drain", "websocket")]


def test_a_machine_whose_host_is_unreachable_is_not_removed() -> None:
    """Its suspend or stop would answer 503 (after the cordon) until the host is back."""
    app = cfg(panic_threshold=CALM, min_machines=1)
    machines = fleet(m("lost", unreachable=True), m("busy", in_flight=1, last_used=99.0))
    state = PolicyState(born=0.0, lower_since=0.0)
    d = run(app, machines, load(0.0, 100, app=app), 100, state, last_request_at=0.0)
    assert acts(d) == [("drain", "busy")]
    app = cfg(idle_to_zero_s=10)  # alone, and the app wants none: it waits
    d = run(app, fleet(m("lost", unreachable=True)), load(0.0, 100, app=app), 100, state, 50.0)
    assert d.desired == 0
    assert acts(d) == []
    assert "host unreachable" in d.reason


# --- panic ---------------------------------------------------------------------------------


def test_panic_enters_at_threshold_times_capacity() -> None:
    app = cfg()
    spare = [m(f"z{i}", "suspended") for i in range(9)]
    one = fleet(m("s0"), *spare)
    below = run(app, one, load(13.9, 100, since=94, app=app), 100)
    assert not below.panic
    at = run(app, one, load(14.0, 100, since=94, app=app), 100)
    assert at.panic
    assert at.state.panic_since == 100
    assert at.state.last_trigger == 100
    assert at.desired == 2  # scaled on the panic window
    assert "enter panic" in at.reason


def test_panic_threshold_reached_up_to_float_rounding_panics() -> None:
    # An average of exactly 2 x capacity, as float sums make it (13.999999999999995):
    # the same tolerance as the machine count's ceil, so a window's rounding (which
    # differs with how its samples were cut) does not decide whether the app panics.
    app = cfg()
    one = fleet(m("s0"), *[m(f"z{i}", "suspended") for i in range(9)])
    level = sum([0.7] * 20)
    assert level < 14.0
    assert run(app, one, load(level, 100, since=94, app=app), 100).panic
    assert not run(app, one, load(13.99, 100, since=94, app=app), 100).panic


def test_capacity_counts_ready_machines_only_at_least_one() -> None:
    app = cfg()
    # Two ready machines: capacity 14, panic at 28. A starting machine adds no capacity.
    two = fleet(m("a"), m("b"), m("c", "starting"), *[m(f"z{i}", "stopped") for i in range(5)])
    assert not run(app, two, load(27.9, 100, since=94, app=app), 100).panic
    assert run(app, two, load(28.0, 100, since=94, app=app), 100).panic
    # No machine at all: capacity is one machine's worth.
    none = fleet(*[m(f"z{i}", "stopped") for i in range(5)])
    assert run(app, none, load(14.0, 100, since=94, app=app), 100).panic


def test_panic_scales_on_the_panic_window_and_never_down() -> None:
    app = cfg()
    spare = [m(f"z{i}", "suspended") for i in range(9)]
    w = load(0.0, 94, app=app)
    for t in range(94, 100):
        w.add(Sample(t, t + 1, 50.0, 50))
    d = run(app, fleet(*serving(1), *spare), w, 100)
    assert d.panic
    assert d.desired == 8
    assert len(d.actions) == 7
    assert d.state.panic_desired == 8
    # The burst ends; within a stable window of the last trigger panic holds everything.
    state = d.state
    big = fleet(*serving(8), *spare[7:])
    for now in (101.0, 130.0, 159.0):
        d = run(app, big, load(0.0, now, app=app), now, state)
        assert d.panic, now
        assert (d.desired, d.actions) == (8, ()), now
        state = d.state


def test_panic_desired_never_drops_while_panicking() -> None:
    app = cfg()
    spare = [m(f"z{i}", "stopped") for i in range(9)]
    machines = fleet(*serving(1), *spare)
    state = PolicyState(born=0.0, panic_since=90.0, last_trigger=99.0, panic_desired=6)
    d = run(app, machines, load(20.0, 100, since=94, app=app), 100, state)
    assert d.panic
    assert d.desired == 6


def test_panic_leaves_after_a_stable_window_without_trigger() -> None:
    app = cfg()  # stable_window_s 60
    machines = fleet(*serving(4))
    state = PolicyState(born=0.0, panic_since=10.0, last_trigger=40.0, panic_desired=4)
    still = run(app, machines, load(0.0, 99.9, app=app), 99.9, state)
    assert still.panic
    assert still.state.panic_since == 10.0
    left = run(app, machines, load(0.0, 100, app=app), 100, state)
    assert not left.panic
    assert "leave panic" in left.reason
    assert left.state.panic_since is None
    assert left.state.panic_desired == 0
    # Leaving panic starts the scale-down delay; nothing is removed yet.
    assert left.desired == 4
    assert left.actions == ()
    assert left.state.lower_since == 100.0


def test_idleness_ends_panic() -> None:
    app = cfg(idle_to_zero_s=2)  # shorter than the windows: only then can the two meet
    state = PolicyState(born=0.0, panic_since=95.0, last_trigger=97.0, panic_desired=3)
    w = load(0.0, 100, app=app)
    w.add(Sample(96, 97, 30.0, 30))
    d = run(app, fleet(*serving(3)), w, 100, state, last_request_at=97.0)
    assert not d.panic
    assert d.desired == 0
    assert "leave panic (idle)" in d.reason
    assert acts(d) == [("drain", "s0")]


def test_a_new_trigger_extends_panic() -> None:
    app = cfg()
    machines = fleet(*serving(1), *[m(f"z{i}", "stopped") for i in range(9)])
    state = PolicyState(born=0.0, panic_since=10.0, last_trigger=40.0, panic_desired=2)
    d = run(app, machines, load(15.0, 100, since=94, app=app), 100, state)
    assert d.panic
    assert d.state.last_trigger == 100
    assert d.state.panic_since == 10.0


# --- rule 2: which to add ------------------------------------------------------------------


def test_scale_up_takes_back_drains_then_resumes_then_starts_most_recent_first() -> None:
    app = cfg(panic_threshold=CALM)
    machines = fleet(
        m("stopped-old", "stopped", last_used=1.0),
        m("stopped-new", "stopped", last_used=50.0),
        m("susp-old", "suspended", last_used=2.0),
        m("susp-new", "suspended", last_used=60.0),
        m("susp-never", "suspended"),
        m("draining", cordoned=True, cordoned_by_us=True, draining=True, last_used=3.0),
    )
    d = run(app, machines, load(42.0, 100, app=app), 100)  # wants 6, none up
    assert d.desired == 6
    assert d.shortfall == 0
    assert acts(d) == [
        ("uncordon", "draining"),
        ("resume", "susp-new"),
        ("resume", "susp-old"),
        ("resume", "susp-never"),
        ("start", "stopped-new"),
        ("start", "stopped-old"),
    ]
    assert all(a.reason for a in d.actions)


@pytest.mark.parametrize(
    ("machines", "expected"),
    [
        ([], None),
        ([m("a", "stopped"), m("b", "suspended")], ("resume", "b")),
        (
            [m("a", "suspended"), m("d", cordoned=True, cordoned_by_us=True, draining=True)],
            ("uncordon", "d"),
        ),
        ([m("a", "stopped", last_used=1.0), m("b", "stopped", last_used=2.0)], ("start", "b")),
        ([m("a", "suspended", busy=True), m("b", "stopped")], ("start", "b")),
        ([m("a", "suspended", cordoned=True), m("b", "stopped")], ("start", "b")),
        ([m("a", "failed"), m("b", "created"), m("c", "replacing")], None),
        ([m("a", "failed", restartable=True), m("b", "stopped", busy=True)], ("start", "a")),
        ([m("a", "failed", restartable=True), m("b", "stopped")], ("start", "b")),
        (
            [m("a", "suspended"), m("s", "suspending", busy=True, pending="drain")],
            ("resume", "s"),
        ),
        ([m("a", "suspended"), m("s", "suspending", cordoned=True)], ("resume", "a")),
        ([m("s", "stopping", busy=True, pending="drain")], None),
        # A host Fly cannot reach: its actions fail, so it comes after every other kind...
        ([m("a", "suspended", unreachable=True), m("b", "stopped")], ("start", "b")),
        (
            [m("a", "suspended", unreachable=True), m("f", "failed", restartable=True)],
            ("start", "f"),
        ),
        # ... and is tried when nothing else is left.
        ([m("a", "suspended", unreachable=True), m("b", "stopped", busy=True)], ("resume", "a")),
        # Fly's checks were critical when it last ran: after the others, however fresh...
        (
            [m("s", "stopped", last_used=2.0, down_sick=True), m("b", "stopped", last_used=1.0)],
            ("start", "b"),
        ),
        ([m("s", "suspended", down_sick=True), m("f", "failed", restartable=True)], ("start", "f")),
        (
            [
                m("s", cordoned=True, cordoned_by_us=True, draining=True, sick_since=1.0),
                m("b", "stopped"),
            ],
            ("start", "b"),
        ),
        # ... before a machine on a host Fly cannot reach, and alone it is tried.
        ([m("s", "stopped", down_sick=True), m("a", "stopped", unreachable=True)], ("start", "s")),
        ([m("s", "stopped", down_sick=True)], ("start", "s")),
    ],
)
def test_choose_wake(machines: list[MachineSnapshot], expected: tuple[str, str] | None) -> None:
    action = choose_wake(fleet(*machines))
    if expected is None:
        assert action is None
    else:
        assert isinstance(action, Action)
        assert (action.kind, action.machine_id) == expected
        assert action.reason.startswith("wake: ")


@pytest.mark.parametrize(
    ("extra", "shortfall"),
    [
        ([], 3),
        ([m("x", "stopping")], 2),  # it will be back; it is not missing
        ([m("x", "failed")], 3),  # a failed machine is not one we can use
        ([m("x", "stopped", cordoned=True)], 3),  # nor one cordoned by someone else
        ([m("x", "suspended", busy=True)], 2),
    ],
)
def test_shortfall_counts_machines_the_app_lacks(
    extra: list[MachineSnapshot], shortfall: int
) -> None:
    app = cfg(panic_threshold=CALM)
    machines = fleet(m("s0"), m("z", "suspended"), *extra)
    d = run(app, machines, load(35.0, 100, app=app), 100)  # wants 5
    assert d.desired == 5
    assert d.shortfall == shortfall
    assert ("resume", "z") in acts(d)
    assert f"short of {shortfall}" in d.reason if shortfall else "short" not in d.reason


# --- rule 3 and 4: machines we leave alone ------------------------------------------------


def test_a_machine_cordoned_by_someone_else_is_not_capacity_and_never_touched() -> None:
    app = cfg(panic_threshold=CALM)
    theirs = m("theirs", cordoned=True, last_used=99.0)
    machines = fleet(theirs, m("z", "suspended"))
    d = run(app, machines, load(5.0, 100, app=app), 100)
    assert d.current == 0
    assert acts(d) == [("resume", "z")]  # never "uncordon theirs"
    # Idle: theirs is not ours to remove either.
    d = run(app, fleet(theirs), load(0.0, 1000, app=app), 1000, last_request_at=0.0)
    assert d.desired == 0
    assert d.actions == ()


@pytest.mark.parametrize("state", ["starting", "restarting"])
def test_machines_coming_up_count_so_nothing_starts_twice(state: str) -> None:
    app = cfg(panic_threshold=CALM)
    machines = fleet(m("c", state), m("z", "stopped"))
    d = run(app, machines, load(5.0, 100, app=app), 100)
    assert d.current == 1
    assert d.desired == 1
    assert d.actions == ()


@pytest.mark.parametrize("pending", ["start", "resume", "uncordon"])
def test_our_action_in_flight_counts_as_coming_up(pending: str) -> None:
    app = cfg(panic_threshold=CALM)
    machines = fleet(m("c", "stopped", busy=True, pending=pending), m("z", "stopped"))
    d = run(app, machines, load(5.0, 100, app=app), 100)
    assert d.current == 1
    assert d.actions == ()


@pytest.mark.parametrize(
    "state", ["failed", "created", "updating", "replacing", "destroying", "launch_failed"]
)
def test_states_we_do_not_drive_are_left_alone_and_not_counted(state: str) -> None:
    app = cfg(panic_threshold=CALM)
    machines = fleet(m("x", state), m("z", "suspended"))
    d = run(app, machines, load(5.0, 100, app=app), 100)
    assert d.current == 0
    assert acts(d) == [("resume", "z")]


def test_machines_stopping_are_not_capacity_nor_acted_on() -> None:
    app = cfg(panic_threshold=CALM)
    d = run(app, fleet(m("x", "stopping")), load(5.0, 100, app=app), 100)
    assert d.current == 0
    assert d.actions == ()
    assert d.shortfall == 0


def test_a_suspend_under_way_is_taken_back_when_demand_comes() -> None:
    """Fly lets a start interrupt a suspend: the warm machine beats any other wake."""
    app = cfg(panic_threshold=CALM)
    machines = fleet(m("x", "suspending", busy=True, pending="drain"), m("z", "suspended"))
    d = run(app, machines, load(5.0, 100, app=app), 100)
    assert d.current == 0
    assert acts(d) == [("resume", "x")]
    assert "take back a machine being suspended" in d.actions[0].reason


def test_busy_machines_are_left_alone_this_tick() -> None:
    app = cfg(panic_threshold=CALM)
    up = fleet(m("a", busy=True), m("b"))
    state = PolicyState(born=0.0, lower_since=0.0)
    d = run(app, up, load(0.0, 100, app=app), 100, state)
    assert d.current == 2
    assert acts(d) == [("drain", "b")]
    down = fleet(m("a", "suspended", busy=True))
    d = run(app, down, load(5.0, 100, app=app), 100)
    assert d.actions == ()
    assert d.shortfall == 0


def test_a_draining_machine_is_not_capacity_and_not_drained_again() -> None:
    app = cfg(panic_threshold=CALM)
    draining = m("d", cordoned=True, cordoned_by_us=True, draining=True, in_flight=2)
    d = run(app, fleet(draining, m("s")), load(5.0, 100, app=app), 100)
    assert d.current == 1
    assert d.actions == ()


def test_cordons_we_left_behind_are_finished_or_lifted() -> None:
    app = cfg(panic_threshold=CALM)
    left = m("left", cordoned=True, cordoned_by_us=True)  # started, cordoned, no drain running
    asleep = m("asleep", "suspended", cordoned=True, cordoned_by_us=True)
    d = run(app, fleet(m("s"), left, asleep), load(5.0, 100, app=app), 100)
    assert sorted(acts(d)) == [("drain", "left"), ("uncordon", "asleep")]
    # When the machine is needed, it is taken back instead.
    d = run(app, fleet(left, asleep), load(5.0, 100, app=app), 100)
    assert acts(d) == [("uncordon", "left"), ("uncordon", "asleep")]


# --- the stop tier ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "since", "expected"),
    [
        (None, 0.0, []),
        (600.0, 0.0, [("stop", "z")]),
        (600.0, 1.0, []),
        (600.0, None, []),  # unknown since when: never guessed
    ],
)
def test_stop_suspended_after(
    limit: float | None, since: float | None, expected: list[tuple[str, str]]
) -> None:
    app = cfg(panic_threshold=CALM, stop_suspended_after_s=limit)
    machines = fleet(m("s"), m("z", "suspended", state_since=since))
    d = run(app, machines, load(5.0, 600, app=app), 600)
    assert acts(d) == expected


def test_no_stop_nor_left_drain_is_sent_to_a_machine_whose_host_is_unreachable() -> None:
    """They would answer 503 until the host is back."""
    app = cfg(panic_threshold=CALM, stop_suspended_after_s=10)
    left = m("d", cordoned=True, cordoned_by_us=True, unreachable=True)
    machines = fleet(m("s"), m("z", "suspended", state_since=0.0, unreachable=True), left)
    d = run(app, machines, load(5.0, 600, app=app), 600)
    assert acts(d) == []


def test_a_long_suspended_machine_that_is_needed_is_resumed_not_stopped() -> None:
    app = cfg(panic_threshold=CALM, stop_suspended_after_s=10)
    machines = fleet(m("z", "suspended", state_since=0.0), m("y", "suspended", state_since=0.0))
    d = run(app, machines, load(5.0, 600, app=app), 600)
    assert sorted(acts(d)) == [("resume", "y"), ("stop", "z")]


def test_the_delay_history_stays_short() -> None:
    app = cfg(panic_threshold=CALM, scale_down_delay_s=3600, max_machines=10)
    machines = fleet(*serving(10))
    state = PolicyState(born=0.0)
    for now in range(100, 400):
        level = 7.0 * (1 + now % 5)  # wants 1..5, over and over
        d = run(app, machines, load(level, now, since=now - 1, app=app), now, state)
        state = d.state
    assert d.desired == 10
    assert len(state.lower_history) <= 5
    assert max(h[1] for h in state.lower_history) == 5


def test_panic_still_lifts_our_cordon_from_a_sleeping_machine() -> None:
    app = cfg()
    state = PolicyState(born=0.0, panic_since=590.0, last_trigger=595.0, panic_desired=1)
    asleep = m("z", "suspended", cordoned=True, cordoned_by_us=True)
    d = run(app, fleet(m("s"), asleep), load(0.0, 600, app=app), 600, state)
    assert d.panic
    assert acts(d) == [("uncordon", "z")]


def test_panic_stops_nothing() -> None:
    app = cfg(stop_suspended_after_s=10)
    state = PolicyState(born=0.0, panic_since=590.0, last_trigger=595.0, panic_desired=1)
    machines = fleet(m("s"), m("z", "suspended", state_since=0.0))
    d = run(app, machines, load(0.0, 600, app=app), 600, state)
    assert d.panic
    assert d.actions == ()


def test_next_check_is_when_the_idle_timer_runs_out() -> None:
    app = cfg(panic_threshold=CALM, idle_to_zero_s=300)
    windows = load(0.0, 100, app=app)
    d = run(app, fleet(m("a")), windows, 100, last_request_at=40.0)
    assert d.actions == ()
    assert d.next_check == 340.0  # the last request plus idle_to_zero_s
    d = run(app, fleet(m("a")), windows, 340, d.state, last_request_at=40.0)
    assert acts(d) == [("drain", "a")]


def test_next_check_is_when_a_young_machine_may_go() -> None:
    app = cfg(panic_threshold=CALM)  # min_lifetime_s 30
    state = PolicyState(born=0.0)
    alone = fleet(m("young", started_at=371.0))
    d = run(app, alone, load(0.0, 400, app=app), 400, state, last_request_at=0.0)
    assert d.actions == ()
    assert d.next_check == 401.0  # started at 371, min_lifetime_s 30
    # Waiting for it changes nothing from tick to tick: a caller may skip those ticks.
    again = run(app, alone, load(0.0, 400, app=app), 400.5, d.state, last_request_at=0.0)
    assert again.state == d.state
    assert again.actions == ()


def test_next_check_is_when_a_suspended_machine_is_due_to_be_stopped() -> None:
    """stop_suspended_after_s changes the answer by itself: a caller that skips quiet
    ticks (the live loop's slow polls) must decide again then, not a poll or two late."""
    app = cfg(panic_threshold=CALM, stop_suspended_after_s=600)
    asleep = fleet(m("z", "suspended", state_since=400.0), m("y", "suspended", state_since=350.0))
    d = run(app, asleep, load(0.0, 900, app=app), 500, last_request_at=0.0)
    assert d.actions == ()
    assert d.next_check == 950.0
    d = run(app, asleep, load(0.0, 900, app=app), 950, last_request_at=0.0)
    assert [(a.kind, a.machine_id) for a in d.actions] == [("stop", "y")]


@pytest.mark.parametrize("in_flight", [0, 2])
def test_no_next_check_without_a_timer_running(in_flight: int) -> None:
    app = cfg(panic_threshold=CALM)
    # Asleep with nothing asked: nothing is due until a request comes.
    d = run(app, fleet(m("z", "suspended")), load(0.0, 900, app=app), 900, last_request_at=0.0)
    assert d.actions == ()
    assert d.next_check is None
    # Busy: requests in flight hold the timer, which starts again when they end.
    busy = fleet(m("a", in_flight=in_flight))
    d = run(app, busy, load(float(in_flight), 900, app=app), 900, last_request_at=0.0)
    if in_flight:
        assert d.next_check is None


@pytest.mark.parametrize(
    ("machines", "expected"),
    [
        # The only machine hangs: restarted; a spare is started meanwhile (not capacity).
        ([m("h", hung=True)], [("restart", "h")]),
        ([m("h", hung=True), m("s", "stopped")], [("start", "s"), ("restart", "h")]),
        # Another machine serves: the hung one is restarted all the same.
        ([m("h", hung=True), m("ok")], [("restart", "h")]),
        # Already being restarted (busy): nothing more, and no second start for it.
        ([m("h", hung=True, busy=True, pending="restart"), m("s", "stopped")], [("start", "s")]),
        # On a host Fly cannot reach its stop would fail: it waits for the host; a spare
        # serves meanwhile.
        ([m("h", hung=True, unreachable=True), m("s", "stopped")], [("start", "s")]),
    ],
)
def test_a_machine_that_hangs_is_restarted_and_not_counted_as_capacity(
    machines: list[MachineSnapshot], expected: list[tuple[str, str]]
) -> None:
    app = cfg(panic_threshold=CALM, target_concurrency=10)
    d = run(app, fleet(*machines), load(2.0, 100, app=app), 100)  # wants 1
    assert d.desired == 1
    assert acts(d) == expected
    assert d.shortfall == 0  # the hung machine will be back


@pytest.mark.parametrize(
    ("max_machines", "machines", "expected"),
    [
        # At the cap, a spare replaces the hung machine (a resume is faster than a
        # restart), which is stopped: restarting it too would make two.
        (1, [m("h", hung=True), m("s", "suspended")], [("resume", "s"), ("stop", "h")]),
        # Nothing to wake instead: the hung machine is restarted.
        (1, [m("h", hung=True)], [("restart", "h")]),
        # Room for both.
        (2, [m("h", hung=True), m("s", "suspended")], [("resume", "s"), ("restart", "h")]),
        # Two hung at a cap of 2 with one spare: one restarted, one stopped.
        (
            2,
            [m("h", hung=True), m("i", hung=True), m("s", "suspended")],
            [("resume", "s"), ("restart", "h"), ("stop", "i")],
        ),
    ],
)
def test_hung_machines_restarted_never_take_the_app_past_max_machines(
    max_machines: int, machines: list[MachineSnapshot], expected: list[tuple[str, str]]
) -> None:
    app = cfg(panic_threshold=CALM, target_concurrency=10, max_machines=max_machines)
    d = run(app, fleet(*machines), load(2.0, 100, app=app), 100)  # wants 1
    assert sorted(acts(d)) == sorted(expected)
    up_after = [a for a in d.actions if a.kind in ("start", "resume", "restart")]
    assert len(up_after) <= max_machines


@pytest.mark.parametrize(
    ("machines", "expected"),
    [
        # The only started machine is sick (Fly's checks critical): a spare replaces it;
        # the sick one stays until the spare counts (the proxy still routes to it alone).
        ([m("x", sick_since=0.0), m("s", "stopped")], [("start", "s")]),
        # A healthy machine serves: the sick one is surplus, drained after the scale-down
        # delay (scale_down_delay_s 60 here) ...
        ([m("x", sick_since=90.0), m("ok")], []),
        ([m("x", sick_since=0.0), m("ok")], [("drain", "x")]),
        # ... and not while a replacement is only on its way.
        ([m("x", sick_since=0.0), m("s", "starting")], []),
        # Two sick and none healthy: likely the app's own failure. They count as the API
        # says (serving); replacing them would only start every machine the app has.
        ([m("x", sick_since=0.0), m("y", sick_since=0.0), m("s", "stopped")], []),
        # Sick, with only a machine that left sick to replace it: it counts (starting
        # that one, sick again, then draining this one made a loop) ...
        ([m("y", sick_since=0.0), m("x", "stopped", down_sick=True)], []),
        # ... but a machine not known sick replaces it.
        (
            [m("y", sick_since=0.0), m("x", "stopped", down_sick=True), m("s", "stopped")],
            [("start", "s")],
        ),
    ],
)
def test_a_sick_machine_is_replaced_then_drained(
    machines: list[MachineSnapshot], expected: list[tuple[str, str]]
) -> None:
    app = cfg(panic_threshold=CALM, target_concurrency=10, scale_down_delay_s=60)
    d = run(app, fleet(*machines), load(2.0, 100, app=app), 100)  # wants 1
    assert acts(d) == expected


@pytest.mark.parametrize(
    ("machines", "says"),
    [
        # Its one started machine sick, the app "scales up 0->1": the reason says why.
        (
            [m("x", sick_since=0.0), m("s", "stopped")],
            "normal: replace sick x (Fly's checks critical); scale up 0->1 on 60s avg 2.0; start s",
        ),
        # The replacement serves: the sick one is not among the one "steady" machine.
        (
            [m("x", sick_since=90.0), m("ok")],
            "normal: sick x not counted (Fly's checks critical); steady at 1 (60s avg 2.0)",
        ),
    ],
)
def test_the_reason_names_a_sick_machine_it_does_not_count(
    machines: list[MachineSnapshot], says: str
) -> None:
    """Before, "scale up 0->1" while /status listed one machine started."""
    app = cfg(panic_threshold=CALM, target_concurrency=10, scale_down_delay_s=60)
    d = run(app, fleet(*machines), load(2.0, 100, app=app), 100)
    assert d.reason == says


@pytest.mark.parametrize(
    ("max_machines", "machines", "says"),
    [
        # Its one started machine hangs: the app "scales up 0->1" by restarting it.
        (
            3,
            [m("h", hung=True)],
            "normal: restart hung h (timeouts or resets); scale up 0->1 on 60s avg 2.0; restart h",
        ),
        # Its restart under way, a spare is started meanwhile.
        (
            3,
            [m("h", hung=True, busy=True, pending="restart"), m("s", "stopped")],
            "normal: hung h restarting; scale up 0->1 on 60s avg 2.0; start s",
        ),
        # At the cap, the spare replaces it and it is stopped.
        (
            1,
            [m("h", hung=True), m("s", "suspended")],
            "normal: stop hung h (timeouts or resets); scale up 0->1 on 60s avg 2.0; "
            "resume s, stop h",
        ),
        (
            3,
            [m("h", hung=True, unreachable=True), m("ok")],
            "normal: hung h waits for its host (unreachable); steady at 1 (60s avg 2.0)",
        ),
    ],
)
def test_the_reason_names_a_hung_machine_and_its_restart(
    max_machines: int, machines: list[MachineSnapshot], says: str
) -> None:
    """Before, "scale up 0->1" while /status listed one machine started, and a restart
    under way was not named at all."""
    app = cfg(panic_threshold=CALM, target_concurrency=10, max_machines=max_machines)
    d = run(app, fleet(*machines), load(2.0, 100, app=app), 100)
    assert d.reason == says


@pytest.mark.parametrize("panic", [False, True])
@pytest.mark.parametrize("max_machines", [1, 3])
def test_a_sick_machines_replacement_exceeds_max_machines_only_until_it_serves(
    max_machines: int, panic: bool
) -> None:
    """At the cap, a machine turned sick is replaced by one more: the cap is exceeded
    while the replacement boots, and no longer. Once it serves, the sick machine is
    drained at once, not ``scale_down_delay_s`` (600 s here) after it turned sick, and in
    panic too (panic keeps it otherwise: a check that flaps under load must not cost a
    warm machine; over the cap, no load may go to it anyway). Before, two machines ran
    under ``max_machines: 1`` for up to ``scale_down_delay_s``, and for as long as a
    panic lasted."""
    app = cfg(max_machines=max_machines, scale_down_delay_s=600, target_concurrency=10)
    demand = 60.0 if panic else 5.0 * max_machines  # panic, or all of max_machines wanted
    healthy = [m(f"h{i}") for i in range(max_machines - 1)]
    sick = m("x", sick_since=90.0)
    # The sick one is not capacity: the spare is started in its place (one over the cap).
    d = run(app, fleet(*healthy, sick, m("r", "stopped")), load(demand, 100, app=app), 100)
    assert d.panic is panic
    assert acts(d) == [("start", "r")]
    # While the replacement boots, the sick one stays (the proxy may route to it alone).
    booting = m("r", "starting")
    d = run(app, fleet(*healthy, sick, booting), load(demand, 101, app=app), 101, d.state)
    assert acts(d) == []
    # It serves: the sick one goes at once, 12 s after it turned sick.
    d = run(app, fleet(*healthy, sick, m("r")), load(demand, 102, app=app), 102, d.state)
    assert acts(d) == [("drain", "x")]
    assert "max_machines" in d.actions[0].reason


def test_two_sick_machines_on_steady_demand_do_not_flap() -> None:
    """Both sick counted as capacity (the app's own failure) and one was drained; on the
    next tick the other, alone, stopped counting and the drain was taken back, every
    scale_down_delay_s for as long as the app was broken."""
    import dataclasses

    app = cfg(panic_threshold=CALM, scale_down_delay_s=30)
    w = LoadWindows.for_app(app)
    machines = {
        "x": m("x", sick_since=0.0, last_used=1.0),
        "y": m("y", sick_since=0.0, last_used=2.0),
    }
    state, log = PolicyState(born=0.0), []
    for t in range(1, 200):
        w.add(Sample(t - 1, t, 2.0, 2))  # 2 in flight: one machine wanted
        d = decide(fleet(*machines.values()), w, app, float(t), state, float(t))
        state = d.state
        for a in d.actions:
            log.append((t, a.kind, a.machine_id))
            x = machines[a.machine_id]
            if a.kind == "drain":  # its request in flight: the drain waits, cordoned
                x = dataclasses.replace(x, cordoned=True, cordoned_by_us=True, draining=True)
            elif a.kind == "uncordon":
                x = dataclasses.replace(x, cordoned=False, cordoned_by_us=False, draining=False)
            machines[a.machine_id] = x
    assert len(log) <= 1, log


def test_panic_drains_no_sick_machine() -> None:
    # "Panic never removes a machine": a burst is when checks flap under load. (Within
    # max_machines: over it, the sick one goes once its replacement serves, test above.)
    app = cfg(max_machines=4)
    machines = fleet(m("a"), m("b"), m("c"), m("x", sick_since=0.0, in_flight=2))
    d = run(app, machines, load(60.0, 100, app=app), 100)
    assert d.panic
    assert ("drain", "x") not in acts(d)


def test_a_sick_machine_of_an_idle_app_is_drained_at_once() -> None:
    app = cfg(idle_to_zero_s=10, scale_down_delay_s=600)
    d = run(app, fleet(m("x", sick_since=99.0)), load(0.0, 100, app=app), 100, last_request_at=50)
    assert d.desired == 0
    assert acts(d) == [("drain", "x")]


def test_a_machine_that_hangs_in_an_app_that_wants_none_is_stopped() -> None:
    app = cfg(idle_to_zero_s=10)
    d = run(app, fleet(m("h", hung=True)), load(0.0, 100, app=app), 100, last_request_at=50)
    assert d.desired == 0
    assert acts(d) == [("stop", "h")]


T0 = 1.7e9 + 0.1  # a clock of epoch seconds: T0 + 30.3 - T0 < 30.3 in floats


@pytest.mark.parametrize(
    ("timer", "knobs", "machines", "kind"),
    [
        ("idle_to_zero_s", {"idle_to_zero_s": 30.3}, [m("a", started_at=T0 - 100)], "drain"),
        (
            "min_lifetime_s",
            {"min_lifetime_s": 30.3, "scale_down_delay_s": 0},
            [m("a", started_at=T0), m("b", started_at=T0)],
            "drain",
        ),
        (
            "stop_suspended_after_s",
            {"stop_suspended_after_s": 30.3},
            [m("a", "suspended", state_since=T0)],
            "stop",
        ),
    ],
)
def test_a_timer_is_found_over_by_a_decision_at_its_own_next_check(
    timer: str, knobs: dict[str, Any], machines: list[MachineSnapshot], kind: str
) -> None:
    """Each timer ends at ``T0 + 30.3``, which ``next_check`` says; a decision at exactly
    that time must act. Compared as ``now - T0 >= 30.3``, it fell a rounding short: no
    action, and a ``next_check`` that is now again (a sleeping app's loop then waits a
    whole ``idle_poll_s``; one in use, a tick)."""
    app = cfg(**knobs)
    state = PolicyState(born=T0 - 100)
    # The last request at T0 (the idle timer's start), or well after it (the others').
    last = T0 if timer == "idle_to_zero_s" else T0 + 25
    if timer == "stop_suspended_after_s":
        last = T0 - 1000  # asleep long since
    now = T0 + 1
    for _ in range(3):
        d = decide(fleet(*machines), LoadWindows.for_app(app), app, now, state, last)
        if d.actions:
            break
        assert d.next_check is not None, d.reason
        assert d.next_check > now, d.reason  # a next look that is not now again
        now, state = d.next_check, d.state
    assert [a.kind for a in d.actions] == [kind], d.reason
    assert now == T0 + 30.3
