"""The machine lifecycle: state transitions backed by real processes.

An API call checks the current state and switches to the moving state synchronously (so a
second call sees ``starting`` and gets 412), then the slow part (spawn, boot probe, signal,
wait) runs in a background task that ends in a resting state. Every change wakes the
machine's waiters. Processes that exit on their own are noticed by a watcher task per
process and handled per the restart policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shlex
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from autoscaler.config import (
    IMAGE_PLACEHOLDERS,
    EmulatorSettings,
    FaultSettings,
    Timing,
    authority,
)
from autoscaler.emulator import validate
from autoscaler.emulator.checks import HealthChecks
from autoscaler.emulator.model import (
    MAX_EVENTS,
    Event,
    Ids,
    Machine,
    now_rfc3339,
    settled_event,
)
from autoscaler.emulator.procs import (
    PARENT_ENV,
    SESSION_ENV,
    AddressPool,
    MachineProcess,
    Reaper,
    address_free,
    spawn,
    wait_listening,
)
from autoscaler.fly.models import suspend_refusal as fly_suspend_refusal
from autoscaler.logs import get_logger

DEMO_IMAGE = "autoscaler/demo-app"
AUTHORITY = "{host}:{port}"  # an address:port in a template, filled as one (Lifecycle.command)
DEMO_COMMAND = "{python} -m autoscaler.emulator.demo_app --host {host} --port {port}"
# Fly's default for a config without a restart policy (as `fly launch` and `fly deploy`
# create them, and any with a schedule): restart a process that exits non-zero, 10 times.
DEFAULT_RESTART_POLICY = "on-failure"
DEFAULT_MAX_RETRIES = 10
# A stop's, restart's or update's timeout when neither the call nor config.stop_config
# names one: Fly's default, fly.toml's kill_timeout of 5 s ("we send a SIGINT [...] Then
# we wait 5 seconds", docs/fly-api-notes.md, "Stop signal and timeout").
STOP_TIMEOUT_S = 5.0
# All a machine gets of the emulator's environment, as a Fly VM sees only its image's
# (docs/emulator.md, "Images"): what any command needs to run on this host (PATH, HOME,
# TMPDIR, the locale), and what makes `{python}` the emulator's own Python (its import path,
# and the libraries a Python built elsewhere loads). Nothing else: an app must not work here
# on a DATABASE_URL of your shell that its machines on Fly never see, nor see your token.
BASE_ENV = (
    "PATH",
    "HOME",
    "TMPDIR",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "PYTHONPATH",
    "PYTHONHOME",
    "LD_LIBRARY_PATH",
)

# The memory of a guest that does not say: what its CPUs come with in Fly's sizes
# (shared-cpu-1x 256 MB, performance-1x 2 GB, and as much again for each more CPU: Fly's
# "Machine Sizing" guide, "Each CPU selection defaults to a specific amount of memory");
# a config without a guest is Fly's default size, shared-cpu-1x.
MEMORY_MB_PER_CPU = {"shared": 256, "performance": 2048}
# That default size, as Fly fills it into a machine's config.guest when the create (or
# update) request gives none: the machine's JSON then shows the size it runs at.
DEFAULT_GUEST = {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}

log = get_logger(__name__)


def guest_memory_mb(config: dict[str, Any]) -> int:
    """The memory of a machine of ``config`` in MB, as Fly tells it (``FLY_VM_MEMORY_MB``):
    ``guest.memory_mb``, else what its CPU kind and count come with."""
    guest = config.get("guest") or {}
    if guest.get("memory_mb") is not None:
        return int(guest["memory_mb"])
    per_cpu = MEMORY_MB_PER_CPU.get(str(guest.get("cpu_kind") or "shared"), 256)
    return per_cpu * int(guest.get("cpus") or 1)


def is_demo_image(image: str) -> bool:
    """``image`` is the built-in demo app's (with or without a tag)."""
    return DEMO_IMAGE in (image, image.rpartition(":")[0])


