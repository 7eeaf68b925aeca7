"""User images from the image table: command templates, env, boot failures and timeouts;
images not in the table (the demo app stands in, or a refusal with ``strict_images``)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from emu_helpers import (
    create_app,
    create_machine,
    hit,
    new_machine,
    pid_gone,
    session,
    wait,
    wait_ok,
)
from structlog.testing import capture_logs
from testkit import free_port

from autoscaler.config import EmulatorApp, EmulatorSettings
from autoscaler.emulator import Emulator
from autoscaler.emulator.machines import guest_memory_mb
from autoscaler.emulator.procs import PARENT_ENV

# Listens, and says "bye" when SIGINT stops it (its shutdown ran).
POLITE = (
    '{python} -c "import signal, socket, sys, time; '
    "signal.signal(signal.SIGINT, lambda *a: (print('bye', flush=True), sys.exit(0))); "
    "s = socket.create_server(('{host}', {port})); time.sleep(600)\""
)

# A tiny HTTP server that answers the value of $GREETING: proves {host}, {port} and env.
GREETER = (
    '{python} -c "import os, sys, http.server as h; '
    "B = type('B', (h.BaseHTTPRequestHandler,), {'do_GET': lambda s: "
    "(s.send_response(200), s.end_headers(), s.wfile.write(os.environ['GREETING'].encode())), "
    "'log_message': lambda *a: None}); "
    'h.HTTPServer((sys.argv[1], int(sys.argv[2])), B).serve_forever()" {host} {port}'
)


# Listens, and ignores SIGINT: a stop must fall back to SIGKILL after its timeout.
STUBBORN = (
    '{python} -c "import signal, socket, time; signal.signal(signal.SIGINT, signal.SIG_IGN); '
    "s = socket.create_server(('{host}', {port})); time.sleep(600)\""
)


@pytest.fixture
def emulator_settings() -> EmulatorSettings:
    return EmulatorSettings(
        rate_limits=False,
        boot_timeout_s=1.0,
        images={
            "me/greeter": GREETER,
            "me/sleeper": '{python} -c "import time; time.sleep(60)"',
            "me/quitter": '{python} -c "raise SystemExit(3)"',
            "me/stubborn": STUBBORN,
            "me/polite": POLITE,
        },
    )


async def test_user_image_gets_host_port_and_env(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, image="me/greeter:v2", port=9001, env={"GREETING": "hi"})
        async with (
            aiohttp.ClientSession() as c,
            c.get(f"http://{m['private_ip']}:9001/") as r,
        ):
            assert await r.text() == "hi"


def _environ(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with (Linux /proc)."""
    items = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(item.split("=", 1) for item in items if item)


