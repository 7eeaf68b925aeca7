"""`autoscaler run --workers 2`: two processes on one port, one decider, all reaped."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from reliability.harness import child_env, write_config
from testkit import free_port, signal_on_import

from autoscaler import workers
from autoscaler.config import NO_REDIS, EmulatorApp
from autoscaler.emulator import Emulator
from autoscaler.workers import queued_connections_hint


def _unreachable_config(tmp_path: Path, apps: list[dict[str, Any]]) -> Path:
    """A config for ``run --workers`` whose Machines API and Redis nobody listens on."""
    return write_config(
        tmp_path / "c.yaml",
        {
            "fly": {"api_url": "http://127.0.0.1:9", "token": "w0rkers-t3st-t0ken"},
            "apps": apps,
            "proxy": {"listen": f"127.0.0.1:{free_port()}"},
            "cluster": {"redis_url": "redis://127.0.0.1:9"},
        },
    )


def _no_worker_forks(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every fork of a worker fails (EAGAIN); the list gets the argv of each one tried."""
    spawned: list[list[str]] = []
    real_popen = subprocess.Popen

    def popen(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        if argv[1:3] != ["-m", "autoscaler"]:  # not a worker (ctypes runs ldconfig)
            return real_popen(argv, **kw)
        spawned.append(argv)
        raise BlockingIOError(11, "Resource temporarily unavailable")  # none is started

    monkeypatch.setattr(workers.subprocess, "Popen", popen)
    return spawned


async def terminated(
    proc: asyncio.subprocess.Process, output: asyncio.Future[bytes]
) -> tuple[int, str]:
    """SIGTERM to ``proc`` (the supervisor) unless it ended already: its exit code, once
    it ended, and all it wrote (``output``, its stdout read to the end)."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(proc.wait(), 60)
    return code, (await asyncio.wait_for(output, 60)).decode()


def pair_of_free_ports() -> int:
    """A port P with P and P + 1 both free (worker i serves admin on P + i)."""
    while True:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def run(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "autoscaler", "run", "--config", str(config), *extra]


def _refused(file: Path, monkeypatch: pytest.MonkeyPatch, count: int) -> str:
    """The supervisor of ``count`` workers refuses the config: exit 2, no worker forked,
    and the one ``config_invalid`` line's problem, returned."""
    from structlog.testing import capture_logs

    spawned = _no_worker_forks(monkeypatch)
    with capture_logs() as logs:
        assert workers.supervise(str(file), None, count) == 2
    assert spawned == []
    [line] = [e for e in logs if e["event"] == "config_invalid"]
    return str(line["problem"])


def test_workers_need_a_redis_url(tmp_path: Path) -> None:
    file = write_config(
        tmp_path / "a.yaml",
        {
            "fly": {"api_url": "http://127.0.0.1:9", "token": "w0rkers-t3st-t0ken"},
            "apps": [{"name": "web"}],
        },
    )
    done = subprocess.run(
        run(file, "--workers", "2"), env=child_env(), capture_output=True, timeout=60
    )
    assert done.returncode == 2
    assert b"--workers needs cluster.redis_url" in done.stdout + done.stderr
    bad = subprocess.run(
        run(file, "--workers", "0"), env=child_env(), capture_output=True, timeout=60
    )
    assert bad.returncode == 2
    assert b"at least 1" in bad.stdout + bad.stderr


def test_workers_refuse_a_config_with_no_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `run` does: with `apps: []` the supervisor started the workers, each serving 404s."""

    file = _unreachable_config(tmp_path, [])
    assert _refused(file, monkeypatch, 2).startswith(
        f"{file}: apps: empty: nothing to route or scale"
    )


def test_workers_refuse_to_scale_through_the_api_without_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `run` does: each worker got a 401 on every tick, forever."""

    for name in ("FLY_API_TOKEN", "AUTOSCALER_FLY__TOKEN", "AUTOSCALER_FLY"):
        monkeypatch.delenv(name, raising=False)
    file = write_config(
        tmp_path / "c.yaml",
        {
            "fly": {"api_url": "http://127.0.0.1:9"},
            "apps": [{"name": "web"}],
            "cluster": {"redis_url": "redis://127.0.0.1:9"},
        },
    )
    assert _refused(file, monkeypatch, 2).startswith(f"{file}: no Fly API token: app web is scaled")


def test_workers_refuse_cluster_mode_without_the_redis_client_before_they_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What refuses `run` (service.start_problem) refuses the supervisor, once: without
    the Redis client (no cluster extra) it started the workers, each said so and exited,
    and the group stopped."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "redis" else find_spec(name, *a),
    )
    file = _unreachable_config(tmp_path, [{"name": "web"}])
    assert _refused(file, monkeypatch, 2) == NO_REDIS.format(path=file)


