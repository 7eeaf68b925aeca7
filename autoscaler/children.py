"""Child processes that die with their parent (side module: the simulator's workers, the
workers of ``run --workers`` and, elsewhere than Linux, the emulator's machines use it).

On Linux a child asks the kernel for a signal when the thread that forked it dies
(PR_SET_PDEATHSIG), so even a SIGKILLed parent leaves no child behind; elsewhere only
the check that the parent is still there is done. The signal reaches the child alone, not
what it forks: on Linux each emulator machine runs below ``emulator/supervisor.py``, which
asks for the signal itself and ends what the machine forked.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable, Collection

PR_SET_PDEATHSIG = 1

_libc: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def die_with_parent(
    parent_pid: int, sig: int = signal.SIGKILL, *, hold: Collection[int] = ()
) -> Callable[[], None]:
    """What a child runs right after the fork (safe as a ``preexec_fn``: only sigprocmask,
    prctl and getppid): ``sig`` when the parent's forking thread dies, and an exit at once
    (status 1) when the parent, ``parent_pid`` as read before the fork, has died already.
    The signals in ``hold`` are blocked first: the mask survives exec, so a signal the
    new program has no handler for yet waits for it instead of ending it."""
    held = frozenset(hold)

    def setup() -> None:
        if held:
            signal.pthread_sigmask(signal.SIG_BLOCK, held)
        if _libc is not None:
            _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return setup
