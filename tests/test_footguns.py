"""Production foot-guns the code refuses or warns about.

`autoscaler run` with no Machines API, an admin server open to the network without a token
(the Docker image's own settings are read from its Dockerfile), and machines whose Fly
autostop/autostart would fight the autoscaler.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import re
import socket
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from reliability.harness import live_service
from structlog.testing import capture_logs
from testkit import until

from autoscaler.check import FleetCheck, check_config, fleet_check
from autoscaler.config import (
    ConfigError,
    EmulatorApp,
    IPAddress,
    ListenHosts,
    Resolver,
    Settings,
    load_settings,
    origin,
    resolve_listen_host,
)
from autoscaler.emulator import Emulator
from autoscaler.emulator.main import token_source
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


def assert_refused_by_run_and_check_config(
    path: Path, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run` and `check-config` both refuse the file, exit 2, with this one problem."""
    with capture_logs() as logs:
        assert run(str(path)) == 2
    assert [e["problem"] for e in logs if e["event"] == "config_invalid"] == [problem]
    capsys.readouterr()
    assert check_config(str(path)) == 2
    assert capsys.readouterr() == ("", problem + "\n")


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
    assert_refused_by_run_and_check_config(path, problem, capsys)


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


def test_check_config_without_a_file_says_how_to_give_one_as_run_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`autoscaler check-config` where config/autoscaler.yaml is not (no PATH, no --config,
    no $AUTOSCALER_CONFIG) said only "no such file"; `run` says how to give the file. A
    file named and missing is only that."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUTOSCALER_CONFIG", raising=False)
    with capture_logs() as logs:
        assert run(None) == 2
    [problem] = [e["problem"] for e in logs if e["event"] == "config_invalid"]
    hint = "give the file with --config PATH or $AUTOSCALER_CONFIG"
    assert problem.endswith(hint)
    assert check_config(None) == 2
    assert capsys.readouterr() == ("", f"{problem}\n")
    assert check_config("nope.yaml") == 2
    assert capsys.readouterr().err == "nope.yaml: no such file\n"


