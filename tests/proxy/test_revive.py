"""Machines held out because nothing listened come back as soon as something does.

Which hold-outs a listening machine may end is tested on :class:`Health` with a view on a
hand-stepped clock; the watch itself (:class:`Reviver`) against real sockets on loopback,
and end to end through the proxy with a static app whose one backend restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from testkit import free_port, until

from autoscaler.control.view import FleetView, MachineInfo
from autoscaler.metrics import Metrics
from autoscaler.proxy import health
from autoscaler.proxy.health import Health
from autoscaler.proxy.revive import Reviver

from .conftest import StartProxy, url
from .helpers import answer_of, text_app


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _fleet(*ports: int, clock: Clock | None = None) -> FleetView:
    fleet = FleetView(clock or Clock())
    fleet.app("a").set_machines(
        [
            MachineInfo(f"m{n}", "127.0.0.1", port, "started", False)
            for n, port in enumerate(ports, 1)
        ]
    )
    return fleet


def _health(fleet: FleetView, eject_after: int = 1) -> Health:
    return Health(fleet, Metrics(CollectorRegistry()), eject_after=eject_after, base_s=60.0)


def test_what_a_listening_machine_may_bring_back() -> None:
    clock = Clock()
    fleet = _fleet(1001, 1002, clock=clock)
    view = fleet.app("a")
    m1, m2 = view.upstreams["m1"], view.upstreams["m2"]
    h = _health(fleet)
    assert not h.revivable("a", m1)  # in rotation: nothing to bring back

    view.skip(m1, 2.0)  # a refused connection
    assert h.revivable("a", m1)  # a skip, whatever else serves
    clock.now += 2.0
    assert not h.revivable("a", m1)  # over already

    # Ejected for refused connections: only while nothing else of the app is routable.
    h.failed("a", m1, health.CONNECT)
    assert not h.revivable("a", m1)
    h.failed("a", m2, health.RESET)
    assert h.revivable("a", m1)
    assert h.revivable("a", m2)

    # Not for what a connect cannot tell: a timeout (a hung process accepts connections).
    h.records.clear()
    for up in (m1, m2):
        view.mark_unhealthy(up, 0.0)
    h.failed("a", m1, health.TIMEOUT)
    h.failed("a", m2, health.BAD_RESPONSE)
    assert not h.revivable("a", m1)
    assert not h.revivable("a", m2)

    # Nor a machine the controller holds out, one that is not started, or one gone.
    h.records.clear()
    for up in (m1, m2):
        view.mark_unhealthy(up, 0.0)
    view.skip(m1, 2.0)
    view.hold_out(m1, True)
    assert not h.revivable("a", m1)
    view.hold_out(m1, False)
    view.set_state("m1", "stopping")
    assert not h.revivable("a", m1)
    view.set_state("m1", "started")
    view.skip(m1, 2.0)
    assert h.revivable("a", m1)
    view.set_machines([MachineInfo("m2", "127.0.0.1", 1002, "started", False)])
    assert not h.revivable("a", m1)


def test_a_revived_ejection_puts_the_machine_on_probation() -> None:
    clock = Clock()
    fleet = _fleet(1001, clock=clock)
    view = fleet.app("a")
    [m1] = view.upstreams.values()
    h = _health(fleet)
    h.failed("a", m1, health.CONNECT)
    assert view.routable() == []
    h.revived("a", m1)
    assert view.routable() == [m1]
    assert h.took("a", m1)  # the next request is its probe
    h.failed("a", m1, health.CONNECT)  # which fails: out for twice as long
    assert [e["remaining_s"] for e in h.report()] == [120.0]


# --- the watch, against real sockets -------------------------------------------------


@contextlib.asynccontextmanager
async def listening(port: int) -> AsyncIterator[None]:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def reviving(fleet: FleetView, h: Health) -> AsyncIterator[Reviver]:
    reviver = Reviver(fleet, h, connect_timeout_s=1.0)
    try:
        yield reviver
    finally:
        await reviver.close()


async def test_a_skipped_machine_is_back_once_it_listens() -> None:
    port = free_port()
    fleet = _fleet(port)
    view = fleet.app("a")
    [m1] = view.upstreams.values()
    async with reviving(fleet, _health(fleet)) as reviver:
        view.skip(m1, 60.0)  # a refused connection (a long skip: the watch must end it)
        reviver.refused("a", m1, port)
        await asyncio.sleep(0.2)  # refused meanwhile: still out
        assert view.routable() == []
        assert m1 in reviver.watching
        async with listening(port):
            await until(lambda: view.routable() == [m1], what="the skip ended")
        await until(lambda: not reviver.watching, what="the watch ended")


async def test_an_ejection_for_resets_ends_only_if_the_process_was_gone() -> None:
    port = free_port()
    fleet = _fleet(port)
    view = fleet.app("a")
    [m1] = view.upstreams.values()
    h = _health(fleet)
    async with reviving(fleet, h) as reviver, listening(port):
        # Reset, yet still listening: not a process that died; the ejection stays.
        h.failed("a", m1, health.RESET)
        reviver.lost("a", m1, port)
        await until(lambda: not reviver.watching, what="the watch gave up")
        assert view.routable() == []
    async with reviving(fleet, h) as reviver:
        # Gone (refused), then back: the ejection ends, on probation.
        reviver.lost("a", m1, port)
        await asyncio.sleep(0.2)
        assert view.routable() == []
        async with listening(port):
            await until(lambda: view.routable() == [m1], what="the ejection ended")
        assert h.took("a", m1)


async def test_closing_the_reviver_ends_its_watches() -> None:
    port = free_port()
    fleet = _fleet(port)
    [m1] = fleet.app("a").upstreams.values()
    reviver = Reviver(fleet, _health(fleet), connect_timeout_s=1.0)
    fleet.app("a").skip(m1, 60.0)
    reviver.refused("a", m1, port)
    [task] = reviver.watching.values()
    await reviver.close()
    assert task.cancelled()
    assert reviver.watching == {}


async def serve_back(port: int) -> web.AppRunner:
    """The backend's process restarted: it listens on ``port`` again, answering "back"."""
    runner = web.AppRunner(text_app("back"))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
    await site.start()
    return runner


