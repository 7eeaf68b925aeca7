"""Restart against the real emulator: a new controller rebuilds from the API alone, starts
nothing twice, and finishes the drain a previous process left behind."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from testkit import fly_like

from autoscaler.config import (
    AppConfig,
    ControlSettings,
    EmulatorApp,
    EmulatorSettings,
    Settings,
    TimingSettings,
)
from autoscaler.control.actions import CORDON_UNSURE_S
from autoscaler.control.controller import Controller
from autoscaler.control.view import FleetView
from autoscaler.emulator import Emulator
from autoscaler.emulator.procs import pid_alive
from autoscaler.fly.client import MachinesClient
from autoscaler.metrics import Metrics
from autoscaler.scaling.fleet import CORDON_METADATA_KEY

APP = "web"


@pytest.fixture
def emulator_settings(
    emulator_settings: EmulatorSettings, request: pytest.FixtureRequest
) -> EmulatorSettings:
    """Fast timings, or Fly's where a test asks (indirect parametrization; "fly, quick
    suspend": Fly's but for suspends, as fast as the fast profile's, for a test that
    only needs a machine asleep before it begins; "fast, slow resume": the fast ones but
    for resumes, which take 0.3 s, as on Fly, for a test that needs one under way; "fast,
    late listen": the fast ones but for the app's listening, 0.3 s after ``started``, as
    on Fly)."""
    param = getattr(request, "param", "fast")
    settings = emulator_settings.model_copy(update={"apps": [EmulatorApp(name=APP, machines=3)]})
    if param.startswith("fly"):
        settings = fly_like(settings)
    if param.endswith("quick suspend"):
        settings = settings.model_copy(update={"timing": TimingSettings(suspend_s=0)})
    if param.endswith("slow resume"):
        settings = settings.model_copy(update={"timing": TimingSettings(resume_s=0.3)})
    if param.endswith("late listen"):
        settings = settings.model_copy(update={"timing": TimingSettings(listen_s=0.3)})
    return settings


BOTH_PROFILES = pytest.mark.parametrize(
    "emulator_settings", ["fast", pytest.param("fly", marks=pytest.mark.fly_profile)], indirect=True
)
BOTH_PROFILES_QUICK_SUSPEND = pytest.mark.parametrize(
    "emulator_settings",
    ["fast", pytest.param("fly, quick suspend", marks=pytest.mark.fly_profile)],
    indirect=True,
)

LATE_LISTEN = pytest.mark.parametrize(
    "emulator_settings",
    ["fast, late listen", pytest.param("fly, quick suspend", marks=pytest.mark.fly_profile)],
    indirect=True,
)

RESUMES_UNDER_WAY = pytest.mark.parametrize(
    "emulator_settings",
    ["fast, slow resume", pytest.param("fly, quick suspend", marks=pytest.mark.fly_profile)],
    indirect=True,
)


class Clock:
    """Monotonic time that a test can move ahead of the real one."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.ahead


def controller(
    client: MachinesClient,
    min_machines: int,
    clock: Clock | None = None,
    wall: Callable[[], float] | None = None,
) -> Controller:
    app = AppConfig(name=APP, min_machines=min_machines, idle_to_zero_s=600, scale_down_delay_s=600)
    settings = Settings(apps=[app], control=ControlSettings(tick_s=0.1))
    clock = clock or Clock()
    view = FleetView(clock)
    metrics = Metrics(CollectorRegistry())
    return Controller(client, view, settings, metrics, clock=clock, wall=wall)


async def wake_once(
    client: MachinesClient, wall: Callable[[], float] | None = None
) -> tuple[str, list[str]]:
    """One wake of a fresh controller (scaling nothing by itself): how it says it woke
    the app, and the machines routable then."""
    ctl = controller(client, min_machines=0, wall=wall)
    try:
        how = await ctl.wake(APP)
        return how, [u.id for u in ctl.view.app(APP).routable()]
    finally:
        await ctl.stop()


