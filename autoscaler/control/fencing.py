"""The fencing rule of cluster mode, in front of the Machines API.

:class:`FencedAPI` wraps the controller's client: reads pass through, and every call that
changes a machine (start, stop, suspend, cordon, uncordon, metadata writes, taking or
refreshing a machine lease) first asks the
fence (:meth:`autoscaler.state.lease.Lease.check`: our lease is locally valid and Redis
still holds our fencing token). When it says no, the call is not sent: :class:`Fenced`
is raised instead, a :class:`FlyError` without a status, which the actuator handles as it
handles any failed action (the next tick, if we still lead, reads the truth again).

A wake runs under a wake claim instead (:mod:`autoscaler.state.claim`: one wake per app
across the cluster, which a follower may take when no leader serves it): while
:data:`WAKE_FENCE` holds the claim's check, the wake's calls, and those of the actions it
launches (their tasks copy the context), are fenced by the claim, not by the lease.

A method added to :class:`~autoscaler.fly.client.MachinesAPI` must be added here too
(mypy says so: ``_satisfies`` below); a mutating one goes through :meth:`_fence`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING

from autoscaler.fly import models as m
from autoscaler.fly.client import MachinesAPI
from autoscaler.fly.errors import FlyError
from autoscaler.logs import get_logger

Fence = Callable[[], Awaitable[bool]]
_log = get_logger("autoscaler.control.fencing")
WAKE_FENCE: ContextVar[Fence | None] = ContextVar("autoscaler_wake_fence", default=None)
"""The fence of the wake claim this task (and what it launched) runs under, if any."""


class Fenced(FlyError):
    """An action not sent: this replica could not prove it still leads (or, in a wake,
    that it still holds the app's wake claim)."""

    def __init__(self, operation: str) -> None:
        super().__init__(
            None,
            "not sent: this replica's leader lease (or wake claim) is stale",
            operation=operation,
        )


class FencedAPI:
    """The controller's API client in cluster mode: mutations only under a valid lease."""

    def __init__(self, api: MachinesAPI, fence: Fence) -> None:
        self.api = api
        self.fence = fence
        self.refused = 0
        """Actions not sent because the fence said no (status, tests)."""

    async def _fence(self, operation: str, app: str, machine_id: str) -> None:
        fence = WAKE_FENCE.get() or self.fence
        if not await fence():
            self.refused += 1
            _log.warning("action_fenced", operation=operation, app=app, machine=machine_id)
            raise Fenced(operation)

    # --- reads ---------------------------------------------------------------------------

    async def list_machines(self, app: str) -> list[m.Machine]:
        return await self.api.list_machines(app)

    async def get_machine(self, app: str, machine_id: str) -> m.Machine:
        return await self.api.get_machine(app, machine_id)

    def fly_time(self) -> float:
        return self.api.fly_time()

    async def wait_for_machine_state(
        self,
        app: str,
        machine_id: str,
        state: str | Sequence[str] = "started",
        timeout_s: float = 60,
        instance_id: str | None = None,
    ) -> m.WaitResult:
        return await self.api.wait_for_machine_state(app, machine_id, state, timeout_s, instance_id)

    async def get_machine_metadata(self, app: str, machine_id: str, key: str) -> str:
        return await self.api.get_machine_metadata(app, machine_id, key)

    async def get_machine_lease(self, app: str, machine_id: str) -> m.Lease:
        return await self.api.get_machine_lease(app, machine_id)

    async def release_machine_lease(self, app: str, machine_id: str, nonce: str) -> None:
        # Letting go is always safe: a stale leader gives its machines back at once.
        await self.api.release_machine_lease(app, machine_id, nonce)

    # --- actions: fenced -----------------------------------------------------------------

    async def acquire_machine_lease(
        self, app: str, machine_id: str, *, ttl_s: int = 30, description: str | None = None
    ) -> m.Lease:
        await self._fence("acquire_machine_lease", app, machine_id)
        return await self.api.acquire_machine_lease(
            app, machine_id, ttl_s=ttl_s, description=description
        )

    async def refresh_machine_lease(
        self,
        app: str,
        machine_id: str,
        nonce: str,
        *,
        ttl_s: int = 30,
        description: str | None = None,
    ) -> m.Lease:
        await self._fence("refresh_machine_lease", app, machine_id)
        return await self.api.refresh_machine_lease(
            app, machine_id, nonce, ttl_s=ttl_s, description=description
        )

    async def start_machine(
        self, app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> m.StartResult:
        await self._fence("start_machine", app, machine_id)
        return await self.api.start_machine(app, machine_id, lease_nonce=lease_nonce)

    async def stop_machine(
        self,
        app: str,
        machine_id: str,
        *,
        signal: str | None = None,
        timeout_s: float | None = None,
        lease_nonce: str | None = None,
    ) -> None:
        await self._fence("stop_machine", app, machine_id)
        await self.api.stop_machine(
            app, machine_id, signal=signal, timeout_s=timeout_s, lease_nonce=lease_nonce
        )

    async def suspend_machine(
        self, app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> None:
        await self._fence("suspend_machine", app, machine_id)
        await self.api.suspend_machine(app, machine_id, lease_nonce=lease_nonce)

    async def cordon_machine(
        self, app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> None:
        await self._fence("cordon_machine", app, machine_id)
        await self.api.cordon_machine(app, machine_id, lease_nonce=lease_nonce)

    async def uncordon_machine(
        self, app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> None:
        await self._fence("uncordon_machine", app, machine_id)
        await self.api.uncordon_machine(app, machine_id, lease_nonce=lease_nonce)

    async def set_machine_metadata(
        self, app: str, machine_id: str, key: str, value: str, *, lease_nonce: str | None = None
    ) -> None:
        await self._fence("set_machine_metadata", app, machine_id)
        await self.api.set_machine_metadata(app, machine_id, key, value, lease_nonce=lease_nonce)

    async def delete_machine_metadata(
        self, app: str, machine_id: str, key: str, *, lease_nonce: str | None = None
    ) -> None:
        await self._fence("delete_machine_metadata", app, machine_id)
        await self.api.delete_machine_metadata(app, machine_id, key, lease_nonce=lease_nonce)


if TYPE_CHECKING:

    def _satisfies(api: FencedAPI) -> MachinesAPI:
        return api
