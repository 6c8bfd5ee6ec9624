"""The teaching notebooks: each runs top to bottom, and the committed copies are generated and clean.

A notebook's source is ``notebooks/NN_name.py`` in jupytext's percent format (``# %%`` and
``# %% [markdown]`` cells), a plain script that runs with ``python notebooks/NN_name.py``.
The ``.ipynb`` beside it is generated from it, without outputs:

    jupytext --update --to ipynb notebooks/[0-9]*.py   # --update keeps the cell ids

Every ``.ipynb`` is executed with nbclient, one test per notebook, from the notebooks folder,
with ``MODEL = "synthetic"`` (their default): a cell that raises — and every stage ends with
an ``assert``ing check — fails the test. The kernel is a throwaway kernelspec pointing at
``sys.executable`` (through ``JUPYTER_PATH``), so the notebooks run in the very Python that
runs pytest, with this checkout's minisq first on the path, and CI needs no
``ipykernel install`` step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ipykernel  # noqa: F401  (the test extra installs all four: a missing one must fail, not skip)
import jupytext
import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
SOURCES = sorted(NB_DIR.glob("[0-9][0-9]_*.py"))
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
KERNEL = "minisq-test-python"
CELL_TIMEOUT_S = 300
REGENERATE = "jupytext --update --to ipynb notebooks/[0-9]*.py"


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory) -> Path:
    """A JUPYTER_PATH entry holding one kernelspec that runs this interpreter."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python (minisq tests, {sys.executable})",
        "language": "python",
    }))
    return root


def _env() -> dict:
    env = dict(os.environ, MPLBACKEND="Agg", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


def test_nine_sources_each_with_its_notebook():
    assert len(SOURCES) == 9
    assert [p.with_suffix(".ipynb") for p in SOURCES] == NOTEBOOKS
    assert not (NB_DIR / "build_notebooks.py").exists()


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_committed_notebook_is_clean_and_generated_from_its_source(source):
    path = source.with_suffix(".ipynb")
    text = path.read_text(encoding="utf-8")
    committed = nbformat.reads(text, as_version=4)
    nbformat.validate(committed)
    for i, cell in enumerate(committed.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs: clear them (run `{REGENERATE}`)"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"
    expected = jupytext.read(source)
    stale = f"{path.name} is not what jupytext makes of {source.name}: edit the .py, then run `{REGENERATE}`"
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in expected.cells], stale
    # byte for byte, up to the cell ids (jupytext draws new ones unless --update keeps them)
    for cell, old in zip(expected.cells, committed.cells):
        cell.id = old.id
    assert text == jupytext.writes(expected, fmt="ipynb") + "\n", stale   # the CLI ends the file with a newline


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_first_code_cell_names_the_model(source):
    """The one line a reader changes to run on GPT-2/OPT, and its synthetic default (09
    builds its own SYNTHETIC model with a planted one-sided outlier: it has no such line)."""
    if source.stem == "09_ecosystem":
        assert "SYNTHETIC" in source.read_text(encoding="utf-8")
        return
    first = next(c for c in jupytext.read(source).cells if c.cell_type == "code")
    assert 'MODEL = "synthetic"' in first.source


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_source_is_a_plain_script(source):
    """No IPython-only syntax: magics and ``!`` lines become comments in the percent format and
    ``display`` is not a builtin, so a script run would silently skip them or fail."""
    text = source.read_text(encoding="utf-8")
    compile(text, str(source), "exec")
    code = [c.source for c in jupytext.read(source).cells if c.cell_type == "code"]
    offenders = [line for cell in code for line in cell.splitlines()
                 if line.lstrip().startswith(("%", "!")) or "display(" in line or "get_ipython" in line]
    assert offenders == []


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_sources_pass_pyflakes():
    """Undefined names and unused imports (ruff's F rules), as in any module of the package."""
    out = subprocess.run(["ruff", "check", "--isolated", "--select", "F", *map(str, SOURCES)],
                         check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", ["01_int8_gemm", "08_big_models"])
def test_source_runs_as_a_script(name, tmp_path):
    """``python notebooks/NN_name.py`` runs; the two quickest stand for all eight (the same
    cells run below as notebooks)."""
    out = subprocess.run([sys.executable, str(NB_DIR / f"{name}.py")], cwd=tmp_path, env=_env(),
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    checks = [line for line in out.stdout.splitlines() if line.startswith("check:")]
    assert checks and all(line.endswith("-> OK") for line in checks), checks


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_dir, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(kernel_dir), os.environ.get("JUPYTER_PATH")])))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")   # no display; IPython renders the figures as PNGs anyway
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a missing file fails fast instead of retrying a download
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(NB_DIR)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    checks = [line for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "stream" for line in o.text.splitlines() if line.startswith("check:")]
    assert checks, f"{path.name} printed no checks"
    assert all(line.endswith("-> OK") for line in checks), [c for c in checks if not c.endswith("-> OK")]


def test_synthetic_model_says_it_does_not_read_the_data_folder(tmp_path, monkeypatch, capsys):
    """With $MINISQ_DATA_DIR set, the synthetic model (no tokenizer) says the folder is not
    used, and its calibration tokens are the samples it announces."""
    from minisq.course.notebook import calibration_tokens, open_model

    monkeypatch.setenv("MINISQ_DATA_DIR", str(tmp_path))
    model, name, synthetic, data, qkv, fc1 = open_model("synthetic")
    printed = capsys.readouterr().out
    assert synthetic and "SYNTHETIC" in name and data is None
    assert f"$MINISQ_DATA_DIR={tmp_path} is not used" in printed
    assert len(qkv) == len(fc1) == model.config.num_layers
    calib, what = calibration_tokens(model, data, n=2, length=16)
    assert what.startswith("SYNTHETIC") and [c.shape for c in calib] == [(16,), (16,)]
