"""Lua scripts that Redis runs by their SHA1 digest, sending the body only when it lacks it.

A replica runs a script several times a second (the ``gone`` read of every round, the
lease's renewals, every fenced call's check): with ``EVAL`` each call carries the whole
body. :class:`Script` sends ``EVALSHA`` with the digest instead, and when Redis answers
``NOSCRIPT`` (it restarted, failed over, or its script cache was flushed) runs the same
call once more with ``EVAL`` and the body, which also puts the script back into Redis's
cache: the next call goes by digest again. A ``NOSCRIPT`` answer means the script did not
run, so the second call never runs it twice. The fallback needs no ``SCRIPT`` command
(``EVAL`` and ``EVALSHA`` only), and costs one more round trip once per script after a
loss.

Only where a failed ``EVALSHA`` leaves nothing half done: a call on its own, or one in a
pipeline without ``MULTI`` (:meth:`Script.queue`, :meth:`Script.answer`). Inside
``MULTI``/``EXEC`` Redis queues an unknown digest without complaint and answers
``NOSCRIPT`` at ``EXEC``, after it ran the transaction's other commands (no rollback): the
transaction would no longer be atomic. redis-py's own scripts in a pipeline ask ``SCRIPT
EXISTS`` before each execution (one more round trip every time) and still fail if the
cache is lost between that and the ``EXEC``. So the transactions send their scripts with
``EVAL`` (cluster.py's: rare, a replica unlisted or one that stops).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any


def _no_script(exc: BaseException) -> bool:
    """Whether Redis answered ``NOSCRIPT`` (redis-py is imported only in cluster mode,
    which is the only one that runs scripts)."""
    from redis.exceptions import NoScriptError

    return isinstance(exc, NoScriptError)


class Script:
    """One Lua script, run by its digest (``EVALSHA``), by its body (``EVAL``) after a
    ``NOSCRIPT`` answer."""

    __slots__ = ("body", "sha")

    def __init__(self, body: str) -> None:
        self.body = body
        self.sha = hashlib.sha1(body.encode(), usedforsecurity=False).hexdigest()
        """Redis's name for the script: the SHA1 of its body's bytes."""

    async def __call__(self, redis: Any, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run the script on ``redis`` (a client, not a pipeline) and return its answer."""
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except Exception as exc:
            if not _no_script(exc):
                raise
        return await redis.eval(self.body, len(keys), *keys, *args)

    def queue(self, pipe: Any, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Queue the script by its digest in ``pipe``, a pipeline *without* ``MULTI``
        executed with ``raise_on_error=False``; its answer goes through :meth:`answer`."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)

    async def answer(
        self, redis: Any, answer: Any, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        """The answer of :meth:`queue`'s call: as the pipeline gave it, or, if that was
        ``NOSCRIPT``, the answer of the call run again on ``redis`` with the body."""
        if isinstance(answer, Exception) and _no_script(answer):
            return await redis.eval(self.body, len(keys), *keys, *args)
        return answer


def raise_first_error(answers: Sequence[Any]) -> None:
    """Raise the first error among a pipeline's answers (``raise_on_error=False`` leaves
    them in the list), as ``execute()`` does by default."""
    for answer in answers:
        if isinstance(answer, Exception):
            raise answer


__all__ = ["Script", "raise_first_error"]
