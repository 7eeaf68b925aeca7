"""The client-facing listener: aiohttp's low-level server with the proxy's error pages and a
cap on connections."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

# (request, status aiohttp chose, exception) -> the response to send instead.
ErrorPage = Callable[[web.BaseRequest, int, BaseException | None], web.StreamResponse]


class ProxyProtocol(RequestHandler):
    """aiohttp's connection handler, with the proxy's own error responses."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        server = self._manager
        assert isinstance(server, Listener)
        return server.error_page(request, status, exc)


class Listener(web.Server):
    """Low-level server: our protocol class, and a cap on client connections."""

    def __init__(
        self, handler: Any, error_page: ErrorPage, *, max_connections: int, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self.error_page = error_page
        self.max_connections = max_connections

    def __call__(self) -> RequestHandler:
        return ProxyProtocol(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: Any) -> None:
        if len(self._connections) >= self.max_connections:
            transport.close()  # over the cap: refuse rather than queue unbounded sockets
            return
        super().connection_made(handler, transport)
