"""Replicas against a real redis-server and a fake Machines API: one decider, failover,
the whole cluster's load, followers routing with the leader's view and waking through it,
and what /status and the metrics say."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import pytest
import redis.asyncio as aioredis
from control.fakes import FakeMachinesAPI, settle
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from structlog.testing import capture_logs
from testkit import until

from autoscaler.admin import AdminServer
from autoscaler.config import AdminSettings, AppConfig, ClusterSettings, ControlSettings, Settings
from autoscaler.control.controller import Controller
from autoscaler.control.replica import Replica
from autoscaler.control.runtime import mark_by
from autoscaler.control.view import HUNG_AFTER, FleetView
from autoscaler.control.wake import WakeError
from autoscaler.fly.errors import NotFound
from autoscaler.fly.models import CheckStatus, Lease
from autoscaler.metrics import Metrics
from autoscaler.proxy.balancer import pick
from autoscaler.scaling.fleet import CORDON_METADATA_KEY
from autoscaler.scaling.policy import Action
from autoscaler.scaling.window import ConcurrencyMeter
from autoscaler.state import cluster as cluster_module
from autoscaler.state.claim import WakeClaims

APP = "web"
# The lease of a test whose subject is a handover by a lease's expiry (or its loss), short
# so that the test waits little for it.
TTL = 0.6
# Every other test's lease (and wake claims; make's default), that no stall of a loaded CI
# machine lets lapse: at TTL's, with Redis commands bounded by a third of it (0.2 s), a
# stalled event loop (load average 8-11 on two cores) let the leader's lease or a wake's
# claim lapse, and the lead moved mid-test: the test's leader no longer decided, a
# follower woke, or a new leader's step-up dropped what the test had set up. It adds no
# wait: a replica's first lease step takes a free lease at once, and rounds() runs every
# TTL / 10 whatever the lease.
STEADY_TTL = 3.0


# (A report outlives any stall of a loaded machine: conftest.py.)
pytestmark = pytest.mark.usefixtures("reports_outlive_any_stall")


async def probe(host: str, port: int) -> bool:
    """The machine's port answers, a few turns of the loop after the API says started
    (an app listens a moment after its machine is started, as on Fly): a read of its
    events begun beside the probe is back first, as a cold boot's is."""
    await settle()
    return True


def make(
    url: str,
    prefix: str,
    rid: str,
    api: FakeMachinesAPI,
    *,
    self_wake_after_s: float = 2.0,
    wake_timeout_s: float = 30.0,
    lead: bool = True,
    freeze_heap: Callable[[], None] | None = None,
    rng: Callable[[], float] = random.random,
    apps: tuple[str, ...] = (APP,),
    ttl: float | None = None,
    api_timeout_s: float = 5.0,
    idle_to_zero_s: float = 300.0,
) -> Replica:
    settings = Settings(
        apps=[
            AppConfig(
                name=name,
                target_concurrency=2,
                target_utilization=1.0,
                min_lifetime_s=0,
                scale_down_delay_s=0,
                wake_timeout_s=wake_timeout_s,
                idle_to_zero_s=idle_to_zero_s,
            )
            for name in apps
        ],
        # Ticks by hand; the loop's first tick only.
        control=ControlSettings(tick_s=60, api_timeout_s=api_timeout_s),
        cluster=ClusterSettings(
            redis_url=SecretStr(url),
            replica_id=rid,
            lease_ttl_s=STEADY_TTL if ttl is None else ttl,
            key_prefix=prefix,
            self_wake_after_s=self_wake_after_s,
            lead=lead,
        ),
    )
    return Replica(
        settings,
        api,
        FleetView(),
        Metrics(CollectorRegistry()),
        probe=probe,
        freeze_heap=freeze_heap,
        rng=rng,
    )


@pytest.fixture
def ttl() -> float:
    """The lease of ``cluster``'s replicas; a test of a handover by expiry parametrizes
    it with TTL."""
    return STEADY_TTL


@pytest.fixture
async def cluster(redis_server: str, key_prefix: str, ttl: float) -> AsyncIterator[list[Replica]]:
    api = FakeMachinesAPI()
    api.add(APP, "stopped")
    replicas = [make(redis_server, key_prefix, f"r{i}", api, ttl=ttl) for i in range(3)]
    for r in replicas:
        await r.start(rounds=False)
    yield replicas
    for r in replicas:
        await r.stop()


class Rounds(Protocol):
    """What rounds() runs: a replica's round."""

    async def round(self) -> None: ...


# rounds()' guard against a hang, and only that: a round that never returns. What a test
# waits for is bounded in rounds, however long a loaded machine takes over them.
ROUNDS_HANG_S = 60.0


async def rounds(replicas: Sequence[Rounds], until: Callable[[], bool], limit_s: float) -> None:
    """Run every replica's round every TTL/10 until ``until()``; fails after as many rounds
    as ``limit_s`` holds on an idle machine (``limit_s / (TTL/10)``), whatever time they
    take, or after ROUNDS_HANG_S (a hang).

    Bounded in rounds, not in ``limit_s`` of real time: on a loaded machine a round (a
    replica's Redis commands, then the pause) took several times its TTL/10, so 2 * TTL
    (1.2 s) held a few rounds, not 20, and the wait failed before the rounds that bring
    its condition had run. Each round takes TTL/10 at least, so a condition that comes
    with time (a lease that lapses in Redis) still has ``limit_s`` of it, or more."""
    budget = max(1, round(limit_s / (TTL / 10)))
    async with asyncio.timeout(ROUNDS_HANG_S):
        for _ in range(budget):
            if until():
                return
            for r in replicas:
                await r.round()
            await asyncio.sleep(TTL / 10)
    assert until(), f"condition not reached in {budget} rounds"


async def test_rounds_waits_out_its_rounds_however_long_a_stalled_loop_takes_over_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A condition that comes after 10 rounds is met within 2 * TTL's rounds (20) although
    every round stalls the loop for half a TTL (its clock jumps on as much, as a loop that
    did not run for that long sees it): 10 rounds take 3 s, far beyond 2 * TTL."""
    loop = asyncio.get_running_loop()
    real = loop.time
    stalled = 0.0
    monkeypatch.setattr(loop, "time", lambda: real() + stalled)

    class Stalled:
        ran = 0

        async def round(self) -> None:
            nonlocal stalled
            self.ran += 1
            stalled += TTL / 2

    replica = Stalled()
    await rounds([replica], lambda: replica.ran == 10, 2 * TTL)
    assert replica.ran == 10


@contextlib.asynccontextmanager
async def old_leader_waking(
    redis_server: str,
    key_prefix: str,
    api: FakeMachinesAPI,
    knobs: dict[str, Any] | None = None,
    old_knobs: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[Replica, Replica, asyncio.Future[str]]]:
    """Replicas "old" and "new" (``knobs`` for both, ``old_knobs`` for "old"), started
    without rounds (their loops' first ticks a minute on: the ticks are the test's own);
    "old" leads, has read the app, and wakes it for a request its proxy holds (the wake's
    future). Both stopped at the end; on TTL's lease unless ``knobs`` say otherwise (each
    test hands the lead over)."""
    both = {"ttl": TTL, **(knobs or {})}
    old = make(redis_server, key_prefix, "old", api, rng=lambda: 0.99, **both, **(old_knobs or {}))
    new = make(redis_server, key_prefix, "new", api, rng=lambda: 0.99, **both)
    for r in (old, new):
        await r.start(rounds=False)
    try:
        await rounds([old], lambda: old.leading, 10)  # (its first step takes the lease)
        await old.controller.tick(APP)
        old.view.app(APP).hold()
        yield old, new, old.view.wake(APP)
    finally:
        for r in (old, new):
            await r.stop()


def lapse(replica: Replica) -> None:
    """Its lease lapses locally (a pause, Redis out of reach), and it does not renew it."""
    replica.cluster.lease.valid_until = 0.0
    replica._next_lease_step = float("inf")


def leaders(replicas: list[Replica]) -> list[Replica]:
    return [r for r in replicas if r.leading]


@pytest.mark.parametrize("ttl", [TTL])  # the leader dies: its lease expires
async def test_one_decider_and_failover(cluster: list[Replica]) -> None:
    await rounds(cluster, lambda: len(leaders(cluster)) == 1, 2 * TTL)
    (leader,) = leaders(cluster)
    assert leader.controller.apps[APP].loop is not None  # only the leader's loops run
    await leader.controller.tick(APP)
    desired = {"app": APP}
    assert leader.metrics.registry.get_sample_value("autoscaler_desired_machines", desired) == 0
    for r in cluster:
        if r is not leader:
            assert r.controller.apps[APP].loop is None
            assert r.view.can_wake  # the follower's wake goes through the leader
    # The leader dies: no more rounds, its Redis connection closed.
    await leader.cluster.redis.aclose()
    rest = [r for r in cluster if r is not leader]
    await rounds(rest, lambda: len(leaders(rest)) == 1, 2 * TTL)
    (new,) = leaders(rest)
    assert new.cluster.lease.token is not None
    assert new.controller.apps[APP].loop is not None
    # The old one, alive again but cut off from Redis, steps down by its lease deadline
    # and its controller stops.
    await rounds([leader], lambda: not leader.leading, 2 * TTL)
    await leader.stepped_down()  # (beside the rounds)
    assert leader.controller.apps[APP].loop is None
    assert leader.metrics.registry.get_sample_value("autoscaler_cluster_leader") == 0
    # It no longer exports the decider's gauges: summed over replicas, only the leader's count.
    assert leader.metrics.registry.get_sample_value("autoscaler_desired_machines", desired) is None


async def test_a_replica_that_may_not_lead_never_does(redis_server: str, key_prefix: str) -> None:
    """``cluster.lead: false``: a proxy-only replica follows, alone or not; the replica
    that may lead takes the lease and the proxy-only one routes with its view."""
    api = FakeMachinesAPI()
    api.add(APP, "started")
    proxy = make(redis_server, key_prefix, "proxy", api, lead=False)
    await proxy.start(rounds=False)
    decider = make(redis_server, key_prefix, "decider", api)
    try:
        for _ in range(30):  # three lease TTLs alone
            await proxy.round()
            await asyncio.sleep(TTL / 10)
        assert not proxy.leading
        assert await proxy.cluster.redis.get(proxy.cluster.lease.key) is None
        await decider.start(rounds=False)
        await rounds([proxy, decider], lambda: decider.leading, 2 * TTL)
        await decider.controller.tick(APP)
        await rounds([proxy, decider], lambda: proxy.view.app(APP).routable() != [], 2 * TTL)
        assert decider.leading
        assert not proxy.leading
    finally:
        for r in (proxy, decider):
            await r.stop()


async def test_each_replica_freezes_its_heap_once_its_apps_are_known(
    redis_server: str, key_prefix: str
) -> None:
    """The leader once its controller read every app, a follower at its first view; once
    each, whatever rounds and ticks come after."""
    api = FakeMachinesAPI()
    api.add(APP, "started")
    frozen: list[str] = []
    a, b = (
        make(redis_server, key_prefix, rid, api, freeze_heap=lambda rid=rid: frozen.append(rid))
        for rid in ("a", "b")
    )
    await a.start(rounds=False)
    try:
        await rounds([a], lambda: a.leading, 2 * TTL)
        assert frozen == []  # nothing read yet
        await a.controller.tick(APP)
        assert frozen == ["a"]
        await b.start(rounds=False)
        await rounds([a, b], lambda: b.view_known, 2 * TTL)
        assert frozen == ["a", "b"]
        for _ in range(3):
            await a.round()
            await b.round()
        await a.controller.tick(APP)
        assert frozen == ["a", "b"]
    finally:
        for r in (a, b):
            await r.stop()


def test_summed_load_is_one_processs_load() -> None:
    """A burst split across three replicas gives the leader the samples one replica would
    have seen with all of it (explicit times; reports read the moment they are written)."""
    from autoscaler.state.cluster import AppLoad, ClusterLoad, LocalLoad, Report

    one = ConcurrencyMeter(0.0)
    parts = [ConcurrencyMeter(0.0) for _ in range(3)]
    locals_ = [LocalLoad() for _ in range(3)]
    cluster = ClusterLoad()
    # (time, replica, +/-) of a burst: 9 requests spread over the replicas, unevenly.
    events = [(0.1, 0, 1), (0.2, 1, 1), (0.3, 2, 1), (0.35, 0, 1), (0.5, 1, 1), (0.6, 2, 1)]
    events += [(0.7, 0, 1), (0.8, 0, 1), (0.9, 2, 1), (1.2, 1, -1), (1.3, 0, -1), (1.4, 0, -1)]
    events += [(1.9, 2, -1), (2.1, 1, -1), (2.5, 0, -1)]
    ticks = [1.0, 2.0, 3.0]
    sums, singles = [], []
    for tick in ticks:
        for t, i, d in [e for e in events if tick - 1 <= e[0] < tick]:
            parts[i].add(d, t)
            one.add(d, t)
        reports = {}
        for i in (1, 2):
            area, peak = locals_[i].take(APP, parts[i], tick)
            load = AppLoad(area=area, level=parts[i].level, peak=peak)
            reports[f"r{i}"] = Report(f"r{i}", "b", False, 0.0, tick, {APP: load})
        area, _ = locals_[0].take(APP, parts[0], tick)
        local = ("r0#b", area, parts[0].level, locals_[0].pop_peak(APP))
        cluster.note_peaks(reports)
        sums.append(cluster.sample(APP, tick, local, reports))
        singles.append(one.take(tick))
    # The first is the baseline (no span); after it, the same averages as one process.
    assert [round(s.average, 9) for s in sums[1:]] == [round(s.average, 9) for s in singles[1:]]
    assert all(c.peak >= s.peak for c, s in zip(sums[1:], singles[1:], strict=True))


def test_no_peak_outlives_the_replica_that_reported_it() -> None:
    """Every replica notes the others' peaks for the leader's next sample, which takes the
    sampled app's out: a follower samples nothing, and the leader not the apps it does
    not scale, so a peak was kept for good per app and per boot of every replica ever
    read (one more at each restart of each). Those of a replica gone or restarted are
    dropped (a sample counts nothing of them); a sample still counts the others'."""
    from autoscaler.state.cluster import AppLoad, ClusterLoad, Report

    cluster = ClusterLoad()
    busy = {APP: AppLoad(area=1.0, level=0, peak=3)}
    for boot in ("b1", "b2", "b3"):  # r1 restarts twice; r2 lives on
        reports = {
            r: Report(r, boot if r == "r1" else "b", False, 0.0, 0.0, busy) for r in ("r1", "r2")
        }
        cluster.note_peaks(reports)
    assert cluster._peaks == {APP: {"r1#b3": 3, "r2#b": 3}}
    cluster.note_peaks({})  # both gone
    assert cluster._peaks == {}
    cluster.note_peaks(reports)
    assert cluster.sample(APP, 1.0, ("r0#b", 0.0, 0, 1), reports).peak == 7


