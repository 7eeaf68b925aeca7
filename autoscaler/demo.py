"""`autoscaler demo`: the whole system on the embedded emulator, under a built-in story.

It starts the embedded emulator with an app of N stopped machines, the controller, the proxy
and the admin server (through the same :class:`~autoscaler.service.Service` as
``autoscaler run``), then plays a traffic pattern: quiet, a burst of 40 concurrent clients,
a steady trickle of 5, quiet until the app sleeps, one late visitor (a resume), and quiet
until every machine sleeps again. Nothing is simulated: the requests are real HTTP through
the proxy to real processes.

A live view shows what happens (:mod:`autoscaler.demo_view`); the logs go to a file. The
summary counts every answer by class and says what the run cost in machine-seconds, beside
what Fly's autostop and one machine always on would have spent on the very same requests:
the run's request log replayed through the simulator's baselines (the one thing here that
is simulated, and the summary says so).

With ``--no-traffic`` it only starts everything and waits for Ctrl-C, so that one can
``curl -H 'Host: demo' http://127.0.0.1:8080/`` and watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib.resources import as_file, files
from pathlib import Path
from typing import TextIO

import aiohttp

from autoscaler import logs, tui
from autoscaler.config import ConfigError, Settings, is_loopback, load_settings, parse_host_port
from autoscaler.control.view import AppView
from autoscaler.demo_view import DemoView
from autoscaler.emulator import StateFileError
from autoscaler.logs import LogFormat
from autoscaler.metrics import WAKE_UNCORDON
from autoscaler.scaling.fleet import STARTED, STOPPED, SUSPENDED
from autoscaler.service import Service, run_event_loop
from autoscaler.sim.model import Timings
from autoscaler.sim.run import simulate
from autoscaler.sim.trace import Trace

DEMO_APP = "demo"
DEFAULT_DURATION_S = 90.0
SETTLE_TIMEOUT_S = 60.0  # after the story: how long the machines may take to fall asleep
LOG_NAME = "autoscaler-demo.log"
AUTOSTOP_INTERVAL_S = Timings().autostop_interval_s  # the simulator's fly-autostop check


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    share: float
    """Fraction of the run's duration."""
    clients: int = 0
    work_ms: int = 0
    """How long each request keeps its machine busy (the demo app's /work?ms=)."""
    think_s: float = 0.0
    """Pause of each client between two requests."""


STORY: tuple[Phase, ...] = (
    Phase("quiet", 0.06),
    Phase("burst", 0.24, clients=40, work_ms=100),
    Phase("steady", 0.26, clients=5, work_ms=50, think_s=0.1),
    Phase("quiet", 0.20),
    Phase("visitor", 0.06, clients=1, work_ms=10, think_s=1.0),
    Phase("quiet", 0.18),
)


ANSWER_CLASSES = ("2xx", "3xx", "4xx", "5xx")
TRANSPORT = "transport errors"
CUT = "cut short"
"""Requests under way when Ctrl-C (or SIGTERM) stopped the story: held for a wake as a
rule. Not answered, but not failed either: the stop was the user's."""
NOT_FAILED = ("2xx", "3xx", CUT)


def answer_class(status: int | None) -> str:
    """``2xx``... for an HTTP status; transport errors (no answer at all) apart."""
    return TRANSPORT if status is None else f"{status // 100}xx"


@dataclass
class Stats:
    """What the clients saw, and the request log the baselines replay."""

    requests: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    """Every answer by class (2xx, 4xx, 5xx...), transport errors, and requests cut short."""
    wakes_seen: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    in_flight: int = 0
    log: list[tuple[float, float]] = field(default_factory=list)
    """(arrival, duration) of every request, seconds from the start of the run."""

    def record(
        self,
        status: int | None,
        wake: str | None,
        latency: float,
        *,
        arrival: float = 0.0,
        work_s: float = 0.0,
    ) -> None:
        self.requests += 1
        self.latencies.append(latency)
        self.answers[answer_class(status)] += 1
        waited = bool(wake and wake != "none")
        if waited and wake:
            self.wakes_seen[wake] += 1
        # The replay models wake waits itself: a request that waited for one is logged
        # with the work it asked for, any other with the time it took.
        self.log.append((arrival, work_s if waited or status is None else latency))

    def cut(self, *, arrival: float, work_s: float) -> None:
        """A request the stop cut short: counted, and in the log the baselines replay (they
        were sent the same requests); not in the latencies, having no answer. Left out, a
        Ctrl-C during the first wake gave a summary of 0 requests for 40 held ones."""
        self.requests += 1
        self.answers[CUT] += 1
        self.log.append((arrival, work_s))

    @property
    def failed(self) -> int:
        """Answers other than 2xx and 3xx, and transport errors."""
        return sum(n for k, n in self.answers.items() if k not in NOT_FAILED)


