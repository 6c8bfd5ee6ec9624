"""The package's shape: no import cycles anywhere (imports inside functions count), every
module importable on its own, no module longer than a reader can hold, and the public API."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minisq"
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph() -> dict:
    """module -> the minisq modules it imports, at any depth of its code (functions too)."""
    modules = _modules()
    graph = {}
    for mod, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = _resolve(mod, path.name == "__init__.py", node.level, node.module)
                else:
                    base = node.module or ""
                subs = [f"{base}.{a.name}" for a in node.names]
                # "from . import nn" imports the submodule nn, not the package's own names
                targets = subs if any(t in modules for t in subs) else [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in modules and t != mod:
                    deps.add(t)
        # a package's __init__ is imported with any of its submodules, but it is not a dependency
        # edge the other way: importing minisq.io.x runs minisq/io/__init__ first, which is fine
        graph[mod] = deps
    return graph


def find_cycles(graph: dict) -> list:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def _package_edges_only(graph: dict) -> dict:
    # minisq/__init__ re-exports from its modules; submodules never import the top package
    return {m: {d for d in deps if d != "minisq"} for m, deps in graph.items()}


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_minisq_counting_imports_inside_functions():
    graph = _package_edges_only(import_graph())
    assert len(graph) > 30
    assert find_cycles(graph) == []


def test_no_submodule_imports_the_top_package():
    offenders = [m for m, deps in import_graph().items() if "minisq" in deps and m != "minisq"
                 and not m.startswith("minisq.cli")]
    assert offenders == []


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m != "minisq.__main__"))
def test_each_module_imports_alone(module):
    # a fresh interpreter per module: no import order hides a cycle
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT,
                   env={"PYTHONPATH": str(ROOT), "PATH": "", "MPLBACKEND": "Agg"})


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