async def test_the_leader_decides_on_everyones_load(cluster: list[Replica]) -> None:
    await rounds(cluster, lambda: len(leaders(cluster)) == 1, 2 * TTL)
    (leader,) = leaders(cluster)
    # 9 requests held across the three replicas, constant from here on. (Not 10: 10 / 2
    # is exactly 5 machines, and a sample a hair over 10, from ages rounded to whole ms,
    # asked for 6.)
    for r, n in zip(cluster, (3, 3, 3), strict=True):
        for _ in range(n):
            r.view.app(APP).hold()
    # Two rounds: every replica has published the burst, and the leader has read it. (A
    # report read later only moves load into the next sample: the area is cumulative.)
    for _ in range(2):
        for r in cluster:
            await r.round()
    clock = leader.clock
    leader.load(APP, clock())  # the baseline, after the burst began
    for _ in range(3):
        for r in cluster:
            await r.round()
        await asyncio.sleep(0.05)
    sample, last = leader.load(APP, clock())
    # Ages are whole ms (PTTL), and a stall of the loop between two rounds (a loaded
    # machine) moves a little of the area into the next sample: 8.4 was seen at load 8.
    # Within 10% the sample still asks for what 9 requests ask (below).
    assert sample.average == pytest.approx(9.0, rel=0.1)
    assert last is not None
    # The policy, ticking on the leader, wants what one process with all 9 requests wants:
    # 9 / target_concurrency 2 = 4.5, so 5 machines.
    decision = await leader.controller.tick(APP)
    single_api = FakeMachinesAPI()
    single_api.add(APP, "stopped")
    one_view = FleetView()
    single = Controller(
        single_api,
        one_view,
        leader.settings.model_copy(update={"cluster": ClusterSettings()}),
        Metrics(CollectorRegistry()),
        probe=probe,
    )
    for _ in range(9):
        one_view.app(APP).hold()
    await asyncio.sleep(0.05)
    alone = await single.tick(APP)
    assert decision.desired == alone.desired == 5
    assert decision.panic == alone.panic
    await single.stop()
    await one_view.close()


async def leader_and_follower(cluster: list[Replica]) -> tuple[Replica, Replica]:
    """Elect a leader, have it read the app, and wait until a follower has its view."""
    await rounds(cluster, lambda: len(leaders(cluster)) == 1, 2 * TTL)
    (leader,) = leaders(cluster)
    follower = next(r for r in cluster if r is not leader)
    await leader.controller.tick(APP)
    await rounds(cluster, lambda: bool(follower.view.app(APP).upstreams), 2 * TTL)
    return leader, follower


async def test_followers_route_and_wake_through_the_leader(cluster: list[Replica]) -> None:
    leader, follower = await leader_and_follower(cluster)
    (up,) = follower.view.app(APP).upstreams.values()
    assert up.state == "stopped"
    assert follower.view_known
    api = leader.controller.api
    wake = follower.view.wake(APP)
    await rounds(cluster, wake.done, 4 * TTL)
    assert wake.result() == "start"
    assert [u.id for u in follower.view.app(APP).routable()] == [up.id]
    # One start for the need, by the leader, fenced.
    assert api.api.ops("start_machine") == [up.id]  # type: ignore[attr-defined]


def wakes(replica: Replica, result: str) -> float:
    sample = replica.metrics.registry.get_sample_value
    return sample("autoscaler_wakes_total", {"app": APP, "result": result}) or 0.0


def timed_wakes(replicas: list[Replica]) -> float:
    """The wakes autoscaler_wake_duration_seconds timed, summed over ``replicas``."""
    return sum(
        r.metrics.registry.get_sample_value(
            "autoscaler_wake_duration_seconds_count", {"app": APP, "kind": kind}
        )
        or 0.0
        for r in replicas
        for kind in ("resume", "start")
    )


async def test_a_wake_counts_on_the_replica_whose_proxy_asked(cluster: list[Replica]) -> None:
    """autoscaler_wakes_total in cluster mode: a follower's wake (asked of the leader
    through Redis) counts on the follower only, so a sum over the replicas counts it once;
    the leader counted the wake it made for it as well. The leader counts it too once its
    own proxy's held requests join it (two proxies' wakes, one machine: timed once)."""
    leader, follower = await leader_and_follower(cluster)
    wake = follower.view.wake(APP)
    await rounds(cluster, wake.done, 4 * TTL)
    assert wake.result() == "start"
    assert [wakes(r, "ok") for r in (follower, leader)] == [1, 0]
    assert timed_wakes(cluster) == 1  # by the leader, which made it
    # Asleep again; the leader's wake for the follower is held at its start.
    api = leader.controller.api.api
    assert isinstance(api, FakeMachinesAPI)
    (mid,) = api.machines[APP]
    api.set(APP, mid, state="stopped")
    await leader.controller.tick(APP)
    await rounds(cluster, lambda: not follower.view.app(APP).routable(), 2 * TTL)
    api.gates["start_machine"] = booted = asyncio.Event()
    ours = follower.view.wake(APP)
    await rounds(cluster, lambda: bool(api.ops("start_machine")[1:]), 4 * TTL)
    theirs = leader.view.wake(APP)  # the leader's proxy joins the wake under way
    booted.set()
    await rounds(cluster, lambda: ours.done() and theirs.done(), 4 * TTL)
    assert [wakes(r, "ok") for r in (follower, leader)] == [2, 1]
    assert timed_wakes(cluster) == 2


async def test_a_followers_failed_wake_counts_once(redis_server: str, key_prefix: str) -> None:
    """A wake that no machine can serve fails on the leader that served it and on the
    follower whose requests wait: counted failed once, on the follower (the
    AutoscalerWakeFailed alert fires for it)."""
    api = FakeMachinesAPI()
    mid = api.add(APP, "stopped")
    api.broken.add(mid)
    replicas = [make(redis_server, key_prefix, f"r{i}", api, wake_timeout_s=1.0) for i in (0, 1)]
    for r in replicas:
        await r.start(rounds=False)
    try:
        leader, follower = await leader_and_follower(replicas)
        follower.view.app(APP).hold()
        wake = follower.view.wake(APP)
        await rounds(replicas, wake.done, 10)
        assert wake.exception() is not None
        assert [wakes(r, "failed") for r in (follower, leader)] == [1, 0]
    finally:
        for r in replicas:
            await r.stop()


FELL_BACK = [  # a resume's events as the emulator records its fallback to a cold boot
    {"type": "launch", "status": "started", "timestamp": 3, "request": {"resume": False}},
    {"type": "start", "status": "starting", "timestamp": 2},
    {"type": "suspend", "status": "suspended", "timestamp": 1},
]


@pytest.mark.parametrize(
    ("asleep", "how"),
    [("suspended", "resume"), ("stopped", "start"), ("suspended, falls back", "start")],
)
async def test_a_follower_names_a_wake_under_way_by_how_the_leader_brings_it_up(
    cluster: list[Replica], asleep: str, how: str
) -> None:
    """A follower whose held requests join a wake of the leader already under way sees the
    machine ``starting``, whether the leader resumes it or boots it cold: the leader
    publishes which, and the follower's requests are labelled as the leader's are (a
    resume that fell back to a cold boot, as the machine's events say once it is up, as
    a start). A resume under way was labelled a start on the followers."""
    api = cluster[0].controller.api.api
    assert isinstance(api, FakeMachinesAPI)
    (mid,) = api.machines[APP]
    if asleep.endswith("falls back"):
        api.set(APP, mid, state="suspended", events=FELL_BACK)  # read once it is up
    else:
        api.set(APP, mid, state=asleep)
    leader, follower = await leader_and_follower(cluster)
    for r in cluster:
        await asyncio.wait_for(r.subscribed.wait(), 5)
    booted = api.gates["wait_for_machine_state"] = asyncio.Event()  # held in starting
    leader.view.app(APP).hold()
    theirs = leader.view.wake(APP)
    view = follower.view.app(APP)
    await until(lambda: view.upstreams[mid].state == "starting", what="the pushed start")
    view.hold()
    ours = follower.view.wake(APP)
    await settle()
    assert not ours.done()
    booted.set()
    assert await asyncio.wait_for(theirs, 5) == how
    assert await asyncio.wait_for(ours, 5) == how
    assert follower.self_wakes == 0
    assert api.ops("start_machine") == [mid]


async def test_a_follower_names_a_drain_the_leader_took_back_uncordon(
    cluster: list[Replica],
) -> None:
    """A follower's held requests that the leader served by taking a drain back (its
    machine up all along, cordoned) are named as the leader's wake names it, "uncordon":
    they were named "none", as if no wake had been needed."""
    api = cluster[0].controller.api.api
    assert isinstance(api, FakeMachinesAPI)
    (mid,) = api.machines[APP]
    api.set(APP, mid, state="started")
    leader, follower = await leader_and_follower(cluster)
    for r in cluster:
        await asyncio.wait_for(r.subscribed.wait(), 5)
    up = leader.view.app(APP).upstreams[mid]
    leader.view.app(APP).begin(up)  # a request in flight: the drain waits for it, cordoned
    leader.controller.actuator.launch(leader.controller.apps[APP], Action("drain", mid, "test"))
    view = follower.view.app(APP)
    await until(lambda: view.upstreams[mid].cordoned, what="the pushed cordon")
    assert view.upstreams[mid].cordoned_by_us  # the leader's drain's: its proxy knows too
    view.hold()
    assert await asyncio.wait_for(follower.view.wake(APP), 10) == "uncordon"
    assert follower.self_wakes == 0
    assert api.ops("start_machine") == []
    leader.view.app(APP).end(up)


async def test_a_follower_names_another_partys_cordon_lifted_none(
    cluster: list[Replica],
) -> None:
    """A follower's held requests served by a machine that was up under another party's
    cordon (no key of ours), lifted while they waited, waited for no wake of ours: the
    leader took no drain back, and its wake says no "uncordon". The follower named them
    "uncordon" all the same, by the cordon alone; the leader now publishes which cordons
    are its drains' (``AppFleet.ours``), and this one is "none"."""
    api = cluster[0].controller.api.api
    assert isinstance(api, FakeMachinesAPI)
    (mid,) = api.machines[APP]
    api.set(APP, mid, state="started", cordoned=True)
    leader, follower = await leader_and_follower(cluster)
    for r in cluster:
        await asyncio.wait_for(r.subscribed.wait(), 5)
    view = follower.view.app(APP)
    assert view.upstreams[mid].cordoned
    view.hold()
    wake = follower.view.wake(APP)
    await settle()  # the follower's wake has begun, the machine cordoned
    api.set(APP, mid, cordoned=False)  # the other party lifts its cordon
    await leader.controller.tick(APP)
    assert await asyncio.wait_for(wake, 10) == "none"
    assert follower.self_wakes == 0
    assert api.ops("start_machine") == []
    assert api.ops("uncordon_machine") == []


async def routable_in(replica: Replica, limit_s: float = 10.0) -> None:
    """Await (no rounds) until ``replica`` sees a routable machine of the app."""
    view = replica.view.app(APP)

    async def wait() -> None:
        while not view.routable():
            await view.changed()

    await asyncio.wait_for(wait(), limit_s)


async def test_followers_learn_of_a_start_through_the_push(cluster: list[Replica]) -> None:
    await rounds(cluster, lambda: len(leaders(cluster)) == 1, 2 * TTL)
    (leader,) = leaders(cluster)
    followers = [r for r in cluster if r is not leader]
    await leader.controller.tick(APP)
    await rounds(cluster, lambda: all(r.view.app(APP).upstreams for r in followers), 2 * TTL)
    for r in followers:
        await asyncio.wait_for(r.subscribed.wait(), 5)
        assert not r.view.app(APP).routable()
    # From here no round runs (no poll, ever): only the leader's push can tell the
    # followers that the machine came up.
    assert await leader.view.wake(APP) == "start"
    for r in followers:
        await routable_in(r)
        assert r.pushes_applied >= 1
    # A follower's round now reads the leader's report written before the start: older
    # than the push (same fencing token, lower sequence), so it does not undo it.
    for r in followers:
        await r.round()
        assert [u.state for u in r.view.app(APP).upstreams.values()] == ["started"]


