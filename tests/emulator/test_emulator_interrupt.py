"""Interrupting transitions: a start during a suspend, and resumes that fall back to a boot."""

from __future__ import annotations

import pytest
from emu_helpers import hit, new_machine, session, until, wait_ok

from autoscaler.config import EmulatorSettings
from autoscaler.emulator import Emulator
from autoscaler.emulator.model import Machine


@pytest.fixture
def emulator_settings() -> EmulatorSettings:
    return EmulatorSettings(
        rate_limits=False,
        boot_timeout_s=20.0,
        # A suspend long enough to be interrupted for sure.
        timing={"start_s": 0.05, "suspend_s": 30.0, "resume_s": 0.0},
    )


def last_flyd(m: Machine) -> tuple[str, str, dict[str, object]]:
    e = next(e for e in reversed(m.events) if e.source == "flyd")
    return e.type, e.status, e.request


async def test_a_start_during_a_suspend_abandons_it_and_keeps_the_process(
    emulator: Emulator,
) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        mid, ip = m["id"], m["private_ip"]
        assert (await hit(ip))["count"] == 1
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/suspend")).status == 200
        machine = emulator.machine("demo", mid)
        assert machine.state == "suspending"
        r = await s.post(f"/v1/apps/demo/machines/{mid}/start")
        assert r.status == 200
        assert (await r.json())["previous_state"] == "suspending"
        await wait_ok(s, "demo", mid)
        starts = [(e.type, e.status, e.source) for e in machine.events[-2:]]
        assert starts == [("start", "starting", "user"), ("start", "started", "flyd")]
        assert last_flyd(machine) == (
            "start",
            "started",
            {"resume": True, "interrupted": "suspend"},
        )
        assert (await hit(ip))["count"] == 2  # the same process, memory kept
        # The abandoned suspend never completes later.
        assert "suspended" not in [e.status for e in machine.events]
        assert machine.state == "started"


def quick(**timing: float) -> EmulatorSettings:
    return EmulatorSettings(
        rate_limits=False, timing={"start_s": 0.05, "suspend_s": 0, "resume_s": 0, **timing}
    )


async def test_a_resume_can_fall_back_to_a_cold_boot() -> None:
    async with Emulator(quick(), host="127.0.0.1", port=0) as emulator, session(emulator) as s:
        m = await new_machine(s)
        mid, ip = m["id"], m["private_ip"]
        machine = emulator.machine("demo", mid)
        assert (await hit(ip))["count"] == 1

        # A resume from the snapshot: same process, counter kept.
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/suspend")).status == 200
        await wait_ok(s, "demo", mid, "suspended")
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/start")).status == 200
        await wait_ok(s, "demo", mid)
        assert last_flyd(machine) == ("start", "started", {"resume": True})
        assert (await hit(ip))["count"] == 2

        # The snapshot lost (faults.resume_cold_rate): a cold boot, a new process.
        emulator.set_faults(resume_cold_rate=1.0)
        pid = emulator.pids()[0]
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/suspend")).status == 200
        await wait_ok(s, "demo", mid, "suspended")
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/start")).status == 200
        await until(machine, lambda x: x.state == "started")
        kind, status, request = last_flyd(machine)
        assert (kind, status, request["resume"]) == ("launch", "started", False)
        assert "resume_cold_rate" in str(request["reason"])
        assert emulator.pids() != [pid]
        assert (await hit(ip))["count"] == 1  # memory lost


async def test_a_snapshot_older_than_its_ttl_is_not_resumed() -> None:
    settings = quick(snapshot_ttl_s=0.0)
    async with Emulator(settings, host="127.0.0.1", port=0) as emulator, session(emulator) as s:
        m = await new_machine(s)
        mid = m["id"]
        machine = emulator.machine("demo", mid)
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/suspend")).status == 200
        await wait_ok(s, "demo", mid, "suspended")
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/start")).status == 200
        await until(machine, lambda x: x.state == "started")
        kind, _, request = last_flyd(machine)
        assert kind == "launch"
        assert "snapshot expired" in str(request["reason"])
