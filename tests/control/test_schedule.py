"""Many apps on one controller: sleeping apps polled slowly, apps in use listed only when
something may have changed, ticks spread, one API budget.

All on the fake clock, with the controller's randomness injected.
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from autoscaler.admin import AdminServer
from autoscaler.config import AdminSettings, AppConfig, ControlSettings, Settings
from autoscaler.control.controller import Controller
from autoscaler.control.schedule import stalled_after_s
from autoscaler.control.view import FleetView
from autoscaler.fly import models as m
from autoscaler.fly.errors import ServerError
from autoscaler.fly.limits import Limit, RateLimiter
from autoscaler.metrics import Metrics

from .fakes import FakeClock, FakeMachinesAPI, settle

KNOBS: dict[str, Any] = {"min_lifetime_s": 0, "scale_down_delay_s": 0, "idle_to_zero_s": 30}


class ListingAPI(FakeMachinesAPI):
    """Records (time, app) of every list; takes each call's token from ``limiter`` first."""

    def __init__(self, clock: FakeClock, limiter: RateLimiter | None = None) -> None:
        super().__init__()
        self.clock = clock
        self.limiter = limiter
        self.listed: list[tuple[float, str]] = []

    async def list_machines(self, app: str) -> list[m.Machine]:
        if self.limiter is not None:
            await self.limiter.acquire("list_machines", app)
        self.listed.append((self.clock.now, app))
        return await super().list_machines(app)

    def lists(self, app: str, since: float = 0.0) -> list[float]:
        return [t for t, a in self.listed if a == app and t >= since]


def controller(
    api: ListingAPI,
    clock: FakeClock,
    apps: list[AppConfig],
    *,
    rng: Callable[[], float] = lambda: 0.0,
    limiter: RateLimiter | None = None,
    steady_list_s: float = 5.0,
    freeze_heap: Callable[[], None] | None = None,
) -> Controller:
    control = ControlSettings(
        tick_s=1.0, idle_poll_s=30.0, tick_jitter=0.1, steady_list_s=steady_list_s
    )
    settings = Settings(apps=apps, control=control)

    async def probe(host: str, port: int) -> bool:
        return True

    return Controller(
        api,
        FleetView(clock),
        settings,
        Metrics(CollectorRegistry()),
        clock=clock,
        sleep=clock.sleep,
        probe=probe,
        budget=limiter,
        rng=rng,
        freeze_heap=freeze_heap,
    )


def twenty_apps(api: ListingAPI, state: str) -> list[str]:
    """Apps app00 to app19, each with one machine in ``state``; their names."""
    names = [f"app{i:02d}" for i in range(20)]
    for name in names:
        api.add(name, state)
    return names


@contextlib.asynccontextmanager
async def running(ctl: Controller, clock: FakeClock) -> AsyncIterator[float]:
    """``ctl`` started (its loops have taken their first step) and stopped after; yields
    the time it started."""
    t0 = clock.now
    await ctl.start()
    await settle()
    try:
        yield t0
    finally:
        await ctl.stop()


async def run_for(clock: FakeClock, seconds: float, step: float = 0.25) -> None:
    for _ in range(int(seconds / step)):
        await clock.advance(step)


async def test_sleeping_apps_are_listed_at_the_slow_period_and_busy_ones_every_5_s() -> None:
    clock = FakeClock()
    api = ListingAPI(clock)
    api.add("busy", "started")
    for _ in range(3):
        api.add("asleep", "stopped")
    api.add("asleep", "suspended")
    ctl = controller(
        api, clock, [AppConfig(name="busy", min_machines=1, **KNOBS), AppConfig(name="asleep")]
    )
    async with running(ctl, clock) as t0:
        await run_for(clock, 90)
        # rng 0: no offset, no jitter; the first tick reads, then the app is seen asleep.
        assert api.lists("asleep") == [t0, t0 + 30, t0 + 60, t0 + 90]
        # In use, but its machine holds still: it ticks every second and reads every 5 s.
        assert api.lists("busy") == [t0 + 5 * i for i in range(19)]
        assert ctl.apps["busy"].last_tick_at == t0 + 90
        assert api.ops("start_machine") == []


