"""The admin server against a fake controller: endpoints, readiness, the token guard; and
against a live service, what a reload changes in /status and in the stalled-loop limit."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from reliability.harness import live_service
from testkit import until

from autoscaler.admin import AdminServer, StatusProvider
from autoscaler.config import AdminSettings, AppConfig, EmulatorApp, Settings
from autoscaler.control.view import FleetView
from autoscaler.emulator import Emulator
from autoscaler.fly.errors import Unauthorized
from autoscaler.metrics import Metrics
from autoscaler.proxy.server import _static_machines

from .fakes import FakeAppStatus, FakeClock, FakeController, FakeMachine

TOKEN = "admin-secret-token-1234"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]

# The fake must satisfy the Protocol the real controller is held to (checked by mypy).
_static_check: StatusProvider = FakeController()


def make_server(
    provider: FakeController | None,
    clock: FakeClock,
    *,
    token: str | None = None,
    protect_metrics: bool = False,
) -> AdminServer:
    settings = AdminSettings(
        listen="127.0.0.1:9091",
        token=SecretStr(token) if token else None,
        protect_metrics=protect_metrics,
    )
    metrics = Metrics(CollectorRegistry(), version="1.2.3")
    return AdminServer(
        settings, metrics, provider, tick_s=1.0, clock=clock, wall_clock=lambda: 50_000.0
    )


def demo_controller(clock: FakeClock) -> FakeController:
    apps = [
        FakeAppStatus(
            app="demo",
            desired=2,
            panic=True,
            last_reason="demand 25.0 > 2x capacity: panic",
            last_decision_at=clock.now - 0.5,
            last_tick_at=clock.now - 0.25,
            machines=[
                FakeMachine(
                    "m1",
                    "started",
                    in_flight=3,
                    last_used=clock.now - 1.0,
                    checks_passed_on_recheck=("healthz",),
                ),
                FakeMachine("m2", "suspended", cordoned=True, checks_critical_unrouted=("db",)),
                FakeMachine("m3", "failed", failures=2, next_retry_at=clock.now + 4.0),
            ],
            leased_by_others=["m2"],
        )
    ]
    return FakeController(apps=apps, last_tick_at=clock.now - 0.25)


async def test_metrics_are_open_and_in_text_format(aiohttp_client: MakeClient) -> None:
    clock = FakeClock()
    server = make_server(demo_controller(clock), clock, token=TOKEN)
    server.metrics.proxy.answered("demo", 200, "none", 0.01)
    client = await aiohttp_client(server.build_app())
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    body = await resp.text()
    assert 'autoscaler_requests_total{app="demo",code="200",wake="none"} 1.0' in body
    assert 'autoscaler_build_info{version="1.2.3"} 1.0' in body
    assert TOKEN not in body


async def test_health_is_open_with_a_token(aiohttp_client: MakeClient) -> None:
    clock = FakeClock()
    client = await aiohttp_client(
        make_server(demo_controller(clock), clock, token=TOKEN).build_app()
    )
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200


async def test_protect_metrics_guards_metrics_and_health(aiohttp_client: MakeClient) -> None:
    clock = FakeClock()
    server = make_server(demo_controller(clock), clock, token=TOKEN, protect_metrics=True)
    client = await aiohttp_client(server.build_app())
    for path in ("/metrics", "/healthz", "/readyz"):
        resp = await client.get(path)
        assert resp.status == 401, path
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await client.get(path, headers=AUTH)).status == 200, path


async def test_status_needs_the_token(aiohttp_client: MakeClient) -> None:
    clock = FakeClock()
    client = await aiohttp_client(
        make_server(demo_controller(clock), clock, token=TOKEN).build_app()
    )
    assert (await client.get("/status")).status == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert (await client.get("/status", headers=wrong)).status == 401
    basic = {"Authorization": f"Basic {TOKEN}"}
    assert (await client.get("/status", headers=basic)).status == 401
    resp = await client.get("/status", headers=AUTH)
    assert resp.status == 200
    assert TOKEN not in await resp.text()


async def test_mutating_requests_need_the_token(aiohttp_client: MakeClient) -> None:
    clock = FakeClock()
    client = await aiohttp_client(
        make_server(demo_controller(clock), clock, token=TOKEN).build_app()
    )
    # Even on an open path, a write is refused before routing says there is no such method.
    assert (await client.post("/metrics")).status == 401
    assert (await client.post("/metrics", headers=AUTH)).status == 405


def test_the_token_is_said_to_guard_what_the_server_has() -> None:
    """The server reads, and has nothing to act on: admin.token's description in the README
    spoke of "mutating endpoints", and the error for an open one without a token of "the
    admin actions"."""
    app = make_server(None, FakeClock()).build_app()
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}
    paths = {"/metrics", "/healthz", "/readyz", "/status"}
    assert routes == {(method, path) for method in ("GET", "HEAD") for path in paths}
    description = AdminSettings.model_fields["token"].description or ""
    assert description.startswith("bearer token required by /status (")
    with pytest.raises(ValueError, match=r"admin\.token") as info:
        Settings.model_validate({"admin": {"listen": "0.0.0.0:9091"}})
    problem = str(info.value)
    assert "/status (apps, machines, the policy's reasons, API errors) would be open" in problem
    for text in (description, problem):
        assert "mutating" not in text
        assert "action" not in text


