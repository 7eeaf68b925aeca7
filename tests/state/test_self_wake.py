"""Wake claims against a real redis-server: one wake per app across replicas, with a
fencing token; followers that no leader serves wake by themselves, once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from control.fakes import FakeMachinesAPI, settle
from structlog.testing import capture_logs
from testkit import until

from autoscaler.control.fencing import WAKE_FENCE, Fenced, FencedAPI
from autoscaler.control.wake import WakeError
from autoscaler.fly.models import CheckStatus
from autoscaler.state.claim import WakeClaims
from state.test_replica import APP, TTL, make, rounds, wakes


async def test_one_claim_per_app_with_a_growing_token(redis_server: str, key_prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_server, decode_responses=True)
    try:
        a = WakeClaims(client, key_prefix, "a", 5.0)
        b = WakeClaims(client, key_prefix, "b", 5.0)
        first = await a.take(APP)
        assert first is not None
        assert first.previous == ""
        assert await b.take(APP) is None  # taken: b waits for a's machine
        assert await b.take("other") is not None  # per app
        assert await first.check()
        assert await a.holder_of(APP) == "a"
        await first.release()
        assert not await first.check()
        second = await b.take(APP)
        assert second is not None
        assert second.token > first.token
        assert second.previous == "a"  # b knows someone else woke the app last
        await client.delete(second.key)  # the claim expired (or was stolen)
        assert not await second.check()  # its actions are not sent
        assert not await second.renew()
        # A claimant that hung past its local deadline acts no more, even though Redis
        # still names it (the key outlives the local deadline).
        now = [0.0]
        hung = WakeClaims(client, key_prefix, "h", 5.0, clock=lambda: now[0])
        third = await hung.take("third")
        assert third is not None
        assert await third.check()
        now[0] = 4.6  # past 0.9 x 5 s
        assert await hung.holder_of("third") == "h"
        assert not await third.check()
    finally:
        await client.aclose()


async def test_a_wake_is_fenced_by_its_claim_not_by_the_lease() -> None:
    api = FakeMachinesAPI()
    mid = api.add(APP, "stopped")

    async def no() -> bool:
        return False

    async def yes() -> bool:
        return True

    fenced = FencedAPI(api, no)  # a follower: no lease
    with pytest.raises(Fenced):
        await fenced.start_machine(APP, mid)
    token = WAKE_FENCE.set(yes)  # ... but the app's wake claim
    try:
        await fenced.start_machine(APP, mid)
        # Tasks the wake starts copy its context: their calls are fenced by the claim too.
        await asyncio.get_running_loop().create_task(fenced.stop_machine(APP, mid))
    finally:
        WAKE_FENCE.reset(token)
    assert api.ops("start_machine") == [mid]
    assert api.ops("stop_machine") == [mid]
    with pytest.raises(Fenced):  # outside the wake: the lease again
        await fenced.start_machine(APP, mid)
    assert fenced.refused == 2


async def test_followers_without_a_leader_wake_once(redis_server: str, key_prefix: str) -> None:
    api = FakeMachinesAPI()
    api.add(APP, "stopped")
    api.add(APP, "stopped")
    # Two followers and no leader (no round ever runs, so none is elected): each holds a
    # request for the sleeping app.
    followers = [
        make(redis_server, key_prefix, f"f{i}", api, self_wake_after_s=0.05) for i in range(2)
    ]
    for r in followers:
        await r.start(rounds=False)
    try:
        # The first start waits until the other follower has found the claim taken: both
        # are then past the point where, without the claim, each would start a machine.
        api.gates["start_machine"] = gate = asyncio.Event()
        for r in followers:
            r.view.app(APP).hold()  # a request held (a wake for nobody wakes nothing)
        wakes = [r.view.wake(APP) for r in followers]

        loop = asyncio.get_running_loop()
        since = loop.time()
        while not (api.ops("start_machine") and any(r.claim_waits for r in followers)):
            assert loop.time() - since < 10, "the claim was never contended"
            await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*wakes), 10)
        # One replica won the claim and started a machine; the other waited for the
        # claim, read the API under it and found that machine up: its request waited
        # for that start all the same (it said "none", as if a machine had been up).
        assert results == ["start", "start"]
        (started,) = api.ops("start_machine")
        assert started in api.machines[APP]
        for r in followers:
            assert [u.id for u in r.view.app(APP).routable()] == [started]
        assert sum(r.self_wakes for r in followers) == 2
        assert all(r.status_document()["self_wakes"] == 1 for r in followers)
    finally:
        for r in followers:
            await r.stop()


async def test_without_redis_a_follower_refuses_to_wake(own_redis: Any, key_prefix: str) -> None:
    """Redis down: nothing can prove a wake is the only one, so none is sent; the held
    request fails after its wake timeout. Redis back within it: the wake goes, once."""
    api = FakeMachinesAPI()
    api.add(APP, "stopped")
    replica = make(own_redis.url, key_prefix, "f", api, self_wake_after_s=0.05, wake_timeout_s=1)
    await replica.start(rounds=False)
    replica.view.app(APP).hold()  # a request held (a wake for nobody wakes nothing)
    try:
        own_redis.stop()
        with pytest.raises(WakeError):
            await asyncio.wait_for(replica.view.wake(APP), 10)
        assert replica.claim_errors >= 1
        assert api.ops("start_machine") == []
        assert replica.status_document()["redis_ok"] is False
        # A wake under way when Redis returns takes the claim and wakes (this one may wait
        # for as long as Redis takes to come back).
        rt = replica.controller.apps[APP]
        rt.reconfigure(rt.config.model_copy(update={"wake_timeout_s": 30.0}))
        wake = replica.view.wake(APP)
        loop = asyncio.get_running_loop()
        since = loop.time()
        tried = replica.claim_errors
        while replica.claim_errors == tried:  # it tried (and failed) once more
            assert loop.time() - since < 10, "no claim was tried"
            await asyncio.sleep(0.01)
        own_redis.start()
        assert await asyncio.wait_for(wake, 10) == "start"
        assert len(api.ops("start_machine")) == 1
    finally:
        await replica.stop()


async def test_a_leaders_tick_leaves_the_wake_to_the_replica_holding_the_claim(
    redis_server: str, key_prefix: str
) -> None:
    """A follower that could not reach the leader wakes the app by itself, under the
    app's claim. The leader's tick, deciding on the same held load meanwhile, starts no
    machine of its own; with the claim free, its wake takes it (Redis remembers the
    leader as its last holder) and every start of that tick goes."""
    api = FakeMachinesAPI()
    api.add(APP, "stopped")
    api.add(APP, "stopped")
    # The loop's first tick at once (not at a random point of its first 60 s, which now
    # and then fell among the ticks below and yielded two wakes more), the next 60 s on.
    leader = make(redis_server, key_prefix, "l", api, rng=lambda: 0.0)
    await leader.start(rounds=False)
    try:
        await rounds([leader], lambda: leader.leading, 2 * TTL)
        rt = leader.controller.apps[APP]
        await rounds([leader], lambda: rt.last_decision_at is not None, 2 * TTL)
        await leader.controller.tick(APP)  # reads the machines
        follower = WakeClaims(leader.cluster.redis, key_prefix, "f", 5.0)
        claim = await follower.take(APP)
        assert claim is not None
        # 12 requests held, target_concurrency 2: the two machines there are wanted as long
        # as the requests were held for a sixth of the load window's time so far (its
        # first sample was at the leader's start). With 4 (half of it), a loaded machine's
        # slower set-up above left the average at 1.3: one start.
        for _ in range(12):
            leader.view.app(APP).hold()
        for _ in range(3):
            await leader.round()
            await asyncio.sleep(0.05)
        decision = await leader.controller.tick(APP)
        assert [a.kind for a in decision.actions] == ["start", "start"]
        await leader.controller.idle()
        assert api.ops("start_machine") == []
        assert leader.tick_wakes_yielded == 2
        assert leader.status_document()["tick_wakes_yielded"] == 2
        await claim.release()
        decision = await leader.controller.tick(APP)
        assert [a.kind for a in decision.actions] == ["start", "start"]
        await leader.controller.idle()
        assert sorted(api.ops("start_machine")) == sorted(api.machines[APP])
        assert leader.tick_wakes_yielded == 2
        again = await follower.take(APP)
        assert again is not None
        assert again.previous == "l"  # the tick's wake ran under the claim
        await again.release()
    finally:
        await leader.stop()


async def _requests_every_half_second(
    replica: Any, api: FakeMachinesAPI, count: int
) -> tuple[list[str], list[str]]:
    """``count`` requests through a gate, one every 0.5 s: how each ended, and the
    machines started meanwhile."""
    import random

    from autoscaler.proxy.gate import Gate, HoldTimeout

    config = replica.settings.apps[0]
    rng = random.Random(0)  # noqa: S311 - balancing, not secrets
    gate = Gate(config, replica.view, replica.metrics, rng)
    results: list[str] = []

    async def request() -> None:
        try:
            await gate.acquire(config.wake_timeout_s)
            results.append("served")
        except HoldTimeout:
            results.append("504")

    try:
        tasks = []
        for _ in range(count):
            tasks.append(asyncio.create_task(request()))
            await asyncio.sleep(0.5)
        await asyncio.gather(*tasks)
    finally:
        await gate.close()
    return results, [str(mid) for mid in api.ops("start_machine")]


async def test_a_wake_timeout_shorter_than_self_wake_after_s_still_self_wakes(
    redis_server: str, key_prefix: str
) -> None:
    """Each wake counted self_wake_after_s (2 s) from its own start and gave up at its
    timeout (1.5 s): with no leader, every request got 504 and nothing was ever woken."""
    api = FakeMachinesAPI()
    api.add(APP, "stopped")
    follower = make(
        redis_server, key_prefix, "f", api, self_wake_after_s=2.0, wake_timeout_s=1.5, lead=False
    )
    await follower.start(rounds=False)
    try:
        results, starts = await _requests_every_half_second(follower, api, 6)
    finally:
        await follower.stop()
    assert starts
    assert "served" in results


async def test_a_follower_wakes_nothing_once_its_held_requests_left(
    redis_server: str, key_prefix: str
) -> None:
    import random

    from autoscaler.proxy.gate import Gate, HoldTimeout

    api = FakeMachinesAPI()
    api.add(APP, "stopped")
    follower = make(redis_server, key_prefix, "f", api, self_wake_after_s=1.0, lead=False)
    await follower.start(rounds=False)
    rng = random.Random(0)  # noqa: S311 - balancing, not secrets
    gate = Gate(follower.settings.apps[0], follower.view, follower.metrics, rng)
    try:
        with capture_logs() as logs:
            with pytest.raises(HoldTimeout):
                await gate.acquire(0.2)  # the client gives up long before the self-wake
            assert follower.view.app(APP).queued == 0
            # Past self_wake_after_s the wake ends: cut short, not failed (it was counted
            # failed and logged as wake_failed, which the alerts on failed wakes read).
            await until(lambda: wakes(follower, "cancelled") + wakes(follower, "failed") > 0)
        assert wakes(follower, "cancelled") == 1
        assert api.ops("start_machine") == []
        assert follower.self_wakes == 0
        assert wakes(follower, "failed") == 0
        assert not [e for e in logs if e["event"] == "wake_failed"]
    finally:
        await gate.close()
        await follower.stop()


async def test_claim_tokens_grow_across_a_redis_that_came_back_empty(
    own_redis: Any, key_prefix: str
) -> None:
    """Redis came back empty (restarted without persistence, a failover to an empty
    replica): ``{prefix}:wake-fence`` started again from 1. A claim taken after the loss
    got a token below those taken before it, and its holder got a claim value it had held
    already: its claim from before the loss, never released, passed the check again."""
    client = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        before = await WakeClaims(client, key_prefix, "a", 5.0).take(APP)
        assert before is not None
        own_redis.stop()
        own_redis.start()  # back, empty
        await client.connection_pool.disconnect()
        after = await WakeClaims(client, key_prefix, "a", 5.0).take(APP)
        assert after is not None
        assert not await before.check()  # the claim from before the loss is not ours now
        assert after.token > before.token
        assert await after.check()
    finally:
        await client.aclose()


class _LostReplies:
    """A Redis client whose next ``lost`` scripts on a claim's key (EVALSHA, as the claims
    send them, or EVAL) run in Redis but answer the caller with an error, as when the
    connection drops (or our command timeout fires) after Redis ran the script and before
    its reply came (``ran=False``: the connection dropped before Redis had the command)."""

    def __init__(self, redis: Any, key: str, lost: int = 1, *, ran: bool = True) -> None:
        self.redis = redis
        self.key = key
        self.lost = lost
        self.ran = ran

    def __getattr__(self, name: str) -> Any:
        return getattr(self.redis, name)

    async def eval(self, script: str, numkeys: int, *args: Any) -> Any:
        return await self._run(self.redis.eval, script, numkeys, *args)

    async def evalsha(self, sha: str, numkeys: int, *args: Any) -> Any:
        return await self._run(self.redis.evalsha, sha, numkeys, *args)

    async def _run(self, command: Any, script: str, numkeys: int, *args: Any) -> Any:
        lose = self.lost and args[0] == self.key
        answer = await command(script, numkeys, *args) if self.ran or not lose else None
        if lose:
            self.lost -= 1
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        return answer


async def test_a_take_whose_reply_was_lost_is_recognised_by_its_retry(
    redis_server: str, key_prefix: str
) -> None:
    """The take of a claim ran in Redis, but its reply was lost: the replica counted it
    as failed while Redis held its claim until the TTL, so its retry (and everyone
    else's take) found the claim taken, and the app's wake waited for the TTL."""
    client = aioredis.Redis.from_url(redis_server, decode_responses=True)
    try:
        claims = WakeClaims(client, key_prefix, "a", 30.0)
        claims.redis = _LostReplies(client, claims.key(APP))
        with pytest.raises(redis.exceptions.ConnectionError):
            await claims.take(APP)
        assert await claims.holder_of(APP) == "a"  # Redis holds it for us
        assert await WakeClaims(client, key_prefix, "b", 30.0).take(APP) is None
        claim = await claims.take(APP)  # the retry finds its own claim
        assert claim is not None
        assert claim.previous is None  # the lost reply said who woke the app before
        assert await claim.check()
        assert await claim.renew()
        await claim.release()
        assert await claims.holder_of(APP) is None
        # Another holder's claim is never taken for ours, nor an earlier one of ours.
        other = await WakeClaims(client, key_prefix, "b", 30.0).take(APP)
        assert other is not None
        assert await claims.take(APP) is None
    finally:
        await client.aclose()


async def test_a_wake_whose_claim_reply_was_lost_does_not_wait_for_the_claims_ttl(
    redis_server: str, key_prefix: str
) -> None:
    """A follower wakes by itself; the reply to its take of the app's claim is lost.
    The claim's TTL (the lease's, 30 s here) is longer than the app's wake timeout: a
    replica that waited for its own claim to expire failed the wake (a 504)."""
    api = FakeMachinesAPI()
    api.add(APP, "stopped")
    replica = make(
        redis_server, key_prefix, "f", api, self_wake_after_s=0.05, wake_timeout_s=3, ttl=30.0
    )
    await replica.start(rounds=False)
    claims = replica.cluster.claims
    claims.redis = _LostReplies(claims.redis, claims.key(APP))
    try:
        replica.view.app(APP).hold()  # a request held (a wake for nobody wakes nothing)
        assert await asyncio.wait_for(replica.view.wake(APP), 10) == "start"
        assert replica.claim_errors == 1
        assert len(api.ops("start_machine")) == 1
        assert await claims.holder_of(APP) is None  # released after the wake
    finally:
        await replica.stop()


async def test_a_claim_whose_release_got_no_answer_is_handed_back_to_its_holder(
    redis_server: str, key_prefix: str
) -> None:
    """The release of a claim never reached Redis (a dropped connection): the claim stays
    until its TTL, and the holder's next wake of the app takes it back at once."""
    client = aioredis.Redis.from_url(redis_server, decode_responses=True)
    try:
        claims = WakeClaims(client, key_prefix, "a", 30.0)
        first = await claims.take(APP)
        assert first is not None
        claims.redis = _LostReplies(client, claims.key(APP), ran=False)
        await first.release()  # logged, not raised: the key lapses by its TTL otherwise
        assert await claims.holder_of(APP) == "a"
        assert not await first.check()  # released here: its late actions are not sent
        assert await WakeClaims(client, key_prefix, "b", 30.0).take(APP) is None
        again = await claims.take(APP)
        assert again is not None
        assert again.token == first.token
        assert await again.check()
        assert not await first.check()
        await again.release()
        assert await claims.holder_of(APP) is None
    finally:
        await client.aclose()


