"""Differential fuzzing of the machine-facing HTTP/1.1 parser (upstream.py) against h11.

The response side of test_fuzz_h1.py. Hypothesis builds the bytes a machine might answer
with (valid ones, and ones with conflicting or duplicate Content-Lengths, Content-Length
and chunked together, odd Transfer-Encodings, chunk extensions, trailers, obs-fold lines,
bad chunk sizes, 1xx interim answers (one or several, one with a body), a 204 or 304 with
a body, the answer to HEAD, bytes after the answer, a 101 to an upgrade or to a plain
request, HTTP/1.0), feeds them to upstream's Connection in process (a fake transport: no
socket) whole and split at drawn boundaries, and parses the same bytes with h11 as the
client that sent the request.
What must hold:

- the proxy never relays an answer h11 refuses: what it takes whole has h11's status,
  headers and body bytes, and the head it writes to the client frames those same bytes;
- the interim answers it relays (1xx but 100 and 101) are h11's, and a client reads them
  as such before the final answer;
- the connection goes back to the pool only when h11 says the answer was framed cleanly
  and nothing followed it;
- an answer built valid is taken whole by both (and reused when it keeps alive);
- where the stream is split changes nothing.

CI runs a fixed budget; ``AUTOSCALER_FUZZ=1`` runs it long.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoscaler.proxy import forward, upstream

from . import fuzzing
from .fuzzing import chunk_frames
from .inproc import FakeTransport, _settle

LONG = os.environ.get("AUTOSCALER_FUZZ") == "1"
EXAMPLES = 5000 if LONG else 200
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not LONG,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
AUTHORITY = "m.test:80"


@dataclass
class Verdict:
    """What became of one answer: ``kind`` is "ok" (taken whole), "101" (switched
    protocols: ``body`` holds the bytes after the head) or "refused" (no whole answer)."""

    kind: str
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    reused: bool = False
    why: str = ""
    # The 1xx answers before it, but 100 and 101: what the proxy relays.
    interim: list[tuple[int, list[tuple[bytes, bytes]]]] = field(default_factory=list)


def _norm(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    # h11 lower-cases the value of Transfer-Encoding (a hop-by-hop field: never relayed).
    return [
        (
            k.lower(),
            v.strip(b" \t").lower() if k.lower() == b"transfer-encoding" else v.strip(b" \t"),
        )
        for k, v in headers
    ]


def _request(method: bytes, upgrade: bool) -> h11.Request:
    headers = [("Host", "m.test")]
    if upgrade:
        headers += [("Connection", "Upgrade"), ("Upgrade", "websocket")]
    return h11.Request(method=method, target="/", headers=headers)


def h11_verdict(method: bytes, upgrade: bool, data: bytes) -> Verdict:
    """h11 as the client that sent the request: the answer, and whether the connection
    could carry the next request (the machine has not closed it yet)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(_request(method, upgrade))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    out: Verdict | None = None
    chunks: list[bytes] = []
    interim: list[tuple[int, list[tuple[bytes, bytes]]]] = []
    eof = False
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if eof:
                    return Verdict("refused", why="h11 needs more data after EOF")
                eof = True
                conn.receive_data(b"")
                continue
            if event is h11.PAUSED:  # after a 101
                assert out is not None, event
                assert out.kind == "101", event
                out.body = conn.trailing_data[0]
                return out
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    out = Verdict("101", 101, list(event.headers.raw_items()), interim=interim)
                elif event.status_code != 100:
                    interim.append((event.status_code, list(event.headers.raw_items())))
            elif isinstance(event, h11.Response):
                headers = list(event.headers.raw_items())
                out = Verdict("ok", event.status_code, headers, interim=interim)
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert out is not None
                out.body = b"".join(chunks)
                # Whole, and the client's turn: reusable if it keeps alive (not MUST_CLOSE),
                # was not ended by the close, and nothing followed it.
                out.reused = (
                    not eof
                    and conn.their_state is h11.DONE
                    and conn.our_state is h11.DONE
                    and not conn.trailing_data[0]
                )
                return out
            elif isinstance(event, h11.ConnectionClosed):
                assert out is not None
                return out
    except h11.ProtocolError as exc:
        return Verdict("refused", why=f"h11: {exc}")