async def test_no_token_leaves_status_open(aiohttp_client: MakeClient) -> None:
    clock = FakeClock()
    client = await aiohttp_client(make_server(demo_controller(clock), clock).build_app())
    assert (await client.get("/status")).status == 200


async def test_status_document(aiohttp_client: MakeClient) -> None:
    clock = FakeClock()
    client = await aiohttp_client(make_server(demo_controller(clock), clock).build_app())
    doc = await (await client.get("/status")).json()
    assert doc["ready"] is True
    assert doc["control_loop"] is True
    assert doc["control_healthy"] is True
    assert doc["last_tick_age_s"] == 0.25
    (app,) = doc["apps"]
    assert app == {
        "app": "demo",
        "static": False,
        "desired": 2,
        "started": 1,
        "panic": True,
        "last_reason": "demand 25.0 > 2x capacity: panic",
        "last_decision_age_s": 0.5,
        "last_tick_age_s": 0.25,
        "last_error": None,
        "leased_by_others": ["m2"],
        "machines": [
            {
                "id": "m1",
                "state": "started",
                "cordoned": False,
                "in_flight": 3,
                "last_used_age_s": 1.0,
                "failures": 0,
                "next_retry_in_s": None,
                "left_alone": False,
                "failing": 0,
                "hung": False,
                "hung_restarts": 0,
                "host_unreachable": False,
                "checks_critical_for_s": None,
                "checks_passed_on_recheck": ["healthz"],
                "checks_critical_unrouted": [],
            },
            {
                "id": "m2",
                "state": "suspended",
                "cordoned": True,
                "in_flight": 0,
                "last_used_age_s": None,
                "failures": 0,
                "next_retry_in_s": None,
                "left_alone": False,
                "failing": 0,
                "hung": False,
                "hung_restarts": 0,
                "host_unreachable": False,
                "checks_critical_for_s": None,
                "checks_passed_on_recheck": [],
                "checks_critical_unrouted": ["db"],
            },
            {
                "id": "m3",
                "state": "failed",
                "cordoned": False,
                "in_flight": 0,
                "last_used_age_s": None,
                "failures": 2,
                "next_retry_in_s": 4.0,
                "left_alone": False,
                "failing": 0,
                "hung": False,
                "hung_restarts": 0,
                "host_unreachable": False,
                "checks_critical_for_s": None,
                "checks_passed_on_recheck": [],
                "checks_critical_unrouted": [],
            },
        ],
    }


