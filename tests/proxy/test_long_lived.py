"""Long-lived connections and drains: a machine about to sleep has its WebSockets closed
with 1001 and its event streams ended at a chunk boundary, and its other streamed answers
(downloads) get the drain's time, then are cut; a shutdown ends event streams too; an idle
WebSocket stops counting as load after ``connection_idle_s`` and counts again with its
next frame."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import socket
import weakref
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from structlog.testing import capture_logs
from testkit import free_port, until

from autoscaler.config import AppConfig, Settings, parse_host_port
from autoscaler.control.view import AppView, FleetView, MachineInfo
from autoscaler.metrics import Metrics
from autoscaler.proxy import tunnel
from autoscaler.scaling.fleet import STARTED

from .conftest import Backend, RawBackend, StartProxy, url
from .helpers import BOUND_S, connect, parse_head, read_response, text_app, unanswering_port


async def upper_echo(request: web.Request) -> web.WebSocketResponse:
    """A WebSocket that answers each text message in capitals."""
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    async for msg in sock:
        if msg.type is WSMsgType.TEXT:
            await sock.send_str(msg.data.upper())
    return sock


def long_lived_app() -> web.Application:
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for n in range(10_000):  # a feed that never ends by itself
            await resp.write(f"data: {n}\n\n".encode())
            await asyncio.sleep(0.02)
        return resp

    async def quiet(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: hello\n\n")
        await asyncio.sleep(3600)  # then nothing, until the client goes
        return resp

    app = web.Application()
    app.router.add_get("/ws", upper_echo)
    app.router.add_get("/stream", stream)
    app.router.add_get("/quiet", quiet)
    return app


async def test_a_drain_ends_websockets_with_1001_and_streams_at_a_chunk_boundary(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    addr = await backend(long_lived_app())
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    view = fleet.app("a")
    [machine] = view.upstreams

    async with session.ws_connect(url(proxy, "/ws"), headers={"Host": "a.test"}) as ws:
        await ws.send_str("hi")
        assert await ws.receive_str() == "HI"
        async with session.get(url(proxy, "/stream"), headers={"Host": "a.test"}) as resp:
            assert resp.headers["Transfer-Encoding"] == "chunked"
            first = await resp.content.readuntil(b"\n\n")
            assert first.startswith(b"data: ")
            assert view.in_flight == 2
            assert view.upstreams[machine].long_lived == 2  # scale-downs take it last
            assert fleet.end_long_lived("a", "no-such-machine") == 0
            assert fleet.end_long_lived("a", machine) == 2
            # The stream ends as a whole chunked body (a cut one would raise here).
            rest = await resp.read()
            assert rest.count(b"data: ") < 10_000
        msg = await ws.receive()
        assert msg.type is WSMsgType.CLOSE
        assert msg.data == 1001
    await until(lambda: view.in_flight == 0, what="both slots given back")
    await until(lambda: view.upstreams[machine].long_lived == 0, what="both counted out")


async def test_a_stream_ended_for_a_slow_client_leaves_nothing_held(
    raw_backend: RawBackend, start_proxy: StartProxy, fleet: FleetView
) -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"2000\r\n" + b"z" * 0x2000 + b"\r\n"
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(chunk)
                await writer.drain()

    addr = await raw_backend(endless)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /feed HTTP/1.1\r\nHost: a.test\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        # The client reads nothing: the proxy holds what the machine sent meanwhile.
        await until(lambda: proxy._budget.held > 0, what="bytes held for the slow client")
        assert proxy.end_long_lived("a", addr) == 1
        got = b""
        while not got.endswith(b"\r\n0\r\n\r\n"):
            data = await reader.read(65536)
            assert data, "the stream was cut, not ended"
            got += data
    finally:
        writer.close()
    await until(lambda: fleet.app("a").in_flight == 0, what="the slot given back")
    assert proxy._budget.held == 0


def download_app(
    started: asyncio.Event, finish: asyncio.Event, sized: bool = False
) -> web.Application:
    """A streamed download (chunked, not an event stream) that ends when told; ``sized``:
    with a Content-Length instead."""

    async def download(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        if sized:
            resp.content_length = 18
        await resp.prepare(request)
        await resp.write(b'{"n": 0}\n')
        started.set()
        await finish.wait()
        await resp.write(b'{"n": 1}\n')
        return resp

    app = web.Application()
    app.router.add_get("/export", download)
    return app


@pytest.mark.parametrize("sized", [False, True], ids=["chunked", "content-length"])
async def test_a_drain_gives_a_download_its_time_then_cuts_it_not_ends_it(
    backend: Backend, start_proxy: StartProxy, fleet: FleetView, sized: bool
) -> None:
    """A streamed download is not an event stream: the drain's start leaves it to end by
    itself (it may, within drain_timeout_s); cut at the drain's deadline, its client's
    connection is dropped (a clean end would pass the truncated body off as whole). One
    with a Content-Length was not cut at all: the machine was suspended under it, and its
    client waited for the rest until upstream_timeout_s."""
    started, finish = asyncio.Event(), asyncio.Event()
    addr = await backend(download_app(started, finish, sized))
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    view = fleet.app("a")
    [machine] = view.upstreams
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /export HTTP/1.1\r\nHost: a.test\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        await started.wait()
        assert fleet.end_long_lived("a", machine) == 0  # the drain begins: left to run
        assert fleet.end_long_lived("a", machine, everything=True) == 1  # its time is up
        async with asyncio.timeout(BOUND_S):  # not upstream_timeout_s (60 s)
            got = await reader.read(-1)  # to the connection's end
        if sized:
            assert got.endswith(b'{"n": 0}\n')  # the first half of the body, no more
        else:
            assert not got.endswith(b"0\r\n\r\n")  # cut, never ended as if whole
    finally:
        finish.set()
        writer.close()
    await until(lambda: view.in_flight == 0, what="the slot given back")


async def test_a_shutdown_ends_event_streams_at_once_and_lets_downloads_finish(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    """An event stream never ends by itself: a shutdown held it until
    shutdown_timeout_s, then cut it mid-body. It ends cleanly at once now (its client
    reconnects elsewhere), and the proxy's stop does not wait for it."""
    addr = await backend(long_lived_app())
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [addr]}], shutdown_timeout_s=30
    )
    async with session.get(url(proxy, "/stream"), headers={"Host": "a.test"}) as resp:
        await resp.content.readuntil(b"\n\n")
        await asyncio.wait_for(proxy.stop(), 10)  # not the 30 s of shutdown_timeout_s
        rest = await resp.read()  # a whole chunked body: a cut one would raise here
    assert rest.count(b"data: ") < 10_000


