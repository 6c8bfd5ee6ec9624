"""Does a submission use minisq's own answer to a task? Read its source with ``ast``.

minisq is installed for every student, and it holds the reference answer of every task. Each
task declares the minisq names that *are* its answer (assignments/conftest.py,
``MINISQ_ANSWERS``); :func:`borrowed` finds every use of those names in a submission's
source, however it is spelled:

    import minisq;                       minisq.quantize_per_token(x)
    import minisq as m;                  m.quant.quantize_per_token(x)
    import minisq.quant as mq;           mq.quantize_per_token(x)
    from minisq.quant import quantize_per_token
    from minisq import quantize_per_token as q
    smooth_model = minisq.smooth         (an assignment: the alias is followed)
    getattr(minisq, "smooth")            (a constant attribute name)
    from minisq.quant import *           (any answer name that module has)

A use is a reference whose *last* dotted part is an answer name: ``minisq.smooth.mappings_for``
uses ``mappings_for``, not ``smooth``. Code that builds names at run time (``importlib``,
computed strings) is not seen: this catches a borrowed answer, not a determined cheat.
"""

from __future__ import annotations

import ast
import importlib
import re

ROOT = "minisq"


def _dotted(node, aliases: dict):
    """The minisq path an expression names (``m.quant.f`` -> ``minisq.quant.f``), or None."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)):
        base = _dotted(node.args[0], aliases)
        return f"{base}.{node.args[1].value}" if base else None
    return None


def _aliases(tree) -> dict:
    """local name -> the minisq path it is bound to, by imports and by assignments (to a fixed point)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == ROOT or a.name.startswith(ROOT + "."):
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else ROOT
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module and (
                node.module == ROOT or node.module.startswith(ROOT + ".")):
            for a in node.names:
                if a.name != "*":
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for _ in range(3):   # names bound to minisq objects by assignment (x = minisq.smooth)
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                path = _dotted(node.value, aliases)
                for target in node.targets:
                    if path and isinstance(target, ast.Name):
                        aliases[target.id] = path
    return aliases


def _scopes(tree) -> list:
    """(scope, statement) for every statement: a top-level function's or method's qualified name,
    or "<module>" for code outside them."""
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((node.name, node))
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                is_fn = isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                out.append((f"{node.name}.{item.name}" if is_fn else "<module>", item))
        else:
            out.append(("<module>", node))
    return out


def _binds(node) -> set:
    """The names a module-level statement binds (imports, assignments, star imports as '*')."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {"*" if a.name == "*" else (a.asname or a.name.split(".")[0]) for a in node.names}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    return set()


def minisq_references(source: str) -> list:
    """``(dotted path, line, scope)`` of every use of a minisq name in ``source``: attribute
    chains and names bound to minisq, per function (``scope``), and, at module level, the
    imports and assignments themselves (``"<module>"``, with ``module + ".*"`` for a star import)."""
    tree = ast.parse(source)
    aliases, refs = _aliases(tree), []
    for scope, stmt in _scopes(tree):
        for node in ast.walk(stmt):
            if isinstance(node, ast.ImportFrom) and node.module and (node.module == ROOT or node.module.startswith(
                    ROOT + ".")) and not node.level:
                refs += [(f"{node.module}.{a.name}", node.lineno, scope) for a in node.names]
            elif isinstance(node, ast.Import):
                refs += [(a.name, node.lineno, scope) for a in node.names if a.name.split(".")[0] == ROOT]
            elif isinstance(node, (ast.Name, ast.Attribute, ast.Call)):
                path = _dotted(node, aliases)
                if path and not (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)):
                    refs.append((path, node.lineno, scope))
    return sorted(set(refs), key=lambda r: (r[1], r[0], r[2]))


def task_functions(source: str) -> dict:
    """``{"1.2": ["quantize_per_token"], ...}``: the functions and methods whose body starts,
    after the docstring, with a ``# Task i.j`` comment (the stubs' layout: make_stubs.py)."""
    lines = source.splitlines()
    tasks = {}
    for scope, node in _scopes(ast.parse(source)):
        if scope == "<module>" or not node.body:
            continue
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            after = lines[first.end_lineno].strip() if first.end_lineno < len(lines) else ""
            match = re.match(r"#\s*Task\s+(\d+\.\d+)\b", after)
            if match:
                tasks.setdefault(match.group(1), []).append(scope)
    return tasks


def _star_names(module: str) -> set:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return set()
    return set(getattr(mod, "__all__", None) or (n for n in vars(mod) if not n.startswith("_")))


def borrowed(source: str, answers, task: str | None = None, layout: str | None = None) -> list:
    """``(name, line)`` for every use in ``source`` of a minisq name listed in ``answers`` (bare
    names such as ``"quantize_per_token"``), first use first.

    With ``task`` (``"1.2"``), only what that task runs counts: its own functions, helper
    functions that are no task's, and module-level statements that bind a task function's
    name (``smooth_model = minisq.smooth``) or star-import from minisq; another task's function
    does not. Which function is which task's is read from ``layout`` (the stub's source; the
    submission's own ``# Task`` comments by default)."""
    answers = set(answers)
    tasks = task_functions(layout if layout is not None else source)
    mine = set(tasks.get(task, ())) if task else None
    others = {f for t, fns in tasks.items() if t != task for f in fns}
    task_names = {f.split(".")[0] for f in mine or ()}      # a class, for a method
    module_binds = {}
    for scope, stmt in _scopes(ast.parse(source)):
        if scope == "<module>":
            for line in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1):
                module_binds[line] = _binds(stmt)
    defined = {n.name for n in ast.parse(source).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    found = {}
    for path, line, scope in minisq_references(source):
        if mine is not None:
            if scope in others:
                continue
            if scope == "<module>":
                binds = module_binds.get(line, set())
                if "*" not in binds and not (binds & (task_names - defined)):
                    continue
        last = path.rsplit(".", 1)[-1]
        names = answers & _star_names(path[:-2]) if last == "*" else ({last} & answers)
        for name in names:
            found.setdefault(name, line)
    return sorted(found.items(), key=lambda item: (item[1], item[0]))


def borrowed_message(task: str, source: str, answers, layout: str | None = None) -> str:
    """The one line a student reads when task ``i.j`` uses minisq's own answer, or ``""``."""
    uses = borrowed(source, answers, task, layout)
    if not uses:
        return ""
    name, line = uses[0]
    return f"task {task} calls minisq's own {name}: write it yourself (line {line} of your file)"
