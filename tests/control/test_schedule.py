"""Many apps on one controller: sleeping apps polled slowly, ticks spread, one API budget.

All on the fake clock, with the controller's randomness injected.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from autoscaler.config import AppConfig, ControlSettings, Settings
from autoscaler.control.controller import Controller
from autoscaler.control.view import FleetView
from autoscaler.fly import models as m
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
) -> Controller:
    settings = Settings(
        apps=apps, control=ControlSettings(tick_s=1.0, idle_poll_s=30.0, tick_jitter=0.1)
    )

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
    )


async def run_for(clock: FakeClock, seconds: float, step: float = 0.25) -> None:
    for _ in range(int(seconds / step)):
        await clock.advance(step)


async def test_sleeping_apps_are_listed_at_the_slow_period_and_busy_ones_every_tick() -> None:
    clock = FakeClock()
    api = ListingAPI(clock)
    api.add("busy", "started")
    for _ in range(3):
        api.add("asleep", "stopped")
    api.add("asleep", "suspended")
    ctl = controller(
        api, clock, [AppConfig(name="busy", min_machines=1, **KNOBS), AppConfig(name="asleep")]
    )
    t0 = clock.now
    await ctl.start()
    await settle()
    try:
        await run_for(clock, 90)
        # rng 0: no offset, no jitter; the first tick reads, then the app is seen asleep.
        assert api.lists("asleep") == [t0, t0 + 30, t0 + 60, t0 + 90]
        assert len(api.lists("busy")) == 91
        assert api.ops("start_machine") == []
    finally:
        await ctl.stop()


async def test_a_request_for_a_sleeping_app_wakes_it_at_once_then_it_ticks_every_second() -> None:
    clock = FakeClock()
    api = ListingAPI(clock)
    mid = api.add("web", "suspended")
    ctl = controller(api, clock, [AppConfig(name="web", **KNOBS)])
    t0 = clock.now
    await ctl.start()
    await settle()
    try:
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
    finally:
        await ctl.stop()


async def test_ticks_are_spread_over_the_period_and_stay_apart() -> None:
    clock = FakeClock()
    api = ListingAPI(clock)
    names = [f"app{i:02d}" for i in range(20)]
    for name in names:
        api.add(name, "started")
    apps = [AppConfig(name=n, min_machines=1, **KNOBS) for n in names]
    ctl = controller(api, clock, apps, rng=random.Random(20).random)  # noqa: S311 - jitter, not secrets
    t0 = clock.now
    await ctl.start()
    await settle()
    try:
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
    finally:
        await ctl.stop()


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
    ctl = controller(api, clock, apps, rng=random.Random(6).random, limiter=limiter)  # noqa: S311
    await ctl.start()
    await settle()
    try:
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
    finally:
        await ctl.stop()