def test_workers_refuse_a_proxy_port_one_of_their_admin_servers_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker i serves admin on admin.listen's port plus i: proxy.listen on one of those
    started the workers, and worker i died of "address in use" (taking the others with it)."""
    from structlog.testing import capture_logs

    def config(proxy: str) -> Path:
        return write_config(
            tmp_path / "c.yaml",
            {
                "fly": {"api_url": "http://127.0.0.1:9", "token": "w0rkers-t3st-t0ken"},
                "apps": [{"name": "web"}],
                "proxy": {"listen": proxy},
                "admin": {"listen": "127.0.0.1:9091"},
                "cluster": {"redis_url": "redis://127.0.0.1:9"},
            },
        )

    spawned = _no_worker_forks(monkeypatch)
    file = config("0.0.0.0:9093")
    with capture_logs() as logs:
        assert workers.supervise(str(file), None, 3) == 2
    assert spawned == []
    [line] = [e for e in logs if e["event"] == "config_invalid"]
    assert line["problem"] == (
        f"{file}: proxy.listen 0.0.0.0:9093 is the address of worker 2's admin server too"
        " (127.0.0.1:9093, admin.listen's port plus 2; 0.0.0.0 is every IPv4 address of this"
        " host): give proxy.listen a port outside 9091-9093, or admin.listen another"
    )
    with capture_logs() as logs:  # two workers: admin on 9091 and 9092, the proxy's is free
        workers.supervise(str(file), None, 2)
    assert [e for e in logs if e["event"] == "config_invalid"] == []
    assert spawned != []


def test_workers_take_a_proxy_name_at_its_addresses_for_their_admin_servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy.listen given by name, on an address of one of the workers' admin servers:
    the supervisor compared the name as written and started the workers, and each one's
    start (which resolves it) refused the clash, the group stopped. It is said at once, at
    the addresses the supervisor's load resolved, as the one-process check says it."""
    import ipaddress

    looked_up: list[str] = []

    def resolve(host: str) -> list[ipaddress.IPv4Address]:
        looked_up.append(host)
        return [ipaddress.IPv4Address("127.0.0.1")]

    monkeypatch.setattr(workers, "resolve_listen_host", resolve)
    file = write_config(
        tmp_path / "c.yaml",
        {
            "fly": {"api_url": "http://127.0.0.1:9", "token": "w0rkers-t3st-t0ken"},
            "apps": [{"name": "web"}],
            "proxy": {"listen": "edge.test:9093"},
            "admin": {"listen": "127.0.0.1:9091"},
            "cluster": {"redis_url": "redis://127.0.0.1:9"},
        },
    )
    assert _refused(file, monkeypatch, 3) == (
        f"{file}: proxy.listen edge.test:9093 is the address of worker 2's admin server too"
        " (127.0.0.1:9093, admin.listen's port plus 2; edge.test is 127.0.0.1): give"
        " proxy.listen a port outside 9091-9093, or admin.listen another"
    )
    assert looked_up == ["edge.test"]  # once, by the load


