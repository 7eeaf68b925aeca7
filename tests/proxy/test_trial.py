"""A machine back from its skip (or its ejection) is tried by one request before the rest.

A machine that refused a connection is skipped for ``unhealthy_backoff_s``; when the skip
ends it is on trial: the first request handed to it is its probe, and no other goes to it
until the probe's connection is made (then it takes requests up to its limit again) or
fails (then it is skipped again). The view runs on a hand-stepped clock, so the test says
when a skip ends; the machines are real sockets on loopback: a port bound and not
listening refuses, and listens once the test serves on it.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from testkit import until

from autoscaler.config import AppConfig
from autoscaler.control.view import AppView, FleetView, MachineInfo, Upstream
from autoscaler.metrics import Metrics
from autoscaler.proxy import health, revive
from autoscaler.proxy.gate import Gate
from autoscaler.proxy.health import Health
from autoscaler.proxy.server import ProxyServer

from .conftest import StartProxy, url
from .helpers import unanswering_port


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Ctx:
    """What the gate marks on a request (``Held``): a probe's ``trial``."""

    def __init__(self) -> None:
        self.wake = "none"
        self.wake_pending: asyncio.Task[str] | None = None
        self.trial = False


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fleet(clock: Clock) -> FleetView:
    """The proxy's fleet view (``start_proxy`` takes this one) on the hand-stepped clock."""
    return FleetView(clock)


@pytest.fixture(autouse=True)
def no_revive_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The watch of refused machines (proxy/revive.py) would end a skip as soon as the
    machine listens, before any probe: here only the clock ends it."""
    monkeypatch.setattr(revive, "FIRST_S", 3600.0)
    monkeypatch.setattr(revive, "EVERY_S", 3600.0)


@pytest.fixture
def machine_socket() -> Iterator[socket.socket]:
    """A loopback port bound and not listening: it refuses until served on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


