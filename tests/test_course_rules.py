"""The course's rules as a student meets them: borrowed answers, the handouts' rules in the public
graders, and every planted mistake of the fifth assignment.

* A submission that uses minisq's own answer to a task, in any spelling (``import minisq as m;
  m.quant.quantize_per_token``, ``from minisq import quantize_per_token as q``,
  ``smooth_model = minisq.smooth``, ...), fails that task with one line; an honest submission
  that uses minisq for what the task does not teach passes.
* Four mistakes the handouts forbid fail the *public* graders (``grader.py`` alone) with a
  message that names the rule.
* Every ``<task>__<mistake>`` function of ``a5_new_architecture/wrong.py`` fails its task
  with its message; ``minisq.course.family_checks``' factor oracle agrees with ``minisq.smooth``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minisq
from minisq.config import ModelConfig
from minisq.course import grading
from minisq.course.borrowing import borrowed, borrowed_message
from minisq.smooth import Mapping

ROOT = Path(__file__).resolve().parents[1]
COURSE = ROOT / "assignments"
ANSWERS = Path(__file__).resolve().parent / "course_answers"
A5 = COURSE / "a5_new_architecture"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MINISQ_SOLUTION"}
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run(target: str, answers: Path, report: Path, *args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pytest", target, f"--solution={answers}", f"--task-report={report}", "-q",
           "-p", "no:cacheprovider", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, report: Path) -> dict:
    output, _ = proc.communicate(timeout=600)
    assert report.is_file(), output[-3000:]
    return dict(json.loads(report.read_text()), output=output)


def _messages(run: dict, task: str) -> list:
    return [t["message"] for t in run["tasks"][task]["tests"].values() if t["outcome"] == "failed"]


# --- borrowed answers: the ast check itself ------------------------------------------------------------

BORROWING = {   # source -> the answer name it uses
    "import minisq\ndef f(x):\n    return minisq.quantize_per_token(x)\n": "quantize_per_token",
    "import minisq as m\ndef f(x):\n    return m.quant.quantize_per_token(x)\n": "quantize_per_token",
    "import minisq.quant\ndef f(x):\n    return minisq.quant.quantize_per_token(x)\n": "quantize_per_token",
    "import minisq.quant as mq\nf = mq.quantize_per_token\n": "quantize_per_token",
    "from minisq.quant import quantize_per_token\nf = quantize_per_token\n": "quantize_per_token",
    "from minisq import quantize_per_token as q\ndef f(x):\n    return q(x)\n": "quantize_per_token",
    "from minisq import quant\ndef f(x):\n    return quant.QUANTIZERS['per_token'](x)\n": "QUANTIZERS",
    "from minisq.quant import *\n": "quantize_per_token",
    "import minisq\nf = minisq.smooth\n": "smooth",
    "import minisq\nm = minisq\nalias = m\ndef f(x):\n    return alias.smooth(x)\n": "smooth",
    "import minisq\ndef f(x):\n    return getattr(minisq, 'quantize_per_token')(x)\n": "quantize_per_token",
}
HONEST = [
    "import numpy as np\ndef quantize_per_token(x):\n    return np.rint(x)\n",
    "import minisq\ndef f(x):\n    return minisq.quantize_per_channel(x)\n",            # not this task's answer
    "from minisq.smooth import mappings_for\n",                                             # .smooth. is a module here
    "from minisq import mappings_for, check_equivalence\n",
    "import numpy as minisq_like\nquantize_per_token = None\n",                            # not minisq at all
]
ANSWER_NAMES = ("quantize_per_token", "QUANTIZERS", "smooth")
LAYOUT = 'def f(x):\n    """The task."""\n    # Task 1.2\n    raise NotImplementedError\n'   # f is task 1.2


@pytest.mark.parametrize("source, name", list(BORROWING.items()), ids=range(len(BORROWING)))
def test_borrowing_is_found_in_every_spelling(source, name):
    found = [n for n, _ in borrowed(source, ANSWER_NAMES)]
    assert name in found, found
    assert borrowed_message("1.2", source, ANSWER_NAMES, LAYOUT).startswith(
        f"task 1.2 calls minisq's own {found[0]}: write it yourself")


@pytest.mark.parametrize("source", HONEST, ids=range(len(HONEST)))
def test_honest_code_is_not_flagged(source):
    assert borrowed(source, ANSWER_NAMES) == [] and borrowed_message("1.2", source, ANSWER_NAMES, LAYOUT) == ""


def test_only_the_task_that_runs_the_borrowed_name_fails():
    layout = ('def own():\n    """1.1"""\n    # Task 1.1\n    raise NotImplementedError\n\n\n'
              'def user():\n    """1.2"""\n    # Task 1.2\n    raise NotImplementedError\n')
    source = ("import minisq\nfrom minisq import quantize_per_token\n\n\ndef own(x):\n    return x\n\n\n"
              "def user(x):\n    return minisq.quantize_per_token(own(x))\n")
    answers = ("quantize_per_token",)
    assert borrowed(source, answers, "1.1", layout) == []                 # the import alone is no use
    assert borrowed(source, answers, "1.2", layout) == [("quantize_per_token", 10)]


# --- borrowed answers: through the graders --------------------------------------------------------------

BORROWED_A1 = '''"""Seven lines that only import minisq: every a1 task borrowed."""
import minisq as m
from minisq.quant import quantize_per_token  # noqa: F401
from minisq import quantize_per_channel as quantize_per_channel  # noqa: F401
quantize_per_tensor = m.quant.quantize_per_tensor
dequantize = m.dequantize
def quantize_static(x, scale):
    return m.quantize_per_tensor(x, scale)
'''
BORROWED_A3 = '''"""The a3 answer with 3.3 taken from minisq."""
import minisq
from a3_honest import *  # noqa: F401,F403
smooth_model = minisq.smooth
'''


def test_graders_fail_exactly_the_borrowed_tasks(tmp_path):
    a1 = tmp_path / "a1_borrowed.py"
    a1.write_text(BORROWED_A1)
    (tmp_path / "a3_honest.py").write_text((ANSWERS / "a3_smoothing.py").read_text())
    a3 = tmp_path / "a3_borrowed.py"
    a3.write_text(BORROWED_A3)
    runs = {name: (_run(f"assignments/{folder}", path, tmp_path / f"{name}.json"), tmp_path / f"{name}.json")
            for name, folder, path in [("a1", "a1_quantizers", a1), ("a3", "a3_smoothing", a3)]}
    runs = {name: _finish(*run) for name, run in runs.items()}
    a1_run = runs["a1"]
    assert a1_run["score"]["tasks_passed"] == 0, a1_run["output"][-3000:]
    for task, name in [("a1_1", "quantize_per_tensor"), ("a1_2", "quantize_per_token"),
                       ("a1_3", "quantize_per_channel"), ("a1_4", "dequantize"), ("a1_5", "quantize_per_tensor")]:
        messages = _messages(a1_run, task)
        assert len(messages) == a1_run["tasks"][task]["failed"] >= 2, task
        number = task[1:].replace("_", ".")
        assert all(m.startswith(f"AssertionError: task {number} calls minisq's own {name}: write it yourself")
                   and "\n" not in m for m in messages), messages[:2]
    a3_run = runs["a3"]
    assert [t for t, row in a3_run["tasks"].items() if not row["pass"]] == ["a3_3"], a3_run["output"][-3000:]
    assert all("task 3.3 calls minisq's own smooth: write it yourself" in m for m in _messages(a3_run, "a3_3"))
    # honest answers that use minisq for what their tasks do not teach (mappings_for, quantize_per_token in
    # 2.4, the quantizers in a4) pass: tests/test_course.py grades tests/course_answers/ with this check on


# --- the four mistakes the handouts forbid fail the public graders ------------------------------------

def _mutant(tmp_path, folder: str, name: str, swaps: list) -> Path:
    source = (COURSE / folder / "solution.py").read_text()
    for old, new in swaps:
        assert old in source, old
        source = source.replace(old, new)
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    return path


MISTAKES = {   # name: (folder, task, swaps, a fragment of the public message)
    "w_max-from-the-first-target": (
        "a3_smoothing", "a3_3",
        [("w_max = np.max([np.abs(leaf.w).max(axis=1) for leaf in leaves], axis=0)",
          "w_max = np.abs(leaves[0].w).max(axis=1)")],
        "w_max must be the max over every linear"),
    "batch-wide-per-tensor-scale": (
        "a4_w8a8_model", "a4_3",
        [("x_q, x_scale = quantize_per_sequence(x, mask)", "x_q, x_scale = quantize_per_tensor(x)")],
        "yours uses one scale for the whole batch: per-tensor dynamic means one scale per sequence"),
    "static-scale-divided-in-float64": (
        "a4_w8a8_model", "a4_2",
        [("scale = np.asarray(absmax.max(), dtype=dtype) / np.asarray(QMAX, dtype=dtype)",
          "scale = np.asarray(absmax.max() / QMAX, dtype=dtype)")],
        "divided in float64 and then cast to float32"),
    "missing-bias": (
        "a4_w8a8_model", "a4_3",
        [("y = dequant_epilogue(acc, x_scale, w_scale, self.b, out_dtype=x.dtype)",
          "y = dequant_epilogue(acc, x_scale, w_scale, None, out_dtype=x.dtype)"),
         ("            if self.b is not None:\n                y = y + self.b\n", "")],
        "your leaf leaves out the bias"),
}


def test_the_four_mistakes_fail_the_public_graders(tmp_path):
    runs = {}
    for name, (folder, task, swaps, _) in MISTAKES.items():
        report = tmp_path / f"{name}.json"
        runs[name] = (_run(f"assignments/{folder}/grader.py", _mutant(tmp_path, folder, name, swaps), report,
                           "-m", task), report)
    for name, (proc, report) in runs.items():
        run = _finish(proc, report)
        task, fragment = MISTAKES[name][1], MISTAKES[name][3]
        assert not run["tasks"][task]["pass"], (name, run["output"][-2000:])
        assert all("grader.py" in nodeid and "grader_hidden" not in nodeid for nodeid in run["tasks"][task]["tests"])
        assert any(fragment in m for m in _messages(run, task)), (name, _messages(run, task)[:3])


# --- the fifth assignment: every planted mistake is caught ---------------------------------------------

A5_MISTAKES = {   # wrong.py function -> (task, a fragment of its message)
    "smoothing_rows__forgets_a_consumer": ("a5_1", "forgets layers.{i}.mlp.gate_proj, which also reads"),
    "smoothing_rows__through_silu": ("a5_1", "is not foldable: silu(x/s) != silu(x)/s"),
    "row_factors__one_per_query_channel": ("a5_2", "they must share one factor, from the max of their ranges"),
    "row_factors__wrong_side": ("a5_2", "yours is 1/s, a factor from the wrong side"),
}


def test_every_a5_mistake_is_caught(tmp_path):
    import ast

    defined = {n.name for n in ast.parse((A5 / "wrong.py").read_text()).body if isinstance(n, ast.FunctionDef)}
    assert defined == set(A5_MISTAKES), "every wrong.py function is one mistake, listed here"
    runs = {}
    for fn, (task, _) in A5_MISTAKES.items():
        path = tmp_path / f"{fn}.py"
        path.write_text(f"import sys\nsys.path.insert(0, {str(A5)!r})\n"
                        f"from solution import *  # noqa: F401,F403\nfrom wrong import {fn}\n"
                        f"{fn.split('__')[0]} = {fn}\n")
        runs[fn] = (_run("assignments/a5_new_architecture/grader.py", path, tmp_path / f"{fn}.json", "-m", task),
                    tmp_path / f"{fn}.json")
    for fn, (proc, report) in runs.items():
        run = _finish(proc, report)
        task, fragment = A5_MISTAKES[fn]
        assert not run["tasks"][task]["pass"], (fn, run["output"][-2000:])
        assert any(fragment in m for m in _messages(run, task)), (fn, _messages(run, task)[:3])


def test_equivalence_check_catches_a_row_through_silu():
    cfg = ModelConfig(model_type="llama", vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                      ffn_dim=24, max_positions=32)
    model = minisq.synthetic_model(cfg, dtype="float64")
    rows = {r.group: r for r in minisq.SMOOTHING_TABLE["llama"]}
    for row in rows.values():
        grading.check_row_is_equivalence("rows", model, row)
    silu = Mapping("gate_down", "layers.{i}.mlp.gate_proj", "linear", ("layers.{i}.mlp.down_proj",), "")
    with pytest.raises(AssertionError, match="is not an equivalence"):
        grading.check_row_is_equivalence("rows", model, silu)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_reference_row_factors_agree_with_minisq_smooth(kv_heads):
    cfg = ModelConfig(model_type="llama", vocab_size=50, hidden_size=32, num_layers=1, num_heads=4,
                      num_kv_heads=kv_heads, ffn_dim=24, max_positions=32)
    model = minisq.synthetic_model(cfg, dtype="float64", seed=kv_heads)
    stats = minisq.calibrate(model, [np.arange(20)[None] % 50], progress=False)
    factors = minisq.smooth(model, stats, alpha=0.6, groups="all").info["smoothing"]["factors"]
    for m in minisq.mappings_for(cfg, "all"):
        width = 32 if m.kind != "linear" else minisq.get_param(model.params, m.source).w.shape[1]
        mine = grading.reference_row_factors(stats.channel_absmax[m.targets[0]],
                                             minisq.weight_absmax(model.params, m.targets), 0.6, width, 8)
        np.testing.assert_array_equal(mine, factors[m.source], err_msg=m.source)
