"""Machines as real processes: start, serve, suspend, resume, stop, crash, destroy."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest
from emu_helpers import (
    create_app,
    create_machine,
    hit,
    new_machine,
    pid_gone,
    session,
    until,
    until_state,
    wait,
    wait_ok,
)

from autoscaler.config import EmulatorSettings, FaultSettings
from autoscaler.emulator import Emulator


async def test_started_machine_serves_http_on_its_private_ip(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        assert m["private_ip"].startswith("127.")
        assert m["private_ip"] != "127.0.0.1"
        body = await hit(m["private_ip"])
        assert body["machine_id"] == m["id"]
        assert body["count"] == 1
        assert (await hit(m["private_ip"]))["count"] == 2
        got = await (await s.get(f"/v1/apps/demo/machines/{m['id']}")).json()
        assert got["state"] == "started"


async def test_suspend_freezes_and_resume_keeps_memory(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        mid, ip = m["id"], m["private_ip"]
        assert (await hit(ip))["count"] == 1
        r = await s.post(f"/v1/apps/demo/machines/{mid}/suspend")
        assert r.status == 200
        await wait_ok(s, "demo", mid, "suspended")
        # A frozen process accepts the connection (the kernel does) but never answers.
        frozen = asyncio.ensure_future(hit(ip))
        done, _ = await asyncio.wait({frozen}, timeout=0.5)
        assert not done, "a suspended machine answered"
        r = await s.post(f"/v1/apps/demo/machines/{mid}/start")
        assert (await r.json())["previous_state"] == "suspended"
        await wait_ok(s, "demo", mid)
        assert (await frozen)["count"] == 2  # the held request completes after the resume
        assert (await hit(ip))["count"] == 3  # memory kept: the counter continues


async def test_stop_then_start_is_a_cold_boot(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        mid, ip = m["id"], m["private_ip"]
        await hit(ip)
        first = await hit(ip)
        assert first["count"] == 2
        r = await s.post(
            f"/v1/apps/demo/machines/{mid}/stop", json={"signal": "SIGTERM", "timeout": "5s"}
        )
        assert r.status == 200
        await wait_ok(s, "demo", mid, "stopped")
        assert pid_gone(first["pid"])
        with pytest.raises(aiohttp.ClientConnectionError):
            await hit(ip)
        await s.post(f"/v1/apps/demo/machines/{mid}/start")
        await wait_ok(s, "demo", mid)
        again = await hit(ip)
        assert again["count"] == 1  # a new process: the counter starts over
        assert again["pid"] != first["pid"]


async def test_crash_stops_the_machine_with_an_exit_event(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, restart={"policy": "no"})
        mid = m["id"]
        assert emulator.kill_machine_process("demo", mid)
        await wait_ok(s, "demo", mid, "stopped")
        got = await (await s.get(f"/v1/apps/demo/machines/{mid}")).json()
        assert got["state"] == "stopped"
        exit_event = got["events"][0]
        assert exit_event["type"] == "exit"
        assert exit_event["request"]["exit_event"]["signal"] == 9


async def test_restart_policy_always_brings_a_crashed_machine_back(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, restart={"policy": "always"})
        mid = m["id"]
        pid = (await hit(m["private_ip"]))["pid"]
        machine = emulator.machine("demo", mid)
        emulator.kill_machine_process("demo", mid)
        await until(machine, lambda x: x.state == "started" and x.events[-2].type == "restart")
        assert (await hit(m["private_ip"]))["pid"] != pid
        events = emulator.machine("demo", mid).to_json()["events"]
        assert [(e["type"], e["status"]) for e in events[:3]] == [
            ("start", "started"),
            ("restart", "starting"),
            ("exit", "stopped"),
        ]


async def test_no_restart_policy_restarts_a_crash_as_flys_on_failure(emulator: Emulator) -> None:
    # Fly's default without a policy (machines of `fly launch` and `fly deploy`): a process
    # that exits non-zero is started again, up to max_retries (10 unless set), then stops.
    async with session(emulator) as s:
        m = await new_machine(s, restart={"max_retries": 1})
        mid = m["id"]
        machine = emulator.machine("demo", mid)
        emulator.kill_machine_process("demo", mid)
        await until(machine, lambda x: x.state == "started" and x.events[-2].type == "restart")
        emulator.kill_machine_process("demo", mid)  # the retry spent: it stays stopped
        await wait_ok(s, "demo", mid, "stopped")
        assert [(e.type, e.status) for e in machine.events[-4:]] == [
            ("exit", "stopped"),
            ("restart", "starting"),
            ("start", "started"),
            ("exit", "stopped"),
        ]
        # A user's start gives it its retries again, but a clean exit (code 0) is no failure.
        await s.post(f"/v1/apps/demo/machines/{mid}/start")
        await wait_ok(s, "demo", mid)
        emulator.kill_machine_process("demo", mid, signal.SIGTERM)  # the demo app exits 0
        await wait_ok(s, "demo", mid, "stopped")
        assert machine.events[-1].type == "exit"
        assert machine.events[-1].request["exit_event"]["exit_code"] == 0


async def test_wait_times_out_with_408_and_an_error(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, start=False)
        r = await wait(s, "demo", m["id"], "started", seconds=1)
        assert r.status == 408
        body = await r.json()
        assert "currently created" in body["error"]
        assert body["status"] == 408


async def test_wait_honours_instance_id(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        mid, old = m["id"], m["instance_id"]
        r = await s.post(
            f"/v1/apps/demo/machines/{mid}",
            json={"config": {**m["config"], "env": {"X": "1"}}},
        )
        assert r.status == 200
        new = (await r.json())["instance_id"]
        assert new != old
        url = f"/v1/apps/demo/machines/{mid}/wait"
        r = await s.get(url, params={"state": "started", "instance_id": new, "timeout": "20"})
        assert r.status == 200
        assert (await r.json())["version"] == new
        # The old version has stopped for good.
        r = await s.get(url, params={"state": "stopped", "instance_id": old, "timeout": "1"})
        assert r.status == 200
        r = await s.get(url, params={"state": "started", "instance_id": "nope", "timeout": "1"})
        assert r.status == 400


async def test_wrong_state_is_412_and_force_destroys(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        mid = m["id"]
        pid = emulator.pids()[0]
        base = f"/v1/apps/demo/machines/{mid}"
        for call in (s.post(base + "/start"), s.delete(base)):
            r = await call
            assert r.status == 412
            assert "started" in (await r.json())["error"]
        r = await s.delete(base, params={"force": "true"})
        assert r.status == 200
        await wait_ok(s, "demo", mid, "destroyed")
        assert pid_gone(pid)
        r = await s.get(base)
        assert r.status == 404
        r = await s.post(base + "/suspend")
        assert r.status == 404


async def test_boot_failure_fault_leaves_the_machine_failed(emulator: Emulator) -> None:
    emulator.set_faults(FaultSettings(boot_failure_rate=1.0))
    async with session(emulator) as s:
        await create_app(s)
        m = await create_machine(s)
        await wait_ok(s, "demo", m["id"], "failed")
        emulator.set_faults(FaultSettings())
        await s.post(f"/v1/apps/demo/machines/{m['id']}/start")
        await wait_ok(s, "demo", m["id"])


async def test_crash_after_fault_kills_started_machines(emulator: Emulator) -> None:
    emulator.set_faults(FaultSettings(crash_after_s=0.2))
    async with session(emulator) as s:
        await create_app(s)
        m = await create_machine(s, restart={"policy": "no"})  # (Fly's default restarts it)
        await wait_ok(s, "demo", m["id"], "stopped")
        assert emulator.machine("demo", m["id"]).events[-1].type == "exit"


async def test_closing_the_emulator_kills_every_machine() -> None:
    settings = EmulatorSettings(demo_boot_delay_s=0.0, rate_limits=False)
    async with Emulator(settings, port=0) as emu, session(emu) as s:
        await create_app(s)
        a = await create_machine(s)
        b = await create_machine(s)
        await wait_ok(s, "demo", a["id"])
        await wait_ok(s, "demo", b["id"])
        await s.post(f"/v1/apps/demo/machines/{b['id']}/suspend")
        await wait_ok(s, "demo", b["id"], "suspended")
        pids = emu.pids()
        assert len(pids) == 2
    for pid in pids:
        assert pid_gone(pid)


async def test_stopping_a_suspended_machine_drops_its_process(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        mid = m["id"]
        pid = emulator.pids()[0]
        await s.post(f"/v1/apps/demo/machines/{mid}/suspend")
        await wait_ok(s, "demo", mid, "suspended")
        # SIGINT to a stopped process would wait forever; the emulator resumes it to deliver.
        r = await s.post(f"/v1/apps/demo/machines/{mid}/stop", json={"timeout": 10})
        assert r.status == 200
        await wait_ok(s, "demo", mid, "stopped")
        assert pid_gone(pid)
        await s.post(f"/v1/apps/demo/machines/{mid}/start")
        await wait_ok(s, "demo", mid)
        assert (await hit(m["private_ip"]))["count"] == 1  # a cold boot, not a resume


async def test_update_keeps_a_stopped_machine_stopped(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, start=False)
        config = {**m["config"], "env": {"A": "1"}}
        r = await s.post(f"/v1/apps/demo/machines/{m['id']}", json={"config": config})
        assert r.status == 200
        await wait_ok(s, "demo", m["id"], "settled")
        record = emulator.machine("demo", m["id"])
        assert record.state == "created"
        assert record.config["env"] == {"A": "1"}
        assert record.versions == [m["instance_id"]]
        assert emulator.pids() == []


@pytest.mark.parametrize("how", ["crash", "stop"])
async def test_auto_destroy_removes_a_machine_that_exits(emulator: Emulator, how: str) -> None:
    async with session(emulator) as s:
        # Without a policy a crash is restarted (Fly's on-failure): destroyed once it stops.
        m = await new_machine(s, auto_destroy=True, restart={"policy": "no"})
        mid = m["id"]
        if how == "crash":
            emulator.kill_machine_process("demo", mid)
        else:
            await s.post(f"/v1/apps/demo/machines/{mid}/stop")
        await wait_ok(s, "demo", mid, "destroyed")
        assert (await s.get(f"/v1/apps/demo/machines/{mid}")).status == 404


async def test_restart_and_signal_extras(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        mid, ip = m["id"], m["private_ip"]
        base = f"/v1/apps/demo/machines/{mid}"
        before = await hit(ip)
        record = emulator.machine("demo", mid)
        r = await s.post(base + "/restart", json={"signal": "SIGTERM"})
        assert r.status == 200
        assert record.state == "restarting"
        await until_state(record, "started")
        after = await hit(ip)
        assert after["pid"] != before["pid"]
        assert after["count"] == 1
        assert (await s.post(base + "/signal", json={})).status == 400
        r = await s.post(base + "/signal", json={"signal": "SIGTERM"})
        assert r.status == 200
        await wait_ok(s, "demo", mid, "stopped")
        assert record.events[-1].type == "exit"
        assert record.events[-1].request["exit_event"]["exit_code"] == 0
        assert (await s.post(base + "/signal", json={"signal": "SIGTERM"})).status == 412
