"""Fakes shared by the fly client tests: a clock that moves only when slept on, and a
MockTransport that records every request and answers from a script."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from control.fakes import FakeClock

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


class ParkedTime(FakeClock):
    """A clock whose ``sleep`` parks the caller until ``advance`` moves time past its
    deadline (control/fakes.py's FakeClock), read as ``clock()`` like FakeTime."""

    def clock(self) -> float:
        return self.now


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
    script: Callable[[httpx.Request], Any],
    fake: FakeTime | ParkedTime | None = None,
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
