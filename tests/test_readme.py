"""README's tables and quick start stay true to the code.

Run ``python tests/test_readme.py`` to print the config and metrics tables from the code.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, get_args

from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402

from autoscaler.cli import _COMMANDS, build_parser  # noqa: E402
from autoscaler.config import Settings  # noqa: E402
from autoscaler.metrics import Metrics, RequestMetrics  # noqa: E402


def _model_in(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the BaseModel inside an annotation, whether it is a list of them)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    for arg in get_args(annotation):
        model, _ = _model_in(arg)
        if model is not None:
            is_list = getattr(annotation, "__origin__", None) is list
            return model, is_list
    return None, False


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | dict) and not value:
        return "[]" if isinstance(value, list) else "{}"
    return str(value)


def config_rows(model: type[BaseModel] = Settings, prefix: str = "") -> list[tuple[str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub, is_list = _model_in(field.annotation)
        if sub is not None:
            rows += config_rows(sub, f"{key}[]." if is_list else f"{key}.")
            continue
        rows.append((key, _default(field), field.description or ""))
    return rows


def metric_rows() -> list[tuple[str, str, str, str]]:
    rows = []
    metrics = Metrics()
    # dir(), not vars(): the compiled build's Metrics has slots, not a __dict__.
    for metric in (getattr(metrics, name) for name in dir(metrics) if not name.startswith("_")):
        if isinstance(metric, RequestMetrics):
            rows += [(m.name, m.kind, ", ".join(m.labels), m.help) for m in metric.SPECS]
        if not isinstance(metric, MetricWrapperBase):
            continue
        kind = metric._type
        name = metric._name + ("_total" if kind == "counter" else "")
        labels = ", ".join(metric._labelnames) or "(none)"
        rows.append((name, kind, labels, metric._documentation))
    return rows


def table_after(heading: str) -> list[list[str]]:
    text = README.read_text()
    start = text.index(heading)
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("|") and not re.match(r"^\|[\s:|-]+\|$", line):
            rows.append([c.strip().strip("`") for c in line.strip("|").split("|")])
    return rows[1:]  # without the header row


def test_config_table_matches_the_settings() -> None:
    rows = table_after("## Configuration reference")
    assert [(r[0], r[1]) for r in rows] == [(k, d) for k, d, _ in config_rows()]
    assert all(r[2] for r in rows), "every key needs a meaning"


def test_metrics_table_matches_the_registry() -> None:
    rows = table_after("## Metrics")
    documented = {r[0]: r[1] for r in rows}
    declared = {name: kind for name, kind, _, _ in metric_rows()}
    assert documented == declared


def test_metric_meanings_say_what_the_help_says() -> None:
    """The table's meaning is the metric's HELP (it may go on where the HELP stops)."""
    meanings = {r[0]: r[3] for r in table_after("## Metrics")}
    for name, _, _, help_text in metric_rows():
        assert meanings[name].startswith(help_text.rstrip(".")), name


def test_machine_seconds_say_what_each_state_costs() -> None:
    """The help called started and suspended seconds alike "what the fleet costs", but Fly
    bills a suspended machine for storage only, not CPU and RAM."""
    from autoscaler.control.runtime import BILLED_STATES

    help_text = Metrics().machine_seconds._documentation
    assert set(BILLED_STATES) == {"started", "suspended"}  # what the help explains
    started, suspended = help_text.split("suspended", 1)
    assert "CPU and RAM" in started
    assert "storage only" in suspended
    assert "fleet costs" not in help_text


def test_the_metrics_note_names_the_series_without_a_replica_label() -> None:
    from autoscaler.metrics import CLUSTER_WIDE

    text = README.read_text()
    start = text.index("## Metrics")
    note = text[start : text.index("| metric |", start)]
    assert set(re.findall(r"`(autoscaler_\w+)`", note.split("except", 1)[1].split(".")[0])) == (
        CLUSTER_WIDE
    )


_COMMON = {"-h", "--help", "--log-level", "--log-format"}


def cli_rows() -> list[tuple[str, str, str]]:
    """(command, its options, summary) for every subcommand, from the parser itself."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    rows = []
    for name, summary, *_ in _COMMANDS:
        parser = sub.choices[name]
        options = []
        for action in parser._actions:
            flags = [f for f in action.option_strings if f not in _COMMON]
            if flags:
                options.append(
                    flags[-1]
                    if action.nargs == 0
                    else f"{flags[-1]} {action.metavar or action.dest.upper()}"
                )
            elif not action.option_strings:
                options.append(f"[{action.metavar}]")
        rows.append((f"autoscaler {name}", " ".join(options), summary))
    return rows


def test_cli_table_matches_the_parser() -> None:
    rows = table_after("## Command line")
    assert [tuple(r) for r in rows] == [(c, o.replace("|", "\\|"), s) for c, o, s in cli_rows()]


def test_quick_start_is_two_commands_and_ci_runs_the_second() -> None:
    text = README.read_text()
    block = text.split("## Quick start", 1)[1].split("```", 2)[1]
    commands = [
        line for line in block.splitlines()[1:] if line.strip() and not line.startswith("#")
    ]
    assert len(commands) == 2
    assert "autoscaler demo" in commands[0]
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[0] in ci
    assert commands[1] in ci


def cli_table() -> str:
    lines = ["| command | options | what it does |", "| --- | --- | --- |"]
    lines += [f"| `{c}` | {o} | {s} |" for c, o, s in cli_rows()]
    return "\n".join(lines)


def config_table() -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | `{d}` | {m} |" for k, d, m in config_rows()]
    return "\n".join(lines)


def metrics_table() -> str:
    lines = ["| metric | type | labels | meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{n}` | {k} | {lab} | {doc} |" for n, k, lab, doc in metric_rows()]
    return "\n".join(lines)


def rewrite(text: str, heading: str, table: str) -> str:
    """Replace the first table after ``heading`` with ``table``."""
    start = text.index(heading)
    lines = text[start:].split("\n")
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    last = first
    while last < len(lines) and lines[last].startswith("|"):
        last += 1
    return text[:start] + "\n".join([*lines[:first], table, *lines[last:]])


if __name__ == "__main__":
    # python tests/test_readme.py: regenerate README's config and metrics tables.
    text = README.read_text()
    text = rewrite(text, "## Command line", cli_table())
    text = rewrite(text, "## Configuration reference", config_table())
    text = rewrite(text, "## Metrics", metrics_table())
    README.write_text(text)
