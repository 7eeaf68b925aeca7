"""`autoscaler demo`: the whole system on the embedded emulator, under a built-in story.

It starts the embedded emulator with an app of N stopped machines, the controller, the proxy
and the admin server (through the same :class:`~autoscaler.service.Service` as
``autoscaler run``), then plays a traffic pattern: quiet, a burst of 40 concurrent clients,
a steady trickle of 5, quiet until the app sleeps, one late visitor (a resume), and quiet
until every machine sleeps again. A live view shows what happens; a summary says what it
cost. Nothing is simulated: the requests are real HTTP through the proxy to real processes.

With ``--no-traffic`` it only starts everything and waits for Ctrl-C, so that one can
``curl -H 'Host: demo' http://127.0.0.1:8080/`` and watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib.resources import as_file, files
from pathlib import Path
from typing import TextIO

import aiohttp

from autoscaler.config import ConfigError, Settings, load_settings
from autoscaler.scaling.fleet import STARTED, STOPPED, SUSPENDED
from autoscaler.service import Service, run_event_loop

DEMO_APP = "demo"
DEFAULT_DURATION_S = 90.0
SETTLE_TIMEOUT_S = 60.0  # after the story: how long the machines may take to fall asleep


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


@dataclass
class Stats:
    """What the clients saw."""

    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    wakes_seen: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    in_flight: int = 0

    def record(self, status: int | None, wake: str | None, latency: float, error: str = "") -> None:
        self.requests += 1
        self.latencies.append(latency)
        if status is None or status >= 500:
            self.errors[error or str(status)] += 1
        if wake and wake != "none":
            self.wakes_seen[wake] += 1


@dataclass(frozen=True, slots=True)
class Summary:
    requests: int
    errors: dict[str, int]
    wakes: dict[str, int]
    """Machines woken by the controller, by kind (resume, start)."""
    requests_waited: dict[str, int]
    """Requests that waited for a wake, by kind (from the fly-autoscaler-wake header)."""
    p50_ms: float
    p99_ms: float
    machine_seconds: float
    always_on_seconds: float
    final_states: dict[str, int]
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return not self.errors


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def _client(
    session: aiohttp.ClientSession, url: str, phase: Phase, stop: float, stats: Stats
) -> None:
    target = f"{url}/work?ms={phase.work_ms}"
    while time.monotonic() < stop:
        t0 = time.monotonic()
        stats.in_flight += 1
        try:
            async with session.get(target, headers={"Host": DEMO_APP}) as resp:
                await resp.read()
                stats.record(resp.status, resp.headers.get("fly-autoscaler-wake"), _since(t0))
        except (aiohttp.ClientError, TimeoutError) as exc:
            stats.record(None, None, _since(t0), type(exc).__name__)
        finally:
            stats.in_flight -= 1
        if phase.think_s:
            await asyncio.sleep(phase.think_s)


def _since(t0: float) -> float:
    return time.monotonic() - t0


class LiveView:
    """One status line a second: redrawn in place on a terminal, plain lines elsewhere."""

    def __init__(self, service: Service, stats: Stats, out: TextIO) -> None:
        self.service = service
        self.stats = stats
        self.out = out
        self.tty = out.isatty()
        self.phase = "starting"
        self._t0 = time.monotonic()
        self._last_requests = 0
        self._last_t = self._t0

    def states(self) -> Counter[str]:
        view = self.service.view.apps.get(DEMO_APP)
        return Counter(up.state for up in view.upstreams.values()) if view else Counter()

    def line(self) -> str:
        now = time.monotonic()
        rate = (self.stats.requests - self._last_requests) / max(now - self._last_t, 1e-9)
        self._last_requests, self._last_t = self.stats.requests, now
        view = self.service.view.apps.get(DEMO_APP)
        queued = view.queued if view else 0
        states = self.states()
        woke = _wakes(self.service)
        return (
            f"{now - self._t0:6.1f}s  {self.phase:<8} {rate:7.0f} req/s  "
            f"in flight {self.stats.in_flight:3d}  queued {queued:3d}  "
            f"machines started {states[STARTED]} suspended {states[SUSPENDED]} "
            f"stopped {states[STOPPED]}  wakes start {woke['start']} resume {woke['resume']}  "
            f"errors {sum(self.stats.errors.values())}"
        )

    def show(self) -> None:
        text = self.line()
        if self.tty:
            self.out.write("\r\x1b[2K" + text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def announce(self, message: str) -> None:
        if self.tty:
            self.out.write("\r\x1b[2K")
        self.out.write(message + "\n")
        self.out.flush()

    async def run(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            self.show()


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
) -> Summary | None:
    """Run the demo; the summary, or None when ``traffic`` is off (ended by a signal)."""
    ports = ports or {}
    service = Service(
        settings,
        proxy_port=ports.get("proxy"),
        admin_port=ports.get("admin"),
        emulator_port=ports.get("emulator"),
    )
    stats = Stats()
    live = LiveView(service, stats, out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    t0 = time.monotonic()
    try:
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
        if not traffic:
            live.announce(f"try:  curl -H 'Host: {DEMO_APP}' {proxy_url}/   (Ctrl-C to stop)")
            ticker = asyncio.create_task(live.run(2.0))
            await stop.wait()
            ticker.cancel()
            return None
        ticker = asyncio.create_task(live.run(1.0))
        story = asyncio.create_task(_play(proxy_url, duration_s, stats, live))
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait({story, waiter}, return_when=asyncio.FIRST_COMPLETED)
        interrupted = not story.done()
        for task in (story, waiter, ticker):
            task.cancel()
        await asyncio.gather(story, waiter, ticker, return_exceptions=True)
        if interrupted:
            live.announce("interrupted: stopping")
        return _summarize(service, stats, live.states(), time.monotonic() - t0)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await service.stop()


async def _play(url: str, duration_s: float, stats: Stats, live: LiveView) -> None:
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
            clients = [_client(session, url, phase, end, stats) for _ in range(phase.clients)]
            await asyncio.gather(*clients, asyncio.sleep(seconds))
    live.phase = "settle"
    live.announce("--- waiting for every machine to fall asleep")
    view = live.service.view.app(DEMO_APP)

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


def _wakes(service: Service) -> dict[str, int]:
    """Machines the controller woke, by kind."""
    return {
        kind: int(
            _sample(service, "autoscaler_scaling_actions_total", {"action": kind, "result": "ok"})
        )
        for kind in ("start", "resume")
    }


def _summarize(service: Service, stats: Stats, states: Counter[str], elapsed: float) -> Summary:
    started_s = _sample(service, "autoscaler_machine_seconds_total", {"state": STARTED})
    return Summary(
        requests=stats.requests,
        errors=dict(stats.errors),
        wakes=_wakes(service),
        requests_waited=dict(stats.wakes_seen),
        p50_ms=percentile(stats.latencies, 0.50) * 1000,
        p99_ms=percentile(stats.latencies, 0.99) * 1000,
        machine_seconds=started_s,
        always_on_seconds=sum(states.values()) * elapsed,
        final_states=dict(states),
        elapsed_s=elapsed,
    )


def print_summary(summary: Summary, out: TextIO) -> None:
    saved = (
        1 - summary.machine_seconds / summary.always_on_seconds if summary.always_on_seconds else 0
    )
    errors = ", ".join(f"{k} {v}" for k, v in sorted(summary.errors.items())) or "none"
    waited = ", ".join(f"{k} {v}" for k, v in sorted(summary.requests_waited.items())) or "none"
    states = ", ".join(f"{k} {v}" for k, v in sorted(summary.final_states.items()))
    lines = [
        "",
        "summary",
        f"  requests          {summary.requests}",
        f"  errors            {errors}",
        f"  wakes             start {summary.wakes['start']}, resume {summary.wakes['resume']}",
        f"  requests waited   {waited}",
        f"  latency           p50 {summary.p50_ms:.1f} ms, p99 {summary.p99_ms:.1f} ms",
        f"  machine-seconds   {summary.machine_seconds:.0f} started, against "
        f"{summary.always_on_seconds:.0f} always-on ({saved:.0%} saved)",
        f"  machines at end   {states}",
        f"  elapsed           {summary.elapsed_s:.0f}s",
    ]
    out.write("\n".join(lines) + "\n")
    out.flush()


def main(
    config: str | None, duration_s: float, machines: int | None, traffic: bool, out: TextIO
) -> int:
    """``autoscaler demo``: 0 when every request was served, 1 otherwise, 2 on bad config."""
    try:
        settings = demo_settings(config, machines)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2
    try:
        demo = run_demo(settings, duration_s=duration_s, traffic=traffic, out=out)
        summary = run_event_loop(demo)
    except OSError as exc:
        print(f"autoscaler demo: cannot start: {exc}", file=sys.stderr)
        return 1
    if summary is None:
        return 0
    print_summary(summary, out)
    return 0 if summary.ok else 1
