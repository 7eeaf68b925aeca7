"""When each app's loop runs: every tick while the app is in use, slowly while it sleeps,
and never in step with the other apps.

One process may scale a thousand apps. Listing each one's machines every second would cost
a thousand API calls a second, nearly all to learn that sleeping apps still sleep. So:

- **Sleeping apps are polled slowly.** An app is asleep when none of its machines is started
  or moving, no action of ours and no wake is under way, no request is in flight or held,
  the policy wants no machine, and no request came for ``control.idle_poll_s``. Its loop
  then lists it every ``control.idle_poll_s`` instead of every ``control.tick_s``, or
  sooner when its last decision changes by itself before then (``Decision.next_check``:
  the adaptive keep-alive's pre-warm window opens). A request
  for it does not wait for that poll: the proxy's wake runs at once (``FleetView.wake``),
  and the wake nudges the loop (:meth:`Pacer.nudge`) so that ticks follow every
  ``control.tick_s`` from then on.
- **Ticks are spread in time.** Each loop starts at a random offset within its first period,
  and every pause is up to ``control.tick_jitter`` longer, at random, so loops started
  together drift apart instead of ticking in phase. An app that falls asleep waits between
  one and two idle periods, drawn uniformly, before its first slow poll: apps that all fell
  asleep at once (the first reads at start-up, which the org budget spreads over a few
  seconds only) then poll spread over a whole period, not all within those seconds, and no
  gap between two polls is ever shorter than the period (but for a tick at ``next_check``).
- **Apps in use are listed only when something may have changed.** An app whose machines
  all rest (none starting, suspending, ...), with no action of ours under way and no wake,
  ticks every ``control.tick_s`` all the same (the load changes every second), but decides
  from the list it read last, and lists again every ``control.steady_list_s`` (5 s) to
  learn what others did (a ``fly deploy``, a crash). It lists at the next tick after any
  action of ours ended, after a failed tick, and once the proxy held one of its machines
  out of routing (a connection it could not make); and before it acts: a tick whose
  decision from the last list has actions reads and decides again (:func:`must_list`).
  Between lists its machines change only through our own actions, which write what they
  did into the runtime and the view as they go.
- **Busy apps come first when the API budget is short.** A sleeping app's poll goes only
  while the client's org-wide budget has tokens to spare (:meth:`Budget.spare`); otherwise it
  is put off by a tick, and the ticks of apps in use and the wakes get the budget. A poll put
  off for two idle periods goes anyway, so no app goes unread for long.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Protocol

from autoscaler.control.runtime import AppRuntime
from autoscaler.control.view import AppView
from autoscaler.scaling.fleet import RESTING_STATES, STARTED

ASLEEP_STATES = RESTING_STATES - {STARTED}
"""Machines in these states cost nothing to watch: only we (or someone else) can move them."""
OVERDUE_POLLS = 2.0
"""A sleeping app unread for this many idle periods is polled whatever the budget says."""


class Budget(Protocol):
    """The org-wide API budget as the loop sees it (``fly.limits.RateLimiter`` is one)."""

    def spare(self) -> bool: ...


class Unlimited:
    """No budget to share (a fake API in tests, or a client with rate limits off)."""

    def spare(self) -> bool:
        return True


def asleep(rt: AppRuntime, view: AppView, now: float, quiet_s: float) -> bool:
    """Whether ``rt`` may be polled slowly: nothing runs, nothing moves, nobody asks."""
    if not rt.read_once or rt.running or rt.desired or rt.wake_lock.locked():
        return False
    if view.waking is not None or view.in_flight or view.queued:
        return False
    if view.last_request_at is not None and now - view.last_request_at < quiet_s:
        return False
    return all(m.state in ASLEEP_STATES for m in rt.machines.values())


def steady(rt: AppRuntime, view: AppView) -> bool:
    """Whether a list of ``rt`` would only say what we know: nothing of ours under way,
    no machine between states, and the proxy found every machine where the list said."""
    if rt.running or view.waking is not None or rt.wake_lock.locked():
        return False
    seen = rt.unreachable
    for mid, up in view.upstreams.items():
        if up.unhealthy_until > seen.get(mid, 0.0):
            return False  # held out of routing since the last list: the proxy knows more
    return all(m.state in RESTING_STATES for m in rt.machines.values())


def stalled_after_s(tick_s: float, idle_poll_s: float, jitter: float) -> float:
    """How long the loops may go without a tick before they count as stalled
    (``/readyz?control=1``, the stalled-loop alert): when every app sleeps, one is polled
    every ``idle_poll_s`` (plus jitter), the first poll after it fell asleep, or one the
    budget put off, up to two periods later; plus 5 s of slack."""
    return max(5.0, 5 * tick_s, OVERDUE_POLLS * idle_poll_s * (1 + jitter) + 5)


def must_list(rt: AppRuntime, view: AppView, now: float, every_s: float) -> bool:
    """Whether this tick of ``rt`` reads its machines from the API first."""
    listed_at = rt.listed_at
    if listed_at is None or rt.changed_at >= listed_at or now - listed_at >= every_s:
        return True
    return not steady(rt, view)


def note_listed(rt: AppRuntime, view: AppView) -> None:
    """After a list: the proxy's marks known so far are answered by it."""
    rt.unreachable = {
        mid: up.unhealthy_until for mid, up in view.upstreams.items() if up.unhealthy_until
    }


