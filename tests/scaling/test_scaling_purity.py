"""autoscaler.scaling stays pure: no clock, no randomness, no I/O, no event loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import autoscaler.scaling

PACKAGE = Path(autoscaler.scaling.__file__).parent
FORBIDDEN_MODULES = {
    "asyncio",
    "aiohttp",
    "httpx",
    "structlog",
    "prometheus_client",
    "time",
    "random",
    "socket",
    "subprocess",
    "os",
    "pathlib",
    "datetime",
    "logging",
    "autoscaler.logs",
    "autoscaler.metrics",
    "autoscaler.control",
    "autoscaler.proxy",
    "autoscaler.fly",
}
FORBIDDEN_CALLS = {"open", "print", "input", "exec", "eval", "__import__"}
MODULES = sorted(PACKAGE.glob("*.py"))


def _imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def _forbidden(name: str) -> bool:
    return any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN_MODULES)


def test_the_package_has_its_modules() -> None:
    assert {p.name for p in MODULES} >= {"fleet.py", "window.py", "policy.py"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_imports_nothing_impure(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bad = sorted(name for name in _imports(tree) if _forbidden(name))
    assert bad == [], f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_calls_no_io_builtins(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    calls = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert calls & FORBIDDEN_CALLS == set()


def test_the_checker_catches_a_forbidden_import() -> None:
    tree = ast.parse("import time\nfrom asyncio import sleep\nfrom os.path import join\n")
    assert sorted(n for n in _imports(tree) if _forbidden(n)) == ["asyncio", "os.path", "time"]
    assert not _forbidden("timeit_like_module")
