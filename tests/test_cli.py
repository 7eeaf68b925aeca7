"""The command line: `python -m autoscaler`, help, and exit codes."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from testkit import free_port

from autoscaler.cli import _COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autoscaler", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_module_entry_point_help_lists_every_command() -> None:
    result = run("--help")
    assert result.returncode == 0
    for name, *_ in _COMMANDS:
        assert name in result.stdout


def test_check_config_on_the_default_file() -> None:
    # As `run` starts on it: with --emulator (it has no fly.api_url).
    result = run("check-config", "--emulator", "config/autoscaler.yaml")
    assert result.returncode == 0, result.stderr
    assert "config/autoscaler.yaml: OK" in result.stdout


def test_check_config_with_several_mistakes_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "prod.yaml"
    bad.write_text("apps:\n  - {name: a, min_machines: 3, max_machines: 2, hard_limt: 1}\n")
    result = run("check-config", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert f"{bad}:2: apps[0].max_machines: must be >= min_machines (3), got 2" in lines
    assert f"{bad}:2: apps[0].hard_limt: unknown key (did you mean 'hard_limit'?)" in lines


@pytest.mark.parametrize(
    "argv",
    [["run", "--config"], ["run", "--listen"], ["run", "--admin-listen"], ["check-config"],
     ["check-config", "--config"], ["status", "--config"], ["emulator", "--config"],
     ["emulator", "--listen"], ["emulator", "--token"], ["emulator", "--state-file"],
     ["demo", "--config"], ["demo", "--log-file"], ["simulate", "--config"]],
    ids=" ".join,
)  # fmt: skip
def test_an_empty_value_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`--config ''` (a variable that was unset) fell back to $AUTOSCALER_CONFIG or
    config/autoscaler.yaml; an empty --listen, --token or --state-file was left out."""
    for empty in ("", "  "):
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args([*argv, empty])
        assert info.value.code == 2
        assert "expected a value, got an empty one" in capsys.readouterr().err


