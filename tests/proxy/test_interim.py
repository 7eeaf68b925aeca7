"""A machine's interim (1xx) answers: relayed to an HTTP/1.1 client before the final one
(RFC 9110 15.2: a proxy forwards them), all of them, in order (a client behind holds the
machine back), with their hop-by-hop headers dropped; never to an
HTTP/1.0 client, which knows no 1xx. A 100 Continue is relayed only to a client that
asked for one (Expect, which goes on to the machine; see test_expect.py), and only once.
Only the final status is counted."""

from __future__ import annotations

import asyncio
import contextlib

from testkit import until

from autoscaler.control.view import FleetView
from autoscaler.metrics import Metrics
from autoscaler.proxy.body import PARSE_SLICE, WRITE_HIGH_WATER

from .conftest import RawBackend, StartProxy
from .helpers import raw, slow_reader
from .test_framing import machine_with

FINAL = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
GET = b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
# The most one read from a machine's socket brings (asyncio's and uvloop's, 256 KiB).
ONE_READ = 256 * 1024


def messages(reply: bytes) -> list[bytes]:
    """The heads of a reply whose only body is the final answer's: each interim head,
    then the final head, then its body."""
    parts = reply.split(b"\r\n\r\n")
    return [part + b"\r\n\r\n" for part in parts[:-1]] + [parts[-1]]


def count(metrics: Metrics, code: str) -> float | None:
    return metrics.registry.get_sample_value(
        "autoscaler_requests_total", {"app": "a", "code": code, "wake": "none"}
    )


async def proxy_with_machine(
    raw_backend: RawBackend, start_proxy: StartProxy, answer: bytes, **knobs: float
) -> int:
    addr = await machine_with(raw_backend, answer, [])
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}], **knobs)
    return proxy.port


async def test_early_hints_reach_the_client_before_the_final_answer(
    raw_backend: RawBackend, start_proxy: StartProxy, metrics: Metrics
) -> None:
    port = await proxy_with_machine(raw_backend, start_proxy, EARLY_HINTS + FINAL)
    reply = await raw(port, GET)
    hints, final, body = messages(reply)
    assert hints.startswith(b"HTTP/1.1 103 Early Hints\r\n"), reply[:300]
    assert b"\r\nLink: </style.css>; rel=preload\r\n" in hints
    assert b"\r\nVia: 1.1 autoscaler\r\n" in hints
    assert final.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body == b"ok"
    assert count(metrics, "200") == 1
    assert count(metrics, "103") is None


async def test_interim_answers_are_relayed_in_order_without_hop_by_hop_headers(
    raw_backend: RawBackend, start_proxy: StartProxy
) -> None:
    answer = (
        b"HTTP/1.1 102 Processing\r\n\r\n"
        b"HTTP/1.1 100 Continue\r\n\r\n"  # unasked (the proxy sent no Expect): not relayed
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nConnection: x-hop\r\n"
        b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Thing: 1\r\nVia: 1.1 app\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </b.js>; rel=preload\r\n\r\n"
        b"HTTP/1.1 199 Whatever\r\nX-Note: n\r\n\r\n" + FINAL
    )
    port = await proxy_with_machine(raw_backend, start_proxy, answer)
    reply = await raw(port, GET)
    *interims, final, body = messages(reply)
    assert [head.split(b"\r\n", 1)[0] for head in interims] == [
        b"HTTP/1.1 102 Processing",
        b"HTTP/1.1 103 Early Hints",
        b"HTTP/1.1 103 Early Hints",
        b"HTTP/1.1 199 Whatever",
    ], reply[:600]
    first_hints = interims[1].lower()
    assert b"link: </a.css>; rel=preload" in first_hints
    for gone in (b"connection", b"x-hop", b"keep-alive", b"proxy-thing"):
        assert b"\r\n" + gone + b":" not in first_hints
    assert b"\r\nvia: 1.1 app, 1.1 autoscaler\r\n" in first_hints
    assert b"link: </b.js>" in interims[2].lower()
    assert b"x-note: n" in interims[3].lower()
    assert final.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body == b"ok"


