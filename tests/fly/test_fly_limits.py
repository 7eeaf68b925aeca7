"""Token buckets at Fly's documented limits, driven by a fake clock."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from flyfakes import FakeTime, Script, make_client
from hypothesis import given
from hypothesis import strategies as st

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