async def test_followers_learn_which_machines_fly_checks_call_critical(
    cluster: list[Replica],
) -> None:
    """The leader's list says a machine's Fly health check is critical: every follower's
    view says so too (its proxy takes the machine out of routing, as the leader's does),
    through the push and through the report alike, and again when the check passes."""
    leader, follower = await leader_and_follower(cluster)
    api = leader.controller.api.api
    mid = next(iter(leader.view.app(APP).upstreams))
    theirs = follower.view.app(APP).upstreams[mid]
    assert not theirs.checks_critical
    await asyncio.wait_for(follower.subscribed.wait(), 5)
    api.set(APP, mid, checks=[CheckStatus(name="healthz", status="critical")])  # type: ignore[attr-defined]
    await leader.controller.tick(APP)
    assert leader.view.app(APP).upstreams[mid].checks_critical

    async def pushed() -> None:  # no round: the push alone
        while not follower.view.app(APP).upstreams[mid].checks_critical:
            await follower.view.app(APP).changed()

    await asyncio.wait_for(pushed(), 5)
    # And through the report alone (the follower no longer listens to pushes).
    assert follower._watcher is not None
    follower._watcher.cancel()
    await asyncio.gather(follower._watcher, return_exceptions=True)
    api.set(APP, mid, checks=[CheckStatus(name="healthz", status="passing")])  # type: ignore[attr-defined]
    await leader.controller.tick(APP)
    await rounds(
        cluster, lambda: not follower.view.app(APP).upstreams[mid].checks_critical, 2 * TTL
    )


async def test_a_followers_wake_reaches_the_leader_at_once(cluster: list[Replica]) -> None:
    leader, follower = await leader_and_follower(cluster)
    for r in cluster:
        await asyncio.wait_for(r.subscribed.wait(), 5)
    # From here no round runs: the leader never pops the wake list, so only the request
    # it hears through pub/sub (and the push of its start) can serve the follower's wake
    # before the follower would wake by itself (self_wake_after_s, 2 s).
    assert await asyncio.wait_for(follower.view.wake(APP), 5) == "start"
    assert follower.self_wakes == 0
    (up,) = follower.view.app(APP).routable()
    assert leader.controller.api.api.ops("start_machine") == [up.id]  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def quick_to_self_wake(
    redis_server: str, key_prefix: str, follower_first: Callable[[Replica], None] | None = None
) -> AsyncIterator[tuple[FakeMachinesAPI, Replica, Replica, str]]:
    """A leader and a follower whose held requests wake by themselves after 0.2 s
    (``follower_first``: done to the follower before it starts), both listening, the
    app's stopped machine in both views."""
    api = FakeMachinesAPI()
    mid = api.add(APP, "stopped")
    leader, follower = (
        make(redis_server, key_prefix, rid, api, self_wake_after_s=0.2, lead=rid == "leader")
        for rid in ("leader", "follower")
    )
    if follower_first is not None:
        follower_first(follower)
    for r in (leader, follower):
        await r.start(rounds=False)
    try:
        await rounds([leader], lambda: leader.leading, 10)
        await leader.controller.tick(APP)
        await rounds([leader, follower], lambda: bool(follower.view.app(APP).upstreams), 10)
        for r in (leader, follower):
            await asyncio.wait_for(r.subscribed.wait(), 5)
        yield api, leader, follower, mid
    finally:
        for r in (leader, follower):
            await r.stop()


async def test_a_follower_past_its_bound_waits_for_the_leaders_wake_and_its_push(
    redis_server: str, key_prefix: str
) -> None:
    """A cold start longer than the follower's ``self_wake_after_s`` (Fly's take 2 s and
    more, the default bound is 2 s): the follower's requests are past their bound while the
    leader's wake holds the claim, and it tries the claim every round. The leader frees the
    claim only once its push of the machine has gone: before, it freed it at once, the
    push (here slow) came a moment later, and in between the follower took the claim, read
    the API and counted a self-wake for the machine the leader had woken."""
    async with quick_to_self_wake(redis_server, key_prefix) as (api, leader, follower, mid):
        booted = api.gates["wait_for_machine_state"] = asyncio.Event()  # held in starting
        published = asyncio.Event()  # a slow PUBLISH: no push arrives until it is set
        push_view = leader.cluster.push_view

        async def slow_push(push: Any) -> None:
            await published.wait()
            await push_view(push)

        leader.cluster.push_view = slow_push  # type: ignore[method-assign]
        follower.view.app(APP).hold()
        ours = follower.view.wake(APP)
        await until(lambda: follower.claim_waits > 0, what="the follower past its bound")
        booted.set()  # the leader's wake is done; its push is not yet
        waits = follower.claim_waits
        await until(lambda: ours.done() or follower.claim_waits >= waits + 2, what="a retry")
        published.set()
        assert await asyncio.wait_for(ours, 5) == "start"
        assert follower.self_wakes == 0
        assert api.ops("start_machine") == [mid]


async def test_a_push_that_comes_as_the_follower_takes_the_claim_ends_its_wake(
    redis_server: str, key_prefix: str
) -> None:
    """The leader's push and its release of the claim reach the follower apart (two
    connections): here the release first, so the follower past its bound takes the claim,
    and the push of the machine the leader woke arrives as it does. The follower wakes
    nothing then, and counts no self-wake; before, it read the API under the claim and
    counted one."""
    pushes: list[Any] = []

    def hold_pushes(follower: Replica) -> None:
        follower._on_push = pushes.append  # type: ignore[method-assign]

    async with quick_to_self_wake(redis_server, key_prefix, hold_pushes) as four:
        api, _, follower, mid = four
        take_claim = follower._take_claim

        async def take_as_the_push_comes(app: str) -> Any:
            claim = await take_claim(app)
            if claim is not None:
                for push in pushes:
                    Replica._on_push(follower, push)
            return claim

        follower._take_claim = take_as_the_push_comes  # type: ignore[method-assign]
        follower.view.app(APP).hold()
        ours = follower.view.wake(APP)
        assert await asyncio.wait_for(ours, 5) == "start"
        assert follower.self_wakes == 0
        assert api.ops("start_machine") == [mid]


async def test_a_lost_push_is_repaired_by_the_next_read(cluster: list[Replica]) -> None:
    leader, follower = await leader_and_follower(cluster)
    # The follower stops listening (as if its subscription had dropped): the push of the
    # start never reaches it.
    assert follower._watcher is not None
    pushed = follower.pushes_applied
    follower._watcher.cancel()
    await asyncio.gather(follower._watcher, return_exceptions=True)
    assert await leader.view.wake(APP) == "start"
    assert not follower.view.app(APP).routable()
    await leader.round()  # the leader's report now says started
    await follower.round()  # one read
    assert follower.view.app(APP).routable()
    assert follower.pushes_applied == pushed


@pytest.mark.parametrize("ttl", [TTL])  # the leader dies: its lease expires
async def test_a_wake_asked_of_a_lost_leader_is_served_by_the_next(
    cluster: list[Replica],
) -> None:
    await rounds(cluster, lambda: len(leaders(cluster)) == 1, 2 * TTL)
    (leader,) = leaders(cluster)
    await leader.controller.tick(APP)
    rest = [r for r in cluster if r is not leader]
    await rounds(cluster, lambda: all(r.view.app(APP).upstreams for r in rest), 2 * TTL)
    await leader.cluster.redis.aclose()  # the leader dies before serving any wake
    wakes = [r.view.wake(APP) for r in rest]
    await rounds(rest, lambda: all(w.done() for w in wakes), 4 * TTL)
    assert sorted(w.result() for w in wakes) in (["none", "start"], ["start", "start"])
    api = next(r for r in rest if r.leading).api.api
    assert api.ops("start_machine") == [next(iter(rest[0].view.app(APP).upstreams))]  # type: ignore[attr-defined]


async def test_the_leader_counts_other_replicas_requests_per_machine(
    cluster: list[Replica],
) -> None:
    await rounds(cluster, lambda: len(leaders(cluster)) == 1, 2 * TTL)
    (leader,) = leaders(cluster)
    await leader.controller.tick(APP)
    rest = [r for r in cluster if r is not leader]
    await rounds(cluster, lambda: all(r.view.app(APP).upstreams for r in rest), 2 * TTL)
    mid = next(iter(leader.view.app(APP).upstreams))
    for r in rest:  # a request on the machine through each follower
        r.view.app(APP).begin(r.view.app(APP).upstreams[mid])
    up = leader.view.app(APP).upstreams[mid]
    await rounds(cluster, lambda: up.remote_in_flight == 2, 2 * TTL)
    rt = leader.controller.apps[APP]
    (snap,) = rt.fleet(leader.view.app(APP)).machines
    assert snap.in_flight == 2  # what the policy and the drains see
    assert up.in_flight == 0  # the leader's own count (its proxy's slots) is untouched
    # hard_limit holds across replicas: with 2 in flight elsewhere, a limit of 2 is full
    # here, and each follower counts the other's request.
    rng = random.Random(1)  # noqa: S311 - the balancer's choice, not a secret
    # (the machine is stopped in this fixture: the balancer gets it as if it were routable)
    assert pick([up], 2, rng) is None
    assert pick([up], 3, rng) is up

    def each_sees_the_other() -> bool:
        return all(r.view.app(APP).upstreams[mid].remote_in_flight == 1 for r in rest)

    await rounds(cluster, each_sees_the_other, 2 * TTL)
    for r in rest:
        assert pick([r.view.app(APP).upstreams[mid]], 2, rng) is None  # 1 own + 1 other
    for r in rest:
        r.view.app(APP).end(r.view.app(APP).upstreams[mid])
    await rounds(cluster, lambda: up.remote_in_flight == 0, 2 * TTL)
    assert pick([up], 1, rng) is up


async def started_behind_a_follower(cluster: list[Replica]) -> tuple[Replica, Replica, str]:
    """The leader woke the app's machine and a follower routes to it: the leader, the
    follower and the machine."""
    leader, follower = await leader_and_follower(cluster)
    assert await leader.view.wake(APP) == "start"
    await rounds(cluster, lambda: bool(follower.view.app(APP).routable()), 4 * TTL)
    return leader, follower, next(iter(leader.view.app(APP).upstreams))


async def test_the_leader_restarts_a_machine_that_hangs_behind_a_follower(
    cluster: list[Replica],
) -> None:
    """The requests go through a follower (the leader's own proxy sees none): the
    follower's ejections in a row reach the leader in its report, and the leader restarts
    the machine. A follower that missed the restart's stop still counts its previous
    process's ejections: only what it adds after the start counts."""
    leader, follower, mid = await started_behind_a_follower(cluster)
    rt = leader.controller.apps[APP]
    up, theirs = leader.view.app(APP).upstreams[mid], follower.view.app(APP).upstreams[mid]

    def hung() -> bool:
        return rt.fleet(leader.view.app(APP)).machines[0].hung

    def eject_through_the_follower() -> None:  # what its proxy's health does
        follower.view.app(APP).failed_itself(theirs)

    follower.view.app(APP).begin(theirs)  # a request the machine never answers
    eject_through_the_follower()  # another timed out: ejected
    eject_through_the_follower()  # and its probe too
    await rounds(cluster, lambda: up.remote_failing == HUNG_AFTER, 4 * TTL)
    assert up.failing == 0
    assert hung()
    (machine,) = leader.controller.status()[0].machines
    assert (machine.hung, machine.failing, machine.hung_restarts) == (True, HUNG_AFTER, 0)
    # The follower misses the restart: it no longer listens, and runs no round meanwhile.
    assert follower._watcher is not None
    follower._watcher.cancel()
    await asyncio.gather(follower._watcher, return_exceptions=True)
    api = leader.controller.api.api
    decision = await leader.controller.tick(APP)
    assert [(a.kind, a.machine_id) for a in decision.actions] == [("restart", mid)]
    others = [r for r in cluster if r is not follower]
    await rounds(others, lambda: not rt.running, 4 * TTL)
    assert api.ops("stop_machine") == [mid]  # type: ignore[attr-defined]
    assert api.ops("start_machine") == [mid, mid]  # type: ignore[attr-defined]

    # The follower reads the view (started, as it was): its count is its old one.
    def applied_the_restart() -> bool:
        return follower._applied.get(APP) == (
            leader.cluster.lease.token,
            leader._published[APP].seq,
        )

    await rounds(cluster, applied_the_restart, 4 * TTL)
    for _ in range(3):  # and the leader read the follower's report written after that
        for r in cluster:
            await r.round()
    assert theirs.state == "started"
    assert theirs.failing == HUNG_AFTER
    assert up.remote_failing == 0
    assert not hung()
    (machine,) = leader.controller.status()[0].machines
    assert (machine.hung, machine.hung_restarts) == (False, 1)
    # The new process hangs too: the follower's next two ejections count.
    eject_through_the_follower()
    await rounds(cluster, lambda: up.remote_failing == 1, 4 * TTL)
    assert not hung()
    eject_through_the_follower()
    await rounds(cluster, lambda: up.remote_failing == HUNG_AFTER, 4 * TTL)
    assert hung()
    # A good answer through the follower: nobody reports it failing, and the leader's
    # count goes with the report.
    theirs.failing = 0
    await rounds(cluster, lambda: up.remote_failing == 0, 4 * TTL)
    assert not hung()


