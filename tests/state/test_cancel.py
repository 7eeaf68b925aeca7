"""Tasks that talk to Redis stop when asked, and no Redis call waits for ever.

On Python 3.11 ``asyncio.wait_for`` drops a cancellation that comes in the same turn of
the loop as the end of what it waits for, and redis-py sends every command under
``wait_for`` when it has a socket timeout (its default is 5 s). A task sending commands
in a loop then shrugged off about two cancellations in three, and a stop that waited for
it could wait for minutes. Cluster mode's client (``autoscaler.state.cluster.connect``)
has no socket timeout: it bounds each command and pipeline with ``asyncio.timeout``
itself. These run against a real redis-server, with that client: a single cancellation
stops a loop of commands, a controller whose loops read through Redis stops, and a Redis
that accepts connections but never answers fails a command instead of holding it.
A stop that hangs fails its test after 10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from control.fakes import FakeMachinesAPI
from prometheus_client import CollectorRegistry

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


async def test_a_loop_of_redis_commands_stops_at_the_first_cancellation(
    redis_server: str, key_prefix: str
) -> None:
    """50 loops, each cancelled once while its commands come and go. With redis-py's
    socket timeout (the client before), about two in three carried on and this failed
    at its bound."""
    redis = connect(redis_server, ttl_s=3.0)
    sent = Count()

    async def commands() -> None:
        while True:
            await redis.eval(INCR, 1, f"{key_prefix}:k")
            sent.add()

    tasks: list[asyncio.Task[None]] = []
    try:
        for _ in range(50):
            task = asyncio.create_task(commands())
            tasks.append(task)
            await sent.more(3)
            task.cancel()
            async with asyncio.timeout(STOP_WITHIN_S):
                await asyncio.wait([task])
            assert task.cancelled()
    finally:
        await _reap(tasks)
        await redis.aclose()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """A Redis URL on loopback whose server accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # takes the commands, answers nothing

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_redis_that_never_answers_fails_each_call_in_bounded_time() -> None:
    """No socket timeout in redis-py: the bound is ours (a third of the lease TTL), for
    single commands and pipelines alike."""
    from redis.exceptions import TimeoutError as RedisTimeout

    timeouts = (TimeoutError, RedisTimeout)
    async with silent_server() as url:
        redis = connect(url, ttl_s=0.3)
        try:
            async with asyncio.timeout(STOP_WITHIN_S):
                with pytest.raises(timeouts):
                    await redis.eval(INCR, 1, "k")
                with pytest.raises(timeouts):
                    await redis.get("k")
                async with redis.pipeline(transaction=True) as pipe:
                    pipe.incr("k")
                    pipe.get("k")
                    with pytest.raises(timeouts):
                        await pipe.execute()
        finally:
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
