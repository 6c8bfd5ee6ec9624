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


def minisq_references(source: str) -> list:
    """``(dotted path, line)`` of every reference to a minisq name in ``source``, and
    ``(module + ".*", line)`` for a star import from a minisq module."""
    tree = ast.parse(source)
    aliases, refs = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == ROOT or a.name.startswith(ROOT + "."):
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        aliases[a.name.split(".")[0]] = ROOT
                    refs.append((a.name, node.lineno))
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module and (
                node.module == ROOT or node.module.startswith(ROOT + ".")):
            for a in node.names:
                path = f"{node.module}.{a.name}"
                if a.name != "*":
                    aliases[a.asname or a.name] = path
                refs.append((path, node.lineno))
    for _ in range(3):   # names bound to minisq objects by assignment (x = minisq.smooth), to a fixed point
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                path = _dotted(node.value, aliases)
                for target in node.targets:
                    if path and isinstance(target, ast.Name):
                        aliases[target.id] = path
    for node in ast.walk(tree):
        if isinstance(node, (ast.Name, ast.Attribute, ast.Call)):
            path = _dotted(node, aliases)
            if path:
                refs.append((path, node.lineno))
    return sorted(set(refs), key=lambda r: (r[1], r[0]))


def _star_names(module: str) -> set:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return set()
    return set(getattr(mod, "__all__", None) or (n for n in vars(mod) if not n.startswith("_")))


def borrowed(source: str, answers) -> list:
    """``(name, line)`` for every use in ``source`` of a minisq name listed in ``answers``
    (bare names such as ``"quantize_per_token"``), first use of each name first."""
    answers = set(answers)
    found = {}
    for path, line in minisq_references(source):
        last = path.rsplit(".", 1)[-1]
        names = answers & _star_names(path[:-2]) if last == "*" else ({last} & answers)
        for name in names:
            found.setdefault(name, line)
    return sorted(found.items(), key=lambda item: (item[1], item[0]))


def borrowed_message(task: str, source: str, answers) -> str:
    """The one line a student reads when task ``i.j`` uses minisq's own answer, or ``""``."""
    uses = borrowed(source, answers)
    if not uses:
        return ""
    name, line = uses[0]
    return f"task {task} calls minisq's own {name}: write it yourself (line {line} of your file)"
