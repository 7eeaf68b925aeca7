"""Settings: file discovery, env overrides, durations, and one clear line per mistake."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from autoscaler.check import check_config, summary
from autoscaler.config import (
    MIN_TOKEN_CHARS,
    ConfigError,
    EmulatorSettings,
    Settings,
    load_settings,
    parse_duration,
    parse_host_port,
)
from autoscaler.emulator import Emulator

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("given", "seconds"),
    [(90, 90.0), (1.5, 1.5), ("90s", 90.0), ("5m", 300.0), ("1h", 3600.0), ("1m30s", 90.0),
     ("250ms", 0.25), ("12", 12.0), (" 2m ", 120.0), (".5", 0.5), (".5s", 0.5),
     ("1.s", 1.0), ("1e3", 1000.0), ("1e3s", 1000.0), ("1.5E-3h", 5.4), ("1m.5s", 60.5)],
)  # fmt: skip
def test_durations_accept_numbers_and_units(given: object, seconds: float) -> None:
    assert parse_duration(given) == seconds


@pytest.mark.parametrize(
    "given", ["5x", "m5", "1m 30s", "", "s", ".s", "1e", "1es", "e3s", "1..5s"]
)
def test_bad_durations_say_what_was_expected(given: str) -> None:
    with pytest.raises(ValueError, match="expected seconds or a duration"):
        parse_duration(given)


def test_host_port_forms() -> None:
    assert str(parse_host_port("127.0.0.1:8080")) == "127.0.0.1:8080"
    hp = parse_host_port("[::1]:9")
    assert (hp.host, hp.port, str(hp)) == ("::1", 9, "[::1]:9")
    for bad in ["8080", "host:", "host:99999", ":80", "host:0"]:  # port 0: nothing to reach
        with pytest.raises(ValueError, match="host:port"):
            parse_host_port(bad)
    assert parse_host_port("127.0.0.1:0", listen=True).port == 0  # a free one, at the bind
    good = ["localhost:80", "fly-local-6pn:8080", "my_host.internal.:1", "[::]:9", "::1:9"]
    assert [str(parse_host_port(g)) for g in good] == [
        "localhost:80", "fly-local-6pn:8080", "my_host.internal.:1", "[::]:9", "[::1]:9",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "listen", ["http://127.0.0.1:8080", "127.0.0.1 :8080", "web app:80", "-web:80", "[x]:80"]
)
def test_a_host_that_is_no_host_is_refused_naming_its_key(tmp_path: Path, listen: str) -> None:
    # A URL or a host with a space passed, and `run` failed after starting the emulator and
    # the admin server with "[Errno -2] Name or service not known", naming no key; a
    # backend failed every request routed to it.
    with pytest.raises(ValueError, match="host:port"):
        parse_host_port(listen)
    path = write(
        tmp_path, f"proxy: {{listen: '{listen}'}}\napps: [{{name: a, backends: ['{listen}']}}]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert [p.split(": ")[1] for p in info.value.problems] == ["proxy.listen", "apps[0].backends"]


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no config/autoscaler.yaml here
    settings, path = load_settings(env={})
    assert path == Path("config/autoscaler.yaml")
    assert settings.proxy.listen == "0.0.0.0:8080"
    assert settings.admin.listen == "127.0.0.1:9091"
    assert settings.fly.api_url is None
    assert settings.apps == []


def test_file_found_by_flag_then_env(tmp_path: Path) -> None:
    a = write(tmp_path, "proxy: {listen: 127.0.0.1:1111}", "a.yaml")
    b = write(tmp_path, "proxy: {listen: 127.0.0.1:2222}", "b.yaml")
    env = {"AUTOSCALER_CONFIG": str(b)}
    assert load_settings(a, env=env)[0].proxy.listen == "127.0.0.1:1111"
    assert load_settings(None, env=env)[0].proxy.listen == "127.0.0.1:2222"


def test_env_overrides_nested_keys_and_token(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "fly: {token: from-file-token-0123}\nproxy: {listen: 127.0.0.1:1}\n"
        "apps: [{name: web, hosts: [web.example.com]}]\n",
    )
    env = {
        "AUTOSCALER_PROXY__LISTEN": "0.0.0.0:8081",
        "AUTOSCALER_ADMIN__TOKEN": "admin-secret-0123456",
        "FLY_API_TOKEN": "env-fly-token-01234",
    }
    settings, _ = load_settings(path, env=env)
    assert settings.proxy.listen == "0.0.0.0:8081"
    assert settings.fly.token is not None
    assert settings.fly.token.get_secret_value() == "env-fly-token-01234"
    assert settings.admin.token is not None
    assert "env-fly-token-01234" not in repr(settings)
    assert "admin-secret-0123456" not in repr(settings)
    assert sorted(settings.secrets()) == ["admin-secret-0123456", "env-fly-token-01234"]
    # the file's token is used when the environment has none
    settings, _ = load_settings(path, env={})
    assert settings.fly.token is not None
    assert settings.fly.token.get_secret_value() == "from-file-token-0123"


def test_every_mistake_is_one_line_with_its_key_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
fly:
  tokn: abc
proxy:
  listen: nohost
apps:
  - name: a
    hosts: [a.example.com]
    min_machines: 3
    max_machines: 2
  - name: b
    hosts: [b.example.com]
    idle_to_zero_s: 5x
    target_concurency: 3
    scale_down_action: sleep
""",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    problems = info.value.problems
    # Each names its key's line in the file.
    assert f"{path}:10: apps[0].max_machines: must be >= min_machines (3), got 2" in problems
    assert f"{path}:3: fly.tokn: unknown key (did you mean 'token'?)" in problems
    assert any(p.startswith(f'{path}:5: proxy.listen: expected "host:port"') for p in problems)
    assert any(
        p.startswith(f"{path}:13: apps[1].idle_to_zero_s: expected seconds") and "'5x'" in p
        for p in problems
    )
    assert any(p.startswith(f"{path}:15: apps[1].scale_down_action:") for p in problems)
    assert any("'sleep'" in p for p in problems)
    assert any(p.startswith(f"{path}:14: apps[1].target_concurency: unknown key") for p in problems)
    assert len(problems) == 6


