"""Item 7: secrets stay where they belong; admin needs its token; X-Forwarded-For is ours.

- The Fly token goes only to the configured API host: an API that redirects elsewhere
  (another loopback address) does not get the token carried along.
- Upstream machines never see the proxy's own credentials: an echo upstream records every
  header and body it receives through the proxy, and neither token is among them.
- The tokens appear in no log line (the suite-wide capture checks every test), no metric,
  no ``/status``, ``/readyz`` or ``/healthz`` body, no error text (a failing API call's
  error reaches ``/status`` as ``last_error``).
- With ``admin.token`` set, ``/status`` and every non-GET request need it; a wrong one is
  refused the same as none, and the refusal does not echo it.
- A client's own X-Forwarded-For / Forwarded are replaced unless it is a trusted proxy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from testkit import until

from autoscaler.config import FaultSettings
from autoscaler.emulator import Emulator
from autoscaler.fly.client import MachinesClient
from autoscaler.fly.errors import FlyError

from .harness import (
    ADMIN_TOKEN,
    APP,
    FLY_TOKEN,
    HOST,
    Figures,
    LogCapture,
    live_service,
    service_config,
    write_config,
)

ECHO_HOST = "echo.test"
SPOOFED = "6.6.6.6"

pytestmark = pytest.mark.timeout(120)


class Recorder:
    """An upstream that records every request's headers and body, then answers 200."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(
            {
                "host": request.host,
                "path": request.path_qs,
                "headers": list(request.headers.items()),
                "body": body.decode("utf-8", "replace"),
            }
        )
        return web.json_response({"headers": dict(request.headers)})

    def text(self) -> str:
        return repr(self.seen)


async def _serve(app: web.Application, host: str = "127.0.0.1") -> TestServer:
    server = TestServer(app, host=host, port=0)
    await server.start_server()
    return server


@pytest.fixture
async def echo() -> AsyncIterator[tuple[Recorder, str]]:
    recorder = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    server = await _serve(app)
    yield recorder, f"127.0.0.1:{server.port}"
    await server.close()


async def test_fly_token_is_not_carried_to_a_redirect_target(log_capture: LogCapture) -> None:
    """The configured API answers 307 to another host: the token must not follow."""
    elsewhere = Recorder()
    other_app = web.Application()
    other_app.router.add_route("*", "/{tail:.*}", elsewhere.handle)
    other = await _serve(other_app, host="127.0.0.2")
    api = Recorder()

    async def redirect(request: web.Request) -> web.Response:
        await api.handle(request)
        raise web.HTTPTemporaryRedirect(f"http://127.0.0.2:{other.port}{request.path_qs}")

    api_app = web.Application()
    api_app.router.add_route("*", "/{tail:.*}", redirect)
    server = await _serve(api_app)
    client = MachinesClient(
        f"http://127.0.0.1:{server.port}", FLY_TOKEN, rate_limit=False, max_retries=0
    )
    try:
        with pytest.raises(FlyError) as caught:
            await client.list_machines(APP)
        assert FLY_TOKEN not in str(caught.value)
        assert FLY_TOKEN not in repr(caught.value)
    finally:
        await client.aclose()
        await server.close()
        await other.close()
    # The configured host did get it (so the test can fail), the other host never did.
    assert any(("Authorization", f"Bearer {FLY_TOKEN}") in r["headers"] for r in api.seen)
    assert FLY_TOKEN not in elsewhere.text()


