"""The dependency direction of docs/architecture.md, read from the imports themselves (ast).

Layers, lowest first; a module may import its own package, anything in a lower layer, and
the side modules (``aio``, ``children``, ``logs``, ``metrics``), never a higher layer.
``scaling`` is pure.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autoscaler"

# (prefix, layer). The longest matching prefix wins.
LAYERS: list[tuple[str, int]] = [
    ("autoscaler.config", 0),
    ("autoscaler.tui", 0),  # rendering only: plain data in, rich renderables out
    ("autoscaler.fly.errors", 0),
    ("autoscaler.fly.models", 1),
    ("autoscaler.checks", 1),  # Fly machine checks: the emulator runs them, so does control
    ("autoscaler.scaling", 2),
    ("autoscaler.fly", 3),
    ("autoscaler.state", 3),  # cluster mode's shared state (Redis): below control and proxy
    ("autoscaler.control", 4),
    ("autoscaler.proxy", 5),
    ("autoscaler.admin", 6),
    ("autoscaler.status", 6),
    ("autoscaler.service", 7),
    ("autoscaler.demo_view", 7),  # what the demo shows; reads the service through callables
    ("autoscaler.demo", 8),  # the demo drives a Service
    ("autoscaler.check", 8),
    ("autoscaler.workers", 8),  # run --workers: supervises `autoscaler run` processes
    ("autoscaler.cli", 9),
    ("autoscaler.__main__", 10),
]
SIDE = {
    "autoscaler",
    "autoscaler.aio",
    "autoscaler.children",
    "autoscaler.logs",
    "autoscaler.metrics",
}
# Wings that could ship as tools of their own: what they may import of the package.
WINGS = {
    "autoscaler.emulator": (
        "autoscaler.config",
        "autoscaler.fly.models",
        "autoscaler.checks",
        "autoscaler.scaling",
    ),
    "autoscaler.sim": ("autoscaler.config", "autoscaler.fly.models", "autoscaler.scaling"),
}
PURE_FORBIDDEN = (
    "asyncio", "aiohttp", "httpx", "structlog", "prometheus_client", "time", "random",
    "socket", "subprocess", "threading", "autoscaler.logs", "autoscaler.metrics",
)  # fmt: skip
ONLY_IMPORTER = {"httpx": "autoscaler.fly.client"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer(name: str) -> int | None:
    best: tuple[int, int] | None = None
    for prefix, level in LAYERS:
        if within(name, prefix) and (best is None or len(prefix) > best[0]):
            best = (len(prefix), level)
    return None if best is None else best[1]


def package_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2])


MODULES = sorted(PACKAGE.rglob("*.py"))


def layer_problems(path: Path, me: str) -> list[str]:
    """What is wrong with the imports of the file at ``path``, as module ``me``."""
    wing = next((w for w in WINGS if within(me, w)), None)
    problems = []
    if me not in SIDE and wing is None and layer(me) is None:
        problems.append(f"{me} is in no layer: add it to LAYERS in {Path(__file__).name}")
    for target in imports(path):
        if not within(target, "autoscaler") or target in SIDE:
            continue
        if any(within(target, side) for side in SIDE - {"autoscaler"}):
            continue  # aio, logs and metrics serve every layer
        if within(target, package_of(me)) and package_of(me) != "autoscaler":
            continue  # inside its own package
        if within(target, "autoscaler.cli") and me != "autoscaler.__main__":
            problems.append(f"{me} imports {target}: nothing imports cli")
        elif me in SIDE and me != "autoscaler":
            problems.append(f"side module {me} imports the domain ({target})")
        elif wing is not None:
            if not any(within(target, allowed) for allowed in WINGS[wing]):
                problems.append(f"{me} imports {target}: {wing} may import only {WINGS[wing]}")
        else:
            mine, theirs = layer(me), layer(target)
            if theirs is not None and mine is not None and theirs >= mine:
                problems.append(f"{me} (layer {mine}) imports {target} (layer {theirs})")
            if any(within(target, w) for w in WINGS) and me not in (
                "autoscaler.service", "autoscaler.demo", "autoscaler.cli",
            ):  # fmt: skip
                problems.append(f"{me} imports the wing {target}")
    return problems


def impurities(path: Path) -> list[str]:
    """What a module of the pure core imports that it must not."""
    return [t for t in imports(path) if any(within(t, f) for f in PURE_FORBIDDEN)]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_follow_the_layers(path: Path) -> None:
    assert layer_problems(path, module_name(path)) == []


@pytest.mark.parametrize(
    "path",
    [p for p in MODULES if within(module_name(p), "autoscaler.scaling")],
    ids=lambda p: module_name(p),
)
def test_scaling_is_pure(path: Path) -> None:
    assert impurities(path) == [], f"{module_name(path)} must stay pure"


def test_httpx_has_one_importer() -> None:
    for lib, owner in ONLY_IMPORTER.items():
        users = {module_name(p) for p in MODULES if any(within(t, lib) for t in imports(p))}
        assert users <= {owner}, f"only {owner} may import {lib}: {sorted(users)}"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The checks above can fail: the same functions, on files that break the rules."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import asyncio\n"
        "from autoscaler.proxy import server\n"
        "from autoscaler.cli import main\n"
        "from autoscaler.emulator import Emulator\n"
    )
    assert layer_problems(bad, "autoscaler.scaling.bad") == [
        "autoscaler.scaling.bad (layer 2) imports autoscaler.proxy (layer 5)",
        "autoscaler.scaling.bad (layer 2) imports autoscaler.proxy.server (layer 5)",
        "autoscaler.scaling.bad imports autoscaler.cli: nothing imports cli",
        "autoscaler.scaling.bad imports autoscaler.cli.main: nothing imports cli",
        "autoscaler.scaling.bad imports the wing autoscaler.emulator",
        "autoscaler.scaling.bad imports the wing autoscaler.emulator.Emulator",
    ]
    assert impurities(bad) == ["asyncio"]
    assert layer_problems(bad, "autoscaler.nowhere")[0].startswith("autoscaler.nowhere is in no")
    wing = tmp_path / "wing.py"
    wing.write_text("from autoscaler.control import view\n")
    (problem,) = [p for p in layer_problems(wing, "autoscaler.sim.bad") if "view" not in p]
    assert problem.startswith("autoscaler.sim.bad imports autoscaler.control: autoscaler.sim may")
    side = tmp_path / "side.py"
    side.write_text("from autoscaler.config import Settings\n")
    assert layer_problems(side, "autoscaler.metrics")[0].startswith(
        "side module autoscaler.metrics"
    )


# asyncio.wait_for drops a cancellation on Python 3.11 when what it waits for ends in the
# same turn of the loop (autoscaler/aio.py): a task stopped there carries on. Waits with a
# deadline use asyncio.timeout. A module that must keep one goes here, with the reason
# carrying on does no harm there.
WAIT_FOR_ALLOWED: dict[str, str] = {}


def wait_for_calls(path: Path) -> int:
    tree = ast.parse(path.read_text(), filename=str(path))
    return sum(
        1
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "wait_for"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "asyncio"
    ) + sum(
        1
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and node.module == "asyncio"
        and any(alias.name == "wait_for" for alias in node.names)
    )


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_asyncio_wait_for_where_a_dropped_cancellation_matters(path: Path) -> None:
    if module_name(path) in WAIT_FOR_ALLOWED:
        return
    assert wait_for_calls(path) == 0, "use asyncio.timeout (see autoscaler/aio.py)"


def test_the_wait_for_allowlist_is_current() -> None:
    for name in WAIT_FOR_ALLOWED:
        path = PACKAGE.parent / (name.replace(".", "/") + ".py")
        assert wait_for_calls(path) > 0, f"{name} no longer uses wait_for: drop it from the list"


# Awaiting a cancelled task under suppress(CancelledError) also swallows a cancellation of
# the awaiting task itself, which arrives as the same exception (a second SIGTERM cutting a
# stop short): the stop goes on as if none had come. Stops use aio.cancel_and_wait. A
# function that must keep one goes here, with the reason no cancellation of its own is lost.
SUPPRESSED_AWAIT_ALLOWED: dict[str, str] = {
    "autoscaler.service.Service.run": (
        "the stop it awaits is cancelled on purpose by the second SIGTERM (stopped_at_once);"
        " run's own task is the process's main task, which nothing cancels meanwhile (the"
        " loop's SIGINT handler stands in for asyncio.run's)"
    ),
}


def _suppresses_cancelled(item: ast.withitem) -> bool:
    call = item.context_expr
    if not isinstance(call, ast.Call):
        return False
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name == "suppress" and any(
        (isinstance(arg, ast.Attribute) and arg.attr == "CancelledError")
        or (isinstance(arg, ast.Name) and arg.id == "CancelledError")
        for arg in call.args
    )


def _awaits(nodes: list[ast.stmt]) -> bool:
    """Whether ``nodes`` await, not counting the functions they define."""
    todo: list[ast.AST] = list(nodes)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Await | ast.AsyncFor | ast.AsyncWith):
            return True
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            todo.extend(ast.iter_child_nodes(node))
    return False


def suppressed_awaits(path: Path) -> list[str]:
    """The functions of the file at ``path`` that await under suppress(CancelledError)."""
    found: list[str] = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = f"{scope}.{child.name}"
            elif (
                isinstance(child, ast.With | ast.AsyncWith)
                and any(_suppresses_cancelled(item) for item in child.items)
                and _awaits(child.body)
            ):
                found.append(f"{scope}:{child.lineno}")
            visit(child, inner)

    visit(ast.parse(path.read_text(), filename=str(path)), module_name(path))
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_await_under_suppress_cancelled_error(path: Path) -> None:
    found = [f for f in suppressed_awaits(path) if f.split(":")[0] not in SUPPRESSED_AWAIT_ALLOWED]
    assert found == [], "use aio.cancel_and_wait: it lets a cancellation of the stop through"


def test_the_suppressed_await_allowlist_is_current() -> None:
    for name in SUPPRESSED_AWAIT_ALLOWED:
        module = name
        while not (PACKAGE.parent / (module.replace(".", "/") + ".py")).exists():
            module = module.rpartition(".")[0]
        path = PACKAGE.parent / (module.replace(".", "/") + ".py")
        assert any(f.split(":")[0] == name for f in suppressed_awaits(path)), (
            f"{name} no longer awaits under suppress(CancelledError): drop it from the list"
        )


# config.py reads the settings: the file and the environment's AUTOSCALER_*, FLY_API_TOKEN
# and EMULATOR_TOKEN (its docstring). A module that reads the environment for anything else
# goes here, with what it reads; one that reads a setting should ask config.py instead
# (check-config named a token's and the apps' origins from its own reading of the
# environment; config.origin says it now, as config errors do).
ENVIRON_READERS: dict[str, str] = {
    "autoscaler.config": "the settings",
    "autoscaler.cli": "hands it whole to `autoscaler emulator`, which loads through config.py",
    "autoscaler.service": "under run --workers, the worker's index and the file naming the"
    " worker that speaks (WORKER_ENV, SPEAKER_ENV): not settings",
    "autoscaler.workers": "hands it on to the workers, with their own variables added",
    "autoscaler.emulator.machines": "hands it on to the machines' processes, as Fly gives",
    "autoscaler.emulator.demo_app": "a machine's program: what Fly gives a machine (PORT, ...)",
}


def environ_reads(path: Path) -> int:
    """How often the file at ``path`` reads the environment (``os.environ``, ``os.getenv``,
    or either imported from os)."""
    names = {"environ", "environb", "getenv", "getenvb"}
    tree = ast.parse(path.read_text(), filename=str(path))
    return sum(
        1
        for node in ast.walk(tree)
        if (
            isinstance(node, ast.Attribute)
            and node.attr in names
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        )
        or (
            isinstance(node, ast.ImportFrom)
            and node.module == "os"
            and any(alias.name in names for alias in node.names)
        )
    )


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_only_config_reads_the_settings_from_the_environment(path: Path) -> None:
    if module_name(path) in ENVIRON_READERS:
        return
    assert environ_reads(path) == 0, (
        "a setting is read by config.py (load_settings, and origin for where it came from);"
        " anything else: add the module to ENVIRON_READERS with what it reads"
    )


def test_the_environ_reader_list_is_current() -> None:
    for name in ENVIRON_READERS:
        path = PACKAGE.parent / (name.replace(".", "/") + ".py")
        assert environ_reads(path) > 0, f"{name} no longer reads the environment: drop it"
