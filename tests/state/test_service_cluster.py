"""Two `autoscaler run` services in cluster mode, one emulator, one redis-server: a request
through the follower wakes the app once (by the leader), and a stopped leader hands over."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from testkit import PROFILES, free_port, on_profile

from autoscaler.aio import cancel_and_wait
from autoscaler.config import EmulatorApp, EmulatorSettings, Settings
from autoscaler.emulator import Emulator
from autoscaler.metrics import Metrics
from autoscaler.scaling.policy import Action
from autoscaler.service import Service

from .conftest import RedisServer

# The lease of a test whose subject is the lead lost (Redis out of reach), short so that
# the test waits little for it.
TTL = 0.6
# Every other test's lease (settings' default), that no stall of a loaded CI machine lets
# lapse: on TTL's, a stall (load average 8-11 on two cores) moved the lead mid-test, and the
# test's leader was no longer the one that decided. Its holder steps every STEADY_TTL / 3,
# a follower takes a given-up lease at its next step, and a replica's first step takes a
# free lease at once: no test waits on it. And how long a wait for what they await may
# take before it fails (a limit, no wait: generous).
STEADY_TTL = 6.0
WAIT_S = 20.0


@pytest.fixture(params=PROFILES)
def emulator_settings(
    emulator_settings: EmulatorSettings, request: pytest.FixtureRequest
) -> EmulatorSettings:
    """Fly's timings too: while a cold start takes about 2 s, the leader's ticks (every
    0.2 s) decide on the held load and meet the wake's claim."""
    return on_profile(emulator_settings, request.param)


