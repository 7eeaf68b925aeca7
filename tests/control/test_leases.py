"""Machine leases around every action: our nonce on every change, released at the end, kept
alive through a long sequence, and a machine leased by someone else skipped, never fought."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from testkit import PROFILES, on_profile

from autoscaler.config import AppConfig, ControlSettings, EmulatorApp, EmulatorSettings, Settings
from autoscaler.control.controller import Controller
from autoscaler.control.leases import Held, Leases
from autoscaler.control.view import FleetView
from autoscaler.emulator import Emulator
from autoscaler.fly import models as m
from autoscaler.fly.client import MachinesClient
from autoscaler.fly.errors import (
    FlyError,
    LeaseHeld,
    NotFound,
    RateLimited,
    ServerError,
    TransportError,
)
from autoscaler.metrics import Metrics
from autoscaler.scaling.fleet import CORDON_METADATA_KEY

from .fakes import FakeClock, FakeMachinesAPI, settle
from .test_controller import APP, Rig, assert_uncordoned, state

CHANGES = {
    "start_machine",
    "stop_machine",
    "suspend_machine",
    "cordon_machine",
    "uncordon_machine",
    "set_machine_metadata",
    "delete_machine_metadata",
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def api(clock: FakeClock) -> FakeMachinesAPI:
    return FakeMachinesAPI(clock=clock)


def changes(api: FakeMachinesAPI, mid: str) -> list[tuple[str, str | None]]:
    return [(c.op, c.nonce) for c in api.calls if c.op in CHANGES and c.machine_id == mid]


def lease_ops(api: FakeMachinesAPI, mid: str) -> list[str]:
    return [c.op for c in api.calls if c.op.endswith("_lease") and c.machine_id == mid]


async def test_a_drain_runs_inside_one_lease_and_every_change_carries_its_nonce(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    mid = api.add(APP, "started")
    rig = Rig(api, clock, idle_to_zero_s=5)
    await rig.tick()
    await clock.advance(6)
    [action] = (await rig.tick()).actions
    assert action.kind == "drain"
    await rig.ctl.idle()
    assert state(api, mid) == "suspended"
    assert_uncordoned(api, mid)
    done = changes(api, mid)
    assert [op for op, _ in done] == [
        "set_machine_metadata",
        "cordon_machine",
        "suspend_machine",
        "uncordon_machine",
        "delete_machine_metadata",
    ]
    [nonce] = {n for _, n in done}
    assert nonce is not None
    assert lease_ops(api, mid) == ["acquire_machine_lease", "release_machine_lease"]
    assert api.lease(APP, mid) is None
    [acquire] = [c for c in api.calls if c.op == "acquire_machine_lease"]
    assert acquire.arg is not None
    assert acquire.arg.startswith("autoscaler@")  # who holds it, for `fly machine leases`


async def test_a_wake_holds_a_lease_around_its_start(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    mid = api.add(APP, "suspended")
    rig = Rig(api, clock)
    assert await rig.ctl.wake(APP) == "resume"
    await rig.ctl.idle()
    [(op, nonce)] = changes(api, mid)
    assert op == "start_machine"
    assert nonce is not None
    assert lease_ops(api, mid) == ["acquire_machine_lease", "release_machine_lease"]
    assert api.lease(APP, mid) is None


async def test_a_long_suspend_keeps_its_lease_alive(api: FakeMachinesAPI, clock: FakeClock) -> None:
    mid = api.add(APP, "started")
    rig = Rig(api, clock, idle_to_zero_s=5)
    await rig.tick()
    api.gates["suspend_machine"] = gate = asyncio.Event()  # a suspend that takes its time
    await clock.advance(6)
    await rig.tick()
    await settle()
    lease = api.lease(APP, mid)
    assert lease is not None
    first_expiry = lease.expires_at
    await clock.advance(25)  # close to the 30 s TTL: refreshed twice meanwhile
    assert lease_ops(api, mid).count("refresh_machine_lease") == 2
    assert api.lease(APP, mid) is lease
    assert (lease.expires_at or 0) >= (first_expiry or 0) + 20
    await clock.advance(20)  # past the first TTL: still ours
    assert api.lease(APP, mid) is lease
    gate.set()
    await rig.ctl.idle()
    assert state(api, mid) == "suspended"
    assert api.lease(APP, mid) is None


async def test_a_lease_renewed_after_it_lapsed_is_kept_under_its_new_nonce(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """Refreshes failed for longer than the TTL (an API outage), and the next one took a
    new lease, as the emulator does: the keeper dropped its nonce, so our changes, the
    release and our next take met 409 from our own lease until it lapsed."""
    api.lapsed_refresh_renews = True
    mid = api.add(APP, "started")
    leases = Leases(api, sleep=clock.sleep, ttl_s=30)
    held = await leases.take(APP, mid, "drain")
    first = held.nonce
    api.fail["refresh_machine_lease"] = [ServerError(503, "outage")] * 3
    for _ in range(10):  # refreshes at 10, 20 and 30 s fail; the lease lapses at 30 s;
        await clock.advance(5)  # the one at 40 s takes a new lease
    await settle()
    lease = api.lease(APP, mid)
    assert lease is not None
    assert lease.nonce != first
    assert held.nonce == lease.nonce
    await leases.release(held)
    assert api.lease(APP, mid) is None  # given back under the new nonce
    again = await leases.take(APP, mid, "wake")  # not refused by a lease of our own
    await leases.release(again)


async def test_a_machine_leased_by_another_is_skipped_counted_and_retried_later(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    first, second = api.add(APP, "suspended"), api.add(APP, "suspended")
    deploy = api.take_lease(APP, first, owner="fly deploy", ttl_s=600)
    rig = Rig(api, clock)
    for _ in range(7):  # one machine's worth of held requests
        rig.app.hold()
    await clock.advance(1)
    [action] = (await rig.tick()).actions
    assert action.machine_id == first
    await rig.ctl.idle()
    assert changes(api, first) == []  # skipped: nothing sent without the holder's nonce
    assert state(api, first) == "suspended"
    assert rig.metric("autoscaler_lease_conflicts_total") == 1
    [status] = rig.ctl.status()
    assert status.leased_by_others == (first,)
    assert status.last_error is None  # a lease held by another is no failure of ours
    # The next tick leaves it alone and wakes the other machine instead.
    await clock.advance(0.5)
    [action] = (await rig.tick()).actions
    assert action.machine_id == second
    await rig.ctl.idle()
    assert state(api, second) == "started"
    # Once the deploy lets go, a later action on it goes through.
    await api.release_machine_lease(APP, first, deploy.nonce)
    assert await rig.ctl.wake(APP) == "none"  # the second serves already
    for _ in range(14):
        rig.app.hold()
    await clock.advance(2)
    actions = (await rig.tick()).actions
    assert [(a.kind, a.machine_id) for a in actions] == [("resume", first)]
    await rig.ctl.idle()
    assert state(api, first) == "started"
    [status] = rig.ctl.status()
    assert status.leased_by_others == ()
    assert rig.metric("autoscaler_lease_conflicts_total") == 1


async def test_a_wake_passes_over_a_leased_machine(api: FakeMachinesAPI, clock: FakeClock) -> None:
    first, second = api.add(APP, "suspended"), api.add(APP, "stopped")
    api.take_lease(APP, first, owner="fly deploy")
    rig = Rig(api, clock)
    assert await rig.ctl.wake(APP) == "start"
    assert api.ops("start_machine") == [second]
    assert rig.routable() == {second}


@pytest.mark.parametrize("refused", ["take", "call"])
async def test_an_uncordon_another_holder_refuses_leaves_the_machine_cordoned(
    api: FakeMachinesAPI, clock: FakeClock, refused: str
) -> None:
    """A drain left behind on a started machine (a leader that died mid-drain) is routed
    at once when the app is wanted, ahead of the uncordon. Another holder's lease refused
    that uncordon (at its take: the dead leader's lease, not ours to adopt, or a
    deploy's; or at its call: ours lapsed and was taken), yet our record kept the machine
    uncordoned: routed, and counted as serving, while Fly still had it cordoned, until
    the next list. The record says cordoned again; the next tick lifts the cordon."""
    left = api.add(APP, "started", cordoned=True, metadata={CORDON_METADATA_KEY: "drain"})
    if refused == "take":
        holder = api.take_lease(APP, left, owner="autoscaler@old: drain")
    else:
        api.fail["uncordon_machine"] = [LeaseHeld(409, "lease currently held by fly deploy")]
    rig = Rig(api, clock)
    assert await rig.ctl.wake(APP) == "uncordon"  # routed at once, as before
    await rig.ctl.idle()
    assert rig.metric("autoscaler_lease_conflicts_total") == 1
    assert api.get(APP, left).cordoned is True
    assert rig.ctl.apps[APP].machines[left].cordoned is True
    assert rig.routable() == set()
    if refused == "take":
        await api.release_machine_lease(APP, left, holder.nonce)
    await rig.serve_through_next_tick(left)  # wanted: the drain is taken back again


async def test_a_wake_waits_for_a_lease_when_every_machine_is_leased(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    mid = api.add(APP, "suspended")
    deploy = api.take_lease(APP, mid, owner="fly deploy")
    rig = Rig(api, clock)
    wake = asyncio.ensure_future(rig.ctl.wake(APP))
    await clock.advance(1)
    assert not wake.done()  # held, not refused: the deploy lets go soon
    assert api.ops("start_machine") == []
    await api.release_machine_lease(APP, mid, deploy.nonce)
    for _ in range(8):  # tried again once its one-tick skip is over
        if wake.done():
            break
        await clock.advance(0.5)
    assert await wake == "resume"
    assert rig.routable() == {mid}


async def test_a_drain_taken_back_hands_its_lease_to_the_uncordon(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    api.add(APP, "started")
    api.add(APP, "started")
    rig = Rig(api, clock, scale_down_delay_s=3)
    await rig.tick()
    for up in rig.app.upstreams.values():
        rig.app.begin(up)  # 2 in flight want 1 machine; the drain waits for its request
    await clock.advance(5)
    [action] = (await rig.tick()).actions
    assert action.kind == "drain"
    mid = action.machine_id
    assert api.get(APP, mid).cordoned is True
    rt = rig.ctl.apps[APP]
    assert rt.running[mid].waiting
    assert rig.ctl.actuator.take_back(rt, mid) is not None  # as a wake or the policy does
    await rig.ctl.idle()
    assert_uncordoned(api, mid)
    nonces = {n for _, n in changes(api, mid)}
    assert len(nonces) == 1
    assert None not in nonces
    assert lease_ops(api, mid) == ["acquire_machine_lease", "release_machine_lease"]


async def test_a_suspend_taken_back_hands_its_lease_to_the_resume(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    api.slow_transitions = True  # the suspend stays "suspending" until taken back
    mid = api.add(APP, "started")
    rig = Rig(api, clock, idle_to_zero_s=5)
    await rig.tick()
    await clock.advance(6)
    [action] = (await rig.tick()).actions
    assert action.kind == "drain"
    assert state(api, mid) == "suspending"
    assert await asyncio.wait_for(rig.ctl.wake(APP), 5) == "resume"
    await rig.ctl.idle()
    assert state(api, mid) == "started"
    nonces = {n for _, n in changes(api, mid)}
    assert len(nonces) == 1
    assert None not in nonces
    assert lease_ops(api, mid) == ["acquire_machine_lease", "release_machine_lease"]


async def test_a_lease_whose_answer_was_lost_is_adopted(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """An acquire that reached Fly but whose answer never came back left a lease of ours;
    our owner in its description lets us (or the next process on this host) adopt it."""
    mid = api.add(APP, "suspended")
    rig = Rig(api, clock)
    owner = rig.ctl.actuator.leases.description("resume")
    lost = api.take_lease(APP, mid, owner=owner, ttl_s=30)
    assert await rig.ctl.wake(APP) == "resume"
    await rig.ctl.idle()
    assert changes(api, mid) == [("start_machine", lost.nonce)]
    assert api.lease(APP, mid) is None  # and given back at the end


async def test_a_lease_that_former_names_is_adopted_and_no_other(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """``former`` (a replica's: control/replica.py) is asked about a holder that is not
    us, and the lease of the one it names is adopted as our own; the others (a live
    replica's, a deploy's) are refused."""
    mid = api.add(APP, "stopped")
    leases = Leases(api, sleep=clock.sleep, clock=clock, owner="autoscaler@r2")
    asked: list[tuple[str, str]] = []

    async def former(app: str, description: str) -> str | None:
        asked.append((app, description))
        return "r1" if description.startswith("autoscaler@r1: ") else None

    leases.former = former
    for holder in ("autoscaler@r3: drain", "flyctl deploy"):
        api.take_lease(APP, mid, owner=holder)
        with pytest.raises(LeaseHeld):
            await leases.take(APP, mid, "start")
    left = api.take_lease(APP, mid, owner="autoscaler@r1: drain")
    with capture_logs() as logs:
        held = await leases.take(APP, mid, "start")
    assert held.nonce == left.nonce
    [adopted] = [e for e in logs if e["event"] == "lease_adopted"]
    assert adopted["former"] == "r1"
    await leases.release(held)
    assert api.lease(APP, mid) is None
    ours = api.take_lease(APP, mid, owner=leases.description("start"))
    held = await leases.take(APP, mid, "start")
    assert held.nonce == ours.nonce
    await leases.release(held)
    assert asked == [
        (APP, "autoscaler@r3: drain"),
        (APP, "flyctl deploy"),
        (APP, "autoscaler@r1: drain"),
    ]  # not about our own lease


async def test_a_take_cancelled_as_its_answer_comes_gives_the_lease_back_first(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A drain taken back just as its lease's acquire answers: the uncordon that follows
    takes the machine's lease after that one is given back. Before, the give-back was
    queued behind the uncordon's acquire, which our own lease refused (409, then read
    back after the release: a conflict with nobody, and the uncordon skipped)."""
    mid = api.add(APP, "started")
    leases = Leases(api, sleep=clock.sleep)
    gate = api.gates["acquire_machine_lease"] = asyncio.Event()
    drain = asyncio.ensure_future(leases.take(APP, mid, "drain"))
    await settle()
    taken: list[asyncio.Future[Held]] = []

    def take_back(_: object) -> None:  # the acquire has answered; its caller not yet resumed
        drain.cancel()
        taken.append(asyncio.ensure_future(leases.take(APP, mid, "uncordon")))

    leases._acquiring[(APP, mid)].add_done_callback(take_back)
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await drain
    held = await taken[0]
    lease = api.lease(APP, mid)
    assert lease is not None
    assert lease.nonce == held.nonce
    assert lease_ops(api, mid) == [
        "acquire_machine_lease",
        "release_machine_lease",
        "acquire_machine_lease",
    ]
    leases.release_soon(held)
    await leases.settled()


async def test_a_failed_acquire_is_an_action_failure_that_cools_down(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    first, second = api.add(APP, "suspended"), api.add(APP, "suspended")
    api.fail["acquire_machine_lease"] = [ServerError(503, "lease service down")]
    rig = Rig(api, clock)
    assert await rig.ctl.wake(APP) == "resume"
    assert api.ops("start_machine") == [second]
    assert first in rig.ctl.apps[APP].cooldown
    assert rig.metric("autoscaler_lease_conflicts_total") == 0


async def test_a_lease_taken_mid_sequence_ends_it_as_a_skip(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """Our lease lapsed (a long outage) and a deploy took the machine: the next change is
    refused with 409, the drain ends there, and the suspend is not forced as a stop."""
    mid = api.add(APP, "started")
    rig = Rig(api, clock, idle_to_zero_s=5)
    await rig.tick()
    api.fail["suspend_machine"] = [LeaseHeld(409, "leased by fly deploy")]
    await clock.advance(6)
    await rig.tick()
    await rig.ctl.idle()
    assert api.ops("stop_machine") == []
    assert rig.metric("autoscaler_lease_conflicts_total") == 1
    assert mid in rig.ctl.apps[APP].leased_by_others


async def test_stopping_the_controller_mid_action_gives_the_lease_back(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    mid = api.add(APP, "started")
    rig = Rig(api, clock, idle_to_zero_s=5)
    await rig.tick()
    api.gates["suspend_machine"] = asyncio.Event()
    await clock.advance(6)
    await rig.tick()
    await settle()
    assert api.lease(APP, mid) is not None
    await rig.ctl.stop()
    assert api.lease(APP, mid) is None


async def test_a_stop_waits_for_a_lease_release_no_longer_than_api_timeout_s(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """An API that never answers held a SIGTERM's stop for as long as the client waits
    for one call (fly.timeout_s, 30 s) per release, after the proxy's drain. The stop
    gives up after control.api_timeout_s: the lease lapses after its TTL."""
    mid = api.add(APP, "started")
    rig = Rig(api, clock, idle_to_zero_s=5)
    control = rig.ctl.settings.control.model_copy(update={"api_timeout_s": 0.1})
    rig.ctl.settings = rig.ctl.settings.model_copy(update={"control": control})
    await rig.tick()
    api.gates["suspend_machine"] = asyncio.Event()
    api.gates["release_machine_lease"] = asyncio.Event()  # never set: no answer
    await clock.advance(6)
    await rig.tick()
    await settle()
    assert api.lease(APP, mid) is not None
    with capture_logs() as logs:
        async with asyncio.timeout(10):  # the release alone would hold it for good
            await rig.ctl.stop()
    assert [(e["event"], e["machine"]) for e in logs if "lease" in e["event"]] == [
        ("lease_release_failed", mid)
    ]
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("lease-release:")]


async def test_a_step_down_leaves_a_self_wake_s_slow_lease_release_to_answer(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """Cluster mode: a replica steps down (``stop(handover=True)``) while a wake of its
    own (a follower's self-wake, which may run while the step-down waits) has its lease
    release on the way, the API slow to answer. The step-down waits no longer than
    ``control.api_timeout_s`` and then leaves the release to answer: it cut it off, and
    the lease stayed on the machine for its TTL though the replica lives on (the next
    leader skipped the machine meanwhile, the lease being another owner's to it)."""
    mid = api.add(APP, "suspended")
    rig = Rig(api, clock)
    control = rig.ctl.settings.control.model_copy(update={"api_timeout_s": 0.1})
    rig.ctl.settings = rig.ctl.settings.model_copy(update={"control": control})
    await rig.tick()
    api.gates["release_machine_lease"] = answered = asyncio.Event()
    assert await rig.ctl.wake_uncounted(APP) == "resume"
    await settle()
    assert api.ops("release_machine_lease") == [mid]
    async with asyncio.timeout(10):
        await rig.ctl.stop(handover=True)
    answered.set()
    await rig.ctl.actuator.leases.settled()
    assert api.lease(APP, mid) is None
    await rig.ctl.stop()


# -- end to end, against the emulator's leases -----------------------------------------------


@pytest.fixture(params=PROFILES)
def emulator_settings(
    emulator_settings: EmulatorSettings, request: pytest.FixtureRequest
) -> EmulatorSettings:
    """Fast timings, and Fly's: suspends that take seconds, cold starts of about 2 s."""
    return on_profile(emulator_settings, request.param, apps=[EmulatorApp(name=APP, machines=1)])


async def test_the_controller_skips_a_machine_a_deploy_holds_then_acts_once_released(
    emulator: Emulator,
) -> None:
    sent: list[str] = []
    async with MachinesClient(
        emulator.url, emulator.token, rate_limit=False, observer=lambda op, _s, _d: sent.append(op)
    ) as client:
        [machine] = await client.list_machines(APP)
        assert machine.state == "stopped"
        deploy = await client.acquire_machine_lease(
            APP, machine.id, ttl_s=60, description="fly deploy"
        )
        app = AppConfig(name=APP, min_machines=1, idle_to_zero_s=600, scale_down_delay_s=600)
        settings = Settings(apps=[app], control=ControlSettings(tick_s=0.05))
        ctl = Controller(client, FleetView(), settings, Metrics(CollectorRegistry()))

        def conflicts() -> float:
            value = ctl.metrics.registry.get_sample_value(
                "autoscaler_lease_conflicts_total", {"app": APP}
            )
            return value or 0.0

        async def until(check: Callable[[], bool]) -> None:
            async with asyncio.timeout(20):
                while not check():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ctl.view.app(APP).changed(), 0.05)

        await ctl.start()
        try:
            await until(lambda: conflicts() >= 2)  # tried, skipped, and tried again later
            [status] = ctl.status()
            assert status.leased_by_others == (machine.id,)
            assert "start_machine" not in sent
            assert emulator.machine(APP, machine.id).state == "stopped"
            await client.release_machine_lease(APP, machine.id, deploy.nonce)
            await until(lambda: len(ctl.view.app(APP).routable()) == 1)
        finally:
            await ctl.stop()
    assert emulator.machine(APP, machine.id).state == "started"
    assert sent.count("start_machine") == 1
    with pytest.raises(NotFound):
        async with MachinesClient(emulator.url, emulator.token) as check:
            await check.get_machine_lease(APP, machine.id)  # ours was given back


async def test_our_lease_whose_release_failed_does_not_block_our_next_action(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A wake's release met a 500 and the read-back of the 409 that followed a 429 (an
    outage ending): our own lease refused the drain after it, skipped as "leased by
    another" until the lease lapsed. The nonce we kept carries the drain at once."""
    mid = api.add(APP, "suspended")
    rig = Rig(api, clock, idle_to_zero_s=5)
    api.fail["release_machine_lease"] = [ServerError(500, "outage")]
    assert await rig.ctl.wake(APP) == "resume"
    await rig.ctl.idle()
    left = api.lease(APP, mid)
    assert left is not None  # still ours: the release failed
    api.fail["get_machine_lease"] = [ServerError(429, "rate limited")]
    await rig.tick()
    await clock.advance(6)
    [action] = (await rig.tick()).actions
    assert action.kind == "drain"
    await rig.ctl.idle()
    assert state(api, mid) == "suspended"
    assert rig.metric("autoscaler_lease_conflicts_total") == 0
    assert {n for _, n in changes(api, mid)} == {left.nonce}
    assert api.lease(APP, mid) is None  # given back this time


async def test_a_failed_release_s_nonce_never_takes_over_another_s_lease(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """The release landed though its answer was a 500, and a deploy took the machine:
    the nonce we kept is refused (409), and the take is the deploy's skip, as ever."""
    mid = api.add(APP, "started")
    leases = Leases(api, sleep=clock.sleep, clock=clock)
    held = await leases.take(APP, mid, "drain")
    api.fail["release_machine_lease"] = [ServerError(500, "answer lost")]
    await leases.release(held)
    del api.leases[(APP, mid)]  # it had landed
    api.take_lease(APP, mid, owner="fly deploy")
    with pytest.raises(LeaseHeld):
        await leases.take(APP, mid, "uncordon")
    assert lease_ops(api, mid)[-3:] == [
        "refresh_machine_lease",  # with our old nonce: refused, forgotten
        "acquire_machine_lease",
        "get_machine_lease",
    ]
    with pytest.raises(LeaseHeld):  # and not tried again
        await leases.take(APP, mid, "uncordon")
    assert lease_ops(api, mid)[-2:] == ["acquire_machine_lease", "get_machine_lease"]


async def test_a_refresh_carried_out_whose_answer_was_lost_adopts_the_lease_it_made(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A release carried out whose answer was lost leaves its nonce remembered; the next
    take refreshes it, and that refresh, carried out with its answer lost too, made a new
    lease (as the emulator renews a nonce whose lease is gone). The take went on under
    the old nonce: every change met our own new lease (409), and the action was skipped
    as "leased by another" until that lease lapsed. The refresh names us, and the lease
    it made is read back and adopted (the emulator's answer_lost_rate, end to end:
    test_e2e_answer_lost.py)."""
    mid = api.add(APP, "started")
    api.lapsed_refresh_renews = True
    leases = Leases(api, sleep=clock.sleep, clock=clock)
    held = await leases.take(APP, mid, "start")
    api.fail["release_machine_lease"] = [TransportError("Server disconnected")]
    await leases.release(held)
    del api.leases[(APP, mid)]  # it had been carried out
    refresh = api.refresh_machine_lease

    async def answer_lost(*args: Any, **kwargs: Any) -> m.Lease:
        await refresh(*args, **kwargs)
        raise TransportError("RemoteProtocolError: Server disconnected", sent=True)

    api.refresh_machine_lease = answer_lost  # type: ignore[method-assign]
    again = await leases.take(APP, mid, "drain")
    made = api.lease(APP, mid)
    assert made is not None
    assert made.description == leases.description("drain")
    assert again.nonce == made.nonce != held.nonce
    await leases.release(again)
    assert api.lease(APP, mid) is None


@pytest.mark.parametrize(
    "error",
    [RateLimited(429, "rate limited"), TransportError("connection refused", sent=False)],
    ids=["429", "not-sent"],
)
async def test_a_refresh_that_could_not_have_landed_is_not_read_back(
    api: FakeMachinesAPI, clock: FakeClock, error: FlyError
) -> None:
    """The refresh of a lease whose release failed met a 429 or was never sent: it made
    no lease, so there is nothing to read back and adopt. The read went anyway, one more
    call into an API that is failing on each try of a wake; the take carries on under
    the nonce it holds, as before."""
    mid = api.add(APP, "started")
    leases = Leases(api, sleep=clock.sleep, clock=clock)
    held = await leases.take(APP, mid, "start")
    api.fail["release_machine_lease"] = [ServerError(503, "outage")]
    await leases.release(held)
    api.fail["refresh_machine_lease"] = [error]
    again = await leases.take(APP, mid, "drain")
    assert again.nonce == held.nonce
    assert lease_ops(api, mid)[2:] == ["refresh_machine_lease"]  # no get_machine_lease
    await leases.release(again)
    assert api.lease(APP, mid) is None


async def test_a_stop_gives_back_the_lease_an_acquire_without_an_answer_made(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """An acquire carried out whose answer was lost left a lease of ours whose nonce we
    never saw; no later take adopted it (the wake went to another machine). The stop left
    it on the machine until its TTL, refusing a deploy; it reads it back and gives it
    back. One taken since by someone else (a deploy) is left alone."""
    mid, taken = api.add(APP, "stopped"), api.add(APP, "stopped")
    leases = Leases(api, sleep=clock.sleep, clock=clock)
    acquire = api.acquire_machine_lease

    async def answer_lost(*args: Any, **kwargs: Any) -> m.Lease:
        await acquire(*args, **kwargs)
        raise TransportError("RemoteProtocolError: Server disconnected", sent=True)

    api.acquire_machine_lease = answer_lost  # type: ignore[method-assign]
    for machine in (mid, taken):
        with pytest.raises(TransportError):
            await leases.take(APP, machine, "start")
    del api.leases[(APP, taken)]  # lapsed, and a deploy took it
    deploy = api.take_lease(APP, taken, owner="fly deploy")
    await leases.aclose(1.0)
    assert api.lease(APP, mid) is None
    assert api.lease(APP, taken) is deploy


async def test_a_stop_releases_our_lease_whose_release_failed(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """A release that met a 500 left our lease on the machine, remembered for our next
    take of it. The stop forgot it, and it refused a deploy (or the next process, or the
    next leader) until its TTL lapsed; the stop gives it back. One that lapsed by our
    count is left alone: its nonce may be another's now."""
    mid, lapsed = api.add(APP, "started"), api.add(APP, "started")
    leases = Leases(api, sleep=clock.sleep, clock=clock)
    api.fail["release_machine_lease"] = [ServerError(500, "outage")] * 2
    await leases.release(await leases.take(APP, lapsed, "drain"))
    await clock.advance(leases.ttl_s)
    held = await leases.take(APP, mid, "drain")
    await leases.release(held)
    assert api.lease(APP, mid) is not None  # still ours: the release failed
    await leases.aclose(1.0)
    assert api.lease(APP, mid) is None
    released = [(c.machine_id, c.nonce) for c in api.calls if c.op == "release_machine_lease"]
    assert released[-1] == (mid, held.nonce)
    assert api.ops("release_machine_lease").count(lapsed) == 1  # not tried again


@pytest.mark.parametrize("cut", [True, False])
async def test_a_stop_gives_a_remembered_lease_back_no_longer_than_its_bound(
    api: FakeMachinesAPI, clock: FakeClock, cut: bool
) -> None:
    """The API hangs at the stop: the release of the remembered lease is given up after
    the stop's bound (``cut``: a process's stop) or left to answer (a step-down: the
    replica lives on), logged, never raised; the stop returns either way."""
    mid = api.add(APP, "started")
    leases = Leases(api, sleep=clock.sleep, clock=clock)
    api.fail["release_machine_lease"] = [ServerError(500, "outage")]
    await leases.release(await leases.take(APP, mid, "drain"))
    api.gates["release_machine_lease"] = answered = asyncio.Event()  # no answer
    with capture_logs() as logs:
        async with asyncio.timeout(10):  # the release alone would hold it for good
            await leases.aclose(0.05, cut=cut)
    assert api.ops("release_machine_lease") == [mid, mid]
    pending = [t for t in asyncio.all_tasks() if t.get_name().startswith("lease-release:")]
    if cut:
        assert [(e["event"], e["machine"]) for e in logs] == [("lease_release_failed", mid)]
        assert not pending
    else:
        assert len(pending) == 1
        answered.set()
        await leases.settled()
    assert (api.lease(APP, mid) is None) is not cut


async def test_a_stop_cutting_a_take_under_a_remembered_lease_still_releases_it(
    api: FakeMachinesAPI, clock: FakeClock
) -> None:
    """The stop cancels a take whose refresh of our remembered lease is on its way: the
    nonce is still ours, so the stop releases that lease instead of dropping it."""
    mid = api.add(APP, "started")
    leases = Leases(api, sleep=clock.sleep, clock=clock)
    api.fail["release_machine_lease"] = [ServerError(500, "outage")]
    held = await leases.take(APP, mid, "drain")
    await leases.release(held)
    api.gates["refresh_machine_lease"] = asyncio.Event()  # never answers
    take = asyncio.create_task(leases.take(APP, mid, "wake"))
    await settle()
    assert api.ops("refresh_machine_lease") == [mid]
    await leases.aclose(1.0)
    assert api.lease(APP, mid) is None
    with contextlib.suppress(asyncio.CancelledError):
        await take
