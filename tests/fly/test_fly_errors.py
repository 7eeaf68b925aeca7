"""The mapping from responses to the exception tree, for every status and body shape."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
import pytest

from autoscaler.fly.errors import (
    BadRequest,
    Conflict,
    FlyError,
    LeaseHeld,
    NotFound,
    RateLimited,
    RequestTimeout,
    ServerError,
    TransportError,
    Unauthorized,
    WaitTimeout,
    error_from_response,
    parse_retry_after,
)

H = httpx.Headers


def test_a_408_from_wait_means_not_yet() -> None:
    err = error_from_response(408, b"{}", H({}), operation="wait_for_machine_state")
    assert type(err) is WaitTimeout
    assert not err.transient
    assert error_from_response(408, b"{}", H({}), operation="get_machine").transient


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequest),
        (401, Unauthorized),
        (403, Unauthorized),
        (404, NotFound),
        (408, RequestTimeout),  # from /wait: WaitTimeout (below)
        (409, LeaseHeld),
        (412, Conflict),
        (422, BadRequest),
        (429, RateLimited),
        (500, ServerError),
        (502, ServerError),
        (503, ServerError),
        (418, FlyError),
    ],
)
def test_status_maps_to_class(status: int, cls: type[FlyError]) -> None:
    err = error_from_response(status, b'{"error": "nope"}', H({"fly-request-id": "r-1"}))
    assert type(err) is cls
    assert err.status == status
    assert err.message == "nope"
    assert err.request_id == "r-1"
    assert "r-1" in str(err)
    assert "nope" in str(err)


@pytest.mark.parametrize(
    ("body", "message", "code"),
    [
        ({"error": "machine not found", "status": 404}, "machine not found", None),
        (
            {"error": "no room", "status": "insufficient_capacity"},
            "no room",
            "insufficient_capacity",
        ),
        ({"message": "name taken", "status": "name_taken"}, "name taken", "name_taken"),
        ({"message": "bare message"}, "bare message", None),
        ({"error": "string digits", "status": "404"}, "string digits", None),
        ({}, "HTTP 404", None),
        ("just a string", "just a string", None),
    ],
)
def test_body_shapes(body: object, message: str, code: str | None) -> None:
    err = error_from_response(404, json.dumps(body).encode(), H())
    assert isinstance(err, NotFound)
    assert err.message == message
    assert err.code == code


def test_non_json_and_empty_bodies() -> None:
    err = error_from_response(502, b"<html>Bad gateway</html>", H())
    assert isinstance(err, ServerError)
    assert err.message == "<html>Bad gateway</html>"
    assert error_from_response(500, b"", H()).message == "HTTP 500"
    assert len(error_from_response(500, b"x" * 100_000, H()).message) <= 500


def test_integer_status_in_the_body_does_not_override_http_status() -> None:
    err = error_from_response(409, b'{"error": "lease held", "status": 500}', H())
    assert isinstance(err, Conflict)
    assert err.status == 409


def test_retry_after_seconds_and_date() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    err = error_from_response(429, b"", H({"Retry-After": "7"}))
    assert isinstance(err, RateLimited)
    assert err.retry_after == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:05 GMT", now) == 5.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("nan") is None
    no_header = error_from_response(429, b"", H())
    assert isinstance(no_header, RateLimited)
    assert no_header.retry_after is None


def test_transient_flags() -> None:
    assert error_from_response(429, b"", H()).transient
    assert error_from_response(503, b"", H()).transient
    assert not error_from_response(404, b"", H()).transient
    assert not error_from_response(412, b"", H()).transient
    assert TransportError("ConnectError").transient
    assert not TransportError("UnsupportedProtocol", retryable=False).transient
    assert TransportError("x", sent=False).sent is False


def test_messages_are_scrubbed_of_secrets() -> None:
    err = error_from_response(
        401, b'{"error": "bad token Bearer s3cr3t-tok"}', H(), secrets=["s3cr3t-tok"]
    )
    assert "s3cr3t-tok" not in str(err)
    assert "s3cr3t-tok" not in repr(err)
    assert "[REDACTED]" in err.message


def test_repr_and_str() -> None:
    err = error_from_response(404, b'{"error": "gone"}', H(), operation="get_machine")
    assert repr(err) == "NotFound(status=404, message='gone', request_id=None)"
    assert str(err) == "get_machine: HTTP 404: gone"


async def test_a_body_nested_too_deep_for_the_json_parser_is_an_error_not_a_crash() -> None:
    """json.loads raises RecursionError (not ValueError) on deeply nested arrays: a
    broken proxy's body made an error answer, or a 2xx one, crash the call with it."""
    from flyfakes import Script, make_client

    deep = b"[" * 100_000 + b"]" * 100_000
    err = error_from_response(502, deep, H())
    assert isinstance(err, ServerError)
    assert len(err.message) <= 500
    for reply in (httpx.Response(502, content=deep), httpx.Response(200, content=deep)):
        async with make_client(Script([reply]), max_retries=0) as api:
            with pytest.raises(FlyError):
                await api.list_machines("web")
