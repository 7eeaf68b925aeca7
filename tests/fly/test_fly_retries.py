"""Retries with a fake sleep: backoff with full jitter, Retry-After, attempt and deadline
bounds, which operations retry what; and the wait loop over 60 s calls."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest
from flyfakes import FakeTime, Script, make_client
from hypothesis import example, given, settings
from hypothesis import strategies as st

from autoscaler.fly.client import one_attempt
from autoscaler.fly.errors import (
    BadRequest,
    Conflict,
    NotFound,
    RateLimited,
    RequestTimeout,
    ServerError,
    TransportError,
    Unauthorized,
    WaitTimeout,
)

MACHINE = {"id": "m1", "state": "started"}


def status(code: int, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(code, json={"error": f"status {code}"}, headers=headers)


async def test_backoff_is_exponential_with_full_jitter() -> None:
    fake = FakeTime()
    script = Script([status(503)] * 4 + [httpx.Response(200, json=MACHINE)])
    rolls = iter([1.0, 0.5, 0.25, 0.0])
    async with make_client(script, fake, rng=lambda: next(rolls)) as api:
        machine = await api.get_machine("web", "m1")
    assert machine.id == "m1"
    # caps 0.25, 0.5, 1, 2 s, each scaled by the random roll
    assert fake.sleeps == [0.25, 0.25, 0.25, 0.0]


async def test_backoff_is_capped() -> None:
    fake = FakeTime()
    script = Script([status(500)] * 8 + [httpx.Response(200, json=[])])
    async with make_client(
        script, fake, rng=lambda: 1.0, max_retries=10, retry_deadline_s=1000
    ) as api:
        await api.list_machines("web")
    assert fake.sleeps == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


async def test_retry_after_is_honoured() -> None:
    fake = FakeTime()
    script = Script([status(429, {"Retry-After": "3"}), httpx.Response(200)])
    async with make_client(script, fake) as api:
        await api.start_machine("web", "m1")
    assert fake.sleeps == [3.0]
    assert len(script.requests) == 2


async def test_gives_up_after_max_retries() -> None:
    fake = FakeTime()
    script = Script([status(502)])
    async with make_client(script, fake, max_retries=2) as api:
        with pytest.raises(ServerError) as info:
            await api.stop_machine("web", "m1")
    assert len(script.requests) == 3
    assert info.value.status == 502


async def test_gives_up_at_the_deadline_rather_than_sleeping_past_it() -> None:
    fake = FakeTime()
    script = Script([status(429, {"Retry-After": "45"})])
    async with make_client(script, fake, retry_deadline_s=60) as api:
        with pytest.raises(RateLimited) as info:
            await api.suspend_machine("web", "m1")
    assert fake.sleeps == [45.0]  # a second 45 s pause would end past the deadline
    assert info.value.retry_after == 45.0


async def test_transport_errors_are_retried_for_safe_calls() -> None:
    fake = FakeTime()
    script = Script(
        [httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("eof"), httpx.Response(200)]
    )
    async with make_client(script, fake) as api:
        await api.cordon_machine("web", "m1")
    assert len(script.requests) == 3


async def test_a_408_to_a_call_other_than_wait_is_transient() -> None:
    # Fly's edge giving up on a request: flyctl retries it. Taken for a /wait's "not yet"
    # (WaitTimeout, not transient), a safe call failed at once.
    fake = FakeTime()
    script = Script([status(408), httpx.Response(200, json=MACHINE)])
    async with make_client(script, fake) as api:
        machine = await api.get_machine("web", "m1")
    assert machine.id == "m1"
    assert len(script.requests) == 2
    async with make_client(Script([status(408)]), FakeTime(), max_retries=0) as api:
        with pytest.raises(RequestTimeout) as info:
            await api.get_machine("web", "m1")
    assert info.value.transient
    assert not isinstance(info.value, WaitTimeout)


async def test_transport_error_surfaces_as_transport_error() -> None:
    seen: list[int | None] = []
    script = Script([httpx.ConnectError("refused")])
    async with make_client(script, max_retries=1, observer=lambda o, s, d: seen.append(s)) as api:
        with pytest.raises(TransportError) as info:
            await api.list_machines("web")
    assert info.value.status is None
    assert info.value.sent is False
    assert "ConnectError" in str(info.value)
    assert seen == [None, None]


@pytest.mark.parametrize(
    "reply", [status(503), status(429), httpx.ReadError("reset")], ids=["503", "429", "read"]
)
async def test_create_is_not_retried_once_sent(reply: httpx.Response | Exception) -> None:
    script = Script([reply, httpx.Response(200, json=MACHINE)])
    async with make_client(script) as api:
        with pytest.raises((ServerError, RateLimited, TransportError)):
            await api.create_machine("web", {"image": "nginx"})
    assert len(script.requests) == 1


async def test_create_is_retried_when_never_sent() -> None:
    script = Script([httpx.ConnectError("refused"), httpx.Response(200, json=MACHINE)])
    async with make_client(script) as api:
        machine = await api.create_machine("web", {"image": "nginx"})
    assert machine.id == "m1"
    assert len(script.requests) == 2


@pytest.mark.parametrize("code", [400, 401, 404, 409, 412, 422])
async def test_client_errors_are_not_retried(code: int) -> None:
    script = Script([status(code), httpx.Response(200)])
    async with make_client(script) as api:
        with pytest.raises((BadRequest, Unauthorized, NotFound, Conflict)) as info:
            await api.start_machine("web", "m1")
    assert info.value.status == code
    assert len(script.requests) == 1


async def test_unsupported_protocol_is_not_retried() -> None:
    script = Script([httpx.UnsupportedProtocol("ftp"), httpx.Response(200)])
    async with make_client(script) as api:
        with pytest.raises(TransportError):
            await api.get_machine("web", "m1")
    assert len(script.requests) == 1


# -- wait ----------------------------------------------------------------------------------


def timed_408(fake: FakeTime) -> Callable[[httpx.Request], httpx.Response]:
    """A 408 that, like the real server, arrives after the requested timeout."""

    def reply(request: httpx.Request) -> httpx.Response:
        fake.now += float(request.url.params["timeout"])
        return httpx.Response(
            408, json={"error": "machine failed to reach desired state, started, currently stopped"}
        )

    return reply


async def test_long_wait_loops_in_calls_of_at_most_60_seconds() -> None:
    fake = FakeTime()
    script = Script([timed_408(fake), timed_408(fake), httpx.Response(200, json={"ok": True})])
    async with make_client(script, fake) as api:
        result = await api.wait_for_machine_state("web", "m1", "started", timeout_s=150)
    assert [r.url.params["timeout"] for r in script.requests] == ["60", "60", "30"]
    assert result.ok
    assert result.state == "started"
    assert fake.sleeps == []


async def test_wait_raises_wait_timeout_at_its_own_deadline() -> None:
    fake = FakeTime()
    script = Script([timed_408(fake)])
    async with make_client(script, fake) as api:
        with pytest.raises(WaitTimeout) as info:
            await api.wait("web", "m1", "suspended", timeout_s=90)
    assert [r.url.params["timeout"] for r in script.requests] == ["60", "30"]
    assert info.value.status == 408
    assert "within 90s" in str(info.value)


async def test_wait_for_stopped_counts_the_version_read_against_its_timeout() -> None:
    """The read of the current version is part of the wait: it takes 25 s of the 100, so
    the /wait calls get the 75 s left, and the whole wait ends at 100 s, not 125 s."""
    fake = FakeTime()
    started = fake.now

    def slow_read(request: httpx.Request) -> httpx.Response:
        fake.now += 25
        return httpx.Response(200, json={**MACHINE, "instance_id": "01H"})

    script = Script([slow_read, timed_408(fake)])
    async with make_client(script, fake) as api:
        with pytest.raises(WaitTimeout) as info:
            await api.wait("web", "m1", "stopped", timeout_s=100)
    assert [r.url.path for r in script.requests] == [
        "/v1/apps/web/machines/m1",
        "/v1/apps/web/machines/m1/wait",
        "/v1/apps/web/machines/m1/wait",
    ]
    assert [r.url.params["timeout"] for r in script.requests[1:]] == ["60", "15"]
    assert all(r.url.params["instance_id"] == "01H" for r in script.requests[1:])
    assert fake.now - started == pytest.approx(100)
    assert "within 100s" in str(info.value)


async def test_early_408_does_not_spin() -> None:
    fake = FakeTime()
    script = Script([status(408)])
    async with make_client(script, fake) as api:
        with pytest.raises(WaitTimeout):
            await api.wait("web", "m1", timeout_s=5)
    assert len(script.requests) == 5  # one call per second of pause, not thousands
    assert all(s == pytest.approx(1.0) for s in fake.sleeps)


async def test_wait_for_destroyed_treats_404_as_success() -> None:
    script = Script([status(404)])
    async with make_client(script) as api:
        result = await api.wait("web", "m1", "destroyed", timeout_s=10)
        assert result.state == "destroyed"
        with pytest.raises(NotFound):
            await api.wait("web", "m1", "started", timeout_s=10)


async def test_wait_retries_server_errors_and_passes_conflicts() -> None:
    fake = FakeTime()
    script = Script([status(500), httpx.Response(200)])
    async with make_client(script, fake) as api:
        await api.wait("web", "m1")
    assert len(script.requests) == 2
    script = Script([status(412)])
    async with make_client(script, fake) as api:
        with pytest.raises(Conflict):
            await api.wait("web", "m1")


async def test_wait_request_timeout_covers_the_server_hold() -> None:
    script = Script([httpx.Response(200)])
    async with make_client(script, timeout_s=10) as api:
        await api.wait("web", "m1", timeout_s=45)
    assert script.last.extensions["timeout"]["read"] == 55


@settings(max_examples=50, deadline=None)
@given(
    codes=st.lists(st.sampled_from([429, 500, 502, 503, 504]), min_size=1, max_size=12),
    retry_after=st.one_of(st.none(), st.integers(0, 30)),
    max_retries=st.integers(0, 8),
    deadline_s=st.floats(0, 120),
    roll=st.floats(0, 1),
)
# Retry-After on a 5xx is not honoured (only a 429's is): the backoff decides.
@example(codes=[500], retry_after=0, max_retries=1, deadline_s=0.0, roll=0.5)
def test_retries_stay_within_attempts_and_deadline(
    codes: list[int], retry_after: int | None, max_retries: int, deadline_s: float, roll: float
) -> None:
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    replies = [status(c, headers) for c in codes] + [httpx.Response(200)]
    fake = FakeTime()
    script = Script(replies)

    async def run() -> bool:
        async with make_client(
            script, fake, max_retries=max_retries, retry_deadline_s=deadline_s, rng=lambda: roll
        ) as api:
            try:
                await api.cordon_machine("web", "m1")
            except (ServerError, RateLimited):
                return False
            return True

    succeeded = asyncio.run(run())
    assert len(script.requests) <= max_retries + 1
    assert sum(fake.sleeps) <= deadline_s + 1e-9
    assert succeeded == (len(script.requests) == len(codes) + 1)
    assert codes[: len(script.requests) - 1].count(429) <= 1  # a 429 is tried again once
    if not succeeded:  # it gave up only for a reason: attempts, a second 429, the deadline
        n = len(script.requests)
        backoff = roll * min(10.0, 0.25 * 2.0 ** (n - 1))
        honoured = retry_after is not None and codes[n - 1] == 429
        next_delay = float(retry_after) if honoured else backoff
        second_429 = codes[n - 1] == 429 and codes[: n - 1].count(429) == 1
        assert n == max_retries + 1 or second_429 or sum(fake.sleeps) + next_delay > deadline_s


async def test_one_attempt_tries_once_with_its_timeout_also_in_tasks_started_inside() -> None:
    """The control loop's rule: no retry loop inside a tick (the next tick is the retry),
    each call bounded by the tick's timeout; a long-poll wait keeps its own."""
    fake = FakeTime()
    timeouts: list[object] = []

    def failing(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"]["read"])
        return status(503)

    script = Script([failing])
    async with make_client(script, fake, timeout_s=30) as api:
        with one_attempt(2.0):
            with pytest.raises(ServerError):
                await api.list_machines("web")
            task = asyncio.ensure_future(api.start_machine("web", "m1"))
        with pytest.raises(ServerError):
            await task
        assert fake.sleeps == []
        assert len(script.requests) == 2
        assert timeouts == [2.0, 2.0]
        # Outside it, the same client retries as configured.
        with pytest.raises(ServerError):
            await api.list_machines("web")
    assert len(script.requests) > 3
    assert fake.sleeps


async def test_one_attempt_bounds_the_slack_of_a_wait_call_too() -> None:
    """A /wait call's HTTP timeout is the server's hold plus slack for its answer: that
    slack was the client's timeout (30 s) even in a control tick that asked for 2 s."""
    script = Script([httpx.Response(200)])
    async with make_client(script, timeout_s=30) as api:
        with one_attempt(2.0):
            await api.wait("web", "m1", timeout_s=45)
        assert script.last.extensions["timeout"]["read"] == 47
        await api.wait("web", "m1", timeout_s=45)
        assert script.last.extensions["timeout"]["read"] == 75


@pytest.mark.parametrize(
    "reply",
    [status(429, {"Retry-After": "30"}), status(503)],
    ids=["429-retry-after", "503"],
)
async def test_a_wait_retries_only_within_its_own_timeout(reply: httpx.Response) -> None:
    """wait(timeout_s=5) slept 30 s on a 429's Retry-After (or backed off for up to the
    client's retry deadline, 60 s) before trying again: its retries end at its timeout."""
    fake = FakeTime()
    started = fake.now
    script = Script([reply])
    async with make_client(script, fake, rng=lambda: 1.0, max_retries=10) as api:
        with pytest.raises((RateLimited, ServerError)):
            await api.wait("web", "m1", timeout_s=5)
    assert fake.now - started <= 5


async def test_many_retries_do_not_overflow_the_backoff() -> None:
    """2.0 ** attempt overflowed a float at the 1,025th retry (OverflowError, not the
    call's error) when max_retries and the deadline allowed that many."""
    fake = FakeTime()
    script = Script([status(503)])
    async with make_client(
        script, fake, rng=lambda: 0.0, max_retries=1100, retry_deadline_s=1e9
    ) as api:
        with pytest.raises(ServerError):
            await api.get_machine("web", "m1")
    assert len(script.requests) == 1101


async def test_a_retried_wait_call_asks_only_for_what_is_left_of_the_wait() -> None:
    """A /wait call that failed late (a 503 after 9 s of a 10 s wait) was tried again
    with the whole 10 s hold: the wait ended 19 s after it began. The retry asks the
    server to hold it for what is left, so the wait ends at its own timeout."""
    fake = FakeTime()
    started = fake.now

    def late_503(request: httpx.Request) -> httpx.Response:
        fake.now += 9
        return status(503)

    script = Script([late_503, timed_408(fake)])
    async with make_client(script, fake, timeout_s=30) as api:
        with pytest.raises(WaitTimeout):
            await api.wait("web", "m1", timeout_s=10)
    assert [r.url.params["timeout"] for r in script.requests] == ["10", "1"]
    assert script.last.extensions["timeout"]["read"] == 31  # the client's 30 s + the hold
    assert fake.now - started <= 10 + 1  # at most the 1 s a /wait call holds at least


async def test_a_wait_asks_for_what_is_left_after_its_rate_limit_turn() -> None:
    """A wait's call whose rate-limit turn was seconds away slept for it, then asked the
    server to hold it for the whole timeout on top: it asks for what is left now."""
    fake = FakeTime()
    started = fake.now
    script = Script([timed_408(fake)])
    async with make_client(script, fake, rate_limit=True, org_limit=None) as api:
        for _ in range(20):  # the burst of 3, and 17 queued: a turn 20 s away
            api.limiter.reserve("wait_for_machine_state", "web/m1")
        with pytest.raises(WaitTimeout):
            await api.wait("web", "m1", timeout_s=10)
    assert fake.sleeps == [pytest.approx(18 / 0.9)]
    assert [r.url.params["timeout"] for r in script.requests] == ["1"]  # not 10
    assert fake.now - started == pytest.approx(18 / 0.9 + 1)


async def test_a_wait_gives_up_when_the_turn_of_its_retry_is_past_its_deadline() -> None:
    """A retry of a wait's call slept for a rate-limit turn past the wait's deadline, then
    sent the call: it gives up with the failure it would have retried."""
    fake = FakeTime()
    started = fake.now

    def busy_503(request: httpx.Request) -> httpx.Response:
        for _ in range(20):  # others queue for the machine meanwhile: a turn 20 s away
            api.limiter.reserve("wait_for_machine_state", "web/m1")
        return status(503)

    script = Script([busy_503, httpx.Response(200)])
    async with make_client(script, fake, rate_limit=True, org_limit=None) as api:
        with pytest.raises(ServerError):
            await api.wait("web", "m1", timeout_s=5)
    assert len(script.requests) == 1
    assert fake.now - started <= 5


async def test_a_429_is_tried_again_once_however_many_retries_are_allowed() -> None:
    """A 429 was retried up to max_retries (5) times like a 5xx: in a storm of them every
    caller made six calls for one, each a Retry-After apart. Once now; other transient
    failures keep max_retries."""
    fake = FakeTime()
    script = Script([status(429, {"Retry-After": "2"})])
    async with make_client(script, fake, max_retries=5) as api:
        with pytest.raises(RateLimited) as info:
            await api.get_machine("web", "m1")
    assert len(script.requests) == 2
    assert fake.sleeps == [2.0]
    assert info.value.status == 429
    # A 429 among other failures: the 503s are retried, the second 429 is not.
    script = Script([status(503), status(429), status(503), status(429), httpx.Response(200)])
    async with make_client(script, FakeTime(), max_retries=5) as api:
        with pytest.raises(RateLimited):
            await api.list_machines("web")
    assert len(script.requests) == 4


async def test_a_429_makes_the_other_calls_of_the_machine_wait_out_its_retry_after() -> None:
    """Our bucket of an action on a machine may be full while Fly's is empty (another
    client of the organization spent it): after a 429 the next call of the same action
    and machine went at once, to be refused again. It now waits for the Retry-After (or
    one refill, without one); other machines and actions are not held back."""
    fake = FakeTime()
    limited = status(429, {"Retry-After": "5"})
    script = Script([limited, httpx.Response(200)])
    async with make_client(script, fake, rate_limit=True, max_retries=0) as api:
        with pytest.raises(RateLimited):
            await api.start_machine("web", "m1")
        await api.start_machine("web", "m2")
        await api.stop_machine("web", "m1")
        assert fake.sleeps == []
        await api.start_machine("web", "m1")
        assert fake.sleeps == [pytest.approx(5.0)]
        # Without a Retry-After: the bucket is empty, the next call waits one refill.
        script.replies = [status(429), httpx.Response(200)]
        script.requests.clear()
        with pytest.raises(RateLimited):
            await api.suspend_machine("web", "m3")
        await api.suspend_machine("web", "m3")
        assert fake.sleeps[1:] == [pytest.approx(1 / 0.9)]
