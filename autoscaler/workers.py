"""``autoscaler run --workers N``: N processes serving one port, coordinated as a cluster.

Each worker is a whole ``autoscaler run`` (proxy, admin server, and a cluster replica that
may lead), started from this supervisor with the proxy bound with SO_REUSEPORT (the kernel
spreads new connections over the workers). Worker ``i`` serves its admin endpoints on the
configured admin port plus ``i`` (each has its own ``/metrics`` and ``/status``; worker 0
answers the configured port, which health checks use). The workers coordinate through
``cluster.redis_url`` exactly as replicas on several hosts do, so it is required.

The supervisor forwards SIGHUP (reload) to every worker and, on SIGTERM or SIGINT, sends
each worker SIGTERM once (a graceful stop), waits up to ``proxy.shutdown_timeout_s`` plus
10 s and SIGKILLs what is left; every worker is reaped before it returns. The workers run
in their own session (a terminal's Ctrl-C reaches only the supervisor, which stops them
once, gracefully) and get SIGTERM from the kernel if the supervisor dies
(PR_SET_PDEATHSIG). A worker that exits after running a while is started again; one that
exits within ``MIN_UPTIME_S`` of its start (a port in use, a bad config) stops them all.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from autoscaler.config import EMBEDDED, authority, default_replica_id, parse_host_port
from autoscaler.logs import get_logger
from autoscaler.service import load_or_report

_log = get_logger("autoscaler.workers")
MIN_UPTIME_S = 5.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    parent = os.getpid()

    def setup() -> None:  # runs in the child between fork and exec
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return setup


def supervise(
    config: str | None,
    overrides: Mapping[str, Any] | None,
    workers: int,
    *,
    emulator: bool = False,
) -> int:
    """Run ``workers`` worker processes until SIGTERM/SIGINT; the exit code of ``run``."""
    if emulator:
        _log.error("config_invalid", problem="--workers cannot share an embedded emulator")
        return 2
    loaded = load_or_report(config, overrides)
    if loaded is None:
        return 2
    settings, path = loaded
    if settings.cluster.redis_url is None:
        _log.error(
            "config_invalid",
            problem=f"{path}: --workers needs cluster.redis_url: the workers elect their"
            " decider and share their load through Redis (docs/deploy.md, cluster mode)",
        )
        return 2
    if settings.fly.api_url in (None, EMBEDDED):
        _log.error(
            "config_invalid",
            problem=f"{path}: --workers needs fly.api_url (not the embedded emulator)",
        )
        return 2
    base_id = settings.cluster.replica_id or default_replica_id()
    admin = parse_host_port(settings.admin.listen)
    if admin.port + workers - 1 > 65535:
        _log.error("config_invalid", problem="admin.listen's port plus --workers passes 65535")
        return 2

    def spawn(i: int) -> tuple[subprocess.Popen[bytes], float]:
        argv = [sys.executable, "-m", "autoscaler", "run", "--listen", settings.proxy.listen]
        argv += ["--admin-listen", authority(admin.host, admin.port + i)]
        if config is not None:
            argv += ["--config", str(config)]
        env = {
            **os.environ,
            "AUTOSCALER_PROXY__REUSE_PORT": "true",
            # Distinct replicas: each worker reports its own load and may lead.
            "AUTOSCALER_CLUSTER__REPLICA_ID": f"{base_id}/w{i}",
        }
        proc = subprocess.Popen(  # noqa: S603 - this interpreter, our own module
            argv, env=env, start_new_session=True, preexec_fn=_die_with_parent()
        )
        _log.info("worker_started", worker=i, pid=proc.pid, admin=argv[7])
        return proc, time.monotonic()

    stop: list[int] = []
    hup: list[int] = []

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.append(signum)

    def on_hup(signum: int, frame: FrameType | None) -> None:
        hup.append(signum)

    old = {
        sig: signal.signal(sig, handler)
        for sig, handler in (
            (signal.SIGTERM, on_stop),
            (signal.SIGINT, on_stop),
            (signal.SIGHUP, on_hup),
        )
    }
    procs: list[tuple[subprocess.Popen[bytes], float]] = []
    code = 0
    try:
        procs = [spawn(i) for i in range(workers)]
        while not stop:
            if hup:
                hup.clear()
                for proc, _ in procs:
                    proc.send_signal(signal.SIGHUP)
            for i, (proc, started) in enumerate(procs):
                rc = proc.poll()
                if rc is None:
                    continue
                _log.warning("worker_exited", worker=i, pid=proc.pid, code=rc)
                if time.monotonic() - started < MIN_UPTIME_S:
                    _log.error("worker_failed_at_start", worker=i, code=rc)
                    code = rc or 1
                    stop.append(0)
                    break
                procs[i] = spawn(i)
            time.sleep(0.1)
    finally:
        _stop_all([p for p, _ in procs], settings.proxy.shutdown_timeout_s + 10)
        for sig, handler in old.items():
            signal.signal(sig, handler)
    _log.info("workers_stopped", code=code)
    return code


def _stop_all(procs: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    """SIGTERM each once, wait up to ``grace_s`` in all, SIGKILL the rest; reap every one."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _log.warning("worker_killed", pid=proc.pid)
            proc.kill()
            proc.wait()
