"""A fake status provider: what the admin server reads of the controller, set by hand."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from autoscaler.admin import StatusProvider


@dataclass(frozen=True)
class FakeMachine:
    id: str
    state: str
    cordoned: bool = False
    in_flight: int = 0
    last_used: float | None = None
    failures: int = 0
    next_retry_at: float | None = None
    left_alone: bool = False
    failing: int = 0
    hung: bool = False
    hung_restarts: int = 0
    host_unreachable: bool = False
    sick_since: float | None = None
    checks_passed_on_recheck: tuple[str, ...] = ()
    checks_critical_unrouted: tuple[str, ...] = ()


@dataclass(frozen=True)
class FakeAppStatus:
    app: str
    desired: int = 0
    panic: bool = False
    last_reason: str = ""
    last_decision_at: float | None = None
    last_tick_at: float | None = None
    last_error: str | None = None
    machines: Sequence[FakeMachine] = ()
    leased_by_others: Sequence[str] = ()
    api_refused: bool = False
    """For ``health``: ``last_error`` is the API refusing the token (401, 403)."""


@dataclass(frozen=True)
class FakeAppHealth:
    app: str
    last_tick_at: float | None
    last_error: str | None
    api_error: str | None
    api_refused: bool
    machines_known: bool


@dataclass
class FakeController:
    apps: list[FakeAppStatus] = field(default_factory=list)
    last_tick_at: float | None = None
    status_calls: int = 0
    """How often status() was asked: it builds every machine's status (the real one)."""

    def status(self) -> list[FakeAppStatus]:
        self.status_calls += 1
        return list(self.apps)

    def health(self) -> list[FakeAppHealth]:
        return [
            # Their last_error is the API's (a read that failed), as a tick's is.
            FakeAppHealth(
                a.app, a.last_tick_at, a.last_error, a.last_error, a.api_refused, bool(a.machines)
            )
            for a in self.apps
        ]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _satisfies(controller: FakeController) -> StatusProvider:
    """Proof, checked by ``mypy --strict`` (.ci/run), that the fake is what the admin
    server reads."""
    return controller
