"""Hand-made traces whose answers are known, for our policy and each baseline."""

from __future__ import annotations

from typing import Any

import pytest

from autoscaler.config import AppConfig
from autoscaler.scaling.fleet import STARTED
from autoscaler.sim.baselines import AlwaysOn
from autoscaler.sim.engine import AppSim
from autoscaler.sim.model import Timings, quantile
from autoscaler.sim.ours import PolicyStrategy

from .conftest import replay

T = Timings()  # api 0.1 s, resume 0.3 s, cold start 2 s, suspend 1 s, stop 1 s
COLD = T.api_latency_s + T.start_s  # 2.1 s from request to routable machine
RESUME = T.api_latency_s + T.resume_s  # 0.4 s


def test_a_request_every_ten_minutes_with_idle_to_zero_60s_always_waits_for_a_wake() -> None:
    requests = [(600.0 * i, 0.2) for i in range(12)]
    stats = replay(
        requests, horizon=7200.0, idle_to_zero_s=60, scale_down_delay_s=0, min_lifetime_s=0
    )
    assert stats.requests == stats.served == 12
    assert stats.wake_waits == 12
    # The first boots cold; every later one resumes the machine suspended in between.
    assert sorted(stats.waits) == pytest.approx([RESUME] * 11 + [COLD])
    assert stats.errors == 0
    assert stats.peak_machines == 1
    # 1 start + 11 resumes, and 12 drains of 5 calls each (key, cordon, suspend, uncordon,
    # key).
    assert stats.api_actions == 12 + 12 * 5
    # Each time: routable 0.4 s after the request, 60 s idle, then a drain (0.2 s of
    # cordon calls, 0.1 s suspend call, 1 s suspending): about 62 machine-seconds a wake.
    assert 11 * 62 < stats.up_s < 12 * 64


def test_steady_load_waits_only_for_the_first_wake() -> None:
    requests = [(0.5 * i, 0.1) for i in range(7200)]  # 2 req/s for an hour
    stats = replay(requests)
    # Requests at 0, 0.5, 1.0, 1.5 and 2.0 s arrive before the cold start ends at 2.1 s.
    assert stats.wake_waits == 5
    assert sorted(stats.waits, reverse=True) == pytest.approx([2.1, 1.6, 1.1, 0.6, 0.1])
    assert stats.served == 7200
    assert stats.errors == 0
    assert stats.api_actions == 1  # one start, nothing else all hour
    assert stats.peak_machines == 1
    assert stats.up_s == pytest.approx(stats_end(requests) - T.api_latency_s)


def stats_end(requests: list[tuple[float, float]]) -> float:
    return max(t + d for t, d in requests)


def test_idle_to_zero_suspends_after_the_last_request_and_counts_suspended_time() -> None:
    stats = replay([(0.0, 1.0)], horizon=1000.0, idle_to_zero_s=100, min_lifetime_s=0)
    # Routable at 2.1, request ends at 3.1, idle for 100 s -> drain at the tick at 104 s
    # (ticks are whole seconds): cordon calls end 104.2, suspend call 104.3, suspended 105.3.
    assert stats.up_s == pytest.approx(105.3 - 0.1)
    assert stats.suspended_s == pytest.approx(1000.0 - 105.3)


def test_load_above_one_machine_scales_out_and_back() -> None:
    # 30 requests in flight for ten minutes, target 10 x 0.7 -> 5 machines.
    requests = [(i * 0.1, 3.0) for i in range(6000)]
    stats = replay(requests, horizon=2000.0, scale_down_delay_s=30, idle_to_zero_s=120)
    # ceil(30 / 7) = 5; the requests held during the first cold start can push the panic
    # window to one more.
    assert stats.peak_machines in (5, 6)
    assert sum(delta for _, delta in stats.changes) == 0  # all asleep again by the end
    assert stats.errors == 0
    assert stats.served == 6000


def test_a_request_held_at_the_horizon_is_followed_until_served() -> None:
    # The horizon is the trace's end (0.1 s, when the request would end had it not waited):
    # the request is still held for the cold start then, and is served at 2.1 s.
    stats = replay([(0.0, 0.1)])
    assert stats.requests == stats.served == 1
    assert stats.errors == 0
    assert stats.wake_waits == 1
    assert stats.waits == pytest.approx([COLD])
    # Machine-seconds, changes and actions only up to the horizon: the start call (0.1 s
    # of API latency) is all there was; the machine came up at 0.1.
    assert stats.up_s == 0.0
    assert stats.changes == [(pytest.approx(0.1), 1)]
    assert stats.api_actions == 1


