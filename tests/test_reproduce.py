"""``minisq reproduce`` on three small random OPT checkpoints of growing size.

The checkpoints are random-weight ``transformers`` OPT models with OPT's real vocabulary
size (50272) and tokenizer files (from ``$MINISQ_DATA_DIR/opt``), so that real WikiText-2
and LAMBADA text runs through them; their numbers are meaningless, and the command must
say so. What is held here: the outputs exist and are labeled, the cache resumes exactly
(a deleted or corrupt entry is recomputed, nothing else), the settings that key the cache,
the exit codes, the memory rule, and the helpers against independent oracles (torch's
parameter count, tokenizing the whole text).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minisq
from minisq.cli import cache, common, paper, reproduce, texts

ROOT = Path(__file__).resolve().parents[1]
# Tiny settings: 4 windows of 16 tokens, 3 LAMBADA passages (their last 32 tokens: the
# models' context), 2 calibration sequences of 16 tokens.
FAST = ["--eval-tokens", "64", "--seq-len", "16", "--lambada-samples", "3",
        "--calib-samples", "2", "--calib-len", "16"]
SIZES = ((8, 1), (16, 1), (32, 2))  # (hidden size, layers): growing models


@pytest.fixture(scope="module")
def family(tmp_path_factory, shared_data):
    """Three random OPT folders of growing size, each with OPT's tokenizer files, and their
    transformers models (the parameter-count oracle)."""
    from conftest import hf_model, save_hf_model

    base = tmp_path_factory.mktemp("opt-family")
    folders, models = [], []
    for seed, (C, layers) in enumerate(SIZES):
        model = hf_model("opt", seed=seed, hidden_size=C, ffn_dim=4 * C, num_hidden_layers=layers,
                         word_embed_proj_dim=C, vocab_size=50272, max_position_embeddings=32)
        folder = save_hf_model(model, base / f"opt-random-{C}")
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(shared_data / "opt" / name, folder / name)
        folders.append(str(folder))
        models.append(model)
    return folders, models


class CountingEvaluator:
    """Wraps reproduce.evaluate, counting the (model, variant) units computed."""

    def __init__(self):
        self.calls = 0
        self.real = reproduce.evaluate

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


def run_main(monkeypatch, argv) -> tuple[int, int]:
    """(exit status, evaluations computed) of one in-process run."""
    counter = CountingEvaluator()
    monkeypatch.setattr(reproduce, "evaluate", counter)
    return reproduce.main(argv), counter.calls


@pytest.fixture(scope="module")
def first_run(family, shared_data, tmp_path_factory):
    """One complete run over the family: (argv, out folder, its results)."""
    folders, _ = family
    out = tmp_path_factory.mktemp("reproduce-out")
    argv = ["--models", *folders, *FAST, "--data-dir", str(shared_data), "--out", str(out)]
    mp = pytest.MonkeyPatch()
    try:
        status, calls = run_main(mp, argv)
    finally:
        mp.undo()
    assert status == 0
    assert calls == len(folders) * len(reproduce.CORE)  # every model × variant computed once
    return argv, out, json.loads((out / "results.json").read_text())


def test_writes_a_labeled_table_figure_and_results(first_run, family, shared_data):
    _, out, results = first_run
    folders, _ = family
    table = (out / "table.md").read_text()
    assert (out / "emergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every minisq row names its model and says "random weights"; the float row says it is not FP16
    rows = [line for line in table.splitlines() if line.startswith("| /")]
    assert len(rows) == len(folders) * len(reproduce.CORE)
    assert all(f"({paper.RANDOM_LABEL})" in line for line in rows)
    assert "untrained (random) checkpoints" in table
    assert "FP32 (CPU; paper: FP16)" in table
    if not (shared_data / "wikitext-2-raw" / "wiki.train.raw").is_file():  # calibrated on the test split
        assert "Calibrated on WikiText-2 *test* paragraphs" in table
        assert {r.get("calib_split") for r in results["rows"]} == {"test", None}
    assert sorted(results["random_weights"]) == sorted(folders)
    for r in results["rows"]:
        assert r["perplexity"] > paper.RANDOM_PPL_FRACTION * r["vocab_size"]
        assert 0.0 <= r["lambada_acc"] <= 1.0
    # the published numbers are listed with their sources, and no random row borrows one
    assert "| opt-175b | FP16 | 74.7% | 10.99 | [T3] |" in table
    assert not any("[T3]" in line or "[NB]" in line for line in rows)
    # growing models: parameter counts grow
    fp = [r for r in results["rows"] if r["variant"] == "fp32"]
    assert [r["model"] for r in fp] == folders
    assert fp[0]["params"] < fp[1]["params"] < fp[2]["params"]


def test_progress_line_per_model_and_variant(family, shared_data, tmp_path, monkeypatch, capsys):
    folders, _ = family
    status, calls = run_main(monkeypatch, ["--models", folders[0], *FAST, "--variants", "naive", "O3",
                                           "--data-dir", str(shared_data), "--out", str(tmp_path)])
    assert (status, calls) == (0, 3)  # fp32 is always run: it is the baseline
    lines = capsys.readouterr().out.splitlines()
    for label in ("FP32 (CPU; paper: FP16)", "W8A8 naive", "SmoothQuant-O3"):
        assert sum(line.startswith(f"[1/1 {folders[0]}] {label}") for line in lines) == 1
    assert not any("SmoothQuant-O1" in line for line in lines)


def test_interrupted_run_resumes_with_only_the_missing_entries(first_run, monkeypatch, capsys):
    argv, out, results = first_run
    cache = sorted((out / "cache").glob("*.json"))
    assert len(cache) == len(results["rows"])
    # an interrupted run: one entry never written, another cut off mid-write
    victim, corrupt = cache[3], cache[7]
    victim.unlink()
    corrupt.write_text(corrupt.read_text()[:40])
    status, calls = run_main(monkeypatch, argv)
    assert (status, calls) == (0, 2)
    assert "ignoring " + corrupt.name in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    for a, b in zip(results["rows"], again["rows"]):  # recomputed numbers equal, bit for bit
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    # and a finished run computes nothing
    assert run_main(monkeypatch, argv) == (0, 0)


def test_the_cache_key_holds_what_changes_a_number(first_run, family, monkeypatch, tmp_path):
    argv, out, _ = first_run
    shutil.copytree(out / "cache", tmp_path / "cache")
    n = len(family[0])
    one_model = argv[:2] + argv[1 + n:-1] + [str(tmp_path)]  # --models <first folder> ... --out <copy>
    assert one_model[-2:] == ["--out", str(tmp_path)] and one_model[2] == FAST[0]
    # α changes only the smoothed variants: O1, O2, O3 recomputed, FP32 and naive reused
    assert run_main(monkeypatch, one_model + ["--alpha", "0.25"]) == (0, 3)
    # the evaluation text changes every number, the float one too
    assert run_main(monkeypatch, one_model + ["--eval-tokens", "48", "--variants", "naive"]) == (0, 2)
    s = reproduce.settings_of(reproduce.parse_args([]))
    keys = {v: cache.cache_key("m", v, s) for v in reproduce.CORE}
    assert "alpha" not in keys["fp32"] and "alpha" not in keys["naive"] and keys["O3"]["alpha"] == 0.5
    assert "attn_bmm" not in keys["fp32"] and keys["naive"]["attn_bmm"] is True
    assert keys["fp32"]["minisq_version"] == minisq.__version__


def _cli(*args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "minisq", "reproduce", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_cli_exit_codes(first_run, tmp_path):
    argv, out, _ = first_run
    done = _cli(*argv)  # all cached: runs the whole command without evaluating anything
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("(cached)") == len(SIZES) * len(reproduce.CORE)
    bad = _cli("--alpha", "2", "--out", str(tmp_path))
    assert bad.returncode == 2 and "--alpha must be in [0, 1]" in bad.stderr
    bad = _cli("--variants", "O4", "--out", str(tmp_path))
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    missing = tmp_path / "no-such-model"
    gone = _cli("--models", str(missing), *FAST, "--out", str(tmp_path))
    assert gone.returncode == 1
    assert gone.stderr.startswith(f"python -m minisq reproduce: error: there is no folder {missing}")
    assert gone.stderr.count("\n") == 1 and "Traceback" not in gone.stderr


def test_a_model_too_big_for_memory_is_loaded_lazily(family, monkeypatch, capsys):
    """Eager when EAGER_PEAK_FACTOR times the float32 weights fit in the available memory,
    lazy (with a line saying so) when they do not, or when asked."""
    folders, _ = family
    need = common.float32_bytes(Path(folders[0])) * common.EAGER_PEAK_FACTOR
    seen = []
    monkeypatch.setattr(common, "load", lambda source, **kw: seen.append(kw) or "a model")
    for avail, lazy in ((math.ceil(need), False), (math.ceil(need) - 1, True), (None, False)):
        monkeypatch.setattr(common, "available_memory", lambda: avail)
        model, folder, got = common.load_model(folders[0])
        assert (model, str(folder), got) == ("a model", folders[0], lazy)
        assert seen.pop() == ({"lazy": True} if lazy else {"device": "cpu"})
        assert ("loading it lazily" in capsys.readouterr().out) == lazy
    assert common.load_model(folders[0], lazy=True)[2] is True and seen.pop() == {"lazy": True}


def test_a_lazy_model_gives_the_eager_numbers(first_run, family, shared_data, tmp_path, monkeypatch, capsys):
    """Too big for memory (as if): loaded lazily, its W8A8 variants streamed layer by layer by
    quantize_checkpoint; every number equals the eager run's, bit for bit."""
    _, _, results = first_run
    folders, _ = family
    monkeypatch.setattr(common, "available_memory", lambda: 1)
    status, calls = run_main(monkeypatch, ["--models", folders[2], *FAST, "--data-dir", str(shared_data),
                                           "--out", str(tmp_path)])
    assert (status, calls) == (0, len(reproduce.CORE))
    assert "loading it lazily" in capsys.readouterr().out
    lazy_rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    eager_rows = [r for r in results["rows"] if r["model"] == folders[2]]
    for lazy, eager in zip(lazy_rows, eager_rows, strict=True):
        assert lazy["lazy"] is True and eager["lazy"] is False
        assert (lazy["variant"], lazy["perplexity"], lazy["lambada_acc"], lazy["params"]) == \
            (eager["variant"], eager["perplexity"], eager["lambada_acc"], eager["params"])
    assert not any((tmp_path / "models").iterdir())  # streamed checkpoints removed once cached


