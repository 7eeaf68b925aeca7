"""Client-side token buckets at Fly's documented Machines API limits.

Fly limits each action per machine (or per app, for app-level actions): 1 request/s with
bursts of 3; Get Machine 5/s with bursts of 10; app deletion 100 per minute. A bucket per
(action, machine or app id), and one for app deletions of the organization (its scope is
not documented; per app, each bucket would serve one deletion), keeps the autoscaler under
those limits, so that it causes no 429s in normal operation. A caller over the limit waits
(through the injected ``sleep``) rather than failing.

The client refills its buckets a little slower than Fly does (``headroom``, 0.9 by default):
a request reaches the server some milliseconds after its token was taken here, and with
exact rates a request that left late followed by one that left early would look, to the
server, like two requests less than a second apart.

Fly documents no limit for the list and app/volume reads; they get Get Machine's, as the
emulator gives them.

Each ``acquire`` reserves its token at once, possibly driving the bucket negative, and then
sleeps for the deficit. Concurrent callers therefore queue in arrival order without a lock,
and the sleep can be faked in tests with a clock that only moves when told. A caller
cancelled while it waits gives its token back if nobody queued behind it (``refund``):
with others behind it, a newcomer would share the turn of one of them. The client gives
it back the same way when a call is cancelled after its turn but before it was sent.

A 429 from the server empties the bucket of its (action, id) for its Retry-After (at most a
minute; without one, until the next refill): Fly's bucket is empty whatever ours says, and
the other calls of the pair should wait rather than go to be refused
(``RateLimiter.rate_limited``). That holds for the calls already queued too: their turns
move past the hold, in the same order and spacing, and each waiter, woken at the turn it
was given, looks again and waits on when a 429 came meanwhile (a caller's turn is a
function of its ticket and the bucket's state, ``TokenBucket.wait_for``).

Besides the buckets per (action, id), every call may also take a token from one bucket
shared by all calls of the client: the organization's budget (``org``). Fly documents no
such limit (only the per-action, per-machine ones above); it is ours, so that a thousand
apps ticking at once, or a burst of wakes, reach the API as a bounded stream. Calls that can
wait (the slow polls of sleeping apps) ask :meth:`RateLimiter.spare` first and go only while
the budget is more than half full: when it runs short, the ticks of apps with traffic and
the wakes of held requests get what is left (docs/benchmarks.md, "Many apps").
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace

from autoscaler.fly.errors import RateLimited

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Limit:
    rate_per_s: float
    burst: float

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0 or self.burst < 1:
            raise ValueError(f"expected rate_per_s > 0 and burst >= 1, got {self}")


DEFAULT_LIMIT = Limit(rate_per_s=1.0, burst=3.0)
_READ = Limit(rate_per_s=5.0, burst=10.0)
DEFAULT_LIMITS: Mapping[str, Limit] = {
    "get_machine": _READ,
    "list_machines": _READ,
    "list_apps": _READ,
    "get_app": _READ,
    "list_volumes": _READ,
    "get_volume": _READ,
    "delete_app": Limit(rate_per_s=100.0 / 60.0, burst=100.0),
}
DEFAULT_HEADROOM = 0.9
# The org-wide budget of MachinesClient (config: fly.org_rate_limit_per_s, fly.org_burst).
DEFAULT_ORG_LIMIT = Limit(rate_per_s=150.0, burst=100.0)
SPARE_FRACTION = 0.5
"""Calls that can wait go only while the org bucket holds more than this share of its burst."""
MAX_HOLD_OFF_S = 60.0
"""The longest a 429's Retry-After holds back the other calls of its action and machine."""


@dataclass(frozen=True, slots=True)
class Reservation:
    """A token taken by ``RateLimiter.take``: wait ``delay`` seconds, or ``refund`` it."""

    delay: float
    bucket: TokenBucket | None = None
    ticket: int = 0
    org_ticket: int = 0
    drains: int = 0
    """The bucket's ``drains`` when this turn was given (or last looked at): a 429 since
    may have moved it."""


