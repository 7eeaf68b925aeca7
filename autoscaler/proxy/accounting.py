"""Per-request bookkeeping of the proxy: context, error outcome, metrics and the log line."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from autoscaler.control.view import Upstream
from autoscaler.logs import EventLine, get_logger
from autoscaler.proxy.gate import NO_WAKE

_log = get_logger("autoscaler.proxy")


class Failure(Exception):
    """A request that ends in an error response from the proxy itself."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass(slots=True)
class RequestContext:
    """What one request's accounting needs, filled in as it goes."""

    arrived: float
    request_id: str
    app: str = ""
    status: int = 0
    wake: str = NO_WAKE
    up: Upstream | None = None
    deadline: float = 0.0
    headers_at: float | None = None


def remaining(deadline: float) -> float:
    return max(0.0, deadline - asyncio.get_running_loop().time())


# One line per request, written without structlog's processor chain (see EventLine).
access_line = EventLine(
    "autoscaler.proxy",
    "request",
    ("request_id", "app", "method", "path", "status", "duration_ms", "machine", "wake"),
)
