"""Fixtures: real upstream aiohttp servers on loopback and a started ProxyServer.

``start_proxy(apps=..., **proxy_knobs)`` builds Settings, starts the proxy on an ephemeral
loopback port and stops it after the test; ``backend(app)`` serves an aiohttp app on
127.0.0.1 and returns its "host:port" for ``backends`` (static mode), ``raw_backend(handler)``
the same for an asyncio stream handler.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from autoscaler.config import AppConfig, ProxySettings, Settings
from autoscaler.control.view import FleetView
from autoscaler.metrics import Metrics
from autoscaler.proxy.server import ProxyServer

StartProxy = Callable[..., Awaitable[ProxyServer]]
Backend = Callable[[web.Application], Awaitable[str]]
StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
RawBackend = Callable[[StreamHandler], Awaitable[str]]


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
async def raw_backend() -> AsyncIterator[RawBackend]:
    """A machine written against the socket (for answers aiohttp would not send)."""
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def make(handler: StreamHandler) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            await handler(reader, writer)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield make
    for server in servers:
        server.close()
    for writer in writers:  # the proxy may still hold connections (it stops after this)
        writer.close()
    for server in servers:
        await server.wait_closed()


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


# --- every async proxy test on both event loops ---------------------------------------
#
# The data path is asyncio Protocols and transports, and production may run on uvloop (the
# ``fast`` extra), whose transports and timers differ from asyncio's in details (uvloop's
# clock has millisecond resolution, so timers may fire before time.monotonic() reaches the
# deadline). pytest-asyncio >= 1.4 parametrizes async tests over the loop factories this
# hook returns (overriding ``event_loop_policy`` is deprecated there); in this conftest it
# applies to tests/proxy only. Synchronous tests use no loop and run once.


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