async def test_a_request_for_a_sleeping_app_wakes_it_at_once_then_it_ticks_every_second() -> None:
    clock = FakeClock()
    api = ListingAPI(clock)
    mid = api.add("web", "suspended")
    # steady_list_s 0: every tick lists, so the lists show when the loop ticks.
    ctl = controller(api, clock, [AppConfig(name="web", **KNOBS)], steady_list_s=0)
    async with running(ctl, clock) as t0:
        await run_for(clock, 10)
        assert api.lists("web") == [t0]  # asleep: next poll at t0 + 30
        woke = ctl.view.wake("web")  # what the proxy does for a held request
        await settle()
        assert woke.done()  # no time passed: the wake did not wait for the slow poll
        assert await woke == "resume"
        assert api.get("web", mid).state == "started"
        # The nudge ended the slow pause: the loop ticks now and every second after.
        assert api.lists("web") == [t0, t0 + 10]
        await run_for(clock, 5)
        assert api.lists("web", since=t0 + 10) == [t0 + 10 + i for i in range(6)]


async def test_ticks_are_spread_over_the_period_and_stay_apart() -> None:
    clock = FakeClock()
    api = ListingAPI(clock)
    names = twenty_apps(api, "started")
    apps = [AppConfig(name=n, min_machines=1, **KNOBS) for n in names]
    rng = random.Random(20).random  # noqa: S311 - jitter, not secrets
    ctl = controller(api, clock, apps, rng=rng, steady_list_s=0)  # lists show the ticks
    async with running(ctl, clock) as t0:
        await run_for(clock, 10, step=0.01)
        firsts = [api.lists(n)[0] for n in names]
        assert all(t0 <= t < t0 + 1.0 for t in firsts)
        assert len(set(firsts)) == len(names)  # no two apps start in phase
        for name in names:
            times = api.lists(name)
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert all(1.0 <= g <= 1.1 + 1e-9 for g in gaps), gaps  # tick_s, up to +10 %
            assert len(set(gaps)) > 1  # jittered, not a fixed period
        # Nor do they fall into step later: in phase, all 20 would share a 100 ms slot.
        slots = Counter(int((t - t0) * 10) for t, _ in api.listed)
        assert max(slots.values()) <= len(names) // 2


async def test_the_org_budget_caps_calls_and_serves_busy_apps_first() -> None:
    clock = FakeClock()
    # 6 calls/s for everyone; 5 busy apps need 5/s, 60 sleeping apps another 2/s.
    limiter = RateLimiter(
        {"list_machines": Limit(100, 100)},
        headroom=1.0,
        sleep=clock.sleep,
        clock=clock,
        org=Limit(6.0, 6),
    )
    api = ListingAPI(clock, limiter)
    busy = [f"busy{i}" for i in range(5)]
    sleeping = [f"sleep{i:02d}" for i in range(60)]
    for name in busy:
        api.add(name, "started")
    for name in sleeping:
        api.add(name, "stopped")
    apps = [AppConfig(name=n, min_machines=1, **KNOBS) for n in busy]
    apps += [AppConfig(name=n, **KNOBS) for n in sleeping]
    rng = random.Random(6).random  # noqa: S311 - jitter, not secrets
    # steady_list_s 0: busy apps list every tick, 5 calls/s for the budget to share out.
    ctl = controller(api, clock, apps, rng=rng, limiter=limiter, steady_list_s=0)
    async with running(ctl, clock):
        await run_for(clock, 30)  # every app read once (65 calls at 6/s), then steady
        start = clock.now
        await run_for(clock, 120)
        times = [t for t, _ in api.listed if t >= start]
        # A token bucket's promise: in any 10 s, at most its burst plus 10 s of its rate.
        for i, t in enumerate(times):
            assert sum(1 for u in times[i:] if u < t + 10) <= 6 + 6 * 10
        # Busy apps tick every 1-1.1 s as if nobody else were there ...
        for name in busy:
            assert len(api.lists(name, since=start)) >= 120 / 1.1 - 1
        # ... and sleeping apps get what is left: fewer polls than their 30 s period
        # asks (4 each in 120 s), but every app is read within two idle periods.
        polls = [len(api.lists(name, since=start)) for name in sleeping]
        assert sum(polls) < 4 * len(sleeping)
        assert min(polls) >= 2


# --- apps in use whose machines hold still ---------------------------------------------


