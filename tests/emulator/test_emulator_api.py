"""The API surface: auth, validation, variants real clients send, metadata, volumes, limits."""

from __future__ import annotations

import random
import socket

import pytest
from emu_helpers import (
    DEMO,
    create_app,
    create_machine,
    new_machine,
    pid_gone,
    session,
    until_state,
    wait_ok,
)

from autoscaler.config import EmulatorSettings, FaultSettings
from autoscaler.emulator import Emulator
from autoscaler.emulator.procs import AddressPool


@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong", "Basic abc", "Bearer"],
)
async def test_missing_or_wrong_token_is_401(emulator: Emulator, header: str | None) -> None:
    async with session(emulator) as s:
        headers = {"Authorization": header} if header else {"Authorization": ""}
        r = await s.get("/v1/apps", params={"org_slug": "personal"}, headers=headers)
        assert r.status == 401
        body = await r.json()
        assert body["status"] == 401
        assert "token" in body["error"]
        assert emulator.token not in await r.text()


async def test_flyv1_scheme_and_request_id(emulator: Emulator) -> None:
    async with session(emulator) as s:
        r = await s.get(
            "/v1/apps",
            params={"org_slug": "personal"},
            headers={"Authorization": f"FlyV1 {emulator.token}"},
        )
        assert r.status == 200
        assert r.headers["fly-request-id"]
        assert await r.json() == {"total_apps": 0, "apps": []}