def test_a_request_held_at_the_horizon_that_times_out_is_an_error() -> None:
    slow = Timings(start_s=100.0)
    stats = replay([(0.0, 1.0), (50.0, 1.0)], horizon=40.0, timings=slow, wake_timeout_s=30)
    # The first timed out at 30 s; nothing arrives past the horizon (the second is not
    # replayed), and nothing was held at it.
    assert (stats.requests, stats.served, stats.errors) == (1, 0, 1)
    stats = replay([(0.0, 1.0), (30.0, 1.0)], horizon=40.0, timings=slow, wake_timeout_s=30)
    # The second, held at the horizon, times out at 60 s: an error, not lost.
    assert (stats.requests, stats.served, stats.errors) == (2, 0, 2)
    assert stats.up_s == pytest.approx(40.0 - T.api_latency_s)


def test_a_request_during_our_suspend_takes_the_suspend_back() -> None:
    # A large machine's suspend takes 5 s. m0 is routable at 2.1 and idle from 3.1; the
    # tick at 14 s drains it (cordon calls, then the suspend call: suspending from 14.3,
    # until 19.3). A request at 14.5 finds nothing routable: the wake (rule 2) resumes
    # the suspending machine, as the controller's ``interrupt`` does live, and Fly
    # abandons the suspend: up after one call and a resume, not after the whole suspend.
    knobs: dict[str, Any] = {"idle_to_zero_s": 10, "min_lifetime_s": 0, "scale_down_delay_s": 0}
    ours = PolicyStrategy(record=True)
    stats = replay(
        [(0.0, 1.0), (14.5, 1.0)], ours, horizon=40.0, timings=Timings(suspend_s=5.0), **knobs
    )
    assert stats.refused == 0
    assert stats.wake_waits == 2
    assert sorted(stats.waits) == pytest.approx([RESUME, COLD])
    assert ours.carried_out == [("start", "app-m0"), ("drain", "app-m0"),
                                ("resume", "app-m0"), ("drain", "app-m0")]  # fmt: skip
    # start; drain (key, cordon, suspend) taken back by a start, then uncordon and key
    # removal; the next drain's five calls (idle again at 15.9, suspended at 31.3).
    assert stats.api_actions == 1 + 3 + 3 + 5
    assert stats.up_s == pytest.approx(31.3 - 0.1)  # never at rest until the second drain
    # A failed call leaves the suspend going; the wake asks again a call later.
    flaky = Timings(suspend_s=5.0, action_failure_rate=0.5, seed=2)
    stats = replay([(0.0, 1.0), (14.5, 1.0)], horizon=40.0, timings=flaky, **knobs)
    assert stats.failed_actions == 1
    assert stats.refused == 0
    assert sorted(stats.waits) == pytest.approx([T.api_latency_s + RESUME, COLD])


def test_hard_limit_queues_without_a_wake() -> None:
    stats = replay([(0.0, 1.0), (0.0, 1.0)], "always-on", hard_limit=1)
    assert stats.wake_waits == 0
    assert stats.waits == [1.0]  # the second waits for the first's slot


def test_wake_timeout_and_full_queue_are_errors() -> None:
    slow = Timings(start_s=100.0)
    stats = replay([(0.0, 1.0)] * 3, horizon=200.0, timings=slow, wake_timeout_s=30, max_queue=2)
    assert stats.errors == 3  # one 503 (queue of 2 full), two 504 after 30 s
    assert stats.served == 0


def test_always_on_is_up_for_the_whole_horizon_without_api_calls() -> None:
    stats = replay([(5.0, 1.0)], "always-on", horizon=3600.0)
    assert stats.up_s == 3600.0
    assert stats.wake_waits == 0
    assert stats.api_actions == 0
    assert stats.waits == []


