"""Failures that recover: failed boots of any kind, hung processes, unreachable hosts."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import aiohttp
import pytest
import testkit
from emu_helpers import create_machine, hit, new_machine, session, until, wait, wait_ok

from autoscaler.config import EmulatorSettings
from autoscaler.emulator import Emulator


@pytest.fixture
def emulator_settings() -> EmulatorSettings:
    return EmulatorSettings(
        rate_limits=False, timing={"start_s": 0.05, "suspend_s": 0, "resume_s": 0}
    )


async def test_any_boot_can_fail_and_a_failed_machine_starts_again(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        mid = m["id"]
        machine = emulator.machine("demo", mid)
        emulator.set_faults(boot_failure_rate=1.0)
        # A restart's boot fails ...
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/restart")).status == 200
        await wait_ok(s, "demo", mid, "failed")
        assert machine.events[-1].request == {"error": "injected boot failure"}
        # ... and a failed machine can be started (Fly allows it), here into another failure.
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/start")).status == 200
        await wait_ok(s, "demo", mid, "failed")
        emulator.set_faults(boot_failure_rate=None)
        r = await s.post(f"/v1/apps/demo/machines/{mid}/start")
        assert (await r.json())["previous_state"] == "failed"
        await wait_ok(s, "demo", mid)
        # A resume that falls back to a cold boot can fail too.
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/suspend")).status == 200
        await wait_ok(s, "demo", mid, "suspended")
        emulator.set_faults(boot_failure_rate=1.0, resume_cold_rate=1.0)
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/start")).status == 200
        await wait_ok(s, "demo", mid, "failed")
        assert [e.type for e in machine.events[-2:]] == ["start", "launch"]
        assert emulator.pids() == []  # the snapshot's process went with the fallback


async def test_a_hung_machine_accepts_but_never_answers_until_released(
    emulator: Emulator,
) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        mid, ip = m["id"], m["private_ip"]
        assert (await hit(ip))["count"] == 1
        r = await s.post("/_emulator/faults", json={"hung": [mid]})
        assert (await r.json())["hung"] == [mid]
        pid = emulator.pids()[0]
        # The kernel completes the handshake into the stopped process's backlog ...
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, 8080), 10)
        writer.close()
        # ... but the request is never answered, and the machine still says started.
        held = asyncio.ensure_future(hit(ip))
        done, _ = await asyncio.wait({held}, timeout=0.5)
        assert not done, "a hung machine answered"
        assert _proc_state(pid) == "T"
        got = await (await s.get(f"/v1/apps/demo/machines/{mid}")).json()
        assert got["state"] == "started"
        # Released through the same endpoint: the held request completes.
        await s.post("/_emulator/faults", json={"hung": None})
        assert (await held)["count"] == 2


async def test_a_hung_machine_stopped_and_started_again_is_a_new_process_that_answers(
    emulator: Emulator,
) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        mid, ip, base = m["id"], m["private_ip"], f"/v1/apps/demo/machines/{m['id']}"
        emulator.set_faults(hung=[mid])
        held = asyncio.ensure_future(hit(ip))
        done, _ = await asyncio.wait({held}, timeout=0.5)
        assert not done, "a hung machine answered"
        # The stop ends the hung process, and with it the request it held (cut). A hung
        # app does not handle the stop's signal: the SIGKILL at the stop's timeout ends it
        # (continued, the demo app would have ended by the SIGINT). The start is a cold
        # boot, a new process: it answers, and the id has left `hung`.
        assert (await s.post(f"{base}/stop", json={"timeout": "1s"})).status == 200
        await wait_ok(s, "demo", mid, "stopped")
        with pytest.raises(aiohttp.ClientError):
            await held
        (exit_event,) = [e for e in emulator.machine("demo", mid).events if e.type == "exit"]
        assert exit_event.request["exit_event"]["signal"] == signal.SIGKILL
        assert (await s.post(f"{base}/start")).status == 200
        await wait_ok(s, "demo", mid)
        assert (await hit(ip))["count"] == 1  # a new process counts from one
        assert emulator.faults.hung == []


async def test_a_hang_released_while_stopping_lets_the_app_handle_the_stops_signal(
    emulator: Emulator,
) -> None:
    """A stop that finds the machine hung leaves its signal pending in the frozen app.
    The hang released before the stop's timeout, the app runs again and handles the
    signal, as an app that recovers does: the demo app shuts down on the SIGINT. The
    release continued only a `started` machine: this one stayed frozen until the SIGKILL
    at the timeout (60 s; the wait below gives up long before)."""
    async with session(emulator) as s:
        m = await new_machine(s)
        mid, base = m["id"], f"/v1/apps/demo/machines/{m['id']}"
        (pid,) = emulator.pids()
        emulator.set_faults(hung=[mid])
        # Stopped first (a SIGSTOP takes effect when the kernel next runs the process): the
        # stop's signal then stays pending in the kernel, where the test can see it sent.
        await testkit.until(lambda: _proc_state(pid) == "T", 10, "the process stopped")
        assert (await s.post(f"{base}/stop", json={"timeout": 60})).status == 200
        await testkit.until(lambda: _pending(pid) & _bit(signal.SIGINT), 10, "SIGINT pending")
        await s.post("/_emulator/faults", json={"hung": None})
        r = await wait(s, "demo", mid, "stopped", seconds=10)
        assert r.status == 200, await r.text()
        machine = emulator.machine("demo", mid)
        (exit_event,) = [e for e in machine.events if e.type == "exit"]
        # The app's own shutdown: its clean exit, not the timeout's SIGKILL.
        assert exit_event.request["exit_event"] == {
            "exit_code": 0,
            "signal": None,
            "requested_stop": True,
        }


async def test_a_stop_without_signal_or_timeout_follows_the_machines_stop_config(
    emulator: Emulator,
) -> None:
    """``config.stop_config`` (fly.toml's kill_signal and kill_timeout) is the signal and
    timeout of a stop whose call names none, as on Fly: the stop event names SIGTERM, and
    the hung app, which ignores it, is killed after the config's 1 s (the timeout the
    stop takes, as ``stop_settings`` shows; a stop without one waits 5 s)."""
    async with session(emulator) as s:
        m = await new_machine(s, stop_config={"signal": "SIGTERM", "timeout": "1s"})
        bad = {"image": "x", "stop_config": {"signal": "SIGNOPE"}}
        r = await s.post("/v1/apps/demo/machines", json={"config": bad})
        assert r.status == 400
        assert "config.stop_config.signal" in (await r.json())["error"]
        mid, base = m["id"], f"/v1/apps/demo/machines/{m['id']}"
        machine = emulator.machine("demo", mid)
        assert emulator.world.lifecycle.stop_settings(machine) == (signal.SIGTERM, 1.0)
        emulator.set_faults(hung=[mid])
        assert (await s.post(f"{base}/stop")).status == 200
        assert machine.events[-1].request == {"signal": "SIGTERM"}
        r = await wait(s, "demo", mid, "stopped", seconds=10)
        assert r.status == 200, await r.text()
        (exit_event,) = [e for e in machine.events if e.type == "exit"]
        assert exit_event.request["exit_event"]["signal"] == signal.SIGKILL
        # The call's own signal and timeout come first.
        assert (await s.post(f"{base}/start")).status == 200
        await wait_ok(s, "demo", mid)
        assert (await s.post(f"{base}/stop", json={"signal": "SIGUSR1"})).status == 200
        assert machine.events[-1].request == {"signal": "SIGUSR1"}


async def test_a_stop_with_no_timeout_anywhere_kills_after_fly_s_default_5_s(
    emulator: Emulator,
) -> None:
    """No timeout in the call nor in ``config.stop_config``: SIGINT, then the SIGKILL
    after Fly's default of 5 s (fly.toml's kill_timeout; "Then we wait 5 seconds", Fly's
    blog in docs/fly-api-notes.md), not after 30 s: the hung app, which handles no signal,
    is stopped well inside the wait below, which ended 408 before."""
    async with session(emulator) as s:
        m = await new_machine(s)
        mid, base = m["id"], f"/v1/apps/demo/machines/{m['id']}"
        machine = emulator.machine("demo", mid)
        assert emulator.world.lifecycle.stop_settings(machine) == (signal.SIGINT, 5.0)
        emulator.set_faults(hung=[mid])
        assert (await s.post(f"{base}/stop")).status == 200
        assert machine.events[-1].request == {"signal": "SIGINT"}
        r = await wait(s, "demo", mid, "stopped", seconds=20)
        assert r.status == 200, await r.text()
        (exit_event,) = [e for e in machine.events if e.type == "exit"]
        assert exit_event.request["exit_event"]["signal"] == signal.SIGKILL


async def test_hang_rate_hangs_new_starts_and_names_them(emulator: Emulator) -> None:
    emulator.set_faults(hang_rate=1.0)
    async with session(emulator) as s:
        m = await new_machine(s)
        assert emulator.faults.hung == [m["id"]]
        # A hung machine that is suspended and resumed stays hung.
        mid = m["id"]
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/suspend")).status == 200
        await wait_ok(s, "demo", mid, "suspended")
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/start")).status == 200
        await wait_ok(s, "demo", mid)
        # A SIGSTOP takes effect when the kernel next runs the process: wait for "T".
        pid = emulator.pids()[0]
        await testkit.until(lambda: _proc_state(pid) == "T", 5, "the process stopped")


async def test_a_hang_drawn_before_the_app_listens_takes_hold_once_it_does() -> None:
    # Fly's `started` comes before the app listens (timing.listen_s): the hang waits for
    # the port, so that a hung machine accepts connections and never answers.
    settings = EmulatorSettings(rate_limits=False, timing={"start_s": 0.05, "listen_s": 1.0})
    async with Emulator(settings, host="127.0.0.1", port=0) as emulator, session(emulator) as s:
        emulator.set_faults(hang_rate=1.0)
        m = await new_machine(s)
        assert emulator.faults.hung == [m["id"]]
        machine = emulator.machine("demo", m["id"])
        pid = emulator.pids()[0]
        assert _proc_state(pid) != "T"  # not yet: nothing listens
        await testkit.until(lambda: _proc_state(pid) == "T", 10, "the process stopped")
        with socket.create_connection((machine.private_ip, machine.internal_port), timeout=1):
            pass  # accepted, while hung


async def test_an_unreachable_host_refuses_actions_and_defers_destroy(
    emulator: Emulator,
) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        mid = m["id"]
        machine = emulator.machine("demo", mid)
        r = await s.post("/_emulator/faults", json={"host_unreachable": [mid]})
        assert r.status == 200
        got = await (await s.get(f"/v1/apps/demo/machines/{mid}")).json()
        assert got["host_status"] == "unreachable"
        for action in ("stop", "suspend", "restart", "start"):
            r = await s.post(f"/v1/apps/demo/machines/{mid}/{action}")
            assert r.status == 503, action
            assert "host is unreachable" in (await r.json())["error"]
        assert machine.state == "started"
        # A destroy is accepted and waits, `destroying`, for the host to come back.
        r = await s.delete(f"/v1/apps/demo/machines/{mid}", params={"force": "true"})
        assert r.status == 200
        assert machine.state == "destroying"
        emulator.set_faults(host_unreachable=None)
        await until(machine, lambda x: x.state == "destroyed")
        assert machine.host_status == "ok"


async def test_host_unreachable_rate_loses_hosts_of_new_starts(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, start=False)
        emulator.set_faults(host_unreachable_rate=1.0)
        assert (await s.post(f"/v1/apps/demo/machines/{m['id']}/start")).status == 200
        await wait_ok(s, "demo", m["id"])
        assert emulator.faults.host_unreachable == [m["id"]]
        other = await create_machine(s, start=False, port=8081)
        assert other["host_status"] == "ok"


def _pending(pid: int) -> int:
    """The signals pending for ``pid``, the process's and its thread's (Linux /proc)."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)


def _bit(sig: int) -> int:
    return 1 << (sig - 1)


def _proc_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]
