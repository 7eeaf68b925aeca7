"""docs/policy.md's knob reference lists every per-app knob of the policy with the
default the code has.

README's configuration table is checked against the settings (test_readme.py), but
policy.md's "Knob reference", which says what each knob does to the policy, was not:
`restart_failed`, `max_restart_attempts` and `connection_idle_s` were missing from it.
The keys that route rather than decide (an app's name, hosts, paths, port, backends, and
the proxy's body limit) are left to README.
"""

from __future__ import annotations

import re
from pathlib import Path

from test_readme import config_rows  # tests/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
ROUTING = {"name", "hosts", "paths", "port", "backends", "max_body_bytes"}


def knob_table() -> dict[str, str]:
    """Knob -> default, from the table under "## Knob reference"."""
    text = (REPO / "docs" / "policy.md").read_text()
    section = text[text.index("## Knob reference") :]
    section = section[: section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {
        cells[0].strip("`"): cells[1]
        for cells in ([c.strip() for c in row.strip("|").split("|")] for row in rows)
    }


def same(documented: str, default: str) -> bool:
    """`2.0` is `2`; words are compared as they are."""
    number = r"-?\d+(\.\d+)?"
    if re.fullmatch(number, documented) and re.fullmatch(number, default):
        return float(documented) == float(default)
    return documented == default


def test_the_knob_reference_lists_every_policy_knob_with_its_default() -> None:
    knobs = {
        key.removeprefix("apps[]."): default
        for key, default, _ in config_rows()
        if key.startswith("apps[].") and key.removeprefix("apps[].") not in ROUTING
    }
    table = knob_table()
    assert sorted(set(knobs) - set(table)) == [], "knobs missing from docs/policy.md"
    assert sorted(set(table) - set(knobs)) == [], "docs/policy.md lists knobs the code lacks"
    wrong = {k: (table[k], d) for k, d in knobs.items() if not same(table[k], d)}
    assert wrong == {}, "docs/policy.md's default differs: knob: (documented, code's)"