def test_fixed_keepalive_sleeps_ten_minutes_after_the_last_request() -> None:
    stats = replay([(0.0, 1.0)], "fixed-keepalive", horizon=3600.0)
    # starting at 0.1, routable 2.1, idle from 3.1, asleep from 603.1 + 0.1 + 1 s suspend.
    assert stats.up_s == pytest.approx(604.2 - 0.1)
    assert stats.api_actions == 2
    assert stats.wake_waits == 1


def test_fixed_keepalive_starts_another_machine_when_all_are_full() -> None:
    stats = replay([(0.0, 100.0), (0.0, 100.0)], "fixed-keepalive", hard_limit=1)
    assert stats.peak_machines == 2
    # Both wait for the first cold start; the second then finds that machine full, and a
    # second machine is started for it.
    assert stats.wake_waits == 2
    assert sorted(stats.waits) == pytest.approx([COLD, 2 * COLD])
    assert stats.errors == 0


def test_fly_autostop_stops_a_lone_machine_only_after_an_interval_without_traffic() -> None:
    stats = replay([(0.0, 1.0)], "fly-autostop", horizon=3600.0)
    # The check at 300 s saw traffic since the previous one; the one at 600 s stops it.
    assert stats.up_s == pytest.approx(601.1 - 0.1)
    assert stats.api_actions == 2


def test_fly_autostop_starts_a_machine_when_all_are_over_the_soft_limit() -> None:
    # Long requests with soft limit 2, hard limit 5: the third finds the only machine at
    # its soft limit, and Fly starts a second one; meanwhile the proxy routes the third,
    # and the fourth, to the first machine, which has room below its hard limit.
    requests = [(0.0, 100.0), (10.0, 100.0), (20.0, 100.0), (20.5, 1.0)]
    stats = replay(requests, "fly-autostop", target_concurrency=2, hard_limit=5)
    assert stats.peak_machines == 2
    assert stats.api_actions == 2  # two starts
    assert stats.wake_waits == 1  # only the first arrived with no machine routable
    assert stats.waits == pytest.approx([COLD])  # the others waited for nothing
    # The request that made the start ends first, and nothing queues behind it.
    early = [(0.0, 100.0), (10.0, 10.05), (20.0, 1.0)]
    stats = replay(early, "fly-autostop", target_concurrency=2, hard_limit=5)
    assert stats.wake_waits == 1
    assert stats.waits == pytest.approx([COLD])


def test_fly_autostop_holds_a_request_only_when_every_running_machine_is_full() -> None:
    # Soft and hard limit 2: the third request finds the machine full. Fly starts a
    # second one and the request waits for it (or for a freed slot); the fourth waits
    # behind it. They waited, but arrived with a machine routable: not woken.
    requests = [(0.0, 100.0), (10.0, 100.0), (20.0, 1.0), (20.5, 1.0)]
    stats = replay(requests, "fly-autostop", target_concurrency=2, hard_limit=2)
    assert stats.peak_machines == 2
    assert stats.wake_waits == 1
    assert sorted(stats.waits) == pytest.approx([COLD - 0.5, COLD, COLD])


def test_skipping_idle_ticks_changes_nothing() -> None:
    requests = [(t, 0.5) for t in (0.0, 30.0, 400.0, 405.0, 2000.0, 2001.0, 2002.0, 5000.0)]
    knobs: dict[str, Any] = {
        "idle_to_zero_s": 120,
        "stop_suspended_after_s": 900,
        "min_lifetime_s": 10,
    }
    fast = replay(requests, PolicyStrategy(skip_idle=True), horizon=7000.0, **knobs)
    exact = replay(requests, PolicyStrategy(skip_idle=False), horizon=7000.0, **knobs)
    assert fast.decisions < exact.decisions / 5
    for field in ("wake_waits", "waits", "up_s", "suspended_s", "api_actions", "changes"):
        assert getattr(fast, field) == getattr(exact, field), field