async def test_interim_answers_follow_the_machines_100_continue_once(
    raw_backend: RawBackend, start_proxy: StartProxy
) -> None:
    """The client's Expect goes on to the machine, whose 100 is relayed; its hints come as
    well, and a second 100 does not."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        assert await reader.readexactly(5) == b"hello"
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + EARLY_HINTS + FINAL)
        await writer.drain()
        await reader.read()

    addr = await raw_backend(serve)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        async with asyncio.timeout(5):
            writer.write(
                b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n"
                b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
            )
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 Continue")
            writer.write(b"hello")
            reply = await reader.read()
    finally:
        writer.close()
    hints, final, body = messages(reply)
    assert hints.startswith(b"HTTP/1.1 103 Early Hints\r\n"), reply[:300]
    assert final.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body == b"ok"


async def test_an_http_1_0_client_gets_only_the_final_answer(
    raw_backend: RawBackend, start_proxy: StartProxy, metrics: Metrics
) -> None:
    answer = b"HTTP/1.1 102 Processing\r\n\r\n" + EARLY_HINTS + FINAL
    port = await proxy_with_machine(raw_backend, start_proxy, answer)
    reply = await raw(port, b"GET / HTTP/1.0\r\nHost: a.test\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply[:300]
    assert reply.count(b"HTTP/1.1 ") == 1
    assert reply.endswith(b"\r\n\r\nok")
    assert count(metrics, "200") == 1


async def test_a_machine_that_closes_after_an_interim_answer_gets_502(
    raw_backend: RawBackend, start_proxy: StartProxy, metrics: Metrics
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(EARLY_HINTS)
        await writer.drain()
        writer.close()

    addr = await raw_backend(serve)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    reply = await raw(proxy.port, GET)
    hints, final, body = messages(reply)
    assert hints.startswith(b"HTTP/1.1 103 Early Hints\r\n"), reply[:300]
    assert final.startswith(b"HTTP/1.1 502 "), reply[:300]
    assert body == b"the machine failed to answer\n"
    assert count(metrics, "502") == 1


async def test_endless_interim_answers_end_at_the_response_timeout(
    raw_backend: RawBackend, start_proxy: StartProxy, metrics: Metrics
) -> None:
    """Hints keep coming, the final answer never: 504 once upstream_timeout_s passed,
    as for a machine that sends nothing."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            while not reader.at_eof():  # until the proxy gives up on it
                writer.write(EARLY_HINTS)
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            return

    addr = await raw_backend(serve)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [addr]}], upstream_timeout_s=0.5
    )
    async with asyncio.timeout(10):
        reply = await raw(proxy.port, GET)
    *interims, final, body = messages(reply)
    assert interims, reply[:300]
    assert all(head.startswith(b"HTTP/1.1 103 Early Hints\r\n") for head in interims)
    assert final.startswith(b"HTTP/1.1 504 "), reply[-300:]
    assert body == b"the machine did not answer in time\n"
    assert count(metrics, "504") == 1


async def test_a_client_that_reads_nothing_holds_the_machine_back_and_misses_no_hint(
    raw_backend: RawBackend, start_proxy: StartProxy, fleet: FleetView
) -> None:
    """A proxy MUST forward 1xx answers (RFC 9110 15.2). Those that came while the
    client's connection had more waiting than its high-water mark were dropped; now the
    proxy stops reading from the machine until the client catches up: every hint arrives,
    in order, and the proxy holds a bounded amount meanwhile, not all the machine sent:
    its buffer to the client, at most one slice of a read (PARSE_SLICE) past its mark (the
    whole read that filled it was relayed, up to 256 KiB), and the rest of that read,
    unparsed until the client catches up, counted in the proxy's buffer budget."""
    hints = [
        b"HTTP/1.1 103 Early Hints\r\nLink: </%04d" % n + b"a" * 4000 + b">; rel=preload\r\n\r\n"
        for n in range(200)  # some 800 KB
    ]
    asked = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        asked.set()
        writer.write(b"".join(hints) + FINAL)
        await writer.drain()
        await reader.read()

    addr = await raw_backend(serve)
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    view = fleet.app("a")
    loop = asyncio.get_running_loop()
    async with slow_reader(proxy) as (sock, conn):
        assert conn.transport is not None
        await loop.sock_sendall(sock, GET)
        await asked.wait()
        # Held back (the proxy waits for the client to be writable again), or, as before,
        # the hints that did not fit dropped and the final answer taken at once.
        await until(lambda: conn.on_writable is not None or view.in_flight == 0)
        assert view.in_flight == 1, "the machine's answer was taken past the client's hints"
        held = conn.transport.get_write_buffer_size()
        assert held <= WRITE_HIGH_WATER + PARSE_SLICE + len(hints[0]), held
        assert proxy._budget.held <= ONE_READ
        received = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(10):
                while chunk := await loop.sock_recv(sock, 65536):
                    received += chunk
    *interims, final, body = messages(received)
    assert [head.split(b"\r\n")[1] for head in interims] == [
        hint.split(b"\r\n")[1] for hint in hints
    ]
    assert final.startswith(b"HTTP/1.1 200 OK\r\n"), final[:100]
    assert body == b"ok"
    assert view.in_flight == 0
    assert proxy._budget.held == 0  # the rest of the read, let go once parsed


async def test_a_machine_held_back_for_a_slow_client_is_not_blamed_for_its_timeout(
    raw_backend: RawBackend, start_proxy: StartProxy, fleet: FleetView
) -> None:
    """Hints without end to a client that takes nothing: the machine, held back for the
    client, sends no final answer within upstream_timeout_s (504, as before), but its
    silence was the proxy's doing: no failure counts towards its ejection."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            while True:  # until the proxy gives up on it
                writer.write(EARLY_HINTS * 64)
                await writer.drain()

    addr = await raw_backend(serve)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [addr]}],
        upstream_timeout_s=0.5,
        eject_after=1,
    )
    view = fleet.app("a")
    (up,) = view.upstreams.values()
    loop = asyncio.get_running_loop()
    async with slow_reader(proxy) as (sock, conn):
        await loop.sock_sendall(sock, GET)
        await until(lambda: conn.on_writable is not None)  # held back for the client
        await until(lambda: view.in_flight == 0)  # its 504 went out
    record = proxy.health.records.get(up)
    assert record is None or not (record.failures or record.ejected)
    assert proxy._budget.held == 0  # what it sent past the client's mark, let go with it
