"""Memory has a ceiling: no body read ahead of a pipelined request, one budget for every
body byte held (backpressure, not drops), and a connection cap drawn from it."""

from __future__ import annotations

import asyncio

from autoscaler.config import ProxySettings
from autoscaler.proxy.body import BODY_HIGH_WATER, Body, BufferBudget
from autoscaler.proxy.h1 import PARSE_SLICE, Request

from .inproc import Harness, _settle


async def test_a_pipelined_request_waits_unread_behind_the_one_being_served() -> None:
    harness = Harness()
    harness.gate.clear()  # the first request's machine takes its time
    conn, transport = harness.connect()
    body = b"b" * (4 * PARSE_SLICE)
    data = (
        b"GET /first HTTP/1.1\r\nHost: a.test\r\n\r\n"
        b"POST /second HTTP/1.1\r\nHost: a.test\r\nContent-Length: %d\r\n\r\n%b"
        b"GET /third HTTP/1.1\r\nHost: a.test\r\n\r\n" % (len(body), body)
    )
    conn.data_received(data)
    await _settle()
    assert transport.paused  # nothing more is read from the client
    [second] = conn._queue  # the third is not even parsed
    assert isinstance(second, Request)
    assert second.body is not None
    assert second.body.received <= PARSE_SLICE  # its body is not read ahead
    harness.gate.set()
    for _ in range(100):
        await asyncio.sleep(0)
        if len(harness.seen) == 3:
            break
    assert [s.request.target for s in harness.seen] == ["/first", "/second", "/third"]
    assert harness.seen[1].body == body
    assert bytes(transport.out) == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" * 3
    transport.close()
    await _settle()


class Source:
    def __init__(self) -> None:
        self.paused_by: set[object] = set()

    def pause_reading(self, by: object) -> None:
        self.paused_by.add(by)

    def resume_reading(self, by: object) -> None:
        self.paused_by.discard(by)


async def test_bodies_over_the_budget_pause_their_sources_until_it_drains() -> None:
    budget = BufferBudget(100_000)
    a, b = Source(), Source()
    body_a, body_b = Body(a, budget), Body(b, budget)
    body_a.feed(b"x" * 60_000)
    assert not a.paused_by  # under its own high-water mark and under the budget
    body_b.feed(b"y" * 50_000)
    assert b.paused_by == {budget}  # the one that went over waits: backpressure
    assert budget.held == 110_000
    assert budget.paused == 1
    assert await body_a.read() == b"x" * 60_000  # a consumer takes its bytes
    assert budget.held == 50_000
    assert not b.paused_by  # under three quarters: everyone reads again
    body_b.drop()  # its exchange ended with bytes unread
    assert budget.held == 0


async def test_a_body_ended_early_gives_its_bytes_back_to_the_budget() -> None:
    # A drain ends a stream with bytes still unread (a slow client): kept counted, they
    # held the budget for good, and past three quarters of it every later upload stalled.
    budget = BufferBudget(100_000)
    source = Source()
    body = Body(source, budget)
    body.feed(b"s" * (BODY_HIGH_WATER + 1))
    assert body in source.paused_by
    body.end_early()
    assert budget.held == 0
    assert not source.paused_by
    body.feed(b"more")  # what the machine still sends is not kept
    assert budget.held == 0
    assert await body.read() == b""
    body.drop()
    assert budget.held == 0


async def test_one_body_pauses_at_its_own_high_water_mark() -> None:
    budget = BufferBudget(10 * BODY_HIGH_WATER)
    source = Source()
    body = Body(source, budget)
    body.feed(b"z" * (BODY_HIGH_WATER + 1))
    assert body in source.paused_by
    assert budget not in source.paused_by
    assert body.take()
    assert not source.paused_by
    assert budget.held == 0


async def test_a_request_body_over_the_budget_slows_its_client_and_still_arrives_whole() -> None:
    budget = BufferBudget(1024 * 1024)
    harness = Harness(budget=budget)
    harness.gate.clear()
    body = b"q" * (2 * 1024 * 1024)
    head = b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: %d\r\n\r\n" % len(body)
    pieces = [head] + [body[i : i + 65536] for i in range(0, len(body), 65536)]
    conn, transport = harness.connect()
    fed = 0
    for piece in pieces:
        conn.data_received(piece)
        fed += 1
        if transport.paused:
            break
    assert transport.paused  # the client is held back: its bytes wait in its socket
    assert budget.held <= budget.limit + 65536
    harness.gate.set()
    for piece in pieces[fed:]:
        for _ in range(1000):
            if not transport.paused:
                break
            await asyncio.sleep(0)
        conn.data_received(piece)
    for _ in range(1000):
        if harness.seen:
            break
        await asyncio.sleep(0)
    assert harness.seen[0].body == body
    assert budget.held == 0
    transport.close()
    await _settle()


def test_max_connections_defaults_to_what_the_buffer_budget_carries() -> None:
    assert ProxySettings().connection_limit == 32 * 1024 * 1024 // 4096
    assert ProxySettings(max_buffer_bytes=16 * 1024 * 1024).connection_limit == 4096
    assert ProxySettings(max_connections=5).connection_limit == 5
