"""The HTTP plumbing of the emulated API: context, middlewares and request helpers.

Middlewares run outermost first: errors (maps the world's exceptions to the seed's
ErrorResponse and adds ``fly-request-id``), auth (Bearer or FlyV1), then faults and rate
limits, and, once the handler has carried a call out, the fault that loses its answer.
Handlers live in ``api.py``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from autoscaler.config import CHANGING_MACHINE_CALLS
from autoscaler.emulator import validate
from autoscaler.emulator.leases import NONCE_HEADER, LeaseHeld, Leases
from autoscaler.emulator.limits import RateLimiter, bucket_key, retry_after
from autoscaler.emulator.machines import Conflict, HostUnreachable, SuspendRefused
from autoscaler.emulator.model import Machine
from autoscaler.emulator.world import NameTaken, NotFound, World
from autoscaler.logs import get_logger

log = get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CONTROL_PREFIX = "/_emulator/"  # the emulator's own routes (faults.py)


@dataclass
class Context:
    world: World
    token: str
    rng: random.Random
    rate_limits: bool
    leases: Leases = field(default_factory=Leases)
    limiter: RateLimiter = field(default_factory=RateLimiter)
    oidc_key: bytes = b""


CTX = web.AppKey("ctx", Context)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status, headers=headers)


# --- middlewares ---------------------------------------------------------------------


@web.middleware
async def errors_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = uuid.uuid4().hex
    try:
        response = await handler(request)
    except NotFound as exc:
        response = error(404, str(exc))
    except (validate.BadRequest, SuspendRefused) as exc:
        response = error(400, str(exc))
    except Conflict as exc:
        response = error(412, str(exc))
    except NameTaken as exc:
        response = error(422, str(exc))
    except LeaseHeld as exc:
        response = error(409, str(exc))
    except HostUnreachable as exc:
        response = error(503, str(exc))
    except web.HTTPException as exc:
        response = error(exc.status, exc.reason)
    except Exception:
        log.exception("emulator_handler_failed", path=request.path)
        response = error(500, "internal error in the emulator")
    response.headers["fly-request-id"] = request_id
    return response


@web.middleware
async def auth_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request.app[CTX]
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    ok = scheme.lower() in ("bearer", "flyv1") and hmac.compare_digest(
        given.strip().encode(), ctx.token.encode()
    )
    if not ok:
        # Never echo what was sent: it may be a real token pasted by mistake.
        return error(401, "missing or invalid API token", {"WWW-Authenticate": "Bearer"})
    return await handler(request)


@web.middleware
async def limits_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(CONTROL_PREFIX):
        return await handler(request)  # the switches for faults are never faulty themselves
    ctx = request.app[CTX]
    faults = ctx.world.lifecycle.faults  # one copy: Emulator.set_faults changes it
    if faults.latency_s:
        await asyncio.sleep(faults.latency_s)
    if faults.error_rate and ctx.rng.random() < faults.error_rate:
        return injected_error()
    if faults.rate_limit_rate and ctx.rng.random() < faults.rate_limit_rate:
        return error(429, "injected fault: rate limited", {"Retry-After": "1"})
    action = request.match_info.route.name
    if ctx.rate_limits and action:
        info = request.match_info
        resource = info.get("machine_id") or info.get("volume_id")
        key = bucket_key(action, ctx.world.settings.org_slug, info.get("app_name"), resource)
        wait = ctx.limiter.take(action, key)
        if wait:
            return error(
                429,
                f"rate limit exceeded for {action} on {key}; retry in {wait:.2f}s",
                {"Retry-After": retry_after(wait)},
            )
    response = await handler(request)
    if (
        faults.answer_lost_rate
        and action is not None
        and action in (faults.answer_lost_calls or CHANGING_MACHINE_CALLS)
        and response.status < 300
        and ctx.rng.random() < faults.answer_lost_rate
    ):
        lose_answer(request, action)
    return response


def injected_error() -> web.Response:
    """The answer of a call that ``faults.error_rate`` fails."""
    return error(500, "injected fault: internal server error")


def outage_cuts(request: web.Request, seen_rate: float) -> bool:
    """Whether a call in flight (a /wait) is ended by the error rate now in force, which
    rose above ``seen_rate``, the one it last saw: with that rate's chance, as a new call
    is. On Fly a control-plane outage drops its long polls in flight too."""
    ctx = request.app[CTX]
    rate = ctx.world.lifecycle.faults.error_rate
    return rate > seen_rate and ctx.rng.random() < rate


def lose_answer(request: web.Request, call: str) -> None:
    """The call was carried out; its answer never reaches the client: the connection is
    closed before a byte of it is written, as when Fly's edge gives up on flyd after flyd
    acted. A dropped connection, not a 502 or 504 of the edge: the client learns nothing,
    not even that a server answered, which is the harder case (a transport error after
    the request was sent: ``may_have_landed``). aiohttp then writes nothing (its write to
    the closing transport fails, which it takes for a client that went away)."""
    log.info("emulator_answer_lost", call=call, path=request.path)
    if request.transport is not None:
        request.transport.close()


# --- helpers ---------------------------------------------------------------------------


def world_of(request: web.Request) -> World:
    return request.app[CTX].world


def machine_of(request: web.Request) -> Machine:
    info = request.match_info
    return world_of(request).machine(info["app_name"], info["machine_id"])


def leased_machine(request: web.Request) -> Machine:
    """The machine a changing call targets; 409 when someone else holds its lease."""
    m = machine_of(request)
    request.app[CTX].leases.check(m.id, request.headers.get(NONCE_HEADER))
    return m


async def read_body(request: web.Request, required: bool = True) -> Any:
    raw = await request.read()
    if not raw.strip():
        if required:
            raise validate.BadRequest("body: required (a JSON document)")
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise validate.BadRequest(f"body: invalid JSON: {exc}") from None


def query_flag(request: web.Request, *names: str) -> bool:
    for name in names:
        value = request.query.get(name)
        if value is None:
            continue
        if value.lower() in ("true", "1", "yes", ""):
            return True
        if value.lower() in ("false", "0", "no"):
            continue
        raise validate.BadRequest(f"{name}: expected true or false, got {value!r}")
    return False


def ok_body(**extra: Any) -> web.Response:
    return web.json_response({"ok": True, **extra})
