"""Every one of the 27 operations of the seed and the 4 lease operations of the real API
against httpx.MockTransport: the request it sends (method, path, query, body, the lease
nonce header) and how it reads the answer, in both the seed's and the real API's shapes
where they differ."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from flyfakes import TOKEN, FakeTime, Script, make_client

from autoscaler.fly import models as m
from autoscaler.fly.client import MachinesClient
from autoscaler.fly.errors import Conflict, FlyError, LeaseHeld, NotFound, ServerError
from autoscaler.fly.operations import NONCE_HEADER, Operations

MACHINE = {
    "id": "m1",
    "name": "web-1",
    "state": "started",
    "region": "iad",
    "instance_id": "01H",
    "private_ip": "fdaa::3",
    "created_at": "2024-05-01T10:00:00Z",
    "config": {"image": "nginx", "services": [{"internal_port": 8080, "autostop": "suspend"}]},
    "events": [{"type": "start"}],
}
VOLUME = {"id": "vol_1", "name": "data", "size_gb": 3, "region": "iad", "state": "created"}
APP = {"id": "a1", "name": "web", "organization": {"slug": "personal"}}
LEASE = {
    "nonce": "n0nce",
    "expires_at": 1767000030,
    "owner": "me@example.com",
    "description": "autoscaler drain",
    "version": "01H",
}


@dataclass
class Case:
    name: str
    call: Callable[[MachinesClient], Awaitable[Any]]
    method: str
    path: str
    query: dict[str, str]
    body: Any
    reply: httpx.Response
    check: Callable[[Any], bool]


def ok(body: Any = None, status: int = 200) -> httpx.Response:
    if body is None:
        return httpx.Response(status)
    return httpx.Response(status, json=body)


CASES = [
    Case(
        "list_apps",
        lambda c: c.list_apps(),
        "GET",
        "/v1/apps",
        {"org_slug": "personal"},
        None,
        ok({"total_apps": 1, "apps": [APP]}),
        lambda r: r.total_apps == 1 and r.apps[0].name == "web",
    ),
    Case(
        "create_app",
        lambda c: c.create_app("web", "acme", network="n1"),
        "POST",
        "/v1/apps",
        {},
        {"app_name": "web", "name": "web", "org_slug": "acme", "network": "n1"},
        ok(APP, 201),
        lambda r: isinstance(r, m.App) and r.id == "a1",
    ),
    Case(
        "get_app",
        lambda c: c.get_app("web"),
        "GET",
        "/v1/apps/web",
        {},
        None,
        ok(APP),
        lambda r: r.organization.slug == "personal",
    ),
    Case(
        "delete_app",
        lambda c: c.delete_app("web", force=True),
        "DELETE",
        "/v1/apps/web",
        {"force": "true"},
        None,
        ok(None, 202),
        lambda r: r is None,
    ),
    Case(
        "list_machines",
        lambda c: c.list_machines("web"),
        "GET",
        "/v1/apps/web/machines",
        {},
        None,
        ok([MACHINE, {**MACHINE, "id": "m2", "state": "launch_failed"}]),
        lambda r: [x.id for x in r] == ["m1", "m2"] and r[1].state == "launch_failed",
    ),
    Case(
        "create_machine",
        lambda c: c.create_machine(
            "web", {"image": "nginx", "guest": {"cpus": 1}}, name="w", region="iad"
        ),
        "POST",
        "/v1/apps/web/machines",
        {},
        {"config": {"image": "nginx", "guest": {"cpus": 1}}, "name": "w", "region": "iad"},
        ok(MACHINE),
        lambda r: r.id == "m1" and r.internal_port == 8080,
    ),
    Case(
        "get_machine",
        lambda c: c.get_machine("web", "m1"),
        "GET",
        "/v1/apps/web/machines/m1",
        {},
        None,
        ok(MACHINE),
        lambda r: r.state == "started" and r.model_extra["events"] == [{"type": "start"}],
    ),
    Case(
        "update_machine",
        lambda c: c.update_machine(
            "web", "m1", m.MachineConfig(image="nginx:2", env={"A": "1"}), skip_launch=True
        ),
        "POST",
        "/v1/apps/web/machines/m1",
        {},
        {"config": {"image": "nginx:2", "env": {"A": "1"}}, "skip_launch": True},
        ok({**MACHINE, "instance_id": "01J"}),
        lambda r: r.instance_id == "01J",
    ),
    Case(
        "delete_machine",
        lambda c: c.delete_machine("web", "m1", force=True),
        "DELETE",
        "/v1/apps/web/machines/m1",
        {"force": "true"},
        None,
        ok(),
        lambda r: r is None,
    ),
    Case(
        "start_machine",
        lambda c: c.start_machine("web", "m1"),
        "POST",
        "/v1/apps/web/machines/m1/start",
        {},
        None,
        ok({"previous_state": "suspended"}),
        lambda r: r.previous_state == "suspended",
    ),
    Case(
        "stop_machine",
        lambda c: c.stop_machine("web", "m1", signal="SIGTERM", timeout_s=30),
        "POST",
        "/v1/apps/web/machines/m1/stop",
        {},
        {"signal": "SIGTERM", "timeout": "30s"},
        ok({"ok": True}),
        lambda r: r is None,
    ),
    Case(
        "suspend_machine",
        lambda c: c.suspend_machine("web", "m1"),
        "POST",
        "/v1/apps/web/machines/m1/suspend",
        {},
        None,
        ok(),
        lambda r: r is None,
    ),
    Case(
        "wait_for_machine_state",
        lambda c: c.wait_for_machine_state("web", "m1", "suspended", 20, instance_id="01H"),
        "GET",
        "/v1/apps/web/machines/m1/wait",
        {"state": "suspended", "timeout": "20", "instance_id": "01H"},
        None,
        ok({"ok": True, "state": "suspended", "version": "01H", "event_id": "e1"}),
        lambda r: r.ok and r.state == "suspended" and r.event_id == "e1",
    ),
    Case(
        "cordon_machine",
        lambda c: c.cordon_machine("web", "m1"),
        "POST",
        "/v1/apps/web/machines/m1/cordon",
        {},
        None,
        ok(),
        lambda r: r is None,
    ),
    Case(
        "uncordon_machine",
        lambda c: c.uncordon_machine("web", "m1"),
        "POST",
        "/v1/apps/web/machines/m1/uncordon",
        {},
        None,
        ok(),
        lambda r: r is None,
    ),
    Case(
        "get_machine_metadata",
        lambda c: c.get_machine_metadata("web", "m1", "role"),
        "GET",
        "/v1/apps/web/machines/m1/metadata/role",
        {},
        None,
        ok("primary"),
        lambda r: r == "primary",
    ),
    Case(
        "set_machine_metadata",
        lambda c: c.set_machine_metadata("web", "m1", "role", "primary"),
        "POST",
        "/v1/apps/web/machines/m1/metadata/role",
        {},
        {"value": "primary"},
        ok(None, 204),
        lambda r: r is None,
    ),
    Case(
        "delete_machine_metadata",
        lambda c: c.delete_machine_metadata("web", "m1", "role"),
        "DELETE",
        "/v1/apps/web/machines/m1/metadata/role",
        {},
        None,
        ok(None, 204),
        lambda r: r is None,
    ),
    Case(
        "get_machine_lease",
        lambda c: c.get_machine_lease("web", "m1"),
        "GET",
        "/v1/apps/web/machines/m1/lease",
        {},
        None,
        ok({"status": "success", "data": LEASE}),
        lambda r: r.nonce == "n0nce" and r.owner == "me@example.com",
    ),
    Case(
        "acquire_machine_lease",
        lambda c: c.acquire_machine_lease("web", "m1", ttl_s=60, description="autoscaler drain"),
        "POST",
        "/v1/apps/web/machines/m1/lease",
        {},
        {"ttl": 60, "description": "autoscaler drain"},
        ok({"status": "success", "data": LEASE}, 201),
        lambda r: r.nonce == "n0nce" and r.expires_at == 1767000030,
    ),
    Case(
        "refresh_machine_lease",
        lambda c: c.refresh_machine_lease("web", "m1", "n0nce", ttl_s=45),
        "POST",
        "/v1/apps/web/machines/m1/lease",
        {},
        {"ttl": 45},
        ok(LEASE, 201),  # the emulator's bare Lease
        lambda r: r.nonce == "n0nce",
    ),
    Case(
        "release_machine_lease",
        lambda c: c.release_machine_lease("web", "m1", "n0nce"),
        "DELETE",
        "/v1/apps/web/machines/m1/lease",
        {},
        None,
        ok({"status": "success"}),
        lambda r: r is None,
    ),
    Case(
        "list_volumes",
        lambda c: c.list_volumes("web"),
        "GET",
        "/v1/apps/web/volumes",
        {},
        None,
        ok([VOLUME]),
        lambda r: r[0].id == "vol_1" and r[0].size_gb == 3,
    ),
    Case(
        "create_volume",
        lambda c: c.create_volume("web", "data", 3, "iad", encrypted=True, snapshot_retention=7),
        "POST",
        "/v1/apps/web/volumes",
        {},
        {"name": "data", "size_gb": 3, "region": "iad", "encrypted": True, "snapshot_retention": 7},
        ok(VOLUME),
        lambda r: r.name == "data",
    ),
    Case(
        "get_volume",
        lambda c: c.get_volume("web", "vol_1"),
        "GET",
        "/v1/apps/web/volumes/vol_1",
        {},
        None,
        ok(VOLUME),
        lambda r: r.region == "iad",
    ),
    Case(
        "update_volume",
        lambda c: c.update_volume("web", "vol_1", snapshot_retention=10),
        "PUT",
        "/v1/apps/web/volumes/vol_1",
        {},
        {"snapshot_retention": 10},
        ok({**VOLUME, "snapshot_retention": 10}),
        lambda r: r.snapshot_retention == 10,
    ),
    Case(
        "delete_volume",
        lambda c: c.delete_volume("web", "vol_1"),
        "DELETE",
        "/v1/apps/web/volumes/vol_1",
        {},
        None,
        ok({**VOLUME, "state": "destroyed"}),
        lambda r: r.state == "destroyed",
    ),
    Case(
        "extend_volume",
        lambda c: c.extend_volume("web", "vol_1", 5),
        "PUT",
        "/v1/apps/web/volumes/vol_1/extend",
        {},
        {"size_gb": 5},
        ok({**VOLUME, "size_gb": 5}),
        lambda r: r.size_gb == 5,
    ),
    Case(
        "list_volume_snapshots",
        lambda c: c.list_volume_snapshots("web", "vol_1"),
        "GET",
        "/v1/apps/web/volumes/vol_1/snapshots",
        {},
        None,
        ok([{"id": "s1", "size": 1024, "status": "created", "retention_days": 5}]),
        lambda r: r[0].size == 1024 and r[0].model_extra["retention_days"] == 5,
    ),
    Case(
        "create_volume_snapshot",
        lambda c: c.create_volume_snapshot("web", "vol_1"),
        "POST",
        "/v1/apps/web/volumes/vol_1/snapshots",
        {},
        None,
        ok(),
        lambda r: r is None,
    ),
    Case(
        "get_oidc_token",
        lambda c: c.get_oidc_token(aud="https://fly.io/acme"),
        "POST",
        "/v1/tokens/oidc",
        {},
        {"aud": "https://fly.io/acme"},
        ok("eyJhbGciOi.jwt.sig"),
        lambda r: r == "eyJhbGciOi.jwt.sig",
    ),
]


def test_the_table_covers_all_31_operations() -> None:
    assert len({c.name for c in CASES}) == 31
    for case in CASES:
        assert callable(getattr(MachinesClient, case.name)), case.name
    # Every public coroutine of Operations, aliases (``wait``) counted once: a new
    # operation without a row here fails this test.
    operations = {
        f.__name__
        for name, f in inspect.getmembers(Operations, inspect.iscoroutinefunction)
        if not name.startswith("_")
    }
    assert {c.name for c in CASES} == operations


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
async def test_operation_request_and_response(case: Case) -> None:
    script = Script([case.reply])
    async with make_client(script) as api:
        result = await case.call(api)
    assert len(script.requests) == 1
    req = script.last
    assert req.method == case.method
    assert req.url.path == case.path
    assert dict(req.url.params) == case.query
    assert script.body() == case.body
    assert req.headers["authorization"] == f"Bearer {TOKEN}"
    assert case.check(result), result


# -- leases --------------------------------------------------------------------------------

# Every call that changes a machine, with the nonce of our lease on it.
CHANGES: list[tuple[str, Callable[[MachinesClient], Awaitable[Any]]]] = [
    ("start", lambda c: c.start_machine("web", "m1", lease_nonce="n0nce")),
    ("stop", lambda c: c.stop_machine("web", "m1", timeout_s=5, lease_nonce="n0nce")),
    ("suspend", lambda c: c.suspend_machine("web", "m1", lease_nonce="n0nce")),
    ("cordon", lambda c: c.cordon_machine("web", "m1", lease_nonce="n0nce")),
    ("uncordon", lambda c: c.uncordon_machine("web", "m1", lease_nonce="n0nce")),
    ("set_meta", lambda c: c.set_machine_metadata("web", "m1", "k", "v", lease_nonce="n0nce")),
    ("delete_meta", lambda c: c.delete_machine_metadata("web", "m1", "k", lease_nonce="n0nce")),
    ("update", lambda c: c.update_machine("web", "m1", {"image": "x"}, lease_nonce="n0nce")),
    ("delete", lambda c: c.delete_machine("web", "m1", force=True, lease_nonce="n0nce")),
    ("refresh", lambda c: c.refresh_machine_lease("web", "m1", "n0nce")),
    ("release", lambda c: c.release_machine_lease("web", "m1", "n0nce")),
]


@pytest.mark.parametrize(("name", "call"), CHANGES, ids=[n for n, _ in CHANGES])
async def test_changes_send_the_lease_nonce(
    name: str, call: Callable[[MachinesClient], Awaitable[Any]]
) -> None:
    script = Script([ok(MACHINE if name == "update" else LEASE)])
    async with make_client(script) as api:
        await call(api)
    assert script.last.headers[NONCE_HEADER] == "n0nce"
    assert "lease_nonce" not in script.last.content.decode()  # a header, never in the body


async def test_without_a_lease_no_nonce_header_is_sent() -> None:
    script = Script([ok(), ok({"status": "success", "data": LEASE}, 201)])
    async with make_client(script) as api:
        await api.cordon_machine("web", "m1")
        await api.acquire_machine_lease("web", "m1")
    assert [NONCE_HEADER in r.headers for r in script.requests] == [False, False]
    assert script.body() == {"ttl": 30}


async def test_a_lease_held_by_another_is_lease_held_and_never_retried() -> None:
    held = httpx.Response(
        409,
        json={"status": "error", "message": "lease currently held by deploy@fly.io"},
    )
    script = Script([held])
    async with make_client(script) as api:
        with pytest.raises(LeaseHeld, match="held by deploy@fly") as info:
            await api.acquire_machine_lease("web", "m1", ttl_s=30)
        with pytest.raises(LeaseHeld):
            await api.suspend_machine("web", "m1")
    assert isinstance(info.value, Conflict)  # code that treats all conflicts alike still does
    assert len(script.requests) == 2


async def test_a_lease_answer_without_a_nonce_is_an_error() -> None:
    script = Script([ok({"status": "success", "data": {"owner": "x"}}, 201)])
    async with make_client(script) as api:
        with pytest.raises(FlyError, match="nonce"):
            await api.acquire_machine_lease("web", "m1")


@pytest.mark.parametrize("nonce", ["n\u00e9", "two words", "line\nbreak", ""])
async def test_a_lease_nonce_that_is_no_header_value_is_an_error(nonce: str) -> None:
    """It goes back in fly-machine-lease-nonce: not visible ASCII, every later call of the
    lease failed with a bare UnicodeEncodeError (or sent a header split in two)."""
    script = Script([ok({"status": "success", "data": {"nonce": nonce}}, 201)])
    async with make_client(script) as api:
        with pytest.raises(FlyError, match="nonce"):
            await api.acquire_machine_lease("web", "m1")


# -- the real API's shapes, where they differ from the seed -------------------------------


async def test_create_app_without_a_body_in_the_answer() -> None:
    script = Script([ok(None, 201)])
    async with make_client(script, org_slug="acme") as api:
        app = await api.create_app("web")
    assert app.name == "web"
    assert app.organization
    assert app.organization.slug == "acme"
    assert script.body()["org_slug"] == "acme"


async def test_metadata_reads_the_real_value_object() -> None:
    script = Script([ok({"value": "primary"})])
    async with make_client(script) as api:
        assert await api.get_machine_metadata("web", "m1", "role") == "primary"


async def test_extend_volume_reads_the_real_wrapped_answer() -> None:
    script = Script([ok({"needs_restart": True, "volume": {**VOLUME, "size_gb": 9}})])
    async with make_client(script) as api:
        volume = await api.extend_volume("web", "vol_1", 9)
    assert volume.size_gb == 9
    assert volume.model_extra
    assert volume.model_extra["needs_restart"] is True


async def test_oidc_token_as_plain_text() -> None:
    script = Script([httpx.Response(200, text="eyJ.a.b\n")])
    async with make_client(script) as api:
        assert await api.get_oidc_token() == "eyJ.a.b"
    assert script.body() == {}


async def test_a_page_answered_200_is_neither_a_metadata_value_nor_a_token() -> None:
    """A 2xx body that is not JSON was taken as text by every call: a proxy's page
    answered 200 (a login or captive portal) became the value of a metadata key, or the
    OIDC token. Only the OIDC endpoint answers in plain text, and a JWT is one word."""
    page = httpx.Response(200, html="<html><title>Sign in</title></html>")
    async with make_client(Script([page]), max_retries=0) as api:
        with pytest.raises(FlyError, match="text that is not JSON") as meta:
            await api.get_machine_metadata("web", "m1", "role")
        assert meta.value.status == 200
        with pytest.raises(FlyError, match="OIDC"):
            await api.get_oidc_token()
    prose = httpx.Response(200, text="Service temporarily unavailable, try later")
    async with make_client(Script([prose]), max_retries=0) as api:
        with pytest.raises(FlyError, match="OIDC"):
            await api.get_oidc_token()


async def test_start_without_a_body_and_stop_without_options() -> None:
    script = Script([ok(), ok()])
    async with make_client(script) as api:
        result = await api.start_machine("web", "m1")
        await api.stop_machine("web", "m1")
    assert result.previous_state is None
    assert script.requests[1].content == b""


async def test_a_start_answered_200_with_status_error_is_refused() -> None:
    """fly-go's start answer has ``status`` and ``message`` beside ``previous_state``, and
    flyctl takes ``status: "error"`` for a start that failed: the client took it for a
    start under way. A Conflict now, as a 412 is, its message scrubbed of the token as an
    error body's is."""
    said = {"status": "error", "message": f"refused (Authorization: Bearer {TOKEN})"}
    async with make_client(Script([ok(said)])) as api:
        with pytest.raises(Conflict) as refused:
            await api.start_machine("web", "m1")
    assert refused.value.status == 200
    assert "refused" in str(refused.value)
    assert TOKEN not in str(refused.value)
    assert TOKEN not in repr(refused.value)


