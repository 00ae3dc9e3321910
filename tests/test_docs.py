"""The documentation: the configuration reference matches the schema, and every relative link points at something."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import ROOT

from relayd.config.reference import render


def test_configuration_reference_is_generated_from_the_schema():
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == render(), ("docs/configuration.md differs from the schema: regenerate it with "
                                   "`python -m relayd.config.reference > docs/configuration.md`")


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """Markdown without code blocks and code spans, where a bracket is not a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        if not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().replace("`", "").lower()
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text(encoding="utf-8")))
            if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_a_file_and_heading_that_exist(doc):
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no such heading in {linked.relative_to(ROOT)}")
    assert broken == [], f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_check_sees_links_and_anchors():
    """The checker itself: it finds links outside code, and GitHub's anchor for a heading with punctuation."""
    assert relative_links(ROOT / "README.md")
    assert "behind-a-reverse-proxy-recommended-for-public-relays" in anchors(ROOT / "docs" / "deploying.md")
    assert "100000-connected-users" in anchors(ROOT / "docs" / "scaling.md")
    assert prose("see `[x](nowhere.md)` and\n```\n[y](nowhere.md)\n```\n") == "see  and\n\n"


def test_no_install_hint_names_a_package_index_relayd_is_not_on():
    """relayd is installed from a checkout; ``pip install 'relayd[...]'`` would look it up on PyPI."""
    sources = DOCS + sorted((ROOT / "relayd").rglob("*.py")) + [ROOT / "relayd.conf.example"]
    offending = [p.relative_to(ROOT).as_posix() for p in sources
                 if re.search(r"pip install\s+['\"]?relayd\[", p.read_text(encoding="utf-8"))]
    assert offending == []
