"""Cold boots that end ``failed`` (``boot_failure_rate``): our policy starts the machine
again after the controller's backoff and within its budget; the baselines, as Fly's
proxy, wake another machine and leave the failed one alone. Hand-made traces whose
answers are known."""

from __future__ import annotations

import json
from typing import Any

import pytest

from autoscaler.cli import main
from autoscaler.config import AppConfig
from autoscaler.control import runtime
from autoscaler.control import view as view_mod
from autoscaler.fly import models as fm
from autoscaler.scaling.fleet import FAILED
from autoscaler.sim.baselines import FixedKeepalive
from autoscaler.sim.engine import AppSim
from autoscaler.sim.model import Stats, Timings
from autoscaler.sim.ours import PolicyStrategy, snapshot

from .conftest import replay

T = Timings()
COLD = T.api_latency_s + T.start_s  # 2.1 s from the start call to started, or failed
ALWAYS = Timings(boot_failure_rate=1.0)
# The app's draws under seed 3: the first cold boot fails, the second comes up.
FIRST_FAILS = Timings(boot_failure_rate=0.5, seed=3)
BASELINES = ("fly-autostop", "fixed-keepalive")


def test_our_policy_restarts_a_failed_machine_after_its_backoff_until_its_budget() -> None:
    # One machine, every boot fails, 3 attempts: it fails at 2.1 and is started again
    # when its 2 s backoff ends (the wake waits for it, not for a tick), fails at 6.2,
    # again after 4 s, fails at 12.3: the budget is spent, and the request times out.
    ours = PolicyStrategy(record=True)
    knobs: dict[str, Any] = {"max_machines": 1, "max_restart_attempts": 3}
    stats = replay([(0.0, 1.0)], ours, horizon=60.0, timings=ALWAYS, **knobs)
    assert stats.failed_boots == 3
    assert stats.api_actions == 3
    assert (stats.served, stats.errors) == (0, 1)
    assert ours.carried_out == [("start", "app-m0")] * 3
    up = [t for t, delta in stats.changes if delta == 1]
    down = [t for t, delta in stats.changes if delta == -1]
    assert up == pytest.approx([0.1, 4.1 + 0.1, 10.2 + 0.1])
    assert down == pytest.approx([COLD, 4.1 + COLD, 10.2 + COLD])
    assert stats.up_s == pytest.approx(3 * T.start_s)  # billed while starting, not failed
    # Off, nothing is started again.
    stats = replay([(0.0, 1.0)], horizon=60.0, timings=ALWAYS, max_machines=1, restart_failed=False)
    assert (stats.failed_boots, stats.api_actions, stats.errors) == (1, 1, 1)


def test_our_policy_serves_after_the_restart_where_fly_has_no_other_machine() -> None:
    # One machine, its first boot fails: ours starts it again 2 s later and the request
    # is served after two boots and the backoff; Fly's proxy has no other machine to
    # start, and never starts a failed one: the request times out.
    stats = replay([(0.0, 1.0)], horizon=60.0, timings=FIRST_FAILS, max_machines=1)
    assert stats.failed_boots == 1
    assert stats.served == 1
    assert stats.waits == pytest.approx([COLD + 2.0 + COLD])
    for name in BASELINES:
        stats = replay([(0.0, 1.0)], name, horizon=60.0, timings=FIRST_FAILS, max_machines=1)
        assert (stats.failed_boots, stats.served, stats.errors) == (1, 0, 1), name
        assert stats.api_actions == 1, name


@pytest.mark.parametrize("strategy", ["autoscaler", *BASELINES])
def test_a_failed_boot_wakes_another_machine_at_once(strategy: str) -> None:
    stats = replay([(0.0, 1.0)], strategy, horizon=60.0, timings=FIRST_FAILS, max_machines=2)
    assert stats.failed_boots == 1
    assert stats.api_actions == 2
    assert stats.waits == pytest.approx([2 * COLD])
    assert stats.errors == 0


@pytest.mark.parametrize("strategy", BASELINES)
def test_the_baselines_never_start_a_failed_machine_again(strategy: str) -> None:
    # Both machines fail; a request long after finds nothing Fly's proxy would start.
    stats = replay([(0.0, 1.0), (100.0, 1.0)], strategy, horizon=200.0, timings=ALWAYS)
    assert stats.failed_boots == stats.api_actions == 10  # each of the 10 machines once
    assert (stats.served, stats.errors) == (0, 2)
    assert stats.up_s == pytest.approx(10 * T.start_s)


