"""End to end: the real emulator (machines are processes), the controller and the proxy.

From zero, a burst of 50 concurrent clients scales the app to at least 4 machines; after
the load stops every machine ends suspended; no request fails throughout; a request that
arrives while a machine drains is served without error. Short knobs keep it quick.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from testkit import PROFILES, on_profile

from autoscaler.config import (
    AppConfig,
    ControlSettings,
    EmulatorApp,
    EmulatorSettings,
    FaultSettings,
    ProxySettings,
    Settings,
)
from autoscaler.control.controller import Controller
from autoscaler.control.view import AppView, FleetView
from autoscaler.emulator import Emulator
from autoscaler.fly.client import MachinesClient
from autoscaler.metrics import Metrics
from autoscaler.proxy.server import ProxyServer

APP = "web"
HOST = "web.test"
MACHINES = 5
CLIENTS = 50


@pytest.fixture(params=PROFILES)
def emulator_settings(
    emulator_settings: EmulatorSettings, request: pytest.FixtureRequest
) -> EmulatorSettings:
    """Fast timings, and Fly's: suspends that take seconds, cold starts of about 2 s."""
    return on_profile(
        emulator_settings, request.param, apps=[EmulatorApp(name=APP, machines=MACHINES)]
    )


@dataclass
class Stack:
    emulator: Emulator
    view: FleetView
    controller: Controller
    proxy: ProxyServer
    metrics: Metrics
    session: aiohttp.ClientSession
    failures: list[str] = field(default_factory=list)
    served: int = 0

    @property
    def app(self) -> AppView:
        return self.view.app(APP)

    def states(self) -> dict[str, str]:
        return {m.id: m.state for m in self.emulator.machines(APP)}

    async def get(self, path: str = "/work?ms=100") -> None:
        url = f"http://127.0.0.1:{self.proxy.port}{path}"
        try:
            async with self.session.get(url, headers={"Host": HOST}) as resp:
                body = await resp.read()
                if resp.status != 200:
                    self.failures.append(f"{resp.status}: {body[:200]!r}")
                else:
                    self.served += 1
        except aiohttp.ClientError as exc:
            self.failures.append(repr(exc))

    async def until(self, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
        """Wait for ``check`` to hold, re-checking at every change of the view."""
        async with asyncio.timeout(timeout_s):
            while not check():
                # The view changes on every tick and every request; the short wait only
                # covers states the view does not show (the emulator's own records).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.app.changed(), 0.1)


KNOBS: dict[str, Any] = {
    "hosts": [HOST],
    "max_machines": MACHINES,
    "target_concurrency": 5,
    "target_utilization": 0.5,
    "stable_window_s": 2,
    "panic_window_s": 1,
    "scale_down_delay_s": 1,
    "idle_to_zero_s": 2,
    "min_lifetime_s": 0.5,
    "drain_timeout_s": 5,
    "wake_timeout_s": 20,
}


@contextlib.asynccontextmanager
async def running_stack(
    emulator: Emulator,
    proxy_settings: ProxySettings | None = None,
    control: dict[str, Any] | None = None,
    **knobs: Any,
) -> AsyncIterator[Stack]:
    """The controller and the proxy in front of ``emulator``; ``knobs`` change the app's,
    ``control`` the control loop's settings."""
    app = AppConfig(name=APP, **{**KNOBS, **knobs})
    settings = Settings(
        apps=[app],
        control=ControlSettings(**{"tick_s": 0.2, "api_backoff_max_s": 1, **(control or {})}),
        proxy=proxy_settings or ProxySettings(),
    )
    metrics = Metrics(CollectorRegistry())
    view = FleetView()
    client = MachinesClient(
        emulator.url, emulator.token, rate_limit=False, observer=metrics.observe_api
    )
    controller = Controller(client, view, settings, metrics)
    proxy = ProxyServer(settings, view, metrics)
    await controller.start()
    await proxy.start("127.0.0.1", 0)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:
        yield Stack(emulator, view, controller, proxy, metrics, session)
    finally:
        await session.close()
        await proxy.stop()
        await controller.stop()
        await view.close()
        await client.aclose()


@pytest.fixture
async def stack(emulator: Emulator) -> AsyncIterator[Stack]:
    async with running_stack(emulator) as built:
        yield built


@pytest.mark.one_profile
async def test_burst_scales_out_then_everything_suspends_without_a_failed_request(
    stack: Stack,
) -> None:
    assert set(stack.states().values()) == {"stopped"}  # from zero

    # 1. A burst of 50 concurrent clients until at least 4 machines serve.
    stop_load = asyncio.Event()

    async def client() -> None:
        while not stop_load.is_set():
            await stack.get()

    clients = [asyncio.create_task(client()) for _ in range(CLIENTS)]
    try:
        await stack.until(lambda: len(stack.app.routable()) >= 4, timeout_s=40)
        started = sum(1 for s in stack.states().values() if s == "started")
        assert started >= 4
    finally:
        stop_load.set()
        await asyncio.gather(*clients)
    peak = stack.metrics.registry.get_sample_value("autoscaler_desired_machines", {"app": APP})
    assert peak is not None
    assert peak >= 4

    # 2. A trickle of requests keeps one machine busy while the others drain one by one;
    #    the requests that arrive while a machine drains (cordoned, still started) must
    #    all be served (by the others, or by taking the draining one back).
    def draining() -> bool:
        return any(u.cordoned and u.state == "started" for u in stack.app.upstreams.values())

    during_drain = 0
    stop_trickle = asyncio.Event()

    async def trickle() -> None:
        nonlocal during_drain
        while not stop_trickle.is_set():
            during_drain += draining()
            await stack.get("/work?ms=20")

    # API calls that take a little time, as on Fly: each drain then stays open (cordoned,
    # still started) for several trickle requests, instead of a few milliseconds.
    stack.emulator.set_faults(FaultSettings(latency_s=0.05))
    trickler = asyncio.create_task(trickle())
    try:
        await stack.until(
            lambda: len(stack.app.routable()) == 1 and not stack.controller.apps[APP].running,
            timeout_s=40,
        )
    finally:
        stop_trickle.set()
        await trickler
        stack.emulator.set_faults(FaultSettings())
    assert during_drain > 0
    assert stack.failures == []

    # 3. Idle: every machine ends suspended (and the view agrees).
    await stack.until(
        lambda: (
            set(stack.states().values()) == {"suspended"} and not stack.controller.apps[APP].running
        ),
        timeout_s=40,
    )
    assert all(u.state == "suspended" for u in stack.app.upstreams.values())
    assert all(not m.cordoned for m in stack.emulator.machines(APP))
    assert stack.failures == []
    assert stack.served > CLIENTS

    # 4. And from there a request wakes a machine by resuming it, with no error either.
    await stack.get("/")
    assert stack.failures == []
    resumes = stack.metrics.registry.get_sample_value(
        "autoscaler_wake_duration_seconds_count", {"app": APP, "kind": "resume"}
    )
    assert resumes == 1
