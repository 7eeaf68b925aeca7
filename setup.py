"""Optional native build of the proxy's data path and the policy, with mypyc.

``AUTOSCALER_COMPILE=1 pip install .`` compiles the modules every proxied request runs
through, the policy and the simulator's replay loop into C extensions (mypyc, the compiler
mypy and black ship with); the proxy then runs about half the instructions per request, and
``autoscaler simulate`` replays 1.7-1.8 times as fast (docs/benchmarks.md). Without it the
package is pure Python; the code is the same either way, and so is the behaviour (CI runs
the whole suite on both builds). Compiling needs a C compiler and the Python headers.
"""

from __future__ import annotations

import os

from setuptools import setup

# The data path: what each request runs through (the proxy, the fleet view and load meter
# it updates, its log line and metrics); then the policy and the simulator's loop around
# it. Nothing that is only configuration, the rest of the control plane or tooling. Each
# call from compiled code into an interpreted function costs one to three thousand
# instructions (docs/benchmarks.md), so what a hot loop calls is compiled with it.
COMPILED = [
    "autoscaler/control/view.py",
    "autoscaler/logs.py",
    "autoscaler/metrics.py",
    "autoscaler/proxy/accounting.py",
    "autoscaler/proxy/balancer.py",
    "autoscaler/proxy/body.py",
    "autoscaler/proxy/forward.py",
    "autoscaler/proxy/gate.py",
    "autoscaler/proxy/h1.py",
    "autoscaler/proxy/routing.py",
    "autoscaler/proxy/server.py",
    "autoscaler/proxy/upstream.py",
    "autoscaler/scaling/window.py",
    # The policy, which every control tick asks, and the simulator's replay loop, which
    # asks it for every simulated tick: a day of 100 apps is some 200,000 decisions.
    "autoscaler/scaling/fleet.py",
    "autoscaler/scaling/keepalive.py",
    "autoscaler/scaling/policy.py",
    "autoscaler/sim/engine.py",
    "autoscaler/sim/model.py",
    "autoscaler/sim/ours.py",
]


def _compile() -> bool:
    if os.environ.get("AUTOSCALER_SETUP_REQUIRES_ONLY"):
        return False  # build_support/backend.py is asking what to install (mypy comes next)
    return os.environ.get("AUTOSCALER_COMPILE", "").strip() not in ("", "0")


ext_modules = []
if _compile():
    from mypyc.build import mypycify

    # One shared library for the group, kept inside the package (not at the top level,
    # where an editable install would not find it).
    ext_modules = mypycify(COMPILED, opt_level="3", group_name="autoscaler.proxy.compiled")

setup(ext_modules=ext_modules)
