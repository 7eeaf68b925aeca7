"""How long a stop takes for a task that sends Redis commands in a loop: cluster mode's
client against one with redis-py's own socket timeout (the client before), same run, same
redis-server.

    .venv/bin/python benchmarks/redis_cancel.py [--stops 300]

Starts redis-server on a free loopback port (no persistence; reaped at the end). For each
client, ``--stops`` times: start a task that sends EVAL in a loop, let 3 commands through,
then stop it as the service stops its tasks (``autoscaler.aio.cancel_and_wait``: cancel,
and cancel again every 50 ms until the task ends). Prints the stops' median, 99th
percentile and longest, and how many tasks ended at the first cancellation. On Python 3.11
redis-py's socket timeout sends each command under ``asyncio.wait_for``, which drops a
cancellation that comes as the send ends (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from cluster import redis_server  # benchmarks/cluster.py

from autoscaler.aio import cancel_and_wait
from autoscaler.state.cluster import connect

INCR = "return redis.call('INCR', KEYS[1])"
TTL_S = 3.0


def socket_timeout_client(url: str) -> Any:
    """The client before: the same bound (a third of the TTL) as redis-py's socket timeout."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    timeout = TTL_S / 3
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


async def commands(redis: Any, going: asyncio.Event) -> None:
    """EVAL in a loop; ``going`` is set once 3 went through."""
    sent = 0
    while True:
        await redis.eval(INCR, 1, "bench:k")
        sent += 1
        if sent == 3:
            going.set()


async def stops(redis: Any, count: int) -> tuple[list[float], int]:
    """Each stop's seconds, and how many ended at the first cancellation."""
    took: list[float] = []
    first = 0
    for _ in range(count):
        going = asyncio.Event()
        task = asyncio.create_task(commands(redis, going))
        await going.wait()
        t0 = time.monotonic()
        task.cancel()
        await asyncio.wait([task], timeout=0.05)
        first += task.done()
        await cancel_and_wait([task], again_s=0.05)
        took.append(time.monotonic() - t0)
    await redis.aclose()
    return sorted(took), first


async def main(url: str, count: int) -> None:
    for name, client in (
        ("cluster mode's client", connect(url, TTL_S)),
        ("redis-py socket timeout", socket_timeout_client(url)),
    ):
        took, first = await stops(client, count)
        print(
            f"{name:<24} {count} stops: median {took[len(took) // 2] * 1000:.1f} ms,"
            f" p99 {took[int(len(took) * 0.99)] * 1000:.1f} ms,"
            f" longest {took[-1] * 1000:.1f} ms; ended at the first cancellation: {first}"
        )


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stops", type=int, default=300)
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    with redis_server() as url:
        asyncio.run(main(url, args.stops))
