"""The house stays readable: no import circle in core/ or ui/, no Python file there over 600 lines.

The import graph is read from the source with :mod:`ast` (nothing is imported). Every ``import`` and
``from ... import`` counts, relative ones resolved against the importing module's package:

* module-level imports (also inside ``try``/``if``/class bodies: they run when the module is imported);
* lazy imports inside functions and methods, kept apart and named "lazy" in a failure: a lazy import breaks
  nothing at import time, but a circle through one still means two files that each need the other, which is
  what this test forbids.

An edge points at the module named (``from . import x`` points at ``x`` when ``x`` is a module of the
package, otherwise at the package itself); importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``,
but those package files import nothing of their children here, so they are not followed.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "ui")
MAX_LINES = 600

Edge = Tuple[str, str, bool, int]  # (importer, imported, lazy, line)


def module_names() -> Dict[str, Path]:
    """Dotted module name (``core.modeling.registry``; a package by its own name) -> file."""
    out: Dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _internal(name: str, modules: Dict[str, Path]) -> Optional[str]:
    """The module of ours that ``name`` refers to (the longest known prefix), or None for outside code."""
    if name.startswith("virefsam."):  # the plugin package's own name, as QGIS imports it
        name = name[len("virefsam."):]
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(tree: ast.AST):
    """(node, lazy) for every import statement; lazy = inside a function or method."""
    def walk(node, lazy):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, lazy
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from walk(child, inner)

    yield from walk(tree, False)


def import_edges(modules: Optional[Dict[str, Path]] = None, unresolved: Optional[list] = None) -> List[Edge]:
    """Every import of one of our modules by another; ``unresolved`` collects relative imports that name no file."""
    modules = module_names() if modules is None else modules
    edges: List[Edge] = []
    for name, path in modules.items():
        package = _package_of(name, path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, lazy in _imports(tree):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base_parts = package.split(".") if package else []
                    up = node.level - 1
                    base = ".".join(base_parts[: len(base_parts) - up]) if up else package
                    # the repository root is the plugin package: `..core` from ui/ is its sibling core/
                    base = ".".join(x for x in (base, node.module) if x)
                    if unresolved is not None and base not in modules:
                        unresolved.append(f"{path.relative_to(ROOT)}:{node.lineno}: {'.' * node.level}{node.module or ''}")
                else:
                    base = node.module or ""
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if _internal(sub, modules) == sub.removeprefix("virefsam.") else base)
            for target in targets:
                resolved = _internal(target, modules)
                if resolved is not None and resolved != name:
                    edges.append((name, resolved, lazy, node.lineno))
    return edges


def find_cycles(edges: List[Edge]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    graph: Dict[str, Set[str]] = {}
    for a, b, _, _ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def describe(cycle: List[str], edges: List[Edge]) -> str:
    inside = set(cycle)
    lines = [
        f"  {a} -> {b} (line {line}{', lazy' if lazy else ''})"
        for a, b, lazy, line in sorted(set(edges))
        if a in inside and b in inside
    ]
    return "import circle among " + ", ".join(cycle) + ":\n" + "\n".join(lines)


def test_walker_sees_the_known_edges():
    """The walker resolves relative, parent-relative and submodule imports (guards against a blind test)."""
    edges = {(a, b) for a, b, _, _ in import_edges()}
    assert ("core.modeling.registry", "core.modeling.checkpoints") in edges  # from . import checkpoints
    assert ("core.modeling.registry", "core.modeling.architectures") in edges  # from .architectures import ...
    assert ("core.modeling.predictor", "core.modeling.virefsam") in edges
    assert ("core.engines", "core.modeling.registry") in edges  # a lazy one
    assert any(a.startswith("ui.") and b.startswith("core.") for a, b in edges)  # from ..core.x import y


def test_every_relative_import_names_a_file():
    """A relative import with one dot too few or too many (easy after a move) fails here, not at run time."""
    unresolved: list = []
    import_edges(unresolved=unresolved)
    assert not unresolved, "relative imports that name no module: " + "; ".join(unresolved)


def test_no_import_circle_at_module_level():
    edges = [e for e in import_edges() if not e[2]]
    cycles = find_cycles(edges)
    assert not cycles, "\n".join(describe(c, edges) for c in cycles)


def test_no_import_circle_counting_lazy_imports():
    edges = import_edges()
    cycles = find_cycles(edges)
    assert not cycles, "\n".join(describe(c, edges) for c in cycles)


def test_no_file_over_600_lines():
    long = []
    for name, path in module_names().items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not long, f"split by concept, files over {MAX_LINES} lines: " + "; ".join(long)
