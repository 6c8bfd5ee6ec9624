"""The course as a student and an instructor meet it.

* Each handout states its rules as its grader checks them: an answer written from the handout
  alone (``tests/course_answers/``) passes the public and the hidden graders, and an answer that
  follows the old a1 rule ("scale 1 where max|x| / 127 is 0") fails with a message that
  describes its subnormal input truthfully.
* INSTRUCTOR.md's commands work on a fresh machine: the hand-out command with no rsync on PATH
  and a target folder that does not exist, ``--task-report`` into a new nested folder (with an
  overall score).
* One wrong function gives a short report: the grader's message first, no minisq source, and
  the whole first message in the task table, within a line budget.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minisq.course import grading

ROOT = Path(__file__).resolve().parents[1]
COURSE = ROOT / "assignments"
ANSWERS = Path(__file__).resolve().parent / "course_answers"
FOLDERS = ("a1_quantizers", "a2_int8_gemm", "a3_smoothing", "a4_w8a8_model", "a5_new_architecture")
# Lines for one wrong function: pytest's header and footer plus the task table (24), then 3 per
# failing test (its name, the grader's message, the grader line), never pages of tracebacks.
FIXED_LINES, LINES_PER_FAILURE = 24, 3


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MINISQ_SOLUTION"}
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _grade(folder: str, answers: Path, report: Path, *args, cwd=ROOT, env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pytest", f"assignments/{folder}", f"--solution={answers}",
           f"--task-report={report}", "-p", "no:cacheprovider", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(proc, report: Path) -> dict:
    output, _ = proc.communicate(timeout=600)
    assert report.is_file(), output[-3000:]
    return dict(json.loads(report.read_text()), returncode=proc.returncode, output=output)


# --- handout rules == grader rules --------------------------------------------------------------

@pytest.fixture(scope="module")
def handout_answers(tmp_path_factory) -> dict:
    """{folder: the task report of its answer written from the handout, public + hidden graders}."""
    out = tmp_path_factory.mktemp("handout-answers")
    runs = {f: _grade(f, ANSWERS / f"{f}.py", out / f"{f}.json", "-q") for f in FOLDERS}
    return {f: _finish(proc, out / f"{f}.json") for f, proc in runs.items()}


@pytest.mark.parametrize("folder", FOLDERS)
def test_an_answer_written_from_the_handout_passes_its_graders(handout_answers, folder):
    run = handout_answers[folder]
    assert run["returncode"] == 0, run["output"][-4000:]
    assert run["score"]["tasks_passed"] == run["score"]["tasks"] >= 3, run["score"]
    hidden = [t for row in run["tasks"].values() for t in row["tests"] if "grader_hidden.py" in t]
    assert len(hidden) >= 10, "the hidden edge cases ran too"


def test_the_hidden_a1_grader_tries_subnormal_ranges():
    source = (COURSE / "a1_quantizers" / "grader_hidden.py").read_text()
    assert "subnormal-input-float32" in source and "subnormal-quotient-float64" in source


def _old_rule_answer(tmp_path) -> Path:
    """The a1 answer with the handout's former rule: scale 1 only where max|x| / 127 == 0."""
    source = (ANSWERS / "a1_quantizers.py").read_text()
    old = "np.where(scale < np.finfo(scale.dtype).tiny, np.ones_like(scale), scale)"
    assert old in source
    path = tmp_path / "old_rule.py"
    path.write_text(source.replace(old, "np.where(scale == 0, np.ones_like(scale), scale)"))
    return path


def test_the_old_zero_range_rule_fails_with_a_truthful_message(tmp_path):
    report = tmp_path / "old.json"
    run = _finish(_grade("a1_quantizers", _old_rule_answer(tmp_path), report, "-q", "-m", "a1_1 or a1_2 or a1_3"),
                  report)
    for task in ("a1_1", "a1_2", "a1_3"):
        row = run["tasks"][task]
        assert not row["pass"], (task, row)
        messages = [t["message"] for name, t in row["tests"].items() if "subnormal" in name and t["message"]]
        assert len(messages) >= 4, (task, row["tests"].keys())
        for m in messages:
            assert "not zero but tiny" in m and "np.finfo" in m and "all zeros" not in m, m


@pytest.mark.parametrize("dtype, values", [(np.float32, [1e-40, -3e-41]), (np.float32, [1e-37, 5e-38]),
                                           (np.float64, [1e-310, 0.0])])
def test_check_quantized_calls_a_subnormal_group_what_it_is(dtype, values):
    x = np.array([values, [1.0, 2.0]], dtype)
    scale = np.abs(x).max(axis=-1, keepdims=True) / 127
    scale = np.where(scale == 0, 1, scale).astype(dtype)                  # the old rule: row 0 keeps its tiny scale
    q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    with pytest.raises(AssertionError) as err:
        grading.check_quantized("f", q, scale, x, "per_token")
    assert "row 0 is not zero but tiny" in str(err.value) and "all zeros" not in str(err.value)
    zero = np.zeros((1, 2), dtype)
    with pytest.raises(AssertionError, match="row 0 is all zeros"):
        grading.check_quantized("f", np.zeros((1, 2), np.int8), np.zeros((1, 1), dtype), zero, "per_token")


# --- the instructor's commands on a fresh machine ---------------------------------------------------

