"""Expect: 100-continue goes on to the machine, which decides whether the body comes: its
100 reaches the client (relayed, with Via), and then the body goes; its final answer
before any 100 reaches the client instead, the body is never sent, and the client's
connection closes after the answer (the proxy cannot tell the body it did not ask for
from a next request). A machine that says nothing (one that ignores Expect) gets the body
after the proxy's own 100, ``forward.CONTINUE_WAIT_S`` later, and a client that sends its
body without waiting has it sent at once (RFC 9110 10.1.1). Any other expectation is
answered 417 by the proxy. In an HTTP/1.0 request, Expect is ignored (RFC 9110 10.1.1);
in one of a version the proxy does not serve, the version is refused (505) first. A machine
whose last answer was HTTP/1.0 (a server that sends no 100) gets no Expect: the proxy sends
the client its own 100 at once, until the machine starts again; nor does one not heard from
yet whose app's last answer, from any machine, was HTTP/1.0."""

from __future__ import annotations

import asyncio
from contextlib import suppress

import pytest
from testkit import until

from autoscaler.control.view import FleetView, MachineInfo
from autoscaler.proxy import forward
from autoscaler.scaling.fleet import STARTED

from .conftest import RawBackend, StartProxy, StreamHandler
from .helpers import BOUND_S, connect, parse_head, raw, reply_status
from .test_wake import FakeWaker

POST = b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
GET = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def proxy_to(raw_backend: RawBackend, start_proxy: StartProxy, serve: StreamHandler) -> int:
    addr = await raw_backend(serve)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    return proxy.port


async def through(port: int, request: bytes) -> dict[str, list[str]]:
    """``request`` through the proxy, with its body of 5 bytes after the 100 if a POST
    (``POST``: with Expect): the 100's headers (none for another), then the answer, 200 ok."""
    async with connect(port) as (reader, writer):
        writer.write(request)
        async with asyncio.timeout(BOUND_S):
            status, continued = parse_head(await reader.readuntil(b"\r\n\r\n"))
            if request.startswith(b"POST "):
                assert status == 100
                writer.write(b"hello")
                status, _ = parse_head(await reader.readuntil(b"\r\n\r\n"))
            assert status == 200
            assert await reader.readexactly(2) == b"ok"
    return continued


async def test_a_final_answer_before_the_100_goes_to_the_client_and_no_body_is_sent(
    raw_backend: RawBackend, start_proxy: StartProxy
) -> None:
    """A 401 (or 413) without a 100: the client is not told to send its body (it was,
    at once, before), the machine never gets a byte of it, and the client's connection
    closes cleanly after the answer."""
    heads: list[bytes] = []
    after: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nnope")
        await writer.drain()
        after.set_result(await reader.read())  # what came after the head, to the close

    port = await proxy_to(raw_backend, start_proxy, serve)
    async with connect(port) as (reader, writer):
        writer.write(POST)
        async with asyncio.timeout(BOUND_S):
            status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
            assert status == 401
            assert headers["connection"] == ["close"]
            assert await reader.readexactly(4) == b"nope"
            assert await reader.read() == b""  # closed after the answer
    assert b"\r\nExpect: 100-continue\r\n" in heads[0]
    # The proxy closes its connection to the machine too, which got no byte of the body.
    assert await asyncio.wait_for(after, BOUND_S) == b""


async def test_the_machines_100_reaches_the_client_then_the_body_goes(
    raw_backend: RawBackend, start_proxy: StartProxy
) -> None:
    bodies: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\nX-Machine: m1\r\n\r\n")
        await writer.drain()
        bodies.append(await reader.readexactly(5))
        writer.write(OK)
        await writer.drain()
        await reader.read()

    port = await proxy_to(raw_backend, start_proxy, serve)
    async with connect(port) as (reader, writer):
        writer.write(POST)
        async with asyncio.timeout(BOUND_S):
            status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
            assert status == 100
            assert headers["x-machine"] == ["m1"]  # the machine's own, relayed
            assert headers["via"] == ["1.1 autoscaler"]
            writer.write(b"hello")
            status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
            assert status == 200
            assert await reader.readexactly(2) == b"ok"
            assert "connection" not in headers  # kept alive: the body was whole
    assert bodies == [b"hello"]


