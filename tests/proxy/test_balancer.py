"""Two random choices under a hard limit, as pure functions."""

from __future__ import annotations

import random
from collections import Counter

from autoscaler.control.view import Upstream
from autoscaler.proxy.balancer import pick


def ups(*loads: int) -> list[Upstream]:
    out = []
    for i, load in enumerate(loads):
        up = Upstream(f"m{i}", "127.0.0.1", 8000 + i)
        up.in_flight = load
        out.append(up)
    return out


def test_the_most_loaded_machine_never_wins_two_choices() -> None:
    machines = ups(0, 5, 10)
    rng = random.Random(1)  # noqa: S311 - seeded for a repeatable test
    counts = Counter(pick(machines, 100, rng).id for _ in range(300))  # type: ignore[union-attr]
    assert counts["m2"] == 0
    assert counts["m0"] > counts["m1"] > 0  # m0 wins every pair it is in


def test_hard_limit_and_exclusions() -> None:
    machines = ups(3, 1, 2)
    rng = random.Random(2)  # noqa: S311 - seeded for a repeatable test
    assert pick(machines, 3, rng, exclude=(machines[1],)) is machines[2]
    assert pick(machines, 1, rng) is None  # every machine at or over its limit
    assert pick([], 10, rng) is None
    assert pick(machines[:1], 10, rng) is machines[0]
