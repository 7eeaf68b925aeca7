"""Passive health (outlier ejection), safe retries, and slots that measure the machine's work.

The ejection rules are tested on :class:`Health` with a view on a hand-stepped clock; the
data path's use of them with real machines on loopback (one that answers 503, one that
hangs, one whose Fly checks are critical).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from testkit import until

from autoscaler.admin import AdminServer
from autoscaler.config import AdminSettings
from autoscaler.control.view import HUNG_AFTER, FleetView, MachineInfo
from autoscaler.metrics import Metrics
from autoscaler.proxy import health
from autoscaler.proxy.health import Health
from autoscaler.status import render

from .conftest import Backend, RawBackend, StartProxy, url
from .helpers import Blocking, seen_app


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _fleet(*ids: str, critical: frozenset[str] = frozenset()) -> tuple[FleetView, Clock]:
    clock = Clock()
    fleet = FleetView(clock)
    fleet.app("a").set_machines(
        [
            MachineInfo(i, "127.0.0.1", 1000 + n, "started", False, i in critical)
            for n, i in enumerate(ids)
        ]
    )
    return fleet, clock


def _ejections(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "autoscaler_machine_ejections_total", {"app": "a", "reason": reason}
    )
    return value or 0.0


def _routable(fleet: FleetView) -> list[str]:
    return sorted(u.id for u in fleet.app("a").routable())


def test_consecutive_failures_eject_and_the_backoff_doubles_until_a_probe_succeeds() -> None:
    fleet, clock = _fleet("m1", "m2")
    metrics = Metrics(CollectorRegistry())
    h = Health(fleet, metrics, eject_after=3, base_s=10.0)
    m1 = fleet.app("a").upstreams["m1"]
    h.failed("a", m1, health.RESET)
    h.failed("a", m1, health.RESET)
    h.succeeded("a", m1)  # a good answer breaks the run
    h.failed("a", m1, health.TIMEOUT)
    h.failed("a", m1, health.RESET)
    assert _routable(fleet) == ["m1", "m2"]
    h.failed("a", m1, health.SERVER_ERROR)
    assert _routable(fleet) == ["m2"]
    assert _ejections(metrics, "5xx") == 1
    assert [e["machine"] for e in h.report()] == ["m1"]

    clock.now += 10.0  # the ejection is over: on probation
    assert _routable(fleet) == ["m1", "m2"]
    assert h.took("a", m1) is True  # the first request to it probes
    assert _routable(fleet) == ["m2"]  # and none other follows until its answer
    h.failed("a", m1, health.TIMEOUT)  # a failed probe ejects at once, for twice as long
    assert _ejections(metrics, "timeout") == 1
    clock.now += 10.0
    assert _routable(fleet) == ["m2"]
    clock.now += 10.0
    assert _routable(fleet) == ["m1", "m2"]
    assert h.took("a", m1) is True
    h.succeeded("a", m1)
    assert _routable(fleet) == ["m1", "m2"]
    assert h.records == {}
    assert h.report() == []


def test_ejections_for_the_machines_own_failures_are_counted_in_a_row_for_the_controller() -> None:
    # Upstream.failing is what the controller reads to restart a machine that hangs: the
    # machine's own failures count, a 5xx answer and critical checks do not, and a good
    # answer or a new start (a new process) begins the count again.
    fleet, clock = _fleet("m1", "m2")
    h = Health(fleet, Metrics(CollectorRegistry()), eject_after=1, base_s=1.0)
    m1, m2 = fleet.app("a").upstreams["m1"], fleet.app("a").upstreams["m2"]
    h.failed("a", m1, health.TIMEOUT)
    assert m1.failing == 1
    clock.now += 1.0
    assert h.took("a", m1) is True
    h.failed("a", m1, health.RESET)  # its probe
    assert m1.failing == 2
    clock.now += 2.0
    assert h.took("a", m1) is True
    h.succeeded("a", m1)
    assert m1.failing == 0
    h.failed("a", m2, health.SERVER_ERROR)
    m2.checks_critical = True
    h.sweep()
    assert m2.failing == 0
    h.failed("a", m1, health.CONNECT)
    assert m1.failing == 1
    fleet.app("a").set_state("m1", "stopped")
    fleet.app("a").set_state("m1", "started")
    assert m1.failing == 0


def test_a_probe_that_ends_without_an_answer_lets_the_next_request_probe() -> None:
    fleet, clock = _fleet("m1", "m2")
    h = Health(fleet, Metrics(CollectorRegistry()), eject_after=1, base_s=1.0)
    m1 = fleet.app("a").upstreams["m1"]
    h.failed("a", m1, health.CONNECT)
    clock.now += 1.0
    assert h.took("a", m1) is True
    assert h.took("a", m1) is False  # (a request handed it meanwhile is no second probe)
    h.abandoned("a", m1)
    assert _routable(fleet) == ["m1", "m2"]
    assert h.took("a", m1) is True


def test_a_machine_started_again_holds_nothing_of_its_process_before() -> None:
    """A new start is a new process: what the proxy held against the one before (its
    ejection, its probation, the doubling of its backoff, its failures in a row) is
    forgotten, and the new process's failures count from the first, even when the view's
    clock did not move between the stop and the start."""
    fleet, clock = _fleet("m1", "m2")
    metrics = Metrics(CollectorRegistry())
    h = Health(fleet, metrics, eject_after=2, base_s=10.0)
    view = fleet.app("a")
    m1 = view.upstreams["m1"]
    for _ in range(2):
        h.failed("a", m1, health.TIMEOUT)  # ejected for 10 s
    clock.now += 10.0
    assert h.took("a", m1) is True
    h.failed("a", m1, health.TIMEOUT)  # its probe failed: out for 20 s
    assert [e["ejections"] for e in h.report()] == [2]
    view.set_state("m1", "stopped")  # the controller restarts it
    view.set_state("m1", "started")
    assert h.report() == []
    assert _routable(fleet) == ["m1", "m2"]
    assert h.took("a", m1) is False  # no probe: it takes requests as any machine
    assert _routable(fleet) == ["m1", "m2"]
    h.failed("a", m1, health.RESET)  # the new process's failures count, from one
    assert _routable(fleet) == ["m1", "m2"]
    h.failed("a", m1, health.RESET)
    [entry] = h.report()
    assert (entry["reason"], entry["ejections"], entry["remaining_s"]) == ("reset", 1, 10.0)
    assert m1.failing == 1

    # A failure, not yet an ejection, is forgotten as well.
    view.set_state("m1", "stopped")
    view.set_state("m1", "started")
    h.failed("a", m1, health.RESET)
    view.set_state("m1", "stopped")
    view.set_state("m1", "started")
    h.failed("a", m1, health.RESET)
    assert _routable(fleet) == ["m1", "m2"]  # one failure of each process: not two in a row
    assert h.report() == []
    h.sweep()
    assert h.report() == []


def test_a_machine_out_for_its_checks_and_started_again_between_sweeps_is_out_again() -> None:
    """The start resets the machine's hold-out in the view; the sweep that sees it started
    (its checks still listed critical) takes it out again for them, as for any started
    machine. Its record from before the start kept it in rotation, checks critical."""
    fleet, _ = _fleet("m1", "m2", critical=frozenset({"m1"}))
    metrics = Metrics(CollectorRegistry())
    h = Health(fleet, metrics, eject_after=5, base_s=1.0)
    view = fleet.app("a")
    h.sweep()
    assert _routable(fleet) == ["m2"]
    view.set_state("m1", "stopped")  # stopped and started again before the next sweep
    view.set_state("m1", "started")
    h.sweep()
    assert _routable(fleet) == ["m2"]
    assert [(e["machine"], e["reason"]) for e in h.report()] == [("m1", "checks")]
    assert _ejections(metrics, "checks") == 2


def test_the_last_routable_machine_is_kept_for_5xx_and_checks_but_not_for_timeouts() -> None:
    fleet, _ = _fleet("m1")
    metrics = Metrics(CollectorRegistry())
    h = Health(fleet, metrics, eject_after=2, base_s=5.0)
    m1 = fleet.app("a").upstreams["m1"]
    for _ in range(10):
        h.failed("a", m1, health.SERVER_ERROR)
    m1.checks_critical = True
    h.sweep()
    assert _routable(fleet) == ["m1"]  # the app may be broken: its answers go through
    assert _ejections(metrics, "5xx") == _ejections(metrics, "checks") == 0
    h.failed("a", m1, health.TIMEOUT)
    assert _routable(fleet) == []
    assert _ejections(metrics, "timeout") == 1


def test_critical_checks_eject_until_they_pass_and_gone_machines_are_forgotten() -> None:
    fleet, clock = _fleet("m1", "m2", critical=frozenset({"m1"}))
    metrics = Metrics(CollectorRegistry())
    h = Health(fleet, metrics, eject_after=5, base_s=1.0)
    m1 = fleet.app("a").upstreams["m1"]
    h.sweep()
    assert _routable(fleet) == ["m2"]
    assert _ejections(metrics, "checks") == 1
    clock.now += 1000.0
    h.succeeded("a", m1)  # (an answer from before) does not bring it back: its checks do
    h.sweep()
    assert _routable(fleet) == ["m2"]
    assert _ejections(metrics, "checks") == 1  # counted once, not per sweep
    assert h.report()[0]["reason"] == "checks"
    fleet.app("a").set_machines(
        [
            MachineInfo(i, "127.0.0.1", 1000 + n, "started", False)
            for n, i in enumerate(["m1", "m2"])
        ]
    )
    h.sweep()
    assert _routable(fleet) == ["m1", "m2"]
    h.failed("a", m1, health.RESET)
    fleet.app("a").set_machines([])
    h.sweep()
    assert h.records == {}


def test_a_spared_critical_machine_is_ejected_once_another_is_routable_again() -> None:
    """The sweep looks again at an app whose machines did not change when its critical
    machine was spared as the last routable one: another machine's skip may have ended."""
    fleet, clock = _fleet("m1", "m2", critical=frozenset({"m1"}))
    metrics = Metrics(CollectorRegistry())
    h = Health(fleet, metrics, eject_after=5, base_s=1.0)
    view = fleet.app("a")
    view.skip(view.upstreams["m2"], 5.0)  # it dropped a connection: out for 5 s
    h.sweep()
    assert _routable(fleet) == ["m1"]  # the last one standing is kept
    assert _ejections(metrics, "checks") == 0
    clock.now += 6.0
    h.sweep()
    assert _routable(fleet) == ["m2"]
    assert _ejections(metrics, "checks") == 1


