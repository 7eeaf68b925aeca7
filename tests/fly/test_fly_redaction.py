"""The token never appears in a log line, a repr, a str or an exception text."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any

import httpx
import pytest
import structlog
from aiohttp import web
from flyfakes import TOKEN, FakeTime, Script, make_client
from pydantic import SecretStr
from structlog.testing import capture_logs

from autoscaler import logs
from autoscaler.fly.client import MachinesClient
from autoscaler.fly.errors import FlyError


def echo_everything(request: httpx.Request) -> httpx.Response:
    """A hostile server that puts the Authorization header in its error body and headers."""
    auth = request.headers.get("authorization", "")
    return httpx.Response(
        401,
        json={"error": f"bad credentials: {auth}", "status": "unauthorized"},
        headers={"fly-request-id": "req-1", "x-echo": auth},
    )


async def exercise(api: MachinesClient) -> list[str]:
    """Call a few operations that fail in different ways; return every text they produced."""
    texts: list[str] = [repr(api), str(api)]
    for call in (
        lambda: api.get_machine("web", "m1"),
        lambda: api.start_machine("web", "m1"),
        lambda: api.create_machine("web", {"image": "x"}),
        lambda: api.list_apps(),
        lambda: api.wait("web", "m1", timeout_s=3),
    ):
        with pytest.raises(FlyError) as info:
            await call()
        err = info.value
        texts += [str(err), repr(err), err.message, str(err.args), repr(err.__cause__)]
    return texts


@pytest.mark.parametrize("token", [TOKEN, SecretStr(TOKEN)], ids=["str", "SecretStr"])
async def test_token_absent_from_errors_and_captured_logs(token: str | SecretStr) -> None:
    fake = FakeTime()
    # Four calls answered 401 with the token echoed, then a wait that cannot connect.
    script = Script([echo_everything] * 4 + [httpx.ConnectError(f"refused {TOKEN}")])
    with capture_logs() as captured:
        async with MachinesClient(
            "http://127.0.0.1:4280",
            token,
            transport=httpx.MockTransport(script),
            sleep=fake.sleep,
            clock=fake.clock,
            max_retries=1,
        ) as api:
            texts = await exercise(api)
    assert script.requests[0].headers["authorization"] == f"Bearer {TOKEN}"  # it was sent
    assert captured, "the client logged nothing: the search below would prove nothing"
    assert any(e.get("event") == "fly_api" and e.get("status") == 401 for e in captured)
    everything = "\n".join(texts) + "\n" + repr(captured)
    assert TOKEN not in everything
    assert "[REDACTED]" in everything  # the echoed token was found and scrubbed


async def test_token_absent_from_rendered_output() -> None:
    """Through the real structlog pipeline (JSON renderer) and at debug level."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (structlog.get_config(), root.handlers[:], root.level)
    logs.configure(level="debug", fmt="json", stream=stream)
    try:
        script = Script([httpx.Response(200, json=[]), echo_everything])
        async with make_client(script, FakeTime(), max_retries=0) as api:
            await api.list_machines("web")
            with pytest.raises(FlyError):
                await api.get_machine("web", "m1")
            logging.getLogger("httpx").debug("probe %s", "line")  # stdlib loggers too
    finally:
        structlog.configure(**saved[0])
        root.handlers[:] = saved[1]
        root.setLevel(saved[2])
    output = stream.getvalue()
    assert '"fly_api"' in output
    assert '"list_machines"' in output
    assert TOKEN not in output


def test_client_repr_has_no_token() -> None:
    api = MachinesClient("http://127.0.0.1:4280", TOKEN)
    assert TOKEN not in repr(api)
    assert TOKEN not in str(api)
    assert TOKEN not in repr(api._http)


async def test_a_token_is_sent_without_the_newline_its_file_ended_with() -> None:
    # Sent with it, httpx refused the header and the error quoted it, token and all.
    script = Script([httpx.Response(200, json=[])])
    api = make_client(script, token="fly-s3cr3t\n")
    await api.list_machines("web")
    assert script.last.headers["authorization"] == "Bearer fly-s3cr3t"
    await api.aclose()
    with pytest.raises(ValueError, match="characters an HTTP header cannot carry") as info:
        make_client(script, token="fly-\x01s3cr3t")
    assert "s3cr3t" not in str(info.value)


async def test_the_token_never_goes_to_a_proxy_named_by_the_environment(
    monkeypatch: pytest.MonkeyPatch, aiohttp_server: Any
) -> None:
    """HTTP_PROXY, ALL_PROXY and the like are not followed: the calls (and the token)
    go straight to fly.api_url. With them followed, every call went to that proxy."""
    seen: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(4096))
        writer.close()

    proxy_server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    proxy_url = f"http://127.0.0.1:{proxy_server.sockets[0].getsockname()[1]}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy_url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    async def machines(request: web.Request) -> web.Response:
        return web.json_response([])

    app = web.Application()
    app.router.add_get("/v1/apps/{app}/machines", machines)
    api_server = await aiohttp_server(app, host="127.0.0.1")
    try:
        async with MachinesClient(f"http://127.0.0.1:{api_server.port}", TOKEN) as api:
            assert await api.list_machines("web") == []
    finally:
        proxy_server.close()
        await proxy_server.wait_closed()
    assert seen == []


async def test_a_macaroon_of_a_flyv1_token_echoed_alone_is_scrubbed() -> None:
    """A FlyV1 token is a comma-separated list of macaroons, each a credential (or its
    discharge) on its own. Only the whole header value was scrubbed: an error that quoted
    one of them (a server naming the macaroon it refused) put it in the exception."""
    first, second = "fm2_lJPECAAAAAAAB1" + "a" * 40, "fm2_lJPETw3Hd1scHr" + "b" * 40
    token = f"FlyV1 {first},{second}"

    def quote_one(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == token
        return httpx.Response(401, json={"error": f"macaroon expired: {second}"})

    script = Script([quote_one, httpx.ConnectError(f"refused {first}")])
    with capture_logs() as captured:
        async with make_client(script, FakeTime(), token=token, max_retries=0) as api:
            texts = []
            for _ in range(2):
                with pytest.raises(FlyError) as info:
                    await api.get_machine("web", "m1")
                texts += [str(info.value), repr(info.value), info.value.message]
    everything = "\n".join(texts) + "\n" + repr(captured)
    assert "macaroon expired: [REDACTED]" in everything
    assert first not in everything
    assert second not in everything
    assert logs.redactor().scrub_text(f"x {second} y") == "x [REDACTED] y"


async def test_a_token_echoed_in_the_request_id_or_the_code_is_scrubbed() -> None:
    """The message was scrubbed, but not the request id (a response header) nor the
    real API's string status (kept as ``code``), which str() and the log line show beside
    it: a server or proxy that echoed the Authorization header there leaked the token."""

    def echo(request: httpx.Request) -> httpx.Response:
        auth = request.headers["authorization"]
        body = {"error": "no", "status": f"bad {auth}"}
        return httpx.Response(401, json=body, headers={"fly-request-id": f"r1 {auth}" * 50})

    with capture_logs() as captured:
        async with make_client(Script([echo]), FakeTime(), max_retries=0) as api:
            with pytest.raises(FlyError) as info:
                await api.get_machine("web", "m1")
    err = info.value
    everything = "\n".join([str(err), repr(err), str(err.code), str(err.request_id)])
    everything += "\n" + repr(captured)
    assert TOKEN not in everything
    assert err.code == "bad Bearer [REDACTED]"
    assert err.request_id is not None
    assert err.request_id.startswith("r1 Bearer [REDACTED]")
    assert len(err.request_id) <= 128