async def test_a_machine_sees_its_config_env_not_the_emulators(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a Fly VM sees only its image's environment, config.env and Fly's variables: a
    variable of the shell that started the emulator must not reach the machine, or an app
    that reads it works here and fails on Fly. Read at the exec, from /proc."""
    monkeypatch.setenv("DATABASE_URL", "postgres://from-the-developers-shell")
    async with session(emulator) as s:
        m = await new_machine(s, image="me/greeter", env={"GREETING": "hi"})
        (pid,) = emulator.pids()
        env = _environ(pid)
        assert "DATABASE_URL" not in env
        assert env["GREETING"] == "hi"
        assert env["FLY_MACHINE_ID"] == m["id"]
        assert env["PATH"] == os.environ["PATH"]  # what the command needs on this host


async def test_a_machine_runs_in_utc_unless_its_config_env_says(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Fly VM's clock is UTC unless its image sets TZ; without TZ a process here would
    take this host's zone (/etc/localtime), or the emulator's TZ."""
    monkeypatch.setenv("TZ", "America/New_York")
    async with session(emulator) as s:
        plain = await new_machine(s, image="me/greeter", env={"GREETING": "hi"})
        tokyo = await create_machine(
            s, image="me/greeter", env={"GREETING": "hi", "TZ": "Asia/Tokyo"}
        )
        await wait_ok(s, "demo", tokyo["id"])
        procs = emulator.world.lifecycle.procs
        assert _environ(procs[plain["id"]].pid)["TZ"] == "UTC"
        assert _environ(procs[tokyo["id"]].pid)["TZ"] == "Asia/Tokyo"


async def test_a_machine_is_told_its_memory(emulator: Emulator) -> None:
    """``FLY_VM_MEMORY_MB``, as Fly sets it: the guest's memory, which an app may size its
    caches or workers by."""
    async with session(emulator) as s:
        m = await new_machine(
            s, image="me/greeter", env={"GREETING": "hi"}, guest={"memory_mb": 1024}
        )
        env = _environ(emulator.world.lifecycle.procs[m["id"]].pid)
    assert env["FLY_VM_MEMORY_MB"] == "1024"


@pytest.mark.parametrize(
    ("guest", "memory_mb"),
    [
        (None, 256),  # Fly's default size, shared-cpu-1x
        ({"cpus": 2}, 512),  # shared-cpu-2x
        ({"cpu_kind": "performance", "cpus": 2}, 4096),  # performance-2x
        ({"cpu_kind": "performance", "cpus": 1, "memory_mb": 8192}, 8192),  # said
    ],
)
def test_a_machine_s_memory_is_its_guest_s_else_its_size_s(
    guest: dict[str, Any] | None, memory_mb: int
) -> None:
    config: dict[str, Any] = (
        {"image": "me/greeter"} if guest is None else {"image": "me/greeter", "guest": guest}
    )
    assert guest_memory_mb(config) == memory_mb


async def test_only_the_demo_app_gets_its_boot_times() -> None:
    """``DEMO_*`` tell the demo app when to open its port; a user's image has no use for
    them and Fly would never set them. An unknown image runs the demo app, so gets them.
    Every machine keeps the emulator's mark, which finds its leftovers."""
    settings = EmulatorSettings(rate_limits=False, images={"me/greeter": GREETER})
    async with Emulator(settings, port=0) as emu, session(emu) as s:
        user = await new_machine(s, image="me/greeter", env={"GREETING": "hi"})
        stand_in = await create_machine(s, image="nginx:1.27")
        await wait_ok(s, "demo", stand_in["id"])
        procs = emu.world.lifecycle.procs
        user_env = _environ(procs[user["id"]].pid)
        demo_env = _environ(procs[stand_in["id"]].pid)
    assert [k for k in user_env if k.startswith("DEMO_")] == []
    assert {"DEMO_BOOT_DELAY_S", "DEMO_LISTEN_AT"} <= demo_env.keys()
    assert user_env[PARENT_ENV] == demo_env[PARENT_ENV] == str(os.getpid())


@pytest.mark.parametrize(
    ("image", "why"), [("me/sleeper", "boot timeout"), ("me/quitter", "exited with code 3")]
)
async def test_a_machine_that_does_not_listen_fails(
    emulator: Emulator, image: str, why: str
) -> None:
    async with session(emulator) as s:
        await create_app(s)
        m = await create_machine(s, image=image)
        r = await wait(s, "demo", m["id"], "failed")
        assert r.status == 200
        record = emulator.machine("demo", m["id"])
        assert record.events[-1].type == "launch"
        assert record.events[-1].request["error"] == why
        assert emulator.pids() == []  # the process that never listened is gone
        r = await wait(s, "demo", m["id"], "started", seconds=1)
        assert r.status == 408


async def test_stop_timeout_falls_back_to_sigkill(emulator: Emulator) -> None:
    async with session(emulator) as s:
        m = await new_machine(s, image="me/stubborn")
        pid = emulator.pids()[0]
        r = await s.post(f"/v1/apps/demo/machines/{m['id']}/stop", json={"timeout": 1})
        assert r.status == 200
        await wait_ok(s, "demo", m["id"], "stopped")
        assert pid_gone(pid)


@pytest.mark.parametrize("action", ["stop", "update"])
async def test_a_suspended_machine_s_snapshot_is_dropped_not_resumed(
    emulator: Emulator, action: str
) -> None:
    # As on Fly, stopping (or updating) a suspended machine throws its snapshot away: the
    # frozen app is never resumed, so it never runs its shutdown (it would print "bye").
    async with session(emulator) as s:
        m = await new_machine(s, image="me/polite")
        mid = m["id"]
        pid = emulator.pids()[0]
        assert (await s.post(f"/v1/apps/demo/machines/{mid}/suspend")).status == 200
        await wait_ok(s, "demo", mid, "suspended")
        if action == "stop":
            r = await s.post(f"/v1/apps/demo/machines/{mid}/stop")
        else:
            config = {**m["config"], "env": {"NEW": "1"}}
            r = await s.post(f"/v1/apps/demo/machines/{mid}", json={"config": config})
        assert r.status == 200, await r.text()
        await wait_ok(s, "demo", mid, "stopped")
        assert pid_gone(pid)
        assert "bye" not in emulator.output("demo", mid)


def stubborn_emulator() -> Emulator:
    return Emulator(EmulatorSettings(rate_limits=False, images={"me/stubborn": STUBBORN}), port=0)


async def stuck_stopping(emu: Emulator, s: aiohttp.ClientSession, machine_id: str) -> None:
    """Ask a STUBBORN machine to stop: it ignores SIGTERM, so it stays "stopping"."""
    await s.post(f"/v1/apps/demo/machines/{machine_id}/stop", json={"timeout": 300})
    assert emu.machine("demo", machine_id).state == "stopping"


async def test_forced_destroy_mid_stop_kills_the_process() -> None:
    async with stubborn_emulator() as emu, session(emu) as s:
        m = await new_machine(s, image="me/stubborn")
        pid = emu.pids()[0]
        await stuck_stopping(emu, s, m["id"])
        r = await s.delete(f"/v1/apps/demo/machines/{m['id']}?force=true")
        assert r.status == 200
        await wait_ok(s, "demo", m["id"], "destroyed")
        assert pid_gone(pid)  # before the emulator closes, not because it did


async def test_refused_update_leaves_the_volumes_as_they_were() -> None:
    async with stubborn_emulator() as emu, session(emu) as s:
        await create_app(s)
        vols = []
        for name in ("a", "b"):
            body = {"name": name, "size_gb": 1, "region": "iad"}
            vols.append((await (await s.post("/v1/apps/demo/volumes", json=body)).json())["id"])
        mounts = [{"volume": vols[0], "path": "/data"}]
        m = await create_machine(s, image="me/stubborn", mounts=mounts)
        await wait_ok(s, "demo", m["id"])
        await stuck_stopping(emu, s, m["id"])
        config = {"image": "me/stubborn", "mounts": [{"volume": vols[1], "path": "/data"}]}
        r = await s.post(f"/v1/apps/demo/machines/{m['id']}", json={"config": config})
        assert r.status in (409, 412), await r.text()
        a, b = [await (await s.get(f"/v1/apps/demo/volumes/{v}")).json() for v in vols]
        assert a["attached_machine_id"] == m["id"]
        assert "attached_machine_id" not in b


async def test_closing_mid_stop_still_kills_the_process() -> None:
    async with stubborn_emulator() as emu, session(emu) as s:
        m = await new_machine(s, image="me/stubborn")
        pid = emu.pids()[0]
        await stuck_stopping(emu, s, m["id"])
    assert pid_gone(pid)


async def test_an_unknown_image_runs_the_demo_app_under_its_name() -> None:
    settings = EmulatorSettings(rate_limits=False, demo_boot_delay_s=0.05)
    with capture_logs() as logs:
        async with Emulator(settings, port=0) as emu, session(emu) as s:
            m = await new_machine(s, image="nginx:1.27")
            assert m["config"]["image"] == "nginx:1.27"
            body = await hit(m["private_ip"])
            assert body["machine_id"] == m["id"]  # the demo app answers
            second = await create_machine(s, image="nginx:1.27")
            await wait_ok(s, "demo", second["id"])
    stand_ins = [e for e in logs if e["event"] == "emulator_image_stand_in"]
    assert [e["image"] for e in stand_ins] == ["nginx:1.27"]  # once, naming the image


async def test_strict_images_refuses_an_unknown_image() -> None:
    settings = EmulatorSettings(rate_limits=False, strict_images=True)
    async with Emulator(settings, port=0) as emu, session(emu) as s:
        await create_app(s)
        r = await s.post("/v1/apps/demo/machines", json={"config": {"image": "nope/unknown"}})
        assert r.status == 400
        error = (await r.json())["error"]
        assert "'nope/unknown' is not in the emulator's image table" in error
        assert "strict_images" in error
        assert emu.machines("demo") == []


def test_a_start_up_app_of_an_image_strict_images_refuses_is_a_config_error(
    tmp_path: Path,
) -> None:
    """`autoscaler emulator --app web=1:nginx` with `strict_images` ended in a traceback
    of the API's BadRequest; it is a config error naming the app (exit 2), and the app is
    not made (nothing of it saved)."""
    from autoscaler.emulator.main import run

    state = tmp_path / "state.json"
    settings = EmulatorSettings(
        listen=f"127.0.0.1:{free_port()}",  # never bound: the start ends before it listens
        state_file=state,
        strict_images=True,
        apps=[EmulatorApp(name="web", image="nginx")],
    )
    out, err = io.StringIO(), io.StringIO()
    assert run(settings, out, err) == 2
    assert err.getvalue() == (
        "emulator.apps[0] (web): config.image: 'nginx' is not in the emulator's image table"
        " (known: autoscaler/demo-app; emulator.strict_images is on)\n"
    )
    assert json.loads(state.read_text())["apps"] == []
