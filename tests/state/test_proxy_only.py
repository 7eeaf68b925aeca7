"""A proxy-only replica (``cluster.lead: false``) in front of a sleeping app, with a
deciding replica beside it: real services, one emulator, one redis-server, on the fast
timings and on Fly's (cold starts of about 2 s, as long as ``self_wake_after_s``), where
the leader's wake, its push and the follower's own bound on waiting meet; and a machine
that hangs for the proxy-only replica's requests, which the decider restarts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from testkit import PROFILES, free_port, on_profile

from autoscaler.config import EmulatorApp, EmulatorSettings
from autoscaler.emulator import Emulator
from autoscaler.metrics import Metrics
from autoscaler.service import Service
from state.test_service_cluster import settings, starts, until


@pytest.fixture(params=PROFILES)
def emulator_settings(
    emulator_settings: EmulatorSettings, request: pytest.FixtureRequest
) -> EmulatorSettings:
    return on_profile(emulator_settings, request.param, apps=[EmulatorApp(name="web", machines=1)])


@contextlib.asynccontextmanager
async def decider_and_proxy(
    emulator: Emulator, redis_server: str, key_prefix: str, **extra: Any
) -> AsyncIterator[tuple[Service, Service, str]]:
    """A deciding replica and a proxy-only one (``extra``: more of their settings), both
    started, the decider leading and the proxy-only replica holding its view; and the
    proxy-only replica's URL."""
    decider, proxy = (
        Service(
            settings(emulator, redis_server, key_prefix, rid, **extra, **lead),
            metrics=Metrics(CollectorRegistry()),
            proxy_port=0,
            admin_port=free_port(),
        )
        for rid, lead in (("decider", {}), ("proxy", {"lead": False}))
    )
    try:
        await decider.start()
        await proxy.start()
        assert proxy.proxy is not None
        await until(lambda: decider.replica is not None and decider.replica.leading, 5)
        await until(lambda: proxy.replica is not None and proxy.replica.view_known, 5)
        yield decider, proxy, f"http://127.0.0.1:{proxy.proxy.port}/"
    finally:
        for svc in (proxy, decider):
            await svc.stop()


async def test_a_proxy_only_replica_serves_through_the_deciders_single_wake(
    emulator: Emulator, redis_server: str, key_prefix: str
) -> None:
    """The decider must lead throughout the wake, as in the restart test below: on the
    shared lease of 0.6 s, Redis commands slower than 0.2 s for a moment on a loaded
    machine made it step down mid-wake, and the proxy-only replica, its requests held
    past ``self_wake_after_s``, woke the app by itself (a self-wake, answers "none"). A
    lease of 5 s rides out such stalls; failover is tested elsewhere."""
    async with decider_and_proxy(emulator, redis_server, key_prefix, lease_ttl_s=5.0) as two:
        decider, proxy, url = two
        assert proxy.replica is not None
        async with aiohttp.ClientSession() as http:

            async def get() -> tuple[int, str | None]:
                async with http.get(url, headers={"Host": "web.test"}) as resp:
                    await resp.read()
                    return resp.status, resp.headers.get("fly-autoscaler-wake")

            answers = await asyncio.gather(*(get() for _ in range(3)))
        assert [status for status, _ in answers] == [200] * 3
        assert {wake for _, wake in answers} == {"start"}
        # One start for the need, by the decider; the proxy-only replica never called
        # the API, never woke by itself, and never led.
        assert starts(decider) == 1
        assert starts(proxy) == 0
        assert proxy.replica.self_wakes == 0
        assert not proxy.replica.leading


@pytest.mark.parametrize("emulator_settings", ["fast"], indirect=True)
async def test_the_decider_restarts_a_machine_that_hangs_for_the_proxy_only_replica(
    emulator: Emulator, redis_server: str, key_prefix: str
) -> None:
    """Every request goes through the proxy-only replica, none through the decider's own
    proxy: the proxy-only replica's ejections reach the decider in its report, and the
    decider stops the machine and starts it again. Before, it was never restarted. On the
    fast timings only: the restart on Fly's is tests/control/test_e2e_dark.py's, and what
    is new here (the report) does not depend on them.

    The decider must lead throughout: a step-down in the middle of the restart (on the
    shared lease of 0.6 s, a Redis command that took over 0.2 s on a loaded machine: Redis
    "unreachable") cut it after its stop, the machine came back through a wake, and no
    restart was counted. A lease of 5 s rides out such stalls (commands bounded at 1.7 s);
    failover is tested elsewhere."""
    fast = {"upstream_timeout_s": 0.5, "eject_after": 1, "eject_base_s": 0.5}
    app = {"idle_to_zero_s": 600, "wake_timeout_s": 30}
    async with decider_and_proxy(
        emulator, redis_server, key_prefix, app=app, proxy=fast, lease_ttl_s=5.0
    ) as two:
        decider, proxy, url = two
        async with aiohttp.ClientSession() as http:

            async def get() -> int:
                async with http.get(url, headers={"Host": "web.test"}) as resp:
                    await resp.read()
                    return resp.status

            assert await get() == 200
            [machine] = emulator.machines("web")
            first = len(machine.events)
            emulator.set_faults(hung=[machine.id])
            answers = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not answers or answers[-1] != 200:
                assert loop.time() < deadline, answers
                answers.append(await get())
        assert 504 in answers  # the hang's timeouts, through the proxy-only replica
        kinds = [(e.type, e.source) for e in machine.events[first:]]
        assert ("stop", "user") in kinds
        assert kinds[-1] == ("start", "flyd")

        def restarts() -> float | None:  # counted after the new process's probe
            labels = {"app": "web", "result": "ok"}
            return decider.metrics.registry.get_sample_value(
                "autoscaler_machine_restarts_total", labels
            )

        # (The series exists at 0 from the start: wait for the count itself.)
        await until(lambda: (restarts() or 0) >= 1, 10)
        assert restarts() == 1
        assert emulator.faults.hung == []
        assert starts(proxy) == 0  # the proxy-only replica never called the API
