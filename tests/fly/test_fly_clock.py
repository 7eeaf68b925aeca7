"""Fly's clock from the answers' Date headers (fly/clock.py), on a fake monotonic clock:
the estimate is never ahead of Fly's time, comes close to it, forgets, and follows a step."""

from __future__ import annotations

import math
from email.utils import formatdate

import httpx
import pytest
from flyfakes import FakeTime, Script, make_client
from hypothesis import given
from hypothesis import strategies as st

from autoscaler.fly.clock import WINDOW_S, FlyClock
from autoscaler.fly.errors import ServerError

EPOCH = 1_750_000_000.37  # Fly's time when the fake monotonic clock reads 0


class Sky:
    """A monotonic clock (``now``), Fly's clock (``fly``: ``EPOCH`` + now + ``step``) and
    our time of day, ``ahead`` of Fly's."""

    def __init__(self, ahead: float = 30.0) -> None:
        self.now = 1000.0
        self.step = 0.0
        self.ahead = ahead

    def clock(self) -> float:
        return self.now

    def fly(self) -> float:
        return EPOCH + self.now + self.step

    def wall(self) -> float:
        return self.fly() + self.ahead

    def answer(self, fly_clock: FlyClock, made_after: float, back: float) -> None:
        """A request sent now, its answer made ``made_after`` s later (the Date: Fly's time
        then, floored) and back ``back`` s after that."""
        sent = self.now
        self.now += made_after
        date = formatdate(math.floor(self.fly()), usegmt=True)
        self.now += back
        fly_clock.observe(sent, self.now, date)


def test_without_a_date_fly_s_time_is_our_time_of_day() -> None:
    sky = Sky()
    fly_clock = FlyClock(sky.clock, sky.wall)
    assert fly_clock.now() == sky.wall()
    garbage_dates = (
        None,
        "",
        "yesterday",
        "Thu, 01 Jan 1970 00:00:00 GMT",
        # Numbers too large for C (an OverflowError out of the parse, then out of the call
        # whose answer it was: a successful call failed).
        "Thu, 01 Jan 99999999999999999999 00:00:00 GMT",
        "Thu, 01 Jan 2026 00:00:00 +99999999999999999999",
    )
    for garbage in garbage_dates:
        fly_clock.observe(sky.now, sky.now + 0.1, garbage)
    assert fly_clock.offset() is None
    assert fly_clock.now() == sky.wall()


def test_one_answer_gives_fly_s_time_never_ahead_and_within_a_second_and_its_trip() -> None:
    """Our time of day is 30 s ahead of Fly's: read against it, a start of Fly's looked
    30 s older than it was. One answer brings the estimate within its return trip plus
    a second, and never ahead of Fly's time."""
    sky = Sky(ahead=30.0)
    fly_clock = FlyClock(sky.clock, sky.wall)
    sky.answer(fly_clock, made_after=0.02, back=0.03)
    assert sky.fly() - 1.03 <= fly_clock.now() <= sky.fly()
    sky.now += 7.0  # it runs on with the monotonic clock
    assert sky.fly() - 1.03 <= fly_clock.now() <= sky.fly()


def test_answers_at_different_fractions_of_a_second_come_close() -> None:
    sky = Sky()
    fly_clock = FlyClock(sky.clock, sky.wall)
    for _ in range(12):  # one a tick, 0.37 s apart: every fraction of a second
        sky.answer(fly_clock, made_after=0.01, back=0.01)
        sky.now += 0.35
    assert sky.fly() - 0.1 <= fly_clock.now() <= sky.fly()


@given(
    ahead=st.floats(-100, 100),
    trips=st.lists(
        st.tuples(st.floats(0, 2), st.floats(0, 2), st.floats(0, 30)), min_size=1, max_size=30
    ),
)
def test_the_estimate_is_never_ahead_of_fly_s_time(
    ahead: float, trips: list[tuple[float, float, float]]
) -> None:
    sky = Sky(ahead)
    fly_clock = FlyClock(sky.clock, sky.wall)
    for made_after, back, pause in trips:
        sky.answer(fly_clock, made_after, back)
        assert fly_clock.now() <= sky.fly() + 1e-6
        sky.now += pause
        assert fly_clock.now() <= sky.fly() + 1e-6


def test_a_step_of_fly_s_clock_either_way_is_followed_at_the_next_answer() -> None:
    """Fly's clock stepped back: the answers before it would put Fly's time ahead of Fly's
    (a start would look older than it is); the first answer after the step that
    contradicts them drops them. Stepped forward: likewise (they would lag behind)."""
    sky = Sky()
    fly_clock = FlyClock(sky.clock, sky.wall)
    for _ in range(5):
        sky.answer(fly_clock, made_after=0.05, back=0.05)
        sky.now += 0.3
    sky.step = -5.0
    sky.answer(fly_clock, made_after=0.05, back=0.05)
    assert sky.fly() - 1.1 <= fly_clock.now() <= sky.fly()
    sky.step = +5.0
    sky.answer(fly_clock, made_after=0.05, back=0.05)
    assert sky.fly() - 1.1 <= fly_clock.now() <= sky.fly()


def test_bounds_older_than_the_window_are_forgotten() -> None:
    sky = Sky()
    fly_clock = FlyClock(sky.clock, sky.wall)
    sky.answer(fly_clock, made_after=0.0, back=0.0)
    assert fly_clock.offset() is not None
    sky.now += WINDOW_S + WINDOW_S / 10
    assert fly_clock.offset() is None
    assert fly_clock.now() == sky.wall()  # nothing left: our time of day again


async def test_the_client_reads_fly_s_time_from_its_answers() -> None:
    """The client's ``fly_time`` (what the wake reads a start's time against) comes from
    the Date of its answers, on its own clock: our time of day does not enter it. An
    error's Date may be a proxy's, on the proxy's clock: it is not read."""
    fake = FakeTime()

    def answer(request: httpx.Request) -> httpx.Response:
        fake.now += 0.05  # the answer is made 0.05 s after the request, back 0.05 s later
        date = formatdate(math.floor(EPOCH + fake.now), usegmt=True)
        fake.now += 0.05
        return httpx.Response(200, json=[], headers={"Date": date})

    proxy_date = formatdate(EPOCH + fake.now + 3600, usegmt=True)
    refused = httpx.Response(502, text="bad gateway", headers={"Date": proxy_date})
    async with make_client(Script([refused, answer]), fake, max_retries=0) as api:
        with pytest.raises(ServerError):
            await api.list_machines("web")
        assert api.fly_clock.offset() is None
        await api.list_machines("web")
        assert EPOCH + fake.now - 1.1 <= api.fly_time() <= EPOCH + fake.now
