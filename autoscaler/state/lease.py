"""Leader election on Redis primitives, with a fencing token.

The lease is one key, ``{prefix}:leader``, holding the leader's replica id with a TTL of
``cluster.lease_ttl_s``. Acquiring is ``SET key id NX PX ttl``; in the same Lua script the
leader takes a fencing token from ``INCR {prefix}:fence``, so every acquisition gets a
larger token than any before it. Renewing is a compare-and-``PEXPIRE`` (a Lua script):
it succeeds only while the key still holds our id and the fence still holds our token.

The fence never goes backwards, even when Redis comes back empty (it keeps nothing on
disk, as the tests run it; or a failover to an empty replica, a FLUSHALL, an eviction): a
counter that Redis lost starts again from Redis's clock in microseconds
(:data:`NEXT_FENCE`), which is past every token the lost counter handed out (one token per
script run, and no run takes less than a microsecond). And each replica remembers the
largest fence it has seen (its own, and the leader's in the reports it reads) and acquires
with a token above it, should Redis's clock have gone back (a failover to a host whose
clock is behind). Followers order the leader's views by (fence, sequence): a fence that
started again from 1 would make them drop every view the new leader pushed until their
next read of its report, and take a stale leader's for newer.

Locally the lease is valid until ``sent + ttl * (1 - DRIFT)``, counted from when the last
successful acquire or renew was *sent* (Redis set the TTL after that moment, so the key
outlives our local deadline). A leader that cannot renew (Redis down, hung, a partition)
stops being leader at that deadline at the latest, before any other replica can acquire.

Each take draws a nonce, which the script writes into ``{prefix}:leader-nonce`` (with the
lease's TTL, renewed and released with it). A take whose reply never came (the connection
dropped, our command timeout fired) may have run in Redis all the same, leaving the lease
ours until its TTL with no token of ours for it; so may a renewal whose reply was lost
after our local deadline passed. The next take sends those nonces too (the last few,
:data:`UNANSWERED`), and the script hands such a lease back, with its token, instead of
finding it taken: without that, nobody led until the TTL ended. The leader key itself
still holds the bare replica id, as replicas of the previous release read and write it
(a rolling upgrade): a lease that one of them holds has no nonce of ours, and is never
handed to us.

:meth:`Lease.check` is the fencing rule the actions obey: the local deadline has not
passed *and* Redis still names us with our token (one round trip). An action whose check
fails is not sent.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from autoscaler.logs import get_logger
from autoscaler.state.scripts import Script

Clock = Callable[[], float]

_log = get_logger("autoscaler.state.lease")
DRIFT = 0.1  # the share of the TTL kept back for clock-rate differences and latency

NEXT_FENCE = """
local function next_fence(counter)
  if redis.call('EXISTS', counter) == 0 then
    local now = redis.call('TIME')
    redis.call('SET', counter, string.format('%d', now[1] * 1000000 + now[2]))
  end
  return redis.call('INCR', counter)
end
"""
"""A Lua function for the scripts that hand out fencing tokens: ``INCR`` of the counter,
which, when Redis lost it, starts again from Redis's clock in microseconds (not from 1).
Tokens stay below 2^53, exact in Lua's numbers; ``%d`` writes them whole (``..`` and
``tostring`` would write ``1.7e+15``)."""

_ACQUIRE = Script(
    NEXT_FENCE
    + """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local fence = next_fence(KEYS[2])
  local floor = tonumber(ARGV[3])
  if fence <= floor then
    fence = floor + 1
    redis.call('SET', KEYS[2], string.format('%d', fence))
  end
  redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[2])
  return {fence, 0}
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  local nonce = redis.call('GET', KEYS[3])
  local fence = tonumber(redis.call('GET', KEYS[2]))
  for i = 5, #ARGV do
    if nonce == ARGV[i] and fence then
      redis.call('PEXPIRE', KEYS[1], ARGV[2])
      redis.call('PEXPIRE', KEYS[3], ARGV[2])
      return {fence, i - 4}
    end
  end
end
return {0, 0}
"""
)
_RENEW = Script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
)
_CHECK = Script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('GET', KEYS[2]) == ARGV[2] then
  return 1
end
return 0
"""
)
_RELEASE = Script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('DEL', KEYS[3])
  return redis.call('DEL', KEYS[1])
