"""`autoscaler check-config`: validate what ``autoscaler run`` would start on (the file and
the environment over it; without a file, the environment alone) and print a one-screen
summary.

When the configured Machines API answers, it also reads each scaled app's machines and warns
about Fly's own autostop/autostart on them (they would fight the autoscaler); when it cannot
ask, it says so. Warnings do not change the exit status. What ``autoscaler run`` refuses
to start on is a problem here too (exit 2), said in run's words by run's own check
(:func:`autoscaler.service.start_problem`): no app, an app to scale without fly.api_url,
or through Fly's API without a token, cluster.redis_url without the Redis client; so is a
token that API refuses (401, 403), and an app to scale that the
API says does not exist (404: a typo in its name, or another organization's app), which
``run`` would tick in vain, every request to it held until its 504.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from autoscaler.config import (
    EMBEDDED,
    AppConfig,
    ConfigError,
    Settings,
    load_settings,
    origin,
    resolve_listen_host,
    shown_url,
    unreachable,
)
from autoscaler.fly.autostop import fight_warning
from autoscaler.fly.client import MachinesClient
from autoscaler.fly.errors import FlyError, NotFound, Unauthorized
from autoscaler.scaling.keepalive import fallback_keep_s
from autoscaler.service import start_problem
from autoscaler.status import columns

API_TIMEOUT_S = 5.0


def summary(settings: Settings) -> list[str]:
    """The summary of settings that passed run's start checks: without fly.api_url, every
    app is static (start_problem refuses an app to scale there)."""
    if settings.fly.api_url is None:
        api = "not set, and not needed: every app is static (has backends)"
    elif settings.fly.embedded:
        api = f"embedded emulator on {settings.emulator.listen}"
    else:
        api = shown_url(settings.fly.api_url)
    # The Fly token is read only by a client of a real Machines API: the embedded emulator
    # takes its own, and a config of static apps alone calls no API ("token not set" there
    # read as something to fix).
    token = "set" if settings.fly.token else "not set"
    used = settings.fly.api_url is not None and not settings.fly.embedded
    lines = [
        f"Machines API: {api}" + (f" (token {token}, org {settings.fly.org_slug})" if used else ""),
        f"proxy: {settings.proxy.listen}   admin: {settings.admin.listen}"
        f"   tick: {settings.control.tick_s:g}s",
        f"apps: {len(settings.apps)}",
    ]
    # One row per app, in columns: name, hosts, then a static app's backends or a scaled
    # app's policy, itself in columns across the scaled apps.
    scaled = [app for app in settings.apps if not app.static]
    policies = iter(columns([_policy(app) for app in scaled]))
    rows = []
    for app in settings.apps:
        hosts = ", ".join(app.hosts) or "(no hosts)"
        if app.paths:
            hosts += " paths " + ", ".join(app.paths)
        what = f"static: {', '.join(app.backends)}" if app.static else next(policies)
        rows.append([app.name, hosts, what])
    lines += columns(rows, indent="  ")
    if settings.proxy.default_app:
        lines.append(f"default app: {settings.proxy.default_app}")
    return lines


def _policy(app: AppConfig) -> list[str]:
    """A scaled app's policy, as the summary's cells."""
    if app.keep_alive == "adaptive":
        fallback = fallback_keep_s(app)  # the fixed timer decides until it has learned
        keep = f"keep-alive adaptive (wake cost {app.wake_cost_s:g}s, until learned {fallback:g}s)"
    else:
        keep = f"idle-to-zero {app.idle_to_zero_s:g}s"
    return [
        f"machines {app.min_machines}..{app.max_machines}",
        f"target {app.target_concurrency:g}x{app.target_utilization:g}",
        f"hard limit {app.hard_limit}",
        f"sleep: {app.scale_down_action}",
        keep,  # last: an adaptive one is long
    ]


@dataclass
class FleetCheck:
    """What reading the scaled apps' machines once found."""

    warnings: list[str] = field(default_factory=list)
    refused: list[tuple[str, Unauthorized]] = field(default_factory=list)
    """Apps whose list the API refused to the token (401, 403), with its answer."""
    missing: list[tuple[str, NotFound]] = field(default_factory=list)
    """Apps the API says do not exist (404 on their list of machines), with its answer."""


