"""The live controller with the adaptive keep-alive, against the emulator: after a request
the machine is put to sleep, then resumed (pre-warmed) before the next request arrives,
and the request that comes counts as a hit. A pre-warm is timed until its machine serves,
a cold boot included, for the lead of the next ones.

The plan is given (a learned one needs dozens of real gaps of 30 s or more); everything
else is the real controller, proxy and emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from testkit import PROFILES, on_profile

from autoscaler.config import AppConfig, ControlSettings, EmulatorApp, EmulatorSettings, Settings
from autoscaler.control.controller import Controller
from autoscaler.control.runtime import AppRuntime
from autoscaler.control.view import FleetView
from autoscaler.emulator import Emulator
from autoscaler.fly.client import MachinesClient
from autoscaler.metrics import Metrics
from autoscaler.proxy.server import ProxyServer
from autoscaler.scaling.keepalive import (
    MAX_PREWARM_LEAD_S,
    GapHistogram,
    KeepAliveState,
    Plan,
    prewarm_lead_s,
)
from autoscaler.scaling.policy import PolicyState

APP = "web"
HOST = "web.test"


@pytest.fixture(params=PROFILES)
def emulator_settings(
    emulator_settings: EmulatorSettings, request: pytest.FixtureRequest
) -> EmulatorSettings:
    """Fast timings, and Fly's: suspends that take seconds, cold starts of about 2 s."""
    return on_profile(emulator_settings, request.param, apps=[EmulatorApp(name=APP, machines=1)])


@pytest.mark.one_profile
async def test_a_machine_is_resumed_before_the_request_its_plan_predicts(
    emulator: Emulator,
) -> None:
    app = AppConfig(
        name=APP,
        hosts=[HOST],
        max_machines=1,
        keep_alive="adaptive",
        idle_to_zero_s=600,  # the fixed timer would keep it up all through the test
        min_lifetime_s=0,
        scale_down_delay_s=0,
        drain_timeout_s=2,
        stable_window_s=1,
        panic_window_s=0.5,
    )
    settings = Settings(apps=[app], control=ControlSettings(tick_s=0.1, api_backoff_max_s=1))
    metrics = Metrics(CollectorRegistry())
    view = FleetView()
    client = MachinesClient(emulator.url, emulator.token, rate_limit=False)
    controller = Controller(client, view, settings, metrics)
    proxy = ProxyServer(settings, view, metrics)
    plan = Plan(sleep_after_s=1.0, prewarm_at_s=6.0, keep_until_s=30.0, gaps=20, p5_s=6, p99_s=7)
    gaps = GapHistogram().add(6.0).add(6.0)  # what it learned does not matter: the plan does
    events: list[str] = []

    def state() -> str:
        (machine,) = emulator.machines(APP)
        return machine.state

    async def until(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not check():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(view.app(APP).changed(), 0.05)

    async def get() -> int:
        url = f"http://127.0.0.1:{proxy.port}/"
        async with session.get(url, headers={"Host": HOST}) as resp:
            await resp.read()
            return resp.status

    def hits(result: str) -> float:
        got = metrics.registry.get_sample_value(
            "autoscaler_prewarms_total", {"app": APP, "result": result}
        )
        return got or 0.0

    def wakes() -> float:
        return sum(
            metrics.registry.get_sample_value(
                "autoscaler_wake_duration_seconds_count", {"app": APP, "kind": kind}
            )
            or 0.0
            for kind in ("resume", "start", "join")
        )

    await controller.start()
    await proxy.start("127.0.0.1", 0)
    session = aiohttp.ClientSession()
    try:
        rt = controller.apps[APP]
        rt.policy_state = PolicyState(keepalive=KeepAliveState(gaps=gaps, plan=plan))
        assert await get() == 200  # wakes the machine (a cold start from stopped)
        # With Fly's suspends of seconds the pre-warm may come while the suspend is still
        # under way: it then takes the suspend back, which is a resume too.
        await until(lambda: state() in ("suspending", "suspended"))
        events.append("put to sleep")
        await until(lambda: state() == "started")  # no request was sent: a pre-warm
        await until(lambda: len(view.app(APP).routable()) == 1)  # and the proxy knows
        events.append("pre-warmed")
        assert "pre-warm" in rt.last_reason
        woken_before = wakes()
        assert await get() == 200
        await until(lambda: hits("hit") == 1)
        assert hits("miss") == 0
        # The request found the machine up: it did not wait for a wake.
        assert wakes() == woken_before
        resumes = metrics.registry.get_sample_value(
            "autoscaler_scaling_actions_total", {"app": APP, "action": "resume", "result": "ok"}
        )
        assert resumes == 1
        # The next pre-warm's snapshot is lost: a cold boot, timed from the resume to the
        # first tick that sees the machine serving (not merely starting), so at least
        # the boot; the slowest of the last ones is the next pre-warms' lead. It comes
        # once the suspend is over, so that it does not take a suspend back: until then
        # the plan has no pre-warm.
        emulator.set_faults(resume_cold_rate=1.0)
        timing = emulator.settings.effective_timing()
        longest = timing.suspend_s if isinstance(timing.suspend_s, float) else timing.suspend_s[1]
        set_plan(rt, Plan(1.0, None, 600.0, gaps=20, p5_s=6, p99_s=7))
        await until(lambda: state() == "suspended", timeout_s=longest + 10)
        web = view.app(APP)
        assert web.last_request_at is not None
        idle = web.clock() - web.last_request_at
        set_plan(rt, Plan(1.0, idle + 1.0, idle + 30.0, gaps=20, p5_s=6, p99_s=7))
        await until(lambda: len(rt.policy_state.keepalive.wakes) == 2)
        events.append("pre-warmed cold")
        boot = timing.start_s if isinstance(timing.start_s, float) else timing.start_s[0]
        assert rt.policy_state.keepalive.wakes[-1] >= boot
        assert prewarm_lead_s(rt.policy_state.keepalive.wakes) >= min(
            MAX_PREWARM_LEAD_S, rt.policy_state.keepalive.wakes[-1]
        )
    finally:
        await session.close()
        await proxy.stop()
        await controller.stop()
        await view.close()
        await client.aclose()
    assert events == ["put to sleep", "pre-warmed", "pre-warmed cold"]


def set_plan(rt: AppRuntime, plan: Plan) -> None:
    """The plan the app's policy follows from now on (nothing is learned meanwhile: no
    request ends an idle gap)."""
    keepalive = dataclasses.replace(rt.policy_state.keepalive, plan=plan)
    rt.policy_state = dataclasses.replace(rt.policy_state, keepalive=keepalive)
