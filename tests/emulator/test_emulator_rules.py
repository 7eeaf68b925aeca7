"""The real API's rules the seed leaves out: /wait limits, lease on create, versions, ps,
and a clear 501 for the endpoints of Fly's spec that the emulator does not play."""

from __future__ import annotations

from pathlib import Path

import pytest
from emu_helpers import create_app, create_machine, new_machine, session, wait_ok

from autoscaler.config import EmulatorSettings
from autoscaler.emulator import Emulator


async def test_wait_timeout_is_at_most_60_seconds(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, start=False)
        url = f"/v1/apps/demo/machines/{m['id']}/wait"
        r = await s.get(url, params={"state": "settled", "timeout": "61"})
        assert r.status == 400
        assert "timeout: must be between 1 and 60 seconds" in (await r.json())["error"]
        r = await s.get(url, params={"state": "settled", "timeout": "60"})
        assert r.status == 200


async def test_wait_for_stopped_needs_the_version(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, start=False)
        url = f"/v1/apps/demo/machines/{m['id']}/wait"
        r = await s.get(url, params={"state": "stopped", "timeout": "1"})
        assert r.status == 400
        assert "version: required when waiting for state stopped" in (await r.json())["error"]
        r = await s.get(
            url, params={"state": "stopped", "timeout": "1", "version": m["instance_id"]}
        )
        assert r.status == 408  # accepted; the machine is created, not stopped


async def test_seed_wait_limits_restore_the_seed_rules() -> None:
    settings = EmulatorSettings(rate_limits=False, seed_wait_limits=True)
    async with Emulator(settings, port=0) as emu, session(emu) as s:
        m = await new_machine(s, start=False)
        url = f"/v1/apps/demo/machines/{m['id']}/wait"
        r = await s.get(url, params={"state": "settled", "timeout": "300"})
        assert r.status == 200
        r = await s.get(url, params={"state": "stopped", "timeout": "1"})
        assert r.status == 408  # no version needed
        r = await s.get(url, params={"timeout": "301"})
        assert r.status == 400


async def test_lease_ttl_on_create_leases_the_machine_to_its_creator(emulator: Emulator) -> None:
    async with session(emulator) as s:
        await create_app(s)
        body = {"config": {"image": "autoscaler/demo-app"}, "skip_launch": True, "lease_ttl": 60}
        r = await s.post("/v1/apps/demo/machines", json=body)
        assert r.status == 200, await r.text()
        m = await r.json()
        nonce = m["nonce"]
        lease = await (await s.get(f"/v1/apps/demo/machines/{m['id']}/lease")).json()
        assert lease["nonce"] == nonce
        start = f"/v1/apps/demo/machines/{m['id']}/start"
        assert (await s.post(start)).status == 409  # held, and this call has no nonce
        r = await s.post(start, headers={"fly-machine-lease-nonce": nonce})
        assert r.status == 200
        # The nonce is handed out once: reads do not show it.
        assert "nonce" not in await (await s.get(f"/v1/apps/demo/machines/{m['id']}")).json()
        body["lease_ttl"] = "forever"
        r = await s.post("/v1/apps/demo/machines", json=body)
        assert r.status == 400
        assert "lease_ttl: expected an integer" in (await r.json())["error"]
        await wait_ok(s, "demo", m["id"])


async def test_versions_lists_the_configs_newest_first(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, start=False, env={"V": "1"})
        config = {**m["config"], "env": {"V": "2"}}
        r = await s.post(f"/v1/apps/demo/machines/{m['id']}", json={"config": config})
        assert r.status == 200, await r.text()
        updated = await r.json()
        versions = await (await s.get(f"/v1/apps/demo/machines/{m['id']}/versions")).json()
        assert [v["version"] for v in versions] == [updated["instance_id"], m["instance_id"]]
        assert [v["user_config"]["env"] for v in versions] == [{"V": "2"}, {"V": "1"}]


async def test_versions_survive_a_restart_with_a_state_file(tmp_path: Path) -> None:
    settings = EmulatorSettings(state_file=tmp_path / "state.json", rate_limits=False)
    async with Emulator(settings, port=0) as emu, session(emu) as s:
        m = await new_machine(s, start=False, env={"V": "1"})
        config = {**m["config"], "env": {"V": "2"}}
        assert (await s.post(f"/v1/apps/demo/machines/{m['id']}", json={"config": config})).ok
        url = f"/v1/apps/demo/machines/{m['id']}/versions"
        before = await (await s.get(url)).json()
    async with Emulator(settings, port=0) as emu, session(emu) as s:
        assert await (await s.get(url)).json() == before
        assert len(before) == 2


async def test_ps_lists_the_machines_processes(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        url = f"/v1/apps/demo/machines/{m['id']}/ps"
        procs = await (await s.get(url, params={"sort_by": "rss", "order": "desc"})).json()
        assert [p["pid"] for p in procs] == emulator.pids()
        (proc,) = procs
        assert "autoscaler.emulator.demo_app" in proc["command"]
        assert {"address": f"{m['private_ip']}:8080", "proto": "tcp"} in proc["listen_sockets"]
        assert proc["rss"] > 0
        r = await s.get(url, params={"sort_by": "colour"})
        assert r.status == 400
        assert "sort_by: expected one of" in (await r.json())["error"]
        assert (await s.post(f"/v1/apps/demo/machines/{m['id']}/suspend")).status == 200
        await wait_ok(s, "demo", m["id"], "suspended")
        r = await s.get(url)
        assert r.status == 412
        assert "current state: 'suspended'" in (await r.json())["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/apps/demo/secrets"),
        ("POST", "/v1/apps/demo/machines/{id}/exec"),
        ("GET", "/v1/platform/regions"),
    ],
)
async def test_real_endpoints_it_lacks_answer_501_naming_them(
    emulator: Emulator, method: str, path: str
) -> None:
    async with session(emulator) as s:
        await create_app(s)
        m = await create_machine(s, start=False)
        r = await s.request(method, path.format(id=m["id"]), json={})
        assert r.status == 501
        template = path.replace("demo", "{app_name}").replace("{id}", "{machine_id}")
        assert (await r.json())["error"] == f"not implemented in the emulator: {method} {template}"
    async with session(emulator, token="wrong") as s:
        assert (await s.get("/v1/apps/demo/secrets")).status == 401
