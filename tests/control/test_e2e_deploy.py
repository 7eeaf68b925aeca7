"""A rolling ``fly deploy`` under steady traffic, end to end on the emulator's Fly timings.

The deploy is a coroutine that does through the Machines API what flyctl's rolling
strategy does (docs/deploy.md, "Leases and fly deploy"): it leases every machine of the
app first (a 409 is retried after a short wait, as flyctl waits for a lease), refreshes
those leases while it works, then one machine at a time updates its config with the
lease's nonce (the emulator restarts a started machine, as Fly does), waits for it to be
back in the state it had, and releases its lease. Meanwhile clients GET through the proxy
and the autoscaler keeps deciding: it must skip the leased machines (counted, and listed
in ``/status``), never force, and lose no request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from testkit import fly_like

from autoscaler.config import EmulatorApp, EmulatorSettings
from autoscaler.emulator import Emulator

from .test_e2e import APP, Stack, running_stack

pytestmark = pytest.mark.fly_profile

NONCE = "fly-machine-lease-nonce"
LEASE_TTL_S = 13  # flyctl's --lease-timeout default
RETRY_S = 0.25


@pytest.fixture
def emulator_settings(emulator_settings: EmulatorSettings) -> EmulatorSettings:
    """Fly's timings and rate limits, and an app of two machines."""
    return fly_like(emulator_settings).model_copy(
        update={"apps": [EmulatorApp(name=APP, machines=2)]}
    )


@dataclass
class Deploy:
    """What the deploy met: every answer that was not a success, by step."""

    session: aiohttp.ClientSession
    base: str
    version: str
    refused: list[str] = field(default_factory=list)
    """Answers that failed a step (the deploy failed): none is allowed."""
    retried: list[str] = field(default_factory=list)
    """Lease acquires answered 409 (or 429) and tried again."""
    nonces: dict[str, str] = field(default_factory=dict)
    leases_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held by a lease's refresh and by its release, so that the two never cross: a
    refresh still in flight as the release went reached the API after it, which took it
    for an acquire (no lease held) and leased the machine anew, to no one, until its TTL
    (the autoscaler skipping the machine meanwhile, and the test's "no lease left" failing)."""

    async def call(
        self, method: str, path: str, nonce: str | None = None, **kw: Any
    ) -> tuple[int, Any]:
        headers = {NONCE: nonce} if nonce else {}
        async with self.session.request(method, self.base + path, headers=headers, **kw) as r:
            return r.status, await r.json(content_type=None)

    async def lease(self, mid: str) -> None:
        body = {"ttl": LEASE_TTL_S, "description": f"flyctl deploy {self.version}"}
        while True:
            status, answer = await self.call("POST", f"/{mid}/lease", json=body)
            if status in (200, 201):
                self.nonces[mid] = answer["data"]["nonce"]
                return
            if status not in (409, 429):
                self.refused.append(f"lease {mid}: {status} {answer}")
                raise AssertionError(self.refused[-1])
            self.retried.append(f"{mid}: {status}")
            await asyncio.sleep(RETRY_S)

    async def keep(self) -> None:
        """Refresh the leases still held, as flyctl does while it works."""
        while True:
            await asyncio.sleep(LEASE_TTL_S / 3)
            await self.refresh()

    async def refresh(self) -> None:
        """Extend every lease still held by another TTL."""
        for mid in list(self.nonces):
            async with self.leases_lock:
                nonce = self.nonces.get(mid)
                if nonce is None:  # released meanwhile
                    continue
                body = {"ttl": LEASE_TTL_S}
                status, answer = await self.call("POST", f"/{mid}/lease", nonce, json=body)
            if status not in (200, 201):
                self.refused.append(f"refresh {mid}: {status} {answer}")

    async def update(self, mid: str) -> None:
        nonce = self.nonces[mid]
        status, machine = await self.call("GET", f"/{mid}")
        assert status == 200, machine
        config = machine["config"]
        config["env"] = {**config.get("env", {}), "DEPLOY_VERSION": self.version}
        status, updated = await self.call("POST", f"/{mid}", nonce, json={"config": config})
        if status != 200:
            self.refused.append(f"update {mid} ({machine['state']}): {status} {updated}")
            raise AssertionError(self.refused[-1])
        # Back as it was: a started machine restarted with the new config, another one
        # at rest under it (a suspended one's snapshot cannot survive the update).
        state = "started" if machine["state"] == "started" else "stopped"
        query = {"state": state, "instance_id": updated["instance_id"], "timeout": "30"}
        status, waited = await self.call("GET", f"/{mid}/wait", params=query)
        if status != 200:
            self.refused.append(f"wait {mid} {state}: {status} {waited}")
            raise AssertionError(self.refused[-1])

    async def release(self, mid: str) -> None:
        async with self.leases_lock:
            status, answer = await self.call("DELETE", f"/{mid}/lease", self.nonces.pop(mid))
        if status != 200:
            self.refused.append(f"release {mid}: {status} {answer}")

    async def run(self, order: list[str]) -> None:
        for mid in order:
            await self.lease(mid)
        keeper = asyncio.create_task(self.keep())
        try:
            for mid in order:
                await self.update(mid)
                await self.release(mid)
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)


