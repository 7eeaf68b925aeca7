"""Holding requests while the control path wakes a machine (a fake waker stands in for it)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs
from testkit import free_port, until

from autoscaler.config import ProxySettings, Settings
from autoscaler.control.view import FleetView, MachineInfo
from autoscaler.metrics import Metrics
from autoscaler.proxy.server import MAX_ATTEMPTS, ProxyServer

from .conftest import Backend, StartProxy, url
from .helpers import answer_of, status_of, text_app


class FakeWaker:
    """Flips the app's machine to started when released; counts calls and cancellations.
    Like the controller, it names the boot it makes (``AppView.waking``) once it has
    chosen, at once unless ``chooses`` is false (still reading the app's machines, say)."""

    def __init__(self, fleet: FleetView, kind: str = "start", *, chooses: bool = True) -> None:
        self.fleet = fleet
        self.kind = kind
        self.chooses = chooses
        self.calls = 0
        self.cancelled = False
        self.release = asyncio.Event()

    async def __call__(self, app: str) -> str:
        self.calls += 1
        if self.chooses and self.kind != "none":
            self.fleet.app(app).waking = self.kind
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        self.fleet.app(app).set_state("m1", "started")
        return self.kind


async def sleeping_app(
    fleet: FleetView, backend: Backend, waker: FakeWaker, state: str = "suspended"
) -> None:
    """App "w": one machine in ``state`` whose server answers "awake", woken by ``waker``
    ("drained": started, under a drain's cordon of ours)."""
    host, _, port = (await backend(text_app("awake"))).partition(":")
    drained = state == "drained"
    info = MachineInfo(
        "m1", host, int(port), "started" if drained else state, drained, cordoned_by_us=drained
    )
    fleet.app("w").set_machines([info])
    fleet.set_waker(waker)


async def started_machine(fleet: FleetView, start_proxy: StartProxy, port: int) -> ProxyServer:
    """App "w": one machine the API calls started, on ``port`` of 127.0.0.1, whose wakes
    find it so ("none"); a request waits for it up to 30 s, skipping it 0.05 s after a
    refusal."""
    fleet.app("w").set_machines([MachineInfo("m1", "127.0.0.1", port, "started", False)])
    proxy = await start_proxy(
        [{"name": "w", "hosts": ["w.test"], "wake_timeout_s": 30}], unhealthy_backoff_s=0.05
    )
    waker = FakeWaker(fleet, "none")
    waker.release.set()
    fleet.set_waker(waker)
    return proxy


async def test_requests_wait_for_one_wake_and_say_how_they_were_served(
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
    metrics: Metrics,
) -> None:
    waker = FakeWaker(fleet, "resume")
    await sleeping_app(fleet, backend, waker)
    proxy = await start_proxy([{"name": "w", "hosts": ["w.test"]}])
    view = fleet.app("w")

    async def get() -> tuple[int, str, str]:
        async with session.get(url(proxy), headers={"Host": "w.test"}) as r:
            return r.status, await r.text(), r.headers["Fly-Autoscaler-Wake"]

    tasks = [asyncio.create_task(get()) for _ in range(5)]
    # The wake is a task of its own: it may first run after the last request is queued.
    await until(lambda: view.queued == 5 and waker.calls > 0)
    assert waker.calls == 1  # one wake however many wait
    assert metrics.registry.get_sample_value("autoscaler_queued_requests", {"app": "w"}) == 5
    waker.release.set()
    assert await asyncio.gather(*tasks) == [(200, "awake", "resume")] * 5
    assert view.queued == 0
    assert (
        metrics.registry.get_sample_value(
            "autoscaler_requests_total", {"app": "w", "code": "200", "wake": "resume"}
        )
        == 5
    )
    # Once awake, requests pass straight through.
    assert await get() == (200, "awake", "none")
    assert waker.calls == 1


async def test_wake_timeout_gives_504_and_leaves_the_wake_running(
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
    metrics: Metrics,
) -> None:
    waker = FakeWaker(fleet)
    await sleeping_app(fleet, backend, waker, "stopped")
    proxy = await start_proxy([{"name": "w", "hosts": ["w.test"], "wake_timeout_s": 0.3}])
    async with session.get(url(proxy), headers={"Host": "w.test"}) as r:
        assert r.status == 504
        assert await r.text() == "timed out after 0.3s waiting for a machine to wake\n"
    assert fleet.app("w").queued == 0
    assert (
        metrics.registry.get_sample_value(
            "autoscaler_queue_rejections_total", {"app": "w", "reason": "wake_timeout"}
        )
        == 1
    )
    assert waker.calls == 1
    assert not waker.cancelled
    waker.release.set()
    await until(lambda: bool(fleet.app("w").routable()))


class FailingWaker(FakeWaker):
    """Every wake fails (the Machines API refuses, say): nothing ever comes up."""

    async def __call__(self, app: str) -> str:
        self.calls += 1
        raise RuntimeError("the start failed")


@pytest.mark.parametrize("how", ["failing", "too-slow"])
async def test_a_request_whose_wake_never_came_up_says_so(
    how: str,
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
    metrics: Metrics,
) -> None:
    """Its 504 is counted and logged with wake "failed" (README's metrics table,
    docs/logs.md): "none" says that no wake was needed, which would hide a dead app's
    requests among those a running machine was too busy for."""
    waker = FailingWaker(fleet) if how == "failing" else FakeWaker(fleet)
    await sleeping_app(fleet, backend, waker, "stopped")
    proxy = await start_proxy([{"name": "w", "hosts": ["w.test"], "wake_timeout_s": 0.3}])
    with capture_logs() as logs:
        async with session.get(url(proxy), headers={"Host": "w.test"}) as r:
            assert r.status == 504
            assert r.headers["Fly-Autoscaler-Wake"] == "failed"
    assert waker.calls >= 1
    assert [e["wake"] for e in logs if e["event"] == "request"] == ["failed"]
    count = metrics.registry.get_sample_value
    assert count("autoscaler_requests_total", {"app": "w", "code": "504", "wake": "failed"}) == 1
    assert count("autoscaler_requests_total", {"app": "w", "code": "504", "wake": "none"}) is None
    waker.release.set()


async def test_client_disconnecting_while_held_leaves_queue_not_the_wake(
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
    metrics: Metrics,
) -> None:
    waker = FakeWaker(fleet, "start")
    await sleeping_app(fleet, backend, waker)
    proxy = await start_proxy([{"name": "w", "hosts": ["w.test"]}])
    view = fleet.app("w")

    gone = asyncio.create_task(status_of(session, url(proxy), "w.test"))
    stays = None
    await until(lambda: view.queued == 1)
    stays = asyncio.create_task(status_of(session, url(proxy), "w.test"))
    await until(lambda: view.queued == 2)
    gone.cancel()  # closes that client's connection
    await until(lambda: view.queued == 1)
    assert metrics.registry.get_sample_value("autoscaler_queued_requests", {"app": "w"}) == 1
    assert not waker.cancelled
    waker.release.set()
    assert await stays == 200
    assert view.queued == 0
    assert view.in_flight == 0
    assert waker.calls == 1
    # The client that left is counted, as 499 (README's metrics table), with the wake it
    # gave up on, as the one that stayed is served with it.
    count = metrics.registry.get_sample_value
    assert count("autoscaler_requests_total", {"app": "w", "code": "499", "wake": "start"}) == 1
    assert count("autoscaler_requests_total", {"app": "w", "code": "200", "wake": "start"}) == 1
    assert count("autoscaler_requests_total", {"app": "w", "code": "499", "wake": "none"}) is None


@pytest.mark.parametrize(
    ("waker_does", "state", "wake"),
    [
        ("not chosen yet", "suspended", "resume"),
        ("not chosen yet", "stopped", "start"),
        ("not chosen yet", "drained", "uncordon"),
        ("fail", "stopped", "failed"),
    ],
)
async def test_a_client_that_gives_up_during_a_wake_is_told_from_a_plain_499(
    waker_does: str,
    state: str,
    wake: str,
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
    metrics: Metrics,
) -> None:
    """Its 499 was counted and logged with wake "none", as if no wake had been needed:
    dashboards could not tell clients who gave up on a cold start from any other 499.
    Before the waker has chosen, the app's machines name the boot (a resume if one is
    suspended), or a drain of ours it takes back ("uncordon": named "start" before, a
    guess from machines none of which needed a boot); a wake that brought nothing up is
    "failed"."""
    waker = FailingWaker(fleet) if waker_does == "fail" else FakeWaker(fleet, chooses=False)
    await sleeping_app(fleet, backend, waker, state)
    proxy = await start_proxy([{"name": "w", "hosts": ["w.test"], "wake_timeout_s": 30}])
    view = fleet.app("w")
    with capture_logs() as logs:
        gone = asyncio.create_task(status_of(session, url(proxy), "w.test"))
        await until(lambda: view.queued == 1 and waker.calls == 1)
        gone.cancel()  # closes that client's connection
        await until(lambda: view.queued == 0)  # its line is written as it leaves the queue
    assert [(e["status"], e["wake"]) for e in logs if e["event"] == "request"] == [(499, wake)]
    count = metrics.registry.get_sample_value
    assert count("autoscaler_requests_total", {"app": "w", "code": "499", "wake": wake}) == 1
    assert not waker.cancelled
    waker.release.set()


@pytest.mark.parametrize("shed_by", ["reload", "stop"])
async def test_a_request_shed_during_a_wake_is_labelled_with_that_wake(
    shed_by: str,
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
    metrics: Metrics,
) -> None:
    """Its 503 (a reload removed its app, a graceful stop shed it) was counted and logged
    with wake "none", as if no wake had been needed; now as a client that left is."""
    waker = FakeWaker(fleet, chooses=False)  # never released: the wake goes on
    await sleeping_app(fleet, backend, waker, "suspended")
    apps = [{"name": "w", "hosts": ["w.test"], "wake_timeout_s": 30}]
    proxy = await start_proxy(apps, shutdown_timeout_s=1.0)
    view = fleet.app("w")
    with capture_logs() as logs:
        held = asyncio.create_task(status_of(session, url(proxy), "w.test"))
        await until(lambda: view.queued == 1 and waker.calls == 1)
        if shed_by == "reload":
            proxy.update_settings(Settings(proxy=ProxySettings(listen="127.0.0.1:8080"), apps=[]))
        else:
            await proxy.stop()
        assert await held == 503
    assert [(e["status"], e["wake"]) for e in logs if e["event"] == "request"] == [(503, "resume")]
    if shed_by == "stop":  # (a removed app's series are forgotten with it)
        count = metrics.registry.get_sample_value
        assert (
            count("autoscaler_requests_total", {"app": "w", "code": "503", "wake": "resume"}) == 1
        )
    waker.release.set()


async def test_machine_refusing_after_wake_is_retried_once_routable_again(
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
) -> None:
    """A machine the API calls started whose server is not listening yet (booting): the
    request waits, retried past MAX_ATTEMPTS refusals, and gets through once it listens."""
    port = free_port()
    proxy = await started_machine(fleet, start_proxy, port)

    with capture_logs() as logs:
        task = asyncio.create_task(status_of(session, url(proxy), "w.test"))
        await until(lambda: sum(e["event"] == "machine_unreachable" for e in logs) > MAX_ATTEMPTS)
    assert not task.done()  # still held, not failed
    runner = web.AppRunner(text_app("awake"))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        assert await task == 200
    finally:
        await runner.cleanup()


async def test_a_request_held_again_after_refusals_gets_the_503_of_its_apps_removal(
    start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    """Held again after its machine refused it, a request shed by the app's removal got
    502 "no machine reachable" where every other held request gets a 503 to retry."""
    port = free_port()
    fleet.app("w").set_machines([MachineInfo("m1", "127.0.0.1", port, "started", False)])
    apps = [{"name": "w", "hosts": ["w.test"], "wake_timeout_s": 30}]
    proxy = await start_proxy(apps, unhealthy_backoff_s=0.05)
    waker = FakeWaker(fleet, "none")
    waker.release.set()
    fleet.set_waker(waker)
    with capture_logs() as logs:
        task = asyncio.create_task(
            session.get(url(proxy), headers={"Host": "w.test"}, raise_for_status=False)
        )
        await until(lambda: sum(e["event"] == "machine_unreachable" for e in logs) > MAX_ATTEMPTS)
    assert not task.done()
    proxy.update_settings(Settings(proxy=ProxySettings(listen="127.0.0.1:8080"), apps=[]))
    async with await task as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert "removed from the configuration" in await resp.text()


async def test_a_client_leaving_a_request_its_machine_sent_back_is_told_the_wake(
    start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView, metrics: Metrics
) -> None:
    """Refused by the one machine up (no other free), a request waits again, for a wake
    of the suspended one. That wait named no wake for the request (``Gate.acquire``
    without the request's context): a client that left then was counted and logged
    with wake "none", as if its request had needed none."""
    fleet.app("w").set_machines(
        [
            MachineInfo("m1", "127.0.0.1", free_port(), "started", False),
            MachineInfo("m2", "127.0.0.1", free_port(), "suspended", False),
        ]
    )
    apps = [{"name": "w", "hosts": ["w.test"], "wake_timeout_s": 30}]
    proxy = await start_proxy(apps, unhealthy_backoff_s=60)
    waker = FakeWaker(fleet, chooses=False)  # never released: the wake goes on
    fleet.set_waker(waker)
    view = fleet.app("w")
    with capture_logs() as logs:
        gone = asyncio.create_task(status_of(session, url(proxy), "w.test"))
        await until(lambda: view.queued == 1 and waker.calls == 1, what="held for a wake")
        assert any(e["event"] == "machine_unreachable" for e in logs)  # sent back
        gone.cancel()  # closes that client's connection
        await until(lambda: view.queued == 0)  # its line is written as it leaves the queue
    assert [(e["status"], e["wake"]) for e in logs if e["event"] == "request"] == [(499, "resume")]
    count = metrics.registry.get_sample_value
    assert count("autoscaler_requests_total", {"app": "w", "code": "499", "wake": "resume"}) == 1
    waker.release.set()


async def test_a_request_held_while_no_waker_is_installed_asks_the_one_installed_next(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    """A scaled app may have no waker for a moment (a leader stepping down stops its
    controller before it installs the follower's wake). A request held then found nothing
    to ask, and its gate waited for a change of the app's machines that nothing made: the
    waker installed next was never asked, and the request got its wake timeout's 504."""
    host, _, port = (await backend(text_app("awake"))).partition(":")
    fleet.app("w").set_machines([MachineInfo("m1", host, int(port), "suspended", False)])
    proxy = await start_proxy([{"name": "w", "hosts": ["w.test"], "wake_timeout_s": 5}])
    view = fleet.app("w")

    async def get() -> tuple[int, str]:
        async with session.get(url(proxy), headers={"Host": "w.test"}) as r:
            return r.status, r.headers["Fly-Autoscaler-Wake"]

    held = asyncio.create_task(get())
    await until(lambda: view.queued == 1, what="the request held")
    waker = FakeWaker(fleet, "resume")
    waker.release.set()
    fleet.set_waker(waker)
    assert await held == (200, "resume")
    assert waker.calls == 1


async def test_static_app_with_every_backend_down_gets_its_502_at_its_wake_timeout(
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
    metrics: Metrics,
    refused_port: Callable[[], int],
) -> None:
    """A static app's request whose backend refused it is held for the backend's restart
    (it got its 502 at once; the next request was held all the same), with no wake to
    ask: it gets the same 502, and counts as unreachable, once ``wake_timeout_s`` ran out
    with nothing listening."""
    backend = f"127.0.0.1:{refused_port()}"
    proxy = await start_proxy(
        [{"name": "s", "hosts": ["s.test"], "backends": [backend], "wake_timeout_s": 1}]
    )
    view = fleet.app("s")

    get = functools.partial(answer_of, session, url(proxy), "s.test")
    task = asyncio.create_task(get())
    await until(lambda: task.done() or view.queued == 1, what="the request held")
    assert not task.done()  # held, not answered 502 at once
    assert await task == (502, "no machine of this app is reachable\n")
    count = metrics.registry.get_sample_value
    assert count("autoscaler_proxy_errors_total", {"app": "s", "reason": "unreachable"}) == 1
    assert not count("autoscaler_queue_rejections_total", {"app": "s", "reason": "wake_timeout"})
    assert count("autoscaler_requests_total", {"app": "s", "code": "502", "wake": "none"}) == 1


class SlowReturnWaker(FakeWaker):
    """Makes the machine routable, then takes a while to return its answer; with
    ``announce``, says at once how it brings the machine up (``view.waking``), as the
    controller's waker does once it has chosen."""

    def __init__(self, fleet: FleetView, kind: str, announce: bool = False) -> None:
        super().__init__(fleet, kind)
        self.announce = announce
        self.answer = asyncio.Event()

    async def __call__(self, app: str) -> str:
        self.calls += 1
        if self.announce:
            self.fleet.app(app).waking = self.kind
        await self.release.wait()
        view = self.fleet.app(app)  # started, uncordoned
        view.set_machines(
            MachineInfo(u.id, u.host, u.port, "started", False) for u in view.upstreams.values()
        )
        await self.answer.wait()
        return self.kind


@pytest.mark.parametrize("waker_does", ["announce", "answer meanwhile", "not answer"])
async def test_a_request_handed_a_machine_before_the_waker_returns(
    waker_does: str,
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
    metrics: Metrics,
) -> None:
    """A request handed a routable machine goes to it at once, however long its waker
    takes to return (the machine it boots may still be booting while another one serves).
    Until the waker had said how it brings a machine up, the request waited for its
    answer, with the machine up, up to its wake_timeout_s. It is named by the boot under
    way (``view.waking``) once the waker has chosen; else by the waker's answer if that
    came before the response's head; else as far as known: by how the machine that
    serves it came up ("start", not known better here). One that was up before (its
    cordon lifted: "uncordon" if it was our drain's, else "none") is the next test's."""
    reached = asyncio.Event()
    go = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        reached.set()
        await go.wait()
        return web.Response(text="awake")

    machine = web.Application()
    machine.router.add_get("/", handler)
    host, _, port = (await backend(machine)).partition(":")
    waker = SlowReturnWaker(fleet, "resume", announce=waker_does == "announce")
    fleet.app("w").set_machines([MachineInfo("m1", host, int(port), "suspended", False)])
    fleet.set_waker(waker)
    proxy = await start_proxy([{"name": "w", "hosts": ["w.test"], "wake_timeout_s": 60}])
    view = fleet.app("w")

    async def get() -> tuple[int, str]:
        async with session.get(url(proxy), headers={"Host": "w.test"}) as r:
            return r.status, r.headers["Fly-Autoscaler-Wake"]

    with capture_logs() as logs:
        waiting = asyncio.create_task(get())
        await until(lambda: view.queued == 1)
        waker.release.set()
        await until(reached.is_set, what="the request at its machine, the waker not returned")
        if waker_does == "answer meanwhile":
            waker.answer.set()
            await until(lambda: not fleet.asked("w"), what="the wake over")
        go.set()
        wake = "start" if waker_does == "not answer" else "resume"
        assert await waiting == (200, wake)
    assert [e["wake"] for e in logs if e["event"] == "request"] == [wake]
    count = metrics.registry.get_sample_value
    assert count("autoscaler_requests_total", {"app": "w", "code": "200", "wake": wake}) == 1
    waker.answer.set()


@pytest.mark.parametrize("ours", [True, False], ids=["our-drain", "another-party-s-cordon"])
async def test_a_drain_taken_back_is_named_uncordon_in_the_header_as_in_the_line(
    ours: bool,
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
    metrics: Metrics,
) -> None:
    """A request held while the app's one machine, up, is cordoned; the cordon is lifted
    and the request goes to it before the waker returns, whose answer comes after the
    response's head went out and before its end. Our drain's cordon (a drain taken back,
    "uncordon" by the waker) got the header "none" (the machine was up before the wake)
    and the line and count "uncordon": now "uncordon" in all three. Another party's
    cordon lifted while our wake runs is no wake of ours: "none" in all three."""
    go = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)  # the head, before the waker answers
        await go.wait()
        await response.write(b"awake")
        return response

    machine = web.Application()
    machine.router.add_get("/", handler)
    host, _, port = (await backend(machine)).partition(":")
    waker = SlowReturnWaker(fleet, "uncordon" if ours else "none")
    info = MachineInfo("m1", host, int(port), "started", True, cordoned_by_us=ours)
    fleet.app("w").set_machines([info])
    fleet.set_waker(waker)
    proxy = await start_proxy([{"name": "w", "hosts": ["w.test"], "wake_timeout_s": 60}])
    view = fleet.app("w")

    async def get() -> tuple[int, str, str]:
        async with session.get(url(proxy), headers={"Host": "w.test"}) as r:
            header = r.headers["Fly-Autoscaler-Wake"]
            waker.answer.set()
            await until(lambda: not fleet.asked("w"), what="the wake over")
            go.set()
            return r.status, header, await r.text()

    wake = "uncordon" if ours else "none"
    with capture_logs() as logs:
        waiting = asyncio.create_task(get())
        await until(lambda: view.queued == 1)
        waker.release.set()
        assert await waiting == (200, wake, "awake")
    assert [e["wake"] for e in logs if e["event"] == "request"] == [wake]
    count = metrics.registry.get_sample_value
    assert count("autoscaler_requests_total", {"app": "w", "code": "200", "wake": wake}) == 1


async def test_a_held_request_cancelled_as_it_is_shed_stays_cancelled() -> None:
    """Shed (its app removed) and cancelled (its client gone) in the same turn of the
    loop: the cancellation was swallowed, replaced by the shed's 503, for no one."""
    import random

    from prometheus_client import CollectorRegistry

    from autoscaler.config import AppConfig
    from autoscaler.proxy.gate import AppRemoved, Gate

    fleet = FleetView()
    rng = random.Random(1)  # noqa: S311 - balancing, not secrets
    gate = Gate(AppConfig(name="w"), fleet, Metrics(CollectorRegistry()), rng)
    held = asyncio.create_task(gate.acquire(30))
    await until(lambda: fleet.app("w").queued == 1, what="the request held")
    gate.shed(AppRemoved)
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    assert fleet.app("w").queued == 0
    await gate.close()


async def test_a_get_lost_by_the_apps_last_machine_is_held_for_its_restart(
    start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    """The app's only machine resets a GET it received and dies (its port refuses): the
    GET is sent again, its connect refused, and it is held like any request of an app
    with no routable machine, then served once the machine listens again. It got a 502
    before (a request the machine received was never sent again)."""
    lost = asyncio.Event()

    async def dying(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        dead.close()  # the process dies: its port refuses from now on
        writer.transport.abort()
        lost.set()

    dead = await asyncio.start_server(dying, "127.0.0.1", 0)
    port = dead.sockets[0].getsockname()[1]
    proxy = await started_machine(fleet, start_proxy, port)
    runner = web.AppRunner(text_app("back"))
    await runner.setup()
    try:
        with capture_logs() as logs:
            task = asyncio.create_task(session.get(url(proxy), headers={"Host": "w.test"}))
            await lost.wait()
            await dead.wait_closed()
            await until(
                lambda: task.done() or any(e["event"] == "machine_unreachable" for e in logs)
            )
            assert not task.done()  # held, not answered 502
            await web.TCPSite(runner, "127.0.0.1", port).start()  # restarted
            async with await task as r:
                assert (r.status, await r.text()) == (200, "back")
        assert [e["machine"] for e in logs if e["event"] == "request_replayed"] == ["m1"]
    finally:
        dead.close()
        await runner.cleanup()
