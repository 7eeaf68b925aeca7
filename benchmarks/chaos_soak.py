"""A chaos soak of issue 20 ("No app goes dark") on the emulator's Fly-like profile.

    .venv/bin/python benchmarks/chaos_soak.py [--seed 1] [--runs 1] [--outage 30-60]
                                               [--hang] [--machine-faults] [--deploy]
                                               [--tail 45] [--out FILE]

On 127.0.0.1 only, for each run (seed ``--seed``, ``--seed + 1``, ...):

1. the emulator (in this process, ``profile: fly``, Fly's rate limits on, seeded) with four
   apps: ``zero`` (2 machines, scale to zero after 4 s), ``adapt`` (2, ``keep_alive:
   adaptive``), ``warm`` (1, ``min_machines: 1``), ``stopper`` (3, stopped rather than
   suspended, ``connection_idle_s`` 4);
2. ``autoscaler run`` (a child process) in front of them, its log in a file;
3. per app, a seeded traffic generator: bursts of clients, idle gaps longer than the
   app's idle_to_zero_s, WebSockets (chatty and idle) and streams (chunked, SSE);
4. faults switched on and off through the emulator's fault endpoint in a seeded order with
   quiet gaps between them: API errors with 429s and latency, a 429 storm, failed boots,
   slow suspends (15-25 s, the emulator's timing), and a full API outage of ``--outage``
   seconds (every call answered 500; with ``--hang``, every call held 25 s instead, as
   an API that times out rather than fails: the same seed then draws the same plan, but
   for that); midway a SIGHUP reload changes two apps' policies and removes ``stopper``,
   which a second reload adds back 25 s later; then ``--tail`` quiet seconds;
5. with ``--machine-faults``, beside the API's, faults of the machines on a schedule of
   their own drawn from the seed (the API's plan and the traffic stay the seed's): two
   crashes (a started machine's process killed; Fly's restart policy starts it again),
   a hang (a started machine SIGSTOPped: it accepts, never answers), a host down (hung,
   and its host unreachable for 10-20 s), a host unreachable (15-30 s, the process well)
   and 30 s of lost snapshots (``resume_cold_rate`` 0.5: resumes become cold boots); the
   proxy's ``upstream_timeout_s`` is then 5 s (the default 60 s would hold a hung
   machine's requests past the clients' timeout);
6. with ``--deploy``, a ``fly deploy`` of every app (each its own, all at once) in a slot
   of the plan drawn from the seed (a generator of its own: the API plan stays the
   seed's), between two API faults, the machine faults free to meet it: what flyctl's
   rolling strategy does through the Machines API (as tests/control/test_e2e_deploy.py):
   lease every machine of the app (a 409 or 429 waited out), refresh the leases while it
   works, then one machine at a time wait for it to be at rest, update its config with
   the lease's nonce (Fly restarts a started machine: stopped, then booted on the new
   config; one at rest stays at rest), wait for it to be back, release its lease.

Invariants, checked while it runs and at the end (each breach is printed and counted):

- every non-2xx answer (and every WebSocket or stream cut short) is classified: by the
  fault or the reload that explains it (an API fault in force during the request or up to
  wake_timeout_s before it; the app removed; a machine fault of the request's app: a
  crash while it was in flight, or a machine of it started and hung during it, as
  docs/reliability.md's machine fault table allows; a deploy of the request's app: a
  machine of it restarted by the deploy while the request was in flight, or a 503/504
  to a request held while the deploy leased the app's machines and none served), else
  UNEXPLAINED; a failure while the app had a started, uncordoned machine for the whole
  request is a breach unless a machine fault or a deploy's restart explains it (the
  request may have gone to the crashed, hung or restarted one), or a drain ended it on
  purpose (a WebSocket's 1001, an event stream between two events);
- with ``--deploy``, every deploy ends within DEPLOY_GIVE_UP_S with every machine on the
  new config, and no step of it is refused (only a 409 or 429 to a lease, or a machine
  not at rest yet, is waited out: the autoscaler must not hold a machine for long);
- once the faults are off, every app is served within wake_timeout_s: a request that
  starts more than wake_timeout_s + 3 ticks after the last fault ended and fails means
  the app stayed dark;
- no counter or gauge on /metrics, and no count on /status, is ever negative; /readyz
  answers 200 throughout;
- no machine carries a cordon (the API's or our metadata key) 60 s after the traffic
  stops; with ``--machine-faults``, also every machine settled by then (started,
  stopped, suspended or failed: none on its way between two) and no lease of ours left
  (nor after the autoscaler exited);
- at the end no process or port is left: the autoscaler exits 0 on SIGTERM, its ports
  can be bound again, no machine process outlives the emulator;
- the autoscaler's log has no "Task exception was never retrieved" (or another sign of a
  crash) and every error-level line falls in a fault window (else it is listed).

Exit status 1 if any invariant was breached. Not part of the test suite (a run takes about
4 minutes); docs/reliability.md ("Chaos soak") has the runs made and what they found.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

HOST = "127.0.0.1"
TOKEN = "chaos-soak-emulator-token-0123"  # noqa: S105 - a local emulator's, not a secret
REPO = Path(__file__).resolve().parent.parent
TICK_S = 1.0
WAKE_TIMEOUT_S = 20.0
DARK_AFTER_S = WAKE_TIMEOUT_S + 3 * TICK_S
HANG_S = 25.0  # --hang: how long the outage holds each API call (past wake_timeout_s)
MACHINE_FAULTS: tuple[tuple[str, tuple[float, float]], ...] = (
    ("crash", (0.0, 0.0)),
    ("crash", (0.0, 0.0)),
    ("hang", (0.0, 0.0)),
    ("host_down", (10.0, 20.0)),
    ("host_unreachable", (15.0, 30.0)),
    ("cold_resumes", (30.0, 30.0)),
)
"""--machine-faults: each kind, and for how long it lasts (a crash and a hang are
events: Fly's restart policy, or our restart, ends them)."""
MACHINE_UPSTREAM_TIMEOUT_S = 5.0
"""--machine-faults: the proxy's upstream_timeout_s (a hung machine's requests 504 then)."""
DEPLOY_LEASE_TTL_S = 13  # flyctl's --lease-timeout default
DEPLOY_RETRY_S = 0.25
DEPLOY_GIVE_UP_S = 120.0
"""--deploy: a deploy not done by then (leases still refused, a machine never at rest or
never back) is a breach: the autoscaler held a machine for too long."""
DEPLOY_GAP_S = 10.0  # --deploy: the quiet seconds after it (the plan's gaps are 8-15 s)
DEPLOY_HELD = ("503", "504")
"""--deploy: what a request held while the deploy leased its app's machines (and none
served) gets: the proxy's answers to a request it could not send (a full queue, a wake's
timeout); a 502 or a cut connection needs a machine that took the request."""
SETTLED = ("started", "stopped", "suspended", "failed")
"""A machine's states that are no way between two (the end's check)."""
DRAIN_ENDS = ("ws_close_1001", "events_ended")
"""What a drain ends on purpose on a machine that goes (a WebSocket, an event stream): no
breach while another machine serves the app."""
CRASH_SIGNS = (
    "Task exception was never retrieved",
    "Task was destroyed but it is pending",
    "tick_crashed",
    "Error handling request",
    "Unclosed client session",
    "internal proxy error",
    "Traceback",
)

APPS: dict[str, dict[str, Any]] = {
    "zero": {"idle_to_zero_s": 4, "max_machines": 2},
    "adapt": {"keep_alive": "adaptive", "idle_to_zero_s": 6, "max_machines": 2},
    "warm": {"min_machines": 1, "max_machines": 1},
    "stopper": {
        "scale_down_action": "stop",
        "idle_to_zero_s": 5,
        "connection_idle_s": 4,
        "max_machines": 3,
    },
}
MACHINES = {"zero": 2, "adapt": 2, "warm": 1, "stopper": 3}
COMMON: dict[str, Any] = {
    "target_concurrency": 4,
    "stable_window_s": 5,
    "panic_window_s": 2,
    "scale_down_delay_s": 3,
    "min_lifetime_s": 1,
    "drain_timeout_s": 5,
    "wake_timeout_s": WAKE_TIMEOUT_S,
}


def app_config(name: str, **changes: Any) -> dict[str, Any]:
    return {"name": name, "hosts": [f"{name}.soak"], **COMMON, **APPS[name], **changes}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _bindable(port: int) -> bool:
    """Whether a server could listen on ``port`` again (as servers do: SO_REUSEADDR, so
    connections in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            s.listen()
        except OSError:
            return False
        return True


# --- what happened ---------------------------------------------------------------------


@dataclass
class Window:
    name: str
    start: float
    end: float | None = None
    api: bool = True  # a fault of the Machines API (a fault that may explain a failure)
    app: str | None = None  # a machine fault's: the machine's app


@dataclass
class Outcome:
    app: str
    kind: str  # http, ws, stream
    t0: float
    t1: float
    result: str  # "ok", a status, "ws_close_<code>", "events_ended", "stream_cut", an exception
    detail: str = ""
    served_throughout: bool = False  # a started, uncordoned machine for the whole request


@dataclass
class Run:
    seed: int
    t_start: float = field(default_factory=time.monotonic)
    windows: list[Window] = field(default_factory=list)
    removed: list[tuple[str, float, float | None]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    breaches: list[str] = field(default_factory=list)
    # per app: times when it had a serving machine (sampled), as (time, bool)
    serving: dict[str, list[tuple[float, bool]]] = field(default_factory=dict)
    # per app: times when a machine of it was started and hung (sampled), as (time, bool)
    hung: dict[str, list[tuple[float, bool]]] = field(default_factory=dict)
    # what the machines' events show of the machine faults (Fly's restarts, cold resumes)
    landed: Counter[str] = field(default_factory=Counter)
    # --deploy: a started machine the deploy restarted, as (app, machine, from, back at)
    restarts: list[tuple[str, str, float, float]] = field(default_factory=list)
    deploys: dict[str, dict[str, Any]] = field(default_factory=dict)  # per app: its figures
    faults_over_at: float = 0.0

    def now(self) -> float:
        return time.monotonic() - self.t_start

    def breach(self, text: str) -> None:
        line = f"[seed {self.seed} t={self.now():6.1f}] BREACH {text}"
        print(line, flush=True)
        self.breaches.append(line)

    def fault_at(self, t0: float, t1: float) -> str | None:
        """An API fault that was in force during [t0 - wake_timeout, t1] (a slow suspend
        explains no failure: a request during one takes the suspend back). Of several, the
        latest to begin: one in force during the request rather than one that ended up to
        wake_timeout_s before it (the first in the list named a 504 held through an outage
        after the 429 storm that had ended 17 s before the request)."""
        found: Window | None = None
        for w in self.windows:
            if not w.api:
                continue
            end = w.end if w.end is not None else float("inf")
            explains = w.start <= t1 and end >= t0 - WAKE_TIMEOUT_S - 2 * TICK_S
            if explains and (found is None or w.start > found.start):
                found = w
        return None if found is None else found.name

    def machine_fault_at(self, app: str, t0: float, t1: float) -> str | None:
        """A machine fault of ``app`` that explains a failure in [t0, t1] (the rules of
        docs/reliability.md's machine fault table): a crash while the request was in
        flight (a GET is sent again, but one cut in its answer, a WebSocket or a stream,
        is lost), or a machine of the app started and hung during the request (it
        times out until the proxy ejects the machine and the controller restarts it).
        A host unreachable and lost snapshots explain nothing: another machine, or a
        cold boot within wake_timeout_s, serves."""
        for w in reversed(self.windows):
            if w.app == app and w.name == "crash" and t0 <= w.start <= t1:
                return "crash"
        slack = 0.5  # two samples of watch_machines
        if any(ok and t0 - slack <= t <= t1 + slack for t, ok in self.hung.get(app, [])):
            hangs = [w for w in self.windows if w.app == app and w.name in ("hang", "host_down")]
            return hangs[-1].name if hangs else "hang"
        return None

    def deploy_at(self, o: Outcome) -> str | None:
        """A deploy of ``o``'s app that explains its failure: a started machine of the app
        restarted by the deploy while the request was in flight (stopped under it, or
        not listening yet: anything may fail, even while another machine served, as the
        request may have gone to that one), or, while the deploy held the app's machines
        (``deploy`` windows: from its first lease to its last release) and no machine
        served the whole request, a 503 or 504 (a request held for a wake the leases
        forbade). A failure of another app, one outside the deploy, a 502 or a cut
        connection with no restart in flight, or one while a started machine the deploy
        did not touch served, is not the deploy's."""
        slack = 1.5  # the machine listens up to ~0.6 s after `started` (watch_machines)
        for app, _mid, start, back in self.restarts:
            if app == o.app and start <= o.t1 and back + slack >= o.t0:
                return "deploy restart"
        if o.served_throughout or o.result not in DEPLOY_HELD:
            return None
        for w in self.windows:
            end = w.end if w.end is not None else float("inf")
            if w.name == "deploy" and w.app == o.app and w.start <= o.t1 and end + 2 >= o.t0:
                return "deploy leases"
        return None

    def removed_at(self, app: str, t0: float, t1: float) -> bool:
        for name, start, end in self.removed:
            stop = end if end is not None else float("inf")
            if name == app and start - 1 <= t1 and stop + 1 >= t0:
                return True
        return False

    def served_throughout(self, app: str, t0: float, t1: float) -> bool:
        samples = self.serving.get(app, [])
        before = [ok for t, ok in samples if t <= t0]
        during = [ok for t, ok in samples if t0 < t <= t1]
        return bool(before) and before[-1] and all(during)


# --- traffic ----------------------------------------------------------------------------


def stream_result(path: str, body: bytes) -> str:
    """ "ok" for a whole stream (``n`` chunks or events). A drain ends an event stream on
    purpose, between two events (docs/policy.md: an EventSource reconnects), as it ends
    a WebSocket with 1001: "events_ended". Anything else short (a download, an event cut
    mid-way) is "stream_cut"."""
    want = int(path.split("n=")[1].split("&")[0])
    if path.startswith("/stream"):
        return "ok" if body.count(b"chunk ") == want else "stream_cut"
    if body.count(b"data: ") == want:
        return "ok"
    return "events_ended" if body.endswith(b"\n\n") else "stream_cut"


class Traffic:
    def __init__(self, run: Run, proxy: str, rng: random.Random) -> None:
        self.run = run
        self.proxy = proxy
        self.rng = rng
        self.session: aiohttp.ClientSession | None = None
        self.stop = asyncio.Event()

    async def __aenter__(self) -> Traffic:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=WAKE_TIMEOUT_S + 40),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.session is not None
        await self.session.close()

    def record(self, app: str, kind: str, t0: float, result: str, detail: str = "") -> None:
        t1 = self.run.now()
        out = Outcome(app, kind, t0, t1, result, detail[:200])
        out.served_throughout = self.run.served_throughout(app, t0, t1)
        self.run.outcomes.append(out)

    async def http(self, app: str, path: str) -> str:
        assert self.session is not None
        t0 = self.run.now()
        try:
            async with self.session.get(self.proxy + path, headers={"Host": f"{app}.soak"}) as r:
                body = await r.read()
                result = "ok" if 200 <= r.status < 300 else str(r.status)
                streamed = path.startswith(("/stream", "/events"))
                if streamed and r.status == 200:
                    result = stream_result(path, body)
                self.record(app, "stream" if streamed else "http", t0, result, repr(body))
                return result
        except (aiohttp.ClientError, TimeoutError) as exc:
            kind = "stream" if path.startswith(("/stream", "/events")) else "http"
            self.record(app, kind, t0, type(exc).__name__, repr(exc))
            return type(exc).__name__

    async def websocket(self, app: str, seconds: float, chatty: bool) -> None:
        assert self.session is not None
        t0 = self.run.now()
        url = self.proxy.replace("http://", "ws://") + "/ws"
        try:
            async with self.session.ws_connect(url, headers={"Host": f"{app}.soak"}) as ws:
                end = time.monotonic() + seconds
                await ws.send_str("hello")
                msg = await ws.receive(timeout=WAKE_TIMEOUT_S)
                while time.monotonic() < end:
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        self.record(app, "ws", t0, f"ws_close_{ws.close_code}", str(msg))
                        return
                    if chatty:
                        await asyncio.sleep(0.5)
                        await ws.send_str("more")
                        msg = await ws.receive(timeout=WAKE_TIMEOUT_S)
                    else:
                        with contextlib.suppress(TimeoutError):
                            msg = await ws.receive(timeout=max(0.01, end - time.monotonic()))
                self.record(app, "ws", t0, "ok")
        except aiohttp.WSServerHandshakeError as exc:
            self.record(app, "ws", t0, str(exc.status), repr(exc))
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.record(app, "ws", t0, type(exc).__name__, repr(exc))

    async def burst(self, app: str, clients: int, seconds: float) -> None:
        end = time.monotonic() + seconds

        async def client() -> None:
            while time.monotonic() < end and not self.stop.is_set():
                if await self.http(app, f"/work?ms={self.rng.randint(10, 120)}") != "ok":
                    await asyncio.sleep(0.05)  # as a real client would, not a tight loop

        await asyncio.gather(*(client() for _ in range(clients)))

    async def app_loop(self, app: str, rng: random.Random) -> None:
        """Bursts of requests and idle gaps, often longer than the app's idle_to_zero_s."""
        while not self.stop.is_set():
            if rng.random() < 0.7:
                await self.burst(app, rng.randint(1, 8), rng.uniform(2, 8))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), rng.choice((1, 3, 8, 15, 30)))

    async def long_lived_loop(self, app: str, rng: random.Random) -> None:
        """WebSockets (chatty, or idle but for the first message) and streams, with gaps."""
        while not self.stop.is_set():
            pick = rng.random()
            if pick < 0.5:
                await self.websocket(app, rng.uniform(3, 12), chatty=rng.random() < 0.6)
            else:
                which = "/stream" if rng.random() < 0.5 else "/events"
                await self.http(app, f"{which}?n={rng.randint(5, 40)}&ms=100")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), rng.choice((0.5, 2, 6, 12, 30)))