@contextlib.asynccontextmanager
async def steady_load(stack: Stack, clients: int) -> AsyncIterator[None]:
    """``clients`` clients sending GETs back to back until the block ends."""
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            await stack.get("/work?ms=20")

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


@pytest.mark.parametrize("serving", [1, 2], ids=["one-serving", "both-serving"])
async def test_a_rolling_deploy_under_traffic_loses_no_request_and_meets_no_fight(
    emulator: Emulator, serving: int
) -> None:
    # One serving (two clients, target_concurrency 5): the other machine is asleep. The
    # deploy updates the serving one first; while it restarts the requests are held, and
    # the autoscaler wants to wake the other one, which the deploy holds: it is skipped
    # (409, counted, listed in /status), not forced, and the held requests are served by
    # the updated machine once it is back.
    # Both serving (twelve clients): the proxy routes around the machine being replaced.
    # No scale-down in the test: a drain that follows the deploy would only add a
    # Fly-timed suspend to the wait for "no action running" at the end.
    async with running_stack(emulator, idle_to_zero_s=600, scale_down_delay_s=600) as stack:
        auth = {"Authorization": f"Bearer {emulator.token}"}
        async with (
            aiohttp.ClientSession(headers=auth) as session,
            steady_load(stack, clients=2 if serving == 1 else 12),
        ):
            await stack.until(lambda: len(stack.app.routable()) == serving)
            base = f"{emulator.url}/v1/apps/{APP}/machines"
            deploy = Deploy(session, base, "v2")
            first = [u.id for u in stack.app.routable()]
            order = first + [m.id for m in emulator.machines(APP) if m.id not in first]
            leased_seen: set[str] = set()
            deployed = asyncio.Event()

            async def watch() -> None:
                # Ended by the event, not cancelled: 3.11's wait_for loses a cancel that
                # comes as the view changes, and under this load it changes constantly.
                while not deployed.is_set():
                    leased_seen.update(stack.controller.status()[0].leased_by_others)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stack.app.changed(), 0.1)

            watcher = asyncio.create_task(watch())
            try:
                async with asyncio.timeout(40):
                    await deploy.run(order)
            finally:
                deployed.set()
                await watcher
            served = stack.served
            # More traffic after the deploy: the app serves on the new config.
            await stack.until(lambda: stack.served > served + 20)

        assert stack.failures == []
        assert deploy.refused == []
        for m in emulator.machines(APP):
            assert m.config["env"]["DEPLOY_VERSION"] == "v2", m.id
        if serving == 1:  # the wake met the deploy's lease, and said so
            conflicts = stack.metrics.registry.get_sample_value(
                "autoscaler_lease_conflicts_total", {"app": APP}
            )
            assert conflicts is not None
            assert conflicts > 0
            assert leased_seen - set(first)

        # Once the load is gone and our actions are done: no lease and no cordon left,
        # and our view of the app is Fly's.
        def agree() -> bool:
            ours = {u.id: (u.state, u.port) for u in stack.app.upstreams.values()}
            fly = {m.id: (m.state, m.internal_port) for m in emulator.machines(APP)}
            return ours == fly and not any(m.cordoned for m in emulator.machines(APP))

        await stack.until(lambda: not stack.controller.apps[APP].running and agree())
        await stack.controller.actuator.leases.settled(APP)  # (releases end in tasks of theirs)
        held = {m.id: emulator.lease(APP, m.id) for m in emulator.machines(APP)}
        assert {mid: lease for mid, lease in held.items() if lease is not None} == {}


async def test_a_refresh_in_flight_as_its_lease_is_released_does_not_lease_the_machine_anew(
    emulator: Emulator,
) -> None:
    """A refresh of the deploy's leases, on its way as the deploy released one of them,
    must not reach the API after the release: the API (as Fly) takes a refresh of a lease
    that no longer exists for an acquire, and the machine stays leased, to no one, until
    the TTL runs out. The refresh here is held until the release has gone as far as it
    can without it: sent (and answered) if nothing holds the release back."""
    refreshing = asyncio.Event()
    releasing = asyncio.Event()
    deleted = asyncio.Event()
    deleting = False

    class HeldRefresh(Deploy):
        async def call(
            self, method: str, path: str, nonce: str | None = None, **kw: Any
        ) -> tuple[int, Any]:
            nonlocal deleting
            if method == "DELETE":
                deleting = True
                try:
                    return await super().call(method, path, nonce, **kw)
                finally:
                    deleted.set()
            if method == "POST" and nonce is not None:  # a refresh
                refreshing.set()
                # The release runs up to its first wait before this goes on: its DELETE
                # sent, or the release waiting for the refresh.
                await releasing.wait()
                if deleting:
                    await deleted.wait()
            return await super().call(method, path, nonce, **kw)

        async def release(self, mid: str) -> None:
            releasing.set()
            await super().release(mid)

    auth = {"Authorization": f"Bearer {emulator.token}"}
    async with aiohttp.ClientSession(headers=auth) as session:
        deploy = HeldRefresh(session, f"{emulator.url}/v1/apps/{APP}/machines", "v2")
        mid = emulator.machines(APP)[0].id
        await deploy.lease(mid)
        refresh = asyncio.create_task(deploy.refresh())
        await refreshing.wait()
        await asyncio.gather(deploy.release(mid), refresh)

    assert deploy.refused == []
    assert emulator.lease(APP, mid) is None