def exit_event(code: int | None, requested_stop: bool) -> dict[str, Any]:
    """The ``request`` of the ``exit`` event that says how a machine's process ended, as
    Fly's: its exit code (a shell's 128 + n when killed by signal n) and the signal; a
    stop of a machine without a process (a suspended one's, killed with its snapshot)
    says neither."""
    if code is None:
        return {"exit_event": {"requested_stop": requested_stop}}
    killed_by = -code if code < 0 else None
    return {
        "exit_event": {
            "exit_code": 128 + killed_by if killed_by else code,
            "signal": killed_by,
            "requested_stop": requested_stop,
        }
    }


class Conflict(Exception):
    """The operation makes no sense in the machine's current state (HTTP 412)."""


class SuspendRefused(Exception):
    """The machine's config rules a suspend out, as Fly's does (HTTP 400)."""


def suspend_refusal(config: dict[str, Any]) -> str | None:
    """Why Fly would refuse to suspend a machine of this config; None when it would not
    (the rule: ``autoscaler.fly.models.suspend_refusal``)."""
    init = config.get("init") or {}
    guest = config.get("guest") or {}
    return fly_suspend_refusal(
        swap_size_mb=init.get("swap_size_mb"),
        schedule=config.get("schedule"),
        gpus=guest.get("gpus"),
        gpu_kind=guest.get("gpu_kind"),
    )


class HostUnreachable(Exception):
    """The machine's host cannot be reached (``faults.host_unreachable``; HTTP 503)."""


