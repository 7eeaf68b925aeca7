"""A machine's first Fly check may run before its app is up: run it ourselves until it passes.

Fly runs a machine's checks once ``grace_period`` after its start, then every ``interval``
(15 s in Fly's examples). An app whose start-up outlasts the grace fails that first run,
and its machine stays critical until the next one: the proxy does not route to it, and
the policy counts it as sick, starts another in its place and may drain it (docs/policy.md,
"A sick machine is replaced"), all for a machine that has been serving for most of that
time.

Until our first runs had their chance (:data:`SICK_GRACE_S` from the list that said
critical), the policy does not count such a machine as sick (``AppRuntime.sick_grace``):
it starts no replacement for a machine our next run may clear.

So while a started machine's checks are critical within its first round of them
(``grace_period`` + ``interval`` + ``timeout`` since it was seen started), the controller
runs those same checks itself against the machine (every :data:`RECHECK_FIRST_S`, the
pause doubling up to :data:`RECHECK_MAX_S`). Once every critical one passes, those results
of Fly's no longer make the machine critical (``AppRuntime.rechecked``): the proxy routes
to it and the policy counts it, until Fly runs the checks again, whose verdict then rules,
as it does for any machine after its first round. Checks this code cannot run (a type
other than ``tcp`` and ``http``) or cannot find in the machine's config (a service's check
that is not one of a kind: control/runtime.py, ``_specs``) are left to Fly.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from autoscaler.checks import run_check
from autoscaler.control.runtime import AppRuntime, MachineRecord
from autoscaler.scaling.fleet import STARTED

RECHECK_FIRST_S = 0.25
"""The pause after our first run of a machine's checks; it doubles after each run that
fails, up to RECHECK_MAX_S: an app a second late is caught within a quarter of a second,
and a sick one in a burst of new machines gets a run every few seconds, not four a
second each."""
RECHECK_MAX_S = 2.0
SICK_GRACE_S = 2.0
"""How long a machine whose critical checks we run again (within their first round) does
not count as sick for the policy, from the list that first said critical: our first runs
(at 0, 0.25, 0.75 and 1.75 s) may clear it, and a replacement started at once, for an app
that answered its first check late under load, was a start too many. The proxy still
routes by Fly's verdict meanwhile."""


def recheck_until(rt: AppRuntime, machine: MachineRecord) -> float | None:
    """Until when our runs of ``machine``'s critical checks may overrule Fly's (the end of
    its first round of them); None if they may not: it is not started or not critical, a
    critical check is not one we can run, or the machine has no address."""
    if machine.state != STARTED or not machine.checks_critical:
        return None
    specs = machine.critical_specs
    if len(specs) != len(machine.critical) or not all(s.runnable for s in specs):
        return None
    since = rt.state_since.get(machine.id)
    if since is None or not rt.address(machine)[0]:
        return None
    return since + max(s.grace_s + s.interval_s + s.timeout_s for s in specs)


@dataclass(frozen=True)
class Rechecker:
    """Runs the checks; ``on_done`` is told of each machine whose critical checks passed
    (True: the controller publishes the view) or did not by the end of its first round
    (False)."""

    clock: Callable[[], float]
    sleep: Callable[[float], Awaitable[None]]
    on_done: Callable[[AppRuntime, MachineRecord, bool], None]

    def follow(self, rt: AppRuntime, now: float) -> None:
        """Start a run of checks for each machine of ``rt`` that qualifies (after a list).
        Only the started machines whose checks are critical may: ``sick_since``'s, few."""
        for mid in rt.sick_since:
            machine = rt.machines.get(mid)
            if machine is None or mid in rt.rechecks:
                continue
            until = recheck_until(rt, machine)
            if until is not None and now < until:
                rt.sick_grace[mid] = min(until, rt.sick_since[mid] + SICK_GRACE_S)
                task = asyncio.create_task(self._recheck(rt, mid, until))
                rt.rechecks[mid] = task
                task.add_done_callback(functools.partial(_forget, rt, mid))

    async def _recheck(self, rt: AppRuntime, mid: str, until: float) -> None:
        pause = RECHECK_FIRST_S
        while True:
            machine = rt.machines.get(mid)
            if machine is None or recheck_until(rt, machine) is None:
                return  # it left `started`, or Fly's checks pass (or are not ours to run)
            if self.clock() >= until:
                self.on_done(rt, machine, False)
                return
            host, _ = rt.address(machine)
            results = await asyncio.gather(*(run_check(s, host) for s in machine.critical_specs))
            current = rt.machines.get(mid)
            if (
                current is not None
                and current.state == STARTED
                and current.critical == machine.critical  # Fly did not run them again since
                and all(status == "passing" for status, _ in results)
            ):
                rt.rechecked[mid] = frozenset(current.critical)
                rt.machines[mid] = replace(current, checks_critical=False)
                rt.sick_since.pop(mid, None)
                self.on_done(rt, rt.machines[mid], True)
                return
            await self.sleep(pause)
            pause = min(RECHECK_MAX_S, 2 * pause)


def _forget(rt: AppRuntime, mid: str, task: asyncio.Task[None]) -> None:
    if rt.rechecks.get(mid) is task:
        del rt.rechecks[mid]