def test_check_config_given_a_path_and_a_config_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The PATH was checked, and --config (here a broken file) silently left out.
    broken = tmp_path / "broken.yaml"
    broken.write_text("apps: [{name: web, hard_limt: 1}]\n")
    static = REPO / "config" / "static.yaml"
    assert main(["check-config", str(static), "--config", str(broken)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "autoscaler check-config: give the file once, as PATH or as --config PATH (got both:"
        f" {static} and --config {broken})\n"
    )
    # Either alone still checks the file.
    assert main(["check-config", "--config", str(broken)]) == 2
    assert "apps[0].hard_limt: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "summary", "add", "runner"), _COMMANDS, ids=[c[0] for c in _COMMANDS]
)
def test_every_command_parses_its_help(
    name: str, summary: str, add: object, runner: object
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([name, "--help"])
    assert info.value.code == 0
    assert callable(runner)


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("duration", ["nan", "0", "-1"])
def test_demo_refuses_a_duration_that_is_not_a_positive_number(
    duration: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # NaN passed "<= 0" and crashed in the event loop's call_later, after the start-up.
    assert main(["demo", "--duration", duration]) == 2
    expected = f"autoscaler demo: --duration: expected seconds > 0, got {float(duration):g}\n"
    assert capsys.readouterr().err == expected


@pytest.mark.parametrize("machines", ["0", "1001"])
def test_demo_refuses_a_count_of_machines_out_of_bounds_naming_the_flag(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, machines: str
) -> None:
    # It said "--duration and --machines must be positive" of either; a typo of a hundred
    # thousand made as many machines (the emulator's bound, emulator.apps[].machines).
    import autoscaler.demo

    ran: list[object] = []  # a count let through is seen here, not run for 90 s
    monkeypatch.setattr(autoscaler.demo, "main", lambda *a, **k: ran.append(a) or 0)
    assert main(["demo", "--machines", machines]) == 2
    assert ran == []
    assert capsys.readouterr().err == (
        f"autoscaler demo: --machines: expected a number from 1 to 1000, got {machines}\n"
    )


def test_run_without_a_machines_api_exits_2_and_says_why(tmp_path: Path) -> None:
    config = tmp_path / "prod.yaml"
    config.write_text("apps: [{name: web, hosts: [web.test]}]\n")
    result = run("run", "--config", str(config), "--log-format", "json")
    assert result.returncode == 2
    assert "fly.api_url is not set" in result.stdout
    assert "--emulator" in result.stdout


def problems(stdout: str) -> list[str]:
    """The ``config_invalid`` problems of `run`'s JSON log lines."""
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [line["problem"] for line in lines if line.get("event") == "config_invalid"]


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_run_says_a_bad_flag_by_the_flag_as_typed(tmp_path: Path, workers: list[str]) -> None:
    """The lines named the key the flag sets (``command line: proxy.listen: ...``), which
    the user never typed, as the emulator's did before."""
    config = tmp_path / "c.yaml"
    config.write_text("apps: [{name: web, backends: ['127.0.0.1:1']}]\n")
    result = run("run", *workers, "--config", str(config), "--log-format", "json",
                 "--listen", "nowhere", "--admin-listen", "127.0.0.1")  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert problems(result.stdout) == [
        """--listen: expected "host:port" (IPv6 as "[::1]:port"), got 'nowhere'""",
        """--admin-listen: expected "host:port" (IPv6 as "[::1]:port"), got '127.0.0.1'""",
    ]


def test_run_names_the_flag_of_each_value_a_problem_is_about(tmp_path: Path) -> None:
    """A problem about two values (a clash) says where the second came from, by its flag;
    one caused by a flag's value (the admin token an open --admin-listen needs) starts with
    that flag."""
    config = tmp_path / "c.yaml"
    config.write_text("apps: [{name: web, backends: ['127.0.0.1:1']}]\n")
    result = run("run", "--config", str(config), "--log-format", "json",
                 "--listen", "127.0.0.1:9", "--admin-listen", "127.0.0.1:9")  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert problems(result.stdout) == [
        "--listen: 127.0.0.1:9 is admin.listen's address too (127.0.0.1:9 from --admin-listen):"
        " the second of the two servers could not listen; give each its own port"
    ]
    result = run("run", "--config", str(config), "--log-format", "json",
                 "--admin-listen", "192.0.2.1:9")  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    (problem,) = problems(result.stdout)
    assert problem.startswith("--admin-listen: admin.token: required when admin.listen is not")


@pytest.mark.parametrize("flag", ["--listen", "--admin-listen"])
def test_run_workers_refuse_port_0(tmp_path: Path, flag: str) -> None:
    """Port 0 is a free port picked at each bind: under --workers each worker would have
    listened on its own (and worker i's admin server on port i)."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "cluster: {redis_url: 'redis://127.0.0.1:1/0'}\n"
        "apps: [{name: web, backends: ['127.0.0.1:1']}]\n"
    )
    result = run("run", "--workers", "2", "--config", str(config), "--log-format", "json",
                 flag, "127.0.0.1:0")  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    key = "proxy.listen" if flag == "--listen" else "admin.listen"
    assert problems(result.stdout) == [
        f"--workers needs {key} on a port of its own, got 127.0.0.1:0: port 0 is a free port"
        " picked at each bind, so each worker would listen on another"
    ]


@pytest.mark.parametrize("command", ["run", "demo"])
def test_a_damaged_emulator_state_file_is_one_line_and_exit_2(tmp_path: Path, command: str) -> None:
    """emulator.state_file that is no state file: run --emulator and demo ended in a
    StateFileError traceback (exit 1)."""
    state = tmp_path / "state.json"
    state.write_text("{not json")
    config = tmp_path / "c.yaml"
    ports = [free_port() for _ in range(3)]
    config.write_text(
        f"proxy: {{listen: '127.0.0.1:{ports[0]}'}}\nadmin: {{listen: '127.0.0.1:{ports[1]}'}}\n"
        f"emulator: {{listen: '127.0.0.1:{ports[2]}', state_file: '{state}',"
        " apps: [{name: demo, machines: 1}]}\napps: [{name: demo}]\n"
    )
    args = ["run", "--emulator"] if command == "run" else ["demo", "--duration", "1"]
    result = run(*args, "--config", str(config), "--log-format", "json")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert f"{state}: cannot read the emulator state" in result.stdout + result.stderr


def test_new_flags_reach_their_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """--emulator, status --watch and the demo's log flags are passed on as given."""
    import autoscaler.demo
    import autoscaler.service
    import autoscaler.status

    seen: dict[str, object] = {}

    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])

    def fake_run(config: object, overrides: object, *, emulator: bool, flags: object) -> int:
        seen["run"] = (config, overrides, emulator)
        # Service.run delivers the signals `run` holds back: left blocked, this process's
        # later children (the emulator's machines) inherited a blocked SIGINT and SIGTERM
        # and ignored their stops.
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return 0

    def fake_status(admin: object, config: object, *, as_json: bool, watch: bool) -> int:
        seen["status"] = (as_json, watch)
        return 0

    def fake_demo(*args: object, **kwargs: object) -> int:
        seen["demo"] = kwargs
        return 0

    monkeypatch.setattr(autoscaler.service, "run", fake_run)
    monkeypatch.setattr(autoscaler.status, "run_status", fake_status)
    monkeypatch.setattr(autoscaler.demo, "main", fake_demo)
    assert main(["run", "--emulator", "--listen", "127.0.0.1:1"]) == 0
    assert seen["run"] == (None, {"proxy": {"listen": "127.0.0.1:1"}}, True)
    assert main(["status", "--watch", "--json"]) == 0
    assert seen["status"] == (True, True)
    assert main(["demo", "--verbose", "--log-file", "x.log", "--log-level", "debug"]) == 0
    assert seen["demo"] == {
        "log_file": "x.log",
        "verbose": True,
        "log_level": "debug",
        "log_format": "auto",
    }


