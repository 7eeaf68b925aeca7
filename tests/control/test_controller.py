"""The controller against a fake API and a fake clock: ticks, actions, drains, restarts."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from testkit import canned_http, until

from autoscaler.admin import AdminServer
from autoscaler.config import AdminSettings, AppConfig, ControlSettings, Settings
from autoscaler.control.actions import CORDON_UNSURE_S, ActionError
from autoscaler.control.controller import (
    MAX_RETRY_AFTER_S,
    WAKE_FAILED_LOG_S,
    Controller,
    WakeError,
)
from autoscaler.control.recheck import SICK_GRACE_S
from autoscaler.control.runtime import RESTART_MAX_S
from autoscaler.control.view import HUNG_AFTER, FleetView
from autoscaler.control.wake import RESUME_PATIENCE_S, START_PATIENCE_S, AppMissing
from autoscaler.fly import models as m
from autoscaler.fly.errors import (
    BadRequest,
    Conflict,
    FlyError,
    LeaseHeld,
    NotFound,
    RateLimited,
    ServerError,
    TransportError,
    Unauthorized,
)
from autoscaler.metrics import WAKE_RESULTS, Metrics
from autoscaler.scaling.fleet import CORDON_METADATA_KEY
from autoscaler.scaling.keepalive import PREWARM_LEAD_S, KeepAliveState, Plan
from autoscaler.scaling.policy import Action, PolicyState, choose_wake
from autoscaler.scaling.window import Sample

from .fakes import FakeClock, FakeMachinesAPI, settle

APP = "web"
KNOBS: dict[str, Any] = {
    "min_lifetime_s": 0,
    "scale_down_delay_s": 0,
    "idle_to_zero_s": 30,
    "drain_timeout_s": 10,
    "stable_window_s": 10,
    "panic_window_s": 2,
}


EPOCH = 1_800_000_000.0
"""The rig's time of day (what Fly's times are read against) is this plus its clock."""


class Rig:
    def __init__(self, api: FakeMachinesAPI, clock: FakeClock, **knobs: Any) -> None:
        self.api = api
        self.clock = clock
        self.probed: list[tuple[str, int]] = []
        self.port_open = True
        settings = Settings(
            apps=[AppConfig(name=APP, **{**KNOBS, **knobs})],
            control=ControlSettings(tick_s=1.0, api_backoff_max_s=8.0),
        )
        self.view = FleetView(clock)
        self.metrics = Metrics(CollectorRegistry())
        self.ctl = Controller(
            api,
            self.view,
            settings,
            self.metrics,
            clock=clock,
            sleep=clock.sleep,
            probe=self.probe,
            rng=lambda: 0.0,  # no start offset, no jitter: ticks fall on whole seconds
            wall=lambda: EPOCH + clock(),
        )

    async def probe(self, host: str, port: int) -> bool:
        self.probed.append((host, port))
        return self.port_open

    @property
    def app(self) -> Any:
        return self.view.app(APP)

    def routable(self) -> set[str]:
        return {up.id for up in self.app.routable()}

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, {"app": APP, **labels})
        return 0.0 if value is None else value

    async def tick(self) -> Any:
        decision = await self.ctl.tick(APP)
        await settle()
        return decision

    async def serve_through_next_tick(self, mid: str) -> None:
        """``mid`` serves a request over the next tick, which keeps it (it is wanted) and
        lifts a cordon of ours on it: routed, neither the API's flag nor our key left."""
        up = self.app.upstreams[mid]
        self.app.begin(up)
        await self.clock.advance(1)
        await self.tick()
        await self.ctl.idle()
        assert self.routable() == {mid}
        assert_uncordoned(self.api, mid)
        self.app.end(up)


def state(api: FakeMachinesAPI, mid: str) -> str:
    return api.get(APP, mid).state


def meta(api: FakeMachinesAPI, mid: str) -> dict[str, str]:
    config = api.get(APP, mid).config
    assert config is not None
    return dict(config.metadata or {})


def assert_uncordoned(api: FakeMachinesAPI, mid: str) -> None:
    """Neither the API's cordon flag nor our metadata key is left on ``mid``."""
    assert api.get(APP, mid).cordoned is False, mid
    assert CORDON_METADATA_KEY not in meta(api, mid), mid


