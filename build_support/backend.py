"""setuptools' build backend, asking for mypyc only when the build compiles.

``AUTOSCALER_COMPILE=1`` makes ``setup.py`` compile the data path; the isolated build
environment then needs mypy (which carries mypyc) and what the compiled modules import. A
plain install downloads none of it.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 - every hook not redefined here

# mypyc type-checks what it compiles, against the packages it imports (and mypy's plugin
# for pydantic): the build environment needs them too.
MYPYC = ("mypy>=2.4", "types-PyYAML>=6.0.12")
SETUP_REQUIRES_ONLY = "AUTOSCALER_SETUP_REQUIRES_ONLY"


def _requires(hook: Callable[[Any], list[str]], config_settings: Any) -> list[str]:
    compile_ = os.environ.get("AUTOSCALER_COMPILE", "").strip() not in ("", "0")
    # setuptools runs setup.py to collect its requirements, before mypy is there to import.
    os.environ[SETUP_REQUIRES_ONLY] = "1"
    try:
        required = hook(config_settings)
    finally:
        del os.environ[SETUP_REQUIRES_ONLY]
    if not compile_:
        return required
    with open("pyproject.toml", "rb") as f:
        runtime = tomllib.load(f)["project"]["dependencies"]
    return [*required, *MYPYC, *runtime]


def get_requires_for_build_wheel(config_settings: Any = None) -> list[str]:
    return _requires(_setuptools.get_requires_for_build_wheel, config_settings)


def get_requires_for_build_editable(config_settings: Any = None) -> list[str]:
    return _requires(_setuptools.get_requires_for_build_editable, config_settings)