class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_s``; ``reserve`` returns how long to wait."""

    __slots__ = ("drains", "limit", "taken", "tokens", "updated")

    def __init__(self, limit: Limit, now: float) -> None:
        self.limit = limit
        self.tokens = limit.burst
        self.updated = now
        self.taken = 0  # tokens reserved so far: the ticket of the last one in line
        self.drains = 0  # 429s taken (``drain``): queued callers look at their turns again

    def refund(self, ticket: int) -> bool:
        """Give back the token of ``ticket`` if it is the last one taken (nobody queued
        behind it); whether it was."""
        if ticket != self.taken:
            return False
        self.taken -= 1
        self.tokens = min(self.limit.burst, self.tokens + 1.0)
        return True

    def drain(self, now: float, seconds: float) -> None:
        """Empty the bucket as the server's is (it answered 429): the next turn comes no
        sooner than ``seconds`` from ``now``, nor than one refill. Callers already queued
        are that next turn and the ones after it: their turns move back together, as far
        as the first of them needs (``wait_for`` then says so to each)."""
        self._refill(now)
        rate = self.limit.rate_per_s
        # The ticket k places before the last one is due in -(tokens + k) / rate; the
        # first still queued is k_first before it (-1: nobody queued, the next newcomer).
        k_first = max(-1, math.ceil(-self.tokens) - 1)
        self.tokens = min(self.tokens, -k_first - max(seconds, 1.0 / rate) * rate)
        self.drains += 1

    def wait_for(self, ticket: int, now: float) -> float:
        """Seconds until the turn of ``ticket`` (one ``reserve`` gave out), 0 if it came."""
        self._refill(now)
        return max(0.0, -(self.tokens + self.taken - ticket)) / self.limit.rate_per_s

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.limit.burst, self.tokens + elapsed * self.limit.rate_per_s)
        self.updated = max(self.updated, now)

    def reserve(self, now: float) -> float:
        """Take one token (going into debt if needed); seconds until it is really ours."""
        self._refill(now)
        self.tokens -= 1.0
        self.taken += 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.limit.rate_per_s

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.limit.burst

    def available(self, now: float) -> float:
        """Tokens in the bucket now (negative while callers wait for theirs)."""
        self._refill(now)
        return self.tokens


class RateLimiter:
    """Buckets keyed by (action, machine or app id), made on first use; at most
    ``max_buckets`` of them."""

    def __init__(
        self,
        limits: Mapping[str, Limit] | None = None,
        *,
        default: Limit = DEFAULT_LIMIT,
        enabled: bool = True,
        headroom: float = DEFAULT_HEADROOM,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.monotonic,
        max_buckets: int = 10_000,
        org: Limit | None = None,
    ) -> None:
        self.limits = dict(DEFAULT_LIMITS if limits is None else limits)
        self.default = default
        self.enabled = enabled
        if not 0 < headroom <= 1:
            raise ValueError(f"expected 0 < headroom <= 1, got {headroom}")
        self.headroom = headroom
        if max_buckets < 1:
            raise ValueError(f"expected max_buckets >= 1, got {max_buckets}")
        self._sleep = sleep
        self._clock = clock
        self._max_buckets = max_buckets
        # Least recently used first.
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()
        self.org: TokenBucket | None = None
        if org is not None:
            self.org = TokenBucket(Limit(org.rate_per_s * headroom, org.burst), clock())

    def limit_for(self, action: str) -> Limit:
        """The limit a bucket of ``action`` runs at (the documented one, times headroom)."""
        limit = self.limits.get(action, self.default)
        return Limit(limit.rate_per_s * self.headroom, limit.burst)

    def reserve(self, action: str, key: str) -> float:
        """Take a token for (action, key), and one of the org budget, now; seconds the caller
        must wait before sending (the later of the two)."""
        return self.take(action, key).delay

    def take(self, action: str, key: str) -> Reservation:
        """``reserve``, with what ``refund`` needs to give the tokens back."""
        if not self.enabled:
            return Reservation(0.0)
        now = self._clock()
        org_wait = 0.0 if self.org is None else self.org.reserve(now)
        bucket = self._bucket(action, key, now)
        delay = max(org_wait, bucket.reserve(now))
        org_ticket = 0 if self.org is None else self.org.taken
        return Reservation(delay, bucket, bucket.taken, org_ticket, bucket.drains)

    def _bucket(self, action: str, key: str, now: float) -> TokenBucket:
        bucket = self._buckets.get((action, key))
        if bucket is None:
            if len(self._buckets) >= self._max_buckets:
                self._evict(now)
            bucket = self._buckets[(action, key)] = TokenBucket(self.limit_for(action), now)
        else:
            self._buckets.move_to_end((action, key))
        return bucket

    def rate_limited(self, action: str, key: str, retry_after: float | None) -> None:
        """The server answered 429 to (action, key): its bucket for them is empty, whatever
        ours said (another client of the organization, a deploy, spent it). Ours is emptied
        to match, for ``retry_after`` seconds when the server said so: every call of the
        pair, a retry included, then waits its turn here rather than going to be refused.
        A Retry-After is taken up to ``MAX_HOLD_OFF_S``: Fly's limits are per second, and a
        broken one (an hour) must not stop the pair's calls for as long."""
        if self.enabled:
            now = self._clock()
            hold = min(retry_after or 0.0, MAX_HOLD_OFF_S)
            self._bucket(action, key, now).drain(now, hold)

    def refund(self, reservation: Reservation) -> None:
        """Give back the tokens of a call that will not be sent, each only if nobody took
        one of the same bucket after it (a newcomer would then share a queued turn)."""
        if reservation.bucket is not None:
            reservation.bucket.refund(reservation.ticket)
            if self.org is not None:
                self.org.refund(reservation.org_ticket)

    def moved(self, reservation: Reservation) -> bool:
        """Whether a 429 of the reservation's (action, id) came since its turn was given
        (or since ``turn`` last looked): a caller whose turn had come but that has not
        sent yet (it waited for a connection) would go into the hold."""
        bucket = reservation.bucket
        return bucket is not None and bucket.drains != reservation.drains

    def spare(self) -> bool:
        """Whether a call that can wait should go now: the org budget is more than
        ``SPARE_FRACTION`` full (always, without an org budget or with limits off)."""
        if not self.enabled or self.org is None:
            return True
        return self.org.available(self._clock()) - 1.0 >= SPARE_FRACTION * self.org.limit.burst

    async def acquire(self, action: str, key: str, max_wait_s: float | None = None) -> float:
        """Wait until a request for (action, key) is within the limit; the seconds waited.

        A turn further away than ``max_wait_s`` is not waited for: the token goes back and
        :class:`~autoscaler.fly.errors.RateLimited` is raised, its ``retry_after`` the wait.
        """
        return (await self.turn(action, key, max_wait_s)).delay

    async def turn(self, action: str, key: str, max_wait_s: float | None = None) -> Reservation:
        """``acquire``, with the reservation: a caller that ends up not sending (cancelled
        before it did) gives its tokens back with ``refund``."""
        reservation = self.take(action, key)
        if max_wait_s is not None and reservation.delay > max_wait_s:
            self.refund(reservation)
            text = (
                f"client-side rate limit: the turn of {action} for {key} is"
                f" {reservation.delay:.2f}s away, over this call's {max_wait_s:g}s"
            )
            raise RateLimited(None, text, retry_after=reservation.delay)
        started = self._clock()
        delay = reservation.delay
        bucket = reservation.bucket
        moved = False
        while True:
            if delay > 0:
                try:
                    await self._sleep(delay)
                except asyncio.CancelledError:
                    self.refund(reservation)  # never sent: the token is not spent
                    raise
            if bucket is None or not self.moved(reservation):
                break
            # A 429 of the pair came while this caller waited: its turn moved past the
            # hold (TokenBucket.drain). The org budget's turn came already, or does now.
            now = self._clock()
            moved = True
            reservation = replace(reservation, drains=bucket.drains)
            delay = bucket.wait_for(reservation.ticket, now)
            if self.org is not None:
                delay = max(delay, self.org.wait_for(reservation.org_ticket, now))
            if max_wait_s is not None and now - started + delay > max_wait_s:
                self.refund(reservation)
                text = (
                    f"client-side rate limit: a 429 moved the turn of {action} for {key}"
                    f" {delay:.2f}s away, past this call's {max_wait_s:g}s"
                )
                raise RateLimited(None, text, retry_after=delay)
        if moved:  # the delay: what the caller waited in all
            return replace(reservation, delay=self._clock() - started)
        return reservation

    def _evict(self, now: float) -> None:
        """Make room for one more bucket: drop the full ones, else the least recently used."""
        # A full bucket is indistinguishable from a new one, so dropping it changes nothing.
        for key in [k for k, b in self._buckets.items() if b.full(now)]:
            del self._buckets[key]
        # None full: dropping one forgets the tokens it lacks (and the debt of callers still
        # queued on it), which its key may then spend early. The least recently used bucket
        # has had the longest to refill, so it is the one likely to lack the least.
        while len(self._buckets) >= self._max_buckets:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
