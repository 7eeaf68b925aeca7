"""Hypothesis pieces both differential fuzzers of the HTTP/1.1 code draw from (requests
in test_fuzz_h1.py, responses in test_fuzz_h1_responses.py)."""

from __future__ import annotations

from hypothesis import strategies as st

token = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=8).map(str.encode)
value = st.text("abcdefghijklmnopqrstuvwxyz0123456789 ;=,/", max_size=12).map(str.encode)


def chunk_frames(draw: st.DrawFn, body: bytes) -> tuple[list[bytes], bool]:
    """``body`` as chunks (random sizes, upper-case hex, chunk extensions) without the last
    chunk, and whether they were left valid."""
    out = []
    valid = True
    rest = body
    while rest:
        n = draw(st.integers(1, len(rest)))
        size = b"%x" % n
        if draw(st.booleans()):
            size = size.upper()
        ext = draw(st.sampled_from([b"", b";a=b", b';x="q"', b" ;bad"]))
        valid = valid and ext != b" ;bad"
        out.append(size + ext + b"\r\n" + rest[:n] + b"\r\n")
        rest = rest[n:]
    return out, valid