@pytest.mark.parametrize(
    ("reason", "others", "counted"),
    [
        (health.TIMEOUT, False, HUNG_AFTER),  # alone: hung, its probe is not awaited
        (health.TIMEOUT, True, 1),  # another serves: the probe decides
        (health.RESET, False, 1),  # a process that died: Fly may be restarting it
        (health.CONNECT, False, 1),
    ],
)
def test_a_timeout_ejection_of_the_last_routable_machine_counts_as_hung(
    reason: str, others: bool, counted: int
) -> None:
    fleet, _ = _fleet("m1", "m2")
    view = fleet.app("a")
    if not others:
        view.skip(view.upstreams["m2"], 60.0)  # out for a while: m1 is the last one
    h = Health(fleet, Metrics(CollectorRegistry()), eject_after=1, base_s=10.0)
    m1 = view.upstreams["m1"]
    h.failed("a", m1, reason)
    assert m1.failing == counted


def test_the_report_says_when_a_machine_is_held_past_its_ejection() -> None:
    """Once its ejection is over a machine is probed, unless the controller holds it out
    until its restart (a hung machine): ``/status`` says which."""
    fleet, clock = _fleet("m1", "m2")
    h = Health(fleet, Metrics(CollectorRegistry()), eject_after=1, base_s=10.0)
    view = fleet.app("a")
    m1 = view.upstreams["m1"]
    h.failed("a", m1, health.TIMEOUT)

    def entry() -> tuple[object, object]:
        [e] = h.report()
        return e["probing"], e["held"]

    assert entry() == (False, False)  # ejected, 10 s to go
    clock.now += 11.0
    assert entry() == (True, False)  # over: the next request probes it
    view.hold_out(m1, True)  # the controller holds it until its restart
    assert entry() == (False, True)
    text = "\n".join(render({"ejected": h.report()}))
    assert "after its restart" in text


