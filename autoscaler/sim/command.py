"""`autoscaler simulate`: replay a trace, or a synthetic one (``--generate``; with
``--out`` it is written to a file instead).

cli.py parses the arguments; this runs them. Exit 0 on success, 2 on a bad trace, config
or flag (with one line saying what was expected and what was found). SIGINT (Ctrl-C) or
SIGTERM stops it at once, its worker processes (``--jobs``) with it: one line, and exit
128 plus the signal's number (130, 143), as the shell counts a command a signal ended.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import yaml
from pydantic import ValidationError

from autoscaler.config import AppConfig, ConfigError, format_errors, load_settings
from autoscaler.sim.frontier import SWEEPS, plot, sweep
from autoscaler.sim.frontier import render as render_frontier
from autoscaler.sim.generate import SHAPES, generate
from autoscaler.sim.model import TimingError, Timings
from autoscaler.sim.report import render
from autoscaler.sim.run import (
    STRATEGIES,
    WorkerDied,
    config_resolver,
    known_strategy,
    make_strategy,
    simulate,
)
from autoscaler.sim.trace import MAX_SPAN_S, TraceError, from_rows, read_trace, write_csv

EXIT_OK = 0
EXIT_USAGE = 2
DEFAULT_STRATEGIES = "autoscaler,fly-autostop,fixed-keepalive,always-on"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs; values read as YAML scalars ("5m" stays a duration)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        if key not in AppConfig.model_fields or key == "name":
            knobs = [k for k in AppConfig.model_fields if k != "name"]
            close = difflib.get_close_matches(key, knobs, n=1)  # as the config's unknown keys
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"--set: {key!r} is not a policy knob of apps[]{hint}")
        out[key] = yaml.safe_load(value) if value.strip() else None
    return out


def _strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    for name in names:
        if not known_strategy(name):
            raise ValueError(
                f"--strategies: unknown {name!r} (expected some of {', '.join(STRATEGIES)})"
            )
        try:
            make_strategy(name, Timings())  # its suffix: a fly-autostop interval > 0
        except ValueError as exc:
            raise ValueError(f"--strategies: {exc}") from None
    if not names:
        raise ValueError("--strategies: expected at least one name")
    return names


class _Stopped(BaseException):
    """Raised by the handler of SIGINT and SIGTERM: unwinding the run stops its workers."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`_Stopped` (the first one: later ones are ignored,
    not to cut short the clean-up it starts, nor the exit after it). Only the main thread
    can have handlers.

    Once stopped, they stay ignored: the process is on its way out, with its line and
    128 plus the signal. Given back their handlers on the way out, a second signal (a
    Ctrl-C after a kill of the main process, or Ctrl-C pressed twice) that came after the
    clean-up raised KeyboardInterrupt there: a traceback, and the process ended by SIGINT
    (exit -2) instead of 130."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopped = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopped
        stopped = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise _Stopped(signum)

    before = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        if not stopped:
            for sig, handler in before.items():
                signal.signal(sig, handler)


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        with _stopped_by_signals():
            if args.seed < 0:
                # Python's random takes a seed's absolute value: -1 would be 1's trace.
                raise ValueError(f"--seed: expected a whole number >= 0, got {args.seed}")
            if args.generate and args.trace:
                raise ValueError("expected --trace FILE or --generate SHAPE, not both")
            if args.generate and args.out:
                return _generate(args, out)
            return _replay(args, out, err)
    except _Stopped as stopped:
        print(f"simulate: stopped by {signal.Signals(stopped.signum).name}", file=err)
        return 128 + stopped.signum
    except (TraceError, ValueError) as exc:
        print(f"simulate: {exc}", file=err)
        return EXIT_USAGE
    except WorkerDied as exc:
        print(f"simulate: {exc}", file=err)
        return 1
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=err)
        return EXIT_USAGE


def _names(names: Iterable[str], most: int = 5) -> str:
    names = list(names)
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _by_flag(exc: TimingError) -> ValueError:
    """A TimingError said by the flag that set the field, as typed (``--tick-s``, not
    ``tick_s``), as the other flags' errors are. Each field is its flag's: tick_s is
    --tick-s's (control.tick_s, from --config, is above 0 by the config's own check), the
    seed --seed's (checked in :func:`run`), generate()'s hours --hours'."""
    flag = "--" + exc.field.replace("_", "-")
    return ValueError(f"{flag}: expected {exc.expected}, got {exc.value:g}")


def _generated(args: argparse.Namespace) -> list[tuple[float, str, float]]:
    if args.generate not in SHAPES:
        raise ValueError(f"--generate: expected one of {', '.join(SHAPES)}, got {args.generate!r}")
    try:
        return generate(args.generate, seed=args.seed, hours=args.hours)
    except TimingError as exc:
        raise _by_flag(exc) from None


