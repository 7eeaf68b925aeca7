"""Settings: one YAML file plus environment overrides, validated once before the loop starts.

This is the only module that reads the settings, from the configuration file or from the
environment (:func:`origin` says where one came from, as its error lines do). Precedence,
highest first: the command line's (``overrides``), ``AUTOSCALER_*`` variables (``__`` nests:
``AUTOSCALER_PROXY__LISTEN``), then ``FLY_API_TOKEN`` for ``fly.token`` and
``EMULATOR_TOKEN`` for ``emulator.token``, then the YAML file, then the defaults below.
What else reads the environment reads no setting (tests/test_architecture.py lists them):
the worker's index under ``run --workers`` (``service.WORKER_ENV``), and the environment
that ``autoscaler emulator``, the workers and the emulator's machines are handed.

Every model forbids unknown keys, so a typo is an error rather than a silently ignored knob.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import importlib.util
import ipaddress
import json
import math
import os
import re
import shlex
import socket
import typing
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from autoscaler.aio import dual_stack

DEFAULT_CONFIG_PATH = Path("config/autoscaler.yaml")
CONFIG_ENV = "AUTOSCALER_CONFIG"
TOKEN_ENV = "FLY_API_TOKEN"  # noqa: S105 - the name of the variable, not a secret
EMULATOR_TOKEN_ENV = "EMULATOR_TOKEN"  # noqa: S105 - likewise

EMBEDDED = "embedded"  # fly.api_url: the embedded emulator, asked for explicitly

NO_APPS = (
    "{path}: apps: empty: nothing to route or scale, so `autoscaler run` does not start on"
    " it; list the apps to serve (a reload may empty the list: that is taken, as deliberate)"
)
"""A config without an app is a mistake at start (a file that forgot them, or the default
settings of a missing file); a reload to ``apps: []`` is taken, as one that means it."""


GIVE_THE_FILE = f"give the file with --config PATH or ${CONFIG_ENV}"
"""How to name the config file, where the default one was looked for and is not there
(a command run from another directory than the file's)."""


def no_apps_problem(path: str | os.PathLike[str]) -> str:
    """Why a config without an app does not start: :data:`NO_APPS`, or, when there is no
    such file (``config/autoscaler.yaml`` where none was given: run from another
    directory), that, not "apps: empty" of a file that does not exist."""
    if not Path(path).exists():
        return (
            f"{path}: no such file, and no app is set otherwise (AUTOSCALER_APPS): nothing to"
            f" route or scale; {GIVE_THE_FILE}"
        )
    return NO_APPS.format(path=path)


def unreachable(settings: Settings) -> dict[str, str]:
    """Apps no request is routed to, each with what to do: the proxy routes by Host header,
    so an app without hosts is reached only as proxy.default_app (every other request for
    it is a 404). ``check-config`` warns of them, and ``run`` at its start and each reload."""
    return {
        app.name: f"app {app.name}: no hosts, and not proxy.default_app, so no request is"
        f" routed to it; give it apps[{i}].hosts, or make it proxy.default_app"
        for i, app in enumerate(settings.apps)
        if not app.hosts and app.name != settings.proxy.default_app
    }


NO_REDIS = (
    "{path}: cluster.redis_url is set but the Redis client is not installed: install the"
    " cluster extra (pip install 'autoscaler[cluster]')"
)


def no_redis_problem(path: Path, settings: Settings) -> str | None:
    """Why ``autoscaler run`` does not start for want of the Redis client (cluster mode
    without the cluster extra), or None; check-config says it too."""
    if settings.cluster.redis_url is not None and importlib.util.find_spec("redis") is None:
        return NO_REDIS.format(path=path)
    return None


def no_token_problem(path: str | os.PathLike[str], settings: Settings) -> str | None:
    """Why ``autoscaler run`` does not start on these settings for want of a Fly token, or
    None: an app to scale through a Machines API of Fly's (not the embedded emulator, which
    has a token of its own) with no ``fly.token`` (nor FLY_API_TOKEN). Every call would get
    a 401, every tick, for as long as it ran."""
    fly = settings.fly
    if fly.embedded or fly.token is not None:
        return None
    scaled = [app.name for app in settings.apps if not app.static]
    if not scaled:
        return None
    api = shown_url(fly.api_url or "")
    return (
        f"{path}: no Fly API token: app {scaled[0]} is scaled through the Machines API at"
        f" {api}, which refuses every call without one (401): set {TOKEN_ENV} (or"
        " fly.token), or run it on the embedded emulator: autoscaler run --emulator"
    )


_DURATION_RE = re.compile(r"((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)(ms|s|m|h)")
"""One term of a duration: a decimal number as a bare one is written (``.5``, ``1.``,
``1e3``), then its unit."""
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


MIN_TOKEN_CHARS = 16
"""The shortest token the settings take. A shorter one is a placeholder or guessable (Fly's
own tokens are far longer; the emulator makes up 32 characters), and the log redactor,
which removes every configured secret from every line, would take ordinary words with it."""


def _token(value: SecretStr | None) -> SecretStr | None:
    """A token as an HTTP header carries it: whitespace around it (the newline at the end
    of a file, or of a YAML ``|`` block) dropped; an empty one, one shorter than
    MIN_TOKEN_CHARS, or one with characters a header cannot carry, refused. The message
    never shows the value."""
    if value is None:
        return None
    text = value.get_secret_value().strip()
    if not text:
        raise ValueError("expected a token, got an empty value (leave the key out for none)")
    if not (text.isascii() and text.isprintable()):
        raise ValueError(
            "the token has characters an HTTP header cannot carry (control characters or"
            " non-ASCII); value not shown"
        )
    if len(text) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"expected a token of at least {MIN_TOKEN_CHARS} characters, got a shorter one"
            " (too short to be a secret); value not shown"
        )
    return SecretStr(text)


Token = Annotated[SecretStr | None, AfterValidator(_token)]
"""A secret sent as an HTTP header (``_token``)."""


def parse_duration(value: object) -> object:
    """Seconds from a number or a string like "90s", "5m", "1m30s", "250ms"."""
    if isinstance(value, bool):
        return value  # let pydantic reject it with its own message
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            return float(text)
        except ValueError:
            pass
        pos, total = 0, 0.0
        for match in _DURATION_RE.finditer(text):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if text and pos == len(text):
            return total
        raise ValueError(f'expected seconds or a duration like "90s", "5m", "1h", got {value!r}')
    return value


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(ge=0, allow_inf_nan=False)]
Rate = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
"""A fraction of calls, boots, starts: in [0, 1] (NaN, which fails every bound, is no number)."""

# The share of the buffer budget a client connection is reckoned at when
# ``proxy.max_connections`` is left to its default. (An idle connection costs about 6 KiB
# of the proxy's memory besides: docs/benchmarks.md, "Proxy memory".)
CONNECTION_BYTES = 4 * 1024


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return authority(self.host, self.port)


def authority(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# A host name: dot-separated labels of letters, digits, "-" (not at either end) and "_".
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOST_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def _is_host(host: str) -> bool:
    """An IP address or a host name: not a URL ("http://10.0.0.1"), nor text with spaces,
    which would be accepted here and fail only when a socket is bound or connected."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return _HOST_NAME_RE.fullmatch(host) is not None
    return True


def parse_host_port(value: str, *, listen: bool = False) -> HostPort:
    """Parse "127.0.0.1:8080", "[::1]:8080" or "localhost:80". A ``listen`` address may
    have port 0: a free port the OS picks at the bind (the server says which it got), as
    servers commonly take it; one to connect to may not."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        sep = sep if ":" in host else ""  # brackets hold an IPv6 address
    else:
        host, sep, port = text.rpartition(":")
    lowest = 0 if listen else 1
    if not sep or not _is_host(host) or not port.isdigit() or not lowest <= int(port) < 65536:
        raise ValueError(f'expected "host:port" (IPv6 as "[::1]:port"), got {value!r}')
    return HostPort(host, int(port))


FLY_APP_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
"""A Fly app name (docs/fly-api-notes.md, "App names"): lowercase letters, digits and
dashes, as the DNS label of ``<name>.fly.dev`` is (1-63 of them, no dash at either end)."""
FLY_APP_NAME_RULE = "1-63 lowercase letters, digits and dashes (not starting or ending with a dash)"


def app_name_problem(name: object) -> str | None:
    """What is wrong with a Fly app name, or None when it is one."""
    if isinstance(name, str) and FLY_APP_NAME_RE.fullmatch(name):
        return None
    return f"expected a Fly app name: {FLY_APP_NAME_RULE}, got {name!r}"


def is_loopback(host: str) -> bool:
    """Whether a listen host is reachable only from this machine (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

Resolver = Callable[[str], Sequence[IPAddress]]
"""A host name to the addresses a server told to listen on it binds (resolve_listen_host;
a test's own, which needs no name service). It raises OSError for a name it cannot
resolve; no address at all means not known (ListenHosts.known): not loopback, no clash."""


def resolve_listen_host(host: str) -> tuple[IPAddress, ...]:
    """The addresses a server listening on ``host`` binds: asyncio's create_server (and
    aiohttp's site, uvloop's) binds every address getaddrinfo gives for it, with these
    arguments. Raises OSError (socket.gaierror) for a name that does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except UnicodeError as exc:  # the name's IDNA encoding: a label over 63 characters
        raise OSError(f"not a host name DNS takes: {exc}") from None
    # An IPv6 address may carry its zone ("fe80::1%eth0"): the address is what binds.
    return tuple(dict.fromkeys(ipaddress.ip_address(str(i[4][0]).split("%")[0]) for i in infos))


class ListenHosts:
    """A Resolver that keeps what it found: the names a process resolved at its start, for
    the checks that may not look them up again (a reload's, in the event loop: ``known``;
    the ``--workers`` supervisor's, of the addresses its own load resolved: ``addresses``)."""

    def __init__(self, resolve: Resolver) -> None:
        self._resolve = resolve
        self.addresses: dict[str, tuple[IPAddress, ...]] = {}

    def __call__(self, host: str) -> Sequence[IPAddress]:
        if host not in self.addresses:
            self.addresses[host] = tuple(self._resolve(host))  # an OSError is not kept
        return self.addresses[host]

    def known(self, host: str) -> Sequence[IPAddress]:
        """A Resolver that asks no name service: a name resolved before, at its addresses;
        any other as not known (a reload's listen addresses need a restart anyway)."""
        return self.addresses.get(host, ())


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _listen_hosts(
    host: str, resolved: Mapping[str, Sequence[IPAddress]]
) -> Sequence[IPAddress | str]:
    """What a listen host binds: its IP address, the addresses ``resolved`` gives for a
    name, else localhost's two, or a host name as such (what it resolves to is not known
    here)."""
    name = host.lower().rstrip(".")
    address = _ip(host)
    if address is not None:
        return (address,)
    if host in resolved:
        return resolved[host]
    if name == "localhost":
        return (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))
    return (name,)


