"""The composition root: `autoscaler run` in-process and as a real process with signals."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from reliability.harness import (
    child_env,
    live_service,
    metric,
    write_config,
)  # tests/ is on sys.path
from structlog.testing import capture_logs
from testkit import free_port, signal_on_import, until

from autoscaler.config import EmulatorApp, Settings, load_settings
from autoscaler.emulator import Emulator
from autoscaler.emulator.procs import leftovers
from autoscaler.metrics import Metrics
from autoscaler.service import Service

REPO = Path(__file__).resolve().parents[1]


def config(emulator_port: int, **app: Any) -> dict[str, Any]:
    return {
        "proxy": {"listen": "127.0.0.1:8080", "shutdown_timeout_s": 2},
        "admin": {"listen": "127.0.0.1:9091"},
        "control": {"tick_s": 0.2},
        "emulator": {
            "listen": f"127.0.0.1:{emulator_port}",
            "rate_limits": False,
            "demo_boot_delay_s": 0.05,
            "apps": [{"name": "web", "machines": 1}],
        },
        "apps": [{"name": "web", "hosts": ["web.test"], "idle_to_zero_s": 60, **app}],
    }


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def overwrite(path: Path, content: bytes) -> None:
    path.write_bytes(content)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    file = write_config(tmp_path / "autoscaler.yaml", config(free_port()))
    async with live_service(file) as svc:
        yield svc
    assert leftovers(os.getpid()) == []


async def test_not_ready_until_the_proxy_listens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin server opens first; a load balancer that asks /readyz in between must not
    send traffic to a port nobody listens on yet."""
    from autoscaler.proxy.server import ProxyServer

    bind = asyncio.Event()
    started = asyncio.Event()
    start = ProxyServer.start

    async def held_start(self: ProxyServer, *args: Any, **kw: Any) -> None:
        started.set()
        await bind.wait()
        await start(self, *args, **kw)

    monkeypatch.setattr(ProxyServer, "start", held_start)
    file = write_config(tmp_path / "autoscaler.yaml", config(free_port()))
    settings, _ = load_settings(file, env={})
    svc = Service(settings, file, metrics=Metrics(CollectorRegistry()), proxy_port=0, admin_port=0)
    starting = asyncio.create_task(svc.start())
    try:
        await started.wait()
        assert svc.admin is not None
        host, port = svc.admin.address
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{host}:{port}/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["problems"] == ["the proxy is not listening yet"]
            bind.set()
            await starting
            admin = svc.admin
            await until(lambda: not admin.readiness_problems(), what="the first read")
            async with http.get(f"http://{host}:{port}/readyz") as resp:
                assert resp.status == 200
    finally:
        bind.set()
        await asyncio.gather(starting, return_exceptions=True)
        await svc.stop()
    assert leftovers(os.getpid()) == []


async def test_run_serves_through_the_embedded_emulator_and_reloads(
    service: Service, tmp_path: Path
) -> None:
    assert service.emulator is not None  # fly.api_url unset: the embedded emulator
    assert service.proxy is not None
    assert service.admin is not None
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{service.proxy.port}/"
        async with http.get(url, headers={"Host": "web.test"}) as resp:
            assert resp.status == 200
            assert resp.headers["fly-autoscaler-wake"] in ("start", "none")
        host, port = service.admin.address
        async with http.get(f"http://{host}:{port}/status") as resp:
            doc = await resp.json()
        assert [a["app"] for a in doc["apps"]] == ["web"]

    assert service.controller is not None
    file = Path(str(service.config_path))
    # An invalid file is rejected whole: the running configuration stays.
    edit(file, "idle_to_zero_s: 60", "idle_to_zero_s: soon")
    assert await service.reload() is False
    assert service.controller.apps["web"].config.idle_to_zero_s == 60
    # A valid one reaches the controller and the proxy.
    edit(file, "idle_to_zero_s: soon", "idle_to_zero_s: 90")
    assert await service.reload() is True
    assert service.controller.apps["web"].config.idle_to_zero_s == 90
    assert service.proxy.settings.app("web").idle_to_zero_s == 90
    reg = service.metrics.registry
    assert reg.get_sample_value("autoscaler_config_reloads_total", {"result": "error"}) == 1
    assert reg.get_sample_value("autoscaler_config_reloads_total", {"result": "success"}) == 1


async def test_apps_the_embedded_emulator_lacks_are_named_at_start_and_reload(
    tmp_path: Path,
) -> None:
    """A config tried with `run --emulator` whose apps are not in emulator.apps: the
    emulator has no such app, and only tick_failed's 404s, every 5 s, said anything (not
    why, nor what to do). The start names them; so does a reload that adds one."""
    settings = config(free_port())
    settings["apps"].append({"name": "blog", "hosts": ["blog.test"]})
    file = write_config(tmp_path / "autoscaler.yaml", settings)
    with capture_logs() as logs:
        async with live_service(file) as svc:
            settings["apps"].append({"name": "shop", "hosts": ["shop.test"]})
            write_config(file, settings)
            assert await svc.reload()
    said = [e["apps"] for e in logs if e["event"] == "emulator_apps_missing"]
    assert said == [["blog"], ["blog", "shop"]]
    assert leftovers(os.getpid()) == []