def test_a_resume_from_its_snapshot_never_fails_and_one_fallen_back_to_a_cold_boot_may() -> None:
    # Suspended in between, the machine is resumed for the second request. Seed 3: the
    # first cold boot fails, the restart comes up; the resume from the snapshot, drawing
    # nothing, cannot fail. Made cold, the resume is a cold boot that may fail, and is
    # started again like any failed machine (named a start, as the live wake names it).
    requests = [(0.0, 1.0), (600.0, 1.0)]
    knobs: dict[str, Any] = {"idle_to_zero_s": 60, "scale_down_delay_s": 0, "min_lifetime_s": 0}
    knobs["max_machines"] = 1
    warm = replay(requests, horizon=900.0, timings=FIRST_FAILS, **knobs)
    assert warm.failed_boots == 1
    assert warm.waits == pytest.approx([COLD + 2.0 + COLD, T.api_latency_s + T.resume_s])
    # Seed 4: the first cold boot fails, its restart comes up; so do the resume made
    # cold and its restart, after a 2 s backoff again (the machine came up in between:
    # failures are counted in a row).
    ours = PolicyStrategy(record=True)
    both = Timings(boot_failure_rate=0.5, resume_cold_rate=1.0, seed=4)
    cold = replay(requests, ours, horizon=900.0, timings=both, **knobs)
    assert (cold.cold_resumes, cold.failed_boots, cold.served) == (1, 2, 2)
    assert cold.waits == pytest.approx([COLD + 2.0 + COLD] * 2)
    assert ours.carried_out is not None
    assert [kind for kind, _ in ours.carried_out if kind != "drain"] == ["start"] * 4


def test_skipping_idle_ticks_runs_the_tick_at_the_end_of_a_restart_backoff() -> None:
    # min_machines 1 with no request: the policy starts the machine, its boots fail and
    # it is started again after each backoff, the app quiet throughout (nothing in
    # flight or held): the ticks that restart it must not be skipped.
    knobs: dict[str, Any] = {"min_machines": 1, "max_machines": 1, "max_restart_attempts": 4}

    def run(skip: bool) -> Stats:
        ours = PolicyStrategy(skip_idle=skip)
        return replay([(900.0, 1.0)], ours, horizon=1000.0, timings=ALWAYS, **knobs)

    fast, exact = run(True), run(False)
    assert exact.failed_boots == 4
    assert fast.decisions < exact.decisions / 5
    fields = ("failed_boots", "api_actions", "up_s", "changes", "errors", "waits")
    for field in fields:
        assert getattr(fast, field) == getattr(exact, field), field


def test_the_command_line_models_failed_boots(capsys: pytest.CaptureFixture[str]) -> None:
    # Every boot fails: nothing is ever served, under our policy or Fly's.
    argv = ["simulate", "--generate", "sparse", "--hours", "2", "--format", "json"]
    argv += ["--strategies", "autoscaler,fly-autostop", "--totals-only"]
    for rate, failing in (("0", False), ("1", True)):
        assert main([*argv, "--boot-failure-rate", rate]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["timings"]["boot_failure_rate"] == float(rate)
        for name in ("autoscaler", "fly-autostop"):
            total = doc["total"][name]
            assert (total["failed_boots"] > 0) == failing, (name, rate)
            assert (total["errors"] == total["requests"] > 0) == failing, (name, rate)


def test_restartable_is_the_controllers_for_the_same_failed_boots() -> None:
    """The snapshot's ``restartable`` of a machine whose boots failed, at each time, is
    what the controller's ``AppRuntime.fleet`` says after the same failures."""
    cfg = AppConfig(name="app", max_machines=1, max_restart_attempts=2)
    rt = runtime.AppRuntime.of(cfg)
    view = view_mod.AppView("app", clock=lambda: 0.0)
    listed = fm.Machine(
        id="app-m0", state=FAILED, private_ip="127.0.0.2", config=fm.MachineConfig(image="x")
    )
    rt.merge([listed], listed_at=COLD, now=COLD)

    def failed_boots(starts: list[float]) -> AppSim:
        sim = AppSim("app", [], cfg, ALWAYS, FixedKeepalive(600.0), horizon=100.0)
        for at in starts:
            sim.call(at, lambda now, m: sim.start(m, now), sim.machines[0])
        sim.run()
        assert sim.machines[0].state == FAILED
        assert sim.stats.failed_boots == len(starts)
        return sim

    def same_at(sim: AppSim, now: float) -> bool:
        ours = snapshot("app", sim.machines, now=now).machines[0].restartable
        theirs = rt.fleet(view, now).machines[0].restartable
        assert ours == theirs, now
        return ours

    once = failed_boots([0.0])
    rt.boot_failed("app-m0", COLD)
    assert not same_at(once, COLD)
    assert same_at(once, COLD + 2.0)  # the first backoff over
    twice = failed_boots([0.0, 5.0])
    rt.boot_failed("app-m0", 5.0 + COLD)
    for now in (5.0 + COLD, 50.0, 1000.0):
        assert not same_at(twice, now)  # two failures in a row: the budget of 2 is spent
