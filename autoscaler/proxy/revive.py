"""Machines held out because nothing listened come back as soon as something does.

The proxy holds a machine out of routing when it refuses a connection (a short skip,
``proxy.unhealthy_backoff_s``) and, after ``eject_after`` failures in a row, for an
ejection (``eject_base_s``, doubling). Both are waits of seconds, and on Fly they cost the
most where nothing else can serve:

- **A cold start by someone else.** Fly reports a machine ``started`` once its VM runs the
  app's process, not once that process listens; the app's own start-up comes after. Our
  own starts wait for the port (control/actions.py), but a machine that a ``fly deploy``,
  Fly's restart policy or another tool started arrives with a list that says ``started``:
  requests go to it at once and are refused, and the skip that follows would hold them
  for ``unhealthy_backoff_s`` after the app was ready.
- **A crash that is repaired.** A process that died (its connections reset, then refused)
  is ejected; Fly's restart policy, or the app's own supervisor, may bring it back in a
  second or two, while the ejection lasts ``eject_base_s``. A list of the app's machines
  that sees Fly's restart ends the ejection, but a restart Fly does not report, or one
  that no list caught in between, leaves a one-machine app answering nothing.

So a machine held out for a refused connection, or ejected for refused connections or
resets, is watched: a TCP connect to it every ``FIRST_S`` doubling to ``EVERY_S``. The
first connection it accepts after one was refused brings it back: a skip ends, and an
ejection ends as if its time were up (the next request is its probe, as after any
ejection, and a failed probe ejects it for twice as long). A connect is all it tries: it
says that a process listens, not that it answers (a hung one accepts connections), which
is why timeouts, bad answers, 5xx and critical checks are never cut short this way.

An ejection is cut short only while the app has no other machine to route to: with
another one serving, the ejection's backoff is what keeps a machine that crashes again on
every request from failing a client each time it comes back. A machine ejected for resets
whose first connect is accepted did not die (it resets connections while it listens): the
ejection runs its course.
"""

from __future__ import annotations

import asyncio

from autoscaler.aio import cancel_and_wait, tcp_probe
from autoscaler.control.view import FleetView, Upstream
from autoscaler.proxy.health import Health

FIRST_S = 0.05
"""The first connect after the machine was held out."""
EVERY_S = 0.25
"""The longest pause between two connects to a machine still held out."""


class Reviver:
    """Watches machines held out for want of a listener; at most one watch per machine."""

    def __init__(self, fleet: FleetView, health: Health, connect_timeout_s: float) -> None:
        self.fleet = fleet
        self.health = health
        self.connect_timeout_s = connect_timeout_s
        self.watching: dict[Upstream, asyncio.Task[None]] = {}

    def refused(self, app: str, up: Upstream, port: int) -> None:
        """A connection to ``up`` failed: watch it while it is held out for that."""
        self._watch(app, up, port, down=True)

    def lost(self, app: str, up: Upstream, port: int) -> None:
        """A connection to ``up`` was reset: watch it if that ejected it, and its process
        turns out to be gone."""
        self._watch(app, up, port, down=False)

    def _watch(self, app: str, up: Upstream, port: int, down: bool) -> None:
        if up in self.watching or not self.health.revivable(app, up):
            return
        task = asyncio.get_running_loop().create_task(
            self._run(app, up, port, down), name=f"proxy:revive:{up.id}"
        )
        self.watching[up] = task
        task.add_done_callback(lambda done: self._forget(up, done))

    def _forget(self, up: Upstream, done: asyncio.Task[None]) -> None:
        if self.watching.get(up) is done:
            del self.watching[up]

    async def _run(self, app: str, up: Upstream, port: int, down: bool) -> None:
        pause = FIRST_S
        while True:
            await asyncio.sleep(pause)
            pause = min(pause * 2, EVERY_S)
            if not self.health.revivable(app, up):
                return  # back already, gone, or no longer held out for want of a listener
            if not await tcp_probe(up.host, port, self.connect_timeout_s):
                down = True
            elif down:
                self.health.revived(app, up)
                return
            else:
                return  # reset, yet it listens: not a process that died

    async def close(self) -> None:
        await cancel_and_wait(list(self.watching.values()))
        self.watching.clear()
