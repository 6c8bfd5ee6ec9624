"""Copy the course for students, without the instructor files: ``python assignments/handout.py DEST``.

Writes ``DEST/assignments/`` (creating DEST and any missing parent folders) with every
assignment folder's HANDOUT.md, student.py and grader.py, plus the shared conftest.py and
pytest.ini. Left out: :data:`INSTRUCTOR_ONLY` (reference answers, planted mistakes, hidden
tests, tools) and caches. Plain Python (no rsync), so it works on a fresh machine:

    python assignments/handout.py handout                       # the whole course
    python assignments/handout.py handout --only a1_quantizers  # one assignment (+ conftest, pytest.ini)

Students then run ``pytest assignments/a1_quantizers`` inside DEST.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

COURSE = Path(__file__).resolve().parent
INSTRUCTOR_ONLY = ("solution.py", "wrong.py", "grader_hidden.py", "make_stubs.py", "handout.py", "INSTRUCTOR.md")
SHARED = ("conftest.py", "pytest.ini")
IGNORED = ("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")


def assignment_folders(only=None) -> list:
    """The assignment folders (a1_..., a2_...), or those named in ``only``."""
    folders = sorted(p for p in COURSE.glob("a*_*") if (p / "student.py").is_file())
    if only:
        unknown = set(only) - {p.name for p in folders}
        if unknown:
            raise SystemExit(f"unknown assignment(s) {sorted(unknown)}; there are {[p.name for p in folders]}")
        folders = [p for p in folders if p.name in only]
    return folders


def hand_out(dest, only=None) -> list:
    """Copy the student files into ``dest/assignments``; returns the files written (relative to dest)."""
    target = Path(dest) / "assignments"
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SHARED:
        shutil.copy2(COURSE / name, target / name)
        written.append(f"assignments/{name}")
    skip = shutil.ignore_patterns(*INSTRUCTOR_ONLY, *IGNORED)
    for folder in assignment_folders(only):
        shutil.copytree(folder, target / folder.name, ignore=skip, dirs_exist_ok=True)
        written += sorted(f"assignments/{folder.name}/{p.name}" for p in (target / folder.name).iterdir())
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python assignments/handout.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("dest", help="folder to write assignments/ into (created if missing)")
    ap.add_argument("--only", nargs="+", metavar="FOLDER", help="only these assignment folders, e.g. a1_quantizers")
    args = ap.parse_args(argv)
    written = hand_out(args.dest, args.only)
    print(f"wrote {len(written)} files under {Path(args.dest) / 'assignments'}:")
    for name in written:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
