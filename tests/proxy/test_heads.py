"""The response head the client gets: built from the machine's, with cached pieces that
must not leak from one answer into another; and the request ids the heads carry."""

from __future__ import annotations

from autoscaler.proxy.accounting import RequestIds
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


def test_header_names_are_matched_in_any_case_and_each_spelling_is_classified_once() -> None:
    # The heads remember what each spelling of a name is (keep, drop, read): a spelling
    # seen before must get the same treatment, and case must never matter.
    for _ in range(2):
        for spelling in (b"Keep-Alive", b"KEEP-ALIVE", b"keep-alive"):
            assert b"timeout=5" not in head(200, "OK", [(spelling, b"timeout=5")])
        answer = head(
            200,
            "OK",
            [
                (b"CONTENT-LENGTH", b"0"),  # known length: no chunked framing added
                (b"x-request-id", b"upstream-id"),  # the machine's id is kept, not replaced
                (b"Proxy-Authenticate", b"Basic"),
                (b"X-Forwarded-For", b"10.0.0.1"),  # a response header like any other
                (b"VIA", b"1.0 cdn"),
            ],
        )
        assert b"Transfer-Encoding" not in answer
        assert b"\r\nx-request-id: upstream-id\r\n" in answer
        assert b"rid" not in answer
        assert b"Proxy-Authenticate" not in answer
        assert b"\r\nX-Forwarded-For: 10.0.0.1\r\n" in answer
        assert b"\r\nVia: 1.0 cdn, 1.1 autoscaler\r\n" in answer


def test_request_ids_count_in_32_hex_digits_across_the_table_s_blocks() -> None:
    ids = RequestIds(0xABC)
    made = [ids.next() for _ in range(3 * 4096 + 5)]
    assert made == [f"{0xABC:016x}{n:016x}" for n in range(1, 3 * 4096 + 6)]