@dataclass(frozen=True, slots=True)
class Replayed:
    """One baseline on the run's own requests."""

    name: str
    machine_seconds: float
    waited: int
    """Requests that waited for a wake."""
    errors: int


@dataclass(frozen=True, slots=True)
class Summary:
    requests: int
    answers: dict[str, int]
    wakes: dict[str, int]
    """Wakes for held requests, by kind (start, resume; uncordon, a drain taken back, when
    there were any), as the controller timed them."""
    wake_mean_s: dict[str, float]
    actions: dict[str, int]
    """The controller's successful actions on machines (start, resume, suspend, stop)."""
    requests_waited: dict[str, int]
    """Requests that waited for a wake, by kind (from the fly-autoscaler-wake header)."""
    p50_ms: float
    p99_ms: float
    machine_seconds: float
    baselines: list[Replayed]
    final_states: dict[str, int]
    elapsed_s: float

    @property
    def failed(self) -> int:
        return sum(n for k, n in self.answers.items() if k not in NOT_FAILED)

    @property
    def ok(self) -> bool:
        return self.failed == 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def _client(
    session: aiohttp.ClientSession, url: str, phase: Phase, stop: float, stats: Stats, t0: float
) -> None:
    target = f"{url}/work?ms={phase.work_ms}"
    work_s = phase.work_ms / 1000
    while time.monotonic() < stop:
        start = time.monotonic()
        stats.in_flight += 1
        try:
            async with session.get(target, headers={"Host": DEMO_APP}) as resp:
                await resp.read()
                wake = resp.headers.get("fly-autoscaler-wake")
                status: int | None = resp.status
        except (aiohttp.ClientError, TimeoutError):
            wake, status = None, None
        except asyncio.CancelledError:  # the story stopped by Ctrl-C
            stats.cut(arrival=start - t0, work_s=work_s)
            raise
        finally:
            stats.in_flight -= 1
        stats.record(status, wake, _since(start), arrival=start - t0, work_s=work_s)
        if phase.think_s:
            await asyncio.sleep(phase.think_s)


def _since(t0: float) -> float:
    return time.monotonic() - t0


def demo_settings(config: str | None, machines: int | None) -> Settings:
    """The built-in demo config (or the user's), always on the embedded emulator."""
    if config is None:
        with as_file(files("autoscaler") / "data" / "demo.yaml") as path:
            settings, _ = load_settings(Path(path), env={})
    else:
        settings, _ = load_settings(config)
    if not settings.fly.embedded:
        raise ConfigError(
            [f"{config}: fly.api_url: the demo runs only on the embedded emulator; unset it"]
        )
    exposed = [
        f"{config}: {key}: the demo listens on loopback only (127.0.0.0/8, [::1] or"
        f" localhost), got {value!r}"
        for key, value in (
            ("proxy.listen", settings.proxy.listen),
            ("admin.listen", settings.admin.listen),
        )
        if not is_loopback(parse_host_port(value, listen=True).host)
    ]
    if exposed:
        raise ConfigError(exposed)
    try:
        app = settings.app(DEMO_APP)
    except KeyError:
        raise ConfigError([f"{config}: apps: the demo needs an app named {DEMO_APP!r}"]) from None
    seeded = [a for a in settings.emulator.apps if a.name == DEMO_APP]
    if not seeded:
        raise ConfigError([f"{config}: emulator.apps: the demo needs an app named {DEMO_APP!r}"])
    if machines is not None:
        app = app.model_copy(update={"max_machines": max(machines, app.min_machines, 1)})
        seeded = [seeded[0].model_copy(update={"machines": machines})]
        settings = settings.model_copy(
            update={
                "apps": [app if a.name == DEMO_APP else a for a in settings.apps],
                "emulator": settings.emulator.model_copy(update={"apps": seeded}),
            }
        )
    return settings


