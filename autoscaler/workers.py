"""``autoscaler run --workers N``: N processes serving one port, coordinated as a cluster.

Each worker is a whole ``autoscaler run`` (proxy, admin server, and a cluster replica that
may lead), started from this supervisor with the proxy bound with SO_REUSEPORT (the kernel
spreads new connections over the workers). Worker ``i`` serves its admin endpoints on the
configured admin port plus ``i`` (each has its own ``/metrics`` and ``/status``; worker 0
answers the configured port, which health checks use). The workers coordinate through
``cluster.redis_url`` exactly as replicas on several hosts do, so it is required.

The supervisor forwards SIGHUP (reload) to every worker. SIGUSR2 restarts the workers one at
a time (a rolling restart, to run new code or take a restart-only setting): worker ``i`` gets
SIGTERM and drains (it stops accepting at once: the kernel sends new connections to the other
workers), a new worker ``i`` is started once it has exited (its admin port is free then), and
the next one goes only when the new one is ready (its ``/readyz`` answers 200, which it
does only once it listens on the proxy's port). With one worker there is a gap while it
restarts; with two or more no request meets a closed port. A SIGUSR2 during a rolling
restart is ignored (logged). On SIGTERM or SIGINT it sends
each worker SIGTERM once (a graceful stop), waits up to ``proxy.shutdown_timeout_s`` plus
10 s and SIGKILLs what is left; every worker is reaped before it returns. The workers run
in their own session (a terminal's Ctrl-C reaches only the supervisor, which stops them
once, gracefully) and get SIGTERM from the kernel if the supervisor dies
(PR_SET_PDEATHSIG). A worker that exits after running a while is started again; one that
exits within ``MIN_UPTIME_S`` of its start, or with ``run``'s exit code for a configuration
it refused (``CONFIG_REFUSED``) or for an address it could not listen on (``LISTEN_REFUSED``:
a port in use; started again, either would fail again, however long its start took on a
busy host) stops them all (:func:`fails_the_group`),
except a replacement in a rolling restart: that one ends the rolling restart and leaves its
slot empty (the workers not yet replaced keep serving) until the next SIGUSR2, which fills
it first; the group stops when no worker is left. The lowest slot with a worker in it
speaks for the configuration (``service.SPEAKER_ENV``, a file the supervisor keeps): worker
0, or the next one while slot 0 is empty.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from autoscaler import HELD_SIGNALS
from autoscaler.aio import local_host, urlopen_direct
from autoscaler.children import die_with_parent
from autoscaler.config import (
    EMBEDDED,
    HostPort,
    ListenHosts,
    authority,
    default_replica_id,
    listen_overlap,
    parse_host_port,
    resolve_listen_host,
)
from autoscaler.logs import get_logger
from autoscaler.service import (
    CONFIG_REFUSED,
    LISTEN_REFUSED,
    SPEAKER_ENV,
    WORKER_ENV,
    load_or_report,
    start_problem,
)

_log = get_logger("autoscaler.workers")
MIN_UPTIME_S = 5.0
# How long a rolling restart waits for a new worker to be ready before it gives up (the
# worker keeps running; the workers not yet replaced keep their old process).
READY_TIMEOUT_S = 60.0
MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"
"""Linux 5.14+: when on, a listener that closes hands the connections still queued in its
accept queue to another listener of its SO_REUSEPORT group instead of resetting them."""


def fails_the_group(code: int, uptime_s: float) -> bool:
    """Whether a worker that exited with ``code`` after ``uptime_s`` stops the group rather
    than being started again: it failed at its start (within ``MIN_UPTIME_S``), or for a
    cause a new start meets again (its configuration refused, its address taken), which a
    slow start on a busy host passed off as a failure after running a while: started
    again every few seconds, without end."""
    return code in (CONFIG_REFUSED, LISTEN_REFUSED) or uptime_s < MIN_UPTIME_S


def speaker(workers: int, vacant: Collection[int]) -> int:
    """The worker that speaks for the configuration (``service.SPEAKER_ENV``): the lowest
    slot with a worker in it. Worker 0 spoke alone: with its slot empty after a failed
    rolling restart, no worker said a reload's outcome (a rejected file neither)."""
    return min((i for i in range(workers) if i not in vacant), default=0)


def _name_speaker(path: str, worker: int) -> None:
    """Write the speaker's index whole (a worker reading it meanwhile sees the old one)."""
    with open(path + ".new", "w", encoding="ascii") as f:
        f.write(str(worker))
    os.replace(path + ".new", path)