async def test_a_held_request_gets_no_100_before_its_machine_sends_one(
    raw_backend: RawBackend, start_proxy: StartProxy, fleet: FleetView
) -> None:
    """Held for a wake, the request is sent nowhere and told nothing: the first thing its
    client hears is the woken machine's 100."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\nX-Machine: m1\r\n\r\n")
        await writer.drain()
        assert await reader.readexactly(5) == b"hello"
        writer.write(OK)
        await writer.drain()
        await reader.read()

    host, _, port = (await raw_backend(serve)).partition(":")
    fleet.app("w").set_machines([MachineInfo("m1", host, int(port), "suspended", False)])
    waker = FakeWaker(fleet, "resume")
    fleet.set_waker(waker)
    proxy = await start_proxy([{"name": "w", "hosts": ["w.test"]}])
    async with connect(proxy.port) as (reader, writer):
        writer.write(POST.replace(b"a.test", b"w.test"))
        await until(lambda: fleet.app("w").queued == 1 and waker.calls == 1)
        waker.release.set()
        async with asyncio.timeout(BOUND_S):
            status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
            assert (status, headers["x-machine"]) == (100, ["m1"])
            writer.write(b"hello")
            status, _ = parse_head(await reader.readuntil(b"\r\n\r\n"))
            assert status == 200
            assert await reader.readexactly(2) == b"ok"


async def test_a_machine_that_ignores_expect_gets_the_body_after_the_proxys_own_100(
    raw_backend: RawBackend, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(forward, "CONTINUE_WAIT_S", 0.05)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        assert await reader.readexactly(5) == b"hello"  # waits for the body, no 100
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)  # a late 100: not relayed
        await writer.drain()
        await reader.read()

    port = await proxy_to(raw_backend, start_proxy, serve)
    async with connect(port) as (reader, writer):
        writer.write(POST)
        async with asyncio.timeout(BOUND_S):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"hello")
            status, _ = parse_head(await reader.readuntil(b"\r\n\r\n"))
            assert status == 200
            assert await reader.readexactly(2) == b"ok"


async def test_a_body_sent_without_waiting_goes_at_once(
    raw_backend: RawBackend, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client need not wait for the 100: its body goes as it comes, with no wait for
    the machine's word (longer than this test may take)."""
    monkeypatch.setattr(forward, "CONTINUE_WAIT_S", 1e6)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        assert await reader.readexactly(5) == b"hello"
        writer.write(OK)
        await writer.drain()
        await reader.read()

    port = await proxy_to(raw_backend, start_proxy, serve)
    async with connect(port) as (reader, writer):
        writer.write(POST + b"hello")
        async with asyncio.timeout(BOUND_S):
            status, _ = parse_head(await reader.readuntil(b"\r\n\r\n"))
            assert status == 200
            assert await reader.readexactly(2) == b"ok"


async def test_an_expectation_other_than_100_continue_is_answered_417(
    raw_backend: RawBackend, start_proxy: StartProxy
) -> None:
    """The proxy knows one expectation: any other, alone, in a list or in a second Expect
    field, was dropped and the request went to the machine as if the client had required
    nothing. It is answered 417 (RFC 9110 10.1.1), the connection closes, the machine is
    never asked; 100-continue in a list, with empty members, still goes on."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        assert await reader.readexactly(5) == b"hello"
        writer.write(OK)
        await writer.drain()
        await reader.read()

    port = await proxy_to(raw_backend, start_proxy, serve)
    for expect in [b"x-fancy", b"100-continue, x-fancy", b"100-continue\r\nExpect: X-Fancy=1"]:
        async with connect(port) as (reader, writer):
            writer.write(POST.replace(b"100-continue", expect))
            async with asyncio.timeout(BOUND_S):
                status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
                assert status == 417, expect
                assert headers["connection"] == ["close"]
                await reader.read()  # then closed
    async with connect(port) as (reader, writer):
        writer.write(POST.replace(b"100-continue", b", 100-Continue ,"))
        async with asyncio.timeout(BOUND_S):
            status, _ = parse_head(await reader.readuntil(b"\r\n\r\n"))
            assert status == 100
            writer.write(b"hello")
            status, _ = parse_head(await reader.readuntil(b"\r\n\r\n"))
            assert status == 200
    assert len(heads) == 1  # the 417s reached no machine
    assert b"\r\nExpect: 100-continue\r\n" in heads[0]


async def test_an_http10_requests_100_continue_is_ignored(
    raw_backend: RawBackend, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Expect is HTTP/1.1's: a server must ignore 100-continue in an HTTP/1.0 request
    (RFC 9110 10.1.1), whose client knows no 100. The machine gets the head without
    Expect at once, then the body as the client sends it, with no wait for a 100 (longer
    than this test may take); the client gets the answer and no 100."""
    monkeypatch.setattr(forward, "CONTINUE_WAIT_S", 1e6)
    heads: list[bytes] = []
    bodies: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        bodies.append(await reader.readexactly(5))
        writer.write(OK)
        await writer.drain()
        await reader.read()

    port = await proxy_to(raw_backend, start_proxy, serve)
    async with connect(port) as (reader, writer):
        writer.write(POST.replace(b"HTTP/1.1", b"HTTP/1.0"))
        await until(lambda: len(heads) == 1, what="the head at the machine")
        writer.write(b"hello")
        async with asyncio.timeout(BOUND_S):
            status, _ = parse_head(await reader.readuntil(b"\r\n\r\n"))
            assert status == 200
            assert await reader.read() == b"ok"  # then closed: HTTP/1.0
    assert bodies == [b"hello"]
    assert b"\r\nexpect:" not in heads[0].lower()