def settings(
    emulator: Emulator,
    url: str,
    prefix: str,
    rid: str,
    app: dict[str, Any] | None = None,
    proxy: dict[str, Any] | None = None,
    **cluster: float | bool,
) -> Settings:
    return Settings.model_validate(
        {
            "fly": {"api_url": emulator.url, "token": emulator.token},
            "proxy": {"listen": "127.0.0.1:8080", "shutdown_timeout_s": 2, **(proxy or {})},
            "admin": {"listen": "127.0.0.1:9091"},
            "control": {"tick_s": 0.2},
            "cluster": {
                "redis_url": url,
                "replica_id": rid,
                "lease_ttl_s": STEADY_TTL,
                "key_prefix": prefix,
                **cluster,
            },
            "apps": [{"name": "web", "hosts": ["web.test"], "idle_to_zero_s": 60, **(app or {})}],
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


@contextlib.asynccontextmanager
async def cluster_of(
    services: list[Service], lead_s: float, view_s: float
) -> AsyncIterator[tuple[Service, list[Service]]]:
    """Start ``services``; yield (leader, followers) once one of them leads (within
    ``lead_s``) and every follower applied its view (within ``view_s``); stop them all."""
    try:
        for svc in services:
            await svc.start()

        def leading() -> list[Service]:
            return [s for s in services if s.replica is not None and s.replica.leading]

        await until(lambda: len(leading()) == 1, lead_s)
        (leader,) = leading()
        followers = [s for s in services if s is not leader]
        await until(lambda: all(s.replica and s.replica.view_known for s in followers), view_s)
        yield leader, followers
    finally:
        for svc in services:
            await svc.stop()


def replicas(
    emulator: Emulator,
    redis_server: str,
    key_prefix: str,
    rids: str,
    app: dict[str, Any] | None = None,
    **cluster: float | bool,
) -> list[Service]:
    """One service per replica id in ``rids`` (one letter each)."""
    return [
        Service(
            settings(emulator, redis_server, key_prefix, rid, app, **cluster),
            metrics=Metrics(CollectorRegistry()),
            proxy_port=0,
            admin_port=free_port(),
        )
        for rid in rids
    ]


async def test_two_replicas_one_wake_and_a_handover(
    emulator: Emulator, redis_server: str, key_prefix: str
) -> None:
    """The replica that leads first leads throughout, until its stop hands over. Under
    load (both services, the emulator and the test share one event loop), the lease of
    TTL's 0.6 s (Redis commands bounded by a third of it) lapsed and went back and forth
    between them: the leader's ticks stopped, the follower's gauge said it led. A lease
    that outlasts such stalls (STEADY_TTL); the handover is shown by Redis naming the
    stopped leader no more, at once (given up, not lapsed), not by how soon it came."""
    emulator.world.seed_app(EmulatorApp(name="web", machines=1))
    services = replicas(emulator, redis_server, key_prefix, "ab")
    async with cluster_of(services, WAIT_S, WAIT_S) as (leader, (follower,)):
        assert follower.replica is not None
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
            async with http.get(f"http://{host}:{port}/metrics") as resp:
                exported = await resp.text()
        # Per-replica series carry the replica's id; the cluster-wide count does not.
        lines = exported.splitlines()
        me = follower.replica.cluster.replica_id
        requests = [line for line in lines if line.startswith("autoscaler_requests_total{")]
        assert requests
        assert all(f'replica="{me}"' in line for line in requests)
        not_leading = f'autoscaler_cluster_leader{{replica="{me}"}} 0'
        assert any(line.startswith(not_leading) for line in lines)
        assert any(line.startswith("autoscaler_cluster_replicas 2") for line in lines)
        # One start, by the leader. The follower never read the API: it routes with the
        # leader's view (and the check for Fly's own autostop reads the leader's first
        # lists, not lists of its own).
        assert starts(leader) == 1
        assert starts(follower) == 0

        def lists(svc: Service) -> float:
            return (
                svc.metrics.registry.get_sample_value(
                    "autoscaler_api_requests_total", {"operation": "list_machines", "code": "200"}
                )
                or 0.0
            )

        # The leader's ticks go on (listing only every control.steady_list_s while its
        # machine holds still); the follower ticks nothing and lists nothing.
        assert leader.controller is not None
        rt = leader.controller.apps["web"]
        ticked = rt.last_tick_at
        await until(lambda: rt.last_tick_at != ticked, WAIT_S)
        ticked = rt.last_tick_at
        await until(lambda: rt.last_tick_at != ticked, WAIT_S)
        assert lists(follower) == 0
        assert leader.replica is not None
        old = leader.replica.cluster.replica_id
        assert doc["cluster"]["leader"] == old
        assert doc["cluster"]["leading"] is False
        assert sorted(r["id"] for r in doc["cluster"]["replicas"]) == ["a", "b"]
        # A clean stop gives the lease up (it would name the stopped leader for up to
        # STEADY_TTL more had it lapsed): the other takes over at its next lease step.
        await leader.stop()
        assert await follower.replica.cluster.lease.leader() != old
        await until(lambda: follower.replica is not None and follower.replica.leading, WAIT_S)


async def test_followers_of_a_crashed_leader_wake_once(
    emulator: Emulator, redis_server: str, key_prefix: str
) -> None:
    """The leader dies while its lease is still valid in Redis (a long TTL: nobody takes
    over during the test); two followers each hold a request for the sleeping app. One
    takes the app's wake claim and starts a machine, the other waits for it: both requests
    get 200, and the emulator saw exactly one start."""
    emulator.world.seed_app(EmulatorApp(name="web", machines=2))
    services = replicas(
        emulator, redis_server, key_prefix, "abc", lease_ttl_s=30, self_wake_after_s=0.3
    )
    async with cluster_of(services, 5, 5) as (leader, followers):
        # The leader crashes: its rounds, its pushes and its loops end; its lease stays.
        crashed = leader.replica
        assert crashed is not None
        tasks = [crashed._task, crashed._pusher, crashed._watcher]
        assert all(task is not None for task in tasks)
        await cancel_and_wait(t for t in tasks if t is not None)  # they talk to Redis
        await crashed.controller.stop()
        assert await crashed.cluster.lease.leader() == crashed.cluster.replica_id

        async with aiohttp.ClientSession() as http:

            async def get(svc: Service) -> tuple[int, str]:
                assert svc.proxy is not None
                url = f"http://127.0.0.1:{svc.proxy.port}/"
                async with http.get(url, headers={"Host": "web.test"}) as resp:
                    await resp.read()
                    return resp.status, resp.headers.get("fly-autoscaler-wake", "")

            answers = await asyncio.gather(*(get(s) for s in followers))
        assert [status for status, _ in answers] == [200, 200]
        assert "start" in [how for _, how in answers]
        app = emulator.world.apps["web"]
        user_starts = [
            m.id
            for m in app.machines.values()
            for e in m.events
            if e.type == "start" and e.source == "user"
        ]
        assert len(user_starts) == 1
        assert all(s.replica and s.replica.self_wakes == 1 for s in followers)
        assert not any(s.replica and s.replica.leading for s in followers)


async def test_a_burst_wakes_two_machines_under_one_claim(
    emulator: Emulator, redis_server: str, key_prefix: str
) -> None:
    """Four requests through the follower for a sleeping app of two machines (one request
    per machine wanted). The leader's wake starts one under the app's claim; its ticks,
    deciding on the held load meanwhile, start the other under the same claim (their
    replica's own) instead of yielding it: two starts, no yield, every request 200."""
    emulator.world.seed_app(EmulatorApp(name="web", machines=2))
    app = {"target_concurrency": 1, "scale_down_delay_s": 60}
    services = replicas(emulator, redis_server, key_prefix, "ab", app)
    async with cluster_of(services, WAIT_S, WAIT_S) as (leader, (follower,)):
        assert follower.proxy is not None
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{follower.proxy.port}/"

            async def get() -> int:
                async with http.get(url, headers={"Host": "web.test"}) as resp:
                    await resp.read()
                    return resp.status

            assert await asyncio.gather(*(get() for _ in range(4))) == [200] * 4
        assert leader.replica is not None
        assert leader.replica.tick_wakes_yielded == 0
        assert starts(follower) == 0
        assert 1 <= starts(leader) <= 2


async def test_through_a_redis_outage_every_replica_is_ready_and_says_nobody_decides(
    emulator: Emulator, own_redis: RedisServer, key_prefix: str
) -> None:
    """Redis out of reach: no replica decides (no wake, no scaling), and every replica
    routes on the view it has. So /readyz stays 200 on each (the old leader too, whose
    view is its own), and /readyz?control=1 and autoscaler_control_healthy say that
    nothing decides (the followers said all was well, and the alerts could not fire)."""
    emulator.world.seed_app(EmulatorApp(name="web", machines=1))
    services = replicas(emulator, own_redis.url, key_prefix, "ab", lease_ttl_s=TTL)
    async with cluster_of(services, WAIT_S, WAIT_S) as (leader, _), aiohttp.ClientSession() as http:

        async def get(svc: Service, path: str, host: str | None = None) -> tuple[int, str]:
            assert svc.proxy is not None
            assert svc.admin is not None
            if host is not None:
                url, headers = f"http://127.0.0.1:{svc.proxy.port}{path}", {"Host": host}
            else:
                address, port = svc.admin.address
                url, headers = f"http://{address}:{port}{path}", {}
            async with http.get(url, headers=headers) as resp:
                return resp.status, await resp.text()

        assert (await get(leader, "/", "web.test"))[0] == 200  # the app is awake
        await until(lambda: all(s.view.app("web").routable() for s in services), WAIT_S)
        own_redis.stop()
        await until(lambda: not any(s.replica and s.replica.leading for s in services), 4 * TTL)

        def healthy(svc: Service) -> float | None:
            return svc.metrics.registry.get_sample_value("autoscaler_control_healthy")

        await until(lambda: all(healthy(s) == 0 for s in services), 4 * TTL)
        for svc in services:
            assert (await get(svc, "/", "web.test"))[0] == 200
            assert (await get(svc, "/readyz"))[0] == 200
            status, text = await get(svc, "/readyz?control=1")
            assert status == 503
            assert "Redis unreachable" in text


async def test_a_followers_status_shows_the_machines_it_routes_to(
    emulator: Emulator, redis_server: str, key_prefix: str
) -> None:
    """A follower reads no list of its own: its /status (and `autoscaler status` against
    another worker's admin port) showed "(no machines)" for an app it served."""
    emulator.world.seed_app(EmulatorApp(name="web", machines=2))
    services = replicas(emulator, redis_server, key_prefix, "ab")
    async with cluster_of(services, WAIT_S, WAIT_S) as (_, (follower,)):
        assert follower.proxy is not None
        assert follower.admin is not None
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{follower.proxy.port}/"
            async with http.get(url, headers={"Host": "web.test"}) as resp:
                assert resp.status == 200
        await until(lambda: bool(follower.view.app("web").routable()), WAIT_S)
        [app] = follower.admin.status_document()["apps"]
        shown = sorted(m["id"] for m in app["machines"] if m["state"] == "started")
        assert shown == sorted(u.id for u in follower.view.app("web").routable())
        assert len(app["machines"]) == 2  # the sleeping one too


async def test_the_leaders_drain_ends_the_followers_websockets_too(
    emulator: Emulator, redis_server: str, key_prefix: str
) -> None:
    """A drain ends what the proxy carries to the machine before it sleeps: in cluster
    mode only the leader's proxy did; a follower's WebSocket stayed open across the
    suspend, frozen, never told 1001. Followers end theirs as the drain shows in the
    leader's view (its cordon)."""
    emulator.world.seed_app(EmulatorApp(name="web", machines=1))
    app = {"connection_idle_s": 1, "idle_to_zero_s": 2, "min_lifetime_s": 0}
    services = replicas(emulator, redis_server, key_prefix, "ab", app)
    async with cluster_of(services, WAIT_S, WAIT_S) as (leader, (follower,)):
        assert leader.proxy is not None
        assert follower.proxy is not None
        async with aiohttp.ClientSession() as http:
            sockets = [
                await http.ws_connect(
                    f"http://127.0.0.1:{svc.proxy.port}/ws", headers={"Host": "web.test"}
                )
                for svc in (leader, follower)
                if svc.proxy is not None
            ]
            for ws in sockets:
                await ws.send_str("hello")
                assert await ws.receive_str() == "hello"
            # Both go idle past connection_idle_s; the app sleeps: the leader drains it.
            for ws in sockets:
                msg = await asyncio.wait_for(ws.receive(), 60)
                assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001)
                await ws.close()


@pytest.mark.one_profile
async def test_a_new_leader_lifts_at_once_the_cordon_its_dead_predecessors_drain_left(
    emulator: Emulator, redis_server: str, key_prefix: str
) -> None:
    """The leader dies mid-drain: the machine cordoned on Fly under the drain's Fly lease
    (30 s), named for the dead leader, while a follower's request keeps it in flight. The
    follower leads, and a request arrives: the machine, warm, routes again at once, but
    lifting its cordon on Fly met that lease and was skipped as "leased by another
    holder", and Fly kept it cordoned (out of Fly's own routing) until the lease lapsed.
    The new leader adopts the lease of the replica gone and lifts the cordon under its
    nonce. (The drain is launched by hand, as the policy would for an app it scales down;
    the death freezes the old leader where a SIGKILL would: no round, tick or call more,
    its report and Redis lease deleted as they lapse.)"""
    emulator.world.seed_app(EmulatorApp(name="web", machines=1))
    services = replicas(emulator, redis_server, key_prefix, "ab")
    async with cluster_of(services, WAIT_S, WAIT_S) as (old, (new,)):
        assert old.replica is not None
        assert new.replica is not None
        assert new.proxy is not None
        assert new.controller is not None
        dead, heir = old.replica, new.replica
        port = new.proxy.port
        gone = dead.cluster.replica_id
        [machine] = emulator.machines("web")
        mid = machine.id
        async with aiohttp.ClientSession() as http:

            async def get(path: str) -> int:
                url = f"http://127.0.0.1:{port}{path}"
                async with http.get(url, headers={"Host": "web.test"}) as resp:
                    await resp.read()
                    return resp.status

            assert await get("/") == 200  # the app is awake
            # A request in flight through the follower, which the leader's view counts.
            in_flight = asyncio.create_task(get("/work?ms=60000"))
            try:
                await until(
                    lambda: dead.view.app("web").upstreams[mid].remote_in_flight == 1, WAIT_S
                )
                # The leader's drain (its loop stopped first: its policy, wanting the
                # machine for that request, would take the drain back at its next tick).
                rt = dead.controller.apps["web"]
                assert rt.loop is not None
                await cancel_and_wait([rt.loop])
                dead.controller.actuator.launch(rt, Action("drain", mid, "scale to zero"))
                await until(lambda: machine.cordoned and not new.view.app("web").routable(), WAIT_S)
                drain_lease = emulator.lease("web", mid)
                assert drain_lease is not None
                assert drain_lease.description.startswith(f"autoscaler@{gone}: ")
                with capture_logs() as logs:
                    # It dies: its rounds and pushes end, its drain waits on (for the
                    # request in flight) under the Fly lease; its report and Redis lease
                    # go, as they lapse.
                    tasks = [dead._task, dead._pusher, dead._watcher]
                    await cancel_and_wait(t for t in tasks if t is not None)
                    await heir.cluster.redis.delete(
                        dead.cluster.report_key(gone), dead.cluster.lease.key
                    )
                    await until(lambda: heir.leading, WAIT_S)
                    assert await get("/") == 200
                    await new.controller.idle()
                assert not machine.cordoned
                assert [u.id for u in new.view.app("web").routable()] == [mid]
                adopted = [e for e in logs if e["event"] == "lease_adopted"]
                assert [(e["machine"], e["former"]) for e in adopted] == [(mid, gone)]
                # Adopted, and given back: not left to lapse.
                assert emulator.lease("web", mid) is None
            finally:
                in_flight.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                    await in_flight
