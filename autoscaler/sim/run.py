"""Run every strategy over every app of a trace and gather the figures.

Apps share nothing (each has its own pool of machines and its own policy state), so each
(app, strategy) pair is one independent :class:`~autoscaler.sim.engine.AppSim`; the
totals add them up, and the total's peak sweeps their machine changes together. So apps
can also be replayed in worker processes (``jobs``), with the same figures.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, TypeAlias, TypeVar, cast

from autoscaler.children import die_with_parent
from autoscaler.config import AppConfig
from autoscaler.sim.baselines import AlwaysOn, FixedKeepalive, FlyAutostop
from autoscaler.sim.engine import AppSim, Strategy
from autoscaler.sim.model import Stats, Timings, quantile
from autoscaler.sim.ours import PolicyStrategy
from autoscaler.sim.trace import Trace

OURS = "autoscaler"
ADAPTIVE = "adaptive"
BASELINES = ("fly-autostop", "fixed-keepalive", "always-on", "knative")
STRATEGIES = (OURS, ADAPTIVE, *BASELINES)
"""Names ``fly-autostop-180s`` and ``knative-120s`` pick a check interval or a grace."""

KNATIVE_STABLE_WINDOW_S = 60.0
KNATIVE_GRACE_S = 30.0


def knative_overrides(grace_s: float = KNATIVE_GRACE_S) -> dict[str, Any]:
    """Knative's pod autoscaler (KPA) with its defaults, as knobs of our policy (which is
    KPA adapted to machines): 60 s stable and 6 s panic windows, panic at 200%, 70%
    target utilisation, no scale-down delay, scale to zero when the stable window has seen
    no request and then ``scale-to-zero-grace-period`` (30 s) has passed. A pod that goes
    is deleted, so the next one is a cold start: here, a stop."""
    return {
        "keep_alive": "fixed",
        "stable_window_s": KNATIVE_STABLE_WINDOW_S,
        "panic_window_s": 6.0,
        "panic_threshold": 2.0,
        "target_utilization": 0.7,
        "scale_down_delay_s": 0.0,
        "idle_to_zero_s": KNATIVE_STABLE_WINDOW_S + grace_s,
        "scale_down_action": "stop",
    }


def _suffix_seconds(name: str, prefix: str) -> float | None:
    """``fly-autostop-180s`` -> 180.0 (None without a suffix); ValueError if malformed."""
    if name == prefix:
        return None
    rest = name[len(prefix) + 1 :] if name.startswith(prefix + "-") else ""
    if rest.endswith("m") and rest[:-1].replace(".", "", 1).isdigit():
        return float(rest[:-1]) * 60
    if rest.endswith("s") and rest[:-1].replace(".", "", 1).isdigit():
        return float(rest[:-1])
    raise ValueError(f"strategy {name!r}: expected {prefix} or {prefix}-<seconds>s")


def known_strategy(name: str) -> bool:
    if name in (OURS, ADAPTIVE, "always-on"):
        return True
    for prefix in ("fly-autostop", "fixed-keepalive", "knative"):
        if name == prefix or name.startswith(prefix + "-"):
            try:
                _suffix_seconds(name, prefix)
            except ValueError:
                return prefix == "fixed-keepalive" and name == "fixed-keepalive-10m"
            return True
    return False


def make_strategy(
    name: str,
    timings: Timings,
    *,
    skip_idle: bool = True,
    overrides: dict[str, Any] | None = None,
) -> Strategy:
    """The strategy named ``name``; ``overrides`` are knobs for the policy strategies."""
    extra = dict(overrides or {})
    if name == OURS:
        return PolicyStrategy(skip_idle=skip_idle, overrides=extra)
    if name == ADAPTIVE:
        return PolicyStrategy(
            skip_idle=skip_idle, name=ADAPTIVE, overrides={"keep_alive": "adaptive", **extra}
        )
    if name == "knative" or name.startswith("knative-"):
        grace = _suffix_seconds(name, "knative")
        knobs = knative_overrides(KNATIVE_GRACE_S if grace is None else grace)
        return PolicyStrategy(skip_idle=skip_idle, name=name, overrides={**knobs, **extra})
    if name == "fly-autostop" or name.startswith("fly-autostop-"):
        interval = _suffix_seconds(name, "fly-autostop")
        if interval is not None and interval <= 0:
            # As --autostop-interval-s 0 is: a check every 0 s reschedules itself at the
            # same instant forever, and the replay never ends.
            raise ValueError(f"strategy {name!r}: expected a check interval > 0 s")
        strategy = FlyAutostop(timings.autostop_interval_s if interval is None else interval)
        if interval is not None:
            strategy.name = name
        return strategy
    if name.startswith("fixed-keepalive"):
        keep = None if name == "fixed-keepalive-10m" else _suffix_seconds(name, "fixed-keepalive")
        return FixedKeepalive(timings.keepalive_s if keep is None else keep)
    if name == "always-on":
        return AlwaysOn()
    raise ValueError(f"unknown strategy {name!r} (expected one of {', '.join(STRATEGIES)})")


@dataclass(slots=True)
class Report:
    """Per strategy (in the order run): per app stats, and the horizon replayed."""

    horizon: float
    timings: Timings
    strategies: list[str] = field(default_factory=list)
    apps: list[str] = field(default_factory=list)
    stats: dict[str, dict[str, Stats]] = field(default_factory=dict)
    """strategy -> app -> Stats."""
    origin: float = 0.0
    """The trace's :attr:`~autoscaler.sim.trace.Trace.origin`: the Unix time replayed
    from, or 0 when the trace's times were seconds from its start."""

    def total(self, strategy: str) -> Stats:
        per_app = list(self.stats[strategy].values())
        out = Stats("TOTAL", strategy)
        for s in per_app:
            out.requests += s.requests
            out.served += s.served
            out.wake_waits += s.wake_waits
            out.errors += s.errors
            out.waits.extend(s.waits)
            out.up_s += s.up_s
            out.suspended_s += s.suspended_s
            out.api_actions += s.api_actions
            out.refused += s.refused
            out.cold_resumes += s.cold_resumes
            out.failed_actions += s.failed_actions
            out.failed_boots += s.failed_boots
            out.decisions += s.decisions
        out.peak_machines = _peak(s.changes for s in per_app)
        return out