def _commands(marker: str) -> list:
    """The indented commands of INSTRUCTOR.md that contain ``marker`` (``\\`` continuations joined,
    trailing ``# comments`` dropped)."""
    commands, current = [], ""
    for line in (COURSE / "INSTRUCTOR.md").read_text().splitlines():
        if not line.startswith("    ") and not current:
            continue
        current += " " + line.strip().split("  #")[0].strip()
        if current.endswith("\\"):
            current = current[:-1]
            continue
        commands.append(re.sub(r"\s+", " ", current).strip())
        current = ""
    return [c for c in commands if marker in c]


def test_instructor_commands_work_without_rsync_into_new_folders(tmp_path):
    bin_dir = tmp_path / "bin"                        # a PATH with python and nothing else
    bin_dir.mkdir()
    for name in ("python", "python3"):
        (bin_dir / name).symlink_to(sys.executable)
    env = _env(PATH=str(bin_dir))
    assert shutil.which("rsync", path=env["PATH"]) is None
    handout_cmds = _commands("assignments/handout.py")
    assert len(handout_cmds) >= 2 and not _commands("rsync")
    for i, cmd in enumerate(handout_cmds):
        cwd = tmp_path / f"fresh{i}"
        cwd.mkdir()
        cmd = cmd.replace("assignments/handout.py", str(COURSE / "handout.py"))
        proc = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (cmd, proc.stdout, proc.stderr)
        copied = {p.relative_to(cwd).as_posix() for p in cwd.rglob("*") if p.is_file()}
        assert "handout/assignments/conftest.py" in copied and "handout/assignments/a1_quantizers/student.py" in copied
        assert not [p for p in copied if Path(p).name in ("solution.py", "wrong.py", "grader_hidden.py",
                                                          "INSTRUCTOR.md", "make_stubs.py")], copied
    # a student in the handed-out copy: the stubs fail, a handout answer passes; reports into new nested folders
    student = tmp_path / "fresh0" / "handout"
    stub_report = student / "grades" / "deep" / "stubs.json"
    stubs = _finish(_grade("a1_quantizers", Path("student"), stub_report, "-q", cwd=student, env=env), stub_report)
    assert stubs["score"] == dict(tasks_passed=0, tasks=5, fraction=0.0, tests_passed=0, tests=stubs["score"]["tests"])
    grade_cmd = next(c for c in _commands("--task-report=grades/") if "$" not in c)
    assert "--solution=" in " ".join(_commands("--solution=submissions"))
    alice = student / "submissions" / "alice" / "a1_quantizers"
    alice.mkdir(parents=True)
    alice.joinpath("student.py").write_text((ANSWERS / "a1_quantizers.py").read_text())
    graded = subprocess.run(grade_cmd.replace("pytest ", f"{sys.executable} -m pytest ", 1),
                            shell=True, cwd=student, env=env, capture_output=True, text=True, timeout=300)
    report = json.loads((student / "grades" / "alice-a1.json").read_text())
    assert graded.returncode == 0 and report["score"]["fraction"] == 1.0, graded.stdout[-3000:]


# --- one wrong task: a short report -----------------------------------------------------------------

def test_one_wrong_function_gives_a_short_report(tmp_path):
    source = (ANSWERS / "a1_quantizers.py").read_text()
    right = "    scale = _scale_of(np.abs(x).max(axis=-1, keepdims=True))\n"
    assert right in source
    wrong = tmp_path / "one_wrong.py"
    wrong.write_text(source.replace(right, "    scale = _scale_of(np.abs(x).max(axis=-1, keepdims=True) * 127 / 128)  # /128\n"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "assignments/a1_quantizers", f"--solution={wrong}",
                           "-p", "no:cacheprovider"], cwd=ROOT, env=_env(COLUMNS="100"), capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    lines = out.splitlines()
    assert proc.returncode == 1 and re.search(r"a1_2\s+FAIL", out), out[-3000:]
    failed = int(re.search(r"(\d+) failed", lines[-1]).group(1))
    assert failed == 15 and len(lines) <= FIXED_LINES + LINES_PER_FAILURE * failed, f"{len(lines)} lines:\n{out}"
    assert "minisq/check.py" not in out and "minisq/grading.py" not in out and "def check_quantized" not in out and "raise AssertionError" not in out
    failures = out[out.index("= FAILURES ="):]
    first = failures.splitlines()[2]                       # after the "FAILURES" rule and the test's header
    assert first.startswith("AssertionError: quantize_per_token:") and first.endswith("divide by 127, not 128"), first
    table = out[out.index("task scores"):]
    assert f"first failure: {first}" in table, "the table shows the whole first message"
    assert "score: 4/5 tasks pass" in table


def test_long_tracebacks_stay_available(tmp_path):
    source = (ANSWERS / "a1_quantizers.py").read_text().replace("return q.astype(scale.dtype) * scale",
                                                                   "return q * 1.0")
    wrong = tmp_path / "wrong_dequant.py"
    wrong.write_text(source)
    proc = subprocess.run([sys.executable, "-m", "pytest", "assignments/a1_quantizers", f"--solution={wrong}",
                           "-m", "a1_4", "--tb=long", "-p", "no:cacheprovider", "-q"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "def assert_same_dtype_shape" in proc.stdout, proc.stdout[-2000:]
