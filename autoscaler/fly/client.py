"""MachinesClient: the async Fly Machines API client, on one long-lived httpx.AsyncClient.

This is the only module of the package that imports httpx. Every call goes through
``_send``: client-side rate limit, one HTTP attempt, observer callback, the mapping of a
non-2xx response to the exception tree (``errors.error_from_response``), and retries of
transient failures with exponential backoff and full jitter, honouring Retry-After, bounded
by ``max_retries`` and ``retry_deadline_s``. Time (``sleep``, ``clock``) and randomness
(``rng``) are injectable so that tests never wait.

Operations that are safe to repeat (reads, wait, start, stop, suspend, cordon, uncordon,
metadata) retry on 429, 5xx and transport errors. Everything else (create, update, delete,
snapshot, OIDC) retries only when the request surely never left (connect failure), because
a lost response to a create may still have created something.

What the client does about the differences between the seed and the real API is in
docs/fly-client.md.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, SecretStr, ValidationError

from autoscaler.config import FlySettings
from autoscaler.fly import models as m
from autoscaler.fly.errors import (
    FlyError,
    NotFound,
    RateLimited,
    TransportError,
    WaitTimeout,
    error_from_response,
    scrub,
)
from autoscaler.fly.limits import Clock, Limit, RateLimiter, Sleep
from autoscaler.logs import get_logger, redactor

__all__ = ["MAX_WAIT_CALL_S", "MachinesAPI", "MachinesClient", "Observer"]

Observer = Callable[[str, int | None, float], None]
_M = TypeVar("_M", bound=BaseModel)

MAX_WAIT_CALL_S = 60  # the real API answers 400 to a longer /wait; longer waits loop
# Repeating these cannot do harm: they read, or drive a machine towards a state it may
# already be in. Everything else is retried only when the request never left.
SAFE_OPERATIONS = frozenset(
    {
        "list_apps",
        "get_app",
        "list_machines",
        "get_machine",
        "start_machine",
        "stop_machine",
        "suspend_machine",
        "wait_for_machine_state",
        "cordon_machine",
        "uncordon_machine",
        "get_machine_metadata",
        "set_machine_metadata",
        "delete_machine_metadata",
        "list_volumes",
        "get_volume",
        "list_volume_snapshots",
    }
)
_NO_BODY = object()


@dataclass(slots=True)
class _Call:
    operation: str
    method: str
    path: str
    app: str | None = None
    machine: str | None = None
    params: dict[str, str | int] = field(default_factory=dict)
    body: Any = _NO_BODY
    timeout_s: float | None = None

    @property
    def limit_key(self) -> str:
        return f"{self.app}/{self.machine}" if self.machine else (self.app or "-")


def _seg(value: str) -> str:
    return quote(value, safe="")


def duration_string(seconds: float) -> str:
    """Seconds as a Go duration string ("30s", "1500ms"): what the real API's stop parses."""
    if seconds < 0:
        raise ValueError(f"expected a timeout >= 0 seconds, got {seconds}")
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def _body_or_dict(model: type[_M], value: _M | Mapping[str, Any]) -> _M:
    return value if isinstance(value, model) else model.model_validate(value)


