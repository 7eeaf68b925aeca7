"""Time in transitions: `stopping`, `suspending` and cold boots last as the profile says."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest
from emu_helpers import new_machine, session, wait, wait_ok
from testkit import until

from autoscaler.config import ConfigError, EmulatorSettings, load_settings
from autoscaler.emulator import Emulator
from autoscaler.emulator.machines import Lifecycle
from autoscaler.emulator.main import settings_from


@pytest.fixture
def emulator_settings() -> EmulatorSettings:
    # Transitions longer than the shortest /wait (1 s), so "not yet" is certain.
    return EmulatorSettings(
        rate_limits=False,
        boot_timeout_s=20.0,
        timing={"start_s": 0.05, "suspend_s": 2.0, "stop_s": 2.0, "resume_s": 0.0},
    )


def test_the_fly_profile_has_fly_s_documented_times() -> None:
    fly = EmulatorSettings(profile="fly").effective_timing()
    assert isinstance(fly.resume_s, tuple)
    assert fly.resume_s[0] >= 0.1  # "a few hundred ms"
    assert fly.resume_s[1] < 1.0
    assert isinstance(fly.start_s, tuple)
    assert fly.start_s[0] <= 2.0 <= fly.start_s[1]  # "~2+ seconds"
    assert isinstance(fly.suspend_s, tuple)
    assert fly.suspend_s[1] > 15.0  # "can spend over 15 seconds in the suspending state"
    assert isinstance(fly.listen_s, tuple)  # `started` a moment before the app listens
    assert fly.start_s[0] + fly.listen_s[0] <= 2.0 <= fly.start_s[1] + fly.listen_s[1]
    fast = EmulatorSettings().effective_timing()
    assert (fast.suspend_s, fast.stop_s, fast.start_s, fast.listen_s) == (0.0, 0.0, 0.5, 0.0)


def test_the_profile_and_fault_flags_reach_the_settings() -> None:
    settings = settings_from(
        None, environ={}, profile="fly", faults={"resume_cold_rate": 0.5, "hang_rate": None}
    )
    assert settings.profile == "fly"
    assert settings.faults.resume_cold_rate == 0.5
    assert settings.effective_timing().suspend_s == (2.0, 18.0)


def test_timing_overrides_win_over_the_profile_and_the_old_knobs(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "emulator:\n  profile: fly\n  demo_boot_delay_s: 0.1\n  resume_delay_s: 0.3\n"
        "  timing:\n    resume_s: [0.2, 400ms]\n    snapshot_ttl_s: 5m\n"
    )
    settings, _ = load_settings(str(config), env={})
    t = settings.emulator.effective_timing()
    assert t.start_s == 0.1  # the old knob beats the profile
    assert t.resume_s == (0.2, 0.4)  # timing.* beats the old knob
    assert t.suspend_s == (2.0, 18.0)  # the profile's
    assert t.snapshot_ttl_s == 300.0


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("[3, 1]", "0 <= lo <= hi"),
        ("[1, 2, 3]", "a range [lo, hi]"),
        ("soon", "a duration"),
        ("-1", ">= 0"),
    ],
)
def test_a_bad_timing_is_a_clear_error(tmp_path: Path, value: str, says: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"emulator:\n  timing:\n    suspend_s: {value}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(str(config), env={})
    assert any("emulator.timing.suspend_s" in p and says in p for p in err.value.problems)


def test_a_range_is_drawn_per_action_with_the_injected_rng() -> None:
    def draws(seed: int) -> list[float]:
        rng = random.Random(seed)  # noqa: S311 - durations, not secrets
        settings = EmulatorSettings(timing={"suspend_s": [1.0, 3.0]})
        life = Lifecycle(
            settings, ids=None, rng=rng, pool=None, on_change=lambda: None, on_gone=print
        )  # type: ignore[arg-type]
        got = [life.draw(life.timing.suspend_s) for _ in range(20)]
        life.reaper.close()
        return got

    first = draws(7)
    assert all(1.0 <= d <= 3.0 for d in first)
    assert len(set(first)) > 1  # anew per action
    assert draws(7) == first  # reproducible with a seeded rng


async def test_suspend_and_stop_take_their_time_and_wait_tells_the_truth(
    emulator: Emulator,
) -> None:
    async with session(emulator) as s:
        m = await new_machine(s)
        mid = m["id"]
        pid = emulator.pids()[0]
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/suspend")).status == 200
        got = await (await s.get(f"/v1/apps/demo/machines/{mid}")).json()
        assert got["state"] == "suspending"
        # A waiter for `suspended` is not let go while the machine is still suspending.
        r = await wait(s, "demo", mid, "suspended", seconds=1)
        assert r.status == 408
        assert "currently suspending" in (await r.json())["error"]
        assert _proc_state(pid) == "T"  # frozen meanwhile, as Fly pauses the VM
        await wait_ok(s, "demo", mid, "suspended")

        r = await s.post(f"/v1/apps/demo/machines/{mid}/stop")
        assert r.status == 200
        r = await wait(s, "demo", mid, "stopped", seconds=1)
        assert r.status == 408
        assert "currently stopping" in (await r.json())["error"]
        # Starting a machine that is stopping is refused, as on Fly.
        r = await s.post(f"/v1/apps/demo/machines/{mid}/start")
        assert r.status == 412
        assert "stopping" in (await r.json())["error"]
        await wait_ok(s, "demo", mid, "stopped")


@pytest.mark.parametrize("call", ["restart", "update"])
async def test_a_restart_or_update_stops_the_vm_for_stop_s_first(
    emulator: Emulator, call: str
) -> None:
    """A restart, and an update of a started machine, stop the machine before they boot it
    again, as a stop does: it takes stop_s there too. It took only the process's end
    (`restarting` then `started` within a boot: kinder than the stop it is)."""
    async with session(emulator) as s:
        m = await new_machine(s)
        url = f"/v1/apps/demo/machines/{m['id']}"
        if call == "restart":
            r = await s.post(f"{url}/restart")
        else:
            r = await s.post(url, json={"config": {**m["config"], "env": {"V": "2"}}})
        assert r.status == 200
        moving = "restarting" if call == "restart" else "updating"
        r = await wait(s, "demo", m["id"], "started", seconds=1)
        assert r.status == 408
        assert f"currently {moving}" in (await r.json())["error"]
        await wait_ok(s, "demo", m["id"])


async def test_a_cold_boot_lasts_start_s() -> None:
    settings = EmulatorSettings(rate_limits=False, timing={"start_s": [2.0, 2.5]})
    async with Emulator(settings, host="127.0.0.1", port=0) as emu, session(emu) as s:
        m = await new_machine(s, start=False)
        mid = m["id"]
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/start")).status == 200
        r = await wait(s, "demo", mid, "started", seconds=1)
        assert r.status == 408
        assert "currently starting" in (await r.json())["error"]
        await wait_ok(s, "demo", mid)


async def test_a_boot_that_fails_is_starting_for_start_s_first() -> None:
    # As on Fly, a boot that fails goes through `starting` for a boot's time: a start
    # tried again meanwhile is refused (412), and `failed` comes only at the end.
    settings = EmulatorSettings(
        rate_limits=False, timing={"start_s": [2.0, 2.5]}, faults={"boot_failure_rate": 1.0}
    )
    async with Emulator(settings, host="127.0.0.1", port=0) as emu, session(emu) as s:
        m = await new_machine(s, start=False)
        mid = m["id"]
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/start")).status == 200
        r = await wait(s, "demo", mid, "failed", seconds=1)
        assert r.status == 408
        assert "currently starting" in (await r.json())["error"]
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/start")).status == 412
        await wait_ok(s, "demo", mid, "failed")


async def test_a_cold_boot_is_started_before_its_app_listens() -> None:
    # As on Fly: `started` once the VM runs the app; the app listens listen_s later.
    settings = EmulatorSettings(rate_limits=False, timing={"start_s": 0.05, "listen_s": 1.5})
    async with Emulator(settings, host="127.0.0.1", port=0) as emu, session(emu) as s:
        m = await new_machine(s, start=False)
        mid = m["id"]
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/start")).status == 200
        await wait_ok(s, "demo", mid)
        machine = emu.machine("demo", mid)
        assert not _accepts(machine.private_ip, machine.internal_port)
        # The bound is generous (a loaded CI runner imports aiohttp slowly); a machine
        # that never listens fails with what the emulator knows of it, not a bare timeout.
        listening = lambda: _accepts(machine.private_ip, machine.internal_port)  # noqa: E731
        try:
            await until(listening, 30)
        except AssertionError:
            proc = emu.process("demo", mid)
            alive = proc is not None and proc.returncode is None
            raise AssertionError(
                f"never listened: state {machine.state}, events "
                f"{[(e.type, e.status, e.request) for e in machine.events]}, process "
                f"{proc and (proc.pid, proc.returncode, alive and _proc_state(proc.pid))}, "
                f"output {emu.output('demo', mid)}"
            ) from None
        assert machine.state == "started"


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _proc_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]
