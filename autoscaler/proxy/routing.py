"""Host (and optional path prefix) → app.

Built once per configuration (and again on reload), then read on every request, so the
lookups are dict hits: exact host names first, then ``*.domain`` wildcards from the most
specific suffix down, then the default app. Within one host, the longest matching path
prefix wins; an app without ``paths`` takes every path of its hosts.
"""

from __future__ import annotations

from collections.abc import Iterable

from autoscaler.config import AppConfig

# (prefix, app) pairs of one host, longest prefix first.
_Routes = list[tuple[str, AppConfig]]


def normalize_host(host: str) -> str:
    """The name in a Host header: lower case, without port or trailing dot."""
    text = host.strip().lower()
    if text.startswith("["):  # IPv6 literal, "[::1]:8080"
        end = text.find("]")
        return text[: end + 1] if end != -1 else text
    name, _, _port = text.partition(":")
    return name.rstrip(".")


def _prefix_match(path: str, prefix: str) -> bool:
    """``/api`` matches ``/api``, ``/api/x`` and ``/api?q``, not ``/apix``."""
    if prefix == "/" or path == prefix:
        return True
    if not path.startswith(prefix):
        return False
    if prefix.endswith("/"):
        return True
    return path[len(prefix)] in "/?"


class Router:
    """Routing table of one configuration."""

    def __init__(self, apps: Iterable[AppConfig], default_app: str | None = None) -> None:
        self._exact: dict[str, _Routes] = {}
        self._wildcard: dict[str, _Routes] = {}  # key: the suffix after "*."
        self._default: AppConfig | None = None
        for app in apps:
            for host in app.hosts:
                table, key = (
                    (self._wildcard, host[2:]) if host.startswith("*.") else (self._exact, host)
                )
                routes = table.setdefault(key, [])
                for prefix in app.paths or ["/"]:
                    routes.append((prefix, app))
            if app.name == default_app:
                self._default = app
        for table in (self._exact, self._wildcard):
            for routes in table.values():
                routes.sort(key=lambda item: len(item[0]), reverse=True)

    def route(self, host: str | None, path: str) -> AppConfig | None:
        """The app for a request's Host header and raw path, or None (404)."""
        name = normalize_host(host) if host else ""
        routes = self._exact.get(name)
        if routes is not None:
            found = _pick(routes, path)
            if found is not None:
                return found
        # "*.example.com" covers a.example.com and a.b.example.com, not example.com itself.
        dot = name.find(".")
        while dot != -1:
            routes = self._wildcard.get(name[dot + 1 :])
            if routes is not None:
                found = _pick(routes, path)
                if found is not None:
                    return found
            dot = name.find(".", dot + 1)
        return self._default


def _pick(routes: _Routes, path: str) -> AppConfig | None:
    for prefix, app in routes:
        if _prefix_match(path, prefix):
            return app
    return None
