"""Passive health: machines that keep failing are taken out of rotation (outlier ejection).

The proxy sees every exchange with a machine. ``eject_after`` failures in a row (no
connection, a reset, no answer within ``upstream_timeout_s``, an answer that is not HTTP,
a 5xx) eject the machine for ``eject_base_s``; while it keeps failing each ejection lasts
twice the one before, up to ``MAX_EJECTION_S`` (or ``eject_base_s`` when that is longer).
When an ejection ends, the machine is routable again but on probation: the first request
that goes to it is its probe, and no other follows until the probe's answer is in. A good
answer puts the machine back in full rotation and forgets its failures; a failure ejects it
again, for longer. The ejection puts the machine on trial (``Upstream.trial``) too, so that
the gate hands that first request alone, not every request held for the machine at once.

Ejections for the machine's own failures (not 5xx answers, not checks) are counted in a
row on its ``Upstream.failing``: a machine ejected twice so (its probe failed too) hangs,
and the controller restarts it (docs/policy.md, "A machine that hangs is restarted"). A
timeout ejection of an app's last routable machine counts twice: its probe is not
awaited (:func:`_failed_count`).

A new start of the machine (the view counts them: ``Upstream.starts``) is a new process,
and begins with a clean record: the record made against the process before is forgotten at
its next look-up (:meth:`Health._current`), so the new one is no ejection's probe, its
next ejection lasts ``eject_base_s`` again, and its failures count from one. (The view
resets its hold-out, trial and ``failing`` as it starts; a record kept would make each
request in turn the probe of the booting machine, whose refused connect, uncounted while it
boots, ended the probe with no verdict and put it straight back: a refused connect after
each, back to back.) A probe refused while its machine boots is ended before the skip,
which then holds (the proxy's ``_failed_connect``).

A machine held out because nothing listened (refused connections, or resets of a process
that died) may come back before its time: proxy/revive.py watches it with TCP connects
and calls :meth:`Health.revived` (which hold-outs qualify: :meth:`Health.revivable`).

A started machine whose Fly health checks are critical (the fleet view's
``checks_critical``, read by :meth:`Health.sweep`; only checks that Fly's proxy routes by
count: control/runtime.py, ``routes``) is ejected until they pass, or until it leaves
``started`` (the list may say critical a while longer; it is out of rotation anyway).

An app's last routable machine is never ejected for its 5xx answers, nor for critical
checks: the app may simply be broken, and its own answers say more to the client than a
proxy's 503 would. Connect failures, resets and timeouts eject it all the same (a wake may
bring another machine; nothing better than a 502 or 504 could come from this one), and
checks that turn critical while it is out for those do not bring it back early.

Ejection rides on the view's ``unhealthy_until``: an ejected machine is one the balancer
skips until then; a probe under way sets it far ahead (``_PROBING_S``) and its outcome
resets it. Every verdict lands on the view that holds the machine (``Upstream.owner``),
not on the app's view looked up by name: a reload may have removed the app while the
request was under way, and the lookup would make its view again, for nobody.
"""

from __future__ import annotations

from autoscaler.control.view import HUNG_AFTER, AppView, FleetView, Upstream
from autoscaler.logs import get_logger
from autoscaler.metrics import Metrics
from autoscaler.scaling.fleet import STARTED

_log = get_logger("autoscaler.proxy")

MAX_EJECTION_S = 300.0
# A probe under way keeps its machine out of rotation "for ever" (a finite year, so the
# gate's timers stay finite); the probe's outcome ends it.
_PROBING_S = 365 * 86400.0

CONNECT = "connect"
RESET = "reset"
TIMEOUT = "timeout"
BAD_RESPONSE = "bad_response"
SERVER_ERROR = "5xx"
CHECKS = "checks"
# Reasons that spare an app's last routable machine (see the module docstring).
_SPARE_LAST = frozenset({SERVER_ERROR, CHECKS})
# The machine's own failures: counted in ``Upstream.failing``, which the controller reads
# to restart a machine that hangs (a 5xx is the app's answer; checks are Fly's verdict).
_OWN = frozenset({CONNECT, RESET, TIMEOUT, BAD_RESPONSE})
# Ejections that a connection the machine accepts again may cut short (proxy/revive.py):
# its process was not there.
_REVIVE = frozenset({CONNECT, RESET})


class _Record:
    """What the proxy remembers of a machine that failed lately."""

    __slots__ = ("app", "ejected", "ejections", "failures", "probing", "reason", "starts", "until")

    def __init__(self, app: str, up: Upstream) -> None:
        self.app = app
        self.starts = up.starts  # the machine's process it holds against (``_current``)
        self.failures = 0  # in a row
        self.ejections = 0  # in a row: the next ejection lasts base * 2**ejections
        self.ejected = False  # out of rotation, or on probation after it
        self.probing = False  # a probe request is under way
        self.reason = ""
        self.until = 0.0  # the ejection's end (view clock)


