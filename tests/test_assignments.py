"""The course in assignments/: graders against answers, stubs, mistakes; new checks.

Every grader runs in a subprocess (one per answer set, in parallel) and reports its outcome
per task marker as JSON (the graders' ``--task-report``): the reference solutions pass every
task, the generated stubs fail every test of every task, and each planted mistake in
``wrong.py`` fails exactly its own task with a message that names the mistake. Then
``make_stubs.py --check``, and unit tests of the ``minisq.course.grading`` functions the graders use.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minisq
from minisq.course import grading as check
from minisq.config import ModelConfig
from minisq.gemm import int8_gemm_reference
from minisq.nn import Linear
from minisq.quant import QUANTIZERS

ROOT = Path(__file__).resolve().parents[1]
COURSE = ROOT / "assignments"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


COURSE_CONFTEST = _load(COURSE / "conftest.py", "_minisq_course_conftest")
MAKE_STUBS = _load(COURSE / "make_stubs.py", "_minisq_make_stubs")
TASKS = COURSE_CONFTEST.TASKS
FOLDERS = sorted(p.parent for p in COURSE.glob("a*/solution.py"))

# task marker -> a fragment of the message its planted mistake (wrong.py) must produce
WRONG = {
    "a1_2": "divide by 127, not 128",
    "a1_3": "round to the nearest integer with np.rint",
    "a1_5": "wrapped it around",
    "a2_1": "16-bit accumulator",
    "a2_2": "where float32 no longer holds every integer",
    "a2_3": "you left out the bias",
    "a3_1": "a channel that never fires",
    "a3_2": "you multiplied the LayerNorm",
    "a4_1": "take max(|x|), not max(x)",
    "a4_2": "mean of the channel ranges",
    "a5_1": "forgets layers.{i}.mlp.gate_proj, which also reads",
    "a5_2": "they must share one factor, from the max of their ranges",
}


# --- the graders, run once per answer set -------------------------------------------------------

@pytest.fixture(scope="session")
def grades(tmp_path_factory) -> dict:
    """{choice: the JSON task report of ``pytest assignments --solution=choice``}."""
    out = tmp_path_factory.mktemp("grades")
    env = {k: v for k, v in os.environ.items() if k != "MINISQ_SOLUTION"}
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # 3 runs share the cores
    runs = {}
    for choice in ("solution", "student", "wrong"):
        report = out / f"{choice}.json"
        cmd = [sys.executable, "-m", "pytest", str(COURSE), f"--solution={choice}", f"--task-report={report}",
               "-q", "-p", "no:cacheprovider"]
        runs[choice] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True), report)
    results = {}
    for choice, (proc, report) in runs.items():
        output, _ = proc.communicate(timeout=600)
        assert report.is_file(), f"--solution={choice} wrote no task report (exit {proc.returncode}):\n{output[-4000:]}"
        results[choice] = dict(json.loads(report.read_text()), returncode=proc.returncode, output=output)
    return results


def test_reference_solutions_pass_every_task(grades):
    run = grades["solution"]
    assert run["returncode"] == 0, run["output"][-4000:]
    assert set(run["tasks"]) == set(TASKS), "every task needs at least one grader test"
    for task, row in run["tasks"].items():
        assert row["failed"] == 0 and row["skipped"] == 0 and row["passed"] >= 2, (task, row)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_stubs_fail_every_test_of_every_task(grades, task):
    """No grader test passes an empty answer, and each fails *because* the task is unimplemented."""
    row = grades["student"]["tasks"][task]
    assert row["passed"] == 0 and row["skipped"] == 0 and row["failed"] >= 2, row
    for nodeid, result in row["tests"].items():
        assert "NotImplementedError" in result["message"], (nodeid, result["message"])
        assert f"Task {task[1]}.{task.split('_')[1]}" in result["message"], (nodeid, result["message"])


def test_wrong_answers_fail_exactly_their_tasks(grades):
    run = grades["wrong"]
    failed = {task for task, row in run["tasks"].items() if row["failed"]}
    assert failed == set(WRONG), run["output"][-4000:]
    assert {task.split("_")[0] for task in WRONG} == {f.name.split("_")[0] for f in FOLDERS}, \
        "every assignment plants at least one mistake"


@pytest.mark.parametrize("task", sorted(WRONG))
def test_wrong_answer_is_caught_with_an_actionable_message(grades, task):
    messages = [t["message"] for t in grades["wrong"]["tasks"][task]["tests"].values() if t["outcome"] == "failed"]
    assert any(WRONG[task] in m for m in messages), (WRONG[task], messages[:3])


def test_grader_summary_lists_a_score_per_task(grades):
    out = grades["wrong"]["output"]
    assert re.search(r"a1_2\s+FAIL", out) and re.search(r"a1_1\s+PASS", out), out[-3000:]


# --- the stubs ----------------------------------------------------------------------------------

def test_task_table_matches_the_task_comments():
    marked = set()
    for folder in FOLDERS:
        for line in (folder / "solution.py").read_text().splitlines():
            m = MAKE_STUBS.TASK.match(line)
            if m:
                i, j = m.group(1).split(".")
                assert folder.name.startswith(f"a{i}_"), f"{folder.name}: Task {m.group(1)}"
                marked.add(f"a{i}_{j}")
    assert marked == set(TASKS)


def test_make_stubs_check_passes_on_the_committed_stubs():
    proc = subprocess.run([sys.executable, str(COURSE / "make_stubs.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_make_stubs_check_catches_drift_and_regenerates(tmp_path, capsys):
    folder = tmp_path / "a1_quantizers"
    folder.mkdir()
    shutil.copy(COURSE / "a1_quantizers" / "solution.py", folder)
    (folder / "student.py").write_text((COURSE / "a1_quantizers" / "student.py").read_text() + "\n# edited\n")
    assert MAKE_STUBS.main(["--check", "--root", str(tmp_path)]) == 1
    assert "# edited" in capsys.readouterr().out
    assert MAKE_STUBS.main(["--root", str(tmp_path)]) == 0
    assert MAKE_STUBS.main(["--check", "--root", str(tmp_path)]) == 0


def test_make_stubs_refuses_a_misplaced_task_comment():
    with pytest.raises(ValueError, match="first line after the docstring"):
        MAKE_STUBS.make_stub('def f(x):\n    y = x\n    # Task 9.9\n    return y\n')


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_stubs_keep_signatures_docstrings_and_raise(folder):
    solution = COURSE_CONFTEST.load_answers(folder, "solution")
    student = COURSE_CONFTEST.load_answers(folder, "student")
    source = (folder / "solution.py").read_text()
    tasks = MAKE_STUBS.task_functions(ast.parse(source), source.splitlines(keepends=True))
    assert tasks
    for qualname, _, task, _, _ in tasks:
        ref, stub = solution, student
        for part in qualname.split("."):
            ref, stub = getattr(ref, part), getattr(stub, part)
        assert inspect.signature(stub) == inspect.signature(ref), qualname
        assert stub.__doc__ == ref.__doc__ and ref.__doc__, qualname
        assert f'raise NotImplementedError("Task {task}: implement {qualname}' in inspect.getsource(stub)
        assert "NotImplementedError" not in inspect.getsource(ref)


# --- the minisq.course.grading functions the graders use ---------------------------------------------------

def _x(shape, dtype=np.float32, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape)
    x[..., ::3] *= 20
    return x.astype(dtype)


def _fails(fn, *args, match: str, **kwargs):
    with pytest.raises(AssertionError, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("granularity", sorted(QUANTIZERS))
@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_check_quantized_accepts_minisq_itself(granularity, data):
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    shape = data.draw(hnp.array_shapes(min_dims=2, max_dims=2 if granularity == "per_channel" else 3, max_side=6))
    mag = float(dtype(data.draw(st.sampled_from([0.0, 1e-3, 1.0, 1e5]))))   # exact in dtype
    x = data.draw(hnp.arrays(dtype, shape, elements=st.floats(-mag, mag, width=8 * np.dtype(dtype).itemsize)))
    check.check_quantized("f", *QUANTIZERS[granularity](x), x, granularity)


def test_check_quantized_names_the_mistake():
    x = _x((4, 6))
    q, s = minisq.quantize_per_token(x)
    check.check_quantized("f", q, s, x, "per_token")
    absmax = np.abs(x).max(-1, keepdims=True)
    _fails(check.check_quantized, "f", q, absmax / 128, x, "per_token", match=r"row 0: .*divide by 127, not 128")
    _fails(check.check_quantized, "f", q, np.full_like(s, np.abs(x).max() / 127), x, "per_token",
           match="max over the whole tensor")
    _fails(check.check_quantized, "f", q, s[:, 0], x, "per_token", match="keepdims=True")
    _fails(check.check_quantized, "f", q, s.astype(np.float64), x, "per_token", match="in x's dtype")
    _fails(check.check_quantized, "f", q.astype(np.int32), s, x, "per_token", match="expected int8")
    _fails(check.check_quantized, "f", np.clip(x / s, -127, 127).astype(np.int8), s, x, "per_token",
           match="was cut to .* np.rint")
    z = x.copy()
    z[2] = 0
    qz, sz = minisq.quantize_per_token(z)
    bad = sz.copy()
    bad[2] = np.nan
    _fails(check.check_quantized, "f", qz, bad, z, "per_token", match="row 2 is all zeros.*zero-range guard")


def test_check_quantized_static_clipping_and_ties():
    x = np.array([[300.0, -2.5, 1.0, -140.0]], np.float32)
    q, s = minisq.quantize_per_tensor(x, 1.0)
    check.check_quantized("f", q, s, x, "per_tensor", static_scale=1.0)
    wrapped = np.rint(x / s).astype(np.int64).astype(np.int8)
    _fails(check.check_quantized, "f", wrapped, s, x, "per_tensor", static_scale=1.0, match="wrapped it around")
    _fails(check.check_quantized, "f", q, np.asarray(2.0, np.float32), x, "per_tensor", static_scale=1.0,
           match="return the scale you were given")
    away = q.copy()
    away[0, 1] = -3                                  # round half away from zero
    _fails(check.check_quantized, "f", away, s, x, "per_tensor", static_scale=1.0, match="is a tie")
    low = q.copy()
    low[0, 3] = -128
    _fails(check.check_quantized, "f", low, s, x, "per_tensor", static_scale=1.0, match="symmetric range")


def test_check_int_gemm_names_the_mistake():
    rng = np.random.default_rng(0)
    a = rng.integers(100, 128, (3, 40)).astype(np.int8)
    b = rng.integers(100, 128, (40, 4)).astype(np.int8)
    want = int8_gemm_reference(a, b)
    check.check_int_gemm("g", want, a, b)
    wrapped16 = (a.astype(np.int16) @ b.astype(np.int16)).astype(np.int32)
    _fails(check.check_int_gemm, "g", wrapped16, a, b, match="16-bit accumulator")
    wrapped8 = (a[:, :, None] * b[None, :, :]).sum(axis=1, dtype=np.int32)   # int8 products wrap
    _fails(check.check_int_gemm, "g", wrapped8, a, b, match="2\\^8 = 256")
    _fails(check.check_int_gemm, "g", want.T.copy(), a, b, match="transposed")
    _fails(check.check_int_gemm, "g", want.astype(np.int64), a, b, match="cast the result")
    _fails(check.check_int_gemm, "g", want.astype(np.float32), a, b, match="exact integers")
    big_a = np.full((1, 3001), 127, np.int8)
    big_b = np.where(rng.random((3001, 2)) < 0.9, 127, -127).astype(np.int8)
    unblocked = (big_a.astype(np.float32) @ big_b.astype(np.float32)).astype(np.int32)
    if not np.array_equal(unblocked, int8_gemm_reference(big_a, big_b)):   # BLAS may sum in a lucky order
        _fails(check.check_int_gemm, "g", unblocked, big_a, big_b, match="2\\^24")
    _fails(check.check_int_gemm, "g", (big_a.astype(np.float64) @ big_b).astype(np.int32) + 1, big_a, big_b,
           match="2\\^24")


def test_check_epilogue_names_the_mistake():
    acc = np.random.default_rng(0).integers(-2**20, 2**20, (3, 4)).astype(np.int32)
    row = np.array([[0.1], [0.2], [0.3]], np.float32)
    col = np.array([1e-3, 2e-3, 3e-3, 4e-3], np.float32)
    bias = np.array([1.0, -2.0, 3.0, -4.0], np.float32)
    y = minisq.dequant_epilogue(acc, row, col, bias)
    check.check_epilogue("e", y, acc, row, col, bias)
    check.check_epilogue("e", (acc * row * col + bias).astype(np.float32), acc, row, col, bias)  # 2 roundings: ok
    _fails(check.check_epilogue, "e", y - bias, acc, row, col, bias, match="left out the bias")
    _fails(check.check_epilogue, "e", (acc * row + bias).astype(np.float32), acc, row, col, bias,
           match="only the row")
    _fails(check.check_epilogue, "e", ((acc + bias) * row * col).astype(np.float32), acc, row, col, bias,
           match="added before scaling")
    _fails(check.check_epilogue, "e", y.astype(np.float64), acc, row, col, bias, match="out_dtype=float32")


def test_check_smoothing_factors_names_the_rule():
    act, w = np.array([4.0, 0.0, 9.0, 1e-30]), np.array([1.0, 2.0, 0.0, 5.0])
    s = minisq.smoothing_factors(act, w, 0.5)
    check.check_smoothing_factors("s", s, act, w, 0.5)
    forgot_silent = s.copy()
    forgot_silent[1] = 1e-5
    _fails(check.check_smoothing_factors, "s", forgot_silent, act, w, 0.5, match="channel 1: .*never fires")
    no_clamp = s.copy()
    no_clamp[2] = 1e300
    _fails(check.check_smoothing_factors, "s", no_clamp, act, w, 0.5, match="clamped to 1e-5 before the power")
    act2, w2 = np.array([4.0, 9.0]), np.array([1.0, 0.25])
    swapped = act2 ** 0.25 / w2 ** 0.75
    _fails(check.check_smoothing_factors, "s", swapped, act2, w2, 0.75, match="exponents are swapped")
    _fails(check.check_smoothing_factors, "s", 1 / minisq.smoothing_factors(act2, w2, 0.75), act2, w2, 0.75,
           match="yours is 1/s")
    _fails(check.check_smoothing_factors, "s", s.astype(np.float32), act, w, 0.5, match="float64")


def test_check_smoothing_fold_names_the_side():
    rng = np.random.default_rng(0)
    C = 4
    ln = {"g": rng.uniform(1, 3, C).astype(np.float32), "b": rng.standard_normal(C).astype(np.float32)}
    targets = [Linear(rng.standard_normal((C, C)).astype(np.float32), rng.standard_normal(C).astype(np.float32))]
    s = np.array([1.0, 2.0, 4.0, 8.0])
    s32 = s.astype(np.float32)
    good_ln = {"g": ln["g"] / s32, "b": ln["b"] / s32}
    good_t = [Linear(targets[0].w * s32[:, None], targets[0].b)]
    check.check_smoothing_fold("f", good_ln, good_t, ln, targets, s)
    _fails(check.check_smoothing_fold, "f", {"g": ln["g"] * s32, "b": ln["b"] * s32}, good_t, ln, targets, s,
           match="multiplied the LayerNorm's g")
    _fails(check.check_smoothing_fold, "f", {"g": good_ln["g"], "b": ln["b"]}, good_t, ln, targets, s,
           match="divide it by s as well")
    _fails(check.check_smoothing_fold, "f", good_ln, [Linear(targets[0].w / s32[:, None], targets[0].b)], ln,
           targets, s, match="you divided the weight")
    _fails(check.check_smoothing_fold, "f", good_ln, [Linear(targets[0].w * s32[None, :], targets[0].b)], ln,
           targets, s, match="scaled the columns")
    _fails(check.check_smoothing_fold, "f", good_ln, [Linear(targets[0].w * s32[:, None], targets[0].b / s32)], ln,
           targets, s, match="leave the linear's bias")
    _fails(check.check_smoothing_fold, "f", {"g": ln["g"] / s, "b": ln["b"] / s}, good_t, ln, targets, s,
           match="dtype float64, expected float32")
    no_affine = {"g": None, "b": None}
    check.check_smoothing_fold("f", {"g": 1 / s32, "b": np.zeros(C, np.float32)}, good_t, no_affine, targets, s)


def test_check_channel_absmax_and_static_scale():
    want = {"a": np.array([1.0, 3.0]), "b": np.array([0.5])}
    check.check_channel_absmax("c", {"a": np.array([1.0, 3.0], np.float32), "b": np.array([0.5])}, want)
    _fails(check.check_channel_absmax, "c", {"a": want["a"]}, want, match="no entry for .*'b'")
    _fails(check.check_channel_absmax, "c", {"a": np.array([1.0, 2.0]), "b": want["b"]}, want, match="max\\(\\|x\\|\\)")
    _fails(check.check_channel_absmax, "c", {"a": np.array([1.0, 4.0]), "b": want["b"]}, want, match="larger")
    absmax = np.array([0.5, 41.2, 3.0])
    check.check_static_scale("z", np.asarray(np.float32(41.2) / np.float32(127)), absmax)  # in float32
    check.check_static_scale("z", np.asarray(1.0, np.float32), np.zeros(3))  # the zero-range guard
    _fails(check.check_static_scale, "z", np.asarray(absmax.mean() / 127, np.float32), absmax, match="mean")
    _fails(check.check_static_scale, "z", np.asarray(41.2 / 128, np.float32), absmax, match="divide by 127")
    _fails(check.check_static_scale, "z", np.asarray(0.0, np.float32), np.zeros(3), match="use 1, as the quantizers do")
    _fails(check.check_static_scale, "z", np.full(3, 0.3, np.float32), absmax, match="shape \\(3,\\)")


def test_assert_equivalent_points_at_the_first_block():
    cfg = ModelConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, ffn_dim=32, max_positions=16)
    model = minisq.synthetic_model(cfg, dtype="float64")
    ids = np.arange(8)[None]
    check.assert_equivalent("m", minisq.check_equivalence(model, model, ids))
    params = copy.copy(model.params)
    params["h"] = list(params["h"])
    ln_2 = params["h"][1]["ln_2"]
    params["h"][1] = {**params["h"][1], "ln_2": {"g": ln_2["g"] * 2, "b": ln_2["b"]}}
    report = minisq.check_equivalence(model, model.evolve(params=params), ids)
    _fails(check.assert_equivalent, "m", report, match="(?s)FAIL.*first block that differs is 'h.1'")


def test_assert_returns():
    assert check.assert_returns("f", (1, 2), ("q", "scale")) == (1, 2)
    _fails(check.assert_returns, "f", None, ("q", "scale"), match="returned None: return the tuple \\(q, scale\\)")
    _fails(check.assert_returns, "f", np.zeros(3), ("q", "scale"), match="returned a ndarray")
