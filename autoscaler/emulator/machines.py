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

from autoscaler.config import EmulatorSettings, FaultSettings
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
from autoscaler.logs import get_logger

DEMO_IMAGE = "autoscaler/demo-app"
DEMO_COMMAND = "{python} -m autoscaler.emulator.demo_app --host {host} --port {port}"
DEFAULT_MAX_RETRIES = 10  # Fly's default for on-failure
# Never handed to a machine: a real Fly machine does not see your API token either.
_ENV_DENY_PREFIXES = ("FLY_", "AUTOSCALER_", "EMULATOR_")

log = get_logger(__name__)


class Conflict(Exception):
    """The operation makes no sense in the machine's current state (HTTP 412)."""


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
    ) -> None:
        self.settings = settings
        self._on_gone = on_gone  # the world forgets a destroyed machine
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
        self._tasks: set[asyncio.Task[None]] = set()
        self._spawning: set[asyncio.Future[MachineProcess]] = set()
        self._closing = False
        self.images = {DEMO_IMAGE: DEMO_COMMAND, **settings.images}
        self.checks = HealthChecks(self.runs_demo_image, on_change)
        self._stand_ins: set[str] = set()  # unknown images already logged

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

    def runs_demo_image(self, m: Machine) -> bool:
        """The machine's image is the built-in demo app's (with or without a tag)."""
        image = str(m.config.get("image", ""))
        return DEMO_IMAGE in (image, image.rpartition(":")[0])

    def command(self, m: Machine) -> list[str]:
        template = self.resolve_image(str(m.config.get("image", "")))
        if template is None:
            raise Conflict(f"image {m.config.get('image')!r} is not in the emulator's image table")
        fill = {"{host}": m.private_ip, "{port}": str(m.internal_port), "{python}": sys.executable}
        argv = []
        for arg in shlex.split(template):
            for key, value in fill.items():
                arg = arg.replace(key, value)
            argv.append(arg)
        return argv

    def environment(self, m: Machine) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_DENY_PREFIXES)}
        if SESSION_ENV in os.environ:  # a test session's mark, kept so it finds leftovers
            env[SESSION_ENV] = os.environ[SESSION_ENV]
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
                "DEMO_BOOT_DELAY_S": str(self.settings.demo_boot_delay_s),
                # Lets a test session find leftovers of this emulator by their environment.
                PARENT_ENV: str(os.getpid()),
            }
        )
        group = (m.config.get("metadata") or {}).get("fly_process_group")
        if group:  # as Fly sets it for a machine of a process group
            env["FLY_PROCESS_GROUP"] = str(group)
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
        m.updated_at = now_rfc3339()
        if kind is None and previous != state:
            kind, source, request = settled_event(m, previous, state, source, request)
        if kind is not None:
            m.events.append(
                Event(
                    id=self._ids.event(),
                    type=kind,
                    status=state,
                    source=source,
                    timestamp=int(time.time() * 1000),
                    request=request or {},
                )
            )
            del m.events[:-MAX_EVENTS]
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
        previous = m.state
        if previous not in ("stopped", "suspended", "created", "failed"):
            raise Conflict(f"unable to start machine from current state: '{previous}'")
        self.command(m)  # raises Conflict when the image vanished from the table
        m.restarts = 0
        self.record(m, "starting", "start")
        self._run(m, self._start(m, resume=previous == "suspended"))
        return previous

    def stop(self, m: Machine, sig: int, timeout_s: float) -> None:
        if m.state not in ("started", "suspended", "failed"):
            raise Conflict(f"unable to stop machine from current state: '{m.state}'")
        self.record(m, "stopping", "stop", request={"signal": signal.Signals(sig).name})
        self._run(m, self._stop(m, sig, timeout_s))

    def restart(self, m: Machine, sig: int, timeout_s: float) -> None:
        if m.state != "started":
            raise Conflict(f"unable to restart machine from current state: '{m.state}'")
        self.record(m, "restarting", "restart", request={"signal": signal.Signals(sig).name})
        self._run(m, self._restart(m, sig, timeout_s))

    def send_signal(self, m: Machine, sig: int) -> None:
        mp = self.procs.get(m.id)
        if m.state != "started" or mp is None:
            raise Conflict(f"unable to signal machine in current state: '{m.state}'")
        mp.signal(sig)  # an exit it causes is handled like any other exit

    def suspend(self, m: Machine) -> None:
        if m.state != "started":
            raise Conflict(f"unable to suspend machine from current state: '{m.state}'")
        mp = self.procs.get(m.id)
        self.record(m, "suspending", "suspend")
        if mp is not None:
            mp.signal(signal.SIGSTOP)  # memory kept, like Fly's snapshot
        self.record(m, "suspended")

    def update(self, m: Machine, config: dict[str, Any], name: str | None) -> None:
        if m.state not in ("started", "stopped", "suspended", "created", "failed"):
            raise Conflict(f"unable to update machine from current state: '{m.state}'")
        previous = m.state
        m.config = config
        if name:
            m.name = name
        m.versions.append(m.instance_id)
        m.instance_id = self._ids.instance()
        self.record(m, "updating", "update")
        self._run(m, self._update(m, previous))

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
        self._run(m, self._destroy(m))

    def kill_process(self, m: Machine, sig: int = signal.SIGKILL) -> bool:
        """Simulate a crash: the process dies without the emulator asking it to stop."""
        mp = self.procs.get(m.id)
        if mp is None:
            return False
        return mp.signal(sig)

    # --- the slow halves -----------------------------------------------------------

    async def _start(self, m: Machine, resume: bool) -> None:
        mp = self.procs.get(m.id)
        if resume and mp is not None and mp.returncode is None:
            mp.signal(signal.SIGCONT)
            if self.settings.resume_delay_s:
                await asyncio.sleep(self.settings.resume_delay_s)
            self.record(m, "started", source="flyd")
            return
        await self._boot(m)

    async def _boot(self, m: Machine) -> None:
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
            self.record(
                m, "failed", "launch", source="flyd", request={"error": "injected boot failure"}
            )
            return
        mp = await self._spawn(m)
        ok = await wait_listening(mp, m.private_ip, port, self.settings.boot_timeout_s)
        if not ok:
            code = mp.returncode
            await mp.terminate(signal.SIGKILL, 0)
            why = f"exited with code {code}" if code is not None else "boot timeout"
            self.record(m, "failed", "launch", source="flyd", request={"error": why})
            return
        self.record(m, "started", source="flyd")
        if self.faults.crash_after_s is not None:
            self._background(self._crash_later(m, mp, self.faults.crash_after_s))

    async def _spawn(self, m: Machine) -> MachineProcess:
        # Shielded: a cancelled boot must still own (and kill) the child it forked.
        fut = asyncio.ensure_future(spawn(self.command(m), self.environment(m), self.reaper))
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
        sig = -code if code < 0 else None
        self.record(
            m,
            "stopped",
            "exit",
            source="flyd",
            request={
                "exit_event": {
                    "exit_code": code if code >= 0 else 137,
                    "signal": sig,
                    "requested_stop": False,
                }
            },
        )
        restart = m.config.get("restart") or {}
        policy = restart.get("policy") or "no"
        retries = restart.get("max_retries", DEFAULT_MAX_RETRIES)
        if policy == "always" or (policy == "on-failure" and code != 0 and m.restarts < retries):
            m.restarts += 1
            self.record(m, "starting", "restart", source="flyd")
            self._run(m, self._boot(m))
        elif m.config.get("auto_destroy") is True:
            self.destroy(m, force=True)

    async def _end_process(self, m: Machine, sig: int, timeout_s: float) -> None:
        """Stop the machine's process, if it has one: ``sig``, then SIGKILL after the wait.

        The process stays in ``procs`` until it is gone: a stop cut short by a forced
        destroy leaves it there, killed (see ``terminate``), for the destroy to await.
        """
        mp = self.procs.get(m.id)
        if mp is not None:
            await mp.terminate(sig, timeout_s)
            if self.procs.get(m.id) is mp:
                del self.procs[m.id]

    async def _stop(self, m: Machine, sig: int, timeout_s: float) -> None:
        await self._end_process(m, sig, timeout_s)
        self.record(m, "stopped", source="flyd")
        if m.config.get("auto_destroy") is True:
            self.destroy(m, force=True)

    async def _restart(self, m: Machine, sig: int, timeout_s: float) -> None:
        await self._end_process(m, sig, timeout_s)
        self.record(m, "starting", source="flyd")
        await self._boot(m)

    async def _update(self, m: Machine, previous: str) -> None:
        await self._end_process(m, signal.SIGINT, 5.0)
        if previous == "started":
            self.record(m, "starting", source="flyd")
            await self._boot(m)
        else:
            # A suspended machine's snapshot cannot survive a new config.
            self.record(m, "stopped" if previous == "suspended" else previous, source="flyd")

    async def _destroy(self, m: Machine) -> None:
        await self._end_process(m, signal.SIGKILL, 0)
        self.record(m, "destroyed", source="flyd")
        self._pool.release(m.private_ip)
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
                await asyncio.wait_for(mp.wait(), 5)
        self.procs.clear()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        self.reaper.close()