@pytest.mark.parametrize(("seconds", "text"), [(30, "30s"), (0, "0s"), (1.5, "1500ms")])
async def test_stop_timeout_is_a_duration_string(seconds: float, text: str) -> None:
    script = Script([ok()])
    async with make_client(script) as api:
        await api.stop_machine("web", "m1", timeout_s=seconds)
    assert script.body() == {"timeout": text}


async def test_delete_without_force_sends_no_query() -> None:
    script = Script([ok(), ok(None, 202)])
    async with make_client(script) as api:
        await api.delete_machine("web", "m1")
        await api.delete_app("web")
    assert [dict(r.url.params) for r in script.requests] == [{}, {}]


async def test_path_segments_are_escaped() -> None:
    script = Script([ok("v")])
    async with make_client(script) as api:
        await api.get_machine_metadata("web", "m1", "a/b c")
    assert script.last.url.raw_path == b"/v1/apps/web/machines/m1/metadata/a%2Fb%20c"


@pytest.mark.parametrize(
    "base", ["http://127.0.0.1:4280", "http://127.0.0.1:4280/", "http://127.0.0.1:4280/v1"]
)
async def test_base_url_with_or_without_v1(base: str) -> None:
    script = Script([ok([])])
    async with MachinesClient(base, TOKEN, transport=httpx.MockTransport(script)) as api:
        await api.list_machines("web")
    assert str(script.last.url) == "http://127.0.0.1:4280/v1/apps/web/machines"