async def test_status_lists_the_static_apps_as_the_proxy_knows_them(
    aiohttp_client: MakeClient,
) -> None:
    """Static apps (fixed backends, no loop) were missing from /status, which lists the
    controller's apps only: a user saw the app the proxy serves as not there."""
    clock = FakeClock()
    fleet = FleetView(clock)
    view = fleet.app("fixed")
    static = AppConfig(name="fixed", backends=["10.0.0.1:80", "10.0.0.2:80"])
    view.set_machines(_static_machines(static))  # as the proxy does
    view.begin(view.upstreams["10.0.0.1:80"])
    clock.now += 1.5
    view.hold()
    server = make_server(demo_controller(clock), clock)
    server.static_apps = lambda: [view]
    client = await aiohttp_client(server.build_app())
    doc = await (await client.get("/status")).json()
    assert [a["app"] for a in doc["apps"]] == ["demo"]  # the scaled ones, as before
    assert doc["static_apps"] == [
        {
            "app": "fixed",
            "static": True,
            "in_flight": 1,
            "queued": 1,
            "last_request_age_s": 0.0,
            "machines": [
                {"id": "10.0.0.1:80", "state": "started", "in_flight": 1, "last_used_age_s": 1.5},
                {"id": "10.0.0.2:80", "state": "started", "in_flight": 0, "last_used_age_s": None},
            ],
        }
    ]


async def test_status_never_carries_a_secret(aiohttp_client: MakeClient) -> None:
    clock = FakeClock()
    fly_token = "fly-api-token-abcdef"
    provider = FakeController(
        apps=[FakeAppStatus(app="demo", last_error=f"401 with token {fly_token} and {TOKEN}")],
        last_tick_at=clock.now,
    )
    settings = AdminSettings(token=SecretStr(TOKEN))
    server = AdminServer(settings, Metrics(), provider, secrets=[fly_token], clock=clock)
    client = await aiohttp_client(server.build_app())
    text = await (await client.get("/status", headers=AUTH)).text()
    assert "401 with token" in text
    assert fly_token not in text
    assert TOKEN not in text


@pytest.mark.parametrize(
    ("last_tick_ago", "errors", "problem"),
    [
        (None, [None], "has not ticked yet"),
        (0.5, [None], None),
        (4.9, [None], None),
        (5.1, [None], "last ticked 5.1s ago"),
        (0.5, ["connect failed", None], None),
        (0.5, ["connect failed", "timeout"], "Machines API unreachable: connect failed"),
    ],
)
async def test_control_health(
    aiohttp_client: MakeClient,
    last_tick_ago: float | None,
    errors: list[str | None],
    problem: str | None,
) -> None:
    """``/readyz?control=1`` and the gauge say when decisions are stale; plain ``/readyz``
    (the data path) stays ready through all of it once the machines are known."""
    clock = FakeClock()
    known = (FakeMachine("m1", "started"),)
    provider = FakeController(
        apps=[
            FakeAppStatus(app=f"a{i}", last_error=e, machines=known) for i, e in enumerate(errors)
        ],
        last_tick_at=None if last_tick_ago is None else clock.now - last_tick_ago,
    )
    server = make_server(provider, clock)
    client = await aiohttp_client(server.build_app())
    assert (await client.get("/readyz")).status == 200
    resp = await client.get("/readyz?control=1")
    body = await resp.json()
    healthy = server.metrics.registry.get_sample_value("autoscaler_control_healthy")
    if problem is None:
        assert resp.status == 200
        assert body == {"status": "ready"}
        assert healthy == 1.0
    else:
        assert resp.status == 503
        assert any(problem in p for p in body["problems"]), body
        assert healthy == 0.0


REFUSED = str(Unauthorized(401, "unauthorized", operation="list_machines"))


@pytest.mark.parametrize(
    ("errors", "problem"),
    [
        # (the app's error, whether it is the API refusing the token)
        ([(REFUSED, True), (REFUSED, True)], "Machines API refuses the token (fly.token: "),
        ([(REFUSED, True), ("connect failed", False)], "Machines API unreachable: connect failed"),
        ([(REFUSED, True), (None, False)], None),  # one app's own (a token of another org)
    ],
)
async def test_a_token_the_api_refuses_is_named_not_unreachable(
    aiohttp_client: MakeClient, errors: list[tuple[str | None, bool]], problem: str | None
) -> None:
    """Every app's API call refused with 401/403 read "Machines API unreachable: ...":
    the API answered, and refused the token (named by its key, never its value)."""
    clock = FakeClock()
    known = (FakeMachine("m1", "started"),)
    apps = [
        FakeAppStatus(app=f"a{i}", last_error=e, api_refused=r, machines=known)
        for i, (e, r) in enumerate(errors)
    ]
    provider = FakeController(apps=apps, last_tick_at=clock.now)
    client = await aiohttp_client(make_server(provider, clock).build_app())
    resp = await client.get("/readyz?control=1")
    status = await (await client.get("/status")).json()
    if problem is None:
        assert resp.status == 200
        assert status["control_problems"] == []
        return
    assert resp.status == 503
    (said,) = (await resp.json())["problems"]
    assert said.startswith(problem), said
    assert status["control_problems"] == [said]
    if "refuses" in problem:
        assert said.endswith(REFUSED)


