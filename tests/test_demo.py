"""`python -m minisq.demo` end to end, offline."""

import json
import math
import re
import shutil
import subprocess
import sys


from minisq.cli.demo import main
from minisq.cli.variants import VARIANTS

FIGURES = ("activations.png", "channel_max.png", "layer_sqnr.png", "alpha_sweep.png", "landscape.png")


def _check_outputs(out, synthetic: bool) -> dict:
    for name in FIGURES + ("report.md", "report.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 1000 or name.endswith(".md"), name
    report = json.loads((out / "report.json").read_text())
    assert report["synthetic"] is synthetic
    rows = {r["variant"]: r for r in report["rows"]}
    assert len(rows) == len(VARIANTS) == 12
    for r in rows.values():
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert math.isfinite(r["kl_to_fp"]) and r["kl_to_fp"] >= 0
        assert r["weight_mib"] > 0
    assert rows["FP32 (float)"]["kl_to_fp"] == 0.0
    md = (out / "report.md").read_text()
    assert "SmoothQuant-O3" in md and ("SYNTHETIC" in md) == synthetic
    return rows


def test_demo_on_the_synthetic_model_quick(tmp_path, capsys, monkeypatch):
    """Offline, with no data folder at all: the packaged GPT-2 tokenizer decodes the text."""
    monkeypatch.delenv("MINISQ_DATA_DIR", raising=False)
    out = tmp_path / "out"
    assert main(["--model", "synthetic", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed and "| SmoothQuant-O1" in printed and "Generated text" in printed
    generated = printed[printed.index("Generated text"):]
    assert "prompt 'The capital of France is'" in generated and "[1, 2, 3" not in generated
    for line in generated.splitlines()[1:3]:          # the FP32 and SmoothQuant-O3 continuations
        text = line.split(":", 1)[1].strip().strip("'\"")
        assert text.startswith("The capital of France is ") and len(text) > len("The capital of France is ") + 5
    assert "weights MiB" in printed and "weights MB" not in printed
    assert re.search(r"sampling SYNTHETIC text .*\n.*sampled \d+ SYNTHETIC tokens", printed), "sampling says so"
    rows = _check_outputs(out, synthetic=True)
    report = json.loads((out / "report.json").read_text())
    # the α sweep is computed on the table's tokens: its float line and its α = --alpha point are table rows
    sweep = report["alpha_sweep"]
    assert sweep["eval_tokens"] == report["eval_tokens"] and sweep["float_perplexity"] == rows["FP32 (float)"]["perplexity"]
    assert sweep["perplexity"][sweep["alphas"].index(report["alpha"])] == rows["SmoothQuant-O2"]["perplexity"]
    fp = rows["FP32 (float)"]["perplexity"]
    naive = rows["W8A8 naive (= O2 without smoothing)"]
    for sq in ("SmoothQuant-O1", "SmoothQuant-O2", "SmoothQuant-O3"):
        # SmoothQuant W8A8 is closer to float than naive W8A8, in KL and in perplexity
        assert rows[sq]["kl_to_fp"] < naive["kl_to_fp"] / 3, sq
        assert abs(rows[sq]["perplexity"] - fp) < abs(naive["perplexity"] - fp), sq
    assert rows["W8A8 O1 without smoothing"]["kl_to_fp"] < naive["kl_to_fp"]
    # the paper's baselines: LLM.int8() and W8A16 far closer to float than naive W8A8, ZeroQuant
    # (per-token activations over the outlier channels) not as close as SmoothQuant-O1
    for close in ("LLM.int8() (threshold 6)", "W8A16 (weight-only INT8)", "W8A8 per-channel acts (fake, no GEMM)"):
        assert rows[close]["kl_to_fp"] < naive["kl_to_fp"] / 5, close
    assert rows["SmoothQuant-O1"]["kl_to_fp"] < rows["ZeroQuant (group W, per-token A)"]["kl_to_fp"]
    kv, o3 = rows["SmoothQuant-O3 + INT8 KV cache"], rows["SmoothQuant-O3"]
    assert kv["kv_bytes_per_token"] < o3["kv_bytes_per_token"] / 3
    # int8 block weights are smaller than float32 ones
    assert rows["SmoothQuant-O3"]["weight_mib"] < rows["FP32 (float)"]["weight_mib"]


def test_demo_on_a_tiny_local_checkpoint_with_real_text(tmp_path, capsys, make_checkpoint, shared_data):
    folder, _ = make_checkpoint("gpt2", vocab_size=50257, n_positions=128)
    model_dir = tmp_path / "tiny-gpt2"
    shutil.copytree(folder, model_dir)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(shared_data / "gpt2" / f, model_dir / f)
    out = tmp_path / "out"
    code = main(["--model", str(model_dir), "--out", str(out), "--data-dir", str(shared_data),
                 "--calib-samples", "4", "--eval-tokens", "512", "--lambada-samples", "8", "--alphas", "0,0.5,1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "WikiText-2" in printed and "LAMBADA" in printed and "SYNTHETIC" not in printed
    rows = _check_outputs(out, synthetic=False)
    assert all(r["lambada_acc"] is not None for r in rows.values())


def test_demo_falls_back_to_synthetic_offline(tmp_path, capsys, monkeypatch, shared_data):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    out = tmp_path / "out"
    code = main(["--quick", "--out", str(out), "--data-dir", str(shared_data), "--calib-samples", "2",
                 "--eval-tokens", "256", "--alphas", "0.5"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "could not load the default model 'gpt2'" in printed and "SYNTHETIC" in printed


def test_demo_named_model_missing_is_a_clear_error(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minisq demo: error: there is no folder") and err.count("\n") == 1


def test_demo_help_documents_every_option():
    res = subprocess.run([sys.executable, "-m", "minisq.demo", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("usage: python -m minisq.demo [-h]")
    for opt in ("--model", "--alpha", "--calib-samples", "--eval-tokens", "--device", "--out", "--quick",
                "--data-dir", "synthetic"):
        assert opt in res.stdout
    assert "``" not in res.stdout and ":func:" not in res.stdout, "plain text, not reStructuredText"
    assert "KL to FP" in res.stdout and "KL(p_float || p_variant)" in res.stdout and "weights MiB" in res.stdout


def test_demo_streams_a_lazy_model_with_the_same_numbers(shared_data, make_checkpoint, tmp_path):
    """--lazy (automatic for a model bigger than memory): float rows layer by layer, each
    SmoothQuant variant written by quantize_checkpoint; the rows equal the in-memory demo's."""
    import json
    import shutil

    from minisq.cli.demo import main

    folder, _ = make_checkpoint("opt", vocab_size=50272)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(shared_data / "opt" / f, folder / f)
    common = ["--model", str(folder), "--data-dir", str(shared_data), "--calib-samples", "2", "--eval-tokens", "128",
              "--lambada-samples", "4", "--seq-len", "32", "--alphas", ""]
    assert main(common + ["--lazy", "--out", str(tmp_path / "lazy")]) == 0
    assert main(common + ["--out", str(tmp_path / "eager")]) == 0
    lazy = {r["variant"].replace(", layer by layer", ""): r for r in
            json.loads((tmp_path / "lazy" / "report.json").read_text())["rows"]}
    eager = {r["variant"]: r for r in json.loads((tmp_path / "eager" / "report.json").read_text())["rows"]}
    assert set(lazy) == {"FP32 (float)", "W8A8 naive (= O2 without smoothing)", "SmoothQuant-O1",
                         "SmoothQuant-O2", "SmoothQuant-O3"}
    for label, row in lazy.items():
        assert row["perplexity"] == eager[label]["perplexity"], label
        assert row["lambada_acc"] == eager[label]["lambada_acc"], label
    assert not (tmp_path / "lazy" / "models").exists() or not any((tmp_path / "lazy" / "models").iterdir())