async def test_flyv1_macaroon_goes_as_it_is_and_no_token_sends_no_header() -> None:
    script = Script([ok([])])
    async with make_client(script, token="FlyV1 fm2_abc") as api:
        await api.list_machines("web")
    assert script.last.headers["authorization"] == "FlyV1 fm2_abc"
    async with make_client(script, token=None) as api:
        await api.list_machines("web")
    assert "authorization" not in script.last.headers


async def test_extra_fields_round_trip_through_update() -> None:
    """A config read from a machine goes back unchanged, real-only fields included."""
    real_config = {
        "image": "nginx",
        "services": [{"internal_port": 8080, "autostop": "suspend", "min_machines_running": 0}],
        "stop_config": {"timeout": "10s"},
        "restart": {"policy": "no"},
    }
    script = Script([ok({**MACHINE, "config": real_config}), ok(MACHINE)])
    async with make_client(script) as api:
        machine = await api.get_machine("web", "m1")
        assert machine.config is not None
        await api.update_machine("web", "m1", machine.config)
    assert script.body()["config"] == real_config


async def test_wait_defaults_and_several_states() -> None:
    script = Script([ok(), ok()])
    async with make_client(script) as api:
        first = await api.wait("web", "m1")
        second = await api.wait_for_machine_state("web", "m1", ["suspended", "failed"], 5)
    assert dict(script.requests[0].url.params) == {"state": "started", "timeout": "60"}
    assert dict(script.requests[1].url.params) == {"state": "suspended,failed", "timeout": "5"}
    assert first.state == "started"
    assert second.state == "suspended"


