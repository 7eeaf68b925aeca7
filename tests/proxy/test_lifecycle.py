"""Graceful shutdown, configuration reload, and the access log line."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs
from testkit import free_port, until

from autoscaler.config import AppConfig, ProxySettings, Settings
from autoscaler.control.view import FleetView, MachineInfo
from autoscaler.metrics import Metrics
from autoscaler.proxy import server

from .conftest import Backend, RawBackend, StartProxy, url
from .helpers import (
    Blocking,
    answer_of,
    connect,
    read_response,
    status_of,
    text_app,
    unanswering_port,
)


async def test_stop_refuses_new_connections_and_finishes_requests_in_flight(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    up = Blocking("done")
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(up.app())]}]
    )
    port = proxy.port

    get = functools.partial(answer_of, session, url(proxy), "a.test")
    in_flight = asyncio.create_task(get())
    await until(lambda: fleet.app("a").in_flight == 1)
    stopping = asyncio.create_task(proxy.stop())
    await until(lambda: not proxy.accepting)
    with pytest.raises(ConnectionRefusedError):  # no longer accepting
        await asyncio.open_connection("127.0.0.1", port)
    assert not stopping.done()  # still waiting for the request in flight
    up.release.set()
    assert await in_flight == (200, "done")
    await stopping


async def test_a_request_received_just_before_stop_is_served(
    backend: Backend, start_proxy: StartProxy
) -> None:
    """Its bytes were read before the stop began, its turn on the connection comes after:
    it is answered like a request in flight (a rolling restart fails no request), and the
    connection closes after it."""
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(text_app("ok"))]}]
    )
    request = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        await reader.readexactly(length)
        (conn,) = proxy._server.connections  # the kept-alive connection
        stopping = asyncio.ensure_future(proxy.stop())  # its first step runs first...
        conn.data_received(request)  # ...then this request's turn on the connection
        answer = await asyncio.wait_for(reader.read(), 10)  # all of it, to the close
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert answer.endswith(b"ok")
        await stopping
    finally:
        writer.close()


async def test_stop_cuts_requests_past_the_shutdown_deadline(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    up = Blocking()
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(up.app())]}],
        shutdown_timeout_s=0.2,
    )

    async def get() -> int:
        async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
            await r.read()
            return r.status

    in_flight = asyncio.create_task(get())
    await until(lambda: up.order == [""])  # at its machine (connecting, the stop's 503)
    await proxy.stop()
    with pytest.raises(aiohttp.ClientError):
        await in_flight
    assert fleet.app("a").in_flight == 0  # the slot was given back when cut
    up.release.set()


async def test_held_requests_get_503_before_the_deadline_cuts_the_rest(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    """A held request was never sent anywhere: a 503 with Retry-After tells its client to
    retry (elsewhere, or once restarted), where a cut connection would leave it unsure."""
    up = Blocking()
    proxy = await start_proxy(
        [
            {
                "name": "a",
                "hosts": ["a.test"],
                "backends": [await backend(up.app())],
                "hard_limit": 1,
            }
        ],
        shutdown_timeout_s=1.0,
    )
    view = fleet.app("a")

    async def get() -> tuple[int, str, str | None]:
        async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
            return r.status, await r.text(), r.headers.get("Retry-After")

    in_flight = asyncio.create_task(get())
    await until(lambda: view.in_flight == 1 and up.order == [""])  # at its machine
    held = [asyncio.create_task(get()) for _ in range(2)]
    await until(lambda: view.queued == 2)
    await proxy.stop()
    for task in held:
        assert await task == (503, "proxy is shutting down\n", "1")
    with pytest.raises(aiohttp.ClientError):
        await in_flight  # still at the machine at the deadline: cut
    assert view.queued == 0
    assert view.in_flight == 0
    up.release.set()


async def test_a_request_still_connecting_at_the_graceful_stops_shed_gets_503(
    start_proxy: StartProxy, fleet: FleetView
) -> None:
    """Half a second before shutdown_timeout_s the held requests get their 503. A request
    whose connect to its machine was under way then (a host that does not answer) was
    sent nowhere either, but the deadline cut its connection unanswered. Its connect is
    given up with the held ones' 503s, and it gets one too."""
    with unanswering_port() as (port, _):
        machine = MachineInfo("m1", "127.0.0.1", port, "started", False)
        fleet.app("w").set_machines([machine])
        proxy = await start_proxy(
            [{"name": "w", "hosts": ["w.test"], "wake_timeout_s": 300}],
            shutdown_timeout_s=1.0,
            connect_timeout_s=3600,
        )
        async with connect(proxy.port) as (reader, writer):
            writer.write(b"GET / HTTP/1.1\r\nHost: w.test\r\n\r\n")
            await until(lambda: fleet.app("w").in_flight == 1)  # connecting
            await proxy.stop()
            status, headers, body = await read_response(reader)
        assert (status, body) == (503, b"proxy is shutting down\n")
        assert headers["retry-after"] == ["1"]
    assert fleet.app("w").in_flight == 0