def listen_overlap(
    a: HostPort, b: HostPort, resolved: Mapping[str, Sequence[IPAddress]] | None = None
) -> str | None:
    """Why two servers of one process cannot both listen on ``a`` and ``b``, or None when
    they can: other ports, port 0 (a free port at each bind), other addresses, or
    ``0.0.0.0`` and an IPv6 address. ``::`` written as such takes both families (our
    servers bind it dual stack: aio.dual_stack_socket), so it clashes with an IPv4 address
    too; a name that resolves to it is bound as create_server does, IPv6 only. The reason
    is empty when they are written alike, else how one covers the other ("0.0.0.0 is
    every IPv4 address of this host", "localhost is 127.0.0.1"). A host name is taken at
    its addresses in ``resolved`` (resolve_listen_host's), else as written (localhost as
    127.0.0.1 and ::1)."""
    if a.port != b.port or a.port == 0:
        return None
    if a.host.lower().rstrip(".") == b.host.lower().rstrip("."):
        return ""
    resolved = resolved or {}
    for x in _listen_hosts(a.host, resolved):
        for y in _listen_hosts(b.host, resolved):
            if isinstance(x, str) or isinstance(y, str):
                if x == y:
                    return ""
                continue
            if x == y:
                names = [h for h in (a.host, b.host) if _ip(h) is None]
                if len(names) == 2:
                    return f"{names[0]} and {names[1]} are both {x}"
                return f"{names[0]} is {x}" if names else f"both are {x}"
            for wide, other, host in ((x, y, a.host), (y, x, b.host)):
                if not wide.is_unspecified:
                    continue
                if dual_stack(host):
                    return f"{wide} is every IPv4 and IPv6 address of this host"
                if wide.version == other.version:
                    return f"{wide} is every IPv{wide.version} address of this host"
    return None


def _check_listen(value: str) -> str:
    parse_host_port(value, listen=True)
    return value


Listen = Annotated[str, BeforeValidator(lambda v: _check_listen(v) if isinstance(v, str) else v)]


_SERVING: contextvars.ContextVar[bool] = contextvars.ContextVar("serving", default=True)
"""``load_settings(serving=...)``, for the checks of a section's own fields (the emulator's),
which run before Settings' and cannot read its class: status and simulate neither start the
emulator nor call Fly, so where it would listen and the names Fly takes are not theirs to
refuse."""


def check_loopback_listen(value: str) -> str:
    """A listen address that must stay on this machine (the emulator's API: its token runs
    commands on the host through machine env and cmd)."""
    host = parse_host_port(value, listen=True).host
    if not is_loopback(host):
        raise ValueError(
            f"expected a loopback address (127.0.0.0/8, [::1] or localhost), got {value!r}:"
            " the emulator runs machine commands on this host and must not be reachable"
            " from the network"
        )
    return value


LoopbackListen = Annotated[
    str,
    BeforeValidator(
        lambda v: (
            (check_loopback_listen if _SERVING.get() else _check_listen)(v)
            if isinstance(v, str)
            else v
        )
    ),
]


def holds_number(annotation: Any) -> bool:
    """Whether a field's type holds a number (an int or a float, maybe None or a range): one
    given as true or false is refused (``_Model._no_true_for_a_number``)."""
    if annotation in (int, float):
        return True
    return any(holds_number(arg) for arg in typing.get_args(annotation))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_true_for_a_number(cls, data: object) -> object:
        """YAML reads yes, no, on and off as true and false, which pydantic takes for 1
        and 0 (``stop_suspended_after_s: off`` stopped every machine as it went to sleep):
        a number given as true or false is refused, as the string YAML read it as."""
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                value = data.get(name)
                if isinstance(value, bool) and holds_number(field.annotation):
                    data = {**data, name: str(value).lower()}
        return data

    @model_validator(mode="before")
    @classmethod
    def _empty_is_defaults(cls, data: object) -> object:
        """An empty section (``fly:`` with every key commented out: YAML's null) takes
        every default, as if it were ``{}``; one with required keys is refused, naming
        them. So is an empty mapping or list whose default is empty (``env:``, ``hosts:``,
        ``apps:`` with every entry commented out)."""
        if data is None:
            required = [name for name, field in cls.model_fields.items() if field.is_required()]
            if required:
                raise ValueError(f"empty, but it needs {', '.join(required)} (key: value)")
            return {}
        if isinstance(data, dict) and None in data.values():
            data = dict(data)
            for name, field in cls.model_fields.items():
                factory = field.default_factory
                if data.get(name, 0) is None and (factory is dict or factory is list):
                    data[name] = factory()
        return data


class FlySettings(_Model):
    api_url: str | None = Field(
        default=None,
        description="Machines API base URL (public: https://api.machines.dev, inside Fly: "
        "http://_api.internal:4280), or `embedded` for the embedded emulator; "
        "`autoscaler run` refuses to start without it unless given --emulator or every app"
        " is static (has backends), and `check-config` refuses such a config too",
    )
    token: Token = Field(
        default=None,
        description="API token; FLY_API_TOKEN in the environment overrides it. Without one,"
        " `autoscaler run` and `check-config` refuse an app to scale through a fly.api_url"
        " other than the embedded emulator (exit 2), and `check-config` a token that API"
        " refuses (401, 403)",
    )
    org_slug: str = Field(default="personal", description="organization slug for app listings")
    timeout_s: Seconds = Field(default=30.0, gt=0, description="timeout of one API request")
    rate_limit: bool = Field(
        default=True, description="client-side token buckets at Fly's documented limits"
    )
    org_rate_limit_per_s: float = Field(
        default=150.0,
        gt=0,
        description="API calls per second of all apps together (a budget of ours: "
        "Fly documents none per organization)",
    )
    org_burst: int = Field(
        default=100, ge=1, description="calls the org budget lets through at once"
    )
    max_retries: int = Field(
        default=5, ge=0, description="retries of a safe API call (of a 429, one at most)"
    )
    retry_deadline_s: Seconds = Field(
        default=60.0, description="total time a call may spend retrying"
    )
    max_response_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description="largest API answer read (decompressed); a larger one fails the call",
    )

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str | None) -> str | None:
        if value is None or value == EMBEDDED or value.startswith(("http://", "https://")):
            return value
        raise ValueError(
            f'expected an http:// or https:// URL, or "{EMBEDDED}" for the embedded'
            f" emulator, got {value!r}"
        )

    @property
    def embedded(self) -> bool:
        """Whether the embedded emulator plays the Machines API (``api_url`` unset or
        ``embedded``; ``autoscaler run`` asks for the second, or --emulator)."""
        return self.api_url is None or self.api_url == EMBEDDED