def queued_connections_hint(path: str = MIGRATE_REQ) -> str | None:
    """What a worker's drain does to connections still in its accept queue, when it resets
    them (the kernel's default); None when the kernel hands them to the other workers."""
    try:
        with open(path) as f:
            if f.read().strip() != "0":
                return None
    except OSError:
        return (
            "this kernel has no net.ipv4.tcp_migrate_req (Linux 5.14+): a connection still "
            "in a draining worker's accept queue when it closes is reset"
        )
    return (
        "net.ipv4.tcp_migrate_req is 0: a connection still in a draining worker's accept "
        "queue when it closes is reset; `sysctl -w net.ipv4.tcp_migrate_req=1` hands such "
        "connections to the other workers"
    )


def supervise(
    config: str | None,
    overrides: Mapping[str, Any] | None,
    workers: int,
    *,
    emulator: bool = False,
    log_args: Sequence[str] = (),
    flags: Mapping[str, str] | None = None,
) -> int:
    """Run ``workers`` worker processes until SIGTERM/SIGINT; the exit code of ``run``.
    Each worker is given ``log_args`` (the command's --log-level and --log-format);
    ``flags`` names the flag that set each key path of ``overrides`` (load_settings)."""
    if emulator:
        _log.error("config_invalid", problem="--workers cannot share an embedded emulator")
        return CONFIG_REFUSED
    hosts = ListenHosts(resolve_listen_host)
    loaded = load_or_report(config, overrides, hosts, flags)
    if loaded is None:
        return CONFIG_REFUSED
    settings, path = loaded
    if settings.cluster.redis_url is None:
        _log.error(
            "config_invalid",
            problem=f"{path}: --workers needs cluster.redis_url: the workers elect their"
            " decider and share their load through Redis (docs/deploy.md, cluster mode)",
        )
        return CONFIG_REFUSED
    # As for `run`: static apps alone need no Machines API. The workers cannot share an
    # embedded emulator, though: each would run its own.
    scaled = [app.name for app in settings.apps if not app.static]
    if settings.runs_embedded_emulator:
        why = (
            "not the embedded emulator, which the workers cannot share"
            if settings.fly.api_url == EMBEDDED
            else f"app {scaled[0]} is scaled: it has no backends"
        )
        _log.error(
            "config_invalid",
            problem=f"{path}: --workers needs fly.api_url ({why}): set it to the Machines"
            " API (https://api.machines.dev, or http://_api.internal:4280 inside Fly)",
        )
        return CONFIG_REFUSED
    # Then what refuses `run` (the apps, the token, the Redis client...): said once here,
    # not by each worker, whose failed start stopped the group.
    problem = start_problem(path, settings)
    if problem is not None:
        _log.error("config_invalid", problem=problem)
        return CONFIG_REFUSED
    base_id = settings.cluster.replica_id or default_replica_id()
    admin = parse_host_port(settings.admin.listen, listen=True)
    proxy = parse_host_port(settings.proxy.listen, listen=True)
    for key, address in (("proxy.listen", proxy), ("admin.listen", admin)):
        if address.port == 0:
            # A free port is picked at each bind: every worker would listen on its own.
            _log.error(
                "config_invalid",
                problem=f"--workers needs {key} on a port of its own, got {address}: port 0"
                " is a free port picked at each bind, so each worker would listen on another",
            )
            return CONFIG_REFUSED
    if admin.port + workers - 1 > 65535:
        _log.error("config_invalid", problem="admin.listen's port plus --workers passes 65535")
        return CONFIG_REFUSED
    # Worker 0's admin server is admin.listen, which the settings hold apart from the proxy.
    # The others' hosts are its host, at the addresses the load resolved (as each worker's
    # start does: found there, the clash stopped the workers, said once by each).
    for i in range(1, workers):
        worker_admin = HostPort(admin.host, admin.port + i)
        overlap = listen_overlap(proxy, worker_admin, hosts.addresses)
        if overlap is not None:
            _log.error(
                "config_invalid",
                problem=f"{path}: proxy.listen {settings.proxy.listen} is the address of"
                f" worker {i}'s admin server too ({worker_admin}, admin.listen's port plus"
                f" {i}{'; ' + overlap if overlap else ''}): give proxy.listen a port outside"
                f" {admin.port}-{admin.port + workers - 1}, or admin.listen another",
            )
            return CONFIG_REFUSED

    hint = queued_connections_hint() if workers > 1 else None
    if hint is not None:
        _log.info("reuseport_queue_not_migrated", hint=hint)

    named: list[int] = []  # the worker the file names

    def name_speaker(starting: int | None = None) -> None:
        """Name the lowest slot with a worker in it (``starting``'s, being filled, too)."""
        i = speaker(workers, [j for j in vacant if j != starting])
        if named != [i]:
            _name_speaker(speaker_file, i)
            named[:] = [i]

    def spawn(i: int) -> tuple[subprocess.Popen[bytes], float]:
        name_speaker(i)  # before its start: a new worker 0 says config_loaded
        argv = [sys.executable, "-m", "autoscaler", "run", "--listen", settings.proxy.listen]
        argv += ["--admin-listen", authority(admin.host, admin.port + i)]
        if config is not None:
            argv += ["--config", str(config)]
        argv += log_args
        env = {
            **os.environ,
            "AUTOSCALER_PROXY__REUSE_PORT": "true",
            # Distinct replicas: each worker reports its own load and may lead.
            "AUTOSCALER_CLUSTER__REPLICA_ID": f"{base_id}/w{i}",
            WORKER_ENV: str(i),
            SPEAKER_ENV: speaker_file,  # who logs the configuration's lines
        }
        proc = subprocess.Popen(  # noqa: S603 - this interpreter, our own module
            argv,
            env=env,
            start_new_session=True,
            # SIGTERM (a graceful stop) if the supervisor dies. A forwarded SIGHUP, or a
            # SIGTERM, would kill a worker that has no handler yet: held back until its
            # Service.run has.
            preexec_fn=die_with_parent(os.getpid(), signal.SIGTERM, hold=HELD_SIGNALS),
        )
        _log.info("worker_started", worker=i, pid=proc.pid, admin=argv[7])
        return proc, time.monotonic()

    # /readyz is open unless admin.protect_metrics: send the token only then (loopback).
    token = None
    if settings.admin.token is not None and settings.admin.protect_metrics:
        token = settings.admin.token.get_secret_value()

    def ready(i: int) -> bool:
        # /readyz answers 200 only once the worker's proxy listens (its admin server
        # starts first); the shared port, which the other workers answer, cannot tell.
        return _ready(admin.host, admin.port + i, token)

    stop: list[int] = []
    hup: list[int] = []
    usr2: list[int] = []

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.append(signum)

    def on_hup(signum: int, frame: FrameType | None) -> None:
        hup.append(signum)

    def on_usr2(signum: int, frame: FrameType | None) -> None:
        usr2.append(signum)

    old = {
        sig: signal.signal(sig, handler)
        for sig, handler in (
            (signal.SIGTERM, on_stop),
            (signal.SIGINT, on_stop),
            (signal.SIGHUP, on_hup),
            (signal.SIGUSR2, on_usr2),
        )
    }
    # Held back by `autoscaler run` until there was a handler (cli._run): here now (the
    # handlers above have run for any that came meanwhile when this returns).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
    procs: list[tuple[subprocess.Popen[bytes], float]] = []
    roll: _Roll | None = None
    vacant: set[int] = set()  # a replacement failed at start: no worker in that slot
    grace_s = settings.proxy.shutdown_timeout_s + 10
    code = 0
    # Removed on the way out (the finally below), as the workers are reaped.
    speaker_file = os.path.join(tempfile.mkdtemp(prefix="autoscaler-workers-"), "speaker")
    try:
        for i in range(workers):
            if stop:  # a stop signal before the workers (or between them): no more
                break
            procs.append(spawn(i))  # one by one: a failed spawn stops those before it
        while not stop:
            if hup:
                hup.clear()
                for proc, _ in procs:
                    proc.send_signal(signal.SIGHUP)
            if usr2:
                usr2.clear()
                if roll is None:
                    # Empty slots first: they bring the group back to strength.
                    slots = sorted(vacant) + [i for i in range(workers) if i not in vacant]
                    roll = _Roll(pending=slots)
                    _log.info("rolling_restart_started", workers=workers)
                else:
                    _log.warning("rolling_restart_ignored", reason="one is under way")
            if roll is not None:
                roll = _step(roll, procs, spawn, ready, grace_s, vacant)
                name_speaker()
                if len(vacant) == workers:
                    _log.error("workers_failed", problem="no worker left running")
                    code = 1
                    break
            for i, (proc, started) in enumerate(procs):
                rc = proc.poll()
                if rc is None or i in vacant or (roll and i in (roll.stopping, roll.starting)):
                    continue  # a roll's own worker: the roll's step sees to it
                _log.warning("worker_exited", worker=i, pid=proc.pid, code=rc)
                if fails_the_group(rc, time.monotonic() - started):
                    _log.error("worker_failed_at_start", worker=i, code=rc)
                    code = rc if rc > 0 else 1  # killed by a signal: rc is negative
                    stop.append(0)
                    break
                procs[i] = spawn(i)
            time.sleep(0.1)
    except OSError as exc:  # fork or exec refused (no memory, no pids left, ...)
        _log.error("worker_spawn_failed", error=repr(exc))
        code = 1
    finally:
        # A worker draining for a rolling restart has had its SIGTERM: a second one would
        # cut its drain short.
        draining = {procs[roll.stopping][0].pid} if roll and roll.stopping is not None else set()
        _stop_all([p for p, _ in procs], grace_s, draining)
        shutil.rmtree(os.path.dirname(speaker_file), ignore_errors=True)
        for sig, handler in old.items():
            signal.signal(sig, handler)
    _log.info("workers_stopped", code=code)
    return code


