"""Host and path-prefix routing, as a table."""

from __future__ import annotations

import pytest

from autoscaler.config import AppConfig
from autoscaler.proxy.routing import Router, normalize_host

APPS = [
    AppConfig(name="web", hosts=["example.com", "www.example.com"]),
    AppConfig(name="api", hosts=["example.com"], paths=["/api", "/v2/"]),
    AppConfig(name="tenants", hosts=["*.example.com"]),
    AppConfig(name="deep", hosts=["*.eu.example.com"]),
    AppConfig(name="fallback", hosts=["other.test"]),
]


@pytest.mark.parametrize(
    ("host", "path", "app"),
    [
        ("example.com", "/", "web"),
        ("EXAMPLE.com:8080", "/x", "web"),
        ("example.com.", "/x", "web"),
        ("example.com", "/api", "api"),
        ("example.com", "/api/users?x=1", "api"),
        ("example.com", "/api?x=1", "api"),
        ("example.com", "/apix", "web"),
        ("example.com", "/v2/things", "api"),
        ("example.com", "/v2", "web"),
        ("www.example.com", "/api", "web"),
        ("a.example.com", "/", "tenants"),
        ("a.b.example.com", "/", "tenants"),
        ("x.eu.example.com", "/", "deep"),
        ("unknown.test", "/", None),
        ("", "/", None),
        ("[::1]:8080", "/", None),
    ],
)
def test_route(host: str, path: str, app: str | None) -> None:
    found = Router(APPS).route(host, path)
    assert (found.name if found else None) == app


def test_default_app_takes_unknown_hosts() -> None:
    router = Router(APPS, default_app="fallback")
    found = router.route("nobody.test", "/")
    assert found is not None
    assert found.name == "fallback"
    found = router.route(None, "/")
    assert found is not None
    assert found.name == "fallback"


def test_normalize_host() -> None:
    assert normalize_host("[::1]:80") == "[::1]"
    assert normalize_host("Host.Example:443") == "host.example"