async def test_an_event_stream_whose_answer_comes_after_stop_began_ends_at_once_too(
    raw_backend: RawBackend, start_proxy: StartProxy, fleet: FleetView
) -> None:
    """stop() ends the event streams it finds; one whose head comes later (its request
    was held for a wake when SIGTERM came, or its machine was slow to answer) ran on
    until shutdown_timeout_s and was cut mid-body. It ends cleanly at once too."""
    answer = asyncio.Event()

    async def late_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await answer.wait()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n9\r\ndata: 0\n\n\r\n"
        )
        await writer.drain()
        await reader.read()  # then nothing more, until the proxy closes

    addr = await raw_backend(late_stream)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [addr]}], shutdown_timeout_s=30
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET /feed HTTP/1.1\r\nHost: a.test\r\n\r\n")
        await writer.drain()
        await until(lambda: fleet.app("a").in_flight == 1)
        stopping = asyncio.create_task(proxy.stop())
        await until(lambda: not proxy.accepting)
        answer.set()
        async with asyncio.timeout(10):  # not the 30 s of shutdown_timeout_s
            got = await reader.read(-1)  # to the connection's end
            await stopping
        assert got.startswith(b"HTTP/1.1 200 ")
        assert got.endswith(b"\r\n0\r\n\r\n")  # a whole chunked body, not a cut one
    finally:
        writer.close()


def late_app(answer: asyncio.Event, more: asyncio.Event) -> web.Application:
    """A machine slow to answer: its WebSocket handshake and its event stream's head come
    once ``answer`` is set; the stream's second event once ``more`` is."""

    async def ws(request: web.Request) -> web.WebSocketResponse:
        await answer.wait()
        return await upper_echo(request)

    async def stream(request: web.Request) -> web.StreamResponse:
        await answer.wait()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 0\n\n")
        await more.wait()
        await resp.write(b"data: 1\n\n")
        await asyncio.sleep(3600)  # then nothing, until the client goes
        return resp

    app = web.Application()
    app.router.add_get("/ws", ws)
    app.router.add_get("/stream", stream)
    return app


