"""All 31 operations of the client (the seed's 27 and the real API's 4 lease operations)
against the real emulator (loopback, real processes).

These are integration tests: the shared ``emulator`` fixture (tests/conftest.py) runs it
in-process on 127.0.0.1 with an ephemeral port, and its machines are real local processes
of the built-in demo app. Here the emulator enforces Fly's documented rate limits, so the
client's own buckets are tested too: no call may be answered 429.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from autoscaler.config import EmulatorSettings
from autoscaler.emulator import Emulator
from autoscaler.fly.client import MachinesClient
from autoscaler.fly.errors import (
    BadRequest,
    LeaseHeld,
    NotFound,
    RateLimited,
    TransportError,
    Unauthorized,
    WaitTimeout,
)

IMAGE = "autoscaler/demo-app"
ORG = "personal"


@pytest.fixture
def emulator_settings() -> EmulatorSettings:
    return EmulatorSettings(
        demo_boot_delay_s=0.05, resume_delay_s=0.0, boot_timeout_s=20.0, rate_limits=True
    )


@pytest.fixture
def emu(emulator: Emulator) -> Emulator:
    return emulator


# Which operations each test must have called successfully; together, all 31.
COVERS = {
    "test_apps": {"list_apps", "create_app", "get_app", "delete_app"},
    "test_machine_lifecycle": {
        "create_machine", "wait_for_machine_state", "get_machine", "list_machines",
        "cordon_machine", "uncordon_machine", "set_machine_metadata", "get_machine_metadata",
        "delete_machine_metadata", "suspend_machine", "start_machine", "stop_machine",
        "update_machine", "delete_machine",
    },
    "test_volumes": {
        "create_volume", "list_volumes", "get_volume", "update_volume", "extend_volume",
        "list_volume_snapshots", "create_volume_snapshot", "delete_volume",
    },
    "test_oidc_token": {"get_oidc_token"},
    "test_leases": {
        "acquire_machine_lease", "get_machine_lease", "refresh_machine_lease",
        "release_machine_lease", "cordon_machine", "uncordon_machine", "set_machine_metadata",
        "delete_machine_metadata", "suspend_machine", "start_machine", "stop_machine",
        "create_app", "create_machine", "wait_for_machine_state",
    },
}  # fmt: skip


def test_the_emulator_tests_cover_all_31_operations() -> None:
    from test_fly_client_ops import CASES

    assert set().union(*COVERS.values()) == {c.name for c in CASES}


@pytest.fixture
async def api(emu: Emulator, request: pytest.FixtureRequest) -> AsyncIterator[MachinesClient]:
    seen: list[tuple[str, int | None]] = []
    async with MachinesClient(
        emu.url, emu.token, observer=lambda op, status, _d: seen.append((op, status))
    ) as client:
        yield client
    # The client-side buckets keep every test here under the emulator's rate limits.
    assert [s for s in seen if s[1] == 429] == []
    succeeded = {op for op, status in seen if status is not None and status < 300}
    missing = COVERS.get(request.node.name, set()) - succeeded
    assert not missing, f"never called successfully: {sorted(missing)}"


async def test_apps(api: MachinesClient) -> None:
    created = await api.create_app("web", ORG)
    assert created.name == "web"
    listed = await api.list_apps(ORG)
    assert [a.name for a in listed.apps] == ["web"]
    assert listed.total_apps == 1
    got = await api.get_app("web")
    assert got.organization is not None
    assert got.organization.slug == ORG
    await api.delete_app("web", force=True)
    with pytest.raises(NotFound):
        await api.get_app("web")


async def test_machine_lifecycle(api: MachinesClient, emu: Emulator) -> None:
    await api.create_app("web", ORG)
    config = {"image": IMAGE, "services": [{"protocol": "tcp", "internal_port": 8080}]}
    machine = await api.create_machine("web", config, name="web-1", region="iad")
    assert machine.name == "web-1"
    await api.wait("web", machine.id, "started", timeout_s=30)

    got = await api.get_machine("web", machine.id)
    assert got.state == "started"
    assert got.private_ip
    assert [m.id for m in await api.list_machines("web")] == [machine.id]

    await api.cordon_machine("web", machine.id)
    assert (await api.get_machine("web", machine.id)).cordoned is True
    await api.uncordon_machine("web", machine.id)
    assert (await api.get_machine("web", machine.id)).cordoned is False

    await api.set_machine_metadata("web", machine.id, "role", "primary")
    assert await api.get_machine_metadata("web", machine.id, "role") == "primary"
    await api.delete_machine_metadata("web", machine.id, "role")
    with pytest.raises(NotFound):
        await api.get_machine_metadata("web", machine.id, "role")

    await api.suspend_machine("web", machine.id)
    suspended = await api.wait("web", machine.id, "suspended", timeout_s=30)
    assert suspended.state == "suspended"
    resumed = await api.start_machine("web", machine.id)
    assert resumed.previous_state == "suspended"
    await api.wait_for_machine_state("web", machine.id, "started", timeout_s=30)

    await api.stop_machine("web", machine.id, signal="SIGTERM", timeout_s=5)
    stopped = await api.wait("web", machine.id, "stopped", timeout_s=30)
    assert stopped.state == "stopped"
    assert emu.process("web", machine.id) is None
    with pytest.raises(WaitTimeout, match="did not reach suspended within 1s"):
        await api.wait("web", machine.id, "suspended", timeout_s=1)  # the emulator's 408

    updated = await api.update_machine(
        "web", machine.id, {**config, "env": {"GREETING": "hi"}}, skip_launch=True
    )
    assert updated.instance_id != machine.instance_id
    assert updated.config is not None
    assert updated.config.env == {"GREETING": "hi"}

    await api.delete_machine("web", machine.id, force=True)
    gone = await api.wait("web", machine.id, "destroyed", timeout_s=30)
    assert gone.state == "destroyed"
    assert await api.list_machines("web") == []


async def test_leases(api: MachinesClient) -> None:
    """A lease held by one holder locks the machine against every other; its nonce opens it."""
    await api.create_app("web", ORG)
    config = {"image": IMAGE, "services": [{"protocol": "tcp", "internal_port": 8080}]}
    machine = await api.create_machine("web", config)
    mid = machine.id
    await api.wait("web", mid, "started", timeout_s=30)

    deploy = await api.acquire_machine_lease("web", mid, ttl_s=30, description="fly deploy")
    assert deploy.nonce
    seen = await api.get_machine_lease("web", mid)
    assert (seen.nonce, seen.description) == (deploy.nonce, "fly deploy")
    assert seen.expires_at is not None
    with pytest.raises(LeaseHeld):
        await api.acquire_machine_lease("web", mid, description="autoscaler")
    for change in (
        api.cordon_machine("web", mid),
        api.suspend_machine("web", mid),
        api.set_machine_metadata("web", mid, "k", "v"),
    ):
        with pytest.raises(LeaseHeld):
            await change
    # The holder's nonce opens every change.
    nonce = deploy.nonce
    await api.set_machine_metadata("web", mid, "k", "v", lease_nonce=nonce)
    await api.cordon_machine("web", mid, lease_nonce=nonce)
    await api.uncordon_machine("web", mid, lease_nonce=nonce)
    await api.delete_machine_metadata("web", mid, "k", lease_nonce=nonce)
    await api.suspend_machine("web", mid, lease_nonce=nonce)
    await api.wait("web", mid, "suspended", timeout_s=30)
    await api.start_machine("web", mid, lease_nonce=nonce)
    await api.wait("web", mid, "started", timeout_s=30)
    refreshed = await api.refresh_machine_lease("web", mid, nonce, ttl_s=60)
    assert refreshed.nonce == nonce
    assert (refreshed.expires_at or 0) > (seen.expires_at or 0)
    await api.release_machine_lease("web", mid, nonce)
    with pytest.raises(NotFound):
        await api.get_machine_lease("web", mid)
    with pytest.raises(NotFound):
        await api.release_machine_lease("web", mid, nonce)  # released already
    # Free again: another holder may take it, and changes without a nonce pass.
    ours = await api.acquire_machine_lease("web", mid, description="autoscaler")
    assert ours.nonce != nonce
    await api.release_machine_lease("web", mid, ours.nonce)
    await api.stop_machine("web", mid)
    await api.wait("web", mid, "stopped", timeout_s=30)


async def test_volumes(api: MachinesClient) -> None:
    await api.create_app("data", ORG)
    volume = await api.create_volume("data", "pg_data", 1, "iad", snapshot_retention=5)
    assert volume.size_gb == 1
    assert [v.id for v in await api.list_volumes("data")] == [volume.id]
    assert (await api.get_volume("data", volume.id)).name == "pg_data"
    assert (
        await api.update_volume("data", volume.id, snapshot_retention=9)
    ).snapshot_retention == 9
    assert (await api.extend_volume("data", volume.id, 3)).size_gb == 3
    with pytest.raises(BadRequest, match="larger"):
        await api.extend_volume("data", volume.id, 2)
    before = await api.list_volume_snapshots("data", volume.id)
    await api.create_volume_snapshot("data", volume.id)
    after = await api.list_volume_snapshots("data", volume.id)
    assert len(after) == len(before) + 1
    await api.delete_volume("data", volume.id)
    with pytest.raises(NotFound):
        await api.get_volume("data", volume.id)


async def test_oidc_token(api: MachinesClient) -> None:
    token = await api.get_oidc_token(aud="https://fly.io/acme")
    assert token.count(".") == 2  # header.claims.signature
    assert await api.get_oidc_token()


async def test_wrong_token_is_unauthorized_and_never_printed(emu: Emulator) -> None:
    bad = "wrong-" + emu.token
    with capture_logs() as captured:
        async with MachinesClient(emu.url, bad) as api:
            with pytest.raises(Unauthorized) as info:
                await api.list_machines("web")
    for text in (str(info.value), repr(info.value), repr(captured)):
        assert bad not in text
        assert emu.token not in text


async def test_emulator_429_maps_to_rate_limited(emu: Emulator) -> None:
    """With our buckets off and no retries, the emulator's own limit shows as RateLimited."""
    async with MachinesClient(emu.url, emu.token, rate_limit=False, max_retries=0) as api:
        await api.create_app("web", ORG)

        async def hammer() -> None:
            for _ in range(20):  # getApp's burst on the emulator is 10
                await api.get_app("web")

        with pytest.raises(RateLimited) as info:
            await hammer()
    assert info.value.retry_after is not None
    assert info.value.retry_after >= 1


async def test_metrics_observer_counts_calls(emu: Emulator) -> None:
    from prometheus_client import CollectorRegistry

    from autoscaler.metrics import Metrics

    metrics = Metrics(CollectorRegistry())
    async with MachinesClient(emu.url, emu.token, observer=metrics.observe_api) as api:
        await api.create_app("web", ORG)
        with pytest.raises(NotFound):
            await api.get_machine("web", "nope")
    sample = metrics.registry.get_sample_value
    assert sample("autoscaler_api_requests_total", {"operation": "create_app", "code": "201"}) == 1
    assert sample("autoscaler_api_requests_total", {"operation": "get_machine", "code": "404"}) == 1


async def test_connection_refused_is_a_transport_error() -> None:
    """A closed loopback port: nothing was sent, so even a create is retried, then fails."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async with MachinesClient(
        f"http://127.0.0.1:{port}", "t0ken-abc", max_retries=2, sleep=fake_sleep
    ) as api:
        with pytest.raises(TransportError) as info:
            await api.create_app("web", ORG)
    assert info.value.sent is False
    assert len(sleeps) == 2
    assert "t0ken-abc" not in str(info.value)