class ProxySettings(_Model):
    listen: Listen = Field(
        default="0.0.0.0:8080",
        description="address of the data path (port 0: a free one, logged by proxy_listening;"
        " not with run --workers)",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="IPs or CIDRs whose X-Forwarded-* headers are kept (others are replaced)",
    )
    default_app: str | None = Field(default=None, description="app for hosts that match no app")
    wake_header: bool = Field(
        default=True,
        description=(
            "add the header fly-autoscaler-wake (none, resume, start, uncordon, or failed on"
            " a wake timeout's 504) to responses"
        ),
    )
    access_log: bool = Field(
        default=True,
        description="one log line per request (about a tenth of the proxy's CPU per small request)",
    )
    max_header_bytes: int = Field(
        default=8190,
        ge=1024,
        description=(
            "largest request target (414 above) or header field (431 above); a whole head,"
            " or trailer section, over 8 times this gets 431"
        ),
    )
    client_timeout_s: Seconds = Field(
        default=60.0,
        gt=0,
        description="a client that sends nothing, or takes nothing, for this long is disconnected",
    )
    connect_timeout_s: Seconds = Field(default=5.0, gt=0, description="connecting to a machine")
    upstream_timeout_s: Seconds = Field(
        default=60.0,
        gt=0,
        description=(
            "waiting for a machine's response headers (504 after), or for it to take or"
            " send more of a body"
        ),
    )
    pool_size: int = Field(
        default=256, ge=1, description="upstream keep-alive connections per machine"
    )
    max_buffer_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024 * 1024,
        description=(
            "request and response body bytes held at once, all connections together; a"
            " client that would go over it is slowed down, not dropped"
        ),
    )
    max_connections: int | None = Field(
        default=None,
        ge=1,
        description=(
            "client connections accepted at once; more are refused (default:"
            " max_buffer_bytes / 4 KiB)"
        ),
    )
    unhealthy_backoff_s: Seconds = Field(
        default=2.0,
        description="how long a machine that refused or dropped a connection is skipped",
    )
    eject_after: int = Field(
        default=5,
        ge=1,
        description=(
            "consecutive failures (connect, reset, timeout, 5xx) that take a machine out of"
            " rotation"
        ),
    )
    eject_base_s: Seconds = Field(
        default=10.0,
        gt=0,
        description=(
            "first ejection's length; it doubles while the machine keeps failing (at most"
            " 300 s or this)"
        ),
    )
    shutdown_timeout_s: Seconds = Field(
        default=30.0, description="on SIGTERM, how long requests in flight may finish"
    )
    reuse_port: bool = Field(
        default=False,
        description="bind the proxy with SO_REUSEPORT, so that several processes share its"
        " port (run --workers sets it)",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"expected an IP address or CIDR, got {item!r}") from None
        return value

    @property
    def connection_limit(self) -> int:
        """``max_connections``, or what the buffer budget carries at CONNECTION_BYTES each."""
        if self.max_connections is not None:
            return self.max_connections
        return max(1, self.max_buffer_bytes // CONNECTION_BYTES)


class AdminSettings(_Model):
    listen: Listen = Field(
        default="127.0.0.1:9091",
        description="address of /metrics, /healthz, /readyz, /status (port 0: a free one,"
        " logged by admin_listening; not with run --workers)",
    )
    token: Token = Field(
        default=None,
        description="bearer token required by /status (and, with protect_metrics, by /metrics"
        " and the health endpoints: the admin server has no others, and only reads), at least"
        f" {MIN_TOKEN_CHARS} characters (`openssl rand -hex 32`); needed when admin.listen"
        " is not a loopback address, nor a name whose addresses all are (start-up refuses"
        " otherwise)",
    )
    protect_metrics: bool = Field(
        default=False,
        description="require the admin token for /metrics and health too (needs admin.token)",
    )


class ControlSettings(_Model):
    tick_s: Seconds = Field(default=1.0, gt=0, description="how often each app's loop runs")
    api_backoff_max_s: Seconds = Field(
        default=5.0, description="longest pause of an app's loop after API errors"
    )
    api_timeout_s: Seconds = Field(
        default=5.0,
        gt=0,
        description="timeout of one API call of a tick (one attempt: the next tick retries)",
    )
    idle_poll_s: Seconds = Field(
        default=60.0,
        gt=0,
        description="how often a sleeping app's machines are listed (a request wakes it at once)",
    )
    steady_list_s: Seconds = Field(
        default=5.0,
        ge=0,
        description="how often an app in use whose machines all hold still is listed (its"
        " ticks decide from the last list in between; 0: every tick)",
    )
    tick_jitter: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="each pause of an app's loop is up to this fraction longer, at random",
    )

    @model_validator(mode="after")
    def _idle_poll_not_faster(self) -> ControlSettings:
        if self.idle_poll_s < self.tick_s:
            # Named by its key path, at the line of the key that was set: a tick_s of "5m"
            # meets idle_poll_s's default, which no line of the file holds.
            given = "idle_poll_s" in self.model_fields_set
            raise _KeyError(
                "control.idle_poll_s",
                f"expected at least control.tick_s ({self.tick_s:g}{_OTHER_ORIGIN}), got"
                f" {self.idle_poll_s:g}"
                + ("" if given else ", its default: set it too, or a shorter tick_s"),
                cause=None if given else "control.tick_s",
                other="control.tick_s",
            )
        return self