@pytest.mark.parametrize(
    ("tick_s", "knobs"),
    [
        (1.0, {"scale_down_delay_s": 20, "idle_to_zero_s": 90}),
        (0.5, {"scale_down_delay_s": 5, "min_machines": 1, "stop_suspended_after_s": 300}),
        (0.7, {"panic_threshold": 1.5, "scale_down_action": "stop", "min_lifetime_s": 0}),
    ],
)
def test_skipping_is_exact_through_bursts_panics_and_scale_downs(
    tick_s: float, knobs: dict[str, Any]
) -> None:
    # Two bursts that need several machines (and panic), with quiet between and after.
    requests = [(50.0 + i * 0.02, 1.5) for i in range(1500)]
    requests += [(400.0 + i * 0.5, 0.3) for i in range(40)]
    requests += [(900.0 + i * 0.03, 2.0) for i in range(1000)]
    timings = Timings(tick_s=tick_s)
    runs = [
        replay(requests, PolicyStrategy(skip_idle=skip), horizon=2400.0, timings=timings, **knobs)
        for skip in (True, False)
    ]
    fast, exact = runs
    assert exact.peak_machines >= 3
    assert fast.decisions < exact.decisions
    for field in ("wake_waits", "waits", "up_s", "suspended_s", "api_actions", "changes"):
        assert getattr(fast, field) == getattr(exact, field), field


def test_skipping_is_exact_when_a_burst_reaches_the_panic_threshold_exactly() -> None:
    # With hard limit 1, the two requests at 520.05 and 520.1 bring the panic average to
    # exactly 2 x capacity; the skipped ticks' one long zero sample rounds that average
    # differently from the tick-by-tick samples, on the other side of the threshold
    # (without a tolerance, --every-tick entered panic at 526.4 s and the skipping replay,
    # just short of it, only at 532 s: a held request waited 12.3 s instead of 6.7 s).
    requests = [(0.0, 5.0), (0.05, 5.0), (120.05, 5.0), (520.05, 40.0), (520.1, 0.2)]
    timings = Timings(tick_s=0.7)
    fast, exact = (
        replay(requests, PolicyStrategy(skip_idle=skip), horizon=600.0, timings=timings,
               hard_limit=1)
        for skip in (True, False)
    )  # fmt: skip
    for field in ("wake_waits", "waits", "up_s", "suspended_s", "api_actions", "changes"):
        assert getattr(fast, field) == getattr(exact, field), field


def test_quantile_counts_requests_that_did_not_wait() -> None:
    assert quantile([2.0], 100, 0.5) == 0.0
    assert quantile([2.0], 100, 0.99) == 0.0
    assert quantile([2.0], 100, 1.0) == 2.0
    assert quantile([1.0, 3.0, 2.0], 3, 0.5) == 2.0
    assert quantile([], 0, 0.5) == 0.0


def test_skipping_is_exact_with_the_adaptive_keep_alive_and_its_prewarms() -> None:
    # A timer every 700 s: once learned, the machine sleeps at once and is pre-warmed
    # before each run; the skipped ticks must not hide the sleep nor the pre-warm.
    requests = [(100.0 + 700.0 * k + (k % 3), 0.5) for k in range(30)]
    knobs: dict[str, Any] = {"keep_alive": "adaptive", "min_lifetime_s": 10}
    fast = replay(requests, PolicyStrategy(skip_idle=True), horizon=22000.0, **knobs)
    exact = replay(requests, PolicyStrategy(skip_idle=False), horizon=22000.0, **knobs)
    assert fast.decisions < exact.decisions / 5
    for field in ("wake_waits", "waits", "up_s", "suspended_s", "api_actions", "changes"):
        assert getattr(fast, field) == getattr(exact, field), field
    # Learned after 8 gaps: from then on every run finds its machine pre-warmed.
    assert fast.wake_waits <= 10
    assert fast.up_s < 30 * 120


def test_prewarms_lead_by_as_long_as_the_apps_wakes_take() -> None:
    # A timer every 60 s, pre-warmed from its third gap in a window timed to its 2 s of
    # jitter. Every resume falls back to a 5 s cold boot: begun 2 s ahead, the pre-warm
    # is still booting when the run comes (a wait at most runs); the lead learned from
    # the first pre-warms' boots covers them.
    requests = [(60.0 * k + (k % 3), 0.2) for k in range(120)]
    knobs: dict[str, Any] = {"keep_alive": "adaptive", "wake_cost_s": 1500}
    cold = Timings(resume_cold_rate=1.0, start_s=5.0)
    stats = replay(requests, horizon=7300.0, timings=cold, **knobs)
    assert stats.cold_resumes > 100
    assert stats.wake_waits <= 6
    assert stats.up_s < 120 * 20  # asleep most of each minute