# --- watching --------------------------------------------------------------------------


def our_cordons(emu: Any, app: str) -> list[str]:
    from autoscaler.scaling.fleet import CORDON_METADATA_KEY

    return [
        m.id
        for m in emu.machines(app)
        if m.cordoned or CORDON_METADATA_KEY in (m.config.get("metadata") or {})
    ]


def landed(event: Any) -> str | None:
    """What a machine's event shows of a machine fault: Fly restarting a crashed
    machine, a resume that became a cold boot (``faults.resume_cold_rate``)."""
    if (event.type, event.source) == ("restart", "flyd"):
        return "fly_restarts"
    if event.type == "launch" and "resume_cold_rate" in str(event.request.get("reason", "")):
        return "cold_resumes"
    return None


def watch_landed(run: Run, emu: Any) -> Callable[[], None]:
    """Count the machine faults' traces in ``run.landed`` from every event the emulator
    records (``Emulator.watch_events``) until the returned function is called: a sample
    of ``Machine.events`` missed those its 50 per machine had dropped since, or that a
    destroyed machine took with it."""

    def watcher(_machine: Any, event: Any) -> None:
        what = landed(event)
        if what:
            run.landed[what] += 1

    unwatch: Callable[[], None] = emu.watch_events(watcher)
    return unwatch


