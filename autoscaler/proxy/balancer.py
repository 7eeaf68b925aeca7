"""Pick a machine: least outstanding requests among two random choices, under a hard limit.

Two random choices (Mitzenmacher's "power of two") spreads load almost as well as scanning
every machine for the least loaded, without herding every new request onto the one machine
that just freed a slot, and costs O(1) random draws after the filter.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from autoscaler.control.view import Upstream


def pick(
    upstreams: Sequence[Upstream],
    hard_limit: int,
    rng: random.Random,
    exclude: Collection[Upstream] = (),
) -> Upstream | None:
    """A routable machine under ``hard_limit`` requests in flight, or None if all are full.

    ``upstreams`` are the routable machines (started, not cordoned, healthy); ``exclude``
    holds machines this request already failed on. In cluster mode a machine's requests in
    flight through the other replicas (``remote_in_flight``, as they last reported) count
    too, so the limit holds across replicas up to what they admitted since their reports.
    """
    if exclude:
        free = [
            u
            for u in upstreams
            if u.in_flight + u.remote_in_flight < hard_limit and u not in exclude
        ]
    else:
        free = [u for u in upstreams if u.in_flight + u.remote_in_flight < hard_limit]
    n = len(free)
    if n == 0:
        return None
    if n == 1:
        return free[0]
    i = rng.randrange(n)
    j = rng.randrange(n - 1)
    if j >= i:
        j += 1  # two distinct machines
    a, b = free[i], free[j]
    return a if a.in_flight + a.remote_in_flight <= b.in_flight + b.remote_in_flight else b
