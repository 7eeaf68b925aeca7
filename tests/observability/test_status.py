"""`autoscaler status`: the table, the address, the token, against a real admin server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from reliability.harness import live_service

import autoscaler.status
from autoscaler import __version__
from autoscaler.admin import AdminServer
from autoscaler.cli import main
from autoscaler.config import AdminSettings
from autoscaler.metrics import Metrics
from autoscaler.status import admin_url, ago, fetch_status, render, run_status, watch_status

from .fakes import FakeAppStatus, FakeClock, FakeController, FakeMachine

TOKEN = "status-admin-token-987"


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("127.0.0.1:9091", "http://127.0.0.1:9091"),
        ("0.0.0.0:9091", "http://127.0.0.1:9091"),
        # [::] is bound dual stack (aio.dual_stack): 127.0.0.1 reaches it, also in a
        # container without IPv6 loopback, where ::1 found nothing. A specific IPv6
        # address is asked at itself.
        ("[::]:9091", "http://127.0.0.1:9091"),
        ("[0::0]:9091", "http://127.0.0.1:9091"),
        ("[::1]:9000", "http://[::1]:9000"),
        ("[fd00::7]:9000", "http://[fd00::7]:9000"),
        ("http://localhost:9091/", "http://localhost:9091"),
        # /status itself, as the demo shows it, was asked for /status/status (404).
        ("http://127.0.0.1:9091/status", "http://127.0.0.1:9091"),
        ("https://ops.example/admin/status/", "https://ops.example/admin"),
        # A host named status (a service's name) is no /status path: it was cut to http:/.
        ("http://status", "http://status"),
        ("https://status/", "https://status"),
    ],
)
def test_admin_url(listen: str, url: str) -> None:
    assert admin_url(listen) == url


@pytest.mark.parametrize("admin", [None, "127.0.0.1:0"])
def test_an_admin_server_on_port_0_is_asked_at_the_port_it_logged(
    tmp_path: Path, admin: str | None
) -> None:
    """admin.listen may have port 0 (a free port, picked at its start): status cannot
    know which, and says where it is told (its admin_listening line), not that the address
    is no "host:port"."""
    config = tmp_path / "c.yaml"
    config.write_text("admin: {listen: '127.0.0.1:0'}\n")
    err = io.StringIO()
    assert run_status(admin, str(config), err=err) == 2
    where = "--admin" if admin else "admin.listen"
    assert err.getvalue() == (
        f"autoscaler status: {where}: port 0 is a free port picked when the admin server"
        " starts, got '127.0.0.1:0': give --admin the address its admin_listening line logged\n"
    )


@pytest.mark.parametrize(
    ("age", "text"),
    [
        (None, "never"),
        (0.25, "0.2s ago"),
        (59.9, "59.9s ago"),
        (61, "1m01s ago"),
        (7322, "2h02m ago"),
    ],
)
def test_ago(age: float | None, text: str) -> None:
    assert ago(age) == text


def test_render_a_table() -> None:
    doc = {
        "version": "1.0",
        "ready": False,
        "control_loop": True,
        "last_tick_age_s": 0.4,
        "apps": [
            {
                "app": "demo",
                "desired": 2,
                "started": 1,
                "panic": True,
                "last_reason": "panic: demand 30 over 2x capacity",
                "last_decision_age_s": 1.5,
                "last_tick_age_s": 0.4,
                "last_error": "API 503",
                "leased_by_others": ["m2"],
                "machines": [
                    {"id": "m-long-id-1", "state": "started", "cordoned": False,
                     "in_flight": 12, "last_used_age_s": 0.1},
                    {"id": "m2", "state": "suspended", "cordoned": True,
                     "in_flight": 0, "last_used_age_s": None},
                    {"id": "m3", "state": "failed", "cordoned": False, "in_flight": 0,
                     "last_used_age_s": None, "failures": 2, "next_retry_in_s": 3.6},
                    {"id": "m5", "state": "failed", "cordoned": False, "in_flight": 0,
                     "last_used_age_s": None, "failures": 1, "next_retry_in_s": 0.0},
                    {"id": "m4", "state": "failed", "cordoned": False, "in_flight": 0,
                     "last_used_age_s": None, "failures": 5, "left_alone": True},
                    {"id": "m6", "state": "started", "cordoned": False, "in_flight": 1,
                     "last_used_age_s": 30.0, "failing": 2, "hung": True},
                    {"id": "m7", "state": "started", "cordoned": False, "in_flight": 0,
                     "last_used_age_s": 5.0, "failing": 3, "hung": True, "hung_restarts": 3,
                     "next_retry_in_s": 120.4},
                    {"id": "m8", "state": "started", "cordoned": False, "in_flight": 0,
                     "last_used_age_s": 5.0, "failing": 2, "hung": True, "left_alone": True},
                    {"id": "m9", "state": "started", "cordoned": False, "in_flight": 0,
                     "last_used_age_s": 5.0, "failing": 2, "hung": True,
                     "host_unreachable": True},
                    {"id": "mA", "state": "suspended", "cordoned": False, "in_flight": 0,
                     "last_used_age_s": None, "host_unreachable": True},
                    {"id": "mB", "state": "started", "cordoned": False, "in_flight": 0,
                     "last_used_age_s": 2.0, "checks_critical_for_s": 42.4},
                    {"id": "mC", "state": "started", "cordoned": False, "in_flight": 0,
                     "last_used_age_s": 0.5, "checks_passed_on_recheck": ["healthz"]},
                    {"id": "mD", "state": "started", "cordoned": False, "in_flight": 0,
                     "last_used_age_s": 0.5, "checks_critical_unrouted": ["db"]},
                ],
            },
            {"app": "idle", "desired": 0, "started": 0, "panic": False, "last_reason": "",
             "last_decision_age_s": None, "last_tick_age_s": None, "last_error": None,
             "machines": []},
        ],
    }  # fmt: skip
    assert render(doc) == [
        "autoscaler 1.0: NOT READY, control loop ticked 0.4s ago",
        "",
        "demo: desired 2, started 1, panic yes, decided 1.5s ago",
        "  why: panic: demand 30 over 2x capacity",
        "  last error: API 503",
        "  skipped, leased by another holder: m2",
        "  MACHINE      STATE      CORDONED  IN FLIGHT  LAST USED  NOTE",
        "  m-long-id-1  started    no        12         0.1s ago",
        "  m2           suspended  yes       0          never",
        "  m3           failed     no        0          never      "
        "2 failed start(s), no restart for 4s",
        "  m5           failed     no        0          never      "
        "1 failed start(s), restarted when needed",
        "  m4           failed     no        0          never      "
        "left alone after 5 failed starts",
        "  m6           started    no        1          30.0s ago  "
        "hung (2 ejections in a row), restarted at the next tick",
        "  m7           started    no        0          5.0s ago   "
        "hung (3 ejections in a row), 3 restart(s) in a row, no restart for 120s",
        "  m8           started    no        0          5.0s ago   "
        "hung (2 ejections in a row), restarts are off",
        "  m9           started    no        0          5.0s ago   "
        "hung (2 ejections in a row), restarted once its host is reachable",
        "  mA           suspended  no        0          never      "
        "host unreachable: actions wait for it",
        "  mB           started    no        0          2.0s ago   Fly checks critical for 42s",
        "  mC           started    no        0          0.5s ago   "
        "Fly: healthz critical; our run since: passing",
        "  mD           started    no        0          0.5s ago   "
        "Fly: db critical (a monitoring check: still routed)",
        "",
        "idle: desired 0, started 0, panic no, decided never",
        "  (no machines)",
    ]


@pytest.fixture
async def admin() -> AsyncIterator[str]:
    clock = FakeClock()
    provider = FakeController(
        apps=[
            FakeAppStatus(
                app="demo",
                desired=1,
                last_reason="demand 3.0 needs 1 machine",
                last_decision_at=clock.now - 2,
                last_tick_at=clock.now,
                machines=[FakeMachine("m1", "started", in_flight=1, last_used=clock.now)],
            )
        ],
        last_tick_at=clock.now,
    )
    settings = AdminSettings(token=SecretStr(TOKEN))
    server = AdminServer(settings, Metrics(CollectorRegistry()), provider, clock=clock)
    await server.start(host="127.0.0.1", port=0)
    try:
        yield f"http://127.0.0.1:{server.address[1]}"
    finally:
        await server.stop()


def write_config(tmp_path: Path, token: str | None) -> str:
    path = tmp_path / "autoscaler.yaml"
    admin = f"admin:\n  token: {token}\n" if token else "{}\n"  # an empty file is refused
    path.write_text(admin)
    return str(path)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AUTOSCALER_ADMIN__TOKEN", "AUTOSCALER_ADMIN__LISTEN", "AUTOSCALER_CONFIG"):
        monkeypatch.delenv(name, raising=False)


async def test_status_prints_the_table(admin: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, TOKEN)
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(run_status, admin, config, out=out, err=err)
    assert code == 0, err.getvalue()
    text = out.getvalue()
    assert "demo: desired 1, started 1, panic no, decided 2.0s ago" in text
    assert "  why: demand 3.0 needs 1 machine" in text
    assert "  m1       started  no        1          0.0s ago" in text
    assert TOKEN not in text


async def test_status_json(admin: str, tmp_path: Path) -> None:
    out = io.StringIO()
    config = write_config(tmp_path, TOKEN)
    code = await asyncio.to_thread(run_status, admin, config, as_json=True, out=out)
    assert code == 0
    assert json.loads(out.getvalue())["apps"][0]["app"] == "demo"


async def test_token_from_the_environment(
    admin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOSCALER_ADMIN__TOKEN", TOKEN)
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(
        run_status, admin, write_config(tmp_path, None), out=out, err=err
    )
    assert code == 0, err.getvalue()


async def test_status_never_goes_through_a_proxy_named_by_the_environment(
    admin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """http_proxy in the environment: urlopen sent the request, admin token and all, to
    that proxy (and printed its 502)."""
    seen: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(4096))
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    out, err = io.StringIO(), io.StringIO()
    try:
        config = write_config(tmp_path, TOKEN)
        code = await asyncio.to_thread(run_status, admin, config, out=out, err=err)
    finally:
        server.close()
        await server.wait_closed()
    assert code == 0, err.getvalue()
    assert seen == []


async def test_missing_token_is_a_clear_error(admin: str, tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(
        run_status, admin, write_config(tmp_path, None), out=out, err=err
    )
    assert code == 1
    assert "HTTP 401 (set admin.token or AUTOSCALER_ADMIN__TOKEN)" in err.getvalue()
    assert out.getvalue() == ""


async def test_status_says_when_the_decisions_are_stale(tmp_path: Path) -> None:
    """Every app's list failing (the Machines API out of reach): the header said "ready,
    control loop ticked 8.9s ago" and nothing else; /readyz?control=1 said 503."""
    clock = FakeClock()
    provider = FakeController(
        apps=[FakeAppStatus(app="demo", last_tick_at=clock.now, last_error="HTTP 500")],
        last_tick_at=clock.now,
    )
    server = AdminServer(AdminSettings(), Metrics(CollectorRegistry()), provider, clock=clock)
    await server.start(host="127.0.0.1", port=0)
    try:
        url = f"http://127.0.0.1:{server.address[1]}"
        out, err = io.StringIO(), io.StringIO()
        code = await asyncio.to_thread(
            run_status, url, write_config(tmp_path, None), out=out, err=err
        )
    finally:
        await server.stop()
    assert code == 0, err.getvalue()
    assert out.getvalue().splitlines()[:2] == [
        f"autoscaler {__version__}: ready, control loop ticked 0.0s ago",
        "  control NOT HEALTHY (decisions are stale): Machines API unreachable: HTTP 500",
    ]