@contextlib.asynccontextmanager
async def in_use(
    **knobs: Any,
) -> AsyncIterator[tuple[FakeClock, ListingAPI, Controller, str, float]]:
    """One app with one started machine, kept (min_machines 1), room for a second, its
    controller running: (clock, api, controller, the started machine, the start time)."""
    clock = FakeClock()
    api = ListingAPI(clock)
    mid = api.add("web", "started")
    api.add("web", "stopped")
    config = AppConfig(name="web", min_machines=1, max_machines=2, **{**KNOBS, **knobs})
    ctl = controller(api, clock, [config])
    async with running(ctl, clock) as t0:
        yield clock, api, ctl, mid, t0


async def test_a_steady_app_ticks_every_second_and_lists_every_steady_list_s() -> None:
    async with in_use() as (clock, api, ctl, mid, t0):
        ticks = []
        for _ in range(12):
            await clock.advance(1)
            ticks.append(ctl.apps["web"].last_tick_at)
        assert ticks == [t0 + i for i in range(1, 13)]
        assert api.lists("web") == [t0, t0 + 5, t0 + 10]
        # What someone else did (a deploy stopped the machine) shows at the next list,
        # and the policy answers it then (min_machines 1: a machine is started again).
        api.set("web", mid, state="stopped")
        await run_for(clock, 2)  # t0 + 14: the last list still says started
        assert api.ops("start_machine") == []
        await run_for(clock, 1)  # t0 + 15: listed, seen, acted on
        assert api.lists("web", since=t0 + 11) == [t0 + 15]
        assert len(api.ops("start_machine")) == 1


async def test_an_action_of_ours_is_decided_on_a_fresh_list_and_followed_by_one() -> None:
    async with in_use(target_concurrency=1, panic_threshold=2.0) as (clock, api, ctl, mid, t0):
        await run_for(clock, 2)
        assert api.lists("web") == [t0]
        # Load for two machines: the tick at t0 + 3 decides, from the list of t0, to start
        # the second one; it reads first and decides again, now from what the API says.
        view = ctl.view.app("web")
        for _ in range(4):
            view.begin(view.upstreams[mid])
        await run_for(clock, 1)
        assert api.lists("web") == [t0, t0 + 3]
        assert len(api.ops("start_machine")) == 1
        await ctl.idle()
        # The start ended: the next tick lists to see what it left, then steady again.
        await run_for(clock, 1)
        assert api.lists("web", since=t0 + 4) == [t0 + 4]
        await run_for(clock, 5)
        assert api.lists("web", since=t0 + 5) == [t0 + 9]


async def test_a_decision_to_act_on_an_old_list_is_dropped_when_the_fresh_one_disagrees() -> None:
    async with in_use(target_concurrency=1, panic_threshold=2.0) as (clock, api, ctl, mid, t0):
        await run_for(clock, 2)
        # Someone else started the second machine since the list of t0: our tick would
        # start it from that list, but reads first and finds two started.
        other = next(k for k in api.machines["web"] if k != mid)
        api.set("web", other, state="started")
        view = ctl.view.app("web")
        for _ in range(4):
            view.begin(view.upstreams[mid])
        await run_for(clock, 1)
        assert api.lists("web") == [t0, t0 + 3]
        assert api.ops("start_machine") == []
        assert {m.state for m in ctl.apps["web"].machines.values()} == {"started"}


async def test_a_machine_the_proxy_could_not_reach_makes_the_next_tick_list() -> None:
    async with in_use() as (clock, api, ctl, mid, t0):
        await run_for(clock, 2)
        view = ctl.view.app("web")
        view.mark_unhealthy(view.upstreams[mid], 30.0)  # a connection the proxy could not make
        await run_for(clock, 1)
        assert api.lists("web") == [t0, t0 + 3]
        await run_for(clock, 3)  # answered by that list: steady again until t0 + 8
        assert api.lists("web") == [t0, t0 + 3]
        await run_for(clock, 2)
        assert api.lists("web") == [t0, t0 + 3, t0 + 8]