async def test_the_control_flag_reads_yes_and_no_and_refuses_the_rest(
    aiohttp_client: MakeClient,
) -> None:
    """``?control=no`` (or False, or any typo) turned the control checks on, and a bare
    ``?control`` left them off; the probe then said the opposite of what was asked."""
    clock = FakeClock()
    known = (FakeMachine("m1", "started"),)
    stale = FakeController(
        apps=[FakeAppStatus(app="a", machines=known)], last_tick_at=clock.now - 3600
    )
    client = await aiohttp_client(make_server(stale, clock).build_app())
    for query in ("", "?control=0", "?control=no", "?control=False", "?control=OFF"):
        assert (await client.get("/readyz" + query)).status == 200, query
    for query in ("?control", "?control=1", "?control=yes", "?control=True", "?control=on"):
        assert (await client.get("/readyz" + query)).status == 503, query
    for query in ("?control=2", "?control=%ff", "?control=nope", "?control=1&control=0"):
        resp = await client.get("/readyz" + query)
        assert resp.status == 400, query
        assert "control: expected 1 or 0" in (await resp.json())["error"]


async def test_no_admin_answer_may_be_cached(aiohttp_client: MakeClient) -> None:
    clock = FakeClock()
    server = make_server(demo_controller(clock), clock)
    client = await aiohttp_client(server.build_app())
    for path in ("/readyz", "/readyz?control=1", "/healthz", "/status", "/metrics", "/nope"):
        resp = await client.get(path)
        assert resp.headers.get("Cache-Control") == "no-store", path


async def test_not_ready_before_any_machine_is_known(aiohttp_client: MakeClient) -> None:
    clock = FakeClock()
    provider = FakeController(
        apps=[FakeAppStatus(app="a", last_error="connect failed")], last_tick_at=None
    )
    client = await aiohttp_client(make_server(provider, clock).build_app())
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert "known" in (await resp.json())["problems"][0]
    provider.apps = [FakeAppStatus(app="a", last_tick_at=clock.now)]  # read, no machines
    assert (await client.get("/readyz")).status == 200


async def test_draining_is_not_ready(aiohttp_client: MakeClient) -> None:
    clock = FakeClock()
    server = make_server(demo_controller(clock), clock)
    client = await aiohttp_client(server.build_app())
    assert (await client.get("/readyz")).status == 200
    server.set_draining()
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["problems"] == ["shutting down"]
    assert (await client.get("/healthz")).status == 200  # alive, just not taking traffic


async def test_without_control_loop(aiohttp_client: MakeClient) -> None:
    clock = FakeClock()
    server = make_server(None, clock)
    client = await aiohttp_client(server.build_app())
    assert (await client.get("/readyz")).status == 200
    doc = await (await client.get("/status")).json()
    assert doc["apps"] == []
    assert doc["control_loop"] is False
    value = server.metrics.registry.get_sample_value(
        "autoscaler_control_last_tick_timestamp_seconds"
    )
    assert value is not None
    assert math.isnan(value)


async def test_controller_without_apps(aiohttp_client: MakeClient) -> None:
    clock = FakeClock()
    server = make_server(FakeController(apps=[], last_tick_at=None), clock)
    client = await aiohttp_client(server.build_app())
    assert (await client.get("/readyz")).status == 200  # only static apps: nothing ticks
    doc = await (await client.get("/status")).json()
    assert doc["control_loop"] is False  # `autoscaler status` said "control loop ticked never"
    value = server.metrics.registry.get_sample_value(
        "autoscaler_control_last_tick_timestamp_seconds"
    )
    assert value is not None
    assert math.isnan(value)