async def status_of_a_static_service(tmp_path: Path, asked: str) -> tuple[int, str, str]:
    """``autoscaler status`` (exit code, stdout, stderr) asked of a live service of one
    static app, at its ``asked`` address: "admin" or (a mistake) "proxy"."""
    file = tmp_path / "static.yaml"
    file.write_text("apps: [{name: web, hosts: [web.test], backends: ['127.0.0.1:9']}]\n")
    async with live_service(file, without_api=True) as svc:
        assert svc.admin is not None
        assert svc.proxy is not None
        port = svc.admin.address[1] if asked == "admin" else svc.proxy.port
        out, err = io.StringIO(), io.StringIO()
        code = await asyncio.to_thread(run_status, f"127.0.0.1:{port}", str(file), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


async def test_a_static_only_service_says_it_runs_no_control_loop(tmp_path: Path) -> None:
    """`autoscaler run` on config/static.yaml: the header said "control loop ticked never",
    as if a loop that should tick had not."""
    code, out, err = await status_of_a_static_service(tmp_path, "admin")
    assert code == 0, err
    header = out.splitlines()[0]
    assert header.endswith(": ready, no control loop (no app to scale)"), header
    # And the app it routes is there (it was left out: "no scaled apps", and nothing more).
    assert out.splitlines()[1:] == [
        "no scaled apps",
        "",
        "web: static (routed to its backends, not scaled), in flight 0, held 0, last request never",
        "  BACKEND      STATE    IN FLIGHT  LAST USED",
        "  127.0.0.1:9  started  0          never",
    ]


async def test_the_proxys_port_is_said_to_be_maybe_not_the_admin_server(tmp_path: Path) -> None:
    """`--admin` given the proxy's address (a mistake easily made: both are host:port) said
    "HTTP 404" and nothing else."""
    code, out, err = await status_of_a_static_service(tmp_path, "proxy")
    assert code == 1
    assert out == ""
    proxy = err.split("http://", 1)[1].split("/", 1)[0]
    assert err == (
        f"autoscaler status: http://{proxy}/status: HTTP 404 (nothing at /status: this may"
        " not be the autoscaler's admin server, which listens on admin.listen; the proxy's"
        " port answers 404)\n"
    )


async def test_a_wrong_token_is_not_called_missing(admin: str, tmp_path: Path) -> None:
    """A token that was sent and refused: the hint said to set the token, which was set."""
    out, err = io.StringIO(), io.StringIO()
    config = write_config(tmp_path, "not-the-admin-token-at-all")
    code = await asyncio.to_thread(run_status, admin, config, out=out, err=err)
    assert code == 1
    assert err.getvalue() == (
        f"autoscaler status: {admin}/status: HTTP 401 (the admin token sent was refused:"
        " not the server's admin.token)\n"
    )
    assert "not-the-admin-token-at-all" not in err.getvalue()


async def test_unreachable_admin(tmp_path: Path, refused_port: Callable[[], int]) -> None:
    url = f"http://127.0.0.1:{refused_port()}"  # bound, never listened on: refused
    err = io.StringIO()
    code = await asyncio.to_thread(run_status, url, write_config(tmp_path, None), err=err)
    assert code == 1
    # One line, which says what may be wrong (it did not: a new user was left guessing).
    [line] = err.getvalue().splitlines()
    assert line.startswith(f"autoscaler status: {url}/status: cannot connect: ")
    assert line.endswith(
        "refused (is `autoscaler run` running? name its admin server with --admin, or its"
        " config with --config)"
    )


def test_config_error_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("admin:\n  tokn: x\n")
    assert main(["status", "--config", str(path)]) == 2
    assert "admin.tokn: unknown key (did you mean 'token'?)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "given",
    ["http://[::1", "http://a b:9091", "nonsense", "http://127.0.0.1:99999", "http://h:x",
     "ftp://127.0.0.1:9091", "127.0.0.1 :9091"],
)  # fmt: skip
def test_a_bad_admin_address_is_a_usage_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], given: str
) -> None:
    """It exited 1, as if a good address had not answered, with "Invalid IPv6 URL" or
    "not a valid HTTP answer (InvalidURL)" and no word of which value was wrong."""
    path = tmp_path / "c.yaml"
    path.write_text("fly:\n  api_url: embedded\n")
    assert main(["status", "--admin", given, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoscaler status: --admin: expected "), err
    assert repr(given) in err


@pytest.mark.parametrize("given", ["", "  "])
async def test_an_empty_admin_is_a_usage_error_not_admin_listen(
    admin: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], given: str
) -> None:
    """`--admin ''` asked admin.listen instead (here a server that answers): a script
    whose variable was unset got another server's status, and exit 0."""
    path = tmp_path / "c.yaml"
    path.write_text(f"admin:\n  listen: {admin.removeprefix('http://')}\n  token: {TOKEN}\n")
    code = await asyncio.to_thread(main, ["status", "--admin", given, "--config", str(path)])
    assert code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "autoscaler status: --admin: empty: give the admin server's URL or host:port, or"
        " leave --admin out to ask admin.listen\n"
    )
    code = await asyncio.to_thread(main, ["status", "--config", str(path)])
    assert code == 0
    assert "demo: desired 1" in capsys.readouterr().out