def cordon(view: AppView, machine: str, cordoned: bool) -> None:
    """What the controller's drain shows the proxy: the machine out of routing (its
    start), or back in (the drain taken back)."""
    up = view.upstreams[machine]
    view.set_machines([MachineInfo(machine, up.host, up.port, STARTED, cordoned)])


async def test_what_begins_on_a_machine_after_its_drain_ended_its_long_lived_ends_at_once(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    """A drain ends the WebSockets and event streams it finds on the machine; a request
    already sent there whose handshake or event stream's head came later ran on until
    drain_timeout_s (30 s by default), holding the suspend up. It ends at once too."""
    answer, more = asyncio.Event(), asyncio.Event()
    addr = await backend(late_app(answer, more))
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    view = fleet.app("a")
    [machine] = view.upstreams
    host = {"Host": "a.test"}
    connecting = asyncio.ensure_future(session.ws_connect(url(proxy, "/ws"), headers=host))
    streaming = asyncio.ensure_future(session.get(url(proxy, "/stream"), headers=host))
    try:
        await until(lambda: view.in_flight == 2, what="both requests sent to the machine")
        cordon(view, machine, True)  # the drain begins
        assert fleet.end_long_lived("a", machine) == 0  # nothing begun there yet
        answer.set()
        async with asyncio.timeout(BOUND_S):  # not the drain's timeout
            ws = await connecting
            msg = await ws.receive()
            resp = await streaming
            await resp.read()  # a whole chunked body: a cut one would raise here
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
        assert resp.status == 200
    finally:
        more.set()
        connecting.cancel()
        streaming.cancel()
        for got in await asyncio.gather(connecting, streaming, return_exceptions=True):
            if isinstance(got, aiohttp.ClientWebSocketResponse):
                await got.close()
            elif isinstance(got, aiohttp.ClientResponse):
                got.release()
    await until(lambda: view.in_flight == 0, what="both slots given back")


async def test_a_drain_taken_back_lets_the_machines_new_long_lived_connections_run(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    """While the drain lasts, an event stream that begins on the machine ends at once;
    once the drain is taken back (the machine routed again, warm), its WebSockets and
    event streams run as on any other machine."""
    answer, more = asyncio.Event(), asyncio.Event()
    addr = await backend(late_app(answer, more))
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    view = fleet.app("a")
    [machine] = view.upstreams
    host = {"Host": "a.test"}
    streaming = asyncio.ensure_future(session.get(url(proxy, "/stream"), headers=host))
    try:
        await until(lambda: view.in_flight == 1, what="the request sent to the machine")
        cordon(view, machine, True)  # the drain begins
        fleet.end_long_lived("a", machine)
        answer.set()
        async with asyncio.timeout(BOUND_S):  # not the drain's timeout
            async with await streaming as resp:
                await resp.read()  # ended at once, whole
    finally:
        streaming.cancel()
    cordon(view, machine, False)  # taken back
    async with session.ws_connect(url(proxy, "/ws"), headers=host) as ws:
        await ws.send_str("hi")
        assert await ws.receive_str() == "HI"  # not a close frame 1001
        async with session.get(url(proxy, "/stream"), headers=host) as resp:
            assert await resp.content.readuntil(b"\n\n") == b"data: 0\n\n"
            more.set()
            assert await resp.content.readuntil(b"\n\n") == b"data: 1\n\n"
        await ws.send_str("still")
        assert await ws.receive_str() == "STILL"
    await until(lambda: view.in_flight == 0, what="the slots given back")


async def test_an_answer_that_begins_after_a_drains_deadline_is_cut_unless_it_came_whole(
    raw_backend: RawBackend, start_proxy: StartProxy, fleet: FleetView
) -> None:
    """The drain's deadline cuts the downloads it finds, and the machine is suspended right
    after. A request sent there before, whose answer's head came only after that, ran on:
    the machine was suspended under its body, and its client waited for the rest until
    upstream_timeout_s. An answer whose body is still coming when its head arrives is cut
    at once now, chunked or with a Content-Length; one that came whole is served.

    The cut answers the requests still waiting for their heads itself (the next test):
    a head comes after it only when it arrived as the cut ran (read, its request's task
    not yet resumed) or its connection was still being made. No test lands in that loop
    turn, so the machine is left here as the cut leaves it, by hand."""
    answer, last = asyncio.Event(), asyncio.Event()
    sent: list[bytes] = []
    heads = {
        b"/chunked": b"Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n",
        b"/sized": b"Content-Length: 10\r\n\r\nfirst",
        b"/small": b"Content-Length: 5\r\n\r\nwhole",
    }
    rests = {b"/chunked": b"4\r\nlast\r\n0\r\n\r\n", b"/sized": b"last!", b"/small": b""}

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = (await reader.readuntil(b"\r\n\r\n")).split(b" ", 2)[1]
        await answer.wait()
        # Head and body in one write: the small answer comes whole.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + heads[target])
        await writer.drain()
        await last.wait()
        writer.write(rests[target])
        sent.append(target)
        await reader.read()

    addr = await raw_backend(slow)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [addr]}], upstream_timeout_s=3600
    )
    view = fleet.app("a")
    [machine] = view.upstreams
    clients = {target: await asyncio.open_connection("127.0.0.1", proxy.port) for target in heads}
    try:
        for target, (_, writer) in clients.items():
            writer.write(b"GET %b HTTP/1.1\r\nHost: a.test\r\n\r\n" % target)
        await until(lambda: view.in_flight == 3, what="the requests sent to the machine")
        cordon(view, machine, True)  # the drain begins
        assert fleet.end_long_lived("a", machine) == 0
        assert view.upstreams[machine].ending
        view.upstreams[machine].cut_off = True  # the drain's deadline passed (see above)
        answer.set()
        async with asyncio.timeout(BOUND_S):  # not upstream_timeout_s
            chunked = await clients[b"/chunked"][0].read(-1)  # to the connection's end
            sized = await clients[b"/sized"][0].read(-1)
            status, _, small = await read_response(clients[b"/small"][0])
        assert sent == []  # all of it before the machine sent the rest of any answer
        assert chunked.startswith(b"HTTP/1.1 200 ")
        assert not chunked.endswith(b"0\r\n\r\n")  # cut, never ended as if whole
        assert sized.startswith(b"HTTP/1.1 200 ")
        assert len(sized.partition(b"\r\n\r\n")[2]) < 10  # cut: short of its Content-Length
        assert (status, small) == (200, b"whole")
    finally:
        last.set()
        for _, writer in clients.values():
            writer.close()
    await until(lambda: view.in_flight == 0, what="the slots given back")
    assert proxy._streams == {}


