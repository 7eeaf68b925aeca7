"""``hard_limit`` across replicas, end to end: two `autoscaler run` services in cluster mode
(one redis-server) in front of ONE machine, a local backend that counts the requests it
serves at once. Each replica counts its own requests on the machine exactly and the other's
as last reported (every 250 ms), so the machine never serves more than ``hard_limit`` plus
what the other replica admitted since its last report: with the minority replica's k
clients, at most ``hard_limit + k``."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from testkit import free_port

from autoscaler.config import Settings
from autoscaler.control.view import Upstream
from autoscaler.emulator import Emulator
from autoscaler.metrics import Metrics
from autoscaler.proxy.balancer import pick
from autoscaler.service import Service
from autoscaler.state.cluster import REPORT_S

LIMIT = 4
HOST = "web.test"


class Backend:
    """A machine that counts its requests in flight and the most it ever served at once.
    ``/hold`` waits until the test opens the gate; ``/`` answers after a few ms."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.served = 0
        self.gate = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            if request.path == "/hold":
                await self.gate.wait()
            else:
                await asyncio.sleep(0.005)
        finally:
            self.now -= 1
            self.served += 1
        return web.Response(text="ok")


@pytest.fixture
async def backend() -> AsyncIterator[tuple[Backend, int]]:
    machine = Backend()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", machine.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    try:
        yield machine, port
    finally:
        machine.gate.set()
        await runner.cleanup()


def settings(emulator: Emulator, url: str, prefix: str, rid: str, port: int) -> Settings:
    return Settings.model_validate(
        {
            "fly": {"api_url": emulator.url, "token": emulator.token},
            "proxy": {"listen": "127.0.0.1:8080", "shutdown_timeout_s": 2},
            "admin": {"listen": "127.0.0.1:9091"},
            "cluster": {"redis_url": url, "replica_id": rid, "key_prefix": prefix},
            "apps": [
                {
                    "name": "web",
                    "hosts": [HOST],
                    "backends": [f"127.0.0.1:{port}"],
                    "hard_limit": LIMIT,
                    "wake_timeout_s": 20,
                }
            ],
        }
    )


def test_a_replica_keeps_to_its_share_of_the_limit() -> None:
    """Its share: max(1, floor(hard_limit x share)) requests in flight, whatever the
    others reported in flight (short requests come and go between two reports)."""
    rng = random.Random(1)  # noqa: S311 - no secret
    up = Upstream("m", "127.0.0.1", 1)
    up.share = 0.9  # 36 of 40 clients: 7 of 8 slots
    up.in_flight = 6
    assert pick([up], 8, rng) is up
    up.in_flight = 7
    assert pick([up], 8, rng) is None
    up.share = 0.1  # 4 of 40: floor(0.8) = 0, but one request always may go
    up.in_flight = 0
    assert pick([up], 8, rng) is up
    up.in_flight = 1
    assert pick([up], 8, rng) is None
    up.share = 0.5
    up.in_flight = 3
    assert pick([up], 8, rng) is up
    up.remote_in_flight = 5  # and the others' reported requests still count
    assert pick([up], 8, rng) is None
    up.remote_in_flight = 0
    up.share = 29 / 100  # x 100 = 28.999999999999996 in floating point: still 29 slots
    up.in_flight = 28
    assert pick([up], 100, rng) is up


async def until(condition: Callable[[], bool], limit_s: float) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not condition():
        assert loop.time() - start < limit_s, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_hard_limit_holds_across_two_replicas_under_skew(
    emulator: Emulator, redis_server: str, key_prefix: str, backend: tuple[Backend, int]
) -> None:
    machine, port = backend
    a, b = (
        Service(
            settings(emulator, redis_server, key_prefix, rid, port),
            metrics=Metrics(CollectorRegistry()),
            proxy_port=0,
            admin_port=free_port(),
        )
        for rid in ("a", "b")
    )
    mid = f"127.0.0.1:{port}"
    try:
        await a.start()
        await b.start()
        up_a = a.view.app("web").upstreams[mid]
        up_b = b.view.app("web").upstreams[mid]
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=30)
        ) as http:

            async def get(svc: Service, path: str) -> int:
                assert svc.proxy is not None
                url = f"http://127.0.0.1:{svc.proxy.port}{path}"
                async with http.get(url, headers={"Host": HOST}) as resp:
                    await resp.read()
                    return resp.status

            # 1. The minority replica's request sits on the machine; once B has reported
            # it, A admits only hard_limit - 1 of a burst and holds the rest (exactly: no
            # report is in flight on either side any more). A's share of the machine
            # follows its demand: 12 of the 13 requests, floor(4 x 12/13) = 3 slots.
            held_b = asyncio.ensure_future(get(b, "/hold"))
            await until(lambda: up_a.remote_in_flight == 1, 5)
            burst = [asyncio.ensure_future(get(a, "/hold")) for _ in range(3 * LIMIT)]
            view_a = a.view.app("web")
            # Settled: A's round has seen the whole burst (a round in the middle of it gives
            # a share that admits fewer), every request of it is in flight or held, and the
            # machine serves as many as the limit (it never serves more: ``most`` below).
            await until(lambda: abs(up_a.share - 12 / 13) < 1e-9, 5)
            await until(lambda: up_a.in_flight + view_a.queued == 3 * LIMIT, 5)
            await until(lambda: machine.now == LIMIT, 5)
            assert up_a.in_flight == LIMIT - 1
            assert up_b.in_flight == 1
            machine.gate.set()
            assert await asyncio.gather(held_b, *burst) == [200] * (1 + 3 * LIMIT)
            assert machine.most == LIMIT

            # 2. Skewed closed-loop traffic: 4 x hard_limit clients through A, one through
            # B. A counts its own requests exactly and B's as last reported, so the
            # machine serves at most hard_limit + 1; B is not starved.
            machine.most = 0
            statuses: dict[str, list[int]] = {"a": [], "b": []}
            stop = asyncio.Event()

            async def client(svc: Service, key: str) -> None:
                while not stop.is_set():
                    statuses[key].append(await get(svc, "/"))

            clients = [asyncio.ensure_future(client(a, "a")) for _ in range(4 * LIMIT)]
            clients.append(asyncio.ensure_future(client(b, "b")))
            # Six rounds of reports go by under load (B reads A's count six times).
            assert b.replica is not None
            cluster_b = b.replica.cluster
            first = cluster_b.last_read_at
            assert first is not None
            await until(lambda: (cluster_b.last_read_at or 0) >= first + 6 * REPORT_S, 10)
            stop.set()
            await asyncio.gather(*clients)
        assert machine.most >= LIMIT  # the load did fill the machine
        assert machine.most <= LIMIT + 1
        assert set(statuses["a"]) == {200}
        assert set(statuses["b"]) == {200}
    finally:
        await b.stop()
        await a.stop()
