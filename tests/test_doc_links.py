"""The links between the docs lead somewhere.

Every Markdown link of README.md and docs/*.md to a file of this repository names a file
that exists, and its `#fragment`, if any, a heading of that file (GitHub's anchors: the
heading in lower case, without punctuation but `-` and `_`, spaces as dashes). A section
renumbered or renamed left `[cluster mode](#9-cluster-mode-several-replicas)` in
docs/deploy.md pointing at nothing, after section 10 had taken that name.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_LINK = re.compile(r"\]\(([^()\s#]*)(?:#([^()\s]*))?\)")
_FENCED = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def anchors(doc: Path) -> set[str]:
    """GitHub's anchor of each heading (a repeated one also as `-1`, `-2`, ...)."""
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _FENCED.sub("", doc.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n, anchor = 0, slug
        while anchor in found:
            n += 1
            anchor = f"{slug}-{n}"
        found.add(anchor)
    return found


def links(doc: Path) -> list[tuple[int, str, str | None]]:
    """(line, target, fragment) of each link to this repository (target "" in the doc)."""
    text = doc.read_text()
    return [
        (text.count("\n", 0, m.start()) + 1, m[1], m[2])
        for m in _LINK.finditer(text)
        if not re.match(r"[a-z][a-z0-9+.-]*:", m[1])  # https:, mailto:
    ]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_names_a_file_and_a_heading_that_exist(doc: Path) -> None:
    broken = []
    for line, target, fragment in links(doc):
        file = (doc.parent / target).resolve() if target else doc
        if not file.exists():
            broken.append(f"{line}: {target}: no such file")
        elif fragment is not None and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{line}: {target}#{fragment}: no such heading in {file.name}")
    assert broken == [], f"{doc.relative_to(REPO)}:\n" + "\n".join(broken)


def test_the_anchors_are_githubs() -> None:
    """The slug rule on this repository's own headings."""
    deploy = anchors(REPO / "docs" / "deploy.md")
    assert "10-cluster-mode-several-replicas" in deploy
    assert "9-leases-and-fly-deploy" in deploy  # backticks dropped