async def test_an_http10_requests_other_expectation_is_ignored(
    raw_backend: RawBackend, start_proxy: StartProxy
) -> None:
    """Not answered 417 as in HTTP/1.1 (it was): any expectation of an HTTP/1.0 request,
    alone or with 100-continue, is ignored, the request served and sent without Expect."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with suppress(asyncio.IncompleteReadError):  # one connection, kept alive
            while True:
                heads.append(await reader.readuntil(b"\r\n\r\n"))
                assert await reader.readexactly(5) == b"hello"
                writer.write(OK)
                await writer.drain()

    port = await proxy_to(raw_backend, start_proxy, serve)
    post = POST.replace(b"HTTP/1.1", b"HTTP/1.0")
    for expect in [b"something-else", b"100-continue, x-fancy", b"100-continue\r\nExpect: x"]:
        async with connect(port) as (reader, writer):
            writer.write(post.replace(b"100-continue", expect) + b"hello")
            async with asyncio.timeout(BOUND_S):
                status, _ = parse_head(await reader.readuntil(b"\r\n\r\n"))
                assert status == 200, expect
                assert await reader.read() == b"ok"
    assert len(heads) == 3
    assert all(b"\r\nexpect:" not in head.lower() for head in heads)


async def test_a_machine_that_answered_http10_gets_no_expect_and_the_client_its_100_at_once(
    raw_backend: RawBackend,
    start_proxy: StartProxy,
    fleet: FleetView,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An HTTP/1.0 server never sends 100, and a request with Expect to it waited
    ``CONTINUE_WAIT_S`` for one, every time. Once the machine answered HTTP/1.0, the proxy
    sends the client its own 100 at once and the machine the request without Expect (RFC
    9110 10.1.1: a proxy that believes the next server only supports HTTP/1.0), with no wait
    for a 100 (longer than this test may take). A restart forgets the machine's word: a new
    process may be another server. Until it answers, its app's last answer (HTTP/1.0)
    stands for it; once this one, now HTTP/1.1, answered, it gets Expect and sends the 100
    itself."""
    monkeypatch.setattr(forward, "CONTINUE_WAIT_S", 1e6)
    version = [b"1.0"]
    heads: list[bytes] = []
    bodies: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head)
        if b"\r\nExpect: 100-continue\r\n" in head and version[0] == b"1.1":
            writer.write(b"HTTP/1.1 100 Continue\r\nX-Machine: m1\r\n\r\n")
        if head.startswith(b"POST "):
            bodies.append(await reader.readexactly(5))
        writer.write(
            b"HTTP/%b 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok" % version[0]
        )
        await writer.drain()
        writer.close()

    host, _, machine_port = (await raw_backend(serve)).partition(":")
    view = fleet.app("a")
    view.set_machines([MachineInfo("m1", host, int(machine_port), STARTED, False)])
    port = (await start_proxy([{"name": "a", "hosts": ["a.test"]}])).port
    await through(port, GET)  # teaches the proxy: HTTP/1.0
    continued = await through(port, POST)
    assert "x-machine" not in continued  # the proxy's own 100
    assert b"\r\nexpect:" not in heads[1].lower()
    assert bodies == [b"hello"]

    view.set_state("m1", "stopped")
    view.set_state("m1", STARTED)  # a new process: HTTP/1.1 now
    version[0] = b"1.1"
    continued = await through(port, POST)  # not heard from: the app's HTTP/1.0 stands
    assert "x-machine" not in continued
    assert b"\r\nexpect:" not in heads[2].lower()
    continued = await through(port, POST)
    assert continued["x-machine"] == ["m1"]  # the machine's 100, relayed
    assert b"\r\nExpect: 100-continue\r\n" in heads[3]
    assert bodies == [b"hello", b"hello", b"hello"]