async def proxy_verdict(method: bytes, upgrade: bool, pieces: list[bytes]) -> Verdict:
    """The answer as upstream's Connection takes it, read as server.py's relay does: the
    exchange is released once the answer is whole (the pool may keep the connection);
    after the last piece the machine closes the connection."""
    pool = upstream.Pool(4, 1.0)
    conn = upstream.Connection(AUTHORITY, 8190)
    transport = FakeTransport()
    transport.protocol = conn
    conn.connection_made(transport)
    interim: list[tuple[int, list[tuple[bytes, bytes]]]] = []

    def relay(
        status: int, reason: str, raw: list[tuple[bytes, bytes]], version: str, source: object
    ) -> None:
        assert not ex._head.done(), "an interim answer after the final one"
        assert getattr(source, "conn", None) is conn  # that connection's reading, to pause
        interim.append((status, list(raw)))

    ex = upstream._start(pool, conn, method.decode(), b"", None, False, None, upgrade, relay)
    out: Verdict | None = None
    switched: upstream.Connection | None = None

    async def finish() -> Verdict:
        nonlocal switched
        try:
            await ex._head
        except upstream.UpstreamError as exc:
            return Verdict("refused", why=repr(exc))
        if ex.status == 101:
            switched = ex.detach()
            return Verdict("101", 101, ex.headers)
        chunks = []
        try:
            while chunk := await ex.body.read():
                chunks.append(chunk)
        except upstream.UpstreamError as exc:
            return Verdict("refused", why=f"mid-body: {exc!r}")
        return Verdict("ok", ex.status, ex.headers, b"".join(chunks))

    try:
        for piece in pieces:
            if transport.closed:
                break
            conn.data_received(piece)
            await _settle()
            if out is None and ex._head.done() and (ex.complete or ex.status == 101):
                out = await finish()
                if switched is None:
                    ex.release()
        if out is not None and out.kind == "ok":
            out.reused = pool.take(AUTHORITY) is conn
        transport.close()  # the machine closes the connection
        await _settle()
        if out is None:
            out = await finish()
            if switched is None:
                ex.release()
        if switched is not None:
            out.body = b"".join(switched.early)
        out.interim = interim
        return out
    finally:
        await pool.close()


def relayed(method: bytes, ours: Verdict) -> Verdict:
    """What a client of the proxy reads: the head forward.response_head writes for the
    answer and the body framed as server.py frames it, parsed by h11."""
    with_body = method != b"HEAD" and ours.status not in (204, 304)
    head = forward.response_head(
        ours.status,
        "X",
        ours.headers,
        upstream_version="1.1",
        request_id="id",
        wake=None,
        client_version="1.1",
        keep_alive=True,
        with_body=with_body,
    )
    body = ours.body if with_body else b""
    if head.chunked:
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    interim = b"".join(forward.interim_head(s, "X", raw, "1.1") for s, raw in ours.interim)
    return h11_verdict(method, False, interim + head.data + body)


# --- the generator ------------------------------------------------------------------------

_token = fuzzing.token
_value = fuzzing.value
_HOP_NAMES = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"upgrade"}
_token = _token.filter(lambda t: t.lower() not in _HOP_NAMES and not t.startswith(b"proxy-"))