def test_a_command_with_stdout_closed_runs() -> None:
    """`autoscaler check-config >&-`: sys.stdout is None, and setting up the logs (every
    command does) ended in an AttributeError before the command ran."""
    result = subprocess.run(
        ["/bin/sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "autoscaler",
         "check-config", "--emulator", "config/autoscaler.yaml"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


# --- output that cannot be written ----------------------------------------------------------

CANNOT_WRITE = "autoscaler: cannot write the output: No space left on device"


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"apps": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def admin_url() -> Iterator[str]:
    """An admin server on loopback answering every /status with an empty fleet."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


PRINTING = {
    "check-config": ["check-config", "--emulator", "config/autoscaler.yaml"],
    "help": ["--help"],
    "version": ["--version"],
    "command-help": ["status", "--help"],
    "simulate": ["simulate", "--generate", "steady", "--hours", "0.1", "--totals-only"],
    "status": ["status", "--admin", "{admin}"],
    "status-json": ["status", "--json", "--admin", "{admin}"],
    "status-watch": ["status", "--watch", "--json", "--admin", "{admin}"],
}


def run_to(
    args: list[str], admin: str, *, stdout: object, stderr: object, unbuffered: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOSCALER_")}
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "autoscaler", *(a.format(admin=admin) for a in args)],
        stdout=stdout, stderr=stderr, text=True, cwd=REPO, env=env, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("unbuffered", [True, False], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize("command", PRINTING)
def test_output_to_a_full_disk_is_one_line_and_exit_1(
    command: str, unbuffered: bool, admin_url: str
) -> None:
    """`autoscaler check-config > /dev/full` ended in an OSError traceback (or, with
    stdout buffered, "Exception ignored" at the interpreter's exit and exit 120); --help
    and --version exited 0 having written nothing."""
    with open("/dev/full", "w") as full:
        result = run_to(
            PRINTING[command], admin_url, stdout=full, stderr=subprocess.PIPE,
            unbuffered=unbuffered,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "Exception ignored" not in result.stderr
    assert result.stderr.splitlines()[-1] == CANNOT_WRITE


@pytest.mark.parametrize("command", PRINTING)
def test_output_to_a_closed_pipe_exits_1_saying_nothing(command: str, admin_url: str) -> None:
    """A reader that is gone (`autoscaler --help | true`): exit 1, not a word on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = run_to(
            PRINTING[command], admin_url, stdout=write_end, stderr=subprocess.PIPE,
            unbuffered=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "Exception ignored" not in result.stderr
    assert "cannot write" not in result.stderr


@pytest.mark.parametrize("unbuffered", [True, False], ids=["unbuffered", "buffered"])
def test_stderr_to_a_full_disk_keeps_the_output_and_exits_1(
    unbuffered: bool, tmp_path: Path
) -> None:
    """check-config writes its summary to stdout and a warning to stderr; with stderr on
    /dev/full the summary is still written whole, and the exit is 1 (was 120 buffered)."""
    out = tmp_path / "out.txt"
    with open("/dev/full", "w") as full, out.open("w") as sink:
        result = run_to(
            PRINTING["check-config"], "", stdout=sink, stderr=full, unbuffered=unbuffered
        )
    assert result.returncode == 1
    expected = run("check-config", "--emulator", "config/autoscaler.yaml").stdout
    assert out.read_text() == expected
    assert expected.startswith("config/autoscaler.yaml: OK\n")
