"""One exception tree for the Machines API, and the one function that maps a response to it.

::

    FlyError(status, message, request_id)        every failure of the client
    ├── BadRequest          400, 422             the request was wrong; retrying will not help
    ├── Unauthorized        401, 403             token missing, wrong or without permission
    ├── NotFound            404                  no such app, machine, volume or metadata key
    ├── Conflict            409, 412             lease held by another / machine in the wrong state
    │   └── LeaseHeld       409                  the machine's lease is held by another holder
    ├── RateLimited         429                  .retry_after: seconds from Retry-After, or None
    │                                            (status None: the client's own limit, in a tick)
    ├── ServerError         5xx                  Fly's side failed; transient
    ├── WaitTimeout         408, own deadline    the machine did not reach the state in time
    ├── RequestTimeout      408 of another call  Fly gave up on the request; transient
    └── TransportError      status None          connect or read failure; .sent says whether
                                                 the request may have reached the server

Bodies come in two shapes: the seed's ``{"error": "...", "status": 404}`` and the real API's
``{"error": "...", "status": "insufficient_capacity"}`` (or ``message`` instead of
``error``, or no JSON at all). ``error_from_response`` reads them all; a string status is
kept as ``code``.

The token never reaches these objects: messages come from response bodies and transport
errors, and ``error_from_response``/``TransportError`` scrub any secret they are given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

_MAX_MESSAGE = 500  # an HTML error page must not become a 50 kB exception text
_MAX_FIELD = 128  # a request id or a string code: short words, whatever a server sends
REQUEST_ID_HEADER = "fly-request-id"
WAIT_OPERATION = "wait_for_machine_state"  # whose 408 means "not there yet"


class FlyError(Exception):
    """A failed Machines API call: HTTP status (None for transport), message, request id."""

    def __init__(
        self,
        status: int | None,
        message: str,
        request_id: str | None = None,
        *,
        code: str | None = None,
        operation: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.request_id = request_id
        self.code = code  # the real API's string status ("insufficient_capacity"), if any
        self.operation = operation

    def __str__(self) -> str:
        parts: list[str] = []
        if self.operation:
            parts.append(f"{self.operation}:")
        if self.status is not None:
            parts.append(f"HTTP {self.status}:")
        parts.append(self.message)
        if self.code:
            parts.append(f"(code {self.code})")
        if self.request_id:
            parts.append(f"[request {self.request_id}]")
        return " ".join(parts)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, message={self.message!r}, "
            f"request_id={self.request_id!r})"
        )

    @property
    def transient(self) -> bool:
        """Worth retrying for an idempotent call (429, 5xx, transport)."""
        return False


class BadRequest(FlyError):
    pass


class Unauthorized(FlyError):
    pass


class NotFound(FlyError):
    pass


class Conflict(FlyError):
    pass


class LeaseHeld(Conflict):
    """409: someone else (a ``fly deploy``, another tool) holds the machine's lease, so
    the call needs that holder's nonce. A Conflict, so code that treats every conflict
    alike still does; code that must not fight a lease holder catches this first."""


class RateLimited(FlyError):
    def __init__(
        self,
        status: int | None,
        message: str,
        request_id: str | None = None,
        *,
        retry_after: float | None = None,
        code: str | None = None,
        operation: str | None = None,
    ) -> None:
        super().__init__(status, message, request_id, code=code, operation=operation)
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        return True


class ServerError(FlyError):
    @property
    def transient(self) -> bool:
        return True


class WaitTimeout(FlyError):
    pass


class TransportError(FlyError):
    """Connect or read failure. ``sent`` is False only when the request surely never left."""

    def __init__(
        self,
        message: str,
        *,
        sent: bool = True,
        retryable: bool = True,
        operation: str | None = None,
    ) -> None:
        super().__init__(None, message, None, operation=operation)
        self.sent = sent
        self._retryable = retryable

    @property
    def transient(self) -> bool:
        return self._retryable


class RequestTimeout(FlyError):
    """408 to a call other than ``/wait`` (where it means "not yet"): Fly's edge gave up on
    the request. Transient, as flyctl treats it: a safe call is tried again."""

    @property
    def transient(self) -> bool:
        return True


# 429 (RateLimited, with its Retry-After) and 5xx (ServerError) are handled apart; a 408
# is WaitTimeout from /wait, RequestTimeout from anything else.
_CLASS_BY_STATUS: Mapping[int, type[FlyError]] = {
    400: BadRequest,
    422: BadRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    408: WaitTimeout,
    409: LeaseHeld,
    412: Conflict,
}


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, "[REDACTED]")
    return text


def _field(value: str | None, secrets: Iterable[str]) -> str | None:
    """A request id or code as the server sent it, scrubbed, on one line, bounded."""
    if not value:
        return None
    text = "".join(c if c.isprintable() else " " for c in scrub(value, secrets)).strip()
    return text[:_MAX_FIELD] or None


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _body_fields(body: bytes) -> tuple[str | None, str | None]:
    """(message, string code) from any of the known error body shapes."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, RecursionError):  # RecursionError: nested deeper than it can go
        data = None
    if isinstance(data, str):
        return data, None
    if not isinstance(data, dict):
        text = body.decode("utf-8", "replace").strip() if body else ""
        return text or None, None
    message = data.get("error") or data.get("message")
    # The seed's status repeats the HTTP status (an int, or digits); only the real API's
    # string status ("insufficient_capacity") says more, and is kept as the code.
    status = data.get("status")
    code = status if isinstance(status, str) and status and not status.isdigit() else None
    return (str(message) if message is not None else None), code


def error_from_response(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    operation: str | None = None,
    secrets: Iterable[str] = (),
    now: datetime | None = None,
) -> FlyError:
    """The exception for a non-2xx response. The one place statuses become exception types.

    ``headers`` must be case-insensitive (httpx.Headers is) or use lower-case keys.
    """
    secrets = tuple(secrets)
    message, code = _body_fields(body)
    message = scrub(message or f"HTTP {status}", secrets)[:_MAX_MESSAGE]
    # The request id and the code are the server's words too, and go into str() and the
    # log line beside the message: a server (or a proxy) that echoes the Authorization
    # header in them must not put the token there.
    code = _field(code, secrets)
    request_id = _field(headers.get(REQUEST_ID_HEADER) or headers.get("x-request-id"), secrets)
    kw: dict[str, str | None] = {"code": code, "operation": operation}
    if status == 429:
        retry_after = parse_retry_after(headers.get("retry-after"), now)
        return RateLimited(status, message, request_id, retry_after=retry_after, **kw)
    if status == 408 and operation != WAIT_OPERATION:
        return RequestTimeout(status, message, request_id, **kw)
    cls = _CLASS_BY_STATUS.get(status) or (ServerError if status >= 500 else FlyError)
    return cls(status, message, request_id, **kw)
