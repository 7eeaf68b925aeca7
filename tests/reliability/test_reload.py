"""Item 4: configuration reload on SIGHUP, under load.

``Service.run()`` runs in this process with its real signal handlers; the test sends
SIGHUP to itself (and SIGTERM at the end). Claims:

- a valid file is applied without dropping a request: clients of the app that stays get
  200 throughout; an app added (scaled or static) serves at once; an app removed gets 404;
  a changed knob reaches the controller and the proxy;
- an invalid file is rejected whole: an error line is logged, the
  ``autoscaler_config_reloads_total{result="error"}`` counter moves, and the previous
  configuration keeps serving (same knobs, same routes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from testkit import until

from autoscaler.config import EmulatorApp, load_settings
from autoscaler.emulator import Emulator
from autoscaler.metrics import Metrics
from autoscaler.service import Service

from .harness import (
    APP,
    HOST,
    Figures,
    Load,
    LogCapture,
    live_service,
    metric,
    service_config,
    write_config,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def static_backend() -> AsyncIterator[str]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="static")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    yield f"127.0.0.1:{server.port}"
    await server.close()


async def _status(http: aiohttp.ClientSession, url: str, host: str) -> int:
    async with http.get(url, headers={"Host": host}) as resp:
        await resp.read()
        return resp.status


async def _reload(svc: Service, result: str, before: float) -> None:
    """SIGHUP ourselves; wait for the reload to be counted."""
    os.kill(os.getpid(), signal.SIGHUP)
    name = "autoscaler_config_reloads_total"
    await until(lambda: metric(svc, name, result=result) > before, 20, f"a {result} reload")


async def test_sighup_reload_under_load(
    emulator: Emulator,
    static_backend: str,
    tmp_path: Path,
    log_capture: LogCapture,
    figures: Figures,
) -> None:
    emulator.world.seed_app(EmulatorApp(name="web2", machines=1))
    base: dict[str, Any] = service_config(emulator, min_machines=1, max_machines=3)
    first = dict(base)
    first["apps"] = [
        *base["apps"],
        {"name": "old", "hosts": ["old.test"], "backends": [static_backend]},
    ]
    file = write_config(tmp_path / "autoscaler.yaml", first)
    settings, _ = load_settings(file, env={})
    svc = Service(settings, file, metrics=Metrics(CollectorRegistry()), proxy_port=0, admin_port=0)
    running = asyncio.create_task(svc.run())
    try:
        # run() offers no start event; its "started" log line comes after every part.
        await until(lambda: bool(log_capture.events("started")), 30, "the start")
        assert svc.proxy is not None
        assert svc.controller is not None
        proxy = f"http://127.0.0.1:{svc.proxy.port}"
        async with aiohttp.ClientSession() as http, Load(proxy, path="/work?ms=20") as load:
            assert await _status(http, f"{proxy}/", "old.test") == 200
            await load.resize(6)
            await until(lambda: load.outcomes["200"] > 50, 30, "the load to flow")

            # 1. A valid file: web's knobs change, "old" goes, "api" (static) and "web2"
            #    (scaled) come.
            second = dict(base)
            second["apps"] = [
                {**base["apps"][0], "max_machines": 2, "idle_to_zero_s": 120},
                {"name": "api", "hosts": ["api.test"], "backends": [static_backend]},
                {**base["apps"][0], "name": "web2", "hosts": ["web2.test"]},
            ]
            write_config(file, second)
            await _reload(svc, "success", 0)
            assert svc.controller.apps[APP].config.max_machines == 2
            assert svc.proxy.settings.app(APP).idle_to_zero_s == 120
            assert "old" not in svc.controller.apps
            assert "web2" in svc.controller.apps
            assert await _status(http, f"{proxy}/", "api.test") == 200
            assert await _status(http, f"{proxy}/", "web2.test") == 200  # woken via the API
            assert await _status(http, f"{proxy}/", "old.test") == 404
            served_after_valid = load.outcomes["200"]
            await until(lambda: load.outcomes["200"] > served_after_valid + 50, 30, "more load")

            # 2. An invalid file: rejected, logged, counted; the running config stays.
            (tmp_path / "autoscaler.yaml").write_text(
                "apps: [{name: web, max_machines: -1}]\n", encoding="utf-8"
            )
            await _reload(svc, "error", 0)
            assert metric(svc, "autoscaler_config_reloads_total", result="success") == 1
            rejected = log_capture.events("config_reload_rejected")
            assert rejected
            assert '"level": "error"' in rejected[0]
            assert "max_machines" in rejected[0]
            assert svc.controller.apps[APP].config.max_machines == 2
            assert await _status(http, f"{proxy}/", "api.test") == 200
            assert await _status(http, f"{proxy}/", HOST) == 200
            served_after_invalid = load.outcomes["200"]
            await until(lambda: load.outcomes["200"] > served_after_invalid + 50, 30, "more load")
            await load.resize(0)
            outcomes = dict(load.outcomes)
            details = load.details[:10]
            sent = load.sent
    finally:
        if not running.done():
            os.kill(os.getpid(), signal.SIGTERM)  # run()'s own handler stops it gracefully
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(running, 60)
    assert outcomes == {"200": sent}, details
    figures.record(
        "reload",
        requests_during_reloads=sent,
        outcomes=outcomes,
        reloads={"valid": 1, "invalid": 1},
    )


async def test_removing_an_app_with_requests_in_flight_and_held(
    emulator: Emulator, tmp_path: Path
) -> None:
    """Held requests get 503 at once, the one in flight finishes, no counter goes below
    zero, and the app added back starts from a clean view."""
    base: dict[str, Any] = service_config(emulator, min_machines=1, hard_limit=1)
    path = write_config(tmp_path / "autoscaler.yaml", base)
    async with live_service(path) as svc, aiohttp.ClientSession() as http:
        assert svc.proxy is not None
        url = f"http://127.0.0.1:{svc.proxy.port}"
        assert await _status(http, f"{url}/", HOST) == 200  # a machine is up

        async def get(path: str) -> tuple[int, str]:
            async with http.get(f"{url}{path}", headers={"Host": HOST}) as resp:
                return resp.status, await resp.text()

        view = svc.view.app(APP)
        in_flight = asyncio.ensure_future(get("/work?ms=1500"))
        await until(lambda: view.in_flight == 1, 10, "a request in flight")
        held = [asyncio.ensure_future(get("/")) for _ in range(3)]
        await until(lambda: view.queued == 3, 10, "three requests held (hard_limit 1)")

        write_config(path, {**base, "apps": []})
        assert await svc.reload()
        for status, text in await asyncio.gather(*held):
            assert status == 503
            assert "removed from the configuration" in text
        assert not in_flight.done()
        assert (await in_flight)[0] == 200
        assert (view.in_flight, view.queued) == (0, 0)
        assert APP not in svc.view.apps
        assert await _status(http, f"{url}/", HOST) == 404

        write_config(path, base)
        assert await svc.reload()
        fresh = svc.view.app(APP)
        assert fresh is not view
        assert (fresh.in_flight, fresh.queued) == (0, 0)
        assert await _status(http, f"{url}/", HOST) == 200
        assert (fresh.in_flight, fresh.queued) == (0, 0)


async def test_a_scaled_app_made_static_by_a_reload_serves_from_its_backends(
    emulator: Emulator, tmp_path: Path, static_backend: str
) -> None:
    """The proxy (updated first) puts the static backends in the app's view; the
    controller, letting go of the app, dropped that view with them, and every request
    waited for a wake no loop would make (504)."""
    base: dict[str, Any] = service_config(emulator, min_machines=1)
    path = write_config(tmp_path / "autoscaler.yaml", base)
    async with live_service(path) as svc, aiohttp.ClientSession() as http:
        assert svc.proxy is not None
        url = f"http://127.0.0.1:{svc.proxy.port}/"
        assert await _status(http, url, HOST) == 200  # served by a machine
        [app] = base["apps"]
        write_config(path, {**base, "apps": [{**app, "backends": [static_backend]}]})
        assert await svc.reload()
        async with http.get(url, headers={"Host": HOST}) as resp:
            assert (resp.status, await resp.text()) == (200, "static")
        assert [u.id for u in svc.view.app(APP).routable()] == [static_backend]