async def test_a_static_apps_request_that_finds_its_backend_down_waits_for_its_restart(
    start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    """The app's one backend is down (Fly's restart policy will bring it back). The
    request that found it so got a 502 at once, while one arriving just after was held
    (the backend out of rotation) and served once it listened: both are held now, and
    both served by the restarted backend (a 60 s skip: the watch ends it)."""
    port = free_port()
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [f"127.0.0.1:{port}"]}],
        unhealthy_backoff_s=60,
    )
    view = fleet.app("a")

    get = functools.partial(answer_of, session, url(proxy), "a.test")
    first = asyncio.create_task(get())
    await until(lambda: first.done() or view.queued == 1, what="the first request held")
    assert not first.done()  # not its 502
    second = asyncio.create_task(get())
    await until(lambda: view.queued == 2, what="the second request held behind it")
    runner = await serve_back(port)
    try:
        assert await asyncio.gather(first, second) == [(200, "back"), (200, "back")]
    finally:
        await runner.cleanup()


async def test_a_static_backend_that_restarts_is_served_again_before_its_ejection_ends(
    start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    # One backend, down: a request finds nothing listening and ejects it for 60 s; it is
    # held meanwhile. It comes back up a moment later and is served again at once (the
    # held request first), not in a minute.
    port = free_port()
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [f"127.0.0.1:{port}"]}],
        eject_after=1,
        eject_base_s=60,
    )
    view = fleet.app("a")

    get = functools.partial(answer_of, session, url(proxy), "a.test")
    held = asyncio.create_task(get())
    await until(lambda: held.done() or view.queued == 1, what="the request held")
    assert not held.done()  # not its 502
    [record] = proxy.health.report()
    assert record["reason"] == "connect"
    assert isinstance(record["remaining_s"], float)
    assert record["remaining_s"] > 50  # out for a minute, unless something brings it back

    runner = await serve_back(port)
    try:
        assert await held == (200, "back")  # its probe
        await until(lambda: bool(view.routable()), what="the backend back in rotation")
        assert await get() == (200, "back")
        assert proxy.health.report() == []  # its probe went well: failures forgotten
    finally:
        await runner.cleanup()