def held(replica: Replica) -> set[str]:
    """The machines the replica holds out of rotation until their restart."""
    return {u.id for u in replica.view.app(APP).upstreams.values() if u.held}


async def hold_a_hung_machine_on_a_lost_host(
    cluster: list[Replica],
) -> tuple[Replica, Replica, str]:
    """The app's machine started, then hung (ejected for timeouts through the follower,
    nothing else to route to) on a host Fly cannot reach: its restart waits, and the
    leader holds it out of rotation; the leader, the follower and the machine."""
    leader, follower, mid = await started_behind_a_follower(cluster)
    rt = leader.controller.apps[APP]
    up, theirs = leader.view.app(APP).upstreams[mid], follower.view.app(APP).upstreams[mid]
    leader.controller.api.api.set(APP, mid, host_status="unreachable")
    await leader.controller.tick(APP)  # reads the lost host
    # Its proxy ejected it for timeouts, nothing else to route to: that counts as hung.
    follower.view.app(APP).failed_itself(theirs, HUNG_AFTER)
    await rounds(cluster, lambda: up.remote_failing == HUNG_AFTER, 4 * TTL)
    await leader.controller.tick(APP, lazy=True)  # no read: the hold publishes itself
    assert "waits for its host" in rt.last_reason
    assert held(leader) == {mid}
    assert leader.view.app(APP).routable() == []
    return leader, follower, mid


async def test_a_hung_machine_held_out_by_the_leader_is_cordoned_for_the_followers(
    cluster: list[Replica],
) -> None:
    """A hung machine whose restart waits (for its host) is held out of rotation until
    then; the leader publishes it as cordoned, so no follower's proxy probes it either
    (a client's request that would wait ``upstream_timeout_s``). Once the host is back the
    app, which wants no machine, has it stopped, and the cordon is gone."""
    leader, follower, mid = await hold_a_hung_machine_on_a_lost_host(cluster)
    rt = leader.controller.apps[APP]
    theirs = follower.view.app(APP).upstreams[mid]
    await rounds(cluster, lambda: theirs.cordoned, 4 * TTL)
    assert follower.view.app(APP).routable() == []
    leader.controller.api.api.set(APP, mid, host_status=None)
    await leader.controller.tick(APP)
    await rounds(cluster, lambda: not rt.running, 4 * TTL)
    await leader.controller.tick(APP)  # (the hold is looked at again each tick)
    assert held(leader) == set()
    await rounds(cluster, lambda: (theirs.state, theirs.cordoned) == ("stopped", False), 4 * TTL)


async def test_a_leader_that_steps_down_lets_its_held_machines_back(
    cluster: list[Replica],
) -> None:
    """The new leader holds what it finds hung; a hold left in the old leader's view would
    keep the machine from its proxy for good (only a new start clears it)."""
    leader, _, mid = await hold_a_hung_machine_on_a_lost_host(cluster)
    await leader._step_down()
    assert [u.id for u in leader.view.app(APP).routable()] == [mid]
    assert held(leader) == set()


def test_a_failing_count_is_counted_from_the_machines_last_start() -> None:
    from autoscaler.control.replica import _FailingBase

    base = _FailingBase(started_at=1.0, base={"r1": 2, "r2": 1})
    assert base.count({"r1": 2, "r2": 1}) == 0  # all of the previous process
    assert base.count({"r1": 3, "r2": 1}) == 1  # one more ejection through r1
    assert base.count({"r1": 3, "r2": 1, "r3": 2}) == 2  # r3 had no base
    assert base.count({"r1": 1}) == 1  # r1 saw the start: counts from zero; r2 none
    assert base.base == {"r1": 0}
    assert base.count({"r1": 2, "r2": 1}) == 2


async def test_no_failing_base_outlives_its_apps_view(redis_server: str, key_prefix: str) -> None:
    """What other replicas reported of an app's failing machines when each last started
    (``_FailingBase``) was kept for good once a reload took the app away (its view gone,
    the app was skipped, and its bases never dropped): one entry per such app."""
    from autoscaler.control.view import MachineInfo
    from autoscaler.state.cluster import AppLoad, Report

    replica = make(redis_server, key_prefix, "r0", FakeMachinesAPI())
    try:
        replica.view.app(APP).set_machines([MachineInfo("m1", "127.0.0.1", 8000, "started", False)])
        load = AppLoad(area=0.0, level=0, failing={"m1": 1})
        replica.cluster.others = {"r1": Report("r1", "b", False, 0.0, 0.0, {APP: load})}
        replica._apply_remote_failing({APP})
        assert replica.view.app(APP).upstreams["m1"].remote_failing == 1
        replica.view.remove_app(APP)  # a reload's removal; r1 was reloaded too
        replica.cluster.others = {"r1": Report("r1", "b", False, 0.0, 0.0, {})}
        replica._apply_remote_failing(set())
        assert replica._failing_bases == {}
    finally:
        await replica.cluster.redis.aclose()


async def test_the_leaders_snapshot_counts_a_followers_long_lived_connections(
    redis_server: str, key_prefix: str
) -> None:
    """A scale-down takes the machines without long-lived connections first: the leader's
    snapshot counted only its own proxy's, and a follower's report did not carry its
    own, so the leader could drain the machine carrying the follower's WebSockets. The
    follower reports them per machine (through the report's JSON); the leader adds them
    to its own."""
    from autoscaler.control.runtime import MachineRecord
    from autoscaler.control.view import MachineInfo
    from autoscaler.state.cluster import AppLoad, Report

    api = FakeMachinesAPI()
    leader, follower = (make(redis_server, key_prefix, rid, api) for rid in ("r0", "r1"))
    try:
        for r in (leader, follower):
            r.view.app(APP).set_machines(
                [MachineInfo(m, "127.0.0.1", 8000, "started", False) for m in ("m1", "m2")]
            )
        follower.view.app(APP).upstreams["m1"].long_lived = 2  # idle WebSockets: none in flight
        loads, _ = follower._loads()
        entry = AppLoad.from_json(loads[APP].to_json(0.0))
        leader.cluster.others = {"r1": Report("r1", "b", False, 0.0, 0.0, {APP: entry})}
        leader.view.app(APP).upstreams["m2"].long_lived = 1  # the leader's own
        busy, _ = leader._remote_apps()
        leader._apply_remote_load(busy)
        rt = leader.controller.apps[APP]
        rt.machines = {m: MachineRecord(m, "started") for m in ("m1", "m2")}
        snaps = rt.fleet(leader.view.app(APP)).machines
        assert {s.id: (s.long_lived, s.in_flight) for s in snaps} == {"m1": (2, 0), "m2": (1, 0)}
        # The WebSockets close, idle (nothing touches the app's view): the next report
        # says so all the same, not the count of when the app was last measured.
        follower.view.app(APP).upstreams["m1"].long_lived = 0
        loads, measured = follower._loads()
        assert APP in measured
        assert loads[APP].long_lived == {}
    finally:
        for r in (leader, follower):
            await r.cluster.redis.aclose()


async def test_a_removed_app_s_peaks_do_not_come_back_from_an_old_config_s_report(
    redis_server: str, key_prefix: str
) -> None:
    """A rollout removes an app: our reload forgets what we kept of it (its peaks among
    them, ``Cluster.forget``), and a replica still on the old config goes on reporting
    it. Its peaks were noted again every round, kept for good, and the first sample of
    the app, added back later, carried a burst long gone. Reports of apps we do not
    scale keep no state; those of ours are noted as before."""
    from autoscaler.state.cluster import AppLoad, Cluster

    gone = "gone"
    replica = make(redis_server, key_prefix, "r0", FakeMachinesAPI(), apps=(APP, gone), lead=False)
    old = Cluster(
        ClusterSettings(redis_url=SecretStr(redis_server), replica_id="old", key_prefix=key_prefix)
    )
    try:
        busy = AppLoad(area=1.0, level=0, peak=3)
        await old.publish({APP: busy, gone: busy}, None)
        await replica.round()
        assert set(replica.cluster.load._peaks) == {APP, gone}
        await replica.controller.update_settings(
            replica.settings.model_copy(update={"apps": replica.settings.apps[:1]})
        )
        assert gone not in replica.cluster.load._peaks  # forgotten
        await old.publish({APP: busy, gone: AppLoad(area=2.0, level=0, peak=5)}, None)
        await replica.round()
        assert set(replica.cluster.load._peaks) == {APP}
    finally:
        await old.close()
        await replica.stop()


async def test_status_and_metrics_show_the_cluster(cluster: list[Replica]) -> None:
    await rounds(
        cluster,
        lambda: len(leaders(cluster)) == 1 and all(len(r.cluster.others) == 2 for r in cluster),
        2 * TTL,
    )
    (leader,) = leaders(cluster)
    follower = next(r for r in cluster if r is not leader)
    follower.view.app(APP).hold()
    for _ in range(2):  # the follower publishes, then the leader reads it
        for r in cluster:
            await r.round()
    doc: dict[str, Any] = leader.status_document()
    assert doc["leader"] == leader.cluster.replica_id
    assert doc["leading"] is True
    assert doc["may_lead"] is True
    assert sorted(r["id"] for r in doc["replicas"]) == ["r0", "r1", "r2"]
    theirs = next(r for r in doc["replicas"] if r["id"] == follower.cluster.replica_id)
    assert theirs["apps"][APP]["held"] == 1
    assert 0 <= theirs["report_age_s"] < cluster_module.REPORT_TTL_S
    g = leader.metrics.registry.get_sample_value
    assert g("autoscaler_cluster_leader") == 1
    assert g("autoscaler_cluster_replicas") == 3
    assert follower.metrics.registry.get_sample_value("autoscaler_cluster_leader") == 0
    # A follower is ready once it has the leader's view, and its idle loop is no problem.
    admin = AdminServer(AdminSettings(), follower.metrics, follower.controller)
    admin.cluster = follower
    assert admin.readiness_problems() == []
    assert admin.control_problems() == []
    assert admin.status_document()["cluster"]["leader"] == leader.cluster.replica_id


def test_autoscaler_status_prints_the_cluster() -> None:
    from autoscaler.status import render

    doc = {
        "version": "x",
        "ready": True,
        "control_loop": True,
        "apps": [],
        "cluster": {
            "replica": "b",
            "leader": "a",
            "leading": False,
            "redis_ok": False,
            "view_pushes_applied": 7,
            "self_wakes": 1,
            "actions_fenced": 0,
            "replicas": [
                {"id": "b", "leader": False, "report_age_s": 0.1, "apps": {APP: {"held": 2}}},
                {
                    "id": "a",
                    "leader": True,
                    "report_age_s": 0.3,
                    "apps": {APP: {"in_flight": 4, "held": 0}},
                },
            ],
        },
    }
    text = "\n".join(render(doc))
    assert "a follower (the cluster's leader decides)" in text
    assert "cluster: this replica b is a follower; leader a" in text
    doc["cluster"]["may_lead"] = False
    assert "this replica b is a proxy-only follower (cluster.lead: false); leader a" in "\n".join(
        render(doc)
    )
    assert "redis UNREACHABLE; view pushes applied 7; self-wakes 1; actions fenced 0" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("  ")]
    assert rows[1][:2] == ["b", "no"]
    assert rows[1][-2:] == ["0", "2"]
    assert rows[2][:2] == ["a", "yes"]
    assert rows[2][-2:] == ["4", "0"]


async def test_a_redis_outage_stops_deciding_keeps_routing_and_heals(
    own_redis: Any, key_prefix: str
) -> None:
    api = FakeMachinesAPI()
    mid = api.add(APP, "started")
    replicas = [make(own_redis.url, key_prefix, f"r{i}", api, ttl=TTL) for i in range(2)]
    for r in replicas:
        await r.start(rounds=False)
    try:
        await rounds(replicas, lambda: len(leaders(replicas)) == 1, 2 * TTL)
        (leader,) = leaders(replicas)
        (follower,) = [r for r in replicas if r is not leader]
        await leader.controller.tick(APP)
        await rounds(replicas, lambda: bool(follower.view.app(APP).routable()), 2 * TTL)
        own_redis.stop()
        # The leader stops deciding by its lease deadline; both keep routing to the
        # started machine they know.
        await rounds(replicas, lambda: not leaders(replicas), 2 * TTL)
        assert leader.controller.apps[APP].loop is None
        for r in replicas:
            assert [u.id for u in r.view.app(APP).routable()] == [mid]
            assert r.status_document()["redis_ok"] is False
        own_redis.start()  # Redis returns (empty: it kept nothing on disk)
        await rounds(replicas, lambda: len(leaders(replicas)) == 1, 4 * TTL)
        (new,) = leaders(replicas)
        await new.controller.tick(APP)
        assert api.ops("start_machine") == []  # nothing started twice: it was started
        assert all(r.status_document()["redis_ok"] for r in replicas)
    finally:
        for r in replicas:
            await r.stop()