def _peak(changes: Iterable[list[tuple[float, int]]]) -> int:
    events = sorted(c for per_app in changes for c in per_app)
    level = peak = 0
    for _, delta in events:  # at equal times -1 sorts first: a swap is not a peak
        level += delta
        peak = max(peak, level)
    return peak


def simulate(
    trace: Trace,
    config_for: Callable[[str], AppConfig],
    timings: Timings,
    strategies: Iterable[str] = STRATEGIES,
    *,
    horizon: float | None = None,
    skip_idle: bool = True,
    progress: Callable[[str, str], None] | None = None,
    overrides: dict[str, Any] | None = None,
    jobs: int = 1,
) -> Report:
    """Replay ``trace`` under each strategy; ``horizon`` defaults to the trace's end.
    ``jobs`` > 1: that many worker processes replay the apps, the busiest first (then
    ``progress``, told of each app as its replay begins, is not called)."""
    end = trace.end if horizon is None else horizon
    report = Report(end, timings, apps=list(trace.apps), origin=trace.origin)
    job: _Job = (trace, config_for, timings, end, skip_idle, overrides)
    for name in strategies:
        label = make_strategy(name, timings, overrides=overrides).name
        tasks = [(name, app) for app in trace.apps]
        if jobs > 1 and len(tasks) > 1:
            tasks.sort(key=lambda task: -len(trace.apps[task[1]]))
            results = fork_map(_replay, job, tasks, jobs)
        else:
            results = []
            for task in tasks:
                if progress is not None:
                    progress(label, task[1])
                results.append(_replay(job, task))
        report.strategies.append(label)
        per_app = {stats.app: stats for stats in results}
        report.stats[label] = {app: per_app[app] for app in trace.apps}
    return report


_Job: TypeAlias = tuple[
    Trace, Callable[[str], AppConfig], Timings, float, bool, dict[str, Any] | None
]
"""The trace and the knobs of a replay: (trace, config_for, timings, horizon, skip_idle,
overrides)."""


def _replay(job: _Job, task: tuple[str, str]) -> Stats:
    """One app under one strategy: ``task`` is (strategy, app)."""
    trace, config_for, timings, end, skip_idle, overrides = job
    name, app = task
    strategy = make_strategy(name, timings, skip_idle=skip_idle, overrides=overrides)
    return AppSim(app, trace.apps[app], config_for(app), timings, strategy, end).run()


_S = TypeVar("_S")
_T = TypeVar("_T")
_R = TypeVar("_R")
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def fork_map(fn: Callable[[_S, _T], _R], shared: _S, tasks: Sequence[_T], jobs: int) -> list[_R]:
    """``fn(shared, task)`` for each task, in ``jobs`` forked worker processes; the results
    in the tasks' order (which is the order they are handed out in). ``shared`` (a trace,
    the knobs) reaches the workers by the fork, not pickled; tasks and results are pickled.
    The caller must not run threads.

    No worker outlives the call: when it raises (a task's exception, a worker that died,
    KeyboardInterrupt or whatever else a signal handler raises), the tasks not yet handed
    out are dropped and every worker is killed and reaped. A worker dies with this process
    too when it is killed outright (PR_SET_PDEATHSIG), and ignores SIGINT: a Ctrl-C reaches
    the whole process group, and stopping the workers is this process's job."""
    ctx = multiprocessing.get_context("fork")
    workers: list[tuple[BaseProcess, Connection]] = []
    try:
        # Held back while forking: an exception raised by a signal's handler between a
        # fork and the append would leave that worker out of the clean-up below.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            for _ in range(min(jobs, len(tasks))):
                mine, theirs = ctx.Pipe()
                args = (fn, shared, theirs, os.getpid(), mask)
                worker: BaseProcess = ctx.Process(target=_work, args=args, daemon=True)
                worker.start()
                workers.append((worker, mine))
                theirs.close()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        results = _hand_out(workers, tasks)
        for worker, conn in workers:
            with contextlib.suppress(OSError):  # (one killed meanwhile: its pipe is shut)
                conn.send(None)  # no more tasks: the worker returns
            worker.join()
            if worker.exitcode != 0:
                raise _died(worker)
        return results
    finally:
        for worker, _ in workers:
            worker.kill()  # nothing when it has exited already
        for worker, conn in workers:
            worker.join()
            conn.close()


