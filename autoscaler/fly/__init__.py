"""The Fly Machines API, client side: models, errors, rate limits and the async client.

The client lives in ``autoscaler.fly.client`` (``MachinesClient``, ``MachinesAPI``) and is
not imported here, so that importing the models (as the emulator and scaling do) does not
pull in httpx.
"""

from autoscaler.fly.errors import (
    BadRequest,
    Conflict,
    FlyError,
    LeaseHeld,
    NotFound,
    RateLimited,
    RequestTimeout,
    ServerError,
    TransportError,
    Unauthorized,
    WaitTimeout,
)
from autoscaler.fly.models import Machine, MachineConfig, MachineState

__all__ = [
    "BadRequest",
    "Conflict",
    "FlyError",
    "LeaseHeld",
    "Machine",
    "MachineConfig",
    "MachineState",
    "NotFound",
    "RateLimited",
    "RequestTimeout",
    "ServerError",
    "TransportError",
    "Unauthorized",
    "WaitTimeout",
]