@pytest.mark.parametrize("new_leader", ["the same", "a replica that saw no fence"])
async def test_followers_take_the_new_leaders_view_after_redis_came_back_empty(
    own_redis: Any, key_prefix: str, new_leader: str
) -> None:
    """Followers order the leader's views by fence. Redis came back empty, the fence
    started again from 1, and a follower dropped every view of the new leader (routing
    to a machine it had stopped) until the fence passed the old one, maybe never. (A
    lost counter now starts again from Redis's clock: this is a Redis whose clock went
    back, the case the replicas' own floor and the followers' rule still cover.)"""
    import redis

    with redis.Redis(host="127.0.0.1", port=own_redis.port) as admin:
        admin.set(f"{key_prefix}:fence", 7)  # a few leaderships already
    api = FakeMachinesAPI()
    first = api.add(APP, "started")
    leader = make(own_redis.url, key_prefix, "l", api, ttl=TTL)
    follower = make(own_redis.url, key_prefix, "f", api, lead=False, ttl=TTL)  # routes only
    replicas = [leader, follower]
    for r in replicas:
        await r.start(rounds=False)
    try:
        await rounds(replicas, lambda: leader.leading, 2 * TTL)
        assert leader.cluster.lease.token == 8
        await leader.controller.tick(APP)

        def routes() -> list[str]:
            return [u.id for u in follower.view.app(APP).routable()]

        await rounds(replicas, lambda: routes() == [first], 2 * TTL)
        own_redis.stop()
        await rounds(replicas, lambda: not leader.leading, 3 * TTL)
        own_redis.start()  # back, empty
        # ... and with a clock behind the old one's (a failover to another host): its
        # counter, started again from Redis's clock, is below the fences handed out before.
        with redis.Redis(host="127.0.0.1", port=own_redis.port) as admin:
            admin.set(f"{key_prefix}:fence", 0)
        if new_leader != "the same":
            await leader.stop()
            replicas = [follower, make(own_redis.url, key_prefix, "n", api)]
            await replicas[1].start(rounds=False)
        (deciding,) = [r for r in replicas if r.cluster.lease.replica_id != "f"]
        await rounds(replicas, lambda: deciding.leading, 4 * TTL)
        if new_leader == "the same":
            assert deciding.cluster.lease.token == 9  # above every fence it saw, not 1
        second = api.add(APP, "started")
        api.set(APP, first, state="stopped")
        await deciding.controller.tick(APP)
        await rounds(replicas, lambda: routes() == [second], 10 * TTL)
    finally:
        for r in replicas:
            await r.stop()
        await leader.stop()


async def test_a_new_leaders_push_is_applied_at_once_after_redis_came_back_empty(
    own_redis: Any, key_prefix: str
) -> None:
    """Redis came back empty and a replica that had seen no fence took the lease: its
    fence started again from 1, below the one the followers had applied, so they dropped
    every view it pushed (a stopped machine stayed routable) until their next read of its
    report, and would have taken the views a stale leader still pushed for its own."""
    import redis

    with redis.Redis(host="127.0.0.1", port=own_redis.port) as admin:
        admin.set(f"{key_prefix}:fence", 7)  # a few leaderships already
    api = FakeMachinesAPI()
    first = api.add(APP, "started")
    leader = make(own_redis.url, key_prefix, "l", api)
    follower = make(own_redis.url, key_prefix, "f", api, lead=False)
    await leader.start(rounds=False)
    await follower.start(rounds=False)
    new: Replica | None = None
    try:
        await rounds([leader, follower], lambda: leader.leading, 2 * TTL)
        await leader.controller.tick(APP)

        def routes() -> list[str]:
            return [u.id for u in follower.view.app(APP).routable()]

        await rounds([leader, follower], lambda: routes() == [first], 2 * TTL)
        await leader.stop()
        own_redis.stop()
        follower.subscribed.clear()
        own_redis.start()  # back, empty
        await asyncio.wait_for(follower.subscribed.wait(), 10)  # listening again
        new = make(own_redis.url, key_prefix, "n", api)  # never saw a fence
        await new.start(rounds=False)
        await rounds([new], lambda: new is not None and new.leading, 4 * TTL)
        second = api.add(APP, "started")
        api.set(APP, first, state="stopped")
        await new.controller.tick(APP)

        async def pushed() -> None:  # no round of the follower: the push alone
            while routes() != [second]:
                await follower.view.app(APP).changed()

        await asyncio.wait_for(pushed(), 5)
    finally:
        await follower.stop()
        await leader.stop()
        if new is not None:
            await new.stop()


def test_the_replica_label_is_there_in_cluster_mode_only() -> None:
    from prometheus_client import generate_latest

    metrics = Metrics(CollectorRegistry(), version="1.2.3")
    metrics.declare_app(APP)
    metrics.cluster_replicas.set(1)
    # A single process exports exactly what its registry holds: no replica label at all.
    assert generate_latest(metrics.exported) == generate_latest(metrics.registry)
    assert b"replica=" not in generate_latest(metrics.exported)
    metrics.set_replica("r7")
    samples = [
        line
        for line in generate_latest(metrics.exported).decode().splitlines()
        if line and not line.startswith("#")
    ]
    cluster_wide = ("autoscaler_build_info", "autoscaler_cluster_replicas")
    for line in samples:
        assert ('replica="r7"' in line) != line.startswith(cluster_wide), line
    assert 'autoscaler_queued_requests{app="web",replica="r7"} 0.0' in samples
    assert "autoscaler_cluster_replicas 1.0" in samples
    # The registry itself (what the code and tests read) is unchanged.
    assert metrics.registry.get_sample_value("autoscaler_queued_requests", {"app": APP}) == 0


async def test_stop_ends_even_when_redis_swallows_a_cancellation(
    redis_server: str, key_prefix: str
) -> None:
    """redis-py returned from a PUBLISH cancelled in flight as if nothing happened, and
    the pusher went back to waiting for its next change: stop() waited for it for ever.
    It now cancels again until the task ends."""
    api = FakeMachinesAPI()
    api.add(APP, "stopped")
    leader = make(redis_server, key_prefix, "l", api)
    await leader.start(rounds=False)
    stopped = False
    try:
        await rounds([leader], lambda: leader.leading, 2 * TTL)
        sending = asyncio.Event()

        async def swallowing_push(push: Any) -> None:
            sending.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)

        leader.cluster.push_view = swallowing_push  # type: ignore[method-assign]
        await leader.controller.tick(APP)  # reads the machines: a change to push
        await asyncio.wait_for(sending.wait(), 10)
        await asyncio.wait_for(leader.stop(), 10)
        stopped = True
    finally:
        if not stopped:
            await leader.stop()


async def test_a_drain_taken_back_under_a_wake_claim_is_uncordoned_in_the_api(
    redis_server: str, key_prefix: str
) -> None:
    """The wake returns once the machine routes in our view; the claim was released then,
    and the uncordon still on its way was refused by the claim's fence: the next list
    cordoned the machine again, and nothing routed to it."""
    from autoscaler.scaling.policy import Action

    api = FakeMachinesAPI()
    mid = api.add(APP, "started")
    leader = make(redis_server, key_prefix, "l", api, rng=lambda: 0.0)
    await leader.start(rounds=False)
    try:
        await rounds([leader], lambda: leader.leading, 2 * TTL)
        await leader.controller.tick(APP)
        rt = leader.controller.apps[APP]
        view = leader.view.app(APP)
        up = view.upstreams[mid]
        view.begin(up)  # a request in flight: the drain waits for it, cordoned
        leader.controller.actuator.launch(rt, Action("drain", mid, "test"))
        loop = asyncio.get_running_loop()
        since = loop.time()
        while not api.get(APP, mid).cordoned:
            assert loop.time() - since < 10, "no cordon"
            await asyncio.sleep(0.01)
        assert await asyncio.wait_for(leader.view.wake(APP), 5) == "uncordon"  # taken back
        await asyncio.wait_for(leader.controller.idle(), 5)
        assert leader.api.refused == 0
        assert api.get(APP, mid).cordoned is False
        view.end(up)
        await leader.controller.tick(APP)
        assert [u.id for u in view.routable()] == [mid]
    finally:
        await leader.stop()


async def test_a_leaders_take_back_another_holder_refuses_wakes_another_machine(
    redis_server: str, key_prefix: str
) -> None:
    """A cordon of ours left on a started machine routes at once when the app is wanted,
    and the claim is held until its uncordon is done. Another holder's lease (a deploy)
    refused that uncordon, the machine cordoned again, yet the wake said "uncordon" with
    nothing routable: the leader's proxy asked again after WAKE_RETRY_S, and a follower's
    request that the wake served, only at its next ask. Now the wake, under its claim,
    waits for that uncordon's answer and goes on: the other machine, resumed.

    As the metrics and the logs tell it: one wake, timed once, by how it ended (a
    resume). Before, the waker timed and logged the take-back as a wake of its own
    ("uncordon", as the machine routed), then the leader woke again and timed the resume
    from that second try's start: two observations of autoscaler_wake_duration_seconds
    and two ``wake`` lines for one wake, the resume's shorter than the held requests'
    wait."""
    api = FakeMachinesAPI()
    left = api.add(APP, "started", cordoned=True, metadata={CORDON_METADATA_KEY: "drain"})
    api.take_lease(APP, left, owner="fly deploy")
    asleep = api.add(APP, "suspended")
    # (rng: its loop's first tick a minute on, and none of the test's own: the wake reads.)
    leader = make(redis_server, key_prefix, "l", api, rng=lambda: 0.99)
    await leader.start(rounds=False)
    try:
        await rounds([leader], lambda: leader.leading, 2 * TTL)
        with capture_logs() as logs:
            assert await asyncio.wait_for(leader.view.wake(APP), 10) == "resume"
        assert [u.id for u in leader.view.app(APP).routable()] == [asleep]
        assert api.get(APP, left).cordoned is True
        assert api.ops("uncordon_machine") == []
        woke = [e for e in logs if e["event"] == "wake"]
        assert [(e["how"], e["machine"]) for e in woke] == [("resume", asleep)]

        def sample(name: str, **labels: str) -> float:
            value = leader.metrics.registry.get_sample_value(name, {"app": APP, **labels})
            return 0.0 if value is None else value

        count = "autoscaler_wake_duration_seconds_count"
        assert sample(count, kind="uncordon") == 0
        assert sample(count, kind="resume") == 1
        assert sample("autoscaler_wakes_total", result="ok") == 1
    finally:
        await leader.stop()


async def test_a_leaders_wake_that_every_machine_refused_says_so(
    redis_server: str, key_prefix: str
) -> None:
    """The claim is ours, and the only machine, a take-back, is leased by another party
    (a deploy) on every try. The wake's error says so; it said "the wake claim was not
    free within the wake timeout", as if another replica held the claim."""
    api = FakeMachinesAPI()
    left = api.add(APP, "started", cordoned=True, metadata={CORDON_METADATA_KEY: "drain"})
    api.take_lease(APP, left, owner="fly deploy")
    leader = make(redis_server, key_prefix, "l", api, rng=lambda: 0.99, wake_timeout_s=1.0)
    await leader.start(rounds=False)
    try:
        await rounds([leader], lambda: leader.leading, 2 * TTL)
        with pytest.raises(WakeError) as caught:
            await asyncio.wait_for(leader.view.wake(APP), 10)
        assert "leased by another party" in str(caught.value)
        assert left in str(caught.value)
        assert "claim" not in str(caught.value)
        assert api.ops("uncordon_machine") == []
    finally:
        await leader.stop()


async def test_a_leaders_wake_kept_from_the_claim_names_its_holder(
    redis_server: str, key_prefix: str
) -> None:
    """Another replica holds the app's wake claim for the whole wake timeout: the
    leader's wake says who (as Redis names the holder)."""
    api = FakeMachinesAPI()
    api.add(APP, "suspended")
    leader = make(redis_server, key_prefix, "l", api, rng=lambda: 0.99, wake_timeout_s=1.0)
    await leader.start(rounds=False)
    client = aioredis.Redis.from_url(redis_server, decode_responses=True)
    try:
        await rounds([leader], lambda: leader.leading, 2 * TTL)
        other = WakeClaims(client, key_prefix, "r9", 30.0)
        held = await other.take(APP)
        assert held is not None
        with pytest.raises(WakeError) as caught:
            await asyncio.wait_for(leader.view.wake(APP), 10)
        assert "held by replica r9" in str(caught.value)
        assert api.ops("start_machine") == []
        await held.release()
    finally:
        await client.aclose()
        await leader.stop()


