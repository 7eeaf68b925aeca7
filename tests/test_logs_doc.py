"""docs/logs.md's table of log events stays true to the code.

The package's source is read with ``ast``. Its loggers are the names that hold
``get_logger(...)`` (a module's ``_log`` or ``log``, a class's ``self._log``, a local), and
what ``.bind()`` or ``.new()`` makes of them. Their events are the calls of a level method:
``_log.info("event", ...)``, ``_log.exception(...)`` (error, with a traceback),
``_log.log(logging.INFO, "event")``, a level chosen in the call
(``(_log.warning if trouble else _log.info)("fly_api")``) or earlier
(``log = _log.debug if get else _log.info``), and every ``EventLine(logger, event, keys)``.
An event name or a level held in a variable is followed to the values it can take: a local
assigned from constants (``event = "a" if again else "b"``), or a parameter, through each
call of its function in the same module (``self._ended(logging.INFO, "action_done", ...)``,
whose keywords that land in ``**extra`` are the line's fields too).

Any other use of a logger fails the test: passed on, returned, imported from another module,
a method that is not a level, an event the scanner cannot follow, ``structlog`` or the
standard library's loggers used outside ``autoscaler/logs.py``. Such a use is a way to log
that the table cannot be checked against, so teach the scanner about it. ``autoscaler/logs.py``
is not scanned: its loggers write the events that their callers name (``EventLine``).

``python tests/test_logs_doc.py`` prints the rows that the table lacks, as the code implies
them (with the call sites in place of a meaning).
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "autoscaler"
DOC = REPO / "docs" / "logs.md"
NOT_SCANNED = {PACKAGE / "logs.py"}  # the set-up itself (module docstring)

METHODS = {
    "debug": "debug",
    "info": "info",
    "warning": "warning",
    "error": "error",
    "exception": "error",  # with the traceback, as the field `exception`
    "critical": "critical",
}
STDLIB_LEVELS = {
    "DEBUG": "debug",
    "INFO": "info",
    "WARNING": "warning",
    "ERROR": "error",
    "CRITICAL": "critical",
}
BINDS = {"bind", "new"}
Function = ast.FunctionDef | ast.AsyncFunctionDef


class Unhandled(Exception):
    """A way of logging the scanner cannot follow."""


@dataclass(frozen=True)
class Emit:
    """One event a call site can write."""

    logger: str
    event: str
    level: str
    fields: frozenset[str]
    open_fields: bool  # a ** argument whose keys are not all known: more fields may come
    where: str


@dataclass(frozen=True)
class _Logger:
    name: str
    bound: frozenset[str] = frozenset()
    open_fields: bool = False


@dataclass
class _Scope:
    """What the names of one function (or of the module) hold, as far as logging goes."""

    parent: _Scope | None
    loggers: dict[str, _Logger] = field(default_factory=dict)
    methods: dict[str, list[tuple[_Logger, str]]] = field(default_factory=dict)
    strings: dict[str, ast.expr] = field(default_factory=dict)
    dicts: dict[str, ast.Dict] = field(default_factory=dict)
    others: set[str] = field(default_factory=set)  # locals (and parameters) of no interest
    params: list[str] = field(default_factory=list)
    kwargs: str | None = None

    def find(self, name: str) -> _Scope | None:
        """The scope ``name`` belongs to (an inner one's own local or parameter hides it)."""
        scope: _Scope | None = self
        while scope is not None:
            for names in (scope.loggers, scope.methods, scope.strings, scope.dicts):
                if name in names:
                    return scope
            if name in scope.others or name in scope.params:
                return scope
            scope = scope.parent
        return None


class _ModuleScan:
    def __init__(self, path: Path, text: str | None = None) -> None:
        self.rel = path.relative_to(REPO).as_posix()
        self.module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        self.module = self.module.removesuffix(".__init__")
        self.tree = ast.parse(path.read_text() if text is None else text, str(path))
        self.parents: dict[int, ast.AST] = {}
        self.nodes: list[ast.AST] = [self.tree]  # every node, parents before children
        for node in self.nodes:  # (it grows as it goes)
            for child in ast.iter_child_nodes(node):
                self.parents[id(child)] = node
                self.nodes.append(child)
        self.self_loggers: dict[str, _Logger] = {}  # self.<attr> (or a class attribute)
        self.scopes: dict[int, _Scope] = {}  # by id of the function (or module) node
        self.functions: dict[str, list[Function]] = {}
        self.consumed: set[int] = set()  # ids of nodes that a recognised use accounts for
        self.emits: list[Emit] = []

    def fail(self, node: ast.AST, why: str) -> Unhandled:
        line = getattr(node, "lineno", 0)
        return Unhandled(f"{self.rel}:{line}: {why}: {ast.unparse(node)}")

    # --- what an expression is ------------------------------------------------------

    def get_logger_call(self, node: ast.AST) -> _Logger | None:
        if not isinstance(node, ast.Call):
            return None
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if name != "get_logger":
            return None
        arg = node.args[0] if node.args else None
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return _Logger(arg.value)
        if isinstance(arg, ast.Name) and arg.id == "__name__":
            return _Logger(self.module)
        raise self.fail(node, "a logger whose name is not a constant")

    def logger_of(self, node: ast.expr, scope: _Scope) -> _Logger | None:
        if isinstance(node, ast.Name):
            owner = scope.find(node.id)
            return owner.loggers.get(node.id) if owner is not None else None
        if isinstance(node, ast.Attribute) and _is_self(node.value):
            return self.self_loggers.get(node.attr)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in BINDS
        ):
            base = self.logger_of(node.func.value, scope)
            if base is None:
                return None
            self.consumed.add(id(node.func))
            fields, open_fields = self.keywords(node, scope)
            if node.func.attr == "new":  # drops what was bound before
                return _Logger(base.name, fields, open_fields)
            return _Logger(base.name, base.bound | fields, base.open_fields or open_fields)
        return None

    def methods_of(self, node: ast.expr, scope: _Scope) -> list[tuple[_Logger, str]] | None:
        """The (logger, method) pairs ``node`` can be, when it is a level method."""
        if isinstance(node, ast.Attribute) and node.attr in {*METHODS, "log"}:
            logger = self.logger_of(node.value, scope)
            if logger is None:
                return None
            self.consumed.add(id(node))
            return [(logger, node.attr)]
        if isinstance(node, ast.IfExp):
            body = self.methods_of(node.body, scope)
            orelse = self.methods_of(node.orelse, scope)
            return body + orelse if body is not None and orelse is not None else None
        if isinstance(node, ast.Name):
            owner = scope.find(node.id)
            if owner is not None and node.id in owner.methods:
                self.consumed.add(id(node))
                return owner.methods[node.id]
        return None

    def keywords(self, call: ast.Call, scope: _Scope) -> tuple[frozenset[str], bool]:
        """The fields a call's keywords carry, and whether a ** argument may add more."""
        names: set[str] = set()
        open_fields = False
        for kw in call.keywords:
            if kw.arg == "exc_info":
                names.add("exception")
            elif kw.arg is not None:
                names.add(kw.arg)
            elif isinstance(kw.value, ast.Name) and kw.value.id == scope.kwargs:
                pass  # the function's own **kwargs: its callers' keywords (contexts)
            else:
                value = kw.value
                owner = scope.find(value.id) if isinstance(value, ast.Name) else None
                if owner is not None and isinstance(value, ast.Name) and value.id in owner.dicts:
                    names |= {k for k in map(_str_value, owner.dicts[value.id].keys) if k}
                open_fields = True  # (a dict may be added to after it is made)
        return frozenset(names), open_fields

    def strings(self, node: ast.expr, scope: _Scope) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.IfExp):
            return self.strings(node.body, scope) + self.strings(node.orelse, scope)
        if isinstance(node, ast.Name):
            owner = scope.find(node.id)
            if owner is not None and node.id in owner.strings:
                return self.strings(owner.strings[node.id], owner)
        raise self.fail(node, "an event name the scanner cannot follow")

    def levels(self, node: ast.expr) -> list[str]:
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "logging"
            and node.attr in STDLIB_LEVELS
        ):
            return [STDLIB_LEVELS[node.attr]]
        if isinstance(node, ast.IfExp):
            return self.levels(node.body) + self.levels(node.orelse)
        raise self.fail(node, "a level the scanner cannot follow")

    # --- the walk -------------------------------------------------------------------

    def scan(self) -> list[Emit]:
        for node in self.nodes:
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                logger = self.get_logger_call(node.value)
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                in_class = isinstance(self.parents.get(id(node)), ast.ClassDef)
                for target in targets:
                    if logger is None:
                        break
                    if isinstance(target, ast.Attribute) and _is_self(target.value):
                        self.self_loggers[target.attr] = logger
                    elif isinstance(target, ast.Name) and in_class:
                        self.self_loggers[target.id] = logger  # read as self.<name>
                    elif not isinstance(target, ast.Name):
                        raise self.fail(node, "a logger kept where the scanner cannot see it")
            if isinstance(node, Function):
                self.functions.setdefault(node.name, []).append(node)
        self.fill(self.tree, None)
        for node in self.nodes:
            if isinstance(node, ast.Call):
                self.call(node)
        self.check_every_use_is_known()
        return self.emits

    def fill(self, node: ast.Module | Function, parent: _Scope | None) -> None:
        """The scope of ``node`` (and of the functions inside it): its locals in the order
        they are assigned."""
        scope = self.scopes[id(node)] = _Scope(parent)
        if not isinstance(node, ast.Module):
            args = node.args
            positional = [*args.posonlyargs, *args.args, *args.kwonlyargs]
            scope.params = [a.arg for a in [*positional, *filter(None, [args.vararg])]]
            scope.kwargs = args.kwarg.arg if args.kwarg is not None else None
            scope.params += [scope.kwargs] if scope.kwargs is not None else []
        inner: list[Function] = []
        for stmt in node.body:
            for child in _own_nodes(stmt, inner):
                self.assigned(child, scope)
        for func in inner:
            self.fill(func, scope)

    def assigned(self, node: ast.AST, scope: _Scope) -> None:
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            scope.others.add(node.id)  # a local (what its assignment held, if known, wins)
            return
        if not isinstance(node, ast.Assign | ast.AnnAssign) or node.value is None:
            return
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if len(targets) != 1 or not isinstance(targets[0], ast.Name):
            return
        name, value = targets[0].id, node.value
        logger = self.get_logger_call(value) or self.logger_of(value, scope)
        methods = self.methods_of(value, scope) if logger is None else None
        if logger is not None:
            scope.loggers[name] = logger
        elif methods is not None:
            scope.methods[name] = methods
        elif isinstance(value, ast.Dict):
            scope.dicts[name] = value
        elif _is_strings(value):
            scope.strings[name] = value

    def scope_of(self, node: ast.AST) -> _Scope:
        parent = self.parents.get(id(node))
        while parent is not None and not isinstance(parent, Function):
            parent = self.parents.get(id(parent))
        return self.scopes[id(parent if parent is not None else self.tree)]

    def call(self, call: ast.Call) -> None:
        if isinstance(call.func, ast.Name) and call.func.id == "EventLine":
            self.event_line(call)
            return
        scope = self.scope_of(call)
        methods = self.methods_of(call.func, scope)
        for logger, method in methods or []:
            if method == "log":
                level_node, event_node = call.args[0], call.args[1]
            else:
                level_node, event_node = None, call.args[0]
            fields, open_fields = self.keywords(call, scope)
            fields |= logger.bound | ({"exception"} if method == "exception" else set())
            open_fields = open_fields or logger.open_fields
            for events, levels, extra, where in self.contexts(call, scope, event_node, level_node):
                for event in events:
                    for level in levels or [METHODS[method]]:
                        self.emits.append(
                            Emit(logger.name, event, level, fields | extra, open_fields, where)
                        )

    def contexts(
        self, call: ast.Call, scope: _Scope, event_node: ast.expr, level_node: ast.expr | None
    ) -> Iterator[tuple[list[str], list[str], frozenset[str], str]]:
        """(events, levels, fields from the caller's keywords into ``**kwargs``, where) of a
        log call: its own, or, when the event or level is a parameter of its function, those
        of each call of that function in the module."""
        event_param, level_param = _param(event_node, scope), _param(level_node, scope)
        if event_param is None and level_param is None:
            levels = self.levels(level_node) if level_node is not None else []
            yield self.strings(event_node, scope), levels, frozenset(), f"{self.rel}:{call.lineno}"
            return
        func = self.scope_function(call)
        callers = [
            node
            for node in self.nodes
            if isinstance(node, ast.Call) and _callee_name(node) == func.name
        ]
        if not callers:
            raise self.fail(call, "an event from a parameter of a function never called here")
        positional = [a.arg for a in [*func.args.posonlyargs, *func.args.args]]
        for caller in callers:
            method = isinstance(caller.func, ast.Attribute) and positional[:1] in (
                ["self"],
                ["cls"],
            )
            given = dict(zip(positional[1:] if method else positional, caller.args, strict=False))
            extra: set[str] = set()
            for kw in caller.keywords:
                if kw.arg is None:
                    raise self.fail(caller, "a ** argument to a function that logs")
                if kw.arg in scope.params:
                    given[kw.arg] = kw.value
                else:
                    extra.add(kw.arg)
            event, event_scope = event_node, scope
            if event_param is not None:
                event, event_scope = (
                    self.argument(caller, given, event_param),
                    self.scope_of(caller),
                )
            level = level_node
            if level_param is not None:
                level = self.argument(caller, given, level_param)
            levels = self.levels(level) if level is not None else []
            events = self.strings(event, event_scope)
            yield events, levels, frozenset(extra), f"{self.rel}:{caller.lineno}"

    def argument(self, caller: ast.Call, given: dict[str, ast.expr], name: str) -> ast.expr:
        if name not in given:
            raise self.fail(caller, f"no {name} given to a function that logs")
        return given[name]

    def scope_function(self, node: ast.AST) -> Function:
        parent = self.parents.get(id(node))
        while not isinstance(parent, Function):
            if parent is None:
                raise self.fail(node, "a parameter outside a function")
            parent = self.parents.get(id(parent))
        return parent

    def event_line(self, call: ast.Call) -> None:
        match call.args:
            case [ast.Constant(value=str(logger)), ast.Constant(value=str(event)), keys] if (
                isinstance(keys, ast.Tuple | ast.List) and all(_is_str(k) for k in keys.elts)
            ):
                fields = frozenset(k for k in map(_str_value, keys.elts) if k is not None)
                where = f"{self.rel}:{call.lineno}"
                self.emits.append(Emit(logger, event, "info", fields, False, where))
            case _:
                raise self.fail(call, "an EventLine whose logger, event or keys are not constants")

    def check_every_use_is_known(self) -> None:
        for node in self.nodes:
            self.check_imports(node)
            kept = isinstance(self.parents.get(id(node)), ast.Assign | ast.AnnAssign)
            if isinstance(node, ast.Call) and self.get_logger_call(node) is not None and not kept:
                raise self.fail(node, "a logger that is not kept in a name")
            if id(node) in self.consumed or not isinstance(node, ast.Name | ast.Attribute):
                continue
            if isinstance(node.ctx, ast.Store | ast.Del):
                continue
            if isinstance(node, ast.Attribute) and node.attr in self.self_loggers:
                if not _is_self(node.value):
                    raise self.fail(node, "a logger read from another object")
                self.check_logger_use(node)
            elif isinstance(node, ast.Name):
                owner = self.scope_of(node).find(node.id)
                if owner is not None and node.id in owner.methods:
                    raise self.fail(self.parents[id(node)], "a level method passed on")
                if owner is not None and node.id in owner.loggers:
                    self.check_logger_use(node)

    def check_imports(self, node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "structlog":
                    raise self.fail(node, "structlog used outside autoscaler/logs.py")
                if alias.name == "logging" and alias.asname not in (None, "logging"):
                    raise self.fail(node, "the logging module under another name")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] == "structlog":
                raise self.fail(node, "structlog used outside autoscaler/logs.py")
            if module == "logging" and any(a.name not in STDLIB_LEVELS for a in node.names):
                raise self.fail(node, "the logging module's loggers used outside logs.py")
            if module.startswith("autoscaler") and module != "autoscaler.logs":
                loggers = _module_loggers().get(module, set())
                if any(a.name in loggers for a in node.names):
                    raise self.fail(node, "a logger imported from another module")
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "logging"
            and node.attr not in STDLIB_LEVELS
        ):
            raise self.fail(node, "the logging module's loggers used outside logs.py")

    def check_logger_use(self, node: ast.expr) -> None:
        """A logger may only be read for a level method (or a bind) that a call uses, or
        to give it another name (followed where that name is used)."""
        parent = self.parents[id(node)]
        if isinstance(parent, ast.Attribute) and id(parent) in self.consumed:
            return
        if isinstance(parent, ast.Assign | ast.AnnAssign) and parent.value is node:
            targets = parent.targets if isinstance(parent, ast.Assign) else [parent.target]
            if all(isinstance(t, ast.Name) for t in targets):
                return
        raise self.fail(parent, "a logger used in a way the scanner cannot follow")