async def test_a_request_for_an_app_the_machines_api_lacks_is_answered_at_once(
    tmp_path: Path,
) -> None:
    """The emulator answers 404 to the list of an app it does not have, as Fly does: the
    wake failed at once, and again each second, but the request was held until its
    wake_timeout_s and got a 504 that said nothing of why. Now a 502 names the app."""
    settings = config(free_port())
    settings["apps"].append({"name": "blog", "hosts": ["blog.test"], "wake_timeout_s": 600})
    file = write_config(tmp_path / "autoscaler.yaml", settings)
    async with live_service(file) as svc:
        assert svc.proxy is not None
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{svc.proxy.port}/"
            async with http.get(url, headers={"Host": "blog.test"}) as resp:
                assert resp.status == 502
                assert await resp.text() == "the Machines API has no app blog\n"
                assert resp.headers["fly-autoscaler-wake"] == "failed"
    assert leftovers(os.getpid()) == []


async def test_a_reload_that_asks_to_protect_metrics_without_a_token_is_refused(
    service: Service,
) -> None:
    """Such a file was taken: the admin server had no token to require, so everything it
    serves stayed open. Now it is refused whole, with its key path, and nothing changes."""
    assert service.controller is not None
    assert service.admin is not None
    file = Path(str(service.config_path))
    edit(file, "  listen: 127.0.0.1:9091\n", "  listen: 127.0.0.1:9091\n  protect_metrics: true\n")
    edit(file, "idle_to_zero_s: 60", "idle_to_zero_s: 90")
    with capture_logs() as logged:
        assert await service.reload() is False
    (rejected,) = [e for e in logged if e["event"] == "config_reload_rejected"]
    (problem,) = rejected["problems"]
    assert problem.startswith(f"{file}:3: admin.protect_metrics: needs admin.token")
    assert service.settings.admin.protect_metrics is False
    assert service.controller.apps["web"].config.idle_to_zero_s == 60
    reg = service.metrics.registry
    assert reg.get_sample_value("autoscaler_config_reloads_total", {"result": "error"}) == 1
    assert reg.get_sample_value("autoscaler_config_reloads_total", {"result": "success"}) == 0
    async with aiohttp.ClientSession() as http:
        host, port = service.admin.address
        async with http.get(f"http://{host}:{port}/status") as resp:
            assert resp.status == 200  # the running admin server, as it was


async def test_a_reload_of_an_empty_or_unreadable_file_is_refused_and_keeps_every_app(
    service: Service,
) -> None:
    """An empty file read as every default made a reload that caught a file half-written
    remove every app; a file that is not UTF-8 made it raise (a crash, with a traceback)."""
    assert service.controller is not None
    file = Path(str(service.config_path))
    for content in (b"", b"# being rewritten\n", b"apps: [\xff]\n"):
        overwrite(file, content)
        assert await service.reload() is False
        assert [a.name for a in service.settings.apps] == ["web"]
        assert list(service.controller.apps) == ["web"]
    reg = service.metrics.registry
    assert reg.get_sample_value("autoscaler_config_reloads_total", {"result": "error"}) == 3


async def test_a_reload_asked_for_during_a_reload_runs_after_it(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGHUP that comes while a reload applies the file it read (a second edit saved
    meanwhile) is not folded into that reload: the second edit is applied too."""
    controller = service.controller
    assert controller is not None
    file = Path(str(service.config_path))
    applying, release = asyncio.Event(), asyncio.Event()
    update = controller.update_settings

    async def held_update(settings: Settings) -> None:
        applying.set()
        await release.wait()
        await update(settings)

    monkeypatch.setattr(controller, "update_settings", held_update)
    edit(file, "idle_to_zero_s: 60", "idle_to_zero_s: 90")
    service.request_reload()  # SIGHUP's handler
    await applying.wait()  # the first reload read the file and is applying it
    edit(file, "idle_to_zero_s: 90", "idle_to_zero_s: 120")
    service.request_reload()
    service.request_reload()  # several while one runs: one more reload, not several
    release.set()
    reloading = service._reloading
    assert reloading is not None
    await reloading
    assert controller.apps["web"].config.idle_to_zero_s == 120
    reg = service.metrics.registry
    assert reg.get_sample_value("autoscaler_config_reloads_total", {"result": "success"}) == 2


async def test_a_sighup_during_the_stop_reloads_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGHUP while the service stops gracefully (the proxy lets its requests finish):
    the stop cancelled the reloads under way, and a new one would apply the file to parts
    half stopped, from a task that nothing stops. It is ignored."""
    from autoscaler.proxy.server import ProxyServer

    draining, drained = asyncio.Event(), asyncio.Event()
    proxy_stop = ProxyServer.stop

    async def held_stop(self: ProxyServer) -> None:
        draining.set()
        await drained.wait()
        await proxy_stop(self)

    monkeypatch.setattr(ProxyServer, "stop", held_stop)
    file = write_config(tmp_path / "autoscaler.yaml", config(free_port()))
    async with live_service(file) as svc:
        controller = svc.controller
        assert controller is not None
        edit(file, "idle_to_zero_s: 60", "idle_to_zero_s: 90")
        stopping = asyncio.ensure_future(svc.stop())
        await draining.wait()
        with capture_logs() as logs:
            svc.request_reload()  # SIGHUP's handler, still installed during the stop
            for _ in range(5):
                await asyncio.sleep(0)  # a reload would be applied by now
        assert controller.apps["web"].config.idle_to_zero_s == 60
        assert [e["event"] for e in logs] == ["config_reload_ignored"]
        drained.set()
        await stopping
    assert leftovers(os.getpid()) == []


async def test_a_stop_cut_short_while_it_ends_a_reload_still_stops_every_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop cancels the reload under way and waits for its end (a loop turn or so);
    a second SIGTERM then (it cancels the stop) cut that wait, and the stop went no
    further: the proxy, the controller, the admin server and the client were never
    stopped (held requests got no 503, leases were not given back), the forced close
    ended the emulator alone. The parts still stop, as after a second SIGTERM during the
    proxy's drain: the proxy's stop cut short, the others in turn."""
    file = write_config(tmp_path / "autoscaler.yaml", config(free_port()))
    async with live_service(file) as svc:
        controller, proxy = svc.controller, svc.proxy
        assert controller is not None
        assert proxy is not None
        applying = asyncio.Event()
        stopping: asyncio.Future[None] | None = None

        async def update_cut_by_a_second_sigterm(settings: Settings) -> None:
            applying.set()
            try:
                await asyncio.Event().wait()  # until the stop cancels the reload
            except asyncio.CancelledError:
                assert stopping is not None
                stopping.cancel()  # the second SIGTERM, while the reload is cancelled
                raise

        monkeypatch.setattr(controller, "update_settings", update_cut_by_a_second_sigterm)
        edit(file, "idle_to_zero_s: 60", "idle_to_zero_s: 90")
        svc.request_reload()  # SIGHUP's handler
        await applying.wait()
        stopping = asyncio.ensure_future(svc.stop())
        with pytest.raises(asyncio.CancelledError):
            await stopping
        assert not proxy.accepting
        assert (svc.admin, svc.client, svc.emulator) == (None, None, None)  # stopped
        assert controller.apps["web"].loop is None  # its loop stopped
    assert leftovers(os.getpid()) == []


async def test_a_sighup_during_the_start_reloads_every_part_once_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload that ran in the middle of the start updated the parts built so far, and
    the proxy, built after it, routed on the file as it was before the edit."""

    from autoscaler.admin import AdminServer

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="api")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    backend = f"127.0.0.1:{runner.addresses[0][1]}"
    base = config(free_port())
    file = write_config(tmp_path / "autoscaler.yaml", base)
    edited = {**base, "apps": [*base["apps"], {"name": "api", "hosts": ["api.test"],
                                               "backends": [backend]}]}  # fmt: skip
    start = AdminServer.start

    async def start_and_hup(self: AdminServer, *args: Any, **kw: Any) -> None:
        write_config(file, edited)  # saved, then a reload asked for, while the start runs
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(0.1)  # the handler runs meanwhile
        await start(self, *args, **kw)

    monkeypatch.setattr(AdminServer, "start", start_and_hup)
    settings, _ = load_settings(file, env={})
    svc = Service(settings, file, metrics=Metrics(CollectorRegistry()), proxy_port=0, admin_port=0)
    running = asyncio.create_task(svc.run())
    reloads = svc.metrics.registry.get_sample_value
    try:
        await until(lambda: svc.proxy is not None and svc.proxy.port > 0, what="the start")
        await until(
            lambda: reloads("autoscaler_config_reloads_total", {"result": "success"}) == 1,
            what="the reload asked for during the start",
        )
        assert svc.proxy is not None
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{svc.proxy.port}/"
            async with http.get(url, headers={"Host": "api.test"}) as resp:
                assert (resp.status, await resp.text()) == (200, "api")
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        await running
        await runner.cleanup()
    assert leftovers(os.getpid()) == []