@st.composite
def chunked(draw: st.DrawFn, body: bytes) -> tuple[bytes, bool]:
    """A chunked encoding of ``body`` (extensions, trailers, upper-case hex), and whether
    it was left valid."""
    out, valid = chunk_frames(draw, body)
    last = draw(st.sampled_from([b"0\r\n", b"000\r\n", b"0;e=1\r\n"]))
    trailers = draw(st.sampled_from([b"", b"X-T: 1\r\n", b"Content-Length: 99\r\n"]))
    out.append(last + trailers + b"\r\n")
    # llhttp refuses a Content-Length trailer (RFC 9110 6.5.1 forbids framing fields in
    # trailers), h11 ignores it: the proxy breaks off such an answer mid-body, as it does
    # any broken body. Stricter, and harmless: not counted as valid.
    valid = valid and not trailers.startswith(b"Content-Length")
    bad = draw(st.sampled_from([None, None, b"zz\r\n", b"-1\r\n", b"1\r\nab\r\n", b"1 2\r\n"]))
    if bad is not None:
        out.insert(draw(st.integers(0, len(out) - 1)), bad)
        valid = False
    return b"".join(out), valid


_INTERIM = [
    b"",
    b"",
    b"",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 103 Hints\r\nLink: </a>\r\n\r\n",
    b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 \r\nLink: </a>\r\nLink: </b>\r\n\r\n"
    b"HTTP/1.1 199 Odd\r\nX-A: 1\r\nConnection: x-a\r\n\r\n",
]
# A 1xx ends at its head (RFC 9112 6.3); llhttp reads a body after one it does not know,
# so the proxy refuses such an answer, which h11 takes: stricter, and harmless.
_INTERIM_WITH_BODY = b"HTTP/1.1 150 Odd\r\nContent-Length: 2\r\n\r\nab"
_AFTER = [b"", b"", b"", b"junk", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]


@dataclass
class Case:
    method: bytes
    upgrade: bool
    data: bytes
    valid: bool  # built to be taken whole by both
    keep_alive: bool  # and then reusable