def test_last_tick_metric_is_unix_time() -> None:
    clock = FakeClock(1000.0)
    provider = FakeController(apps=[FakeAppStatus(app="demo")], last_tick_at=None)
    server = make_server(provider, clock)

    def sample() -> float | None:
        return server.metrics.registry.get_sample_value(
            "autoscaler_control_last_tick_timestamp_seconds"
        )

    assert sample() == 0.0  # never ticked: infinitely stale
    provider.last_tick_at = 997.0  # 3 s ago on the controller's clock
    assert sample() == 50_000.0 - 3.0


async def test_start_and_stop_on_loopback() -> None:
    clock = FakeClock()
    server = make_server(demo_controller(clock), clock)
    await server.start(port=0)
    try:
        host, port = server.address
        assert host == "127.0.0.1"
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as resp,
        ):
            assert resp.status == 200
    finally:
        await server.stop()
    with pytest.raises(RuntimeError):
        _ = server.address


async def test_readiness_problems_are_redacted_as_status_is(aiohttp_client: MakeClient) -> None:
    # /readyz needs no token and quotes the API's errors: a secret in one must not get out.
    clock = FakeClock()
    error = "list_machines: LocalProtocolError: Illegal header value b'Bearer fly-s3cr3t'"
    provider = FakeController(
        apps=[FakeAppStatus(app="a", last_error=error, machines=(FakeMachine("m1", "started"),))],
        last_tick_at=clock.now,
    )
    server = AdminServer(
        AdminSettings(listen="127.0.0.1:9091"),
        Metrics(CollectorRegistry()),
        provider,
        secrets=["fly-s3cr3t"],
        clock=clock,
    )
    client = await aiohttp_client(server.build_app())
    resp = await client.get("/readyz?control=1")
    assert resp.status == 503
    text = await resp.text()
    assert "Machines API unreachable: list_machines: LocalProtocolError" in text
    assert "fly-s3cr3t" not in text


@pytest.mark.parametrize("protect_metrics", [False, True])
async def test_a_token_that_is_not_utf8_is_refused_as_any_wrong_one(protect_metrics: bool) -> None:
    """Bytes that are not UTF-8 in the Authorization header (anyone can send them, no token
    needed) got a 500 and an error log with a traceback: encoding the value back failed."""
    clock = FakeClock()
    server = make_server(
        demo_controller(clock), clock, token=TOKEN, protect_metrics=protect_metrics
    )
    await server.start(port=0)
    try:
        reader, writer = await asyncio.open_connection(*server.address)
        path = b"/metrics" if protect_metrics else b"/status"
        writer.write(
            b"GET " + path + b" HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n"
            b"Authorization: Bearer \xff\xfe" + TOKEN.encode() + b"\r\n\r\n"
        )
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        writer.close()
        await writer.wait_closed()
    finally:
        await server.stop()
    assert head.startswith("HTTP/1.1 401 "), head
    assert 'WWW-Authenticate: Bearer realm="autoscaler-admin"' in head


async def test_status_asks_the_controller_once(aiohttp_client: MakeClient) -> None:
    """The document asked the controller for every app's status three times (readiness,
    control health, the apps), each building every machine's anew."""
    clock = FakeClock()
    provider = demo_controller(clock)
    client = await aiohttp_client(make_server(provider, clock).build_app())
    provider.status_calls = 0  # whatever setting up the gauges asked
    resp = await client.get("/status")
    assert resp.status == 200
    assert (await resp.json())["ready"] is True
    assert provider.status_calls == 1


async def test_probes_and_scrapes_never_build_the_machines_status(
    aiohttp_client: MakeClient,
) -> None:
    """/readyz (a load balancer's probe, every few seconds) and each /metrics scrape (its
    control health and last-tick gauges) built every machine's status: tens of
    milliseconds of the event loop with 1,000 apps, each time, in the proxy's process."""
    clock = FakeClock()
    provider = demo_controller(clock)
    client = await aiohttp_client(make_server(provider, clock).build_app())
    for path in ("/readyz", "/readyz?control=1", "/metrics", "/healthz"):
        resp = await client.get(path)
        assert resp.status == 200, path
    assert provider.status_calls == 0
    text = await (await client.get("/metrics")).text()
    assert "autoscaler_control_healthy 1.0" in text
    assert provider.status_calls == 0


