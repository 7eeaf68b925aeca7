"""The response head the client gets: built from the machine's, with cached pieces that
must not leak from one answer into another."""

from __future__ import annotations

from autoscaler.proxy.forward import response_head


def head(
    status: int,
    reason: str,
    raw: list[tuple[bytes, bytes]],
    *,
    wake: str | None = "none",
    upstream_version: str = "1.1",
) -> bytes:
    return response_head(
        status,
        reason,
        raw,
        upstream_version=upstream_version,
        request_id="rid",
        wake=wake,
        client_version="1.1",
        keep_alive=True,
        with_body=True,
    ).data


def test_the_machines_reason_phrase_and_each_wake_kind_pass_through() -> None:
    length = [(b"Content-Length", b"0")]
    assert head(299, "Custom Thing", length).startswith(b"HTTP/1.1 299 Custom Thing\r\n")
    assert head(299, "Other", length).startswith(b"HTTP/1.1 299 Other\r\n")
    assert head(200, "", length).startswith(b"HTTP/1.1 200 \r\n")
    for wake in ("none", "resume", "start"):
        assert f"\r\nFly-Autoscaler-Wake: {wake}\r\n".encode() in head(200, "OK", length, wake=wake)
    assert b"Fly-Autoscaler-Wake" not in head(200, "OK", length, wake=None)


def test_via_names_the_machines_version_and_keeps_earlier_hops() -> None:
    length = [(b"Content-Length", b"0")]
    assert b"\r\nVia: 1.0 autoscaler\r\n" in head(200, "OK", length, upstream_version="1.0")
    assert b"\r\nVia: 1.1 autoscaler\r\n" in head(200, "OK", length)
    earlier = [*length, (b"Via", b"1.1 cdn")]
    assert b"\r\nVia: 1.1 cdn, 1.1 autoscaler\r\n" in head(200, "OK", earlier)


def test_headers_named_by_connection_are_dropped_only_when_named() -> None:
    raw = [(b"Content-Length", b"0"), (b"X-Hop", b"1"), (b"X-Kept", b"2")]
    assert b"X-Hop: 1" in head(200, "OK", raw)
    named = head(200, "OK", [*raw, (b"Connection", b"x-hop")])
    assert b"X-Hop" not in named
    assert b"X-Kept: 2" in named