@pytest.mark.parametrize("state", ["", [], [""], " , ", ("", " ")])
async def test_a_wait_for_no_state_is_refused_before_any_request(state: str | list[str]) -> None:
    """No state named: the emulator answers 400 (the real API's wait has no such state);
    it was sent all the same, ``state=`` in the query. A ValueError here, nothing sent."""
    script = Script([ok({"ok": True, "state": "started"})])
    async with make_client(script) as api:
        with pytest.raises(ValueError, match="state: name at least one state"):
            await api.wait_for_machine_state("web", "m1", state, 5)
    assert script.requests == []


async def test_wait_for_stopped_reads_the_version_first() -> None:
    """The real API wants a version with state=stopped; the client fills in the current one."""
    script = Script([ok(MACHINE), ok({"ok": True, "state": "stopped"})])
    async with make_client(script) as api:
        result = await api.wait("web", "m1", "stopped", timeout_s=10)
    assert [r.url.path for r in script.requests] == [
        "/v1/apps/web/machines/m1",
        "/v1/apps/web/machines/m1/wait",
    ]
    assert script.last.url.params["instance_id"] == "01H"
    assert result.state == "stopped"


async def test_wait_for_stopped_or_destroyed_of_a_gone_machine() -> None:
    script = Script([httpx.Response(404, json={"error": "machine not found"})])
    async with make_client(script) as api:
        result = await api.wait("web", "m1", "stopped,destroyed", timeout_s=10)
    assert result.state == "destroyed"
    assert len(script.requests) == 1


