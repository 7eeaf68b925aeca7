"""Run by tests/test_dual_stack.py inside a network namespace of its own (``unshare``),
whose only interface is its loopback: there the IPv6 wildcard is loopback alone, so the
servers can listen on ``[::]`` without being reachable from any other host.

It brings the namespace's ``lo`` up, starts the proxy (a static app in front of a backend on
127.0.0.1) and the admin server, each on ``[::]``, on asyncio and on uvloop, asks each over
127.0.0.1 and over ::1, and prints one JSON object: ``{"<loop> <server> <client>": status
or the error's text}``. Ports are fixed: the namespace is new, nothing else listens in it.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import socket
import struct
from collections.abc import Callable

import aiohttp
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from autoscaler.admin import AdminServer
from autoscaler.config import AdminSettings, AppConfig, ProxySettings, Settings
from autoscaler.control.view import FleetView
from autoscaler.metrics import Metrics
from autoscaler.proxy.server import ProxyServer

SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
BACKEND, PROXY, ADMIN = 8000, 8080, 9091
CLIENTS = {"ipv4": "127.0.0.1", "ipv6": "[::1]"}


def loopback_up() -> None:
    """``ip link set lo up``, without needing iproute2: a new namespace's lo is down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))


async def ask(session: aiohttp.ClientSession, url: str, host: str) -> int | str:
    try:
        async with session.get(url, headers={"Host": host}) as resp:
            return resp.status
    except aiohttp.ClientError as exc:
        return f"{type(exc).__name__}: {exc}"


async def check(loop_name: str, results: dict[str, int | str]) -> None:
    async def up(request: web.Request) -> web.Response:
        return web.Response(text="up")

    backend = web.Application()
    backend.router.add_get("/", up)
    runner = web.AppRunner(backend)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", BACKEND).start()
    settings = Settings(
        proxy=ProxySettings(listen=f"[::]:{PROXY}"),
        admin=AdminSettings(listen=f"[::]:{ADMIN}", token=SecretStr("not-asked-by-healthz")),
        apps=[AppConfig(name="a", hosts=["a.test"], backends=[f"127.0.0.1:{BACKEND}"])],
    )
    metrics = Metrics(CollectorRegistry())
    view = FleetView()
    proxy = ProxyServer(settings, view, metrics)
    admin = AdminServer(settings.admin, metrics)
    await proxy.start()
    await admin.start()
    try:
        async with aiohttp.ClientSession() as session:
            for family, client in CLIENTS.items():
                results[f"{loop_name} proxy {family}"] = await ask(
                    session, f"http://{client}:{PROXY}/", "a.test"
                )
                results[f"{loop_name} admin {family}"] = await ask(
                    session, f"http://{client}:{ADMIN}/healthz", "admin"
                )
    finally:
        await admin.stop()
        await proxy.stop()
        await view.close()
        await runner.cleanup()


def main() -> None:
    loopback_up()
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as exc:  # IPv6 off in this kernel or namespace
        print(json.dumps({"skip": f"no IPv6 loopback in the namespace: {exc}"}))
        return
    results: dict[str, int | str] = {}
    loops: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop,
        "uvloop": uvloop.new_event_loop,
    }
    for name, new_loop in loops.items():
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(check(name, results))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
