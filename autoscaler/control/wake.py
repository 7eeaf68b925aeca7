"""The wake path: bring one machine of an app to routable for the proxy's held requests.

It bypasses the tick: a held request should wait for a boot, not for a boot plus up to a
tick. It is single-flight per app twice over: ``FleetView.wake`` joins concurrent callers to
one task, and the app's wake lock makes a direct caller (tests, a second view) queue behind
a wake already running, then find the machine routable and return "none".

The choice of machine is the policy's (``choose_wake``, rule 2): take back a machine we are
draining (it is warm), else take back one being suspended (Fly lets a start interrupt a
suspend), else resume a suspended one, else start a stopped one, else start a failed one
again (within its restart backoff and budget). A machine that fails to come up is dropped
from consideration and the next one is tried; with none left, the wake waits for machines
in transition (a stop under way ends in a startable state), a failed machine's next
restart, or the retry of a machine whose action an API error failed, until the app's
``wake_timeout_s``. A machine that another party is starting (listed ``starting`` or
``restarting``: in cluster mode a start of a leader that lost its lease after the start
landed, or a deploy's) is waited for rather than a cold start, as a start of our own is
joined: waking another machine meanwhile started two for one need. For ``START_PATIENCE_S``
at most: one stuck in ``starting`` gets another machine woken beside it
(``wake_passes_slow_start``). The patience counts from when Fly began that start, as the
machine's events say (``Machine.current_start``), so a wake that finds a machine stuck for
minutes wakes another at once (once it has read the app itself) rather than 10 s later;
without a usable time of Fly's, from when the wake first saw the machine coming up, and
never from later than that (see ``Waker.patience_from``). A wake that waits for another
party's resume (its start began from ``suspended``) is a ``resume`` wake, one that waits
for a cold start a ``start`` wake. A drain to take back is woken at once all the same (the
machine is up and warm, and no new one starts), and so is a machine to resume while the
starts waited for are cold ones (a resume is up in well under a second on Fly, a cold start
in one to several); the machine too many goes at a scale-down. While another party's resume
is under way, a resume of another machine, no faster, waits for it too, for
``RESUME_PATIENCE_S`` (2 s) at most from when Fly began it: a resume still coming up by
then fell back to a cold boot, and the other machine is resumed beside it
(``wake_passes_slow_resume``). A machine starting under someone else's cordon is not waited
for: it would never route.

The wake's actions and reads make one attempt per call, as a tick's do: the wake is the
retry (the first read of an app never read too, tried again at the pace below). An
API error (5xx, 429, a transport error) is the API's trouble, not the machine's: that
machine is tried again after a pause (0.25 s, doubling up to 1 s, the proxy's own pace of
asking again; or the 429's Retry-After). A resume that failed so once is tried again before
a cold start of another machine: on Fly the pause and a resume take well under a second, a
cold start one to several seconds. A second failure of it, or a Retry-After longer than
that pause, and the wake moves on. The app is read again after a failed try, but not
sooner than ``READ_GAP_S`` (1 s) after the wake's last read of it (Fly's pace for an
app-level call): the pauses above pace each machine's tries, not the reads, and in an
outage a read after every try listed the app three times a second for three machines.
The watch of another party's start or stop reads every ``RECHECK_S`` while the API
answers; after a read that failed, every read of the wake waits ``READ_GAP_S`` from it.

A start (or resume) whose answer was lost (sent, then a lost connection, a 5xx or 408 of
Fly's edge) may have landed: the actuator reads the machine back at once (``_boot``), and
goes on with it if it is starting or started. If that read fails too, the start fails as
any other API error, and the wake's next list of the app that shows the machine coming up
or up makes it the wake's own start again: waited for, and routed, not passed over for
another machine (two for one need). The read-back is not paced as the lists are, by
choice: it is one Get Machine per start sent, so never more often than that machine's
tries (1/s at most once their pause has grown: about 60 a minute per machine in an
outage that fails the starts and answers the leases, about 30 in one that fails every
call after our leases were taken, none while the leases are refused), against Fly's
5/s for Get Machine per machine, a bucket apart from the app's list. Skipped after a
read that failed, it would be the call that keeps the wake from starting the next
machine at once beside one that is coming up, in a flaky API where one call in a few
fails.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import NamedTuple

from autoscaler.control.actions import Actuator
from autoscaler.control.fencing import WAKE_FENCE
from autoscaler.control.runtime import AppRuntime, Running
from autoscaler.fly.client import MachinesAPI, one_attempt
from autoscaler.fly.errors import FlyError, NotFound, RateLimited, may_have_landed
from autoscaler.logs import get_logger
from autoscaler.metrics import WAKE_UNCORDON, Metrics
from autoscaler.scaling.fleet import COMING_UP_STATES, FAILED, MOVING_STATES, STARTED, Fleet
from autoscaler.scaling.policy import Action, choose_wake

_log = get_logger("autoscaler.control")
RECHECK_S = 0.25  # how often a wake looks again while another party's start is under way
START_PATIENCE_S = 10.0
"""How long a wake waits for another party's start before it wakes another machine as
well: cold starts take one to several seconds (docs/fly-api-notes.md), and a machine
stuck in ``starting`` must not hold the app's requests for all of ``wake_timeout_s``.
Counted from when Fly began the start (``Waker.patience_from``)."""
RESUME_PATIENCE_S = 2.0
"""How long a wake holds back a resume of another machine while another party's resume is
under way (its start began from ``suspended``), counted as ``START_PATIENCE_S`` is: that
resume is as fast as the wake's own, and both started two machines for one need. A resume
on Fly takes a few hundred ms (docs/fly-api-notes.md; 0.2-0.5 s on the emulator's fly
profile), and the wake sees it done at its next list (``RECHECK_S``): 2 s is several times
that, so a resume that is merely slow is still waited for. Fly falls back to a cold boot
when the snapshot is unusable, and the machine stays ``starting`` for one to several
seconds: the patience then runs out and the other machine is resumed, up about 2.5 s after
the resume began, sooner than the slower half of those cold boots; a longer patience
would hold the requests for the cold boot's whole length."""
RETRY_MAX_S = 1.0  # the longest pause before trying again a machine an API error failed
READ_GAP_S = 1.0
"""The shortest time from a wake's read of its app to a re-read after a failed try (or
for the retry of one): Fly allows an app-level call 1/s, in bursts of 3
(docs/fly-api-notes.md). In an outage each failed try listed the app at once, beside the
tries' own pace per machine: three lists a second for three machines, for the whole
outage (seed 13 of benchmarks/chaos_soak.py). A re-read due sooner is skipped, and the
wake goes on with the view of the last one; the tries keep their pace (the next machine
at once after one fails). The watch of a start or stop under way reads every
``RECHECK_S`` as before while the API answers: that read is what sees the machine up.
After a read that failed, the next one, whatever the wake waits for, is ``READ_GAP_S``
after it (``_Reads``): the watch's reads, failing, listed the app four times a second
for the whole outage."""
# The wake line's ``waited_for``: a start of someone else's that the wake waited for (no
# ``machine``), or one of our own under way (a scale-up of the tick) that it joined.
ANOTHERS = "another's start"
JOINED = "our start"


