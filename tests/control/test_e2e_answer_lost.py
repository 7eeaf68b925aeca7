"""Calls Fly carried out whose answers were lost, end to end against the emulator's Fly-like
timings (``faults.answer_lost_rate``: the call is done, the connection closed unanswered).

Every start's, lease acquire's (and refresh's) and release's answer is lost:

- A wake whose start's answer is lost reads the machine back and takes it as its own: the
  request is served, and the app's other machine is never started for that one need.
- A wake's acquire without an answer is adopted by its next try (a 409 read back); one
  on a machine the wake then left (it tries another while the first cools down) is read
  back and released when the autoscaler stops (before, it stayed until its TTL lapsed).
- The drain's take refreshes the nonce of the wake's lease, whose release was carried
  out, and that refresh, its answer lost too, made a new lease, which is adopted
  (before, the drain ran under the old nonce, met our own lease and was skipped as
  ``machine_leased_by_other`` until it lapsed).
- No lease is left on the machines once the autoscaler has stopped.

The controller's handling of both was tested against the fake API only
(tests/control/test_cancellation.py, test_leases.py); the suspend is shortened to 1 s
(Fly's go up to 18) to keep the run to a few seconds.
"""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs
from testkit import fly_like

from autoscaler.config import EmulatorApp, EmulatorSettings, TimingSettings
from autoscaler.emulator import Emulator

from .test_e2e import APP, running_stack

pytestmark = pytest.mark.fly_profile


@pytest.fixture
def emulator_settings(emulator_settings: EmulatorSettings) -> EmulatorSettings:
    """Fly's timings but a 1 s suspend; two machines, so that a second start for one need
    has a machine to go to."""
    return fly_like(emulator_settings).model_copy(
        update={
            "apps": [EmulatorApp(name=APP, machines=2)],
            "timing": TimingSettings(suspend_s=1.0),
        }
    )


async def test_lost_answers_wake_one_machine_once_and_leave_no_lease(
    emulator: Emulator,
) -> None:
    lost_calls = ["startMachine", "createMachineLease", "releaseMachineLease"]
    emulator.set_faults(answer_lost_rate=1.0, answer_lost_calls=lost_calls)
    with capture_logs() as logs:
        async with running_stack(emulator, idle_to_zero_s=1) as stack:
            await stack.get("/")
            assert (stack.served, stack.failures) == (1, [])
            starts = sorted(
                sum((e.type, e.status) == ("start", "starting") for e in m.events)
                for m in emulator.machines(APP)
            )
            assert starts == [0, 1]  # one start of one machine
            # The app idles, and its machine is drained (its lease's refresh and release
            # lost too).

            def asleep() -> bool:
                skips = [e for e in logs if e["event"] == "machine_leased_by_other"]
                assert not skips, skips  # our own lease, met under a stale nonce
                return sorted(stack.states().values()) == ["stopped", "suspended"]

            await stack.until(asleep)
            conflicts = stack.metrics.registry.get_sample_value(
                "autoscaler_lease_conflicts_total", {"app": APP}
            )
            assert not conflicts
    lost = [e["call"] for e in logs if e["event"] == "emulator_answer_lost"]
    assert lost.count("startMachine") == 1
    assert lost.count("createMachineLease") >= 2  # the wake's acquire, the drain's refresh
    assert lost.count("releaseMachineLease") >= 2  # the wake's and the drain's
    for m in emulator.machines(APP):
        assert emulator.lease(APP, m.id) is None, m.id  # no lease left on it
