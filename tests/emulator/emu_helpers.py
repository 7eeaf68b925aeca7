"""Small helpers for the emulator tests: an authenticated session and common calls."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import aiohttp

from autoscaler.config import authority
from autoscaler.emulator import Emulator
from autoscaler.emulator.model import Machine
from autoscaler.emulator.procs import pid_alive

DEMO = "autoscaler/demo-app"


def session(emu: Emulator, token: str | None = None) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        base_url=emu.url,
        headers={"Authorization": f"Bearer {token or emu.token}"},
        timeout=aiohttp.ClientTimeout(total=30),
    )


async def create_app(s: aiohttp.ClientSession, name: str = "demo") -> None:
    r = await s.post("/v1/apps", json={"app_name": name, "org_slug": "personal"})
    assert r.status == 201, await r.text()


async def create_machine(
    s: aiohttp.ClientSession,
    app: str = "demo",
    *,
    start: bool = True,
    port: int = 8080,
    **config: Any,
) -> dict[str, Any]:
    body = {
        "config": {
            "image": DEMO,
            "services": [{"protocol": "tcp", "internal_port": port}],
            **config,
        },
        "skip_launch": not start,
    }
    r = await s.post(f"/v1/apps/{app}/machines", json=body)
    assert r.status == 200, await r.text()
    machine: dict[str, Any] = await r.json()
    return machine


async def new_machine(
    s: aiohttp.ClientSession, *, start: bool = True, **config: Any
) -> dict[str, Any]:
    """App ``demo`` with one machine in it, started (and waited for) unless ``start=False``."""
    await create_app(s)
    machine = await create_machine(s, start=start, **config)
    if start:
        await wait_ok(s, "demo", machine["id"])
    return machine


async def wait(
    s: aiohttp.ClientSession, app: str, mid: str, state: str = "started", seconds: int = 20
) -> aiohttp.ClientResponse:
    params: dict[str, str | int] = {"state": state, "timeout": seconds}
    if "stopped" in state.split(","):
        # As the real API wants (and the client does): the version that is to stop.
        got = await s.get(f"/v1/apps/{app}/machines/{mid}")
        if got.status == 200:
            params["version"] = (await got.json())["instance_id"]
    r = await s.get(f"/v1/apps/{app}/machines/{mid}/wait", params=params)
    await r.read()
    return r


async def wait_ok(s: aiohttp.ClientSession, app: str, mid: str, state: str = "started") -> None:
    r = await wait(s, app, mid, state)
    assert r.status == 200, f"wait {state}: {r.status} {await r.text()}"


async def hit(ip: str, port: int = 8080, path: str = "/") -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as c,
        c.get(f"http://{authority(ip, port)}{path}") as r,
    ):
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie counts as gone)."""
    return not pid_alive(pid)


async def until(m: Machine, done: Callable[[Machine], bool], seconds: float = 20) -> None:
    """Wait, on the machine's change events, until ``done(m)``."""

    async def reached() -> None:
        while not done(m):
            await m.changed.wait()

    await asyncio.wait_for(reached(), seconds)


async def until_state(m: Machine, state: str, seconds: float = 20) -> None:
    """Wait, on the machine's change events, until it is in ``state``."""
    await until(m, lambda x: x.state == state, seconds)


async def pid_exit(pid: int, seconds: float = 20) -> None:
    """Wait for any process (not only a child) to end, on its pidfd: no polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(ended, seconds)
    finally:
        loop.remove_reader(fd)
        os.close(fd)