async def test_status_follows_the_static_apps_a_reload_adds_and_removes(
    emulator: Emulator, tmp_path: Path
) -> None:
    """``static_apps`` is what the running service routes, read through its admin server
    after each SIGHUP reload (Service.reload is what the signal runs): a static app added
    is there with its backends, one removed is gone, and an app that turns from scaled to
    static, or back, moves between ``apps`` and ``static_apps``."""
    emulator.world.seed_app(EmulatorApp(name="demo", machines=1))
    fly = {"api_url": emulator.url, "token": emulator.token, "rate_limit": False}
    admin = {"listen": "127.0.0.1:9091", "token": TOKEN}
    scaled = {"name": "demo", "hosts": ["demo.test"], "max_machines": 1}
    path = tmp_path / "autoscaler.yaml"

    def write(*apps: dict[str, Any]) -> None:
        path.write_text(yaml.safe_dump({"fly": fly, "admin": admin, "apps": list(apps)}))

    def static(name: str, *backends: str) -> dict[str, Any]:
        return {"name": name, "hosts": [f"{name}.test"], "backends": list(backends)}

    write(scaled, static("old", "127.0.0.1:9"))
    async with live_service(path) as svc, aiohttp.ClientSession() as http:
        assert svc.admin is not None
        url = f"http://127.0.0.1:{svc.admin.address[1]}/status"

        async def status() -> tuple[list[str], dict[str, list[str]]]:
            async with http.get(url, headers=AUTH) as resp:
                assert resp.status == 200
                doc = await resp.json()
            backends = {a["app"]: [m["id"] for m in a["machines"]] for a in doc["static_apps"]}
            return [a["app"] for a in doc["apps"]], backends

        assert await status() == (["demo"], {"old": ["127.0.0.1:9"]})

        write(scaled, static("api", "127.0.0.1:10", "127.0.0.1:11"))
        assert await svc.reload()
        assert await status() == (["demo"], {"api": ["127.0.0.1:10", "127.0.0.1:11"]})

        write(static("demo", "127.0.0.1:12"), static("api", "127.0.0.1:11"))
        assert await svc.reload()
        assert await status() == ([], {"demo": ["127.0.0.1:12"], "api": ["127.0.0.1:11"]})

        write(scaled)
        assert await svc.reload()
        assert await status() == (["demo"], {})


async def test_a_reload_of_the_loops_pace_moves_the_stalled_loop_limit(
    emulator: Emulator, tmp_path: Path
) -> None:
    """control.* is reloaded, and a sleeping app is then polled every new idle_poll_s: the
    limit that /readyz?control=1 and the critical AutoscalerControlLoopStalled alert (by
    autoscaler_control_max_tick_age_seconds) hold the loop to must follow. It stayed at the
    start's (137 s for idle_poll_s 60), so after a reload to 300 s every slow poll of a
    sleeping app counted as a stalled loop."""
    emulator.world.seed_app(EmulatorApp(name="demo", machines=1))
    fly = {"api_url": emulator.url, "token": emulator.token, "rate_limit": False}
    app = {"name": "demo", "hosts": ["demo.test"]}
    path = tmp_path / "autoscaler.yaml"

    def write(idle_poll_s: float) -> None:
        control = {"idle_poll_s": idle_poll_s, "tick_jitter": 0.1}
        path.write_text(yaml.safe_dump({"fly": fly, "control": control, "apps": [app]}))

    def limit() -> float | None:
        return svc.metrics.registry.get_sample_value("autoscaler_control_max_tick_age_seconds")

    write(60)
    async with live_service(path) as svc:
        assert svc.admin is not None
        assert svc.controller is not None
        assert limit() == pytest.approx(2 * 60 * 1.1 + 5)
        write(300)
        assert await svc.reload()
        assert limit() == pytest.approx(2 * 300 * 1.1 + 5)
        # A sleeping app's poll 200 s after the last tick is on time now, not stalled.
        await until(lambda: svc.controller is not None and svc.controller.last_tick_at is not None)
        last = svc.controller.last_tick_at
        assert last is not None
        svc.admin.clock = lambda: last + 200
        assert svc.admin.control_problems() == []
