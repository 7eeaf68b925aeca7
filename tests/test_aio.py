"""cancel_and_wait: a task that drops a cancellation is cancelled again until it ends."""

from __future__ import annotations

import asyncio
import contextlib

from autoscaler.aio import cancel_and_wait


async def test_a_task_that_drops_a_cancellation_is_cancelled_again() -> None:
    dropped = 0

    async def stubborn() -> None:
        nonlocal dropped
        while True:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)  # as wait_for on 3.11 does when its work ends at once
                return
            dropped += 1
            if dropped == 3:
                await asyncio.sleep(30)  # the fourth cancellation ends it

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(10):
        await cancel_and_wait([task], again_s=0.01)
    assert task.cancelled()
    assert dropped == 3


async def test_ended_and_failed_tasks_are_left_as_they_are() -> None:
    async def fails() -> None:
        raise ValueError("before the stop")

    done = asyncio.create_task(asyncio.sleep(0))
    failed = asyncio.create_task(fails())
    await asyncio.wait([done, failed])
    await cancel_and_wait([done, failed])  # retrieves the error: no "never retrieved"
    assert done.result() is None
    assert isinstance(failed.exception(), ValueError)