def overdue(rt: AppRuntime, now: float, idle_poll_s: float) -> bool:
    """A sleeping app's poll was put off so long that it goes whatever the budget says."""
    return rt.last_tick_at is None or now - rt.last_tick_at >= OVERDUE_POLLS * idle_poll_s


class Pacer:
    """One app loop's timing: a random first offset, jittered pauses, and a nudge that cuts
    a slow pause short."""

    def __init__(self, rng: Callable[[], float], sleep: Callable[[float], Awaitable[None]]) -> None:
        self._rng = rng
        self._sleep = sleep
        self._nudged = asyncio.Event()
        self._slow = False

    def offset(self, period_s: float) -> float:
        """Where in its first period the loop starts: uniformly at random."""
        return period_s * self._rng()

    def period(self, period_s: float, jitter: float) -> float:
        """A pause of ``period_s`` lengthened by up to ``jitter`` of it, at random: never
        shorter, so an app is never polled more often than its period says."""
        return period_s * (1.0 + jitter * self._rng())

    def next_pause(self, slow: bool, tick_s: float, idle_poll_s: float, jitter: float) -> float:
        """The pause after a tick: ``tick_s`` in use; ``idle_poll_s`` asleep, the first
        of them lengthened by up to a whole period (see the module docstring)."""
        first, self._slow = slow and not self._slow, slow
        if first:
            return idle_poll_s * (1.0 + self._rng())
        return self.period(idle_poll_s if slow else tick_s, jitter)

    def nudge(self) -> None:
        """End the slow pause under way (or the next one) at once: the app is wanted."""
        self._nudged.set()

    def settle(self) -> None:
        """The loop is about to tick: a nudge from before is answered by this tick."""
        self._nudged.clear()

    async def pause(self, delay_s: float, *, nudgeable: bool) -> None:
        """Sleep ``delay_s``; a nudgeable pause ends early when :meth:`nudge` is called.

        Only slow polls are nudgeable: racing two tasks costs more than a short pause that
        a nudge could shorten by a tick at most.
        """
        if not nudgeable:
            await self._sleep(delay_s)
            return
        if self._nudged.is_set():
            return
        sleeper: asyncio.Future[None] = asyncio.ensure_future(self._sleep(delay_s))
        nudged: asyncio.Future[bool] = asyncio.ensure_future(self._nudged.wait())
        try:
            await asyncio.wait((sleeper, nudged), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, nudged):
                task.cancel()
            for task in (sleeper, nudged):
                with contextlib.suppress(asyncio.CancelledError):
                    if task.done():
                        task.result()
