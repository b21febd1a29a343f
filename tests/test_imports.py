"""The package's import graph has no cycles (issue 27: "a house without import circles").

Every ``import`` / ``from ... import`` anywhere in a module counts (top level, inside functions,
under ``TYPE_CHECKING``): relative imports are resolved; ``from pkg import name`` where ``pkg.name``
is a module imports that module (else ``pkg`` itself); importing ``a.b.c`` also runs the packages
``a.b`` and ``a`` that are not already the importer's own enclosing packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "fewstep"


def module_files(src: Path = SRC, root: str = ROOT) -> dict[str, tuple[Path, bool]]:
    """``{module name: (file, is_package)}`` of every module under ``src/root``."""
    found: dict[str, tuple[Path, bool]] = {}
    for path in sorted((src / root).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return found


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:k]) for k in range(1, len(parts))}


def import_edges(modules: dict[str, tuple[Path, bool]]) -> dict[str, dict[str, int]]:
    """``{importer: {imported module: line of the first import}}`` within ``modules``."""
    edges: dict[str, dict[str, int]] = {}
    for name, (path, is_pkg) in modules.items():
        package = name if is_pkg else name.rpartition(".")[0]
        own = _ancestors(name) | {name}
        out: dict[str, int] = {}

        def add(target: str, line: int) -> None:
            # the target, and the packages above it that the import runs (not the importer's own)
            if target in modules and target != name:
                out.setdefault(target, line)
            for mod in sorted(_ancestors(target)):
                if mod in modules and mod not in own:
                    out.setdefault(mod, line)

        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    add(sub if sub in modules else target, node.lineno)
        edges[name] = out
    return edges


def find_cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle (``[a, b, ..., a]``) per circle of modules (:func:`circles`)."""
    return [_cycle_in(comp, edges) for comp in circles(edges)]


def circles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module, each sorted (Tarjan's
    algorithm, iterative): every import cycle lies inside one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        components.append(sorted(comp))
    return components


def _cycle_in(component: list[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first back to it)."""
    members, start = set(component), component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in component {component}")  # pragma: no cover


def describe(component: list[str], edges: dict[str, dict[str, int]]) -> str:
    """A circle of modules: one cycle through it, then every import inside it (with its line)."""
    cycle = _cycle_in(component, edges)
    inside = [f"    {a} -> {b} (line {edges[a][b]})" for a in component for b in sorted(edges[a]) if b in component]
    return "cycle " + " -> ".join(cycle) + f"; the {len(component)} modules' imports within the circle:\n" + "\n".join(inside)


def test_the_package_has_no_import_cycles():
    modules = module_files()
    assert f"{ROOT}.sample" in modules and f"{ROOT}.solvers.presets" in modules
    edges = import_edges(modules)
    found = circles(edges)
    assert not found, "import cycles:\n" + "\n".join(describe(c, edges) for c in found)


def test_the_layers_the_issue_names():
    """The parallel path stands on the executor, not on the front door; the preset families on the
    public building helpers, not on the presets' front door."""
    edges = import_edges(module_files())
    assert f"{ROOT}.sample" not in edges[f"{ROOT}.parallel"]
    assert f"{ROOT}.executor" in edges[f"{ROOT}.parallel"] and f"{ROOT}.executor" in edges[f"{ROOT}.sample"]
    families = [m for m in edges if m.startswith(f"{ROOT}.solvers.presets.") and not m.endswith(".building")]
    assert len(families) >= 8
    for fam in families:
        assert f"{ROOT}.solvers.presets.building" in edges[fam], fam
    for low in ("registry", "points"):
        assert not {m for m in edges[f"{ROOT}.solvers.{low}"] if m.startswith(f"{ROOT}.solvers.")} - {f"{ROOT}.solvers.points"}, low


def _write(tmp: Path, files: dict[str, str]) -> dict[str, tuple[Path, bool]]:
    for rel, text in files.items():
        p = tmp / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return module_files(tmp, "pkg")


@pytest.mark.parametrize(("files", "expect"), [
    # a lazy import inside a function closes the circle
    ({"__init__.py": "", "a.py": "from .b import f\n", "b.py": "def f():\n    from .a import g\n"}, ["pkg.a", "pkg.b", "pkg.a"]),
    # `from . import name` where name is a submodule; TYPE_CHECKING imports count
    ({"__init__.py": "", "a.py": "from . import b\n", "b.py": "if TYPE_CHECKING:\n    from pkg.a import X\n"}, ["pkg.a", "pkg.b", "pkg.a"]),
    # a name taken from the package's __init__, which imports the module back
    ({"__init__.py": "from .a import x\n", "a.py": "from . import version\n"}, ["pkg", "pkg.a", "pkg"]),
    # importing a module of another subpackage runs that subpackage's __init__
    ({"__init__.py": "", "a.py": "from .s.m import y\n", "s/__init__.py": "from ..a import z\n", "s/m.py": ""}, ["pkg.a", "pkg.s", "pkg.a"]),
])
def test_the_walk_finds_planted_cycles(tmp_path, files, expect):
    edges = import_edges(_write(tmp_path, files))
    assert find_cycles(edges) == [expect]


def test_the_walk_passes_a_layered_package(tmp_path):
    files = {"__init__.py": "from .top import run\n", "top.py": "from .low import f\nfrom . import low\n",
             "low.py": "import os\nfrom typing import Any\n\ndef f():\n    from .leaf import g\n", "leaf.py": "import pkg.errors\n",
             "errors.py": ""}
    assert find_cycles(import_edges(_write(tmp_path, files))) == []
