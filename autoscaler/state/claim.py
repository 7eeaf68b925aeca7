"""Wake claims: one wake per app at a time across the whole cluster, with a fencing token.

Whoever wakes an app (the leader for a follower's request, or a follower that waited
``cluster.self_wake_after_s`` without seeing a routable machine) first takes the app's
claim, ``{prefix}:wake:{app}``: in one Lua script ``SET key holder NX PX ttl``, a fencing
token from ``INCR {prefix}:wake-fence`` (larger at every claim, also across a Redis that
came back empty: a lost counter starts again from Redis's clock, as the lease's does, see
:data:`~autoscaler.state.lease.NEXT_FENCE`; not the lease's counter, whose value the
leader's renewals compare) written into the key, and the previous claimant's name
(``{prefix}:woke:{app}``) swapped for ours. A replica that finds the key taken does not
wake: it waits for the machine the claimant brings up.

While the wake runs the claimant renews the key every ``ttl / 3`` (compare-and-``PEXPIRE``)
and every Machines API call the wake sends first checks the claim, as the leader's calls
check the lease: locally valid (until ``sent + 0.9 x ttl`` after the last renewal was
sent) *and* Redis still holding our value (:meth:`Claim.check`). A claimant that hangs or
loses Redis thus stops acting before anyone else can take the claim.

The key holds ``holder#nonce#token``, the nonce drawn by the take. A take whose reply
never came (the connection dropped, our command timeout fired, the task was cancelled)
may have run in Redis all the same, leaving our claim there until its TTL with no
:class:`Claim` of ours to use it: this replica's next take of the app sends that nonce
too (the last few such, :data:`UNANSWERED`), and the script hands that claim back instead
of finding it taken (as it does a claim whose release got no answer). Without that, the
app's wake (anyone's) waited for the TTL, longer than a short ``wake_timeout_s``.

Nothing compares claim tokens by order (unlike the lease's fence, which followers order
views by): every check, renewal, release and hand-back compares the claim's whole value,
whose nonce each take draws afresh, and the token itself is only logged. So a Redis
restored from an older snapshot, whose counter hands out again tokens it handed out
before, cannot make one claim pass for another: a claim of the snapshot that is still in
its TTL is its holder's own (the key expired otherwise), and a holder that released it
fails its checks locally. What such a restore can roll back is the record of who took the
app's claim last (``{prefix}:woke:{app}``): one that names the leader although a follower
woke the app after the snapshot lets the leader's wake skip its read (as a record lost
outright no longer does) and start, from its own view, the machine the follower started.
The leader's ticks list the app again soon after (``control.steady_list_s``); Redis's
data cannot tell that case apart.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from autoscaler.logs import get_logger
from autoscaler.state.lease import DRIFT, NEXT_FENCE
from autoscaler.state.scripts import Script

Clock = Callable[[], float]
_log = get_logger("autoscaler.state.claim")

_TAKE = Script(
    NEXT_FENCE
    + """
