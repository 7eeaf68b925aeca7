"""Balancing, hard limits and the FIFO, passive health and the retry rules."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs
from testkit import until

from autoscaler.config import AppConfig
from autoscaler.control.view import FleetView, MachineInfo
from autoscaler.metrics import Metrics
from autoscaler.proxy.gate import Gate, QueueFull

from .conftest import Backend, RawBackend, StartProxy, StreamHandler, url
from .helpers import Blocking, raw


async def test_hard_limit_queues_in_order_and_overflow_gets_503(
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
    metrics: Metrics,
) -> None:
    up = Blocking()
    proxy = await start_proxy(
        [
            {
                "name": "a",
                "hosts": ["a.test"],
                "backends": [await backend(up.app())],
                "hard_limit": 1,
                "max_queue": 2,
            }
        ]
    )
    view = fleet.app("a")

    async def get(i: str) -> tuple[int, str, dict[str, str]]:
        async with session.get(url(proxy, f"/?id={i}"), headers={"Host": "a.test"}) as r:
            return r.status, await r.text(), dict(r.headers)

    first = asyncio.create_task(get("A"))
    await until(lambda: view.in_flight == 1)
    second = asyncio.create_task(get("B"))
    await until(lambda: view.queued == 1)
    third = asyncio.create_task(get("C"))
    await until(lambda: view.queued == 2)
    assert metrics.registry.get_sample_value("autoscaler_queued_requests", {"app": "a"}) == 2

    status, body, headers = await get("D")  # the queue is full
    assert status == 503
    assert headers["Retry-After"] == "1"
    assert body == "too many requests waiting\n"
    assert (
        metrics.registry.get_sample_value(
            "autoscaler_queue_rejections_total", {"app": "a", "reason": "queue_full"}
        )
        == 1
    )
    assert up.order == ["A"]  # nothing passed the limit
    up.release.set()
    results = await asyncio.gather(first, second, third)
    assert [r[0] for r in results] == [200, 200, 200]
    assert up.order == ["A", "B", "C"]
    assert view.queued == 0
    assert view.in_flight == 0


async def test_least_outstanding_spreads_concurrent_requests(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    one, two = Blocking("one"), Blocking("two")
    proxy = await start_proxy(
        [
            {
                "name": "a",
                "hosts": ["a.test"],
                "backends": [await backend(one.app()), await backend(two.app())],
            }
        ]
    )

    async def get() -> str:
        async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
            return await r.text()

    tasks = [asyncio.create_task(get()) for _ in range(4)]
    await until(lambda: len(one.order) + len(two.order) == 4)
    # With two machines both are always compared, so the less loaded one wins each time.
    assert (len(one.order), len(two.order)) == (2, 2)
    one.release.set()
    two.release.set()
    assert sorted(await asyncio.gather(*tasks)) == ["one", "one", "two", "two"]


async def test_a_request_its_machine_refused_keeps_its_place_in_the_queue(
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
    refused_port: Callable[[], int],
) -> None:
    """A held request handed a machine that refuses its connection (nothing sent), no
    other machine free, waits again: ahead of the request held behind it, served first
    once a slot frees. It went to the end of the queue, behind that later one."""
    busy = Blocking()
    host, _, port = (await backend(busy.app())).partition(":")
    up = MachineInfo("m1", host, int(port), "started", False)
    view = fleet.app("a")
    view.set_machines([up])
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "hard_limit": 1, "wake_timeout_s": 30}],
        unhealthy_backoff_s=60,
    )

    async def get(i: str) -> int:
        async with session.get(url(proxy, f"/?id={i}"), headers={"Host": "a.test"}) as r:
            return r.status

    first = asyncio.create_task(get("first"))
    await until(lambda: busy.order == ["first"])
    earlier = asyncio.create_task(get("earlier"))
    await until(lambda: view.queued == 1)
    later = asyncio.create_task(get("later"))
    await until(lambda: view.queued == 2)
    with capture_logs() as logs:
        # A machine comes up whose server does not listen yet: "earlier" goes to it.
        dead = MachineInfo("m2", "127.0.0.1", refused_port(), "started", False)
        view.set_machines([up, dead])
        await until(lambda: any(e["event"] == "machine_unreachable" for e in logs))
    assert view.queued == 2  # both held again, "later" not sent to the refusing machine
    busy.release.set()
    assert await asyncio.gather(first, earlier, later) == [200, 200, 200]
    assert busy.order == ["first", "earlier", "later"]


async def test_a_request_back_in_the_queue_takes_its_place_by_arrival() -> None:
    """``Gate.acquire(arrived=...)``, for a request its machine refused (``_next_attempt``):
    ahead of every request held on arrival (they came after it), behind those back that
    came before it. In a full queue the latest arrival leaves with its QueueFull (its
    503), not this request (that was its 502: no machine reachable); one back that came
    after all those in a full queue is refused itself (the queue keeps the earliest)."""
    fleet = FleetView()
    view = fleet.app("a")
    view.set_machines([MachineInfo("m1", "127.0.0.1", 1, "started", False)])
    config = AppConfig(name="a", hard_limit=1, max_queue=2)
    gate = Gate(config, fleet, Metrics(), random.Random(1))  # noqa: S311 - balancing
    machine = gate.try_acquire()
    assert machine is not None
    held = asyncio.create_task(gate.acquire(30))
    await until(lambda: view.queued == 1)
    latest = asyncio.create_task(gate.acquire(30))
    await until(lambda: view.queued == 2)
    # Back from machines that refused them, having come at 2 and at 1 (loop time).
    back = asyncio.create_task(gate.acquire(30, arrived=2.0))
    with pytest.raises(QueueFull):
        await latest
    earliest = asyncio.create_task(gate.acquire(30, arrived=1.0))
    with pytest.raises(QueueFull):
        await held
    with pytest.raises(QueueFull):
        await gate.acquire(30, arrived=3.0)
    assert view.queued == 2
    gate.done(machine)  # a slot frees: in arrival order
    assert await earliest == (machine, "none")
    assert not back.done()
    gate.done(machine)
    assert await back == (machine, "none")
    gate.done(machine)
    await gate.close()


def counting_app(hits: list[str], name: str, *, reset: bool) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        hits.append(name)
        if reset and request.transport is not None:
            request.transport.abort()  # gone after the request was sent: no response byte
        return web.Response(text=name)

    app = web.Application()
    app.router.add_route("*", "/", handler)
    return app


async def test_refused_connection_is_retried_elsewhere_and_machine_skipped(
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
    refused_port: Callable[[], int],
) -> None:
    hits: list[str] = []
    dead = f"127.0.0.1:{refused_port()}"
    alive = await backend(counting_app(hits, "alive", reset=False))
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [dead, alive]}], unhealthy_backoff_s=60
    )
    for i in range(8):
        method = "POST" if i % 2 else "GET"  # nothing was sent: any method may be retried
        async with session.request(
            method,
            url(proxy),
            data=b"body" if method == "POST" else None,
            headers={"Host": "a.test"},
        ) as r:
            assert r.status == 200
            assert await r.text() == "alive"
    assert hits == ["alive"] * 8
    routable = [u.id for u in fleet.app("a").routable()]
    assert routable == [alive]  # the dead one is skipped for the backoff


async def test_all_machines_unreachable_is_502(
    start_proxy: StartProxy, session: aiohttp.ClientSession, refused_port: Callable[[], int]
) -> None:
    proxy = await start_proxy(
        [
            {
                "name": "a",
                "hosts": ["a.test"],
                "backends": [f"127.0.0.1:{refused_port()}", f"127.0.0.1:{refused_port()}"],
                "wake_timeout_s": 0.5,  # held for one to listen until then
            }
        ]
    )
    async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
        assert r.status == 502
        assert await r.text() == "no machine of this app is reachable\n"
        assert len(r.headers["X-Request-Id"]) == 32


async def test_a_request_sent_back_to_a_full_queue_gets_its_503(
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    refused_port: Callable[[], int],
) -> None:
    """Refused by its machine with none other free, a request waits again: in a queue
    full of requests that came before it (here ``max_queue`` 0) it is refused, as any
    request coming to a full queue is. It got 502 "no machine of this app is reachable",
    counted as a proxy error (which pages) where it is a full queue's 503, to retry."""
    backend = f"127.0.0.1:{refused_port()}"
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [backend], "max_queue": 0}]
    )
    with capture_logs() as logs:
        async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
            assert (r.status, await r.text()) == (503, "too many requests waiting\n")
            assert r.headers["Retry-After"] == "1"
    assert any(e["event"] == "machine_unreachable" for e in logs)  # it was sent back
    count = metrics.registry.get_sample_value
    assert count("autoscaler_queue_rejections_total", {"app": "a", "reason": "queue_full"}) == 1
    assert count("autoscaler_proxy_errors_total", {"app": "a", "reason": "queue_full"}) == 1
    assert not count("autoscaler_proxy_errors_total", {"app": "a", "reason": "unreachable"})


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_a_request_lost_on_every_machine_is_502_sent_again_at_most_once(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession, method: str
) -> None:
    """Reset after the request was written: the machine may have acted on it, so a POST
    (any request with a body) is not replayed elsewhere (only a request that never
    reached a machine is, and an idempotent one with no body, once). A GET is replayed
    once only: the second machine resetting too is the 502 (no loop)."""
    hits: list[str] = []
    proxy = await start_proxy(
        [
            {
                "name": "a",
                "hosts": ["a.test"],
                "backends": [
                    await backend(counting_app(hits, "x", reset=True)),
                    await backend(counting_app(hits, "y", reset=True)),
                ],
            }
        ]
    )
    body = b"charge me once" if method == "POST" else None
    with capture_logs() as logs:
        async with session.request(method, url(proxy), data=body, headers={"Host": "a.test"}) as r:
            assert r.status == 502
            assert await r.text() == "the machine failed to answer\n"
    replays = [e for e in logs if e["event"] == "request_replayed"]
    if method == "POST":
        assert len(hits) == 1
        assert not replays
    else:
        assert sorted(hits) == ["x", "y"]
        assert len(replays) == 1


