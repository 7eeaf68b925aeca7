"""Fly's own autostop/autostart on the machines the autoscaler manages: they would fight it.

Fly's proxy stops or suspends a machine it finds idle (``services[].autostop``) and starts
one when a request comes (``services[].autostart``), the same machines the controller
starts and puts to sleep. The machine config shows both (the real API only; the seed has
neither), so ``autoscaler check-config`` warns when it can read them and ``autoscaler run``
logs it once per app. Turning them off is in docs/deploy.md, step 4.
"""

from __future__ import annotations

from collections.abc import Iterable

from autoscaler.fly.models import Machine

_OFF = (None, False, "off", "false")


def fly_autoscaling(machine: Machine) -> list[str]:
    """``autostop=...`` / ``autostart=...`` for each service of the machine that has it on."""
    found: list[str] = []
    services = machine.config.services if machine.config is not None else None
    for service in services or []:
        stop = service.autostop.lower() if isinstance(service.autostop, str) else service.autostop
        if stop not in _OFF:
            found.append(f"autostop={str(service.autostop).lower()}")
        if service.autostart:
            found.append("autostart=true")
    return found


def fight_warning(app: str, machines: Iterable[Machine]) -> str | None:
    """One sentence naming the machines with Fly's autostop/autostart on; None if none."""
    seen = {m.id: settings for m in machines if (settings := fly_autoscaling(m))}
    if not seen:
        return None
    listed = "; ".join(f"{mid}: {', '.join(settings)}" for mid, settings in sorted(seen.items()))
    return (
        f"app {app}: {len(seen)} machine(s) have Fly's own autostop/autostart on ({listed}):"
        " Fly's proxy would stop and start the machines the autoscaler manages; turn them off"
        ' (fly.toml: auto_stop_machines = "off", auto_start_machines = false)'
    )
