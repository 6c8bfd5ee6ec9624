"""The instructor's tools: the hand-out a student installs, and grading a class.

* ``handout.py`` builds minisq's wheel with no answers in it, writes ``requirements.txt`` (the
  wheel, pytest, hypothesis; no torch) and a student README; it takes its options in any
  order, refuses a non-empty destination without ``--force``, and with it never overwrites a
  ``student.py`` a student changed.
* In a fresh venv (no system site-packages), ``pip install -r requirements.txt`` in the
  hand-out is all a student runs; the public graders then work, with no torch importable.
* ``.gitignore`` covers ``handout/``, ``submissions/`` and ``grades/``.
* ``grade_all.py`` grades two students into one CSV.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COURSE = ROOT / "assignments"
ANSWERS = Path(__file__).resolve().parent / "course_answers"
HANDOUT = [sys.executable, str(COURSE / "handout.py")]
ANSWER_FILES = {"solution.py", "wrong.py", "grader_hidden.py", "make_stubs.py", "handout.py", "grade_all.py",
                "INSTRUCTOR.md"}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MINISQ_SOLUTION"}
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _handout(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*HANDOUT, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def handout(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("course") / "handout"
    proc = _handout(str(dest))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dest


def test_the_wheel_holds_minisq_and_no_answers(handout):
    wheels = list((handout / "wheels").glob("minisq-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "minisq/course/grading.py" in names and "minisq/quant.py" in names
    assert not [n for n in names if Path(n).name in ANSWER_FILES or n.startswith("assignments/")
                or "/assignments/" in n], names
    requirements = [line for line in (handout / "requirements.txt").read_text().splitlines()
                    if line and not line.startswith("#")]
    assert requirements == [f"./wheels/{wheels[0].name}", "pytest>=7", "hypothesis>=6"]
    assert "pip install -r requirements.txt" in (handout / "README.md").read_text()
    files = {p.relative_to(handout).as_posix() for p in handout.rglob("*") if p.is_file()}
    assert not [f for f in files if Path(f).name in ANSWER_FILES], files
    assert {f"assignments/{d.name}/student.py" for d in COURSE.glob("a*_*/")} <= files


def test_options_in_any_order(tmp_path):
    for i, args in enumerate([["--only", "a1_quantizers", "DEST"], ["DEST", "--only", "a1_quantizers"],
                              ["--no-wheel", "--only", "a1_quantizers,a3_smoothing", "DEST"]]):
        dest = tmp_path / f"h{i}"
        args = [str(dest) if a == "DEST" else a for a in args]
        if i < 2:
            args.append("--no-wheel")
        proc = _handout(*args)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        folders = sorted(p.name for p in (dest / "assignments").iterdir() if p.is_dir())
        assert folders == (["a1_quantizers"] if i < 2 else ["a1_quantizers", "a3_smoothing"]), folders


def test_refuses_a_non_empty_handout_and_force_keeps_students_work(tmp_path):
    dest = tmp_path / "handout"
    assert _handout(str(dest), "--only", "a1_quantizers", "--only", "a2_int8_gemm", "--no-wheel").returncode == 0
    a1, a2 = dest / "assignments/a1_quantizers/student.py", dest / "assignments/a2_int8_gemm/student.py"
    work = a1.read_text() + "\n# my answers\n"
    a1.write_text(work)                                          # a student's work
    grader = dest / "assignments/a1_quantizers/grader.py"
    grader.write_text("stale")                                   # a file the instructor wants refreshed
    a2.unlink()                                                  # an untouched stub, gone
    again = _handout(str(dest), "--only", "a1_quantizers,a2_int8_gemm", "--no-wheel")
    assert again.returncode != 0 and "--force" in again.stderr + again.stdout and a1.read_text() == work
    forced = _handout("--force", str(dest), "--only", "a1_quantizers,a2_int8_gemm", "--no-wheel")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert a1.read_text() == work, "a student's student.py is never overwritten"
    assert "kept assignments/a1_quantizers/student.py" in forced.stdout
    assert grader.read_text() == (COURSE / "a1_quantizers/grader.py").read_text()
    assert a2.read_text() == (COURSE / "a2_int8_gemm/student.py").read_text()


def test_git_ignores_handout_submissions_grades():
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(ROOT), "rev-parse"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    paths = ["handout/assignments/a1_quantizers/student.py", "submissions/alice/a1_quantizers/student.py",
             "grades/grades.csv", "grades/alice/a1_quantizers.json"]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.split() == paths, proc.stdout + proc.stderr
    kept = subprocess.run(["git", "check-ignore", "--no-index", "assignments/handout.py",
                           "assignments/grade_all.py"], cwd=ROOT, capture_output=True, text=True)
    assert kept.returncode == 1 and not kept.stdout, "the tools themselves stay tracked"


def test_grade_all_two_students_into_one_csv(tmp_path):
    submissions = tmp_path / "submissions"
    alice = submissions / "alice" / "a1_quantizers"
    bob = submissions / "bob" / "a1_quantizers"
    alice.mkdir(parents=True)
    bob.mkdir(parents=True)
    source = (ANSWERS / "a1_quantizers.py").read_text()
    alice.joinpath("student.py").write_text(source)
    right = "    scale = _scale_of(np.abs(x).max(axis=-1, keepdims=True))\n"
    assert right in source
    bob.joinpath("student.py").write_text(source.replace(right, right.replace("keepdims=True))",
                                                                              "keepdims=True) * 127 / 128)")))
    out = tmp_path / "grades" / "grades.csv"
    proc = subprocess.run([sys.executable, str(COURSE / "grade_all.py"), "--out", str(out), str(submissions)],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["student"] for r in rows] == ["alice", "bob"]
    header = list(rows[0])
    assert header[:6] == ["student", "a1_1", "a1_2", "a1_3", "a1_4", "a1_5"] and header[-2:] == ["tasks_passed", "tasks"]
    assert "a5_3" in header and rows[0]["a5_3"] == "" and rows[0]["a2_1"] == "", "not handed in: empty"
    assert [rows[0][f"a1_{i}"] for i in range(1, 6)] == ["1"] * 5 and rows[0]["tasks_passed"] == "5"
    assert [rows[1][f"a1_{i}"] for i in range(1, 6)] == ["1", "0", "1", "1", "1"] and rows[1]["tasks_passed"] == "4"
    assert (tmp_path / "grades" / "bob" / "a1_quantizers.json").is_file()


@pytest.mark.slow
def test_a_student_installs_the_handout_in_a_fresh_venv_without_torch(handout, tmp_path):
    """``pip install -r requirements.txt`` from the package index (numpy, safetensors, tokenizers,
    matplotlib, huggingface_hub, tqdm, pytest, hypothesis) and the hand-out's wheel; then a
    public grader passes a handout answer, and torch is not importable."""
    venv = tmp_path / "venv"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MINISQ_SOLUTION", "VIRTUAL_ENV")}
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                              "requirements.txt"], cwd=handout, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    size = sum(p.stat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink())
    print(f"student install: {seconds:.0f} s, {size / 2**20:.0f} MiB")
    no_torch = subprocess.run([str(python), "-c", "import torch"], env=env, capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    shutil.copy(ANSWERS / "a1_quantizers.py", handout / "answer_a1.py")
    graded = subprocess.run([str(python), "-m", "pytest", "assignments/a1_quantizers", "--solution=answer_a1.py",
                             "-q", "-p", "no:cacheprovider"], cwd=handout, env=env, capture_output=True, text=True,
                            timeout=600)
    assert graded.returncode == 0 and "score: 5/5 tasks pass" in graded.stdout, graded.stdout[-3000:]
    stubs = subprocess.run([str(python), "-m", "pytest", "assignments/a5_new_architecture", "-q",
                            "-p", "no:cacheprovider"], cwd=handout, env=env, capture_output=True, text=True,
                           timeout=600)
    assert stubs.returncode == 1 and "score: 0/3 tasks pass" in stubs.stdout, stubs.stdout[-3000:]


def test_the_course_extra_is_the_light_set():
    tomllib = pytest.importorskip("tomllib")      # Python 3.11+

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {req.split(">")[0].split("=")[0].split("[")[0].strip() for req in extras["course"]}
    assert names == {"pytest", "hypothesis"}, extras["course"]      # what handout.py's requirements.txt adds
    assert "torch" not in " ".join(extras["course"])
