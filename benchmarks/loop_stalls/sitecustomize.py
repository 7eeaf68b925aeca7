"""A stall sampler for `autoscaler run`, loaded through PYTHONPATH (docs/benchmarks.md,
"Many apps", second round):

    LOOP_STALLS_OUT=/tmp/stalls PYTHONPATH=benchmarks/loop_stalls \\
        .venv/bin/python benchmarks/control_plane.py

In every process whose command line has ``run`` and that runs its loop with ``uvloop.run``
(the service does when uvloop is installed), a task beats every 1 ms, and a thread records
each time the beat is more than 2 ms late: when, for how long, and the main thread's stack
when first seen (usually the work that holds the loop; the loop's own C code when the
kernel took the process off the CPU). Every garbage collection's duration is recorded
too. At exit it writes JSON to ``$LOOP_STALLS_OUT.<pid>``: ``stalls`` as [seconds since
start, milliseconds late, stack], ``gc`` as [generation, milliseconds, seconds since
start], and ``end``. The beat and the thread cost CPU and switch the GIL every 0.5 ms: use
the figures to find what stalls, not as latencies.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Coroutine
from typing import Any

LATE_S = 0.002


def _install(out: str) -> None:
    import uvloop

    sys.setswitchinterval(0.0005)
    t0 = time.perf_counter()
    beat = [t0]
    stalls: list[tuple[float, float, str]] = []
    collections: list[tuple[int, float, float]] = []
    gc_start = [0.0]
    main = threading.get_ident()

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase == "start":
            gc_start[0] = now
        else:
            ms = (now - gc_start[0]) * 1000
            collections.append((info["generation"], round(ms, 2), round(now - t0, 2)))

    def watch() -> None:
        while True:
            time.sleep(0.0005)
            last = beat[0]
            if time.perf_counter() - last <= LATE_S:
                continue
            frame = sys._current_frames().get(main)
            stack = traceback.extract_stack(frame)[-7:] if frame is not None else []
            where = " <- ".join(f"{os.path.basename(f.filename)}:{f.name}" for f in stack[::-1])
            while beat[0] == last:
                time.sleep(0.0002)
            stalls.append((round(last - t0, 3), round((beat[0] - last) * 1000, 2), where))

    def dump() -> None:
        doc = {"stalls": stalls, "gc": collections, "end": time.perf_counter() - t0}
        with open(f"{out}.{os.getpid()}", "w") as fh:
            json.dump(doc, fh)

    async def beating(main_coro: Coroutine[Any, Any, Any]) -> Any:
        async def beats() -> None:
            while True:
                beat[0] = time.perf_counter()
                await asyncio.sleep(0.001)

        task = asyncio.get_running_loop().create_task(beats())
        try:
            return await main_coro
        finally:
            task.cancel()

    run = uvloop.run

    def run_beating(main_coro: Coroutine[Any, Any, Any], **kw: Any) -> Any:
        return run(beating(main_coro), **kw)

    gc.callbacks.append(on_gc)
    atexit.register(dump)
    threading.Thread(target=watch, daemon=True).start()
    uvloop.run = run_beating  # type: ignore[assignment]


if "run" in sys.argv and os.environ.get("LOOP_STALLS_OUT"):
    _install(os.environ["LOOP_STALLS_OUT"])