async def test_a_held_request_whose_machine_routes_in_the_turn_of_the_shed_is_served(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    """Its machine became routable in the very turn of the loop the graceful stop's shed
    ran, before the gate's pump could hand it out: it got the shed's 503, where a request
    handed its machine a turn earlier was sent (on a connection to that machine there to
    reuse). At the shed it takes its slot first, and is served."""
    host, _, port = (await backend(text_app("awake"))).partition(":")
    view = fleet.app("w")
    view.set_machines([MachineInfo("m1", host, int(port), "started", False)])
    apps = [{"name": "w", "hosts": ["w.test"], "wake_timeout_s": 300}]
    proxy = await start_proxy(apps, shutdown_timeout_s=300)
    assert await status_of(session, url(proxy), "w.test") == 200  # a connection to reuse
    view.set_state("m1", "suspended")
    held = asyncio.create_task(status_of(session, url(proxy), "w.test"))
    await until(lambda: view.queued == 1, what="the request held")
    view.set_state("m1", "started")  # the gate's pump hands it out in the loop's next turn
    proxy._shed()  # ... and the graceful stop's shed runs in this one
    assert await held == 200
    assert view.queued == 0


async def test_a_stop_cut_short_still_answers_held_requests_503(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    """A second SIGTERM cuts the graceful stop short (the service stops at once, and the
    process exits). A request held for a wake was sent nowhere: it gets its 503 with
    Retry-After then, where its connection was dropped unanswered; a request already at
    its machine is not waited for."""
    up = Blocking()
    proxy = await start_proxy(
        [
            {"name": "a", "hosts": ["a.test"], "backends": [await backend(up.app())]},
            {"name": "w", "hosts": ["w.test"], "wake_timeout_s": 300},
        ],
        shutdown_timeout_s=300,
    )
    machine = MachineInfo("m1", "127.0.0.1", free_port(), "suspended", False)
    fleet.app("w").set_machines([machine])

    async def never_wakes(app: str) -> str:
        await asyncio.Event().wait()
        return "start"

    fleet.set_waker(never_wakes)

    async def get(host: str) -> tuple[int, str, str | None, str | None]:
        async with session.get(url(proxy), headers={"Host": host}) as r:
            text = await r.text()
            return r.status, text, r.headers.get("Retry-After"), r.headers.get("Connection")

    in_flight = asyncio.create_task(get("a.test"))
    held = asyncio.create_task(get("w.test"))
    await until(lambda: fleet.app("a").in_flight == 1 and fleet.app("w").queued == 1)
    stopping = asyncio.ensure_future(proxy.stop())
    await until(lambda: not proxy.accepting)  # the graceful stop is under way
    stopping.cancel()  # the second SIGTERM
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert fleet.app("w").queued == 0  # answered before the stop went on
    assert fleet.app("a").in_flight == 1  # at its machine still: not waited for
    assert await held == (503, "proxy is shutting down\n", "1", "close")
    up.release.set()
    await in_flight


async def test_a_stop_cut_short_in_its_first_turn_is_cut_short(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    """A second SIGTERM in the turn in which the stop ends the connection sweeper (its
    first await) was swallowed with the sweeper's own cancellation: the stop went on to
    wait for the requests in flight, up to shutdown_timeout_s."""
    up = Blocking()
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(up.app())]}],
        shutdown_timeout_s=300,
    )

    async def get() -> int:
        async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
            await r.read()
            return r.status

    in_flight = asyncio.create_task(get())
    try:
        # At its machine: counted in flight from before its connect, which the cut gives up.
        await until(lambda: fleet.app("a").in_flight == 1 and up.order == [""])
        stopping = asyncio.ensure_future(proxy.stop())
        await asyncio.sleep(0)  # its first step: no longer accepting, the sweeper ending
        assert not proxy.accepting
        stopping.cancel()  # the second SIGTERM
        await until(stopping.done, what="the stop cut short")
        assert stopping.cancelled()
        assert fleet.app("a").in_flight == 1  # at its machine still: not waited for
    finally:
        up.release.set()
    assert await in_flight == 200


