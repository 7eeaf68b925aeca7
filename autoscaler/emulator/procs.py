"""Machine processes: spawning, signalling, port probing and loopback address allocation.

No orphans is the rule this module exists for. Every machine runs in its own session (so a
Ctrl-C in the terminal reaches only the emulator, which then stops machines in order). On
Linux its command runs below a small supervisor (``supervisor.py``) that the kernel tells
when the emulator's thread dies (PR_SET_PDEATHSIG) and that is the subreaper of whatever
the machine forks: when the machine's process ends, or the emulator does, even SIGKILLed,
it kills every process the machine started, those that left its process group too.
Elsewhere the machine's process itself only checks that the emulator is still there.
The machine's process leads its process group; the emulator signals that group (a stop,
a suspend's SIGSTOP), never the supervisor, and a stop and a suspend reach each process
below the supervisor that left the group too (``MachineProcess.freeze``, ``terminate``),
looked for in /proc in a thread: a walk of /proc takes as long as the host has processes,
and the event loop serves every machine's API and traffic meanwhile. ``Reaper`` keeps every
live process group and an ``atexit`` hook kills what is left if the event loop never got
to clean up.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import os
import random
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from autoscaler.aio import tcp_probe
from autoscaler.children import die_with_parent
from autoscaler.config import authority

PARENT_ENV = "AUTOSCALER_EMULATOR_PARENT"  # set on every machine: the emulator's pid
SESSION_ENV = "AUTOSCALER_EMULATOR_SESSION"  # passed through to machines when set
OUTPUT_LINES = 200  # tail of a machine's output kept for diagnostics
SUPERVISOR = str(Path(__file__).with_name("supervisor.py"))
# Looks for processes that left a machine's group when freezing it: each finds those the
# last one's processes forked before they stopped; a fork bomb is not chased for ever.
_FREEZE_ROUNDS = 20


class Reaper:
    """Every machine process this emulator started and has not yet seen exit."""

    def __init__(self) -> None:
        self._live: set[MachineProcess] = set()
        atexit.register(self.kill_all)

    def add(self, mp: MachineProcess) -> None:
        self._live.add(mp)

    def discard(self, mp: MachineProcess) -> None:
        self._live.discard(mp)

    def live(self) -> list[MachineProcess]:
        return list(self._live)

    def kill_all(self) -> None:
        for mp in list(self._live):
            kill_group(mp.pid, signal.SIGKILL)  # start_new_session: the pid is the group id
        self._live.clear()

    def close(self) -> None:
        self.kill_all()
        atexit.unregister(self.kill_all)


def kill_group(pgid: int, sig: int) -> bool:
    """Signal a whole process group; False when it is gone already."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # a recycled id that is no longer ours
        return False
    return True


