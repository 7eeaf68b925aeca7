"""`autoscaler check-config`: validate a file and print a one-screen summary."""

from __future__ import annotations

import sys
from typing import TextIO

from autoscaler.config import ConfigError, Settings, load_settings


def summary(settings: Settings) -> list[str]:
    api = settings.fly.api_url or f"embedded emulator on {settings.emulator.listen}"
    token = "set" if settings.fly.token else "not set"
    lines = [
        f"Machines API: {api} (token {token}, org {settings.fly.org_slug})",
        f"proxy: {settings.proxy.listen}   admin: {settings.admin.listen}"
        f"   tick: {settings.control.tick_s:g}s",
        f"apps: {len(settings.apps)}",
    ]
    for app in settings.apps:
        hosts = ", ".join(app.hosts) or "(no hosts)"
        if app.paths:
            hosts += " paths " + ", ".join(app.paths)
        if app.static:
            lines.append(f"  {app.name:<20} {hosts}  static: {', '.join(app.backends)}")
            continue
        lines.append(
            f"  {app.name:<20} {hosts}  machines {app.min_machines}..{app.max_machines}"
            f"  target {app.target_concurrency:g}x{app.target_utilization:g}"
            f"  hard limit {app.hard_limit}  idle-to-zero {app.idle_to_zero_s:g}s"
            f"  sleep: {app.scale_down_action}"
        )
    if settings.proxy.default_app:
        lines.append(f"default app: {settings.proxy.default_app}")
    return lines


def check_config(path: str | None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        settings, file = load_settings(path, require_file=True)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=err)
        return 2
    print(f"{file}: OK", file=out)
    for line in summary(settings):
        print(line, file=out)
    return 0