def test_check_config_without_a_file_checks_the_environment_as_run_runs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run` starts without config/autoscaler.yaml on settings from the environment
    (AUTOSCALER_APPS, ...); check-config refused them ("no such file"), so what ran could
    not be checked. It checks them now: OK, and their problems as `run` says them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUTOSCALER_CONFIG", raising=False)
    web = '{"name": "web", "hosts": ["web.test"], "backends": ["127.0.0.1:9"]}'
    monkeypatch.setenv("AUTOSCALER_APPS", f"[{web}]")
    assert check_config(None) == 0
    out, err = capsys.readouterr()
    assert out.startswith("environment (config/autoscaler.yaml: no such file): OK\n")
    assert "web.test" in out
    assert err == ""
    monkeypatch.setenv("AUTOSCALER_PROXY__LISTEN", "127.0.0.1:9091")  # admin.listen
    with capture_logs() as logs:
        assert run(None) == 2
    [problem] = [e["problem"] for e in logs if e["event"] == "config_invalid"]
    assert check_config(None) == 2
    assert capsys.readouterr() == ("", f"{problem}\n")


def test_check_config_refuses_cluster_mode_without_the_redis_client_as_run_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """cluster.redis_url without the cluster extra installed: `run` refuses to start
    (exit 2), check-config said OK."""
    import importlib.util

    import autoscaler.service

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "redis" else find_spec(name, *a),
    )
    monkeypatch.setattr(autoscaler.service, "run_event_loop", lambda main: main.close())
    static = "{name: web, hosts: [web.test], backends: ['127.0.0.1:9']}"
    path = write(tmp_path, f"cluster: {{redis_url: 'redis://127.0.0.1:9/0'}}\napps: [{static}]\n")
    with capture_logs() as logs:
        assert run(str(path)) == 2
    [problem] = [e["problem"] for e in logs if e["event"] == "config_invalid"]
    assert "the Redis client is not installed" in problem
    assert check_config(str(path)) == 2
    assert capsys.readouterr() == ("", f"{problem}\n")


async def test_run_warns_of_an_app_no_request_is_routed_to_as_check_config_does(
    tmp_path: Path,
) -> None:
    """An app without hosts that is not proxy.default_app gets no request: check-config
    warned of it, `run` (at its start and on a reload) said nothing. Both say it now, in
    the same words."""
    web = "{name: web, backends: ['127.0.0.1:9']}"
    api = "{name: api, hosts: [a.test], backends: ['127.0.0.1:9']}"
    path = write(tmp_path, f"apps: [{web}, {api}]\n")
    err = io.StringIO()
    assert await asyncio.to_thread(check_config, str(path), io.StringIO(), err) == 0
    [warned] = err.getvalue().splitlines()
    with capture_logs() as logs:
        async with live_service(path, without_api=True) as svc:
            [line] = [e for e in logs if e["event"] == "app_unreachable"]
            assert line["log_level"] == "warning"
            assert line["app"] == "web"
            assert warned == f"warning: {line['problem']}"
            assert "apps[0].hosts" in line["problem"]
            del logs[:]
            path.write_text(f"apps: [{api}, {web}]\n")  # said again, with its new place
            assert await svc.reload()
            [line] = [e for e in logs if e["event"] == "app_unreachable"]
            assert line["app"] == "web"
            assert "apps[1].hosts" in line["problem"]
            del logs[:]
            path.write_text(f"proxy: {{default_app: web}}\napps: [{api}, {web}]\n")
            assert await svc.reload()
            assert [e for e in logs if e["event"] == "app_unreachable"] == []


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


@pytest.fixture
def no_fly_token(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLY_API_TOKEN", "AUTOSCALER_FLY__TOKEN", "AUTOSCALER_FLY"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("no_fly_token")
def test_run_and_check_config_refuse_to_scale_through_the_api_without_a_token(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    refused_port: Callable[[], int],
) -> None:
    """A real fly.api_url and no FLY_API_TOKEN: `run` started and every tick got a 401,
    forever; check-config said OK, with "could not check ... 401" warnings. The line
    names the command to try on the emulator: check-config has no --emulator, which "run
    on the embedded emulator with --emulator" sent its reader to."""
    import autoscaler.service

    served: list[bool] = []

    def serve(main: Any) -> None:  # what `run` would have served until a signal
        main.close()
        served.append(True)

    monkeypatch.setattr(autoscaler.service, "run_event_loop", serve)
    dead = f"http://127.0.0.1:{refused_port()}"
    path = write(tmp_path, f"fly: {{api_url: '{dead}', max_retries: 0}}\n" + APP)
    problem = (
        f"{path}: no Fly API token: app web is scaled through the Machines API at {dead},"
        " which refuses every call without one (401): set FLY_API_TOKEN (or fly.token), or"
        " run it on the embedded emulator: autoscaler run --emulator"
    )
    assert_refused_by_run_and_check_config(path, problem, capsys)
    assert served == []
    # The embedded emulator has a token of its own; static apps call no API.
    assert run(str(path), emulator=True) == 0
    static = write(
        tmp_path, f"fly: {{api_url: '{dead}'}}\napps: [{{name: s, backends: ['{dead[7:]}']}}]\n"
    )
    assert run(str(static)) == 0
    monkeypatch.setenv("FLY_API_TOKEN", "t0ken-xyz-0123456789")
    assert run(str(path)) == 0
    assert served == [True, True, True]


@pytest.mark.usefixtures("no_fly_token")
async def test_a_reload_cannot_add_an_app_to_scale_without_a_token(
    tmp_path: Path, refused_port: Callable[[], int]
) -> None:
    """Started on static apps with a real fly.api_url and no token (nothing to call), a
    reload that added an app to scale was taken: 401 on every tick. fly.* needs a restart,
    so a token set in the file meanwhile is not in use either."""
    dead = f"http://127.0.0.1:{refused_port()}"
    static = "{name: web, hosts: [web.test], backends: ['127.0.0.1:9']}"
    path = write(tmp_path, f"fly: {{api_url: '{dead}'}}\napps: [{static}]\n")
    async with live_service(path) as svc:
        for fly, why in [
            (f"{{api_url: '{dead}'}}", f"{path}: no Fly API token: app api is scaled"),
            (
                f"{{api_url: '{dead}', token: t0ken-xyz-0123456789}}",
                f"{path}: fly.token was set after the start: restart to scale apps",
            ),
        ]:
            path.write_text(f"fly: {fly}\napps: [{static}, {{name: api, hosts: [api.test]}}]\n")
            with capture_logs() as logs:
                assert not await svc.reload()
            [rejected] = [e for e in logs if e["event"] == "config_reload_rejected"]
            assert rejected["problems"][0].startswith(why), rejected
            assert [a.name for a in svc.settings.apps] == ["web"]
            assert "t0ken-xyz" not in str(logs)


@pytest.mark.usefixtures("no_fly_token")
async def test_check_config_fails_when_the_api_refuses_the_token(
    emulator: Emulator, tmp_path: Path, aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token the Machines API refuses (401: wrong, expired; 403: not for this app) is a
    configuration error: check-config said OK, with a warning."""
    from aiohttp import web

    refused = "wr0ng-t0ken-0123456789"
    path = write(tmp_path, f"fly: {{api_url: '{emulator.url}', token: {refused}}}\n" + APP)
    out, err = io.StringIO(), io.StringIO()
    assert await asyncio.to_thread(check_config, str(path), out, err) == 2
    assert out.getvalue() == ""
    (line,) = err.getvalue().splitlines()
    assert line.startswith(
        f"{path}:1: fly.token: the Machines API at {emulator.url} refused it for app web"
        " (list_machines: HTTP 401: "
    ), line
    assert line.endswith("): wrong, expired or revoked: set a valid one")

    async def forbidden(request: web.Request) -> web.Response:
        return web.json_response({"error": "not allowed"}, status=403)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forbidden)
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}"
    path = write(tmp_path, f"fly: {{api_url: '{url}', max_retries: 0}}\n" + APP)
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setenv("FLY_API_TOKEN", refused)
    assert await asyncio.to_thread(check_config, str(path), out, err) == 2
    assert err.getvalue() == (
        f"environment: FLY_API_TOKEN: fly.token: the Machines API at {url} refused it for"
        " app web (list_machines: HTTP 403: not allowed): it may not act on this app (a"
        " token of another app or organization?)\n"
    )
    for text in (out.getvalue(), err.getvalue()):
        assert refused not in text


@pytest.mark.usefixtures("no_fly_token")
async def test_check_config_fails_on_an_app_the_api_does_not_have(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app name the Machines API does not know (404: a typo, another organization's
    app) passed check-config (exit 0) with a warning that it could not check Fly's
    autostop, and `run` failed every tick of it. The apps it has are fine. The line names
    the file's line of the name (the file alone before, where config errors give its line);
    apps set by AUTOSCALER_APPS (over the file, or without one) are said to come from there."""
    emulator.world.seed_app(EmulatorApp(name="web", machines=1))
    fly = f"fly: {{api_url: '{emulator.url}', token: {emulator.token}, rate_limit: false}}\n"
    apps = "apps:\n  - {name: web, hosts: [web.test]}\n  - {name: wbe, hosts: [wbe.test]}\n"
    path = write(tmp_path, fly + apps)
    out, err = io.StringIO(), io.StringIO()
    assert await asyncio.to_thread(check_config, str(path), out, err) == 2
    assert out.getvalue() == ""
    (line,) = err.getvalue().splitlines()
    assert line.startswith(
        f"{path}:4: apps[1].name: the Machines API at {emulator.url} has no app 'wbe'"
        " (list_machines: HTTP 404: "
    ), line
    assert emulator.token not in line
    monkeypatch.setenv("AUTOSCALER_APPS", '[{"name": "wbe", "hosts": ["wbe.test"]}]')
    err = io.StringIO()
    assert await asyncio.to_thread(check_config, str(path), io.StringIO(), err) == 2
    assert err.getvalue().startswith("environment: AUTOSCALER_APPS: apps[0].name: ")


@pytest.mark.usefixtures("no_fly_token")
async def test_check_config_never_shows_what_is_typed_into_the_api_url(
    tmp_path: Path,
    aiohttp_server: Any,
    capsys: pytest.CaptureFixture[str],
    refused_port: Callable[[], int],
) -> None:
    """fly.api_url is not a secret field, but credentials (``user:secret@``) or a token
    in its query get typed into it: check-config printed it as given, in its summary and
    in its problems (no token, a token refused)."""
    from aiohttp import web

    async def forbidden(request: web.Request) -> web.Response:
        return web.json_response({"error": "not allowed"}, status=403)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forbidden)
    server = await aiohttp_server(app)
    dead = f"127.0.0.1:{refused_port()}"
    fly = "{{api_url: 'http://user:s3cret-pw@{}/v1?token=s3cret-q#s3cret-f', max_retries: 0"
    token = ", token: t0ken-xyz-0123456789}\n"
    for text, code, shown in [
        (f"fly: {fly.format(dead)}{token}{APP}", 0, f"http://<redacted>@{dead}/v1?<redacted>"),
        (f"fly: {fly.format(dead)}}}\n{APP}", 2, "at http://<redacted>@"),
        (f"fly: {fly.format(f'127.0.0.1:{server.port}')}{token}{APP}", 2, "at http://<red"),
    ]:
        path = write(tmp_path, text)
        assert await asyncio.to_thread(check_config, str(path)) == code
        printed = capsys.readouterr()
        assert shown in printed.out + printed.err, printed
        assert "s3cret" not in printed.out + printed.err, printed
    assert "HTTP 403" in printed.err  # the last: the token refused


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


def test_check_config_refuses_an_app_to_scale_without_a_machines_api_as_run_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config wrote its own list of run's start checks, without this one: "OK",
    exit 0 ("Machines API: not set: `autoscaler run` needs --emulator") for a file `run`
    refuses. It now asks run's own check."""
    path = write(tmp_path, APP)
    problem = (
        f"{path}: fly.api_url is not set and app web is scaled (it has no backends): set it"
        " to the Machines API (https://api.machines.dev, or http://_api.internal:4280 inside"
        " Fly), or ask for the embedded emulator with --emulator or fly.api_url: embedded"
    )
    assert_refused_by_run_and_check_config(path, problem, capsys)
    assert check_config(str(path), emulator=True) == 0  # as `run --emulator` starts on it
    assert "Machines API: embedded emulator" in capsys.readouterr().out
    # The embedded emulator takes its own token: the Fly token's absence is no concern.
    embedded = "fly: {api_url: embedded}\nemulator: {token: emu-t0ken-0123456789}\n"
    assert check_config(str(write(tmp_path, embedded + APP))) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("Machines API")]
    assert line == "Machines API: embedded emulator on 127.0.0.1:4280"


def test_check_config_says_static_apps_need_no_machines_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # config/static.yaml was told "`autoscaler run` needs --emulator", which it does not.
    assert check_config(str(REPO / "config" / "static.yaml")) == 0
    out = capsys.readouterr().out
    # Not followed by "(token not set, ...)": no API is called, so no token is needed.
    assert "Machines API: not set, and not needed: every app is static (has backends)\n" in out
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


def test_an_open_admin_server_is_blamed_where_its_listen_address_came_from(
    tmp_path: Path,
) -> None:
    """The admin.token a non-loopback admin.listen needs is missing because of that address:
    set by AUTOSCALER_ADMIN__LISTEN (or --admin-listen), the line blamed the file's admin
    section, which holds a loopback one."""
    path = write(tmp_path, "admin:\n  listen: 127.0.0.1:9091\n")
    problem = "admin.token: required when admin.listen is not a loopback address"
    for env, overrides, where in (
        ({"AUTOSCALER_ADMIN__LISTEN": "0.0.0.0:9091"}, {}, "environment: AUTOSCALER_ADMIN__LISTEN"),
        ({"AUTOSCALER_ADMIN": '{"listen": "0.0.0.0:9091"}'}, {}, "environment: AUTOSCALER_ADMIN"),
        ({}, {"admin": {"listen": "0.0.0.0:9091"}}, "command line"),
    ):
        with pytest.raises(ConfigError) as info:
            load_settings(path, env=env, overrides=overrides)
        assert [p.partition(" (got")[0] for p in info.value.problems] == [f"{where}: {problem}"]
    # From the file: the line of admin.listen, not of the section.
    path = write(tmp_path, "admin:\n\n  listen: 0.0.0.0:9091\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert [p.partition(" (got")[0] for p in info.value.problems] == [f"{path}:3: {problem}"]


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
    # Every IPv4 address: a published port (docker run -p) and Fly's proxy come over IPv4
    # (and 0.0.0.0, unlike a dual-stack [::], needs no IPv6 in the host's kernel).
    assert settings.proxy.listen == "0.0.0.0:8080"
    # The baked-in config names no Machines API: `run` refuses until given one.
    assert settings.fly.api_url is None


# --- listen addresses given by name ------------------------------------------------------


TOKEN = "token: admin-t0ken-0123456789"  # an admin server on a name needs one


def name_service(table: dict[str, list[str]]) -> Resolver:
    """A resolver of its own: these names and no other (no name service asked)."""

    def resolve(host: str) -> list[IPAddress]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ipaddress.ip_address(a) for a in table[host]]

    return resolve


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("proxy: {listen: 'edge.test:9091'}\n",
         "proxy.listen: edge.test:9091 is admin.listen's address too (127.0.0.1:9091, its"
         " default; edge.test is 127.0.0.1): the second of the two servers could not listen; give"
         " each its own port"),
        (f"proxy: {{listen: '0.0.0.0:9092'}}\nadmin: {{listen: 'ops.test:9092', {TOKEN}}}\n",
         "proxy.listen: 0.0.0.0:9092 is admin.listen's address too (ops.test:9092 at {path}:2;"
         " 0.0.0.0 is every IPv4 address of this host): the second of the two servers could"
         " not listen; give each its own port"),
        (f"proxy: {{listen: 'edge.test:9092'}}\nadmin: {{listen: 'ops.test:9092', {TOKEN}}}\n",
         "proxy.listen: edge.test:9092 is admin.listen's address too (ops.test:9092 at"
         " {path}:2; edge.test and ops.test are both 127.0.0.1): the second of the two"
         " servers could not listen; give each its own port"),
        ("proxy: {listen: 'gone.test:9092'}\n",
         "proxy.listen: host 'gone.test' does not resolve (Name or service not known): nothing"
         " could listen on gone.test:9092; give an IP address, or a name of this host"),
    ],
    ids=["name-and-its-address", "wildcard-and-a-name", "two-names", "no-such-name"],
)  # fmt: skip
def test_run_and_check_config_resolve_the_listen_addresses_names(
    tmp_path: Path,
    text: str,
    problem: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Only localhost was known to be 127.0.0.1: two servers on a name of this host and
    its address (or a wildcard) passed check-config and `run` failed to start ("address
    in use", after the emulator and the admin server had started); a name that resolves
    to nothing failed the same way, as "start_failed: Name or service not known", no
    word of which address."""
    import autoscaler.check
    import autoscaler.service

    hosts = name_service({"edge.test": ["127.0.0.1"], "ops.test": ["127.0.0.1", "::1"]})
    monkeypatch.setattr(autoscaler.service, "resolve_listen_host", hosts)
    monkeypatch.setattr(autoscaler.check, "resolve_listen_host", hosts)
    path = write(tmp_path, text + APP)
    line = next(n for n, s in enumerate(text.splitlines(), 1) if s.startswith("proxy:"))
    expected = f"{path}:{line}: {problem.format(path=path)}"
    assert_refused_by_run_and_check_config(path, expected, capsys)


def test_a_listen_name_is_taken_at_what_this_host_resolves_it_to(tmp_path: Path) -> None:
    """The resolver run and check-config use: this host's own (localhost is in every
    hosts file), to the addresses a server told to listen there binds."""
    assert ipaddress.ip_address("127.0.0.1") in resolve_listen_host("localhost")
    path = write(tmp_path, "proxy: {listen: 'localhost:9091'}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={}, resolve=resolve_listen_host)
    [problem] = info.value.problems
    assert "(127.0.0.1:9091, its default; localhost is 127.0.0.1)" in problem
    # Nor is a name resolved where no resolver is given (a reload, in the event loop).
    unresolved = write(tmp_path, "proxy: {listen: 'gone.test:9091'}\n")
    assert load_settings(unresolved, env={})[0].proxy.listen == "gone.test:9091"


def test_a_listen_name_no_name_service_takes_is_said_of_its_key(tmp_path: Path) -> None:
    """A label over 63 characters, which the name's encoding refuses before any lookup
    (no query leaves this host): the resolver's UnicodeError was no OSError, and the
    problem came out as "(top): encoding with 'idna' codec failed", naming no key."""
    path = write(tmp_path, f"proxy: {{listen: '{'x' * 64}.test:9091'}}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={}, resolve=resolve_listen_host)
    [problem] = info.value.problems
    assert f"{path}:1: proxy.listen: host " in problem, problem
    assert "does not resolve" in problem, problem


LOOPBACK_NAMES = {"ops.test": ["127.0.0.1", "::1"], "pub.test": ["127.0.0.1", "10.0.0.1"]}


@pytest.mark.usefixtures("no_fly_token")
def test_an_admin_server_on_a_name_of_loopback_needs_no_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only localhost was known to be loopback: `run` and check-config asked an admin
    server on another name of this host's loopback for admin.token. They take a name at
    its addresses: all loopback, no token needed; one beyond, one needed. status, which
    looks up no name, asks for none."""
    import autoscaler.check
    import autoscaler.service

    hosts = name_service(LOOPBACK_NAMES)
    monkeypatch.setattr(autoscaler.service, "resolve_listen_host", hosts)
    monkeypatch.setattr(autoscaler.check, "resolve_listen_host", hosts)
    monkeypatch.setattr(autoscaler.service, "run_event_loop", lambda main: main.close())
    path = write(tmp_path, "admin: {listen: 'ops.test:9091'}\n" + APP)
    assert check_config(str(path), emulator=True) == 0
    assert run(str(path), emulator=True) == 0
    capsys.readouterr()
    path = write(tmp_path, "admin: {listen: 'pub.test:9091'}\n" + APP)
    assert check_config(str(path)) == 2
    assert "admin.token: required when admin.listen is not a loop" in capsys.readouterr().err

    def no_lookup(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a name looked up: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    settings, _ = load_settings(path, env={}, serving=False)
    assert settings.admin.token is None


async def test_a_reload_takes_the_admin_servers_name_at_the_addresses_of_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload asks no name service (it runs in the event loop): it is given the names
    the start resolved, so the admin server's name the start took as loopback is still
    taken so, not refused as wanting a token."""
    path = write(tmp_path, "admin: {listen: 'ops.test:9091'}\n" + APP)
    hosts = ListenHosts(name_service(LOOPBACK_NAMES))
    settings, _ = load_settings(path, env={}, resolve=hosts)
    assert hosts.addresses == {"ops.test": (ipaddress.ip_address("127.0.0.1"),
                                            ipaddress.ip_address("::1"))}  # fmt: skip

    def no_lookup(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a name looked up: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    svc = Service(settings, path, metrics=Metrics(CollectorRegistry()), listen_hosts=hosts)
    path.write_text(path.read_text().replace("web.test", "www.test"))
    assert await svc.reload()
    assert svc.settings.apps[0].hosts == ["www.test"]
    # A name the start did not resolve is taken as before: not loopback.
    path.write_text("admin: {listen: 'pub.test:9091'}\n" + APP)
    with capture_logs() as logs:
        assert not await svc.reload()
    [rejected] = [e for e in logs if e["event"] == "config_reload_rejected"]
    assert "admin.token: required" in rejected["problems"][0], rejected


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
    (warning,) = (await fleet_check(api_settings(emulator.url, emulator.token))).warnings
    assert "app web: 1 machine(s) have Fly's own autostop/autostart on" in warning
    assert "autostop=suspend" in warning


async def test_check_config_says_when_it_could_not_check(
    refused_port: Callable[[], int],
) -> None:
    dead = f"http://127.0.0.1:{refused_port()}"
    found = await fleet_check(api_settings(dead, "t0ken-xyz-0123456789"), timeout_s=2)
    assert found.refused == []
    (warning,) = found.warnings
    assert warning.startswith("app web: could not check Fly's autostop/autostart")
    static = api_settings(dead, "t0ken-xyz-0123456789", backends=["127.0.0.1:1"])
    assert await fleet_check(static) == FleetCheck()  # nothing scaled, nothing to ask
    embedded = Settings.model_validate({"apps": [{"name": "web"}]})
    autostop, lacking = (await fleet_check(embedded)).warnings
    assert "not checked" in autostop
    # An app the embedded emulator will not have: every call for it a 404.
    assert lacking.startswith("app web: not in emulator.apps, so the embedded emulator has")
    embedded = Settings.model_validate(
        {"apps": [{"name": "web"}], "emulator": {"apps": [{"name": "web"}]}}
    )
    (line,) = (await fleet_check(embedded)).warnings
    assert "not checked" in line


def test_check_config_prints_the_warnings_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], refused_port: Callable[[], int]
) -> None:
    dead = f"http://127.0.0.1:{refused_port()}"
    token = "t0ken-xyz-0123456789"
    path = write(tmp_path, f"fly: {{api_url: '{dead}', max_retries: 0, token: {token}}}\n" + APP)
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


def test_the_example_fly_toml_has_the_proxy_listen_where_flys_proxy_reaches_it() -> None:
    """Fly's proxy reaches a machine's services over its private IPv4 address; the
    example listened on [::]:8080, which the proxy then bound IPv6 alone (asyncio's
    IPV6_V6ONLY; it binds [::] dual stack now), where no client request would have come."""
    fly = tomllib.loads((REPO / "config" / "fly.toml.example").read_text())
    env = {k: str(v) for k, v in fly["env"].items()}
    settings, _ = load_settings(
        REPO / fly["files"][0]["local_path"],
        env={**env, "AUTOSCALER_ADMIN__TOKEN": "t0ken-xyz-0123456789"},
    )
    assert settings.proxy.listen == f"0.0.0.0:{fly['http_service']['internal_port']}"


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


@pytest.mark.parametrize(
    ("environ", "where"),
    [
        ({"FLY_API_TOKEN": "x"}, "environment: FLY_API_TOKEN"),
        ({"fly_api_token": "x"}, "{file}:2"),  # not read: config.py spells it so
        ({"autoscaler_fly__token": "x"}, "environment: AUTOSCALER_FLY__TOKEN"),  # any case
        ({"AUTOSCALER_FLY": '{"token": "x"}', "FLY_API_TOKEN": "x"}, "environment: AUTOSCALER_FLY"),
    ],
)
def test_a_refused_token_is_said_to_come_from_where_it_was_read(
    environ: dict[str, str], where: str, tmp_path: Path
) -> None:
    """A lowercase FLY_API_TOKEN, which the config does not read, was named as the
    refused token's source (the AUTOSCALER_ variables are read whatever their case); the
    file is named with the token's line, as a config error names it."""
    file = write(tmp_path, "fly:\n  token: t0ken-in-the-file-0123\n")
    assert origin(file, ("fly", "token"), environ) == where.format(file=file)


@pytest.mark.parametrize(
    ("environ", "source"),
    [
        ({"EMULATOR_TOKEN": "x"}, "the one given by $EMULATOR_TOKEN"),
        ({"emulator_token": "x"}, "emulator.token of the config file"),
        ({"autoscaler_emulator__token": "x"}, "the one given by $AUTOSCALER_EMULATOR__TOKEN"),
    ],
)
def test_the_emulator_says_where_its_token_was_read(environ: dict[str, str], source: str) -> None:
    assert token_source(None, environ) == source