@st.composite
def answer(draw: st.DrawFn) -> Case:
    method = draw(st.sampled_from([b"GET", b"GET", b"POST", b"HEAD"]))
    upgrade = method == b"GET" and draw(st.integers(0, 5)) == 0
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.1", b"1.0"]))
    status = draw(st.sampled_from([200, 200, 201, 404, 500, 204, 304, 101]))
    if upgrade and draw(st.booleans()):
        status = 101
    reason = draw(st.sampled_from([b"OK", b"", b"Odd Reason"]))
    valid = status != 101 or upgrade
    keep_alive = version == b"1.1"
    headers: list[bytes] = []
    for _ in range(draw(st.integers(0, 2))):
        headers.append(draw(_token) + b": " + draw(_value))
    connection = draw(st.sampled_from([None, None, b"close", b"keep-alive"]))
    if connection == b"keep-alive" and version == b"1.0":
        # llhttp keeps an HTTP/1.0 connection alive on "Connection: keep-alive" (RFC 9112
        # 9.3), h11 never does: h11 is merely stricter, not a difference worth reporting.
        connection = b"close"
    if connection is not None:
        headers.append(b"Connection: " + connection)
        keep_alive = keep_alive and connection != b"close"
    if status == 101:
        headers += [b"Upgrade: websocket", b"Connection: Upgrade"]
    body = draw(st.binary(max_size=30))
    if draw(st.integers(0, 15)) == 0:
        body = bytes(range(256)) * 80  # over PARSE_SLICE: parsed in slices
    no_body = method == b"HEAD" or status in (204, 304, 101)
    framing = draw(
        st.sampled_from(
            ["none", "length", "length", "chunked", "chunked", "both", "two-lengths",
             "same-lengths", "length-list", "bad-length", "short-length", "te-gzip",
             "te-identity", "te-twice", "te-case", "length-zeros", "obs-fold"]
        )
    )  # fmt: skip
    if status == 101:
        framing = "none"
    if no_body and framing.startswith("te-"):
        # No body follows a 204, a 304 or the answer to HEAD, so the proxy never looks at
        # their Transfer-Encoding (and does not relay it); h11 refuses one other than
        # chunked all the same. h11 is stricter, harmlessly: not generated.
        framing = "chunked"
    payload = b""
    if framing == "none":
        payload = b"" if no_body else body
        if not no_body or (method == b"HEAD" and status not in (204, 304)):
            # The body ends with the connection. The answer to HEAD has none, but llhttp
            # cannot be told it answers HEAD, so the proxy closes a connection h11 would
            # reuse: a lost keep-alive, harmless.
            keep_alive = False
    elif framing in ("length", "length-zeros"):
        headers.append(
            (b"Content-Length: 00%d " if framing == "length-zeros" else b"Content-Length: %d")
            % len(body)
        )
        payload = body
    elif framing == "chunked":
        headers.append(b"Transfer-Encoding: chunked")
        payload, ok = draw(chunked(body))
        valid = valid and (ok or no_body)
    elif framing == "both":
        headers += [b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked"]
        payload, _ = draw(chunked(body))
        # llhttp refuses both even where no body follows (a 204, the answer to HEAD), which
        # h11 lets pass: stricter, and harmless.
        valid = False
    elif framing in ("two-lengths", "same-lengths", "length-list"):
        other = len(body) if framing != "two-lengths" else len(body) + 1
        if framing == "length-list":
            headers.append(b"Content-Length: %d, %d" % (len(body), other))
        else:
            headers += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % other]
        payload = body
        valid = False
    elif framing == "bad-length":
        headers.append(draw(st.sampled_from([b"Content-Length: +3", b"Content-Length: 0x5"])))
        payload = body
        valid = False
    elif framing == "short-length":
        headers.append(b"Content-Length: %d" % (len(body) + 5))
        payload = body
        valid = valid and no_body
    elif framing.startswith("te-"):
        value = {
            "te-gzip": b"gzip, chunked",
            "te-identity": b"identity",
            "te-twice": b"chunked",
            "te-case": b"Chunked",
        }
        headers.append(b"Transfer-Encoding: " + value[framing])
        if framing == "te-twice":
            headers.append(b"Transfer-Encoding: chunked")
        payload, ok = draw(chunked(body))
        if framing == "te-case":
            valid = valid and (ok or no_body)
        else:
            valid = valid and no_body and framing != "te-twice"
    else:  # obs-fold
        headers += [b"X-Folded: a\r\n  b", b"Content-Length: %d" % len(body)]
        payload = body
        valid = False
    if no_body and payload:
        valid = valid and status != 101
        keep_alive = False  # bytes after the answer
    if status == 101:
        keep_alive = False
    data = b"HTTP/" + version + b" %d " % status + reason + b"\r\n"
    data += b"".join(h + b"\r\n" for h in headers) + b"\r\n" + payload
    interim = draw(st.sampled_from(_INTERIM))
    if draw(st.integers(0, 15)) == 0:
        interim = _INTERIM_WITH_BODY
        valid = False
    data = interim + data
    after = draw(st.sampled_from(_AFTER))
    if after:
        data += after
        keep_alive = False
    if draw(st.integers(0, 4)) == 0 and data:  # a stray byte somewhere
        at = draw(st.integers(0, len(data) - 1))
        stray = draw(st.sampled_from([b"\x00", b"\r", b"\n", b"\x7f"]))
        if stray in (b"\r", b"\n") and (at == 0 or data[at - 4 : at] == b"\r\n\r\n"):
            # llhttp skips CR and LF before a status line, h11 refuses a bare one: harmless,
            # as the client gets a status line the proxy wrote. Not a difference to report.
            stray = b"\x00"
        data = data[:at] + stray + data[at:]
        valid = keep_alive = False
    return Case(method, upgrade, data, valid, keep_alive and valid)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def _check(case: Case, ours: Verdict) -> None:
    theirs = h11_verdict(case.method, case.upgrade, case.data)
    where = (case, ours, theirs)
    if ours.kind != "refused":
        assert theirs.kind == ours.kind, ("the proxy took an answer h11 refuses", where)
        assert ours.status == theirs.status, where
        assert _norm(ours.headers) == _norm(theirs.headers), where
        assert ours.body == theirs.body, where
        assert [(s, _norm(h)) for s, h in ours.interim] == [
            (s, _norm(h)) for s, h in theirs.interim
        ], where
    if ours.reused:
        assert theirs.reused, ("the proxy reuses a connection h11 would not", where)
    if case.valid:
        assert theirs.kind != "refused", ("h11 refused an answer built valid", where)
        assert ours.kind == theirs.kind, where
        assert ours.reused == case.keep_alive, where
        assert theirs.reused or not case.keep_alive, where
    if ours.kind == "ok":
        client = relayed(case.method, ours)
        assert client.kind == "ok", ("the client could not read the relayed answer", where)
        assert (client.status, client.body) == (ours.status, ours.body), (client, where)
        assert [s for s, _ in client.interim] == [s for s, _ in ours.interim], (client, where)