class Health:
    """The proxy's verdicts on machines. ``records`` holds only machines that failed
    lately, so the path of a request to a healthy fleet checks one empty dict."""

    def __init__(self, fleet: FleetView, metrics: Metrics, eject_after: int, base_s: float) -> None:
        self.fleet = fleet
        self.records: dict[Upstream, _Record] = {}
        self._swept: dict[str, int] = {}  # app -> its view's version when last swept
        self._spared: set[str] = set()  # apps whose critical machine is their last one
        self._ejections = metrics.machine_ejections
        self.configure(eject_after, base_s)

    def configure(self, eject_after: int, base_s: float) -> None:
        self.eject_after = eject_after
        self.base_s = base_s

    def _view(self, app: str, up: Upstream) -> AppView:
        """The view that holds ``up``: looked up by name, a view of an app a reload
        removed while its request was under way would be made again, for nobody."""
        return up.owner or self.fleet.app(app)

    def _current(self, up: Upstream) -> _Record | None:
        """``up``'s record, unless it was made before the machine's latest start: a new
        process starts with a clean record (the view reset its hold-outs, ``failing``
        and trial as it started), not on probation for its predecessor's failures."""
        record = self.records.get(up)
        if record is not None and record.starts != up.starts:
            del self.records[up]
            return None
        return record

    # --- what the proxy saw --------------------------------------------------------

    def took(self, app: str, up: Upstream) -> bool:
        """A request was given ``up``; True when it is the machine's probe (then its outcome
        must be reported, or :meth:`abandoned` called)."""
        record = self._current(up)
        if record is None or not record.ejected or record.probing or record.reason == CHECKS:
            return False
        view = self._view(app, up)
        if view.clock() < up.unhealthy_until:
            return False  # handed out before the ejection (a held request): not a probe
        record.probing = True
        view.mark_unhealthy(up, _PROBING_S)  # no second request until the probe's answer
        return True

    def succeeded(self, app: str, up: Upstream) -> None:
        """An exchange went well: the machine's failures are forgotten."""
        record = self._current(up)
        if record is None or (record.ejected and record.reason == CHECKS):
            return  # only its checks passing bring it back
        del self.records[up]
        up.failing = 0
        if record.ejected:
            up.trial = False  # (its probe answered well: the trial waited for that)
            _restore(self._view(app, up), up)
            _log.info("machine_restored", app=app, machine=up.id)

    def failed(self, app: str, up: Upstream, reason: str) -> None:
        """An exchange failed for ``reason``; the machine is ejected after ``eject_after``
        failures in a row, and at once when its probe fails."""
        record = self._current(up)
        if record is None:
            record = self.records[up] = _Record(app, up)
        if record.ejected and not record.probing:
            return  # out already: a request sent before the ejection failed too
        record.failures += 1
        if record.probing or record.failures >= self.eject_after:
            self._eject(app, up, record, reason)

    def abandoned(self, app: str, up: Upstream) -> None:
        """A probe ended without a verdict (the client left, or its connect was refused
        while the machine boots, uncounted): let another request probe."""
        record = self._current(up)
        if record is not None and record.probing:
            record.probing = False
            _restore(self._view(app, up), up)

    def _eject(self, app: str, up: Upstream, record: _Record, reason: str) -> None:
        view = self._view(app, up)
        out_for_itself = record.ejected and record.reason in _OWN and not record.probing
        if reason == CHECKS and out_for_itself and not any(u is not up for u in view.routable()):
            return  # out for failing itself (its checks turned critical since): stays out
        record.probing = False
        if reason in _SPARE_LAST and not any(u is not up for u in view.routable()):
            # The last one standing: its answers go to the clients as they are.
            if record.ejected:
                _restore(view, up)  # (a failed probe of it)
            record.ejected = False  # (its failures still count: a timeout ejects it)
            return
        if reason == CHECKS:
            backoff = _PROBING_S
        else:
            backoff = min(self.base_s * 2**record.ejections, max(MAX_EJECTION_S, self.base_s))
            record.ejections += 1
            up.trial = True  # its probe goes alone when the ejection ends
        record.ejected = True
        record.failures = 0
        record.reason = reason
        if reason in _OWN:
            view.failed_itself(up, _failed_count(view, up, reason))
        record.until = view.clock() + backoff
        view.mark_unhealthy(up, backoff)
        view.notify()
        self._ejections.labels(app=app, reason=reason).inc()
        _log.warning(
            "machine_ejected",
            app=app,
            machine=up.id,
            reason=reason,
            seconds=round(backoff, 3) if reason != CHECKS else None,
        )

    # --- machines that listen again (proxy/revive.py) ---------------------------------

    def revivable(self, app: str, up: Upstream) -> bool:
        """Whether ``up`` is held out for want of a listener, so that a connection it
        accepts may bring it back: skipped after a refused connection, or ejected for
        refused connections or resets while no other machine of its app is routable."""
        view = self.fleet.apps.get(app)
        if view is None or view.upstreams.get(up.id) is not up:
            return False
        if up.state != STARTED or up.cordoned or up.held or view.clock() >= up.unhealthy_until:
            return False
        record = self._current(up)
        if record is None or not record.ejected:
            return True  # a skip
        if record.probing or record.reason not in _REVIVE:
            return False
        return not view.routable()

    def revived(self, app: str, up: Upstream) -> None:
        """``up`` accepts connections again: a skip ends, and its trial with it (the
        connection it accepted is what a probe would have made); an ejection ends as if
        its time were up (its next request is its probe)."""
        view = self._view(app, up)
        record = self._current(up)
        if record is not None and record.ejected:
            record.until = view.clock()
        else:
            up.trial = False
        _restore(view, up)
        _log.info("machine_listening", app=app, machine=up.id)

    # --- what the fleet view says ----------------------------------------------------

    def sweep(self) -> None:
        """Eject machines whose Fly checks are critical, restore those whose checks pass
        again, and forget machines that left the view.

        Runs once a second over every app, so it looks only at apps whose machines changed
        since it last did (``AppView.version``), and at apps whose critical machine was
        spared as their last routable one (another machine may be routable by now). With
        1,000 apps of 10 machines, walking every machine held the event loop for 3-5 ms a
        second (docs/benchmarks.md, "Many apps", second round)."""
        fleet = self.fleet
        swept = self._swept
        for name, view in fleet.apps.items():
            if swept.get(name) == view.version and name not in self._spared:
                continue
            swept[name] = view.version
            self._spared.discard(name)
            for up in view.upstreams.values():
                record = self._current(up)
                started = up.state == STARTED
                if up.checks_critical and started:
                    if record is None or record.reason != CHECKS or not record.ejected:
                        if record is None:
                            record = self.records[up] = _Record(name, up)
                        self._eject(name, up, record, CHECKS)
                        if not record.ejected or record.reason != CHECKS:
                            self._spared.add(name)  # spared, or out for its own failures
                elif record is not None and record.reason == CHECKS and record.ejected:
                    # Its checks pass; or it left ``started`` (out of rotation for that,
                    # until it starts: its checks as listed before are no verdict).
                    del self.records[up]
                    _restore(view, up)
                    if started:
                        _log.info("machine_restored", app=name, machine=up.id)
        # Few records (machines that failed lately): check each is still in its app's view.
        for up, record in list(self.records.items()):
            owner = fleet.apps.get(record.app)
            if owner is None or owner.upstreams.get(up.id) is not up:
                del self.records[up]
        if len(swept) > len(fleet.apps):
            for name in [n for n in swept if n not in fleet.apps]:
                del swept[name]
                self._spared.discard(name)

    def report(self) -> list[dict[str, object]]:
        """The machines out of rotation or on probation, for ``/status``."""
        out: list[dict[str, object]] = []
        for up, record in self.records.items():
            if record.starts != up.starts:
                continue  # (held against its process before: forgotten at its next look-up)
            if not record.ejected or (record.reason == CHECKS and up.state != STARTED):
                continue  # (out for not being started: the next sweep drops its record)
            view = self.fleet.apps.get(record.app)
            now = view.clock() if view is not None else 0.0
            over = record.reason != CHECKS and now >= record.until  # its ejection ended
            # Held out by the controller past its ejection (a hung machine until its
            # restart, AppRuntime.hold_hung): no probe goes to it meanwhile.
            held = over and not record.probing and up.held
            out.append(
                {
                    "app": record.app,
                    "machine": up.id,
                    "reason": record.reason,
                    "ejections": record.ejections,
                    "probing": record.probing or (over and not held),
                    "held": held,
                    "remaining_s": None
                    if record.reason == CHECKS
                    else round(max(0.0, record.until - now), 3),
                }
            )
        return out


def _failed_count(view: AppView, up: Upstream, reason: str) -> int:
    """What an ejection for the machine's own failure adds to its ``Upstream.failing``:
    one, or HUNG_AFTER for timeouts when no other machine of the app is routable. A probe
    is worth its wait only while another machine serves (it spares a machine that a burst
    of slow answers made look hung); alone, it would cost the whole app another ejection
    and ``upstream_timeout_s`` of 504s to confirm what a restart repairs. Resets and
    refused connections are a process that died: Fly's restart policy may be bringing
    it back already, and the probe will tell."""
    if reason == TIMEOUT and not any(u is not up for u in view.routable()):
        return HUNG_AFTER
    return 1


def _restore(view: AppView, up: Upstream) -> None:
    view.mark_unhealthy(up, 0.0)
    view.notify()
