"""No orphans, the standalone runner, and the state file."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shlex
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from emu_helpers import hit, new_machine, pid_exit, session, wait_ok
from structlog.testing import capture_logs
from testkit import SlowToEnd, until

from autoscaler.config import ConfigError, EmulatorApp, EmulatorSettings, load_settings
from autoscaler.emulator import Emulator, procs
from autoscaler.emulator.main import settings_from
from autoscaler.emulator.persist import Saver, StateFileError
from autoscaler.emulator.procs import leftovers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_leftovers_finds_a_live_child() -> None:
    proc = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        assert proc.pid in [pid for pid, _ in leftovers(os.getpid())]
    finally:
        proc.kill()
        await proc.wait()
    assert proc.pid not in [pid for pid, _ in leftovers(os.getpid())]


class _Remote:
    url = ""
    token = "test-token-1234567"
    banner: tuple[str, ...] = ()


@contextlib.asynccontextmanager
async def _standalone(
    tmp_path: Path,
    *args: str,
    token_flag: bool = True,
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, _Remote]]:
    """`autoscaler emulator` as a process of its own, with ``args`` (and ``--token``
    _Remote.token unless not ``token_flag``), once it listens (on ``port``, default a free
    one): the process and what ``session`` needs to reach it (the URL its banner says), its
    banner too. Killed at the end if it still runs, and every process it marked as its own
    with it (one that outlived it: a failure)."""
    port = _free_port() if port is None else port
    token = ["--token", _Remote.token] if token_flag else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "autoscaler",
        "emulator",
        "--listen",
        f"127.0.0.1:{port}",
        *token,
        "--log-level",
        "warning",
        *args,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    try:
        assert proc.stdout is not None
        banner: list[str] = []
        while not any(line.startswith("point tools at it:") for line in banner):
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, f"emulator exited early: {banner}"
            banner.append(line.decode().strip())
        (url,) = [line.rpartition(" on ")[2] for line in banner if " listening on " in line]
        assert url == f"http://127.0.0.1:{port}" or port == 0, banner
        remote = _Remote()
        remote.url = url
        remote.banner = tuple(banner)
        yield proc, remote
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid, _ in leftovers(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_listen_port_0_is_a_free_port_and_the_banner_says_which(tmp_path: Path) -> None:
    """`autoscaler emulator --listen 127.0.0.1:0` was refused as no "host:port" (exit 2):
    port 0 is a free port the OS picks, as servers take it, and the URL printed (the
    emulator_listening line's too) has the port it got."""
    async with (
        _standalone(tmp_path, port=0) as (_, remote),
        session(remote) as s,  # type: ignore[arg-type]
    ):
        assert not remote.url.endswith(":0")
        assert (await s.get("/v1/apps", params={"org_slug": "personal"})).status == 200
    assert any(f"AUTOSCALER_FLY__API_URL={remote.url} " in line for line in remote.banner)


def _token_line(banner: Sequence[str]) -> str:
    (line,) = [line for line in banner if line.startswith("token:")]
    return line


@pytest.mark.parametrize("given", ["--token", "EMULATOR_TOKEN", "AUTOSCALER_EMULATOR__TOKEN"])
async def test_a_token_the_user_gave_is_not_printed_but_where_it_came_from(
    tmp_path: Path, given: str
) -> None:
    """`autoscaler emulator --token T` (or with T in the environment) printed "token: T" on
    stdout: a secret the user already has, in a terminal's scrollback or a CI log."""
    env = {k: v for k, v in os.environ.items() if "TOKEN" not in k.upper()}
    if given != "--token":
        env[given] = _Remote.token
    flag = given == "--token"
    async with (
        _standalone(tmp_path, token_flag=flag, env=env) as (_, remote),
        session(remote) as s,  # type: ignore[arg-type]
    ):
        assert (await s.get("/v1/apps", params={"org_slug": "personal"})).status == 200
    where = "--token" if given == "--token" else f"${given}"
    assert _token_line(remote.banner) == f"token: the one given by {where} (not shown)"
    assert not any(_Remote.token in line for line in remote.banner)


async def test_a_token_of_its_own_making_is_printed(tmp_path: Path) -> None:
    """What docs/emulator.md says: with no token given it makes one up and prints it, as
    the one way to know it; that one is accepted."""
    env = {k: v for k, v in os.environ.items() if "TOKEN" not in k.upper()}
    config = tmp_path / "c.yaml"
    config.write_text("emulator: {token: from-the-file-0123456}\n")
    args = ("--config", str(config))
    async with _standalone(tmp_path, *args, token_flag=False, env=env) as (_, remote):
        line = _token_line(remote.banner)
    assert line == "token: emulator.token of the config file (not shown)"
    async with _standalone(tmp_path, token_flag=False, env=env) as (_, remote):
        remote.token = _token_line(remote.banner).removeprefix("token: ")
        assert len(remote.token) >= 16
        async with session(remote) as s:  # type: ignore[arg-type]
            assert (await s.get("/v1/apps", params={"org_slug": "personal"})).status == 200


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
async def test_standalone_emulator_leaves_no_machine_behind(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGTERM and Ctrl-C stop machines in order; even SIGKILL leaves none (PDEATHSIG)."""
    async with _standalone(tmp_path, "--app", "demo=1") as (proc, remote):
        async with session(remote) as s:  # type: ignore[arg-type]
            machines = await (await s.get("/v1/apps/demo/machines")).json()
            assert [m["state"] for m in machines] == ["stopped"]
            mid, ip = machines[0]["id"], machines[0]["private_ip"]
            assert (await s.post(f"/v1/apps/demo/machines/{mid}/start")).status == 200
            await wait_ok(s, "demo", mid)
            machine_pid = (await hit(ip))["pid"]
        proc.send_signal(sig)
        code = await asyncio.wait_for(proc.wait(), 30)
        assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
        await pid_exit(machine_pid, 10)  # raises TimeoutError if the machine outlived it


# A machine that forks two sleepers before it listens, one in its process group and one
# in a session of its own (as a daemon does), and writes "its pid, theirs" to a file.
FORKER = """
import os, socket, sys, time
host, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
pids = [os.getpid()]
for new_session in (False, True):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        if new_session:
            os.setsid()
        os.close(w)
        time.sleep(600)
        os._exit(0)
    os.close(w)
    os.read(r, 1)  # end of file: the sleeper is set up
    os.close(r)
    pids.append(pid)
with open(out + ".tmp", "w") as f:
    f.write(" ".join(map(str, pids)))
os.rename(out + ".tmp", out)
server = socket.create_server((host, port))
time.sleep(600)
"""


def _forker_image(tmp_path: Path) -> tuple[str, Path]:
    """The FORKER image's command template, and the file it writes its pids to."""
    script, out = tmp_path / "forker.py", tmp_path / "pids"
    script.write_text(FORKER)
    command = f"{{python}} {shlex.quote(str(script))} {{host}} {{port}} {shlex.quote(str(out))}"
    return command, out


@pytest.mark.parametrize("suspended", [False, True], ids=["started", "suspended"])
async def test_what_a_machine_forked_does_not_outlive_a_killed_emulator(
    tmp_path: Path, suspended: bool
) -> None:
    """PDEATHSIG reaches only the machine's own process: what it forked lived on after a
    SIGKILLed emulator, the more so when the machine was suspended (frozen with SIGSTOP).
    Nothing the emulator started outlives it."""
    command, out = _forker_image(tmp_path)
    config = tmp_path / "emulator.yaml"
    config.write_text(json.dumps({"emulator": {"images": {"me/forker": command}}}))
    args = ("--config", str(config), "--app", "demo=1:me/forker")
    async with _standalone(tmp_path, *args) as (proc, remote):
        async with session(remote) as s:  # type: ignore[arg-type]
            (m,) = await (await s.get("/v1/apps/demo/machines")).json()
            assert (await s.post(f"/v1/apps/demo/machines/{m['id']}/start")).status == 200
            await wait_ok(s, "demo", m["id"])
            pids = [int(p) for p in out.read_text().split()]
            if suspended:
                assert (await s.post(f"/v1/apps/demo/machines/{m['id']}/suspend")).status == 200
                await wait_ok(s, "demo", m["id"], "suspended")
        proc.kill()
        assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
        for pid in pids:  # the machine, its sleeper in its group and the one that left it
            await pid_exit(pid, 10)  # raises TimeoutError if it outlived the emulator


async def test_state_file_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state" / "emulator.json"
    state.parent.mkdir()
    settings = EmulatorSettings(state_file=state, demo_boot_delay_s=0.0, rate_limits=False)
    async with Emulator(settings, port=0) as emu, session(emu) as s:
        m = await new_machine(s, metadata={"role": "web"})
        r = await s.post(
            "/v1/apps/demo/volumes", json={"name": "data", "size_gb": 2, "region": "iad"}
        )
        vid = (await r.json())["id"]
    assert state.exists()
    assert [p.name for p in state.parent.iterdir()] == ["emulator.json"]  # no temp file left
    json.loads(state.read_text())  # complete JSON, written atomically
    async with Emulator(settings, port=0) as emu, session(emu) as s:
        got = await (await s.get(f"/v1/apps/demo/machines/{m['id']}")).json()
        assert got["state"] == "stopped"  # processes do not survive; machines come back stopped
        assert got["private_ip"] == m["private_ip"]
        assert got["config"]["metadata"] == {"role": "web"}
        assert (await s.get(f"/v1/apps/demo/volumes/{vid}")).status == 200
        await s.post(f"/v1/apps/demo/machines/{m['id']}/start")
        await wait_ok(s, "demo", m["id"])
        assert (await hit(m["private_ip"]))["count"] == 1


async def test_a_state_file_in_a_directory_that_does_not_exist_is_refused(
    tmp_path: Path,
) -> None:
    """The directories were made, so a mistyped one (--state-file ~/emualtor/s.json) was
    never said: the state went where nobody would look for it."""
    state = tmp_path / "typo" / "s.json"
    with pytest.raises(StateFileError) as caught:
        async with Emulator(EmulatorSettings(state_file=state), port=0):
            pass
    assert str(caught.value) == (
        f"{state}: cannot write the emulator state: no directory {state.parent} (it is not"
        " created: make it first)"
    )
    assert not state.parent.exists()


async def test_a_state_file_that_is_a_directory_is_said_naming_flag_and_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--state-file /tmp`` printed a bare ``[Errno 21] Is a directory``; and the same
    from the config file (``emulator.state_file``). Nothing is written in it."""
    from autoscaler.cli import main
    from autoscaler.emulator import main as emulator_main

    served: list[object] = []
    monkeypatch.setattr(emulator_main, "run", lambda s, *a, **k: served.append(s) or 0)
    assert main(["emulator", "--state-file", str(tmp_path), "--log-level", "error"]) == 2
    assert served == []
    said = f"{tmp_path} is a directory; name a file to keep the state in"
    assert capsys.readouterr().err.startswith(f"--state-file: {said}")
    with pytest.raises(StateFileError) as caught:
        async with Emulator(EmulatorSettings(state_file=tmp_path), port=0):
            pass
    assert str(caught.value).startswith(f"emulator.state_file: {said}")
    assert os.listdir(tmp_path) == []  # nothing written in it


async def test_damaged_state_file_is_a_clear_error(tmp_path: Path) -> None:
    state = tmp_path / "emulator.json"
    state.write_text("{not json")
    with pytest.raises(StateFileError, match="cannot read the emulator state"):
        async with Emulator(EmulatorSettings(state_file=state), port=0):
            pass


@pytest.mark.parametrize(
    ("apps", "said"),
    [
        ('[{"name": "web"}]', "missing 'id'"),
        # A list where an app or a machine goes: an AttributeError traceback, and a
        # TypeError was called "missing list indices must be integers ...".
        ("[[1]]", "an entry of the wrong shape"),
        (
            '[{"id": "a", "name": "web", "org_slug": "p", "network": "n", "created_at": "c",'
            ' "machines": [[1]]}]',
            "an entry of the wrong shape",
        ),
        ("null", "an entry of the wrong shape"),
    ],
)
def test_a_state_file_of_the_wrong_shape_is_one_clear_error(
    tmp_path: Path, apps: str, said: str
) -> None:
    from autoscaler.emulator.persist import load

    state = tmp_path / "emulator.json"
    state.write_text(f'{{"version": 1, "apps": {apps}}}')
    with pytest.raises(StateFileError) as caught:
        load(state)
    assert str(caught.value).startswith(f"{state}: damaged emulator state: {said}")


async def test_a_state_file_that_cannot_be_written_is_said_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (or a directory the state cannot go to) went unnoticed until the end,
    which said "emulator: cannot listen on ..." after a "Task exception was never
    retrieved" traceback; a write that fails later is an error line."""
    from autoscaler.emulator import persist

    real_write = persist.write_atomic

    def full_disk(path: Path, data: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    settings = EmulatorSettings(state_file=tmp_path / "s.json", apps=[EmulatorApp(name="web")])
    monkeypatch.setattr(persist, "write_atomic", full_disk)
    with pytest.raises(StateFileError, match=r"s\.json: cannot write the emulator state: No space"):
        async with Emulator(settings, port=0):
            pass
    monkeypatch.setattr(persist, "write_atomic", real_write)
    with capture_logs() as logs:
        async with Emulator(settings, port=0) as emu:
            monkeypatch.setattr(persist, "write_atomic", full_disk)
            emu.world.seed_app(EmulatorApp(name="api", machines=1))  # a change to save
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["emulator_state_not_saved"]


async def test_a_state_save_closed_by_a_cut_close_is_cancelled_and_still_saves(
    tmp_path: Path,
) -> None:
    """The saver's close cancels the save to come and waits for its end. Awaited under
    suppress(CancelledError), that wait also swallowed a cancellation of the close itself
    (the emulator's close cut short by a second SIGTERM): it ended as if none had come.
    The state is saved either way."""
    saver = Saver(tmp_path / "s.json", {})
    slow = SlowToEnd()
    saver._task = slow.task  # (a save to come that takes its time to end)
    closing = await slow.cut_short(saver.close())
    assert closing.cancelled()
    assert json.loads((tmp_path / "s.json").read_text())["apps"] == []


async def test_startup_apps_have_stopped_machines_and_survive_with_the_state(
    tmp_path: Path,
) -> None:
    settings = EmulatorSettings(
        state_file=tmp_path / "s.json",
        apps=[EmulatorApp(name="web", machines=2, internal_port=9000, env={"A": "b"})],
    )
    async with Emulator(settings, port=0) as emu:
        machines = emu.machines("web")
        assert [m.state for m in machines] == ["stopped", "stopped"]
        assert machines[0].internal_port == 9000
        ids = sorted(m.id for m in machines)
    async with Emulator(settings, port=0) as emu:
        assert sorted(m.id for m in emu.machines("web")) == ids  # not seeded twice


def test_settings_from_flags_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("emulator:\n  resume_delay_s: 0.2\n  faults:\n    latency_s: 1\n")
    settings = settings_from(
        str(config),
        environ={"EMULATOR_TOKEN": "from-env-token-0123"},
        listen="127.0.0.1:4999",
        rate_limits=False,
        apps=["demo=3", "other=1:my/image"],
        faults={"error_rate": 0.5, "crash_after_s": None},
    )
    assert settings.listen == "127.0.0.1:4999"
    assert settings.token is not None
    assert settings.token.get_secret_value() == "from-env-token-0123"
    assert settings.resume_delay_s == 0.2
    assert settings.faults.latency_s == 1.0
    assert settings.faults.error_rate == 0.5
    assert settings.rate_limits is False
    assert [(a.name, a.machines, a.image) for a in settings.apps] == [
        ("demo", 3, "autoscaler/demo-app"),
        ("other", 1, "my/image"),
    ]


def test_cli_reports_a_bad_listen_address(capsys: pytest.CaptureFixture[str]) -> None:
    from autoscaler.cli import main

    assert main(["emulator", "--listen", "nowhere", "--log-level", "error"]) == 2
    assert "listen" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [("--latency", "-1", "--latency: input should be greater than or equal to 0, got -1.0"),
     ("--error-rate", "2", "--error-rate: input should be less than or equal to 1, got 2.0"),
     ("--crash-after", "inf", "--crash-after: input should be a finite number, got inf"),
     ("--token", "short", "--token: expected a token of at least 16 characters"),
     ("--listen", "nowhere", '--listen: expected "host:port"'),
     # NaN fails every bound, so it was "less than or equal to 1": it is no number
     ("--hang-rate", "nan", "--hang-rate: expected a number, got nan (not a number)"),
     ("--rate-limit-rate", "NaN", "--rate-limit-rate: expected a number, got nan"),
     ("--latency", "nan", "--latency: expected a number, got nan (not a number)"),
     # no bound: a typo made a hundred thousand machines (emulator.apps[].machines' bound)
     ("--app", "web=100000",
      "--app web: machines: input should be less than or equal to 1000, got 100000"),
     ("--answer-lost-rate", "nan", "--answer-lost-rate: expected a number, got nan"),
     ("--answer-lost-rate", "1.5", "--answer-lost-rate: input should be less than or equal to 1")],
)  # fmt: skip
def test_a_bad_flag_is_said_by_the_flag_not_its_config_key(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flag: str,
    value: str,
    said: str,
) -> None:
    """The lines named the config key (``command line: emulator.faults.latency_s: ...``),
    which the user never typed."""
    from autoscaler.cli import main
    from autoscaler.emulator import main as emulator_main

    served: list[object] = []
    monkeypatch.setattr(emulator_main, "run", lambda s, *a, **k: served.append(s) or 0)
    assert main(["emulator", flag, value, "--log-level", "error"]) == 2
    assert served == []
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(said)


# The token runs commands on this host (a machine's cmd and env): loopback only.
NOT_LOOPBACK = ["0.0.0.0:4280", "[::]:4280", "192.0.2.7:4280", "emulator.example:4280"]


@pytest.mark.parametrize("listen", NOT_LOOPBACK)
def test_settings_refuse_a_listen_address_beyond_loopback(listen: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from(None, environ={}, listen=listen)
    assert str(info.value).startswith("--listen: ")  # the flag, as typed
    assert "loopback" in str(info.value)


@pytest.mark.parametrize("listen", ["127.0.0.1:4280", "127.8.9.10:4280", "[::1]:4280"])
def test_settings_take_a_loopback_listen_address(listen: str) -> None:
    assert settings_from(None, environ={}, listen=listen).listen == listen


def test_alone_the_emulator_may_listen_where_the_files_proxy_or_admin_would(
    tmp_path: Path,
) -> None:
    """`autoscaler emulator` runs the emulator alone: the file's proxy.listen and
    admin.listen are another process's (a config of scaled apps with no fly.api_url, as
    config/autoscaler.yaml, names the embedded emulator's), so --listen on one of them is
    no clash of two servers of one process. It was refused as one."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "apps: [{name: web}]\n"
        "proxy: {listen: '127.0.0.1:8080'}\n"
        "admin: {listen: '127.0.0.1:9091'}\n"
    )
    for listen in ("127.0.0.1:8080", "127.0.0.1:9091", "localhost:9091"):
        assert settings_from(str(config), environ={}, listen=listen).listen == listen
    config.write_text("fly: {api_url: embedded}\nproxy: {listen: '127.0.0.1:4280'}\n")
    assert settings_from(str(config), environ={}).listen == "127.0.0.1:4280"


def test_the_config_file_and_environment_are_held_to_loopback(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("emulator:\n  listen: 0.0.0.0:4280\n")
    with pytest.raises(ConfigError, match=r"emulator\.listen"):
        settings_from(str(config), environ={})
    with pytest.raises(ConfigError, match=r"emulator\.listen"):
        load_settings(None, env={"AUTOSCALER_EMULATOR__LISTEN": "[::]:4280"})


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7"])
def test_the_emulator_refuses_a_host_beyond_loopback(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        Emulator(EmulatorSettings(), host=host, port=0)


def test_cli_refuses_a_listen_address_beyond_loopback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from autoscaler.cli import main
    from autoscaler.emulator import main as emulator_main

    served: list[str] = []  # never bind to the network, even when the check is missing
    monkeypatch.setattr(emulator_main, "run", lambda s, *a, **k: served.append(s.listen) or 0)
    assert main(["emulator", "--listen", "0.0.0.0:4280", "--log-level", "error"]) == 2
    assert served == []
    err = capsys.readouterr().err
    assert err.startswith("--listen: ")
    assert "loopback" in err


def _proc_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


async def test_a_suspend_freezes_all_the_machine_forked_and_a_stop_ends_it(
    tmp_path: Path,
) -> None:
    """A suspend freezes every process of the machine, as Fly pauses the whole VM: its
    process group, and one that left the group (a daemon's setsid), which the group's
    SIGSTOP missed (it ran on through the suspend); a resume thaws them all, and a stop
    ends every process the machine started (one that had left the group outlived it)."""
    command, out = _forker_image(tmp_path)
    settings = EmulatorSettings(rate_limits=False, images={"me/forker": command})
    async with Emulator(settings, host="127.0.0.1", port=0) as emu, session(emu) as s:
        m = await new_machine(s, image="me/forker")
        machine, in_group, escaped = (int(p) for p in out.read_text().split())
        assert emu.pids() == [machine]
        url = f"/v1/apps/demo/machines/{m['id']}"
        try:
            assert (await s.post(f"{url}/suspend")).status == 200
            await wait_ok(s, "demo", m["id"], "suspended")
            # A SIGSTOP takes effect when the kernel next runs the process: wait for "T".
            frozen = (machine, in_group, escaped)
            await until(lambda: {_proc_state(p) for p in frozen} == {"T"}, 5, "frozen")
            assert (await s.post(f"{url}/start")).status == 200
            await wait_ok(s, "demo", m["id"])
            await until(lambda: "T" not in {_proc_state(p) for p in frozen}, 5, "thawed")
            assert (await s.post(f"{url}/stop")).status == 200
            await wait_ok(s, "demo", m["id"], "stopped")
            for pid in (machine, in_group, escaped):
                await pid_exit(pid, 10)  # raises TimeoutError if it outlived the stop
        finally:
            for pid, _ in leftovers(os.getpid()):  # ours and its mark: a failure above
                if pid in (in_group, escaped):
                    os.kill(pid, signal.SIGKILL)


async def test_a_freeze_walks_proc_off_the_loop_and_suspended_waits_for_it(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A suspend's look for the processes that left the machine's group walks /proc, as long
    as the host has processes: it ran on the event loop, and the emulator's API and every
    machine's traffic stood still meanwhile. The suspend is answered while the walk is
    under way, and the machine is `suspended` only once it has ended (all of it frozen)."""
    loop = asyncio.get_running_loop()
    walking, done = asyncio.Event(), threading.Event()

    def slow_proc(root: int) -> list[int]:  # a /proc that takes as long as the test says
        loop.call_soon_threadsafe(walking.set)
        done.wait(10)  # bounded: a walk on the loop (the defect) must not hang the test
        return []

    async with session(emulator) as s:
        m = await new_machine(s)
        record = emulator.machine("demo", m["id"])
        monkeypatch.setattr(procs, "descendants", slow_proc)
        try:
            assert (await s.post(f"/v1/apps/demo/machines/{m['id']}/suspend")).status == 200
            await walking.wait()
            assert record.state == "suspending"  # the loop ran the call's answer meanwhile
        finally:
            done.set()
        await wait_ok(s, "demo", m["id"], "suspended")


# A machine whose daemon (its own session) ends on SIGINT, leaving a mark; the machine's
# process, on SIGINT, waits for the mark before it exits (its end would end the daemon).
GRACEFUL = """
import os, signal, socket, sys, time
host, port, mark = sys.argv[1], int(sys.argv[2]), sys.argv[3]
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    def bye(*_):
        open(mark, "w").close()
        os._exit(0)
    signal.signal(signal.SIGINT, bye)
    os.close(r)
    os.close(w)
    time.sleep(600)
    os._exit(0)
os.close(w)
os.read(r, 1)  # end of file: the daemon has its handler
def stop(*_):
    for _ in range(1000):  # 10 s at most: the stop's timeout kills us after that
        if os.path.exists(mark):
            sys.exit(0)
        time.sleep(0.01)
    sys.exit(1)
signal.signal(signal.SIGINT, stop)
server = socket.create_server((host, port))
time.sleep(600)
"""


async def test_a_stops_signal_reaches_what_left_the_machines_group(tmp_path: Path) -> None:
    """Fly's stop ends the whole VM: its signal reaches a daemon that left the machine's
    process group (setsid) too, which can shut down cleanly; it reached only the group, and
    the daemon was SIGKILLed with the machine, its shutdown never run."""
    script, mark = tmp_path / "graceful.py", tmp_path / "daemon-stopped"
    script.write_text(GRACEFUL)
    command = f"{{python}} {shlex.quote(str(script))} {{host}} {{port}} {shlex.quote(str(mark))}"
    settings = EmulatorSettings(rate_limits=False, images={"me/graceful": command})
    async with Emulator(settings, host="127.0.0.1", port=0) as emu, session(emu) as s:
        m = await new_machine(s, image="me/graceful")
        url = f"/v1/apps/demo/machines/{m['id']}"
        assert (await s.post(f"{url}/stop", json={"timeout": 30})).status == 200
        await wait_ok(s, "demo", m["id"], "stopped")
        assert mark.exists(), "the daemon never got the stop's signal"


async def test_a_stop_by_sigstop_freezes_the_machine_until_its_timeout_kills_it(
    tmp_path: Path,
) -> None:
    """fly.toml's kill_signal may be SIGSTOP: the emulator refused it (400). The stop
    freezes the whole machine (what left its group too), continued by nothing, and the
    SIGKILL at the stop's timeout ends it: `stopped`, its exit by signal 9, and no process
    of it left, frozen or not."""
    command, out = _forker_image(tmp_path)
    settings = EmulatorSettings(rate_limits=False, images={"me/forker": command})
    async with Emulator(settings, host="127.0.0.1", port=0) as emu, session(emu) as s:
        m = await new_machine(s, image="me/forker")
        pids = [int(p) for p in out.read_text().split()]  # machine, in group, left it
        url = f"/v1/apps/demo/machines/{m['id']}"
        r = await s.post(f"{url}/stop", json={"signal": "SIGSTOP", "timeout": "3s"})
        assert r.status == 200, await r.text()
        # Seen frozen before the SIGKILL at 3 s, with room for a loaded machine's polls.
        await until(lambda: {_proc_state(p) for p in pids} == {"T"}, 3, "frozen")
        await wait_ok(s, "demo", m["id"], "stopped")
        machine = emu.machine("demo", m["id"])
        (exit_event,) = [e for e in machine.events if e.type == "exit"]
        assert exit_event.request["exit_event"]["signal"] == signal.SIGKILL
        for pid in pids:
            await pid_exit(pid, 10)  # raises TimeoutError if it outlived the stop
        # A signal call still refuses it: it would hang the app, not stop the machine.
        assert (await s.post(f"{url}/start")).status == 200
        await wait_ok(s, "demo", m["id"])
        r = await s.post(f"{url}/signal", json={"signal": "SIGSTOP"})
        assert r.status == 400


async def test_ps_lists_what_left_the_machines_group_too(tmp_path: Path) -> None:
    """Fly's ps lists every process of the VM: a daemon that left the machine's process
    group (setsid) is one of them. It listed the group only."""
    command, out = _forker_image(tmp_path)
    settings = EmulatorSettings(rate_limits=False, images={"me/forker": command})
    async with Emulator(settings, host="127.0.0.1", port=0) as emu, session(emu) as s:
        m = await new_machine(s, image="me/forker")
        pids = sorted(int(p) for p in out.read_text().split())  # machine, in group, left it
        listed = await (await s.get(f"/v1/apps/demo/machines/{m['id']}/ps")).json()
        assert [p["pid"] for p in listed] == pids


async def test_a_hung_machine_resumed_hangs_on_but_what_left_its_group_runs_again(
    tmp_path: Path,
) -> None:
    """The `hung` fault stops the machine's process group (the app hangs, not the VM), and
    a resume restores the machine as it was: the group still stopped, a daemon that left
    the group running. The resume thawed nothing of a hung machine, so the daemon, frozen
    by the suspend, stayed frozen until the hang was released."""
    command, out = _forker_image(tmp_path)
    settings = EmulatorSettings(rate_limits=False, images={"me/forker": command})
    async with Emulator(settings, host="127.0.0.1", port=0) as emu, session(emu) as s:
        m = await new_machine(s, image="me/forker")
        machine, in_group, escaped = (int(p) for p in out.read_text().split())
        url = f"/v1/apps/demo/machines/{m['id']}"
        emu.set_faults(hung=[m["id"]])
        assert (await s.post(f"{url}/suspend")).status == 200
        await wait_ok(s, "demo", m["id"], "suspended")
        frozen = (machine, in_group, escaped)
        await until(lambda: {_proc_state(p) for p in frozen} == {"T"}, 5, "frozen")
        assert (await s.post(f"{url}/start")).status == 200
        await wait_ok(s, "demo", m["id"])
        await until(lambda: _proc_state(escaped) != "T", 5, "the daemon thawed")
        assert {_proc_state(machine), _proc_state(in_group)} == {"T"}  # the app hangs on
        assert emu.faults.hung == [m["id"]]
