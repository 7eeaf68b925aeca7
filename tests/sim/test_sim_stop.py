"""`autoscaler simulate --jobs 2` stopped by a signal: at once, with one line, its worker
processes with it (sim/run.py, fork_map; sim/command.py)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autoscaler.sim import run

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# About 13 s of replays on two workers: far longer than it takes the test to stop it.
ARGV = ["simulate", "--generate", "azure-like", "--seed", "61", "--hours", "1"]
ARGV += ["--frontier", "--jobs", "2"]
DEADLINE_S = 30.0


def _group(pgid: int) -> dict[int, tuple[int, str]]:
    """Every process of process group ``pgid``, zombies too: pid -> (parent pid, start
    time)."""
    found: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        # After the name: state, ppid, pgrp, ...; the start time is the 22nd field.
        if int(fields[2]) == pgid:
            found[int(entry)] = (int(fields[1]), fields[19])
    return found


def _left(tree: dict[int, tuple[int, str]], pgid: int) -> list[int]:
    """The pids of ``tree`` (as read before) that are still the same processes, and any
    process still in the group."""
    now = _group(pgid)
    return sorted(
        {pid for pid, (_, start) in tree.items() if now.get(pid, (0, ""))[1] == start} | set(now)
    )


@contextlib.contextmanager
def _simulate(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """The CLI in a process group of its own, whatever the test does: killed whole at the
    end (a no-op when it stopped as it should)."""
    err = tmp_path / "stderr.txt"
    with err.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "autoscaler", *ARGV],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=sink,
            start_new_session=True,
        )
    try:
        yield proc, err
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _workers(proc: subprocess.Popen[bytes]) -> dict[int, tuple[int, str]]:
    """Once both workers exist: the whole process tree, by pid."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        tree = _group(proc.pid)
        if sum(1 for ppid, _ in tree.values() if ppid == proc.pid) == 2:
            return tree
        assert proc.poll() is None, f"simulate ended first ({proc.returncode})"
        time.sleep(0.02)
    raise AssertionError("the two worker processes never appeared")


@pytest.mark.parametrize(
    ("signals", "code"),
    [
        ([("main", signal.SIGTERM)], 143),
        ([("main", signal.SIGINT)], 130),
        ([("group", signal.SIGINT)], 130),  # Ctrl-C in a terminal
        ([("group", signal.SIGTERM)], 143),
        ([("main", signal.SIGINT), ("group", signal.SIGINT)], 130),  # then Ctrl-C too
        # ... once it has said it stopped: on its way out, not to end by SIGINT there.
        ([("main", signal.SIGINT), ("group-after-its-line", signal.SIGINT)], 130),
    ],
    ids=["term", "int", "ctrl-c", "term-group", "int-then-ctrl-c", "int-then-late-ctrl-c"],
)
def test_a_signal_stops_it_and_its_workers(
    tmp_path: Path, signals: list[tuple[str, signal.Signals]], code: int
) -> None:
    with _simulate(tmp_path) as (proc, err):
        tree = _workers(proc)
        assert len(tree) == 3
        for target, sig in signals:
            if target == "group-after-its-line":
                deadline = time.monotonic() + DEADLINE_S
                while not err.read_text() and time.monotonic() < deadline:
                    time.sleep(0.001)  # (not reaped meanwhile: its group is still there)
            with contextlib.suppress(ProcessLookupError):  # it may have stopped already
                if target == "main":
                    os.kill(proc.pid, sig)
                else:
                    os.killpg(proc.pid, sig)
        exited = proc.wait(timeout=DEADLINE_S)
        # Reaped by the time it exits: no process of the tree, nothing in its group.
        assert _left(tree, proc.pid) == []
        assert exited == code
        name = signals[0][1].name
        assert err.read_text().splitlines() == [f"simulate: stopped by {name}"]


def test_its_workers_die_with_it_when_it_is_killed(tmp_path: Path) -> None:
    with _simulate(tmp_path) as (proc, _):
        tree = _workers(proc)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=DEADLINE_S) == -signal.SIGKILL
        # The kernel kills them (PR_SET_PDEATHSIG) and init reaps them: awaited.
        deadline = time.monotonic() + DEADLINE_S
        while _left(tree, proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _left(tree, proc.pid) == []


def test_a_worker_killed_alone_ends_it_with_one_line(tmp_path: Path) -> None:
    """Out of memory, or an operator's kill: the other worker is killed and reaped, and
    the command says which worker ended (it was a RuntimeError's traceback)."""
    with _simulate(tmp_path) as (proc, err):
        tree = _workers(proc)
        worker = min(pid for pid, (ppid, _) in tree.items() if ppid == proc.pid)
        os.kill(worker, signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE_S) == 1
        assert _left(tree, proc.pid) == []
        assert err.read_text().splitlines() == [
            f"simulate: a worker process (pid {worker}) ended with exit code -15"
        ]


def _double(shared: int, task: int) -> int:
    return shared * task


@pytest.mark.parametrize("tasks", [[1, 2], [1]], ids=["before-its-next-task", "at-the-end"])
def test_a_worker_killed_after_its_answer_is_a_worker_that_died(
    monkeypatch: pytest.MonkeyPatch, tasks: list[int]
) -> None:
    """Killed between an answer and its next task (or the end's "no more"), the worker's
    pipe was shut when the task went to it: a bare BrokenPipeError, which the command
    turned into exit 1 without a word (seen once in CI, on the compiled build)."""
    real_wait = run.wait
    killed: list[int] = []

    def wait_then_kill(conns: Any) -> Any:
        ready = real_wait(conns)
        if not killed:
            (worker,) = multiprocessing.active_children()
            assert worker.pid is not None
            os.kill(worker.pid, signal.SIGKILL)
            worker.join()  # dead, its answer still in the pipe
            killed.append(worker.pid)
        return ready

    monkeypatch.setattr(run, "wait", wait_then_kill)
    with pytest.raises(run.WorkerDied, match="ended with exit code -9"):
        run.fork_map(_double, 3, tasks, jobs=1)
    assert multiprocessing.active_children() == []


def test_a_worker_killed_with_its_next_task_unread_is_a_worker_that_died(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Killed with a task sent to it and not yet read, the worker's end of the pipe was
    reset rather than closed: the answer's read raised ConnectionResetError, and the
    command ended with its traceback (test_a_worker_killed_alone_ends_it_with_one_line,
    now and then)."""
    real_wait = run.wait
    calls: list[int] = []

    def stop_then_kill(conns: Any) -> Any:
        (worker,) = multiprocessing.active_children()
        assert worker.pid is not None
        calls.append(worker.pid)
        if len(calls) == 1:
            ready = real_wait(conns)
            # Its first answer is in: held still, it reads no other task...
            os.kill(worker.pid, signal.SIGSTOP)
            return ready
        # ... and dies with the second one unread, its answer awaited.
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        return real_wait(conns)

    monkeypatch.setattr(run, "wait", stop_then_kill)
    with pytest.raises(run.WorkerDied, match="ended with exit code -9"):
        run.fork_map(_double, 3, [1, 2], jobs=1)
    assert multiprocessing.active_children() == []