def test_pydantic_messages_that_say_what_they_got_read_as_ours(tmp_path: Path) -> None:
    # "Input should be ..." came through as pydantic wrote it when its message said what
    # it got, beside "input should be ..." for every other one.
    path = write(tmp_path, "apps:\n  - {name: a, max_machines: 2.5, min_machines: [1]}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert sorted(info.value.problems) == [
        f"{path}:2: apps[0].max_machines: input should be a valid integer, got a number with"
        " a fractional part",
        f"{path}:2: apps[0].min_machines: input should be a valid integer, got a list",
    ]


def test_a_tick_slower_than_the_idle_poll_names_both_keys_where_they_were_set(
    tmp_path: Path,
) -> None:
    # The line was "c.yaml:1: control: idle_poll_s: expected at least tick_s (300), got 60":
    # at the section's line, for a key the file did not have (its default).
    path = write(tmp_path, "control:\n  tick_s: 5m\napps: [{name: web}]\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.problems == [
        f"{path}:2: control.idle_poll_s: expected at least control.tick_s (300 at {path}:2),"
        " got 60, its default: set it too, or a shorter tick_s"
    ]
    path = write(tmp_path, "control:\n  idle_poll_s: 1\napps: [{name: web}]\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={"AUTOSCALER_CONTROL__TICK_S": "2"})
    assert info.value.problems == [
        f"{path}:2: control.idle_poll_s: expected at least control.tick_s (2 from environment:"
        " AUTOSCALER_CONTROL__TICK_S), got 1"
    ]


def test_cross_field_problems_name_their_key_all_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "proxy: {default_app: nope}\n"
        "apps:\n  - {name: a, hosts: [x.dev]}\n  - {name: b, hosts: [x.dev]}\n"
        "  - {name: a, hosts: [y.dev]}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.problems == [
        f"{path}:1: proxy.default_app: must name an app in apps, got 'nope'",
        f"{path}:4: apps[1].hosts: host 'x.dev' path '/' is already routed to app 'a'",
        f"{path}:5: apps[2].name: duplicate app name 'a'",
    ]


def test_apps_that_clash_are_reported_with_the_other_mistakes(tmp_path: Path) -> None:
    # A mistake inside one app stops the checks across apps from running on the whole;
    # they run again on the file's apps, each valid one with its routes, the others by
    # name, so that one pass lists everything.
    path = write(
        tmp_path,
        "apps:\n"
        "  - {name: web, hosts: [web.dev], keep_alive: adaptiv}\n"
        "  - {name: web, hosts: [api.dev]}\n"
        "  - {name: api, hosts: [API.dev]}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    problems = info.value.problems
    assert problems[0].startswith(f"{path}:2: apps[0].keep_alive: input should be")
    assert problems[1:] == [
        f"{path}:3: apps[1].name: duplicate app name 'web'",
        f"{path}:4: apps[2].hosts: host 'api.dev' path '/' is already routed to app 'web'",
    ]
    # The apps given in the environment are not the file's: nothing is said of those.
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={"AUTOSCALER_APPS": '[{"name": "x", "max_machines": -1}]'})
    assert not any("duplicate" in p or "already routed" in p for p in info.value.problems)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "apps:\n  - name: a\n    hosts: [a\n  bad: : :\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    (line,) = info.value.problems
    assert line.startswith(f"{path}:4:")
    assert "YAML syntax error" in line


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_secret_values_never_echoed_in_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "admin: {token: [not, a, string-s3cr3t]}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert "s3cr3t" not in str(info.value)
    assert "admin.token" in str(info.value)


def test_check_config_summary_lines_up_its_columns(tmp_path: Path) -> None:
    """Each app's hosts were written as long as they were, so what followed them (and the
    policy's fields after a longer machine range) started wherever that ended."""
    path = write(
        tmp_path,
        "apps:\n"
        "  - {name: demo, hosts: [demo, demo.localhost], max_machines: 10}\n"
        "  - {name: api, hosts: [api.example.com], paths: [/v1], keep_alive: adaptive}\n"
        "  - {name: web, hosts: [w], backends: ['127.0.0.1:9']}\n"
        "  - {name: x, hosts: ['*.x.test'], min_machines: 2, max_machines: 3}\n",
    )
    settings, _ = load_settings(path, env={})
    rows = [line for line in summary(settings) if line.startswith("  ")]
    assert len(rows) == 4
    hosts = ["demo, demo.localhost", "api.example.com paths /v1", "w", "*.x.test"]
    assert len({row.index(f"  {h}  ") for row, h in zip(rows, hosts, strict=True)}) == 1
    scaled = [row for row in rows if "static:" not in row]
    for field in ("machines", "target", "hard limit", "sleep:", "idle-to-zero|keep-alive"):
        assert len({re.search(field, row).start() for row in scaled}) == 1, (field, scaled)
    assert rows[2].index("static:") == rows[0].index("machines")
    assert rows[2].endswith("static: 127.0.0.1:9")