async def test_workers_serve_static_apps_without_a_machines_api(
    redis_server: str, key_prefix: str, tmp_path: Path, aiohttp_server: Any
) -> None:
    """As plain `run` does (config/static.yaml): `run --workers 2` refused a config whose
    apps are all static for want of fly.api_url, which they never call. The warning of
    an app no request reaches is logged once, not by every worker."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="static")

    backend_app = web.Application()
    backend_app.router.add_get("/", hello)
    backend = await aiohttp_server(backend_app, host="127.0.0.1")
    proxy, admin = free_port(), pair_of_free_ports()
    while proxy in (admin, admin + 1):
        admin = pair_of_free_ports()
    file = write_config(
        tmp_path / "c.yaml",
        {
            "proxy": {"listen": f"127.0.0.1:{proxy}", "shutdown_timeout_s": 2},
            "admin": {"listen": f"127.0.0.1:{admin}"},
            "cluster": {"redis_url": redis_server, "lease_ttl_s": 1, "key_prefix": key_prefix},
            "apps": [
                {"name": "web", "hosts": ["web.test"], "backends": [f"127.0.0.1:{backend.port}"]},
                # No hosts, not the default app: app_unreachable, at the start and reload.
                {"name": "api", "backends": [f"127.0.0.1:{backend.port}"]},
            ],
        },
    )
    proc = await asyncio.create_subprocess_exec(
        *run(file, "--workers", "2"),
        env=child_env(),
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    output = asyncio.ensure_future(proc.stdout.read())  # the pipe must never fill up
    try:
        async with aiohttp.ClientSession() as http:
            for i in (0, 1):
                await get_json(http, f"http://127.0.0.1:{admin + i}/status")
            for _ in range(4):  # new connections, spread over the workers by the kernel
                async with http.get(
                    f"http://127.0.0.1:{proxy}/",
                    headers={"Host": "web.test", "Connection": "close"},
                ) as resp:
                    assert (resp.status, await resp.text()) == (200, "static")
            proc.send_signal(signal.SIGHUP)
            for i in (0, 1):
                await reloaded(http, admin + i, proc)
    finally:
        code, err = await terminated(proc, output)
    assert code == 0, err
    assert err.count('"worker_started"') == 2, err
    assert '"fly_api"' not in err  # no call at all
    # Each worker loads the same file: worker 0 alone says what is wrong with it, once at
    # the start and once at the reload (each worker said it: four lines), and that it
    # loaded and reloaded it.
    assert err.count('"app_unreachable"') == 2, err
    assert err.count('"config_loaded"') == err.count('"config_reloaded"') == 1, err
    # Every line of a worker says whose it is; the supervisor's own say no worker's.
    written = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert sorted(e["worker"] for e in written if e["event"] == "started") == [0, 1], err
    assert all("worker" in e for e in written if e["logger"] != "autoscaler.workers"), err
    assert "worker" not in next(e for e in written if e["event"] == "workers_stopped"), err


def test_workers_with_an_app_to_scale_need_a_machines_api(tmp_path: Path) -> None:
    file = write_config(
        tmp_path / "c.yaml",
        {
            "cluster": {"redis_url": "redis://127.0.0.1:9"},
            "apps": [
                {"name": "www", "backends": ["127.0.0.1:9"]},
                {"name": "web", "hosts": ["web.test"]},
            ],
        },
    )
    done = subprocess.run(
        run(file, "--workers", "2"), env=child_env(), capture_output=True, timeout=60, text=True
    )
    assert done.returncode == 2
    [line] = [json.loads(ln) for ln in done.stdout.splitlines() if '"config_invalid"' in ln]
    assert line["problem"] == (
        f"{file}: --workers needs fly.api_url (app web is scaled: it has no backends): set it"
        " to the Machines API (https://api.machines.dev, or http://_api.internal:4280 inside"
        " Fly)"
    )


async def get_json(http: aiohttp.ClientSession, url: str, limit_s: float = 20) -> Any:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        try:
            async with http.get(url) as resp:
                return await resp.json()
        except aiohttp.ClientError:
            assert loop.time() - start < limit_s, f"{url} never answered"
            await asyncio.sleep(0.1)


async def two_workers(
    emulator: Emulator, redis_server: str, key_prefix: str, tmp_path: Path
) -> tuple[asyncio.subprocess.Process, int, int]:
    """`autoscaler run --workers 2` in front of an app of one machine: the supervisor
    (its output piped), the proxy's port and the first worker's admin port."""
    emulator.world.seed_app(EmulatorApp(name="web", machines=1))
    proxy, admin = free_port(), pair_of_free_ports()
    while proxy in (admin, admin + 1):
        admin = pair_of_free_ports()
    file = write_config(
        tmp_path / "c.yaml",
        {
            "fly": {"api_url": emulator.url, "token": emulator.token},
            "proxy": {"listen": f"127.0.0.1:{proxy}", "shutdown_timeout_s": 2},
            "admin": {"listen": f"127.0.0.1:{admin}"},
            "control": {"tick_s": 0.2},
            "cluster": {"redis_url": redis_server, "lease_ttl_s": 1, "key_prefix": key_prefix},
            "apps": [{"name": "web", "hosts": ["web.test"], "idle_to_zero_s": 60}],
        },
    )
    proc = await asyncio.create_subprocess_exec(
        *run(file, "--workers", "2"),
        env=child_env(),
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    return proc, proxy, admin


async def test_two_workers_one_port_one_leader_all_reaped(
    emulator: Emulator, redis_server: str, key_prefix: str, tmp_path: Path
) -> None:
    proc, proxy, admin = await two_workers(emulator, redis_server, key_prefix, tmp_path)
    assert proc.stdout is not None
    # Read all along: the workers log to the same pipe, which must never fill up.
    output = asyncio.ensure_future(proc.stdout.read())
    try:
        await asyncio.sleep(0)
        async with aiohttp.ClientSession() as http:
            docs: list[dict[str, Any]] = []
            loop = asyncio.get_running_loop()
            start = loop.time()
            while True:
                docs = [
                    await get_json(http, f"http://127.0.0.1:{admin + i}/status") for i in (0, 1)
                ]
                if sum(1 for d in docs if d["cluster"]["leading"]) == 1 and all(
                    len(d["cluster"]["replicas"]) == 2 for d in docs
                ):
                    break
                assert loop.time() - start < 20, f"no single leader: {docs}"
                await asyncio.sleep(0.1)
            ids = {d["cluster"]["replica"] for d in docs}
            assert len(ids) == 2
            for _ in range(6):  # new connections, spread over the workers by the kernel
                async with http.get(
                    f"http://127.0.0.1:{proxy}/",
                    headers={"Host": "web.test", "Connection": "close"},
                ) as resp:
                    assert resp.status == 200
    finally:
        code, err = await terminated(proc, output)
    assert code == 0, err
    pids = [json.loads(line)["pid"] for line in err.splitlines() if '"worker_started"' in line]
    assert len(pids) == 2
    # The hint about queued connections, as this machine's kernel is set.
    hinted = '"reuseport_queue_not_migrated"' in err
    assert hinted == (queued_connections_hint() is not None)
    for pid in pids:  # reaped: gone, not even a zombie
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_supervisor_says_when_a_drain_resets_queued_connections(tmp_path: Path) -> None:
    """The kernel resets what is still queued on a listener that closes, unless
    net.ipv4.tcp_migrate_req hands it to another listener of the SO_REUSEPORT group."""
    sysctl = tmp_path / "tcp_migrate_req"
    sysctl.write_text("0\n")
    hint = queued_connections_hint(str(sysctl))
    assert hint is not None
    assert "sysctl -w net.ipv4.tcp_migrate_req=1" in hint
    sysctl.write_text("1\n")
    assert queued_connections_hint(str(sysctl)) is None
    missing = queued_connections_hint(str(tmp_path / "absent"))
    assert missing is not None
    assert "Linux 5.14+" in missing


# Runs in a network namespace of its own (``unshare -n``: only a loopback, which it brings
# up), so the setting it changes is that namespace's alone.
_QUEUED = r"""
import fcntl, select, socket, struct, sys, time

