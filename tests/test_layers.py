"""The import graph of awqlib: no cycles, and no module importing a layer above its own.

The layers, lowest first, are read from the table in docs/ARCHITECTURE.md (one home: the doc a
newcomer reads is the rule the test applies); a module may import modules of its own layer or of
lower ones.  Every import counts, also those inside functions (a deferred import is still a
dependency).  A new module must be given a layer there.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "awqlib"


def _layers_from_doc() -> list[tuple[str, set[str]]]:
    """The '| layer | modules | what it is |' table of docs/ARCHITECTURE.md: [(layer, {module})]."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = re.search(r"^\| layer \| modules \|.*\n\|[- |]+\|\n((?:\|.*\n)+)", text, re.M)
    assert table, "docs/ARCHITECTURE.md has no '| layer | modules | ...' table"
    layers = []
    for row in table.group(1).splitlines():
        name, modules = [c.strip() for c in row.strip("|").split("|")][:2]
        mods = {re.sub(r"^awqlib/", "", m) for m in re.findall(r"`([^`]+)`", modules)}
        layers.append((name, mods))
    return layers


LAYERS: list[tuple[str, set[str]]] = _layers_from_doc()
LAYER_OF = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}


def _modules() -> dict[str, Path]:
    """awqlib-relative dotted name -> file ('arch' for arch/__init__.py, '__init__' for the package)."""
    out = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The awqlib modules ``name`` imports (relative or absolute, at any depth of the file)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg and name != "__init__" else name.split(".")[:-1]
    if name == "__init__":
        here = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[list[str]] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else list(here)
            elif node.module and node.module.split(".")[0] == "awqlib":
                base = []
            else:
                continue
            mod = (node.module or "").split(".")
            if not node.level:
                mod = mod[1:]  # drop "awqlib"
            base = base + [m for m in mod if m]
            for alias in node.names:  # "from . import ops": a submodule, or a name of the package
                sub = ".".join(base + [alias.name])
                targets.append(sub.split(".") if sub in known else base)
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "awqlib"]
        for t in targets:
            dotted = ".".join(t) or "__init__"
            while dotted not in known and "." in dotted:
                dotted = dotted.rsplit(".", 1)[0]
            if dotted in known and dotted != name:
                found.add(dotted)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def test_every_module_has_a_layer():
    missing = sorted(set(_graph()) - set(LAYER_OF))
    assert not missing, f"give these modules a layer in the table of docs/ARCHITECTURE.md: {missing}"
    listed = [m for _, mods in LAYERS for m in mods]
    assert len(listed) == len(set(listed)), "a module listed in two layers of docs/ARCHITECTURE.md"
    unknown = sorted(set(listed) - set(_graph()))
    assert not unknown, f"docs/ARCHITECTURE.md's layer table names modules that do not exist: {unknown}"


def test_no_upward_import():
    bad = [f"{a} ({LAYERS[LAYER_OF[a]][0]}) imports {b} ({LAYERS[LAYER_OF[b]][0]})"
           for a, deps in _graph().items() for b in deps
           if a in LAYER_OF and b in LAYER_OF and LAYER_OF[b] > LAYER_OF[a]]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_the_parser_sees_imports():
    """The checks above are only as good as the import parser: pin a few known edges."""
    g = _graph()
    assert {"awq", "pipeline", "loading"} <= g["model"]
    assert "modules" in g["arch.blocks"] and "arch" in g["arch.blocks"]  # "from ..modules", "from . import"
    assert "ops" in g["__init__"] and "kernels" in g["modules"]
    assert "checkpoint" in g["offline"]  # an import inside a function
