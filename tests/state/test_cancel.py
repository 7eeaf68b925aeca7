"""Tasks that talk to Redis stop when asked.

On Python 3.11 redis-py drops about two cancellations in three of a task that sends
commands in a loop (its sends go through ``asyncio.wait_for``; autoscaler/aio.py), so a
loop cancelled once may never end: the stop that waits for it hangs. These run such loops
against a real redis-server, with the client cluster mode builds, and stop them the way
the service does. A stop that hangs fails the test after 10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

from control.fakes import FakeMachinesAPI
from prometheus_client import CollectorRegistry

from autoscaler.aio import cancel_and_wait
from autoscaler.config import AppConfig, ControlSettings, Settings
from autoscaler.control.controller import Controller
from autoscaler.control.view import FleetView
from autoscaler.metrics import Metrics
from autoscaler.state.cluster import connect

STOP_WITHIN_S = 10.0
INCR = "return redis.call('INCR', KEYS[1])"


class Count:
    """Commands sent so far; ``more(k)`` returns once k more went."""

    def __init__(self) -> None:
        self.n = 0
        self._changed = asyncio.Event()

    def add(self) -> None:
        self.n += 1
        self._changed.set()

    async def more(self, k: int) -> None:
        target = self.n + k
        while self.n < target:
            self._changed.clear()
            await self._changed.wait()


async def _reap(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """After a failed stop: end what it left running, so that the failure is reported
    instead of the event loop's close waiting for those tasks for ever."""
    left = [t for t in tasks if not t.done()]
    for _ in range(200):
        if not left:
            return
        for task in left:
            task.cancel()
        await asyncio.wait(left, timeout=0.05)
        left = [t for t in left if not t.done()]


async def test_a_loop_of_redis_commands_ends_under_cancel_and_wait(
    redis_server: str, key_prefix: str
) -> None:
    redis = connect(redis_server, ttl_s=3.0)
    sent = Count()

    async def commands() -> None:
        while True:
            await redis.eval(INCR, 1, f"{key_prefix}:k")
            sent.add()

    tasks: list[asyncio.Task[None]] = []
    try:
        for _ in range(20):
            task = asyncio.create_task(commands())
            tasks.append(task)
            await sent.more(3)  # cancelled while its commands come and go
            async with asyncio.timeout(STOP_WITHIN_S):
                await cancel_and_wait([task], again_s=0.05)
            assert task.cancelled()
    finally:
        await _reap(tasks)
        await redis.aclose()


class ReadsThroughRedis:
    """The fake API, with Redis commands before every list (as a fenced call makes)."""

    def __init__(self, api: FakeMachinesAPI, redis: Any, key: str) -> None:
        self.api = api
        self.redis = redis
        self.key = key
        self.sent = Count()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.api, name)

    async def list_machines(self, app: str) -> Any:
        for _ in range(5):  # the loops spend most of their time in Redis
            await self.redis.eval(INCR, 1, self.key)
            self.sent.add()
        return await self.api.list_machines(app)


async def test_a_controller_whose_loops_talk_to_redis_stops(
    redis_server: str, key_prefix: str
) -> None:
    redis = connect(redis_server, ttl_s=3.0)
    fake = FakeMachinesAPI()
    names = [f"app{i}" for i in range(20)]
    for name in names:
        fake.add(name, "started")
    api = ReadsThroughRedis(fake, redis, f"{key_prefix}:reads")
    settings = Settings(
        apps=[AppConfig(name=n, min_machines=1) for n in names],
        control=ControlSettings(tick_s=0.001, idle_poll_s=0.001, steady_list_s=0.0),
    )
    controller: Controller | None = None
    try:
        for _ in range(3):
            controller = Controller(api, FleetView(), settings, Metrics(CollectorRegistry()))
            await controller.start()
            await api.sent.more(200)  # cancelled while its loops read
            async with asyncio.timeout(STOP_WITHIN_S):
                await controller.stop()
            assert all(rt.loop is None for rt in controller.apps.values())
    finally:
        if controller is not None:
            loops = [rt.loop for rt in controller.apps.values() if rt.loop is not None]
            with contextlib.suppress(Exception):
                await _reap(loops)
        await redis.aclose()
