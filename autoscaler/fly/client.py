"""MachinesClient: the async Fly Machines API client, on one long-lived httpx.AsyncClient.

This is the only module of the package that imports httpx. Every call goes through
``_send``: client-side rate limit, one HTTP attempt, observer callback, the mapping of a
non-2xx response to the exception tree (``errors.error_from_response``), and retries of
transient failures with exponential backoff and full jitter, honouring Retry-After, bounded
by ``max_retries`` (of a 429, ``MAX_RATE_LIMITED_RETRIES``) and ``retry_deadline_s``. An
answer is read up to ``max_response_bytes`` (an error's up to ``MAX_ERROR_BODY_BYTES``):
a larger 2xx answer fails the call. Time (``sleep``, ``clock``) and randomness (``rng``)
are injectable so that tests never wait.

Operations that are safe to repeat (reads, wait, start, stop, suspend, cordon, uncordon,
metadata, lease reads, refreshes and releases) retry on 429, 5xx, a 408 (but from
``/wait``) and transport errors.
Everything else (create, update, delete, snapshot, OIDC, taking a lease) retries only when
the request surely never left (connect failure), because a lost response to a create may
still have created something.

The 27 operations of the seed and the real API's machine leases are in ``operations.py``
(no httpx there); what the client does about the differences between the seed and the real
API is in docs/fly-client.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, Self

import httpx
from pydantic import SecretStr

from autoscaler import __version__
from autoscaler.config import FlySettings
from autoscaler.fly import models as m
from autoscaler.fly.clock import FlyClock
from autoscaler.fly.errors import (
    BadRequest,
    FlyError,
    RateLimited,
    TransportError,
    Unauthorized,
    error_from_response,
    scrub,
)
from autoscaler.fly.limits import (
    DEFAULT_ORG_LIMIT,
    Clock,
    Limit,
    RateLimiter,
    Reservation,
    Sleep,
)
from autoscaler.fly.operations import (
    MAX_WAIT_CALL_S,
    NO_BODY,
    SAFE_OPERATIONS,
    Call,
    Operations,
    RawText,
    duration_string,
)
from autoscaler.logs import get_logger, redactor

__all__ = [
    "MAX_WAIT_CALL_S",
    "MachinesAPI",
    "MachinesClient",
    "Observer",
    "duration_string",
    "one_attempt",
]

Observer = Callable[[str, int | None, float], None]

# Set by one_attempt(): the timeout of every call made in this context (tasks started in
# it inherit it), each call then tried once.
_one_attempt: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "autoscaler_fly_one_attempt", default=None
)


@contextlib.contextmanager
def one_attempt(timeout_s: float) -> Iterator[None]:
    """Calls made inside (and by tasks started inside) are tried once, each within
    ``timeout_s`` (a long-poll ``/wait`` call within that plus the time the server holds
    it): the control loop's rule,
    where the next tick is the retry and no tick may hang in a retry loop."""
    token = _one_attempt.set(timeout_s)
    try:
        yield
    finally:
        _one_attempt.reset(token)


# Idle connections kept open to the API. httpcore looks at every idle connection of its
# pool on each request (is its socket still usable?), some 30 us apiece: one call cost
# 1.25-1.5 ms of CPU with 20 kept, 0.95-1.13 ms with 8 (benchmarks/api_keepalive.py, in
# docs/benchmarks.md). Eight cover the calls a controller of 1,000 apps has under way at
# once in steady state; a burst beyond them opens connections and closes them after.
KEEPALIVE_CONNECTIONS = 8

# The largest answer read (decompressed): Fly's largest are machine lists, a few kB a
# machine, so this holds several thousand machines; a proxy or API gone wrong that sends
# more fails the call (FlyError) instead of filling the memory. Settings:
# fly.max_response_bytes.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
# Of an error answer only this much is read: its message is one line of it.
MAX_ERROR_BODY_BYTES = 64 * 1024
# Retries of a call answered 429 (max_retries still bounds them): one, after Retry-After.
MAX_RATE_LIMITED_RETRIES = 1


class MachinesClient(Operations):
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
        keepalive_connections: int = KEEPALIVE_CONNECTIONS,
        org_limit: Limit | None = DEFAULT_ORG_LIMIT,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        secret = token.get_secret_value() if isinstance(token, SecretStr) else token
        # As a header carries it: the newline a token file ends with would make every call
        # fail with the header, token and all, in the error (config.py strips it too).
        secret = secret.strip() if secret else None
        if secret and not (secret.isascii() and secret.isprintable()):
            raise ValueError(
                "token: has characters an HTTP header cannot carry (control characters or"
                " non-ASCII); value not shown"
            )
        self._secrets = _secret_forms(secret) if secret else ()
        for s in self._secrets:
            redactor().add(s)  # belt and braces: the token is never logged anyway
        headers = {"user-agent": f"autoscaler/{__version__}", "accept": "application/json"}
        if secret:
            # Fly macaroons come as "FlyV1 ..." and go as they are; anything else is Bearer.
            headers["authorization"] = secret if secret.startswith("FlyV1 ") else f"Bearer {secret}"
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.org_slug = org_slug
        self._timeout_s = timeout_s
        if max_response_bytes < 1:
            raise ValueError(f"expected max_response_bytes >= 1, got {max_response_bytes}")
        self._max_response_bytes = max_response_bytes
        self._max_retries = max_retries
        self._retry_deadline_s = retry_deadline_s
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._observer = observer
        self._sleep = sleep
        self._clock = clock
        self._rng = rng
        self.limiter = RateLimiter(
            limits, enabled=rate_limit, sleep=sleep, clock=clock, org=org_limit
        )
        self.fly_clock = FlyClock(clock)
        """Fly's clock as the answers' ``Date`` headers show it (``fly_time``)."""
        self._log = get_logger("autoscaler.fly")
        self._slots = asyncio.Semaphore(max_connections)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout_s,
            transport=transport,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=keepalive_connections
            ),
            follow_redirects=False,
            # Straight to fly.api_url: never through HTTP(S)_PROXY from the environment
            # (the token would go to that proxy, in the clear over http://), nor .netrc.
            trust_env=False,
        )

    @classmethod
    def unconfigured(cls, **kw: Any) -> Self:
        """For a configuration with no ``fly.api_url`` whose apps are all static (fixed
        backends, nothing to scale): every call fails at once with a
        :class:`~autoscaler.fly.errors.TransportError` that says so, and nothing is sent
        anywhere (no connection is made)."""

        def refuse(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("fly.api_url is not set (static apps only)", request=request)

        kw.setdefault("max_retries", 0)
        return cls("http://fly-api-url-not-set", None, transport=httpx.MockTransport(refuse), **kw)

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
            "org_limit": Limit(fly.org_rate_limit_per_s, fly.org_burst),
            "max_response_bytes": fly.max_response_bytes,
        }
        options.update(kw)
        token = options.pop("token", fly.token)
        return cls(url, token, **options)

    def __repr__(self) -> str:
        return f"MachinesClient(base_url={self.base_url!r})"

    def fly_time(self) -> float:
        """Fly's time of day now, never ahead of it: what its times (a machine's events)
        are read against (``fly/clock.py``)."""
        return self.fly_clock.now()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the one path every request takes ---------------------------------------------------

    async def _send(self, call: Call) -> Any:
        """Send with rate limit and retries; the decoded 2xx body (JSON, text or None)."""
        started = self._clock()
        deadline = started + self._retry_deadline_s
        if call.deadline is not None:
            deadline = min(deadline, call.deadline)
        bound = _one_attempt.get()
        slack_s = self._timeout_s if bound is None else min(self._timeout_s, bound)
        attempt = 0
        rate_limited = 0  # 429s answered so far
        last: tuple[int | None, FlyError] | None = None  # the failure being retried
        throttled = 0.0
        while True:
            attempt += 1
            # A tick's call waits for its token within its bound too, or fails at once; so
            # does the retry of a call with a deadline of its own (a wait), within what is
            # left of it: past it, the call gives up with the failure it is retrying.
            max_wait_s = bound
            if call.deadline is not None and last is not None:
                left = max(0.0, call.deadline - self._clock())
                max_wait_s = left if max_wait_s is None else min(max_wait_s, left)
            try:
                reservation = await self.limiter.turn(
                    call.limit_action, call.limit_key, max_wait_s=max_wait_s
                )
                throttled += reservation.delay
            except RateLimited as exc:
                if last is not None:  # a retry's turn past the deadline: the last failure
                    self._log_result(call, last[0], started, attempt - 1, throttled, last[1])
                    raise last[1] from None
                exc.operation = call.operation
                self._log_result(call, None, started, attempt, throttled, exc)
                raise
            params, hold_s = self._hold(call)
            timeout_s = slack_s + hold_s
            t0 = self._clock()
            status: int | None = None
            error: FlyError | None = None
            slot = False
            try:
                slot = await self._take_slot(timeout_s, reservation)
                if self.limiter.moved(reservation):
                    # A 429 of its action and machine came while it waited for a
                    # connection: it would go into the hold. A new turn, behind it (the
                    # old one counts as spent: the bucket placed it before the hold).
                    attempt -= 1
                    continue
                sent = self._clock()
                # httpx's timeout bounds each read and write, not the exchange: an answer
                # that trickles in a byte at a time held the call (and a tick's one
                # attempt) for as long as it lasted. A tenth more than httpx's own, so
                # that a connect that never happens is still told apart (not sent).
                async with (
                    asyncio.timeout(timeout_s + min(1.0, timeout_s / 10)),
                    self._http.stream(
                        call.method,
                        call.path,
                        params=params or None,
                        json=None if call.body is NO_BODY else call.body,
                        headers=call.headers or None,
                        timeout=timeout_s,
                    ) as response,
                ):
                    received = self._clock()
                    status = response.status_code
                    body, whole = await self._read_body(response)
            except httpx.HTTPError as exc:
                status, error = None, self._transport_error(exc, call.operation)
            except TimeoutError:
                text = f"ReadTimeout: no whole answer within {timeout_s:g}s"
                status, error = None, TransportError(text, sent=True, operation=call.operation)
            else:
                if status >= 300:
                    error = error_from_response(
                        status,
                        body,
                        response.headers,
                        operation=call.operation,
                        secrets=self._secrets,
                    )
                elif not whole:
                    text = (
                        f"answer body over {self._max_response_bytes} bytes (the client's"
                        " max_response_bytes): not read"
                    )
                    error = FlyError(status, text, operation=call.operation)
            finally:
                if slot:
                    self._slots.release()
            self._observe(call.operation, status, self._clock() - t0)
            if error is None:
                # (The API's own answers only: an error may be a proxy's, on its clock.)
                self.fly_clock.observe(sent, received, response.headers.get("date"))
                self._log_result(call, status, started, attempt, throttled, None)
                return _decode(body, response.charset_encoding)
            if isinstance(error, RateLimited):
                self.limiter.rate_limited(call.limit_action, call.limit_key, error.retry_after)
                rate_limited += 1
            delay = (
                None
                if bound is not None
                else self._retry_delay(call.operation, error, attempt, deadline, rate_limited)
            )
            if delay is None:
                self._log_result(call, status, started, attempt, throttled, error)
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
            last = (status, error)

    def _hold(self, call: Call) -> tuple[dict[str, str | int], float]:
        """The query and the server's hold of this attempt. A call with a deadline of its
        own and a hold (a /wait) asks for no more than what is left of it, so that neither
        a wait for a rate-limit turn nor a retry carries it past the deadline its caller
        set: a retry of a /wait 9 s into a 10 s wait asked for the whole 10 s again."""
        if call.deadline is None or call.hold_param is None:
            return call.params, call.hold_s
        hold = min(call.hold_s, max(1, math.ceil(call.deadline - self._clock())))
        return {**call.params, call.hold_param: int(hold)}, float(hold)

    async def _read_body(self, response: httpx.Response) -> tuple[bytes, bool]:
        """The answer's body (decompressed), and whether it is whole: at most
        ``max_response_bytes`` of a 2xx answer, the first ``MAX_ERROR_BODY_BYTES`` of any
        other (its message is a line of it), so that no answer, however large, is held in
        memory whole. The rest is not read (the connection is closed)."""
        limit = self._max_response_bytes if response.status_code < 300 else MAX_ERROR_BODY_BYTES
        declared = response.headers.get("content-length", "")
        if response.status_code < 300 and declared.isdigit() and int(declared) > limit:
            return b"", False
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            if size + len(chunk) > limit:
                chunks.append(chunk[: limit - size])
                return b"".join(chunks), False
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks), True

    async def _take_slot(self, timeout_s: float, reservation: Reservation) -> bool:
        """One of ``max_connections`` slots, or httpx.PoolTimeout after ``timeout_s``.
        A call that gets none (cancelled, or timed out) was never sent: its rate-limit
        tokens (``reservation``) go back, as they do when it is cancelled waiting for them.

        Requests wait here rather than in httpx's pool, whose queue costs time quadratic in
        its length: 600 calls at once took 5.5 s of CPU there, 50 took 0.07 s
        (docs/benchmarks.md, "Many apps")."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            self.limiter.refund(reservation)
            raise httpx.PoolTimeout(f"no free connection within {timeout_s:g}s") from None
        except asyncio.CancelledError:
            self.limiter.refund(reservation)
            raise
        return True

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
        self, operation: str, error: FlyError, attempt: int, deadline: float, rate_limited: int
    ) -> float | None:
        """Seconds to sleep before the next attempt, or None to give up and raise.

        A 429 is tried again once at most (``MAX_RATE_LIMITED_RETRIES``): the server is
        short of what every caller of the action asks for, and with each caller trying
        again up to ``max_retries`` times, a storm of 429s made several times the calls."""
        if attempt > self._max_retries or not error.transient:
            return None
        if isinstance(error, RateLimited) and rate_limited > MAX_RATE_LIMITED_RETRIES:
            return None
        if operation not in SAFE_OPERATIONS and not (
            isinstance(error, TransportError) and not error.sent
        ):
            return None
        # Full jitter: a uniformly random pause below the exponential cap spreads clients out.
        # (The exponent stops at 60: 2.0 ** 1024 overflows a float.)
        cap = min(self._backoff_max_s, self._backoff_base_s * 2.0 ** min(attempt - 1, 60))
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
        self,
        call: Call,
        status: int | None,
        started: float,
        attempt: int,
        throttled: float,
        error: FlyError | None,
    ) -> None:
        fields: dict[str, Any] = {
            "operation": call.operation,
            "app": call.app,
            "machine": call.machine,
            "status": status,
            "duration_ms": round((self._clock() - started) * 1000, 1),
            "attempt": attempt,
        }
        if throttled > 0:
            fields["throttled_ms"] = round(throttled * 1000, 1)
        if error is None:
            # Reads run every controller tick: keep them out of the info log.
            log = self._log.debug if call.method == "GET" else self._log.info
            log("fly_api", **fields)
            return
        fields.update(error=error.message, error_type=type(error).__name__)
        if error.request_id:
            fields["request_id"] = error.request_id
        # A 404, a 409/412 conflict or a 408 inside a wait loop is an answer, not trouble;
        # a request Fly refused (400), auth, rate limits, server and transport failures
        # (a retryable one or not), and a 2xx answer too large to read, are.
        trouble = error.transient or isinstance(error, (BadRequest, TransportError, Unauthorized))
        trouble = trouble or (error.status is not None and error.status < 300)
        (self._log.warning if trouble else self._log.info)("fly_api", **fields)


