"""Large bodies pass both ways with flat memory: nothing is buffered whole.

Proxy, upstream and client share this process, so tracemalloc's peak covers all three; a
proxy that buffered a body would show the body's size there.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from .conftest import Backend, StartProxy, url

TOTAL = 256 * 1024 * 1024
CHUNK = 256 * 1024
BOUND = 24 * 1024 * 1024  # an order of magnitude under TOTAL, far over the few buffers in use


def sink_and_source_app() -> web.Application:
    async def sink(request: web.Request) -> web.Response:
        received = 0
        while chunk := await request.content.readany():
            received += len(chunk)
        return web.Response(text=str(received))

    async def source(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = TOTAL
        await resp.prepare(request)
        block = b"d" * CHUNK
        for _ in range(TOTAL // CHUNK):
            await resp.write(block)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/sink", sink)
    app.router.add_get("/source", source)
    return app


async def test_upload_and_download_with_flat_memory(
    backend: Backend, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    addr = await backend(sink_and_source_app())
    proxy = await start_proxy(
        [{"name": "a", "hosts": ["a.test"], "backends": [addr]}], access_log=False
    )

    async def upload() -> AsyncIterator[bytes]:
        block = b"u" * CHUNK
        for _ in range(TOTAL // CHUNK):
            yield block

    tracemalloc.start()
    try:
        async with session.post(
            url(proxy, "/sink"), data=upload(), headers={"Host": "a.test"}
        ) as resp:
            assert resp.status == 200
            assert int(await resp.text()) == TOTAL
        _, up_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        received = 0
        async with session.get(url(proxy, "/source"), headers={"Host": "a.test"}) as resp:
            assert resp.headers["Content-Length"] == str(TOTAL)
            async for chunk in resp.content.iter_any():
                received += len(chunk)
        _, down_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == TOTAL
    assert up_peak < BOUND, up_peak
    assert down_peak < BOUND, down_peak