async def test_a_request_still_connecting_to_its_machine_when_a_stop_is_cut_short_gets_503(
    start_proxy: StartProxy, fleet: FleetView, metrics: Metrics
) -> None:
    """After a second SIGTERM the other parts stop, then the process exits. A request
    whose connect to its machine was under way (a host that does not answer: its accept
    queue is full, so the SYN is dropped) was sent nowhere, but nothing answered it: its
    connection was dropped at exit (one refused meanwhile got its 503 as it went back to
    wait, one still hanging none). Its connect is given up with the held requests' 503s,
    and it gets one too, before the stop ends; no verdict on the machine."""
    with unanswering_port() as (port, _):
        machine = MachineInfo("m1", "127.0.0.1", port, "started", False)
        fleet.app("w").set_machines([machine])
        proxy = await start_proxy(
            [{"name": "w", "hosts": ["w.test"], "wake_timeout_s": 300}],
            shutdown_timeout_s=300,
            connect_timeout_s=3600,
        )
        async with connect(proxy.port) as (reader, writer):
            writer.write(b"GET / HTTP/1.1\r\nHost: w.test\r\n\r\n")
            await until(lambda: fleet.app("w").in_flight == 1)  # connecting
            stopping = asyncio.ensure_future(proxy.stop())
            await until(lambda: not proxy.accepting)  # the graceful stop is under way
            stopping.cancel()  # the second SIGTERM
            with pytest.raises(asyncio.CancelledError):
                await stopping
            status, headers, body = await read_response(reader)  # not connect_timeout_s
        assert (status, body) == (503, b"proxy is shutting down\n")
        assert headers["retry-after"] == ["1"]
        assert headers["connection"] == ["close"]
    up = fleet.app("w").upstreams["m1"]
    assert (up.in_flight, up.unhealthy_until, up.failing) == (0, 0.0, 0)
    assert (
        metrics.registry.get_sample_value(
            "autoscaler_requests_total", {"app": "w", "code": "503", "wake": "none"}
        )
        == 1
    )


async def test_update_settings_adds_and_removes_apps_without_dropping_requests(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    slow = Blocking("old")
    old_addr = await backend(slow.app())
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [old_addr]}])

    async def get(host: str) -> tuple[int, str]:
        async with session.get(url(proxy), headers={"Host": host}) as r:
            return r.status, await r.text()

    in_flight = asyncio.create_task(get("a.test"))
    await until(lambda: fleet.app("a").in_flight == 1)

    app = text_app("b here")
    new_addr = await backend(app)
    proxy.update_settings(
        Settings(
            proxy=ProxySettings(listen="127.0.0.1:8080"),
            apps=[AppConfig(name="b", hosts=["b.test"], backends=[new_addr])],
        )
    )
    assert await get("b.test") == (200, "b here")
    assert (await get("a.test"))[0] == 404  # removed from routing at once
    slow.release.set()
    assert await in_flight == (200, "old")  # the request already admitted finished
    # Its held-requests gauge goes with it (dashboards offered the app for good).
    queued = proxy.metrics.registry.get_sample_value
    assert queued("autoscaler_queued_requests", {"app": "a"}) is None
    assert queued("autoscaler_queued_requests", {"app": "b"}) == 0


