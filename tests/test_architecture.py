"""The package's shape, checked from the source: no import cycles, no import from a higher layer, no object patching.

Every import in ``attnres_train/`` counts, including those inside functions. The layer order is read from
docs/architecture.md ("Layers"), so the document and this test cannot drift. Each failure lists file:line.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "attnres_train"
DOC = REPO / "docs" / "architecture.md"
ROOT = "attnres_train"
LAYER_LINE = re.compile(r"^\s*([a-z_]+(?:\s*<\s*[a-z_]+)+)\s*$")


def layer_order(text: str) -> List[str]:
    """The one line ``a < b < c`` of the doc (low -> high)."""
    lines = [m.group(1) for m in map(LAYER_LINE.match, text.splitlines()) if m]
    assert len(lines) == 1, f"{DOC} must hold exactly one layer line 'config < model < ...', found {lines}"
    return [name.strip() for name in lines[0].split("<")]


def module_name(path: Path, pkg: Path = PKG) -> str:
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(pkg: Path = PKG) -> Dict[str, Path]:
    return {module_name(p, pkg): p for p in sorted(pkg.rglob("*.py"))}


def _type_checking_only(tree: ast.AST) -> Set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (annotations only, never executed)."""
    ids: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_name(node.test, "TYPE_CHECKING"):
            ids |= {id(sub) for stmt in node.body for sub in ast.walk(stmt)}
    return ids