def test_critical_checks_do_not_bring_back_a_machine_out_for_failing_itself() -> None:
    """The last routable machine of its app is spared for critical checks, but not once the
    proxy took it out for its own failures (a process that hangs turns its checks critical
    a moment later): the spare would hand it a request that waits ``upstream_timeout_s``.
    Once it serves again, it is out for its checks as soon as another machine is routable
    (the sweep keeps looking at the app, as for a spared machine)."""
    fleet, clock = _fleet("m1", "m2")
    h = Health(fleet, Metrics(CollectorRegistry()), eject_after=1, base_s=30.0)
    view = fleet.app("a")
    m1 = view.upstreams["m1"]
    view.skip(view.upstreams["m2"], 60.0)  # it dropped a connection: out for 60 s
    h.failed("a", m1, health.TIMEOUT)
    assert _routable(fleet) == []
    view.set_machines(
        [
            MachineInfo(i, "127.0.0.1", 1000 + n, "started", False, i == "m1")
            for n, i in enumerate(["m1", "m2"])
        ]
    )
    clock.now += 5.0
    h.sweep()
    assert _routable(fleet) == []  # still out for its timeout, 25 s more
    assert h.report()[0]["reason"] == "timeout"
    clock.now += 30.0
    h.sweep()
    assert _routable(fleet) == ["m1"]  # the timeout's ejection is over: its probe may go
    assert h.took("a", m1)
    h.succeeded("a", m1)
    assert _routable(fleet) == ["m1"]  # the last one standing
    clock.now += 30.0  # m2's skip is over; the machines did not change
    h.sweep()
    assert _routable(fleet) == ["m2"]
    assert h.report()[0]["reason"] == "checks"