async def test_first_tick_rebuilds_the_view_and_starts_nothing_twice(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    up = api.add(APP, "started")
    coming = api.add(APP, "starting")
    asleep = api.add(APP, "suspended")
    rig = Rig(api, clock, scale_down_delay_s=30)
    decision = await rig.tick()
    assert decision.actions == ()
    assert api.ops("start_machine") == []
    assert rig.routable() == {up}
    assert {u.id: u.state for u in rig.app.upstreams.values()} == {
        up: "started",
        coming: "starting",
        asleep: "suspended",
    }
    assert rig.metric("autoscaler_machines", state="started") == 1
    assert rig.metric("autoscaler_machines", state="suspended") == 1
    [status] = rig.ctl.status()
    assert status.app == APP
    assert status.last_tick_at == clock.now
    assert status.last_error is None
    assert {m.id for m in status.machines} == {up, coming, asleep}


async def test_a_machine_someone_else_started_is_not_drained_before_min_lifetime(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A machine first listed started in a tick (``fly machine start``, a deploy) started
    then, as far as we know: min_lifetime_s protects it as any other. Before, the view
    learned of the start only after that tick's decision, which took its start time for
    unknown, that is old, and drained it at once (being the idlest)."""
    serving = api.add(APP, "started")
    other = api.add(APP, "stopped")
    rig = Rig(api, clock, min_machines=1, min_lifetime_s=30)
    await rig.tick()
    assert rig.routable() == {serving}
    api.set(APP, other, state="started")  # started behind our back
    await clock.advance(1)
    decision = await rig.tick()
    assert decision.actions == ()
    assert "1 removal(s) wait" in decision.reason
    assert rig.routable() == {serving, other}
    await clock.advance(30)  # both old enough now: the idlest goes
    decision = await rig.tick()
    assert [a.kind for a in decision.actions] == ["drain"]


async def test_a_scale_down_leaves_the_machine_that_carries_a_websocket(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """The proxy counts the WebSockets and streams it carries to each machine (an idle
    WebSocket is not in flight: it gave its slot back): the policy's snapshot has them,
    and the scale-down drains the machine without one (the drain would close it)."""
    carrying, other = api.add(APP, "started"), api.add(APP, "started")
    rig = Rig(api, clock, min_machines=1, scale_down_delay_s=3)
    await rig.tick()
    assert rig.routable() == {carrying, other}
    rig.app.upstreams[carrying].long_lived = 1
    await clock.advance(5)
    [action] = (await rig.tick()).actions
    assert (action.kind, action.machine_id) == ("drain", other)


async def test_load_resumes_suspended_machines_before_starting_stopped_ones(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    suspended = {api.add(APP, "suspended") for _ in range(2)}
    stopped = {api.add(APP, "stopped") for _ in range(3)}
    rig = Rig(api, clock)
    for _ in range(21):  # 21 held requests / (10 x 0.7) per machine = 3 machines
        rig.app.hold()
    await clock.advance(1)
    decision = await rig.tick()
    await rig.ctl.idle()
    assert decision.desired == 3
    kinds = sorted(a.kind for a in decision.actions)
    assert kinds == ["resume", "resume", "start"]
    started = {mid for mid in api.ops("start_machine") if mid}
    assert suspended <= started
    assert len(started & stopped) == 1
    assert rig.routable() == started
    assert len(rig.probed) == 3  # each became routable only once its port answered
    assert rig.metric("autoscaler_scaling_actions_total", action="resume", result="ok") == 2
    assert rig.metric("autoscaler_desired_machines") == 3


async def test_one_action_in_flight_per_machine(api: FakeMachinesAPI, clock: FakeClock) -> None:
    mid = api.add(APP, "suspended")
    rig = Rig(api, clock)
    api.gates["start_machine"] = gate = asyncio.Event()
    rig.app.hold()
    await clock.advance(1)
    await rig.tick()
    await clock.advance(1)
    await rig.tick()  # the start still hangs: no second one
    assert api.ops("start_machine") == [mid]
    assert rig.routable() == set()
    gate.set()
    await rig.ctl.idle()
    assert rig.routable() == {mid}
    assert api.ops("start_machine") == [mid]


async def test_drain_cordons_at_once_waits_for_in_flight_then_suspends_and_uncordons(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    a, b = api.add(APP, "started"), api.add(APP, "started")
    rig = Rig(api, clock, scale_down_delay_s=3)
    await rig.tick()
    ups = rig.app.upstreams
    rig.app.begin(ups[a])
    rig.app.begin(ups[b])
    await clock.advance(5)
    decision = await rig.tick()  # 2 in flight want 1 machine
    [action] = decision.actions
    assert action.kind == "drain"
    victim = action.machine_id
    other = b if victim == a else a
    assert rig.routable() == {other}  # out of routing at once
    assert api.get(APP, victim).cordoned is True
    assert CORDON_METADATA_KEY in meta(api, victim)
    assert api.ops("suspend_machine") == []  # its request is still in flight
    rig.app.end(ups[victim])
    await settle()
    await rig.ctl.idle()
    assert state(api, victim) == "suspended"
    assert_uncordoned(api, victim)
    names = [c.op for c in api.calls if c.machine_id == victim]
    assert names.index("cordon_machine") < names.index("suspend_machine")
    assert names.index("suspend_machine") < names.index("uncordon_machine")
    assert rig.metric("autoscaler_scaling_actions_total", action="suspend", result="ok") == 1
    assert rig.app.upstreams[victim].state == "suspended"


async def test_drain_gives_up_waiting_after_drain_timeout(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    api.add(APP, "started")
    api.add(APP, "started")
    rig = Rig(api, clock, scale_down_action="stop", scale_down_delay_s=3)
    await rig.tick()
    for up in rig.app.upstreams.values():
        rig.app.begin(up)
    await clock.advance(5)
    [action] = (await rig.tick()).actions
    await clock.advance(9)
    assert api.ops("stop_machine") == []
    await clock.advance(1)  # drain_timeout_s = 10
    await rig.ctl.idle()
    assert api.ops("stop_machine") == [action.machine_id]
    assert state(api, action.machine_id) == "stopped"


async def test_wake_takes_back_a_draining_machine(api: FakeMachinesAPI, clock: FakeClock) -> None:
    mid = api.add(APP, "started")
    rig = Rig(api, clock, idle_to_zero_s=5)
    await rig.tick()
    api.gates["cordon_machine"] = gate = asyncio.Event()
    await clock.advance(6)
    [action] = (await rig.tick()).actions
    assert action.kind == "drain"
    assert rig.routable() == set()
    # The proxy's view says whose the cordon is (ours, ahead of the API's): the gate
    # names a request it routes there again "uncordon".
    assert rig.app.upstreams[mid].cordoned_by_us
    with capture_logs() as logs:
        # Said as done: a cordon lifted, not "none" (no wake needed), as its line says.
        assert await rig.ctl.wake(APP) == "uncordon"
    assert [e["how"] for e in logs if e["event"] == "wake"] == ["uncordon"]
    assert rig.routable() == {mid}  # routable again at once, before the API agrees
    gate.set()
    await rig.ctl.idle()
    assert api.ops("suspend_machine") == []
    assert_uncordoned(api, mid)
    assert rig.routable() == {mid}


async def test_wake_from_zero_resumes_once_for_many_callers(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    suspended = api.add(APP, "suspended")
    api.add(APP, "stopped")
    rig = Rig(api, clock)
    rig.ctl.view.set_waker(rig.ctl.wake)
    tasks = [rig.view.wake(APP) for _ in range(5)]
    assert len({id(t) for t in tasks}) == 1  # single flight
    direct = asyncio.ensure_future(rig.ctl.wake(APP))
    assert await tasks[0] == "resume"
    assert await direct == "none"
    assert api.ops("start_machine") == [suspended]
    assert rig.routable() == {suspended}
    assert rig.metric("autoscaler_wake_duration_seconds_count", kind="resume") == 1


async def test_a_wake_under_way_says_how_it_brings_a_machine_up(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """The proxy serves a held request as soon as a machine is routable, which may be
    before the waker returns, or another machine than the one it boots: the request's
    wake kind is then read from the view (view.waking), without waiting for the return."""
    api.add(APP, "suspended")
    rig = Rig(api, clock)
    rig.port_open = False
    rig.ctl.view.set_waker(rig.ctl.wake)
    view = rig.view.app(APP)
    assert view.waking is None
    task = rig.view.wake(APP)
    await settle()
    assert not task.done()
    assert view.waking == "resume"
    rig.port_open = True
    await clock.advance(0.1)
    assert await task == "resume"
    await settle()
    assert view.waking is None  # the wake is over


async def test_wake_returns_only_once_the_port_answers(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    mid = api.add(APP, "stopped")
    rig = Rig(api, clock)
    rig.port_open = False
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    assert state(api, mid) == "started"
    assert not task.done()
    assert rig.routable() == set()
    await clock.advance(0.2)
    assert not task.done()
    assert rig.routable() == set()
    rig.port_open = True
    await clock.advance(0.1)
    assert await task == "start"
    assert rig.routable() == {mid}


async def test_a_resume_routes_without_waiting_for_the_read_of_its_events(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A resume of ours reads the machine's events (did it fall back to a cold boot?)
    beside the probe of its port. Its port answering, the machine waited for that read to
    route: one API round trip added to every resume, and a read the API was slow to
    answer held the held requests up to the rest of the wake, for a label. It routes at
    once, and the wake is then named by the start it made."""
    mid = api.add(APP, "suspended")
    rig = Rig(api, clock)
    api.gates["get_machine"] = read = asyncio.Event()  # the read of its events hangs
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    try:
        await settle()
        assert state(api, mid) == "started"
        assert task.done()  # no time passed, the read (if it was sent) unanswered
        assert await task == "resume"
        assert rig.routable() == {mid}
    finally:
        read.set()
        await task


async def test_the_read_of_a_resumed_machine_s_events_is_not_cut_when_it_routes(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """The read that the routing did not wait for was cancelled once the machine routed,
    and httpx closes a connection whose answer is cancelled mid-read: the API's pooled
    connection was lost on nearly every resume. The read now ends on its own, and its
    answer names the start: this one fell back to a cold boot."""
    mid = api.add(APP, "suspended")
    rig = Rig(api, clock)
    api.gates["get_machine"] = read = asyncio.Event()  # the read of its events hangs
    assert await rig.ctl.wake(APP) == "resume"  # routed before the read answered
    assert rig.routable() == {mid}
    assert api.ops("get_machine") == [mid]  # sent, and unanswered
    cold = {"type": "launch", "status": "started", "timestamp": (EPOCH + clock()) * 1000}
    api.set(APP, mid, events=[{**cold, "request": {"resume": False}}])
    read.set()
    await rig.ctl.idle()
    assert rig.ctl.apps[APP].machines[mid].how == "start"
    assert rig.app.upstreams[mid].how == "start"


async def test_api_errors_back_off_and_the_next_tick_reads_again(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    api.add(APP, "started")
    api.fail["list_machines"] = [ServerError(503, "down"), ServerError(503, "down")]
    rig = Rig(api, clock)
    await rig.ctl.start()
    try:
        await settle()
        assert len(api.ops("list_machines")) == 1
        [status] = rig.ctl.status()
        assert status.last_error is not None
        assert "down" in status.last_error
        await clock.advance(1.5)  # backoff is 2 ticks, not 1
        assert len(api.ops("list_machines")) == 1
        await clock.advance(0.5)
        assert len(api.ops("list_machines")) == 2  # failed again: now 4 s
        await clock.advance(3.9)
        assert len(api.ops("list_machines")) == 2
        await clock.advance(0.1)
        assert len(api.ops("list_machines")) == 3
        [status] = rig.ctl.status()
        assert status.last_error is None
        assert rig.ctl.last_tick_at == clock.now
        await clock.advance(1)  # healthy again: back to one tick, deciding from that list
        assert rig.ctl.last_tick_at == clock.now
        assert len(api.ops("list_machines")) == 3
        await clock.advance(4)  # steady: read again after control.steady_list_s (5 s)
        assert len(api.ops("list_machines")) == 4
    finally:
        await rig.ctl.stop()
    assert rig.view.can_wake is False


async def test_restart_finishes_our_cordons_and_leaves_others_alone(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    ours = {CORDON_METADATA_KEY: "drain"}
    serving = api.add(APP, "started")
    left_draining = api.add(APP, "started", cordoned=True, metadata=ours)
    left_asleep = api.add(APP, "suspended", cordoned=True, metadata=ours)
    stale_key = api.add(APP, "stopped", metadata=ours)
    foreign = api.add(APP, "started", cordoned=True)
    rig = Rig(api, clock)
    await rig.tick()
    await rig.ctl.idle()
    assert rig.routable() == {serving}
    # The drain left behind is finished: suspended, then uncordoned, key gone.
    assert state(api, left_draining) == "suspended"
    for mid in (left_draining, left_asleep):
        assert_uncordoned(api, mid)
    assert state(api, left_asleep) == "suspended"
    # Our key without a cordon may front a cordon request still on its way: it stays
    # until that cannot land any more.
    assert CORDON_METADATA_KEY in meta(api, stale_key)
    await clock.advance(CORDON_UNSURE_S)
    await rig.tick()
    await rig.ctl.idle()
    assert_uncordoned(api, stale_key)
    # Someone else's cordon: never lifted, never routed to, never drained.
    up = rig.app.upstreams[foreign]
    assert (up.cordoned, up.cordoned_by_us) == (True, False)  # not ours, in the view too
    assert foreign not in api.ops("uncordon_machine")
    assert foreign not in api.ops("suspend_machine")
    assert api.get(APP, foreign).cordoned is True
    assert api.ops("start_machine") == []


async def test_cordon_without_the_api_flag_is_read_from_our_key(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    api.report_cordon = False  # as the real API may: no `cordoned` field at all
    serving = api.add(APP, "started")
    left = api.add(APP, "started", cordoned=True, metadata={CORDON_METADATA_KEY: "drain"})
    rig = Rig(api, clock)
    await rig.tick()
    assert rig.routable() == {serving}
    await rig.ctl.idle()
    assert state(api, left) == "suspended"


async def test_changes_by_others_are_picked_up(api: FakeMachinesAPI, clock: FakeClock) -> None:
    a = api.add(APP, "started")
    rig = Rig(api, clock)
    await rig.tick()
    b = api.add(APP, "started")
    api.machines[APP].pop(a)
    await clock.advance(1)
    await rig.tick()
    assert set(rig.app.upstreams) == {b}
    assert rig.routable() == {b}


async def test_update_settings_adds_and_removes_apps(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    rig = Rig(api, clock)
    await rig.ctl.start()
    try:
        await settle()
        new = Settings(
            apps=[
                AppConfig(name="api", **KNOBS),
                AppConfig(name="static", backends=["127.0.0.1:9"]),
            ],
            control=ControlSettings(tick_s=1.0),
        )
        await rig.ctl.update_settings(new)
        await settle()
        assert [s.app for s in rig.ctl.status()] == ["api"]
        assert APP not in rig.view.apps
        assert "static" not in rig.view.apps  # static apps have no loop
    finally:
        await rig.ctl.stop()


async def _a_drain_waiting_for_its_request(api: FakeMachinesAPI, clock: FakeClock, rig: Rig) -> str:
    """Two started machines, both in use, and one too many: the drain of one (its id
    returned) has cordoned it and waits for its request."""
    a, b = api.add(APP, "started"), api.add(APP, "started")
    await clock.advance(1.5)
    rig.app.begin(rig.app.upstreams[a])
    rig.app.begin(rig.app.upstreams[b])
    await clock.advance(5)
    [(victim, run)] = rig.ctl.apps[APP].running.items()
    assert run.kind == "drain"
    assert api.get(APP, victim).cordoned
    return victim


async def test_an_app_removed_mid_drain_is_handed_back_without_our_cordons(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    # No later tick of ours lifts them: Fly's proxy would never route to those machines
    # again, whoever manages the app now (Fly's autostop, a person).
    rig = Rig(api, clock, scale_down_delay_s=3)
    await rig.ctl.start()
    try:
        victim = await _a_drain_waiting_for_its_request(api, clock, rig)
        api.add("other", "stopped")
        new = Settings(apps=[AppConfig(name="other")], control=ControlSettings(tick_s=1.0))
        await rig.ctl.update_settings(new)
        assert_uncordoned(api, victim)
        assert state(api, victim) == "started"
    finally:
        await rig.ctl.stop()


async def test_an_app_removed_mid_drain_whose_lease_release_fails_is_handed_back_too(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """The cut drain's lease release met a 500: the lease, still ours, is remembered for
    our next take, and the lift (no nonce) met it with a 409, leaving the cordon on a
    machine no tick of ours looks at again. The removal releases it before the lift."""
    rig = Rig(api, clock, scale_down_delay_s=3)
    await rig.ctl.start()
    try:
        victim = await _a_drain_waiting_for_its_request(api, clock, rig)
        api.fail["release_machine_lease"] = [ServerError(500, "outage")]
        await rig.ctl.update_settings(Settings(apps=[], control=ControlSettings(tick_s=1.0)))
        assert_uncordoned(api, victim)
        assert api.lease(APP, victim) is None
    finally:
        await rig.ctl.stop()


async def test_a_machine_suspended_too_long_is_stopped(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    serving = api.add(APP, "started")
    asleep = api.add(APP, "suspended")
    rig = Rig(api, clock, stop_suspended_after_s=60, scale_down_delay_s=30, idle_to_zero_s=1000)
    await rig.tick()
    await clock.advance(59)
    assert (await rig.tick()).actions == ()
    await clock.advance(1)
    [action] = (await rig.tick()).actions
    assert (action.kind, action.machine_id) == ("stop", asleep)
    await rig.ctl.idle()
    assert state(api, asleep) == "stopped"
    assert state(api, serving) == "started"
    assert rig.metric("autoscaler_scaling_actions_total", action="stop", result="ok") == 1


async def test_a_failed_drain_is_finished_by_a_later_tick(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    mid = api.add(APP, "started")
    rig = Rig(api, clock, idle_to_zero_s=5)
    await rig.tick()
    api.fail["suspend_machine"] = [ServerError(500, "boom")]
    await clock.advance(6)
    [action] = (await rig.tick()).actions
    assert action.kind == "drain"
    await rig.ctl.idle()
    assert state(api, mid) == "started"
    assert api.get(APP, mid).cordoned is True  # left cordoned with our key...
    assert rig.routable() == set()  # ...and out of routing
    assert rig.metric("autoscaler_scaling_actions_total", action="suspend", result="error") == 1
    [status] = rig.ctl.status()
    assert status.last_error is not None
    await clock.advance(1)
    [action] = (await rig.tick()).actions
    assert action.kind == "drain"  # the policy finishes the drain left behind
    await rig.ctl.idle()
    assert state(api, mid) == "suspended"
    assert_uncordoned(api, mid)


@pytest.mark.parametrize(
    "failures",
    [
        {"start_machine": [ServerError(500, "no capacity")] * 2},
        # A refused start whose machine cannot then be read fails (and counts) the same.
        {
            "start_machine": [Conflict(412, "not startable")] * 2,
            "get_machine": [ServerError(503, "unavailable")] * 2,
        },
    ],
    ids=["start-fails", "read-after-412-fails"],
)
async def test_wake_tries_the_next_machine_when_one_fails_to_start(
    api: FakeMachinesAPI, clock: FakeClock, failures: dict[str, list[FlyError]]
) -> None:
    """An API error fails the resume twice: tried again once (0.25 s later), then the
    next machine is started."""
    first = api.add(APP, "suspended")
    second = api.add(APP, "stopped")
    api.fail.update(failures)
    rig = Rig(api, clock)
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    await clock.advance(0.3)
    assert await task == "start"
    assert api.ops("start_machine") == [first, first, second]
    assert rig.routable() == {second}
    assert rig.metric("autoscaler_scaling_actions_total", action="resume", result="error") == 2
    assert rig.metric("autoscaler_scaling_actions_total", action="start", result="ok") == 1


@pytest.mark.parametrize("ok", [False, True], ids=["412", "200"])
async def test_a_wake_whose_machine_someone_else_started_routes_it_whatever_fly_answers(
    api: FakeMachinesAPI, clock: FakeClock, ok: bool
) -> None:
    """Someone else started the machine after our last list (``fly machine start``), so
    our start finds it started. Fly documents no answer to that (docs/fly-api-notes.md):
    a 412 naming the state, as the emulator answers, or a 200 with ``previous_state``
    started. Either way the wake routes the machine, one start call, counted done."""
    api.started_start_ok = ok
    mid = api.add(APP, "stopped")
    rig = Rig(api, clock)
    await rig.tick()
    api.set(APP, mid, state="started")
    assert await rig.ctl.wake(APP) == "start"
    assert api.ops("start_machine") == [mid]
    assert rig.routable() == {mid}
    assert rig.metric("autoscaler_scaling_actions_total", action="start", result="ok") == 1


async def test_a_wake_passes_over_a_machine_whose_host_is_unreachable(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """The list says Fly cannot reach the suspended machine's host (``host_status``): its
    resume would answer 503, so the wake cold-starts the stopped one and never calls the
    unreachable one. With every host unreachable it is tried all the same."""
    lost = api.add(APP, "suspended")
    api.set(APP, lost, host_status="unreachable")
    other = api.add(APP, "stopped")
    rig = Rig(api, clock)
    assert await rig.ctl.wake(APP) == "start"
    assert api.ops("start_machine") == [other]
    assert rig.routable() == {other}


async def test_a_resume_an_api_error_failed_is_tried_again_before_a_cold_start(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """One 500 on the resume: the wake pauses 0.25 s and resumes the same machine (a few
    hundred ms on Fly) rather than cold-start a stopped one (seconds)."""
    first = api.add(APP, "suspended")
    api.add(APP, "stopped")
    api.fail["start_machine"] = [ServerError(500, "internal error")]
    rig = Rig(api, clock)
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    assert not task.done()
    await clock.advance(0.3)
    assert await task == "resume"
    assert api.ops("start_machine") == [first, first]
    assert rig.routable() == {first}


@pytest.mark.parametrize(
    "failures",
    [
        {"start_machine": [ServerError(500, "internal error")]},
        {"acquire_machine_lease": [ServerError(503, "unavailable")]},
        {"start_machine": [RateLimited(429, "slow down", retry_after=1.5)]},
    ],
    ids=["resume-500", "lease-503", "resume-429"],
)
async def test_a_transient_api_error_on_the_only_machine_is_retried_within_the_wake(
    api: FakeMachinesAPI, clock: FakeClock, failures: dict[str, list[FlyError]]
) -> None:
    """One 5xx or 429 on the resume of an app's only machine used to end the wake at once
    ("no machine that can be woken"; the proxy, holding its requests, asked for another
    wake a second later). The machine is tried again after 0.25 s, or the Retry-After
    the API gives."""
    mid = api.add(APP, "suspended")
    api.fail.update(failures)
    [error] = [e for errors in failures.values() for e in errors]
    pause = error.retry_after if isinstance(error, RateLimited) else 0.25
    rig = Rig(api, clock, wake_timeout_s=30)
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    await clock.advance(pause - 0.05)
    assert not task.done()  # failed once, pausing
    await clock.advance(0.1)
    assert await task == "resume"
    assert rig.routable() == {mid}
    assert rig.metric("autoscaler_wake_duration_seconds_count", kind="resume") == 1


async def test_a_wake_reads_again_between_tries_with_one_attempt(
    api: FakeMachinesAPI, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refreshes between a wake's tries run under ``one_attempt`` (as a tick's calls):
    with the client's retries (5, with backoff) a refresh during an outage took seconds,
    and paced the wake's tries instead of their 0.25-1 s. So does the app's first read.
    (Tried at 0, 0.25 and 0.75 s: it re-reads at 1.75 s, READ_GAP_S after its first read.)"""
    from autoscaler.fly import client as fly_client

    api.add(APP, "suspended")
    api.fail["start_machine"] = [ServerError(500, "internal error")] * 3
    rig = Rig(api, clock, wake_timeout_s=30)
    bounds: list[float | None] = []
    list_machines = api.list_machines

    async def recording(app: str) -> list[m.Machine]:
        bounds.append(fly_client._one_attempt.get())  # the bound the client would apply
        return await list_machines(app)

    monkeypatch.setattr(api, "list_machines", recording)
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    await clock.advance(1.8)
    assert await task == "resume"
    timeout = rig.ctl.settings.control.api_timeout_s
    assert len(bounds) >= 2
    assert set(bounds) == {timeout}  # the first read too


async def test_a_wake_reads_an_app_never_read_through_an_outage(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """The app's first read (a request before the controller's first list of it) makes
    one attempt at a time, paced 0.25 s doubling to 1 s, until the wake's deadline: it
    kept the client's retries, which gave up after a few seconds of an outage."""
    mid = api.add(APP, "suspended")
    api.fail["list_machines"] = [ServerError(500, "internal error") for _ in range(4)]
    rig = Rig(api, clock, wake_timeout_s=30)
    t0 = clock()
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    assert len(api.ops("list_machines")) == 1
    for reads, at in ((2, 0.25), (3, 0.75), (4, 1.75), (5, 2.75)):
        await clock.advance(t0 + at + 0.01 - clock())
        assert len(api.ops("list_machines")) == reads
    assert await task == "resume"
    assert rig.routable() == {mid}


async def test_a_wake_gives_up_on_an_app_it_cannot_read_at_its_deadline(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    api.add(APP, "suspended")
    api.fail["list_machines"] = [ServerError(500, "internal error") for _ in range(100)]
    rig = Rig(api, clock, wake_timeout_s=5)
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    await clock.advance(6)
    with pytest.raises(WakeError, match="could not be read"):
        await task
    assert 5 <= len(api.ops("list_machines")) <= 7  # about one a second


async def test_a_wake_waits_for_another_party_s_start_no_longer_than_a_cold_start_takes(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A machine someone else started is waited for (a second start for one need is a
    machine too many), but one stuck in ``starting`` past START_PATIENCE_S does not hold
    the app's requests until ``wake_timeout_s``: the wake starts another beside it."""
    stuck = api.add(APP, "starting")
    other = api.add(APP, "stopped")
    rig = Rig(api, clock, wake_timeout_s=60)
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    await clock.advance(START_PATIENCE_S - 1)
    assert not task.done()
    assert api.ops("start_machine") == []  # waited for
    await clock.advance(2)
    assert_woke(api, rig, task, "start", other)
    assert state(api, stuck) == "starting"


def assert_woke(
    api: FakeMachinesAPI, rig: Rig, task: asyncio.Future[str], how: str, mid: str
) -> None:
    """The wake ``task`` is done, by waking ``mid`` (``how``): the one machine started and
    routable."""
    assert task.done()
    assert task.result() == how
    assert api.ops("start_machine") == [mid]
    assert rig.routable() == {mid}


def began(clock: FakeClock, ago: float, before: str = "stopped") -> dict[str, Any]:
    """A machine's fields for a start that Fly began ``ago`` seconds ago by the rig's time
    of day, from ``before`` (its events, newest first, as Fly lists them)."""
    at = (EPOCH + clock() - ago) * 1000
    kind = {"stopped": "exit", "suspended": "suspend"}[before]
    return {
        "created_at": datetime.fromtimestamp(EPOCH - 86400, tz=UTC),
        "events": [
            {"type": "start", "status": "starting", "source": "user", "timestamp": at},
            {"type": kind, "status": before, "source": "flyd", "timestamp": at - 60_000},
        ],
    }


async def test_a_wake_passes_at_once_a_machine_fly_began_starting_long_ago(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """The patience counts from when Fly began the start (the machine's events), not from
    when the wake first saw it: a machine stuck in ``starting`` for a minute is passed at
    once. It held every new wake START_PATIENCE_S more."""
    stuck = api.add(APP, "starting")
    api.set(APP, stuck, **began(clock, 60))
    other = api.add(APP, "stopped")
    rig = Rig(api, clock, wake_timeout_s=60)
    with capture_logs() as logs:
        task = asyncio.ensure_future(rig.ctl.wake(APP))
        await settle()
        await clock.advance(1)
        assert task.done()
    assert task.result() == "start"
    assert api.ops("start_machine") == [other]
    assert [e["machine"] for e in logs if e["event"] == "wake_passes_slow_start"] == [stuck]
    assert state(api, stuck) == "starting"


@pytest.mark.parametrize("timed_by", ["its event", "updated_at"])
async def test_a_wake_waits_for_a_fresh_start_what_is_left_of_its_patience(
    api: FakeMachinesAPI, clock: FakeClock, timed_by: str
) -> None:
    """A start Fly began 4 s ago is waited for, START_PATIENCE_S - 4 more, not from the
    wake's first sight. Timed by its start event, or by ``updated_at`` when that is later
    (the state moved since the event: a restart's boot)."""
    booting = api.add(APP, "starting")
    if timed_by == "its event":
        api.set(APP, booting, **began(clock, 4))
    else:
        updated = datetime.fromtimestamp(EPOCH + clock() - 4, tz=UTC)
        api.set(APP, booting, **began(clock, 600), updated_at=updated)
    other = api.add(APP, "stopped")
    rig = Rig(api, clock, wake_timeout_s=60)
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    await clock.advance(START_PATIENCE_S - 4 - 1)
    assert not task.done()
    assert api.ops("start_machine") == []  # waited for
    await clock.advance(2)
    assert task.done()
    assert task.result() == "start"
    assert api.ops("start_machine") == [other]
    assert state(api, booting) == "starting"


@pytest.mark.parametrize(
    "unusable",
    [
        {},
        {"events": [{"type": "start", "status": "starting", "timestamp": 2 * EPOCH * 1000}]},
        {"events": [{"type": "start", "status": "starting", "timestamp": 5}]},
        {"events": [{"type": "update", "status": "updating", "timestamp": EPOCH * 1000}]},
    ],
    ids=["no events", "in the future", "1970", "not a start"],
)
async def test_a_start_fly_gives_no_usable_time_of_is_waited_for_from_the_first_sight(
    api: FakeMachinesAPI, clock: FakeClock, unusable: dict[str, Any]
) -> None:
    """Without a usable time of Fly's (none, one ahead of ours, garbage, a newest event
    that began no start), the patience counts from the wake's first sight, as before:
    never longer (a time in the future), never shorter. Beside it, a machine Fly began
    starting long ago is passed at once by the same wake."""
    unknown = api.add(APP, "starting")
    api.set(APP, unknown, **unusable)
    stuck = api.add(APP, "starting")
    api.set(APP, stuck, **began(clock, 60))
    other = api.add(APP, "stopped")
    rig = Rig(api, clock, wake_timeout_s=60)
    with capture_logs() as logs:
        task = asyncio.ensure_future(rig.ctl.wake(APP))
        await settle()
        await clock.advance(1)
        passed = [e["machine"] for e in logs if e["event"] == "wake_passes_slow_start"]
        assert passed == [stuck]  # at once
        await clock.advance(START_PATIENCE_S - 2)
        assert not task.done()
        assert api.ops("start_machine") == []  # the other one waited for
        await clock.advance(2)
        assert task.done()
    assert task.result() == "start"
    assert api.ops("start_machine") == [other]
    assert {state(api, unknown), state(api, stuck)} == {"starting"}


async def test_a_wake_times_another_party_s_start_by_fly_only_in_a_list_of_its_own(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """The wake's record of the app may be older than the wake (a tick's list, or a wake
    before: in cluster mode a replica that leads again wakes without reading first when
    it woke the app last). A machine that list showed ``starting`` for a minute may be up
    by now: the wake reads the app again before it passes that start on Fly's time. It
    passed it at once, and started another machine beside the one already up."""
    booted = api.add(APP, "starting")
    api.set(APP, booted, **began(clock, 60))
    other = api.add(APP, "stopped")
    rig = Rig(api, clock, wake_timeout_s=60)
    await rig.tick()  # lists the machine starting, Fly began it a minute ago
    assert api.ops("start_machine") == []
    await clock.advance(1)
    api.set(APP, booted, state="started")  # up since that list
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    await clock.advance(1)
    assert task.done()
    assert task.result() == "start"  # it waited for that start, which was over
    assert api.ops("start_machine") == []
    assert rig.routable() == {booted}
    assert state(api, other) == "stopped"


@pytest.mark.parametrize(("fell_back", "how"), [(False, "resume"), (True, "start")])
async def test_a_wake_that_waited_for_another_party_s_resume_is_named_by_how_it_came_up(
    api: FakeMachinesAPI, clock: FakeClock, fell_back: bool, how: str
) -> None:
    """Another party resumes a machine (listed ``starting``, as a start is): its events
    say it began from ``suspended``, so the wake that waited for it is a resume in its
    requests' header, the histogram and the log (it was labelled a start); unless, once
    up, its events say it booted cold (its snapshot unusable, as the emulator records
    it): a start then (it was a resume)."""
    mid = api.add(APP, "starting")
    api.set(APP, mid, **began(clock, 0, before="suspended"))
    rig = Rig(api, clock)
    with capture_logs() as logs:
        task = asyncio.ensure_future(rig.ctl.wake(APP))
        await settle()
        assert rig.app.waking == "resume"  # as far as can be told while it comes up
        await clock.advance(1)
        up: dict[str, Any] = {"state": "started"}
        if fell_back:
            events = api.get(APP, mid).model_extra["events"]  # type: ignore[index]
            at = events[0]["timestamp"] + 1000
            cold = {"type": "launch", "status": "started", "timestamp": at}
            up["events"] = [{**cold, "request": {"resume": False}}, *events]
        api.set(APP, mid, **up)
        await clock.advance(1)
        assert await task == how
    assert api.ops("start_machine") == []
    assert rig.metric("autoscaler_wake_duration_seconds_count", kind=how) == 1
    if fell_back:
        assert rig.metric("autoscaler_wake_duration_seconds_count", kind="resume") == 0
    assert [e["how"] for e in logs if e["event"] == "wake"] == [how]


async def test_a_wake_that_waited_for_another_party_s_start_is_measured_as_one(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """Its requests are told ``start``; the wake-duration histogram and the log say so
    too (they had no sample and no line for it)."""
    mid = api.add(APP, "starting")
    api.add(APP, "stopped")
    rig = Rig(api, clock)
    with capture_logs() as logs:
        task = asyncio.ensure_future(rig.ctl.wake(APP))
        await settle()
        await clock.advance(2)
        api.set(APP, mid, state="started")
        await clock.advance(1)
        assert await task == "start"
    assert api.ops("start_machine") == []
    assert rig.metric("autoscaler_wake_duration_seconds_count", kind="start") == 1
    assert 2 <= rig.metric("autoscaler_wake_duration_seconds_sum", kind="start") <= 3
    assert [e["how"] for e in logs if e["event"] == "wake"] == ["start"]


@pytest.mark.parametrize(
    ("cordoned", "other_state", "kind"),
    [(True, "stopped", "start"), (False, "suspended", "resume")],
    ids=["under someone else's cordon", "a resume instead"],
)
async def test_a_wake_does_not_wait_for_another_party_s_start_it_cannot_use_or_beat(
    api: FakeMachinesAPI, clock: FakeClock, cordoned: bool, other_state: str, kind: str
) -> None:
    """Another party's start under way is not waited for when the wake can do without:
    a machine starting under someone else's cordon (an operator's, a deploy's) never
    routes once up (docs/policy.md: we never route to it nor lift that cordon); and rule 2
    wakes the fastest machine first, a resume taking a few hundred ms on Fly where a cold
    start takes one to several seconds. The wake waited START_PATIENCE_S, or the cold
    start, for them."""
    booting = api.add(APP, "starting", cordoned=cordoned)
    other = api.add(APP, other_state)
    rig = Rig(api, clock, wake_timeout_s=60)
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    await clock.advance(1)
    assert task.done()
    assert task.result() == kind
    assert api.ops("start_machine") == [other]
    assert rig.routable() == {other}
    assert state(api, booting) == "starting"


@pytest.mark.parametrize("beside", [None, "stopped"], ids=["alone", "beside a cold start"])
async def test_a_wake_waits_for_another_party_s_resume_rather_than_resume_another(
    api: FakeMachinesAPI, clock: FakeClock, beside: str | None
) -> None:
    """Another party resumes a machine (its events say the start began from
    ``suspended``) and another is suspended: resuming that one would be no faster, and
    two machines would come up for one need. The wake waits for the resume under way, and
    the request is served by it; so too beside another party's cold start. It resumed the
    suspended machine at once. The wake is a resume either way: the resume is what came
    up (beside a cold start it was named a start, as any wait beside one)."""
    resumed = api.add(APP, "starting")
    api.set(APP, resumed, **began(clock, 0, before="suspended"))
    if beside is not None:
        cold = api.add(APP, "starting")
        api.set(APP, cold, **began(clock, 0, before=beside))
    asleep = api.add(APP, "suspended")
    rig = Rig(api, clock, wake_timeout_s=60)
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    await clock.advance(RESUME_PATIENCE_S / 2)
    assert not task.done()
    assert api.ops("start_machine") == []  # waited for
    api.set(APP, resumed, state="started")
    await clock.advance(1)
    assert task.done()
    assert task.result() == "resume"
    assert rig.metric("autoscaler_wake_duration_seconds_count", kind="resume") == 1
    assert api.ops("start_machine") == []
    assert rig.routable() == {resumed}
    assert state(api, asleep) == "suspended"


@pytest.mark.parametrize("ago", [0.0, 60.0], ids=["falls back to a cold boot", "long ago"])
async def test_a_wake_resumes_another_machine_once_another_party_s_resume_is_slow(
    api: FakeMachinesAPI, clock: FakeClock, ago: float
) -> None:
    """Another party's resume still under way RESUME_PATIENCE_S after Fly began it fell
    back to a cold boot (an unusable snapshot): a suspended machine is resumed then, and
    at once when the wake finds the resume begun that long ago. The first case resumed
    it at once, before the resume under way had its chance."""
    resumed = api.add(APP, "starting")
    api.set(APP, resumed, **began(clock, ago, before="suspended"))
    asleep = api.add(APP, "suspended")
    rig = Rig(api, clock, wake_timeout_s=60)
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    if ago < RESUME_PATIENCE_S:
        await clock.advance(RESUME_PATIENCE_S - ago - 0.5)
        assert not task.done()
        assert api.ops("start_machine") == []  # waited for
    await clock.advance(1)
    assert_woke(api, rig, task, "resume", asleep)
    assert state(api, resumed) == "starting"


async def test_a_wake_that_passes_another_party_s_slow_resume_says_so(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A resume of another machine that goes ahead once RESUME_PATIENCE_S has run out
    writes its line, as a passed start does (``wake_passes_slow_start``): once, naming the
    resume passed. It went ahead without a word."""
    resumed = api.add(APP, "starting")
    api.set(APP, resumed, **began(clock, 0, before="suspended"))
    asleep = api.add(APP, "suspended")
    rig = Rig(api, clock, wake_timeout_s=60)
    with capture_logs() as logs:
        task = asyncio.ensure_future(rig.ctl.wake(APP))
        await settle()
        await clock.advance(RESUME_PATIENCE_S - 0.5)
        assert not [e for e in logs if e["event"] == "wake_passes_slow_resume"]
        await clock.advance(1)
        assert await task == "resume"
    assert api.ops("start_machine") == [asleep]
    passed = [e for e in logs if e["event"] == "wake_passes_slow_resume"]
    assert [(e["app"], e["machine"], e["log_level"]) for e in passed] == [(APP, resumed, "info")]
    assert not [e for e in logs if e["event"] == "wake_passes_slow_start"]


@pytest.mark.parametrize(
    ("waking", "how"),
    [("a cold start", "resume"), ("a resume", "uncordon")],
    ids=["a resume beside a cold start", "a take-back beside a resume"],
)
async def test_a_wake_does_not_wait_for_another_party_s_start_it_beats(
    api: FakeMachinesAPI, clock: FakeClock, waking: str, how: str
) -> None:
    """Another party's cold start (its events say it began from ``stopped``) is not
    waited for by a resume of a suspended machine, which is up in well under a second on
    Fly; nor is another party's resume by a drain of ours to take back, which is up now and
    starts no new machine."""
    booting = api.add(APP, "starting")
    before = "stopped" if waking == "a cold start" else "suspended"
    api.set(APP, booting, **began(clock, 0, before=before))
    if how == "resume":
        woken = api.add(APP, "suspended")
    else:
        woken = api.add(APP, "started", cordoned=True, metadata={CORDON_METADATA_KEY: "drain"})
    rig = Rig(api, clock, wake_timeout_s=60)
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    await clock.advance(0.5)
    assert task.done()
    assert task.result() == how
    assert api.ops("start_machine") == ([woken] if how == "resume" else [])
    assert rig.routable() == {woken}
    assert state(api, booting) == "starting"


async def test_a_tick_told_to_retry_in_an_hour_retries_within_a_minute(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A 429's Retry-After is honoured, up to MAX_RETRY_AFTER_S: an hour (a mistake, or
    a date on a skewed clock) would stop the app's loop, its scale-downs included."""
    api.add(APP, "started")
    rig = Rig(api, clock)
    api.fail["list_machines"] = [RateLimited(429, "slow down", retry_after=3600.0)]
    await rig.ctl.start()
    try:
        await clock.advance(1)
        assert len(api.ops("list_machines")) == 1
        await clock.advance(30)
        assert len(api.ops("list_machines")) == 1  # a long Retry-After is honoured...
        await clock.advance(MAX_RETRY_AFTER_S)
        assert len(api.ops("list_machines")) >= 2  # ...up to a minute
    finally:
        await rig.ctl.stop()


async def test_a_resume_asked_to_retry_much_later_gives_way_to_a_cold_start(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A 429 that says to come back in 30 s: the stopped machine is started at once."""
    first = api.add(APP, "suspended")
    second = api.add(APP, "stopped")
    api.fail["start_machine"] = [RateLimited(429, "slow down", retry_after=30.0)]
    rig = Rig(api, clock)
    assert await rig.ctl.wake(APP) == "start"
    assert api.ops("start_machine") == [first, second]


async def test_a_wake_whose_only_machine_keeps_failing_gives_up_at_its_timeout(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """Retried with a pause that doubles up to 1 s: about a call a second, not one per
    turn of the loop, and the wake ends at wake_timeout_s."""
    mid = api.add(APP, "suspended")
    api.fail["start_machine"] = [ServerError(500, "internal error") for _ in range(100)]
    rig = Rig(api, clock, wake_timeout_s=10)
    t0 = clock()
    ended: list[float] = []
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    task.add_done_callback(lambda _: ended.append(clock()))
    await settle()
    await clock.advance(11)
    with pytest.raises(WakeError):
        await task
    # Tries at 0, 0.25, 0.75, then every second to 9.75 s; the next would be late.
    assert ended[0] - t0 >= 9.75
    tries = api.ops("start_machine")
    assert tries == [mid] * 12


def wakes(rig: Rig) -> dict[str, float]:
    """``autoscaler_wakes_total`` of the app, by result (those counted at all)."""
    counted = {r: rig.metric("autoscaler_wakes_total", result=r) for r in WAKE_RESULTS}
    return {r: n for r, n in counted.items() if n}


async def test_every_wake_counts_by_how_it_ended(api: FakeMachinesAPI, clock: FakeClock) -> None:
    """``autoscaler_wakes_total``: a wake that brought a machine up, or found one
    routable, is ok; one that gave up at wake_timeout_s, or found no machine it could
    wake, failed; one that a reload or a stop cut short, cancelled. The wake histogram
    keeps timing the ok ones that woke a machine, and those only."""
    api.add(APP, "suspended")
    rig = Rig(api, clock)
    assert await rig.ctl.wake(APP) == "resume"
    assert await rig.ctl.wake(APP) == "none"  # up already
    assert wakes(rig) == {"ok": 2}
    # Gives up at its timeout: every resume answered 500.
    down = FakeMachinesAPI()
    down.add(APP, "suspended")
    down.fail["start_machine"] = [ServerError(500, "internal error") for _ in range(100)]
    rig = Rig(down, clock, wake_timeout_s=10)
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    await clock.advance(11)
    with pytest.raises(WakeError):
        await task
    assert wakes(rig) == {"failed": 1}
    # Cut short: a reload takes the app's wake away; a stop closes the wakes.
    rig.view.set_waker(rig.ctl.wake)
    rig.view.wake(APP)
    await settle()
    await clock.advance(1)
    await rig.view.end_wake(APP)
    rig.view.wake(APP)
    await settle()
    await rig.view.close()
    assert wakes(rig) == {"failed": 1, "cancelled": 2}
    assert rig.metric("autoscaler_wake_duration_seconds_count", kind="resume") == 0
    # No machine to wake at all.
    rig = Rig(FakeMachinesAPI(), clock)
    with pytest.raises(WakeError):
        await rig.ctl.wake(APP)
    assert wakes(rig) == {"failed": 1}


async def test_a_wake_cut_short_by_a_reload_that_removes_its_app_counts_cancelled(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A reload that takes the app away cuts its wake short: cancelled, as the metric's
    help says. The reload let go of the app before the wake ended, and a wake of an app
    no longer scaled was not counted at all (autoscaler_wakes_total stayed at 0)."""
    api.add(APP, "stopped")
    api.gates["start_machine"] = asyncio.Event()  # never set: the wake is under way
    rig = Rig(api, clock)
    rig.view.set_waker(rig.ctl.wake)
    rig.view.wake(APP)
    await settle()
    await rig.ctl.update_settings(Settings(apps=[], control=ControlSettings(tick_s=1.0)))
    assert wakes(rig) == {"cancelled": 1}


async def test_a_failed_wake_is_logged_once_a_minute_for_the_same_error(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A wake that gives up says so (it wrote no line: its held requests got 503 and the
    log said nothing why). Asked again every second while requests wait, the same error
    is logged once a minute."""
    rig = Rig(api, clock)  # no machine at all: nothing can be woken

    async def fail() -> None:
        with pytest.raises(WakeError):
            await rig.ctl.wake(APP)

    with capture_logs() as logs:
        for _ in range(3):
            await fail()
            await clock.advance(1)
        await clock.advance(WAKE_FAILED_LOG_S)
        await fail()
    failed = [e for e in logs if e["event"] == "wake_failed"]
    assert len(failed) == 2
    assert all(e["app"] == APP and "no machine" in e["error"] for e in failed)


async def test_a_failed_wake_s_api_error_is_the_same_error_whatever_its_request_id(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """Fly answers every call with a request id of its own, which an error's text
    carries: the same refusal (the app's list answered 404, a token revoked: 401) of
    wakes asked again every second was logged every second, each a new error."""
    rig = Rig(api, clock)
    api.fail["list_machines"] = [
        NotFound(404, "app not found", request_id=f"req-{i}") for i in range(5)
    ]
    with capture_logs() as logs:
        for _ in range(5):
            with pytest.raises(AppMissing):
                await rig.ctl.wake(APP)
            await clock.advance(1)
    failed = [e for e in logs if e["event"] == "wake_failed"]
    first = str(NotFound(404, "app not found", "req-0"))
    assert [e["error"] for e in failed] == [
        f"app {APP}: the Machines API has no such app ({first})"
    ]
    assert wakes(rig) == {"failed": 5}


async def test_a_machine_that_fails_to_boot_is_given_up_at_once(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    first = api.add(APP, "suspended")
    second = api.add(APP, "stopped")
    api.boot_fails.add(first)
    rig = Rig(api, clock)
    t0 = clock()
    assert await asyncio.wait_for(rig.ctl.wake(APP), timeout=2) == "start"
    assert api.ops("start_machine") == [first, second]
    assert rig.routable() == {second}
    assert clock() - t0 < 1, "the failed boot did not cost a whole wake timeout"
    assert rig.metric("autoscaler_scaling_actions_total", action="resume", result="error") == 1


async def test_wake_starts_a_failed_machine_again(api: FakeMachinesAPI, clock: FakeClock) -> None:
    """One transient boot failure must not leave an app dark: Fly starts a failed machine."""
    mid = api.add(APP, "failed")
    rig = Rig(api, clock)
    assert await rig.ctl.wake(APP) == "start"
    assert rig.routable() == {mid}
    assert rig.metric("autoscaler_machine_restarts_total", result="ok") == 1
    assert rig.ctl.status()[0].machines[0].failures == 0


async def test_a_wake_paces_the_starts_of_a_failed_machine_the_api_refused(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    # A failed machine was never set aside after an API error: the wake started it again
    # at once, again and again (80 calls with the clock standing still), past a 429's
    # Retry-After.
    api.add(APP, "failed")
    api.fail["start_machine"] = [RateLimited(429, "slow down", retry_after=30.0)] * 500
    rig = Rig(api, clock, wake_timeout_s=10)
    wake = asyncio.ensure_future(rig.ctl.wake(APP))
    for _ in range(20):
        await settle()
    assert len(api.ops("start_machine")) == 1
    wake.cancel()
    await asyncio.gather(wake, return_exceptions=True)


async def test_a_wake_does_not_list_in_a_loop_for_a_failed_machine_it_cannot_choose(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    # Its restart due (but cordoned: not a candidate), the wake paused 0 s and listed the
    # app again until its deadline: 400 lists with the clock standing still.
    api.add(APP, "failed", cordoned=True)
    rig = Rig(api, clock, wake_timeout_s=10)
    wake = asyncio.ensure_future(rig.ctl.wake(APP))
    for _ in range(20):
        await settle()
    assert len(api.ops("list_machines")) <= 2
    wake.cancel()
    await asyncio.gather(wake, return_exceptions=True)


async def test_wake_without_any_machine_raises(api: FakeMachinesAPI, clock: FakeClock) -> None:
    rig = Rig(api, clock)
    with pytest.raises(WakeError):
        await rig.ctl.wake(APP)
    with pytest.raises(WakeError):
        await rig.ctl.wake("unknown")


async def test_a_boot_that_fails_is_no_machines_api_error(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A start the API took whose machine ended ``failed`` is the app's last error, but
    not the API's: with one app, the control plane read as unhealthy ("Machines API
    unreachable: start ...: machine ... failed to boot", /readyz?control=1 503,
    autoscaler_control_healthy 0) until the next read. An action the API failed is."""
    mid = api.add(APP, "stopped")
    api.broken.add(mid)
    rig = Rig(api, clock, min_machines=1)
    admin = AdminServer(AdminSettings(), rig.metrics, rig.ctl, clock=clock)
    await rig.tick()
    await settle()
    (health,) = rig.ctl.health()
    assert health.last_error == f"start {mid}: machine {mid} failed to boot"
    assert admin.control_problems() == []
    api.broken.discard(mid)
    api.fail["start_machine"] = [ServerError(500, "internal error")]
    await clock.advance(60)
    await rig.tick()
    await settle()
    (problem,) = admin.control_problems()
    assert problem.startswith(f"Machines API unreachable: start {mid}: "), problem
    assert "HTTP 500" in problem


@pytest.mark.parametrize("failing", ["list_machines", "start_machine"])
async def test_a_token_the_api_refuses_is_said_so_not_unreachable(
    api: FakeMachinesAPI, clock: FakeClock, failing: str
) -> None:
    """A tick's read or an action the API refused with 401/403 (``Unauthorized``: the
    token is wrong or may not act on the app) read as "Machines API unreachable: ..." on
    /readyz?control=1, /status and `autoscaler status`, which sent the reader to the
    network; the API answered, and no wait ends it."""
    api.add(APP, "stopped")
    status = 401 if failing == "list_machines" else 403
    api.fail[failing] = [Unauthorized(status, "denied")]
    rig = Rig(api, clock, min_machines=1)
    admin = AdminServer(AdminSettings(), rig.metrics, rig.ctl, clock=clock)
    if failing == "list_machines":
        await rig.ctl.start()  # the loop, which keeps a failed read's error
    else:
        await rig.tick()
    try:
        await settle()
        (problem,) = [p for p in admin.control_problems() if "Machines API" in p]
        assert problem.startswith("Machines API refuses the token (fly.token: "), problem
        assert problem.endswith(f"HTTP {status}: denied"), problem
    finally:
        await rig.ctl.stop()


@pytest.mark.parametrize(
    "refusal",
    [
        Conflict(200, "machine could not be started: boot refused"),  # 200 'status: error'
        Conflict(412, "unable to start machine from current state: 'replacing'"),
        BadRequest(422, "invalid machine config"),
        NotFound(404, "machine not found"),
    ],
    ids=["200-status-error", "412", "422", "404"],
)
async def test_an_action_the_api_refuses_is_no_machines_api_error(
    api: FakeMachinesAPI, clock: FakeClock, refusal: FlyError
) -> None:
    """An action the API answered with a refusal about the machine (its state, its
    config, a machine gone) is the app's last error, but says nothing of the API, which
    answered: with one app, it read as "Machines API unreachable: start ...", even for a
    start refused in a 200 (``status: error``), /readyz?control=1 503 and
    autoscaler_control_healthy 0, until the next read (up to control.idle_poll_s)."""
    mid = api.add(APP, "stopped")
    api.fail["start_machine"] = [refusal]
    rig = Rig(api, clock, min_machines=1)
    admin = AdminServer(AdminSettings(), rig.metrics, rig.ctl, clock=clock)
    await rig.tick()
    await settle()
    (health,) = rig.ctl.health()
    assert health.last_error is not None
    assert health.last_error.startswith(f"start {mid}: "), health.last_error
    assert admin.control_problems() == []


async def test_failed_restarts_back_off_exponentially_until_the_budget_is_spent(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    mid = api.add(APP, "failed")
    api.broken.add(mid)
    rig = Rig(api, clock, max_restart_attempts=3, wake_timeout_s=60)
    t0 = clock()
    starts: list[float] = []
    original = api.start_machine

    async def timed_start(app: str, machine_id: str, **kw: Any) -> Any:
        starts.append(clock() - t0)
        return await original(app, machine_id, **kw)

    api.start_machine = timed_start  # type: ignore[method-assign]
    wake = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    status = rig.ctl.status()[0].machines[0]
    assert (status.failures, status.next_retry_at) == (1, t0 + 2)
    for _ in range(30):
        if wake.done():
            break
        await clock.advance(0.5)
    with pytest.raises(WakeError):
        await wake
    assert starts == [0, 2, 6]  # at once, then after 2 s, then after 4 s more
    assert rig.metric("autoscaler_machine_restarts_total", result="failed") == 3
    assert rig.metric("autoscaler_machine_restarts_total", result="exhausted") == 1
    status = rig.ctl.status()[0].machines[0]
    assert (status.failures, status.left_alone) == (3, True)
    # Past its budget, ticks leave it alone too (min_machines wants one).
    rig.ctl.apps[APP].config = rig.ctl.apps[APP].config.model_copy(update={"min_machines": 1})
    decision = await rig.tick()
    assert decision.actions == ()
    assert "past their budget" in decision.reason
    # Fixed by someone else (it left the failed state): a clean slate.
    api.set(APP, mid, state="stopped")
    api.broken.discard(mid)
    await clock.advance(10)  # past the cooldown of its last failed action
    await rig.tick()
    await rig.ctl.idle()
    assert state(api, mid) == "started"


async def test_a_larger_restart_budget_by_reload_gives_a_machine_left_alone_its_next_try(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    mid = api.add(APP, "failed")
    api.broken.add(mid)
    rig = Rig(api, clock, min_machines=1, max_restart_attempts=1)
    await rig.tick()
    await rig.ctl.idle()
    [status] = rig.ctl.status()[0].machines
    assert (status.failures, status.left_alone) == (1, True)
    rt = rig.ctl.apps[APP]
    rig.ctl.settings.apps[0] = rt.config.model_copy(update={"max_restart_attempts": 3})
    await rig.ctl.update_settings(rig.ctl.settings)
    api.broken.discard(mid)  # the next try boots
    await clock.advance(10)  # past its backoff and the cooldown of the failed action
    await rig.tick()
    await rig.ctl.idle()
    assert state(api, mid) == "started"
    # And lowered below the failures counted, a machine is left alone at once.
    other = api.add(APP, "failed")
    api.broken.add(other)
    rig.ctl.apps[APP].config = rt.config.model_copy(update={"min_machines": 2})
    await clock.advance(1)
    await rig.tick()
    await rig.ctl.idle()
    rig.ctl.settings.apps[0] = rt.config.model_copy(
        update={"min_machines": 2, "max_restart_attempts": 1}
    )
    await rig.ctl.update_settings(rig.ctl.settings)
    failing = next(s for s in rig.ctl.status()[0].machines if s.id == other)
    assert failing.left_alone


@pytest.mark.parametrize(
    "error",
    [RateLimited(429, "rate limited", retry_after=None), ServerError(503, "unavailable")],
    ids=["429", "503"],
)
async def test_start_calls_the_api_refused_cost_a_failed_machine_none_of_its_budget(
    api: FakeMachinesAPI, clock: FakeClock, error: Exception
) -> None:
    # Counted as failed boots, three refused calls spent the budget of a machine that
    # never tried to boot, and it was left alone for good once the API was well again.
    mid = api.add(APP, "failed")
    rig = Rig(api, clock, min_machines=1, max_restart_attempts=3)
    api.fail["start_machine"] = [error] * 3
    for _ in range(40):
        await rig.tick()
        await clock.advance(1.0)
    await rig.ctl.idle()
    assert len(api.ops("start_machine")) == 4
    assert state(api, mid) == "started"
    assert rig.metric("autoscaler_machine_restarts_total", result="failed") == 0
    assert rig.metric("autoscaler_machine_restarts_total", result="exhausted") == 0
    assert rig.metric("autoscaler_machine_restarts_total", result="ok") == 1


async def test_a_tick_restarts_a_failed_machine_the_app_needs(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    mid = api.add(APP, "failed")
    rig = Rig(api, clock, min_machines=1)
    decision = await rig.tick()
    assert [(a.kind, a.machine_id) for a in decision.actions] == [("start", mid)]
    assert "start a failed machine again" in decision.actions[0].reason
    await rig.ctl.idle()
    assert rig.routable() == {mid}
    # Without restart_failed it stays as it is.
    other = FakeMachinesAPI()
    other.add(APP, "failed")
    decision = await Rig(other, clock, min_machines=1, restart_failed=False).tick()
    assert decision.actions == ()


async def test_one_log_line_per_decision_and_machine_seconds(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    api.add(APP, "started")
    api.add(APP, "suspended")
    rig = Rig(api, clock, scale_down_delay_s=30)
    with capture_logs() as logs:
        await rig.tick()
        await clock.advance(2)
        await rig.tick()
    decisions = [e for e in logs if e["event"] == "decision"]
    assert len(decisions) == 2
    for key in ("app", "desired", "panic", "actions", "reason"):
        assert key in decisions[0]
    assert decisions[0]["reason"]
    assert rig.metric("autoscaler_machine_seconds_total", state="started") == 2
    assert rig.metric("autoscaler_machine_seconds_total", state="suspended") == 2
    assert rig.metric("autoscaler_panic_mode") == 0


def _gauges(rig: Rig, name: str) -> dict[str, float]:
    """``name``'s samples for APP, by their other label (or "" for none)."""
    out = {}
    for family in rig.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and sample.labels.get("app") == APP:
                out[sample.labels.get("state", "")] = sample.value
    return out


async def test_machines_by_state_go_back_to_zero_and_go_with_their_app(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    # "seen |= counts.keys()" rebound a local name: a state no machine was in any more
    # kept its last count (a stopped machine started read stopped 1 and started 1).
    mid = api.add(APP, "stopped")
    rig = Rig(api, clock)
    await rig.tick()
    api.set(APP, mid, state="started")
    await clock.advance(1)
    await rig.tick()
    assert _gauges(rig, "autoscaler_machines") == {"stopped": 0, "started": 1, "cordoned": 0}
    # Removed by a reload: its gauges go (dashboards sum them; an alert reads moving ones).
    await rig.ctl.update_settings(Settings(apps=[], control=ControlSettings(tick_s=1.0)))
    for name in ("autoscaler_machines", "autoscaler_desired_machines", "autoscaler_panic_mode"):
        assert _gauges(rig, name) == {}, name


async def test_a_controller_started_again_writes_its_gauges_and_bills_from_then(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A replica that leads again: its gauges were dropped when it stepped down (and the
    unchanged fleet wrote none again), and its first tick billed the time another leader
    had led as its own."""
    api.add(APP, "started")
    rig = Rig(api, clock)
    await rig.tick()
    await clock.advance(2)
    await rig.tick()
    assert rig.metric("autoscaler_machine_seconds_total", state="started") == 2
    await rig.ctl.stop()
    rig.metrics.forget_decisions()  # what a replica that steps down does
    await clock.advance(100)  # another replica leads, and bills this
    await rig.tick()
    assert rig.metric("autoscaler_machine_seconds_total", state="started") == 2
    assert _gauges(rig, "autoscaler_machines")["started"] == 1
    assert set(_gauges(rig, "autoscaler_desired_machines")) == {""}  # exported again
    await clock.advance(1)
    await rig.tick()
    billed = sum(_gauges(rig, "autoscaler_machine_seconds_total").values())
    assert billed == 3  # started or suspended by now: the second since its first tick


def _billed(rig: Rig) -> dict[str, float]:
    return {
        s: rig.metric("autoscaler_machine_seconds_total", state=s) for s in ("started", "suspended")
    }


async def test_machine_seconds_follow_our_changes_between_ticks(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A machine is billed by the time it spent in each state, not by its state at the
    tick: woken 50 s after a tick and ticked 10 s later, it was suspended 50 s and started
    10 s (billed started 60 s before); put to sleep, the time it takes to suspend is
    neither, and it is suspended only from when it was (billed suspended since the tick
    before)."""
    mid = api.add(APP, "suspended")
    rig = Rig(api, clock)
    await rig.tick()
    await clock.advance(50)
    assert await rig.ctl.wake(APP) == "resume"
    await clock.advance(10)
    api.slow_transitions = True
    decision = await rig.tick()  # no request came: idle_to_zero_s is over
    assert _billed(rig) == {"started": 10, "suspended": 50}
    assert [a.kind for a in decision.actions] == ["drain"]
    assert state(api, mid) == "suspending"
    await clock.advance(3)
    api.finish(APP, mid)
    await rig.ctl.idle()
    await clock.advance(7)
    await rig.tick()
    assert _billed(rig) == {"started": 10, "suspended": 57}


async def test_a_start_of_ours_is_billed_from_fly_s_started_not_from_its_port(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """Fly bills a machine by the second from ``started`` (its /wait answers so), whatever
    its app does meanwhile: one whose port answers 5 s later is billed started for those
    5 s too. They were billed as ``starting`` (not billed at all), our record's state
    until the port answers."""
    api.add(APP, "stopped")
    rig = Rig(api, clock)
    await rig.tick()
    rig.port_open = False
    woken = clock.now
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()  # started at once on the fake, and its /wait answered: probing
    await clock.advance(5)
    assert not task.done()
    rig.port_open = True
    await clock.advance(0.1)
    assert await task == "start"
    await clock.advance(10)
    await rig.tick()
    assert _billed(rig) == {"started": pytest.approx(clock.now - woken), "suspended": 0}


async def test_a_change_only_a_list_shows_is_billed_from_halfway(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """Someone else's start between two lists (a sleeping app's polls are a minute apart)
    happened when no list says: it is billed from halfway between them, not from the list
    before (the whole gap as started) nor the one after."""
    mid = api.add(APP, "suspended")
    gone = api.add(APP, "suspended")
    rig = Rig(api, clock, min_lifetime_s=600)
    await rig.tick()
    api.set(APP, mid, state="started")  # fly machine start
    del api.machines[APP][gone]  # fly machine destroy
    await clock.advance(60)
    await rig.tick()
    assert _billed(rig) == {"started": 30, "suspended": 30 + 30}


async def test_a_wake_while_the_loop_backs_off_is_billed_from_the_wake(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A sleeping app's poll refused with 429 and Retry-After 60 s pauses its loop a
    minute, and a wake does not cut that pause short: the machine the wake resumed in it
    was billed started since the last tick (80 s here, 40 of them suspended)."""
    api.add(APP, "suspended")
    rig = Rig(api, clock)
    await rig.ctl.start()
    try:
        await settle()
        first = rig.ctl.apps[APP].last_tick_at
        assert first == clock.now
        api.fail["list_machines"] = [RateLimited(429, "slow down", retry_after=60.0)]
        await clock.advance(80)  # the app asleep: polled at 60 s, refused
        assert api.fail["list_machines"] == []
        rig.app.hold()
        assert await rig.view.wake(APP) == "resume"
        rig.app.release()
        woken = clock.now
        await clock.advance(45)  # the loop's pause ends at 120 s: a tick
        assert rig.ctl.apps[APP].last_tick_at is not None
        assert rig.ctl.apps[APP].last_tick_at > woken
    finally:
        await rig.ctl.stop()  # bills up to now
    assert _billed(rig) == {"started": clock.now - woken, "suspended": woken - first}


async def test_wake_lifts_a_cordon_of_ours_left_on_a_started_machine(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    left = api.add(APP, "started", cordoned=True, metadata={CORDON_METADATA_KEY: "drain"})
    api.add(APP, "suspended")
    rig = Rig(api, clock)
    assert await rig.ctl.wake(APP) == "uncordon"  # the warm machine, not a resume
    assert rig.routable() == {left}
    assert api.ops("start_machine") == []
    await rig.ctl.idle()  # routed at once; the API's cordon lifted after
    assert_uncordoned(api, left)


async def test_a_cordon_of_ours_left_on_a_started_machine_routes_at_once_in_an_outage(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """An outage that began between a drain's cordon and its suspend: the machine is
    started and warm, but the API refuses the uncordon (its lease first). The wake routes
    to it at once, as a drain taken back does, not after the outage; the API's cordon is
    lifted when the API answers again."""
    left = api.add(APP, "started", cordoned=True, metadata={CORDON_METADATA_KEY: "drain"})
    api.fail["acquire_machine_lease"] = [ServerError(503, "down")] * 3
    rig = Rig(api, clock)
    assert await rig.ctl.wake(APP) == "uncordon"
    assert rig.routable() == {left}
    assert api.ops("uncordon_machine") == []  # not yet: the outage
    await rig.ctl.idle()
    del api.fail["acquire_machine_lease"]
    await rig.serve_through_next_tick(left)


async def test_a_list_asked_before_our_uncordon_was_recorded_leaves_our_key_alone(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A wake in an outage records our cordon lifted at once (the machine routes), though
    the uncordon never reached the API. A list asked for before that record and answered
    after it keeps our record (``merge``), and the stale-key cleanup read that record as
    the API's word: "not cordoned, our key left over", and dropped the key once the API
    answered again. Fly then held a cordon with no key of ours: another party's to us,
    never lifted. The cleanup now leaves a machine whose record is newer than the list."""
    left = api.add(APP, "started", cordoned=True, metadata={CORDON_METADATA_KEY: "drain"})
    api.fail["acquire_machine_lease"] = [ServerError(503, "down")] * 3
    rig = Rig(api, clock)
    await clock.advance(1)
    assert await rig.ctl.wake(APP) == "uncordon"
    await rig.ctl.idle()
    del api.fail["acquire_machine_lease"]
    rt = rig.ctl.apps[APP]
    assert rt.machines[left].cordoned is False  # our record, ahead of the API
    listed = await api.list_machines(APP)  # asked for before the wake's record
    rt.merge(listed, rt.touched[left] - 0.5, clock())
    rig.ctl.actuator.cleanup(rt)
    await rig.ctl.idle()
    assert api.get(APP, left).cordoned is True
    assert meta(api, left).get(CORDON_METADATA_KEY) == "drain"  # still ours to lift
    await rig.serve_through_next_tick(left)


@pytest.mark.parametrize(
    "refusal",
    [
        LeaseHeld(409, "lease currently held by fly deploy"),  # ours lapsed, and was taken
        ServerError(500, "boom"),
        None,  # the API takes the start, and the machine fails to boot
    ],
    ids=["lease", "5xx", "boot failed"],
)
async def test_a_start_that_fails_leaves_our_cordon_recorded(
    api: FakeMachinesAPI, clock: FakeClock, refusal: FlyError | None
) -> None:
    """A machine asleep under a cordon of ours (a drain whose uncordon never came): its
    start records the cordon lifted ahead of the boot, and lifts it in the API once the
    machine is up. A start that failed left the record uncordoned while Fly kept our
    cordon, until the next list: the record says cordoned, by us, again."""
    mid = api.add(APP, "suspended", cordoned=True, metadata={CORDON_METADATA_KEY: "drain"})
    if refusal is None:
        api.boot_fails.add(mid)
    else:
        api.fail["start_machine"] = [refusal]
    rig = Rig(api, clock)
    rt = rig.ctl.apps[APP]
    await rig.ctl.waker.refresh(rt)
    with pytest.raises(FlyError if refusal is not None else ActionError):
        await rig.ctl.actuator.bring_up(rt, mid, "resume")
    assert api.ops("uncordon_machine") == []
    assert api.get(APP, mid).cordoned is True
    assert rt.machines[mid].cordoned is True
    assert rt.cordoned_by_us(rt.machines[mid])


async def test_a_failed_start_leaves_the_cordon_a_list_during_its_boot_showed(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A start records our cordon lifted ahead of its boot, and puts it back as it was if
    the boot fails. A list that came during the boot (the tick's) showed the cordon gone
    (someone lifted it, and our key with it); the record kept ours while the start ran,
    and the failure then put back the cordon of before the boot: the machine counted as
    cordoned by us until the next list. Now the failure leaves what that list said."""
    mid = api.add(APP, "suspended", cordoned=True, metadata={CORDON_METADATA_KEY: "drain"})
    rig = Rig(api, clock)
    rt = rig.ctl.apps[APP]
    await rig.ctl.waker.refresh(rt)
    assert rt.cordoned_by_us(rt.machines[mid])
    api.gates["start_machine"] = gate = asyncio.Event()
    assert rig.ctl.actuator.launch(rt, Action("resume", mid, "wanted")) is not None
    await settle()
    assert api.ops("start_machine") == [mid]  # its call hangs
    api.set(APP, mid, cordoned=False)  # someone lifts the cordon, and our key with it
    api.set(APP, mid, config=api.get(APP, mid).config.model_copy(update={"metadata": {}}))
    await clock.advance(1)
    await rig.tick()  # lists: the machine's record is the start's while it runs
    api.fail["start_machine"] = [ServerError(503, "unavailable")]
    gate.set()
    await rig.ctl.idle()
    record = rt.machines[mid]
    assert record.cordoned is False
    assert not record.marked
    assert not rt.cordoned_by_us(record)


async def test_a_machine_without_an_address_is_asked_for_one(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    mid = api.add(APP, "stopped")
    ip = api.get(APP, mid).private_ip
    api.set(APP, mid, private_ip=None)
    original = api.start_machine

    async def start_and_place(app: str, machine_id: str, **kw: Any) -> Any:
        result = await original(app, machine_id, **kw)
        api.set(app, machine_id, private_ip=ip)  # placed on start, as on Fly
        return result

    api.start_machine = start_and_place  # type: ignore[method-assign]
    rig = Rig(api, clock)
    assert await rig.ctl.wake(APP) == "start"
    assert rig.probed == [(ip, 8080)]
    assert rig.routable() == {mid}


async def test_a_machine_whose_action_failed_cools_down_and_another_is_used(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    first, second = api.add(APP, "suspended"), api.add(APP, "suspended")
    api.fail["start_machine"] = [ServerError(500, "boom")]
    rig = Rig(api, clock)
    rig.app.hold()  # one request waits: one machine wanted
    await clock.advance(1)
    [action] = (await rig.tick()).actions
    assert action.machine_id == first
    await rig.ctl.idle()
    await clock.advance(0.5)
    [action] = (await rig.tick()).actions
    assert action.machine_id == second  # the first still cools down (1 s)
    await rig.ctl.idle()
    assert api.ops("start_machine") == [first, second]
    assert rig.routable() == {second}


async def test_every_action_ends_in_one_log_line_with_its_result_and_duration(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """An operator follows each action in the log: app, machine, action, result and how
    long it took (a resume, a drain, a failed start with its reason). Successes were
    logged unevenly (``machine_up`` with no duration, a
    suspend or a stop not at all) and failures without a duration."""
    first, second = api.add(APP, "suspended"), api.add(APP, "suspended")
    api.fail["start_machine"] = [ServerError(500, "boom")]
    api.gates["start_machine"] = gate = asyncio.Event()
    rig = Rig(api, clock, idle_to_zero_s=5)
    rig.app.hold()  # one request waits: one machine wanted
    with capture_logs() as logs:
        await clock.advance(1)
        await rig.tick()
        await clock.advance(2)  # the start call takes 2 s, and fails
        gate.set()
        await rig.ctl.idle()
        await clock.advance(0.5)
        await rig.tick()  # the other machine then
        await rig.ctl.idle()
        rig.app.release()
        for _ in range(30):  # until idle: the started one is drained
            await clock.advance(1)
            if (await rig.tick()).actions:
                break
        await rig.ctl.idle()
    assert state(api, second) == "suspended"
    ends = [
        {k: e.get(k) for k in ("event", "app", "machine", "action", "result", "duration_s")}
        for e in logs
        if "result" in e and "action" in e
    ]
    assert ends == [
        {
            "event": "action_failed",
            "app": APP,
            "machine": first,
            "action": "resume",
            "result": "error",
            "duration_s": 2.0,
        },
        {
            "event": "action_done",
            "app": APP,
            "machine": second,
            "action": "resume",
            "result": "ok",
            "duration_s": 0.0,
        },
        {
            "event": "action_done",
            "app": APP,
            "machine": second,
            "action": "drain",
            "result": "ok",
            "duration_s": 0.0,
        },
    ]
    [failed] = [e for e in logs if e["event"] == "action_failed"]
    assert "boom" in failed["error"]


async def test_an_action_cancelled_while_it_waits_for_its_lease_ends_in_a_log_line(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """Cut while its lease was still being asked for (the process stopping), a resume left
    no line at all: the log showed an action begun and never ended."""
    mid = api.add(APP, "suspended")
    api.gates["acquire_machine_lease"] = asyncio.Event()  # the lease's request hangs
    rig = Rig(api, clock, idle_to_zero_s=5)
    rig.app.hold()
    with capture_logs() as logs:
        await clock.advance(1)
        await rig.tick()
        await clock.advance(3)
        await rig.ctl.stop()
    ends = [
        {k: e.get(k) for k in ("event", "machine", "action", "result", "duration_s")}
        for e in logs
        if "result" in e and "action" in e
    ]
    assert ends == [
        {
            "event": "action_cancelled",
            "machine": mid,
            "action": "resume",
            "result": "cancelled",
            "duration_s": 3.0,
        }
    ]
    assert state(api, mid) == "suspended"


async def test_taking_back_a_drain_cut_before_its_key_was_set(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    mid = api.add(APP, "started")
    rig = Rig(api, clock, idle_to_zero_s=5)
    await rig.tick()
    api.gates["set_machine_metadata"] = gate = asyncio.Event()  # the key's request hangs
    api.fail["set_machine_metadata"] = [ServerError(503, "unavailable")]  # and then fails
    await clock.advance(6)
    [action] = (await rig.tick()).actions
    assert action.kind == "drain"
    assert await rig.ctl.wake(APP) == "uncordon"
    assert rig.routable() == {mid}  # at once, before the key's answer
    await settle()
    assert api.ops("uncordon_machine") == []  # the uncordon waits for that answer
    gate.set()
    await rig.ctl.idle()
    assert api.ops("cordon_machine") == []  # taken back before the cordon was asked for
    assert api.ops("delete_machine_metadata") == [mid]  # 404: the key was never set
    assert rig.metric("autoscaler_scaling_actions_total", action="uncordon", result="ok") == 1
    assert rig.routable() == {mid}
    assert_uncordoned(api, mid)


async def test_a_machine_whose_fly_checks_are_critical_is_marked_so_in_the_view(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """The proxy's health reads it and takes the machine out of rotation (issue 21)."""
    sick, well = api.add(APP, "started"), api.add(APP, "started")
    api.set(APP, sick, checks=[m.CheckStatus(name="healthz", status="critical")])
    api.set(APP, well, checks=[m.CheckStatus(name="healthz", status="passing")])
    rig = Rig(api, clock, min_machines=2)
    await rig.tick()
    assert rig.app.upstreams[sick].checks_critical is True
    assert rig.app.upstreams[well].checks_critical is False
    # The policy's snapshot says since when (the list that first showed it), and forgets
    # it once the checks pass.
    rt = rig.ctl.apps[APP]
    since = rt.sick_since[sick]
    await clock.advance(5)
    await rig.tick()
    snaps = {s.id: s for s in rt.fleet(rig.app).machines}
    assert (snaps[sick].sick_since, snaps[well].sick_since) == (since, None)
    api.set(APP, sick, checks=[m.CheckStatus(name="healthz", status="passing")])
    await clock.advance(5)
    await rig.tick()
    assert rt.sick_since == {}


@pytest.mark.parametrize(
    ("where", "kind", "routes"),
    [
        ("machine", None, False),
        ("machine", "informational", False),
        ("machine", "readiness", True),
        ("service", None, True),
    ],
)
async def test_only_a_check_that_fly_routes_by_makes_a_machine_critical(
    api: FakeMachinesAPI, clock: FakeClock, where: str, kind: str | None, routes: bool
) -> None:
    """Fly's proxy routes by a service's checks and by machine checks of kind readiness;
    its other machine checks (fly.toml's top-level [checks]) are for monitoring. A critical
    one of those neither takes the machine out of the proxy's rotation nor counts it as
    sick (which would replace and drain it)."""
    mid = api.add(APP, "started")
    check = m.MachineCheck(type="http", path="/db", kind=kind)
    config = api.get(APP, mid).config
    assert config is not None
    assert config.services is not None
    if where == "machine":
        config = config.model_copy(update={"checks": {"db": check}})
        name = "db"
    else:
        service = config.services[0].model_copy(update={"checks": [check]})
        config = config.model_copy(update={"services": [service]})
        name = "servicecheck-00-http-8080"
    api.set(APP, mid, config=config, checks=[m.CheckStatus(name=name, status="critical")])
    rig = Rig(api, clock, min_machines=1)
    await rig.tick()
    assert rig.app.upstreams[mid].checks_critical is routes
    assert (mid in rig.ctl.apps[APP].sick_since) is routes
    [status] = rig.ctl.status()  # /status names the critical checks it does not act on
    [machine] = status.machines
    assert machine.checks_critical_unrouted == (() if routes else ("db",))


async def test_a_machine_drained_sick_is_woken_after_the_others(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """Fly's list forgets the checks of a machine that is not started: the runtime
    remembers that a machine left ``started`` with its checks critical, and a wake tries
    it after the others, however recently it ran, until it is started again."""
    well = api.add(APP, "stopped")
    sick = api.add(APP, "started")
    api.set(APP, sick, checks=[m.CheckStatus(name="healthz", status="critical")])
    rig = Rig(api, clock)
    rt = rig.ctl.apps[APP]
    decision = await rig.tick()  # an idle app: its sick machine is drained at once
    assert [(a.kind, a.machine_id) for a in decision.actions] == [("drain", sick)]
    for _ in range(20):
        if not rt.running:
            break
        await clock.advance(0.5)
    assert state(api, sick) == "stopped"  # a sick machine's drain ends in a stop
    rig.app.upstreams[sick].last_used = clock()  # its last request: the freshest machine
    api.set(APP, sick, checks=[])  # as Fly lists a machine that is not started
    await clock.advance(10)
    await rig.tick()
    assert rt.down_sick == {sick}
    action = choose_wake(rt.fleet(rig.app, clock(), urgent=True))
    assert action is not None
    assert (action.kind, action.machine_id) == ("start", well)  # not the fresher one
    api.set(APP, sick, state="started", checks=[m.CheckStatus(name="healthz", status="passing")])
    await clock.advance(10)
    await rig.tick()
    assert rt.down_sick == set()


async def test_a_machine_that_hangs_is_restarted_within_its_budget(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """The proxy's ejections for the machine's own failures (``Upstream.failing``) make it
    hung: the tick stops it and starts it again, ``max_restart_attempts`` times in a row at
    most; RESTART_MAX_S later it may be restarted again."""
    mid = api.add(APP, "started")
    rig = Rig(api, clock, min_machines=1, max_restart_attempts=2)
    await rig.tick()
    up = rig.app.upstreams[mid]

    def status() -> Any:
        (machine,) = rig.ctl.status()[0].machines
        return machine

    async def hang_and_tick() -> Any:
        up.failing = HUNG_AFTER  # the proxy: ejected, and its probe failed too
        decision = await rig.tick()
        for _ in range(20):  # the restart runs as its own task
            if not rig.ctl.apps[APP].running:
                break
            await clock.advance(0.5)
        return decision

    for restarts in (1, 2):
        calls = len(api.calls)
        decision = await hang_and_tick()
        assert [(a.kind, a.machine_id) for a in decision.actions] == [("restart", mid)]
        assert [c.op for c in api.calls[calls:] if c.op.endswith("_machine")] == [
            "stop_machine",
            "start_machine",
        ]
        # By SIGKILL: a hung app would ignore the stop's own signal until its timeout.
        assert [c.arg for c in api.calls[calls:] if c.op == "stop_machine"] == ["SIGKILL"]
        assert state(api, mid) == "started"
        assert up.failing == 0  # a new process
        assert rig.metric("autoscaler_machine_restarts_total", result="ok") == restarts
        assert (status().hung, status().hung_restarts) == (False, restarts)
    assert rig.metric("autoscaler_machine_restarts_total", result="exhausted") == 1
    # A third hang within RESTART_MAX_S: left alone (as the API says, started).
    decision = await hang_and_tick()
    assert decision.actions == ()
    seen = status()  # /status: hung, after two restarts, the next once the budget allows
    assert (seen.hung, seen.failing, seen.hung_restarts) == (True, HUNG_AFTER, 2)
    assert seen.next_retry_at is not None
    assert seen.next_retry_at > clock()
    await clock.advance(RESTART_MAX_S)
    decision = await hang_and_tick()
    assert [(a.kind, a.machine_id) for a in decision.actions] == [("restart", mid)]


async def test_a_stop_the_api_refused_is_no_restart_of_a_hung_machine(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """Counted before its stop was sent, each restart the API refused (429, 5xx) used the
    hung machine's budget: a short outage left a hanging machine alone."""
    mid = api.add(APP, "started")
    rig = Rig(api, clock, min_machines=1, max_restart_attempts=2)
    await rig.tick()
    up = rig.app.upstreams[mid]
    api.fail["stop_machine"] = [ServerError(503, "unavailable")] * 2
    for _ in range(30):
        up.failing = HUNG_AFTER  # still hanging
        await rig.tick()
        await clock.advance(1.0)
        if rig.metric("autoscaler_machine_restarts_total", result="ok"):
            break
    await rig.ctl.idle()
    assert len(api.ops("stop_machine")) == 3
    assert rig.metric("autoscaler_machine_restarts_total", result="ok") == 1
    assert rig.metric("autoscaler_machine_restarts_total", result="failed") == 0
    assert rig.metric("autoscaler_machine_restarts_total", result="exhausted") == 0
    (machine,) = rig.ctl.status()[0].machines
    assert machine.hung_restarts == 1


async def test_a_hung_machine_is_held_out_of_rotation_until_its_restart(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A hung machine whose restart waits (here for its host) gets no request, not even
    the proxy's probe once its ejection ends (a client's request that would wait
    ``upstream_timeout_s``); its restart lets it back. One that will not be restarted
    (restarts switched off) is let back for the proxy to probe."""
    a, b = api.add(APP, "started"), api.add(APP, "started")
    api.set(APP, a, host_status="unreachable")
    rig = Rig(api, clock, min_machines=2)
    await rig.tick()
    rt = rig.ctl.apps[APP]
    up = rig.app.upstreams[a]
    up.failing = HUNG_AFTER  # the proxy: ejected, and its probe failed too
    rig.app.mark_unhealthy(up, 10.0)  # its ejection, 10 s
    await clock.advance(1)
    await rig.tick()
    assert "waits for its host" in rt.last_reason
    await clock.advance(60)  # the ejection is long over
    await rig.tick()
    assert rig.routable() == {b}
    rt.config = rt.config.model_copy(update={"restart_failed": False})
    await rig.tick()
    assert rig.routable() == {a, b}  # not to be restarted: the proxy may probe it
    rt.config = rt.config.model_copy(update={"restart_failed": True})
    await rig.tick()
    assert rig.routable() == {b}
    api.set(APP, a, host_status=None)  # the host is back: restarted, and back
    await clock.advance(1)
    await rig.tick()
    for _ in range(20):
        if not rt.running:
            break
        await clock.advance(0.5)
    assert rig.metric("autoscaler_machine_restarts_total", result="ok") == 1
    assert rig.routable() == {a, b}


class ShortBudget:
    """An org API budget with nothing to spare: sleeping apps' polls are put off."""

    def spare(self) -> bool:
        return False


async def timer_app_waits(keep_alive: str, *, budget_short: bool = False) -> int:
    """A timer-like app (one short request every 125 s) under the controller's own loop,
    which polls a sleeping app every ``control.idle_poll_s`` (60 s): how many of 16
    requests found no machine up and waited for a wake."""
    clock, api = FakeClock(), FakeMachinesAPI()
    api.add(APP, "suspended")
    rig = Rig(
        api, clock, keep_alive=keep_alive, idle_to_zero_s=300, min_lifetime_s=30, wake_cost_s=300
    )
    if budget_short:
        rig.ctl.budget = ShortBudget()
    await rig.ctl.start()
    waited = 0
    try:
        for _ in range(16):
            view = rig.app
            if not view.routable():
                waited += 1
                view.hold()
                await rig.view.wake(APP)  # the proxy's path
                await settle()
                view.release()
            [up, *_] = view.routable()
            view.begin(up)
            await clock.advance(0.5)
            view.end(up)
            for _ in range(249):  # the rest of the 125 s gap
                await clock.advance(0.5)
    finally:
        await rig.ctl.stop()
    return waited


@pytest.mark.parametrize("keep_alive", ["fixed", "adaptive"])
async def test_a_slow_poll_does_not_sleep_through_a_prewarm_window(keep_alive: str) -> None:
    """The adaptive keep-alive learns the 125 s period, puts the machine to sleep after
    each request and pre-warms it just before the next: a window of a few seconds that a
    60-120 s poll of the sleeping app missed (every request waited). The loop ticks again
    at the decision's ``next_check``. After the first request and the gaps it learns
    from, no request waits, as under the fixed 300 s timer."""
    assert await timer_app_waits(keep_alive) <= 5


async def test_a_prewarm_window_opens_on_time_on_a_clock_of_epoch_seconds() -> None:
    """A sleeping app's loop ticks at the decision's ``next_check``, where the pre-warm
    window opens (1.7e9 + 0.1 + 98.1 on a clock of epoch seconds). The policy compared the
    idle time, a difference, with the opening: the tick found the window a rounding short
    of open and the pre-warm came a whole ``idle_poll_s`` (60 s) late."""
    clock, api = FakeClock(1.7e9 + 0.1), FakeMachinesAPI()
    mid = api.add(APP, "suspended")
    rig = Rig(api, clock, keep_alive="adaptive", min_lifetime_s=30, wake_cost_s=300)
    rt = rig.ctl.apps[APP]
    plan = Plan(2.0, 100.1, 130.1, 20.0, 100.0, 110.0)  # pre-warm 2 s ahead of 100.1 s
    idle_from = clock.now - 10  # the last request: asleep since the plan's sleep (2 s)
    rig.app.last_request_at = idle_from
    keep = KeepAliveState(plan=plan, idle_from=idle_from, last_arrival=idle_from)
    rt.policy_state = PolicyState(born=idle_from - 600, keepalive=keep)
    opens = idle_from + (100.1 - PREWARM_LEAD_S)
    assert opens - idle_from < 100.1 - PREWARM_LEAD_S  # the case: rounded down
    await rig.ctl.start()
    try:
        while clock.now < opens:
            assert api.ops("start_machine") == [], clock.now - idle_from  # not before
            await clock.advance(min(1.0, opens - clock.now))
        assert api.ops("start_machine") == [mid]  # the pre-warm's resume, at the opening
        await rig.ctl.idle()
        assert rig.routable() == {mid}
    finally:
        await rig.ctl.stop()


async def test_a_prewarm_is_not_put_off_like_a_poll_when_the_org_budget_runs_short() -> None:
    """A short org budget puts sleeping apps' polls off (apps in use and wakes first); a
    pre-warm is a wake due at a known time, not a poll: its tick goes."""
    assert await timer_app_waits("adaptive", budget_short=True) <= 5


async def test_a_wake_finds_the_port_a_deploy_moved_while_the_machine_slept(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A deploy changed a sleeping machine's internal_port after our last list: the wake
    must not probe the old port until its boot bound (60 s, every held request answered
    504 meanwhile); a port shut for a second makes it read the machine again, once."""
    mid = api.add(APP, "suspended", port=8080)
    rig = Rig(api, clock)
    await rig.ctl.tick(APP)  # our record: port 8080
    machine = api.get(APP, mid)
    assert machine.config is not None
    moved = machine.config.model_copy(update={"services": [m.MachineService(internal_port=8081)]})
    api.machines[APP][mid] = machine.model_copy(update={"state": "stopped", "config": moved})
    opens: list[int] = []

    async def probe(host: str, port: int) -> bool:
        opens.append(port)
        return port == 8081

    rig.ctl.actuator.probe = probe
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    for _ in range(30):  # 3 s of probing at most
        await clock.advance(0.1)
        if task.done():
            break
    assert task.done(), f"still probing {sorted(set(opens))} after 3 s"
    assert await task in ("resume", "start")  # resume: our record had it suspended
    assert opens[-1] == 8081
    # Read again once (and, a resume, once for its events: did it fall back to a boot?).
    assert len(api.ops("get_machine")) == (2 if await task == "resume" else 1)
    [upstream] = rig.view.app(APP).routable()
    assert upstream.port == 8081


def _app_tasks(app: str) -> list[str]:
    """The names of the tasks still running for ``app``: its loop, its wake, its actions
    and lease calls (all named with the app's name), its rechecks."""
    names = []
    for task in asyncio.all_tasks():
        name = task.get_name()
        if task.done() or task is asyncio.current_task():
            continue
        named = name in (f"loop:{app}", f"wake:{app}") or f":{app}:" in name
        if named or getattr(task.get_coro(), "__qualname__", "").startswith("Rechecker."):
            names.append(name)
    return names


async def test_a_reload_that_makes_an_app_static_ends_its_wake(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A wake under way waits for a machine that is stopping (it lists the app every
    0.25 s). The reload makes the app static: nothing of the old controller may act on its
    machines afterwards: no task of the app is left, and no API call comes once the reload
    returned, not even when the machine can be started (the wake ran on to its deadline,
    and started it). Made scaled again, the app wakes from a clean start (a new wake, not
    the old one on the old runtime)."""
    mid = api.add(APP, "stopping")
    rig = Rig(api, clock)
    await rig.ctl.start()
    try:
        await clock.advance(0.5)
        rig.app.hold()
        wake = rig.view.wake(APP)
        await settle()
        listed = len(api.ops("list_machines"))
        await clock.advance(1)
        assert not wake.done()
        assert len(api.ops("list_machines")) > listed + 2  # the wake reads every 0.25 s
        rig.app.release()
        static = AppConfig(name=APP, backends=["127.0.0.1:9"])
        await rig.ctl.update_settings(Settings(apps=[static], control=ControlSettings(tick_s=1.0)))
        after = len(api.calls)
        await settle()
        assert _app_tasks(APP) == []
        api.set(APP, mid, state="stopped")  # a wake would start it now
        await clock.advance(5)
        assert api.calls[after:] == []
        assert state(api, mid) == "stopped"

        scaled = AppConfig(name=APP, **KNOBS)
        await rig.ctl.update_settings(Settings(apps=[scaled], control=ControlSettings(tick_s=1.0)))
        rig.app.set_machines(())  # what the proxy does to a static app made scaled
        again = rig.view.wake(APP)
        assert again is not wake
        assert await again == "start"
        assert rig.routable() == {mid}
    finally:
        await rig.ctl.stop()


@pytest.mark.parametrize("becomes", ["static", "removed"])
async def test_a_lease_asked_for_before_a_reload_took_the_app_is_given_back_within_it(
    api: FakeMachinesAPI, clock: FakeClock, becomes: str
) -> None:
    """The wake's start asked for the machine's lease; the reload cancels the start while
    the API has not answered. The lease that answer brings is given back before the
    reload returns, not by a call of ours on the app's machine after it."""
    mid = api.add(APP, "stopped")
    api.gates["acquire_machine_lease"] = asyncio.Event()
    rig = Rig(api, clock)
    await rig.ctl.start()
    try:
        await clock.advance(0.5)
        wake = rig.view.wake(APP)
        await settle()
        assert api.ops("acquire_machine_lease") == [mid]
        apps = [AppConfig(name=APP, backends=["127.0.0.1:9"])] if becomes == "static" else []
        reload = asyncio.ensure_future(
            rig.ctl.update_settings(Settings(apps=apps, control=ControlSettings(tick_s=1.0)))
        )
        await settle()
        api.gates["acquire_machine_lease"].set()
        await reload
        after = len(api.calls)
        await clock.advance(5)
        assert api.calls[after:] == []
        assert api.leases == {}
        assert wake.done()
        assert _app_tasks(APP) == []
    finally:
        await rig.ctl.stop()


async def test_an_app_s_loop_due_while_a_reload_lets_the_app_go_does_not_tick_it(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """The reload takes the app out while its wake is under way, and waits for the wake
    to end; the app's loop falls due meanwhile. It must end, not tick an app the
    controller no longer has (it crashed looking it up, then retried until cancelled)."""
    mid = api.add(APP, "stopped")
    api.gates["acquire_machine_lease"] = asyncio.Event()
    rig = Rig(api, clock)
    await rig.ctl.start()
    try:
        await clock.advance(0.5)
        rig.view.wake(APP)
        await settle()
        assert api.ops("acquire_machine_lease") == [mid]
        listed = len(api.ops("list_machines"))

        async def meanwhile() -> None:
            await clock.advance(1)  # the loop's pause ends while the reload waits
            api.gates["acquire_machine_lease"].set()  # and the lease it waits for comes

        with capture_logs() as logs:
            await asyncio.gather(
                rig.ctl.update_settings(Settings(apps=[], control=ControlSettings(tick_s=1.0))),
                meanwhile(),
            )
            await clock.advance(5)
        assert [e for e in logs if e["log_level"] == "error"] == []
        assert len(api.ops("list_machines")) == listed
        assert _app_tasks(APP) == []
    finally:
        await rig.ctl.stop()


async def test_a_reload_that_removes_apps_waits_for_them_together_and_not_for_new_apps(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """Three removed apps each have a lease asked for that the API does not answer. Their
    wakes end and their leases are waited for all at once (each within
    ``control.api_timeout_s``), not one app after another; and the app the reload adds
    ticks at once, not after those waits."""
    gone = ["r1", "r2", "r3"]
    machines = {name: api.add(name, "stopped") for name in gone}
    api.add("new", "stopped")
    control = ControlSettings(tick_s=1.0, api_timeout_s=60.0)
    rig = Rig(api, clock)
    await rig.ctl.update_settings(
        Settings(apps=[AppConfig(name=n, **KNOBS) for n in gone], control=control)
    )
    api.gates["acquire_machine_lease"] = asyncio.Event()
    await rig.ctl.start()
    try:
        await clock.advance(0.5)
        wakes = [rig.view.wake(name) for name in gone]
        await settle()
        assert sorted(api.ops("acquire_machine_lease")) == sorted(machines.values())
        reload = asyncio.ensure_future(
            rig.ctl.update_settings(
                Settings(apps=[AppConfig(name="new", **KNOBS)], control=control)
            )
        )
        await settle()
        assert all(wake.done() for wake in wakes)
        assert "new" in [c.arg for c in api.calls if c.op == "list_machines"]
        assert not reload.done()  # the leases asked for are given back within it
        api.gates["acquire_machine_lease"].set()
        await reload
        assert api.leases == {}
        assert [t for name in gone for t in _app_tasks(name)] == []
    finally:
        await rig.ctl.stop()


async def test_a_removed_app_s_cordons_are_lifted_after_its_leases_are_given_back(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """The reload cuts a drain short while the API is slow to take its lease back: the
    cordon is lifted once the lease is back (lifted before, without the lease's nonce,
    the API refuses it with 409 and the cordon stays for good)."""
    rig = Rig(api, clock, scale_down_delay_s=3)
    await rig.ctl.start()
    try:
        victim = await _a_drain_waiting_for_its_request(api, clock, rig)
        api.gates["release_machine_lease"] = asyncio.Event()
        reload = asyncio.ensure_future(
            rig.ctl.update_settings(Settings(apps=[], control=ControlSettings(tick_s=1.0)))
        )
        await settle()
        assert api.ops("release_machine_lease") == [victim]
        api.gates["release_machine_lease"].set()
        await reload
        assert_uncordoned(api, victim)
        assert api.leases == {}
    finally:
        await rig.ctl.stop()


async def test_a_stop_during_a_reload_that_lets_an_app_go_still_hands_it_back(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """SIGTERM while a reload lets an app go: the service cancels the reload, then stops
    the controller. The app's drain was cut short, and its lease is slow to come back;
    the stop must still lift our cordon (no later process scales the app: left, Fly's
    proxy never routes to the machine again) and leave none of the app's calls behind."""
    rig = Rig(api, clock, scale_down_delay_s=3)
    await rig.ctl.start()
    victim = await _a_drain_waiting_for_its_request(api, clock, rig)
    api.gates["release_machine_lease"] = gate = asyncio.Event()
    reload = asyncio.ensure_future(
        rig.ctl.update_settings(Settings(apps=[], control=ControlSettings(tick_s=1.0)))
    )
    await settle()
    assert api.ops("release_machine_lease") == [victim]
    reload.cancel()  # what Service.stop does to a reload under way
    await asyncio.gather(reload, return_exceptions=True)
    stopping = asyncio.ensure_future(rig.ctl.stop())
    await settle()
    gate.set()
    await stopping
    assert_uncordoned(api, victim)
    assert api.leases == {}
    assert _app_tasks(APP) == []
    after = len(api.calls)
    await clock.advance(CORDON_UNSURE_S)
    assert api.calls[after:] == []


async def test_a_step_down_does_not_wait_for_a_reload_s_removal(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A leader steps down (cluster mode: ``stop(handover=True)``) while a reload lets an
    app go, the lift of our cordon there (sent while it led) slow to answer. The step-down
    returns without waiting for that removal: the replica leads again only once its
    step-down is over, and the removal held that up to twice ``control.api_timeout_s``.
    The removal goes on, and lifts our cordon once the API answers."""
    rig = Rig(api, clock, scale_down_delay_s=3)
    await rig.ctl.start()
    victim = await _a_drain_waiting_for_its_request(api, clock, rig)
    api.gates["uncordon_machine"] = gate = asyncio.Event()
    reload = asyncio.ensure_future(
        rig.ctl.update_settings(Settings(apps=[], control=ControlSettings(tick_s=1.0)))
    )
    try:
        await settle()
        assert api.ops("uncordon_machine") == [victim]
        stepping_down = asyncio.ensure_future(rig.ctl.stop(handover=True))
        await settle()
        assert stepping_down.done()
        assert not reload.done()
    finally:
        gate.set()
        await reload
    assert_uncordoned(api, victim)
    assert api.leases == {}
    await rig.ctl.stop()


class _ClusterLoad:
    """A cluster's load source (``Controller(load=...)``) at the level the test sets;
    after ``restart`` (``Cluster.lead_begins``) the next sample is a baseline."""

    def __init__(self) -> None:
        self.level = 0
        self._prev: float | None = None

    def restart(self) -> None:
        self._prev = None

    def __call__(self, app: str, now: float) -> tuple[Sample, float | None]:
        prev, self._prev = self._prev, now
        start = now if prev is None else prev
        return Sample(start, now, float(self.level), self.level), now if self.level else None


async def test_a_replica_leading_again_does_not_act_on_its_last_lead_s_load(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """Cluster mode: a replica steps down (``stop(handover=True)``) busy, and leads again
    (``start``) once the load is gone. Its windows kept its last lead's samples, and,
    averaging the part of the window they cover, read the old load as now's: the first
    tick started a machine for it. They begin afresh, as a new leader's."""
    api.add(APP, "started")
    rig = Rig(api, clock, min_machines=1, max_machines=2, target_concurrency=1, stable_window_s=60)
    rig.ctl.load = load = _ClusterLoad()
    await rig.tick()
    load.level = 4
    await clock.advance(1)
    busy = await rig.tick()
    assert busy.shortfall == 1  # no machine to start
    assert not busy.actions
    await rig.ctl.stop(handover=True)
    spare = api.add(APP, "stopped")  # a deploy, while another replica led; the load went
    load.level = 0
    load.restart()
    await clock.advance(5)
    await rig.ctl.start()
    try:
        await settle()
        assert (await rig.tick()).desired == 1
        assert api.ops("start_machine") == []
        assert state(api, spare) == "stopped"
    finally:
        await rig.ctl.stop()


async def test_a_replica_leading_again_reads_the_machines_before_its_first_decision(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """The machines changed while another replica led: the first tick of our next lead
    reads them, not the list of our last lead (younger than ``control.steady_list_s``,
    its lazy tick decided from it, and left the app's one machine stopped)."""
    mid = api.add(APP, "started")
    rig = Rig(api, clock, min_machines=1)
    await rig.tick()
    await rig.ctl.stop(handover=True)
    api.set(APP, mid, state="stopped")
    await clock.advance(1)
    lists = len(api.ops("list_machines"))
    await rig.ctl.start()
    try:
        await settle()
        assert len(api.ops("list_machines")) == lists + 1
        assert api.ops("start_machine") == [mid]
    finally:
        await rig.ctl.stop()


async def _key_kept_then_removed(api: FakeMachinesAPI, clock: FakeClock) -> tuple[Rig, str]:
    """A drain taken back whose cordon request got no answer (it may still land: our key
    stays), then a reload removes the app: the hand-back lifts the cordon, keeps the key."""
    mid = api.add(APP, "started")
    rig = Rig(api, clock, idle_to_zero_s=5)
    api.gates["cordon_machine"] = gate = asyncio.Event()
    api.fail["cordon_machine"] = [TransportError("read timeout", sent=True)]
    await rig.tick()
    await clock.advance(6)
    [action] = (await rig.tick()).actions
    assert action.kind == "drain"
    assert await rig.ctl.wake(APP) == "uncordon"
    gate.set()
    await rig.ctl.idle()
    assert CORDON_METADATA_KEY in meta(api, mid)
    await clock.advance(1)
    await rig.ctl.update_settings(Settings(apps=[], control=ControlSettings(tick_s=1.0)))
    assert api.get(APP, mid).cordoned is False
    assert CORDON_METADATA_KEY in meta(api, mid)  # the cordon may yet come: it must be ours
    return rig, mid


async def test_a_removed_app_s_late_cordon_is_lifted_once_it_cannot_land_any_more(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """No tick of ours looks at a removed app's machines again: the hand-back itself lifts
    the cordon again and drops our key once no cordon request of ours can land there (left,
    a late cordon kept the machine out of Fly's routing for good, and our key stayed)."""
    rig, mid = await _key_kept_then_removed(api, clock)
    try:
        api.set(APP, mid, cordoned=True)  # that request lands, after the reload
        await clock.advance(CORDON_UNSURE_S)
        await settle()
        assert_uncordoned(api, mid)
        assert CORDON_METADATA_KEY not in meta(api, mid)
    finally:
        await rig.ctl.stop()


async def test_an_app_back_before_its_late_lift_is_left_to_its_ticks(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """Re-added while the late lift still waits: that is called off (its key deletion
    could land on a drain of the app's own), and the app's ticks drop the key instead."""
    rig, mid = await _key_kept_then_removed(api, clock)
    try:
        await rig.ctl.update_settings(
            Settings(apps=[AppConfig(name=APP, **KNOBS)], control=ControlSettings(tick_s=1.0))
        )
        deletes = len(api.ops("delete_machine_metadata"))
        await clock.advance(CORDON_UNSURE_S)
        await settle()
        assert len(api.ops("delete_machine_metadata")) == deletes  # no late lift
        await rig.tick()
        await rig.ctl.idle()
        assert CORDON_METADATA_KEY not in meta(api, mid)
    finally:
        await rig.ctl.stop()


async def test_a_stop_while_a_reload_calls_off_a_late_lift_still_lets_the_removed_app_go(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """The reload brings back an app whose late lift still waits (it calls that off first,
    which takes an await) and removes another, whose drain waits for its request. A stop
    then (SIGTERM: the service cancels the reload) must still let the removed app go: its
    drain cut short, our cordon lifted, and no call on its machines after the stop."""
    rig, _ = await _key_kept_then_removed(api, clock)
    other = AppConfig(name="other", **{**KNOBS, "scale_down_delay_s": 3})
    control = ControlSettings(tick_s=1.0)
    a, b = api.add("other", "started"), api.add("other", "started")
    await rig.ctl.update_settings(Settings(apps=[other], control=control))
    await rig.ctl.start()
    await clock.advance(1.5)
    view = rig.view.app("other")
    view.begin(view.upstreams[a])
    view.begin(view.upstreams[b])
    await clock.advance(5)
    [(victim, run)] = rig.ctl.apps["other"].running.items()
    assert run.kind == "drain"
    assert api.get("other", victim).cordoned
    assert rig.ctl._late_lifts  # the late lift of the app it brings back waits
    reload = asyncio.ensure_future(
        rig.ctl.update_settings(Settings(apps=[AppConfig(name=APP, **KNOBS)], control=control))
    )
    await asyncio.sleep(0)  # the reload is under way, at its first await
    reload.cancel()  # what Service.stop does to a reload under way
    await asyncio.gather(reload, return_exceptions=True)
    await rig.ctl.stop()
    assert api.get("other", victim).cordoned is False
    assert _app_tasks("other") == []
    after = len(api.calls)
    view.end(view.upstreams[victim])  # the drain, had it run on, would suspend it now
    await clock.advance(CORDON_UNSURE_S)
    assert api.calls[after:] == []
    assert api.get("other", victim).state == "started"


@pytest.mark.parametrize("asleep", ["suspended", "stopped"])
async def test_a_wake_takes_the_machine_from_a_cleanup_at_once(
    api: FakeMachinesAPI, clock: FakeClock, asleep: str
) -> None:
    """The app's only machine carries a stale key of ours (uncordoned): the tick's cleanup
    drops it, and the API is slow to answer. A wake does not wait for that (the gate asked
    again a second later: "no machine that can be woken"): it wakes the machine at once,
    under the cleanup's lease, and the key still goes."""
    mid = api.add(APP, asleep, metadata={CORDON_METADATA_KEY: "drain"})
    api.gates["delete_machine_metadata"] = asyncio.Event()
    rig = Rig(api, clock)
    await rig.tick()
    assert not rig.ctl.apps[APP].running  # found at start: kept while a cordon may land
    await clock.advance(CORDON_UNSURE_S)
    await rig.tick()
    assert rig.ctl.apps[APP].running[mid].kind == "cleanup"
    assert api.ops("delete_machine_metadata") == [mid]
    wake = asyncio.ensure_future(rig.ctl.wake(APP))
    await settle()
    assert rig.routable() == {mid}  # the cleanup's call still hangs
    assert state(api, mid) == "started"
    assert api.ops("acquire_machine_lease") == [mid]  # one lease: the cleanup's, handed over
    api.gates["delete_machine_metadata"].set()
    assert await wake == ("resume" if asleep == "suspended" else "start")
    await rig.ctl.idle()
    assert_uncordoned(api, mid)
    assert api.leases == {}


def _fresh_and_critical(api: FakeMachinesAPI, mid: str, port: int) -> None:
    """``mid`` as Fly lists a machine just started whose first run of its check failed:
    a check that routes (kind readiness), on ``port`` of 127.0.0.1."""
    check = {
        "type": "http",
        "path": "/healthz",
        "port": port,
        "grace_period": "1s",
        "interval": "15s",
        "kind": "readiness",
    }
    machine = api.get(APP, mid)
    assert machine.config is not None
    config = machine.config.model_copy(update={"checks": {"web": m.MachineCheck(**check)}})
    first_run = m.CheckStatus(name="web", status="critical", updated_at="2026-12-06T01:00:00Z")
    api.set(APP, mid, config=config, checks=[first_run], private_ip="127.0.0.1")


async def test_a_fresh_machine_whose_recheck_passes_gets_no_replacement(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """Two machines are wanted and two are started; Fly's first run of one's check failed
    (under load, its app answered late), and our own run of it passes. Before, the tick
    that listed it critical started the third machine in its place, ahead of that run."""
    healthy, fresh = api.add(APP, "started"), api.add(APP, "started")
    spare = api.add(APP, "stopped")
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    async with canned_http("127.0.0.1", ok) as (port, answers):
        _fresh_and_critical(api, fresh, port)
        rig = Rig(api, clock, min_machines=2)
        try:
            decision = await rig.tick()
            assert decision.actions == ()
            await asyncio.gather(*rig.ctl.apps[APP].rechecks.values())
            assert len(answers) == 1
            assert rig.ctl.apps[APP].sick_since == {}
            await clock.advance(SICK_GRACE_S + 1)
            assert (await rig.tick()).actions == ()
            assert rig.routable() == {healthy, fresh}
            assert api.ops("start_machine") == []
            assert state(api, spare) == "stopped"
        finally:
            await rig.ctl.stop()


async def test_a_fresh_machine_still_critical_after_its_grace_is_replaced(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """The grace is short: a fresh machine whose check keeps failing for us too counts as
    sick once it has passed, and the policy starts another in its place."""
    api.add(APP, "started")
    fresh, spare = api.add(APP, "started"), api.add(APP, "stopped")
    broken = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
    async with canned_http("127.0.0.1", broken) as (port, _):
        _fresh_and_critical(api, fresh, port)
        rig = Rig(api, clock, min_machines=2)
        try:
            assert (await rig.tick()).actions == ()
            await clock.advance(SICK_GRACE_S)
            decision = await rig.tick()
            assert [(a.kind, a.machine_id) for a in decision.actions] == [("start", spare)]
        finally:
            await rig.ctl.stop()


async def test_a_suspend_refused_for_the_machines_config_is_not_asked_again_for_its_version(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """Fly does not suspend every machine (swap, a schedule, a GPU). A 400 or 422 says the
    machine's config, so its next scale-downs stop it at once, until its version changes;
    a 412 (a state that passes) does not count. Each refusal falls back to a stop."""
    mid = api.add(APP, "started")
    rig = Rig(api, clock, idle_to_zero_s=5)
    await rig.tick()

    async def scale_down() -> None:
        api.set(APP, mid, state="started")  # started again (by someone, or a wake)
        await clock.advance(6)
        [action] = (await rig.tick()).actions
        assert action.kind == "drain"
        await rig.ctl.idle()

    api.fail["suspend_machine"] = [Conflict(412, "not now"), BadRequest(400, "swap")]
    with capture_logs() as logs:
        await scale_down()  # 412: stopped, not remembered
        assert state(api, mid) == "stopped"
        await scale_down()  # 400: stopped, remembered
        assert state(api, mid) == "stopped"
        await scale_down()  # straight to the stop
        assert state(api, mid) == "stopped"
    assert len(api.ops("suspend_machine")) == 2
    assert len(api.ops("stop_machine")) == 3
    events = [e["event"] for e in logs if e.get("machine") == mid]
    assert events.count("suspend_refused") == 2
    assert events.count("suspend_skipped") == 1
    assert_uncordoned(api, mid)

    api.set(APP, mid, instance_id="inst-deployed")  # a new version: asked again
    await scale_down()
    assert state(api, mid) == "suspended"
    assert len(api.ops("suspend_machine")) == 3


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"init": m.MachineInit(swap_size_mb=512)}, "swap"),
        ({"schedule": "hourly"}, "schedule"),
        ({"guest": m.MachineGuest(cpus=1, gpus=1)}, "GPU"),
        ({"guest": m.MachineGuest(gpu_kind="a100-pcie-40gb")}, "GPU"),
    ],
)
async def test_a_machine_whose_config_fly_will_not_suspend_is_stopped_without_asking(
    api: FakeMachinesAPI, clock: FakeClock, config: dict[str, Any], says: str
) -> None:
    """Fly refuses to suspend a machine with swap, a schedule or a GPU, and the list shows
    the config: the first scale-down of a fresh process stops it at once. Before, it
    asked, was refused (a 400, or a 412 that the refusal memory never took), and only
    then stopped; the memory of it died with the process."""
    mid = api.add(APP, "started")
    machine = api.get(APP, mid)
    assert machine.config is not None
    api.set(APP, mid, config=machine.config.model_copy(update=config))
    rig = Rig(api, clock, idle_to_zero_s=5)
    await rig.tick()
    await clock.advance(6)
    with capture_logs() as logs:
        [action] = (await rig.tick()).actions
        assert action.kind == "drain"
        await rig.ctl.idle()
    assert state(api, mid) == "stopped"
    assert api.ops("suspend_machine") == []
    [skipped] = [e for e in logs if e["event"] == "suspend_skipped"]
    assert says in skipped["reason"]
    assert rig.metric("autoscaler_scaling_actions_total", action="suspend", result="error") == 0
    assert rig.metric("autoscaler_scaling_actions_total", action="stop", result="ok") == 1
    assert_uncordoned(api, mid)


async def test_a_suspend_refused_because_the_machine_is_already_suspending_is_not_a_stop(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """Another party suspends the machine while our suspend is on its way: Fly answers
    412, and the drain waits for that suspend rather than stopping the machine, which
    would throw its snapshot away. It counts once, as a suspend done (before: a failed
    suspend, then a suspend done)."""
    mid = api.add(APP, "started")
    rig = Rig(api, clock, idle_to_zero_s=5)
    await rig.tick()
    api.gates["suspend_machine"] = gate = asyncio.Event()
    await clock.advance(6)
    with capture_logs() as logs:
        [action] = (await rig.tick()).actions
        assert action.kind == "drain"
        await until(lambda: bool(api.ops("suspend_machine")), what="our suspend sent")
        api.set(APP, mid, state="suspended")  # someone else's suspend got there first
        gate.set()
        await rig.ctl.idle()
    assert api.ops("stop_machine") == []
    assert state(api, mid) == "suspended"
    assert [e["event"] for e in logs if e.get("machine") == mid].count("suspend_refused") == 0
    assert rig.metric("autoscaler_scaling_actions_total", action="suspend", result="error") == 0
    assert rig.metric("autoscaler_scaling_actions_total", action="suspend", result="ok") == 1
    assert_uncordoned(api, mid)


async def _wake_as_the_port_opens(rig: Rig, clock: FakeClock, after_s: float) -> str:
    """Wake the app whose machine's port opens ``after_s`` on; the wake's answer, which
    must come within twice that."""
    opens_at = clock() + after_s

    async def probe(host: str, port: int) -> bool:
        return clock() >= opens_at

    rig.ctl.actuator.probe = probe
    task = asyncio.ensure_future(rig.ctl.wake(APP))
    for _ in range(round(after_s * 20)):
        await clock.advance(0.1)
        if task.done():
            break
    assert task.done(), (
        f"the wake still waits {2 * after_s:g} s on, its port open since {after_s:g} s"
    )
    return await task


@pytest.mark.parametrize("api_down", ["fails", "hangs"])
async def test_a_failed_reread_of_a_slow_port_does_not_fail_the_boot(
    api: FakeMachinesAPI, clock: FakeClock, api_down: str
) -> None:
    """The machine's app listens 1.5 s after Fly says started (a slow start-up), and the
    API fails (500) or stops answering from then on (an outage begun mid-wake): the read
    made after a second of shut port (a deploy may have moved it) gets no answer. That
    read is optional: the boot goes on probing, and the request is served once the port
    opens. Before, the read's error failed the boot, and with the API down no list showed
    the machine up: the app answered 504 for the whole outage while its machine served
    (chaos soak, seed 15); a read that hung held the probe up as long."""
    mid = api.add(APP, "stopped")
    rig = Rig(api, clock)
    await rig.ctl.tick(APP)
    if api_down == "fails":
        api.fail["get_machine"] = [ServerError(500, "down") for _ in range(1000)]
    else:
        api.gates["get_machine"] = asyncio.Event()  # never set
    api.fail["list_machines"] = [ServerError(500, "down") for _ in range(1000)]
    assert await _wake_as_the_port_opens(rig, clock, after_s=1.5) == "start"
    assert api.ops("get_machine")  # the read was asked for
    assert [u.id for u in rig.view.app(APP).routable()] == [mid]


async def test_a_wait_the_api_fails_does_not_fail_a_boot_whose_port_answers(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """The start was accepted, then the API went down (an outage begun mid-boot): every
    /wait, get and list answers 500. The machine's port answers 1.5 s on: it runs, and
    the request is served. Before, the wait's error failed the boot, and no list showed
    the machine up for as long as the outage lasted (504s while it served)."""
    mid = api.add(APP, "stopped")
    rig = Rig(api, clock)
    await rig.ctl.tick(APP)
    for op in ("wait_for_machine_state", "get_machine", "list_machines"):
        api.fail[op] = [ServerError(500, "down") for _ in range(1000)]
    assert await _wake_as_the_port_opens(rig, clock, after_s=1.5) == "start"
    assert len(api.ops("start_machine")) == 1
    assert [u.id for u in rig.view.app(APP).routable()] == [mid]


async def test_a_wake_s_line_says_its_duration_to_the_millisecond(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """As the other durations in the logs (an action's ``duration_s``): ``took_s`` was the
    float as measured (0.24999999999977263 for a wake of 0.25 s), not rounded to ms."""
    api.add(APP, "suspended")
    rig = Rig(api, clock)
    rig.port_open = False
    with capture_logs() as logs:
        task = asyncio.ensure_future(rig.ctl.wake(APP))
        for _ in range(3):
            await clock.advance(0.1)
        rig.port_open = True
        await clock.advance(0.1)
        assert await task == "resume"
    (took,) = [e["took_s"] for e in logs if e["event"] == "wake"]
    assert took == round(took, 3)
    assert 0 < took <= 0.4
