"""What ``autoscaler demo`` shows while it runs.

On a terminal: a full-screen live view (:mod:`autoscaler.tui`, the view ``autoscaler status
--watch`` draws too) redrawn in place four times a second, with the story's phase and the
clients' own figures above it and the latest events below. Elsewhere (CI, a pipe, or with
``--verbose``, whose log lines would tear a full-screen view): the start-up and phase lines,
and one plain progress line every few seconds.

It reads the running system through three callables (the admin server's status document,
the metric families, the clients' figures), so it imports nothing of the service.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, TextIO

from rich.console import Console
from rich.live import Live
from rich.text import Text

from autoscaler import tui

REDRAW_S = 0.25  # machine rows change as they happen: the control loop ticks at 0.25 s
SAMPLE_S = 1.0  # a sparkline point a second
PROGRESS_S = 5.0  # without a terminal: a progress line this often
EVENTS = 4  # latest announcements shown under the live view
FAILED = ("4xx", "5xx", "transport errors")

Clients = tuple[int, int, Mapping[str, int]]
"""What the demo's clients saw: requests answered, in flight, answers by class."""


class DemoView:
    """The live view (``terminal``) or plain progress lines, for one app of the demo."""

    def __init__(
        self,
        out: TextIO,
        app: str,
        *,
        status: Callable[[], dict[str, Any] | None],
        families: Callable[[], Iterable[tui.MetricFamily]],
        clients: Callable[[], Clients],
        terminal: bool,
        log_file: str | None = None,
    ) -> None:
        self.out = out
        self.app = app
        self.phase = "starting"
        self.terminal = terminal
        self.log_file = log_file
        self._status = status
        self._families = families
        self._clients = clients
        self._history = tui.History()
        self._events: deque[str] = deque(maxlen=EVENTS)
        self._doc: dict[str, Any] | None = None
        self._t0 = time.monotonic()
        self._sampled = 0.0
        self._live: Live | None = None
        if terminal:
            console = Console(file=out, force_terminal=True)
            self._live = Live(
                console=console, screen=True, auto_refresh=False, redirect_stderr=False
            )

    def __enter__(self) -> DemoView:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()

    def announce(self, message: str) -> None:
        """An event: a line of its own without a terminal, the events list on one."""
        if self._live is None:
            self.out.write(message + "\n")
            self.out.flush()
        else:
            self._events.append(message)
            self.draw()

    def states(self) -> Counter[str]:
        """The app's machines by state, as the admin server's status has them now."""
        doc = self._status()
        app = next((a for a in (doc or {}).get("apps", []) if a.get("app") == self.app), None)
        return Counter(str(m.get("state")) for m in (app or {}).get("machines", []))

    def draw(self) -> None:
        now = time.monotonic()
        self._doc = self._status()
        if now - self._sampled >= SAMPLE_S:
            self._sampled = now
            self._history.add(now, tui.traffic_by_app(self._families()))
        if self._live is None:
            self.out.write(self.progress_line(now) + "\n")
            self.out.flush()
            return
        header = [
            Text.assemble(
                ("autoscaler demo", "bold"),
                f"   phase {self.phase}   {now - self._t0:.0f} s",
            ),
            Text(f"clients: {self._clients_text()}"),
        ]
        footer = [Text(event, style="dim") for event in self._events]
        where = f"logs: {self.log_file}" if self.log_file else "logs: on the screen"
        footer.append(Text(f"{where}   Ctrl-C to stop", style="dim"))
        self._live.update(tui.view(self._doc, self._history, header, footer), refresh=True)

    def progress_line(self, now: float) -> str:
        rates = self._history.rates(self.app)
        traffic = self._history.latest(self.app)
        states = self.states()
        machines = " ".join(f"{state} {n}" for state, n in sorted(states.items())) or "none"
        return (
            f"{now - self._t0:4.0f}s {self.phase:<7} {rates[-1] if rates else 0.0:4.0f} req/s"
            f"  held {traffic.queued:.0f}  {machines}"
            f"  wakes {tui.wakes_text(traffic)}  answered {self._clients()[0]}"
            f" ({self._failed()} failed)"
        )

    def _failed(self) -> int:
        return sum(self._clients()[2].get(k, 0) for k in FAILED)

    def _clients_text(self) -> str:
        requests, in_flight, answers = self._clients()
        classes = "  ".join(f"{k} {answers.get(k, 0)}" for k in ("2xx", *FAILED))
        return f"{requests} requests, {in_flight} in flight   {classes}"

    async def run(self) -> None:
        """Redraw until cancelled."""
        every = REDRAW_S if self._live is not None else PROGRESS_S
        # A first point now: a rate needs two, and the first line would say 0 req/s.
        self._sampled = time.monotonic()
        self._history.add(self._sampled, tui.traffic_by_app(self._families()))
        while True:
            await asyncio.sleep(every)
            self.draw()