def _same(a: Verdict, b: Verdict) -> bool:
    return (a.kind, a.status, a.body, a.reused, a.interim) == (
        b.kind,
        b.status,
        b.body,
        b.reused,
        b.interim,
    )


@FUZZ
@given(answer(), st.lists(st.integers(0, 10_000), max_size=6))
async def test_answers_agree_with_h11_split_anywhere(case: Case, cuts: list[int]) -> None:
    whole = await proxy_verdict(case.method, case.upgrade, [case.data])
    _check(case, whole)
    split = await proxy_verdict(case.method, case.upgrade, _split(case.data, cuts))
    assert _same(split, whole), (case, cuts, split, whole)


FIXED = [
    (
        b"GET",
        False,
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
    ),
    (b"HEAD", False, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
    (b"GET", False, b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\nabc"),
    (b"GET", False, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
    (
        b"GET",
        True,
        b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nab",
    ),
    (b"GET", False, b"HTTP/1.0 200 OK\r\n\r\nuntil the end"),
]


async def test_every_byte_boundary_gives_the_same_verdict() -> None:
    for method, upgrade, data in FIXED:
        whole = await proxy_verdict(method, upgrade, [data])
        _check(Case(method, upgrade, data, False, False), whole)
        for at in range(1, len(data)):
            split = await proxy_verdict(method, upgrade, [data[:at], data[at:]])
            assert _same(split, whole), (data, at, split, whole)


# --- what the fuzzer found ------------------------------------------------------------------


async def test_a_body_after_the_answer_to_head_closes_the_connection() -> None:
    """llhttp cannot be told an answer is to HEAD, so the parser that read its head took
    the rest of the same read for the body the head announced, and the connection went
    back to the pool with a machine out of step. Wherever the read ends, it now closes."""
    for tail in (b"hello", b"he", b"0\r\n\r\n", b"1\r\na\r\n0\r\n\r\n"):
        framing = b"Transfer-Encoding: chunked" if tail[:1].isdigit() else b"Content-Length: 5"
        data = b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n\r\n" + tail
        for at in range(len(data) - len(tail), len(data) + 1):
            pieces = [data[:at], data[at:]] if at < len(data) else [data]
            ours = await proxy_verdict(b"HEAD", False, pieces)
            assert (ours.kind, ours.status, ours.reused) == ("ok", 200, False), (data, at)
    clean = await proxy_verdict(b"HEAD", False, [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"])
    assert clean.reused


async def test_a_control_character_in_the_reason_phrase_is_refused() -> None:
    """llhttp lets a NUL or DEL through in the reason phrase, and the proxy relays the
    reason as it came: a strict client (h11) would refuse the status line it wrote. Other
    control characters are no VCHAR either (RFC 9112 4), though h11 lets them pass."""
    for reason in (b"\x00OK", b"O\x01K", b"O\x7fK"):
        data = b"HTTP/1.1 200 " + reason + b"\r\nContent-Length: 0\r\n\r\n"
        ours = await proxy_verdict(b"GET", False, [data])
        assert ours.kind == "refused", reason
        if reason == b"\x00OK":
            assert h11_verdict(b"GET", False, data).kind == "refused", reason
    fine = b"HTTP/1.1 200 Fine\tby \xe9t\xe9\r\nContent-Length: 0\r\n\r\n"
    assert (await proxy_verdict(b"GET", False, [fine])).kind == "ok"
