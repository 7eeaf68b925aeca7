"""Small helpers shared by the proxy tests."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web


async def status_of(session: aiohttp.ClientSession, target: str, host: str) -> int:
    """The status of one GET of ``target`` with ``Host: host`` (the body is not read)."""
    async with session.get(target, headers={"Host": host}) as resp:
        return resp.status


def text_app(text: str) -> web.Application:
    """A machine that answers GET / with ``text``."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=text)

    app = web.Application()
    app.router.add_get("/", handler)
    return app


class Blocking:
    """An upstream whose requests wait until released; records arrival order."""

    def __init__(self, name: str = "m") -> None:
        self.name = name
        self.order: list[str] = []
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        async def handler(request: web.Request) -> web.Response:
            self.order.append(request.query.get("id", ""))
            await self.release.wait()
            return web.Response(text=self.name)

        app = web.Application()
        app.router.add_get("/", handler)
        return app