async def test_a_lost_release_after_a_failed_take_is_still_handed_back(
    redis_server: str, key_prefix: str
) -> None:
    """A take of the app failed (never reached Redis) between a claim's end and the
    failure of its release: the take's nonce replaced the claim's, which Redis held, and
    the next wake of the app waited for the TTL."""
    client = aioredis.Redis.from_url(redis_server, decode_responses=True)
    try:
        claims = WakeClaims(client, key_prefix, "a", 30.0)
        first = await claims.take(APP)
        assert first is not None
        claims.redis = _LostReplies(client, claims.key(APP), lost=2, ran=False)
        with pytest.raises(redis.exceptions.ConnectionError):
            await claims.take(APP)
        await first.release()  # logged, not raised
        claims.redis = client
        assert await claims.holder_of(APP) == "a"  # our claim, until its TTL
        again = await claims.take(APP)
        assert again is not None
        assert again.token == first.token
        assert await again.check()
    finally:
        await client.aclose()


async def _a_followers_self_wake(
    leader: Any, key_prefix: str, api: FakeMachinesAPI, mid: str
) -> None:
    """Once ``leader`` leads and has read the app: a follower starts ``mid`` by itself,
    under the app's wake claim (the leader does not list again, so its view misses it)."""
    await rounds([leader], lambda: leader.leading, 2 * TTL)
    rt = leader.controller.apps[APP]
    await rounds([leader], lambda: rt.last_decision_at is not None, 2 * TTL)
    assert rt.read_once
    follower = WakeClaims(leader.cluster.redis, key_prefix, "f", 5.0)
    claim = await follower.take(APP)
    assert claim is not None
    await api.start_machine(APP, mid)
    await claim.release()


