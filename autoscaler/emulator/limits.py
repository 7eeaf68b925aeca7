"""Fly's documented rate limits, as token buckets keyed by (action, machine or app).

"Machines API rate limits apply per-action, per-machine and are scoped per identifier.
That might be Machine ID or App ID, depending on the type of request": 1 request/s with
bursts up to 3/s; Get Machine 5/s with bursts up to 10/s. "Additionally, app deletions
are limited to 100 per minute": not per app (each app is deleted once, so a bucket per app
would never hold), one bucket for the organization. The clock is injectable for tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

# action (the seed's operationId) → (tokens per second, burst)
_DEFAULT_RATE = (1.0, 3.0)
_RATES: dict[str, tuple[float, float]] = {
    "getMachine": (5.0, 10.0),
    "deleteApp": (100.0 / 60.0, 100.0),
    # Reads that are not per machine are not documented; be as generous as Get Machine.
    "listMachines": (5.0, 10.0),
    "listApps": (5.0, 10.0),
    "getApp": (5.0, 10.0),
    "listVolumes": (5.0, 10.0),
    "getVolume": (5.0, 10.0),
}


def bucket_key(action: str, org: str, app: str | None, resource: str | None) -> str:
    """The identifier a call's bucket is scoped to: the machine (or volume), within its app
    (Fly's machine ids are unique across apps, the emulator's path names both, as the
    client's buckets do); else the app; app deletions and calls without an app (list and
    create apps) the organization."""
    if action == "deleteApp" or app is None:
        return org
    return f"{app}/{resource}" if resource else app


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def take(self, action: str, key: str) -> float:
        """0 when allowed; otherwise the seconds until a token is there (for Retry-After)."""
        rate, burst = _RATES.get(action, _DEFAULT_RATE)
        now = self._clock()
        bucket = self._buckets.get((action, key))
        if bucket is None:
            bucket = self._buckets[(action, key)] = _Bucket(burst, now)
            if len(self._buckets) > 100_000:  # a fuzzer's random ids must not grow this forever
                self._buckets.clear()
                self._buckets[(action, key)] = bucket
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate


def retry_after(seconds: float) -> str:
    """Retry-After takes whole seconds; round up so a client that obeys it succeeds."""
    return str(max(1, math.ceil(seconds)))
