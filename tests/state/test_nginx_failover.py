"""Issue 22, item 7b: two replicas behind nginx; one is SIGKILLed under steady load.

Real processes: two `autoscaler run` replicas (one Redis, the emulator as their API) and
nginx in front of both (round robin, ``proxy_next_upstream error``, no upstream keep-alive):
like Fly's proxy, nginx passes a request on to the other replica when its connection is
refused, but not a non-idempotent request it already sent. The clients send POSTs (which
nginx never resends), to an app whose upstream is a small backend in this test's process.
Claims:

- the requests that fail are exactly the ones in flight on the killed replica: the slow
  requests held there (counted by its ``autoscaler_inflight_requests`` at the kill) get
  502, the ones on the other replica their 200; a background request fails only if it was
  in flight at the kill (from the clients' view);
- every request sent after the kill gets its 200 (refused connections go to the survivor).

nginx runs on loopback only, with a temporary prefix (benchmarks/proxy_overhead.py's
helper), and is reaped; so are both replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from reliability.harness import Load, write_config
from reliability.test_restart import Autoscaler
from testkit import free_port, until

from autoscaler.emulator import Emulator

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]
SLOW = 6  # slow requests held across both replicas at the kill
CLIENTS = 4  # background clients, looping


def _bench() -> ModuleType:
    """benchmarks/proxy_overhead.py, for its nginx helper (not a package: loaded by path)."""
    name = "_bench_proxy_overhead"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "proxy_overhead.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def nginx_binary() -> None:
    """nginx must be installed; fails (not skips) under CI, as redis-server does."""
    if shutil.which("nginx") is None:
        reason = "nginx not found (Debian package `nginx`; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set: the CI image must provide it")
        pytest.skip(reason)


@contextlib.asynccontextmanager
async def backend() -> AsyncIterator[int]:
    """An upstream on loopback: any method on /work?ms=N answers 200 after N ms."""

    async def work(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(int(request.query.get("ms", "0")) / 1000)
        return web.Response(text="done")

    app = web.Application()
    app.router.add_route("*", "/work", work)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def _inflight(http: aiohttp.ClientSession, admin: str, app: str) -> float:
    async with http.get(f"{admin}/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        if family.name == "autoscaler_inflight_requests":
            # (cluster mode adds a replica label)
            return sum(s.value for s in family.samples if s.labels.get("app") == app)
    return 0.0


async def test_sigkill_behind_nginx_fails_only_requests_in_flight_on_it(
    emulator: Emulator, redis_server: str, key_prefix: str, tmp_path: Path
) -> None:
    nginx_binary()
    helper = _bench()
    loop = asyncio.get_running_loop()
    async with backend() as upstream:
        file = write_config(
            tmp_path / "c.yaml",
            {
                "fly": {"api_url": emulator.url, "token": emulator.token},
                "proxy": {"shutdown_timeout_s": 2},
                "control": {"tick_s": 0.2},
                "cluster": {
                    "redis_url": redis_server,
                    "lease_ttl_s": 1,
                    "key_prefix": key_prefix,
                },
                "apps": [
                    {"name": "web", "hosts": ["web.test"], "backends": [f"127.0.0.1:{upstream}"]},
                    {"name": "slow", "hosts": ["slow.test"], "backends": [f"127.0.0.1:{upstream}"]},
                ],
            },
        )
        ports = [(free_port(), free_port()) for _ in range(2)]
        replicas = [Autoscaler(file, proxy, admin) for proxy, admin in ports]
        front = free_port()
        url = f"http://127.0.0.1:{front}"
        # (start, end, outcome) of every background request
        done: list[tuple[float, float, str]] = []
        stop = asyncio.Event()

        async def client(load: Load) -> None:
            while not stop.is_set():
                start = loop.time()
                outcome = await load.once(method="POST")
                done.append((start, loop.time(), outcome))

        try:
            async with aiohttp.ClientSession() as http:
                for replica in replicas:
                    await replica.start(http)
                with helper.nginx(
                    front, [p for p, _ in ports], keepalive=0, next_upstream="error"
                ) as nginx_proc:
                    async with (
                        Load(url, path="/work?ms=20") as load,
                        Load(url, host="slow.test", path="/work?ms=4000") as slow,
                    ):
                        clients = [asyncio.create_task(client(load)) for _ in range(CLIENTS)]
                        try:
                            await until(lambda: len(done) >= 40, 30, "background load")
                            held = [
                                asyncio.create_task(slow.once(method="POST")) for _ in range(SLOW)
                            ]
                            counts: list[float] = []
                            async with asyncio.timeout(30):
                                while sum(counts) < SLOW:
                                    counts = [
                                        await _inflight(http, r.admin, "slow") for r in replicas
                                    ]
                                    await asyncio.sleep(0.05)  # metrics: nothing to await
                            victim = max((0, 1), key=lambda i: counts[i])
                            on_victim = int(counts[victim])
                            assert replicas[victim].proc is not None
                            killed_at = loop.time()
                            replicas[victim].proc.kill()
                            await replicas[victim].proc.wait()
                            # The kill takes effect between the signal and the reaping:
                            # a request that reached the victim in between (accepted by its
                            # kernel, sent by nginx) was in flight on it.
                            dead_at = loop.time()
                            await until(
                                lambda: sum(1 for s, _, _ in done if s > dead_at) >= 60,
                                30,
                                "load after the kill",
                            )
                        finally:
                            stop.set()
                            await asyncio.gather(*clients)
                        slow_outcomes = await asyncio.gather(*held)
                    assert nginx_proc.poll() is None
                survivor_code = await replicas[1 - victim].stop()
        finally:
            for replica in replicas:
                await replica.reap()

    assert sorted(slow_outcomes) == sorted(["502"] * on_victim + ["200"] * (SLOW - on_victim))
    failed = [(s, e, o) for s, e, o in done if o != "200"]
    # A background request fails only if it was in flight on the replica at the kill.
    assert all(s <= dead_at and e >= killed_at for s, e, _ in failed), (
        failed,
        killed_at,
        dead_at,
    )
    assert len(failed) <= CLIENTS
    after = [o for s, _, o in done if s > dead_at]
    assert after == ["200"] * len(after)
    assert survivor_code == 0, replicas[1 - victim].output.decode()[-3000:]