class MachineProcess:
    """One running machine: the child (its supervisor, on Linux), the pid of the machine's
    process, which is also its process group's id, and the tail of its output. The child
    ends as the machine's process did (its exit code or its signal)."""

    def __init__(self, proc: asyncio.subprocess.Process, reaper: Reaper, pid: int) -> None:
        self.proc = proc
        self.pid = pid
        self.output: deque[str] = deque(maxlen=OUTPUT_LINES)
        self.expected_exit = False  # set before the emulator stops it on purpose
        self.stop_signal: int | None = None  # the stop's, once sent (terminate)
        self._reaper = reaper
        reaper.add(self)
        self._reader = asyncio.ensure_future(self._read_output())
        # The last of the walks for strays (_after): each runs once those before it ended.
        self._walk: asyncio.Future[None] | None = None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def _read_output(self) -> None:
        stream = self.proc.stdout
        if stream is None:
            return
        while line := await stream.readline():
            self.output.append(line.decode("utf-8", "replace").rstrip("\n"))

    def signal(self, sig: int) -> bool:
        return kill_group(self.pid, sig)

    def strays(self) -> list[int]:
        """The processes below the supervisor, those that left the machine's group (a
        daemon's ``setsid``) among them; none without a supervisor (not Linux), or once
        it has ended (its pid may be another process's by then)."""
        if self.proc.pid == self.pid or self.proc.returncode is not None:
            return []
        return descendants(self.proc.pid)

    def _after(self, act: Callable[[], None]) -> asyncio.Future[None]:
        """Run ``act``, which walks /proc for strays, in a thread once the walks asked for
        before it have ended: a freeze's, a thaw's and a stop's act in the order they were
        asked, so the last one asked has the last word (a thaw asked during a freeze's walk
        is not undone by it). Await the result shielded: a walk is never cut short."""
        before = self._walk

        async def walk() -> None:
            if before is not None:
                await asyncio.wait({before})
            await asyncio.to_thread(act)

        self._walk = asyncio.ensure_future(walk())
        return self._walk

    def _signal_strays(self, *sigs: int, outside_group: bool = False) -> None:
        for pid in self.strays():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if outside_group and os.getpgid(pid) == self.pid:
                    continue
                for sig in sigs:
                    os.kill(pid, sig)

    def freeze(self) -> asyncio.Future[None]:
        """SIGSTOP the whole machine, as Fly pauses the whole VM: its process group at once,
        and each process that left it, which the group's SIGSTOP missed (it ran on through
        a suspend), by the walk this returns (done: nothing of the machine runs any more).
        Looked for again until a look finds none it has not stopped yet: one forked
        meanwhile by a process not yet stopped is stopped too."""
        self.signal(signal.SIGSTOP)
        return self._after(self._stop_strays)

    def _stop_strays(self) -> None:
        stopped: set[int] = set()
        for _ in range(_FREEZE_ROUNDS):
            new = [pid for pid in self.strays() if pid not in stopped]
            if not new:
                return
            for pid in new:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGSTOP)
            stopped.update(new)

    def thaw(self, group: bool = True) -> asyncio.Future[None]:
        """SIGCONT what :meth:`freeze` stopped: the group at once (unless not ``group``: a
        hung machine's, which stays stopped), and every process that left it by the walk
        this returns."""
        if group:
            self.signal(signal.SIGCONT)
        return self._after(lambda: self._signal_strays(signal.SIGCONT, outside_group=not group))

    def unhang(self) -> None:
        """The ``hung`` fault released while a stop (a restart's, an update's) waits for
        the process: its group, which the stop found hung and did not continue, runs again
        and handles the stop's signal, pending since. Not after a stop by SIGSTOP, which
        asked for it frozen. What left the group never hung: it has the signal already."""
        if self.stop_signal not in (None, signal.SIGSTOP):
            self.signal(signal.SIGCONT)

    async def wait(self) -> int:
        code = await self.proc.wait()
        # The leader is reaped; make sure nothing it forked lingers in the group.
        kill_group(self.pid, signal.SIGKILL)
        self._reaper.discard(self)
        if self._walk is not None:  # quick now: the supervisor has ended, no strays to find
            await asyncio.wait({self._walk})
        # The output reader ends at EOF; give it a moment, never an unbounded wait.
        await asyncio.wait({self._reader}, timeout=1.0)
        if not self._reader.done():
            self._reader.cancel()
        return code

    async def terminate(self, sig: int, grace_s: float, *, hung: bool = False) -> int:
        """Send ``sig`` to the whole machine (its group, and what left it: Fly's stop ends
        the whole VM), once to each process: many apps take a second SIGINT or SIGTERM
        for "quit now" and cut their shutdown short. Wait up to ``grace_s``, then SIGKILL;
        returns the exit code. What left the group is killed by the supervisor once the
        machine's process has ended.
        A ``hung`` machine's group is not continued: a hung app does not handle the signal
        (it stays pending), so it ends by the SIGKILL after ``grace_s``, as a hung app on
        Fly ends when the stop's timeout runs out, unless the hang is released meanwhile
        (:meth:`unhang`); what left the group did not hang. SIGSTOP (fly.toml's
        kill_signal may be it) freezes the machine, continued by nothing, until that
        SIGKILL."""
        self.expected_exit = True
        if self.proc.returncode is None:
            self.stop_signal = sig
            freezes = sig == signal.SIGSTOP
            self.signal(sig)
            if not (hung or freezes):
                self.signal(signal.SIGCONT)  # a stopped (suspended) process cannot handle sig
            cont = () if freezes else (signal.SIGCONT,)
            # The group has them already: only what left it.
            strays = self._after(lambda: self._signal_strays(sig, *cont, outside_group=True))
            try:
                async with asyncio.timeout(grace_s):
                    await asyncio.shield(strays)
                    return await asyncio.shield(self.wait())
            except TimeoutError:
                pass
            except asyncio.CancelledError:
                # Cut short (a forced destroy during a stop): the process must end anyway,
                # or it would outlive its machine with the address and port.
                self.signal(signal.SIGKILL)
                raise
        self.signal(signal.SIGKILL)
        return await self.wait()