def test_a_snapshot_older_than_its_limit_resumes_cold_and_a_rate_makes_some_cold() -> None:
    requests = [(600.0 * i, 0.2) for i in range(12)]
    knobs: dict[str, Any] = {"idle_to_zero_s": 60, "scale_down_delay_s": 0, "min_lifetime_s": 0}
    # Suspended about 540 s between requests: a 500 s limit makes every resume cold.
    aged = replay(requests, horizon=7200.0, timings=Timings(snapshot_max_age_s=500), **knobs)
    assert aged.cold_resumes == 11
    assert sorted(aged.waits) == pytest.approx([COLD] * 12)
    fresh = replay(requests, horizon=7200.0, timings=Timings(snapshot_max_age_s=600), **knobs)
    assert fresh.cold_resumes == 0
    always = replay(requests, horizon=7200.0, timings=Timings(resume_cold_rate=1.0), **knobs)
    assert always.cold_resumes == 11
    many = [(600.0 * i, 0.2) for i in range(200)]
    half = replay(many, horizon=200 * 600.0, timings=Timings(resume_cold_rate=0.5), **knobs)
    assert 70 <= half.cold_resumes <= 130  # 199 resumes, each cold with probability 1/2


def test_a_resume_that_falls_back_to_a_cold_boot_is_named_a_start() -> None:
    # Suspended in between, the machine is resumed for the second request: from its
    # snapshot a resume; fallen back to a cold boot a start, as the live wake names it
    # (``Machine.last_boot``); so is the start of a machine whose snapshot is too old.
    requests = [(0.0, 1.0), (600.0, 1.0)]
    knobs: dict[str, Any] = {"idle_to_zero_s": 60, "scale_down_delay_s": 0, "min_lifetime_s": 0}
    named = {}
    for label, timings in [
        ("warm", T),
        ("cold", Timings(resume_cold_rate=1.0)),
        ("aged", Timings(snapshot_max_age_s=100)),
    ]:
        ours = PolicyStrategy(record=True)
        replay(requests, ours, horizon=900.0, timings=timings, max_machines=1, **knobs)
        assert ours.carried_out is not None
        named[label] = [kind for kind, _ in ours.carried_out]
    assert named["warm"] == ["start", "drain", "resume", "drain"]
    assert named["cold"] == named["aged"] == ["start", "drain", "start", "drain"]


def test_failed_start_calls_are_retried_and_cost_their_latency() -> None:
    requests = [(600.0 * i, 0.2) for i in range(100)]
    knobs: dict[str, Any] = {"idle_to_zero_s": 60, "scale_down_delay_s": 0, "min_lifetime_s": 0}
    stats = replay(requests, horizon=100 * 600.0, timings=Timings(action_failure_rate=0.5), **knobs)
    assert stats.served == 100
    assert stats.errors == 0
    assert 50 <= stats.failed_actions <= 200  # about one failure per successful wake
    # A wait is a whole number of failed calls (0.1 s each) before the resume that works.
    for wait in stats.waits:
        extra = (wait - RESUME) / T.api_latency_s if wait < COLD else 0.0
        assert extra == pytest.approx(round(extra), abs=1e-6)
    assert max(stats.waits) > RESUME


def test_two_random_choices_take_the_less_loaded_of_two_at_random() -> None:
    # Three routable machines with 0, 5 and 9 requests in flight: the pairs are (0, 5),
    # (0, 9) and (5, 9), so the idlest is picked 2/3 of the time, the middle one 1/3, the
    # busiest never. Least-loaded always picks the idlest.
    def picks(two: bool) -> dict[int, int]:
        sim = AppSim(
            "app", [], AppConfig(name="app", max_machines=3), Timings(two_choices=two),
            AlwaysOn(), 0.0,
        )  # fmt: skip
        for m, load in zip(sim.machines, (0, 5, 9), strict=True):
            sim.set_state(m, STARTED, 0.0)
            m.in_flight = load
        got = {0: 0, 5: 0, 9: 0}
        for _ in range(3000):
            chosen = sim._pick()
            assert chosen is not None
            got[chosen.in_flight] += 1
        return got

    assert picks(False) == {0: 3000, 5: 0, 9: 0}
    two = picks(True)
    assert two[9] == 0
    assert 1850 <= two[0] <= 2150