def _is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def _str_value(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _is_str(node: ast.expr | None) -> bool:
    return _str_value(node) is not None


def _is_strings(node: ast.expr) -> bool:
    if isinstance(node, ast.IfExp):
        return _is_strings(node.body) and _is_strings(node.orelse)
    return _is_str(node)


def _param(node: ast.expr | None, scope: _Scope) -> str | None:
    """The parameter of the scope's function that ``node`` reads, if it is one."""
    return node.id if isinstance(node, ast.Name) and node.id in scope.params else None


def _callee_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    return call.func.attr if isinstance(call.func, ast.Attribute) else None


def _own_nodes(stmt: ast.stmt, inner: list[Function]) -> Iterator[ast.AST]:
    """The nodes of ``stmt`` that belong to its scope, in source order; the functions
    defined inside it go to ``inner`` (classes are looked into: their methods)."""
    todo: list[ast.AST] = [stmt]
    while todo:
        node = todo.pop(0)
        if isinstance(node, Function):
            inner.append(node)
            defaults = [d for d in node.args.kw_defaults if d is not None]
            todo[:0] = [*node.decorator_list, *node.args.defaults, *defaults]
            continue
        yield node
        todo[:0] = list(ast.iter_child_nodes(node))


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


@functools.cache
def _module_loggers() -> dict[str, set[str]]:
    """The module-level names that hold a logger, per module of the package."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                func = node.value.func
                if getattr(func, "id", getattr(func, "attr", None)) == "get_logger":
                    names = {t.id for t in node.targets if isinstance(t, ast.Name)}
                    found.setdefault(_module_name(path), set()).update(names)
    return found


def _scan_text(text: str) -> list[Emit]:
    """Scan ``text`` as if it were the package's module ``sample_module_for_test``."""
    return _ModuleScan(PACKAGE / "sample_module_for_test.py", text).scan()


@functools.cache
def code_events() -> tuple[Emit, ...]:
    emits: list[Emit] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path not in NOT_SCANNED:
            emits += _ModuleScan(path).scan()
    return tuple(emits)


def by_key(emits: Iterable[Emit]) -> dict[tuple[str, str], list[Emit]]:
    keyed: dict[tuple[str, str], list[Emit]] = {}
    for emit in emits:
        keyed.setdefault((emit.logger, emit.event), []).append(emit)
    return keyed


@dataclass
class Row:
    logger: str
    event: str
    levels: set[str]
    fields: set[str]
    meaning: str


HEADER = ["component", "event", "level", "fields", "meaning"]


def doc_rows() -> list[Row]:
    """The rows of docs/logs.md's table (the one table whose header is HEADER)."""
    rows: list[Row] = []
    in_table = False
    for line in DOC.read_text().splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells == HEADER:
            assert not rows, "two tables of events"
            in_table = True
        elif in_table and not re.match(r"^\|[\s:|-]+\|$", line):
            assert len(cells) == len(HEADER), f"a row of {len(cells)} cells: {line}"
            logger, event, level, fields, meaning = cells
            rows.append(
                Row(
                    logger.strip("`"),
                    event.strip("`"),
                    {lv.strip() for lv in level.split(",")},
                    set(re.findall(r"`(\w+)`", fields)),
                    meaning,
                )
            )
    return rows


def test_every_event_the_code_writes_is_in_the_table_and_no_other() -> None:
    code = set(by_key(code_events()))
    documented = [(r.logger, r.event) for r in doc_rows()]
    assert len(documented) == len(set(documented)), "an event listed twice"
    assert sorted(code - set(documented)) == [], "written by the code, missing from the table"
    assert sorted(set(documented) - code) == [], "in the table, written by no code"


def test_the_levels_are_those_the_code_writes_at() -> None:
    code = {key: {e.level for e in emits} for key, emits in by_key(code_events()).items()}
    for row in doc_rows():
        key = (row.logger, row.event)
        assert row.levels == code.get(key, row.levels), key


def test_the_fields_are_those_the_code_writes() -> None:
    rows = {(r.logger, r.event): r for r in doc_rows()}
    for key, emits in by_key(code_events()).items():
        row = rows.get(key)
        if row is None:
            continue  # the first test says so
        named = set().union(*(e.fields for e in emits))
        assert not named - row.fields, f"{key}: fields not in the table"
        if not any(e.open_fields for e in emits):
            assert not row.fields - named, f"{key}: fields in the table that no call writes"
        assert row.meaning, f"{key}: no meaning"


def test_the_table_is_grouped_by_component() -> None:
    loggers = [r.logger for r in doc_rows()]
    groups = [name for i, name in enumerate(loggers) if i == 0 or loggers[i - 1] != name]
    assert len(groups) == len(set(groups)), "a component's rows are not together"


# --- the scanner itself: every way of logging it follows, and some it refuses ----------

SAMPLE = """
import logging
from autoscaler.logs import EventLine, get_logger

_log = get_logger("sample")
line = EventLine("sample.lines", "request", ("app", "status"))


class Thing:
    _class_log = get_logger("sample.class")

    def __init__(self):
        self._log = get_logger(__name__)

    def plain(self):
        _log.info("plain", app="a")
        _log.exception("crashed")
        self._log.error("failed", exc_info=True)
        self._class_log.debug("from_class")

    def chosen(self, changed):
        (_log.info if changed else _log.debug)("chosen", n=1)
        log = self._log.debug if changed else self._log.warning
        log("aliased")

    def variable(self, again):
        event = "recovered" if again else "acquired"
        _log.info(event, fence=1)

    def bound(self):
        log = _log.bind(app="a")
        log.warning("bound", machine="m")

        def inner():
            log.info("inner")

        return inner

    def _ended(self, level, event, **extra):
        fields = {"app": "a"}
        _log.log(level, event, **fields, took=1, **extra)

    def done(self):
        self._ended(logging.INFO, "done")
        self._ended(logging.WARNING, "failed_action", error="x")
"""


def test_the_scanner_follows_each_way_of_logging() -> None:
    got = {(e.logger, e.event, e.level, e.fields, e.open_fields) for e in _scan_text(SAMPLE)}
    mod = "autoscaler.sample_module_for_test"
    assert got == {
        ("sample.lines", "request", "info", frozenset({"app", "status"}), False),
        ("sample", "plain", "info", frozenset({"app"}), False),
        ("sample", "crashed", "error", frozenset({"exception"}), False),
        (mod, "failed", "error", frozenset({"exception"}), False),
        ("sample.class", "from_class", "debug", frozenset(), False),
        ("sample", "chosen", "info", frozenset({"n"}), False),
        ("sample", "chosen", "debug", frozenset({"n"}), False),
        (mod, "aliased", "debug", frozenset(), False),
        (mod, "aliased", "warning", frozenset(), False),
        ("sample", "recovered", "info", frozenset({"fence"}), False),
        ("sample", "acquired", "info", frozenset({"fence"}), False),
        ("sample", "bound", "warning", frozenset({"app", "machine"}), False),
        ("sample", "inner", "info", frozenset({"app"}), False),
        ("sample", "done", "info", frozenset({"app", "took"}), True),
        ("sample", "failed_action", "warning", frozenset({"app", "took", "error"}), True),
    }


@pytest.mark.parametrize(
    ("use", "why"),
    [
        ("_log.info(name)", "an event from a parameter of a function never called"),
        ("_log.info(other.name)", "an event name the scanner cannot follow"),
        ("helper(_log)", "a logger used in a way"),
        ("return _log", "a logger used in a way"),
        ("_log.msg('x')", "a logger used in a way"),
        ("helper(_log.info)", "a logger used in a way"),
        ("logging.getLogger('x').warning('y')", "the logging module"),
        ("get_logger(name).info('x')", "a logger whose name is not a constant"),
        ("import structlog", "structlog used outside"),
        ("from autoscaler.control.controller import _log", "a logger imported"),
    ],
)
def test_the_scanner_refuses_what_it_cannot_follow(use: str, why: str) -> None:
    source = "import logging\nfrom autoscaler.logs import get_logger\n_log = get_logger('s')\n"
    source += f"def f(name, other):\n    {use}\n"
    with pytest.raises(Unhandled, match=why):
        _scan_text(source)


def missing_rows() -> str:
    documented = {(r.logger, r.event) for r in doc_rows()}
    lines = []
    for (logger, event), emits in sorted(by_key(code_events()).items()):
        if (logger, event) not in documented:
            levels = ", ".join(sorted({e.level for e in emits}))
            fields = ", ".join(f"`{f}`" for f in sorted(set().union(*(e.fields for e in emits))))
            sites = " ".join(sorted({e.where for e in emits}))
            lines.append(f"| `{logger}` | `{event}` | {levels} | {fields} or (none) | {sites} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    print(missing_rows() or "docs/logs.md lists every event")