@asynccontextmanager
async def serving(sock: socket.socket, order: list[str]) -> AsyncIterator[None]:
    """Serve on ``sock``: each request's ``id`` (its target's query) joins ``order``, and
    is answered 200 at once, on a connection kept alive."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1].decode()
                order.append(target.partition("id=")[2])
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, sock=sock)
    try:
        yield
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


def _refusals(logs: list[dict[str, object]]) -> int:
    return sum(1 for e in logs if e["event"] == "machine_unreachable")


async def get(session: aiohttp.ClientSession, proxy: ProxyServer, app: str, i: int) -> int:
    """Request ``i`` (its target's ``id``, which ``serving`` records) to ``app`` through
    the proxy; its status."""
    async with session.get(url(proxy, f"/?id={i}"), headers={"Host": f"{app}.test"}) as r:
        await r.read()
        return r.status


def _static_app(port: int) -> list[dict[str, object]]:
    """App "a": one static backend on ``port`` (no waker: a request waits for it, up to
    its ``wake_timeout_s``)."""
    return [
        {
            "name": "a",
            "hosts": ["a.test"],
            "backends": [f"127.0.0.1:{port}"],
            "wake_timeout_s": 60,
        }
    ]


async def test_a_machine_back_from_its_skip_gets_one_held_request_then_all(
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    clock: Clock,
    fleet: FleetView,
    machine_socket: socket.socket,
) -> None:
    """Four requests held for the one machine, which refused the first: when its skip
    ends while it still refuses, one of them goes and is refused, and the machine is
    skipped again; the other three stay held, sent nowhere. When it listens and its next
    skip ends, the probe connects and the other three follow it at once (handed in
    arrival order, they reach the machine in the order of their connects), all served."""
    port = machine_socket.getsockname()[1]
    proxy = await start_proxy(
        _static_app(port),
        unhealthy_backoff_s=10,
    )
    view = fleet.app("a")
    (up,) = view.upstreams.values()
    gate = proxy._gates["a"]

    order: list[str] = []
    with capture_logs() as logs:
        first = asyncio.create_task(get(session, proxy, "a", 0))
        await until(lambda: _refusals(logs) == 1 and gate.queued == 1)  # skipped, held
        rest = [asyncio.create_task(get(session, proxy, "a", i)) for i in (1, 2, 3)]
        await until(lambda: gate.queued == 4)
        assert view.routable() == []

        clock.now += 10  # the skip ends; the machine still refuses
        view.notify()
        await until(lambda: _refusals(logs) >= 2 and gate.queued == 4 and up.in_flight == 0)
        tried = _refusals(logs)
        assert tried == 2, f"{tried} refusals"  # one connect tried it, not four
        assert view.routable() == []  # skipped again
        assert not any(t.done() for t in (first, *rest))

        async with serving(machine_socket, order):
            clock.now += 10  # the next skip ends: it listens now
            view.notify()
            statuses = await asyncio.gather(first, *rest)
    assert statuses == [200, 200, 200, 200]
    assert sorted(order) == ["0", "1", "2", "3"]
    assert _refusals(logs) == 2
    assert not any(e["event"] == "machine_listening" for e in logs)  # the probe, not the watch
    assert view.routable() == [up]
    assert not up.trial
    assert not up.probing


async def test_fresh_requests_do_not_pass_a_probe_under_way(
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    clock: Clock,
    fleet: FleetView,
) -> None:
    """With nobody held, requests that arrive once the skip ended take the fast path: the
    first is the machine's probe, and those after it wait in the queue while its connect
    is under way (here it hangs until ``connect_timeout_s``), rather than each trying
    the machine. The probe's connect fails, the machine is skipped again, and they stay
    held."""
    with unanswering_port() as (port, _refuse):
        proxy = await start_proxy(
            _static_app(port),
            unhealthy_backoff_s=10,
            connect_timeout_s=2.0,
        )
        view = fleet.app("a")
        (up,) = view.upstreams.values()
        gate = proxy._gates["a"]
        view.skip(up, 10)  # it failed before (as a refused connect skips it)
        clock.now += 10  # and the skip just ended: nobody is held

        with capture_logs() as logs:
            probe = asyncio.create_task(get(session, proxy, "a", 0))
            await until(lambda: up.in_flight == 1)
            later = [asyncio.create_task(get(session, proxy, "a", i)) for i in (1, 2, 3)]
            await until(lambda: gate.queued == 3)
            assert up.in_flight == 1  # only the probe tries it
            await until(lambda: _refusals(logs) == 1 and gate.queued == 4)
            assert up.in_flight == 0
            assert view.routable() == []  # skipped again
            assert _refusals(logs) == 1
            for task in (probe, *later):
                task.cancel()
            await asyncio.gather(probe, *later, return_exceptions=True)


async def test_the_gate_hands_a_machine_on_trial_to_one_request() -> None:
    """``Gate.try_acquire`` and the pump alike: the first request a machine on trial is
    handed is marked its probe (``trial``), and the machine is not handed to another
    until the probe's connection is made (``AppView.probed``); then it takes requests up
    to its limit again. A probe that connected nowhere leaves it on trial: the next
    request handed it probes it again."""
    clock = Clock()
    fleet = FleetView(clock)
    view = fleet.app("a")
    view.set_machines([MachineInfo("m1", "127.0.0.1", 1, "started", False)])
    (up,) = view.upstreams.values()
    gate = Gate(AppConfig(name="a", hard_limit=10), fleet, Metrics(), random.Random(1))  # noqa: S311
    view.skip(up, 1.0)
    assert up.trial
    clock.now += 1.0

    first = Ctx()
    assert gate.try_acquire(held=first) is up
    assert first.trial
    assert up.probing
    assert gate.try_acquire(held=Ctx()) is None  # the fast path waits for the probe
    held = [Ctx() for _ in range(3)]
    tasks = [asyncio.create_task(gate.acquire(30, h)) for h in held]
    await until(lambda: gate.queued == 3)

    view.probed(up, passed=False)  # the probe left before connecting: still on trial
    await until(lambda: tasks[0].done())
    assert held[0].trial
    assert up.probing
    assert gate.queued == 2
    assert tasks[0].result() == (up, "none")

    view.probed(up, passed=True)  # connected: the others go at once
    await asyncio.gather(*tasks)
    assert not any(h.trial for h in held[1:])
    assert up.in_flight == 4
    assert not up.trial
    assert not up.probing
    for _ in range(4):
        gate.done(up)
    await gate.close()


async def test_an_ejections_probe_goes_alone_and_its_good_answer_lets_the_rest_go() -> None:
    """An ejection puts the machine on trial too: when it ends, the pump hands the one
    request its probe (health's, which waits for the answer, not only the connection) and
    holds the others until the answer is in; a good one lets them all go."""
    clock = Clock()
    fleet = FleetView(clock)
    view = fleet.app("a")
    view.set_machines([MachineInfo("m1", "127.0.0.1", 1, "started", False)])
    (up,) = view.upstreams.values()
    metrics = Metrics(CollectorRegistry())
    verdicts = Health(fleet, metrics, eject_after=1, base_s=5.0)
    gate = Gate(AppConfig(name="a", hard_limit=10), fleet, metrics, random.Random(1))  # noqa: S311
    verdicts.failed("a", up, health.CONNECT)  # ejected for 5 s
    assert view.routable() == []
    held = [Ctx() for _ in range(3)]
    tasks = [asyncio.create_task(gate.acquire(30, h)) for h in held]
    await until(lambda: gate.queued == 3)

    clock.now += 5.0  # the ejection ends
    view.notify()
    await until(lambda: tasks[0].done())
    assert gate.queued == 2  # the others stay held
    assert held[0].trial
    assert verdicts.took("a", up)  # health's probe as well (the proxy's _serve asks)
    gate.probed(up, held[0], passed=False)  # connected; its answer is the verdict
    assert gate.queued == 2
    assert view.routable() == []  # out until the answer (health's probe)

    verdicts.succeeded("a", up)  # a good answer
    await asyncio.gather(*tasks)
    assert not up.trial
    assert up.in_flight == 3
    for _ in range(3):
        gate.done(up)
    await gate.close()


@asynccontextmanager
async def cancelled_at_exit() -> AsyncIterator[list[asyncio.Task[int]]]:
    """The requests' tasks, cancelled if the test leaves before they end (a failure)."""
    tasks: list[asyncio.Task[int]] = []
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _ejected_machine(
    start_proxy: StartProxy, fleet: FleetView, sock: socket.socket
) -> tuple[ProxyServer, AppView, Upstream, Gate]:
    """App "w": one machine the API calls started, on ``sock``'s port (no waker: a
    request waits for the machine, up to its ``wake_timeout_s``), ejected for resets (its
    process died) for ``eject_base_s`` (5 s); a refused connect skips it for 10 s."""
    port = sock.getsockname()[1]
    fleet.app("w").set_machines([MachineInfo("m1", "127.0.0.1", port, "started", False)])
    proxy = await start_proxy(
        [{"name": "w", "hosts": ["w.test"], "wake_timeout_s": 60}],
        unhealthy_backoff_s=10,
        eject_after=1,
        eject_base_s=5,
    )
    view = fleet.app("w")
    (up,) = view.upstreams.values()
    proxy.health.failed("w", up, health.RESET)
    return proxy, view, up, proxy._gates["w"]


async def test_a_machine_restarted_after_its_ejection_boots_with_a_clean_record(
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    clock: Clock,
    fleet: FleetView,
    machine_socket: socket.socket,
) -> None:
    """Ejected for resets, the machine is restarted by the controller (a new process):
    its old ejection is forgotten. While it boots it refuses, and its refusals do not
    count (it started within ``wake_timeout_s``), but each one skips it: three requests
    make one refused connect, and one more when the skip ends (the probe of its trial),
    not one after another for as long as it boots. Once it listens, all are served, and
    the proxy holds nothing against it."""
    proxy, view, up, gate = await _ejected_machine(start_proxy, fleet, machine_socket)
    assert view.routable() == []
    clock.now += 1
    view.set_state("m1", "stopped")  # the controller restarts it
    view.set_state("m1", "started")
    assert view.routable() == [up]

    order: list[str] = []
    with capture_logs() as logs:
        async with cancelled_at_exit() as tasks:
            first = asyncio.create_task(get(session, proxy, "w", 0))
            tasks.append(first)
            await until(lambda: _refusals(logs) >= 1 and gate.queued == 1 and up.in_flight == 0)
            rest = [asyncio.create_task(get(session, proxy, "w", i)) for i in (1, 2)]
            tasks += rest
            await until(lambda: gate.queued == 3)
            tried = _refusals(logs)
            assert tried == 1, f"{tried} refusals"
            assert view.routable() == []  # skipped, and the skip holds
            assert up.unhealthy_until == clock.now + 10
            assert up not in proxy.health.records  # no ejection of the process before

            clock.now += 10  # the skip ends; it still boots
            view.notify()
            await until(lambda: _refusals(logs) >= 2 and gate.queued == 3 and up.in_flight == 0)
            tried = _refusals(logs)
            assert tried == 2, f"{tried} refusals"  # its probe alone
            assert view.routable() == []

            async with serving(machine_socket, order):
                clock.now += 10  # it listens, and the next skip ends
                view.notify()
                statuses = await asyncio.gather(first, *rest)
    assert statuses == [200, 200, 200]
    assert sorted(order) == ["0", "1", "2"]
    assert _refusals(logs) == 2
    assert not any(e["event"] == "machine_ejected" for e in logs)
    assert proxy.health.records == {}
    assert proxy.health.report() == []
    assert view.routable() == [up]


async def test_an_ejections_probe_refused_while_its_machine_boots_leaves_it_skipped(
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    clock: Clock,
    fleet: FleetView,
    machine_socket: socket.socket,
) -> None:
    """A machine that started lately is ejected (its process died, and Fly's restart
    policy brings it back unseen by the list); when the ejection ends, its probe's
    connect is refused. That refusal does not count (the machine started within
    ``wake_timeout_s``), and the probe ends with no verdict, but the machine is skipped
    all the same: the next request is its probe again once the skip ends, not at once."""
    proxy, view, up, gate = await _ejected_machine(start_proxy, fleet, machine_socket)
    clock.now += 5  # the ejection ends

    order: list[str] = []
    with capture_logs() as logs:
        async with cancelled_at_exit() as tasks:
            first = asyncio.create_task(get(session, proxy, "w", 0))
            tasks.append(first)
            await until(lambda: _refusals(logs) >= 1 and gate.queued == 1 and up.in_flight == 0)
            tried = _refusals(logs)
            assert tried == 1, f"{tried} refusals"
            assert view.routable() == []
            assert up.unhealthy_until == clock.now + 10  # skipped, not put back by the probe
            assert proxy.health.report()[0]["reason"] == health.RESET  # still ejected

            async with serving(machine_socket, order):
                clock.now += 10  # it listens, and the skip ends: the next probe is served
                view.notify()
                assert await first == 200
    assert order == ["0"]
    assert _refusals(logs) == 1
    assert [e["event"] for e in logs if e["event"].startswith("machine_")] == [
        "machine_unreachable",
        "machine_restored",
    ]
    assert proxy.health.records == {}
