"""The package's import graph follows the one-way layer order of docs/ARCHITECTURE.md.

Every ``import``/``from ... import`` of a ``tl_degeneracy`` module inside the package (at any depth: module
level or inside a function) is read with ``ast`` and checked against the layers each layer may use. A new
module must be placed in a layer here, so the order cannot drift silently.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tl_degeneracy"

#: layer -> the layers it may import (besides itself). Lower layers never import higher ones.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "_version": set(),
    "_io": {"errors"},
    "stats": {"errors", "_io"},
    "adapter": {"errors", "_io"},
    "sites": {"errors", "adapter"},
    "data": {"errors", "_io", "adapter"},
    "collection": {"errors", "_io", "_version", "adapter", "sites", "data", "stats"},
    "analysis": {"errors", "_io", "stats", "sites"},
    "llc": {"errors", "_io", "adapter", "data"},
    # model passes interleaved with analyses (the local interaction basis, the interaction graph)
    "methods": {"errors", "_io", "_version", "adapter", "sites", "data", "collection", "stats", "analysis"},
    "run": {"errors", "_io", "_version", "adapter", "sites", "data", "collection", "stats", "analysis", "llc",
            "methods", "face"},
    "face": {"errors", "_io", "_version", "adapter", "sites", "data", "collection", "stats", "analysis", "llc",
             "methods", "run"},
    "__main__": {"run"},
}


def _layer(module: str) -> str:
    """``tl_degeneracy.collection.engine`` -> ``collection``; the package itself is the ``face``."""
    parts = module.split(".")
    return "face" if len(parts) == 1 else parts[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "tl_degeneracy"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "tl_degeneracy":
                if node.module == "tl_degeneracy":  # `from tl_degeneracy import x`: x may be a submodule
                    found += [(node.lineno, f"tl_degeneracy.{a.name}") if (PACKAGE / a.name).exists()
                              or (PACKAGE / f"{a.name}.py").exists() else (node.lineno, "tl_degeneracy")
                              for a in node.names]
                else:
                    found.append((node.lineno, node.module))
    return found


def test_every_module_is_in_a_layer():
    unknown = sorted({_layer(_module_name(p)) for p in PACKAGE.rglob("*.py")} - set(ALLOWED))
    assert not unknown, f"modules outside the layer table: {unknown}; add them to ALLOWED and ARCHITECTURE.md"


def test_no_import_against_the_layer_order():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _layer(_module_name(path))
        for line, target in _imports(path):
            other = _layer(target)
            if other != me and other not in ALLOWED[me]:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {me} imports {target} ({other})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_nothing_imports_the_run_layer():
    importers = [f"{p.relative_to(PACKAGE.parent)}:{line}" for p in PACKAGE.rglob("*.py")
                 if _layer(_module_name(p)) not in ("run", "face", "__main__")
                 for line, target in _imports(p) if _layer(target) == "run"]
    assert not importers


def test_no_module_level_import_cycle():
    """Module-level imports between the package's modules form no cycle (function-level imports that would
    hide one are refused by the layer test above)."""
    import networkx as nx

    graph = nx.DiGraph()
    for path in PACKAGE.rglob("*.py"):
        me = _module_name(path)
        body = ast.parse(path.read_text()).body
        for node in body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tl_degeneracy."):
                graph.add_edge(me, node.module)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles}"


def test_importing_the_package_does_not_import_matplotlib():
    code = "import sys, tl_degeneracy; sys.exit(1 if 'matplotlib' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent).returncode == 0


def test_report_is_loaded_on_first_use():
    import tl_degeneracy

    assert tl_degeneracy.report.write_report is not None