async def spawn(argv: Sequence[str], env: Mapping[str, str], reaper: Reaper) -> MachineProcess:
    """Start a machine's command; OSError as from exec when it cannot run."""
    # Its output read by the emulator, in a process group of its own (stop and suspend
    # signal the group).
    io: dict[str, Any] = {
        "stdin": asyncio.subprocess.DEVNULL,
        "stdout": asyncio.subprocess.PIPE,
        "stderr": asyncio.subprocess.STDOUT,
        "env": dict(env),
        "start_new_session": True,
    }
    if not sys.platform.startswith("linux"):
        proc = await asyncio.create_subprocess_exec(
            *argv,
            preexec_fn=die_with_parent(os.getpid()),  # only prctl and getppid
            **io,
        )
        return MachineProcess(proc, reaper, proc.pid)
    report_r, report_w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            # -I -S: the supervisor imports only the standard library; the machine's own
            # PYTHON* variables are for the machine.
            *(sys.executable, "-I", "-S", SUPERVISOR, str(report_w), str(os.getpid())),
            *("--", *argv),
            pass_fds=(report_w,),
            **io,
        )
    except BaseException:
        os.close(report_r)
        raise
    finally:
        os.close(report_w)
    try:
        report = await _read_to_end(report_r)
    except BaseException:
        proc.send_signal(signal.SIGTERM)  # it kills the machine, if there is one yet
        raise
    if report.isdigit():
        return MachineProcess(proc, reaper, int(report))
    code = await proc.wait()
    if report.startswith(b"E"):
        err = int(report[1:])
        raise OSError(err, os.strerror(err), argv[0])
    raise ChildProcessError(f"the machine's supervisor exited with code {code} before it ran")


async def _read_to_end(fd: int) -> bytes:
    """All a pipe's read end gives until its end of file, without blocking the loop; the
    descriptor is closed after."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    pipe = os.fdopen(fd, "rb", buffering=0)
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
    except BaseException:
        pipe.close()
        raise
    try:
        return await reader.read()
    finally:
        transport.close()


async def wait_listening(
    mp: MachineProcess, host: str, port: int, timeout_s: float, interval_s: float = 0.02
) -> bool:
    """True once ``host:port`` accepts a connection; False if the process exits or time runs out.

    A connect probe is the only readiness signal that works for any user image, so this is
    a loop; it ends with the boot and never runs for a machine that is already started.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if mp.returncode is not None:
            return False
        if await tcp_probe(host, port, min(0.5, max(deadline - loop.time(), 0.01))):
            return True
        await asyncio.sleep(interval_s)
    return False


def address_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As servers do: connections in TIME_WAIT from the last boot must not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
                return False
            raise
    return True