def test_float32_estimate_reads_the_stored_dtype(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert common.float32_bytes(tmp_path) == 2000
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert common.float32_bytes(tmp_path) == 1000


def test_parameter_count_matches_torch(family):
    import minisq

    folders, models = family
    for folder, hf in zip(folders, models):
        # transformers ties lm_head to embed_tokens; .parameters() yields a tied tensor once
        assert common.parameter_count(minisq.load(folder)) == sum(p.numel() for p in hf.parameters())


def test_head_tokens_equal_the_start_of_the_whole_text(shared_data):
    from minisq import data
    from minisq.io.tokenizer import load_tokenizer

    text = data.wikitext2("test", shared_data)
    for family_name in ("gpt2", "opt"):
        tok = load_tokenizer(shared_data / family_name, family_name)
        whole = tok.encode(text[:200_000])
        for n in (1, 100, 3000):
            got = texts.head_tokens(tok, text, n)
            assert got.dtype == np.int64 and got.tolist() == whole[:n]


def test_paper_numbers_are_sourced_and_matched_by_name():
    for name, entry in paper.PAPER.items():
        assert entry["source"] in paper.PAPER_SOURCES
        for variant, (acc, ppl) in entry["results"].items():
            assert variant in reproduce.CORE
            assert acc is None or 0.0 <= acc <= 1.0
            assert ppl is None or ppl >= 1.0
    assert paper.paper_entry("facebook/opt-175b") is paper.PAPER["opt-175b"]
    assert paper.paper_entry("/models/OPT-13b/") is paper.PAPER["opt-13b"]
    assert paper.paper_entry("facebook/opt-125m") is None  # the default family: blanks
    # a trained-looking row of a model the paper has sits beside the published number
    row = dict(model="facebook/opt-175b", variant="O3", perplexity=11.5, lambada_acc=0.74,
               vocab_size=50272, params=175e9)
    s = reproduce.settings_of(reproduce.parse_args([]))
    table = paper.format_table([dict(row, variant="fp32"), row], s)
    assert "| facebook/opt-175b | 175.0B | SmoothQuant-O3 | 11.50 | 11.17 [T3] | 74.0% | 74.6% [T3] |" in table
    assert "random" not in table.split("## The paper's")[0]