def meta(emulator: Emulator, mid: str) -> dict[str, str]:
    return dict(emulator.machine(APP, mid).config.get("metadata") or {})


async def until(ctl: Controller, check: Callable[[], bool], timeout_s: float = 30) -> None:
    view = ctl.view.app(APP)
    async with asyncio.timeout(timeout_s):
        while not check():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(view.changed(), 0.1)


async def _suspended(client: MachinesClient, mid: str) -> None:
    """Start the stopped machine ``mid``, then suspend it (a snapshot to resume)."""
    await client.start_machine(APP, mid)
    await client.wait_for_machine_state(APP, mid, "started")
    await client.suspend_machine(APP, mid)
    await client.wait_for_machine_state(APP, mid, "suspended")


async def _two_started_by_a_first_process(client: MachinesClient, emulator: Emulator) -> list[str]:
    """A first process starts two machines of the app and stops; their ids, sorted."""
    first = controller(client, min_machines=2)
    await first.start()
    try:
        await until(first, lambda: len(first.view.app(APP).routable()) == 2)
    finally:
        await first.stop()
    started = sorted(m.id for m in emulator.machines(APP) if m.state == "started")
    assert len(started) == 2
    return started


async def test_a_new_process_starts_nothing_twice_and_finishes_our_drain(
    emulator: Emulator,
) -> None:
    async with MachinesClient(emulator.url, emulator.token, rate_limit=False) as client:
        started = await _two_started_by_a_first_process(client, emulator)
        # What a process that died in the middle of a drain leaves behind.
        left = started[0]
        await client.set_machine_metadata(APP, left, CORDON_METADATA_KEY, "drain")
        await client.cordon_machine(APP, left)

        second = controller(client, min_machines=1)
        await second.start()
        try:
            await until(
                second,
                lambda: (
                    emulator.machine(APP, left).state == "suspended"
                    and not second.apps[APP].running
                ),
            )
            routable = {u.id for u in second.view.app(APP).routable()}
        finally:
            await second.stop()
    assert routable == {started[1]}
    states = sorted(m.state for m in emulator.machines(APP))
    assert states == ["started", "stopped", "suspended"]  # nothing started twice, or more
    machine = emulator.machine(APP, left)
    assert machine.cordoned is False
    assert CORDON_METADATA_KEY not in meta(emulator, left)
    starts = second.metrics.registry.get_sample_value(
        "autoscaler_scaling_actions_total", {"app": APP, "action": "start", "result": "ok"}
    )
    assert starts is None


@BOTH_PROFILES
async def test_a_cordon_the_process_before_sent_is_ours_when_it_lands_late(
    emulator: Emulator,
) -> None:
    """A process dies with a drain's cordon request on its way (our key is on the machine,
    the cordon not yet). The next one keeps the key, so the cordon, landing after it began,
    is ours: it finishes that drain once no such request can land any more."""
    async with MachinesClient(emulator.url, emulator.token, rate_limit=False) as client:
        left, other = await _two_started_by_a_first_process(client, emulator)
        await client.set_machine_metadata(APP, left, CORDON_METADATA_KEY, "drain")

        clock = Clock()
        second = controller(client, min_machines=1, clock=clock)
        await second.start()
        try:
            rt = second.apps[APP]
            await until(second, lambda: rt.read_once and not rt.running)
            await client.cordon_machine(APP, left)  # the request lands now
            await until(second, lambda: {u.id for u in second.view.app(APP).routable()} == {other})
            assert CORDON_METADATA_KEY in meta(emulator, left)
            clock.ahead = CORDON_UNSURE_S  # no request of the dead process can land now
            await until(
                second,
                lambda: (
                    emulator.machine(APP, left).state == "suspended"
                    and emulator.machine(APP, left).cordoned is False
                    and CORDON_METADATA_KEY not in meta(emulator, left)
                    and not rt.running
                ),
                timeout_s=60,
            )
        finally:
            await second.stop()


