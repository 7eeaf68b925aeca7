"""Fixtures: real upstream aiohttp servers on loopback and a started ProxyServer.

``start_proxy(apps=..., **proxy_knobs)`` builds Settings, starts the proxy on an ephemeral
loopback port and stops it after the test; ``backend(app)`` serves an aiohttp app on
127.0.0.1 and returns its "host:port" for ``backends`` (static mode).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from autoscaler.config import AppConfig, ProxySettings, Settings
from autoscaler.control.view import FleetView
from autoscaler.metrics import Metrics
from autoscaler.proxy.server import ProxyServer

StartProxy = Callable[..., Awaitable[ProxyServer]]
Backend = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
def fleet() -> FleetView:
    return FleetView()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    servers: list[TestServer] = []

    async def make(app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        return f"127.0.0.1:{server.port}"

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def start_proxy(fleet: FleetView, metrics: Metrics) -> AsyncIterator[StartProxy]:
    proxies: list[ProxyServer] = []

    async def make(apps: list[dict[str, Any]], **proxy: Any) -> ProxyServer:
        knobs: dict[str, Any] = {"listen": "127.0.0.1:8080", "shutdown_timeout_s": 5.0}
        knobs.update(proxy)
        settings = Settings(proxy=ProxySettings(**knobs), apps=[AppConfig(**app) for app in apps])
        server = ProxyServer(settings, fleet, metrics, rng=random.Random(7))  # noqa: S311 - seeded for tests
        await server.start("127.0.0.1", 0)
        proxies.append(server)
        return server

    yield make
    for server in proxies:
        await server.stop()
    await fleet.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


def url(proxy: ProxyServer, path: str = "/") -> str:
    return f"http://127.0.0.1:{proxy.port}{path}"