async def test_a_reload_that_crashes_is_counted_and_the_next_one_works(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    controller = service.controller
    assert controller is not None
    file = Path(str(service.config_path))
    update = controller.update_settings

    async def broken_update(settings: Settings) -> None:
        raise RuntimeError("a bug in applying a config")

    monkeypatch.setattr(controller, "update_settings", broken_update)
    edit(file, "idle_to_zero_s: 60", "idle_to_zero_s: 90")
    service.request_reload()
    assert service._reloading is not None
    await service._reloading  # the task ends normally: the crash is logged, not raised
    reg = service.metrics.registry
    assert reg.get_sample_value("autoscaler_config_reloads_total", {"result": "error"}) == 1
    monkeypatch.setattr(controller, "update_settings", update)
    service.request_reload()
    await service._reloading
    assert controller.apps["web"].config.idle_to_zero_s == 90
    assert reg.get_sample_value("autoscaler_config_reloads_total", {"result": "success"}) == 1


async def test_a_part_whose_stop_fails_does_not_keep_the_others_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller's stop raises: the view, the admin server, the client and the
    emulator (with its machine processes) still stop, and the error reaches the caller."""
    from autoscaler.control.controller import Controller

    stop = Controller.stop

    async def broken_stop(self: Controller) -> None:
        await stop(self)
        raise RuntimeError("a bug in stopping the controller")

    monkeypatch.setattr(Controller, "stop", broken_stop)
    file = write_config(tmp_path / "autoscaler.yaml", config(free_port()))
    settings, _ = load_settings(file, env={})
    svc = Service(settings, file, metrics=Metrics(CollectorRegistry()), proxy_port=0, admin_port=0)
    await svc.start()
    try:
        assert svc.proxy is not None
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{svc.proxy.port}/"
            async with http.get(url, headers={"Host": "web.test"}) as resp:
                assert resp.status == 200  # a machine process runs
        assert leftovers(os.getpid()) != []
    finally:
        with pytest.raises(RuntimeError, match="stopping the controller"):
            await svc.stop()
    assert (svc.proxy, svc.admin, svc.client, svc.emulator) == (None, None, None, None)
    assert leftovers(os.getpid()) == []
    await svc.stop()  # idempotent: nothing left to stop, nothing raised


def test_start_failed_is_logged_for_a_failed_start_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`autoscaler run` said start_failed for any OS error out of the run, one raised by
    a part's stop after a complete start too (already said by stop_failed): the reader
    went looking for a port in use. The port in use exits 3 (LISTEN_REFUSED), the stop's
    error 1."""
    from autoscaler import service as service_module
    from autoscaler.admin import AdminServer

    monkeypatch.setattr(service_module, "freeze_heap", lambda: None)  # not this process's
    app = "{name: web, hosts: [web.test], backends: ['127.0.0.1:9']}"
    file = tmp_path / "static.yaml"

    def write(proxy_port: int) -> None:
        admin = f"127.0.0.1:{free_port()}"
        file.write_text(
            f"proxy: {{listen: '127.0.0.1:{proxy_port}', shutdown_timeout_s: 1}}\n"
            f"admin: {{listen: '{admin}'}}\napps: [{app}]\n"
        )

    with socket.socket() as taken:  # the proxy's port, in use: the start fails
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        write(taken.getsockname()[1])
        with capture_logs() as logs:
            assert service_module.run(str(file)) == 3
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["start_failed"]

    start, stop = Service.start, AdminServer.stop

    async def start_then_sigterm(self: Service) -> None:
        await start(self)
        os.kill(os.getpid(), signal.SIGTERM)  # Service.run's handler: the graceful stop

    async def stop_failing(self: AdminServer) -> None:
        await stop(self)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(Service, "start", start_then_sigterm)
    monkeypatch.setattr(AdminServer, "stop", stop_failing)
    write(free_port())
    with capture_logs() as logs:
        assert service_module.run(str(file)) == 1
    events = [e["event"] for e in logs]
    assert "started" in events
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["stop_failed"]


async def test_a_reload_says_the_value_a_flag_gave_by_the_flag(tmp_path: Path) -> None:
    """The flags of `run` win over the file at every reload too: a problem of the value
    one gave is said by the flag as typed there as well, not as the key it sets."""
    from autoscaler.cli import RUN_FLAGS

    file = tmp_path / "c.yaml"
    app = "apps: [{name: web, hosts: [web.test], backends: ['127.0.0.1:9']}]\n"
    file.write_text(app)
    overrides = {"proxy": {"listen": "127.0.0.1:9000"}}
    settings, _ = load_settings(file, env={}, overrides=overrides)
    svc = Service(settings, file, overrides=overrides, flags=RUN_FLAGS)
    file.write_text("admin: {listen: '127.0.0.1:9000'}\n" + app)
    with capture_logs() as logged:
        assert await svc.reload() is False
    (rejected,) = [e for e in logged if e["event"] == "config_reload_rejected"]
    assert rejected["problems"] == [
        f"--listen: 127.0.0.1:9000 is admin.listen's address too (127.0.0.1:9000 at {file}:1):"
        " the second of the two servers could not listen; give each its own port"
    ]


def test_run_on_port_0_listens_on_free_ports_and_logs_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run --listen 127.0.0.1:0` (proxy.listen, admin.listen, emulator.listen alike) was
    refused as no "host:port": port 0 is a free port the OS picks, as servers take it, and
    the lines that say where each server listens have the port it got."""
    from autoscaler import service as service_module

    monkeypatch.setattr(service_module, "freeze_heap", lambda: None)  # not this process's
    file = tmp_path / "static.yaml"
    file.write_text(
        "proxy: {shutdown_timeout_s: 1}\n"
        # wake_timeout_s: the 502 of its refused backend after a short hold, not 30 s
        "apps: [{name: web, hosts: [web.test], backends: ['127.0.0.1:9'], wake_timeout_s: 0.2}]\n"
    )
    start = Service.start
    answered: list[bytes] = []

    async def start_request_then_sigterm(self: Service) -> None:
        await start(self)
        assert self.proxy is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
        answered.append(await reader.read())
        writer.close()
        os.kill(os.getpid(), signal.SIGTERM)  # Service.run's handler: the graceful stop

    monkeypatch.setattr(Service, "start", start_request_then_sigterm)
    overrides = {"proxy": {"listen": "127.0.0.1:0"}, "admin": {"listen": "127.0.0.1:0"}}
    with capture_logs() as logs:
        assert service_module.run(str(file), overrides) == 0
    assert answered[0].startswith(b"HTTP/1.1 502 ")  # the proxy, on the port it logged
    (started,) = [e for e in logs if e["event"] == "started"]
    (proxy,) = [e for e in logs if e["event"] == "proxy_listening"]
    (admin,) = [e for e in logs if e["event"] == "admin_listening"]
    assert started["proxy_port"] == proxy["port"] != 0
    assert started["admin"] == admin["address"]
    assert admin["address"][1] not in (0, proxy["port"])


def test_under_workers_every_line_of_a_worker_carries_its_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `run --workers N` the workers' lines share one output, and said nothing of
    whose they were (`started`, `stopping`, a request's error...). Worker 0's and worker
    1's `autoscaler run` (_AUTOSCALER_WORKER) end every line with `worker`, the request's
    line and its 502 too; a plain run's lines have none."""
    from autoscaler import logs
    from autoscaler import service as service_module

    monkeypatch.setattr(service_module, "freeze_heap", lambda: None)  # not this process's
    file = tmp_path / "static.yaml"
    file.write_text(
        f"proxy: {{listen: '127.0.0.1:{free_port()}', shutdown_timeout_s: 1}}\n"
        f"admin: {{listen: '127.0.0.1:{free_port()}'}}\n"
        # wake_timeout_s: held for port 9 to listen until then, then its 502
        "apps: [{name: web, hosts: [web.test], backends: ['127.0.0.1:9'], wake_timeout_s: 0.5}]\n"
    )
    start = Service.start

    async def start_request_then_sigterm(self: Service) -> None:
        await start(self)
        assert self.proxy is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 502 ")  # nothing on port 9
        writer.close()
        os.kill(os.getpid(), signal.SIGTERM)  # Service.run's handler: the graceful stop

    monkeypatch.setattr(Service, "start", start_request_then_sigterm)
    for worker in (None, "0", "1"):
        if worker is None:
            monkeypatch.delenv(service_module.WORKER_ENV, raising=False)
        else:
            monkeypatch.setenv(service_module.WORKER_ENV, worker)
        out = io.StringIO()
        logs.configure(level="info", fmt="json", stream=out)
        assert service_module.run(str(file)) == 0
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        events = {line["event"] for line in lines}
        assert {"started", "request", "proxy_error", "stopping", "stopped"} <= events
        assert ("config_loaded" in events) == (worker != "1")  # worker 0 speaks for the file
        expected = None if worker is None else int(worker)
        assert [line.get("worker") for line in lines] == [expected] * len(lines), lines
        logs.get_logger("t").info("after")  # the run is over: its index went with it
        assert "worker" not in json.loads(out.getvalue().splitlines()[-1])


@pytest.mark.parametrize("key", ["emulator.listen", "admin.listen", "proxy.listen"])
def test_start_failed_names_the_listen_key_whose_port_is_taken(
    key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start_failed said only the OS's error, which names an address (`error while
    attempting to bind on address ('127.0.0.1', 4280)`): with three servers to bind, a
    new user did not know which key to change. It names the key, its address and what
    to do. The exit code says it too (3, not 1: `run --workers` does not start such a
    worker again)."""
    from autoscaler import service as service_module

    monkeypatch.setattr(service_module, "freeze_heap", lambda: None)  # not this process's
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listens = {k: f"127.0.0.1:{free_port()}" for k in ("emulator", "admin", "proxy")}
        section = key.partition(".")[0]
        listens[section] = f"127.0.0.1:{taken.getsockname()[1]}"
        file = tmp_path / "autoscaler.yaml"
        file.write_text(
            "fly: {api_url: embedded}\n"
            f"emulator: {{listen: '{listens['emulator']}'}}\n"
            f"admin: {{listen: '{listens['admin']}'}}\n"
            f"proxy: {{listen: '{listens['proxy']}', shutdown_timeout_s: 1}}\n"
            "apps: [{name: web, hosts: [web.test], backends: ['127.0.0.1:9']}]\n"
        )
        with capture_logs() as logs:
            assert service_module.run(str(file)) == 3
    (line,) = [e for e in logs if e["log_level"] == "error"]
    assert line["event"] == "start_failed"
    assert (line["key"], line["address"]) == (key, listens[section])
    assert line["hint"] == (
        f"another process listens on {listens[section]}: stop it, or set {key} to a free port"
    )
    assert "address already in use" in line["error"]


async def test_a_forced_close_that_fails_says_stop_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forced close after a stop cut short closes the embedded emulator again; an
    error there reached `autoscaler run` with no line of its own (it logged start_failed
    for an OS error, and no longer does after a complete start)."""
    file = write_config(tmp_path / "autoscaler.yaml", config(free_port()))
    settings, _ = load_settings(file, env={})
    svc = Service(settings, file, metrics=Metrics(CollectorRegistry()), proxy_port=0, admin_port=0)
    await svc.start()
    emulator = svc.emulator
    assert emulator is not None
    close = Emulator.close
    try:
        await svc.stop()
        svc.emulator = emulator  # as a stop cut short in the emulator's close leaves it

        async def close_failing(self: Emulator) -> None:
            await close(self)
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(Emulator, "close", close_failing)
        with capture_logs() as logs, pytest.raises(OSError, match="Input/output error"):
            await svc._force_close()
        (line,) = [e for e in logs if e["event"] == "stop_failed"]
        assert line["part"] == "emulator"
    finally:
        await close(emulator)
    assert leftovers(os.getpid()) == []


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback only
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_ready(url: str, proc: subprocess.Popen[str], timeout_s: float = 60.0) -> None:
    """Poll /readyz: a separate process offers nothing to await."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "autoscaler run exited early"
        try:
            if _get(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready within {timeout_s}s")


@contextlib.contextmanager
def _run_process(
    file: Path, emulator: bool = True, python_args: Sequence[str] = ("-m", "autoscaler")
) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """`autoscaler run` on ``file`` as a process of its own (its output piped, as text):
    the process, its proxy's port and its admin server's. Killed at the end if it still
    runs; an assertion that fails inside carries its output (a separate process: the only
    account of why). ``python_args`` come before `run` on the interpreter's command line."""
    proxy_port, admin_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            *python_args,
            "run",
            # The config names no Machines API: the embedded emulator, asked for.
            *(["--emulator"] if emulator else []),
            "--config",
            str(file),
            "--listen",
            f"127.0.0.1:{proxy_port}",
            "--admin-listen",
            f"127.0.0.1:{admin_port}",
            "--log-format",
            "json",
        ],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc, proxy_port, admin_port
    except AssertionError as exc:
        if proc.poll() is None:
            proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"{exc}; code {proc.returncode}; output:\n{out[-8000:]}") from exc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_run_process_reloads_on_sighup_ignores_sigusr2_and_stops_on_sigterm(tmp_path: Path) -> None:
    file = write_config(tmp_path / "autoscaler.yaml", config(free_port()))
    with _run_process(file) as (proc, proxy_port, admin_port):
        admin = f"http://127.0.0.1:{admin_port}"
        _wait_ready(f"{admin}/readyz", proc)
        request = urllib.request.Request(
            f"http://127.0.0.1:{proxy_port}/", headers={"Host": "web.test"}
        )
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
            assert resp.status == 200
        proc.send_signal(signal.SIGUSR2)  # the supervisor's rolling restart: ignored here
        file.write_text("apps: [{name: web, max_machines: -1}]\n")
        proc.send_signal(signal.SIGHUP)
        # At least once: one CI run logged two rejections 2 ms apart for this one SIGHUP
        # (cause not found), and waited for exactly "1.0" until its deadline.
        _await_reload(admin, proc, "error")
        assert _get(f"{admin}/readyz")[0] == 200  # still serving the old configuration
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    events = [json.loads(line).get("event") for line in out.splitlines() if line.startswith("{")]
    assert "config_reload_rejected" in events
    assert "rolling_restart_ignored" in events
    assert "stopped" in events
    assert leftovers(proc.pid) == []  # its machines went with it
    assert leftovers(os.getpid()) == []


def _await_reload(admin: str, proc: subprocess.Popen[str], result: str) -> None:
    """Poll /metrics until a reload with ``result`` is counted (a separate process)."""
    deadline = time.monotonic() + 30
    while _reloads(_get(f"{admin}/metrics")[1], result) < 1:
        assert proc.poll() is None, "autoscaler run exited"
        assert time.monotonic() < deadline, f"no {result} reload was counted"
        time.sleep(0.1)


def _reloads(metrics: bytes, result: str) -> float:
    return _sample(metrics, "autoscaler_config_reloads_total", result=result)


def _sample(metrics: bytes, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def _poll(proc: subprocess.Popen[str], check: Callable[[], bool], what: str) -> None:
    """Poll ``check`` until it holds (a separate process offers nothing to await)."""
    deadline = time.monotonic() + 60
    while not check():
        assert proc.poll() is None, "autoscaler run exited early"
        assert time.monotonic() < deadline, f"no {what} within 60s"
        time.sleep(0.05)


def test_a_sighup_before_the_signal_handlers_exist_reloads_instead_of_killing(
    tmp_path: Path,
) -> None:
    """SIGHUP's default action ends a process: one sent in the second between the
    config's load and the event loop's handlers (a reload right after a deploy) killed
    `autoscaler run`. It is held back until the handlers are in place, then reloads."""
    file = write_config(tmp_path / "autoscaler.yaml", config(free_port()))
    with _run_process(file) as (proc, _, admin_port):
        assert proc.stdout is not None
        for line in proc.stdout:
            if '"config_loaded"' in line:
                proc.send_signal(signal.SIGHUP)  # before Service.run has its handlers
                break
        admin = f"http://127.0.0.1:{admin_port}"
        _wait_ready(f"{admin}/readyz", proc)
        _await_reload(admin, proc, "success")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert leftovers(proc.pid) == []


def test_a_sighup_while_the_command_still_imports_reloads_once_it_is_up(
    tmp_path: Path,
) -> None:
    """A SIGHUP in the first part of a second after the start, while Python imports,
    ended the process (SIGHUP was held back only once `run` had been parsed and the
    logging set up). main() holds it back first thing: one reload once it is up."""
    file = write_config(tmp_path / "autoscaler.yaml", config(free_port()))
    script = signal_on_import("autoscaler.logs", "SIGHUP")
    with _run_process(file, python_args=("-c", script)) as (proc, _, admin):
        _wait_ready(f"http://127.0.0.1:{admin}/readyz", proc)
        _await_reload(f"http://127.0.0.1:{admin}", proc, "success")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert leftovers(proc.pid) == []


@pytest.mark.parametrize(
    ("module", "sig"),
    [
        ("autoscaler.cli", signal.SIGTERM),
        ("autoscaler.cli", signal.SIGINT),
        ("autoscaler.logs", signal.SIGTERM),
        ("uvloop", signal.SIGTERM),
        ("uvloop", signal.SIGINT),
    ],
    ids=[
        "sigterm-before-the-cli-is-imported",
        "sigint-before-the-cli-is-imported",
        "sigterm-while-importing",
        "sigterm-after-config-loaded",
        "sigint-after-config-loaded",
    ],
)
def test_a_stop_signal_before_the_signal_handlers_exist_stops_cleanly(
    tmp_path: Path, module: str, sig: signal.Signals
) -> None:
    """SIGTERM's default action ends a process: one sent while `autoscaler run` still
    imports (autoscaler.cli too, which the console entry imported before anything held
    the signals back), or right after it logged `config_loaded` (a deploy that stops what
    it just started), killed it (exit -15, no `stopped` line); Ctrl-C there raised
    KeyboardInterrupt out of an import. It is held back until the handlers are in place,
    and the process stops cleanly without starting anything."""
    file = write_config(tmp_path / "autoscaler.yaml", config(free_port(), min_machines=1))
    script = signal_on_import(module, sig.name)
    with _run_process(file, python_args=("-c", script)) as (proc, _, _):
        out, _ = proc.communicate(timeout=60)
    events = [json.loads(line).get("event") for line in out.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, out[-4000:]
    assert "stopped" in events, out[-4000:]
    assert "started" not in events  # nothing was started to be stopped
    assert leftovers(proc.pid) == []


def test_three_sigterms_in_a_row_still_reap_every_machine(tmp_path: Path) -> None:
    """The second SIGTERM cuts the graceful stop short; a third, during the emulator's
    close, must not leave its machine processes behind."""
    file = write_config(tmp_path / "autoscaler.yaml", config(free_port(), min_machines=1))
    with _run_process(file) as (proc, proxy_port, admin_port):
        _wait_ready(f"http://127.0.0.1:{admin_port}/readyz", proc)
        request = urllib.request.Request(
            f"http://127.0.0.1:{proxy_port}/", headers={"Host": "web.test"}
        )
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
            assert resp.status == 200  # a machine process runs
        for _ in range(3):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.01)
        out, _ = proc.communicate(timeout=60)
    assert leftovers(proc.pid) == [], out[-4000:]


def test_a_second_sigterm_answers_a_request_held_for_a_wake_503(tmp_path: Path) -> None:
    """The second SIGTERM stops the process at once; a request held for a wake (nothing
    sent to any machine) must still get its 503 with Retry-After before the process
    exits, where its connection was dropped unanswered (a disconnect to the client, and
    to Fly's proxy in front, which would not know whether to retry)."""
    data = config(free_port(), wake_timeout_s=300)
    data["proxy"]["shutdown_timeout_s"] = 300
    data["emulator"]["apps"] = [{"name": "web", "machines": 0}]  # nothing to wake: held
    file = write_config(tmp_path / "autoscaler.yaml", data)
    with _run_process(file) as (proc, proxy_port, admin_port):
        admin = f"http://127.0.0.1:{admin_port}"
        _wait_ready(f"{admin}/readyz", proc)
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=60) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
            _poll(
                proc,
                lambda: (
                    _sample(_get(f"{admin}/metrics")[1], "autoscaler_queued_requests", app="web")
                    == 1
                ),
                "held request",
            )
            proc.send_signal(signal.SIGTERM)
            _poll(proc, lambda: _get(f"{admin}/readyz")[0] == 503, "graceful stop")
            proc.send_signal(signal.SIGTERM)  # the second: at once
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := client.recv(65536):
                    answer += chunk
        out, _ = proc.communicate(timeout=60)
    assert answer.startswith(b"HTTP/1.1 503 "), (answer, out[-4000:])
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert b"\r\nretry-after: 1\r\n" in head + b"\r\n"
    assert b"\r\nconnection: close\r\n" in head + b"\r\n"
    events = [json.loads(line).get("event") for line in out.splitlines() if line.startswith("{")]
    assert "stopped_at_once" in events
    assert proc.returncode == 0, out[-4000:]


async def test_run_uses_the_configured_api_instead_of_an_embedded_emulator(
    emulator: Emulator,
) -> None:
    emulator.world.seed_app(EmulatorApp(name="web", machines=1))
    data = config(free_port())
    data["fly"] = {"api_url": emulator.url, "token": emulator.token}
    settings = Settings.model_validate(data)
    svc = Service(settings, metrics=Metrics(CollectorRegistry()), proxy_port=0, admin_port=0)
    await svc.start()
    try:
        assert svc.emulator is None
        assert svc.proxy is not None
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{svc.proxy.port}/"
            async with http.get(url, headers={"Host": "web.test"}) as resp:
                assert resp.status == 200
    finally:
        await svc.stop()
    ops = svc.metrics.registry.get_sample_value(
        "autoscaler_api_requests_total", {"operation": "start_machine", "code": "200"}
    )
    assert ops == 1


async def test_a_stop_cut_short_during_the_emulators_close_still_kills_its_machines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second SIGTERM that lands while the embedded emulator closes cancels that close
    before it killed the machines: the forced close must run it again, in this process
    (not leave the machine processes to die with it)."""
    file = write_config(tmp_path / "autoscaler.yaml", config(free_port(), min_machines=1))
    settings, _ = load_settings(file, env={})
    svc = Service(settings, file, metrics=Metrics(CollectorRegistry()), proxy_port=0, admin_port=0)
    await svc.start()
    emulator = svc.emulator
    assert emulator is not None
    try:
        await until(lambda: len(emulator.pids()) == 1, what="the machine's process")
        runner = emulator._runner
        assert runner is not None
        entered = asyncio.Event()
        cleanup = web.AppRunner.cleanup
        calls = 0

        async def cleanup_once_stuck(self: web.AppRunner) -> None:
            nonlocal calls
            if self is runner:
                calls += 1
                if calls == 1:
                    entered.set()
                    await asyncio.Event().wait()  # until cancelled
            await cleanup(self)

        monkeypatch.setattr(web.AppRunner, "cleanup", cleanup_once_stuck)
        stopping = asyncio.ensure_future(svc.stop())
        await entered.wait()
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopping
        assert emulator.pids() != []  # the interrupted close killed nothing
        await svc._force_close()
        assert emulator.pids() == []
        assert leftovers(os.getpid()) == []
    finally:
        await emulator.close()


def test_run_serves_static_apps_without_a_machines_api_and_refuses_a_scaled_one(
    tmp_path: Path,
) -> None:
    """Static apps (fixed backends) need no fly.api_url (config/static.yaml): `run` serves
    them with no emulator and no API; a reload that adds an app to scale is refused."""

    class Backend(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "6")
            self.end_headers()
            self.wfile.write(b"static")

        def log_message(self, *args: Any) -> None:
            pass

    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    thread = threading.Thread(target=backend.serve_forever, daemon=True)
    thread.start()
    app = f"{{name: web, hosts: [web.test], backends: ['127.0.0.1:{backend.server_port}']}}"
    file = tmp_path / "static.yaml"
    file.write_text(f"proxy: {{shutdown_timeout_s: 2}}\napps: [{app}]\n")
    try:
        with _run_process(file, emulator=False) as (proc, proxy_port, admin_port):
            admin = f"http://127.0.0.1:{admin_port}"
            _wait_ready(f"{admin}/readyz", proc)
            request = urllib.request.Request(
                f"http://127.0.0.1:{proxy_port}/", headers={"Host": "web.test"}
            )
            with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
                assert resp.read() == b"static"
            file.write_text(f"apps: [{app}, {{name: api, hosts: [api.test]}}]\n")
            proc.send_signal(signal.SIGHUP)
            _await_reload(admin, proc, "error")
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
    finally:
        backend.shutdown()
        backend.server_close()
    assert proc.returncode == 0, out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    events = [line.get("event") for line in lines]
    assert "embedded_emulator" not in events
    [rejected] = [line for line in lines if line.get("event") == "config_reload_rejected"]
    assert "fly.api_url is not set and app api is scaled" in rejected["problems"][0]
    assert not [line for line in lines if line.get("event") == "fly_api"]  # no call at all


async def test_a_file_set_back_to_what_runs_needs_no_restart(tmp_path: Path) -> None:
    """A reload that changed restart-only settings was warned about (rightly), but the
    service then held the file's values as if they ran: setting the file back to what
    runs was warned about as needing a restart, and a restart would change nothing."""
    file = tmp_path / "static.yaml"
    static = "apps: [{name: web, hosts: [web.test], backends: ['127.0.0.1:9']}]\n"
    file.write_text(f"proxy: {{listen: '127.0.0.1:8080'}}\n{static}")
    async with live_service(file, without_api=True) as svc:
        assert svc.controller is not None
        running = svc.settings
        file.write_text(
            "proxy: {listen: '127.0.0.1:8081'}\ncluster: {lease_ttl_s: 30, lead: false}\n"
            f"control: {{tick_s: 2}}\n{static}"
        )
        with capture_logs() as logs:
            assert await svc.reload()
        [warned] = [e for e in logs if e["event"] == "config_reload_needs_restart"]
        assert warned["sections"] == ["cluster", "proxy.listen"]
        assert svc.controller.settings.control.tick_s == 2  # the rest applies
        assert svc.settings.cluster == running.cluster  # what runs
        assert svc.settings.proxy.listen == running.proxy.listen
        file.write_text(f"proxy: {{listen: '127.0.0.1:8080'}}\n{static}")  # set back
        with capture_logs() as logs:
            assert await svc.reload()
        assert [e for e in logs if e["event"] == "config_reload_needs_restart"] == []


@pytest.mark.parametrize("api_url", [None, "http://127.0.0.1:9"], ids=["unset", "set-later"])
async def test_a_service_without_an_api_refuses_a_reload_that_adds_an_app_to_scale(
    tmp_path: Path, api_url: str | None
) -> None:
    """fly.* needs a restart: a Machines API named after the start is not used, so an app
    to scale would fail every call; the reload is refused and the static apps stay."""
    file = tmp_path / "static.yaml"
    static = "{name: web, hosts: [web.test], backends: ['127.0.0.1:9']}"
    file.write_text(f"apps: [{static}]\n")
    async with live_service(file, without_api=True) as svc:
        assert svc.emulator is None
        fly = f"fly: {{api_url: '{api_url}'}}\n" if api_url else ""
        file.write_text(f"{fly}apps: [{static}, {{name: api, hosts: [api.test]}}]\n")
        with capture_logs() as logs:
            assert not await svc.reload()
        [rejected] = [e for e in logs if e["event"] == "config_reload_rejected"]
        why = "restart to scale apps" if api_url else "fly.api_url is not set and app api"
        assert why in rejected["problems"][0]
        assert [a.name for a in svc.settings.apps] == ["web"]
        file.write_text(f"apps: [{static.replace('web.test', 'www.test')}]\n")
        assert await svc.reload()  # static apps alone still reload


async def test_under_workers_the_worker_the_supervisor_names_speaks_for_the_file(
    tmp_path: Path,
) -> None:
    """With slot 0 empty (a rolling restart whose new worker 0 failed), no worker said a
    reload's outcome, a rejected file's neither: the supervisor names the lowest live
    worker in a file (workers.speaker), which a running worker reads as it speaks."""
    file = tmp_path / "static.yaml"
    static = "apps: [{name: web, hosts: [web.test], backends: ['127.0.0.1:9']}]\n"
    file.write_text(static)
    named = tmp_path / "speaker"
    named.write_text("0")
    said = ("config_reloaded", "config_reload_rejected")
    with capture_logs() as logs:
        async with live_service(file, without_api=True, worker=1, speaker=named) as svc:
            assert await svc.reload()  # worker 0 speaks
            named.write_text("1")  # slot 0 left empty: worker 1 speaks from now on
            file.write_text("apps: [\n")
            assert not await svc.reload()
            file.write_text(static)
            assert await svc.reload()
    assert [e["event"] for e in logs if e["event"] in said] == [
        "config_reload_rejected",
        "config_reloaded",
    ]


async def test_under_workers_only_worker_0_says_what_concerns_the_shared_file(
    tmp_path: Path,
) -> None:
    """The workers of ``run --workers`` each load the same file: every line about it (a
    reload applied, rejected, needing a restart, emptying the apps) came once per worker.
    Worker 0 says them; another worker reloads as well (its metric counts), silently."""
    file = tmp_path / "static.yaml"
    said = {
        "app_unreachable",
        "config_reloaded",
        "config_reload_needs_restart",
        "config_reload_rejected",
        "no_apps",
    }
    events: dict[int, list[str]] = {}
    for worker in (0, 1):
        # An app no request reaches (api); then a reload to no app with a restart-only
        # change, and one of a file that does not parse.
        file.write_text(
            "apps: [{name: web, hosts: [web.test], backends: ['127.0.0.1:9']},"
            " {name: api, backends: ['127.0.0.1:9']}]\n"
        )
        with capture_logs() as logs:
            async with live_service(file, without_api=True, worker=worker) as svc:
                file.write_text("cluster: {lease_ttl_s: 30}\napps: []\n")
                assert await svc.reload()
                file.write_text("apps: [\n")
                assert not await svc.reload()
                for result in ("success", "error"):
                    assert metric(svc, "autoscaler_config_reloads_total", result=result) == 1
        events[worker] = [e["event"] for e in logs if e["event"] in said]
    assert events == {
        0: [
            "app_unreachable",
            "config_reload_needs_restart",
            "config_reloaded",
            "no_apps",
            "config_reload_rejected",
        ],
        1: [],
    }
