"""Item 1: the Machines API misbehaves under varying load, and no request is lost.

The emulator answers 10% of calls with 500 and 5% with 429, adds 200 ms to every call and
fails 10% of boots (machines are stopped when idle, so wakes boot; the wake after the
idle phase meets a failed boot for sure, and the run's first calls get 429 until one is
seen), while the load swings between idle (the app
sleeps, the next request wakes it through the faulty API) and more than the fleet's
target. Claims:

- every request gets an HTTP response (no reset, no client timeout);
- the only non-200 statuses are 503 and 504, and each is explained by a configured limit:
  the proxy counted exactly as many ``queue_full`` (503) and ``wake_timeout`` (504)
  rejections as the clients received;
- after the last phase, a full API outage (every call 500) while the load rises, so the
  fleet falls behind; once the faults stop, the started machines match the controller's
  desired count within 10 ticks;
- once the load stops and the app is back to sleep, no machine carries a cordon of ours.

Default length 21 s on Fly's timings, 15 s on the fast ones; ``AUTOSCALER_SOAK=1`` runs
the issue's full 2 minutes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from testkit import until

from autoscaler.config import EmulatorApp, EmulatorSettings, FaultSettings
from autoscaler.emulator import Emulator
from autoscaler.service import Service

from .harness import (
    APP,
    Figures,
    Load,
    live_service,
    metric,
    our_cordons,
    service_config,
    started,
    write_config,
)

MACHINES = 10
FAULTS = FaultSettings(latency_s=0.2, error_rate=0.10, rate_limit_rate=0.05, boot_failure_rate=0.1)
# Clients per phase: warm, above target, burst, idle (the app sleeps), low (a wake), then
# a full API outage while the load rises (the fleet falls behind), then no faults.
PHASES = (4, 16, 30, 0, 2)
WAKE_CLIENTS = 2
OUTAGE = FaultSettings(latency_s=0.2, error_rate=1.0)
STEADY = 30
TICKS_TO_CONVERGE = 10
TRANSITIONS = frozenset({"starting", "stopping", "suspending", "created"})

pytestmark = [pytest.mark.timeout(400), pytest.mark.one_profile]


@pytest.fixture
def emulator_settings(emulator_settings: EmulatorSettings) -> EmulatorSettings:
    return emulator_settings.model_copy(update={"apps": [EmulatorApp(name=APP, machines=MACHINES)]})


def _api_calls(svc: Service, code: str | None = None) -> float:
    """API calls the client made (all, or those answered ``code``)."""
    return sum(
        s.value
        for fam in svc.metrics.registry.collect()
        if fam.name == "autoscaler_api_requests"
        for s in fam.samples
        if s.name.endswith("_total") and (code is None or s.labels.get("code") == code)
    )


def _boot_failures(emulator: Emulator) -> int:
    return sum(
        1
        for m in emulator.machines(APP)
        for e in m.events
        if e.status == "failed" and "injected" in str(e.request.get("error", ""))
    )


async def test_api_faults_lose_no_request(
    emulator: Emulator, tmp_path: Path, soak: bool, figures: Figures
) -> None:
    # Fly's timings get 3.5 s phases, the fast ones 2.5 s (their transitions are instant;
    # the claims wait for what they need, the app's sleep and the fleet's catching up).
    fly = emulator.settings.profile == "fly"
    total_s = 120.0 if soak else (21.0 if fly else 15.0)
    phase_s = total_s / (len(PHASES) + 1)
    # Machines are stopped, not suspended, when the load falls: every wake is a cold boot,
    # so the injected boot failures get their chance.
    config = service_config(emulator, scale_down_action="stop")
    # A machine here is a real process: a cold boot takes ~1-1.5 s on a busy 2-core VM, 7
    # ticks of the suite's usual 0.2 s. Half-second ticks keep "within 10 ticks" about
    # the controller's reaction rather than the boot (the default tick is 1 s).
    config["control"]["tick_s"] = 0.5
    file = write_config(tmp_path / "autoscaler.yaml", config)
    emulator.set_faults(FAULTS)
    async with live_service(file) as svc, Load(f"http://127.0.0.1:{svc.proxy.port}") as load:  # type: ignore[union-attr]
        assert svc.controller is not None
        rt = svc.controller.apps[APP]
        # A 5% rate over ~100 calls may draw no 429 at all: the first calls of the run are
        # all 429s until one is seen, so every run exercises the client's rate-limit path.
        emulator.set_faults(FAULTS.model_copy(update={"rate_limit_rate": 1.0}))
        await load.resize(PHASES[0])
        await until(lambda: _api_calls(svc, "429") > 0, 30, "an API 429")
        emulator.set_faults(FAULTS)
        for clients in PHASES:
            if clients == WAKE_CLIENTS:
                # Once the app sleeps, the wake's first boot fails for sure (then 10%
                # again), so every run has held requests ride through a failed boot.
                await until(lambda: not started(emulator, APP), 30, "the app to sleep")
                emulator.set_faults(FAULTS.model_copy(update={"boot_failure_rate": 1.0}))
                await load.resize(clients)
                await until(lambda: _boot_failures(emulator) > 0, 30, "a failed boot")
                emulator.set_faults(FAULTS)
            await load.resize(clients)
            if clients:  # (the idle phase lasts until the app sleeps: the wake awaits it)
                await asyncio.sleep(phase_s)  # the load's duration is the point
        assert load.sent > 0
        # The wake finds a machine that boots (with Fly's timing, a failed boot or two
        # through the faulty API can outlast the phase).
        await until(lambda: bool(started(emulator, APP)), 30, "a machine the wake booted")
        # The outage: every call fails, so the controller cannot follow the load.
        emulator.set_faults(OUTAGE)
        await load.resize(STEADY)
        await asyncio.sleep(phase_s)
        behind = (len(started(emulator, APP)), rt.desired)

        # The faults stop under steady load: within 10 ticks the fleet matches desired, not
        # counting the ticks that end while a machine is in a transition (a cold boot is a
        # real process starting: up to 3 s on Fly's profile, and seconds on a busy VM);
        # that is the machine's time, not the controller's.
        emulator.set_faults(FaultSettings())
        # Only ticks that began after the faults stopped count (one that began earlier may
        # still finish, with a stale view).
        stopped_at = svc.clock()
        ticks: list[float] = []
        in_transition = 0
        converged_after: int | None = None
        async with asyncio.timeout(60):
            while converged_after is None:
                await asyncio.sleep(0.02)  # ticks are not announced; a cheap poll
                last = rt.last_tick_at
                if last is None or last <= stopped_at or (ticks and ticks[-1] == last):
                    continue
                ticks.append(last)
                if any(m.state in TRANSITIONS for m in emulator.machines(APP)):
                    in_transition += 1
                up = [m for m in started(emulator, APP) if m not in our_cordons(emulator, APP)]
                if rt.desired is not None and len(up) == rt.desired and not rt.running:
                    converged_after = len(ticks)
                elif len(ticks) - in_transition > TICKS_TO_CONVERGE:
                    break
        desired = rt.desired
        await load.resize(0)
        states = {m.id: m.state for m in emulator.machines(APP)}
        assert converged_after is not None, (
            f"not at desired ({desired}) after {len(ticks)} ticks without faults, "
            f"{in_transition} of them with a machine in a transition: machines={states} "
            f"cordoned={our_cordons(emulator, APP)}"
        )

        # Idle: the app goes back to sleep, and no cordon of ours stays behind.
        await until(
            lambda: not started(emulator, APP) and not rt.running,
            timeout_s=60,
            what="the app to go back to sleep",
        )
        assert our_cordons(emulator, APP) == []

        outcomes = dict(load.outcomes)
        queue_full = metric(svc, "autoscaler_queue_rejections_total", app=APP, reason="queue_full")
        wake_timeout = metric(
            svc, "autoscaler_queue_rejections_total", app=APP, reason="wake_timeout"
        )
        api = {code: _api_calls(svc, code) for code in ("500", "429")}
        figures.record(
            "api_faults",
            duration_s=total_s,
            phases_clients=[*PHASES, f"{STEADY} during a full API outage"],
            started_and_desired_at_outage_end=list(behind),
            requests_sent=load.sent,
            outcomes=outcomes,
            rejections={"queue_full": queue_full, "wake_timeout": wake_timeout},
            injected={
                "api_500": api["500"],
                "api_429": api["429"],
                "boot_failures": _boot_failures(emulator),
                "latency_s": FAULTS.latency_s,
            },
            api_calls=_api_calls(svc),
            ticks_to_desired_after_faults=converged_after,
            desired_at_steady_load=desired,
        )
    unexplained = {k: v for k, v in outcomes.items() if k not in ("200", "503", "504")}
    assert not unexplained, f"{unexplained}: {load.details[:10]}"
    assert outcomes.get("503", 0) == queue_full
    assert outcomes.get("504", 0) == wake_timeout
    assert api["500"] > 0  # the faults did happen (a run without them proves nothing)
    assert api["429"] > 0
