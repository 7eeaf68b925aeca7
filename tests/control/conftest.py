"""Fixtures of the control tests that run against the fake API and the fake clock (a
module whose API needs the clock, or other machines, defines its own)."""

from __future__ import annotations

import pytest

from .fakes import FakeClock, FakeMachinesAPI


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def api() -> FakeMachinesAPI:
    return FakeMachinesAPI()