async def test_the_leader_reads_the_api_when_redis_lost_who_woke_last(
    own_redis: Any, key_prefix: str
) -> None:
    """A follower woke the app by itself, then Redis lost its data (a FLUSHALL, a
    failover to an empty replica): the record of who woke the app last was gone, and the
    leader took that for "nobody but us", skipped its read under the claim and started
    again, from its own stale view, the machine the follower had started."""
    api = FakeMachinesAPI()
    mid = api.add(APP, "stopped")
    leader = make(own_redis.url, key_prefix, "l", api, rng=lambda: 0.0)
    await leader.start(rounds=False)
    try:
        await _a_followers_self_wake(leader, key_prefix, api, mid)
        await leader.cluster.redis.flushall()
        leader.view.app(APP).hold()  # a request held at the leader's own proxy
        assert await asyncio.wait_for(leader.view.wake(APP), 10) == "none"
        assert api.ops("start_machine") == [mid]  # the follower's only
    finally:
        await leader.stop()


async def test_the_read_under_a_wake_claim_is_one_bounded_attempt(
    redis_server: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read of the app's machines that a claimed wake makes first ran with the
    client's retries (5, up to ``fly.retry_deadline_s``, 60 s): a slow or failing API held
    the app's wake claim, which every other replica waits for, that long. It makes one
    attempt within ``control.api_timeout_s``, as the wake's other reads."""
    from autoscaler.fly import client as fly_client
    from autoscaler.fly import models as m

    api = FakeMachinesAPI()
    api.add(APP, "stopped")
    follower = make(redis_server, key_prefix, "f", api, self_wake_after_s=0.05, lead=False)
    bounds: list[float | None] = []
    list_machines = api.list_machines

    async def recording(app: str) -> list[m.Machine]:
        bounds.append(fly_client._one_attempt.get())  # the bound the client would apply
        return await list_machines(app)

    monkeypatch.setattr(api, "list_machines", recording)
    await follower.start(rounds=False)
    try:
        follower.view.app(APP).hold()  # a request held (a wake for nobody wakes nothing)
        assert await asyncio.wait_for(follower.view.wake(APP), 10) == "start"
        assert bounds
        assert set(bounds) == {follower.settings.control.api_timeout_s}
    finally:
        await follower.stop()


async def test_a_request_held_while_its_leader_steps_down_is_woken_as_a_followers(
    redis_server: str, key_prefix: str
) -> None:
    """The leader loses its lease while its wake of an app starts a machine for a request
    its own proxy holds. Its step-down stops the controller, which cancels that start and
    so ends the wake, while the app had no waker at all (the follower's was set once the
    controller had stopped, after the release of the start's machine lease, an API call):
    the held request's gate found nothing to ask, and waited for a change of the app's
    machines that nothing made, until its wake timeout (a 504), with no leader at all.
    Now the follower's wake is in place as soon as the replica stops leading: the request
    goes through it (here, with no leader, a self-wake under the claim)."""
    import random

    from autoscaler.proxy.gate import Gate

    api = FakeMachinesAPI()
    mid = api.add(APP, "stopped")
    leader = make(
        redis_server,
        key_prefix,
        "l",
        api,
        self_wake_after_s=0.05,
        wake_timeout_s=5,
        rng=lambda: 0.0,
    )
    await leader.start(rounds=False)
    rng = random.Random(0)  # noqa: S311 - balancing, not secrets
    gate = Gate(leader.settings.apps[0], leader.view, leader.metrics, rng)
    try:
        await rounds([leader], lambda: leader.leading, 2 * TTL)
        rt = leader.controller.apps[APP]
        await rounds([leader], lambda: rt.last_decision_at is not None, 2 * TTL)
        api.gates["start_machine"] = started = asyncio.Event()
        api.gates["release_machine_lease"] = released = asyncio.Event()
        held = asyncio.create_task(gate.acquire(5))
        # The leader's wake is starting the machine.
        await until(lambda: bool(api.ops("start_machine")), 10, "the leader to wake the app")
        wake = leader.view.wake(APP)  # the wake under way (joined, not a new one)
        await leader.cluster.redis.delete(leader.cluster.lease.key)  # the lease is lost
        leader._next_lease_step = 0.0
        await leader.round()  # it steps down (beside the rounds)
        assert not leader.leading
        stepping_down = asyncio.create_task(leader.stepped_down())
        await asyncio.wait([wake], timeout=10)  # its start cancelled, the wake is over
        assert wake.done()
        await settle()  # the gate has looked at the app
        assert not stepping_down.done()  # the machine lease's release holds the stop
        released.set()
        await asyncio.wait_for(stepping_down, 10)
        started.set()
        up, _ = await asyncio.wait_for(held, 10)
        gate.done(up)
        assert up.id == mid
        assert leader.self_wakes == 1
    finally:
        await gate.close()
        await leader.stop()


async def test_a_failed_read_under_the_claim_fails_the_wake_and_frees_the_claim(
    redis_server: str, key_prefix: str
) -> None:
    """A follower woke the app by itself (another machine of the app started); the
    leader's view, read before, does not show it. The leader's wake reads the API under
    the claim, and that read fails: waking from the stale view would start a second
    machine for one need. The wake fails instead, its claim released at once (the proxy
    asks again, WAKE_RETRY_S later), and the next wake reads the follower's machine."""
    from autoscaler.fly.errors import ServerError

    api = FakeMachinesAPI()
    first = api.add(APP, "stopped")
    api.add(APP, "stopped")
    leader = make(redis_server, key_prefix, "l", api, rng=lambda: 0.0)
    await leader.start(rounds=False)
    try:
        await _a_followers_self_wake(leader, key_prefix, api, first)
        api.fail["list_machines"] = [ServerError(503, "unavailable")]
        leader.view.app(APP).hold()  # a request held at the leader's own proxy
        with pytest.raises(ServerError):
            await asyncio.wait_for(leader.view.wake(APP), 10)
        assert api.ops("start_machine") == [first]  # the follower's only
        assert await leader.cluster.claims.holder_of(APP) is None  # free at once
        # The proxy asks again. The failed wake's take named the leader as the app's last
        # claimant, and its next wake took that for a view as fresh as it gets: it skipped
        # the read and started again, from the stale view, the follower's machine.
        assert await asyncio.wait_for(leader.view.wake(APP), 10) == "none"
        assert api.ops("start_machine") == [first]
    finally:
        await leader.stop()


@pytest.mark.parametrize("leads", [False, True], ids=["self-wake", "new leader"])
async def test_a_follower_wakes_a_machine_the_leader_stopped_sick_last(
    redis_server: str, key_prefix: str, leads: bool
) -> None:
    """The leader stopped a machine whose Fly checks were critical. Fly's list forgets the
    checks of a machine that is not started, so only the leader knew that a wake should
    try it last (``AppRuntime.down_sick``): a follower that woke the app by itself (no
    leader served it), or that took the lease, started that machine again (first by its
    id), and its requests went to a machine known sick. The leader publishes which ones."""
    api = FakeMachinesAPI()
    sick = api.add(APP, "started")  # m01: the wake's choice between equals
    well = api.add(APP, "stopped")
    api.set(APP, sick, checks=[CheckStatus(name="healthz", status="critical")])
    # TTL's lease: the follower takes over the stopped leader's at its next step.
    leader = make(redis_server, key_prefix, "l", api, ttl=TTL)
    follower = make(redis_server, key_prefix, "f", api, self_wake_after_s=0.05, lead=leads, ttl=TTL)
    for r in (leader, follower):
        await r.start(rounds=False)
    try:
        await rounds([leader, follower], lambda: leader.leading, 2 * TTL)
        await leader.controller.tick(APP)  # idle, and sick: drained and stopped
        await until(lambda: api.get(APP, sick).state == "stopped", what="the sick one stopped")
        await leader.controller.tick(APP)  # lists it stopped
        for _ in range(2):  # the follower reads what the leader published
            for r in (leader, follower):
                await r.round()
        await leader.stop()  # gone: nobody serves the follower's wake
        if leads:
            await rounds([follower], lambda: follower.leading, 4 * TTL)
        follower.view.app(APP).hold()
        assert await asyncio.wait_for(follower.view.wake(APP), 10) == "start"
        assert api.ops("start_machine") == [well]
        assert follower.self_wakes == (0 if leads else 1)
    finally:
        for r in (leader, follower):
            await r.stop()
