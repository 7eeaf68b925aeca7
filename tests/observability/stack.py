"""A live stack on loopback for the observability tests, built by the real composition root.

``autoscaler.service.Service`` starts everything from a YAML file, as ``autoscaler run``
does: the embedded emulator (real machine processes), the Fly client reporting every call
through ``Metrics.observe_api``, the controller, the proxy and the admin server. Only the
ports differ: all ephemeral, all on 127.0.0.1.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from autoscaler.admin import AdminServer, StatusProvider
from autoscaler.config import load_settings
from autoscaler.control.controller import Controller
from autoscaler.emulator import Emulator
from autoscaler.metrics import Metrics
from autoscaler.service import Service

FLY_TOKEN = "fly-token-0bs3rv4b1l1ty-s3cr3t"
ADMIN_TOKEN = "admin-token-5up3r-s3cr3t-v4lu3"
APP = "demo"

CONFIG = f"""
fly:
  rate_limit: false
proxy:
  listen: 127.0.0.1:8080
  access_log: true
admin:
  listen: 127.0.0.1:9091
  token: {ADMIN_TOKEN}
  protect_metrics: true
control:
  tick_s: 0.2
  api_backoff_max_s: 0.5
apps:
  - name: {APP}
    hosts: [{APP}]
    min_machines: 0
    max_machines: 3
    target_concurrency: 2
    hard_limit: 4
    max_queue: 3          # a cold burst bigger than this is turned away: queue_full, 503
    wake_timeout_s: 20s
    idle_to_zero_s: 5m
    min_lifetime_s: 0
emulator:
  listen: 127.0.0.1:4280
  token: {FLY_TOKEN}      # the "Fly API token" the client sends
  demo_boot_delay_s: 0.05
  resume_delay_s: 0
  boot_timeout_s: 20s
  rate_limits: false
  apps:
    - name: {APP}
      machines: 3
"""


def _controller_is_a_status_provider(controller: Controller) -> StatusProvider:
    return controller  # mypy: the real controller satisfies admin.py's Protocol


@dataclass
class Stack:
    service: Service

    @property
    def emulator(self) -> Emulator:
        assert self.service.emulator is not None
        return self.service.emulator

    @property
    def admin(self) -> AdminServer:
        assert self.service.admin is not None
        return self.service.admin

    @property
    def metrics(self) -> Metrics:
        return self.service.metrics

    @property
    def proxy_url(self) -> str:
        assert self.service.proxy is not None
        return f"http://127.0.0.1:{self.service.proxy.port}"

    @property
    def admin_address(self) -> str:
        return f"127.0.0.1:{self.admin.address[1]}"


@asynccontextmanager
async def live_stack() -> AsyncIterator[Stack]:
    """The service started with ephemeral ports; stopped (machines reaped) after."""
    with tempfile.TemporaryDirectory(prefix="autoscaler-obs-") as tmp:
        path = Path(tmp) / "autoscaler.yaml"
        path.write_text(CONFIG)
        settings, _ = load_settings(path, env={})
        service = Service(settings, path, proxy_port=0, admin_port=0, emulator_port=0)
        try:
            await service.start()
            yield Stack(service)
        finally:
            await service.stop()
