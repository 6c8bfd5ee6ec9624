"""Make the students' hand-out: ``python assignments/handout.py DEST [--only FOLDER] [--force]``.

Writes into DEST (created with its parents if missing):

* ``assignments/``: every assignment folder's HANDOUT.md, student.py and grader.py, plus the
  shared conftest.py and pytest.ini. Left out: :data:`INSTRUCTOR_ONLY` (reference answers,
  planted mistakes, hidden tests, tools) and caches.
* ``wheels/minisq-<version>-py3-none-any.whl``: minisq itself, built from this repository
  (the package only: no ``assignments/``, no answers).
* ``requirements.txt``: that wheel, pytest and hypothesis (no torch), and ``README.md``: how
  a student installs and runs the graders (``pip install -r requirements.txt``).
* ``.handout-manifest.json``: the SHA-256 of every file written.

Options go in any order. A DEST that is not empty is refused without ``--force``; with it,
files are rewritten, except a ``student.py`` whose content differs from what the manifest
says was handed out (a student's work), which is kept. Plain Python (no rsync):

    python assignments/handout.py handout                       # the whole course
    python assignments/handout.py --only a1_quantizers handout  # one assignment (+ conftest, pytest.ini)
    python assignments/handout.py handout --force               # refresh; students' work is kept
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

COURSE = Path(__file__).resolve().parent
REPO = COURSE.parent
INSTRUCTOR_ONLY = ("solution.py", "wrong.py", "grader_hidden.py", "make_stubs.py", "handout.py", "grade_all.py",
                   "INSTRUCTOR.md")
SHARED = ("conftest.py", "pytest.ini")
IGNORED = ("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
MANIFEST = ".handout-manifest.json"
# What a student installs: minisq's wheel plus the graders' test tools; torch and transformers
# (minisq's own test oracle) are not needed by any public grader.
REQUIREMENTS = ("pytest>=7", "hypothesis>=6")
README = """\
# minisq course: your hand-out

## Install (once)

In a fresh virtual environment, from this folder:

    python -m venv .venv
    . .venv/bin/activate            # Windows: .venv\\Scripts\\activate
    pip install -r requirements.txt

That installs minisq (the wheel in `wheels/`), pytest and hypothesis; nothing else is needed.

## Work and grade yourself

Each assignment is a folder under `assignments/`: read its `HANDOUT.md`, fill in every
`raise NotImplementedError` of its `student.py`, and run its grader from this folder:

    pytest assignments/a1_quantizers             # every task of assignment 1
    pytest assignments/a1_quantizers -m a1_2     # Task 1.2 only

The run ends with a score per task. Each HANDOUT.md says which minisq functions you may use;
a task that calls minisq's own answer to that very task fails with a message saying so.
Hand in your `student.py` files.
"""


def assignment_folders(only=None) -> list:
    """The assignment folders (a1_..., a2_...), or those named in ``only``."""
    folders = sorted(p for p in COURSE.glob("a*_*") if (p / "student.py").is_file())
    if only:
        unknown = set(only) - {p.name for p in folders}
        if unknown:
            raise SystemExit(f"unknown assignment(s) {sorted(unknown)}; there are {[p.name for p in folders]}")
        folders = [p for p in folders if p.name in only]
    return folders


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_wheel(out: Path) -> Path:
    """minisq's wheel, built from the repository with pip: with the installed setuptools (no
    network), or, if that fails (too old for pyproject.toml), in pip's isolated build environment."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"        # a clean copy: a stale build/ in the repository never reaches the wheel
        shutil.copytree(REPO / "minisq", src / "minisq", ignore=shutil.ignore_patterns(*IGNORED))
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (REPO / name).is_file():
                shutil.copy2(REPO / name, src / name)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", tmp]
        proc = subprocess.run(cmd[:4] + ["--no-build-isolation"] + cmd[4:], capture_output=True, text=True)
        if proc.returncode != 0:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("minisq-*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise SystemExit(f"building minisq's wheel failed ({' '.join(cmd)}):\n{proc.stdout}{proc.stderr}")
        out.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(wheels[0], out / wheels[0].name))


def _files(only) -> list:
    """(source, path relative to DEST) of every course file handed out."""
    files = [(COURSE / name, f"assignments/{name}") for name in SHARED]
    skip = set(INSTRUCTOR_ONLY)
    for folder in assignment_folders(only):
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name not in skip and path.suffix != ".pyc":
                files.append((path, f"assignments/{folder.name}/{path.name}"))
    return files


def hand_out(dest, only=None, force: bool = False, wheel: bool = True) -> dict:
    """Write the hand-out into ``dest``; returns ``{"written": [...], "kept": [...]}`` (paths
    relative to dest). ``kept`` lists the student.py files a student changed, left as they are."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()) and not force:
        raise SystemExit(f"{dest} is not empty: it may hold students' work. Pass --force to refresh it "
                         f"(a student.py that differs from the one handed out is kept)")
    manifest_path = dest / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    written, kept = [], []
    for source, rel in _files(only):
        target = dest / rel
        if target.name == "student.py" and target.is_file() and manifest.get(rel) != sha256(target):
            kept.append(rel)                  # a student's work: never overwritten
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        written.append(rel)
    if wheel:
        for old in (dest / "wheels").glob("minisq-*.whl"):
            old.unlink()
        whl = build_wheel(dest / "wheels")
        (dest / "requirements.txt").write_text(
            "# pip install -r requirements.txt   (from this folder)\n"
            + "\n".join([f"./wheels/{whl.name}", *REQUIREMENTS]) + "\n")
        (dest / "README.md").write_text(README)
        written += [f"wheels/{whl.name}", "requirements.txt", "README.md"]
    manifest.update({rel: sha256(dest / rel) for rel in written})
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")
    return {"written": written, "kept": kept}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python assignments/handout.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("dest", help="folder to write the hand-out into (created if missing)")
    ap.add_argument("--only", action="append", metavar="FOLDER",
                    help="only this assignment folder, e.g. a1_quantizers (repeat it, or separate with commas)")
    ap.add_argument("--force", action="store_true",
                    help="write into a non-empty DEST; a student.py a student changed is still kept")
    ap.add_argument("--no-wheel", action="store_true",
                    help="copy the course files only (no wheel, requirements.txt or README.md)")
    args = ap.parse_intermixed_args(argv)
    only = [name for value in args.only or () for name in value.split(",") if name]
    result = hand_out(args.dest, only or None, force=args.force, wheel=not args.no_wheel)
    print(f"wrote {len(result['written'])} files under {args.dest}:")
    for name in result["written"]:
        print(f"  {name}")
    for name in result["kept"]:
        print(f"  kept {name} (changed since it was handed out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