class ClusterSettings(_Model):
    redis_url: SecretStr | None = Field(
        default=None,
        description="Redis (or Valkey) shared by the replicas, redis://host:port/db; unset:"
        " one process, no Redis",
    )
    replica_id: str | None = Field(
        default=None,
        min_length=1,
        description="this replica's name in the cluster (default: FLY_MACHINE_ID and"
        " FLY_REGION when set, else hostname and pid)",
    )
    lease_ttl_s: Seconds = Field(
        default=5.0,
        gt=0,
        description="the leader's lease; a lost leader is replaced within twice this",
    )
    key_prefix: str = Field(
        default="autoscaler",
        min_length=1,
        description="prefix of every Redis key (one per cluster sharing a Redis)",
    )
    self_wake_after_s: Seconds = Field(
        default=2.0,
        gt=0,
        description="a follower whose held requests see no machine come up within this (or"
        " half the app's wake_timeout_s, if shorter) wakes the app itself, under the app's"
        " wake claim",
    )
    lead: bool = Field(
        default=True,
        description="false: this replica never takes the lease, so it never runs the control"
        " loop (a proxy-only replica: the data path without the control plane's work)",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError("expected a redis://, rediss:// or unix:// URL")
        if v is not None and not v.get_secret_value().startswith("unix://"):
            # redis-py reads the path as the database number with every "/" taken out, and
            # drops one that is no number: /x was database 0, /1/2 database 12.
            db = urllib.parse.unquote(urllib.parse.urlsplit(v.get_secret_value()).path)
            if db not in ("", "/") and not (db[1:].isascii() and db[1:].isdigit()):
                raise ValueError(
                    "expected a database number after host:port (redis://host:6379/0), or"
                    " nothing, got a path that is not one"
                )
        if v is not None:
            try:
                from redis.connection import parse_url
            except ImportError:  # `autoscaler run` says the cluster extra is missing
                return v
            try:  # its options too: a bad one failed only at the start, as a traceback
                parse_url(v.get_secret_value())  # type: ignore[no-untyped-call]
            except ValueError as exc:  # redis-py's message names the option, not the URL
                raise ValueError(f"expected a URL redis-py accepts: {exc}") from None
        return v


def default_replica_id(env: Mapping[str, str] | None = None) -> str:
    """``FLY_MACHINE_ID@FLY_REGION`` on Fly, else ``hostname:pid``."""
    env = os.environ if env is None else env
    machine, region = env.get("FLY_MACHINE_ID"), env.get("FLY_REGION")
    if machine:
        return f"{machine}@{region}" if region else machine
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


class AppConfig(_Model):
    """One Fly app behind the proxy, and the policy that scales it."""

    name: str = Field(
        min_length=1,
        description="Fly app name (lowercase letters, digits and dashes; a static app's, any)",
    )
    hosts: list[str] = Field(
        default_factory=list, description='Host names that route here ("*.example.com" allowed)'
    )
    paths: list[str] = Field(
        default_factory=list, description="path prefixes that route here (empty: every path)"
    )
    port: int | None = Field(
        default=None, ge=1, le=65535, description="upstream port (default: the internal_port)"
    )
    backends: list[str] = Field(
        default_factory=list,
        description='static mode: fixed "host:port" upstreams; the app is not scaled',
    )
    min_machines: int = Field(default=0, ge=0, description="never fewer started machines")
    max_machines: int = Field(
        default=10,
        ge=1,
        description="never more started machines, but for a sick one's replacement until it serves",
    )
    target_concurrency: float = Field(
        default=10, gt=0, description="requests in flight per machine the policy aims for"
    )
    target_utilization: float = Field(
        default=0.7, gt=0, le=1, description="fraction of target_concurrency to plan for"
    )
    hard_limit: int = Field(
        default=25,
        ge=1,
        le=2**53,  # the policy reckons it as a float: past this, one that overflows
        description="requests in flight per machine; more wait in the queue",
    )
    stable_window_s: Seconds = Field(
        default=60.0, gt=0, description="averaging window of normal mode"
    )
    panic_window_s: Seconds = Field(default=6.0, gt=0, description="averaging window of panic mode")
    panic_threshold: float = Field(
        default=2.0, gt=1, description="panic when demand reaches this times current capacity"
    )
    scale_down_delay_s: Seconds = Field(
        default=30.0, description="how long lower demand must last before a machine goes"
    )
    scale_down_step: int = Field(default=1, ge=1, description="most machines removed in one tick")
    idle_to_zero_s: Seconds = Field(
        default=300.0, description="no request for this long: the last machines go"
    )
    scale_down_action: Literal["suspend", "stop"] = Field(
        default="suspend", description="how a machine is put to sleep"
    )
    keep_alive: Literal["fixed", "adaptive"] = Field(
        default="fixed",
        description="fixed: idle_to_zero_s; adaptive: learn the app's idle gaps and pre-warm",
    )
    wake_cost_s: Seconds = Field(
        default=300.0,
        gt=0,
        description="adaptive: machine-seconds one request that waits for a wake is worth",
    )
    stop_suspended_after_s: Seconds | None = Field(
        default=None, description="stop a machine suspended this long (drops its snapshot)"
    )
    min_lifetime_s: Seconds = Field(
        default=30.0,
        description=(
            "never remove a machine started less than this ago (except a sleep that the"
            " adaptive keep-alive planned)"
        ),
    )
    drain_timeout_s: Seconds = Field(
        default=30.0, description="longest wait for requests in flight before a removal"
    )
    wake_timeout_s: Seconds = Field(
        default=30.0,
        description=(
            "held requests get 504 after this long (502 if their machines refused them: a"
            " static app may set it lower to fail fast; above 0: no unlimited)"
        ),
    )
    max_queue: int = Field(default=1000, ge=0, description="held requests per app; more get 503")
    max_body_bytes: int | None = Field(
        default=None, ge=0, description="largest request body (413 above); unset: no limit"
    )
    restart_failed: bool = Field(
        default=True,
        description=(
            "start a failed machine again when the app needs one, and restart one that hangs"
            " (requests to it time out or are reset, its probe too; timeouts with nothing"
            " else to route to, without the probe)"
        ),
    )
    max_restart_attempts: int = Field(
        default=5,
        ge=0,
        description=(
            "failed starts in a row after which a machine is left alone (and reported); also"
            " restarts in a row, each within 300 s of the last, of a machine that keeps hanging"
        ),
    )
    connection_idle_s: Seconds = Field(
        default=300.0,
        gt=0,
        description="a WebSocket with no data frame (text, binary) either way this long no "
        "longer keeps the app awake (pings and pongs do not count; a streamed response, such "
        "as SSE, always does)",
    )

    @field_validator("max_machines")
    @classmethod
    def _max_at_least_min(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("min_machines")
        if isinstance(low, int) and value < low:
            raise ValueError(f"must be >= min_machines ({low}), got {value}")
        return value

    @field_validator("wake_timeout_s")
    @classmethod
    def _wake_timeout_above_zero(cls, value: float) -> float:
        # 0 was taken, and answered every request that needed a wake 504 at once: a
        # reader may take 0 for "no limit", which there is not (a request held for ever).
        if value <= 0:
            raise ValueError(
                f"must be above 0 (how long a held request waits for a machine before its"
                f" 504; 0 is not 'no limit', there is none), got {value:g}"
            )
        return value

    @field_validator("target_utilization")
    @classmethod
    def _unit_above_zero(cls, value: float, info: ValidationInfo) -> float:
        # Their product is the load one machine is planned for, a divisor of the policy's.
        target = info.data.get("target_concurrency")
        if isinstance(target, float) and not target * value > 0:
            raise ValueError(
                f"target_concurrency x target_utilization must be above 0, got {target:g} x"
                f" {value:g}"
            )
        return value

    @field_validator("panic_window_s")
    @classmethod
    def _panic_shorter(cls, value: float, info: ValidationInfo) -> float:
        stable = info.data.get("stable_window_s")
        if isinstance(stable, float) and value > stable:
            raise ValueError(f"must be <= stable_window_s ({stable:g}), got {value:g}")
        return value

    @field_validator("backends")
    @classmethod
    def _backends(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_host_port(item)
        return value

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            bare = host.removeprefix("*.")
            if not bare or "*" in bare or "/" in bare or " " in bare:
                raise ValueError(f'expected a host name or "*.domain", got {host!r}')
        return [h.lower() for h in value]

    @field_validator("paths")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.startswith("/"):
                raise ValueError(f'expected a path prefix starting with "/", got {path!r}')
        return value

    @property
    def static(self) -> bool:
        """Static mode: fixed upstreams, nothing to scale."""
        return bool(self.backends)


# The emulator's calls that change a machine (the seed's operationIds, as its routes are
# named: autoscaler/emulator/api.py), the calls whose answer ``answer_lost_rate`` loses.
CHANGING_MACHINE_CALLS = (
    "createMachine",
    "updateMachine",
    "deleteMachine",
    "startMachine",
    "stopMachine",
    "suspendMachine",
    "restartMachine",
    "signalMachine",
    "cordonMachine",
    "uncordonMachine",
    "createMachineLease",
    "releaseMachineLease",
    "setMachineMetadata",
    "deleteMachineMetadata",
)


class FaultSettings(_Model):
    latency_s: Seconds = Field(default=0.0, description="extra latency of every API call")
    error_rate: Rate = Field(default=0.0, description="fraction answered 500")
    rate_limit_rate: Rate = Field(default=0.0, description="fraction answered 429")
    boot_failure_rate: Rate = Field(
        default=0.0, description="fraction of boots (any cold boot) that end `failed`"
    )
    crash_after_s: Seconds | None = Field(
        default=None, description="kill each machine's process this long after it starts"
    )
    resume_cold_rate: Rate = Field(
        default=0.0,
        description="fraction of resumes whose snapshot is lost: a cold boot instead",
    )
    hang_rate: Rate = Field(
        default=0.0,
        description="fraction of starts after which the process hangs (its id joins `hung`)",
    )
    hung: list[str] = Field(
        default_factory=list,
        description=(
            "machine ids whose process accepts TCP but never answers (state unchanged),"
            " until a cold boot starts a new one"
        ),
    )
    host_unreachable_rate: Rate = Field(
        default=0.0,
        description="fraction of starts after which the host is lost (id joins `host_unreachable`)",
    )
    host_unreachable: list[str] = Field(
        default_factory=list,
        description="machine ids whose host_status is `unreachable`; their actions answer 503",
    )
    answer_lost_rate: Rate = Field(
        default=0.0,
        description=(
            "fraction of successful calls that change a machine whose answer is lost: the"
            " call is carried out, then the connection closed without an answer"
        ),
    )
    answer_lost_calls: list[str] = Field(
        default_factory=list,
        description=(
            "the calls `answer_lost_rate` applies to, by operationId (`startMachine`,"
            " `releaseMachineLease`, ...); empty: every call that changes a machine"
        ),
    )

    @field_validator("answer_lost_calls")
    @classmethod
    def _changing_calls(cls, value: list[str]) -> list[str]:
        # A name mistyped would lose no answer, and the test that set it would prove nothing.
        unknown = [name for name in value if name not in CHANGING_MACHINE_CALLS]
        if unknown:
            raise ValueError(
                f"{unknown[0]!r} is no call that changes a machine (known: "
                f"{', '.join(CHANGING_MACHINE_CALLS)})"
            )
        return value


def _parse_span(value: object) -> object:
    """Seconds, or ``[lo, hi]``: a range drawn anew for every action."""
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise ValueError(f"expected seconds or a range [lo, hi], got {list(value)!r}")
        lo, hi = (parse_duration(v) for v in value)
        if not isinstance(lo, float) or not isinstance(hi, float):
            raise ValueError(f"expected numbers in the range [lo, hi], got {list(value)!r}")
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"expected finite seconds in the range [lo, hi], got {list(value)!r}")
        if lo < 0 or hi < lo:
            raise ValueError(f"expected a range [lo, hi] with 0 <= lo <= hi, got {list(value)!r}")
        return (lo, hi)
    value = parse_duration(value)
    if isinstance(value, float) and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"expected finite seconds >= 0, got {value!r}")
    return value


# A fixed number of seconds, or a (lo, hi) range drawn uniformly per action.
Span = Annotated[float | tuple[float, float], BeforeValidator(_parse_span)]

# Named timing profiles. `fast` is the emulator's historical speed (for unit tests); `fly`
# follows Fly's documentation (docs/emulator.md, "Fly vs this emulator", has the sources):
# resume a few hundred ms, cold start about 2 s (the last part of it `started`, the app not
# yet listening), suspend up to over 15 s.
PROFILES: dict[str, dict[str, float | tuple[float, float]]] = {
    "fast": {"stop_s": 0.0, "suspend_s": 0.0, "start_s": 0.5, "resume_s": 0.05, "listen_s": 0.0},
    "fly": {
        "stop_s": (0.5, 2.0),
        "suspend_s": (2.0, 18.0),
        "start_s": (1.2, 2.4),
        "resume_s": (0.2, 0.5),
        "listen_s": (0.3, 0.6),
    },
}


class TimingSettings(_Model):
    stop_s: Span | None = Field(
        default=None,
        description=(
            "least time from a stop's call to `stopped`, also a restart's or update's stop "
            "(s or [lo, hi]; unset: profile)"
        ),
    )
    suspend_s: Span | None = Field(
        default=None, description="time in `suspending` (s or [lo, hi]; unset: the profile's)"
    )
    start_s: Span | None = Field(
        default=None, description="cold boot time (s or [lo, hi]; unset: the profile's)"
    )
    resume_s: Span | None = Field(
        default=None, description="resume time from a snapshot (s or [lo, hi]; unset: profile)"
    )
    listen_s: Span | None = Field(
        default=None,
        description="after a cold boot, time `started` before the app listens (s or [lo, hi])",
    )
    snapshot_ttl_s: Seconds | None = Field(
        default=None, description="a snapshot older than this is not resumed: a cold boot instead"
    )


@dataclass(frozen=True, slots=True)
class Timing:
    """The emulator's transition times, resolved from profile, old knobs and overrides."""

    stop_s: float | tuple[float, float]
    suspend_s: float | tuple[float, float]
    start_s: float | tuple[float, float]
    resume_s: float | tuple[float, float]
    listen_s: float | tuple[float, float]
    snapshot_ttl_s: float | None


# Fly's region codes: three lowercase letters (iad, ord, cdg, ...).
Region = Annotated[str, Field(pattern=r"^[a-z]{3}$")]


EMULATOR_APP_MACHINES = 1000
"""The most start-up machines of one emulator app (``emulator.apps[].machines``, ``--app``,
``demo --machines``): each takes a loopback address, and once started a process of this
host. Fly documents no count of its own; a typo (``--app web=100000``) made them all."""


class EmulatorApp(_Model):
    name: str = Field(description="app created at start-up (a Fly app name)")
    machines: int = Field(
        default=0,
        ge=0,
        le=EMULATOR_APP_MACHINES,
        description=f"stopped machines created with it (at most {EMULATOR_APP_MACHINES})",
    )
    image: str = Field(default="autoscaler/demo-app", description="image of those machines")
    internal_port: int = Field(default=8080, ge=1, le=65535, description="their service port")
    env: dict[str, str] = Field(default_factory=dict, description="their environment")
    regions: list[Region] = Field(
        default_factory=list, description="regions its machines are spread over, round-robin"
    )

    @field_validator("name")
    @classmethod
    def _fly_app_name(cls, value: str) -> str:
        problem = app_name_problem(value) if _SERVING.get() else None
        if problem:
            raise ValueError(problem)
        return value


IMAGE_PLACEHOLDERS = ("{host}", "{port}", "{python}")
"""What the emulator fills in an image's command template (emulator.machines)."""
_PLACEHOLDER_RE = re.compile(r"(?<!\$)\{[A-Za-z_][A-Za-z0-9_]*\}")  # not a shell's ${VAR}


def _slip(name: str, placeholder: str) -> bool:
    """Whether ``name`` is ``placeholder`` after one slip of the fingers: its case changed
    (``Host``), a letter dropped (``prt``) or doubled (``portt``), or two neighbours
    swapped (``hsot``)."""
    name = name.lower()
    if name == placeholder:
        return True
    cuts = range(len(placeholder))
    if len(name) == len(placeholder) - 1:
        return any(placeholder[:i] + placeholder[i + 1 :] == name for i in cuts)
    if len(name) == len(placeholder) + 1:
        return any(placeholder[: i + 1] + placeholder[i:] == name for i in cuts)
    swaps = range(len(placeholder) - 1)
    return len(name) == len(placeholder) and any(
        placeholder[:i] + placeholder[i + 1] + placeholder[i] + placeholder[i + 2 :] == name
        for i in swaps
    )


def _misspelt_placeholder(found: str) -> bool:
    """Whether ``{name}``, which the emulator leaves as written, is surely a placeholder
    mistyped (``{prt}``, ``{Host}``, ``_slip``): refused. Any other braces are the command's
    own (awk's ``'{print}'``, a Python format string): the emulator fills the placeholders
    by their text and passes the rest on, and such a template runs."""
    return any(_slip(found[1:-1], p[1:-1]) for p in IMAGE_PLACEHOLDERS)


def _near_placeholder(found: str) -> bool:
    """Whether ``{name}`` is near a placeholder without being surely a typo of one: a letter
    changed (``{sort}``, ``{post}``, ``{hist}``) or added (``{hosts}``), as a word a real
    command holds may be. Taken, with a warning (EmulatorSettings.placeholder_warnings)."""
    known = [p[1:-1] for p in IMAGE_PLACEHOLDERS]
    close = difflib.get_close_matches(found[1:-1].lower(), known, n=1, cutoff=0.75)
    return bool(close) and not _misspelt_placeholder(found)


class EmulatorSettings(_Model):
    listen: LoopbackListen = Field(
        default="127.0.0.1:4280",
        description="address of the emulated API (loopback only; port 0: a free one, logged by"
        " emulator_listening)",
    )
    token: Token = Field(
        default=None,
        description="API token it accepts (EMULATOR_TOKEN; unset: a random one, which"
        " `autoscaler emulator` prints and an embedded emulator never shows)",
    )
    state_file: Path | None = Field(default=None, description="apps and machines kept here")
    org_slug: str = Field(default="personal", description="its one organization")
    rate_limits: bool = Field(default=True, description="answer 429 past Fly's documented limits")
    images: dict[str, str] = Field(
        default_factory=dict,
        description="image → command template with {host} and {port} (demo-app is built in)",
    )
    boot_timeout_s: Seconds = Field(
        default=30.0,
        gt=0,
        description=(
            "a machine whose port does not open by then is failed (`timing.listen_s` 0 only)"
        ),
    )
    profile: Literal["fast", "fly"] = Field(
        default="fast", description="transition times: fast (tests) or fly (Fly's documented)"
    )
    timing: TimingSettings = Field(default_factory=TimingSettings)
    demo_boot_delay_s: Seconds | None = Field(
        default=None, description="older name of timing.start_s (which wins when both are set)"
    )
    resume_delay_s: Seconds | None = Field(
        default=None, description="older name of timing.resume_s (which wins when both are set)"
    )
    faults: FaultSettings = Field(default_factory=FaultSettings)
    apps: list[EmulatorApp] = Field(default_factory=list, description="apps made at start-up")
    strict_images: bool = Field(
        default=False, description="refuse images not in `images` (else they run the demo app)"
    )
    seed_wait_limits: bool = Field(
        default=False, description="/wait as the seed has it: timeout up to 300 s, no version"
    )
    ipv6: bool = Field(
        default=False,
        description="machines listen on ::1, their private_ip, as Fly's are IPv6 (they share"
        " it: one machine per internal_port)",
    )

    @field_validator("images")
    @classmethod
    def _templates_known(cls, images: dict[str, str]) -> dict[str, str]:
        """A placeholder the emulator does not fill (``{prt}``) or a quote left open went
        to the machine as written: its process failed at every boot, and ``run`` said
        only "machine ... failed to boot"."""
        for image, template in images.items():
            try:
                shlex.split(template)
            except ValueError as exc:
                raise ValueError(
                    f"{image}: expected a command line, got {template!r} ({exc})"
                ) from None
            unknown = sorted(
                found
                for found in set(_PLACEHOLDER_RE.findall(template)) - set(IMAGE_PLACEHOLDERS)
                if _misspelt_placeholder(found)
            )
            if unknown:
                raise ValueError(
                    f"{image}: unknown placeholder {', '.join(unknown)} in {template!r}"
                    f" (known: {', '.join(IMAGE_PLACEHOLDERS)})"
                )
        return images

    @field_validator("apps")
    @classmethod
    def _apps_unique(cls, apps: list[EmulatorApp]) -> list[EmulatorApp]:
        names = [a.name for a in apps]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"expected each app once, got {', '.join(twice)} more than once")
        return apps

    @model_validator(mode="after")
    def _ipv6_ports_unshared(self) -> EmulatorSettings:
        """On ::1 two machines cannot listen on one port: the second of the machines made
        at start-up would be refused, and the emulator would not start."""
        if self.ipv6:
            held: dict[int, int] = {}
            for app in self.apps:
                held[app.internal_port] = held.get(app.internal_port, 0) + app.machines
            shared = sorted(port for port, count in held.items() if count > 1)
            if shared:
                raise _KeyError(
                    "emulator.apps",
                    "with emulator.ipv6 every machine listens on ::1, so at most one machine"
                    f" per internal_port, got {held[shared[0]]} on port {shared[0]}",
                )
        return self

    def placeholder_warnings(self) -> list[str]:
        """The ``{name}``s of the image templates that are near a placeholder but may be the
        command's own (``{sort}``): taken as written, and said (check-config, the emulator's
        start), since one that is a typo fails every boot of its image's machines."""
        warnings = []
        for image, template in self.images.items():
            near = sorted(f for f in set(_PLACEHOLDER_RE.findall(template)) if _near_placeholder(f))
            if near:
                warnings.append(
                    f"emulator.images: {image}: {', '.join(near)} in {template!r} is passed to"
                    f" the command as written (the placeholders are"
                    f" {', '.join(IMAGE_PLACEHOLDERS)}): if it is one mistyped, every boot of a"
                    " machine of this image fails"
                )
        return warnings

    def effective_timing(self) -> Timing:
        """Precedence: ``timing.*``, then the older knobs, then the profile."""
        base = dict(PROFILES[self.profile])
        if self.demo_boot_delay_s is not None:
            base["start_s"] = self.demo_boot_delay_s
        if self.resume_delay_s is not None:
            base["resume_s"] = self.resume_delay_s
        t = self.timing
        for name in ("stop_s", "suspend_s", "start_s", "resume_s", "listen_s"):
            value = getattr(t, name)
            if value is not None:
                base[name] = value
        return Timing(
            stop_s=base["stop_s"],
            suspend_s=base["suspend_s"],
            start_s=base["start_s"],
            resume_s=base["resume_s"],
            listen_s=base["listen_s"],
            snapshot_ttl_s=t.snapshot_ttl_s,
        )


