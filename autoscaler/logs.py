"""structlog, configured once per process, with every secret redacted.

JSON lines when stdout is not a terminal (or with ``--log-format json``), a readable console
renderer on a terminal. Standard-library loggers (aiohttp, asyncio) go through the same
processors, so their lines are redacted and formatted alike.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LogFormat = Literal["auto", "json", "console"]
REDACTED = "[REDACTED]"
_SECRET_KEYS = frozenset({"token", "authorization", "api_token", "fly_api_token", "password"})


class Redactor:
    """A processor that removes every known secret from an event, wherever it appears.

    Secrets are registered at start-up (``add``); values under secret-looking keys are
    redacted even when the secret itself was never registered.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= 4:  # a tiny "secret" would redact ordinary words
            self._secrets.add(secret)

    def scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: REDACTED if _secret_key(k) else self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.scrub(v) for v in value)
        if isinstance(value, int | float | bool) or value is None:
            return value
        return self.scrub(str(value)) if self._secrets else value

    def __call__(self, logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
        for key, value in list(event.items()):
            event[key] = REDACTED if _secret_key(key) else self.scrub(value)
        return event


def _secret_key(key: object) -> bool:
    return isinstance(key, str) and key.lower() in _SECRET_KEYS


_redactor = Redactor()


def redactor() -> Redactor:
    """The process-wide redactor (so a token learnt after start-up can be added)."""
    return _redactor


def configure(
    level: str = "info",
    fmt: LogFormat = "auto",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Set up structlog and the standard library's logging. Safe to call again."""
    out = stream or sys.stdout
    for secret in secrets:
        _redactor.add(secret)
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redactor,
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # aiohttp's access log is replaced by the proxy's structured request line, and httpx's
    # per-request line by the Fly client's own `fly_api` line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


def bind(**values: Any) -> None:
    """Bind values to every log line of the current task (request id, app)."""
    structlog.contextvars.bind_contextvars(**values)