def test_check_config_warns_of_an_app_no_request_is_routed_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An app without hosts that is not proxy.default_app gets no request (the proxy routes
    by Host): check-config said OK and nothing else. A warning, not a refusal."""
    apps = (
        "apps: [{name: web, backends: ['127.0.0.1:9']},"
        " {name: api, hosts: [a], backends: ['127.0.0.1:9']}]\n"
    )
    assert check_config(str(write(tmp_path, apps))) == 0
    assert capsys.readouterr().err == (
        "warning: app web: no hosts, and not proxy.default_app, so no request is routed to"
        " it; give it apps[0].hosts, or make it proxy.default_app\n"
    )
    default = write(tmp_path, "proxy: {default_app: web}\n" + apps, "default.yaml")
    assert check_config(str(default)) == 0
    assert capsys.readouterr().err == ""


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, "apps: [{name: web, hosts: ['*.web.dev'], max_machines: 3}]\n")
    assert check_config(str(good), emulator=True) == 0  # as `run --emulator` starts on it
    out = capsys.readouterr().out
    assert "OK" in out
    assert "web" in out
    assert "*.web.dev" in out
    assert "idle-to-zero 300s" in out
    adaptive = write(
        tmp_path,
        "apps: [{name: web, keep_alive: adaptive, wake_cost_s: 60, idle_to_zero_s: 90}]\n",
        "adaptive.yaml",
    )
    assert check_config(str(adaptive), emulator=True) == 0
    out = capsys.readouterr().out
    assert "keep-alive adaptive (wake cost 60s, until learned 60s)" in out
    bad = write(tmp_path, "apps: [{name: web, min_machines: 5, max_machines: 1}]\n", "bad.yaml")
    assert check_config(str(bad)) == 2
    err = capsys.readouterr().err
    assert "apps[0].max_machines: must be >= min_machines (5), got 1" in err


@pytest.mark.parametrize("path", sorted((REPO / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_passes(path: Path) -> None:
    settings, _ = load_settings(path, env={})
    assert isinstance(settings, Settings)


def test_an_image_template_the_emulator_cannot_fill_is_refused(tmp_path: Path) -> None:
    """``{prt}`` for ``{port}``, or a quote left open: the template was taken as written,
    and each boot of a machine of that image failed ("machine ... failed to boot", no
    word of why). A shell's ``${VAR}`` is not a placeholder, nor a command's own braces
    (awk's ``{print}``), which were refused as one and ran before."""
    images = {
        "a": "{python} -m web --port {prt}",
        "b": "{python} -c 'print(1)",
        "ok": "{python} -m web --bind {host}:{port} --home ${HOME} --json '{\"k\": 1}'",
        # A command's own braces, which no placeholder is near: passed on as written.
        "awk": "sh -c 'yes | awk \"{print}\" >/dev/null & exec {python} -m web {port}'",
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, f"emulator: {{images: {json.dumps(images)}}}\n"), env={})
    (line,) = caught.value.problems
    assert "emulator.images: a: unknown placeholder {prt}" in line, line
    del images["a"]
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, f"emulator: {{images: {json.dumps(images)}}}\n"), env={})
    (line,) = caught.value.problems
    assert "emulator.images: b: expected a command line, got" in line, line
    del images["b"]
    ok = write(tmp_path, f"emulator: {{images: {json.dumps(images)}}}\n")
    settings, _ = load_settings(ok, env={})
    assert settings.emulator.images == images


