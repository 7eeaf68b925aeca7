"""Production foot-guns the code refuses or warns about.

`autoscaler run` with no Machines API, an admin server open to the network without a token
(the Docker image's own settings are read from its Dockerfile), and machines whose Fly
autostop/autostart would fight the autoscaler.
"""

from __future__ import annotations

import io
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from reliability.harness import live_service
from structlog.testing import capture_logs
from testkit import free_port, until

from autoscaler.check import check_config, fleet_warnings
from autoscaler.config import ConfigError, EmulatorApp, Settings, load_settings
from autoscaler.emulator import Emulator
from autoscaler.fly import models as fm
from autoscaler.fly.autostop import fight_warning, fly_autoscaling
from autoscaler.fly.client import MachinesClient
from autoscaler.metrics import Metrics
from autoscaler.service import Service, run

REPO = Path(__file__).resolve().parents[1]
APP = "apps: [{name: web, hosts: [web.test]}]\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "autoscaler.yaml"
    path.write_text(text)
    return path


# --- fly.api_url ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["proxy: {shutdown_timeout_s: 2}\n", "fly: {api_url: 'http://127.0.0.1:9'}\napps: []\n"],
    ids=["no-apps-key", "empty-list"],
)
def test_run_and_check_config_refuse_a_config_with_no_app(
    tmp_path: Path,
    text: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`apps: []` passed check-config ("apps: 0") and `run` served it, every request a 404,
    without a word (with no fly.api_url, the refusal spoke of the API, not of the apps);
    `apps:` with every entry commented out was an error."""
    import autoscaler.service

    def served(main: Any) -> None:  # what `run` would have served until a signal
        main.close()

    monkeypatch.setattr(autoscaler.service, "run_event_loop", served)
    path = write(tmp_path, text)
    problem = (
        f"{path}: apps: empty: nothing to route or scale, so `autoscaler run` does not start"
        " on it; list the apps to serve (a reload may empty the list: that is taken, as"
        " deliberate)"
    )
    with capture_logs() as logs:
        assert run(str(path)) == 2
    assert [e["problem"] for e in logs if e["event"] == "config_invalid"] == [problem]
    capsys.readouterr()
    assert check_config(str(path)) == 2
    assert capsys.readouterr() == ("", problem + "\n")


def test_run_without_a_config_file_says_the_file_is_missing_not_that_its_apps_are_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`autoscaler run` in a directory without config/autoscaler.yaml (no --config, no
    $AUTOSCALER_CONFIG) runs on the defaults, which have no app: it said
    "config/autoscaler.yaml: apps: empty", of a file that does not exist. Apps set by the
    environment alone still run without a file."""
    import autoscaler.service

    served: list[bool] = []

    def serve(main: Any) -> None:
        main.close()
        served.append(True)

    monkeypatch.setattr(autoscaler.service, "run_event_loop", serve)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUTOSCALER_CONFIG", raising=False)
    monkeypatch.delenv("AUTOSCALER_APPS", raising=False)
    with capture_logs() as logs:
        assert run(None) == 2
    [problem] = [e["problem"] for e in logs if e["event"] == "config_invalid"]
    assert problem.startswith("config/autoscaler.yaml: no such file")
    assert "apps: empty" not in problem
    monkeypatch.setenv(
        "AUTOSCALER_APPS", '[{"name": "web", "hosts": ["web.test"], "backends": ["127.0.0.1:9"]}]'
    )
    assert run(None) == 0
    assert served == [True]


async def test_a_reload_that_empties_the_apps_is_applied_and_said(tmp_path: Path) -> None:
    """A reload to `apps: []` may be meant (every app taken out): it is applied, with a
    warning that every request now gets 404 and that a restart would be refused."""
    static = "{name: web, hosts: [web.test], backends: ['127.0.0.1:9']}"
    path = write(tmp_path, f"apps: [{static}]\n")
    async with live_service(path, without_api=True) as svc:
        path.write_text("apps: []\n")
        with capture_logs() as logs:
            assert await svc.reload()
        assert svc.settings.apps == []
        [line] = [e for e in logs if e["event"] == "no_apps"]
        assert line["log_level"] == "warning"
        assert line["path"] == str(path)
        assert "a restart on this file is refused" in line["hint"]
        path.write_text(f"apps: [{static}]\n")
        with capture_logs() as logs:
            assert await svc.reload()
        assert [e for e in logs if e["event"] == "no_apps"] == []


def test_run_refuses_to_start_without_a_machines_api(tmp_path: Path) -> None:
    path = write(tmp_path, APP)
    with capture_logs() as logs:
        assert run(str(path)) == 2
    (line,) = [e for e in logs if e["event"] == "config_invalid"]
    assert "fly.api_url is not set and app web is scaled" in line["problem"]
    assert "--emulator" in line["problem"]
    assert "fly.api_url: embedded" in line["problem"]


def test_emulator_is_asked_for_by_flag_or_by_name(tmp_path: Path) -> None:
    path = write(tmp_path, "fly: {org_slug: mine}\n" + APP)
    settings, _ = load_settings(path, env={}, overrides={"fly": {"api_url": "embedded"}})
    assert settings.fly.embedded
    assert settings.fly.org_slug == "mine"  # the flag overrides one key, not the section
    named, _ = load_settings(write(tmp_path, "fly: {api_url: embedded}\n" + APP), env={})
    assert named.fly.embedded
    real, _ = load_settings(write(tmp_path, "fly: {api_url: 'https://x.test'}\n"), env={})
    assert not real.fly.embedded


def test_api_url_must_be_a_url_or_embedded(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r'fly.api_url: expected an http:// .* or "embedded"'):
        load_settings(write(tmp_path, "fly: {api_url: emulator}\n"), env={})


def test_check_config_says_run_needs_the_emulator_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check_config(str(write(tmp_path, APP))) == 0
    assert "not set: `autoscaler run` needs --emulator" in capsys.readouterr().out


def test_check_config_says_static_apps_need_no_machines_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # config/static.yaml was told "`autoscaler run` needs --emulator", which it does not.
    assert check_config(str(REPO / "config" / "static.yaml")) == 0
    out = capsys.readouterr().out
    assert "Machines API: not set, and not needed: every app is static (has backends)" in out
    assert "--emulator" not in out


# --- the admin server beyond loopback -----------------------------------------------------


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:9091", "127.0.0.2:9091", "[::1]:9091", "localhost:1"]
)
def test_a_loopback_admin_needs_no_token(tmp_path: Path, listen: str) -> None:
    settings, _ = load_settings(write(tmp_path, f"admin: {{listen: '{listen}'}}\n"), env={})
    assert settings.admin.token is None


