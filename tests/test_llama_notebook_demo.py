"""A Llama model in the teaching notebook (by changing its one MODEL line) and in the demo
on tiny random-weight Llama checkpoints built here with transformers."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from minisq.cli.demo import main
from minisq.cli.variants import VARIANTS
from test_llama import hf_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoothing_notebook_runs_on_a_tiny_llama(tmp_path, kernel_dir, monkeypatch):
    import nbclient
    import nbformat

    folder = tmp_path / "tiny-llama"
    hf_llama("llama", vocab_size=256, max_position_embeddings=128).save_pretrained(folder)
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(kernel_dir), os.environ.get("JUPYTER_PATH")])))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(ROOT / "notebooks" / "04_smoothing.ipynb", as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert 'MODEL = "synthetic"' in first.source
    first.source = first.source.replace('MODEL = "synthetic"', f"MODEL = {str(folder)!r}")   # the one line
    nbclient.NotebookClient(nb, timeout=300, kernel_name="minisq-test-python",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    printed = [line for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if o.output_type == "stream" for line in o.text.splitlines()]
    assert any("llama" in line for line in printed)
    checks = [line for line in printed if line.startswith("check:")]
    assert checks and all(line.endswith("-> OK") for line in checks), checks


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "minisq-test-python"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "minisq tests", "language": "python"}))
    return root


def test_demo_on_a_tiny_llama_with_real_text(tmp_path, capsys, shared_data):
    # GPT-2's BPE files stand in for the Llama tokenizer (vocabulary 50257), EOS from config.json
    model_dir = tmp_path / "tiny-llama"
    hf_llama("llama", vocab_size=50257, max_position_embeddings=128, bos_token_id=50256,
             eos_token_id=50256).save_pretrained(model_dir)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(shared_data / "gpt2" / f, model_dir / f)
    out = tmp_path / "out"
    code = main(["--model", str(model_dir), "--out", str(out), "--data-dir", str(shared_data),
                 "--calib-samples", "4", "--eval-tokens", "256", "--lambada-samples", "4", "--alphas", "0.5"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "WikiText-2" in printed and "SmoothQuant-O3" in printed and "SYNTHETIC" not in printed
    report = json.loads((out / "report.json").read_text())
    assert "llama" in json.dumps(report)
    assert [r["variant"] for r in report["rows"]] == [v.label for v in VARIANTS.values()]   # every row ran
    assert all(r["lambada_acc"] is not None and r["perplexity"] > 1 for r in report["rows"])