with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # ip link set lo up
    fcntl.ioctl(s, 0x8914, struct.pack("16sH14s", b"lo", 0x1 | 0x8, bytes(14)))  # SIOCSIFFLAGS
with open("/proc/sys/net/ipv4/tcp_migrate_req", "w") as f:
    f.write(sys.argv[1])


def listener():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 8080))
    s.listen(128)
    s.setblocking(False)
    return s


closing, other = listener(), listener()
clients = [socket.create_connection(("127.0.0.1", 8080)) for _ in range(40)]
closing.close()  # a worker that stops with connections still queued
poll = select.epoll()
poll.register(other.fileno(), select.EPOLLIN)
accepted, deadline = 0, time.monotonic() + 2
while accepted < len(clients) and time.monotonic() < deadline:
    if poll.poll(0.1):
        while True:
            try:
                other.accept()[0].close()
            except BlockingIOError:
                break
            accepted += 1
print(accepted, len(clients))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0, reason="needs root: unshare -n"
)
@pytest.mark.parametrize(("migrate", "all_accepted"), [("1", True), ("0", False)])
def test_tcp_migrate_req_hands_a_closing_listeners_queue_to_the_others(
    migrate: str, all_accepted: bool
) -> None:
    """What the supervisor's hint and docs/deploy.md say of net.ipv4.tcp_migrate_req, on
    this kernel: with it, the connections queued on a listener that closes are accepted by
    the other listener of the port (woken by epoll, as the proxy's loop is); without it,
    some are reset."""
    if not os.path.exists("/proc/sys/net/ipv4/tcp_migrate_req"):
        pytest.skip("this kernel has no net.ipv4.tcp_migrate_req (Linux 5.14+)")
    unshare = shutil.which("unshare")  # util-linux
    assert unshare is not None, "unshare (util-linux) is not installed"
    probe = subprocess.run(
        [unshare, "-n", "true"], capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:  # a container that may not make namespaces
        pytest.skip(f"unshare -n is not allowed here: {probe.stderr.strip()}")
    done = subprocess.run(
        [unshare, "-n", sys.executable, "-c", _QUEUED, migrate],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    accepted, queued = map(int, done.stdout.split())
    assert (accepted == queued) is all_accepted, done.stdout


async def reloaded(
    http: aiohttp.ClientSession, admin: int, proc: asyncio.subprocess.Process
) -> None:
    """Wait until the worker whose admin server is on ``admin`` has reloaded once, its
    group (``proc``, the supervisor) running all along; fail after 30 s."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    text = ""
    while True:
        try:
            async with http.get(f"http://127.0.0.1:{admin}/metrics") as resp:
                text = await resp.text()
            if re.search(r'reloads_total\{[^}]*result="success"\} 1\.0', text):
                return
        except aiohttp.ClientError:
            pass
        assert proc.returncode is None, "the group stopped"
        seen = [ln for ln in text.splitlines() if "reloads" in ln]
        assert loop.time() - start < 30, f"the worker on {admin} did not reload: {seen}"
        await asyncio.sleep(0.1)


async def test_a_sighup_while_the_workers_start_reloads_them_instead_of_killing(
    emulator: Emulator, redis_server: str, key_prefix: str, tmp_path: Path
) -> None:
    """The supervisor forwards SIGHUP to every worker, however young. One that had no
    handler yet died of it, and the supervisor, taking that for a failed start, stopped
    the whole group (exit 255). Workers now hold it back until they can reload."""
    proc, _, admin = await two_workers(emulator, redis_server, key_prefix, tmp_path)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert line, "the supervisor ended"
            lines.append(line)
            if '"worker_started"' in line and '"worker": 1' in line:
                proc.send_signal(signal.SIGHUP)  # worker 1 is still importing
                break
        output = asyncio.ensure_future(proc.stdout.read())
        async with aiohttp.ClientSession() as http:
            for i in (0, 1):
                await reloaded(http, admin + i, proc)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 60)
    err = "".join(lines) + (await asyncio.wait_for(output, 60)).decode()
    assert code == 0, err
    assert '"worker_exited"' not in err


def test_a_sigterm_before_the_supervisor_has_its_handlers_stops_it_cleanly(
    tmp_path: Path,
) -> None:
    """A SIGTERM while `autoscaler run --workers 2` still imports ended the supervisor by
    the signal's default action (exit -15). It is held back until the supervisor has its
    handlers, which then stop it before it starts a worker."""
    file = _unreachable_config(tmp_path, [{"name": "web"}])
    script = signal_on_import("autoscaler.logs", "SIGTERM")
    argv = [sys.executable, "-c", script, *run(file, "--workers", "2")[3:]]
    done = subprocess.run(
        [*argv, "--log-format", "json"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    events = [json.loads(ln).get("event") for ln in done.stdout.splitlines() if ln[:1] == "{"]
    assert done.returncode == 0, done.stdout + done.stderr
    assert "workers_stopped" in events
    assert "worker_started" not in events


def test_a_worker_that_cannot_be_spawned_stops_and_reaps_those_already_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second worker's fork fails: the supervisor says so, exits 1, and the first
    worker is stopped and reaped by it (not left to the parent-death signal)."""
    file = _unreachable_config(tmp_path, [{"name": "web"}])
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def popen(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        if argv[1:3] != ["-m", "autoscaler"]:  # not a worker (ctypes runs ldconfig)
            return real_popen(argv, **kw)
        if started:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
        started.append(real_popen(sleeper, start_new_session=True))
        return started[0]

    monkeypatch.setattr(workers.subprocess, "Popen", popen)
    assert workers.supervise(str(file), None, 2) == 1
    assert len(started) == 1
    assert started[0].returncode == -signal.SIGTERM  # stopped and reaped here


def test_only_a_worker_failing_for_a_cause_that_stays_is_started_again() -> None:
    """The supervisor's rule: a worker that ran a while and then failed (exit 1) is
    started again; one that failed at its start, or whose configuration or address was
    refused (exit 2, 3), however long it ran, stops the group."""
    assert not workers.fails_the_group(1, workers.MIN_UPTIME_S + 60)
    assert workers.fails_the_group(1, 0.0)
    assert workers.fails_the_group(2, workers.MIN_UPTIME_S + 60)  # CONFIG_REFUSED
    assert workers.fails_the_group(3, workers.MIN_UPTIME_S + 60)  # LISTEN_REFUSED


def test_the_lowest_live_worker_speaks_for_the_configuration() -> None:
    """Worker 0 spoke alone, also with its slot empty (a failed rolling restart): the
    lowest slot with a worker in it speaks."""
    assert workers.speaker(3, set()) == 0
    assert workers.speaker(3, {0}) == 1
    assert workers.speaker(3, {0, 1}) == 2
    assert workers.speaker(3, {1}) == 0


@pytest.mark.parametrize("code", [2, 3], ids=["config-refused", "port-in-use"])
def test_a_worker_that_refuses_its_configuration_is_not_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """A worker whose `run` refused the configuration (exit 2: the file changed since the
    supervisor read it), or whose port was taken (exit 3), after MIN_UPTIME_S, its start
    slow on a busy host, was started again, to be refused again, every few seconds: exit 2
    or 3 stops the group, with its code, however long the start took."""
    from structlog.testing import capture_logs

    file = _unreachable_config(tmp_path, [{"name": "web"}])
    monkeypatch.setattr(workers, "MIN_UPTIME_S", 0.0)  # every start took longer
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def popen(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        if argv[1:3] != ["-m", "autoscaler"]:  # not a worker (ctypes runs ldconfig)
            return real_popen(argv, **kw)
        if len(started) == 2:  # one is started again: fail that fork, the test ends
            raise BlockingIOError(11, "Resource temporarily unavailable")
        refuses = [sys.executable, "-c", f"raise SystemExit({code})"]
        started.append(real_popen(refuses, start_new_session=True))
        return started[-1]

    monkeypatch.setattr(workers.subprocess, "Popen", popen)
    with capture_logs() as logs:
        assert workers.supervise(str(file), None, 2) == code
    assert len(started) == 2
    assert [e["code"] for e in logs if e["event"] == "worker_failed_at_start"] == [code]
    assert all(proc.returncode == code for proc in started)  # reaped


def test_the_workers_log_as_the_command_was_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run --workers 2 --log-level warning --log-format console`: the workers logged
    every info line, as JSON, whatever the flags said."""
    from autoscaler import cli

    file = _unreachable_config(tmp_path, [{"name": "web"}])
    spawned = _no_worker_forks(monkeypatch)
    argv = ["run", "--config", str(file), "--workers", "2"]
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        assert cli.main([*argv, "--log-level", "warning", "--log-format", "console"]) == 1
    finally:  # `run` holds SIGHUP and SIGUSR2 back for the supervisor's handlers
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    (worker,) = spawned
    assert worker[-4:] == ["--log-level", "warning", "--log-format", "console"]


@pytest.mark.parametrize("listen", ["::", "0.0.0.0"])
async def test_the_readiness_probe_asks_a_wildcard_admin_server_on_127_0_0_1(
    aiohttp_server: Any, listen: str
) -> None:
    """A worker's admin server on [::] is bound dual stack (aio.dual_stack): the probe
    asked it at ::1, which a container without IPv6 loopback lacks (no worker was ever
    ready); 127.0.0.1 reaches it wherever it runs. The server here listens on 127.0.0.1
    alone (no wildcard in tests), where the probe must find it."""

    async def readyz(request: web.Request) -> web.Response:
        return web.Response(text="ready")

    app = web.Application()
    app.router.add_get("/readyz", readyz)
    admin = await aiohttp_server(app, host="127.0.0.1")
    assert await asyncio.to_thread(workers._ready, listen, admin.port, None)


async def test_the_readiness_probe_never_goes_through_a_proxy_named_by_the_environment(
    monkeypatch: pytest.MonkeyPatch, aiohttp_server: Any
) -> None:
    """A rolling restart waits for each new worker's /readyz: with http_proxy set, the
    probe (and the admin token) went to that proxy, and no worker was ever ready."""
    seen: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(4096))
        writer.close()

    async def readyz(request: web.Request) -> web.Response:
        return web.Response(text="ready")

    app = web.Application()
    app.router.add_get("/readyz", readyz)
    admin = await aiohttp_server(app, host="127.0.0.1")
    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    try:
        assert await asyncio.to_thread(workers._ready, "127.0.0.1", admin.port, "t" * 16)
    finally:
        server.close()
        await server.wait_closed()
    assert seen == []