def _generate(args: argparse.Namespace, out: TextIO) -> int:
    rows = _generated(args)
    try:
        count = write_csv(Path(args.out), rows)
    except OSError as exc:
        raise ValueError(f"--out: cannot write {args.out}: {exc.strerror or exc}") from None
    print(f"wrote {count} requests ({args.generate}, seed {args.seed}) to {args.out}", file=out)
    return EXIT_OK


def _replay(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if not args.trace and not args.generate:
        raise ValueError("expected --trace FILE or --generate SHAPE")
    if args.out:
        raise ValueError("--out: only with --generate (where the trace is written)")
    configured: dict[str, AppConfig] = {}
    tick_s = 1.0
    if args.config:
        # Only the apps' policies and the tick are read: not what only `run` needs (its
        # listen addresses, app names Fly takes; a trace's apps may be named otherwise).
        settings, _ = load_settings(args.config, require_file=True, serving=False)
        configured = {app.name: app for app in settings.apps}
        tick_s = settings.control.tick_s
    overrides = parse_overrides(args.set or [])
    try:
        timings = Timings(
            tick_s=args.tick_s if args.tick_s is not None else tick_s,
            api_latency_s=args.api_latency_s,
            resume_s=args.resume_s,
            start_s=args.start_s,
            suspend_s=args.suspend_s,
            stop_s=args.stop_s,
            autostop_interval_s=args.autostop_interval_s,
            keepalive_s=args.keepalive_s,
            resume_cold_rate=args.resume_cold_rate,
            snapshot_max_age_s=args.snapshot_max_age_s,
            action_failure_rate=args.action_failure_rate,
            boot_failure_rate=args.boot_failure_rate,
            two_choices=args.balance == "two-choices",
            seed=args.seed,
        )
    except TimingError as exc:
        raise _by_flag(exc) from None
    if args.max_apps is not None and args.max_apps < 1:
        raise ValueError(f"--max-apps: expected a number >= 1, got {args.max_apps}")
    if not (math.isfinite(args.duration_ms) and args.duration_ms > 0):
        raise ValueError(f"--duration-ms: expected a number > 0, got {args.duration_ms:g}")
    if args.horizon_s is not None and not 0 < args.horizon_s <= MAX_SPAN_S:  # (nan too)
        # A longer replay is days of the fly-autostop baseline's checks, or never ends.
        raise ValueError(
            f"--horizon-s: expected a number > 0 and at most {MAX_SPAN_S:.0f} "
            f"({MAX_SPAN_S / 86400:g} days), got {args.horizon_s:g}"
        )
    if args.generate:
        trace = from_rows(_generated(args)).pick(args.app, args.max_apps)
    else:
        trace = read_trace(
            Path(args.trace),
            args.trace_format,
            args.duration_ms / 1000.0,
            only=args.app,
            busiest=args.max_apps,
        )
    if not trace.apps:
        raise TraceError(f"{args.trace or args.generate}: no requests")
    if configured and not any(app in configured for app in trace.apps):
        # Its knobs are found by app name: none applies, and the table did not say so.
        print(
            f"simulate: warning: --config {args.config}: none of its apps"
            f" ({_names(configured)}) is in the trace ({_names(trace.apps)}): every app"
            " replays the default policy (and --set's knobs)",
            file=err,
        )
    resolve = config_resolver(configured, overrides)
    try:
        for app in trace.apps:
            resolve(app)
    except ValidationError as exc:
        raise ValueError("--set: " + "; ".join(format_errors(exc))) from None
    if args.jobs < 1:
        raise ValueError(f"--jobs: expected a number >= 1, got {args.jobs}")
    if args.frontier:
        names = _strategies(args.strategies) if args.strategies else list(SWEEPS)
        if args.format == "csv":
            raise ValueError("--frontier: expected --format table or json")
        if args.plot and not args.plot.endswith((".png", ".svg")):
            raise ValueError(f"--plot: expected a .png or .svg file name, got {args.plot!r}")
        if args.plot and not Path(args.plot).absolute().parent.is_dir():
            # Said now, not after a sweep of minutes whose figures would then be lost.
            raise ValueError(f"--plot: cannot write {args.plot}: No such file or directory")
        found = sweep(
            trace,
            resolve,
            timings,
            names,
            horizon=args.horizon_s,
            skip_idle=not args.every_tick,
            jobs=args.jobs,
        )
        if args.plot:
            try:
                plot(found, args.plot)
            except OSError as exc:
                raise ValueError(
                    f"--plot: cannot write {args.plot}: {exc.strerror or exc}"
                ) from None
        out.write(render_frontier(found, args.format))
        return EXIT_OK
    if args.plot:
        raise ValueError("--plot draws the frontier: add --frontier")
    report = simulate(
        trace,
        resolve,
        timings,
        _strategies(args.strategies or DEFAULT_STRATEGIES),
        horizon=args.horizon_s,
        skip_idle=not args.every_tick,
        jobs=args.jobs,
    )
    out.write(render(report, args.format, per_app=not args.totals_only))
    return EXIT_OK