class MachinesClient:
    """Async client for every operation of the seed spec; use ``async with`` or ``aclose()``."""

    def __init__(
        self,
        base_url: str,
        token: SecretStr | str | None,
        *,
        org_slug: str = "personal",
        timeout_s: float = 30.0,
        rate_limit: bool = True,
        limits: Mapping[str, Limit] | None = None,
        max_retries: int = 5,
        retry_deadline_s: float = 60.0,
        backoff_base_s: float = 0.25,
        backoff_max_s: float = 10.0,
        observer: Observer | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.monotonic,
        rng: Callable[[], float] = random.random,
        max_connections: int = 50,
    ) -> None:
        secret = token.get_secret_value() if isinstance(token, SecretStr) else token
        self._secrets = (secret,) if secret else ()
        for s in self._secrets:
            redactor().add(s)  # belt and braces: the token is never logged anyway
        headers = {"user-agent": "autoscaler-fly-client", "accept": "application/json"}
        if secret:
            # Fly macaroons come as "FlyV1 ..." and go as they are; anything else is Bearer.
            headers["authorization"] = secret if secret.startswith("FlyV1 ") else f"Bearer {secret}"
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.org_slug = org_slug
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._retry_deadline_s = retry_deadline_s
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._observer = observer
        self._sleep = sleep
        self._clock = clock
        self._rng = rng
        self.limiter = RateLimiter(limits, enabled=rate_limit, sleep=sleep, clock=clock)
        self._log = get_logger("autoscaler.fly")
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout_s,
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=20),
            follow_redirects=False,
        )

    @classmethod
    def from_settings(cls, fly: FlySettings, base_url: str | None = None, **kw: Any) -> Self:
        """A client from the ``fly`` section; ``base_url`` overrides ``fly.api_url``.

        ``fly.api_url`` unset means "run the embedded emulator": the caller starts it and
        passes its URL (and, if the settings have none, its token in ``token=``).
        """
        url = base_url or fly.api_url
        if not url:
            raise ValueError("fly.api_url is unset: pass base_url (e.g. the emulator's URL)")
        options: dict[str, Any] = {
            "org_slug": fly.org_slug,
            "timeout_s": fly.timeout_s,
            "rate_limit": fly.rate_limit,
            "max_retries": fly.max_retries,
            "retry_deadline_s": fly.retry_deadline_s,
        }
        options.update(kw)
        token = options.pop("token", fly.token)
        return cls(url, token, **options)

    def __repr__(self) -> str:
        return f"MachinesClient(base_url={self.base_url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the one path every request takes ---------------------------------------------------

    async def _send(self, call: _Call) -> Any:
        """Send with rate limit and retries; the decoded 2xx body (JSON, text or None)."""
        started = self._clock()
        deadline = started + self._retry_deadline_s
        attempt = 0
        while True:
            attempt += 1
            await self.limiter.acquire(call.operation, call.limit_key)
            t0 = self._clock()
            status: int | None = None
            try:
                response = await self._http.request(
                    call.method,
                    call.path,
                    params=call.params or None,
                    json=None if call.body is _NO_BODY else call.body,
                    timeout=call.timeout_s if call.timeout_s is not None else self._timeout_s,
                )
            except httpx.HTTPError as exc:
                error: FlyError = self._transport_error(exc, call.operation)
            else:
                status = response.status_code
                if status < 300:
                    self._observe(call.operation, status, self._clock() - t0)
                    self._log_result(call, status, started, attempt, None)
                    return _decode(response)
                error = error_from_response(
                    status,
                    response.content,
                    response.headers,
                    operation=call.operation,
                    secrets=self._secrets,
                )
            self._observe(call.operation, status, self._clock() - t0)
            delay = self._retry_delay(call.operation, error, attempt, deadline)
            if delay is None:
                self._log_result(call, status, started, attempt, error)
                raise error
            self._log.info(
                "fly_api_retry",
                operation=call.operation,
                app=call.app,
                machine=call.machine,
                status=status,
                attempt=attempt,
                delay_s=round(delay, 3),
                error=str(error),
            )
            await self._sleep(delay)

    def _transport_error(self, exc: httpx.HTTPError, operation: str) -> TransportError:
        # Connect failures (and a pool that never handed out a connection) mean the request
        # never left; anything later may have reached Fly.
        unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
        retryable = isinstance(exc, httpx.TransportError) and not isinstance(
            exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError | httpx.ProxyError
        )
        text = scrub(f"{type(exc).__name__}: {exc}".rstrip(": "), self._secrets)
        return TransportError(text, sent=not unsent, retryable=retryable, operation=operation)

    def _retry_delay(
        self, operation: str, error: FlyError, attempt: int, deadline: float
    ) -> float | None:
        """Seconds to sleep before the next attempt, or None to give up and raise."""
        if attempt > self._max_retries or not error.transient:
            return None
        if operation not in SAFE_OPERATIONS and not (
            isinstance(error, TransportError) and not error.sent
        ):
            return None
        # Full jitter: a uniformly random pause below the exponential cap spreads clients out.
        cap = min(self._backoff_max_s, self._backoff_base_s * 2.0 ** (attempt - 1))
        delay = self._rng() * cap
        if isinstance(error, RateLimited) and error.retry_after is not None:
            delay = error.retry_after
        if self._clock() + delay > deadline:
            return None
        return delay

    def _observe(self, operation: str, status: int | None, duration_s: float) -> None:
        if self._observer is None:
            return
        try:
            self._observer(operation, status, max(0.0, duration_s))
        except Exception as exc:  # a metrics bug must not break API calls
            self._log.warning("fly_api_observer_failed", error=repr(exc))

    def _log_result(
        self, call: _Call, status: int | None, started: float, attempt: int, error: FlyError | None
    ) -> None:
        fields: dict[str, Any] = {
            "operation": call.operation,
            "app": call.app,
            "machine": call.machine,
            "status": status,
            "duration_ms": round((self._clock() - started) * 1000, 1),
            "attempt": attempt,
        }
        if error is None:
            # Reads run every controller tick: keep them out of the info log.
            log = self._log.debug if call.method == "GET" else self._log.info
            log("fly_api", **fields)
        else:
            fields.update(error=error.message, error_type=type(error).__name__)
            if error.request_id:
                fields["request_id"] = error.request_id
            self._log.warning("fly_api", **fields)

    def _parse(self, model: type[_M], payload: Any, operation: str) -> _M:
        try:
            return model.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top)"
            text = f"unexpected response body: {where}: {first['msg']}"
            raise FlyError(200, text, operation=operation) from None

    def _parse_list(self, model: type[_M], payload: Any, operation: str) -> list[_M]:
        if not isinstance(payload, list):
            raise FlyError(
                200, f"expected a JSON array, got {type(payload).__name__}", operation=operation
            )
        return [self._parse(model, item, operation) for item in payload]

    # -- apps -------------------------------------------------------------------------------

    async def list_apps(self, org_slug: str | None = None) -> m.AppList:
        org = org_slug or self.org_slug
        payload = await self._send(
            _Call("list_apps", "GET", "/v1/apps", app=org, params={"org_slug": org})
        )
        return self._parse(m.AppList, payload, "list_apps")

    async def create_app(
        self,
        app_name: str,
        org_slug: str | None = None,
        *,
        network: str | None = None,
        enable_subdomains: bool | None = None,
    ) -> m.App:
        """Create an app. Sends ``app_name`` (seed) and ``name`` (real API) both."""
        org = org_slug or self.org_slug
        request = m.CreateAppRequest(
            app_name=app_name, org_slug=org, network=network, enable_subdomains=enable_subdomains
        )
        body = {**request.to_json(), "name": app_name}
        payload = await self._send(_Call("create_app", "POST", "/v1/apps", app=org, body=body))
        if isinstance(payload, dict):
            return self._parse(m.App, payload, "create_app")
        # The real API answers 201 with no body.
        return m.App(name=app_name, organization=m.Organization(slug=org))

    async def get_app(self, app: str) -> m.App:
        payload = await self._send(_Call("get_app", "GET", f"/v1/apps/{_seg(app)}", app=app))
        return self._parse(m.App, payload, "get_app")

    async def delete_app(self, app: str, *, force: bool = False) -> None:
        params: dict[str, str | int] = {"force": "true"} if force else {}
        await self._send(
            _Call("delete_app", "DELETE", f"/v1/apps/{_seg(app)}", app=app, params=params)
        )

    # -- machines ---------------------------------------------------------------------------

    def _machine_path(self, app: str, machine_id: str, suffix: str = "") -> str:
        return f"/v1/apps/{_seg(app)}/machines/{_seg(machine_id)}{suffix}"

    async def list_machines(self, app: str) -> list[m.Machine]:
        payload = await self._send(
            _Call("list_machines", "GET", f"/v1/apps/{_seg(app)}/machines", app=app)
        )
        return self._parse_list(m.Machine, payload, "list_machines")

    async def create_machine(
        self,
        app: str,
        config: m.MachineConfig | Mapping[str, Any],
        *,
        name: str | None = None,
        region: str | None = None,
        skip_service_registration: bool | None = None,
        **extra: Any,
    ) -> m.Machine:
        """Create a machine; ``extra`` goes into the body as is (real-API fields)."""
        request = m.CreateMachineRequest(
            config=_body_or_dict(m.MachineConfig, config),
            name=name,
            region=region,
            skip_service_registration=skip_service_registration,
            **extra,
        )
        payload = await self._send(
            _Call(
                "create_machine",
                "POST",
                f"/v1/apps/{_seg(app)}/machines",
                app=app,
                body=request.to_json(),
            )
        )
        return self._parse(m.Machine, payload, "create_machine")

    async def get_machine(self, app: str, machine_id: str) -> m.Machine:
        payload = await self._send(
            _Call("get_machine", "GET", self._machine_path(app, machine_id), app, machine_id)
        )
        return self._parse(m.Machine, payload, "get_machine")

    async def update_machine(
        self,
        app: str,
        machine_id: str,
        config: m.MachineConfig | Mapping[str, Any],
        *,
        name: str | None = None,
        region: str | None = None,
        skip_service_registration: bool | None = None,
        **extra: Any,
    ) -> m.Machine:
        request = m.CreateMachineRequest(
            config=_body_or_dict(m.MachineConfig, config),
            name=name,
            region=region,
            skip_service_registration=skip_service_registration,
            **extra,
        )
        payload = await self._send(
            _Call(
                "update_machine",
                "POST",
                self._machine_path(app, machine_id),
                app,
                machine_id,
                body=request.to_json(),
            )
        )
        return self._parse(m.Machine, payload, "update_machine")

    async def delete_machine(self, app: str, machine_id: str, *, force: bool = False) -> None:
        """Destroy a machine; ``force`` (``?force=true``) kills a running one first."""
        params: dict[str, str | int] = {"force": "true"} if force else {}
        await self._send(
            _Call(
                "delete_machine",
                "DELETE",
                self._machine_path(app, machine_id),
                app,
                machine_id,
                params=params,
            )
        )

    async def start_machine(self, app: str, machine_id: str) -> m.StartResult:
        payload = await self._send(
            _Call(
                "start_machine",
                "POST",
                self._machine_path(app, machine_id, "/start"),
                app,
                machine_id,
            )
        )
        # The seed answers with no body, the real API with {"previous_state": ...}.
        return self._parse(
            m.StartResult, payload if isinstance(payload, dict) else {}, "start_machine"
        )

    async def stop_machine(
        self,
        app: str,
        machine_id: str,
        *,
        signal: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Stop; the timeout goes as a duration string ("30s"), which both APIs accept."""
        request = m.StopRequest(
            signal=signal, timeout=duration_string(timeout_s) if timeout_s is not None else None
        )
        body = request.to_json()
        await self._send(
            _Call(
                "stop_machine",
                "POST",
                self._machine_path(app, machine_id, "/stop"),
                app,
                machine_id,
                body=body if body else _NO_BODY,
            )
        )

    async def suspend_machine(self, app: str, machine_id: str) -> None:
        await self._send(
            _Call(
                "suspend_machine",
                "POST",
                self._machine_path(app, machine_id, "/suspend"),
                app,
                machine_id,
            )
        )

    async def wait_for_machine_state(
        self,
        app: str,
        machine_id: str,
        state: str | Sequence[str] = "started",
        timeout_s: float = 60,
        instance_id: str | None = None,
    ) -> m.WaitResult:
        """Wait up to ``timeout_s`` (any length) for the machine to reach ``state``.

        The real API accepts at most 60 s per call, so a longer wait is several calls, each
        answered 408 while the machine is not there yet. 404 counts as reaching "destroyed".
        Raises WaitTimeout when our own deadline passes.
        """
        states = state if isinstance(state, str) else ",".join(state)
        deadline = self._clock() + timeout_s
        path = self._machine_path(app, machine_id, "/wait")
        while True:
            remaining = deadline - self._clock()
            per_call = max(1, min(MAX_WAIT_CALL_S, math.ceil(remaining)))
            params: dict[str, str | int] = {"state": states, "timeout": per_call}
            if instance_id:
                params["instance_id"] = instance_id
            call = _Call(
                "wait_for_machine_state",
                "GET",
                path,
                app,
                machine_id,
                params=params,
                timeout_s=self._timeout_s + per_call,  # the server holds the request that long
            )
            t0 = self._clock()
            try:
                payload = await self._send(call)
            except WaitTimeout as exc:
                now = self._clock()
                if now < deadline and now - t0 < per_call / 2:
                    # A 408 that came back early must not turn this loop into a busy spin.
                    await self._sleep(min(1.0, deadline - now))
                    now = self._clock()
                if now >= deadline:
                    raise WaitTimeout(
                        408,
                        f"machine {machine_id} did not reach {states} within {timeout_s:g}s "
                        f"({exc.message})",
                        exc.request_id,
                        operation="wait_for_machine_state",
                    ) from None
                continue
            except NotFound:
                if "destroyed" in states.split(","):
                    return m.WaitResult(ok=True, state="destroyed")
                raise
            if isinstance(payload, dict):
                result = self._parse(m.WaitResult, payload, "wait_for_machine_state")
                if result.state is None:
                    result.state = states.split(",")[0]
                return result
            return m.WaitResult(ok=True, state=states.split(",")[0])

    wait = wait_for_machine_state

    async def cordon_machine(self, app: str, machine_id: str) -> None:
        await self._send(
            _Call(
                "cordon_machine",
                "POST",
                self._machine_path(app, machine_id, "/cordon"),
                app,
                machine_id,
            )
        )

    async def uncordon_machine(self, app: str, machine_id: str) -> None:
        await self._send(
            _Call(
                "uncordon_machine",
                "POST",
                self._machine_path(app, machine_id, "/uncordon"),
                app,
                machine_id,
            )
        )

    # -- metadata ---------------------------------------------------------------------------

    def _metadata_path(self, app: str, machine_id: str, key: str) -> str:
        return self._machine_path(app, machine_id, f"/metadata/{_seg(key)}")

    async def get_machine_metadata(self, app: str, machine_id: str, key: str) -> str:
        """One metadata value; reads the seed's bare string and the real ``{"value": ...}``."""
        payload = await self._send(
            _Call(
                "get_machine_metadata",
                "GET",
                self._metadata_path(app, machine_id, key),
                app,
                machine_id,
            )
        )
        if isinstance(payload, dict) and isinstance(payload.get("value"), str):
            return str(payload["value"])
        if isinstance(payload, str):
            return payload
        raise FlyError(
            200,
            f"unexpected metadata body of type {type(payload).__name__}",
            operation="get_machine_metadata",
        )

    async def set_machine_metadata(self, app: str, machine_id: str, key: str, value: str) -> None:
        # The real API needs {"value": ...}; the emulator accepts that as well as the seed's
        # bare string.
        await self._send(
            _Call(
                "set_machine_metadata",
                "POST",
                self._metadata_path(app, machine_id, key),
                app,
                machine_id,
                body={"value": value},
            )
        )

    async def delete_machine_metadata(self, app: str, machine_id: str, key: str) -> None:
        await self._send(
            _Call(
                "delete_machine_metadata",
                "DELETE",
                self._metadata_path(app, machine_id, key),
                app,
                machine_id,
            )
        )

    # -- volumes ----------------------------------------------------------------------------

    def _volume_path(self, app: str, volume_id: str, suffix: str = "") -> str:
        return f"/v1/apps/{_seg(app)}/volumes/{_seg(volume_id)}{suffix}"

    async def list_volumes(self, app: str) -> list[m.Volume]:
        payload = await self._send(
            _Call("list_volumes", "GET", f"/v1/apps/{_seg(app)}/volumes", app=app)
        )
        return self._parse_list(m.Volume, payload, "list_volumes")

    async def create_volume(
        self,
        app: str,
        name: str,
        size_gb: int,
        region: str,
        *,
        encrypted: bool | None = None,
        unique_zones_only: bool | None = None,
        snapshot_id: str | None = None,
        snapshot_retention: int | None = None,
        **extra: Any,
    ) -> m.Volume:
        request = m.CreateVolumeRequest(
            name=name,
            size_gb=size_gb,
            region=region,
            encrypted=encrypted,
            unique_zones_only=unique_zones_only,
            snapshot_id=snapshot_id,
            snapshot_retention=snapshot_retention,
            **extra,
        )
        payload = await self._send(
            _Call(
                "create_volume",
                "POST",
                f"/v1/apps/{_seg(app)}/volumes",
                app=app,
                body=request.to_json(),
            )
        )
        return self._parse(m.Volume, payload, "create_volume")

    async def get_volume(self, app: str, volume_id: str) -> m.Volume:
        payload = await self._send(
            _Call("get_volume", "GET", self._volume_path(app, volume_id), app, volume_id)
        )
        return self._parse(m.Volume, payload, "get_volume")

    async def update_volume(
        self, app: str, volume_id: str, *, snapshot_retention: int | None = None, **extra: Any
    ) -> m.Volume:
        request = m.UpdateVolumeRequest(snapshot_retention=snapshot_retention, **extra)
        payload = await self._send(
            _Call(
                "update_volume",
                "PUT",
                self._volume_path(app, volume_id),
                app,
                volume_id,
                body=request.to_json(),
            )
        )
        return self._parse(m.Volume, payload, "update_volume")

    async def delete_volume(self, app: str, volume_id: str) -> m.Volume | None:
        payload = await self._send(
            _Call("delete_volume", "DELETE", self._volume_path(app, volume_id), app, volume_id)
        )
        return (
            self._parse(m.Volume, payload, "delete_volume") if isinstance(payload, dict) else None
        )

    async def extend_volume(self, app: str, volume_id: str, size_gb: int) -> m.Volume:
        """Grow a volume. The seed answers with the Volume, the real API with
        ``{"volume": ..., "needs_restart": ...}``; both come back as the Volume."""
        body = m.ExtendVolumeRequest(size_gb=size_gb).to_json()
        payload = await self._send(
            _Call(
                "extend_volume",
                "PUT",
                self._volume_path(app, volume_id, "/extend"),
                app,
                volume_id,
                body=body,
            )
        )
        if isinstance(payload, dict) and isinstance(payload.get("volume"), dict):
            volume = self._parse(m.Volume, payload["volume"], "extend_volume")
            if "needs_restart" in payload:
                setattr(volume, "needs_restart", payload["needs_restart"])  # noqa: B010 - an extra field
            return volume
        return self._parse(m.Volume, payload, "extend_volume")

    async def list_volume_snapshots(self, app: str, volume_id: str) -> list[m.VolumeSnapshot]:
        payload = await self._send(
            _Call(
                "list_volume_snapshots",
                "GET",
                self._volume_path(app, volume_id, "/snapshots"),
                app,
                volume_id,
            )
        )
        return self._parse_list(m.VolumeSnapshot, payload, "list_volume_snapshots")

    async def create_volume_snapshot(self, app: str, volume_id: str) -> m.VolumeSnapshot | None:
        """Start a snapshot. Both APIs answer 200 with no body; a body, if any, is parsed."""
        payload = await self._send(
            _Call(
                "create_volume_snapshot",
                "POST",
                self._volume_path(app, volume_id, "/snapshots"),
                app,
                volume_id,
            )
        )
        if isinstance(payload, dict):
            return self._parse(m.VolumeSnapshot, payload, "create_volume_snapshot")
        return None

    # -- tokens -----------------------------------------------------------------------------

    async def get_oidc_token(self, aud: str | None = None) -> str:
        """An OIDC token (a JWT). It is a secret too: it is returned, never logged."""
        body = m.OidcTokenRequest(aud=aud).to_json()
        payload = await self._send(_Call("get_oidc_token", "POST", "/v1/tokens/oidc", body=body))
        if isinstance(payload, str):
            return payload.strip()
        if isinstance(payload, dict) and isinstance(payload.get("token"), str):
            return str(payload["token"])
        raise FlyError(
            200,
            f"unexpected OIDC body of type {type(payload).__name__}",
            operation="get_oidc_token",
        )


def _decode(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text  # the real OIDC endpoint answers with a bare JWT


class MachinesAPI(Protocol):
    """The part of the API the controller uses; tests put a fake in front of it."""

    async def list_machines(self, app: str) -> list[m.Machine]: ...

    async def get_machine(self, app: str, machine_id: str) -> m.Machine: ...

    async def start_machine(self, app: str, machine_id: str) -> m.StartResult: ...

    async def stop_machine(
        self,
        app: str,
        machine_id: str,
        *,
        signal: str | None = None,
        timeout_s: float | None = None,
    ) -> None: ...

    async def suspend_machine(self, app: str, machine_id: str) -> None: ...

    async def wait_for_machine_state(
        self,
        app: str,
        machine_id: str,
        state: str | Sequence[str] = "started",
        timeout_s: float = 60,
        instance_id: str | None = None,
    ) -> m.WaitResult: ...

    async def cordon_machine(self, app: str, machine_id: str) -> None: ...

    async def uncordon_machine(self, app: str, machine_id: str) -> None: ...

    async def get_machine_metadata(self, app: str, machine_id: str, key: str) -> str: ...

    async def set_machine_metadata(
        self, app: str, machine_id: str, key: str, value: str
    ) -> None: ...

    async def delete_machine_metadata(self, app: str, machine_id: str, key: str) -> None: ...


if TYPE_CHECKING:
    # mypy proves here that the real client satisfies the controller's interface.
    def _satisfies(client: MachinesClient) -> MachinesAPI:
        return client
