"""Two `autoscaler run` services in cluster mode, one emulator, one redis-server: a request
through the follower wakes the app once (by the leader), and a stopped leader hands over."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry
from testkit import free_port

from autoscaler.config import EmulatorApp, Settings
from autoscaler.emulator import Emulator
from autoscaler.metrics import Metrics
from autoscaler.service import Service

TTL = 0.6


def settings(emulator: Emulator, url: str, prefix: str, rid: str) -> Settings:
    return Settings.model_validate(
        {
            "fly": {"api_url": emulator.url, "token": emulator.token},
            "proxy": {"listen": "127.0.0.1:8080", "shutdown_timeout_s": 2},
            "admin": {"listen": "127.0.0.1:9091"},
            "control": {"tick_s": 0.2},
            "cluster": {
                "redis_url": url,
                "replica_id": rid,
                "lease_ttl_s": TTL,
                "key_prefix": prefix,
            },
            "apps": [{"name": "web", "hosts": ["web.test"], "idle_to_zero_s": 60}],
        }
    )


async def until(condition: Callable[[], bool], limit_s: float) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not condition():
        assert loop.time() - start < limit_s, "condition not reached in time"
        await asyncio.sleep(0.02)


def starts(svc: Service) -> float:
    value = svc.metrics.registry.get_sample_value(
        "autoscaler_api_requests_total", {"operation": "start_machine", "code": "200"}
    )
    return value or 0.0


async def test_two_replicas_one_wake_and_a_handover(
    emulator: Emulator, redis_server: str, key_prefix: str
) -> None:
    emulator.world.seed_app(EmulatorApp(name="web", machines=1))
    services = [
        Service(
            settings(emulator, redis_server, key_prefix, rid),
            metrics=Metrics(CollectorRegistry()),
            proxy_port=0,
            admin_port=free_port(),
        )
        for rid in ("a", "b")
    ]
    try:
        for svc in services:
            await svc.start()

        def leading() -> list[Service]:
            return [s for s in services if s.replica is not None and s.replica.leading]

        await until(lambda: len(leading()) == 1, 2 * TTL)
        (leader,) = leading()
        (follower,) = [s for s in services if s is not leader]
        assert follower.replica is not None
        await until(lambda: follower.replica is not None and follower.replica.view_known, 2)
        assert follower.proxy is not None
        assert follower.admin is not None
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{follower.proxy.port}/"
            async with http.get(url, headers={"Host": "web.test"}) as resp:
                assert resp.status == 200
                assert resp.headers["fly-autoscaler-wake"] == "start"
            host, port = follower.admin.address
            async with http.get(f"http://{host}:{port}/status") as resp:
                doc: dict[str, Any] = await resp.json()
            async with http.get(f"http://{host}:{port}/readyz") as resp:
                assert resp.status == 200
        # One start, by the leader. The follower read the API once, at start-up (the check
        # for Fly's own autostop), and never since: it routes with the leader's view.
        assert starts(leader) == 1
        assert starts(follower) == 0

        def lists(svc: Service) -> float:
            return (
                svc.metrics.registry.get_sample_value(
                    "autoscaler_api_requests_total", {"operation": "list_machines", "code": "200"}
                )
                or 0.0
            )

        ticked = lists(leader)
        await until(lambda: lists(leader) >= ticked + 2, 2)  # the leader's ticks go on
        assert lists(follower) == 1
        assert doc["cluster"]["leader"] == leader.replica.cluster.replica_id  # type: ignore[union-attr]
        assert doc["cluster"]["leading"] is False
        assert sorted(r["id"] for r in doc["cluster"]["replicas"]) == ["a", "b"]
        # A clean stop gives the lease up: the other takes over within two TTLs.
        await leader.stop()
        await until(lambda: follower.replica is not None and follower.replica.leading, 2 * TTL)
    finally:
        for svc in services:
            await svc.stop()