async def test_from_settings_uses_the_fly_section() -> None:
    from autoscaler.config import FlySettings

    fly = FlySettings(api_url="http://127.0.0.1:9/v1", token=TOKEN, org_slug="acme")
    script = Script([ok({"apps": []})])
    api = MachinesClient.from_settings(fly, transport=httpx.MockTransport(script))
    async with api:
        await api.list_apps()
    assert script.last.url.params["org_slug"] == "acme"
    assert str(script.last.url).startswith("http://127.0.0.1:9/v1/apps")
    with pytest.raises(ValueError, match="api_url"):
        MachinesClient.from_settings(FlySettings())


async def test_observer_sees_every_attempt() -> None:
    seen: list[tuple[str, int | None, float]] = []
    fake = FakeTime()
    script = Script([ok(None, 503), ok([])])
    async with make_client(script, fake, observer=lambda *a: seen.append(a)) as api:
        await api.list_machines("web")
    assert [(op, status) for op, status, _ in seen] == [
        ("list_machines", 503),
        ("list_machines", 200),
    ]


async def test_a_failing_observer_does_not_break_the_call() -> None:
    def boom(op: str, status: int | None, duration: float) -> None:
        raise RuntimeError("metrics bug")

    script = Script([ok([])])
    async with make_client(script, observer=boom) as api:
        assert await api.list_machines("web") == []


