"""benchmarks/gpu_report.py without a GPU: exit 0 and the no-GPU JSON, importable with
only the GPU machine's packages, and its Markdown writer run on a full (made-up) report."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minisq import backend

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_report.py"

# the GPU machine's Python has numpy, safetensors, tokenizers, CuPy and pytest only: block
# the rest (None in sys.modules makes their import fail) and run the report
BARE_RUN = """
import runpy, sys
for name in ("matplotlib", "tqdm", "huggingface_hub", "torch", "transformers", "hypothesis"):
    sys.modules[name] = None
sys.argv = ["gpu_report.py", "--out", sys.argv[1]]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.skipif(backend.gpu_available(), reason="a GPU is usable here: the report would run for minutes")
def test_without_a_gpu_the_report_exits_0_with_the_reason(tmp_path):
    proc = subprocess.run([sys.executable, "-c", BARE_RUN.format(script=str(SCRIPT)), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["gpu"] is None and report["reason"] == backend.gpu_unavailable_reason()
    assert set(report) == {"gpu", "reason"}
    assert "No usable GPU" in (tmp_path / "gpu_report.md").read_text()


def load_report_module():
    spec = importlib.util.spec_from_file_location("gpu_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_report_covers_the_shapes_the_issue_asks_for():
    rep = load_report_module()
    shapes = {(m, K, N) for m, _, _, K, N in rep.gemm_rows(quick=False)}
    assert ("square", 4096, 4096) in shapes
    for model, (C, F) in {"GPT-2 small": (768, 3072), "OPT-1.3B": (2048, 8192), "OPT-6.7B": (4096, 16384)}.items():
        assert {(model, C, F), (model, F, C)} <= shapes
    assert not any(m == "OPT-6.7B" for m, *_ in rep.gemm_rows(quick=True))
    cfg = rep.synthetic_config("OPT-1.3B")
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.ffn_dim) == ("opt", 24, 2048, 32, 8192)


def test_markdown_renders_a_full_report():
    """Formatting only: the numbers below are made up, not measurements."""
    rep = load_report_module()
    gpu = dict(name="MADE-UP GPU", compute_capability="9.0", memory_total_gib=80.0, cupy="14.2.0",
               cuda_runtime="13.0", cuda_driver="13.0", cublas="130000")
    gemm = [dict(model="square", layer="4096^3", M=4096, K=4096, N=4096, exact_vs_cpu=True, int8_ms=0.1,
                 int8_tops=1.0, fp16_ms=0.2, fp16_tflops=0.5, ratio=2.0)]
    ok = dict(prefill_ms=1.0, prefill_tokens_per_s=512000, decode_ms_per_token=0.5, weights_gib=0.1, peak_pool_gib=0.2)
    models = [dict(model="SYNTHETIC x", variants={"float16": ok, "W8A8": dict(error="NonFiniteError: x")},
                   prefill_speedup_w8a8=None, decode_speedup_w8a8=None)]
    report = dict(gpu=gpu, tests=dict(outcome="passed", counts={"passed": 3}, seconds=1.0), gemm=gemm,
                  models=models, errors={"models": "Traceback ..."}, seconds=10.0, finished_utc="then")
    md = rep.markdown(report)
    assert "MADE-UP GPU" in md and "**2.00**" in md and "NonFiniteError" in md and "models: FAILED" in md
    assert rep.markdown({"gpu": None, "reason": "why"}).count("why") == 1


class FakeCupy:
    """Just enough of CuPy's surface for the report's timing and memory code, on NumPy:
    events are wall-clock stamps and the memory pool reports zeros. It checks the
    report's plumbing on the CPU (names, keys, arithmetic), not any GPU behaviour."""

    float16 = np.float16
    asarray = staticmethod(np.asarray)
    matmul = staticmethod(np.matmul)

    class _Pool:
        def used_bytes(self):
            return 0

        def total_bytes(self):
            return 0

        def free_all_blocks(self):
            pass

    class cuda:  # noqa: N801  (mirrors cupy.cuda)
        class Event:
            def record(self):
                import time
                self.t = time.perf_counter()

            def synchronize(self):
                pass

        class Device:
            def synchronize(self):
                pass

        @staticmethod
        def get_elapsed_time(start, end):
            return (end.t - start.t) * 1e3

    def get_default_memory_pool(self):
        return self._Pool()


def test_the_end_to_end_section_runs_on_a_fake_cupy(monkeypatch):
    import minisq
    from minisq.config import ModelConfig

    rep = load_report_module()
    tiny = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, ffn_dim=256, vocab_size=101, max_positions=64)
    monkeypatch.setattr(rep, "synthetic_config", lambda name: tiny)
    monkeypatch.setattr(rep, "PREFILL_TOKENS", 16)
    monkeypatch.setattr(rep, "DECODE_TOKENS", 2)
    monkeypatch.setattr(minisq.Model, "to", lambda self, device: self)  # stays on the CPU
    out = rep.bench_model(FakeCupy(), "GPT-2 small", np.random.default_rng(0))
    assert set(out["variants"]) == {"float16", "W8A8 O1 (int8 GEMM, float16 activations)"}
    for row in out["variants"].values():
        assert "error" not in row and row["prefill_tokens_per_s"] > 0 and row["decode_ms_per_token"] > 0
    assert out["prefill_speedup_w8a8"] > 0 and 0 <= out["argmax_agreement"] <= 1
    assert "SYNTHETIC" in out["model"]
    assert "SYNTHETIC" in rep.markdown(dict(gpu=dict(name="fake", compute_capability="-", memory_total_gib=0,
                                                     cupy="-", cuda_runtime="-", cuda_driver="-", cublas="-"),
                                            tests=None, gemm=[], models=[out], errors={}, seconds=0,
                                            finished_utc="-"))


def test_the_gemm_section_runs_on_a_fake_cupy(monkeypatch):
    rep = load_report_module()
    monkeypatch.setattr(rep, "gemm_rows", lambda quick: [("tiny", "fc", 8, 12, 20), ("tiny", "odd", 5, 7, 3)])
    rows = rep.bench_gemm(FakeCupy(), False, np.random.default_rng(0))
    assert [r["layer"] for r in rows] == ["fc", "odd"]
    assert all(r["exact_vs_cpu"] and r["ratio"] > 0 and r["int8_tops"] >= 0 for r in rows)
