"""A live stack on loopback for the observability tests: emulator, proxy, controller, admin.

Built from the real parts (no fakes): the embedded emulator plays Fly with real machine
processes, the Fly client reports every call through ``Metrics.observe_api``, and the
admin server reads the real ``Controller``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from autoscaler import __version__
from autoscaler.admin import AdminServer, StatusProvider
from autoscaler.config import (
    AdminSettings,
    AppConfig,
    ControlSettings,
    EmulatorApp,
    EmulatorSettings,
    FlySettings,
    ProxySettings,
    Settings,
)
from autoscaler.control.controller import Controller
from autoscaler.control.view import FleetView
from autoscaler.emulator import Emulator
from autoscaler.fly.client import MachinesClient
from autoscaler.metrics import Metrics
from autoscaler.proxy.server import ProxyServer

FLY_TOKEN = "fly-token-0bs3rv4b1l1ty-s3cr3t"
ADMIN_TOKEN = "admin-token-5up3r-s3cr3t-v4lu3"
APP = "demo"


def _controller_is_a_status_provider(controller: Controller) -> StatusProvider:
    return controller  # mypy: the real controller satisfies admin.py's Protocol


@dataclass
class Stack:
    settings: Settings
    emulator: Emulator
    metrics: Metrics
    client: MachinesClient
    controller: Controller
    proxy: ProxyServer
    admin: AdminServer

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    @property
    def admin_address(self) -> str:
        return f"127.0.0.1:{self.admin.address[1]}"


def stack_settings(emulator_url: str, emulator: EmulatorSettings) -> Settings:
    return Settings(
        fly=FlySettings(api_url=emulator_url, token=SecretStr(FLY_TOKEN), rate_limit=False),
        proxy=ProxySettings(listen="127.0.0.1:8080", access_log=True),
        admin=AdminSettings(
            listen="127.0.0.1:9091", token=SecretStr(ADMIN_TOKEN), protect_metrics=True
        ),
        control=ControlSettings(tick_s=0.2, api_backoff_max_s=0.5),
        apps=[
            AppConfig(
                name=APP,
                hosts=[APP],
                min_machines=0,
                max_machines=3,
                target_concurrency=2,
                hard_limit=4,
                # A cold burst bigger than this is turned away: queue_full, a 503.
                max_queue=3,
                wake_timeout_s=20,
                idle_to_zero_s=300,
                min_lifetime_s=0,
            )
        ],
        emulator=emulator,
    )


@asynccontextmanager
async def live_stack() -> AsyncIterator[Stack]:
    """Every part started on 127.0.0.1 with ephemeral ports; all stopped (and reaped) after."""
    emulator_settings = EmulatorSettings(
        token=SecretStr(FLY_TOKEN),
        demo_boot_delay_s=0.05,
        resume_delay_s=0.0,
        boot_timeout_s=20.0,
        rate_limits=False,
        apps=[EmulatorApp(name=APP, machines=3)],
    )
    async with Emulator(emulator_settings, host="127.0.0.1", port=0) as emulator:
        settings = stack_settings(emulator.url, emulator_settings)
        metrics = Metrics(CollectorRegistry(), version=__version__)
        client = MachinesClient.from_settings(settings.fly, observer=metrics.observe_api)
        view = FleetView()
        controller = Controller(client, view, settings, metrics)
        proxy = ProxyServer(settings, view, metrics)
        admin = AdminServer(
            settings.admin,
            metrics,
            controller,
            tick_s=settings.control.tick_s,
            secrets=settings.secrets(),
        )
        stack = Stack(settings, emulator, metrics, client, controller, proxy, admin)
        try:
            await controller.start()
            await proxy.start(host="127.0.0.1", port=0)
            await admin.start(host="127.0.0.1", port=0)
            yield stack
        finally:
            admin.set_draining()
            await proxy.stop()
            await controller.stop()
            await admin.stop()
            await client.aclose()
            await view.close()


async def until(condition: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    """Poll ``condition()`` (a cheap in-process check) until true; fail after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.05)