async def test_a_get_the_machine_got_is_replayed_on_another_once(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    """A GET whose machine reset its connection before answering is sent again, to the
    other machine (RFC 9110 9.2.2, as nginx's proxy_next_upstream error): the client gets
    that one's answer, not the 502 it got before."""
    hits: list[str] = []
    x = await backend(counting_app(hits, "x", reset=True))
    proxy = await start_proxy(
        [
            {
                "name": "a",
                "hosts": ["a.test"],
                "backends": [x, await backend(counting_app(hits, "y", reset=False))],
            }
        ],
        unhealthy_backoff_s=60,
    )
    with capture_logs() as logs:
        while "x" not in hits:  # until the balancer chose x first
            async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
                assert r.status == 200
                assert await r.text() == "y"
    assert hits[-2:] == ["x", "y"]
    (replayed,) = [e for e in logs if e["event"] == "request_replayed"]
    assert (replayed["app"], replayed["machine"]) == ("a", x)


class InOrder(random.Random):
    """The balancer's draws all 0: of the machines it may pick, the first listed."""

    def randrange(self, *args: Any, **kwargs: Any) -> int:
        return 0


@pytest.mark.parametrize("order", ["refused-then-lost", "lost-then-refused"])
async def test_a_get_refused_by_one_machine_and_lost_by_another_goes_on_to_a_third(
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    refused_port: Callable[[], int],
    order: str,
) -> None:
    """A refused connect and a replay each go on at once to a machine not tried yet: the
    two together used up MAX_ATTEMPTS, and the GET was held in the queue instead (here
    an app that holds none: its 502, with a third machine free to serve it). Still
    bounded: each machine once, the replay once."""
    hits: list[str] = []
    dead = f"127.0.0.1:{refused_port()}"
    lost = await backend(counting_app(hits, "lost", reset=True))
    good = await backend(counting_app(hits, "good", reset=False))
    first, second = (dead, lost) if order == "refused-then-lost" else (lost, dead)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [first, second, good], "max_queue": 0}]
    )
    proxy._gates["a"].rng = InOrder()
    with capture_logs() as logs:
        async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
            assert (r.status, await r.text()) == (200, "good")
    assert hits == ["lost", "good"]
    tried = [
        e["machine"] for e in logs if e["event"] in ("machine_unreachable", "request_replayed")
    ]
    assert tried == [first, second]


