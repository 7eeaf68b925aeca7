"""structlog, configured once per process, with every secret redacted.

JSON lines when stdout is not a terminal (or with ``--log-format json``), a readable console
renderer on a terminal. Standard-library loggers (aiohttp, asyncio) go through the same
processors, so their lines are redacted and formatted alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from json.encoder import encode_basestring_ascii
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LogFormat = Literal["auto", "json", "console"]
REDACTED = "[REDACTED]"
_SECRET_KEYS = frozenset({"token", "authorization", "api_token", "fly_api_token", "password"})


class Redactor:
    """Removes every known secret from log lines (and documents), wherever it appears.

    Secrets are registered at start-up (``add``); values under secret-looking keys are
    redacted even when the secret itself was never registered. For log lines it works in
    two steps: before rendering, values under secret-looking keys (``redact_keys``); after
    rendering, every registered secret in the finished line (``redact_rendered``), which
    is one scan of one string per secret instead of a walk over every value. A secret is
    looked for in each form a line may write it in: as it is, inside a JSON string, and
    inside a Python repr (a console line's values, an object passed as a JSON line's value).
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: tuple[str, ...] = ()
        """Every form of every secret, longest first (a form may hold a shorter one)."""
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        # Whatever its length: a short secret left in a line is a leaked one. (The settings
        # refuse tokens under config.MIN_TOKEN_CHARS, so that ordinary words stay.)
        if secret:
            forms = set(self._secrets) | _written_forms(secret)
            self._secrets = tuple(sorted(forms, key=len, reverse=True))

    def scrub_text(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def scrub(self, value: Any) -> Any:
        """A copy of a document with every secret value and secret-looking key redacted."""
        if isinstance(value, str):
            return self.scrub_text(value)
        if isinstance(value, dict):
            return {k: REDACTED if _secret_key(k) else self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.scrub(v) for v in value)
        if isinstance(value, int | float | bool) or value is None:
            return value
        return self.scrub_text(str(value)) if self._secrets else value

    def redact_keys(self, logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
        # Fast path, two C-level set operations: every key was seen before and found
        # harmless, and no value is a container to look into (a request's log line).
        if _SAFE_KEYS.issuperset(event) and _CONTAINERS_SET.isdisjoint(map(type, event.values())):
            return event
        for key, value in event.items():
            if type(value) in _CONTAINERS:
                event[key] = _redact_nested_keys(value)
            elif _secret_name(key):
                event[key] = REDACTED
            elif len(_SAFE_KEYS) < 4096:
                _SAFE_KEYS.add(key)
        return event

    def redact_rendered(self, logger: WrappedLogger, name: str, line: Any) -> Any:
        """After the renderer: ``line`` is the finished text of the log line."""
        return self.scrub_text(line) if isinstance(line, str) else line


def _written_forms(secret: str) -> set[str]:
    """``secret`` as a finished line may carry it: as it is; inside a Python repr (a console
    line writes its values so, a JSON line an object's, such as an exception passed as a
    value: backslashes doubled, a quote escaped); and each of those inside a JSON string."""
    forms = {secret}
    if "\\" in secret or "'" in secret or '"' in secret:
        doubled = secret.replace("\\", "\\\\")
        forms |= {doubled, doubled.replace("'", "\\'"), doubled.replace('"', '\\"')}
    return forms | {json.dumps(form)[1:-1] for form in forms}


def _redact_nested_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: REDACTED if _secret_key(k) else _redact_nested_keys(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_nested_keys(v) for v in value)
    return value


def _secret_key(key: object) -> bool:
    return isinstance(key, str) and _secret_name(key)


@functools.lru_cache(maxsize=4096)
def _secret_name(key: str) -> bool:
    # Cached: the keys of log events are few and repeat on every line.
    return key.lower() in _SECRET_KEYS


_CONTAINERS = (dict, list, tuple)
_CONTAINERS_SET = frozenset(_CONTAINERS)
# Event keys found not to name a secret (keys are few and repeat on every line).
_SAFE_KEYS: set[str] = set()


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
    # With stdout closed (`cmd >&-`) sys.stdout is None: the logs go to stderr instead.
    out = stream or sys.stdout or sys.stderr or _devnull()
    for secret in secrets:
        _redactor.add(secret)
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    shared: list[Processor] = [
        structlog.processors.add_log_level,
        _rename_logger_key,
        _timestamp,
        structlog.processors.format_exc_info,
        _add_process_keys,
        _redactor.redact_keys,
    ]
    renderer: Processor = (
        _render_json if use_json else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    # Our own events are written straight to the stream: the standard library's bridge
    # (a LogRecord, a handler lock and a formatter per line) cost half of every request's
    # log line. Not cached on first use, so that a later configure() or capture_logs()
    # reaches loggers made at import time.
    writer = _LineWriter(out)
    processors = [*shared, renderer, _redactor.redact_rendered]
    global _fast
    _fast = _FastJson(processors, writer, numeric <= logging.INFO) if use_json else None
    structlog.configure(
        processors=processors,
        logger_factory=lambda *args: writer,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )
    # Other libraries' standard-library records get the same processors and renderer.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
                _redactor.redact_rendered,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # aiohttp's access log is replaced by the proxy's structured request line, and httpx's
    # per-request line by the Fly client's own `fly_api` line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if _client_mistakes not in server.filters:
        server.addFilter(_client_mistakes)


def _client_mistakes(record: logging.LogRecord) -> bool:
    """aiohttp's servers (the admin server, the emulator) answer a request they cannot
    parse with a 400 and log it as an error with a traceback: any port scanner, or a
    client's oversized header, wrote error-level lines that alert on nothing of ours. Such
    a record becomes one debug line (its reason, no traceback); the rest pass as they are.
    (A function, not a ``logging.Filter``: this module is compiled.)"""
    exc = record.exc_info[1] if record.exc_info else None
    code = getattr(exc, "code", None)
    if type(exc).__module__ != "aiohttp.http_exceptions" or not (
        isinstance(code, int) and 400 <= code < 500
    ):
        return True
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    record.msg = f"{record.getMessage()}: {code} {getattr(exc, 'message', '')}".strip()
    record.args = None
    record.exc_info = None
    record.exc_text = None
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def _devnull() -> TextIO:
    return open(os.devnull, "w")  # the logs go nowhere: stdout and stderr are closed


class _LineWriter:
    """Writes finished lines to a stream; like logging's handlers, a failed write (a closed
    or broken stream) never raises into the code that logged.

    Inside a running event loop the stream is flushed once per loop iteration rather than
    once per line: a busy proxy logs a line per request, and one write system call then
    carries every line of the iteration. Outside a loop each line is flushed at once.
    """

    __slots__ = ("_flush_pending", "_stream")

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._flush_pending = False

    def msg(self, message: str) -> None:
        try:
            self._stream.write(message + "\n")
        except (OSError, ValueError):
            return  # nowhere left to report it
        if self._flush_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._flush()
            return
        self._flush_pending = True
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    # structlog calls the method named after the line's level.
    def debug(self, message: str) -> None:
        self.msg(message)

    def info(self, message: str) -> None:
        self.msg(message)

    def warning(self, message: str) -> None:
        self.msg(message)

    def error(self, message: str) -> None:
        self.msg(message)

    def critical(self, message: str) -> None:
        self.msg(message)


def get_logger(name: str) -> Any:
    """A structlog logger whose lines carry ``logger=name``."""
    # Initial values, not bind(): binding would build the logger now, from the
    # configuration of import time. ("logger" itself is a parameter name of get_logger.)
    return structlog.get_logger(**{_NAME_KEY: name})


@contextlib.contextmanager
def process_keys(**keys: int | str) -> Iterator[None]:
    """Every line the process writes meanwhile (ours, the standard library's, an
    :class:`EventLine`'s) ends with ``keys``: ``worker`` in a worker of ``run --workers``,
    whose lines share the supervisor's output and were told apart by nothing. Process-wide,
    not a context variable: a worker is a process, and its threads' lines (an executor's, a
    library's) are its own too. Undone on leaving (a test's ``run`` leaves none behind)."""
    global _process_keys, _line_end
    before = _process_keys, _line_end
    _process_keys = {**_process_keys, **keys}
    _line_end = '", ' + _ENCODER.encode(_process_keys)[1:]
    try:
        yield
    finally:
        _process_keys, _line_end = before


def line_end() -> str:
    """What a JSON line has after its timestamp's text: its closing quote, the keys of
    :func:`process_keys`, and the closing brace (an :class:`EventLine` writes it)."""
    return _line_end


def _add_process_keys(logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
    if _process_keys:
        event.update(_process_keys)
    return event


_process_keys: dict[str, int | str] = {}
_line_end = '"}'


def _timestamp(logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
    event["timestamp"] = now_iso()
    return event


def now_iso() -> str:
    """ISO 8601 in UTC with microseconds, as structlog's TimeStamper(fmt="iso", utc=True)
    writes it, with the date and time formatted once per second rather than per line."""
    now = time.time()
    second = int(now)
    global _stamp_second, _stamp_prefix
    if second != _stamp_second:
        _stamp_second = second
        _stamp_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    # str(10**6 + µs)[1:] is the six digits of "%06d", without the format machinery.
    return f"{_stamp_prefix}.{str(1_000_000 + int((now - second) * 1e6))[1:]}Z"


_stamp_second = -1
_stamp_prefix = ""


def _json_fallback(obj: Any) -> Any:
    """What structlog's JSONRenderer does with values JSON has no type for."""
    structlog_hook = getattr(obj, "__structlog__", None)
    return structlog_hook() if structlog_hook is not None else repr(obj)


# One encoder for every line: json.dumps(..., default=...) would build one per call.
_ENCODER = json.JSONEncoder(default=_json_fallback)


def _render_json(logger: WrappedLogger, name: str, event: EventDict) -> str:
    return _ENCODER.encode(event)


def _rename_logger_key(logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
    if _NAME_KEY in event:
        event["logger"] = event.pop(_NAME_KEY)
    return event


_NAME_KEY = "logger_name"


class _FastJson:
    """What an EventLine needs to write a JSON line by itself, as configure() set it up."""

    __slots__ = ("info_enabled", "last", "length", "processors", "writer")

    def __init__(self, processors: list[Processor], writer: _LineWriter, info_enabled: bool):
        self.processors = processors  # the list structlog holds (capture_logs edits it)
        self.length = len(processors)
        self.last = processors[-1]
        self.writer = writer
        self.info_enabled = info_enabled

    def in_force(self) -> bool:
        """Whether structlog still runs configure()'s chain: a test's capture_logs() or
        an added processor must see every line, so they switch the fast path off.

        capture_logs() and an appended processor edit the list in place, so its length
        and last item tell (comparing the whole list costs more than rendering a line);
        another configure() gives structlog another list.
        """
        current = structlog.get_config()["processors"]
        return (
            current is self.processors and len(current) == self.length and current[-1] is self.last
        )


def json_writer() -> _LineWriter | None:
    """Where an :class:`EventLine` renders its line itself: configure()'s writer, when its
    JSON chain is in force and info lines are on; None when the line must go through
    structlog (``EventLine.__call__`` does that, or drops it below the level)."""
    fast = _fast
    if fast is not None and fast.info_enabled and fast.in_force():
        return fast.writer
    return None


_fast: _FastJson | None = None
# Written by the chain after the event's own keys (worker: process_keys's, in a worker).
_RESERVED_KEYS = frozenset({"event", "level", "logger", "timestamp", "worker"})


class EventLine:
    """An info line with a fixed event name and fixed keys, logged once per request.

    Through structlog it costs ~25 µs, as much as proxying a small request; rendered here
    it costs a few. The text is the same, byte for byte, as configure()'s JSON chain would
    write (tests compare the two): the keys in order, then event, level, logger and
    timestamp, then those of :func:`process_keys` (:func:`line_end`), every registered
    secret scrubbed from the finished line. When that chain is not in force (console
    output, a capture in tests, a value that is a container) the line goes through
    structlog as any other.
    """

    __slots__ = ("_event", "_keys", "_log", "_template", "parts")

    def __init__(self, logger: str, event: str, keys: Sequence[str]) -> None:
        if any(_secret_name(key) for key in keys):
            raise ValueError("an EventLine key names a secret; log it through structlog")
        if not keys or _RESERVED_KEYS.intersection(keys):
            raise ValueError(f"an EventLine needs keys, none of {sorted(_RESERVED_KEYS)}")
        self._log = get_logger(logger)
        self._event = event
        self._keys = tuple(keys)
        # The text around the values: parts[i] comes before value i, parts[-1] before the
        # timestamp (after the chain's own keys); line_end() after it, read per line (a
        # worker's keys are bound after the module's EventLines were made).
        tail = {"event": event, "level": "info", "logger": logger, "timestamp": ""}
        suffix = _ENCODER.encode(tail)[1:-2]  # up to the timestamp's opening quote
        self.parts = (
            *(
                ("{" if i == 0 else ", ") + encode_basestring_ascii(key) + ": "
                for i, key in enumerate(self._keys)
            ),
            ", " + suffix,
        )
        # The whole line as one %-template: a slot per value, the timestamp, the line's end.
        self._template = "%s".join(_escape(part) for part in self.parts) + "%s%s"

    def __call__(self, *values: Any) -> None:
        writer = json_writer()  # None: structlog writes it, or drops it below info
        if writer is not None:
            if len(values) != len(self._keys):
                raise ValueError(f"{len(self._keys)} values expected, got {len(values)}")
            # Strings first: most values are.
            texts = [
                encode_basestring_ascii(value) if type(value) is str else _scalar_json(value)
                for value in values
            ]
            if None not in texts:
                line = self._template % (*texts, now_iso(), _line_end)
                writer.msg(_redactor.scrub_text(line))
                return
        self._log.info(self._event, **dict(zip(self._keys, values, strict=True)))


def _escape(text: str) -> str:
    """``text`` as literal text of a %-template."""
    return text.replace("%", "%%")


def _scalar_json(value: Any) -> str | None:
    """A value other than a str as the JSON encoder writes it; None for what needs the
    whole chain."""
    kind = type(value)
    if value is None:
        return "null"
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    if kind in _CONTAINERS_SET:
        return None
    return _ENCODER.encode(value)
