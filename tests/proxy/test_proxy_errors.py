"""The 5xx the proxy writes itself are counted apart from the app's own (the app's 5xx
are autoscaler_requests_total's less autoscaler_proxy_errors_total, as the alerts read)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
from aiohttp import web

from autoscaler.metrics import Metrics

from .conftest import Backend, RawBackend, StartProxy, url
from .helpers import status_of


def samples(metrics: Metrics, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    return {
        tuple(sample.labels[label] for label in labels): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    }


async def test_the_proxys_own_502_and_504_are_proxy_errors_and_an_apps_500_is_not(
    backend: Backend,
    raw_backend: RawBackend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    refused_port: Callable[[], int],
) -> None:
    async def failing(request: web.Request) -> web.Response:
        return web.Response(status=500, text="the app's own bug")

    app = web.Application()
    app.router.add_get("/", failing)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # takes the request, never answers

    proxy = await start_proxy(
        [
            {"name": "own", "hosts": ["own.test"], "backends": [await backend(app)]},
            {
                "name": "dead",
                "hosts": ["dead.test"],
                "backends": [f"127.0.0.1:{refused_port()}"],
                "wake_timeout_s": 0.5,  # held for it to listen until then: its 502
            },
            {"name": "mute", "hosts": ["mute.test"], "backends": [await raw_backend(silent)]},
        ],
        upstream_timeout_s=0.2,
    )
    statuses = {
        host: await status_of(session, url(proxy), f"{host}.test")
        for host in ("own", "dead", "mute")
    }
    assert statuses == {"own": 500, "dead": 502, "mute": 504}
    assert samples(metrics, "autoscaler_proxy_errors_total", "app", "reason") == {
        ("", "internal"): 0,  # a bug before routing: at 0 from the start
        ("dead", "unreachable"): 1,
        ("mute", "machine_timeout"): 1,
    }
    # Each counted once as a request too, under the same app: the difference is the app's.
    assert samples(metrics, "autoscaler_requests_total", "app", "code") == {
        ("", "500"): 0,
        ("own", "500"): 1,
        ("dead", "502"): 1,
        ("mute", "504"): 1,
    }