# Secrets have nothing to do with transition timing: the fast profile only.
@pytest.mark.parametrize("emulator_settings", ["fast"], indirect=True)
async def test_no_credential_upstream_none_in_metrics_status_or_errors(
    emulator: Emulator,
    echo: tuple[Recorder, str],
    tmp_path: Path,
    log_capture: LogCapture,
    figures: Figures,
) -> None:
    recorder, echo_address = echo
    config = service_config(emulator)
    config["apps"].append({"name": "echo", "hosts": [ECHO_HOST], "backends": [echo_address]})
    file = write_config(tmp_path / "autoscaler.yaml", config)
    bodies: dict[str, str] = {}
    async with live_service(file) as svc, aiohttp.ClientSession() as http:
        assert svc.proxy is not None
        assert svc.admin is not None
        assert svc.controller is not None
        proxy = f"http://127.0.0.1:{svc.proxy.port}"
        host, port = svc.admin.address
        admin = f"http://{host}:{port}"
        bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

        # Traffic through both apps, the scaled one waking a machine through the API.
        async with http.get(f"{proxy}/", headers={"Host": HOST}) as resp:
            assert resp.status == 200
        for method in ("GET", "POST", "PUT"):
            async with http.request(
                method, f"{proxy}/x?y=1", headers={"Host": ECHO_HOST}, data=b"payload"
            ) as resp:
                assert resp.status == 200

        # 1. X-Forwarded-For from an untrusted client is replaced, Forwarded dropped.
        spoof = {"Host": ECHO_HOST, "X-Forwarded-For": SPOOFED, "Forwarded": f"for={SPOOFED}"}
        async with http.get(f"{proxy}/spoof", headers=spoof) as resp:
            seen = (await resp.json())["headers"]
        assert seen["X-Forwarded-For"] == "127.0.0.1"
        assert "Forwarded" not in seen
        assert SPOOFED not in recorder.text()

        # 2. Admin access: /status and non-GET need the token; open paths stay open.
        checks: dict[str, tuple[str, str, dict[str, str], int]] = {
            "status, no token": ("GET", "/status", {}, 401),
            "status, wrong token": ("GET", "/status", {"Authorization": "Bearer nope"}, 401),
            "status, basic scheme": (
                "GET", "/status", {"Authorization": f"Basic {ADMIN_TOKEN}"}, 401
            ),
            "status, token": ("GET", "/status", bearer, 200),
            "POST status, no token": ("POST", "/status", {}, 401),
            "DELETE metrics, no token": ("DELETE", "/metrics", {}, 401),
            "metrics, no token": ("GET", "/metrics", {}, 200),
            "healthz, no token": ("GET", "/healthz", {}, 200),
            "readyz, no token": ("GET", "/readyz", {}, 200),
        }  # fmt: skip
        for name, (method, path, headers, expected) in checks.items():
            async with http.request(method, admin + path, headers=headers) as resp:
                bodies[name] = await resp.text()
                assert resp.status == expected, f"{name}: {resp.status} {bodies[name][:200]}"

        # 3. An API failure becomes an error text in /status: it must not carry the token.
        emulator.set_faults(FaultSettings(error_rate=1.0))
        rt = svc.controller.apps[APP]
        await until(lambda: rt.last_error is not None, 20, "a failed tick")
        async with http.get(f"{admin}/status", headers=bearer) as resp:
            bodies["status during API errors"] = await resp.text()
        assert "last_error" in bodies["status during API errors"]
        emulator.set_faults(FaultSettings())
        async with http.get(f"{admin}/metrics", headers=bearer) as resp:
            bodies["metrics at the end"] = await resp.text()

    # The proxy forwarded nothing of its own credentials, and no surface showed a token.
    assert recorder.seen, "the echo upstream saw no request"
    for token in (FLY_TOKEN, ADMIN_TOKEN):
        assert token not in recorder.text()
        for name, body in bodies.items():
            assert token not in body, f"token in {name}"
    assert "autoscaler_requests_total" in bodies["metrics at the end"]
    assert '"event": "request"' in log_capture.text()  # the capture saw the traffic
    figures.record(
        "security",
        upstream_requests_recorded=len(recorder.seen),
        admin_checks=len(checks),
        surfaces_scanned=sorted(bodies),
        log_lines_scanned=len(log_capture.text().splitlines()),
    )