async def test_a_get_whose_machine_sent_a_1xx_is_not_replayed(
    raw_backend: RawBackend, start_proxy: StartProxy
) -> None:
    """The client heard from the machine (an Early Hints relayed) before it reset: the
    request is not sent again (nginx's rule too: only while nothing went to the client)."""
    hits: list[str] = []

    def hinting(name: str) -> StreamHandler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            hits.append(name)
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
            await writer.drain()
            writer.transport.abort()

        return handler

    backends = [await raw_backend(hinting("x")), await raw_backend(hinting("y"))]
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": backends}])
    reply = await raw(proxy.port, b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 103 Early Hints\r\n")
    assert b"\r\n\r\nHTTP/1.1 502 Bad Gateway\r\n" in reply
    assert len(hits) == 1


def breaks_once(hits: list[str], name: str, *, mid_body: bool) -> web.Application:
    """A machine that drops its first connection (before the head, or mid-body), then
    answers as usual: the drop looks like a crash, the machine is alive."""

    calls = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        hits.append(name)
        if calls == 1 and request.transport is not None:
            if mid_body:
                resp = web.StreamResponse()
                resp.enable_chunked_encoding()
                await resp.prepare(request)
                await resp.write(b"part of it")
            request.transport.abort()
            return web.Response()
        return web.Response(text=name)

    app = web.Application()
    app.router.add_route("*", "/", handler)
    return app


@pytest.mark.parametrize("mid_body", [False, True], ids=["before_head", "mid_body"])
async def test_a_machine_that_drops_a_connection_is_skipped_while_another_serves(
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
    mid_body: bool,
) -> None:
    """A machine whose process dies resets its connections a moment before the kernel
    closes its listening socket: a request sent in that moment is lost, and one with a
    body may not be replayed. So a machine that dropped a connection gets no request for the backoff
    while the app has another one (its idle pooled connections are closed too)."""
    hits: list[str] = []
    broken = await backend(breaks_once(hits, "broken", mid_body=mid_body))
    other = await backend(counting_app(hits, "other", reset=False))
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [broken, other]}],
        unhealthy_backoff_s=60,
    )
    while "broken" not in hits:  # until the balancer tried the broken one
        with contextlib.suppress(aiohttp.ClientPayloadError):
            async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
                await r.read()
    hits.clear()
    for _ in range(10):
        async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
            assert r.status == 200
            assert await r.text() == "other"
    assert hits == ["other"] * 10
    assert [u.id for u in fleet.app("a").routable()] == [other]


async def test_the_last_machine_keeps_its_traffic_after_dropping_a_connection(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    """Alone in its app, a machine that dropped one connection is not skipped: the next
    request goes to it at once (skipping it would hold every request of the app). (The
    dropped one a POST with a body, not sent again: a GET would be, to the same machine.)"""
    hits: list[str] = []
    only = await backend(breaks_once(hits, "only", mid_body=False))
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [only]}], unhealthy_backoff_s=60
    )
    async with session.post(url(proxy), headers={"Host": "a.test"}, data=b"x") as r:
        assert r.status == 502
    async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
        assert r.status == 200
        assert await r.text() == "only"
    assert hits == ["only", "only"]


async def test_upstream_timeout_is_504(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    slow = Blocking()
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(slow.app())]}],
        upstream_timeout_s=0.2,
    )
    async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
        assert r.status == 504
        assert await r.text() == "the machine did not answer in time\n"
    assert fleet.app("a").in_flight == 0
    slow.release.set()