async def test_a_reload_applies_the_listener_and_pool_limits_at_once(
    raw_backend: RawBackend, start_proxy: StartProxy
) -> None:
    """Header limits, client_timeout_s, max_connections and pool_size change on reload
    too, not only at the next restart (a reload that changed them used to say nothing)."""
    machine_conns = 0

    async def machine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal machine_conns
        machine_conns += 1
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            machine_conns -= 1
            writer.close()

    apps = [{"name": "a", "hosts": ["a.test"], "backends": [await raw_backend(machine)]}]
    proxy = await start_proxy(apps)
    long_header = b"X-Long: " + b"v" * 2000 + b"\r\n"

    async def exchange(extra: bytes = b"") -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: a.test\r\n" + extra + b"\r\n")
            return await reader.readuntil(b"\r\n\r\n")
        finally:
            writer.close()

    assert (await exchange(long_header)).startswith(b"HTTP/1.1 200")
    # Two at once: with the default pool both machine connections stay open for reuse.
    await asyncio.gather(exchange(), exchange())
    await until(lambda: machine_conns == 2)

    def reload(**knobs: Any) -> None:
        proxy.update_settings(
            Settings(
                proxy=ProxySettings(listen="127.0.0.1:8080", **knobs),
                apps=[AppConfig(**app) for app in apps],
            )
        )

    reload(max_header_bytes=1024, pool_size=1)
    assert (await exchange(long_header)).startswith(b"HTTP/1.1 431")
    # pool_size 1: of the connections that come back, one at most is kept.
    await asyncio.gather(exchange(), exchange())
    await until(lambda: machine_conns == 1)

    reload(client_timeout_s=0.2, max_connections=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        # max_connections 1: while that one is open, another is turned away.
        other_reader, other_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await _closed_without_a_byte(other_reader)
        other_writer.close()
        # client_timeout_s 0.2: the idle one is closed.
        assert await _closed_without_a_byte(reader)
    finally:
        writer.close()


async def _closed_without_a_byte(reader: asyncio.StreamReader) -> bool:
    try:
        async with asyncio.timeout(10):
            return await reader.read() == b""
    except ConnectionResetError:
        return True


async def test_access_log_line_has_the_request_fields_and_no_secrets(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/p", hello)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(app)]}]
    )
    with capture_logs() as logs:
        async with session.get(
            url(proxy, "/p?token=s3cr3t-query"),
            headers={
                "Host": "a.test",
                "Authorization": "Bearer s3cr3t-header",
                "X-Request-Id": "r1",
            },
        ) as r:
            assert r.status == 200
    lines = [e for e in logs if e["event"] == "request"]
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == "r1"
    assert line["app"] == "a"
    assert line["method"] == "GET"
    assert line["path"] == "/p"
    assert line["status"] == 200
    assert line["wake"] == "none"
    assert line["machine"]
    assert isinstance(line["duration_ms"], float)
    assert "s3cr3t" not in repr(logs)


async def test_access_log_can_be_switched_off(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    app = text_app("hi")
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(app)]}],
        access_log=False,
        wake_header=False,
    )
    with capture_logs() as logs:
        async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
            assert r.status == 200
            assert "Fly-Autoscaler-Wake" not in r.headers
    assert [e for e in logs if e["event"] == "request"] == []


