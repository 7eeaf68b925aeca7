"""WebSockets through the proxy: both directions, close codes, counted in flight while open."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from testkit import until

from autoscaler.control.view import FleetView

from .conftest import Backend, StartProxy, url


def ws_app(seen_close: list[int | None]) -> web.Application:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat.v2",))
        await ws.prepare(request)
        await ws.send_str(f"hello {request.headers.get('X-Forwarded-For')}")
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                if msg.data == "bye":
                    await ws.close(code=4001, message=b"server says bye")
                    break
                await ws.send_str(msg.data.upper())
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        seen_close.append(ws.close_code)
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    return app


async def test_websocket_relay_both_ways_and_close_codes(
    backend: Backend,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    fleet: FleetView,
) -> None:
    seen_close: list[int | None] = []
    addr = await backend(ws_app(seen_close))
    proxy = await start_proxy([{"name": "a", "hosts": ["a.test"], "backends": [addr]}])
    view = fleet.app("a")

    async with session.ws_connect(
        url(proxy, "/ws"), headers={"Host": "a.test"}, protocols=("chat.v1", "chat.v2")
    ) as ws:
        assert ws.protocol == "chat.v2"
        assert await ws.receive_str() == "hello 127.0.0.1"
        assert view.in_flight == 1  # an open WebSocket is a request in flight
        await ws.send_str("ping me")
        assert await ws.receive_str() == "PING ME"
        await ws.send_bytes(b"\x00\x01\x02")
        assert await ws.receive_bytes() == b"\x02\x01\x00"
        # The client closes with its own code; the machine must see that code.
        await ws.close(code=4321, message=b"client done")
    await until(lambda: bool(seen_close) and view.in_flight == 0)
    assert seen_close == [4321]

    async with session.ws_connect(url(proxy, "/ws"), headers={"Host": "a.test"}) as ws:
        await ws.receive_str()
        await ws.send_str("bye")
        msg = await ws.receive()
        assert msg.type is WSMsgType.CLOSE
        assert msg.data == 4001  # the machine's close code reaches the client
        assert msg.extra == "server says bye"
    await until(lambda: view.in_flight == 0)


async def test_websocket_to_a_plain_http_route_is_502(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="not a websocket")

    app = web.Application()
    app.router.add_get("/ws", plain)
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(app)]}]
    )
    with pytest.raises(aiohttp.WSServerHandshakeError) as failed:
        await session.ws_connect(url(proxy, "/ws"), headers={"Host": "a.test"})
    assert failed.value.status == 502


async def test_shutdown_closes_open_websockets_with_going_away(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    seen_close: list[int | None] = []
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [await backend(ws_app(seen_close))]}]
    )
    async with session.ws_connect(url(proxy, "/ws"), headers={"Host": "a.test"}) as ws:
        await ws.receive_str()
        stopping = asyncio.create_task(proxy.stop())
        msg = await ws.receive()
        assert msg.type is WSMsgType.CLOSE
        assert msg.data == 1001
        await stopping
