"""The Lua scripts of every round go to Redis by their digest (EVALSHA), not whole (EVAL),
and a Redis that lost them (SCRIPT FLUSH, a restart) fails no round: the call that finds
a script missing runs it again whole, which loads it, and the next round goes by digest
again. Against a redis-server of the test's own, whose command counts it reads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from autoscaler.state.cluster import AppLoad, Cluster

from .conftest import RedisServer
from .test_reports import Clock, member

APP = "app"

pytestmark = pytest.mark.usefixtures("reports_outlive_any_stall")


@dataclass
class Trio:
    leader: Cluster
    follower: Cluster
    clock: Clock
    url: str
    prefix: str

    def member(self, rid: str) -> Cluster:
        return member(self.url, self.prefix, rid, self.clock)


@pytest.fixture
async def trio(own_redis: RedisServer, key_prefix: str) -> AsyncIterator[Trio]:
    """A leader and a follower, and a member that died (its id in ``gone_key``, which
    every read reads with a script)."""
    clock = Clock()
    leader, follower = (member(own_redis.url, key_prefix, r, clock) for r in ("lead", "follow"))
    t = Trio(leader, follower, clock, own_redis.url, key_prefix)
    try:
        died = t.member("died")
        await died.publish({}, None)
        await died.redis.aclose()
        assert await leader.lease.step()
        await follower.read()
        await follower.redis.delete(follower.report_key("died"))  # its TTL ran out
        await follower.read()  # unlists it: "died" goes into gone_key
        assert follower.gone == {"died": clock.now}
        yield t
    finally:
        for c in (leader, follower):
            await c.close()


async def a_round(t: Trio) -> None:
    """One round of each: reports written and read, the lease renewed, a fenced call's
    check, and a follower's wake (its claim taken, checked, renewed, released)."""
    t.clock.now += 0.25
    load = {APP: AppLoad(area=t.clock.now, level=1, in_flight=1, at=t.clock.now)}
    await t.leader.publish(load, None)
    await t.follower.publish(load, None)
    assert set(await t.follower.read()) == {"lead"}
    assert t.follower.leader_id == "lead"
    assert await t.leader.lease.step()
    assert await t.leader.lease.check()
    claim = await t.follower.claims.take(APP)
    assert claim is not None
    assert await claim.check()
    assert await claim.renew()
    await claim.release()
    assert await t.follower.claims.holder_of(APP) is None


async def calls(redis: Any) -> dict[str, int]:
    """EVAL and EVALSHA calls since the last ``CONFIG RESETSTAT``."""
    stats = await redis.info("commandstats")
    return {c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("eval", "evalsha")}


async def test_every_round_runs_its_scripts_by_digest(trio: Trio) -> None:
    """Before, each round sent each script's body with EVAL (the follower's ``gone`` read
    four times a second, the lease's renewals, every fenced call's check)."""
    await a_round(trio)  # the first run of each script may load it
    await trio.leader.redis.config_resetstat()
    rounds = 10
    for _ in range(rounds):
        await a_round(trio)
    # Per round: the gone read, the renewal, the lease check, the claim's four.
    assert await calls(trio.leader.redis) == {"eval": 0, "evalsha": 7 * rounds}


async def test_a_round_after_redis_lost_its_scripts_runs_them_whole_once(trio: Trio) -> None:
    """SCRIPT FLUSH between rounds (as a Redis restart or failover loses its script cache):
    each script's next call is answered NOSCRIPT, which fails no round: the call runs
    again whole, in the read pipeline too, where the ``gone`` read still answers (a
    member that joins now reads the dead replica gone), and the next round is by digest
    again."""
    await a_round(trio)
    redis = trio.leader.redis
    await redis.script_flush()
    await redis.config_resetstat()
    late = trio.member("late")
    try:
        # The read pipeline's gone read finds its script missing, and still answers.
        assert set(await late.read()) == {"lead", "follow"}
        assert late.gone == {"died": trio.clock.now}
        await a_round(trio)
        # Each of the 7 scripts found missing once and run whole (which loads it): the
        # follower's gone read, after the late member's, went by digest.
        assert await calls(redis) == {"eval": 7, "evalsha": 8}
        await redis.config_resetstat()
        await a_round(trio)
        assert await calls(redis) == {"eval": 0, "evalsha": 7}
    finally:
        await late.close()


async def test_a_round_after_redis_restarted_empty_works(
    own_redis: RedisServer, trio: Trio
) -> None:
    """Redis restarted (nothing kept: its data and scripts gone). The round that meets
    the dropped connections fails, as before (here they are dropped first); the next one
    works, scripts and all: the leader takes the lease anew, the follower reads it."""
    await a_round(trio)
    own_redis.stop()
    own_redis.start()
    for c in (trio.leader, trio.follower):
        await c.redis.connection_pool.disconnect()
    assert not await trio.leader.lease.step()  # the renewal finds the lease gone
    assert await trio.leader.lease.step()  # taken anew
    await a_round(trio)
