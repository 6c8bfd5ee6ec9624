"""Grade a class: ``python assignments/grade_all.py submissions --out grades/grades.csv``.

``submissions/NAME/aK_.../student.py`` is one student's answer to one assignment (any
assignment folder of this course; a missing one is left blank). Each is graded with its
public and hidden tests (``pytest assignments/aK_... --solution=... --task-report=...``, one
JSON report per student and assignment next to the CSV, in ``grades/NAME/aK_....json``), and
the CSV gets one row per student and one column per task marker (``a1_1``, ``a1_2``, ...):
1 when every test of the task passed, 0 when one failed, empty when not handed in; then
``tasks_passed`` and ``tasks``. Grading runs student code: run it in a sandbox.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

COURSE = Path(__file__).resolve().parent


def _tasks() -> list:
    """Every task marker of the course, in order (from conftest.py's TASKS)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_minisq_course_conftest_tasks", COURSE / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.TASKS)


def grade_one(answer: Path, folder: str, report: Path) -> dict:
    """The task report of one answer file (public + hidden tests)."""
    cmd = [sys.executable, "-m", "pytest", str(COURSE / folder), f"--solution={answer.resolve()}",
           f"--task-report={report}", "-q", "-p", "no:cacheprovider"]
    env = {k: v for k, v in os.environ.items() if k != "MINISQ_SOLUTION"}
    proc = subprocess.run(cmd, cwd=COURSE.parent, env=env, capture_output=True, text=True)
    if not report.is_file():
        raise SystemExit(f"grading {answer} wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    return json.loads(report.read_text())


def grade_all(submissions, out) -> list:
    """Grade every ``submissions/NAME/aK/student.py``; write the CSV ``out``; return its rows."""
    submissions, out = Path(submissions), Path(out)
    tasks = _tasks()
    folders = sorted({t.split("_")[0] for t in tasks})            # a1, a2, ...
    names = {p.name.split("_")[0]: p.name for p in COURSE.glob("a*_*") if (p / "grader.py").is_file()}
    rows = []
    for student in sorted(p for p in submissions.iterdir() if p.is_dir()):
        row = {"student": student.name}
        for short in folders:
            answer = student / names[short] / "student.py"
            if not answer.is_file():
                continue
            report = grade_one(answer, names[short], out.parent / student.name / f"{names[short]}.json")
            for task, result in report["tasks"].items():
                row[task] = int(result["pass"])
        graded = [t for t in tasks if t in row]
        row.update(tasks_passed=sum(row[t] for t in graded), tasks=len(graded))
        rows.append(row)
        print(f"{student.name}: {row['tasks_passed']}/{row['tasks']} tasks pass")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["student", *tasks, "tasks_passed", "tasks"], restval="")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out} ({len(rows)} students)")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python assignments/grade_all.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("submissions", help="folder of submissions/NAME/aK_.../student.py")
    ap.add_argument("--out", default="grades/grades.csv", help="the CSV to write (default grades/grades.csv)")
    args = ap.parse_intermixed_args(argv)
    grade_all(args.submissions, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