@dataclass(slots=True)
class _Reads:
    """A wake's reads of its app: when it last asked for one (``-inf``: not yet), and
    whether that read failed (then the next waits ``READ_GAP_S``, see ``Waker._reread``)."""

    at: float = -math.inf
    failed: bool = False


class _Retry(NamedTuple):
    """A machine whose action an API error failed, to be tried again."""

    at: float
    pause: float
    kind: str
    tries: int


class WakeError(Exception):
    """No machine of the app could be made routable (none exists, or all failed)."""


class WakeAbandoned(WakeError):
    """No request waits for the wake any more (its clients left before a machine was
    woken for them): cut short, not failed. Counted as ``cancelled`` and logged as no
    failure, as a wake cut short by a stop is; a ``failed`` count would page for it."""


class AppMissing(WakeError):
    """The Machines API has no such app (a 404 on its list of machines: a typo in
    ``apps[].name``, another organization's app, an app destroyed). No wake brings a
    machine of it up until the configuration or Fly changes: the proxy answers the
    requests held for it at once, not at their ``wake_timeout_s``."""


class Waker:
    def __init__(
        self,
        api: MachinesAPI,
        actuator: Actuator,
        metrics: Metrics,
        api_timeout_s: float = 5.0,
    ) -> None:
        self.api = api
        self.actuator = actuator
        self.metrics = metrics
        self.api_timeout_s = api_timeout_s
        """Bound of the one attempt of a refresh between tries (``control.api_timeout_s``)."""

    def patience_from(
        self, rt: AppRuntime, mid: str, first_seen: float, now: float, since: float
    ) -> float:
        """When the wait for another party's start of ``mid`` began, on the actuator's
        clock: when Fly began that start (:attr:`MachineRecord.start_began`, read against
        :attr:`wall`), but never later than ``first_seen``, when this wake first saw the
        machine coming up, which is also the answer when Fly gives no usable time.

        Fly's time only from a list asked for at ``since`` (the wake's start) or later:
        an older list (a tick's, or a wake's before; in cluster mode a leader that woke
        the app last wakes without reading first) may show ``starting`` a machine that is
        up by now, and Fly's time of that start, long past, passed it at once, before the
        wake had read the app: another machine was woken beside one already up. Until
        the wake's first read (``RECHECK_S``), the patience counts from the first sight.

        So a wait is never longer than the patience from the first sight: a time of Fly's
        in the future (its clock ahead of ours, or garbage) counts as now, and a start Fly
        began again since the first sight (starting, stopped, starting between two lists)
        keeps the first sight. A time long past is believed: a machine stuck that long is
        passed at once (a time before the machine's creation or before 2020 is not used:
        ``Machine.current_start``). Fly's time is read on Fly's clock as the API's answers
        show it (the actuator's ``wall``: ``MachinesAPI.fly_time`` unless a test gives
        another), not on our time of day: a host whose clock ran 2 s ahead
        of Fly's passed another party's resume at once (and 10 s, any start), and woke a
        machine too many. That estimate errs the other way, by a few tenths of a second
        (from a single answer, its return trip and a second at most): a start is waited
        for that much longer, never longer than the patience from the first sight."""
        record = rt.machines.get(mid)
        began = None if record is None else record.start_began
        if began is None or rt.listed_at is None or rt.listed_at < since:
            return first_seen
        return min(first_seen, now - (self.actuator.wall() - began))  # a future one: first_seen

    async def refresh(self, rt: AppRuntime) -> None:
        clock = self.actuator.clock
        listed_at = clock()
        machines = await self.api.list_machines(rt.name)
        rt.merge(machines, listed_at, clock())
        self.actuator.listed(rt)
        self.actuator.publish(rt)

    async def wake(self, rt: AppRuntime) -> str:
        """ "resume", "start", "uncordon" (a drain taken back: its cordon lifted, no
        boot) or "none" (a machine was routable already)."""
        act = self.actuator
        view = act.view.app(rt.name)
        async with rt.wake_lock:
            t0 = act.clock()
            deadline = t0 + rt.config.wake_timeout_s
            failed: set[str] = set()
            again: dict[str, _Retry] = {}
            came: str | None = None  # we waited for another party's start (or resume)
            seen_coming: dict[str, float] = {}  # another party's start -> first seen
            resumes: dict[str, bool] = {}  # another party's start waited for -> a resume?
            passed_resumes: set[str] = set()  # another party's resume, past its patience
            # Our start or resume an API error failed after it was sent -> (its kind, when):
            # the next list of the app says whether it landed all the same.
            unsure: dict[str, tuple[str, float]] = {}
            landed: dict[str, str] = {}  # such a start the list showed coming up -> kind
            reads = _Reads()
            if not rt.read_once:
                await self._first_read(rt, deadline)
                reads.at = act.clock()
            while True:
                self._landed(rt, unsure, landed, failed)
                if routable := view.routable():
                    if mine := [u.id for u in routable if u.id in landed]:
                        # Our start, its answer lost: named and timed as our own.
                        how = _how(rt, mine[0], landed[mine[0]] == "resume")
                        took = self._observe(rt, how, t0)
                        _log.info("wake", app=rt.name, machine=mine[0], how=how, took_s=took)
                        return how
                    if came is None:
                        return "none"
                    # Named by the machine that came up, when it is one waited for (beside
                    # a cold start, the resume is up first as a rule).
                    up = [_how(rt, u.id, resumes[u.id]) for u in routable if u.id in resumes]
                    if up:
                        came = "resume" if "resume" in up else "start"
                    took = self._observe(rt, came, t0)  # a wake that waited for a start
                    _log.info("wake", app=rt.name, how=came, waited_for=ANOTHERS, took_s=took)
                    return came
                # Our own start under way (a scale-up of the tick): join it.
                for mid, running in list(rt.running.items()):
                    if running.kind not in ("resume", "start"):
                        continue
                    view.waking = running.kind
                    joined = await running.task
                    if joined and view.routable():
                        how = _how(rt, mid, running.kind == "resume")
                        took = self._observe(rt, how, t0)
                        _log.info(
                            "wake",
                            app=rt.name,
                            machine=mid,
                            how=how,
                            waited_for=JOINED,
                            took_s=took,
                        )
                        return how
                now = act.clock()
                fleet = rt.fleet(view, now, urgent=True)
                # (Not one under someone else's cordon: started, it still never routes.)
                coming = [
                    m.id
                    for m in fleet
                    if m.state in COMING_UP_STATES
                    and m.id not in failed
                    and not m.unreachable
                    and not m.cordoned_by_others
                ]
                for mid in coming:
                    seen = seen_coming.setdefault(mid, now)
                    if now - self.patience_from(rt, mid, seen, now, t0) >= START_PATIENCE_S:
                        # Slower than a cold start: woken beside, not waited for longer.
                        _log.info("wake_passes_slow_start", app=rt.name, machine=mid)
                        failed.add(mid)
                coming = [mid for mid in coming if mid not in failed]
                action = choose_wake(Fleet.of(rt.name, (m for m in fleet if m.id not in failed)))
                # A take-back or a resume is not held back for it: either is up in well
                # under a second on Fly, a cold start in one to several (rule 2 wakes the
                # fastest first); the machine too many goes at a scale-down. But a resume
                # is as slow as another party's resume under way: that one is waited for,
                # RESUME_PATIENCE_S at most (by then it fell back to a cold boot). A
                # take-back is never held: the machine is up now, and no new one starts.
                resumes_coming = [mid for mid in coming if _resuming(rt, mid, landed)]
                resuming = any(
                    now - self.patience_from(rt, mid, seen_coming[mid], now, t0) < RESUME_PATIENCE_S
                    for mid in resumes_coming
                )
                fast = ("uncordon",) if resuming else ("uncordon", "resume")
                if coming and (action is None or action.kind not in fast):
                    # Another party's start under way (in cluster mode, a leader's that
                    # landed before it lost its lease; a deploy's): it serves this need,
                    # and waking another machine would start two for one. Watched until it
                    # is up, or fails (then the machines above, or it again, are woken).
                    if now >= deadline:
                        raise WakeError(
                            f"app {rt.name}: machine {coming[0]} did not come up in time"
                        )
                    # (A resume by another party, as its events say, is a resume wake.)
                    for mid in coming:
                        resumes[mid] = _resuming(rt, mid, landed)
                    view.waking = came = "resume" if all(resumes[m] for m in coming) else "start"
                    await act.sleep(max(0.0, min(RECHECK_S, deadline - now)))
                    await self._reread(rt, reads)
                    continue
                if action is not None and action.kind == "resume":
                    # Past another party's resume, its patience run out (it fell back to a
                    # cold boot, or hangs): said once per machine, as a passed start is.
                    for mid in resumes_coming:
                        if mid not in passed_resumes:
                            passed_resumes.add(mid)
                            _log.info("wake_passes_slow_resume", app=rt.name, machine=mid)
                if action is not None and action.kind == "start":
                    # A resume an API error failed once (not told to wait long) goes first.
                    at, mid = min(
                        (
                            (r.at, m)
                            for m, r in again.items()
                            if m in failed
                            and r.kind == "resume"
                            and r.tries == 1
                            and r.pause <= RETRY_MAX_S
                        ),
                        default=(math.inf, ""),
                    )
                    if at < deadline:
                        await act.sleep(max(0.0, at - now))
                        failed.discard(mid)
                        continue
                if action is None:
                    due = {mid for mid in failed if mid in again and again[mid].at <= now}
                    if due:
                        failed -= due
                        continue
                    # Machines in transition (or with an action of ours under way) end
                    # somewhere a wake can use; a failed machine can be tried again later;
                    # a machine skipped for another holder's lease (a deploy) is free soon.
                    moving = any(m.state in MOVING_STATES or m.pending for m in fleet)
                    leased = {
                        mid for mid in rt.leased_by_others if mid in failed or rt.leased(mid, now)
                    }
                    failed -= leased  # try those again once their skip is over
                    retries = [again[mid].at for mid in failed if mid in again]  # all later
                    restart_at = rt.next_restart_at()
                    if restart_at is not None and restart_at > now:
                        # (One due already was not chosen: cordoned, say. Waiting for it
                        # would list the app in a loop until the deadline.)
                        retries.append(restart_at)
                    retry_at = min(retries, default=None)
                    if now >= deadline or (
                        not (moving or leased) and (retry_at is None or retry_at >= deadline)
                    ):
                        if leased:
                            # Tried, or left alone for it: say so, not "none can be woken".
                            raise WakeError(
                                f"app {rt.name}: no machine that can be woken; leased by"
                                f" another party: {', '.join(sorted(leased))}"
                            )
                        raise WakeError(f"app {rt.name}: no machine that can be woken")
                    soon = moving or leased or retry_at is None
                    pause = RECHECK_S if soon or retry_at is None else retry_at - now
                    pause = max(RECHECK_S, pause)  # never a loop of reads without a pause
                    await act.sleep(max(0.0, min(pause, deadline - now)))
                    # (A watch of a change under way reads every RECHECK_S; a wait for a
                    # retry is paced as the re-reads after a failed try.)
                    await self._reread(rt, reads, 0.0 if soon else READ_GAP_S)
                    continue
                mid = action.machine_id
                if action.kind == "uncordon":
                    # A drain still waiting is taken back at once; a cordon of ours left
                    # without a task routes again once the API has lifted it.
                    view.waking = None  # no boot: the machine is up
                    run = self._launch(rt, action, deadline)
                    if run is not None and not view.routable():
                        await run.task
                    routed = act.clock()
                    if run is not None and WAKE_FENCE.get() is not None:
                        # Under a wake claim (cluster mode), whose holder waits for the
                        # uncordon anyway (the claim fences it): its outcome first. The
                        # machine routes meanwhile. Another holder's lease may refuse it
                        # (the machine cordoned again): then this wake goes on to another
                        # machine, one wake timed once from t0 by how it ended, not an
                        # "uncordon" wake and a second one timed from a later start.
                        await asyncio.wait({run.task})  # (not cancelled with the wake)
                    if view.routable():
                        # Timed as a boot is: a take-back that waited for the API (its
                        # first read, a lifted cordon's answer) is a wait the held requests
                        # had, which the histogram's dashboards and alerts would not see.
                        took = self._observe(rt, WAKE_UNCORDON, t0, routed)
                        _log.info("wake", app=rt.name, machine=mid, how=WAKE_UNCORDON, took_s=took)
                        return WAKE_UNCORDON
                    failed.add(mid)
                    continue
                busy = rt.running.get(mid)
                if busy is not None and not (
                    (action.kind == "resume" and busy.kind == "drain") or busy.kind == "cleanup"
                ):
                    await busy.task  # its own action first (a suspend under way), then again
                    await self._reread(rt, reads)
                    continue
                run = self._launch(rt, action, deadline)
                view.waking = action.kind
                if run is not None and await run.task:
                    # By what happened: a resume that fell back to a cold boot is a start.
                    how = _how(rt, mid, action.kind == "resume")
                    took = self._observe(rt, how, t0)
                    _log.info("wake", app=rt.name, machine=mid, how=how, took_s=took)
                    return how
                machine = rt.machines.get(mid)
                error = run.error if run is not None else None
                if machine is None or machine.state != FAILED:
                    failed.add(mid)  # a failed boot is retried after its restart backoff
                if isinstance(error, FlyError) and error.transient:
                    failed.add(mid)  # a call the API refused: after the pause (a failed one too)
                    last = again.get(mid)
                    pause = _pause(None if last is None else last.pause, error)
                    tries = 1 if last is None else last.tries + 1
                    again[mid] = _Retry(act.clock() + pause, pause, action.kind, tries)
                    if may_have_landed(error):
                        unsure[mid] = (action.kind, act.clock())
                if act.clock() >= deadline:
                    raise WakeError(f"app {rt.name}: machine {mid} did not come up in time")
                await self._reread(rt, reads, READ_GAP_S)

    def _launch(self, rt: AppRuntime, action: Action, deadline: float) -> Running | None:
        """Start ``action``'s task; its calls make one attempt each: the wake's loop is the
        retry (a pause of 0.25-1 s, or another machine), where the client's retries would
        spend seconds on a machine that cannot come up (its host unreachable: 503 to every
        action) before the wake tried another. Each call may take what is left of the
        wake, not only ``api_timeout_s``: an API that answers slowly still wakes."""
        bound = max(self.api_timeout_s, deadline - self.actuator.clock())
        with one_attempt(bound):
            return self.actuator.launch(rt, action)

    def _observe(self, rt: AppRuntime, kind: str, t0: float, until: float | None = None) -> float:
        """Record a wake that took since ``t0`` (until now, or ``until``: when its machine
        routed); the seconds it took, to the ms for its log line, as the other durations
        in the logs (an action's ``duration_s``)."""
        took = (self.actuator.clock() if until is None else until) - t0
        self.metrics.wake_duration.labels(app=rt.name, kind=kind).observe(took)
        return round(took, 3)

    async def _first_read(self, rt: AppRuntime, deadline: float) -> None:
        """The app's first read, which the wake cannot do without (nothing is known of
        the app yet): one attempt at a time, as the refreshes between tries, paced as the
        tries after an API error (0.25 s doubling to 1 s, or the 429's Retry-After) until
        the wake's deadline. The client's own retries gave up after a few seconds of an
        outage that the wake could outlast, and held the wake in their backoff."""
        act = self.actuator
        last: float | None = None
        while True:
            try:
                with one_attempt(self.api_timeout_s):
                    await self.refresh(rt)
                return
            except NotFound as exc:
                raise app_missing(rt, exc) from exc
            except FlyError as exc:
                if not exc.transient:
                    raise
                last = _pause(last, exc)
                if act.clock() + last >= deadline:
                    raise WakeError(f"app {rt.name}: its machines could not be read") from exc
                _log.warning("wake_refresh_failed", app=rt.name, error=str(exc))
                await act.sleep(last)

    async def _reread(self, rt: AppRuntime, reads: _Reads, gap: float = 0.0) -> None:
        """Read the app again between two tries (``_refresh_quietly``), unless the wake's
        last read (``reads``) is less than ``gap`` ago (``READ_GAP_S``), or less than
        ``READ_GAP_S`` ago and failed: in an outage the watch of another party's start
        (``gap`` 0, every ``RECHECK_S``) listed the app four times a second, each list
        failing, where Fly allows an app-level call 1/s."""
        now = self.actuator.clock()
        if now - reads.at < (max(gap, READ_GAP_S) if reads.failed else gap):
            return
        reads.at = now
        reads.failed = not await self._refresh_quietly(rt)

    @staticmethod
    def _landed(
        rt: AppRuntime,
        unsure: dict[str, tuple[str, float]],
        landed: dict[str, str],
        failed: set[str],
    ) -> None:
        """Move to ``landed`` the machines of ``unsure`` that a list asked for since their
        start failed shows starting or started: the start landed, its answer lost (the
        actuator's read of the machine failed too). Set aside as failed, such a machine
        was neither waited for nor routed by the wake, which woke another one: two
        machines for one need (seed 13 of benchmarks/chaos_soak.py). Now it is waited for
        as a start under way, and routed once up, as the wake's own."""
        for mid, (kind, at) in list(unsure.items()):
            if rt.listed_at is None or rt.listed_at < at:
                continue  # no list since: not known yet
            del unsure[mid]
            machine = rt.machines.get(mid)
            if machine is not None and (
                machine.state in COMING_UP_STATES or machine.state == STARTED
            ):
                failed.discard(mid)
                landed[mid] = kind

    async def _refresh_quietly(self, rt: AppRuntime) -> bool:
        """Read the app again between two tries: one attempt, as a tick makes (the wake's
        next turn is the retry; the client's retries would add seconds to a wake that an
        API error interrupted). False if the read failed."""
        try:
            with one_attempt(self.api_timeout_s):
                await self.refresh(rt)
        except NotFound as exc:
            raise app_missing(rt, exc) from exc  # the app is gone: no machine will come up
        except FlyError as exc:
            _log.warning("wake_refresh_failed", app=rt.name, error=str(exc))
            return False
        return True