async def test_a_failed_read_is_retried_by_the_next_tick_whatever_the_period() -> None:
    async with in_use() as (clock, api, ctl, _, t0):
        await run_for(clock, 5)
        assert api.lists("web") == [t0, t0 + 5]
        api.fail["list_machines"] = [ServerError(503, "down")]
        await run_for(clock, 5)
        assert api.lists("web") == [t0, t0 + 5, t0 + 10]  # the one at t0 + 10 failed
        assert ctl.status()[0].last_error is not None
        # Backoff of two ticks, then a read at once (not 5 s after the last good list) ...
        await run_for(clock, 2)
        assert api.lists("web") == [t0, t0 + 5, t0 + 10, t0 + 12]
        # ... and steady from that good one on.
        await run_for(clock, 5)
        assert api.lists("web") == [t0, t0 + 5, t0 + 10, t0 + 12, t0 + 17]
        assert ctl.status()[0].last_error is None


async def test_the_heap_is_frozen_once_when_every_app_has_been_read() -> None:
    clock = FakeClock()
    api = ListingAPI(clock)
    api.add("a", "started")
    api.add("b", "stopped")
    frozen: list[float] = []
    apps = [AppConfig(name="a", min_machines=1), AppConfig(name="b")]
    ctl = controller(api, clock, apps, freeze_heap=lambda: frozen.append(clock.now))
    await ctl.tick("a")
    assert frozen == []  # b not read yet: its machines are not in the heap
    await clock.advance(1)
    await ctl.tick("b")
    assert frozen == [clock.now]
    await ctl.tick("a")
    await ctl.tick("b")
    assert len(frozen) == 1


async def test_apps_that_fall_asleep_together_poll_spread_over_a_whole_period() -> None:
    clock = FakeClock()
    api = ListingAPI(clock)
    names = twenty_apps(api, "stopped")
    rng = random.Random(3).random  # noqa: S311 - jitter, not secrets
    ctl = controller(api, clock, [AppConfig(name=n, **KNOBS) for n in names], rng=rng)
    async with running(ctl, clock) as t0:
        await run_for(clock, 100, step=0.5)
        # All read within the first second; the second polls spread over 30-60 s later
        # (idle_poll_s 30), not bunched the way the first reads were.
        seconds = sorted(api.lists(n)[1] - t0 for n in names)
        assert seconds[0] >= 30
        assert seconds[-1] <= 62
        assert seconds[-1] - seconds[0] > 15
        for name in names:
            times = api.lists(name)
            assert all(b - a >= 30 for a, b in itertools.pairwise(times))


@pytest.mark.parametrize("idle_poll_s", [60.0, 90.0])
async def test_one_sleeping_app_never_makes_the_loop_look_stalled(idle_poll_s: float) -> None:
    """The only app falls asleep: its first slow poll comes up to two idle periods later
    (a draw of 0.9 here), so the loop's last tick gets that old. The limit that
    /readyz?control=1 and the stalled-loop alert use (``stalled_after_s``) allows for it:
    it once allowed one period and a jitter, and a healthy sleeping app read as stalled."""
    clock, api = FakeClock(), FakeMachinesAPI()
    api.add("web", "stopped")
    control = ControlSettings(idle_poll_s=idle_poll_s)
    metrics = Metrics(CollectorRegistry())

    async def probe(host: str, port: int) -> bool:
        return True

    ctl = Controller(
        api,
        FleetView(clock),
        Settings(apps=[AppConfig(name="web")], control=control),
        metrics,
        clock=clock,
        sleep=clock.sleep,
        probe=probe,
        rng=lambda: 0.9,
    )
    limit = stalled_after_s(control.tick_s, control.idle_poll_s, control.tick_jitter)
    admin = AdminServer(
        AdminSettings(), metrics, ctl, tick_s=control.tick_s, max_tick_age_s=limit, clock=clock
    )
    await ctl.start()
    await settle()
    gaps: list[float] = []
    try:
        last = None
        for _ in range(int(5 * idle_poll_s)):  # 2.5 periods, every half second
            await clock.advance(0.5)
            if ctl.last_tick_at != last and last is not None and ctl.last_tick_at is not None:
                gaps.append(ctl.last_tick_at - last)
            last = ctl.last_tick_at
            if last is not None:  # (before the first tick: "not ticked yet", rightly)
                assert admin.control_problems() == [], clock() - last
    finally:
        await ctl.stop()
    assert max(gaps) > idle_poll_s * (1 + control.tick_jitter)  # the long first poll came
    assert metrics.registry.get_sample_value("autoscaler_control_max_tick_age_seconds") == limit