def imports(name: str, path: Path, known: Set[str], runtime_only: bool = False) -> List[Tuple[str, int]]:
    """``(imported in-package module, line)`` for every import statement of one module, at any depth
    (``runtime_only``: without those under ``if TYPE_CHECKING:``)."""
    is_pkg = path.name == "__init__.py"
    out = []
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` imports the submodule; ``from mod import obj`` the module
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known and "." in target:  # ``import a.b.c`` of a non-module c
                target = target.rsplit(".", 1)[0]
            if target in known and target != name and (target, node.lineno) not in out:
                out.append((target, node.lineno))
    return out


def graph(pkg: Path = PKG, runtime_only: bool = False) -> Dict[str, List[Tuple[str, int]]]:
    mods = modules(pkg)
    return {name: imports(name, path, set(mods), runtime_only) for name, path in mods.items()}


def cycles(edges: Dict[str, List[Tuple[str, int]]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted({t for t, _ in edges[start]})))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted({t for t, _ in edges[child]}))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def cycle_path(comp: List[str], edges) -> str:
    """One shortest ring through ``comp[0]`` inside the component, as ``a -(line)-> b -(line)-> a``."""
    members, start = set(comp), comp[0]
    prev: Dict[str, Tuple[str, int]] = {}
    frontier = [start]
    while frontier and start not in prev:
        nxt = []
        for m in frontier:
            for t, line in edges[m]:
                if t in members and t not in prev:
                    prev[t] = (m, line)
                    nxt.append(t)
        frontier = nxt
    path, node = [start], start
    while True:
        m, line = prev[node]
        path[:0] = [m, f"-({line})->"]
        node = m
        if node == start:
            return " ".join(path)


def layer_of(module: str, order: List[str]):
    """The layer of a module, or None for the package root and ``__main__`` (entry points, above every layer)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in order else None


def layer_violations(edges, order: List[str], pkg: Path = PKG) -> List[str]:
    rank = {layer: i for i, layer in enumerate(order)}
    bad = []
    for mod, targets in sorted(edges.items()):
        src = layer_of(mod, order)
        if src is None and mod.count(".") >= 1 and mod.split(".")[1] != "__main__":
            bad.append(f"{mod}: its sub-package {mod.split('.')[1]!r} is in no layer of {DOC.name}")
            continue
        for target, line in targets:
            dst = layer_of(target, order)
            if src is not None and (dst is None or rank[dst] > rank[src]):
                where = modules(pkg)[mod].relative_to(pkg.parent)
                bad.append(f"{where}:{line} ({src}) imports {target} ({dst or 'package root'})")
    return bad


def _is_name(node, *names) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr in names) or (isinstance(node, ast.Name) and node.id in names)


def patching(path: Path) -> List[str]:
    """``__class__ =``, ``_parameters[...] =`` / ``_parameters =``, ``.forward =``, ``types.MethodType`` and the
    ``setattr`` spellings of the same."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        while any(isinstance(t, (ast.Tuple, ast.List)) for t in targets):  # ``a, b.forward = ...``
            targets = [e for t in targets for e in (t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t])]
        for t in targets:
            if isinstance(t, ast.Attribute) and t.attr in ("__class__", "forward", "_parameters"):
                found.append((node.lineno, f"assignment to .{t.attr}"))
            elif isinstance(t, ast.Subscript) and _is_name(t.value, "_parameters"):
                found.append((node.lineno, "assignment to _parameters[...]"))
        if isinstance(node, ast.Attribute) and node.attr == "MethodType":
            found.append((node.lineno, "types.MethodType"))
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == "types"
            and any(a.name == "MethodType" for a in node.names)
        ):
            found.append((node.lineno, "from types import MethodType"))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "setattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in ("__class__", "forward", "_parameters")
        ):
            found.append((node.lineno, f"setattr(..., {node.args[1].value!r}, ...)"))
    rel = path.relative_to(REPO) if REPO in path.parents else path
    return [f"{rel}:{line}: {what}" for line, what in sorted(set(found))]


# -- the checks on attnres_train/ ----------------------------------------------------------------------------
def test_no_import_cycles():
    edges = graph(runtime_only=True)  # an ``if TYPE_CHECKING:`` import is never executed (it counts for layers)
    found = cycles(edges)
    lines = [f"{', '.join(comp)}\n    e.g. {cycle_path(comp, edges)}" for comp in found]
    assert not found, f"{len(found)} import cycle(s) in {ROOT}/:\n" + "\n".join(lines)


def test_no_import_from_a_higher_layer():
    order = layer_order(DOC.read_text())
    subpackages = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").is_file())
    assert sorted(order) == subpackages, f"{DOC.name} layers {order} vs sub-packages of {ROOT}/ {subpackages}"
    bad = layer_violations(graph(), order)
    assert not bad, f"{len(bad)} import(s) from a higher layer ({' < '.join(order)}):\n" + "\n".join(bad)


def test_no_object_patching():
    bad = [line for path in sorted(PKG.rglob("*.py")) for line in patching(path)]
    assert not bad, f"{len(bad)} patched object(s) in {ROOT}/ (docs/architecture.md, 'Adding a parallelism'):\n" + (
        "\n".join(bad)
    )


# -- the checker itself, on planted violations --------------------------------------------------------------
def _write(root: Path, files: Dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "pkg"


def test_checker_finds_planted_cycle_upward_import_and_patching(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/low/__init__.py": "from .a import f\n",
            "pkg/low/a.py": "def f():\n    from ..high import b  # function-level\n",
            "pkg/low/c.py": "import pkg.low.a\n",
            "pkg/high/__init__.py": "",
            "pkg/high/b.py": "from pkg.low.a import f\nfrom ..low import c\n",
            "pkg/high/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import f\n",
            "pkg/high/f.py": "from . import e\n",
            "pkg/high/d.py": "import types\nx.__class__ = int\nm._parameters['w'] = 1\nm.forward = g\n"
            "h = types.MethodType(f, m)\nsetattr(m, 'forward', g)\n",
        },
    )
    edges = graph(pkg)
    assert edges["pkg.low"] == [("pkg.low.a", 1)] and edges["pkg.low.a"] == [("pkg.high.b", 2)]
    assert edges["pkg.high.b"] == [("pkg.low.a", 1), ("pkg.low.c", 2)] and edges["pkg.low.c"] == [("pkg.low.a", 1)]
    assert ["pkg.high.b", "pkg.low.a", "pkg.low.c"] in cycles(edges)
    assert cycle_path(["pkg.high.b", "pkg.low.a", "pkg.low.c"], edges) == (
        "pkg.high.b -(1)-> pkg.low.a -(2)-> pkg.high.b"
    )
    assert cycles({**edges, "pkg.low.a": []}) == [["pkg.high.e", "pkg.high.f"]]
    assert ["pkg.high.e", "pkg.high.f"] in cycles(edges) and ["pkg.high.e", "pkg.high.f"] not in cycles(
        graph(pkg, runtime_only=True)
    )
    assert layer_violations(edges, ["low", "high"], pkg) == ["pkg/low/a.py:2 (low) imports pkg.high.b (high)"]
    assert layer_violations(edges, ["high", "low"], pkg) == [
        "pkg/high/b.py:1 (high) imports pkg.low.a (low)",
        "pkg/high/b.py:2 (high) imports pkg.low.c (low)",
    ]
    found = [line.split(": ", 1)[1] for line in patching(pkg / "high" / "d.py")]
    assert found == [
        "assignment to .__class__",
        "assignment to _parameters[...]",
        "assignment to .forward",
        "types.MethodType",
        "setattr(..., 'forward', ...)",
    ]


def test_layer_line_is_parsed_from_the_doc():
    assert layer_order("text\n\n    a < b_c < d\n\nmore a < b text") == ["a", "b_c", "d"]
    with pytest.raises(AssertionError):
        layer_order("no layer line here")