def app_missing(rt: AppRuntime, error: NotFound) -> AppMissing:
    """The wake's failure when the API answers 404 to the app's list of machines (in
    cluster mode also the read under the app's wake claim)."""
    return AppMissing(f"app {rt.name}: the Machines API has no such app ({error})")


def _how(rt: AppRuntime, mid: str, resume: bool) -> str:
    """How ``mid``, up now, came up: as its record says (:attr:`MachineRecord.how`: a
    resume that fell back to a cold boot is a "start"), else "resume" if its start was
    one (``resume``), else "start"."""
    record = rt.machines.get(mid)
    if record is not None and record.how is not None:
        return record.how
    return "resume" if resume else "start"


def _resuming(rt: AppRuntime, mid: str, landed: dict[str, str]) -> bool:
    """Whether ``mid``, coming up, is being resumed: as its events say, or a resume of
    ours whose answer was lost (``landed``)."""
    machine = rt.machines.get(mid)
    return landed.get(mid) == "resume" or (machine is not None and machine.resuming)


def _pause(last: float | None, error: FlyError) -> float:
    """The pause before trying again what an API error failed: 0.25 s, doubling from the
    last one up to 1 s, or longer if a 429 asks."""
    pause = RECHECK_S if last is None else min(RETRY_MAX_S, 2 * last)
    if isinstance(error, RateLimited) and error.retry_after:
        pause = max(pause, error.retry_after)
    return pause