class Settings(BaseSettings):
    """The whole configuration of one autoscaler process."""

    model_config = SettingsConfigDict(
        env_prefix="AUTOSCALER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    fly: FlySettings = Field(default_factory=FlySettings)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    control: ControlSettings = Field(default_factory=ControlSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    apps: list[AppConfig] = Field(default_factory=list)
    emulator: EmulatorSettings = Field(default_factory=EmulatorSettings)

    # What load_settings was asked to check (its arguments of the same names).
    serving: ClassVar[bool] = True
    resolve: ClassVar[Resolver | None] = None

    @model_validator(mode="after")
    def _apps_consistent(self) -> Settings:
        """The checks across sections and apps, every problem at once."""
        problems = _app_problems(enumerate(self.apps), fly_names=type(self).serving)
        listens = self._listens()
        resolved: dict[str, Sequence[IPAddress]] = {}
        # Resolved first (the admin server is on loopback if its addresses are), said after
        # the admin server's problems, where they were.
        unresolved = self._resolve_listens(listens, resolved) if type(self).serving else []
        # Not status's nor simulate's (serving=False): they serve nothing, and look up no
        # name, so a server on a name of loopback that `run` started on would be refused.
        open_admin = type(self).serving and not self._admin_is_loopback(resolved)
        if self.admin.token is None and open_admin:
            problems.append(
                _KeyError(
                    "admin.token",
                    f"required when admin.listen is not a loopback address (got"
                    f" {self.admin.listen}): /status (apps, machines, the policy's reasons,"
                    " API errors) would be open to the network; set admin.token or"
                    " AUTOSCALER_ADMIN__TOKEN, or listen on 127.0.0.1",
                    cause="admin.listen",
                )
            )
        if self.admin.protect_metrics and self.admin.token is None:
            problems.append(
                _KeyError(
                    "admin.protect_metrics",
                    "needs admin.token: without a token there is nothing to require, and"
                    " /metrics, the health endpoints and /status would all stay open; set"
                    " admin.token or AUTOSCALER_ADMIN__TOKEN, or leave protect_metrics out",
                )
            )
        if type(self).serving:
            problems += unresolved + self._listen_clashes(listens, resolved)
        default = self.proxy.default_app
        if default is not None and all(app.name != default for app in self.apps):
            problems.append(
                _KeyError("proxy.default_app", f"must name an app in apps, got {default!r}")
            )
        if problems:
            raise _KeyErrors(problems)
        return self

    @property
    def runs_embedded_emulator(self) -> bool:
        """Whether ``autoscaler run`` starts the embedded emulator on these settings:
        ``fly.api_url: embedded`` (``run --emulator``), or unset with an app to scale (the
        demo); unset with static apps alone, there is no Machines API at all."""
        return self.fly.api_url == EMBEDDED or (
            self.fly.api_url is None and any(not app.static for app in self.apps)
        )

    def apps_the_emulator_lacks(self) -> list[str]:
        """The apps to scale that the embedded emulator will not have: not in
        ``emulator.apps``, and no ``emulator.state_file`` that may hold them. Every call
        for such an app is a 404 (each tick fails, each request waits for its 504): a
        production config tried with ``run --emulator`` names apps the emulator never
        made."""
        if not self.fly.embedded or self.emulator.state_file is not None:
            return []
        seeded = {app.name for app in self.emulator.apps}
        return [app.name for app in self.apps if not app.static and app.name not in seeded]

    def _listens(self) -> list[tuple[str, str]]:
        """The servers of one process, by key and listen address. The embedded emulator's
        counts when it runs: ``fly.api_url: embedded`` (``run --emulator``), or unset with
        an app to scale (the demo)."""
        listens = [("proxy.listen", self.proxy.listen), ("admin.listen", self.admin.listen)]
        if self.runs_embedded_emulator:
            listens.append(("emulator.listen", self.emulator.listen))
        return listens

    def _admin_is_loopback(self, resolved: Mapping[str, Sequence[IPAddress]]) -> bool:
        """Whether the admin server is reachable from this host alone: a loopback address,
        localhost, or a name whose addresses (``resolved``) are all loopback ones."""
        host = parse_host_port(self.admin.listen, listen=True).host
        addresses = resolved.get(host, ())
        return is_loopback(host) or (bool(addresses) and all(a.is_loopback for a in addresses))

    def _resolve_listens(
        self, listens: list[tuple[str, str]], resolved: dict[str, Sequence[IPAddress]]
    ) -> list[_KeyError]:
        """With a resolver (``load_settings(resolve=...)``), the listen hosts' names at the
        addresses they bind, into ``resolved``: a name that does not resolve is a problem
        of its own."""
        problems = []
        resolve = type(self).resolve
        for key, value in listens:
            host = parse_host_port(value, listen=True).host
            if resolve is None or host in resolved or _ip(host) is not None:
                continue
            try:
                resolved[host] = resolve(host)
            except OSError as exc:
                resolved[host] = ()
                problems.append(
                    _KeyError(
                        key,
                        f"host {host!r} does not resolve ({exc.strerror or exc}): nothing could"
                        f" listen on {value}; give an IP address, or a name of this host",
                    )
                )
        return problems

    def _listen_clashes(
        self, listens: list[tuple[str, str]], resolved: Mapping[str, Sequence[IPAddress]]
    ) -> list[_KeyError]:
        """The servers of one process on one address: the second would fail to start
        ("address in use"). Host names are taken at their addresses in ``resolved``, else
        as written (listen_overlap)."""
        problems = []
        for i, (key, value) in enumerate(listens):
            for other, other_value in listens[i + 1 :]:
                a = parse_host_port(value, listen=True)
                b = parse_host_port(other_value, listen=True)
                why = listen_overlap(a, b, resolved)
                if why is None:
                    continue
                # Each key may be set elsewhere (the file, the environment, the command
                # line): the line starts with where the first was, and names the other's.
                shown = f"{other_value}{_OTHER_ORIGIN}" + (f"; {why}" if why else "")
                problems.append(
                    _KeyError(
                        key,
                        f"{value} is {other}'s address too ({shown}): the second of the two"
                        " servers could not listen; give each its own port",
                        other=other,
                    )
                )
        return problems

    def app(self, name: str) -> AppConfig:
        for app in self.apps:
            if app.name == name:
                return app
        raise KeyError(name)

    def secrets(self) -> list[str]:
        """Every secret value, for the log redactor."""
        found = [
            s.get_secret_value()
            for s in (self.fly.token, self.admin.token, self.emulator.token, self.cluster.redis_url)
            if s
        ]
        return [s for s in found if s]


_OTHER_ORIGIN = "\x00"
"""Where a _KeyError's message names the origin of its ``other`` key's value."""


class _KeyError(ValueError):
    """A cross-field problem that belongs to one key path. ``cause`` is the key path whose
    value brought it about, when that is another (admin.token, missing, is required by
    admin.listen's value): where that value came from is where the line points. ``other``
    is a second key path the problem is about (the other of two listen addresses that
    clash), which may be set elsewhere than the first: where its value came from is said
    in the message, at :data:`_OTHER_ORIGIN` (``text``)."""

    def __init__(
        self, path: str, message: str, cause: str | None = None, *, other: str | None = None
    ) -> None:
        super().__init__(f"{path}: {message.replace(_OTHER_ORIGIN, '')}")
        self.path = path
        self.message = message
        self.cause = cause or path
        self.other = other

    def text(self, named: Callable[[KeyPath], str] | None) -> str:
        """The line, the ``other`` key's origin named by ``named`` (_Origin.named)."""
        if named is None or self.other is None:
            return str(self)
        origin = named(_parse_key_path(self.other))
        return f"{self.path}: {self.message.replace(_OTHER_ORIGIN, origin)}"


class _KeyErrors(ValueError):
    """Several cross-field problems, each with its key path, reported together."""

    def __init__(self, errors: Sequence[_KeyError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = tuple(errors)


def _app_problems(
    apps: Iterable[tuple[int, AppConfig]], *, fly_names: bool = True
) -> list[_KeyError]:
    """Across the apps (numbered as in the file): a name that is no Fly app name (when
    ``fly_names``) or is used twice, and a host and path routed to two apps."""
    problems = []
    names: set[str] = set()
    routes: dict[tuple[str, str], str] = {}
    for i, app in apps:
        # Checked here, not on AppConfig: the simulator gives a policy to each app of a
        # trace, whatever the trace calls it. A static app has no Fly app: any name.
        bad_name = None if app.static or not fly_names else app_name_problem(app.name)
        if bad_name:
            problems.append(_KeyError(f"apps[{i}].name", bad_name))
        if app.name in names:
            problems.append(_KeyError(f"apps[{i}].name", f"duplicate app name {app.name!r}"))
        names.add(app.name)
        for host in app.hosts:
            for path in app.paths or ["/"]:
                other = routes.setdefault((host, path), app.name)
                if other != app.name:
                    problems.append(
                        _KeyError(
                            f"apps[{i}].hosts",
                            f"host {host!r} path {path!r} is already routed to app {other!r}",
                        )
                    )
    return problems


def _file_app_problems(data: Mapping[str, Any], *, fly_names: bool) -> list[_KeyError]:
    """The checks across apps, on the file's own ``apps``, for when validation failed
    elsewhere (the checks on the whole then never ran): each app that is valid on its own
    takes part; of the others (which have lines of their own), only a name."""
    raw = data.get("apps")
    if not isinstance(raw, list):
        return []
    apps = []
    for i, entry in enumerate(raw):
        try:
            apps.append((i, AppConfig.model_validate(entry)))
        except ValidationError:
            name = entry.get("name") if isinstance(entry, dict) else None
            if isinstance(name, str) and name:
                apps.append((i, AppConfig.model_construct(name=name, hosts=[], paths=[])))
    return _app_problems(apps, fly_names=fly_names)


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` holds one line per mistake."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Layer(PydanticBaseSettingsSource):
    """A fixed mapping as a settings source (the YAML file, or FLY_API_TOKEN)."""

    def __init__(self, settings_cls: type[BaseSettings], data: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = dict(data)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._data


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def config_path(cli_path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path:
    """``--config`` wins, then ``AUTOSCALER_CONFIG``, then ``config/autoscaler.yaml``."""
    if cli_path:
        return Path(cli_path)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return DEFAULT_CONFIG_PATH


_MERGE_TAG = "tag:yaml.org,2002:merge"

KeyPath = tuple[str | int, ...]
"""Where a value is in the settings: ``("apps", 1, "name")`` for ``apps[1].name``."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (PyYAML
    keeps the last one, and the first would be lost without a word), and so is a key that
    is not a name (``1:``, ``true:``, ``null:``: pydantic failed on it with a traceback).
    Merge keys (``<<: *defaults``) work as in PyYAML: what they bring in may be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue  # the safe loader's own flattening handles it
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, str):
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"found a key that is not a name: {key!r} (quote it, or check the"
                        " indentation)",
                        key_node.start_mark,
                    )
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _node_lines(node: yaml.Node | None) -> dict[KeyPath, int]:
    """The line (from 1) of each key and list item of a YAML document, by key path."""
    lines: dict[KeyPath, int] = {}
    seen: set[int] = set()  # an alias is the node of its anchor: walked once

    def walk(node: yaml.Node, path: KeyPath) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value in node.value:
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = (*path, str(key_node.value))
                lines.setdefault(key, key_node.start_mark.line + 1)
                walk(value, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines.setdefault((*path, i), item.start_mark.line + 1)
                walk(item, (*path, i))

    if node is not None:
        walk(node, ())
    return lines


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    """The file's top-level mapping, and the line of each of its keys (``_node_lines``); a
    syntax error names its line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"{path}: cannot read: not UTF-8 text (byte {exc.start + 1} is not UTF-8)"]
        ) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        # A character YAML does not allow (NUL, other control characters) is refused here.
        loader = _UniqueKeyLoader(text)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise ConfigError(
            [
                f"{path}:{line}:{column}: YAML error: unacceptable character"
                f" #x{exc.character:04x} (control characters are not allowed)"
            ]
        ) from None
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        what = "error" if isinstance(exc, yaml.constructor.ConstructorError) else "syntax error"
        raise ConfigError([f"{path}{where}: YAML {what}: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: YAML error: {exc}"]) from None
    finally:
        loader.dispose()
    if node is None or data is None:
        # Also what a reload would read from a file caught half-written: every app gone.
        raise ConfigError([f"{path}: the file holds no settings: write {{}} to take every default"])
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of sections at the top, got {_kind(data)}"])
    return data, _node_lines(node)


def _env_typos(names: Iterable[str]) -> list[str]:
    """Variables that name a section's key with one underscore where two nest
    (``AUTOSCALER_CONTROL_TICK_S``): pydantic-settings ignores them, and the knob the user
    meant to set would keep its value without a word."""
    problems = []
    for name in names:
        rest = name.upper().removeprefix("AUTOSCALER_")
        for section, field in Settings.model_fields.items():
            head = f"{section.upper()}_"
            model = field.annotation
            if not (rest.startswith(head) and not rest.startswith(head + "_")):
                continue
            key = rest.removeprefix(head).lower()
            if isinstance(model, type) and key in getattr(model, "model_fields", {}):
                problems.append(
                    f"environment: {name}: not a setting (did you mean"
                    f" AUTOSCALER_{section.upper()}__{key.upper()}? Two underscores nest)"
                )
    return problems


def _env_list_items(names: Iterable[str]) -> list[str]:
    """Variables that name an item of a list (``AUTOSCALER_APPS__0__NAME``): the list
    became a mapping, and its error named the file's line of the list instead."""
    problems = []
    for name in names:
        parts = name.upper().removeprefix("AUTOSCALER_").lower().split("__")
        model: Any = Settings
        for depth, part in enumerate(parts[:-1]):
            field = getattr(model, "model_fields", {}).get(part)
            if field is None:
                break
            model = field.annotation
            if typing.get_origin(model) is list:
                key = "AUTOSCALER_" + "__".join(parts[: depth + 1]).upper()
                problems.append(
                    f"environment: {name}: {'.'.join(parts[: depth + 1])} is a list, set"
                    f" whole as JSON by {key} (an item cannot be set alone)"
                )
                break
    return problems


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    require_file: bool = False,
    serving: bool = True,
    resolve: Resolver | None = None,
    flags: Mapping[str, str] | None = None,
) -> tuple[Settings, Path]:
    """Load and validate the settings; raise ConfigError with one line per problem, each
    starting with where the value came from (``file:line``, ``environment: VARIABLE`` or
    ``command line``) and its key path, and never showing a secret.

    A missing default file is fine (defaults apply) unless ``require_file`` is set or the
    path was given explicitly. ``overrides`` (from CLI flags) beat everything else;
    ``flags`` names the flag that set each of their key paths (``{"proxy.listen":
    "--listen"}``, the key paths under it too): a problem of its value is said by the flag
    as the user typed it (``--listen: ...``), not by a key path they never wrote.

    ``serving=False`` is for the commands that read the file without running it (status
    asks the admin server at admin.listen; simulate replays the apps' policies): what
    matters only to the process that runs it is not checked, two of its servers on one
    address, an app name Fly would refuse (a draft, or a trace's own app names), the
    emulator's listen address and app names (neither command starts it), and the admin
    server's need of a token beyond loopback (which, for a name, takes a name service).
    ``resolve`` (resolve_listen_host) takes the listen addresses' host names at the
    addresses they bind, for `run` and `check-config`; a reload, which may not wait on a
    name service in the event loop (and whose addresses need a restart anyway), is given
    the names the start resolved (ListenHosts.known). An admin server on a name whose
    addresses are all loopback ones needs no token; without ``resolve``, only localhost's.
    """
    environ = os.environ if env is None else env
    explicit = path is not None or bool(environ.get(CONFIG_ENV))
    file = config_path(path, environ)
    data: dict[str, Any] = {}
    lines: dict[KeyPath, int] = {}
    if require_file and not explicit and not file.exists():
        # The default file, looked for where the command runs: a bare "no such file" did not
        # say that another could be given, nor how.
        raise ConfigError([f"{file}: no such file; {GIVE_THE_FILE}"])
    if file.exists() or explicit or require_file:
        data, lines = read_yaml(file)
    token_layer: dict[str, Any] = {}
    if environ.get(TOKEN_ENV):
        token_layer["fly"] = {"token": environ[TOKEN_ENV]}
    if environ.get(EMULATOR_TOKEN_ENV):
        token_layer["emulator"] = {"token": environ[EMULATOR_TOKEN_ENV]}
    base = _deep_merge(data, token_layer)
    env_vars = _setting_vars(environ)
    typos = _env_typos(env_vars) + _env_list_items(env_vars)
    if typos:
        raise ConfigError(typos)

    class _Bound(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            from pydantic_settings import EnvSettingsSource

            env_source = EnvSettingsSource(
                settings_cls,
                env_prefix="AUTOSCALER_",
                env_nested_delimiter="__",
                case_sensitive=False,
            )
            env_source.env_vars = {k.lower(): v for k, v in env_vars.items()}
            return (init_settings, env_source, _Layer(settings_cls, base))

    # Read by the checks across sections, which run in __init__: of the class, not passed.
    _Bound.serving = serving
    _Bound.resolve = resolve
    serving_token = _SERVING.set(serving)
    try:
        settings = _Bound(**dict(overrides or {}))
    except SettingsError as exc:
        # pydantic-settings decodes a list or a section given in one variable as JSON.
        raise ConfigError([_not_json(exc, env_vars)]) from None
    except ValidationError as exc:
        origin = _Origin(file, lines, env_vars, overrides or {}, environ, flags or {})
        items = _error_items(exc, origin.named)
        checked_across = any(
            isinstance(e.get("ctx", {}).get("error"), _KeyErrors) for e in exc.errors()
        )
        from_env = any(k.upper().startswith("AUTOSCALER_APPS") for k in env_vars)
        if not checked_across and not from_env:
            # A mistake elsewhere kept the checks across apps from running: run them on
            # the file's apps (from the environment, the apps are not the file's alone).
            items += [
                (_parse_key_path(e.cause), str(e))
                for e in _file_app_problems(base, fly_names=serving)
            ]
        items.sort(key=lambda item: origin.order(item[0]))  # (stable: same line, same order)
        raise ConfigError([origin.line(loc, text) for loc, text in items]) from None
    finally:
        _SERVING.reset(serving_token)
    # Hand back a plain Settings so the dynamic class never leaks into reprs or pickles.
    return Settings.model_construct(
        **{k: getattr(settings, k) for k in Settings.model_fields}
    ), file


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top)"


def _known_keys(loc: tuple[int | str, ...]) -> list[str]:
    model: Any = Settings
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def format_errors(exc: ValidationError) -> list[str]:
    """One line per problem: ``key.path: what was expected, got what was found``."""
    return [text for _, text in _error_items(exc)]


# Fly's tokens by their shape (macaroons: "FlyV1 fm2_...", and the older fo1_/fm1_ ones):
# a token pasted into a field that is not a secret (``fly.api_url``) is not echoed either.
_FLY_TOKEN = re.compile(r"FlyV1\s+\S+|\bf[mo]\d[a-z]?_[A-Za-z0-9_+/=,-]{8,}")


def _hide_tokens(text: str) -> str:
    return _FLY_TOKEN.sub("<redacted: a Fly token?>", text)


def shown_url(url: str) -> str:
    """A URL as a message may show it (``fly.api_url`` in check-config's summary and its
    errors): credentials typed into it (``https://user:secret@host/``), its query (a
    ``?token=...``) and fragment redacted, and a Fly token anywhere in it. The URL is not a secret
    field, but it is where a secret gets pasted."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # a malformed one ("http://[::1"): shown only where no secret is
        return _hide_tokens(re.split("[?#]", url)[0].rpartition("@")[2])
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "<redacted>@" + netloc.rpartition("@")[2]
    query = "<redacted>" if parts.query else ""
    fragment = "<redacted>" if parts.fragment else ""
    shown = parts._replace(netloc=netloc, query=query, fragment=fragment)
    return _hide_tokens(urllib.parse.urlunsplit(shown))


# Fields whose values are secrets: never shown in an error, whatever the mistake.
_SECRET_FIELDS = frozenset({"token", "redis_url"})
# Errors of a value that should have been a mapping (a section, an app).
_MAPPING_ERRORS = frozenset({"model_type", "model_attributes_type", "dict_type"})


def _error_items(
    exc: ValidationError, named: Callable[[KeyPath], str] | None = None
) -> list[tuple[KeyPath, str]]:
    """``format_errors``, each line with the key path it is about; ``named`` says where
    the value of a second key a line is about came from (_Origin.named)."""
    return [(loc, _hide_tokens(text)) for loc, text in _error_lines(exc, named)]


def _error_lines(
    exc: ValidationError, named: Callable[[KeyPath], str] | None
) -> list[tuple[KeyPath, str]]:
    items: list[tuple[KeyPath, str]] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = _key_path(loc)
        ctx_error = err.get("ctx", {}).get("error")
        if isinstance(ctx_error, _KeyError):
            items.append((_parse_key_path(ctx_error.cause), ctx_error.text(named)))
            continue
        if isinstance(ctx_error, _KeyErrors):
            items += [(_parse_key_path(e.cause), e.text(named)) for e in ctx_error.errors]
            continue
        kind = err["type"]
        if kind == "extra_forbidden":
            key = str(loc[-1])
            close = difflib.get_close_matches(key, _known_keys(loc), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            items.append((loc, f"{path}: unknown key{hint}"))
            continue
        if kind in _MAPPING_ERRORS:
            # Never the value: ``fly: <the token>`` is a mistake someone makes.
            found = _kind(err.get("input"))
            items.append((loc, f"{path}: expected a mapping of keys (key: value), got {found}"))
            continue
        msg = str(err["msg"]).removeprefix("Value error, ")
        if kind != "value_error":  # pydantic's own ("Input should be ..."), as ours read
            msg = msg[:1].lower() + msg[1:]
        if kind == "value_error" or "got " in msg:
            items.append((loc, f"{path}: {msg}{_yaml_bool_hint(err)}"))
            continue
        if kind == "missing":
            items.append((loc, f"{path}: required key is missing"))
            continue
        text = f"{path}: {msg}, got {_shown(loc, err)}"
        items.append((loc, text + _yaml_bool_hint(err)))
    return items


def _yaml_bool_hint(err: Any) -> str:
    """For a number given as true or false (``_Model._no_true_for_a_number`` passes it on
    as text): where that came from, and how to leave a setting off."""
    if err.get("input") not in ("true", "false"):
        return ""
    return (
        " (YAML reads yes, no, on and off as true and false: give a number, or leave the key"
        " out for its default)"
    )


def _shown(loc: KeyPath, err: Any) -> str:
    """The value an error was about, as its message may show it: a secret's never, a list
    or a mapping only by kind (either may hold one)."""
    if any(isinstance(p, str) and (p in _SECRET_FIELDS or "token" in p) for p in loc):
        return "<redacted>"
    value = err.get("input")
    if value is None or isinstance(value, dict | list | tuple):
        return _kind(value)
    return repr(value)


def _kind(value: object) -> str:
    if value is None:
        return "nothing (an empty value: give one, or leave the key out)"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__


_KEY_PART_RE = re.compile(r"\[(\d+)\]|([^.\[\]]+)")


def _parse_key_path(path: str) -> KeyPath:
    """``apps[1].name`` as ``("apps", 1, "name")``."""
    return tuple(int(index) if index else name for index, name in _KEY_PART_RE.findall(path))


@dataclass(frozen=True)
class _Origin:
    """Where the value of a key path came from, as an error line starts: the command line
    (the flag that set it, when ``flags`` names one), an environment variable, or the file
    (with the key's line when the file has it)."""

    file: Path
    lines: Mapping[KeyPath, int]
    env_vars: Mapping[str, str]
    overrides: Mapping[str, Any]
    environ: Mapping[str, str]
    flags: Mapping[str, str]

    def line(self, loc: KeyPath, text: str) -> str:
        """The error line of ``text`` (``key.path: what``) about the value at ``loc``: after
        where it came from; a flag's said as typed (``--listen: what``: the key path the
        flag sets is left out, a key path within it or another's kept)."""
        flag = self._flag(loc)
        if flag is None:
            return f"{self.where(loc)}: {text}"
        depth, name = flag
        # An item of a list that a repeated flag gave (`--app web=100000`) is named by the
        # item's name, the key path within it kept: `--app web: machines: ...`.
        if len(loc) > depth and isinstance(loc[depth], int):
            item = _value_at(self.overrides, loc[: depth + 1])
            if isinstance(item, Mapping):
                head = f"{_key_path(loc[: depth + 1])}."
                return f"{name} {item.get('name', loc[depth])}: {text.removeprefix(head)}"
        return f"{name}: {text.removeprefix(f'{_key_path(loc[:depth])}: ')}"

    def where(self, loc: KeyPath) -> str:
        given = self._given(loc)
        if given is not None:
            return given
        line = self._file_line(loc)
        return str(self.file) if line is None else f"{self.file}:{line}"

    def order(self, loc: KeyPath) -> tuple[int, int]:
        """Where the error line about ``loc`` goes among the others: the command line's and
        the environment's first, then the file's by line (as an editor lists them), then
        those the file has no line for."""
        if self._given(loc) is not None:
            return (0, 0)
        line = self._file_line(loc)
        return (2, 0) if line is None else (1, line)

    def _file_line(self, loc: KeyPath) -> int | None:
        """The file's line of the key path, or of the nearest section holding it."""
        for i in range(len(loc), 0, -1):
            line = self.lines.get(loc[:i])
            if line is not None:
                return line
        return None

    def named(self, loc: KeyPath) -> str:
        """Where the value of a second key an error line is about came from, as the line
        says it after the value: its own file line (not its section's: a default in a
        section the file has is no value of the file), or its default."""
        flag = self._flag(loc)
        if flag is not None:
            return f" from {flag[1]}"
        given = self._given(loc)
        if given == "command line":
            return " from the command line"
        if given is not None:
            return f" from {given}"
        line = self.lines.get(loc)
        return f" at {self.file}:{line}" if line is not None else ", its default"

    def _flag(self, loc: KeyPath) -> tuple[int, str] | None:
        """The flag that set the value at ``loc`` (or a section or list holding it, at
        ``loc[:depth]``), as ``(depth, flag)``, if the command line's was one ``flags``
        names."""
        if not _within(self.overrides, loc):
            return None
        for i in range(len(loc), 0, -1):
            flag = self.flags.get(_key_path(loc[:i]))
            if flag is not None:
                return i, flag
        return None

    def _given(self, loc: KeyPath) -> str | None:
        """The command line or the environment variable that set the key path, if one did."""
        if _within(self.overrides, loc):
            return "command line"
        names = {name.upper() for name in self.env_vars}
        head: list[str] = []
        for part in loc:
            if not isinstance(part, str):
                break
            head.append(part.upper())
        for i in range(len(head), 0, -1):
            name = "AUTOSCALER_" + "__".join(head[:i])
            if name in names:
                return f"environment: {name}"
        token_vars = {("fly", "token"): TOKEN_ENV, ("emulator", "token"): EMULATOR_TOKEN_ENV}
        var = token_vars.get(tuple(loc[:2]))  # type: ignore[arg-type]
        if var is not None and self.environ.get(var):
            return f"environment: {var}"
        return None


def origin(file: Path, loc: KeyPath, env: Mapping[str, str] | None = None) -> str:
    """Where the value at ``loc`` came from, as a configuration error line starts
    (``file:line``, ``environment: VARIABLE``), for a problem found after the load (an
    app or a token the Machines API refuses, in check-config): the file's key lines are
    read again (none if it cannot be read now: the file alone is named then). The command
    line is not known here: for the commands without settings flags."""
    environ = os.environ if env is None else env
    lines: Mapping[KeyPath, int] = {}
    if file.exists():
        with contextlib.suppress(ConfigError):
            _, lines = read_yaml(file)
    return _Origin(file, lines, _setting_vars(environ), {}, environ, {}).where(loc)


def _setting_vars(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment's ``AUTOSCALER_*`` variables that are settings (all but the
    config file's name)."""
    env_vars = {k: v for k, v in environ.items() if k.upper().startswith("AUTOSCALER_")}
    env_vars.pop(CONFIG_ENV, None)
    return env_vars


def _within(data: Mapping[str, Any], loc: KeyPath) -> bool:
    """Whether ``data`` (the command line's settings) holds the key path."""
    return bool(loc) and _value_at(data, loc) is not _ABSENT


_ABSENT = object()


def _value_at(data: Mapping[str, Any], loc: KeyPath) -> Any:
    """The value at the key path in ``data`` (the command line's settings), or _ABSENT."""
    node: Any = data
    for part in loc:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]  # an item of a list the command line gave (emulator --app)
        else:
            return _ABSENT
    return node


def _not_json(exc: SettingsError, env_vars: Mapping[str, str]) -> str:
    """pydantic-settings could not decode a variable as JSON, and names only its section:
    the line names the variables of that section that set a list or a mapping with
    something other than JSON."""
    names = []
    for name, value in env_vars.items():
        parts = name.upper().removeprefix("AUTOSCALER_").lower().split("__")
        model: Any = Settings
        annotation: Any = None
        for part in parts:
            field = getattr(model, "model_fields", {}).get(part)
            if field is None:
                annotation = None
                break
            annotation = model = field.annotation
        if annotation is None or not _structured(annotation):
            continue
        try:
            json.loads(value)
        except ValueError:
            names.append(name.upper())
    where = ", ".join(sorted(names)) or str(exc)
    return (
        f"environment: {where}: expected JSON: a list or a section set by one variable is"
        """ JSON (AUTOSCALER_PROXY__TRUSTED_PROXIES='["10.0.0.1"]')"""
    )


def _structured(annotation: Any) -> bool:
    """Whether a field holds a list, a mapping or a section (set from a variable as JSON)."""
    if isinstance(annotation, type):
        return issubclass(annotation, BaseModel | list | dict | tuple)
    origin = typing.get_origin(annotation)
    if origin in (list, dict, tuple):
        return True
    return any(_structured(arg) for arg in typing.get_args(annotation) if arg is not type(None))
