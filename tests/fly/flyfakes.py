"""Fakes shared by the fly client tests: a clock that moves only when slept on, and a
MockTransport that records every request and answers from a script."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from autoscaler.fly.client import MachinesClient

TOKEN = "fo1_SECRET-token-value-0123456789"


class FakeTime:
    """``clock`` reads ``now``; ``sleep`` records the delay and advances ``now`` by it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class ParkedTime:
    """A clock whose ``sleep`` parks the caller until ``advance`` moves time past its
    deadline: concurrent sleepers wake in the order of their deadlines."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        if delay <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + delay, next(self._seq), fut))
        await fut

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper at its own deadline, in order."""
        target = self.now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, fut = heapq.heappop(self._sleepers)
            self.now = max(self.now, when)
            if not fut.done():
                fut.set_result(None)
            await settle()
        self.now = target
        await settle()


async def settle(rounds: int = 20) -> None:
    """Let every ready task run until the loop has nothing left to do right now."""
    for _ in range(rounds):
        await asyncio.sleep(0)


Reply = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


@dataclass
class Script:
    """Answers requests in order from ``replies`` (the last one repeats)."""

    replies: Sequence[Reply]
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
        if isinstance(reply, Exception):
            raise reply
        if callable(reply):
            return reply(request)
        return reply

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def body(self, index: int = -1) -> Any:
        content = self.requests[index].content
        return json.loads(content) if content else None


def make_client(
    script: Script,
    fake: FakeTime | None = None,
    *,
    token: str | None = TOKEN,
    **kw: Any,
) -> MachinesClient:
    fake = fake or FakeTime()
    kw.setdefault("rate_limit", False)
    kw.setdefault("rng", lambda: 0.5)
    return MachinesClient(
        "http://127.0.0.1:4280",
        token,
        transport=httpx.MockTransport(script),
        sleep=fake.sleep,
        clock=fake.clock,
        **kw,
    )