async def test_a_new_machine_of_an_http10_app_gets_no_expect_before_it_answers(
    raw_backend: RawBackend,
    start_proxy: StartProxy,
    fleet: FleetView,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every machine of an app runs the same image: once one answered HTTP/1.0, the first
    request with Expect to another machine not heard from yet waited ``CONTINUE_WAIT_S``
    for a 100 its server never sends (each new machine, each restart). It is now taken to
    be HTTP/1.0 too: the client gets the proxy's 100 at once and the machine no Expect (a
    wait longer than this test may take would fail it). An answer of HTTP/1.1 from any
    machine (the app redeployed) clears that: a machine not heard from then gets Expect."""
    monkeypatch.setattr(forward, "CONTINUE_WAIT_S", 1e6)
    versions = {"a": b"1.0", "b": b"1.0", "c": b"1.1"}
    heads: dict[str, list[bytes]] = {name: [] for name in versions}

    def machine(name: str) -> StreamHandler:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            heads[name].append(head)
            if b"\r\nExpect: 100-continue\r\n" in head and versions[name] == b"1.1":
                writer.write(b"HTTP/1.1 100 Continue\r\nX-Machine: %b\r\n\r\n" % name.encode())
            if head.startswith(b"POST "):
                await reader.readexactly(5)
            writer.write(
                b"HTTP/%b 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                % versions[name]
            )
            await writer.drain()
            writer.close()

        return serve

    def only(name: str) -> None:
        """Route to that machine alone (the others stopped)."""
        view.set_machines(
            [
                MachineInfo(
                    n, addresses[n][0], addresses[n][1], STARTED if n == name else "stopped", False
                )
                for n in versions
            ]
        )

    addresses: dict[str, tuple[str, int]] = {}
    for name in versions:
        host, _, machine_port = (await raw_backend(machine(name))).partition(":")
        addresses[name] = (host, int(machine_port))
    view = fleet.app("a")
    only("a")
    port = (await start_proxy([{"name": "a", "hosts": ["a.test"]}])).port
    await through(port, GET)  # a answers HTTP/1.0

    only("b")
    continued = await through(port, POST)  # b, never heard from: HTTP/1.0 as a was
    assert "x-machine" not in continued  # the proxy's own 100
    assert len(heads["b"]) == 1
    assert b"\r\nexpect:" not in heads["b"][0].lower()

    only("c")
    versions["b"] = b"1.1"  # redeployed: b's new process, as c, serves HTTP/1.1
    continued = await through(port, POST)  # c not heard from yet: the app's HTTP/1.0 still
    assert "x-machine" not in continued
    assert b"\r\nexpect:" not in heads["c"][0].lower()
    only("b")  # started again: not heard from; c's answer of HTTP/1.1 cleared the app's
    continued = await through(port, POST)
    assert continued["x-machine"] == ["b"]  # b's own 100, relayed
    assert b"\r\nExpect: 100-continue\r\n" in heads["b"][1]


@pytest.mark.parametrize("version", [b"2.0", b"0.9"])
async def test_another_versions_unknown_expectation_gets_the_versions_505(
    raw_backend: RawBackend, start_proxy: StartProxy, version: bytes
) -> None:
    """An HTTP/2.0 or HTTP/0.9 request line with an Expect the proxy does not know got
    417 (the expectation was looked into before the version): its client was told to
    drop the expectation, and then got the 505 anyway. The version is refused first."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))

    port = await proxy_to(raw_backend, start_proxy, serve)
    request = POST.replace(b"HTTP/1.1", b"HTTP/" + version).replace(b"100-continue", b"x-fancy")
    reply = await raw(port, request + b"hello")
    assert reply_status(reply) == 505, reply[:200]
    assert reply.endswith(b"HTTP/" + version + b" is not supported\n")
    assert heads == []
