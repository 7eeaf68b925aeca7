"""``GET .../machines/{id}/ps``: the processes of a machine, read from Linux's /proc.

A machine is a process group (each machine runs in its own session), so its processes are
the members of that group, and those below its supervisor that left it (a daemon's
``setsid``: ``MachineProcess.strays``). The answer has the real API's ProcessStat shape: ``pid``,
``command``, ``directory``, ``rss`` (bytes), ``cpu`` (user + system CPU time, ms),
``stime`` (system CPU time, ms), ``rtime`` (time since the process started, ms) and
``listen_sockets`` (``{"address": "ip:port", "proto": "tcp"}`` for each listening TCP
socket it holds). Elsewhere than Linux the list is empty.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_PROC = Path("/proc")
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def _ticks_ms(ticks: int) -> int:
    return ticks * 1000 // os.sysconf("SC_CLK_TCK")


def _listening() -> dict[int, tuple[str, str]]:
    """Socket inode → (address, proto) of every listening TCP socket."""
    found: dict[int, tuple[str, str]] = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with contextlib.suppress(OSError):
            lines = (_PROC / "net" / name).read_text().splitlines()[1:]
            for line in lines:
                fields = line.split()
                if len(fields) < 10 or fields[3] != _LISTEN:
                    continue
                hex_ip, hex_port = fields[1].split(":")
                raw = bytes.fromhex(hex_ip)
                # The kernel prints each 32-bit word in host order.
                words = struct.unpack(f"<{len(raw) // 4}I", raw)
                ip = socket.inet_ntop(family, struct.pack(f">{len(words)}I", *words))
                host = f"[{ip}]" if family == socket.AF_INET6 else ip
                found[int(fields[9])] = (f"{host}:{int(hex_port, 16)}", "tcp")
    return found


def _sockets(pid: int, listening: dict[int, tuple[str, str]]) -> list[dict[str, str]]:
    out = []
    with contextlib.suppress(OSError):
        for fd in (_PROC / str(pid) / "fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inode = int(target[8:-1])
                    if inode in listening:
                        address, proto = listening[inode]
                        out.append({"address": address, "proto": proto})
    return out


def _stat(pid: int, boot_ms: int, listening: dict[int, tuple[str, str]]) -> dict[str, Any]:
    base = _PROC / str(pid)
    raw = (base / "stat").read_bytes()
    fields = raw[raw.rindex(b")") + 2 :].split()
    # After "pid (comm) ": state ppid pgrp ... utime(12) stime(13) ... starttime(20) ... rss(22)
    utime, stime, started = int(fields[11]), int(fields[12]), int(fields[19])
    rss_pages = int(fields[21])
    command = (base / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    try:
        directory = os.readlink(base / "cwd")
    except OSError:
        directory = ""
    return {
        "pid": pid,
        "command": command.strip(),
        "directory": directory,
        "rss": rss_pages * os.sysconf("SC_PAGE_SIZE"),
        "cpu": _ticks_ms(utime + stime),
        "stime": _ticks_ms(stime),
        "rtime": max(0, boot_ms - _ticks_ms(started)),
        "listen_sockets": _sockets(pid, listening),
    }


def group_of(pgid: int) -> list[int]:
    """The live (not zombie) members of a process group."""
    members = []
    with contextlib.suppress(OSError):
        for entry in _PROC.iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                raw = (entry / "stat").read_bytes()
                fields = raw[raw.rindex(b")") + 2 :].split()
                if fields[0] != b"Z" and int(fields[2]) == pgid:
                    members.append(int(entry.name))
    return sorted(members)


def processes(pgid: int, also: Iterable[int] = ()) -> list[dict[str, Any]]:
    """ProcessStat of every process of the group ``pgid`` (the machine's process), and of
    ``also`` (those that left the group: all of a VM's processes are in Fly's list). Reads
    /proc: slow on a busy host, so not on the event loop."""
    try:
        uptime_s = float((_PROC / "uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    boot_ms = int(uptime_s * 1000)  # now, in ms since boot: starttime's clock
    listening = _listening()
    out = []
    for pid in sorted({*group_of(pgid), *also}):
        with contextlib.suppress(OSError, ValueError, IndexError):
            out.append(_stat(pid, boot_ms, listening))
    return out
