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
    holds machines this request already failed on. A machine whose probe is under way
    (``Upstream.probing``) takes no other request meanwhile. In cluster mode a machine's requests in
    flight through the other replicas (``remote_in_flight``, as they last reported) count
    too, and this replica keeps to its ``share`` of the limit (at least one request): the
    shares of all replicas add up to the limit, so it holds across replicas however short
    the requests are next to the reports' interval.
    """
    if exclude:
        free = [u for u in upstreams if _free(u, hard_limit) and u not in exclude]
    else:
        free = [u for u in upstreams if _free(u, hard_limit)]
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


def _free(u: Upstream, hard_limit: int) -> bool:
    if u.probing:
        return False  # on trial: one request tries it first (``Upstream.trial``)
    n = u.in_flight
    if n + u.remote_in_flight >= hard_limit:
        return False
    # Under max(1, floor(hard_limit x share)); 1e-9: a share of 1/3 times 3 is not < 1.
    return n == 0 or n + 1 <= hard_limit * u.share + 1e-9
