"""``emulator.ipv6``: machines listen on ::1 and report it as their ``private_ip``, as Fly's
private addresses are IPv6. They share the one address, so a port is one machine's: a
second machine on it is refused (412, "insufficient capacity"), at create and at an update,
until the first is destroyed; two start-up machines on one port are a config error."""

from __future__ import annotations

from pathlib import Path

import pytest
from emu_helpers import create_app, create_machine, hit, session, until, wait_ok
from structlog.testing import capture_logs
from testkit import NEEDS_IPV6_LOOPBACK, free_port

from autoscaler.cli import main
from autoscaler.config import EmulatorApp, EmulatorSettings
from autoscaler.emulator import Emulator, StateFileError

pytestmark = NEEDS_IPV6_LOOPBACK

FAST = {"interval": "100ms", "timeout": "500ms", "grace_period": "0s"}


# A server that takes its address as one HOST:PORT argument (gunicorn's --bind, uvicorn's
# and most servers' alike), parsed strictly: ``::1:8080`` is no address, ``[::1]:8080`` is.
BINDER = (
    '{python} -c "import socket, sys, time, urllib.parse as u; '
    "a = u.urlsplit('//' + sys.argv[2]); "
    "s = socket.create_server((a.hostname, a.port), family=socket.AF_INET6); "
    'time.sleep(600)" --bind {host}:{port}'
)


@pytest.fixture
def emulator_settings(emulator_settings: EmulatorSettings) -> EmulatorSettings:
    images = {"me/binder": BINDER}
    return emulator_settings.model_copy(update={"ipv6": True, "images": images})


async def test_machines_listen_on_ipv6_loopback_one_per_port(emulator: Emulator) -> None:
    # Free ports of this host's ::1: parallel test processes share it, and other programs.
    port, other = free_port("::1"), free_port("::1")
    async with session(emulator) as s:
        await create_app(s)
        checks = {
            "web": {"type": "http", "path": "/healthz", **FAST},
            "tcp": {"type": "tcp", **FAST},
            "closed": {"type": "tcp", "port": other, **FAST},  # (nothing listens there yet)
        }
        m = await create_machine(s, port=port, checks=checks)
        assert m["private_ip"] == "::1"
        await wait_ok(s, "demo", m["id"])
        assert (await hit("::1", port))["machine_id"] == m["id"]
        record = emulator.machine("demo", m["id"])
        # The checks run over IPv6 too, and their outputs bracket the address.
        wanted = {"web": "passing", "tcp": "passing", "closed": "critical"}
        await until(record, lambda x: {n: c.status for n, c in x.checks.items()} == wanted)
        outputs = {name: check.output for name, check in record.checks.items()}
        assert outputs["web"].startswith(f"GET http://[::1]:{port}/healthz: 200")
        assert outputs["tcp"] == f"TCP connect [::1]:{port}: Success"
        assert outputs["closed"].startswith(f"tcp check of [::1]:{other}: ")

        body = {"config": {"image": "autoscaler/demo-app", "services": [{"internal_port": port}]}}
        r = await s.post("/v1/apps/demo/machines", json=body)
        assert r.status == 412
        assert "another machine listens on [::1]:" in (await r.json())["error"]

        second = await create_machine(s, port=other, start=False)
        assert second["private_ip"] == "::1"
        path = f"/v1/apps/demo/machines/{second['id']}"
        r = await s.post(path, json=body)  # an update onto the first one's port
        assert r.status == 412
        assert "insufficient capacity" in (await r.json())["error"]

        r = await s.delete(f"/v1/apps/demo/machines/{m['id']}", params={"force": "true"})
        assert r.status == 200, await r.text()
        await wait_ok(s, "demo", m["id"], "destroyed")
        r = await s.post(path, json=body)  # the port is free again
        assert r.status == 200, await r.text()
        r = await s.post(f"{path}/start")
        assert r.status == 200, await r.text()
        await wait_ok(s, "demo", second["id"])
        assert (await hit("::1", port))["machine_id"] == second["id"]


def test_the_ipv6_flag_and_start_up_machines_sharing_a_port_on_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    served: list[EmulatorSettings] = []
    monkeypatch.setattr(
        "autoscaler.emulator.main.run", lambda settings, **_: served.append(settings) or 0
    )
    assert main(["emulator", "--ipv6", "--app", "web=1"]) == 0
    assert [s.ipv6 for s in served] == [True]
    assert main(["emulator", "--ipv6", "--app", "web=2"]) == 2  # refused before serving
    assert len(served) == 1
    err = capsys.readouterr().err
    assert "--app: with emulator.ipv6 every machine listens on ::1" in err  # (the flag: h5)
    assert "got 2 on port 8080" in err


async def test_an_address_and_port_in_an_image_command_are_bracketed_on_ipv6(
    emulator: Emulator,
) -> None:
    """``{host}:{port}`` in a command template is an address:port: ``[::1]:8080`` on ::1
    (it came out ``::1:8080``, which the server could not parse: the machine never
    booted), while ``{host}`` alone stays the bare address (the demo app's ``--host``)."""
    port = free_port("::1")
    async with session(emulator) as s:
        await create_app(s)
        m = await create_machine(s, port=port, image="me/binder")
        await wait_ok(s, "demo", m["id"])
        record = emulator.machine("demo", m["id"])
        assert emulator.world.lifecycle.command(record)[-2:] == ["--bind", f"[::1]:{port}"]
        demo = await create_machine(s, port=free_port("::1"))
        assert "::1" in emulator.world.lifecycle.command(emulator.machine("demo", demo["id"]))


async def test_a_state_files_machines_move_to_the_family_the_emulator_runs_with(
    tmp_path: Path,
) -> None:
    """A state file saved without ``ipv6`` kept its machines on 127.x when the emulator
    came back with it (one per port on ::1 unchecked, the machine not where ``ipv6``
    says); they are re-addressed to ::1 (said per machine), and back to 127.x without
    it. Two machines of one port cannot both have ::1: a clear error, no start."""
    state = tmp_path / "emulator.json"
    port = free_port("::1")
    web = [EmulatorApp(name="web", machines=1, internal_port=port)]
    v4 = EmulatorSettings(state_file=state, rate_limits=False, apps=web)
    v6 = EmulatorSettings(state_file=state, rate_limits=False, ipv6=True)
    async with Emulator(v4, port=0) as emu:
        [saved] = emu.machines("web")
        assert ":" not in saved.private_ip
    with capture_logs() as logs:
        async with Emulator(v6, port=0) as emu, session(emu) as s:
            [m] = emu.machines("web")
            assert (m.id, m.private_ip) == (saved.id, "::1")
            r = await s.post(f"/v1/apps/web/machines/{m.id}/start")
            assert r.status == 200, await r.text()
            await wait_ok(s, "web", m.id)
            assert (await hit("::1", port))["machine_id"] == m.id
    moved = [e for e in logs if e["event"] == "emulator_machine_readdressed"]
    assert [(e["machine"], e["was"], e["now"]) for e in moved] == [
        (saved.id, saved.private_ip, "::1")
    ]
    assert '"private_ip": "::1"' in state.read_text()  # saved where it is now
    async with Emulator(v4, port=0) as emu:
        [m] = emu.machines("web")
        assert ":" not in m.private_ip

    state.unlink()
    two = [EmulatorApp(name="web", machines=2, internal_port=port)]
    async with Emulator(v4.model_copy(update={"apps": two}), port=0):
        pass
    with pytest.raises(StateFileError, match=rf"saved without emulator.ipv6.*\[::1\]:{port}"):
        await Emulator(v6, port=0).start()