async def fleet_check(settings: Settings, timeout_s: float = API_TIMEOUT_S) -> FleetCheck:
    """The scaled apps' machines, read once from the Machines API: warnings about them,
    and the apps the token was refused for."""
    found = FleetCheck()
    scaled = [app.name for app in settings.apps if not app.static]
    if not scaled:
        return found
    if settings.fly.embedded:
        found.warnings.append(
            "Fly's autostop/autostart: not checked (the embedded emulator's machines exist"
            " only once it runs)"
        )
        found.warnings += [lacking(app) for app in settings.apps_the_emulator_lacks()]
        return found
    client = MachinesClient.from_settings(
        settings.fly, timeout_s=timeout_s, max_retries=0, retry_deadline_s=timeout_s
    )
    warnings = found.warnings
    async with client:
        for app in scaled:
            try:
                machines = await client.list_machines(app)
            except Unauthorized as exc:
                found.refused.append((app, exc))
                if exc.status == 401:  # the token itself: every app would say the same
                    break
                continue
            except NotFound as exc:
                found.missing.append((app, exc))
                continue
            except FlyError as exc:
                warnings.append(
                    f"app {app}: could not check Fly's autostop/autostart on its machines"
                    f" ({type(exc).__name__}: {exc})"
                )
                continue
            warning = fight_warning(app, machines)
            if warning:
                warnings.append(warning)
    return found


def lacking(app: str) -> str:
    """An app to scale the embedded emulator will not have (Settings.apps_the_emulator_lacks)."""
    return (
        f"app {app}: not in emulator.apps, so the embedded emulator has no such app: every"
        " call for it will be answered 404 and no request to it served; add it there (with"
        " its machines) or point fly.api_url at the Machines API that has it"
    )


def refused_problem(file: Path, settings: Settings, app: str, exc: Unauthorized) -> str:
    """A token the Machines API refused: a configuration error, never showing the token."""
    why = (
        "it may not act on this app (a token of another app or organization?)"
        if exc.status == 403
        else "wrong, expired or revoked: set a valid one"
    )
    api = shown_url(settings.fly.api_url or "")
    return (
        f"{origin(file, ('fly', 'token'))}: fly.token: the Machines API at {api} refused it"
        f" for app {app} ({exc}): {why}"
    )


def missing_problem(file: Path, settings: Settings, app: str, exc: NotFound) -> str:
    """An app to scale that the Machines API does not know: check-config said OK, with a
    warning about Fly's autostop, and ``run`` failed every tick of it."""
    index = next(i for i, a in enumerate(settings.apps) if a.name == app)
    api = shown_url(settings.fly.api_url or "")
    return (
        f"{origin(file, ('apps', index, 'name'))}: apps[{index}].name: the Machines API at"
        f" {api} has no app"
        f" {app!r} ({exc}): check the name (`fly apps list`), and that the token is of the"
        " app's organization"
    )


def check_config(
    path: str | None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    *,
    emulator: bool = False,
) -> int:
    """``emulator``: checked as ``run --emulator`` starts on it (fly.api_url: embedded)."""
    out = out or sys.stdout
    err = err or sys.stderr
    overrides = {"fly": {"api_url": EMBEDDED}} if emulator else None
    try:
        # As `run` loads it: without a file (none given, no config/autoscaler.yaml here),
        # the settings are the environment's (AUTOSCALER_APPS, ...), which run starts on.
        settings, file = load_settings(path, overrides=overrides, resolve=resolve_listen_host)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=err)
        return 2
    # run's own start checks, in its order and words: check-config wrote its own, which
    # left out one (an app to scale without fly.api_url: OK here, refused by run).
    problem = start_problem(file, settings)
    if problem is not None:
        print(problem, file=err)
        return 2
    found = asyncio.run(fleet_check(settings))
    problems = [refused_problem(file, settings, app, exc) for app, exc in found.refused]
    problems += [missing_problem(file, settings, app, exc) for app, exc in found.missing]
    if problems:
        for line in problems:
            print(line, file=err)
        return 2
    checked = file if file.exists() else f"environment ({file}: no such file)"
    print(f"{checked}: OK", file=out)
    for line in summary(settings):
        print(line, file=out)
    warnings = [
        *unreachable(settings).values(),
        *settings.emulator.placeholder_warnings(),
        *found.warnings,
    ]
    for line in warnings:
        print(f"warning: {line}", file=err)
    return 0