def test_a_machine_not_started_is_not_out_of_rotation_for_its_checks() -> None:
    """Only a started machine is ejected for critical checks. A sick machine drained and
    stopped by the controller keeps the list's critical checks until the next list (Fly
    lists a machine's checks as they were): it was ejected then (spared as the last
    routable one until its replacement served), and /status listed it for seconds as out
    of rotation for its checks, "back in when its checks pass"."""
    fleet, _ = _fleet("m1", "m2", critical=frozenset({"m1"}))
    metrics = Metrics(CollectorRegistry())
    h = Health(fleet, metrics, eject_after=5, base_s=1.0)
    view = fleet.app("a")
    view.set_state("m2", "stopped")
    h.sweep()
    assert _routable(fleet) == ["m1"]  # spared: the last one standing
    view.set_state("m2", "started")  # its replacement serves ...
    view.set_state("m1", "stopping")  # ... and the controller stops it, at once
    h.sweep()
    assert (h.report(), _ejections(metrics, "checks")) == ([], 0)
    view.set_state("m1", "started")  # started again, still critical: out for its checks
    h.sweep()
    assert [(e["machine"], e["reason"]) for e in h.report()] == [("m1", "checks")]
    view.set_state("m1", "stopped")  # out for its checks, then stopped: not listed,
    assert h.report() == []  # not even until the next sweep (once a second)
    h.sweep()
    assert h.records == {}


def test_an_app_removed_and_added_back_is_swept_afresh() -> None:
    fleet, _ = _fleet("m1", "m2")
    h = Health(fleet, Metrics(CollectorRegistry()), eject_after=5, base_s=1.0)
    h.sweep()
    fleet.remove_app("a")
    fleet.app("a").set_machines(
        [
            MachineInfo(i, "127.0.0.1", 1000 + n, "started", False, i == "m1")
            for n, i in enumerate(["m1", "m2"])
        ]
    )
    h.sweep()
    assert _routable(fleet) == ["m2"]