async def test_connections_over_max_connections_are_refused(
    backend: Backend, start_proxy: StartProxy
) -> None:
    app = text_app("hi")
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(app)]}],
        max_connections=1,
    )
    first_reader, first = await asyncio.open_connection("127.0.0.1", proxy.port)
    first.write(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    await first.drain()
    assert (await first_reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    # The first connection is still open (keep-alive): a second one is closed at once.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    async with asyncio.timeout(10):
        assert await reader.read(-1) == b""
    writer.close()
    first.close()


async def test_a_request_whose_machine_fails_after_its_app_was_removed_makes_no_view_again(
    raw_backend: RawBackend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
) -> None:
    """A reload removes a scaled app while a request to its machine is in flight, and the
    controller drops the app's view; then the machine resets the connection. The proxy
    looked the app's view up by name to skip the machine, and made one again for an app
    nobody has (a follower reported it, a re-added app found it)."""
    got, reset = asyncio.Event(), asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        got.set()
        await reset.wait()
        writer.transport.abort()

    host, _, port = (await raw_backend(handler)).partition(":")
    fleet.app("w").set_machines([MachineInfo("m1", host, int(port), "started", False)])
    proxy = await start_proxy([{"name": "w", "hosts": ["w.test"]}])
    request = asyncio.create_task(
        session.post(url(proxy), headers={"Host": "w.test"}, data=b"not replayable")
    )
    await got.wait()
    proxy.update_settings(Settings(proxy=ProxySettings(listen="127.0.0.1:8080"), apps=[]))
    fleet.remove_app("w")  # what the controller's reload does once it let the app go
    reset.set()
    async with await request as resp:
        assert resp.status == 502
    assert "w" not in fleet.apps


@pytest.mark.parametrize("static", [True, False], ids=["static", "scaled"])
async def test_a_request_whose_connect_fails_after_its_app_was_removed_makes_no_view_again(
    static: bool,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
    metrics: Metrics,
) -> None:
    """A reload removes an app while the proxy is still connecting to its machine (a host
    that does not answer: its accept queue is full, so the SYN is dropped); then the
    connect is refused. The retry looked the app's view up by name through its gate and
    made it again, for an app nobody has: its ``autoscaler_inflight_requests`` series came
    back for good (and a scaled app's request waited out its wake_timeout_s for a wake
    that no controller makes)."""
    with unanswering_port() as (port, refuse):
        app: dict[str, Any] = {"name": "w", "hosts": ["w.test"]}
        if static:
            app["backends"] = [f"127.0.0.1:{port}"]
        else:
            fleet.app("w").set_machines([MachineInfo("m1", "127.0.0.1", port, "started", False)])
        proxy = await start_proxy([app], connect_timeout_s=60.0)
        request = asyncio.create_task(session.get(url(proxy), headers={"Host": "w.test"}))
        await until(lambda: fleet.apps["w"].in_flight == 1)  # connecting
        proxy.update_settings(Settings(proxy=ProxySettings(listen="127.0.0.1:8080"), apps=[]))
        fleet.remove_app("w")  # a scaled app: what the controller's reload does then
        refuse()  # the SYN sent again is refused
        async with await request as resp:
            assert resp.status == 503
        assert "w" not in fleet.apps
        inflight = metrics.registry.get_sample_value("autoscaler_inflight_requests", {"app": "w"})
        assert inflight is None


@pytest.mark.skipif(
    not server.__file__.endswith(".py"),
    reason="the bug is put in by replacing a method, which a compiled class does not allow",
)
@pytest.mark.parametrize("head_sent", [False, True], ids=["before-head", "after-head"])
async def test_a_bug_in_the_handler_counts_its_request_once(
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    monkeypatch: pytest.MonkeyPatch,
    head_sent: bool,
) -> None:
    """A handler that raises before its answer's head went out is answered 500, and
    counted once under its app, as the proxy's own error (internal: AutoscalerHigh5xxRatio
    leaves it out of the app's 5xx), not a second time as code 0. It was counted under app
    "" though its app was known (its log line named it): AutoscalerProxyErrors never
    showed which app's requests failed. After the head it is the app's request with the
    machine's status, cut short: counted once, so. Its line names the app."""
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(text_app("hi"))]}]
    )

    async def broken(request: Any, app: Any, gate: Any, ctx: Any) -> None:
        if head_sent:
            ctx.status = 200
            request.conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nh")
        raise RuntimeError("a bug")

    monkeypatch.setattr(proxy, "_forward", broken)
    with capture_logs() as logs:
        async with session.get(url(proxy), headers={"Host": "a.test"}) as r:
            assert r.status == (200 if head_sent else 500)
    counted = {
        (s.labels["app"], s.labels["code"], s.labels["wake"]): s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "autoscaler_requests_total"
    }
    # (app "": a bug's 500 before routing, at 0 from the start)
    assert counted == {("", "500", "none"): 0, ("a", "200" if head_sent else "500", "none"): 1}
    # The 500 is the proxy's own: counted as such, beside its request (not the app's 5xx).
    errors = {
        (s.labels["app"], s.labels["reason"]): s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "autoscaler_proxy_errors_total" and s.value
    }
    assert errors == ({} if head_sent else {("a", "internal"): 1})
    (line,) = [e for e in logs if e["event"] == "request"]
    assert (line["app"], line["status"]) == ("a", 200 if head_sent else 500)


@pytest.mark.skipif(
    not server.__file__.endswith(".py"),
    reason="the bug is put in by replacing a method, which a compiled class does not allow",
)
@pytest.mark.parametrize("given", [None, "the-clients-id"], ids=["ours", "clients"])
async def test_a_bug_in_the_handler_is_answered_under_the_requests_own_id(
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    given: str | None,
) -> None:
    """The 500 of a handler's bug carried a new request id, not the client's nor the one
    its request's line logged, and its proxy_error line no app: the three could not be
    tied together. Now the answer, its proxy_error and its request line share the id."""
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(text_app("hi"))]}]
    )

    async def broken(request: Any, app: Any, gate: Any, ctx: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(proxy, "_forward", broken)
    headers = {"Host": "a.test"} | ({"X-Request-Id": given} if given else {})
    with capture_logs() as logs:
        async with session.get(url(proxy), headers=headers) as r:
            assert r.status == 500
            assert await r.text() == "internal proxy error\n"
            answered = r.headers["X-Request-Id"]
    (line,) = [e for e in logs if e["event"] == "request"]
    (error,) = [e for e in logs if e["event"] == "proxy_error"]
    assert answered == line["request_id"] == error["request_id"]
    if given:
        assert answered == given
    assert (error["app"], error["status"]) == ("a", 500)