async def test_a_follower_on_the_same_host_never_adopts_the_lease_of_the_leaders_drain(
    redis_server: str, key_prefix: str
) -> None:
    """Replicas of one host (``--workers``) decide concurrently: a follower's self-wake
    must not take over (as a lost lease of its own) the lease that the leader's drain
    holds, uncordon the machine and give that lease back, while the drain goes on to
    suspend it."""
    api = FakeMachinesAPI()
    mid = api.add(APP, "started")
    # A 2-4 s pause keeps the lease.
    leader = make(redis_server, key_prefix, "w0", api, rng=lambda: 0.0, ttl=5.0)
    follower = make(redis_server, key_prefix, "w1", api, self_wake_after_s=0.05, ttl=5.0)
    await leader.start(rounds=False)
    await follower.start(rounds=False)
    try:
        await rounds([leader], lambda: leader.leading, 5)
        await leader.controller.tick(APP)
        rt = leader.controller.apps[APP]
        view = leader.view.app(APP)
        up = view.upstreams[mid]
        view.begin(up)  # a request in flight on the leader's side: its drain waits, cordoned
        leader.controller.actuator.launch(rt, Action("drain", mid, "scale to zero"))
        await until(lambda: api.get(APP, mid).cordoned, what="the drain's cordon")
        drain_nonce = api.lease(APP, mid).nonce
        await rounds([leader, follower], lambda: not follower.view.app(APP).routable(), 5)
        # The leader hangs (no rounds, no pub/sub) within its lease; a request waits on
        # the follower, which wakes the app itself after self_wake_after_s.
        assert leader._watcher is not None
        leader._watcher.cancel()
        follower.view.app(APP).hold()
        wake = asyncio.ensure_future(follower.view.wake(APP))

        def on_machine() -> list[tuple[str, str | None]]:
            return [(c.op, c.nonce) for c in api.calls if c.machine_id == mid]

        await until(
            lambda: on_machine().count(("acquire_machine_lease", None)) >= 2,
            what="the follower's try for the machine's lease",
        )
        during = on_machine()
        assert not wake.done()  # refused (409): it waits, it does not take the machine
        view.end(up)  # the leader is back, its drain goes on
        await until(lambda: mid not in rt.running, what="the drain's end")
        assert ("uncordon_machine", drain_nonce) not in during
        assert ("release_machine_lease", drain_nonce) not in during
        wake.cancel()  # no rounds here: nobody would tell the follower the drain ended
    finally:
        await follower.stop()
        await leader.stop()


async def test_a_leader_that_hung_past_its_lease_sends_no_start_from_its_stale_tick(
    redis_server: str, key_prefix: str
) -> None:
    """A tick's start while nothing is routable runs under the app's wake claim; a
    leader whose lease lapsed (SIGSTOP, a long pause) and whose tick runs before its
    round steps it down must not send that start: its decision is stale."""
    api = FakeMachinesAPI()
    api.add(APP, "stopped")
    # Their loops' first ticks come a minute on (rng 0.99 of tick_s 60): the ticks here are
    # the test's own (a loop's tick at a random offset once started m01 while old still led).
    old, new = (
        make(redis_server, key_prefix, rid, api, rng=lambda: 0.99, ttl=TTL)
        for rid in ("old", "new")
    )
    for r in (old, new):
        await r.start(rounds=False)
    try:
        await rounds([old], lambda: old.leading, 2 * TTL)
        await old.controller.tick(APP)  # reads the app: one stopped machine
        for r in (old, new):  # the app now wants a machine (a reload, say)
            rt = r.controller.apps[APP]
            rt.reconfigure(rt.config.model_copy(update={"min_machines": 1}))
        await asyncio.sleep(TTL * 1.2)  # old hangs past its lease (no rounds)
        await rounds([new], lambda: new.leading, 3 * TTL)
        assert old.leading  # its round has not run yet: it does not know
        await old.controller.tick(APP)
        await asyncio.wait_for(old.controller.idle(), 5)
        assert api.ops("start_machine") == []
    finally:
        for r in (old, new):
            await r.stop()


async def test_a_follower_says_which_of_its_apps_the_leaders_config_lacks(
    redis_server: str, key_prefix: str
) -> None:
    """A config rolled out to the follower first: its new app is neither scaled nor
    published by the leader. The follower says so (once) and on /status."""
    api = FakeMachinesAPI()
    api.add(APP, "stopped")
    api.add("extra", "stopped")
    leader = make(redis_server, key_prefix, "r0", api, rng=lambda: 0.0)
    follower = make(redis_server, key_prefix, "r1", api, apps=(APP, "extra"))
    for r in (leader, follower):
        await r.start(rounds=False)
    try:
        with capture_logs() as logs:
            await rounds([leader], lambda: leader.leading, 5)
            await leader.controller.tick(APP)
            await rounds([leader, follower], lambda: follower.view_known, 5)
            for _ in range(5):  # more whole reads: said once all the same
                for r in (leader, follower):
                    await r.round()
        assert follower.status_document()["apps_unknown_to_leader"] == ["extra"]
        said = [e["app"] for e in logs if e["event"] == "app_unknown_to_leader"]
        assert said == ["extra"]
        assert leader.status_document()["apps_unknown_to_leader"] == []
    finally:
        for r in (leader, follower):
            await r.stop()


class LateLeaseReplies(FakeMachinesAPI):
    """Machine leases are taken at once, as on Fly; the answer comes once ``late`` is set."""

    late: asyncio.Event | None = None

    async def acquire_machine_lease(
        self, app: str, machine_id: str, *, ttl_s: int = 30, description: str | None = None
    ) -> Any:
        lease = await super().acquire_machine_lease(
            app, machine_id, ttl_s=ttl_s, description=description
        )
        if self.late is not None:
            await self.late.wait()
        return lease


async def test_a_leader_that_steps_down_while_taking_a_machines_lease_gives_it_back(
    redis_server: str, key_prefix: str
) -> None:
    """A leader lost its lease while the start of a wake waited for the answer to its
    machine lease (taken on Fly already). Stepping down cut that request off: the lease,
    named for the old leader, stayed on the machine for its TTL (30 s), which the new
    leader does not adopt, and the new leader's wake of the app found its only machine
    leased until the wake timed out. The answer is now awaited in the background and the
    lease given back."""
    api = LateLeaseReplies()
    mid = api.add(APP, "stopped")
    api.late = asyncio.Event()
    knobs = {"wake_timeout_s": 2.0}
    async with old_leader_waking(redis_server, key_prefix, api, knobs) as (old, new, waking):
        await until(lambda: api.lease(APP, mid) is not None, what="the start's machine lease")
        lapse(old)
        await old.round()
        assert not old.leading
        await rounds([new], lambda: new.leading, 4 * TTL)
        api.late.set()  # the answer to the old leader's request comes
        with contextlib.suppress(asyncio.CancelledError):
            await waking  # ended by the step-down
        new.view.app(APP).hold()
        assert await asyncio.wait_for(new.view.wake(APP), 10) == "start"
        assert api.ops("start_machine") == [mid]