class AddressPool:
    """Loopback addresses for machines: random in 127.2.0.1 to 127.254.255.254, or ::1.

    Sixteen million addresses drawn at random make a clash between parallel emulators
    (several pytest processes, a demo beside the tests) unlikely; the bind probe makes it
    impossible at assignment time. 127.0.x and 127.1.x stay free for ordinary services.

    With ``ipv6`` every machine gets ::1, the one IPv6 loopback address (Fly's private
    addresses are IPv6, and the proxy reaches them over it): machines then share it, so
    what is held is the address and the machine's port, and two machines with one
    ``internal_port`` cannot both have it.
    """

    def __init__(self, rng: random.Random, *, ipv6: bool = False) -> None:
        self._rng = rng
        self._ipv6 = ipv6
        self._taken: set[str] = set()

    @staticmethod
    def _key(ip: str, port: int) -> str:
        """What a machine holds: its IPv4 address whole, on ::1 one port of it."""
        return authority(ip, port) if ":" in ip else ip

    def reserve(self, ip: str, port: int) -> None:
        self._taken.add(self._key(ip, port))

    def release(self, ip: str, port: int) -> None:
        self._taken.discard(self._key(ip, port))

    def move(self, ip: str, old_port: int, new_port: int) -> None:
        """A machine's port changes (an update): on ::1 the new one must be free (NoAddress
        if another machine holds it); an IPv4 address is the machine's whatever its port."""
        old, new = self._key(ip, old_port), self._key(ip, new_port)
        if new == old:
            return
        if new in self._taken:
            raise NoAddress(_SHARED_PORT_TAKEN.format(port=new_port))
        self._taken.discard(old)
        self._taken.add(new)

    def readdress(self, port: int) -> str:
        """An address of this pool's family for a machine a state file gave one of the
        other (World.restore): on ::1 its port, unless another machine holds it
        (NoAddress); not probed, as a machine loaded with its own address is not (another
        program on the port is its boot's to meet). An IPv4 one as ``allocate`` gives."""
        if not self._ipv6:
            return self.allocate(port)
        self._taken.add(self._free_on_ipv6(port))
        return IPV6_LOOPBACK

    def _free_on_ipv6(self, port: int) -> str:
        """What a machine on ::1 with ``port`` would hold; NoAddress if another holds it."""
        key = self._key(IPV6_LOOPBACK, port)
        if key in self._taken:
            raise NoAddress(_SHARED_PORT_TAKEN.format(port=port))
        return key

    def allocate(self, port: int) -> str:
        """A free address for ``port``; NoAddress when none is (a wildcard listener on the
        port, 0.0.0.0 or [::], blocks every loopback address on Linux)."""
        if self._ipv6:
            key = self._free_on_ipv6(port)
            if not address_free(IPV6_LOOPBACK, port):
                raise NoAddress(
                    f"insufficient capacity: port {port} is taken on ::1 "
                    f"(is something listening on [::1]:{port} or [::]:{port}?)"
                )
            self._taken.add(key)
            return IPV6_LOOPBACK
        for _ in range(64):
            rng = self._rng
            ip = f"127.{rng.randint(2, 254)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
            if ip not in self._taken and address_free(ip, port):
                self._taken.add(ip)
                return ip
        raise NoAddress(
            f"insufficient capacity: port {port} is taken on every loopback address tried "
            f"(is something listening on 0.0.0.0:{port} or [::]:{port}?)"
        )


IPV6_LOOPBACK = "::1"
_SHARED_PORT_TAKEN = (
    "insufficient capacity: another machine listens on [::1]:{port} (with emulator.ipv6 every"
    " machine has ::1: give this one another internal_port)"
)


class NoAddress(Exception):
    """No loopback address is free for a machine's port."""


def _live() -> Iterator[tuple[int, int]]:
    """Every live process (not a zombie: it runs nothing) as (pid, parent pid), read from
    /proc (Linux; none elsewhere). One that ends while it is read is left out."""
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    stat = fh.read()
                fields = stat[stat.rindex(b")") + 2 :].split()
                if fields[0] != b"Z":
                    yield int(entry), int(fields[1])
            except (OSError, ValueError, IndexError):
                continue  # it ended while we looked


def descendants(root: int) -> list[int]:
    """The live processes below ``root`` (its children, theirs, ...), parents first."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _live():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(0), ()):
            found.append(child)
            todo.append(child)
    return found


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not count). Linux /proc; elsewhere kill(0)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat[stat.rindex(b")") + 2 :].split()[0] != b"Z"


def leftovers(parent_pid: int) -> list[tuple[int, str]]:
    """Live processes that are children of ``parent_pid`` or carry its pid as a mark.

    The marks are PARENT_ENV (machines of an emulator running in ``parent_pid``) and
    SESSION_ENV (machines of any emulator started below a process that set it, such as a
    test session running the CLI as a subprocess).

    Reads /proc (Linux); zombies are skipped because they hold no resources and their
    parent reaps them. Returns (pid, command line) pairs.
    """
    found: list[tuple[int, str]] = []
    markers = {f"{PARENT_ENV}={parent_pid}".encode(), f"{SESSION_ENV}={parent_pid}".encode()}
    for pid, ppid in _live():
        if pid == parent_pid:
            continue
        try:
            mine = ppid == parent_pid
            if not mine:
                with contextlib.suppress(OSError), open(f"/proc/{pid}/environ", "rb") as fh:
                    mine = not markers.isdisjoint(fh.read().split(b"\0"))
            if mine:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    cmd = fh.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
                found.append((pid, cmd))
        except OSError:
            continue  # the process ended while we looked
    return found