async def test_app_create_accepts_name_or_app_name_and_rejects_bad_input(
    emulator: Emulator,
) -> None:
    async with session(emulator) as s:
        r = await s.post("/v1/apps", json={"name": "newer", "org_slug": "personal"})
        assert r.status == 201
        r = await s.post("/v1/apps", json={"app_name": "newer", "org_slug": "personal"})
        assert r.status == 422
        cases = [
            ({"app_name": "Bad_Name", "org_slug": "personal"}, "app_name"),
            # "$" matched before a final newline: an app "web\n" was created
            ({"app_name": "web\n", "org_slug": "personal"}, "app_name: expected 1-63 lowercase"),
            ({"name": "a" * 64, "org_slug": "personal"}, "app_name: expected 1-63 lowercase"),
            ({"app_name": "ok"}, "org_slug: required"),
            ({"app_name": "ok", "org_slug": "other"}, "unknown organization"),
            ([], "expected a JSON object"),
        ]
        for body, text in cases:
            r = await s.post("/v1/apps", json=body)
            assert r.status == 400, body
            assert text in (await r.json())["error"]
        r = await s.post(
            "/v1/apps", data=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert r.status == 400
        assert "invalid JSON" in (await r.json())["error"]
        r = await s.get("/v1/apps/nope")
        assert r.status == 404
        assert (await r.json()) == {"error": "app not found: nope", "status": 404}


async def test_machine_config_is_validated(emulator: Emulator) -> None:
    async with session(emulator) as s:
        await create_app(s)
        bad = [
            ({}, "config: required"),
            ({"config": {}}, "config.image: required"),
            ({"config": {"image": DEMO, "guest": {"memory_mb": 300}}}, "multiple of 256"),
            ({"config": {"image": DEMO, "env": {"A": 1}}}, "config.env.A: expected a string"),
            ({"config": {"image": DEMO, "restart": {"policy": "sometimes"}}}, "restart.policy"),
            ({"config": {"image": DEMO, "services": [{"internal_port": 0}]}}, "internal_port"),
            ({"config": {"image": DEMO, "services": [{"ports": 5}]}}, "ports: expected an array"),
            (
                {"config": {"image": DEMO, "services": [{"ports": [{"handlers": "http"}]}]}},
                "handlers: expected an array",
            ),
        ]
        for body, text in bad:
            r = await s.post("/v1/apps/demo/machines", json=body)
            assert r.status == 400, body
            assert text in (await r.json())["error"], body
        r = await s.post("/v1/apps/ghost/machines", json={"config": {"image": DEMO}})
        assert r.status == 404


async def test_a_launched_machine_is_answered_created_then_starts(emulator: Emulator) -> None:
    # Fly's create example answers "state": "created" with its one event, launch/created;
    # the machine is never born starting (docs/fly-api-notes.md: created -> starting).
    async with session(emulator) as s:
        await create_app(s)
        m = await create_machine(s)
        assert m["state"] == "created"
        assert [(e["type"], e["status"]) for e in m["events"]] == [("launch", "created")]
        await wait_ok(s, "demo", m["id"])


async def test_a_machine_without_a_guest_gets_fly_s_default_size(emulator: Emulator) -> None:
    """Fly fills config.guest with its default size, shared-cpu-1x (1 CPU, 256 MB), when
    the request gives none; a guest given is kept as it came, on an update too."""
    default = {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}
    async with session(emulator) as s:
        m = await new_machine(s, start=False)
        assert m["config"]["guest"] == default
        sized = await create_machine(s, start=False, guest={"cpus": 2})
        assert sized["config"]["guest"] == {"cpus": 2}
        config = {k: v for k, v in sized["config"].items() if k != "guest"}
        r = await s.post(f"/v1/apps/demo/machines/{sized['id']}", json={"config": config})
        assert r.status == 200, await r.text()
        assert (await r.json())["config"]["guest"] == default


async def test_create_with_skip_launch_then_list_and_app_counts(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, start=False, metadata={"role": "web"})
        assert m["state"] == "created"
        assert m["config"]["metadata"] == {"role": "web"}
        listed = await (await s.get("/v1/apps/demo/machines")).json()
        assert [x["id"] for x in listed] == [m["id"]]
        app = await (await s.get("/v1/apps/demo")).json()
        assert app["machine_count"] == 1
        assert emulator.pids() == []  # skip_launch spawns nothing


async def test_cordon_shows_on_the_machine(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, start=False)
        base = f"/v1/apps/demo/machines/{m['id']}"
        assert (await s.post(base + "/cordon")).status == 200
        assert (await (await s.get(base)).json())["cordoned"] is True
        assert (await s.post(base + "/uncordon")).status == 200
        assert (await (await s.get(base)).json())["cordoned"] is False


async def test_metadata_both_forms_and_404(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, start=False)
        base = f"/v1/apps/demo/machines/{m['id']}/metadata"
        assert (await s.post(base + "/role", json="web")).status == 204
        assert (await s.post(base + "/zone", json={"value": "a"})).status == 204
        r = await s.get(base + "/role")
        assert await r.json() == "web"
        assert await (await s.get(base)).json() == {"role": "web", "zone": "a"}
        got = await (await s.get(f"/v1/apps/demo/machines/{m['id']}")).json()
        assert got["config"]["metadata"] == {"role": "web", "zone": "a"}
        assert (await s.delete(base + "/role")).status == 204
        assert (await s.get(base + "/role")).status == 404
        assert (await s.delete(base + "/role")).status == 404
        r = await s.post(base + "/x", json=5)
        assert r.status == 400


async def test_stop_accepts_duration_and_integer_timeouts(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        base = f"/v1/apps/demo/machines/{m['id']}"
        r = await s.post(base + "/stop", json={"signal": "SIGBOGUS"})
        assert r.status == 400
        r = await s.post(base + "/stop", json={"timeout": 5})
        assert r.status == 200
        await wait_ok(s, "demo", m["id"], "stopped")
        r = await s.post(base + "/stop")
        assert r.status == 412  # already stopped
        r = await s.post(base + "/suspend")
        assert r.status == 412


async def test_wait_accepts_several_states_and_rejects_bad_ones(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, start=False)
        url = f"/v1/apps/demo/machines/{m['id']}/wait"
        r = await s.get(url, params={"state": "started,settled", "timeout": "2s"})
        assert r.status == 200  # created is a resting state
        r = await s.get(url, params={"state": "sleeping"})
        assert r.status == 400
        r = await s.get(url, params={"timeout": "301"})
        assert r.status == 400


async def test_wait_for_a_state_given_empty_is_400_as_for_an_unknown_one(
    emulator: Emulator,
) -> None:
    """``state=`` (present, naming no state) is bad input, answered as ``state=sleeping``
    is: not a wait for the default, started, up to the timeout (a machine that is not
    starting answered 408 after it)."""
    async with session(emulator) as s:
        m = await new_machine(s, start=False)
        url = f"/v1/apps/demo/machines/{m['id']}/wait"
        unknown = await s.get(url, params={"state": "sleeping", "timeout": "1"})
        assert unknown.status == 400
        shape = (await unknown.json()).keys()
        for empty in ("", ",", " "):
            r = await s.get(url, params={"state": empty, "timeout": "1"})
            assert r.status == 400, await r.text()
            body = await r.json()
            assert body.keys() == shape
            assert body["error"].startswith("state: expected one of "), body


async def test_wait_on_an_unknown_machine_is_404_before_its_query_is_checked(
    emulator: Emulator,
) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, start=False)
        bad = {"state": "sleeping", "timeout": "301"}
        for url in (
            "/v1/apps/demo/machines/nope/wait",
            f"/v1/apps/ghost/machines/{m['id']}/wait",
        ):
            r = await s.get(url, params=bad)
            assert r.status == 404, await r.text()
            assert "not found" in (await r.json())["error"]
        # A destroyed machine is remembered for a while: its query is checked.
        url = f"/v1/apps/demo/machines/{m['id']}/wait"
        assert (await s.delete(f"/v1/apps/demo/machines/{m['id']}")).status == 200
        await wait_ok(s, "demo", m["id"], "destroyed")
        assert (await s.get(url, params={"state": "sleeping"})).status == 400
        assert (await s.get(url, params={"state": "started"})).status == 404


@pytest.mark.parametrize(
    ("method", "path", "params", "body"),
    [
        ("POST", "", None, {"config": 5}),
        ("DELETE", "", {"force": "maybe"}, None),
        ("POST", "/stop", None, {"signal": "SIGBOGUS"}),
        ("POST", "/restart", None, {"timeout": "soon"}),
        ("POST", "/signal", None, {}),
        ("POST", "/lease", None, {"ttl": "forever"}),
        ("POST", "/metadata/bad key!", None, 5),
        ("GET", "/wait", {"state": "sleeping", "timeout": "0"}, None),
    ],
)
async def test_unknown_machine_is_404_whatever_the_request_says(
    emulator: Emulator,
    method: str,
    path: str,
    params: dict[str, str] | None,
    body: object,
) -> None:
    async with session(emulator) as s:
        await create_app(s)
        r = await s.request(method, "/v1/apps/demo/machines/nope" + path, params=params, json=body)
        assert r.status == 404, await r.text()
        assert (await r.json())["error"] == "machine not found: nope"


async def test_delete_app_needs_force_while_machines_run(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        pid = emulator.pids()[0]
        record = emulator.machine("demo", m["id"])
        r = await s.delete("/v1/apps/demo")
        assert r.status == 412
        r = await s.delete("/v1/apps/demo", params={"force": "true"})
        assert r.status == 202
        assert (await s.get("/v1/apps/demo")).status == 404
        await until_state(record, "destroyed")
        assert pid_gone(pid)


async def test_volumes_lifecycle(emulator: Emulator) -> None:
    async with session(emulator) as s:
        await create_app(s)
        r = await s.post(
            "/v1/apps/demo/volumes", json={"name": "data", "size_gb": 1, "region": "iad"}
        )
        assert r.status == 200
        vol = await r.json()
        vid = vol["id"]
        assert vol["encrypted"] is True
        assert "attached_machine_id" not in vol
        r = await s.put(f"/v1/apps/demo/volumes/{vid}", json={"snapshot_retention": 10})
        assert (await r.json())["snapshot_retention"] == 10
        r = await s.put(f"/v1/apps/demo/volumes/{vid}/extend", json={"size_gb": 1})
        assert r.status == 400  # only larger
        r = await s.put(f"/v1/apps/demo/volumes/{vid}/extend", json={"size_gb": 3})
        assert (await r.json())["size_gb"] == 3
        assert (await s.post(f"/v1/apps/demo/volumes/{vid}/snapshots")).status == 200
        snaps = await (await s.get(f"/v1/apps/demo/volumes/{vid}/snapshots")).json()
        assert len(snaps) == 1
        m = await create_machine(s, start=False, mounts=[{"volume": vid, "path": "/data"}])
        got = await (await s.get(f"/v1/apps/demo/volumes/{vid}")).json()
        assert got["attached_machine_id"] == m["id"]
        r = await s.delete(f"/v1/apps/demo/volumes/{vid}")
        assert r.status == 412  # attached
        await s.delete(f"/v1/apps/demo/machines/{m['id']}")
        await wait_ok(s, "demo", m["id"], "destroyed")
        r = await s.delete(f"/v1/apps/demo/volumes/{vid}")
        assert r.status == 200
        assert (await s.get(f"/v1/apps/demo/volumes/{vid}")).status == 404
        listed = await (await s.get("/v1/apps/demo/volumes")).json()
        assert listed == []


async def test_oidc_token_is_a_jwt_string(emulator: Emulator) -> None:
    async with session(emulator) as s:
        r = await s.post("/v1/tokens/oidc", json={"aud": "https://example.com"})
        assert r.status == 200
        token = await r.json()
        assert isinstance(token, str)
        assert token.count(".") == 2


async def test_rate_limits_answer_429_with_retry_after() -> None:
    settings = EmulatorSettings(rate_limits=True)
    async with Emulator(settings, port=0) as emu, session(emu) as s:
        m = await new_machine(s, start=False)
        url = f"/v1/apps/demo/machines/{m['id']}/cordon"
        statuses = [(await s.post(url)).status for _ in range(4)]
        assert statuses[:3] == [200, 200, 200]  # a burst of 3 per action per machine
        assert statuses[3] == 429
        r = await s.post(url)
        assert r.headers["Retry-After"] == "1"
        assert "rate limit" in (await r.json())["error"]
        # Another action on the same machine has its own bucket.
        assert (await s.post(url.replace("cordon", "uncordon"))).status == 200


async def test_app_deletions_share_one_bucket_of_100_a_minute() -> None:
    """Fly: "app deletions are limited to 100 per minute". Keyed by the app deleted, each
    deletion had a bucket of its own and the limit never held."""
    settings = EmulatorSettings(rate_limits=False)
    async with Emulator(settings, port=0, clock=lambda: 0.0) as emu, session(emu) as s:
        for i in range(101):
            await create_app(s, f"app{i}")
        emu.set_rate_limits(True)  # time stands still: no token comes back
        statuses = [(await s.delete(f"/v1/apps/app{i}")).status for i in range(101)]
        assert statuses[:100] == [202] * 100
        assert statuses[100] == 429


async def test_a_machines_buckets_are_its_apps() -> None:
    """Per action, per machine: the bucket of a machine is that of the machine in its app
    (as the client keys it), not of any path that names the same id."""
    settings = EmulatorSettings(rate_limits=False)
    async with Emulator(settings, port=0, clock=lambda: 0.0) as emu, session(emu) as s:
        m = await new_machine(s, start=False)
        await create_app(s, "other")
        emu.set_rate_limits(True)
        elsewhere = f"/v1/apps/other/machines/{m['id']}/cordon"
        assert [(await s.post(elsewhere)).status for _ in range(4)] == [404, 404, 404, 429]
        assert (await s.post(f"/v1/apps/demo/machines/{m['id']}/cordon")).status == 200


async def test_injected_500_and_429(emulator: Emulator) -> None:
    async with session(emulator) as s:
        emulator.set_faults(FaultSettings(error_rate=1.0))
        r = await s.get("/v1/apps", params={"org_slug": "personal"})
        assert r.status == 500
        emulator.set_faults(FaultSettings(rate_limit_rate=1.0))
        r = await s.get("/v1/apps", params={"org_slug": "personal"})
        assert r.status == 429
        assert r.headers["Retry-After"]
        emulator.set_faults(FaultSettings())
        r = await s.get("/v1/apps", params={"org_slug": "personal"})
        assert r.status == 200


async def test_leases_lock_changes_to_their_holder(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, start=False)
        base = f"/v1/apps/demo/machines/{m['id']}"
        assert (await s.get(base + "/lease")).status == 404
        r = await s.post(base + "/lease", json={"ttl": 60, "description": "deploy"})
        assert r.status == 201
        body = await r.json()
        assert body["status"] == "success"  # the real API's envelope, as Fly's examples
        lease = body["data"]
        assert set(lease) == {"nonce", "expires_at", "owner", "description", "version"}
        nonce = {"fly-machine-lease-nonce": lease["nonce"]}
        got = await (await s.get(base + "/lease")).json()
        assert got == {"status": "success", "data": lease}
        assert got["data"]["description"] == "deploy"
        held = emulator.lease("demo", m["id"])  # what a test in this process reads
        assert held is not None
        assert held.to_json() == lease
        r = await s.post(base + "/cordon")
        assert r.status == 409
        assert "leased" in (await r.json())["error"]
        assert (await s.post(base + "/lease", json={"ttl": 5})).status == 409
        assert (await s.post(base + "/cordon", headers=nonce)).status == 200
        assert (await s.get(base)).status == 200  # reads need no nonce
        assert (await s.delete(base + "/lease")).status == 409  # wrong (no) nonce
        r = await s.delete(base + "/lease", headers=nonce)
        assert r.status == 200
        assert await r.json() == {"status": "success", "data": {"ok": True}}
        assert emulator.lease("demo", m["id"]) is None
        assert (await s.post(base + "/uncordon")).status == 200


async def test_no_free_address_is_a_clear_412(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As when something listens on 0.0.0.0:PORT: no loopback address can take the port.
    monkeypatch.setattr("autoscaler.emulator.procs.address_free", lambda host, port: False)
    async with session(emulator) as s:
        await create_app(s)
        r = await s.post(
            "/v1/apps/demo/machines",
            json={"config": {"image": DEMO, "services": [{"internal_port": 8123}]}},
        )
        assert r.status == 412
        assert "0.0.0.0:8123" in (await r.json())["error"]
        assert emulator.machines("demo") == []


def test_an_ipv4_address_is_probed_on_itself_not_on_another_loopback_address() -> None:
    """A new (or re-addressed, ``readdress``) IPv4 machine's port is checked free on the
    address the machine will listen on: a listener on 127.0.0.1 alone does not take it,
    one on the drawn address itself does (the next address drawn is given)."""

    def first_draw(seed: int) -> str:
        rng = random.Random(seed)  # noqa: S311 - addresses, not secrets
        return f"127.{rng.randint(2, 254)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"

    with socket.socket() as elsewhere:
        elsewhere.bind(("127.0.0.1", 0))
        elsewhere.listen()
        port = elsewhere.getsockname()[1]
        pool = AddressPool(random.Random(1))  # noqa: S311 - addresses, not secrets
        assert pool.readdress(port) == first_draw(1)
        with socket.socket() as on_it:
            on_it.bind((first_draw(2), port))
            on_it.listen()
            pool = AddressPool(random.Random(2))  # noqa: S311 - addresses, not secrets
            given = pool.readdress(port)
            assert given != first_draw(2)
            assert given.startswith("127.")