async def test_unexpected_body_is_a_fly_error() -> None:
    from autoscaler.fly.errors import FlyError

    script = Script([ok({"not": "a list"}), ok({"name": "no id"})])
    async with make_client(script) as api:
        with pytest.raises(FlyError, match="expected a JSON array"):
            await api.list_machines("web")
        with pytest.raises(FlyError, match="unexpected response body: id"):
            await api.get_machine("web", "m1")


async def test_one_log_line_per_action_with_its_fields() -> None:
    from structlog.testing import capture_logs

    fake = FakeTime()
    script = Script([ok(None, 503), ok(), httpx.Response(404, json={"error": "gone"})])
    with capture_logs() as logs:
        async with make_client(script, fake, rate_limit=True) as api:
            await api.start_machine("web", "m1")  # one retry, then success
            with pytest.raises(NotFound):
                await api.get_machine("web", "m2")
    lines = [e for e in logs if e["event"] == "fly_api"]
    assert len(lines) == 2
    assert {**lines[0], "duration_ms": 0} == {
        "event": "fly_api",
        "log_level": "info",
        "logger_name": "autoscaler.fly",  # rendered as "logger"
        "operation": "start_machine",
        "app": "web",
        "machine": "m1",
        "status": 200,
        "duration_ms": 0,
        "attempt": 2,
    }
    assert lines[1]["log_level"] == "info"  # a 404 is an answer, not trouble
    assert lines[1]["error_type"] == "NotFound"
    retries = [e for e in logs if e["event"] == "fly_api_retry"]
    assert len(retries) == 1
    assert retries[0]["log_level"] == "info"
    assert retries[0]["status"] == 503


