"""The optional compiled build: setup.py's module list and the build backend's requirements.

CI builds it for real (.ci/run) and runs the whole suite on it; these check the pieces a
plain install goes through, without a compiler.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def backend() -> ModuleType:
    return _load(ROOT / "build_support" / "backend.py", "autoscaler_build_backend")


def test_compiled_modules_exist_and_take_in_the_proxy() -> None:
    tree = ast.parse((ROOT / "setup.py").read_text())
    (listed,) = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "COMPILED"
    ]
    assert listed, "setup.py lists no module"
    for path in listed:
        assert (ROOT / path).is_file(), path
    # The data path: the proxy, and what it calls on every request.
    assert {"autoscaler/proxy/server.py", "autoscaler/control/view.py"} <= set(listed)


def test_a_plain_build_asks_for_nothing_more(
    backend: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AUTOSCALER_COMPILE", raising=False)
    assert backend._requires(lambda settings: ["wheel"], None) == ["wheel"]
    monkeypatch.setenv("AUTOSCALER_COMPILE", "0")
    assert backend._requires(lambda settings: [], None) == []


def test_a_compiled_build_asks_for_mypy_and_what_the_modules_import(
    backend: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("AUTOSCALER_COMPILE", "1")
    seen = []

    def hook(settings: object) -> list[str]:
        # setuptools runs setup.py here: it must not try to compile yet.
        seen.append(os.environ.get(backend.SETUP_REQUIRES_ONLY))
        return ["wheel"]

    required = backend._requires(hook, None)
    runtime = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert required[0] == "wheel"
    assert any(r.startswith("mypy>=") for r in required)
    assert set(runtime) <= set(required)
    assert seen == ["1"]
    assert backend.SETUP_REQUIRES_ONLY not in os.environ
