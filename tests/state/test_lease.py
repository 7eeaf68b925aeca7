"""Leader election against a real redis-server: one leader, failover, fencing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from control.fakes import FakeMachinesAPI

from autoscaler.control.fencing import Fenced, FencedAPI
from autoscaler.state.cluster import connect
from autoscaler.state.lease import Lease
from state.test_self_wake import _LostReplies

TTL = 0.6


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def client(url: str) -> Any:
    return connect(url, TTL)


@pytest.fixture
async def leases(redis_server: str, key_prefix: str) -> Any:
    made = [Lease(client(redis_server), key_prefix, f"r{i}", TTL) for i in range(3)]
    yield made
    for lease in made:
        await lease.redis.aclose()


async def test_exactly_one_of_three_leads(leases: list[Lease]) -> None:
    results = await asyncio.gather(*(lease.step() for lease in leases))
    assert sorted(results) == [False, False, True]
    (leader,) = [lease for lease in leases if lease.held()]
    assert await leader.leader() == leader.replica_id
    # Renewing keeps it, and the others still cannot take it.
    for _ in range(3):
        assert await leader.step()
        assert not any([await lease.step() for lease in leases if lease is not leader])
    assert await leader.check()
    assert not any([await lease.check() for lease in leases if lease is not leader])


async def test_a_silent_leader_is_replaced_within_two_ttls(leases: list[Lease]) -> None:
    first = leases[0]
    assert await first.step()
    old_token = first.token
    await first.redis.aclose()  # the leader dies: no renewal, its connection gone
    loop = asyncio.get_running_loop()
    died = loop.time()
    new: Lease | None = None
    while new is None:
        assert loop.time() - died < 2 * TTL, "no new leader within 2 x lease_ttl_s"
        for lease in leases[1:]:
            if await lease.step():
                new = lease
        await asyncio.sleep(TTL / 10)
    assert new.token is not None
    assert old_token is not None
    assert new.token > old_token
    assert await new.leader() == new.replica_id


async def test_a_stale_token_sends_no_action(redis_server: str, key_prefix: str) -> None:
    clock = Clock()
    old = Lease(client(redis_server), key_prefix, "old", TTL, clock=clock)
    new = Lease(client(redis_server), key_prefix, "new", TTL)
    api = FakeMachinesAPI()
    mid = api.add("web", "stopped")
    fenced = FencedAPI(api, old.check)
    try:
        assert await old.step()
        await fenced.start_machine("web", mid)  # while it leads: sent
        assert api.ops("start_machine") == [mid]
        api.set("web", mid, state="stopped")
        # Its lease expires in Redis while its own clock says it still has time (a pause,
        # a slow clock): the new leader's token makes the old one stale.
        await old.redis.delete(old.key)
        assert await new.step()
        assert old.held()  # locally it still believes it leads...
        with pytest.raises(Fenced):
            await fenced.start_machine("web", mid)  # ...but the fence stops the action
        with pytest.raises(Fenced):
            await fenced.suspend_machine("web", mid)
        assert api.ops("start_machine") == [mid]
        assert api.ops("suspend_machine") == []
        assert fenced.refused == 2
        assert not await old.step()  # and its next renewal finds out
        await fenced.list_machines("web")  # reads are never fenced
    finally:
        await old.redis.aclose()
        await new.redis.aclose()


async def test_a_leader_that_loses_redis_stops_at_its_deadline(
    redis_server: str, key_prefix: str
) -> None:
    clock = Clock()
    lease = Lease(client(redis_server), key_prefix, "r0", TTL, clock=clock)
    assert await lease.step()
    await lease.redis.aclose()
    # Redis out of reach: nothing on port 1 of loopback listens.
    lease.redis = connect("redis://127.0.0.1:1/0", TTL)
    clock.t += TTL / 3
    with pytest.raises(Exception, match=r"(?i)connect"):
        await lease.step()
    assert lease.held()  # within its deadline: still leads, but may not act
    assert not await lease.check()
    clock.t += TTL
    with pytest.raises(Exception, match=r"(?i)connect"):
        await lease.step()
    assert not lease.held()
    assert lease.token is None
    await lease.redis.aclose()


async def test_release_hands_over_without_waiting(leases: list[Lease]) -> None:
    first, second, _ = leases
    assert await first.step()
    assert not await second.step()
    await first.release()
    assert not first.held()
    assert await second.step()


async def test_a_take_whose_reply_was_lost_is_recognised_by_its_retry(
    redis_server: str, key_prefix: str
) -> None:
    """The take of the lease ran in Redis, but its reply was lost (the connection dropped,
    our command timeout fired): the replica did not know it led while Redis named it, so
    its retry (and everyone else's take) found the lease taken, and no replica led until
    the TTL ended."""
    ttl = 30.0  # longer than the test: only the retry's recognition can end the wait
    first = Lease(connect(redis_server, ttl), key_prefix, "r0", ttl)
    other = Lease(connect(redis_server, ttl), key_prefix, "r1", ttl)
    client = first.redis
    try:
        first.redis = _LostReplies(client, first.key)
        with pytest.raises(redis.exceptions.ConnectionError):
            await first.step()
        assert not first.held()
        assert await first.leader() == "r0"  # Redis holds it for us
        assert not await other.step()
        assert await first.step()  # the retry finds its own lease
        assert first.token == int(await client.get(first.fence_key))
        assert await first.check()
        assert await first.step()  # and renews it
        await first.release()
        assert await first.leader() is None
        # Another replica's lease is never taken for ours, nor an earlier one of ours.
        assert await other.step()
        assert not await first.step()
        assert await other.check()
    finally:
        await client.aclose()
        await other.redis.aclose()


async def test_a_lease_that_lapsed_here_while_redis_kept_it_is_taken_back(
    redis_server: str, key_prefix: str
) -> None:
    """The leader's renewals reached Redis but their replies were lost until its local
    deadline passed: it stopped leading, while Redis named it for up to a TTL more. Its
    next take gets that lease back rather than waiting, leaderless, for it to expire."""
    clock = Clock()
    ttl = 30.0
    lease = Lease(connect(redis_server, ttl), key_prefix, "r0", ttl, clock=clock)
    client = lease.redis
    try:
        assert await lease.step()
        token = lease.token
        lease.redis = _LostReplies(client, lease.key)
        clock.t += ttl  # past the local deadline: the lease lapses here
        with pytest.raises(redis.exceptions.ConnectionError):
            await lease.step()
        assert not lease.held()
        assert await lease.leader() == "r0"
        assert await lease.step()
        assert lease.token == token
        assert await lease.check()
    finally:
        await client.aclose()
