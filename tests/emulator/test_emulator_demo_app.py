"""The built-in demo app, in-process (the lifecycle tests run it as a real machine)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import WSMsgType

from autoscaler.emulator.demo_app import build_app


async def test_demo_app_endpoints(aiohttp_client: Any) -> None:
    client = await aiohttp_client(build_app())
    assert (await (await client.get("/")).json())["count"] == 1
    assert await (await client.get("/healthz")).text() == "ok"
    body = await (await client.get("/work", params={"ms": "20"})).json()
    assert body["slept_ms"] >= 20
    assert body["count"] == 2  # health checks are not counted
    async with asyncio.timeout(60):  # a bound, never an expectation of speed
        # Slow only on the machine named: elsewhere at once.
        body = await (await client.get("/work", params={"ms": "600000", "on": "other"})).json()
    assert body["machine_id"] == "local"
    assert (await client.get("/work", params={"ms": "x"})).status == 400
    r = await client.get("/stream", params={"n": "3", "ms": "0"})
    assert r.headers["Transfer-Encoding"] == "chunked"
    assert await r.text() == "chunk 0\nchunk 1\nchunk 2\n"
    assert (await client.get("/stream", params={"n": "x"})).status == 400
    r = await client.get("/events", params={"n": "2", "ms": "0"})
    assert r.headers["Content-Type"] == "text/event-stream"
    assert r.headers["Transfer-Encoding"] == "chunked"
    assert await r.text() == "data: 0\n\ndata: 1\n\n"
    assert (await client.get("/events", params={"ms": "x"})).status == 400
    ws = await client.ws_connect("/ws")
    await ws.send_str("hello")
    msg = await ws.receive()
    assert msg.type == WSMsgType.TEXT
    assert msg.data == "hello"
    await ws.close()
