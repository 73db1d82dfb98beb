"""Point the README's and the notebooks' Colab links and ``git clone`` at the repository in ``pyproject.toml``.

The repository is named once, in ``pyproject.toml`` (``[project.urls] Repository``, a ``https://github.com/ORG/NAME``
address). A fork edits that line and runs::

    python scripts/set_repository.py            # rewrite README.md and demos/*.ipynb
    python scripts/set_repository.py --check    # exit 1 when a link points elsewhere (the tests run this check)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: a Colab link's ``github/ORG/NAME/`` part and a clone address ``github.com/ORG/NAME.git``
_PATTERNS = (
    (re.compile(r"colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/"), "colab.research.google.com/github/{}/"),
    (re.compile(r"https://github\.com/[\w.-]+/[\w.-]+?\.git"), "https://github.com/{}.git"),
)


def repository() -> str:
    """``ORG/NAME`` from ``[project.urls] Repository`` in pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'^Repository\s*=\s*"https://github\.com/([\w.-]+/[\w.-]+?)/?"\s*$', text, re.MULTILINE)
    if m is None:
        sys.exit('pyproject.toml needs [project.urls] Repository = "https://github.com/ORG/NAME"')
    return m.group(1)


def files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "demos").glob("*.ipynb"))]


def rewrite(text: str, repo: str) -> str:
    for pattern, template in _PATTERNS:
        text = pattern.sub(template.format(repo), text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a link points elsewhere")
    args = ap.parse_args(argv)
    repo = repository()
    stale = []
    for path in files():
        text = path.read_text()
        new = rewrite(text, repo)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"links not pointing at {repo}: {', '.join(map(str, stale))}; run scripts/set_repository.py")
        return 1
    verb, what = ("checked", "stale") if args.check else ("rewrote", "changed")
    print(f"{verb} links to {repo}: {len(stale)} file(s) {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