class WorkerDied(RuntimeError):
    """A worker of :func:`fork_map` ended before its task's answer (killed, or out of
    memory): the others are killed and reaped, and the command says so in one line."""


def _died(worker: BaseProcess) -> WorkerDied:
    return WorkerDied(f"a worker process (pid {worker.pid}) ended with exit code {worker.exitcode}")


def _hand_out(workers: list[tuple[BaseProcess, Connection]], tasks: Sequence[Any]) -> list[Any]:
    """Each task to the next idle worker, until every result is in."""
    results: list[Any] = [None] * len(tasks)
    queue = iter(enumerate(tasks))
    busy: dict[Connection, BaseProcess] = {}

    def next_task(worker: BaseProcess, conn: Connection) -> None:
        task = next(queue, None)
        if task is not None:
            try:
                conn.send(task)
            except OSError:  # killed since its last answer: BrokenPipeError, ECONNRESET
                worker.join()
                raise _died(worker) from None
            busy[conn] = worker

    for worker, conn in workers:
        next_task(worker, conn)
    while busy:
        for ready in wait(list(busy)):
            conn = cast(Connection, ready)
            worker = busy.pop(conn)
            try:
                index, ok, value, where = conn.recv()
            except (EOFError, OSError):
                # Ended: its pipe closed, or reset (ConnectionResetError) when it died
                # with a task sent to it unread.
                worker.join()
                raise _died(worker) from None
            if not ok:
                value.add_note(where)
                raise value
            results[index] = value
            next_task(worker, conn)
    return results


def _work(
    fn: Callable[[Any, Any], Any], shared: Any, conn: Connection, parent: int, mask: set[int]
) -> None:
    """A worker of ``fork_map``: ``(index, task)`` in, ``(index, ok, result or exception,
    where)`` out, until None (or the end of the pipe)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler
    die_with_parent(parent)()
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    while True:
        try:
            got = conn.recv()
        except EOFError:
            return
        if got is None:
            return
        index, task = got
        try:
            out = (index, True, fn(shared, task), "")
        except Exception as exc:
            where = f"in a worker process:\n{traceback.format_exc()}"
            out = (index, False, exc, where)
        conn.send(out)


def summary(stats: Stats) -> dict[str, Any]:
    """The figures of one row, as plain numbers (JSON and CSV)."""
    pct = 100.0 * stats.wake_waits / stats.requests if stats.requests else 0.0
    return {
        "requests": stats.requests,
        "woken": stats.wake_waits,
        "woken_pct": round(pct, 3),
        "wait_p50_s": round(stats.wait_quantile(0.50), 4),
        "wait_p99_s": round(stats.wait_quantile(0.99), 4),
        "wait_max_s": round(stats.max_wait, 4),
        "machine_s_started": round(stats.up_s, 1),
        "machine_s_suspended": round(stats.suspended_s, 1),
        "peak_machines": stats.peak_machines,
        "api_actions": stats.api_actions,
        "errors": stats.errors,
        "cold_resumes": stats.cold_resumes,
        "failed_actions": stats.failed_actions,
        "failed_boots": stats.failed_boots,
    }


def config_resolver(
    configured: Mapping[str, AppConfig], overrides: Mapping[str, Any]
) -> Callable[[str], AppConfig]:
    """Each app's policy: its entry in the config (or the defaults), then ``overrides``.

    Raises ValueError naming the knob when an override does not validate.
    """
    cache: dict[str, AppConfig] = {}

    def resolve(app: str) -> AppConfig:
        got = cache.get(app)
        if got is None:
            base = configured.get(app)
            data = base.model_dump() if base is not None else {}
            data.update(overrides)
            data["name"] = app
            got = cache[app] = AppConfig.model_validate(data)
        return got

    return resolve


__all__ = [
    "STRATEGIES",
    "Report",
    "WorkerDied",
    "config_resolver",
    "fork_map",
    "quantile",
    "simulate",
    "summary",
]