async def run_demo(
    settings: Settings,
    *,
    duration_s: float = DEFAULT_DURATION_S,
    traffic: bool = True,
    out: TextIO = sys.stdout,
    ports: dict[str, int] | None = None,
    terminal: bool | None = None,
    log_file: str | None = None,
) -> Summary | None:
    """Run the demo; the summary, or None when ``traffic`` is off (ended by a signal).

    ``terminal`` (default: whether ``out`` is one) draws the full-screen live view;
    otherwise plain lines. ``log_file`` is only shown: the caller sends the logs there.
    """
    ports = ports or {}
    service = Service(
        settings,
        proxy_port=ports.get("proxy"),
        admin_port=ports.get("admin"),
        emulator_port=ports.get("emulator"),
    )
    stats = Stats()
    live = DemoView(
        out,
        DEMO_APP,
        status=lambda: service.admin.status_document() if service.admin else None,
        families=service.metrics.registry.collect,
        clients=lambda: (stats.requests, stats.in_flight, stats.answers),
        terminal=out.isatty() if terminal is None else terminal,
        log_file=log_file,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    t0 = time.monotonic()
    try:
        with live:
            try:
                return await _run(service, settings, stats, live, stop, duration_s, traffic, t0)
            finally:
                live.phase = "stopping"
                live.announce("stopping: every machine process goes with the emulator")
                await service.stop()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _run(
    service: Service,
    settings: Settings,
    stats: Stats,
    live: DemoView,
    stop: asyncio.Event,
    duration_s: float,
    traffic: bool,
    t0: float,
) -> Summary | None:
    await service.start()
    if service.proxy is None or service.admin is None:
        raise RuntimeError("the service started without its proxy or admin server")
    proxy_url = f"http://127.0.0.1:{service.proxy.port}"
    host, port = service.admin.address
    seeded = next(a.machines for a in settings.emulator.apps if a.name == DEMO_APP)
    live.announce(
        f"autoscaler demo: proxy {proxy_url}  admin http://{host}:{port}/status  "
        f"app {DEMO_APP!r} with {seeded} machines, all stopped"
    )
    if live.log_file and not live.terminal:
        live.announce(f"logs: {live.log_file}")
    ticker = asyncio.create_task(live.run())
    if not traffic:
        live.phase = "idle"
        live.announce(f"try:  curl -H 'Host: {DEMO_APP}' {proxy_url}/   (Ctrl-C to stop)")
        await stop.wait()
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
        return None
    view = service.view.app(DEMO_APP)
    story = asyncio.create_task(_play(proxy_url, duration_s, stats, live, t0, view))
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait({story, waiter}, return_when=asyncio.FIRST_COMPLETED)
    interrupted = not story.done()
    for task in (story, waiter, ticker):
        task.cancel()
    results = await asyncio.gather(story, waiter, ticker, return_exceptions=True)
    if isinstance(results[0], Exception):
        raise results[0]
    if interrupted:
        live.announce("interrupted")
    return _summarize(service, settings, stats, live.states(), time.monotonic() - t0)


async def _play(
    url: str, duration_s: float, stats: Stats, live: DemoView, t0: float, view: AppView
) -> None:
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for phase in STORY:
            live.phase = phase.name
            seconds = phase.share * duration_s
            live.announce(
                f"--- {phase.name}: {phase.clients} client(s) for {seconds:.0f}s"
                if phase.clients
                else f"--- {phase.name} for {seconds:.0f}s"
            )
            end = time.monotonic() + seconds
            clients = [_client(session, url, phase, end, stats, t0) for _ in range(phase.clients)]
            await asyncio.gather(*clients, asyncio.sleep(seconds))
    live.phase = "settle"
    live.announce("--- waiting for every machine to fall asleep")

    def asleep() -> bool:
        states = live.states()
        return bool(states) and all(state in (SUSPENDED, STOPPED) for state in states)

    # The summary reports whatever states the machines reached by the deadline.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            while not asleep():
                await view.changed()  # the controller publishes every state it reads


def _sample(service: Service, name: str, labels: dict[str, str]) -> float:
    return service.metrics.registry.get_sample_value(name, {"app": DEMO_APP, **labels}) or 0.0


def _actions(service: Service) -> dict[str, int]:
    """The controller's successful actions on machines, by kind."""
    return {
        kind: int(
            _sample(service, "autoscaler_scaling_actions_total", {"action": kind, "result": "ok"})
        )
        for kind in ("start", "resume", "suspend", "stop")
    }


def replay_baselines(
    log: list[tuple[float, float]], settings: Settings, horizon_s: float
) -> list[Replayed]:
    """The run's own requests under Fly's autostop and under one machine always on, in the
    simulator (same app config, the emulator's timings); nothing is run for real.

    The log is replayed as it arrived (open loop): where a baseline serves slower than
    this run did, requests pile up in its queue, and past ``max_queue`` or
    ``wake_timeout_s`` they count as turned away or timed out."""
    app = settings.app(DEMO_APP)
    timing = settings.emulator.effective_timing()
    timings = Timings(
        tick_s=settings.control.tick_s,
        api_latency_s=0.01,  # loopback
        resume_s=_mean(timing.resume_s),
        start_s=_mean(timing.start_s),
        suspend_s=_mean(timing.suspend_s),
        stop_s=_mean(timing.stop_s),
    )
    trace = Trace({DEMO_APP: sorted(log)})
    horizon = max(horizon_s, trace.end)
    report = simulate(trace, lambda _: app, timings, BASELINES, horizon=horizon)
    return [
        Replayed(name, stats.up_s, stats.wake_waits, stats.errors)
        for name in report.strategies
        for stats in report.stats[name].values()
    ]


def _mean(span: float | tuple[float, float]) -> float:
    """An emulator time: fixed, or drawn from [lo, hi] (then its mean)."""
    return (span[0] + span[1]) / 2 if isinstance(span, tuple) else span


BASELINES = ("fly-autostop", "always-on")
BASELINE_NAMES = {
    "fly-autostop": "Fly's autostop, same requests",
    "always-on": "one machine always on, same requests",
}


def _summarize(
    service: Service, settings: Settings, stats: Stats, states: Counter[str], elapsed: float
) -> Summary:
    started_s = _sample(service, "autoscaler_machine_seconds_total", {"state": STARTED})
    timed = {
        kind: (
            _sample(service, "autoscaler_wake_duration_seconds_sum", {"kind": kind}),
            _sample(service, "autoscaler_wake_duration_seconds_count", {"kind": kind}),
        )
        for kind in tui.WAKE_KINDS  # start, resume, uncordon: the live view's order
    }
    # Starts and resumes always (the story's wakes); drains taken back when there were any.
    if not timed[WAKE_UNCORDON][1]:
        del timed[WAKE_UNCORDON]
    return Summary(
        requests=stats.requests,
        answers=dict(stats.answers),
        wakes={k: int(n) for k, (_, n) in timed.items()},
        wake_mean_s={k: total / n for k, (total, n) in timed.items() if n},
        actions=_actions(service),
        requests_waited=dict(stats.wakes_seen),
        p50_ms=percentile(stats.latencies, 0.50) * 1000,
        p99_ms=percentile(stats.latencies, 0.99) * 1000,
        machine_seconds=started_s,
        baselines=replay_baselines(stats.log, settings, elapsed),
        final_states=dict(states),
        elapsed_s=elapsed,
    )


def summary_lines(summary: Summary, autostop_interval_s: float = AUTOSTOP_INTERVAL_S) -> list[str]:
    answers = ", ".join(
        f"{k} {summary.answers.get(k, 0)}"
        for k in (*ANSWER_CLASSES, TRANSPORT, CUT)
        if k in ("2xx", "4xx", "5xx", TRANSPORT) or summary.answers.get(k)
    )
    wakes = ", ".join(
        f"{kind} {n}" + (f" (mean {summary.wake_mean_s[kind]:.2f} s)" if n else "")
        for kind, n in summary.wakes.items()
    )
    actions = ", ".join(f"{kind} {n}" for kind, n in summary.actions.items())
    waited = sum(summary.requests_waited.values())
    by_kind = ", ".join(f"{k} {v}" for k, v in sorted(summary.requests_waited.items()))
    states = ", ".join(f"{k} {v}" for k, v in sorted(summary.final_states.items()))
    lines = [
        "",
        "summary",
        f"  requests          {summary.requests}",
        f"  answers           {answers}",
        f"  wakes             {wakes}",
        f"  machine actions   {actions}",
        f"  requests waited   {waited}" + (f" ({by_kind})" if by_kind else ""),
        f"  latency           p50 {summary.p50_ms:.1f} ms, p99 {summary.p99_ms:.1f} ms",
        f"  machine-seconds   {summary.machine_seconds:6.0f}  this run"
        f" ({waited} requests waited for a wake)",
    ]
    for replayed in summary.baselines:
        name = BASELINE_NAMES.get(replayed.name, replayed.name)
        note = f"{replayed.waited} waited"
        if replayed.errors:
            note += f", {replayed.errors} turned away or timed out"
        if replayed.name == "fly-autostop":
            note += f"; idle check every {autostop_interval_s:g} s"
        lines.append(f"                    {replayed.machine_seconds:6.0f}  {name} ({note})")
    lines += [
        f"  machines at end   {states}",
        f"  elapsed           {summary.elapsed_s:.0f}s",
    ]
    return lines


def print_summary(summary: Summary, out: TextIO) -> None:
    out.write("\n".join(summary_lines(summary)) + "\n")
    out.flush()


def _port_hint(config: str | None, settings: Settings) -> str:
    """How to move the demo off a port in use: the built-in config takes no ``AUTOSCALER_*``
    variables (a real deployment's must not steer the demo), so only a config file does."""
    ports = (
        f"proxy.listen {settings.proxy.listen}, admin.listen {settings.admin.listen},"
        f" emulator.listen {settings.emulator.listen}"
    )
    if config is None:
        builtin = files("autoscaler") / "data" / "demo.yaml"
        return (
            f"\n  the demo's ports are those of its built-in config ({ports}); for others, run"
            f" it with --config a copy of {builtin} with them changed"
        )
    return f"\n  the demo's ports are those of {config} ({ports}): change them there"


def main(
    config: str | None,
    duration_s: float,
    machines: int | None,
    traffic: bool,
    out: TextIO,
    *,
    log_file: str | None = None,
    verbose: bool = False,
    log_level: str = "info",
    log_format: LogFormat = "auto",
) -> int:
    """``autoscaler demo``: 0 when every request was answered 2xx or 3xx (or cut short by
    Ctrl-C), 1 otherwise, 2 on bad config. Logs go to ``log_file`` (default:
    autoscaler-demo.log in the system's temporary directory), or stay on the screen with
    ``verbose``."""
    try:
        settings = demo_settings(config, machines)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2
    path = None if verbose else Path(log_file or Path(tempfile.gettempdir()) / LOG_NAME)
    try:
        with contextlib.ExitStack() as stack:
            if path is not None:
                try:
                    stream = stack.enter_context(path.open("w", encoding="utf-8"))
                except OSError as exc:  # a usage mistake, said as simulate's --out is
                    why = exc.strerror or exc
                    print(
                        f"autoscaler demo: --log-file: cannot write {path}: {why}", file=sys.stderr
                    )
                    return 2
                fmt: LogFormat = "json" if log_format == "auto" else log_format
                logs.configure(level=log_level, fmt=fmt, stream=stream)
                # Before the file closes: anything logged later is an error worth seeing.
                stack.callback(logs.configure, level="error", fmt=fmt, stream=sys.stderr)
            terminal = out.isatty() and not verbose
            demo = run_demo(
                settings,
                duration_s=duration_s,
                traffic=traffic,
                out=out,
                terminal=terminal,
                log_file=str(path) if path else None,
            )
            summary = run_event_loop(demo)
    except StateFileError as exc:  # emulator.state_file
        print(exc, file=sys.stderr)
        return 2
    except OSError as exc:
        hint = _port_hint(config, settings) if exc.errno == errno.EADDRINUSE else ""
        print(f"autoscaler demo: cannot start: {exc}{hint}", file=sys.stderr)
        return 1
    if summary is None:
        return 0
    print_summary(summary, out)
    return 0 if summary.ok else 1
