"""Fly machine leases around our action sequences: we never fight another holder.

Every task that changes a machine (a wake's start or resume, a drain's cordon → suspend or
stop → uncordon, lifting a cordon, stopping a suspended machine) runs inside a lease on that
machine, and each of its changing calls sends the lease's nonce. Another holder (a ``fly
deploy`` updating the machine, another tool, another autoscaler) makes the acquire answer
409: the action is skipped, never forced.

- **TTL.** ``ttl_s`` (30 s) bounds how long a lease outlives a process that died holding it;
  a keeper task refreshes it every third of that while the sequence runs, so a drain that
  waits out ``drain_timeout_s`` or a 15 s suspend keeps it.
- **Release.** At the end of the sequence, whatever its outcome (cancelled too), from a
  task of its own: the action's result is not held up by one more round trip, and a
  cancelled task never ``await``s on its way out. The next ``take`` of the same machine
  waits for that release first. At a stop ``aclose`` waits for them within a bound (the
  controller's: ``control.api_timeout_s``); one still unanswered then is cut
  (``lease_release_failed``) and lapses after its TTL. A replica that stops leading lets
  the acquires of its cancelled actions answer and gives those leases back too, and
  leaves the releases still unanswered after that bound to answer (it lives on).
- **A lost answer.** An acquire whose answer never came back (a timeout, a cancelled task)
  may still have made a lease whose nonce we never saw. Our description carries ``owner``,
  so a 409 whose holder is ``owner`` is read back and adopted instead of waiting out the
  TTL: in one process, ``owner`` is this host (the next process on it adopts too); in
  cluster mode it is the replica's id, since replicas on one host (``--workers``) decide
  concurrently and one must never take over a lease another's drain holds. One whose
  acquire failed that way (sent, and not refused: ``may_have_landed``) and that no later
  take of the machine adopted is read back at a stop (or a step-down) and, if ours,
  released: it stayed on its machine until its TTL lapsed, refusing a deploy.
- **A replica gone.** In cluster mode a replica that died in the middle of a sequence (a
  leader whose drain had cordoned the machine, a wake's start) left its lease under its
  own name, which no other replica's ``owner`` matches: the new leader's actions on that
  machine were skipped as "leased by another holder" until the TTL (30 s), and an app
  whose only machine it held could not be woken meanwhile. ``former`` (the replica
  sets it) names the replica of this cluster that a holder's description stands for,
  if that replica is known gone (its report expired, or it left: ``Cluster.gone``; also
  before we joined, by what Redis keeps of it: ``{prefix}:gone``, its death or stop),
  none of the live ones is named so, and Redis lets it act no more: it holds neither
  the leader lease nor the app's wake claim (read afresh). Its lease is then adopted
  as our own (``lease_adopted`` with ``former``). Safe, since a replica's every
  change and lease refresh is fenced by that lease or claim in Redis
  (control/fencing.py): a replica that is alive but cut off from Redis, or hung, sends
  nothing more once both are gone from it (a claim it takes again has a value of its
  own, and it leads again only after the step-down that cancels its sequences), so the
  machine's sequence is ours alone from then on. What is left is what any handover
  leaves: a call it sent before, whose answer never came, may still land under the
  nonce (it landed too when we waited out the TTL, while our action was skipped; a
  release among them ends our sequence, as a lease that lapsed does). A
  live replica's lease and a holder that is not ours (a ``fly deploy``, a replica of
  another cluster: Redis never named it) are skipped as before, till the TTL.
- **A failed release.** A release the API failed (a 500, a 429, no answer) leaves our
  lease on the machine until its TTL. We still hold its nonce, so it is remembered
  (``_unreleased``, with when it lapses by our count) and the next ``take`` of the machine
  refreshes it and carries on under it: else the acquire met our own lease (409) and the
  action was skipped as "leased by another" until the lease was read back (the adoption
  above, which a failing API or one that hides nonces does not give). Only a nonce we
  were given counts: a refresh that answers 409 or 404 (lapsed, maybe taken by a deploy)
  drops it and the take acquires afresh; one the API fails keeps it, as ours until it
  lapses (our changes carry it, and the keeper refreshes it), unless a read of the lease
  (after a failure that may have landed: not a 429, nor a request never sent) shows one
  of ours under another nonce: the refresh was carried out, its answer lost,
  and made a new lease (the old one gone: released by a release whose answer was lost,
  or lapsed), which is adopted. The refresh carries our description for that. A stop (or
  a step-down) releases those still remembered, within its bound, as it does the releases
  under way.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any

from autoscaler.aio import cancel_and_wait
from autoscaler.fly.client import MachinesAPI
from autoscaler.fly.errors import FlyError, LeaseHeld, NotFound, may_have_landed
from autoscaler.logs import get_logger

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]
Former = Callable[[str, str], Awaitable[str | None]]

LEASE_TTL_S = 30
_log = get_logger("autoscaler.control")


def owner_of(name: str) -> str:
    """The ``owner`` our lease descriptions begin with, for a host or a replica id."""
    return f"autoscaler@{name}"


def default_owner() -> str:
    return owner_of(socket.gethostname())


@dataclass(slots=True)
class Held:
    """A lease of ours on one machine, kept alive by ``keeper`` until released."""

    app: str
    machine_id: str
    nonce: str
    expires: float = float("inf")
    """When it lapses at the latest, on the ``Leases`` clock: the TTL from when its
    acquire or last refresh was sent."""
    keeper: asyncio.Task[None] | None = field(default=None, repr=False)


class Leases:
    """Takes, keeps and gives back machine leases for the actuator."""

    def __init__(
        self,
        api: MachinesAPI,
        *,
        sleep: Sleep,
        clock: Clock = time.monotonic,
        ttl_s: int = LEASE_TTL_S,
        owner: str | None = None,
    ) -> None:
        self.api = api
        self.sleep = sleep
        self.clock = clock
        self.ttl_s = ttl_s
        self.owner = owner or default_owner()
        self._releasing: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._acquiring: dict[tuple[str, str], asyncio.Task[Held]] = {}
        self._unreleased: dict[tuple[str, str], Held] = {}
        """(app, machine) -> a lease of ours whose release the API failed, until it lapses."""
        self._maybe_taken: dict[tuple[str, str], float] = {}
        """(app, machine) -> when a lease that an acquire without an answer may have made
        lapses by our count; until a take of the machine succeeds."""
        self.former: Former | None = None
        """Cluster mode (the replica sets it): (app, a lease's description) -> the id of the
        replica of this cluster, gone, that took that lease, if we may adopt it as our own
        (see "A replica gone" above); None: we may not."""

    def description(self, what: str) -> str:
        return f"{self.owner}: {what}"

    async def take(self, app: str, machine_id: str, what: str) -> Held:
        """Our lease on the machine; LeaseHeld when another holder has it.

        The acquire runs in a task of its own: when the caller is cancelled (a drain taken
        back, a shutdown) it is not cut off in flight, and the lease it may bring back is
        released as soon as it answers, instead of lasting its TTL with a nonce nobody
        knows. The next ``take`` of the machine waits for that first.
        """
        key = (app, machine_id)
        acquiring = self._acquiring.get(key)
        if acquiring is not None:
            await asyncio.wait({acquiring})  # answered, and its lease given back (below)
        releasing = self._releasing.get(key)
        if releasing is not None:
            await asyncio.wait({releasing})  # our previous lease on it goes first
        task = asyncio.get_running_loop().create_task(
            self._acquire(app, machine_id, what), name=f"lease-take:{app}:{machine_id}"
        )
        self._acquiring[key] = task
        task.add_done_callback(lambda t: self._acquired(key, t))
        try:
            held = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                # Answered, and cancelled before this resumed (a drain taken back): the
                # release is under way before the next take of the machine looks for one.
                # (A done callback would run after that take's first step.)
                self._orphan(key, task)
            else:
                task.add_done_callback(lambda t: self._orphan(key, t))
            raise
        held.keeper = asyncio.get_running_loop().create_task(
            self._keep(held), name=f"lease:{app}:{machine_id}"
        )
        return held

    async def _acquire(self, app: str, machine_id: str, what: str) -> Held:
        left = await self._unreleased_lease(app, machine_id, what)
        if left is not None:
            return left
        sent = self.clock()
        try:
            lease = await self.api.acquire_machine_lease(
                app, machine_id, ttl_s=self.ttl_s, description=self.description(what)
            )
        except LeaseHeld:
            adopted = await self._ours_already(app, machine_id, former=True)
            if adopted is None:
                raise
            self._maybe_taken.pop((app, machine_id), None)
            # Taken at some time before ``sent``: it may lapse sooner than our count says,
            # which only a refresh (the keeper's, or a failed release's next take) tells.
            return Held(app, machine_id, adopted, sent + self.ttl_s)
        except FlyError as exc:
            if may_have_landed(exc):
                # A lease of ours may be on the machine, its nonce unknown: our next take
                # adopts it (above), a stop reads it back and gives it back.
                self._maybe_taken[(app, machine_id)] = sent + self.ttl_s
            raise
        self._maybe_taken.pop((app, machine_id), None)
        return Held(app, machine_id, lease.nonce, sent + self.ttl_s)

    async def _unreleased_lease(self, app: str, machine_id: str, what: str) -> Held | None:
        """Our lease on the machine whose release failed, refreshed, if it still lives.
        The refresh names us (``what``), as an acquire does: a lease it makes instead of
        the old one (lapsed, or released by a release whose answer was lost, as the
        emulator renews one) is ours to adopt."""
        left = self._unreleased.pop((app, machine_id), None)
        sent = self.clock()
        if left is None or sent >= left.expires:
            return None
        try:
            lease = await self.api.refresh_machine_lease(
                app, machine_id, left.nonce, ttl_s=self.ttl_s, description=self.description(what)
            )
        except asyncio.CancelledError:
            # A stop cutting the acquire: still ours by its nonce, so the stop releases it.
            self._unreleased.setdefault((app, machine_id), left)
            raise
        except (LeaseHeld, NotFound):
            return None  # lapsed (and maybe taken by another): acquire afresh
        except FlyError as exc:
            # Still ours by its nonce until it lapses; the API failing now would fail the
            # acquire too, while our changes under the nonce may go through.
            _log.warning("lease_refresh_failed", app=app, machine=machine_id, error=str(exc))
            # Unless the refresh was carried out and its answer lost, having made a new
            # lease: its nonce only a read shows. Under the old one, every change of the
            # action met our own lease (409), skipped as "leased by another" until it lapsed.
            # A refresh refused (429) or never sent (a connect failure) made none: no read,
            # one call less into an API that is failing.
            if may_have_landed(exc):
                made = await self._ours_already(app, machine_id, known=left.nonce)
                if made is not None:
                    return Held(app, machine_id, made, sent + self.ttl_s)
            return Held(app, machine_id, left.nonce, left.expires)
        return Held(app, machine_id, lease.nonce or left.nonce, sent + self.ttl_s)

    def _acquired(self, key: tuple[str, str], task: asyncio.Task[Held]) -> None:
        if self._acquiring.get(key) is task:
            del self._acquiring[key]

    def _orphan(self, key: tuple[str, str], task: asyncio.Task[Held]) -> None:
        """The answer to the acquire of a cancelled caller: give that lease straight back."""
        if task.cancelled() or task.exception() is not None:
            return  # no lease came of it (or one whose nonce we never saw: its TTL ends it)
        self.release_soon(task.result())

    async def _ours_already(
        self, app: str, machine_id: str, known: str | None = None, *, former: bool = False
    ) -> str | None:
        """The nonce of a lease this owner took but never heard back about, or (``former``:
        a take's) that a replica of our cluster that is gone left (``self.former``), if that
        is what holds the machine (and the API shows nonces); None otherwise, and when its
        nonce is ``known`` already."""
        try:
            lease = await self.api.get_machine_lease(app, machine_id)
        except FlyError:
            return None
        description = lease.description or ""
        if not lease.nonce or lease.nonce == known:
            return None
        gone = None
        if not description.startswith(f"{self.owner}: ") and (
            not former
            or self.former is None
            or (gone := await self.former(app, description)) is None
        ):
            return None
        _log.info(
            "lease_adopted", app=app, machine=machine_id, description=description, former=gone
        )
        return lease.nonce

    async def _keep(self, held: Held) -> None:
        """Refresh every third of the TTL: two refreshes may fail before the lease lapses."""
        while True:
            await self.sleep(self.ttl_s / 3)
            sent = self.clock()
            try:
                lease = await self.api.refresh_machine_lease(
                    held.app, held.machine_id, held.nonce, ttl_s=self.ttl_s
                )
            except (LeaseHeld, NotFound) as exc:
                # Lapsed (and maybe taken by another): our next change is refused with
                # 409, which ends the sequence; nothing to keep alive any more.
                _log.warning("lease_lost", app=held.app, machine=held.machine_id, error=str(exc))
                return
            except FlyError as exc:
                _log.warning(
                    "lease_refresh_failed", app=held.app, machine=held.machine_id, error=str(exc)
                )
                continue
            held.expires = sent + self.ttl_s
            if lease.nonce and lease.nonce != held.nonce:
                # It lapsed (refreshes failed for a whole TTL) and the refresh took a new one,
                # as the emulator does: ours again, under the nonce the sequence's next
                # changes and the release must send (with the old one, our own lease refused
                # them with 409 until it lapsed in turn).
                _log.warning("lease_renewed_after_lapse", app=held.app, machine=held.machine_id)
                held.nonce = lease.nonce

    async def release(self, held: Held) -> None:
        """Give the lease back. A failure logs, and the lease lapses after its TTL, or
        the next ``take`` of the machine carries on under it (``_unreleased``)."""
        if held.keeper is not None:
            await cancel_and_wait([held.keeper])
        try:
            await self.api.release_machine_lease(held.app, held.machine_id, held.nonce)
        except NotFound:
            pass  # lapsed already
        except FlyError as exc:
            _log.warning(
                "lease_release_failed", app=held.app, machine=held.machine_id, error=str(exc)
            )
            now = self.clock()
            for key in [k for k, left in self._unreleased.items() if now >= left.expires]:
                del self._unreleased[key]  # lapsed: nothing left to carry on under
            if now < held.expires and not isinstance(exc, LeaseHeld):
                # LeaseHeld: the nonce is no longer the holder's (lapsed, maybe taken).
                self._unreleased[(held.app, held.machine_id)] = Held(
                    held.app, held.machine_id, held.nonce, held.expires
                )

    def release_soon(self, held: Held) -> None:
        """Release from a task of its own; no ``await`` here, so a task being cancelled
        can call it on its way out."""
        if held.keeper is not None:
            held.keeper.cancel()
        self._track((held.app, held.machine_id), self.release(held))

    async def _release_unanswered(self, app: str, machine_id: str, lapses: float) -> None:
        """Give back the lease an acquire without an answer made, if a read shows it ours."""
        nonce = await self._ours_already(app, machine_id)
        if nonce is not None:
            await self.release(Held(app, machine_id, nonce, lapses))

    def _track(self, key: tuple[str, str], release: Coroutine[Any, Any, None]) -> None:
        """Run a release in a task of its own, which ``settled`` and ``aclose`` wait for."""
        task = asyncio.get_running_loop().create_task(
            release, name=f"lease-release:{key[0]}:{key[1]}"
        )
        self._releasing[key] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._releasing.get(key) is t:
                del self._releasing[key]

        task.add_done_callback(done)

    async def settled(self, app: str | None = None) -> None:
        """Wait for the acquires of cancelled callers and the releases under way (of
        ``app``'s machines only, if given)."""
        while True:
            tasks = {
                task
                for tasks in (self._acquiring, self._releasing)
                for (name, _), task in tasks.items()
                if app is None or name == app
            }
            if not tasks:
                return
            await asyncio.wait(tasks)

    def release_remembered(
        self, app: str | None = None, skip: Collection[tuple[str, str]] = ()
    ) -> None:
        """At a stop or step-down (or a reload letting ``app`` go): give back the leases
        whose release failed and that we still hold by our count, from tasks of their own
        (``settled`` and ``aclose`` wait for them with the releases under way). Forgotten,
        each stayed on its machine until its TTL lapsed, refusing a deploy, the next
        leader (a lease under another owner's name to it), or the lift of our cordon on a
        removed app's machine (a call without a nonce). ``skip``: machines whose acquire
        is left to answer, which carries on under that lease."""
        now = self.clock()
        for key, left in list(self._unreleased.items()):
            if key in skip or (app is not None and key[0] != app):
                continue
            del self._unreleased[key]
            if now < left.expires:
                self.release_soon(left)
        # And those an acquire without an answer may have made, read back first: ours by
        # our description, each stayed on its machine until its TTL lapsed, as above.
        for key, lapses in list(self._maybe_taken.items()):
            if key in skip or key in self._releasing or (app is not None and key[0] != app):
                continue
            del self._maybe_taken[key]
            if now < lapses:
                self._track(key, self._release_unanswered(*key, lapses))

    async def aclose(self, timeout_s: float | None = None, *, cut: bool = True) -> None:
        """On shutdown: cut the acquires still in flight (a lease they bring lapses after
        its TTL, or the next process on this host adopts it), finish the releases within
        ``timeout_s`` (an API that does not answer would hold the stop for as long as the
        client waits for a call); one cut then lapses after its TTL too. The leases whose
        release failed earlier (``_unreleased``) are released then too, within the same
        bound (:meth:`release_remembered`).

        ``cut=False`` (a replica that stops leading, and lives on): the acquires of
        cancelled callers are left to answer, and the lease each brings is released then
        (``_orphan``); cut off, it stayed on its machine for its TTL under our name, which
        the next leader does not adopt. The releases under way are waited for within
        ``timeout_s`` too, and those still unanswered then are left to answer, not cut:
        this process lives on, and a release cut off left its lease on the machine for
        its TTL, which the next leader waits out (a skip, ``machine_leased_by_other``).
        Those include releases that are not the step-down's: a follower's self-wake,
        which may run while the step-down waits, ends its actions' leases there too."""
        if cut:
            await cancel_and_wait(list(self._acquiring.values()))
        self.release_remembered(skip=set() if cut else set(self._acquiring))
        try:
            async with asyncio.timeout(timeout_s):
                while self._releasing:
                    await asyncio.wait(set(self._releasing.values()))
        except TimeoutError:
            if not cut:
                return
            left = dict(self._releasing)
            for app, machine_id in left:
                _log.warning(
                    "lease_release_failed",
                    app=app,
                    machine=machine_id,
                    error=f"no answer within {timeout_s:g}s of the stop: it lapses after its TTL",
                )
            await cancel_and_wait(left.values())