async def test_a_request_still_waiting_for_its_answer_at_a_drains_deadline_gets_502_at_once(
    raw_backend: RawBackend, start_proxy: StartProxy, fleet: FleetView, metrics: Metrics
) -> None:
    """The drain's deadline cuts what its machine still sends, and the machine is
    suspended right after. A request sent there whose answer had not begun (the machine
    slow to answer) was tracked nowhere: its client waited upstream_timeout_s for a 504
    from a suspended machine. It gets a 502 at once now, its request not sent again (it
    may have had its effect: a POST), whether it was sent whole or its body was still
    coming; its connection to the machine is closed and its slot given back, once. (A GET
    is sent again: see the test after this one.)"""
    heads: list[bytes] = []
    closed: list[bytes] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"POST /upload"):
            await reader.readexactly(5)  # the half of its body sent so far
        heads.append(head)
        closed.append(await reader.read())  # never answers: until the proxy closes

    addr = await raw_backend(mute)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [addr]}], upstream_timeout_s=3600
    )
    view = fleet.app("a")
    [machine] = view.upstreams
    requests = {
        "sent": b"POST /report HTTP/1.1\r\nHost: a.test\r\n\r\n",  # no body: sent whole
        # Half of its body: the rest is still to come when the machine goes down.
        "uploading": b"POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\n\r\nhalf.",
    }
    clients = {name: await asyncio.open_connection("127.0.0.1", proxy.port) for name in requests}
    try:
        for name, (_, writer) in clients.items():
            writer.write(requests[name])
        await until(lambda: len(heads) == 2, what="both requests at the machine, one in part")
        cordon(view, machine, True)  # the drain begins
        assert fleet.end_long_lived("a", machine) == 0  # no answer begun: left to come
        assert view.in_flight == 2
        assert fleet.end_long_lived("a", machine, everything=True) == 2  # its time is up
        async with asyncio.timeout(BOUND_S):  # not upstream_timeout_s
            answers = {name: await read_response(reader) for name, (reader, _) in clients.items()}
        for status, headers, body in answers.values():
            assert status == 502
            assert headers["x-request-id"]
            assert body == b"the machine was drained before it answered\n"
        await until(lambda: len(closed) == 2, what="the connections to the machine closed")
        assert len(heads) == 2  # neither sent again
        assert closed == [b"", b""]  # nor the body's rest
    finally:
        for _, writer in clients.values():
            writer.close()
    await until(lambda: view.in_flight == 0, what="the slots given back")
    assert view.upstreams[machine].in_flight == 0  # each given back once: never below 0
    assert proxy._pool is not None
    assert proxy._pool._waiting == {}
    assert proxy._budget.held == 0
    assert (
        metrics.registry.get_sample_value(
            "autoscaler_requests_total", {"app": "a", "code": "502", "wake": "none"}
        )
        == 2
    )


