"""Shared by the observability tests: where the shipped files are, and finding Prometheus."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "grafana" / "dashboards" / "autoscaler-overview.json"
PROMETHEUS_CONFIG = REPO / "prometheus" / "prometheus.yml"
ALERTS = REPO / "prometheus" / "alerts.yml"
ALERT_TESTS = Path(__file__).resolve().parent / "alerts_test.yml"


def require_binary(name: str) -> str:
    """The binary's path; skip when it is missing, but fail in CI (CI must install it)."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} not found (Debian package `prometheus`; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set: the CI image must provide it")
        pytest.skip(reason)
    return path