class SlowBoots(FakeMachinesAPI):
    """A start leaves the machine ``starting`` (a cold boot) until the test says."""

    async def start_machine(
        self, app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> Any:
        result = await super().start_machine(app, machine_id, lease_nonce=lease_nonce)
        if self.get(app, machine_id).state == "started":
            self.set(app, machine_id, state="starting")
        return result


async def test_a_new_leader_waits_for_the_start_its_predecessor_left_booting(
    redis_server: str, key_prefix: str
) -> None:
    """The leader's wake started a machine and lost its lease while it booted; the
    step-down ended that wake. The new leader's wake, for the same held request, started
    a second machine instead of waiting for the first."""
    api = SlowBoots()
    api.add(APP, "stopped")
    api.add(APP, "stopped")
    async with old_leader_waking(redis_server, key_prefix, api) as (old, new, waking):
        await until(lambda: bool(api.ops("start_machine")), what="the old leader's start")
        (booting,) = api.ops("start_machine")
        assert booting is not None
        lapse(old)
        await old.round()
        with contextlib.suppress(asyncio.CancelledError):
            await waking  # ended by the step-down
        await rounds([new], lambda: new.leading, 4 * TTL)
        new.view.app(APP).hold()
        wake = new.view.wake(APP)
        await until(lambda: new.view.app(APP).waking == "start", what="the new leader's wake")
        api.set(APP, booting, state="started")  # booted
        how = await asyncio.wait_for(wake, 10)
        assert api.ops("start_machine") == [booting]
        assert how == "start"  # what the held request waited for


async def test_a_leader_stepping_down_while_a_lease_release_hangs_goes_on_reporting(
    redis_server: str, key_prefix: str
) -> None:
    """A leader lost its lease while a wake's start held a machine lease. The step-down
    cancels the start and waits for that lease's release (up to ``control.api_timeout_s``),
    an API call that a slow Machines API holds. It ran inside the round: no round for that
    long, so this replica's load report (its TTL is ``REPORT_TTL_S``, 2 s) lapsed, and the
    new leader counted none of the requests through it (it could drain a machine they were
    on). The step-down now runs in a task of its own: the rounds go on, and the lease is
    still given back before it ends."""
    api = FakeMachinesAPI()
    mid = api.add(APP, "stopped")
    # An API call's bound far above what the test waits for a round: cut at the bound,
    # the release would not hold the round past it.
    api.gates["start_machine"] = starting = asyncio.Event()
    api.gates["release_machine_lease"] = released = asyncio.Event()
    slow = {"api_timeout_s": 30.0}
    async with old_leader_waking(redis_server, key_prefix, api, old_knobs=slow) as (
        old,
        new,
        waking,
    ):
        await until(lambda: bool(api.ops("start_machine")), what="the wake's start")
        lapse(old)
        stepping_down = asyncio.create_task(old.round())
        await until(stepping_down.done, what="the round that steps down to end")
        stepping_down.result()
        assert not old.leading
        await until(lambda: bool(api.ops("release_machine_lease")), what="the release")
        assert api.lease(APP, mid) is not None  # its release hangs
        # The old leader's rounds go on: the new leader counts the request it holds.
        await rounds(
            [old, new], lambda: new.leading and new.cluster.remote_demand(APP) == 1, 4 * TTL
        )
        assert api.lease(APP, mid) is not None
        released.set()
        await old.stepped_down()
        assert api.lease(APP, mid) is None  # given back
        rt = old.controller.apps[APP]
        assert rt.loop is None
        assert not rt.running
        with contextlib.suppress(asyncio.CancelledError):
            await waking  # ended by the step-down
        assert api.ops("start_machine") == [mid]  # the old leader's start was cut at the gate
        starting.set()


async def test_a_replica_that_leads_again_while_it_steps_down_starts_once_it_is_over(
    redis_server: str, key_prefix: str
) -> None:
    """Its lease lapsed locally (a pause) and the step-down waits for a machine lease's
    release; the next renewal finds the lease still ours. Its controller starts once the
    stop is over, not beside it: the rounds go on, and it leads after."""
    api = FakeMachinesAPI()
    api.add(APP, "stopped")
    r = make(redis_server, key_prefix, "r", api, rng=lambda: 0.99, api_timeout_s=30.0)
    await r.start(rounds=False)
    try:
        await rounds([r], lambda: r.leading, 2 * TTL)
        await r.controller.tick(APP)
        api.gates["start_machine"] = starting = asyncio.Event()
        api.gates["release_machine_lease"] = released = asyncio.Event()
        r.view.app(APP).hold()
        r.view.wake(APP)
        await until(lambda: bool(api.ops("start_machine")), what="the wake's start")
        lapse(r)  # (not renewed by this round: when its renewal fell due, it stayed leader)
        stepping_down = asyncio.create_task(r.round())
        await until(stepping_down.done, what="the round that steps down to end")
        stepping_down.result()
        await until(lambda: bool(api.ops("release_machine_lease")), what="the release")
        r._next_lease_step = 0.0
        await r.round()
        assert r.cluster.lease.held()  # renewed: still ours in Redis
        assert not r.leading  # not while the stop is under way
        assert r.controller.apps[APP].loop is None
        released.set()
        await r.stepped_down()
        await rounds([r], lambda: r.leading, 2 * TTL)
        assert r.controller.apps[APP].loop is not None
        starting.set()
    finally:
        await r.stop()


class GoneReleases(FakeMachinesAPI):
    """The release of a machine lease of app "gone" waits until the test says."""

    gone_released: asyncio.Event | None = None
    gone_releasing = False

    async def release_machine_lease(self, app: str, machine_id: str, nonce: str) -> None:
        if app == "gone" and self.gone_released is not None:
            self.gone_releasing = True
            await self.gone_released.wait()
        await super().release_machine_lease(app, machine_id, nonce)


@pytest.mark.parametrize("holding", ["a lease release", "a reload's removal"])
async def test_a_request_held_by_a_leader_stepping_down_asks_the_new_leader_at_once(
    redis_server: str, key_prefix: str, holding: str
) -> None:
    """The leader's proxy holds a request for a wake; the leader loses its lease, and its
    step-down cancels the wake's start, then waits: for the release of the machine lease
    that start held, or for a reload's removal of another app (each up to
    ``control.api_timeout_s``, from a task of its own). The app had no waker all that
    time (the follower's was set once the step-down was over): the held request asked
    nobody, although a new leader could wake the app. The follower's path is in place as
    soon as the replica stops leading, and the request asks it once the step-down has cut
    its wake: the new leader wakes the app, the step-down still under way."""
    from autoscaler.proxy.gate import Gate

    api = GoneReleases()
    first = api.add(APP, "stopped")
    second = api.add(APP, "stopped")
    gone = api.add("gone", "stopped")
    api.gates["start_machine"] = starting = asyncio.Event()
    hung = asyncio.Event()
    if holding == "a lease release":
        api.gates["release_machine_lease"] = hung
    else:
        api.gone_released = hung
    # (Its own self-wake would come after the test's wait: the new leader's wake serves.)
    slow = {"api_timeout_s": 30.0, "apps": (APP, "gone"), "self_wake_after_s": 30.0}
    steady = {"ttl": STEADY_TTL}
    async with old_leader_waking(redis_server, key_prefix, api, steady, old_knobs=slow) as (
        old,
        new,
        waking,
    ):
        reload: asyncio.Task[None] | None = None
        if holding == "a reload's removal":
            # A wake of "gone" starts its machine; a reload removes "gone": its removal
            # ends that wake and waits for the release of the start's machine lease.
            old.view.app("gone").hold()
            old.view.wake("gone")
            await until(lambda: gone in api.ops("start_machine"), what="the start of gone")
            kept = old.settings.model_copy(update={"apps": old.settings.apps[:1]})
            reload = asyncio.create_task(old.controller.update_settings(kept))
            await until(lambda: api.gone_releasing, what="the release of its lease")
        gate = Gate(old.settings.apps[0], old.view, old.metrics, random.Random(0))  # noqa: S311
        held = asyncio.create_task(gate.acquire(30))
        try:
            await until(lambda: first in api.ops("start_machine"), what="the wake's start")
            lapse(old)
            await old.round()
            assert not old.leading
            with contextlib.suppress(asyncio.CancelledError):
                await waking  # its start cancelled by the step-down
            stepping_down = asyncio.create_task(old.stepped_down())
            starting.set()  # (the cancelled start never went; the next ones go)
            # The new leader leads once the old lease is out of Redis (up to STEADY_TTL).
            await rounds([old, new], held.done, 20)
            up, _ = held.result()
            gate.done(up)
            # The new leader woke the app (the first machine's lease, the old leader's,
            # not given back yet in the first case): the step-down is still under way.
            assert new.leading
            assert up.id == (second if holding == "a lease release" else first)
            assert not stepping_down.done()
            assert old.self_wakes == 0
        finally:
            held.cancel()
            hung.set()
            if reload is not None:
                await reload
            await old.stepped_down()
            await gate.close()


async def test_a_leader_that_lost_its_lead_before_its_cordon_does_not_hold_the_machine(
    redis_server: str, key_prefix: str
) -> None:
    """The leader's drain has its key on the wire when the leader loses its lead; the
    step-down cuts the drain, the key is answered and no cordon is sent. Our key names
    that leader, which says in its report, its step-down over, that no cordon request of
    its own can land: the next leader does not hold the machine (until the key's time,
    up to MARK_BOUND_S + CORDON_UNSURE_S), and may drain it at once."""
    api = FakeMachinesAPI()
    mid = api.add(APP, "started")
    api.gates["set_machine_metadata"] = answered = asyncio.Event()
    old = make(redis_server, key_prefix, "old", api, rng=lambda: 0.99, ttl=TTL)
    new = make(redis_server, key_prefix, "new", api, rng=lambda: 0.99, ttl=TTL)
    for r in (old, new):
        await r.start(rounds=False)
    try:
        await rounds([old], lambda: old.leading, 2 * TTL)
        await old.controller.tick(APP)
        old.controller.actuator.launch(old.controller.apps[APP], Action("drain", mid, "test"))
        await until(lambda: api.ops("set_machine_metadata") == [mid], what="our key's request")
        lapse(old)
        await old.round()
        assert not old.leading
        answered.set()
        await old.stepped_down()
        config = api.get(APP, mid).config
        assert config is not None
        assert config.metadata is not None
        by = mark_by(config.metadata[CORDON_METADATA_KEY])
        assert by == f"{old.cluster.boot}.{old._led_token}"
        assert api.ops("cordon_machine") == []
        await rounds([old, new], lambda: new.leading, 20 * TTL)
        await new.controller.tick(APP)
        assert new.controller.actuator.cordon_may_land_until(APP, mid) is None
    finally:
        for r in (old, new):
            await r.stop()


class Destroyed(FakeMachinesAPI):
    """An app without machines here is one Fly does not have: its list answers 404."""

    async def list_machines(self, app: str) -> list[Any]:
        if app not in self.machines:
            await self._enter("list_machines", arg=app)
            raise NotFound(404, f"app {app} not found")
        return await super().list_machines(app)


@pytest.mark.parametrize("whose", ["the leader's", "a follower's"])
async def test_a_request_held_for_an_app_the_api_lacks_is_answered_at_once(
    redis_server: str, key_prefix: str, whose: str
) -> None:
    """One process answers a request held for an app the Machines API lacks (a 404 on
    its list) at once with a 502 (``AppMissing``). In cluster mode the wake under the
    app's wake claim reads the app first, and that read's 404 came out as a NotFound:
    the leader's own proxy held the request until its 504 at ``wake_timeout_s``, wake
    after wake. A follower never learnt that the wake the leader made for it failed so
    (its own wake only waits for a machine in the leader's view), and its self-wake
    failed as the leader's did. The leader says in its view that its wake found no
    such app, and the follower's wake that asked fails as the leader's: 502 at once.
    Until a list finds the app again: the next request is served."""
    from autoscaler.proxy.gate import Gate, NoSuchApp

    api = Destroyed()
    api.add(APP, "stopped")
    slow = {"wake_timeout_s": 30.0, "self_wake_after_s": 30.0}  # neither is what answers
    replicas = [make(redis_server, key_prefix, f"r{i}", api, **slow) for i in (0, 1)]  # type: ignore[arg-type]
    for r in replicas:
        await r.start(rounds=False)
    try:
        leader, follower = await leader_and_follower(replicas)
        for r in replicas:
            await asyncio.wait_for(r.subscribed.wait(), 5)
        del api.machines[APP]  # destroyed
        replica = leader if whose == "the leader's" else follower
        gate = Gate(replica.settings.apps[0], replica.view, replica.metrics, random.Random(0))  # noqa: S311
        held = asyncio.create_task(gate.acquire(30))
        try:
            await rounds(replicas, held.done, 10)
            with pytest.raises(NoSuchApp):
                held.result()
            assert api.ops("start_machine") == []
            # Made again: the next request wakes it (what the leader said is not kept).
            mid = api.add(APP, "stopped")
            held = asyncio.create_task(gate.acquire(30))
            await rounds(replicas, held.done, 10)
            up, _ = held.result()
            gate.done(up)
            assert up.id == mid
        finally:
            held.cancel()
            await gate.close()
    finally:
        for r in replicas:
            await r.stop()


async def test_a_leader_stopped_before_its_cordon_leaves_what_the_next_leader_needs(
    redis_server: str, key_prefix: str
) -> None:
    """As above, but the lead ends by a stop (a rolling restart): the step-down cuts the
    drain between our key and the cordon. The stop took the replica's report out, and
    with it what it says once its lead is over: the next leader held the machine until
    the key's time (up to MARK_BOUND_S + CORDON_UNSURE_S). What it says stays behind,
    under its boot id, and the stopped replica is no member: not counted, not listed."""
    api = FakeMachinesAPI()
    mid = api.add(APP, "started")
    api.gates["set_machine_metadata"] = answered = asyncio.Event()
    old = make(redis_server, key_prefix, "old", api, rng=lambda: 0.99, ttl=TTL)
    new = make(redis_server, key_prefix, "new", api, rng=lambda: 0.99, ttl=TTL)
    for r in (old, new):
        await r.start(rounds=False)
    stopping: asyncio.Task[None] | None = None
    try:
        await rounds([old, new], lambda: old.leading and "old" in new.cluster.others, 2 * TTL)
        await old.controller.tick(APP)
        old.controller.actuator.launch(old.controller.apps[APP], Action("drain", mid, "test"))
        await until(lambda: api.ops("set_machine_metadata") == [mid], what="our key's request")
        stopping = asyncio.create_task(old.stop())
        await until(lambda: not old.leading, what="the stop's step-down")
        answered.set()
        await stopping
        config = api.get(APP, mid).config
        assert config is not None
        assert config.metadata is not None
        assert (
            mark_by(config.metadata[CORDON_METADATA_KEY]) == f"{old.cluster.boot}.{old._led_token}"
        )
        assert api.ops("cordon_machine") == []
        await rounds([new], lambda: new.leading, 20 * TTL)
        await new.controller.tick(APP)
        assert new.controller.actuator.cordon_may_land_until(APP, mid) is None
        assert new.cluster.others == {}
        assert [r["id"] for r in new.status_document()["replicas"]] == ["new"]
        assert new.metrics.registry.get_sample_value("autoscaler_cluster_replicas") == 1
    finally:
        if stopping is None:
            await old.stop()
        await new.stop()


async def test_a_leader_that_stops_steps_down_at_info_one_that_lost_its_lease_at_warning(
    redis_server: str, key_prefix: str
) -> None:
    """Stepping down because we stop (a clean stop, each worker's in a rolling restart) is
    expected, but logged ``cluster_follower`` at warning, as a lost lease is (trouble)."""
    api = FakeMachinesAPI()
    api.add(APP, "stopped")
    lost, stops = (make(redis_server, key_prefix, rid, api, ttl=TTL) for rid in ("lost", "stops"))
    running = [lost, stops]
    for r in running:
        await r.start(rounds=False)
    try:
        with capture_logs() as logs:
            await rounds([lost], lambda: lost.leading, 5)
            lapse(lost)
            await rounds([lost], lambda: not lost.leading, 5)
            await lost.stepped_down()
            await rounds([stops], lambda: stops.leading, 5)  # once the lapsed lease expires
            running.remove(stops)
            await stops.stop()
        said = [(e["replica"], e["log_level"]) for e in logs if e["event"] == "cluster_follower"]
        assert said == [("lost", "warning"), ("stops", "info")]
    finally:
        for r in running:
            await r.stop()


@pytest.mark.parametrize("between", [True, False])
async def test_a_follower_routes_an_app_a_reload_removed_and_added_back(
    redis_server: str, key_prefix: str, between: bool
) -> None:
    """A follower kept, per app, the version of the leader's view it applied last (and
    whether that view said the app was missing) after a reload took the app away: added
    back, the app's new view was not given the leader's machines, the same version as
    applied before, until the leader's view of it changed. A re-added app starts clean,
    also when the reload that adds it back comes before any round found it gone (what
    was applied was forgotten only by a round that did: ``between=False`` failed so)."""
    api = FakeMachinesAPI()
    mid = api.add(APP, "started")
    leader = make(redis_server, key_prefix, "r0", api, rng=lambda: 0.99)
    follower = make(redis_server, key_prefix, "r1", api)
    both = [leader, follower]
    for r in both:
        await r.start(rounds=False)
    try:
        await rounds([leader], lambda: leader.leading, 5)
        await leader.controller.tick(APP)
        routed = follower.view.app(APP).routable
        await rounds(both, lambda: [u.id for u in routed()] == [mid], 5)
        settings = follower.settings
        await follower.controller.update_settings(settings.model_copy(update={"apps": []}))
        if between:
            for r in both:  # a round that finds the app gone
                await r.round()
        await follower.controller.update_settings(settings)
        routed = follower.view.app(APP).routable
        await rounds(both, lambda: [u.id for u in routed()] == [mid], 5)
    finally:
        for r in both:
            await r.stop()


@pytest.mark.parametrize("was", ["listed", "missing"])
async def test_a_leaders_first_view_of_an_app_a_reload_added_back_is_fresh(
    redis_server: str, key_prefix: str, was: str
) -> None:
    """The leader kept what it last published of an app a reload took away (its machines,
    numbered; whether its wake found no such app): added back, the app published its old
    view until its first list (its loop's first tick, or a wake), with machines that may
    be long gone, or saying "missing" (a follower's wake then failed at once). Its first
    view now is of the app as added back: no machines yet, not missing."""
    from autoscaler.control.wake import AppMissing

    api = Destroyed()
    if was == "listed":
        api.add(APP, "started")
    leader = make(redis_server, key_prefix, "r0", api, rng=lambda: 0.99)
    follower = make(redis_server, key_prefix, "r1", api)
    both = [leader, follower]
    for r in both:
        await r.start(rounds=False)

    async def published() -> tuple[list[list[Any]], bool]:
        await leader.round()
        await follower.cluster.read()
        said = follower.cluster.leader_fleet()
        assert said is not None
        return said[1][APP].machines, said[1][APP].missing

    try:
        await rounds([leader], lambda: leader.leading, 5)
        if was == "listed":
            await leader.controller.tick(APP)
        else:
            with pytest.raises(AppMissing):
                await leader.view.wake(APP)
        assert await published() != ([], False)  # what the old view said
        settings = leader.settings
        await leader.controller.update_settings(settings.model_copy(update={"apps": []}))
        await leader.controller.update_settings(settings)
        assert await published() == ([], False)
    finally:
        for r in both:
            await r.stop()


async def test_no_wake_claim_lock_outlives_the_takes_that_use_it(
    redis_server: str, key_prefix: str
) -> None:
    """A replica takes an app's wake claim under a lock of the app's, so that two of its
    tasks never take each other's claim for another replica's. The locks were kept, one
    per app ever woken, those a reload removed too (without end, with reloads that
    rename apps). A lock is kept only while a take holds it or waits for it: two takes
    at once still see each other (the second finds the claim ours), and after a wake
    and the app's removal, nothing of it is left."""
    from autoscaler.control.replica import _OURS
    from autoscaler.state.claim import Claim

    api = FakeMachinesAPI()
    api.add(APP, "stopped")
    leader = make(redis_server, key_prefix, "r0", api, rng=lambda: 0.99)
    await leader.start(rounds=False)
    try:
        await rounds([leader], lambda: leader.leading, 5)
        first, second = await asyncio.gather(leader._take_claim(APP), leader._take_claim(APP))
        assert isinstance(first, Claim)
        assert second is _OURS
        assert leader._claim_locks == {}
        async with leader._holding(first):
            pass  # released
        await leader.controller.tick(APP)
        assert await leader.view.wake(APP) == "start"
        await leader.controller.update_settings(leader.settings.model_copy(update={"apps": []}))
        assert leader._claim_locks == {}
    finally:
        await leader.stop()


def _load_kept(replica: Replica, app: str) -> list[str]:
    """What ``replica``'s cluster keeps of ``app``'s load, by name."""
    c = replica.cluster
    kept = {
        "area": app in c.local.area,
        "own peak": app in c.local._peaks,
        "previous sample": app in c.load._prev,
        "others' peaks": app in c.load._peaks,
        "others' arrivals": any(key[1] == app for key in c._arrivals),
    }
    return [name for name, there in kept.items() if there]


async def test_an_app_a_reload_drops_leaves_no_load_and_comes_back_clean(
    redis_server: str, key_prefix: str
) -> None:
    """Each replica kept per app ever seen its area and peak, the leader its previous
    sample, the others' peaks and their last requests' times: a reload that dropped apps
    freed none of it, and an app added back resumed from it (the leader's first sample
    of it spanned the time it was away). All of it goes with the app: at once for an app
    the controller scaled (``on_removed``), at the next round for one that was static
    (the proxy drops its view); the leader's first sample of an app added back is a
    baseline, as a new app's."""
    api = FakeMachinesAPI()
    api.add(APP, "stopped")
    leader, follower = (
        make(redis_server, key_prefix, rid, api, rng=lambda: 0.99, ttl=STEADY_TTL)
        for rid in ("r0", "r1")
    )
    both = [leader, follower]
    for r in both:
        await r.start(rounds=False)
    try:
        await rounds(both, lambda: leader.leading, 5)
        for r in both:  # a request each, measured and reported
            r.view.app(APP).hold()
            r.view.app("static").hold()
        for _ in range(2):
            for r in both:
                await r.round()
        for r in both:
            r.view.app(APP).release()
            r.view.app("static").release()
        for _ in range(2):
            for r in both:
                await r.round()
        sample, _ = leader.load(APP, leader.clock())
        assert _load_kept(leader, APP) == ["area", "previous sample", "others' arrivals"]
        # The peaks of an app we do not scale are not kept: no sample takes them.
        assert _load_kept(leader, "static") == ["area"]
        assert _load_kept(follower, APP) == ["area", "own peak", "others' peaks"]
        settings = leader.settings
        for r in both:
            await r.controller.update_settings(settings.model_copy(update={"apps": []}))
            assert _load_kept(r, APP) == []
        await leader.controller.update_settings(settings)  # back before any round
        again, _ = leader.load(APP, leader.clock())
        assert again.start == again.end > sample.end
        for r in both:
            r.view.remove_app("static")  # as the proxy does with a static app dropped
            await r.round()
            assert _load_kept(r, "static") == []
    finally:
        for r in both:
            await r.stop()


@pytest.mark.parametrize("lead", ["first", "again"])
async def test_a_new_leader_does_not_wake_an_app_for_peaks_it_saw_while_following(
    redis_server: str, key_prefix: str, lead: str
) -> None:
    """A follower records its own peaks and the others' (for the samples it makes once
    it leads), and nothing took them out while it followed: its first sample as leader
    carried the largest peak seen since it started, however long ago, which the load
    windows take for activity now (``last_active``); leading again, that sample spanned
    the time since its last lead's, and its load counted as activity now too. An app at
    zero whose last request is past its idle time was woken by the new leader's first
    tick. Its samples begin anew with its lead: at rest, the app stays at zero."""
    api = FakeMachinesAPI()
    mid = api.add(APP, "stopped")
    old, new = (
        make(redis_server, key_prefix, rid, api, rng=lambda: 0.99, idle_to_zero_s=0, ttl=STEADY_TTL)
        for rid in ("old", "new")
    )
    both = [old, new]

    async def give_up(leader: Replica) -> None:  # the other leads at its next round
        lapse(leader)
        await leader.cluster.lease.release()

    for r in both:
        await r.start(rounds=False)
    try:
        if lead == "again":  # "new" leads and samples first, then follows
            await rounds([new], lambda: new.leading, 5)
            assert (await new.controller.tick(APP)).desired == 0
            await give_up(new)
            await rounds(both, lambda: old.leading and not new.leading, 5)
            await new.stepped_down()
            new._next_lease_step = 0.0  # it may lead again
        await rounds(both, lambda: old.leading, 5)
        for r in both:  # a request each, come and gone while "old" leads
            r.view.app(APP).hold()
        await rounds(both, lambda: APP in new.cluster.load._peaks, 5)  # it read old's
        for r in both:
            r.view.app(APP).release()
        await rounds(both, lambda: APP not in new._moving and APP not in old._moving, 5)
        await give_up(old)
        await rounds(both, lambda: new.leading, 5)
        decision = await new.controller.tick(APP)
        assert (decision.desired, decision.actions) == (0, ())
        assert api.machines[APP][mid].state == "stopped"
    finally:
        for r in both:
            await r.stop()


async def test_a_new_leader_adopts_the_lease_of_the_drain_its_dead_predecessor_left(
    redis_server: str, key_prefix: str
) -> None:
    """The leader died mid-drain: the machine cordoned, under its Fly lease, named for
    it. The new leader's wake for a held request routed to the machine (a drain taken
    back), but lifting the cordon was skipped as "leased by another holder", and the
    machine stayed cordoned on Fly until that lease lapsed (30 s): the lease of a
    replica known gone, which Redis no longer lets act, is adopted now."""
    api = FakeMachinesAPI()
    mid = api.add(APP, "started")
    old = make(redis_server, key_prefix, "old", api, rng=lambda: 0.0, ttl=TTL)
    new = make(redis_server, key_prefix, "new", api, ttl=TTL)
    await old.start(rounds=False)
    await new.start(rounds=False)
    try:
        await rounds([old], lambda: old.leading, 5)
        await rounds([old, new], lambda: "old" in new.cluster.others, 5)
        await old.controller.tick(APP)
        view = old.view.app(APP)
        view.begin(view.upstreams[mid])  # a request in flight: the drain waits, cordoned
        old.controller.actuator.launch(
            old.controller.apps[APP], Action("drain", mid, "scale to zero")
        )

        def cordoned() -> bool:  # (its rounds renew its short lease meanwhile)
            return api.get(APP, mid).cordoned and not new.view.app(APP).routable()

        await rounds([old, new], cordoned, 5)
        drain_nonce = api.lease(APP, mid).nonce
        # It dies: no round any more, its lease in Redis lapses, its report expires (as
        # it does REPORT_TTL_S after its last write). The machine's lease stays.
        assert old._watcher is not None
        old._watcher.cancel()
        await new.cluster.redis.delete(new.cluster.report_key("old"))
        await rounds([new], lambda: new.leading, 10 * TTL)
        new.view.app(APP).hold()
        with capture_logs() as logs:
            await asyncio.wait_for(new.view.wake(APP), 10)
            await new.controller.idle()
        assert [u.id for u in new.view.app(APP).routable()] == [mid]
        assert not api.get(APP, mid).cordoned
        assert ("uncordon_machine", drain_nonce) in [(c.op, c.nonce) for c in api.calls]
        [adopted] = [e for e in logs if e["event"] == "lease_adopted"]
        assert adopted["former"] == "old"
    finally:
        await new.stop()
        await old.stop()


async def test_only_the_lease_of_a_replica_gone_that_cannot_act_is_adopted(
    redis_server: str, key_prefix: str
) -> None:
    """A wake's start whose replica died holding the machine's lease: the leader's start
    of the app's only machine was skipped until that lease lapsed (30 s), longer than a
    held request's wake_timeout_s. It is adopted now, but never while the replica is
    live (replicas on one host decide concurrently), nor while Redis still lets it act
    (a wake claim of it: it hangs, or only its reports are cut off), nor a lease that is
    not ours (a deploy's)."""
    api = FakeMachinesAPI()
    mid = api.add(APP, "stopped")
    api.add(APP, "started")  # so that our starts go without the app's wake claim
    old = make(redis_server, key_prefix, "old", api, lead=False)
    new = make(redis_server, key_prefix, "new", api)
    await old.start(rounds=False)
    await new.start(rounds=False)
    rt = new.controller.apps[APP]
    its = "autoscaler@old: start"

    async def start(holder: str, *, adopted: bool) -> list[dict[str, Any]]:
        lease = api.take_lease(APP, mid, owner=holder)
        with capture_logs() as logs:
            new.controller.actuator.launch(rt, Action("start", mid, "a held request"))
            await new.controller.idle()
        done = [(c.op, c.nonce) for c in api.calls if c.op == "start_machine"]
        assert done == ([("start_machine", lease.nonce)] if adopted else [])
        return [e for e in logs if e.get("machine") == mid]

    try:
        await rounds([old, new], lambda: new.leading and "old" in new.cluster.others, 5)
        await new.controller.tick(APP)
        [live] = await start(its, adopted=False)
        assert live["event"] == "machine_leased_by_other"
        claim = await old.cluster.claims.take(APP)
        assert claim is not None
        # It dies: its report expires (as it does REPORT_TTL_S after its last write).
        await new.cluster.redis.delete(new.cluster.report_key("old"))
        await new.round()
        assert "old" not in new.cluster.others
        [held] = await start(its, adopted=False)  # its wake claim lets it act
        assert held["event"] == "machine_leased_by_other"
        await claim.release()
        [deploy] = await start("flyctl deploy", adopted=False)
        assert deploy["event"] == "machine_leased_by_other"
        adopted, *_ = await start(its, adopted=True)
        assert (adopted["event"], adopted["former"]) == ("lease_adopted", "old")
        assert api.get(APP, mid).state == "started"
        assert api.lease(APP, mid) is None  # given back at the end
    finally:
        await new.stop()
        await old.stop()


async def adopts_olds_lease(new: Replica, api: FakeMachinesAPI, mid: str, lease: Lease) -> None:
    """``new`` joins after replica "old" left ``lease`` (of a start) on ``mid``: it leads,
    knows "old" gone, and starts the machine under that lease (adopted)."""
    await new.start(rounds=False)
    await rounds([new], lambda: new.leading, 5)
    assert "old" in new.cluster.gone
    await new.controller.tick(APP)
    with capture_logs() as logs:
        new.controller.actuator.launch(
            new.controller.apps[APP], Action("start", mid, "a held request")
        )
        await new.controller.idle()
    done = [(c.op, c.nonce) for c in api.calls if c.op == "start_machine"]
    assert done == [("start_machine", lease.nonce)]
    [adopted] = [e for e in logs if e["event"] == "lease_adopted"]
    assert adopted["former"] == "old"


async def test_a_replica_that_joined_after_the_holder_died_adopts_its_lease(
    redis_server: str, key_prefix: str
) -> None:
    """A replica died holding a machine's lease (a wake's start), and another replica's
    read found its report expired and unlisted it, before this one joined: this one never
    saw it a member, so its lease was waited out (30 s) and the app's only machine not
    started meanwhile. The unlisting leaves its id behind (``Cluster.gone_key``): it is
    gone to this replica too, and its lease adopted."""
    api = FakeMachinesAPI()
    mid = api.add(APP, "stopped")
    api.add(APP, "started")  # so that our starts go without the app's wake claim
    old = make(redis_server, key_prefix, "old", api, lead=False)
    witness = make(redis_server, key_prefix, "witness", api, lead=False)
    await old.start(rounds=False)
    await witness.start(rounds=False)
    new: Replica | None = None
    try:
        await rounds([old, witness], lambda: "old" in witness.cluster.others, 5)
        # It dies: its report expires (as it does REPORT_TTL_S after its last write), and
        # the witness's next read unlists it.
        await witness.cluster.redis.delete(witness.cluster.report_key("old"))
        await witness.round()
        assert not await witness.cluster.redis.sismember(witness.cluster.replicas_key, "old")
        lease = api.take_lease(APP, mid, owner="autoscaler@old: start")
        new = make(redis_server, key_prefix, "new", api)
        await adopts_olds_lease(new, api, mid, lease)
    finally:
        if new is not None:
            await new.stop()
        await witness.stop()
        await old.stop()


async def test_a_replica_that_joined_after_a_follower_stopped_adopts_the_lease_it_left(
    redis_server: str, key_prefix: str
) -> None:
    """A follower that never led stops cleanly (a rolling restart) while a lease of its
    own stays on a machine (its stop cut the acquire of a self-wake's start, or the
    release). It leaves no ``settled`` record (it has nothing to say) and takes its report
    out at once: a replica that joins after that never saw it a member, and waited its
    lease out (30 s), the app's only machine not started meanwhile. Its stop leaves its id
    in ``Cluster.gone_key``: it is gone to this replica too, and its lease adopted."""
    api = FakeMachinesAPI()
    mid = api.add(APP, "stopped")
    api.add(APP, "started")  # so that our starts go without the app's wake claim
    old = make(redis_server, key_prefix, "old", api, lead=False)
    await old.start(rounds=False)
    new: Replica | None = None
    try:
        await old.round()
        await old.stop()
        lease = api.take_lease(APP, mid, owner="autoscaler@old: start")
        new = make(redis_server, key_prefix, "new", api)
        await adopts_olds_lease(new, api, mid, lease)
    finally:
        if new is not None:
            await new.stop()
