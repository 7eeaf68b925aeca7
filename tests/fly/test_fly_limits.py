"""Token buckets at Fly's documented limits, driven by a fake clock."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from control.fakes import settle
from flyfakes import FakeTime, ParkedTime, Script, make_client
from hypothesis import given
from hypothesis import strategies as st

from autoscaler.fly.client import MachinesClient, one_attempt
from autoscaler.fly.errors import RateLimited, TransportError
from autoscaler.fly.limits import DEFAULT_LIMIT, Limit, RateLimiter, TokenBucket


def test_bucket_bursts_then_refills() -> None:
    bucket = TokenBucket(Limit(1.0, 3), now=0.0)
    assert [bucket.reserve(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve(0.0) == pytest.approx(1.0)
    assert bucket.reserve(0.0) == pytest.approx(2.0)  # queued behind the previous one
    assert bucket.reserve(10.0) == 0.0  # refilled (never above the burst)
    assert bucket.tokens == pytest.approx(2.0)


async def test_default_limits_one_per_second_burst_three() -> None:
    fake = FakeTime()
    limiter = RateLimiter(headroom=1.0, sleep=fake.sleep, clock=fake.clock)
    waits = [await limiter.acquire("start_machine", "web/m1") for _ in range(5)]
    assert waits == [0.0, 0.0, 0.0, pytest.approx(1.0), pytest.approx(1.0)]
    assert fake.sleeps == [pytest.approx(1.0), pytest.approx(1.0)]


async def test_get_machine_five_per_second_burst_ten() -> None:
    fake = FakeTime()
    limiter = RateLimiter(headroom=1.0, sleep=fake.sleep, clock=fake.clock)
    for _ in range(10):
        assert await limiter.acquire("get_machine", "web/m1") == 0.0
    assert await limiter.acquire("get_machine", "web/m1") == pytest.approx(0.2)


async def test_keys_are_independent() -> None:
    fake = FakeTime()
    limiter = RateLimiter(headroom=1.0, sleep=fake.sleep, clock=fake.clock)
    for _ in range(3):
        await limiter.acquire("stop_machine", "web/m1")
    assert await limiter.acquire("stop_machine", "web/m2") == 0.0
    assert await limiter.acquire("start_machine", "web/m1") == 0.0
    assert await limiter.acquire("stop_machine", "web/m1") > 0


async def test_concurrent_callers_queue_in_order() -> None:
    fake = FakeTime()
    limiter = RateLimiter(
        limits={}, default=Limit(2.0, 1), headroom=1.0, sleep=fake.sleep, clock=fake.clock
    )
    delays = [limiter.reserve("a", "k") for _ in range(4)]
    assert delays == [0.0, pytest.approx(0.5), pytest.approx(1.0), pytest.approx(1.5)]


async def test_disabled_never_waits() -> None:
    fake = FakeTime()
    limiter = RateLimiter(enabled=False, sleep=fake.sleep, clock=fake.clock)
    for _ in range(100):
        assert await limiter.acquire("start_machine", "web/m1") == 0.0
    assert fake.sleeps == []
    assert len(limiter) == 0


def test_configurable_limits_and_validation() -> None:
    limiter = RateLimiter({"start_machine": Limit(10, 20)}, headroom=1.0)
    assert limiter.limit_for("start_machine") == Limit(10, 20)
    assert limiter.limit_for("stop_machine") == DEFAULT_LIMIT
    with pytest.raises(ValueError, match="rate_per_s"):
        Limit(0, 1)
    with pytest.raises(ValueError, match="headroom"):
        RateLimiter(headroom=1.5)
    with pytest.raises(ValueError, match="max_buckets"):
        RateLimiter(max_buckets=0)


async def test_headroom_refills_a_little_slower_than_fly() -> None:
    fake = FakeTime()
    limiter = RateLimiter(sleep=fake.sleep, clock=fake.clock)  # default headroom 0.9
    assert limiter.limit_for("stop_machine") == Limit(0.9, 3)
    for _ in range(3):
        await limiter.acquire("stop_machine", "web/m1")
    assert await limiter.acquire("stop_machine", "web/m1") == pytest.approx(1 / 0.9)


def test_full_buckets_are_pruned_when_the_map_is_full() -> None:
    fake = FakeTime()
    limiter = RateLimiter(sleep=fake.sleep, clock=fake.clock, max_buckets=3)
    for i in range(3):
        limiter.reserve("get_app", f"app{i}")
    fake.now += 100  # all refilled
    limiter.reserve("get_app", "app3")
    assert len(limiter) == 1


def test_the_cap_is_hard_and_the_least_recently_used_bucket_goes() -> None:
    """No bucket is full, yet a new key still finds room: the one used longest ago goes,
    and the others keep what they owe."""
    fake = FakeTime()
    limiter = RateLimiter(
        limits={}, default=Limit(1.0, 1), headroom=1.0, clock=fake.clock, max_buckets=3
    )
    for key in ("a", "b", "c"):
        assert limiter.reserve("stop_machine", key) == 0.0
    fake.now += 0.5
    assert limiter.reserve("stop_machine", "a") == pytest.approx(0.5)  # a: used again
    assert limiter.reserve("stop_machine", "d") == 0.0  # the map is full: b goes
    assert len(limiter) == 3
    assert limiter.reserve("stop_machine", "a") == pytest.approx(1.5)  # still queued
    assert limiter.reserve("stop_machine", "c") == pytest.approx(0.5)  # still half empty
    assert len(limiter) == 3
    assert limiter.reserve("stop_machine", "b") == 0.0  # forgotten: a new bucket
    assert len(limiter) == 3


def test_full_buckets_go_before_the_least_recently_used() -> None:
    fake = FakeTime()
    limits = {"slow": Limit(0.01, 1), "fast": Limit(100.0, 1)}
    limiter = RateLimiter(limits, headroom=1.0, clock=fake.clock, max_buckets=3)
    limiter.reserve("slow", "a")  # the least recently used, but far from full
    limiter.reserve("fast", "b")
    limiter.reserve("slow", "c")
    fake.now += 1  # b is full again; a and c are not
    limiter.reserve("slow", "d")
    assert len(limiter) == 3
    assert limiter.reserve("slow", "a") > 0  # a was kept: its wait is remembered


@given(
    max_buckets=st.integers(1, 5),
    steps=st.lists(st.tuples(st.integers(0, 9), st.floats(0, 2)), max_size=80),
)
def test_the_map_never_exceeds_max_buckets(
    max_buckets: int, steps: list[tuple[int, float]]
) -> None:
    fake = FakeTime()
    limiter = RateLimiter(clock=fake.clock, max_buckets=max_buckets)
    for key, gap in steps:
        fake.now += gap
        limiter.reserve("stop_machine", f"web/m{key}")
        assert len(limiter) <= max_buckets


async def test_client_waits_instead_of_failing() -> None:
    """Five quick cordons of one machine: the client sleeps (fake) rather than raising."""
    fake = FakeTime()
    script = Script([httpx.Response(200)])
    async with make_client(script, fake, rate_limit=True) as api:
        await asyncio.gather(*(api.cordon_machine("web", "m1") for _ in range(5)))
        assert len(script.requests) == 5
        # The burst of 3 goes at once; the 4th and 5th each wait for a refill (at 0.9/s).
        assert fake.sleeps == [pytest.approx(1 / 0.9), pytest.approx(1 / 0.9)]
        await api.cordon_machine("web", "m2")  # another machine: no wait
    assert len(fake.sleeps) == 2


@given(
    rate=st.floats(0.1, 20),
    burst=st.integers(1, 12),
    gaps=st.lists(st.floats(0, 3), min_size=1, max_size=60),
)
def test_sends_never_exceed_the_limit(rate: float, burst: int, gaps: list[float]) -> None:
    """Whatever the arrival pattern, the send times the bucket hands out stay within
    ``burst + rate * window`` in every window, and keep arrival order."""
    bucket = TokenBucket(Limit(rate, burst), now=0.0)
    now, sends = 0.0, []
    for gap in gaps:
        now += gap
        sends.append(now + bucket.reserve(now))
    assert sends == sorted(sends)
    for i in range(len(sends)):
        for j in range(i, len(sends)):
            assert j - i + 1 <= burst + rate * (sends[j] - sends[i]) + 1e-6


async def test_the_org_budget_caps_calls_across_machines_and_apps() -> None:
    fake = FakeTime()
    limiter = RateLimiter(headroom=1.0, sleep=fake.sleep, clock=fake.clock, org=Limit(2.0, 4))
    # Every call is on a bucket of its own, so only the org budget can make one wait.
    waits = [limiter.reserve("start_machine", f"app{i}/m{i}") for i in range(8)]
    assert waits == [0.0] * 4 + [pytest.approx(x) for x in (0.5, 1.0, 1.5, 2.0)]


def test_calls_that_can_wait_go_only_while_the_org_budget_is_half_full() -> None:
    fake = FakeTime()
    limiter = RateLimiter(headroom=1.0, sleep=fake.sleep, clock=fake.clock, org=Limit(1.0, 10))
    spared = []
    for i in range(8):
        spared.append(limiter.spare())
        limiter.reserve("list_machines", f"app{i}")
    # 10 tokens: a spare call leaves at least 5 behind it.
    assert spared == [True] * 5 + [False] * 3
    assert RateLimiter(sleep=fake.sleep, clock=fake.clock).spare()  # no org budget
    assert RateLimiter(enabled=False, org=Limit(1.0, 1)).spare()


async def test_calls_beyond_max_connections_wait_for_a_free_one() -> None:
    in_flight = peak = 0
    release = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await release.wait()
        in_flight -= 1
        return httpx.Response(200, json=[])

    transport = httpx.MockTransport(handler)
    # A token of a real length: the process-wide redactor takes every token a client is
    # given out of every later log line, "t" included.
    token = "fly-limits-t3st-t0ken"
    async with MachinesClient(
        "http://127.0.0.1:4280", token, transport=transport, rate_limit=False, max_connections=2
    ) as api:
        calls = [asyncio.create_task(api.list_machines(f"app{i}")) for i in range(5)]
        for _ in range(20):
            await asyncio.sleep(0)
        assert peak == 2  # the other three wait in the client, not in httpx's pool
        with one_attempt(0.01), pytest.raises(TransportError) as caught:
            await api.list_machines("late")  # no slot frees up within its timeout
        assert not caught.value.sent
        release.set()
        assert await asyncio.gather(*calls) == [[]] * 5
    assert peak == 2


@pytest.mark.parametrize("org", [False, True], ids=["machine-bucket", "org-budget"])
async def test_a_caller_cancelled_while_it_waits_gives_its_token_back(org: bool) -> None:
    """A call cancelled while it waited for its token (a wake given up, a shutdown) left
    the token spent: the next call of the machine (or of the whole client, for the org
    budget) waited a turn for a request that never went."""
    fake = FakeTime()
    never = asyncio.Event()

    async def blocked(seconds: float) -> None:
        await never.wait()

    limit = Limit(1.0, 1)
    limiter = RateLimiter(
        limits={}, default=Limit(100.0, 100) if org else limit, headroom=1.0,
        sleep=blocked, clock=fake.clock, org=limit if org else None,
    )  # fmt: skip
    assert limiter.reserve("start_machine", "web/m1") == 0.0
    waiting = asyncio.ensure_future(limiter.acquire("start_machine", "web/m1"))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert limiter.reserve("start_machine", "web/m1") == pytest.approx(1.0)  # not 2.0


def test_only_the_last_in_line_gives_its_token_back() -> None:
    """A token given back by a caller with others queued behind it would let a newcomer
    share their turn: more calls at once than the burst. It stays spent then."""
    fake = FakeTime()
    limiter = RateLimiter(limits={}, default=Limit(1.0, 1), headroom=1.0, clock=fake.clock)
    limiter.reserve("a", "k")
    first = limiter.take("a", "k")
    second = limiter.take("a", "k")
    assert (first.delay, second.delay) == (pytest.approx(1.0), pytest.approx(2.0))
    limiter.refund(first)  # second still waits for the turn after it
    assert limiter.reserve("a", "k") == pytest.approx(3.0)


async def test_in_a_tick_a_call_does_not_wait_longer_than_its_bound_for_a_token() -> None:
    """A control tick's call is one attempt within ``one_attempt``'s bound; the wait for
    its rate-limit token was not bounded (an org budget deep in debt: seconds). It fails
    at once with RateLimited, its Retry-After the wait, and gives its token back."""
    fake = FakeTime()
    script = Script([httpx.Response(200)])
    async with make_client(script, fake, rate_limit=True, org_limit=None) as api:
        for _ in range(6):  # the burst of 3, and three more queued
            api.limiter.reserve("start_machine", "web/m1")
        turn = 4 / 0.9
        with one_attempt(2.0), pytest.raises(RateLimited) as info:
            await api.start_machine("web", "m1")
        assert info.value.retry_after == pytest.approx(turn)
        assert info.value.status is None
        assert script.requests == []
        assert fake.sleeps == []
        assert api.limiter.reserve("start_machine", "web/m1") == pytest.approx(turn)
        # Within the bound, the call waits for its turn as before.
        with one_attempt(10.0):
            await api.start_machine("web", "m1")
        assert fake.sleeps == [pytest.approx(5 / 0.9)]
        assert len(script.requests) == 1


async def test_app_deletions_share_one_bucket_of_100_a_minute() -> None:
    """Fly limits app deletions to 100 a minute; keyed by the app deleted, each bucket
    served one deletion and the limit never held (deleting 200 apps sent 200 at once)."""
    fake = FakeTime()
    script = Script([httpx.Response(200)])
    async with make_client(script, fake, rate_limit=True, org_limit=None) as api:
        for i in range(101):
            await api.delete_app(f"app{i}")
    assert len(script.requests) == 101
    assert fake.sleeps == [pytest.approx(60 / 100 / 0.9)]  # the 101st waits for a refill


@pytest.mark.parametrize("org", [False, True], ids=["machine-bucket", "org-budget"])
async def test_a_call_cancelled_while_it_waits_for_a_connection_gives_its_token_back(
    org: bool,
) -> None:
    """A call that had its rate-limit token and was cancelled while it waited for one of
    the client's connections kept the token spent (only a cancel in the wait for the
    token gave it back): the next call waited a turn for a request that never went."""
    fake = FakeTime()
    release = asyncio.Event()
    sent: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        await release.wait()
        return httpx.Response(200, json=[])

    one = Limit(1.0, 1)
    async with MachinesClient(
        "http://127.0.0.1:4280", "fly-limits-t3st-t0ken", transport=httpx.MockTransport(handler),
        sleep=fake.sleep, clock=fake.clock, max_connections=1,
        limits={} if org else {"start_machine": one},
        org_limit=Limit(1.0, 2) if org else None,
    ) as api:  # fmt: skip
        busy = asyncio.ensure_future(api.list_machines("other"))  # holds the connection
        waiting = asyncio.ensure_future(api.start_machine("web", "m1"))
        for _ in range(20):
            await asyncio.sleep(0)
        assert sent == ["/v1/apps/other/machines"]
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert api.limiter.reserve("start_machine", "web/m1") == 0.0  # not 1 / 0.9
        release.set()
        assert await busy == []
    assert fake.sleeps == []


def test_a_429_empties_its_bucket_for_its_retry_after_at_most_a_minute() -> None:
    fake = FakeTime()
    limiter = RateLimiter(headroom=1.0, clock=fake.clock, org=Limit(10.0, 10))
    limiter.rate_limited("start_machine", "web/m1", 5.0)
    assert limiter.reserve("start_machine", "web/m1") == pytest.approx(5.0)
    assert limiter.reserve("start_machine", "web/m1") == pytest.approx(6.0)  # in line after
    assert limiter.reserve("start_machine", "web/m2") == 0.0  # other machines: untouched
    limiter.rate_limited("stop_machine", "web/m1", 3600.0)  # a broken Retry-After
    assert limiter.reserve("stop_machine", "web/m1") == pytest.approx(60.0)
    limiter.rate_limited("cordon_machine", "web/m1", None)  # none: one refill
    assert limiter.reserve("cordon_machine", "web/m1") == pytest.approx(1.0)
    off = RateLimiter(enabled=False, clock=fake.clock)
    off.rate_limited("start_machine", "web/m1", 5.0)
    assert off.reserve("start_machine", "web/m1") == 0.0  # limits off: nothing is held


async def test_a_429_holds_back_the_calls_already_waiting_for_their_turn() -> None:
    """A 429 emptied the bucket for its Retry-After for the calls that came after it, but
    the calls already queued kept the turns they had been given before it: they went
    while the hold lasted, to meet more 429s. Now every queued turn moves past the hold,
    in the same order and spacing; a caller with a bound on its wait that the hold
    carries past it gives up with RateLimited."""
    fake = ParkedTime()
    limiter = RateLimiter(
        limits={}, default=Limit(1.0, 1), headroom=1.0, sleep=fake.sleep, clock=fake.clock
    )
    assert await limiter.acquire("start_machine", "web/m1") == 0.0  # sent now
    first = asyncio.ensure_future(limiter.acquire("start_machine", "web/m1"))  # in 1 s
    second = asyncio.ensure_future(limiter.acquire("start_machine", "web/m1"))  # in 2 s
    bounded = asyncio.ensure_future(limiter.acquire("start_machine", "web/m1", max_wait_s=4))
    await settle()
    limiter.rate_limited("start_machine", "web/m1", 5.0)  # the call sent now: 429, 5 s
    await fake.advance(3.0)  # all three turns (1, 2, 3 s) were due by now
    assert not first.done()
    assert not second.done()
    with pytest.raises(RateLimited):  # its turn is now further than its 4 s
        await bounded
    await fake.advance(2.0)
    assert first.done()
    assert not second.done()
    assert first.result() == pytest.approx(5.0)
    await fake.advance(1.0)
    assert second.result() == pytest.approx(6.0)
    # Behind them: the next caller's turn (the bounded one's token was the last: back).
    assert limiter.reserve("start_machine", "web/m1") == pytest.approx(1.0)


async def test_a_429_holds_back_the_client_s_calls_queued_before_it() -> None:
    """End to end through the client: calls of a machine queued in its bucket when a 429
    came for it reach the server only once its Retry-After has passed."""
    fake = ParkedTime()
    sent_at: list[float] = []
    answer_first = asyncio.Event()

    async def answer(request: httpx.Request) -> httpx.Response:
        sent_at.append(fake.now)
        if len(sent_at) == 1:
            await answer_first.wait()  # the others queue meanwhile
            return httpx.Response(429, json={"error": "slow down"}, headers={"Retry-After": "5"})
        return httpx.Response(200, json={})

    async with make_client(
        answer,
        fake,
        rate_limit=True,
        limits={"start_machine": Limit(1.0, 1)},
        max_retries=0,
        org_limit=None,
    ) as api:
        calls = [asyncio.ensure_future(api.start_machine("web", "m1")) for _ in range(3)]
        await settle()
        assert sent_at == [fake.now]  # the first is sent, the other two wait their turns
        answer_first.set()
        with pytest.raises(RateLimited):
            await calls[0]
        await fake.advance(20.0)
        await asyncio.gather(*calls[1:])
    start = sent_at[0]
    assert [t - start for t in sent_at] == [0.0, pytest.approx(5.0), pytest.approx(5 + 1 / 0.9)]


async def test_a_429_holds_back_a_call_of_its_pair_waiting_for_a_connection() -> None:
    """A call whose turn had come but which waited for a free connection when a 429 of its
    action and machine arrived went as soon as it had one, into the hold. It takes a new
    turn now, behind the hold."""
    fake = ParkedTime()
    sent: list[tuple[str, float]] = []
    answer = {"other": asyncio.Event(), "m1": asyncio.Event()}

    async def reply(request: httpx.Request) -> httpx.Response:
        sent.append((request.url.path, fake.now))
        if len(sent) == 1:
            await answer["other"].wait()  # holds a connection
        elif len(sent) == 2:
            await answer["m1"].wait()
            return httpx.Response(429, json={"error": "slow down"}, headers={"Retry-After": "5"})
        return httpx.Response(200, json=[])

    async with make_client(
        reply, fake, rate_limit=True, max_connections=2, max_retries=0, org_limit=None
    ) as api:
        busy = asyncio.ensure_future(api.list_machines("other"))
        await settle()
        refused = asyncio.ensure_future(api.start_machine("web", "m1"))
        await settle()
        waiting = asyncio.ensure_future(api.start_machine("web", "m1"))  # its token: now
        await settle()
        assert len(sent) == 2  # the third waits for a connection
        start = fake.now
        answer["m1"].set()
        with pytest.raises(RateLimited):
            await refused
        await fake.advance(20.0)
        await waiting
        answer["other"].set()
        await busy
    assert sent[2][0] == "/v1/apps/web/machines/m1/start"
    assert sent[2][1] - start >= 5.0
