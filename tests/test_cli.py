"""The command line: `python -m autoscaler`, help, and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
    result = run("check-config", "config/autoscaler.yaml")
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
    assert "--duration and --machines must be positive" in capsys.readouterr().err


def test_run_without_a_machines_api_exits_2_and_says_why(tmp_path: Path) -> None:
    config = tmp_path / "prod.yaml"
    config.write_text("apps: [{name: web, hosts: [web.test]}]\n")
    result = run("run", "--config", str(config), "--log-format", "json")
    assert result.returncode == 2
    assert "fly.api_url is not set" in result.stdout
    assert "--emulator" in result.stdout


def test_new_flags_reach_their_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """--emulator, status --watch and the demo's log flags are passed on as given."""
    import autoscaler.demo
    import autoscaler.service
    import autoscaler.status

    seen: dict[str, object] = {}

    def fake_run(config: object, overrides: object, *, emulator: bool) -> int:
        seen["run"] = (config, overrides, emulator)
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
         "check-config", "config/autoscaler.yaml"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
