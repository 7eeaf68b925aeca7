"""A machine Fly will not suspend, end to end against the emulator (fast timings and Fly's).

An app with ``scale_down_action: suspend`` whose machine has swap (Fly's suspend-resume
page: no swap, no schedule, no GPU; the emulator refuses such a suspend with 400): the
list shows the machine's config, so every scale-down, the first of the process too, goes
straight to the stop (``suspend_skipped``) without asking for a suspend, and a later
request wakes it by a cold start, until the machine's config changes. (Before, the first
scale-down of each process met the refusal.) Nothing is left cordoned, marked or under
way.
"""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs
from testkit import PROFILES, on_profile, until

from autoscaler.config import EmulatorApp, EmulatorSettings
from autoscaler.emulator import Emulator
from autoscaler.scaling.fleet import CORDON_METADATA_KEY

from .test_e2e import APP, Stack, running_stack

SWAP = {"swap_size_mb": 512}


@pytest.fixture(params=PROFILES)
def emulator_settings(
    emulator_settings: EmulatorSettings, request: pytest.FixtureRequest
) -> EmulatorSettings:
    return on_profile(emulator_settings, request.param, apps=[EmulatorApp(name=APP, machines=1)])


async def deploy(emulator: Emulator, mid: str, **init: Any) -> None:
    """A new config for the stopped machine (a deploy), with ``init`` as its init."""
    machine = emulator.machine(APP, mid)
    old = machine.instance_id
    config = {**machine.config, "init": init}
    emulator.world.update_machine(machine, config, None, None)
    await until(lambda: machine.instance_id != old and machine.state == "stopped")


def api_calls(stack: Stack, operation: str, code: str) -> float:
    labels = {"operation": operation, "code": code}
    value = stack.metrics.registry.get_sample_value("autoscaler_api_requests_total", labels)
    return value or 0.0


def wakes(stack: Stack, kind: str) -> float:
    labels = {"app": APP, "kind": kind}
    value = stack.metrics.registry.get_sample_value(
        "autoscaler_wake_duration_seconds_count", labels
    )
    return value or 0.0


async def asleep(stack: Stack, mid: str) -> None:
    """The machine stopped, uncordoned and without our key, and no action under way."""
    machine = stack.emulator.machine(APP, mid)
    runtime = stack.controller.apps[APP]

    def settled() -> bool:
        meta = machine.config.get("metadata") or {}
        return (
            machine.state == "stopped"
            and not machine.cordoned
            and CORDON_METADATA_KEY not in meta
            and not runtime.running
        )

    await stack.until(settled, timeout_s=60)


@pytest.mark.one_profile
async def test_a_machine_fly_will_not_suspend_is_stopped_and_woken_by_a_cold_start(
    emulator: Emulator,
) -> None:
    [machine] = emulator.machines(APP)
    mid = machine.id
    await deploy(emulator, mid, **SWAP)
    # A sleeping app listed often, so that the deploy below is seen soon.
    async with running_stack(emulator, None, {"idle_poll_s": 0.5}) as stack:
        with capture_logs() as logs:
            for round_ in (1, 2):
                await stack.get("/")
                assert (stack.served, stack.failures) == (round_, [])
                await asleep(stack, mid)
        events = [e for e in logs if e.get("machine") == mid]
        assert [e["event"] for e in events].count("suspend_refused") == 0
        skipped = [e for e in events if e["event"] == "suspend_skipped"]
        assert len(skipped) == 2  # the first scale-down knew too
        assert all("swap" in e["reason"] for e in skipped)
        assert api_calls(stack, "suspend_machine", "400") == 0
        assert api_calls(stack, "suspend_machine", "200") == 0
        assert api_calls(stack, "stop_machine", "200") == 2
        assert (wakes(stack, "start"), wakes(stack, "resume")) == (2, 0)

        # A deploy that drops the swap: the machine's new version is suspended again.
        await deploy(emulator, mid)
        runtime = stack.controller.apps[APP]
        await stack.until(lambda: runtime.machines[mid].instance_id == machine.instance_id)
        await stack.get("/")
        assert (stack.served, stack.failures) == (3, [])
        # Accepted is enough (Fly's suspend then takes up to 18 s on this profile).
        await stack.until(lambda: machine.state in ("suspending", "suspended"), timeout_s=60)
        # The emulator changes the state before its answer is on the wire; the client
        # counts the call once the answer is in.
        await stack.until(lambda: api_calls(stack, "suspend_machine", "200") > 0)
        assert api_calls(stack, "suspend_machine", "200") == 1