# A piece of a token this long or longer is a secret of its own (a macaroon is hundreds).
_MIN_PART = 16


def _secret_forms(secret: str) -> tuple[str, ...]:
    """The texts to scrub for a token, longest first: the token, and for a ``FlyV1`` one
    the list after the scheme and each macaroon of it (each a credential, or the
    discharge of one, on its own: a server may quote one alone)."""
    macaroons = secret.removeprefix("FlyV1 ").strip()
    parts = (p.strip() for p in (macaroons, *macaroons.split(",")))
    forms = {secret, *(p for p in parts if len(p) >= _MIN_PART)}
    return tuple(sorted(forms, key=len, reverse=True))


def _decode(body: bytes, charset: str | None) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than it can go
        pass
    # The real OIDC endpoint answers with a bare JWT; to the others such text is no answer.
    try:
        return RawText(body.decode(charset or "utf-8", "replace"))
    except LookupError:  # a charset Python does not know
        return RawText(body.decode("utf-8", "replace"))


class MachinesAPI(Protocol):
    """The part of the API the controller uses; tests put a fake in front of it.

    ``lease_nonce``: the nonce of a lease we hold on the machine (see ``acquire_machine_lease``);
    without it a machine leased by someone else answers a change with LeaseHeld (409).
    """

    async def list_machines(self, app: str) -> list[m.Machine]: ...

    async def get_machine(self, app: str, machine_id: str) -> m.Machine: ...

    async def start_machine(
        self, app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> m.StartResult: ...

    async def stop_machine(
        self,
        app: str,
        machine_id: str,
        *,
        signal: str | None = None,
        timeout_s: float | None = None,
        lease_nonce: str | None = None,
    ) -> None: ...

    async def suspend_machine(
        self, app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> None: ...

    async def wait_for_machine_state(
        self,
        app: str,
        machine_id: str,
        state: str | Sequence[str] = "started",
        timeout_s: float = 60,
        instance_id: str | None = None,
    ) -> m.WaitResult: ...

    def fly_time(self) -> float:
        """Fly's time of day now (Unix seconds), never ahead of it as far as the API's
        answers tell: what a machine's event times are read against."""
        ...

    async def cordon_machine(
        self, app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> None: ...

    async def uncordon_machine(
        self, app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> None: ...

    async def get_machine_metadata(self, app: str, machine_id: str, key: str) -> str: ...

    async def set_machine_metadata(
        self, app: str, machine_id: str, key: str, value: str, *, lease_nonce: str | None = None
    ) -> None: ...

    async def delete_machine_metadata(
        self, app: str, machine_id: str, key: str, *, lease_nonce: str | None = None
    ) -> None: ...

    async def acquire_machine_lease(
        self, app: str, machine_id: str, *, ttl_s: int = 30, description: str | None = None
    ) -> m.Lease: ...

    async def refresh_machine_lease(
        self,
        app: str,
        machine_id: str,
        nonce: str,
        *,
        ttl_s: int = 30,
        description: str | None = None,
    ) -> m.Lease: ...

    async def get_machine_lease(self, app: str, machine_id: str) -> m.Lease: ...

    async def release_machine_lease(self, app: str, machine_id: str, nonce: str) -> None: ...


if TYPE_CHECKING:
    # mypy proves here that the real client satisfies the controller's interface.
    def _satisfies(client: MachinesClient) -> MachinesAPI:
        return client