async def _waits_for_their_start(emulator: Emulator) -> None:
    """Another party's start of the app's first machine has landed: the wake waits for
    it, and the other two machines stay stopped."""
    async with MachinesClient(emulator.url, emulator.token, rate_limit=False) as client:
        first = sorted(m.id for m in emulator.machines(APP))[0]
        await client.start_machine(APP, first)  # the other party's start, landed
        how, routable = await wake_once(client)
        assert how in ("start", "none")
    assert routable == [first]
    states = sorted(m.state for m in emulator.machines(APP))
    assert states == ["started", "stopped", "stopped"]


async def _waits_for_their_resume(emulator: Emulator) -> None:
    """Two machines suspended, another party's resume of the first landed: the wake waits
    for it, and the second stays asleep."""
    async with MachinesClient(emulator.url, emulator.token, rate_limit=False) as client:
        resumed, asleep, _ = sorted(m.id for m in emulator.machines(APP))
        for mid in (resumed, asleep):
            await _suspended(client, mid)
        await client.start_machine(APP, resumed)  # the other party's resume, landed
        how, routable = await wake_once(client)
    assert how in ("resume", "none")  # "none": it read the resume done already
    assert routable == [resumed]
    assert emulator.machine(APP, asleep).state == "suspended"


@BOTH_PROFILES
async def test_a_wake_waits_for_a_start_another_party_made_instead_of_starting_another(
    emulator: Emulator,
) -> None:
    """A start that another party made is under way (in cluster mode, a leader's that
    landed before it lost its lease, whose start the step-down then cancelled): the wake
    of the next decider waits for that machine. It started a second one for the same need
    (on Fly's timings the first was still booting when the wake read the app)."""
    await _waits_for_their_start(emulator)


@BOTH_PROFILES
async def test_a_wake_passes_at_once_a_start_another_party_made_long_ago(
    emulator: Emulator,
) -> None:
    """The same start, read by a wake whose time of day is a minute on (the machine stuck
    in ``starting`` that long, as far as it can tell): the emulator lists the machine's
    events as Fly does (a ``start``/``starting`` event, its time in ms), so the wake
    passes the machine at once and starts another beside it. It waited for it, up to
    START_PATIENCE_S from its own first sight."""
    async with MachinesClient(emulator.url, emulator.token, rate_limit=False) as client:
        first = sorted(m.id for m in emulator.machines(APP))[0]
        await client.start_machine(APP, first)  # the other party's start, landed
        how, routable = await wake_once(client, wall=lambda: time.time() + 60)
        assert how == "start"
    assert set(routable) - {first}  # the machine it woke (the first may be up by now too)
    up = [m.id for m in emulator.machines(APP) if m.state in ("starting", "started")]
    assert len(up) == 2


@BOTH_PROFILES_QUICK_SUSPEND
async def test_a_wake_resumes_a_suspended_machine_rather_than_wait_for_another_s_cold_start(
    emulator: Emulator,
) -> None:
    """Another party's cold start is under way (a deploy's, a lost leader's) and a machine
    of the app is suspended: the wake resumes it (a few hundred ms on Fly) rather than
    wait for the cold start (one to several seconds), as rule 2 wakes the fastest first.
    It waited for the cold start, and its requests for it."""
    async with MachinesClient(emulator.url, emulator.token, rate_limit=False) as client:
        cold, asleep, _ = sorted(m.id for m in emulator.machines(APP))
        await _suspended(client, asleep)
        await client.start_machine(APP, cold)  # the other party's start, landed
        how, routable = await wake_once(client)
    assert how == "resume"
    assert routable == [asleep]


@RESUMES_UNDER_WAY
async def test_a_wake_waits_for_a_resume_another_party_made_rather_than_resume_another(
    emulator: Emulator,
) -> None:
    """Another party's resume is under way (its events say the start began from
    ``suspended``) and another machine of the app is suspended: the wake waits for that
    resume, which is as fast as its own would be, and the other machine stays asleep. It
    resumed the other at once, and two machines came up for one need."""
    await _waits_for_their_resume(emulator)