async def test_throttling_shows_in_the_log_line() -> None:
    from structlog.testing import capture_logs

    fake = FakeTime()
    script = Script([ok()])
    with capture_logs() as logs:
        async with make_client(script, fake, rate_limit=True) as api:
            for _ in range(4):
                await api.suspend_machine("web", "m1")
    throttled = [e.get("throttled_ms") for e in logs if e["event"] == "fly_api"]
    assert throttled[:3] == [None, None, None]
    assert throttled[3] == pytest.approx(1000 / 0.9, abs=0.1)


async def test_server_errors_log_a_warning() -> None:
    from structlog.testing import capture_logs

    script = Script([ok(None, 500)])
    with capture_logs() as logs:
        async with make_client(script, max_retries=0) as api:
            with pytest.raises(ServerError):
                await api.list_machines("web")
    (line,) = [e for e in logs if e["event"] == "fly_api"]
    assert line["log_level"] == "warning"
    assert line["status"] == 500


def _unsupported(request: httpx.Request) -> httpx.Response:
    raise httpx.UnsupportedProtocol("no such scheme", request=request)


@pytest.mark.parametrize(
    ("answer", "level"),
    [
        (ok(None, 400), "warning"),  # Fly refused what we sent: ours to fix
        (_unsupported, "warning"),  # a transport failure that no retry would fix
        (ok(None, 409), "info"),  # conflicts are answers the controller acts on
        (ok(None, 412), "info"),
    ],
)
async def test_failures_that_are_not_retried_log_at_the_level_of_their_kind(
    answer: Any, level: str
) -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        async with make_client(Script([answer]), max_retries=0) as api:
            with pytest.raises(FlyError):
                await api.start_machine("web", "m1")
    (line,) = [e for e in logs if e["event"] == "fly_api"]
    assert line["log_level"] == level