async def watch_machines(run: Run, emu: Any, stop: asyncio.Event) -> None:
    """Sample which apps have a started, uncordoned, answering machine (every 0.25 s)."""
    first_started: dict[str, float] = {}
    while not stop.is_set():
        now = run.now()
        hung = set(emu.faults.hung)
        for app in MACHINES:
            ok = False
            started_hung = False
            for m in emu.machines(app):
                started_hung = started_hung or (m.state == "started" and m.id in hung)
                if m.state == "started" and not m.cordoned and m.id not in hung:
                    since = first_started.setdefault(m.id, now)
                    # its app listens at most 0.6 s after `started` (profile fly)
                    ok = ok or now - since > 1.5
                else:
                    first_started.pop(m.id, None)
            run.serving.setdefault(app, []).append((now, ok))
            run.hung.setdefault(app, []).append((now, started_hung))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


NEGATIVE = re.compile(r"^(autoscaler_[a-z_]+)(\{[^}]*\})? (-[0-9.e+]+)$", re.M)


def _negatives(doc: Any, path: str = "") -> list[str]:
    out = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _negatives(v, f"{path}.{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _negatives(v, f"{path}[{i}]")
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool) and doc < 0:
        out.append(f"{path}={doc}")
    return out


async def watch_admin(run: Run, admin: str, stop: asyncio.Event) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    not_ready = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while not stop.is_set():
            try:
                async with http.get(admin + "/metrics") as r:
                    text = await r.text()
                for m in NEGATIVE.finditer(text):
                    run.breach(f"negative metric {m.group(0)}")
                async with http.get(admin + "/status", headers=headers) as r:
                    doc = await r.json()
                for neg in _negatives(doc):
                    run.breach(f"negative /status value {neg}")
                async with http.get(admin + "/readyz") as r:
                    if r.status != 200:
                        not_ready += 1
                        run.breach(f"/readyz answered {r.status}: {(await r.text())[:200]}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                run.breach(f"admin server unreachable: {exc!r}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


# --- one run ----------------------------------------------------------------------------


def fault_plan(
    rng: random.Random, outage: tuple[float, float], hang: bool = False
) -> list[tuple[str, Any, float]]:
    down = {"latency_s": HANG_S} if hang else {"error_rate": 1.0}
    plan: list[tuple[str, Any, float]] = [
        ("api_errors", {"error_rate": 0.2, "rate_limit_rate": 0.1, "latency_s": 0.3}, 20),
        ("rate_limit_storm", {"rate_limit_rate": 0.9}, 15),
        ("boot_failures", {"boot_failure_rate": 0.6}, 20),
        ("slow_suspends", "suspend", 30),
        ("outage", down, rng.uniform(*outage)),
    ]
    rng.shuffle(plan)
    return plan


def machine_fault_plan(
    seed: int, api_plan: list[tuple[str, Any, float]]
) -> list[tuple[float, str, float, float]]:
    """--machine-faults: (at, kind, seconds, pick) for each of MACHINE_FAULTS, at seeded
    times while the API's faults run (from 20 s to 20 s before the API plan's shortest
    end: its faults and their 8 s gaps after the 15 s warm-up). Drawn from a generator of
    their own, so that the seed's API plan and traffic are the same with or without them;
    ``pick`` chooses among the machines that fit when the fault comes."""
    rng = random.Random(f"{seed}-machine-faults")  # noqa: S311 - a schedule
    shortest = 15 + sum(seconds for _, _, seconds in api_plan) + 8 * len(api_plan)
    events = [
        (rng.uniform(20, shortest - 20), kind, rng.uniform(*span), rng.random())
        for kind, span in MACHINE_FAULTS
    ]
    return sorted(events)


def with_deploy(seed: int, plan: list[tuple[str, Any, float]]) -> list[tuple[str, Any, float]]:
    """--deploy: the plan with a deploy in a slot drawn from a generator of its own (the
    seed's API plan, and so its traffic, are drawn as without it)."""
    at = random.Random(f"{seed}-deploy").randint(0, len(plan))  # noqa: S311 - a schedule
    return [*plan[:at], ("deploy", "deploy", 0.0), *plan[at:]]


class Refused(Exception):
    """A step of the deploy the API refused (not a lease's 409 or 429, waited out)."""


class FlyDeploy:
    """A ``fly deploy`` of one app, as flyctl's rolling strategy does it through the
    Machines API (tests/control/test_e2e_deploy.py's, with flyctl's patience for what is
    busy): lease every machine (a 409 or 429 tried again), refresh the leases while it
    works, then one machine at a time: wait until it is at rest (an action of the
    autoscaler's may be ending), update its config with the lease's nonce, wait until it
    is back as it was (started, or at rest), release its lease."""

    def __init__(self, run: Run, session: aiohttp.ClientSession, url: str, app: str) -> None:
        self.run = run
        self.session = session
        self.base = f"{url}/v1/apps/{app}/machines"
        self.app = app
        self.version = f"v2-{run.seed}"
        self.nonces: dict[str, str] = {}
        # A refresh and a release of one lease never cross: a refresh sent as the release
        # went would take the machine again (a lease anew), held until its TTL ran out.
        self.leases_lock = asyncio.Lock()
        self.waited: Counter[str] = Counter()  # what was waited out: "lease 409", ...
        self.refused: list[str] = []

    async def call(
        self, method: str, path: str, nonce: str | None = None, **kw: Any
    ) -> tuple[int, Any]:
        """One call; a 429 (a rate limit the autoscaler's calls share) is tried again."""
        headers = {"fly-machine-lease-nonce": nonce} if nonce else {}
        while True:
            async with self.session.request(method, self.base + path, headers=headers, **kw) as r:
                answer = await r.json(content_type=None)
                if r.status != 429:
                    return r.status, answer
                self.waited["429"] += 1
                await asyncio.sleep(float(r.headers.get("Retry-After", DEPLOY_RETRY_S)))

    def refuse(self, text: str) -> Refused:
        self.refused.append(text)
        return Refused(text)

    async def lease(self, mid: str) -> None:
        body = {"ttl": DEPLOY_LEASE_TTL_S, "description": f"flyctl deploy {self.version}"}
        while True:
            status, answer = await self.call("POST", f"/{mid}/lease", json=body)
            if status in (200, 201):
                self.nonces[mid] = answer["data"]["nonce"]
                return
            if status not in (409, 503):  # held by another; its host unreachable
                raise self.refuse(f"lease {mid}: {status} {answer}")
            self.waited[f"lease {status}"] += 1
            await asyncio.sleep(DEPLOY_RETRY_S)

    async def keep(self) -> None:
        while True:
            await asyncio.sleep(DEPLOY_LEASE_TTL_S / 3)
            for mid in list(self.nonces):
                async with self.leases_lock:
                    nonce = self.nonces.get(mid)
                    if nonce is None:  # released meanwhile
                        continue
                    body = {"ttl": DEPLOY_LEASE_TTL_S}
                    status, answer = await self.call("POST", f"/{mid}/lease", nonce, json=body)
                if status not in (200, 201):
                    self.refuse(f"refresh {mid}: {status} {answer}")

    async def at_rest(self, mid: str) -> dict[str, Any]:
        while True:
            status, machine = await self.call("GET", f"/{mid}")
            if status != 200:
                raise self.refuse(f"get {mid}: {status} {machine}")
            if machine["state"] in SETTLED:
                return dict(machine)
            self.waited[f"machine {machine['state']}"] += 1
            await asyncio.sleep(DEPLOY_RETRY_S)

    async def update(self, mid: str) -> None:
        while True:
            machine = await self.at_rest(mid)
            config = machine["config"]
            config["env"] = {**config.get("env", {}), "DEPLOY_VERSION": self.version}
            started = machine["state"] == "started"
            t0 = self.run.now()
            status, updated = await self.call(
                "POST", f"/{mid}", self.nonces[mid], json={"config": config}
            )
            if status == 200:
                break
            if status not in (409, 503):  # it moved meanwhile (Fly's restart); its host
                raise self.refuse(f"update {mid} ({machine['state']}): {status} {updated}")
            self.waited[f"update {status}"] += 1
            await asyncio.sleep(DEPLOY_RETRY_S)
        if machine["state"] == "failed":  # it stays failed (the emulator's, as Fly's)
            return
        state = "started" if started else "stopped"
        query = {"state": state, "instance_id": updated["instance_id"], "timeout": "60"}
        status, waited = await self.call("GET", f"/{mid}/wait", params=query)
        if started:
            self.run.restarts.append((self.app, mid, t0, self.run.now()))
        if status != 200:
            raise self.refuse(f"wait {mid} {state}: {status} {waited}")

    async def release(self, mid: str) -> None:
        async with self.leases_lock:
            status, answer = await self.call("DELETE", f"/{mid}/lease", self.nonces.pop(mid))
        if status != 200:
            self.refuse(f"release {mid}: {status} {answer}")

    async def deploy(self, machines: list[str]) -> None:
        """Deploy, within DEPLOY_GIVE_UP_S; the window and figures go in ``run``."""
        window = Window("deploy", self.run.now(), api=False, app=self.app)
        self.run.windows.append(window)
        keeper: asyncio.Task[None] | None = None
        done = 0
        try:
            async with asyncio.timeout(DEPLOY_GIVE_UP_S):
                for mid in machines:
                    await self.lease(mid)
                keeper = asyncio.create_task(self.keep())
                for mid in machines:
                    await self.update(mid)
                    await self.release(mid)
                    done += 1
        except TimeoutError:
            self.refused.append(f"not done in {DEPLOY_GIVE_UP_S:g} s ({done}/{len(machines)})")
        except Refused:
            pass
        finally:
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
            for mid in list(self.nonces):  # a deploy that failed lets go of what it held
                with contextlib.suppress(aiohttp.ClientError):
                    await self.release(mid)
            window.end = self.run.now()
        restarted = sum(1 for app, *_ in self.run.restarts if app == self.app)
        self.run.deploys[self.app] = {
            "window": [round(window.start, 1), round(window.end, 1)],
            "machines": len(machines),
            "updated": done,
            "restarted": restarted,
            "waited": dict(self.waited),
        }
        for text in self.refused:
            self.run.breach(f"deploy of {self.app}: {text}")


async def deploy_all(run: Run, emu: Any) -> None:
    """--deploy: every app's deploy at once (each app its own ``fly deploy``); then every
    machine must carry the new version."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        deploys = [FlyDeploy(run, session, emu.url, app) for app in MACHINES]
        print(f"[seed {run.seed} t={run.now():6.1f}] deploy of every app begins")
        await asyncio.gather(
            *(d.deploy(sorted(m.id for m in emu.machines(d.app))) for d in deploys)
        )
    for d in deploys:
        stale = [
            m.id
            for m in emu.machines(d.app)
            if (m.config.get("env") or {}).get("DEPLOY_VERSION") != d.version
        ]
        if stale and not d.refused:
            run.breach(f"deploy of {d.app} done, but not on {stale}")
    print(f"[seed {run.seed} t={run.now():6.1f}] deploy done: {run.deploys}")


def our_leases(emu: Any, app: str) -> list[str]:
    """The machines of ``app`` on which a lease of ours is held (ours: its description
    names the owner autoscaler.control.leases gives, ``autoscaler@host: what``)."""
    held = [(m.id, emu.lease(app, m.id)) for m in emu.machines(app)]
    return [mid for mid, lease in held if lease and lease.description.startswith("autoscaler@")]


async def machine_fault(run: Run, emu: Any, kind: str, seconds: float, pick: float) -> None:
    """One machine fault of the plan, on a machine that fits it now (none: skipped)."""
    faults = emu.faults
    candidates = [
        (app, m.id)
        for app in MACHINES
        for m in sorted(emu.machines(app), key=lambda m: m.id)
        if m.id not in faults.hung
        and m.id not in faults.host_unreachable
        and (m.state == "started" or kind == "host_unreachable")
        and (MACHINES[app] > 1 or kind not in ("host_down", "host_unreachable"))
    ]
    if kind == "cold_resumes":
        window = Window(kind, run.now(), api=False)
        run.windows.append(window)
        emu.set_faults(resume_cold_rate=0.5)
        print(f"[seed {run.seed} t={run.now():6.1f}] machine fault {kind} on ({seconds:.0f} s)")
        await asyncio.sleep(seconds)
        emu.set_faults(resume_cold_rate=None)
        window.end = run.now()
        return
    if not candidates:
        print(f"[seed {run.seed} t={run.now():6.1f}] machine fault {kind}: no machine fits")
        return
    app, mid = candidates[int(pick * len(candidates))]
    window = Window(kind, run.now(), api=False, app=app)
    run.windows.append(window)
    print(f"[seed {run.seed} t={run.now():6.1f}] machine fault {kind} on {app}/{mid}")
    if kind == "crash":
        emu.kill_machine_process(app, mid)
        window.end = window.start
    elif kind == "hang":
        emu.set_faults(hung=[*faults.hung, mid])  # ends when a restart replaces the process
    else:
        hung = [*faults.hung, mid] if kind == "host_down" else faults.hung
        emu.set_faults(hung=hung, host_unreachable=[*faults.host_unreachable, mid])
        await asyncio.sleep(seconds)
        back = [h for h in emu.faults.host_unreachable if h != mid]
        emu.set_faults(host_unreachable=back)
        window.end = run.now()
        print(f"[seed {run.seed} t={run.now():6.1f}] machine fault {kind}: {app}/{mid} back")


async def machine_faults(run: Run, emu: Any, plan: list[tuple[float, str, float, float]]) -> None:
    async def at(when: float, kind: str, seconds: float, pick: float) -> None:
        await asyncio.sleep(max(0.0, when - run.now()))
        await machine_fault(run, emu, kind, seconds, pick)

    await asyncio.gather(*(at(*event) for event in plan))


def faults_over_at(run: Run) -> float:
    """When the last fault ended: an API fault's window, a machine fault's (a crash's
    moment), or the last time a machine was started and hung (a hang ends when its
    restart replaced the process)."""
    ends = [w.end if w.end is not None else w.start for w in run.windows if w.api or w.app]
    ends += [t for samples in run.hung.values() for t, ok in samples if ok]
    return max(ends, default=0.0)


def tail_from(run: Run) -> float:
    """Where ``--tail`` counts from: the end of the last fault of any kind, a slow
    suspend's too (which faults_over_at leaves out: it explains no failure), as before
    --machine-faults, so that a run without them keeps its length."""
    return max(faults_over_at(run), *(w.end or w.start for w in run.windows))


async def one_run(seed: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from autoscaler import logs
    from autoscaler.config import EmulatorApp, EmulatorSettings
    from autoscaler.emulator import Emulator
    from autoscaler.emulator.faults import RemoteFaults
    from autoscaler.emulator.procs import pid_alive

    logs.configure(fmt="json", stream=sys.stderr, level="warning")  # the emulator's
    rng = random.Random(seed)  # noqa: S311 - a schedule, not a secret
    run = Run(seed)
    settings = EmulatorSettings(
        token=TOKEN,
        profile="fly",
        rate_limits=True,
        apps=[EmulatorApp(name=a, machines=n) for a, n in MACHINES.items()],
    )
    proxy_port, admin_port = _free_port(), _free_port()
    async with Emulator(settings, HOST, 0, rng=random.Random(seed)) as emu:  # noqa: S311
        unwatch = watch_landed(run, emu)  # from the first event (the start-up apps')
        config = {
            "fly": {"api_url": emu.url},
            "proxy": {"listen": f"{HOST}:{proxy_port}", "access_log": False},
            "admin": {"listen": f"{HOST}:{admin_port}", "token": TOKEN},
            "control": {"tick_s": TICK_S},
            "apps": [app_config(a) for a in MACHINES],
        }
        if args.machine_faults:
            config["proxy"]["upstream_timeout_s"] = MACHINE_UPSTREAM_TIMEOUT_S
        file = tmp / f"autoscaler-{seed}.yaml"
        file.write_text(yaml.safe_dump(config))
        log_path = tmp / f"autoscaler-{seed}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOSCALER_", "FLY_"))}
        env["FLY_API_TOKEN"] = TOKEN
        env["PYTHONPATH"] = str(REPO)
        command = [sys.executable, "-m", "autoscaler", "run", "--config", str(file)]
        command += ["--log-format", "json"]
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *command, cwd=REPO, env=env, stdout=log_file, stderr=asyncio.subprocess.STDOUT
            )
        admin = f"http://{HOST}:{admin_port}"
        proxy = f"http://{HOST}:{proxy_port}"
        exit_code: int | None = None
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(300):
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(admin + "/readyz") as r:
                            if r.status == 200:
                                break
                    if proc.returncode is not None:
                        raise RuntimeError(f"autoscaler exited: {log_path.read_text()[-2000:]}")
                    await asyncio.sleep(0.2)
            stop_watch = asyncio.Event()
            watchers = [
                asyncio.create_task(watch_machines(run, emu, stop_watch)),
                asyncio.create_task(watch_admin(run, admin, stop_watch)),
            ]
            normal_suspend = emu.world.lifecycle.timing
            async with Traffic(run, proxy, rng) as traffic, RemoteFaults(emu.url, TOKEN) as faults:
                loops = [
                    asyncio.create_task(loop(a, random.Random(f"{seed}-{a}-{i}")))  # noqa: S311
                    for a in MACHINES
                    for i, loop in enumerate((traffic.app_loop, traffic.long_lived_loop))
                ]
                api_plan = fault_plan(rng, args.outage, args.hang)
                reload_before = api_plan[len(api_plan) // 2]
                plan = with_deploy(seed, api_plan) if args.deploy else api_plan
                machine_task = asyncio.create_task(
                    machine_faults(run, emu, machine_fault_plan(seed, api_plan))
                    if args.machine_faults
                    else asyncio.sleep(0)
                )
                await asyncio.sleep(15)  # warm-up, no faults
                for entry in plan:
                    name, change, seconds = entry
                    if change == "deploy":
                        await deploy_all(run, emu)
                        await asyncio.sleep(DEPLOY_GAP_S)
                        continue
                    if entry is reload_before:
                        await reload(run, file, config, proc, removing=True)
                        asyncio.get_running_loop().call_later(
                            25,
                            lambda: asyncio.ensure_future(
                                reload(run, file, config, proc, removing=False)
                            ),
                        )
                    window = Window(name, run.now(), api=change != "suspend")
                    run.windows.append(window)
                    print(f"[seed {seed} t={run.now():6.1f}] fault {name} on ({seconds:.0f} s)")
                    if change == "suspend":
                        lifecycle = emu.world.lifecycle
                        lifecycle.timing = dataclasses.replace(normal_suspend, suspend_s=(15, 25))
                    else:
                        await faults.set(**change)
                    await asyncio.sleep(seconds)
                    if change == "suspend":
                        emu.world.lifecycle.timing = normal_suspend
                    else:
                        await faults.set(**dict.fromkeys(change))  # (not a machine fault's)
                    window.end = run.now()
                    print(f"[seed {seed} t={run.now():6.1f}] fault {name} off")
                    await asyncio.sleep(rng.uniform(8, 15))
                await machine_task
                await asyncio.sleep(max(0, args.tail - (run.now() - tail_from(run))))
                traffic.stop.set()
                await asyncio.gather(*loops)
            for w in run.windows:  # a hang ended when its app last had a hung machine up
                if w.name == "hang":
                    up = [t for t, ok in run.hung.get(w.app or "", []) if ok and t >= w.start]
                    w.end = max(up, default=w.start)
            run.faults_over_at = faults_over_at(run)
            print(f"[seed {seed} t={run.now():6.1f}] traffic stopped; waiting for cordons")
            deadline = time.monotonic() + 60

            def unsettled(app: str) -> list[str]:
                if not args.machine_faults:
                    return []
                moving = [f"{m.id} {m.state}" for m in emu.machines(app) if m.state not in SETTLED]
                return moving + [f"{mid} leased" for mid in our_leases(emu, app)]

            # (the emulator's state, in this process: nothing to await but time)
            while (  # noqa: ASYNC110
                any(our_cordons(emu, a) or unsettled(a) for a in MACHINES)
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.5)
            for a in MACHINES:
                left = our_cordons(emu, a)
                states = {m.id: m.state for m in emu.machines(a)}
                if left:
                    run.breach(f"cordon left on {a}: {left} ({states})")
                if unsettled(a):
                    run.breach(f"{a} not settled 60 s after the traffic: {unsettled(a)}")
            end_states = {a: {m.id: m.state for m in emu.machines(a)} for a in MACHINES}
            stop_watch.set()
            unwatch()  # the traces of the faults, not of the shutdown
            await asyncio.gather(*watchers)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    exit_code = await asyncio.wait_for(proc.wait(), 60)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
                    run.breach("autoscaler did not exit within 60 s of SIGTERM")
            else:
                exit_code = proc.returncode
        if exit_code != 0:
            run.breach(f"autoscaler exited {exit_code}")
        for port in (proxy_port, admin_port):
            if not _bindable(port):
                run.breach(f"port {port} still bound after the autoscaler exited")
        if args.machine_faults:
            for a in MACHINES:
                if our_leases(emu, a):
                    run.breach(f"lease of ours left on {a} after exit: {our_leases(emu, a)}")
        spawned = emu.spawned_pids()
    alive = [pid for pid in spawned if pid_alive(pid)]
    if alive:
        run.breach(f"machine processes outlived the emulator: {alive}")
    verdict = summarize(run, log_path)
    if args.machine_faults:
        verdict["end_states"] = end_states
    return verdict


async def reload(run: Run, file: Path, config: dict[str, Any], proc: Any, removing: bool) -> None:
    apps = [a for a in MACHINES if a != "stopper"] if removing else list(MACHINES)
    changed: dict[str, dict[str, Any]] = {
        "adapt": {"keep_alive": "fixed", "idle_to_zero_s": 10},
        "zero": {"idle_to_zero_s": 6},
    }
    new = dict(config, apps=[app_config(a, **changed.get(a, {})) for a in apps])
    file.write_text(yaml.safe_dump(new))  # noqa: ASYNC240 - a small file, once
    if removing:
        run.removed.append(("stopper", run.now(), None))
    else:
        name, start, _ = run.removed[-1]
        run.removed[-1] = (name, start, run.now())
    print(f"[seed {run.seed} t={run.now():6.1f}] reload ({'remove' if removing else 're-add'})")
    if proc.returncode is None:
        proc.send_signal(signal.SIGHUP)


# --- the verdict -----------------------------------------------------------------------


def summarize(run: Run, log_path: Path) -> dict[str, Any]:
    classes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for o in run.outcomes:
        kinds[o.kind] += 1
        if o.result == "ok":
            classes["ok"] += 1
            continue
        key = f"{o.app}/{o.kind}/{o.result}"
        if run.removed_at(o.app, o.t0, o.t1):
            classes[f"{key} (app removed)"] += 1
            continue
        # (the request may have gone to the crashed or hung machine: the soak cannot tell)
        machine_fault = run.machine_fault_at(o.app, o.t0, o.t1) or run.deploy_at(o)
        if o.served_throughout and o.result not in DRAIN_ENDS and machine_fault is None:
            run.breach(f"{key} while a started machine served [{o.t0:.1f}, {o.t1:.1f}]: {o.detail}")
        dark = run.faults_over_at and o.t0 > run.faults_over_at + DARK_AFTER_S
        if dark and o.result not in DRAIN_ENDS:  # (an idle app's drain ends those: it sleeps)
            run.breach(f"{key} {o.t0 - run.faults_over_at:.1f}s after the faults: dark: {o.detail}")
            continue
        fault = machine_fault or run.fault_at(o.t0, o.t1)
        if o.result in (*DRAIN_ENDS, "stream_cut"):
            classes[f"{key} (a drain)"] += 1
        elif fault is not None:
            classes[f"{key} ({fault})"] += 1
        else:
            classes[f"{key} UNEXPLAINED"] += 1
            run.breach(f"unexplained {key} at [{o.t0:.1f}, {o.t1:.1f}]: {o.detail}")
    # served within wake_timeout once the API is back: the slowest request after the faults
    after = [o for o in run.outcomes if o.t0 > run.faults_over_at and o.kind == "http"]
    slowest_after = max((o.t1 - o.t0 for o in after), default=0.0)
    if slowest_after > WAKE_TIMEOUT_S:
        run.breach(f"a request after the faults took {slowest_after:.1f}s")
    # the log
    crash: list[str] = []
    errors: Counter[str] = Counter()
    unexplained_errors: list[str] = []
    for line in log_path.read_text(errors="replace").splitlines():
        if any(s in line for s in CRASH_SIGNS):
            crash.append(line[:300])
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") in ("error", "critical"):
            errors[entry.get("event", "?")] += 1
            unexplained_errors.append(line[:300])
    for line in crash[:5]:
        run.breach(f"crash sign in the log: {line}")
    for line in unexplained_errors[:10]:
        print(f"  error line: {line}")
    return {
        "seed": run.seed,
        "duration_s": round(run.now(), 1),
        "faults": [
            (w.name, *([w.app] if w.app else []), round(w.start, 1), round(w.end or 0, 1))
            for w in run.windows
        ],
        "removed": run.removed,
        "requests": dict(kinds),
        "outcomes": dict(classes.most_common()),
        "slowest_after_faults_s": round(slowest_after, 2),
        "machine_faults_seen": dict(run.landed),
        "deploys": run.deploys,
        "not_ok": [
            f"{o.app}/{o.kind}/{o.result} [{o.t0:.1f}, {o.t1:.1f}] {o.detail[:80]}"
            for o in run.outcomes
            if o.result != "ok" and not run.removed_at(o.app, o.t0, o.t1)
        ][:40],
        "error_log_lines": dict(errors),
        "breaches": run.breaches,
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--outage", type=lambda s: tuple(float(x) for x in s.split("-")), default=(30.0, 60.0)
    )
    parser.add_argument(
        "--hang",
        action="store_true",
        help=f"the outage holds every API call {HANG_S:g} s instead of answering 500",
    )
    parser.add_argument(
        "--machine-faults",
        action="store_true",
        help="crashes, hangs, hosts down or unreachable and cold resumes beside the API's faults",
    )
    parser.add_argument(
        "--deploy",
        action="store_true",
        help="a rolling fly deploy of every app (Fly's leases) in a slot of the plan",
    )
    parser.add_argument("--tail", type=float, default=45.0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--logs", type=Path, help="keep the autoscaler's logs in this directory")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="chaos-soak-") as tmp:
        for seed in range(args.seed, args.seed + args.runs):
            results.append(asyncio.run(one_run(seed, args, Path(tmp))))
            print(json.dumps(results[-1], indent=1))
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                log = (Path(tmp) / f"autoscaler-{seed}.log").read_bytes()
                (args.logs / f"autoscaler-{seed}.log").write_bytes(log)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 1 if any(r["breaches"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