async def test_a_file_run_would_refuse_still_names_the_admin_server(
    admin: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """status listens on nothing and calls no Fly API: what only the running process needs
    (its proxy and admin server on one address, app names Fly takes) stopped it (exit 2)
    from asking admin.listen, the one address it reads."""
    listen = admin.removeprefix("http://")
    path = tmp_path / "c.yaml"
    path.write_text(
        f"proxy: {{listen: '{listen}'}}\nadmin: {{listen: '{listen}', token: {TOKEN}}}\n"
        "apps: [{name: Web_App}]\n"
    )
    code = await asyncio.to_thread(main, ["status", "--config", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "demo: desired 1" in out


async def test_cli_entry(admin: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, TOKEN)
    argv = ["status", "--admin", admin.removeprefix("http://"), "--config", config]
    code = await asyncio.to_thread(main, argv)
    assert code == 0
    assert "demo: desired 1" in capsys.readouterr().out


async def test_watch_redraws_the_table_every_interval(admin: str) -> None:
    out = io.StringIO()
    naps: list[float] = []
    first = {"version": "x", "ready": True, "apps": []}
    code = await asyncio.to_thread(
        watch_status, admin, TOKEN, first, out=out, frames=3, terminal=False, sleep=naps.append
    )
    assert code == 0
    assert naps == [1.0, 1.0]
    text = out.getvalue()
    assert text.count("autoscaler x: ready") == 1  # the first draw is the status given
    assert text.count("demo: desired 1, started 1") == 2  # then fetched again each time
    assert "\x1b[" not in text


async def test_watch_json_prints_one_document_per_line(admin: str) -> None:
    out = io.StringIO()
    first = {"apps": []}
    code = await asyncio.to_thread(
        watch_status, admin, TOKEN, first, as_json=True, out=out, frames=2, sleep=lambda _: None
    )
    assert code == 0
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert docs[0] == first
    assert docs[1]["apps"][0]["app"] == "demo"


async def test_watch_on_a_terminal_draws_the_live_view(admin: str) -> None:
    out = io.StringIO()
    first = await asyncio.to_thread(fetch_status, admin, TOKEN)
    code = await asyncio.to_thread(
        watch_status, admin, TOKEN, first, out=out, frames=2, terminal=True, sleep=lambda _: None
    )
    assert code == 0
    screen = out.getvalue()
    assert "\x1b[?1049h" in screen  # the alternate screen, left again at the end
    assert "\x1b[?1049l" in screen
    assert "demo" in screen
    assert "req/s" in screen
    assert "m1" in screen
    assert "started" in screen
    assert "demand 3.0 needs 1 machine" in screen
    assert TOKEN not in screen


async def test_watch_keeps_going_when_the_admin_server_goes_away(
    refused_port: Callable[[], int],
) -> None:
    url = f"http://127.0.0.1:{refused_port()}"  # as once it went: nothing listens there
    out = io.StringIO()
    code = await asyncio.to_thread(
        watch_status, url, None, {"apps": []}, out=out, frames=2, terminal=False,
        sleep=lambda _: None,
    )  # fmt: skip
    assert code == 0
    assert "autoscaler status: " in out.getvalue()
    assert "cannot connect" in out.getvalue()


async def test_the_token_does_not_follow_a_redirect(tmp_path: Path) -> None:
    # urllib passes headers added with add_header on to wherever a redirect points.
    from aiohttp import web

    seen: list[str | None] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"apps": []})

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.1:{other[1]}/status")

    runners = []
    for handler in (elsewhere, redirect):
        app = web.Application()
        app.router.add_get("/status", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
    other = runners[0].addresses[0]
    first = runners[1].addresses[0]
    try:
        err = io.StringIO()
        await asyncio.to_thread(
            run_status, f"http://127.0.0.1:{first[1]}", write_config(tmp_path, TOKEN), err=err
        )
    finally:
        for runner in runners:
            await runner.cleanup()
    assert seen == [None]


async def test_a_reader_that_stops_reading_ends_the_watch_without_a_traceback(
    admin: str, tmp_path: Path
) -> None:
    """`autoscaler status --watch --json | head -1`: once head exits, the next frame's
    write fails (EPIPE); that ends the command quietly, not with a BrokenPipeError."""
    config = write_config(tmp_path, TOKEN)
    read_end, write_end = os.pipe()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "autoscaler", "status", "--watch", "--json",
        "--admin", admin, "--config", config,
        stdout=write_end,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    os.close(write_end)
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(20):
            assert await asyncio.to_thread(os.read, read_end, 1 << 16)  # the first frame
            os.close(read_end)  # the reader goes away
            read_end = -1
            err = (await proc.stderr.read()).decode()
            code = await proc.wait()
    finally:
        if read_end != -1:
            os.close(read_end)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "Traceback" not in err, err
    assert code == 1


# --- servers that answer badly ------------------------------------------------------------

Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def answering(answer: Answer) -> AsyncIterator[str]:
    """A server on loopback that reads one request's head, then runs ``answer``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await answer(writer)
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client gave up first
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def sends(data: bytes) -> Answer:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return answer


def json_answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


async def ask(url: str, tmp_path: Path, timeout_s: float = 5.0) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    config = write_config(tmp_path, TOKEN)
    code = await asyncio.to_thread(run_status, url, config, timeout_s=timeout_s, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (b"hello\r\n\r\n", "not a valid HTTP answer (BadStatusLine)"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", "(LineTooLong)"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b'{"apps": [',
            "answer cut short (990 bytes missing)",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "answer cut short"),
        (json_answer(b"[" * 100_000), "expected JSON"),
        (
            json_answer(b"<html>my app</html>"),  # the proxy's port, with a default_app
            "expected JSON, got b'<html>my app</html>' (this may not be the autoscaler's"
            " admin server, which listens on admin.listen)",
        ),
        (json_answer(b'{"apps": [1]}'), "not a status document this client can show"),
        (
            json_answer(b'{"apps": [{"app": "a", "desired": 1, "started": 1, "panic": false,'
                        b' "machines": [{"id": "m1"}]}]}'),
            "not a status document this client can show (KeyError: 'state')",
        ),
    ],
    ids=[
        "not-http", "head-too-long", "cut-short", "bad-chunk", "deep-json", "an-app", "apps",
        "machine",
    ],
)  # fmt: skip
async def test_a_bad_answer_is_one_line_and_exit_1(
    answer: bytes, says: str, tmp_path: Path
) -> None:
    """Each of these was a traceback (http.client's exceptions are not OSErrors, json's
    RecursionError is not a ValueError, render() indexed what it was given)."""
    async with answering(sends(answer)) as url:
        code, out, err = await ask(url, tmp_path)
    assert code == 1
    assert out == ""
    assert err.startswith(f"autoscaler status: {url}/status: "), err
    assert says in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("where", ["head", "body"])
async def test_a_server_that_sends_a_byte_at_a_time_is_given_up_on(
    where: str, tmp_path: Path
) -> None:
    """The socket's timeout is per read: a server that sent a byte every 0.1 s held the
    command for as long as it went on (forever, for one that never stops)."""
    head = b"HTTP/1.1 200 OK\r\n"

    async def drip(writer: asyncio.StreamWriter) -> None:
        writer.write(head if where == "head" else head + b"\r\n{}")
        for _ in range(100):  # 10 s, twenty times the client's limit
            if writer.is_closing():
                return  # the client gave up
            writer.write(b"X-A: b\r\n" if where == "head" else b" ")
            await writer.drain()
            await asyncio.sleep(0.1)

    async with answering(drip) as url:
        code, _, err = await ask(url, tmp_path, timeout_s=0.5)
    assert code == 1
    assert f"{url}/status: no complete answer within 0.5s" in err


async def test_a_huge_answer_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer with no end (no Content-Length, never closed) was read into memory until
    there was none left."""
    monkeypatch.setattr(autoscaler.status, "MAX_ANSWER_BYTES", 1 << 20, raising=False)
    sent = b"HTTP/1.1 200 OK\r\n\r\n" + b" " * (2 << 20) + b"{}"
    async with answering(sends(sent)) as url:
        code, _, err = await ask(url, tmp_path)
    assert code == 1
    assert f"{url}/status: answer larger than 1048576 bytes" in err


@pytest.mark.parametrize("terminal", [False, True])
async def test_the_watch_goes_on_past_a_document_it_cannot_show(admin: str, terminal: bool) -> None:
    out = io.StringIO()
    code = await asyncio.to_thread(
        watch_status, admin, TOKEN, {"apps": [1]}, out=out, frames=2, terminal=terminal,
        sleep=lambda _: None,
    )  # fmt: skip
    assert code == 0
    assert "not a status document this client can show" in out.getvalue()
    assert "demo" in out.getvalue()  # the next answer is drawn