@dataclass
class _Roll:
    """A rolling restart under way: the workers still to replace, and the one in hand."""

    pending: list[int]
    stopping: int | None = None  # SIGTERM sent, waiting for it to exit
    starting: int | None = None  # replacement started, waiting for it to be ready
    deadline: float = 0.0
    replaced: list[int] = field(default_factory=list)


def _step(
    roll: _Roll,
    procs: list[tuple[subprocess.Popen[bytes], float]],
    spawn: Callable[[int], tuple[subprocess.Popen[bytes], float]],
    ready: Callable[[int], bool],
    grace_s: float,
    vacant: set[int],
) -> _Roll | None:
    """One step of a rolling restart (never blocks for long, so SIGTERM is seen at once);
    the roll, or None once it is over. A replacement that exits before it is ready leaves
    its slot in ``vacant`` and ends the roll: the workers not yet replaced keep serving
    (a bad new version or config takes one worker down, not the group)."""
    now = time.monotonic()
    if roll.stopping is not None:
        i = roll.stopping
        proc = procs[i][0]
        if proc.poll() is None:
            if now > roll.deadline:
                _log.warning("worker_killed", worker=i, pid=proc.pid)
                proc.kill()
                proc.wait()
            return roll
        procs[i] = spawn(i)
        vacant.discard(i)
        roll.stopping, roll.starting = None, i
        roll.deadline = now + READY_TIMEOUT_S
        return roll
    if roll.starting is not None:
        i = roll.starting
        proc = procs[i][0]
        if proc.poll() is not None:
            _log.error(
                "rolling_restart_failed",
                worker=i,
                code=proc.returncode,
                problem="the new worker exited before it was ready; the others keep their"
                " old process, this slot stays empty until the next SIGUSR2",
            )
            vacant.add(i)
            return None
        if not ready(i):
            if now > roll.deadline:
                _log.error(
                    "rolling_restart_failed",
                    worker=i,
                    problem=f"not ready within {READY_TIMEOUT_S:g} s; the rest keep their"
                    " old process",
                )
                return None
            return roll
        _log.info("worker_replaced", worker=i, pid=proc.pid)
        roll.replaced.append(i)
        roll.starting = None
    if not roll.pending:
        _log.info("rolling_restart_done", workers=roll.replaced)
        return None
    i = roll.pending.pop(0)
    proc = procs[i][0]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    roll.stopping = i
    roll.deadline = now + grace_s
    return roll


def _ready(host: str, port: int, token: str | None) -> bool:
    """Whether the worker's admin server says it is ready (``/readyz`` answers 200)."""
    request = urllib.request.Request(f"http://{authority(local_host(host), port)}/readyz")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urlopen_direct(request, 1.0) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _stop_all(
    procs: list[subprocess.Popen[bytes]], grace_s: float, signalled: set[int] | None = None
) -> None:
    """SIGTERM each once (not the pids in ``signalled``: they had theirs), wait up to
    ``grace_s`` in all, SIGKILL the rest; reap every one."""
    for proc in procs:
        if proc.poll() is None and proc.pid not in (signalled or set()):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _log.warning("worker_killed", pid=proc.pid)
            proc.kill()
            proc.wait()