@LATE_LISTEN
async def test_a_resume_that_fell_back_to_a_cold_boot_is_named_a_start(
    emulator: Emulator,
) -> None:
    """A suspended machine whose snapshot is unusable boots cold when started (the
    emulator's ``resume_cold_rate``; on Fly a lost snapshot, a host migration): the
    machine's events after the start say so, and the wake is a start in its requests'
    label (what the view says as the machine becomes routable), the histogram and the
    log, as a cold start is. It was named a resume, and the resume histogram timed a cold
    boot. A cold boot's app listens after ``started`` (``listen_s``, as on Fly), so the
    read of the events is back before the port answers: routing never waits for it."""
    async with MachinesClient(emulator.url, emulator.token, rate_limit=False) as client:
        asleep = sorted(m.id for m in emulator.machines(APP))[0]
        await _suspended(client, asleep)
        emulator.set_faults(resume_cold_rate=1.0)
        ctl = controller(client, min_machines=0)
        view = ctl.view.app(APP)
        named: list[str | None] = []

        async def watch() -> None:  # as the proxy's held requests read it when let go
            while not view.routable():
                await view.changed()
            named.append(view.waking)

        watcher = asyncio.ensure_future(watch())
        try:
            with capture_logs() as logs:
                how = await ctl.wake(APP)
            await asyncio.wait_for(watcher, 5)
        finally:
            watcher.cancel()
            await ctl.stop()
    assert how == "start"
    assert named == ["start"]
    sample = ctl.metrics.registry.get_sample_value
    assert sample("autoscaler_wake_duration_seconds_count", {"app": APP, "kind": "start"}) == 1
    assert not sample("autoscaler_wake_duration_seconds_count", {"app": APP, "kind": "resume"})
    # The action sent was a resume: counted as one.
    assert (
        sample("autoscaler_scaling_actions_total", {"app": APP, "action": "resume", "result": "ok"})
        == 1
    )
    assert [e["how"] for e in logs if e["event"] in ("machine_up", "wake")] == ["start", "start"]
    events = emulator.machine(APP, asleep).events
    assert events[-1].type == "launch"  # the emulator's record of the fallback


@pytest.fixture
async def behind(
    emulator_settings: EmulatorSettings, request: pytest.FixtureRequest
) -> AsyncIterator[Emulator]:
    """The emulator on a clock (Fly's) ``request.param`` seconds behind ours: our clock
    runs that far ahead of Fly's. Its event times, ``updated_at`` and ``Date`` headers are
    all on its clock, as Fly's are on Fly's."""
    skew_s = float(request.param)
    async with Emulator(
        emulator_settings, host="127.0.0.1", port=0, wall=lambda: time.time() - skew_s
    ) as emu:
        yield emu
    assert not [pid for pid in emu.spawned_pids() if pid_alive(pid)]


@BOTH_PROFILES
@pytest.mark.parametrize("behind", [30.0], indirect=True)
async def test_a_wake_waits_for_another_party_s_start_though_our_clock_runs_ahead_of_fly_s(
    behind: Emulator,
) -> None:
    """Our clock 30 s ahead of Fly's, another party's start under way: the wake waits for
    it, as with the clocks in step. It read the start's time (Fly's) against our time of
    day, took the start for 30 s old, past START_PATIENCE_S, and started a second machine
    beside it at once. Fly's time is now read on Fly's clock, as its answers' ``Date``
    headers show it."""
    await _waits_for_their_start(behind)


@RESUMES_UNDER_WAY
@pytest.mark.parametrize("behind", [5.0], indirect=True)
async def test_a_wake_waits_for_another_party_s_resume_though_our_clock_runs_ahead_of_fly_s(
    behind: Emulator,
) -> None:
    """Our clock 5 s ahead of Fly's (2 s was enough), another party's resume under way:
    the wake waits for it rather than resume another machine. It took the resume for 5 s
    old, past RESUME_PATIENCE_S, and resumed a second machine for one need."""
    await _waits_for_their_resume(behind)