async def test_an_image_template_word_a_letter_from_a_placeholder_is_taken_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``{sort}``, ``{post}``, ``{most}``, ``{hist}`` are a letter from ``{port}`` or
    ``{host}``, as a word a real command holds may be: they were refused as typos. They
    are passed on as written, and said (check-config, the emulator's start); a surer typo
    (a case changed, a letter dropped or doubled, two neighbours swapped) is refused."""
    words = "sort {sort} {post} {most} {hist} {hosts}"
    images = {"tool": f"sh -c 'echo {words}; exec {{python}} -m web {{port}}'"}
    path = write(tmp_path, f"emulator: {{images: {json.dumps(images)}}}\napps: [{{name: w}}]\n")
    settings, _ = load_settings(path, env={})
    assert settings.emulator.images == images
    (warning,) = settings.emulator.placeholder_warnings()
    assert warning.startswith("emulator.images: tool: {hist}, {hosts}, {most}, {post}, {sort}")
    assert "if it is one mistyped, every boot of a machine of this image fails" in warning
    assert await asyncio.to_thread(check_config, str(path), emulator=True) == 0
    assert f"warning: {warning}\n" in capsys.readouterr().err
    with capture_logs() as logs:
        async with Emulator(settings.emulator, host="127.0.0.1", port=0):
            pass
    assert [e["warning"] for e in logs if e["event"] == "emulator_image_placeholder_unsure"] == [
        warning
    ]
    for typo in ["{Port}", "{prt}", "{portt}", "{hsot}", "{pyhton}"]:
        bad = {"tool": f"{{python}} -m web --port {typo}"}
        with pytest.raises(ConfigError, match=f"tool: unknown placeholder {typo}"):
            load_settings(write(tmp_path, f"emulator: {{images: {json.dumps(bad)}}}\n"), env={})
    assert EmulatorSettings(images={"ok": "{python} -m web {port}"}).placeholder_warnings() == []


def test_emulator_token_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "emulator: {token: file-emu-token-0123}\n")
    settings, _ = load_settings(path, env={"EMULATOR_TOKEN": "env-emu-token-01234"})
    assert settings.emulator.token is not None
    assert settings.emulator.token.get_secret_value() == "env-emu-token-01234"
    assert "env-emu-token-01234" in settings.secrets()


def test_a_token_loses_the_newline_a_file_ends_with_and_bad_ones_are_refused(
    tmp_path: Path,
) -> None:
    # A YAML "|" block, or a token file read into FLY_API_TOKEN, ends with a newline: sent
    # as it is, every call failed with the header (token and all) in the error.
    path = write(
        tmp_path,
        "fly:\n  token: |\n    FlyV1 fm2_s3cr3t0123\nadmin: {token: ' adm1n-0123456789ab '}\n",
    )
    settings, _ = load_settings(path, env={})
    assert settings.fly.token is not None
    assert settings.fly.token.get_secret_value() == "FlyV1 fm2_s3cr3t0123"
    assert settings.admin.token is not None
    assert settings.admin.token.get_secret_value() == "adm1n-0123456789ab"
    settings, _ = load_settings(path, env={"FLY_API_TOKEN": "env-t0ken-0123456789\n"})
    assert settings.fly.token is not None
    assert settings.fly.token.get_secret_value() == "env-t0ken-0123456789"
    for bad in ['"in\\x01side-s3cr3t"', '"caf\\xe9-s3cr3t"']:
        with pytest.raises(ConfigError) as info:
            load_settings(write(tmp_path, f"fly: {{token: {bad}}}\n"), env={})
        (line,) = info.value.problems
        assert "fly.token: the token has characters an HTTP header cannot carry" in line
        assert "s3cr3t" not in line


@pytest.mark.parametrize("value", ['""', "'   '"])
def test_an_empty_admin_token_is_refused_not_taken_for_none(tmp_path: Path, value: str) -> None:
    # An empty token read as "no token" would open /status on 0.0.0.0 to the network.
    path = write(tmp_path, f"admin: {{listen: '0.0.0.0:9091', token: {value}}}\n")
    with pytest.raises(ConfigError, match=r"admin.token: expected a token, got an empty value"):
        load_settings(path, env={})
    with pytest.raises(ConfigError, match=r"admin.token: expected a token"):
        load_settings(write(tmp_path, "{}\n", "e.yaml"), env={"AUTOSCALER_ADMIN__TOKEN": ""})


def test_a_key_given_twice_is_an_error_naming_its_line(tmp_path: Path) -> None:
    # PyYAML keeps the last of two equal keys: the first value would be lost silently.
    text = "control: {tick_s: 2}\napps:\n  - name: web\n    min_machines: 2\n    min_machines: 0\n"
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env={})
    (line,) = info.value.problems
    assert line.endswith(":5:5: YAML error: found duplicate key 'min_machines'")
    text = "control: {tick_s: 2}\ncontrol: {idle_poll_s: 30}\n"
    with pytest.raises(ConfigError, match=r":2:1: YAML error: found duplicate key 'control'"):
        load_settings(write(tmp_path, text), env={})


def test_environment_mistakes_are_config_errors(tmp_path: Path) -> None:
    empty = write(tmp_path, "{}\n")
    # Not JSON where a list or a section is expected: a clear line, not a traceback.
    not_json = [("AUTOSCALER_APPS", "web"), ("AUTOSCALER_PROXY__TRUSTED_PROXIES", "1.2.3.4")]
    for name, value in not_json:
        with pytest.raises(ConfigError, match=r"^environment: .* is JSON"):
            load_settings(empty, env={name: value})
    # One underscore where two nest: the knob would keep its value without a word.
    with pytest.raises(ConfigError) as info:
        load_settings(
            empty, env={"AUTOSCALER_CONTROL_TICK_S": "2", "AUTOSCALER_FLY_TIMEOUT_S": "1"}
        )
    assert sorted(info.value.problems) == [
        "environment: AUTOSCALER_CONTROL_TICK_S: not a setting (did you mean"
        " AUTOSCALER_CONTROL__TICK_S? Two underscores nest)",
        "environment: AUTOSCALER_FLY_TIMEOUT_S: not a setting (did you mean"
        " AUTOSCALER_FLY__TIMEOUT_S? Two underscores nest)",
    ]
    # Variables of ours that are not settings stay allowed.
    load_settings(empty, env={"AUTOSCALER_EMULATOR_SESSION": "x", "AUTOSCALER_COMPILE": "1"})


@pytest.mark.parametrize(
    ("text", "key"),
    [("fly: {timeout_s: 0}", "fly.timeout_s"),
     ("proxy: {connect_timeout_s: 0}", "proxy.connect_timeout_s"),
     ("proxy: {upstream_timeout_s: 0}", "proxy.upstream_timeout_s"),
     ("proxy: {client_timeout_s: 0}", "proxy.client_timeout_s"),
     ("emulator: {boot_timeout_s: 0}", "emulator.boot_timeout_s"),
     ("control: {tick_s: .inf}", "control.tick_s"),
     ("apps: [{name: a, idle_to_zero_s: .nan}]", "apps[0].idle_to_zero_s"),
     ("emulator: {timing: {start_s: .nan}}", "emulator.timing.start_s"),
     ("emulator: {timing: {start_s: [1, .inf]}}", "emulator.timing.start_s"),
     ("emulator: {timing: {start_s: [.nan, .nan]}}", "emulator.timing.start_s"),
     ("apps: [{name: a, target_concurrency: 5.0e-324, target_utilization: 0.5}]",
      "apps[0].target_utilization"),
     ("apps: [{name: a, hard_limit: 1" + "0" * 400 + "}]", "apps[0].hard_limit")],
)  # fmt: skip
def test_timeouts_of_zero_and_seconds_not_finite_are_refused(
    tmp_path: Path, text: str, key: str
) -> None:
    # Each validated before and failed later: every API call timed out, every machine
    # start ended failed without a word, or a loop slept for good; and the last two, knobs
    # every decision of the app then raised on (the planned load per machine rounded to 0:
    # ZeroDivisionError; hard_limit overflowed a float).
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text + "\n"), env={})
    (line,) = info.value.problems
    assert line.split(": ", 1)[1].startswith(f"{key}: ")


def test_protect_metrics_without_an_admin_token_is_refused(tmp_path: Path) -> None:
    # Accepted before: the admin server had no token to require, so /metrics, the health
    # endpoints and /status all stayed open while the file asked for them to be guarded.
    path = write(tmp_path, "admin: {protect_metrics: true}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    (line,) = info.value.problems
    assert line.startswith(f"{path}:1: admin.protect_metrics: needs admin.token")
    token = "pr0tect-metrics-t0ken-value"
    settings, _ = load_settings(path, env={"AUTOSCALER_ADMIN__TOKEN": token})
    assert settings.admin.protect_metrics


@pytest.mark.parametrize(
    ("where", "key"),
    [("file", "admin.token"), ("file", "fly.token"), ("file", "emulator.token"),
     ("AUTOSCALER_ADMIN__TOKEN", "admin.token"), ("FLY_API_TOKEN", "fly.token"),
     ("EMULATOR_TOKEN", "emulator.token")],
)  # fmt: skip
def test_a_token_too_short_to_be_a_secret_is_refused(tmp_path: Path, where: str, key: str) -> None:
    # Taken before, and a token under 4 characters stayed in every log line and /status
    # (the redactor skipped it so as not to take ordinary words out of the lines).
    section, field = key.split(".")

    def load(token: str) -> Settings:
        if where == "file":
            return load_settings(write(tmp_path, f"{section}: {{{field}: {token}}}\n"), env={})[0]
        return load_settings(write(tmp_path, "{}\n"), env={where: token})[0]

    short = "a1b"  # found nowhere else in the message
    with pytest.raises(ConfigError) as info:
        load(short)
    (line,) = info.value.problems
    assert f"{key}: expected a token of at least {MIN_TOKEN_CHARS} characters" in line
    assert short not in line
    # One of the shortest length taken is a secret of the settings, and so redacted.
    enough = "k" * (MIN_TOKEN_CHARS - 3) + "2x9"
    assert enough in load(enough).secrets()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", "the file holds no settings: write {} to take every default"),
     ("# all commented out\n", "the file holds no settings"),
     ("null\n", "the file holds no settings"),
     ("1: 2\n", ":1:1: YAML error: found a key that is not a name: 1"),
     ("apps:\n  - name: a\n    true: 3\n", ":3:5: YAML error: found a key that is not a name"),
     (b"apps: [\xff\xfe]\n", "cannot read: not UTF-8 text (byte 8 is not UTF-8)"),
     (b"apps:\n  - name: a\x00b\n", ":2:12: YAML error: unacceptable character #x0000"),
     (b"\x1b[31mapps: []\n", ":1:1: YAML error: unacceptable character #x001b")],
)  # fmt: skip
def test_files_a_new_user_may_write_get_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | bytes, expected: str
) -> None:
    # An empty file was taken for every default (on a reload, a file caught half-written
    # removed every app); a key that is not a name, or a file that is not UTF-8, ended in
    # a traceback; so did a character YAML does not allow (a NUL, an escape).
    path = tmp_path / "c.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    (line,) = info.value.problems
    assert line.startswith(str(path))
    assert expected in line
    assert check_config(str(path)) == 2
    assert capsys.readouterr().err == line + "\n"


def test_yaml_merge_keys_work_and_a_key_given_twice_is_still_an_error(tmp_path: Path) -> None:
    # The loader that refuses a key given twice refused `<<: *anchor` too, with
    # "could not determine a constructor for the tag".
    text = (
        "apps:\n"
        "  - &web {name: web, hosts: [web.dev], max_machines: 3, idle_to_zero_s: 60}\n"
        "  - <<: *web\n"
        "    name: api\n"
        "    hosts: [api.dev]\n"
    )
    settings, _ = load_settings(write(tmp_path, text), env={})
    api = settings.app("api")
    assert (api.hosts, api.max_machines, api.idle_to_zero_s) == (["api.dev"], 3, 60)
    twice = text + "    hosts: [b.dev]\n"
    with pytest.raises(ConfigError, match=r":6:5: YAML error: found duplicate key 'hosts'"):
        load_settings(write(tmp_path, twice), env={})


def test_a_mistake_names_the_variable_or_flag_it_came_from(tmp_path: Path) -> None:
    # A value from the environment was reported as the file's: the user looked for a key
    # the file does not have.
    path = write(tmp_path, "apps:\n  - {name: web, hosts: [web.dev]}\n")
    env = {
        "AUTOSCALER_ADMIN__PROTECT_METRICS": "maybe",
        "AUTOSCALER_CONTROL": '{"tick_s": -1}',
        "FLY_API_TOKEN": "q9z",
    }
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=env, overrides={"proxy": {"listen": "nope"}})
    problems = sorted(info.value.problems)
    assert [p.split(": ", 2)[:2] for p in problems] == [
        ["command line", "proxy.listen"],
        ["environment", "AUTOSCALER_ADMIN__PROTECT_METRICS"],
        ["environment", "AUTOSCALER_CONTROL"],
        ["environment", "FLY_API_TOKEN"],
    ]
    assert "q9z" not in "\n".join(problems)
    # A list or a section that is not JSON: the variable, not only its section.
    env = {"AUTOSCALER_PROXY__TRUSTED_PROXIES": "10.0.0.1", "AUTOSCALER_PROXY__LISTEN": "x:1"}
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=env)
    (line,) = info.value.problems
    assert line.startswith("environment: AUTOSCALER_PROXY__TRUSTED_PROXIES: expected JSON")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("fly: {secret}\n", "fly: expected a mapping of keys (key: value), got a string"),
     ("admin: {secret}\n", "admin: expected a mapping of keys (key: value), got a string"),
     ("cluster: {{redis_url: [{secret}]}}\n", "cluster.redis_url: input should be a valid"
      " string, got <redacted>"),
     ("cluster: {{redis_url: 'redis://:{secret}@127.0.0.1:6379/0', lease_ttl_s: [{secret}]}}\n",
      "cluster.lease_ttl_s: input should be a valid number, got a list"),
     ("fly: {{token: {secret}, timeout_s: {{t: {secret}}}}}\n",
      "fly.timeout_s: input should be a valid number, got a mapping")],
)  # fmt: skip
def test_a_secret_in_the_wrong_place_is_not_echoed(
    tmp_path: Path, text: str, expected: str
) -> None:
    # pydantic's message showed the value: the token itself when it went under `fly:`
    # rather than `fly.token`, a Redis URL with its password, a list holding a token.
    secret = "s3cr3t-v4lue-0123456789"
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text.format(secret=secret)), env={})
    (line,) = info.value.problems
    assert line.endswith(expected)
    assert secret not in line


@pytest.mark.parametrize(
    "token",
    [
        "FlyV1 fm2_lJPECAAAAAAAAMz2xBCJm7bnxAv1VVYWg/4qc3zpwrVodHRwczovL2FwaS5mbHkuaW8vdjGU,fm2_x",
        "fo1_8sXzNcXm7KTxZdgpQk4sNX2y3JvVe1pM0BqkPq2qWyA",
    ],
    ids=["macaroon", "personal"],
)
def test_a_fly_token_pasted_into_another_field_is_not_echoed(tmp_path: Path, token: str) -> None:
    # fly.api_url is not a secret field: its error showed the value, here the token.
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, f"fly: {{api_url: '{token}'}}\n"), env={})
    (line,) = info.value.problems
    assert "fly.api_url" in line
    assert "<redacted: a Fly token?>" in line
    assert token.split()[-1][:12] not in line


def test_an_empty_section_takes_its_defaults(tmp_path: Path) -> None:
    # Every key of a section commented out leaves YAML's null, which was refused
    # ("expected a mapping of keys (key: value), got nothing").
    path = write(
        tmp_path,
        "fly:\n  # api_url: https://api.machines.dev\n"
        "proxy:\n"
        "control:\n"
        "emulator:\n  faults:\n  timing:\n  images:\n"
        "  apps:\n    - name: web\n      env:\n"
        "apps:\n  - name: web\n",
    )
    lists = write(
        tmp_path,
        "proxy:\n  trusted_proxies:\n"
        "apps:\n  - name: web\n    hosts:\n      # - web.example.com\n    paths:\n",
        name="lists.yaml",
    )
    settings, _ = load_settings(path, env={"FLY_API_TOKEN": "t" * MIN_TOKEN_CHARS})
    defaults = Settings.model_validate({})
    assert settings.fly.api_url is None
    assert settings.fly.token is not None  # the environment's token joins the empty section
    assert settings.proxy == defaults.proxy
    assert settings.control == defaults.control
    assert settings.emulator.faults == defaults.emulator.faults
    assert settings.emulator.timing == defaults.emulator.timing
    assert settings.emulator.images == defaults.emulator.images
    assert settings.emulator.apps[0].env == {}
    assert [app.name for app in settings.apps] == ["web"]
    # So does an empty list whose default is empty (every entry commented out).
    settings, _ = load_settings(lists, env={})
    assert settings.proxy.trusted_proxies == defaults.proxy.trusted_proxies
    assert (settings.apps[0].hosts, settings.apps[0].paths) == ([], [])


def test_an_empty_section_with_required_keys_names_them(tmp_path: Path) -> None:
    path = write(tmp_path, "apps:\n  -\n  - name: web\nemulator:\n  apps:\n    -\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert sorted(info.value.problems) == [
        f"{path}:2: apps[0]: empty, but it needs name (key: value)",
        f"{path}:6: emulator.apps[0]: empty, but it needs name (key: value)",
    ]


def test_yes_no_on_off_are_no_numbers(tmp_path: Path) -> None:
    # YAML reads them as true and false, which were taken for 1 and 0:
    # `stop_suspended_after_s: off` stopped each machine as soon as it was suspended.
    path = write(
        tmp_path,
        "control: {tick_s: yes}\n"
        "emulator: {faults: {error_rate: on}, apps: [{name: a, machines: yes}]}\n"
        "apps:\n"
        "  - {name: web, stop_suspended_after_s: off, max_machines: yes, restart_failed: no}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert sorted(p.split(": ")[1] for p in info.value.problems) == [
        "apps[0].max_machines",
        "apps[0].stop_suspended_after_s",
        "control.tick_s",
        "emulator.apps[0].machines",
        "emulator.faults.error_rate",
    ]
    line = f"{path}:4: apps[0].stop_suspended_after_s: expected seconds or a duration like"
    assert any(p.startswith(line) for p in info.value.problems)
    # Where the true or false came from, and what to do instead.
    hint = " (YAML reads yes, no, on and off as true and false: give a number, or leave the key"
    assert all(
        f"got 'true'{hint}" in p or f"got 'false'{hint}" in p for p in info.value.problems
    ), info.value.problems


def test_an_item_of_a_list_set_by_a_variable_is_refused_naming_the_variable(
    tmp_path: Path,
) -> None:
    # AUTOSCALER_APPS__0__NAME made `apps` a mapping, and the error named the file's line
    # of `apps` ("c.yaml:1: apps: input should be a valid list, got a mapping").
    path = write(tmp_path, "apps:\n  - {name: web}\n")
    env = {"AUTOSCALER_APPS__0__NAME": "api", "AUTOSCALER_PROXY__TRUSTED_PROXIES__0": "10.0.0.1"}
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=env)
    assert sorted(info.value.problems) == [
        "environment: AUTOSCALER_APPS__0__NAME: apps is a list, set whole as JSON by"
        " AUTOSCALER_APPS (an item cannot be set alone)",
        "environment: AUTOSCALER_PROXY__TRUSTED_PROXIES__0: proxy.trusted_proxies is a list,"
        " set whole as JSON by AUTOSCALER_PROXY__TRUSTED_PROXIES (an item cannot be set alone)",
    ]


def test_a_name_fly_would_refuse_for_an_app_is_an_error_naming_its_key(tmp_path: Path) -> None:
    # Fly app names are lowercase letters, digits and dashes (docs/fly-api-notes.md):
    # "Web App!" passed check-config, and every call of the controller for it would fail.
    longest = "a" * 63
    path = write(
        tmp_path,
        f"apps:\n  - name: web\n  - name: {longest}\n  - name: 'Web App!'\n"
        "  - {name: -api, max_machines: 0}\n  - name: my-app-2\n"
        "emulator:\n  apps:\n    - name: web\n    - name: Api_1\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    rule = (
        "expected a Fly app name: 1-63 lowercase letters, digits and dashes (not starting or"
        " ending with a dash), got"
    )
    assert sorted(info.value.problems) == [
        f"{path}:10: emulator.apps[1].name: {rule} 'Api_1'",
        f"{path}:4: apps[2].name: {rule} 'Web App!'",
        f"{path}:5: apps[3].max_machines: input should be greater than or equal to 1, got 0",
        f"{path}:5: apps[3].name: {rule} '-api'",
    ]
    good = write(tmp_path, f"apps:\n  - name: web\n  - name: {longest}\n", "good.yaml")
    assert [a.name for a in load_settings(good, env={})[0].apps] == ["web", longest]
    for name in [longest + "a", "web-", "WEB", "web.app", "web_app"]:
        bad = write(tmp_path, f"apps:\n  - name: web\n  - name: {name}\n", "bad.yaml")
        with pytest.raises(ConfigError) as info:
            load_settings(bad, env={})
        assert info.value.problems == [f"{bad}:3: apps[1].name: {rule} {name!r}"]
    env = {"AUTOSCALER_APPS": '[{"name": "Web"}]'}
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "{}\n", "e.yaml"), env=env)
    assert info.value.problems == [f"environment: AUTOSCALER_APPS: apps[0].name: {rule} 'Web'"]


def test_a_static_apps_name_is_no_fly_app_name_and_may_be_any(tmp_path: Path) -> None:
    """A static app (backends) has no Fly app: nothing of Fly ever sees its name, which
    the Fly rule refused all the same (a config that ran before, name: Legacy_Site, no
    longer started). Made scaled (its backends gone), it is a Fly app name again."""
    static = "{name: Legacy_Site, hosts: [old.test], backends: ['127.0.0.1:9']}"
    path = write(tmp_path, f"apps:\n  - {static}\n")
    assert [a.name for a in load_settings(path, env={})[0].apps] == ["Legacy_Site"]
    scaled = write(tmp_path, "apps:\n  - {name: Legacy_Site, hosts: [old.test]}\n", "s.yaml")
    with pytest.raises(ConfigError) as info:
        load_settings(scaled, env={})
    [problem] = info.value.problems
    assert problem.startswith(f"{scaled}:2: apps[0].name: expected a Fly app name")


# --- two servers of one process on one address ----------------------------------------

_TOKEN = "admin-t0ken-0123456789"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("proxy: {listen: '127.0.0.1:9091'}\n",
         "proxy.listen: 127.0.0.1:9091 is admin.listen's address too (127.0.0.1:9091, its"
         " default)"),
        ("proxy: {listen: 'localhost:9091'}\n",
         "proxy.listen: localhost:9091 is admin.listen's address too (127.0.0.1:9091, its"
         " default; localhost is 127.0.0.1)"),
        ("proxy: {listen: '0.0.0.0:9091'}\n",
         "proxy.listen: 0.0.0.0:9091 is admin.listen's address too (127.0.0.1:9091, its"
         " default; 0.0.0.0 is every IPv4 address of this host)"),
        (f"proxy: {{listen: '[::1]:9091'}}\nadmin: {{listen: '[::]:9091', token: {_TOKEN}}}\n",
         "proxy.listen: [::1]:9091 is admin.listen's address too ([::]:9091 at {path}:2; :: is"
         " every IPv4 and IPv6 address of this host)"),
        # [::] is bound dual stack: it takes the IPv4 addresses too.
        ("proxy: {listen: '[::]:9091'}\n",
         "proxy.listen: [::]:9091 is admin.listen's address too (127.0.0.1:9091, its default;"
         " :: is every IPv4 and IPv6 address of this host)"),
        (f"proxy: {{listen: '0.0.0.0:9091'}}\nadmin: {{listen: '[::]:9091', token: {_TOKEN}}}\n",
         "proxy.listen: 0.0.0.0:9091 is admin.listen's address too ([::]:9091 at {path}:2; :: is"
         " every IPv4 and IPv6 address of this host)"),
        # The embedded emulator's, when it runs: fly.api_url embedded (or --emulator), or
        # unset with an app to scale (the demo; `run` wants --emulator then).
        ("fly: {api_url: embedded}\nproxy: {listen: '127.0.0.1:4280'}\n",
         "proxy.listen: 127.0.0.1:4280 is emulator.listen's address too (127.0.0.1:4280, its"
         " default)"),
        ("apps: [{name: web}]\nadmin: {listen: '127.0.0.1:4280'}\n",
         "admin.listen: 127.0.0.1:4280 is emulator.listen's address too (127.0.0.1:4280, its"
         " default)"),
    ],
)  # fmt: skip
def test_two_servers_on_one_address_are_refused_naming_both_keys(
    tmp_path: Path, text: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check-config` said OK and `run` failed to start: "address in use". The line
    starts with where the first key was set, and says where the other's value is from."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    (line,) = info.value.problems
    assert line.startswith(f"{path}:"), line
    assert problem.format(path=path) in line
    assert line.endswith(": the second of the two servers could not listen; give each its own port")
    apps = "" if "apps:" in text else "apps: [{name: web}]\n"
    checked = write(tmp_path, text + apps, "d.yaml")
    assert check_config(str(checked)) == 2
    assert problem.format(path=checked) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "overrides", "line"),
    [
        ({"AUTOSCALER_ADMIN__LISTEN": "127.0.0.1:9300"}, {},
         "{path}:2: proxy.listen: 127.0.0.1:9300 is admin.listen's address too (127.0.0.1:9300"
         " from environment: AUTOSCALER_ADMIN__LISTEN)"),
        ({}, {"admin": {"listen": "127.0.0.1:9300"}},
         "{path}:2: proxy.listen: 127.0.0.1:9300 is admin.listen's address too (127.0.0.1:9300"
         " from the command line)"),
        ({"AUTOSCALER_PROXY__LISTEN": "127.0.0.1:9301"}, {},
         "environment: AUTOSCALER_PROXY__LISTEN: proxy.listen: 127.0.0.1:9301 is admin.listen's"
         " address too (127.0.0.1:9301 at {path}:4)"),
    ],
    ids=["other-from-the-environment", "other-from-the-command-line", "first-from-the-environment"],
)  # fmt: skip
def test_a_clash_names_where_each_of_the_two_keys_was_set(
    tmp_path: Path, env: dict[str, str], overrides: dict[str, Any], line: str
) -> None:
    """Two listen addresses that clash, one set in the file and the other by an
    environment variable (or the command line): the line pointed at the first key's
    origin alone (the file's line), and the reader looked for the other in the file."""
    path = write(tmp_path, "proxy:\n  listen: 127.0.0.1:9300\nadmin:\n  listen: 127.0.0.1:9301\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=env, overrides=overrides)
    (problem,) = info.value.problems
    assert problem.startswith(line.format(path=path)), problem


def test_a_clash_from_the_command_line_says_so() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env={}, overrides={"proxy": {"listen": "127.0.0.1:9091"}})
    (line,) = info.value.problems
    assert line.startswith("command line: proxy.listen: 127.0.0.1:9091 is admin.listen's")


def test_what_is_no_clash(tmp_path: Path) -> None:
    """Port 0 picks a free port at each bind (the tests' servers): two never meet. Nor do
    other addresses on one port, 0.0.0.0 and an IPv6 address, a name that resolves to ::
    and an IPv4 address (a name is bound as create_server does, IPv6 only; [::] written
    so is dual stack), or a server and an emulator that does not run."""
    from autoscaler.config import HostPort, listen_overlap

    assert listen_overlap(HostPort("127.0.0.1", 0), HostPort("127.0.0.1", 0)) is None
    assert listen_overlap(HostPort("0.0.0.0", 0), HostPort("127.0.0.1", 0)) is None
    assert listen_overlap(HostPort("0.0.0.0", 1), HostPort("::1", 1)) is None
    any6 = {"any6.test": [ipaddress.IPv6Address("::")]}
    assert listen_overlap(HostPort("0.0.0.0", 1), HostPort("any6.test", 1), any6) is None
    assert listen_overlap(HostPort("127.0.0.1", 1), HostPort("127.0.0.1", 1)) == ""
    for text in [
        "proxy: {listen: '127.0.0.2:9091'}\n",
        "proxy: {listen: '[::1]:9091'}\n",
        f"proxy: {{listen: '0.0.0.0:9091'}}\nadmin: {{listen: '[::1]:9091', token: {_TOKEN}}}\n",
        f"proxy: {{listen: '0.0.0.0:9092'}}\nadmin: {{listen: '0.0.0.0:9091', token: {_TOKEN}}}\n",
        # No embedded emulator: the API is elsewhere, or every app is static.
        "fly: {api_url: 'http://127.0.0.1:9'}\nproxy: {listen: '127.0.0.1:4280'}\n",
        "apps: [{name: web, backends: ['127.0.0.1:9']}]\nproxy: {listen: '127.0.0.1:4280'}\n",
    ]:
        load_settings(write(tmp_path, text), env={})


def test_a_wake_timeout_of_0_is_refused_not_read_as_no_limit(tmp_path: Path) -> None:
    """0 was taken, and every request that needed a wake got its 504 at once: a reader of
    the config may well have meant "no limit", which there is not."""
    path = write(tmp_path, "apps:\n  - name: web\n    wake_timeout_s: 0\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.problems == [
        f"{path}:3: apps[0].wake_timeout_s: must be above 0 (how long a held request waits"
        " for a machine before its 504; 0 is not 'no limit', there is none), got 0"
    ]
    good = write(tmp_path, "apps:\n  - name: web\n    wake_timeout_s: 0.5\n", "good.yaml")
    assert load_settings(good, env={})[0].apps[0].wake_timeout_s == 0.5


def test_status_and_simulate_take_an_emulator_section_only_a_run_would_refuse(
    tmp_path: Path,
) -> None:
    """status and simulate (serving=False) neither start the emulator nor call Fly: an
    emulator.listen open to the network and app names Fly would refuse in emulator.apps
    were refused there too (exit 2), as the proxy's address and apps[].name no longer
    were. What runs it still refuses both."""
    path = write(tmp_path, "emulator: {listen: '0.0.0.0:4280', apps: [{name: My_App}]}\n")
    settings, _ = load_settings(path, env={}, serving=False)
    assert settings.emulator.listen == "0.0.0.0:4280"
    assert [a.name for a in settings.emulator.apps] == ["My_App"]
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    listen, name = caught.value.problems
    assert "emulator.listen: expected a loopback address" in listen, listen
    assert "emulator.apps[0].name: expected a Fly app name" in name, name
    # Still a host:port, still checked after a serving=False load (the flag does not stick).
    bad = write(tmp_path, "emulator: {listen: nowhere}\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"emulator\.listen: expected \"host:port\""):
        load_settings(bad, env={}, serving=False)
    with pytest.raises(ConfigError, match=r"emulator\.listen: expected a loopback"):
        load_settings(path, env={})


@pytest.mark.parametrize(
    "key", ["error_rate", "hang_rate", "host_unreachable_rate", "answer_lost_rate"]
)
def test_a_fault_rate_that_is_no_number_is_said_so(tmp_path: Path, key: str) -> None:
    # A NaN fails every bound, and was refused as "less than or equal to 1", sending the
    # reader after a value that is not too large.
    path = write(tmp_path, f"emulator: {{faults: {{{key}: .nan}}}}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    (line,) = info.value.problems
    assert f"emulator.faults.{key}: " in line
    assert "finite number" in line, line
    assert "less than" not in line


def test_problems_are_listed_in_the_files_order_after_the_command_lines(tmp_path: Path) -> None:
    """They came in the order of the settings' fields (control's before the apps', an
    app's by field), so a long file's were read jumping up and down."""
    path = write(
        tmp_path,
        "apps:\n"
        "  - name: web\n"
        "    max_machines: -1\n"
        "    idle_to_zero_s: abc\n"
        "  - {name: api, target_concurrency: 0}\n"
        "control: {tick_s: -2}\n",
    )
    env = {"AUTOSCALER_PROXY__MAX_CONNECTIONS": "-1"}
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=env)
    said = [p.partition(" input should")[0] for p in info.value.problems]
    assert [p.split(" expected")[0] for p in said] == [
        "environment: AUTOSCALER_PROXY__MAX_CONNECTIONS: proxy.max_connections:",
        f"{path}:3: apps[0].max_machines:",
        f"{path}:4: apps[0].idle_to_zero_s:",
        f"{path}:5: apps[1].target_concurrency:",
        f"{path}:6: control.tick_s:",
    ]
