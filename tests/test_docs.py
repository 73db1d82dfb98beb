"""The documentation covers the public face: every name in ``tl_degeneracy.__all__`` has an API reference entry,
every API page is in the site's navigation, and the guides carry no leftover "planned API" marks.

Fast and without mkdocs (CI builds the site itself with ``mkdocs build --strict``).
"""

from __future__ import annotations

import re
from pathlib import Path

import tl_degeneracy

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _api_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted((DOCS / "api").glob("*.md")))


def test_every_public_name_is_in_the_api_reference():
    text = _api_text()
    missing = [name for name in tl_degeneracy.__all__
               if not re.search(r"(?<![\w.])tl_degeneracy\." + re.escape(name) + r"(?![\w])", text)]
    assert not missing, (f"public names without an API reference entry: {missing}; add `::: tl_degeneracy.NAME` "
                         "to a page in docs/api/")


def test_the_coverage_check_can_fail():
    # the pattern must not accept a name that only appears inside a longer dotted path or a longer name
    text = "::: tl_degeneracy.run.report\n::: tl_degeneracy.estimate_llc_distributed\n"
    for name in ("report", "estimate_llc"):
        assert not re.search(r"(?<![\w.])tl_degeneracy\." + re.escape(name) + r"(?![\w])", text)


def test_every_api_and_guide_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = [p.relative_to(DOCS).as_posix() for p in sorted(DOCS.glob("*/*.md"))]
    absent = [p for p in pages if p not in nav]
    assert not absent, f"pages missing from mkdocs.yml nav: {absent}"


def test_guides_describe_released_code():
    for path in sorted(DOCS.rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        assert "planned api" not in text.lower(), f"{path.relative_to(ROOT)} still says 'planned API'"
        assert "shared/" not in text, f"{path.relative_to(ROOT)} refers to a shared/ folder outside the repository"
    assert "planned" not in (ROOT / "mkdocs.yml").read_text(encoding="utf-8").lower()