class Lifecycle:
    def __init__(
        self,
        settings: EmulatorSettings,
        *,
        ids: Ids,
        rng: random.Random,
        pool: AddressPool,
        on_change: Callable[[], None],
        on_gone: Callable[[Machine], None],
        find: Callable[[str], Machine | None] = lambda _: None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.wall = wall
        """The emulator's time of day, Fly's clock: its events' and ``updated_at`` times."""
        self._on_gone = on_gone  # the world forgets a destroyed machine
        self._find = find  # a machine by id, for faults named by id
        self._faults_changed = asyncio.Event()  # replaced and set on every change
        self.faults: FaultSettings = settings.faults
        self._ids = ids
        self._rng = rng
        self._pool = pool
        self._on_change = on_change
        self.reaper = Reaper()
        self.procs: dict[str, MachineProcess] = {}
        self.spawned: list[int] = []  # every pid ever started, for leak checks
        self.outputs: dict[str, deque[str]] = {}  # last output of each machine's process
        self._ops: dict[str, asyncio.Task[None]] = {}
        self._snapshots: dict[str, float] = {}  # machine id → loop time of its suspend
        self._tasks: set[asyncio.Task[None]] = set()
        self._spawning: set[asyncio.Future[MachineProcess]] = set()
        self._closing = False
        self.images = {DEMO_IMAGE: DEMO_COMMAND, **settings.images}
        self.checks = HealthChecks(on_change, wall)
        self._stand_ins: set[str] = set()  # unknown images already logged
        self.timing: Timing = settings.effective_timing()
        self.event_watchers: list[Callable[[Machine, Event], None]] = []
        """Called with every event as it is recorded (Emulator.watch_events)."""

    def draw(self, span: float | tuple[float, float]) -> float:
        """One duration from a timing knob: fixed, or uniform in [lo, hi] (the injected rng)."""
        if isinstance(span, tuple):
            lo, hi = span
            return lo if hi <= lo else self._rng.uniform(lo, hi)
        return span

    async def _pad(self, since: float, duration: float) -> None:
        """Sleep until ``duration`` seconds have passed since ``since`` (loop time)."""
        left = since + duration - asyncio.get_running_loop().time()
        if left > 0:
            await asyncio.sleep(left)

    # --- images and environment ----------------------------------------------------

    def resolve_image(self, image: str) -> str | None:
        """The command template for an image, also matching without its ``:tag``.

        An image not in the table runs the built-in demo app under its own name (logged
        once per image), so tools that create machines from real image names work; None
        only with ``strict_images``.
        """
        if image in self.images:
            return self.images[image]
        base, sep, tag = image.rpartition(":")
        if sep and "/" not in tag and base in self.images:
            return self.images[base]
        if self.settings.strict_images:
            return None
        if image not in self._stand_ins:
            self._stand_ins.add(image)
            log.info("emulator_image_stand_in", image=image, runs=DEMO_IMAGE)
        return DEMO_COMMAND

    def command(self, m: Machine) -> list[str]:
        template = self.resolve_image(str(m.config.get("image", "")))
        if template is None:
            raise Conflict(f"image {m.config.get('image')!r} is not in the emulator's image table")
        values = (m.private_ip, str(m.internal_port), sys.executable)
        # ``{host}:{port}`` forms an address:port, which on ::1 (emulator.ipv6) needs the
        # brackets (``[::1]:8080``): bare, servers could not parse ``::1:8080``. Filled
        # first, so ``{host}`` alone (``--host {host}``) stays the bare address.
        fill = {AUTHORITY: authority(m.private_ip, m.internal_port)}
        fill.update(zip(IMAGE_PLACEHOLDERS, values, strict=True))
        argv = []
        for arg in shlex.split(template):
            for key, value in fill.items():
                arg = arg.replace(key, value)
            argv.append(arg)
        return argv

    def environment(self, m: Machine, boot_s: float = 0.0) -> dict[str, str]:
        """A machine process's environment: ``BASE_ENV`` of the emulator's, ``TZ=UTC``, its
        ``config.env``, then what Fly sets; the demo app's boot times only to the demo app
        (they mean nothing to another image, which Fly would never hand them)."""
        env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
        if SESSION_ENV in os.environ:  # a test session's mark, kept so it finds leftovers
            env[SESSION_ENV] = os.environ[SESSION_ENV]
        env["TZ"] = "UTC"  # a Fly VM's clock, unless its image (config.env here) sets TZ
        env.update({str(k): str(v) for k, v in (m.config.get("env") or {}).items()})
        env.update(
            {
                "PORT": str(m.internal_port),
                "FLY_APP_NAME": m.app,
                "FLY_MACHINE_ID": m.id,
                "FLY_ALLOC_ID": m.id,
                "FLY_REGION": m.region,
                "FLY_PRIVATE_IP": m.private_ip,
                "FLY_IMAGE_REF": str(m.config.get("image", "")),
                "FLY_MACHINE_VERSION": m.instance_id,
                "FLY_VM_MEMORY_MB": str(guest_memory_mb(m.config)),
                # How a test session finds leftovers of this emulator (procs.leftovers): a
                # machine's processes are its supervisor's children, not the emulator's.
                PARENT_ENV: str(os.getpid()),
            }
        )
        group = (m.config.get("metadata") or {}).get("fly_process_group")
        if group:  # as Fly sets it for a machine of a process group
            env["FLY_PROCESS_GROUP"] = str(group)
        if self.resolve_image(str(m.config.get("image", ""))) == DEMO_COMMAND:
            env["DEMO_BOOT_DELAY_S"] = str(boot_s)  # this boot's start_s (+ listen_s)
            env["DEMO_LISTEN_AT"] = f"{time.time() + boot_s:.3f}"  # the same, as a time
        return env

    # --- state changes ---------------------------------------------------------------

    def record(
        self,
        m: Machine,
        state: str,
        kind: str | None = None,
        *,
        source: str = "user",
        request: dict[str, Any] | None = None,
    ) -> None:
        previous, m.state = m.state, state
        m.updated_at = now_rfc3339(self.wall())
        if kind is None and previous != state:
            kind, source, request = settled_event(m, previous, state, source, request)
        if kind is not None:
            event = Event(
                id=self._ids.event(),
                type=kind,
                status=state,
                source=source,
                timestamp=int(self.wall() * 1000),
                request=request or {},
            )
            m.events.append(event)
            del m.events[:-MAX_EVENTS]
            for watcher in list(self.event_watchers):
                # A watcher's bug is its own: the change it watches goes on (a raise here
                # left the machine in its new state with no checks, no touch, no notice).
                try:
                    watcher(m, event)
                except Exception:
                    log.exception("emulator_event_watcher_failed", machine=m.id, type=kind)
        self.checks.sync(m)  # health checks run while the machine is started
        m.touch()
        self._on_change()

    def _run(self, m: Machine, coro: Coroutine[Any, Any, None]) -> None:
        """Run the slow half of an operation; one per machine at a time."""
        task = asyncio.ensure_future(coro)
        self._ops[m.id] = task
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if self._ops.get(m.id) is t:
                del self._ops[m.id]

        task.add_done_callback(done)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- operations (called by the API; raise Conflict for 412) -----------------------

    def start(self, m: Machine) -> str:
        """Start (or resume) a machine; the previous state, as the real API answers.

        From ``suspending``, as on Fly since interruptible suspend: the suspend is
        abandoned and the frozen process resumed, through ``starting``. From
        ``suspended``: a resume from the snapshot, unless it is gone, older than
        ``timing.snapshot_ttl_s`` or lost to ``faults.resume_cold_rate``, when it is a
        cold boot. The flyd event that ends the start says which: ``start`` with
        ``{"resume": true}``, or ``launch`` with ``{"resume": false, "reason": ...}``.
        """
        self._reachable(m)
        previous = m.state
        if previous not in ("stopped", "suspended", "suspending", "created", "failed"):
            raise Conflict(f"unable to start machine from current state: '{previous}'")
        self.command(m)  # raises Conflict when the image vanished from the table
        m.restarts = 0
        if previous == "suspending":
            current = self._ops.pop(m.id, None)
            if current is not None:
                current.cancel()  # the memory copy is abandoned, the snapshot never made
            self.record(m, "starting", "start")
            self._run(m, self._unfreeze(m, {"resume": True, "interrupted": "suspend"}))
        elif previous == "suspended":
            reason = self._cold_reason(m)
            self.record(m, "starting", "start")
            if reason is None:
                self._run(m, self._resume(m))
            else:
                self._run(m, self._cold_start(m, reason))
        else:
            self.record(m, "starting", "start")
            self._run(m, self._boot(m))
        return previous

    def _cold_reason(self, m: Machine) -> str | None:
        """Why a start from ``suspended`` cannot resume; None when it can."""
        mp = self.procs.get(m.id)
        taken = self._snapshots.get(m.id)
        if mp is None or mp.returncode is not None or taken is None:
            return "no snapshot"
        ttl = self.timing.snapshot_ttl_s
        age = asyncio.get_running_loop().time() - taken
        if ttl is not None and age > ttl:
            return f"snapshot expired ({age:.1f}s old, timing.snapshot_ttl_s is {ttl:g}s)"
        rate = self.faults.resume_cold_rate
        if rate and self._rng.random() < rate:
            return "snapshot unusable (faults.resume_cold_rate)"
        return None

    def stop_settings(
        self,
        m: Machine,
        sig: int | None = None,
        timeout_s: float | None = None,
    ) -> tuple[int, float]:
        """A stop's signal and timeout: the call's, else the machine's ``config.stop_config``
        (as on Fly, where fly.toml's kill_signal and kill_timeout land), else SIGINT and
        ``STOP_TIMEOUT_S``. The config's were checked when it was set."""
        config_sig, config_timeout = validate.stop_settings(m.config.get("stop_config") or {}, "")
        if sig is None:
            sig = signal.SIGINT if config_sig is None else config_sig
        if timeout_s is None:
            timeout_s = STOP_TIMEOUT_S if config_timeout is None else config_timeout
        return sig, timeout_s

    def stop(self, m: Machine, sig: int | None = None, timeout_s: float | None = None) -> None:
        self._reachable(m)
        if m.state not in ("started", "suspended", "failed"):
            raise Conflict(f"unable to stop machine from current state: '{m.state}'")
        sig, timeout_s = self.stop_settings(m, sig, timeout_s)
        suspended = m.state == "suspended"
        self.record(m, "stopping", "stop", request={"signal": signal.Signals(sig).name})
        self._run(m, self._stop(m, sig, timeout_s, suspended))

    def restart(self, m: Machine, sig: int | None = None, timeout_s: float | None = None) -> None:
        self._reachable(m)
        if m.state != "started":
            raise Conflict(f"unable to restart machine from current state: '{m.state}'")
        sig, timeout_s = self.stop_settings(m, sig, timeout_s)
        self.record(m, "restarting", "restart", request={"signal": signal.Signals(sig).name})
        self._run(m, self._restart(m, sig, timeout_s))

    def send_signal(self, m: Machine, sig: int) -> None:
        self._reachable(m)
        mp = self.procs.get(m.id)
        if m.state != "started" or mp is None:
            raise Conflict(f"unable to signal machine in current state: '{m.state}'")
        mp.signal(sig)  # an exit it causes is handled like any other exit

    def suspend(self, m: Machine) -> None:
        self._reachable(m)
        if m.state != "started":
            raise Conflict(f"unable to suspend machine from current state: '{m.state}'")
        why = suspend_refusal(m.config)
        if why is not None:
            raise SuspendRefused(
                f"unable to suspend machine: {why}; only a machine without swap, schedule "
                "or GPU can be suspended (stop it instead)"
            )
        mp = self.procs.get(m.id)
        self.record(m, "suspending", "suspend")
        # Frozen at once, as Fly pauses the VM while it copies the memory out: its process
        # group now, what left the group once a walk of /proc (in a thread) has found it.
        frozen = mp.freeze() if mp is not None else None
        duration = self.draw(self.timing.suspend_s)
        if duration > 0 or frozen is not None:
            self._run(m, self._suspend(m, duration, frozen))
        else:
            self._suspended(m)

    async def _suspend(
        self, m: Machine, duration: float, frozen: asyncio.Future[None] | None
    ) -> None:
        """``suspended`` after ``duration``, and never before the whole machine is frozen."""
        began = asyncio.get_running_loop().time()
        if frozen is not None:
            await asyncio.shield(frozen)  # a start meanwhile cancels us, never the walk
        await self._pad(began, duration)
        self._suspended(m)

    def _suspended(self, m: Machine) -> None:
        self._snapshots[m.id] = asyncio.get_running_loop().time()
        self.record(m, "suspended", source="flyd")

    def update(self, m: Machine, config: dict[str, Any], name: str | None) -> None:
        self._reachable(m)
        if m.state not in ("started", "stopped", "suspended", "created", "failed"):
            raise Conflict(f"unable to update machine from current state: '{m.state}'")
        previous = m.state
        # The running version stops as its own config says.
        stop = self.stop_settings(m)
        m.config = config
        if name:
            m.name = name
        m.versions.append(m.instance_id)
        m.instance_id = self._ids.instance()
        self.record(m, "updating", "update")
        self._run(m, self._update(m, previous, stop))

    def destroy(self, m: Machine, force: bool) -> None:
        if m.state in ("destroying", "destroyed"):
            raise Conflict(f"machine is already {m.state}")
        if not force and m.state not in ("stopped", "suspended", "created", "failed"):
            raise Conflict(
                f"unable to destroy machine from current state: '{m.state}' "
                "(stop it first, or pass force=true)"
            )
        current = self._ops.pop(m.id, None)
        if current is not None and current is not asyncio.current_task():
            current.cancel()  # e.g. a boot in progress; its process is killed below
        self.record(m, "destroying", "destroy")
        if m.id in self.faults.host_unreachable:
            # As Fly does for a dead host: flagged `destroying`, destroyed once it is back.
            self._run(m, self._destroy_when_reachable(m))
        else:
            self._run(m, self._destroy(m))

    def _reachable(self, m: Machine) -> None:
        if m.id in self.faults.host_unreachable:
            raise HostUnreachable(
                f"machine {m.id}: its host is unreachable (host_status: unreachable); "
                "the action cannot reach it, try again later or use another machine"
            )

    # --- faults ----------------------------------------------------------------------

    def set_faults(self, faults: FaultSettings) -> None:
        """Replace the faults; a machine named in (or dropped from) ``hung`` or
        ``host_unreachable`` changes at once."""
        old, self.faults = self.faults, faults
        for mid in set(old.hung) - set(faults.hung):
            self._thaw(mid)
        for mid in set(faults.hung) - set(old.hung):
            self._hang(mid)
        for mid in set(old.host_unreachable) ^ set(faults.host_unreachable):
            m = self._find(mid)
            if m is not None:
                m.host_status = "unreachable" if mid in faults.host_unreachable else "ok"
                self.record(m, m.state)
        fired, self._faults_changed = self._faults_changed, asyncio.Event()
        fired.set()

    def _hang(self, mid: str) -> None:
        """SIGSTOP a started machine's process: the kernel still completes TCP handshakes
        into the listening socket's backlog, but nothing is ever read or answered. One
        whose app does not listen yet (``timing.listen_s``) hangs once it does: a hung
        machine accepts connections, as this fault promises."""
        m, mp = self._find(mid), self.procs.get(mid)
        if m is None or mp is None or m.state != "started":
            return
        if address_free(m.private_ip, m.internal_port):
            self._background(self._hang_once_listening(m, mp))
        else:
            mp.signal(signal.SIGSTOP)

    async def _hang_once_listening(self, m: Machine, mp: MachineProcess) -> None:
        port = m.internal_port
        if not await wait_listening(mp, m.private_ip, port, self.settings.boot_timeout_s):
            return
        if m.id in self.faults.hung and self.procs.get(m.id) is mp and m.state == "started":
            mp.signal(signal.SIGSTOP)

    def _thaw(self, mid: str) -> None:
        m, mp = self._find(mid), self.procs.get(mid)
        if m is None or mp is None:
            return
        if m.state == "started":
            mp.thaw()  # a suspending or suspended one stays frozen
        else:
            mp.unhang()  # one being stopped handles the stop's signal now

    def _now_started(self, m: Machine) -> None:
        """After every start: the hang and lost-host rates, and a hang kept through a
        suspend (a resume restores the process as it was)."""
        f = self.faults
        hung = f.hang_rate > 0 and self._rng.random() < f.hang_rate and m.id not in f.hung
        lost = (
            f.host_unreachable_rate > 0
            and self._rng.random() < f.host_unreachable_rate
            and m.id not in f.host_unreachable
        )
        if hung or lost:
            self.set_faults(
                f.model_copy(
                    update={
                        "hung": [*f.hung, m.id] if hung else f.hung,
                        "host_unreachable": [*f.host_unreachable, m.id]
                        if lost
                        else f.host_unreachable,
                    }
                )
            )
        elif m.id in f.hung:
            self._hang(m.id)

    def kill_process(self, m: Machine, sig: int = signal.SIGKILL) -> bool:
        """Simulate a crash: the process dies without the emulator asking it to stop."""
        mp = self.procs.get(m.id)
        if mp is None:
            return False
        return mp.signal(sig)

    # --- the slow halves -----------------------------------------------------------

    async def _resume(self, m: Machine) -> None:
        duration = self.draw(self.timing.resume_s)
        if duration > 0:
            await asyncio.sleep(duration)  # the snapshot loading; the process stays frozen
        await self._unfreeze(m, {"resume": True})

    async def _unfreeze(self, m: Machine, request: dict[str, Any]) -> None:
        mp = self.procs.get(m.id)
        if mp is not None and mp.returncode is None:
            # `started`: all of it runs again, but a hung machine's group (the app hangs on,
            # as the resume restores it; what left the group did not hang).
            await asyncio.shield(mp.thaw(group=m.id not in self.faults.hung))
        if mp is None or mp.returncode is not None:
            # It died while frozen (killed from outside): nothing to resume.
            await self._boot(m, {"resume": False, "reason": "no snapshot"})
            return
        self._snapshots.pop(m.id, None)
        self.record(m, "started", "start", source="flyd", request=request)
        self._now_started(m)

    async def _cold_start(self, m: Machine, reason: str) -> None:
        self._snapshots.pop(m.id, None)
        await self._end_process(m, signal.SIGKILL, 0)  # the frozen process goes with it
        await self._boot(m, {"resume": False, "reason": reason})

    async def _boot(self, m: Machine, fallback: dict[str, Any] | None = None) -> None:
        """A cold boot; ``fallback`` (a start that could not resume) is told by its event."""
        began = asyncio.get_running_loop().time()
        boot_s = self.draw(self.timing.start_s)
        port = m.internal_port
        if not address_free(m.private_ip, port):
            self.record(
                m,
                "failed",
                "launch",
                source="flyd",
                request={"error": f"{m.private_ip}:{port} is in use"},
            )
            return
        if self.faults.boot_failure_rate and self._rng.random() < self.faults.boot_failure_rate:
            # A boot that fails is `starting` for a boot's time first, as on Fly (starting,
            # then failed): a start tried again meanwhile meets a 412, not a failed machine.
            await self._pad(began, boot_s)
            self.record(
                m, "failed", "launch", source="flyd", request={"error": "injected boot failure"}
            )
            return
        listen_s = self.draw(self.timing.listen_s)
        mp = await self._spawn(m, boot_s + listen_s)
        if listen_s > 0:
            # Fly says `started` once the VM runs the app's process, not once that listens:
            # for listen_s more, connections to it are refused (the app's own start-up).
            # One that never listens stays `started`, as on Fly (its checks say so).
            await self._pad(began, boot_s)
            if mp.returncode is not None:
                await self._boot_failed(m, mp)
                return
        else:
            timeout_s = self.settings.boot_timeout_s + boot_s
            if not await wait_listening(mp, m.private_ip, port, timeout_s):
                await self._boot_failed(m, mp)
                return
            # The demo app delays its own listening by boot_s; other images are padded
            # here, so that every cold boot spends at least start_s in `starting`.
            await self._pad(began, boot_s)
        if fallback is None:
            self.record(m, "started", source="flyd")
        else:
            self.record(m, "started", "launch", source="flyd", request=fallback)
        if m.id in self.faults.hung:
            # A hang is its process's: the one that hung went with the stop, and a new one
            # starts well (unless hang_rate draws it again, just below).
            hung = [h for h in self.faults.hung if h != m.id]
            self.set_faults(self.faults.model_copy(update={"hung": hung}))
        self._now_started(m)
        if self.faults.crash_after_s is not None:
            self._background(self._crash_later(m, mp, self.faults.crash_after_s))

    async def _boot_failed(self, m: Machine, mp: MachineProcess) -> None:
        code = mp.returncode
        await mp.terminate(signal.SIGKILL, 0)
        why = f"exited with code {code}" if code is not None else "boot timeout"
        self.record(m, "failed", "launch", source="flyd", request={"error": why})

    async def _spawn(self, m: Machine, boot_s: float) -> MachineProcess:
        # Shielded: a cancelled boot must still own (and kill) the child it forked.
        env = self.environment(m, boot_s)
        fut = asyncio.ensure_future(spawn(self.command(m), env, self.reaper))
        self._spawning.add(fut)
        fut.add_done_callback(self._spawning.discard)
        try:
            mp = await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(self._kill_spawned)
            raise
        self.procs[m.id] = mp
        self.spawned.append(mp.pid)
        self.outputs[m.id] = mp.output
        self._background(self._watch(m, mp))
        return mp

    def _kill_spawned(self, fut: asyncio.Future[MachineProcess]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            mp = fut.result()
            mp.expected_exit = True
            mp.signal(signal.SIGKILL)  # reaped by close(), or by asyncio's child watcher

    async def _crash_later(self, m: Machine, mp: MachineProcess, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.procs.get(m.id) is mp:
            mp.signal(signal.SIGKILL)

    async def _watch(self, m: Machine, mp: MachineProcess) -> None:
        code = await mp.wait()
        if self.procs.get(m.id) is mp:
            del self.procs[m.id]
        if mp.expected_exit or self._closing or m.state not in ("started", "suspended"):
            return  # stopped on purpose, or a boot that _boot reports itself
        self.record(m, "stopped", "exit", source="flyd", request=exit_event(code, False))
        restart = m.config.get("restart") or {}
        policy = restart.get("policy") or DEFAULT_RESTART_POLICY
        retries = restart.get("max_retries", DEFAULT_MAX_RETRIES)
        if policy == "always" or (policy == "on-failure" and code != 0 and m.restarts < retries):
            m.restarts += 1
            self.record(m, "starting", "restart", source="flyd")
            self._run(m, self._boot(m))
        elif m.config.get("auto_destroy") is True:
            self.destroy(m, force=True)

    async def _end_process(self, m: Machine, sig: int, timeout_s: float) -> int | None:
        """Stop the machine's process, if it has one: ``sig``, then SIGKILL after the wait;
        its exit code (None without a process). A hung one ignores ``sig`` (``terminate``).

        The process stays in ``procs`` until it is gone: a stop cut short by a forced
        destroy leaves it there, killed (see ``terminate``), for the destroy to await.
        """
        mp = self.procs.get(m.id)
        if mp is None:
            return None
        code = await mp.terminate(sig, timeout_s, hung=m.id in self.faults.hung)
        if self.procs.get(m.id) is mp:
            del self.procs[m.id]
        return code

    async def _stop(self, m: Machine, sig: int, timeout_s: float, suspended: bool) -> None:
        began = asyncio.get_running_loop().time()
        code = None
        if suspended:
            await self._drop_snapshot(m)
        else:
            code = await self._end_process(m, sig, timeout_s)
        await self._pad(began, self.draw(self.timing.stop_s))  # the VM shutting down
        self.record(m, "stopped", source="flyd", request=exit_event(code, True))
        if m.config.get("auto_destroy") is True:
            # A turn of the loop first: a wait for "stopped" sees the stop it waited for
            # (the waiters woken by the record above run before this goes on).
            await asyncio.sleep(0)
            self.destroy(m, force=True)

    async def _drop_snapshot(self, m: Machine) -> None:
        """A suspended machine's snapshot is thrown away, as on Fly when it is stopped or
        updated: the frozen process is killed, never resumed to run its shutdown."""
        self._snapshots.pop(m.id, None)
        await self._end_process(m, signal.SIGKILL, 0)

    async def _restart(self, m: Machine, sig: int, timeout_s: float) -> None:
        began = asyncio.get_running_loop().time()
        await self._end_process(m, sig, timeout_s)
        await self._pad(began, self.draw(self.timing.stop_s))  # the VM shutting down, as a stop
        self.record(m, "starting", source="flyd")
        await self._boot(m)

    async def _update(self, m: Machine, previous: str, stop: tuple[int, float]) -> None:
        began = asyncio.get_running_loop().time()
        if previous == "suspended":
            await self._drop_snapshot(m)
        else:
            await self._end_process(m, *stop)
        if previous == "started":
            await self._pad(began, self.draw(self.timing.stop_s))  # its VM stops first
            self.record(m, "starting", source="flyd")
            await self._boot(m)
        else:
            # A suspended machine's snapshot cannot survive a new config.
            self.record(m, "stopped" if previous == "suspended" else previous, source="flyd")

    async def _destroy_when_reachable(self, m: Machine) -> None:
        while m.id in self.faults.host_unreachable:
            await self._faults_changed.wait()
        await self._destroy(m)

    async def _destroy(self, m: Machine) -> None:
        await self._end_process(m, signal.SIGKILL, 0)
        self.record(m, "destroyed", source="flyd")
        self._pool.release(m.private_ip, m.internal_port)
        self._on_gone(m)

    # --- runtime control -------------------------------------------------------------

    async def close(self) -> None:
        """Cancel every transition and kill every process; nothing survives this."""
        self._closing = True
        await self.checks.close()
        for task in list(self._tasks):
            task.cancel()
        # A boot cancelled mid-fork still gets its child: let the forks finish first.
        if self._spawning:
            await asyncio.wait(list(self._spawning), timeout=5)
        # Every live process, including those a cancelled stop or update had popped.
        live = self.reaper.live()
        for mp in live:
            mp.expected_exit = True
            mp.signal(signal.SIGKILL)
        for mp in live:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await mp.wait()
        self.procs.clear()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        self.reaper.close()
