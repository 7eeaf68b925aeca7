"""The real API's rules the seed leaves out: /wait limits, lease on create, versions, ps,
the machines Fly cannot suspend, and a clear 501 for the endpoints of Fly's spec that the
emulator does not play."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from emu_helpers import create_app, create_machine, new_machine, session, wait_ok
from testkit import until

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
        assert lease["data"]["nonce"] == nonce
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


async def test_a_wait_answers_404_when_the_machine_is_destroyed_meanwhile(
    emulator: Emulator,
) -> None:
    # It waited out its timeout on the destroyed record and answered 408 "currently
    # destroyed", which a client takes for "not yet" and waits again.
    async with session(emulator) as s:
        m = await new_machine(s)
        mid = m["id"]
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/stop")).status == 200
        await wait_ok(s, "demo", mid, "stopped")
        waiter = asyncio.ensure_future(
            s.get(f"/v1/apps/demo/machines/{mid}/wait", params={"state": "started", "timeout": 30})
        )
        await until(lambda: len(emulator.machine("demo", mid).changed._waiters) > 0)
        assert (await s.delete(f"/v1/apps/demo/machines/{mid}")).status == 200
        got = await asyncio.wait_for(waiter, 10)
        assert got.status == 404


async def test_a_wait_for_stopped_sees_the_stop_of_an_auto_destroy_machine(
    emulator: Emulator,
) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, auto_destroy=True)
        mid, version = m["id"], m["instance_id"]
        waiter = asyncio.ensure_future(
            s.get(
                f"/v1/apps/demo/machines/{mid}/wait",
                params={"state": "stopped", "timeout": 30, "version": version},
            )
        )
        await until(lambda: len(emulator.machine("demo", mid).changed._waiters) > 0)
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/stop")).status == 200
        got = await asyncio.wait_for(waiter, 10)
        assert (got.status, (await got.json())["state"]) == (200, "stopped")


async def test_an_older_version_counts_as_stopped_not_as_destroyed(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        mid, old = m["id"], m["instance_id"]
        config = {**m["config"], "env": {"X": "1"}}
        assert (await s.post(f"/v1/apps/demo/machines/{mid}", json={"config": config})).ok
        await wait_ok(s, "demo", mid)
        url = f"/v1/apps/demo/machines/{mid}/wait"
        r = await s.get(url, params={"state": "stopped", "timeout": 1, "version": old})
        assert r.status == 200
        r = await s.get(url, params={"state": "destroyed", "timeout": 1, "version": old})
        assert r.status == 408  # the machine itself runs on


async def test_a_lease_taken_while_a_changing_call_sends_its_body_is_honoured(
    emulator: Emulator,
) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        mid = m["id"]
        host, port = emulator.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(
                f"POST /v1/apps/demo/machines/{mid}/stop HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {emulator.token}\r\nContent-Type: application/json\r\n"
                "Content-Length: 2\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            await asyncio.sleep(0.2)  # the head is in; someone else takes the lease
            assert (await s.post(f"/v1/apps/demo/machines/{mid}/lease", json={"ttl": 60})).ok
            writer.write(b"{}")
            status = (await reader.readline()).decode()
        finally:
            writer.close()
        assert " 409 " in status
        assert emulator.machine("demo", mid).state == "started"


async def test_a_restart_keeps_suspended_machines_and_forgets_accepted_destroys(
    tmp_path: Path,
) -> None:
    """A suspended machine came back stopped (its next start a plain start, not the cold
    boot a resume falls back to), and a destroy accepted while the host was unreachable
    came back as a stopped machine."""
    settings = EmulatorSettings(
        state_file=tmp_path / "state.json", demo_boot_delay_s=0.05, rate_limits=False
    )
    async with Emulator(settings, port=0) as emu, session(emu) as s:
        asleep = (await new_machine(s))["id"]
        await s.post(f"/v1/apps/demo/machines/{asleep}/suspend")
        await wait_ok(s, "demo", asleep, "suspended")
        gone = (await create_machine(s, "demo", start=False))["id"]
        emu.set_faults(host_unreachable=[gone])
        assert (await s.delete(f"/v1/apps/demo/machines/{gone}")).status == 200
        assert emu.machine("demo", gone).state == "destroying"
    async with Emulator(settings, port=0) as emu, session(emu) as s:
        assert (await s.get(f"/v1/apps/demo/machines/{gone}")).status == 404
        got = await (await s.get(f"/v1/apps/demo/machines/{asleep}")).json()
        assert got["state"] == "suspended"
        await s.post(f"/v1/apps/demo/machines/{asleep}/start")
        await wait_ok(s, "demo", asleep)
        events = await (await s.get(f"/v1/apps/demo/machines/{asleep}/events")).json()
        launch = next(e for e in events if e["type"] == "launch")
        assert launch["request"]["resume"] is False  # the snapshot did not survive


INELIGIBLE = {
    "swap": ({"init": {"swap_size_mb": 512}}, "config.init.swap_size_mb"),
    "schedule": ({"schedule": "daily"}, "config.schedule"),
    "gpu": ({"guest": {"cpus": 1, "memory_mb": 1024, "gpus": 1}}, "config.guest.gpus"),
    "gpu_kind": ({"guest": {"gpu_kind": "a10"}}, "config.guest.gpu_kind"),
}


@pytest.mark.parametrize("case", sorted(INELIGIBLE))
async def test_a_suspend_fly_does_not_allow_is_refused_and_the_machine_stays_started(
    emulator: Emulator, case: str
) -> None:
    """Fly's suspend-resume page: no swap, no schedule, no GPU. Refused with 400 naming
    the field; the machine runs on untouched, and a stop still works. A machine over
    2 GB is suspended: the page only discourages it."""
    config, field = INELIGIBLE[case]
    async with session(emulator) as s:
        m = await new_machine(s, **config)
        mid = m["id"]
        r = await s.post(f"/v1/apps/demo/machines/{mid}/suspend")
        assert r.status == 400
        body = await r.json()
        assert body["status"] == 400
        assert field in body["error"]
        got = await (await s.get(f"/v1/apps/demo/machines/{mid}")).json()
        assert got["state"] == "started"
        assert all(e["type"] != "suspend" for e in got["events"])
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/stop")).status == 200
        await wait_ok(s, "demo", mid, "stopped")

        large = await create_machine(s, guest={"cpus": 2, "memory_mb": 4096})
        await wait_ok(s, "demo", large["id"])
        assert (await s.post(f"/v1/apps/demo/machines/{large['id']}/suspend")).status == 200
        await wait_ok(s, "demo", large["id"], "suspended")


async def test_a_machine_updated_to_drop_its_swap_can_be_suspended(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, init={"swap_size_mb": 256})
        mid = m["id"]
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/suspend")).status == 400
        config = {**m["config"], "init": {}}
        assert (await s.post(f"/v1/apps/demo/machines/{mid}", json={"config": config})).ok
        await wait_ok(s, "demo", mid)
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/suspend")).status == 200
        await wait_ok(s, "demo", mid, "suspended")


@pytest.mark.parametrize(
    "config",
    [
        {"init": {"swap_size_mb": -1}},
        {"init": {"swap_size_mb": "512"}},
        {"guest": {"gpus": -1}},
        {"guest": {"gpu_kind": 3}},
    ],
)
async def test_swap_and_gpu_fields_of_the_wrong_kind_are_400_at_create(
    emulator: Emulator, config: dict[str, object]
) -> None:
    async with session(emulator) as s:
        await create_app(s)
        body = {"config": {"image": "autoscaler/demo-app", **config}}
        r = await s.post("/v1/apps/demo/machines", json=body)
        assert r.status == 400, await r.text()