@pytest.mark.parametrize("listen", ["0.0.0.0:9091", "[::]:9091", "10.0.0.1:9091", "admin:9091"])
def test_an_open_admin_server_needs_a_token(tmp_path: Path, listen: str) -> None:
    path = write(tmp_path, f"admin: {{listen: '{listen}'}}\n")
    with pytest.raises(
        ConfigError, match=r"admin\.token: required when admin\.listen is not a loop"
    ):
        load_settings(path, env={})
    settings, _ = load_settings(path, env={"AUTOSCALER_ADMIN__TOKEN": "s3cr3t-admin-0123456789"})
    assert settings.admin.listen == listen


def dockerfile_env() -> dict[str, str]:
    """The ENV of the Dockerfile's final stage, as the container sees it."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    final = text.rsplit("\nFROM ", 1)[1]
    env: dict[str, str] = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in line.split()[1:])
    return env


def test_the_docker_image_binds_admin_where_its_published_port_reaches_and_needs_a_token() -> None:
    docker = (REPO / "Dockerfile").read_text()
    env = dockerfile_env()
    ((source, target),) = re.findall(r"^COPY (config/\S+) (\S+)$", docker, re.M)
    assert env["AUTOSCALER_CONFIG"] == target
    config = REPO / source
    with pytest.raises(ConfigError, match=r"admin\.token: required"):
        load_settings(config, env=env)
    settings, _ = load_settings(
        config, env={**env, "AUTOSCALER_ADMIN__TOKEN": "t0ken-xyz-0123456789"}
    )
    assert settings.admin.listen == "0.0.0.0:9091"
    admin_port = settings.admin.listen.rsplit(":", 1)[1]
    assert admin_port in re.findall(r"^EXPOSE (.*)$", docker, re.M)[0].split()
    assert f"127.0.0.1:{admin_port}/healthz" in docker  # the health check asks it on loopback
    assert settings.proxy.listen == "[::]:8080"
    # The baked-in config names no Machines API: `run` refuses until given one.
    assert settings.fly.api_url is None


# --- Fly's own autostop/autostart ---------------------------------------------------------


def machine(mid: str, **service: object) -> fm.Machine:
    return fm.Machine.model_validate(
        {"id": mid, "state": "started", "config": {"image": "x", "services": [service]}}
    )


def test_fly_autoscaling_reads_every_spelling() -> None:
    assert fly_autoscaling(machine("a", internal_port=8080)) == []
    assert fly_autoscaling(machine("a", autostop="off", autostart=False)) == []
    assert fly_autoscaling(machine("a", autostop=False)) == []
    assert fly_autoscaling(machine("a", autostop="suspend")) == ["autostop=suspend"]
    assert fly_autoscaling(machine("a", autostop=True, autostart=True)) == [
        "autostop=true",
        "autostart=true",
    ]
    assert fight_warning("web", [machine("a", autostop="off")]) is None
    warning = fight_warning("web", [machine("b", autostart=True), machine("a", autostop="stop")])
    assert warning is not None
    assert warning.startswith("app web: 2 machine(s) have Fly's own autostop/autostart on")
    assert "a: autostop=stop; b: autostart=true" in warning


async def add_fighting_machine(emulator: Emulator) -> None:
    emulator.world.seed_app(EmulatorApp(name="web", machines=1))
    async with MachinesClient(emulator.url, emulator.token, rate_limit=False) as client:
        await client.create_machine(
            "web",
            {
                "image": "autoscaler/demo-app",
                "services": [{"internal_port": 8080, "autostop": "suspend"}],
            },
        )


def api_settings(url: str, token: str, **app: object) -> Settings:
    return Settings.model_validate(
        {
            "fly": {"api_url": url, "token": token, "rate_limit": False},
            "proxy": {"listen": "127.0.0.1:8080"},
            "apps": [{"name": "web", "hosts": ["web.test"], **app}],
        }
    )


async def test_check_config_warns_about_fly_autostop_when_it_can_see_it(
    emulator: Emulator,
) -> None:
    await add_fighting_machine(emulator)
    (warning,) = await fleet_warnings(api_settings(emulator.url, emulator.token))
    assert "app web: 1 machine(s) have Fly's own autostop/autostart on" in warning
    assert "autostop=suspend" in warning


async def test_check_config_says_when_it_could_not_check() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    (warning,) = await fleet_warnings(api_settings(dead, "t0ken-xyz-0123456789"), timeout_s=2)
    assert warning.startswith("app web: could not check Fly's autostop/autostart")
    static = api_settings(dead, "t0ken-xyz-0123456789", backends=["127.0.0.1:1"])
    assert await fleet_warnings(static) == []  # nothing scaled, nothing to ask
    embedded = Settings.model_validate({"apps": [{"name": "web"}]})
    (line,) = await fleet_warnings(embedded)
    assert "not checked" in line


def test_check_config_prints_the_warnings_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    path = write(tmp_path, f"fly: {{api_url: '{dead}', max_retries: 0}}\n" + APP)
    err = io.StringIO()
    assert check_config(str(path), err=err) == 0  # a warning, not a failure
    assert "warning: app web: could not check Fly's autostop/autostart" in err.getvalue()


async def test_run_logs_fly_autostop_once_per_app(emulator: Emulator, tmp_path: Path) -> None:
    await add_fighting_machine(emulator)
    settings = api_settings(emulator.url, emulator.token)
    path = tmp_path / "autoscaler.yaml"
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_defaults=True)))
    path.write_text(path.read_text().replace("**********", emulator.token))
    svc = Service(settings, path, metrics=Metrics(CollectorRegistry()), proxy_port=0, admin_port=0)
    with capture_logs() as logs:
        await svc.start()
        try:
            await until(lambda: any(e["event"] == "fly_autoscaling_on" for e in logs))
            assert await svc.reload()  # the same app again: no second warning
        finally:
            await svc.stop()
    (line,) = [e for e in logs if e["event"] == "fly_autoscaling_on"]
    assert line["app"] == "web"
    assert "autostop=suspend" in line["problem"]


def test_the_example_fly_toml_leaves_the_graceful_stop_its_time() -> None:
    """Fly kills a machine ``kill_timeout`` seconds after its stop signal (5 by default):
    the example must leave the autoscaler its graceful stop (the proxy's drain, then the
    lease releases), or every deploy cuts requests in flight; and the signal must be one
    the service stops gracefully on."""
    fly = tomllib.loads((REPO / "config" / "fly.toml.example").read_text())
    settings = Settings()
    # A cluster leader's stop bounds its lease releases twice (its step-down's, its own).
    stop_s = settings.proxy.shutdown_timeout_s + 2 * settings.control.api_timeout_s
    assert fly["kill_timeout"] > stop_s
    assert fly["kill_signal"] in ("SIGTERM", "SIGINT")