# --- on the data path ----------------------------------------------------------------


def _status_app(status: int, name: str) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, text=name)

    app = web.Application()
    app.router.add_route("*", "/", handler)
    return app


async def test_a_machine_answering_503_is_ejected_and_shown_in_status(
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    metrics: Metrics,
) -> None:
    bad = await backend(_status_app(503, "bad"))
    good = await backend(_status_app(200, "good"))
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [bad, good]}], eject_after=3
    )
    seen: list[str] = []
    while _ejections(metrics, "5xx") == 0:
        assert len(seen) < 500
        async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
            seen.append(await r.text())
    assert seen.count("bad") == 3  # its answers went to the clients until then
    for _ in range(20):
        async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
            assert r.status == 200
    admin = AdminServer(AdminSettings(), metrics)
    admin.ejected = proxy.health.report
    [ejected] = admin.status_document()["ejected"]
    assert (ejected["app"], ejected["machine"], ejected["reason"]) == ("a", bad, "5xx")
    text = "\n".join(render(admin.status_document()))
    assert f"a    {bad}  5xx" in text


async def test_a_hung_machine_is_ejected_and_new_requests_go_elsewhere(
    raw_backend: RawBackend,
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    metrics: Metrics,
) -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)  # takes the request, never answers

    hung = await raw_backend(hang)
    good = await backend(_status_app(200, "good"))
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [hung, good]}],
        eject_after=2,
        upstream_timeout_s=0.2,
    )
    statuses: list[int] = []
    while _ejections(metrics, "timeout") == 0:
        assert len(statuses) < 200
        async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
            statuses.append(r.status)
    assert statuses.count(504) == 2  # each cost upstream_timeout_s
    for _ in range(20):
        async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
            assert r.status == 200


async def test_critical_checks_in_the_fleet_view_take_a_machine_out_at_once(
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
    metrics: Metrics,
) -> None:
    hung = Blocking("hung")
    sick = await backend(hung.app())
    good = await backend(_status_app(200, "good"))
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [sick, good]}])
    fleet.app("a").upstreams[sick].checks_critical = True
    proxy.health.sweep()
    assert _ejections(metrics, "checks") == 1
    for _ in range(20):
        async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
            assert await r.text() == "good"
    assert hung.order == []


# --- retries -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_request_that_reached_no_machine_tries_each_other_machine_once(
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    method: str,
    refused_port: Callable[[], int],
) -> None:
    """Nothing was sent, so any method goes on: to another machine at once, then held for
    one (MAX_ATTEMPTS), which hands it the last one routable; each refused it and is
    skipped, so none is tried twice, and with none left it gets its 502 at wake_timeout_s."""
    dead = [f"127.0.0.1:{refused_port()}" for _ in range(3)]
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": dead, "wake_timeout_s": 0.5}],
        unhealthy_backoff_s=60,
    )
    with capture_logs() as logs:
        async with session.request(
            method, url(proxy), data=b"x" if method == "POST" else None, headers={"Host": "a.test"}
        ) as r:
            assert r.status == 502
    tried = [e["machine"] for e in logs if e["event"] == "machine_unreachable"]
    assert sorted(tried) == sorted(dead)  # each on another machine


# --- slots ---------------------------------------------------------------------------


def _big_app(size: int) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=b"z" * size)

    app = web.Application()
    app.router.add_get("/", handler)
    return app