end
return 0
"""
)
UNANSWERED = 4
"""How many nonces of leases Redis may hold for us a take sends (the newest)."""


class Lease:
    """One replica's side of the leader lease. Not a loop: :meth:`step` is one attempt
    (renew if we lead, acquire otherwise); the cluster calls it every ``ttl / 3``."""

    def __init__(
        self,
        redis: Any,
        prefix: str,
        replica_id: str,
        ttl_s: float,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.redis = redis
        self.replica_id = replica_id
        self.ttl_s = ttl_s
        self.clock = clock
        self.key = f"{prefix}:leader"
        self.fence_key = f"{prefix}:fence"
        self.nonce_key = f"{prefix}:leader-nonce"
        self.token: int | None = None
        self.nonce: str | None = None
        """The nonce of the take that gave us the lease we hold."""
        self.unanswered: list[str] = []
        """Nonces of leases Redis may hold for us with no token of ours for them (a take
        that got no answer, a lease that lapsed here), newest first: the next take sends
        them."""
        self.valid_until = 0.0
        self.highest = 0
        """The largest fence this replica has seen: the next token is above it."""

    def _remember(self, *nonces: str) -> None:
        fresh = [n for n in nonces if n not in self.unanswered]
        self.unanswered = (fresh + self.unanswered)[:UNANSWERED]

    def observe(self, fence: int) -> None:
        """A fence seen elsewhere (a leader's report or push)."""
        if fence > self.highest:
            self.highest = fence

    @property
    def ttl_ms(self) -> int:
        return max(1, round(self.ttl_s * 1000))

    def held(self) -> bool:
        """We lead, as far as the local deadline knows (no I/O)."""
        return self.token is not None and self.clock() < self.valid_until

    async def step(self) -> bool:
        """Renew (leader) or try to acquire (follower); whether we lead afterwards.

        A Redis error counts as a failed renewal: the lease stays valid until its local
        deadline, then lapses. The error propagates to the caller (which logs it)."""
        sent = self.clock()
        try:
            if self.token is not None:
                ok = await _RENEW(
                    self.redis,
                    (self.key, self.fence_key, self.nonce_key),
                    (self.replica_id, self.ttl_ms, self.token),
                )
                if ok:
                    self.valid_until = sent + self.ttl_s * (1 - DRIFT)
                else:
                    _log.warning("lease_lost", replica=self.replica_id, fence=self.token)
                    self.token = self.nonce = None
            else:
                await self._acquire(sent)
        finally:
            if self.token is not None and not self.held():
                _log.warning("lease_expired", replica=self.replica_id, fence=self.token)
                self.token = None
                # Redis may name us still (a renewal that ran, its reply lost): the next
                # take gets it back rather than waiting, leaderless, for its TTL.
                if self.nonce is not None:
                    self._remember(self.nonce)
                self.nonce = None
        return self.held()

    async def _acquire(self, sent: float) -> None:
        # A fresh nonce for a new lease, then ours that Redis may hold: a take whose reply
        # was lost may have run all the same, leaving the lease ours until its TTL.
        nonces = [uuid.uuid4().hex[:12], *self.unanswered]
        self.unanswered = []
        try:
            token, again = await _ACQUIRE(
                self.redis,
                (self.key, self.fence_key, self.nonce_key),
                (self.replica_id, self.ttl_ms, self.highest, *nonces),
            )
        except BaseException:  # the script may have run, its reply lost: ask again next time
            self._remember(*nonces)
            raise
        token = int(token)
        if not token:
            return
        self.token = token
        self.nonce = nonces[int(again)]
        self.observe(token)
        self.valid_until = sent + self.ttl_s * (1 - DRIFT)
        event = "lease_recovered" if int(again) else "lease_acquired"
        _log.info(event, replica=self.replica_id, fence=token)

    async def check(self) -> bool:
        """The fencing rule: may an action be sent now? False on any doubt (Redis errors
        included: a leader that cannot prove it leads does not act)."""
        token = self.token
        if token is None or not self.held():
            return False
        try:
            ok = await _CHECK(self.redis, (self.key, self.fence_key), (self.replica_id, token))
        except Exception as exc:  # redis' errors (connection, timeout): no proof, no action
            _log.warning("fence_unchecked", error=str(exc))
            return False
        return bool(ok) and self.held() and self.token == token

    async def release(self) -> None:
        """Give the lease up at once (a clean stop), so a follower need not wait the TTL."""
        token, self.token, self.nonce = self.token, None, None
        if token is None:
            return
        try:
            await _RELEASE(
                self.redis, (self.key, self.fence_key, self.nonce_key), (self.replica_id, token)
            )
        except Exception as exc:  # the lease then lapses by its TTL
            _log.warning("lease_not_released", error=str(exc))

    async def leader(self) -> str | None:
        """Who holds the lease now, as Redis says."""
        value = await self.redis.get(self.key)
        return None if value is None else str(value)
