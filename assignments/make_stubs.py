"""Generate every assignment's ``student.py`` from its ``solution.py``, so the two never drift.

    python assignments/make_stubs.py            # (re)write every */student.py
    python assignments/make_stubs.py --check    # exit 1 if a committed student.py is stale

A function (or method) is a task when the first comment of its body is ``# Task i.j``. Its
stub keeps the signature, the docstring and that leading block of comments (the task line
and the shape comments), and its body becomes
``raise NotImplementedError("Task i.j: ...")``. Everything else — imports, constants,
helper functions and classes given to students — is copied verbatim, and the module
docstring gains a header saying the file is generated. Uses ``ast`` for where functions
start and end, and the source lines for everything the AST drops (comments, formatting).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASK = re.compile(r"^\s*#\s*Task\s+(\d+\.\d+)\b")
HEADER = ("# Your answers. GENERATED from solution.py by assignments/make_stubs.py: fill in every\n"
          "# `raise NotImplementedError`, keep the signatures, and run the grader (see HANDOUT.md).\n")


def _leading_comments(lines: list, start: int) -> list:
    """The block of comment lines that starts at line index ``start`` (0-based)."""
    block = []
    for line in lines[start:]:
        if not line.strip().startswith("#"):
            break
        block.append(line)
    return block


def _functions(tree: ast.Module):
    """(qualified name, node) of every module-level function and method of a module-level class."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{item.name}", item


def task_functions(tree: ast.Module, lines: list) -> list:
    """``(qualified name, node, task id, index of the line after the docstring, comment lines)``
    for every function whose docstring is followed by a ``# Task i.j`` comment."""
    found = []
    for qualname, node in _functions(tree):
        first = node.body[0]
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)):
            continue  # no docstring: not a task (checked below)
        comments = _leading_comments(lines, first.end_lineno)
        match = TASK.match(comments[0]) if comments else None
        if match:
            found.append((qualname, node, match.group(1), first.end_lineno, comments))
    marked = sum(bool(TASK.match(line)) for line in lines)
    if marked != len(found):
        raise ValueError(f"{marked} '# Task' comments but {len(found)} task functions: a '# Task i.j' comment "
                         f"must be the first line after the docstring of a function or method")
    return found


def make_stub(source: str) -> str:
    """The student.py text for a solution.py text."""
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    tasks = task_functions(tree, lines)
    if not tasks:
        raise ValueError("no '# Task i.j' functions found")
    # Replace bodies from the bottom up, so earlier line numbers stay valid.
    for qualname, node, task, after, comments in sorted(tasks, key=lambda t: -t[1].lineno):
        indent = re.match(r"\s*", comments[0]).group(0)
        raise_line = (f'{indent}raise NotImplementedError("Task {task}: implement {qualname} '
                      f'(see HANDOUT.md)")\n')
        lines[after:node.end_lineno] = comments + [raise_line]
    text = "".join(lines)
    return HEADER + text


def assignment_folders(root: Path) -> list:
    return sorted(p.parent for p in root.glob("*/solution.py"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a student.py is stale")
    parser.add_argument("--root", type=Path, default=HERE, help="the assignments folder (default: this one)")
    args = parser.parse_args(argv)
    stale = []
    for folder in assignment_folders(args.root):
        want = make_stub((folder / "solution.py").read_text(encoding="utf-8"))
        path = folder / "student.py"
        have = path.read_text(encoding="utf-8") if path.is_file() else ""
        if have == want:
            continue
        if args.check:
            stale.append(path)
            diff = difflib.unified_diff(have.splitlines(True), want.splitlines(True),
                                        f"{path} (committed)", f"{path} (generated)", n=1)
            sys.stdout.writelines(list(diff)[:40])
        else:
            path.write_text(want, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"\n{len(stale)} student.py file(s) differ from their solution.py: run "
              f"python assignments/make_stubs.py and commit the result", file=sys.stderr)
        return 1
    if args.check:
        print(f"all {len(assignment_folders(args.root))} student.py files are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