local held = redis.call('GET', KEYS[1])
if held then
  for i = 4, #ARGV do
    local mine = ARGV[1] .. '#' .. ARGV[i] .. '#'
    if string.sub(held, 1, #mine) == mine then
      redis.call('PEXPIRE', KEYS[1], ARGV[2])
      return {tonumber(string.sub(held, #mine + 1)), '', i - 3}
    end
  end
  return {0, '', 0}
end
local token = next_fence(KEYS[2])
local mine = ARGV[1] .. '#' .. ARGV[4] .. '#'
redis.call('SET', KEYS[1], mine .. string.format('%d', token), 'PX', ARGV[2])
local previous = redis.call('GET', KEYS[3])
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[3])
return {token, previous or '', 0}
"""
)
_RENEW = Script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
)
_CHECK = Script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return 1
end
return 0
"""
)
_RELEASE = Script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
)
REMEMBER_MS = 24 * 3600 * 1000
"""How long Redis remembers who took an app's last claim."""
UNANSWERED = 4
"""How many nonces of claims Redis may hold for us a take sends (the newest)."""


def claim_holder(value: object) -> str | None:
    """The replica that a claim's value in Redis (``holder#nonce#token``) names."""
    return None if value is None else str(value).rsplit("#", 2)[0]


class Claim:
    """One app's wake claim, held by this replica."""

    def __init__(
        self,
        claims: WakeClaims,
        app: str,
        token: int,
        nonce: str,
        previous: str | None,
        sent: float,
    ) -> None:
        self.claims = claims
        self.app = app
        self.token = token
        self.nonce = nonce
        self.previous = previous
        """Who took the app's claim before us ("" if nobody Redis remembers; None if we do
        not know: a claim of ours handed back, whose take's reply was lost)."""
        self.value = f"{claims.holder}#{nonce}#{token}"
        self.valid_until = sent + claims.ttl_s * (1 - DRIFT)
        self.released = False

    @property
    def key(self) -> str:
        return self.claims.key(self.app)

    def held(self) -> bool:
        """Still ours, as far as the local deadline knows (no I/O)."""
        return not self.released and self.claims.clock() < self.valid_until

    async def renew(self) -> bool:
        """Extend the claim; False once it is lost (Redis errors propagate)."""
        if not self.held():
            return False
        sent = self.claims.clock()
        ok = await _RENEW(self.claims.redis, (self.key,), (self.value, self.claims.ttl_ms))
        if ok:
            self.valid_until = sent + self.claims.ttl_s * (1 - DRIFT)
            return True
        _log.warning("wake_claim_lost", app=self.app, fence=self.token)
        self.valid_until = 0.0
        return False

    async def check(self) -> bool:
        """The fencing rule of a wake: may an action be sent now? False on any doubt."""
        if not self.held():
            return False
        try:
            ok = await _CHECK(self.claims.redis, (self.key,), (self.value,))
        except Exception as exc:  # redis' errors: no proof, no action
            _log.warning("wake_claim_unchecked", app=self.app, error=str(exc))
            return False
        return bool(ok) and self.held()

    async def release(self) -> None:
        """Let the next wake of the app go at once (else the key expires by its TTL)."""
        if self.released:
            return
        self.released = True
        try:
            await _RELEASE(self.claims.redis, (self.key,), (self.value,))
        except BaseException as exc:
            # It may be in Redis until its TTL: our next take of the app hands it back.
            self.claims.remember(self.app, self.nonce)
            if not isinstance(exc, Exception):
                raise
            _log.warning("wake_claim_not_released", app=self.app, error=str(exc))


class WakeClaims:
    """This replica's side of the per-app wake claims."""

    def __init__(
        self,
        redis: Any,
        prefix: str,
        holder: str,
        ttl_s: float,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.holder = holder
        self.ttl_s = ttl_s
        self.clock = clock
        self.fence_key = f"{prefix}:wake-fence"
        self.unanswered: dict[str, list[str]] = {}
        """Per app, the nonces of claims of ours that Redis may hold with no :class:`Claim`
        of ours for them (a take or a release that got no answer), newest first: the next
        take sends them. Several: a take may fail between a claim's end and its release's
        failure, and which of the two Redis holds, if either, is not known."""

    def remember(self, app: str, *nonces: str) -> None:
        """Nonces of claims Redis may hold for us (the newest first), for the next take."""
        known = self.unanswered.get(app, [])
        fresh = [n for n in nonces if n not in known]
        self.unanswered[app] = (fresh + known)[:UNANSWERED]

    @property
    def ttl_ms(self) -> int:
        return max(1, round(self.ttl_s * 1000))

    def key(self, app: str) -> str:
        return f"{self.prefix}:wake:{app}"

    def woke_key(self, app: str) -> str:
        return f"{self.prefix}:woke:{app}"

    async def take(self, app: str) -> Claim | None:
        """The app's claim, or None while another replica holds it (Redis errors
        propagate: without Redis nobody can prove a wake is theirs alone). A claim of ours
        that Redis holds from a take whose reply was lost is handed back."""
        # A fresh nonce for a new claim, then ours that Redis may hold.
        nonces = [uuid.uuid4().hex[:12], *self.unanswered.pop(app, [])]
        sent = self.clock()
        try:
            token, previous, again = await _TAKE(
                self.redis,
                (self.key(app), self.fence_key, self.woke_key(app)),
                (self.holder, self.ttl_ms, REMEMBER_MS, *nonces),
            )
        except BaseException:  # the script may have run, its reply lost: ask again next time
            self.remember(app, *nonces)
            raise
        if not int(token):
            return None
        if int(again):
            _log.info("wake_claim_recovered", app=app, holder=self.holder, fence=int(token))
            return Claim(self, app, int(token), nonces[int(again) - 1], None, sent)
        nonce = nonces[0]
        _log.info("wake_claimed", app=app, holder=self.holder, fence=int(token))
        return Claim(self, app, int(token), nonce, str(previous), sent)

    async def holder_of(self, app: str) -> str | None:
        """Who holds the app's claim now (tests, status)."""
        return claim_holder(await self.redis.get(self.key(app)))


__all__ = ["Claim", "WakeClaims", "claim_holder"]