async def test_the_slot_comes_back_when_the_machine_is_done_not_the_slow_reader(
    backend: Backend, start_proxy: StartProxy, fleet: FleetView
) -> None:
    size = 48 * 1024  # more than the small socket buffers below, less than the proxy's
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(_big_app(size))]}]
    )
    view = fleet.app("a")
    loop = asyncio.get_running_loop()
    # A plain socket (a stream reader would read ahead), and one that takes little.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
        server = proxy._server
        assert server is not None
        await until(lambda: len(server.connections) == 1)
        [conn] = server.connections
        assert conn.transport is not None
        conn.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        await until(lambda: conn.writing_paused)  # the client is behind
        # It has not read the answer, and the slot is free: the machine is done with it.
        await until(lambda: view.in_flight == 0 and view.meter.level == 0)
        assert conn.writing_paused
        got = b""
        while got.count(b"z") < size:
            data = await loop.sock_recv(sock, 65536)
            assert data
            got += data
        assert got.endswith(b"\r\n\r\n" + b"z" * size)
    finally:
        sock.close()


async def test_a_slow_upload_holds_a_slot_and_an_unfinished_head_none(
    backend: Backend, start_proxy: StartProxy, fleet: FleetView
) -> None:
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(seen_app())]}]
    )
    view = fleet.app("a")
    _, head_only = await asyncio.open_connection("127.0.0.1", proxy.port)
    _, uploading = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        head_only.write(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Len")
        uploading.write(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\n\r\nabc")
        await until(lambda: view.in_flight == 1)  # the machine waits for the rest: work
        assert view.queued == 0
    finally:
        for writer in (head_only, uploading):
            writer.close()
            await writer.wait_closed()
    await until(lambda: view.in_flight == 0)


async def _answers_while_the_upload_comes(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A machine that starts its answer at once and streams while it reads the body."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await writer.drain()
    try:
        while await reader.read(65536):
            writer.write(b"1\r\n.\r\n")
            await writer.drain()
    except ConnectionError:
        pass
    writer.close()


@pytest.mark.parametrize("fault", ["too large", "too slow"])
async def test_an_upload_the_client_breaks_is_not_held_against_the_machine(
    raw_backend: RawBackend,
    start_proxy: StartProxy,
    fleet: FleetView,
    metrics: Metrics,
    fault: str,
) -> None:
    # The proxy cuts the machine's connection off when the client's body fails; relayed
    # as the machine's own failure, one client took healthy machines out of rotation.
    machines = [await raw_backend(_answers_while_the_upload_comes) for _ in range(2)]
    app = {"name": "a", "hosts": ["a.test"], "backends": machines, "max_body_bytes": 100}
    proxy = await start_proxy([app], eject_after=1, client_timeout_s=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"10\r\n" + b"x" * 16 + b"\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        if fault == "too large":
            writer.write(b"c8\r\n" + b"y" * 200 + b"\r\n")
            await writer.drain()
        # else: the client sends nothing more
        await asyncio.wait_for(reader.read(-1), 5)  # the proxy drops the connection
    finally:
        writer.close()
    await until(lambda: fleet.app("a").in_flight == 0, what="the slot given back")
    assert _ejections(metrics, "reset") == 0
    assert len(fleet.app("a").routable()) == 2
    assert all(u.failing == 0 for u in fleet.app("a").upstreams.values())


def test_verdicts_on_a_machine_of_an_app_a_reload_removed_make_no_view_again() -> None:
    """Requests under way when a reload removed their app end after it: their verdicts
    (a failure that ejects, a probe, its end) land on the view that held the machine,
    and the removed app gets no new, empty view of its own in the fleet."""
    fleet, clock = _fleet("m1", "m2")
    h = Health(fleet, Metrics(CollectorRegistry()), eject_after=1, base_s=1.0)
    view = fleet.app("a")
    m1, m2 = view.upstreams["m1"], view.upstreams["m2"]
    fleet.remove_app("a")
    h.failed("a", m1, health.RESET)
    assert "a" not in fleet.apps
    assert [u.id for u in view.routable()] == ["m2"]  # ejected where it was held
    clock.now += 1.0
    assert h.took("a", m1) is True
    h.abandoned("a", m1)
    assert h.took("a", m1) is True
    h.succeeded("a", m1)
    h.failed("a", m2, health.CONNECT)
    h.revived("a", m2)
    assert "a" not in fleet.apps