@pytest.mark.parametrize("case", ["elsewhere", "held", "after-1xx", "sent-twice"])
async def test_a_get_still_waiting_for_its_answer_at_a_drains_deadline_is_sent_again_once(
    raw_backend: RawBackend,
    backend: Backend,
    start_proxy: StartProxy,
    fleet: FleetView,
    metrics: Metrics,
    case: str,
) -> None:
    """A GET (idempotent, no body) whose machine had not begun to answer at its drain's
    deadline got the cut's 502, although another machine would serve it, where one whose
    connection was lost the same way is sent again. It is sent again now, once, the same
    way: to another machine (elsewhere), or held until one routes (held). Not after a 1xx
    reached its client, nor when it was sent twice already (its pooled connection lost
    under it: upstream.send sent it again): those get the cut's 502."""
    heads: list[bytes] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                heads.append(head)
                if head.startswith(b"GET /warm"):  # leaves this connection in the pool
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nwarm")
                    continue
                if case == "sent-twice" and len(heads) == 2:
                    writer.transport.abort()  # the pooled connection lost under the GET
                    return
                if case == "after-1xx":
                    writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
                await reader.read()  # never answers: until the proxy closes
                return

    m1 = parse_host_port(await raw_backend(mute))
    m2 = parse_host_port(await backend(text_app("m2")))
    view = fleet.app("a")
    view.set_machines([MachineInfo("m1", m1.host, m1.port, STARTED, False)])
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"]}], upstream_timeout_s=3600)
    cordoned = MachineInfo("m1", m1.host, m1.port, STARTED, True)
    other = MachineInfo("m2", m2.host, m2.port, STARTED, False)
    with capture_logs() as logs:
        async with connect(proxy.port) as (reader, writer):
            if case == "sent-twice":
                writer.write(b"GET /warm HTTP/1.1\r\nHost: a.test\r\n\r\n")
                assert (await read_response(reader))[2] == b"warm"
            writer.write(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            sent = 3 if case == "sent-twice" else 1
            await until(lambda: len(heads) == sent, what="the GET at the machine")
            if case == "after-1xx":
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 103 ")
            # The drain begins; another machine serves the app (held: none yet).
            view.set_machines([cordoned] if case == "held" else [cordoned, other])
            assert fleet.end_long_lived("a", "m1", everything=True) == 1  # its time is up
            if case == "held":
                await until(lambda: view.queued == 1, what="the GET held for a machine")
                view.set_machines([cordoned, other])
            status, _, body = await read_response(reader)
    replayed = [e["machine"] for e in logs if e["event"] == "request_replayed"]
    if case in ("elsewhere", "held"):
        assert (status, body, replayed) == (200, b"m2", ["m1"])
    else:
        assert (status, body, replayed) == (
            502,
            b"the machine was drained before it answered\n",
            [],
        )
    assert len(heads) == sent  # never a second time to m1
    await until(lambda: view.in_flight == 0, what="the slots given back")
    assert view.upstreams["m1"].in_flight == 0  # given back once: never below 0
    assert view.upstreams["m1"].failing == 0  # no verdict: the proxy gave up, not m1
    code = "200" if case in ("elsewhere", "held") else "502"
    count = metrics.registry.get_sample_value
    assert count("autoscaler_requests_total", {"app": "a", "code": code, "wake": "none"}) == 1


@pytest.mark.parametrize("static", [True, False], ids=["static", "scaled"])
async def test_a_request_still_connecting_to_its_machine_at_a_drains_deadline_goes_on_at_once(
    backend: Backend, start_proxy: StartProxy, fleet: FleetView, metrics: Metrics, static: bool
) -> None:
    """The drain's cut found the requests waiting for their answers, not one whose
    connection to the machine was still being made (a machine slow to accept: its accept
    queue is full, so the SYN is dropped). That one was sent once connected, to a machine
    about to go down, and its client waited up to connect_timeout_s, then
    upstream_timeout_s. Its connect is given up at the cut, and, nothing sent, it goes on
    at once as a request whose connect failed: to another machine (a scaled app's, started
    meanwhile), or, its static app having none, held for one like any other request, and
    its 502 when none comes within its (short) wake_timeout_s. No verdict on the machine:
    the proxy gave up, not the machine."""
    with unanswering_port() as (port, _):
        if static:
            machine = f"127.0.0.1:{port}"
            app: dict[str, Any] = {
                "name": "a",
                "hosts": ["a.test"],
                "backends": [machine],
                "wake_timeout_s": 1,
            }
        else:
            machine = "m1"
            fleet.app("a").set_machines([MachineInfo(machine, "127.0.0.1", port, STARTED, False)])
            app = {"name": "a", "hosts": ["a.test"]}
        proxy = await start_proxy([app], connect_timeout_s=3600, upstream_timeout_s=3600)
        view = fleet.app("a")
        async with connect(proxy.port) as (reader, writer):
            writer.write(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            await until(lambda: view.in_flight == 1, what="the connect to the machine under way")
            up = view.upstreams[machine]
            if static:
                cordon(view, machine, True)  # the drain begins
            else:  # the drain begins, and another machine serves the app
                other = parse_host_port(await backend(text_app("m2")))
                view.set_machines(
                    [
                        MachineInfo(machine, "127.0.0.1", port, STARTED, True),
                        MachineInfo("m2", other.host, other.port, STARTED, False),
                    ]
                )
            assert fleet.end_long_lived("a", machine) == 0  # nothing begun: left to come
            assert fleet.end_long_lived("a", machine, everything=True) == 1  # time is up
            status, _, body = await read_response(reader)  # not connect_timeout_s
        if static:
            assert (status, body) == (502, b"no machine of this app is reachable\n")
        else:
            assert (status, body) == (200, b"m2")
    await until(lambda: view.in_flight == 0, what="the slot given back")
    assert up.in_flight == 0  # given back once: never below 0
    assert up.unhealthy_until == 0.0  # not skipped: the machine did not fail
    assert up.failing == 0
    assert proxy._pool is not None
    assert proxy._pool._connecting == {}
    code = "502" if static else "200"
    assert (
        metrics.registry.get_sample_value(
            "autoscaler_requests_total", {"app": "a", "code": code, "wake": "none"}
        )
        == 1
    )


@pytest.mark.parametrize("moved_by", ["reload", "api"])
async def test_a_request_sent_to_its_machines_old_address_is_cut_at_the_drains_deadline(
    raw_backend: RawBackend, start_proxy: StartProxy, fleet: FleetView, moved_by: str
) -> None:
    """The cut looked for the requests sent to the machine's address as it is at the
    drain's deadline. A reload that changed ``apps[].port`` meanwhile (or the API that
    reported a new address for the machine) moved that address: the requests sent to the
    old one were missed, and their clients waited upstream_timeout_s for a 504 from a
    suspended machine. They get the cut's 502 at once too (a POST: a GET would be sent
    again, see above)."""
    heads: list[bytes] = []
    closed: list[bytes] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        closed.append(await reader.read())  # never answers: until the proxy closes

    old_port = int((await raw_backend(mute)).rpartition(":")[2])
    new_port = free_port()  # nothing listens there: nothing is sent there either
    app: dict[str, Any] = {"name": "a", "hosts": ["a.test"]}
    if moved_by == "reload":
        app["port"] = old_port  # beats the machine's internal_port (1, wrong on purpose)
    machine = MachineInfo(
        "m1", "127.0.0.1", 1 if moved_by == "reload" else old_port, STARTED, False
    )
    view = fleet.app("a")
    view.set_machines([machine])
    proxy = await start_proxy([app], upstream_timeout_s=3600)
    async with connect(proxy.port) as (reader, writer):
        writer.write(b"POST /report HTTP/1.1\r\nHost: a.test\r\n\r\n")
        await until(lambda: len(heads) == 1, what="the request at the machine")
        if moved_by == "reload":
            moved = AppConfig(name="a", hosts=["a.test"], port=new_port)
            proxy.update_settings(Settings(proxy=proxy.settings.proxy, apps=[moved]))
            view.set_machines([dataclasses.replace(machine, cordoned=True)])  # drain begins
        else:
            view.set_machines([MachineInfo("m1", "127.0.0.1", new_port, STARTED, True)])
        assert fleet.end_long_lived("a", "m1") == 0  # no answer begun: left to come
        assert fleet.end_long_lived("a", "m1", everything=True) == 1  # its time is up
        status, _, body = await read_response(reader)  # not upstream_timeout_s
    assert (status, body) == (502, b"the machine was drained before it answered\n")
    await until(lambda: closed == [b""], what="the connection to the machine closed")
    assert len(heads) == 1  # not sent again
    await until(lambda: view.in_flight == 0, what="the slot given back")


async def test_an_idle_websocket_stops_counting_as_load_until_its_next_frame(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    addr = await backend(long_lived_app())
    app = {"name": "a", "hosts": ["a.test"], "backends": [addr], "connection_idle_s": 0.2}
    proxy = await start_proxy([app])
    view = fleet.app("a")
    [up] = view.upstreams.values()
    async with session.ws_connect(url(proxy, "/ws"), headers={"Host": "a.test"}) as ws:
        await ws.send_str("hi")
        assert await ws.receive_str() == "HI"
        assert view.in_flight == 1
        await until(lambda: view.in_flight == 0, what="the idle WebSocket to give its slot back")
        assert up.long_lived == 1  # not load, but a drain would end it: scale-downs know
        await ws.send_str("again")
        assert await ws.receive_str() == "AGAIN"
        assert view.in_flight == 1  # in use again
        await ws.close()
    await until(lambda: view.in_flight == 0, what="the slot given back once")
    assert view.in_flight == 0
    await until(lambda: up.long_lived == 0, what="the WebSocket counted out")


async def test_a_quiet_stream_keeps_counting_as_load_when_an_idle_websocket_stops(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    """connection_idle_s is for WebSockets only: an SSE client reconnects as soon as its
    stream ends, so a quiet stream keeps the app awake (docs/policy.md)."""
    addr = await backend(long_lived_app())
    app = {"name": "a", "hosts": ["a.test"], "backends": [addr], "connection_idle_s": 0.2}
    proxy = await start_proxy([app])
    view = fleet.app("a")
    async with (
        session.ws_connect(url(proxy, "/ws"), headers={"Host": "a.test"}) as ws,
        session.get(url(proxy, "/quiet"), headers={"Host": "a.test"}) as resp,
    ):
        assert await resp.content.readuntil(b"\n\n") == b"data: hello\n\n"
        await ws.send_str("hi")
        assert await ws.receive_str() == "HI"
        assert view.in_flight == 2
        # The stream has been quiet longer than the WebSocket: once the WebSocket went
        # dormant, the stream was quiet for connection_idle_s too.
        [relay] = proxy._tunnels
        await until(lambda: relay.dormant, what="the idle WebSocket to go dormant")
        assert view.in_flight == 1  # the stream's slot


def pinging_app(pongs: list[bytes]) -> web.Application:
    """A WebSocket server that pings its client on a timer, as uvicorn does every 20 s,
    and records the pongs; it answers text in upper case."""

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse(autoping=False)
        await sock.prepare(request)

        async def ping() -> None:
            for n in itertools.count():
                await sock.ping(b"%d" % n)
                await asyncio.sleep(0.02)  # the server's ping interval

        pinging = asyncio.create_task(ping())
        try:
            async for msg in sock:
                if msg.type is WSMsgType.PONG:
                    pongs.append(msg.data)
                elif msg.type is WSMsgType.PING:
                    await sock.pong(msg.data)
                elif msg.type is WSMsgType.TEXT:
                    await sock.send_str(msg.data.upper())
        finally:
            pinging.cancel()
        return sock

    app = web.Application()
    app.router.add_get("/ws", ws)
    return app


async def test_pings_and_pongs_do_not_keep_a_websocket_in_use(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession, fleet: FleetView
) -> None:
    """Control frames are not use: a server that pings (uvicorn, every 20 s by default)
    and its client's pongs kept an idle WebSocket counted as load for good, so its app
    never slept. Only data frames (text, binary) take the slot back."""
    pongs: list[bytes] = []
    addr = await backend(pinging_app(pongs))
    app = {"name": "a", "hosts": ["a.test"], "backends": [addr], "connection_idle_s": 0.2}
    proxy = await start_proxy([app])
    view = fleet.app("a")
    async with session.ws_connect(url(proxy, "/ws"), headers={"Host": "a.test"}) as ws:
        await ws.send_str("hi")
        assert await ws.receive_str() == "HI"
        assert view.in_flight == 1
        # From now on only pings from the machine and the client's pongs (aiohttp answers
        # them while receive() waits), and pings of the client's own, answered by the machine.
        reading = asyncio.create_task(ws.receive())
        await until(lambda: view.in_flight == 0, what="the WebSocket to give its slot back")
        seen = len(pongs)
        await ws.ping(b"client's ping")
        await until(lambda: len(pongs) >= seen + 3, what="more pongs to reach the machine")
        assert view.in_flight == 0  # still idle: pongs, and a ping, are no frames of use
        await ws.send_str("again")
        msg = await reading
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "AGAIN")
        assert view.in_flight == 1  # a data frame: in use again
    await until(lambda: view.in_flight == 0, what="the slot given back once")


async def test_a_websocket_closed_by_its_handshake_is_not_held_by_its_close_timer(
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The close handshake's deadline (CLOSE_TIMEOUT_S) is cancelled when the tunnel
    ends: the timer held the tunnel, both connections and their buffers for 10 s after
    every WebSocket that closed cleanly (here for good, to tell)."""
    monkeypatch.setattr(tunnel, "CLOSE_TIMEOUT_S", 1e6)
    addr = await backend(long_lived_app())
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    async with session.ws_connect(url(proxy, "/ws"), headers={"Host": "a.test"}) as ws:
        await ws.send_str("hi")
        assert await ws.receive_str() == "HI"
        [relay] = proxy._tunnels
        gone = weakref.ref(relay)
        del relay
    # The client's close frame went by (the deadline set), the machine answered, and the
    # tunnel ended.
    await until(lambda: not proxy._tunnels, what="the tunnel to end")
    await until(lambda: (gc.collect(), gone() is None)[1], what="the tunnel to be freed")


async def test_after_a_drains_close_the_client_may_still_send_until_it_answers(
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The proxy's 1001 went out both ways; the client's side stays open until the client
    answers with its close (RFC 6455 7.1.1). It was closed at once: a client that sent a
    frame before reading the 1001 got "Cannot write to closing transport" (found by the
    chaos soak, benchmarks/chaos_soak.py)."""
    monkeypatch.setattr(tunnel, "EOF_LINGER_S", 1e6)  # only the client's answer ends it
    heard: list[str] = []
    machine_done = asyncio.Event()

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            heard.append(msg.data)
            await sock.send_str(msg.data.upper())
        machine_done.set()  # our 1001 came: it answered and closed
        return sock

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    addr = await backend(app)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    async with session.ws_connect(url(proxy, "/ws"), headers={"Host": "a.test"}) as ws:
        await ws.send_str("hi")
        assert await ws.receive_str() == "HI"
        assert proxy.end_long_lived("a", addr) == 1
        await asyncio.wait_for(machine_done.wait(), BOUND_S)
        assert len(proxy._tunnels) == 1  # waiting for the client's answer
        await ws.send_str("more")  # sent before reading the 1001: not an error
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
    await until(lambda: not proxy._tunnels, what="the tunnel to end on the client's close")
    assert heard == ["hi"]  # what came after the cut did not reach the machine


async def test_a_drains_deadline_leaves_a_download_whose_machine_sent_all_of_it(
    raw_backend: RawBackend, start_proxy: StartProxy, fleet: FleetView
) -> None:
    """The deadline cuts the downloads still coming from the machine, which is suspended
    right after. One the machine has sent whole (its last bytes held by the proxy for a
    slow client, the slot given back already) needs nothing more of the machine: it was
    cut all the same, its client's connection dropped short of the end."""
    size = 16 * 1024 * 1024
    block = b"x" * 65536

    async def download(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        await reader.read()

    addr = await raw_backend(download)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # a slow client's socket
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proxy.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=65536)
    try:
        writer.write(b"GET /export HTTP/1.1\r\nHost: a.test\r\n\r\n")
        _, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
        assert headers["content-length"] == [str(size)]
        got = 0
        [body] = proxy._streams[addr]
        while not body.done:  # read slowly, until the machine's last byte is at the proxy
            chunk = await reader.read(65536)
            assert chunk, "cut before the machine sent all of it"
            got += len(chunk)
        assert addr in proxy._streams  # still relayed: the client is behind
        assert fleet.app("a").in_flight == 0  # the machine's part is over
        fleet.end_long_lived("a", addr, everything=True)
        async with asyncio.timeout(BOUND_S):
            while got < size and (chunk := await reader.read(size - got)):
                got += len(chunk)  # (cut: b"" before the end)
        assert got == size  # whole, not cut
    finally:
        writer.close()
    assert proxy._streams == {}
