"""The parent of one machine's process: whatever that process forks ends with the machine
and with the emulator, even a SIGKILLed one.

PR_SET_PDEATHSIG, which the emulator's children ask for, reaches only them: the processes
a machine forks lived on when the emulator was SIGKILLed (orphans of init), and one that
left the machine's process group (``setsid``, as a daemon does) even outlived a plain stop.
So the emulator starts this script, which forks and execs the machine's command as its
only child, in a process group of its own, and stays:

- as the nearest subreaper (PR_SET_CHILD_SUBREAPER) it becomes the parent of every orphan
  below the machine, so each one that left the group is still found as its child;
- when the machine's process ends, it SIGKILLs what is left (the group, and each of its
  children, as they come) and exits as the machine did (the code, or the same signal);
- when the emulator dies (PR_SET_PDEATHSIG, SIGTERM here; also SIGINT and SIGHUP from
  anyone), it does the same at once.

The emulator signals the machine's group, never this process: a stop or a suspend's
SIGSTOP reaches the machine and the processes it forked, as before, and this one stays
awake to clean up even while the machine is frozen. The machine's process asks for SIGKILL
if this one dies.

It reports on the file descriptor it is given: the machine's pid once its exec succeeded
(the group id the emulator signals), or ``E`` and the errno when the exec failed.

Run as ``python -I -S supervisor.py REPORT_FD PARENT_PID -- ARGV...`` (a file, not a module
of the package: it starts in a few milliseconds and imports only the standard library).
Linux only; the emulator runs machines directly elsewhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_STOP = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_WAITED = {signal.SIGCHLD, *_STOP}


def _prctl(libc: ctypes.CDLL, option: int, value: int) -> None:
    if libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _members(me: int, group: int) -> list[int]:
    """Live processes (not zombies) that are children of ``me`` or in ``group``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
            fields = stat[stat.rindex(b")") + 2 :].split()
            if fields[0] != b"Z" and (int(fields[1]) == me or int(fields[2]) == group):
                found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue  # it ended while we looked
    return found


def _reap() -> list[tuple[int, int]]:
    """Every child that has ended, as (pid, wait status)."""
    ended: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return ended
        if pid == 0:
            return ended
        ended.append((pid, status))


def kill_all(group: int) -> None:
    """SIGKILL every process of ``group`` and every child of this one, round after round
    (a killed process's own children come to this subreaper), until none is left."""
    me = os.getpid()
    immune: set[int] = set()  # not ours to kill (a setuid program): not tried again
    while victims := [pid for pid in _members(me, group) if pid not in immune]:
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError:
                immune.add(pid)
        # Give the kills a moment to land (a SIGCHLD, or 10 ms) before the next look.
        signal.sigtimedwait({signal.SIGCHLD}, 0.01)
        _reap()
    _reap()


def _exit_as(status: int) -> None:
    """End this process the way the machine's ended: its exit code, or its signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the machine's core, not ours
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal that does not end a process: the shell's code
    os._exit(os.waitstatus_to_exitcode(status))


def _spawn(argv: list[str], mask: set[int], libc: ctypes.CDLL) -> int:
    """Fork and exec the machine's command in a process group of its own; its pid, or
    OSError when the exec failed (the child's errno)."""
    me = os.getpid()
    errors_r, errors_w = os.pipe()  # close-on-exec: end of file once the exec succeeded
    pid = os.fork()
    if pid == 0:
        try:
            os.close(errors_r)
            os.setpgid(0, 0)
            # As the emulator left them: this interpreter ignores SIGPIPE and SIGXFSZ and
            # blocks the signals it waits for, and both survive exec.
            for sig in (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != me:
                os._exit(1)
            os.execvp(argv[0], argv)  # noqa: S606 - the machine's command, as configured
        except OSError as exc:
            os.write(errors_w, str(exc.errno or 0).encode())
        finally:
            os._exit(127)
    os.close(errors_w)
    # Also here: the group exists before anyone is told the pid. EACCES: it has exec'd
    # already, after its own setpgid.
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)
    with os.fdopen(errors_r, "rb") as errors:
        failed = errors.read()
    if failed:
        os.waitpid(pid, 0)
        err = int(failed)
        raise OSError(err, os.strerror(err), argv[0])
    return pid


def main(args: list[str]) -> None:
    report_fd, parent = int(args[0]), int(args[1])
    argv = args[3:]  # after the "--"
    os.set_inheritable(report_fd, False)  # the machine never gets it
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)
    libc = ctypes.CDLL(None, use_errno=True)  # the interpreter's own libc: no lookup
    _prctl(libc, PR_SET_CHILD_SUBREAPER, 1)
    _prctl(libc, PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the emulator died before prctl took effect
        os._exit(1)
    try:
        machine = _spawn(argv, mask, libc)
    except OSError as exc:
        os.write(report_fd, f"E{exc.errno or 0}".encode())
        os._exit(127)
    os.write(report_fd, f"{machine}".encode())
    os.close(report_fd)
    status: int | None = None
    while status is None:
        if signal.sigwaitinfo(_WAITED).si_signo in _STOP:
            kill_all(machine)
            os._exit(1)
        for pid, ended in _reap():
            if pid == machine:
                status = ended
    kill_all(machine)
    _exit_as(status)


if __name__ == "__main__":
    main(sys.argv[1:])
