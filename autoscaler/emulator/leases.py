"""Machine leases, as on the real API: an exclusive lock on changing one machine.

``POST .../lease`` (ttl seconds) hands out a nonce; while the lease lives, every call that
changes the machine must carry it in ``fly-machine-lease-nonce`` or gets 409. Not in the
seed, so clients that never take a lease never meet it. The clock is injectable.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NONCE_HEADER = "fly-machine-lease-nonce"
MAX_TTL_S = 3600


class LeaseHeld(Exception):
    """Another holder has the machine's lease (HTTP 409)."""


@dataclass
class Lease:
    nonce: str
    expires_at: float
    owner: str
    description: str
    version: str

    def to_json(self) -> dict[str, Any]:
        return {
            "nonce": self.nonce,
            "expires_at": int(self.expires_at),
            "owner": self.owner,
            "description": self.description,
            "version": self.version,
        }


class Leases:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._held: dict[str, Lease] = {}

    def current(self, machine_id: str) -> Lease | None:
        lease = self._held.get(machine_id)
        if lease is not None and lease.expires_at <= self._clock():
            del self._held[machine_id]
            return None
        return lease

    def acquire(
        self, machine_id: str, version: str, ttl_s: int, description: str, nonce: str | None
    ) -> Lease:
        """A new lease, or the caller's own one extended by ``ttl_s``."""
        lease = self.current(machine_id)
        if lease is not None and lease.nonce != nonce:
            raise LeaseHeld(
                f"lease currently held by {lease.owner}, expires at {int(lease.expires_at)}"
            )
        if lease is None:
            lease = Lease(secrets.token_hex(16), 0.0, "emulator-user", description, version)
            self._held[machine_id] = lease
        lease.expires_at = self._clock() + ttl_s
        lease.description = description or lease.description
        return lease

    def release(self, machine_id: str, nonce: str | None) -> bool:
        """False when there is no lease; LeaseHeld when the nonce is not the holder's."""
        lease = self.current(machine_id)
        if lease is None:
            return False
        if lease.nonce != nonce:
            raise LeaseHeld("the lease nonce does not match the current lease")
        del self._held[machine_id]
        return True

    def check(self, machine_id: str, nonce: str | None) -> None:
        """Raise LeaseHeld when someone else holds the machine's lease."""
        lease = self.current(machine_id)
        if lease is not None and lease.nonce != nonce:
            raise LeaseHeld(
                f"machine {machine_id} is leased by {lease.owner} until "
                f"{int(lease.expires_at)}; send its nonce in {NONCE_HEADER}"
            )
