"""One command for a GPU machine: what minisq's GPU path does there, in one report.

    PYTHONPATH=. python benchmarks/gpu_report.py --out DIR [--quick]

Writes ``DIR/gpu_report.json`` and ``DIR/gpu_report.md`` with:

1. the device, its compute capability and memory, CuPy's version, the CUDA runtime and
   driver versions;
2. the outcome of ``python -m pytest -m gpu`` (minisq's GPU tests: the GPU against the CPU
   reference, bit for bit where the math is integer), with its counts and the tail of its
   output;
3. the INT8 GEMM (cuBLAS int8 tensor cores, the weight packed once as W8A8 layers keep it)
   against cuBLAS float16 (CuPy's matmul) at 4096^3 and at the linear shapes of GPT-2 small,
   OPT-1.3B and OPT-6.7B: ms, TOPS (2 M K N / t) and the ratio int8 / float16 throughput
   (the issue's target: >= 1.6 at 4096^3). Each shape is checked against the exact CPU
   reference on sampled rows before it is timed;
4. end to end on SYNTHETIC random-weight models of GPT-2-small and OPT-1.3B shapes: W8A8
   (SmoothQuant-O1 integer path, float16 activations) against the float16 model, prefill
   tokens/s (1 x 512 tokens) and decoding ms/token (one-token steps with the KV cache
   after a 64-token prompt), with the logits' agreement and the peak GPU memory (CuPy's
   pool) of each;
5. ``{"gpu": null, "reason": ...}`` (and exit status 0) where no GPU is usable.

It needs only numpy, safetensors, tokenizers, CuPy (cupy-cuda12x or cupy-cuda13x) and
pytest, run from the repository root with ``PYTHONPATH=.`` or after
``pip install --no-deps -e .``. Budget: about 3-5 minutes on one recent GPU (the pytest
run is capped at 240 s, every timing at a few seconds); ``--quick`` drops the OPT-6.7B
shapes and the OPT-1.3B model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: import this checkout's minisq
    sys.path.insert(0, str(REPO))

from minisq import backend  # noqa: E402

# (model, layer, C_in, C_out): the linear layers of each model (y = x @ w, w [C_in, C_out])
MODEL_LINEARS = {
    "GPT-2 small": [("qkv", 768, 2304), ("out", 768, 768), ("fc1", 768, 3072), ("fc2", 3072, 768)],
    "OPT-1.3B": [("q/k/v/out", 2048, 2048), ("fc1", 2048, 8192), ("fc2", 8192, 2048)],
    "OPT-6.7B": [("q/k/v/out", 4096, 4096), ("fc1", 4096, 16384), ("fc2", 16384, 4096)],
}
GEMM_TOKENS = 2048          # M for the linear shapes: a prefill of 4 x 512 tokens
PYTEST_TIMEOUT_S = 240
PREFILL_TOKENS = 512
DECODE_TOKENS = 32


# ----------------------------------------------------------------------------------------
# environment


def device_info(cp) -> dict:
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    free, total = cp.cuda.runtime.memGetInfo()

    def version(v: int) -> str:  # CUDA encodes 12.4 as 12040
        return f"{v // 1000}.{(v % 1000) // 10}"

    return dict(
        name=name, index=dev.id, compute_capability=f"{props['major']}.{props['minor']}",
        memory_total_gib=round(total / 2**30, 1), memory_free_gib=round(free / 2**30, 1),
        cupy=cp.__version__, cuda_runtime=version(cp.cuda.runtime.runtimeGetVersion()),
        cuda_driver=version(cp.cuda.runtime.driverGetVersion()),
        cublas=_cublas_version(),
        numpy=np.__version__, python=platform.python_version(),
    )


def _cublas_version() -> str:
    try:
        return str(backend.cublas_module().getVersion(backend.cublas_handle()))
    except Exception as exc:  # noqa: BLE001  (informational only)
        return f"unknown ({type(exc).__name__})"


def run_gpu_tests(timeout_s: int) -> dict:
    """``python -m pytest -m gpu`` in the repository; its exit status, counts and tail."""
    # only the files that hold GPU tests: the others may import the test oracle (torch,
    # transformers, hypothesis), which a GPU machine need not have
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "pytest.mark.gpu" in p.read_text(encoding="utf-8"))
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or "") if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
        return dict(outcome=f"timed out after {timeout_s} s", returncode=None, counts={},
                    seconds=round(time.perf_counter() - t0, 1), tail=out[-3000:])
    out = proc.stdout + proc.stderr
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed)", out)}
    # pytest's exit status 5 means "no tests collected"; 0 all passed; 1 some failed
    outcome = {0: "passed", 1: "failed", 5: "no tests collected"}.get(proc.returncode, f"exit {proc.returncode}")
    return dict(outcome=outcome, returncode=proc.returncode, counts=counts,
                seconds=round(time.perf_counter() - t0, 1), tail=out[-3000:])


# ----------------------------------------------------------------------------------------
# timing


def gpu_ms(cp, fn, budget_s: float = 1.0, min_reps: int = 3) -> float:
    """Median per-call time in ms: CUDA events around batches of back-to-back calls, after
    a warm-up, within about ``budget_s`` seconds."""
    for _ in range(2):
        fn()
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    fn()
    end.record()
    end.synchronize()
    one = max(cp.cuda.get_elapsed_time(start, end), 1e-3)        # ms
    inner = int(max(1, min(50, 20.0 / one)))                      # ~20 ms per event pair
    reps = int(max(min_reps, min(30, budget_s * 1e3 / (one * inner))))
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / inner)
    return float(np.median(times))


def gemm_rows(quick: bool) -> list:
    rows = [("square", "4096^3", 4096, 4096, 4096)]
    for model, linears in MODEL_LINEARS.items():
        if quick and model == "OPT-6.7B":
            continue
        rows += [(model, name, GEMM_TOKENS, c_in, c_out) for name, c_in, c_out in linears]
    return rows


def bench_gemm(cp, quick: bool, rng) -> list:
    """INT8 GEMM (packed weight) vs float16 matmul, each shape checked before it is timed."""
    from minisq.gemm import int8_gemm, int8_gemm_reference, pack_weight_tn

    results = []
    for model, layer, M, K, N in gemm_rows(quick):
        a8 = cp.asarray(rng.integers(-127, 128, (M, K), dtype=np.int8))
        w8 = cp.asarray(rng.integers(-127, 128, (K, N), dtype=np.int8))
        packed = pack_weight_tn(w8)
        rows = cp.asarray(np.sort(rng.choice(M, 4, replace=False)))   # 4 sampled rows, checked exactly
        exact = bool(np.array_equal(backend.to_numpy(int8_gemm(a8, packed)[rows]),
                                    int8_gemm_reference(backend.to_numpy(a8[rows]), backend.to_numpy(w8))))
        a16, w16 = a8.astype(cp.float16), w8.astype(cp.float16)
        t8 = gpu_ms(cp, lambda: int8_gemm(a8, packed))
        t16 = gpu_ms(cp, lambda: cp.matmul(a16, w16))
        ops = 2 * M * K * N
        results.append(dict(model=model, layer=layer, M=M, K=K, N=N, exact_vs_cpu=exact,
                            int8_ms=round(t8, 4), int8_tops=round(ops / t8 / 1e9, 1),
                            fp16_ms=round(t16, 4), fp16_tflops=round(ops / t16 / 1e9, 1),
                            ratio=round(t16 / t8, 2)))
        print(f"  {model:>12} {layer:>10} {M}x{K}x{N}: int8 {t8:.3f} ms, fp16 {t16:.3f} ms, "
              f"ratio {t16 / t8:.2f}, exact={exact}", flush=True)
        del a8, w8, packed, a16, w16
        cp.get_default_memory_pool().free_all_blocks()
    return results


def synthetic_config(name: str):
    from minisq.config import ModelConfig
    from minisq.synthetic import GPT2_SMALL

    if name == "GPT-2 small":
        return GPT2_SMALL
    # OPT-1.3B's shapes (facebook/opt-1.3b config.json): 24 layers, C 2048, 32 heads, F 8192
    return ModelConfig(model_type="opt", vocab_size=50272, hidden_size=2048, num_layers=24, num_heads=32,
                       ffn_dim=8192, max_positions=2048, activation="relu", position_offset=2,
                       do_layer_norm_before=True, eos_token_id=2)


def bench_model(cp, name: str, rng) -> dict:
    """W8A8 (O1, float16 activations) vs float16: prefill tokens/s, decode ms/token, memory."""
    import minisq

    pool = cp.get_default_memory_pool()
    cfg = synthetic_config(name)
    t0 = time.perf_counter()
    base = minisq.synthetic_model(cfg, n_outliers=0)             # float32, on the CPU
    # each variant is built on the CPU and moved over alone, so the GPU memory pool holds
    # one model at a time and its high-water mark is that model's peak
    variants = {"float16": lambda: base.astype("float16").to("gpu"),
                "W8A8 O1 (int8 GEMM, float16 activations)":
                    lambda: minisq.quantize(base, "O1").astype("float16").to("gpu")}
    ids = rng.integers(0, cfg.vocab_size, (1, PREFILL_TOKENS))
    ids_gpu = cp.asarray(ids)
    out = dict(model=f"SYNTHETIC random-weight {name}-shaped model", layers=cfg.num_layers,
               hidden=cfg.hidden_size, prefill_tokens=PREFILL_TOKENS, decode_tokens=DECODE_TOKENS,
               build_s=round(time.perf_counter() - t0, 1), variants={})
    logits = {}
    for label, make in variants.items():
        pool.free_all_blocks()
        model = make()
        weights_bytes = pool.used_bytes()
        pool_before = pool.total_bytes()
        try:
            logits[label] = backend.to_numpy(model(ids_gpu)).astype(np.float32)
            t_prefill = gpu_ms(cp, lambda: model(ids_gpu), budget_s=3.0)
            t_decode = _decode_ms(cp, model, ids[:, :64])
            row = dict(prefill_ms=round(t_prefill, 2), prefill_tokens_per_s=round(PREFILL_TOKENS / t_prefill * 1e3),
                       decode_ms_per_token=round(t_decode, 3), weights_gib=round(weights_bytes / 2**30, 3),
                       peak_pool_gib=round(max(pool.total_bytes(), pool_before) / 2**30, 3))
        except minisq.MinisqError as exc:  # e.g. NonFiniteError: float16 overflow
            row = dict(error=f"{type(exc).__name__}: {exc}")
        out["variants"][label] = row
        print(f"  {name} {label}: {row}", flush=True)
        del model
        pool.free_all_blocks()
    if len(logits) == 2:
        a, b = logits.values()
        out["max_abs_logit_diff_w8a8_vs_fp16"] = float(np.abs(a - b).max())
        out["argmax_agreement"] = float((a.argmax(-1) == b.argmax(-1)).mean())
    (t16, t8) = (out["variants"][k].get("prefill_ms") for k in variants)
    if t16 and t8:
        out["prefill_speedup_w8a8"] = round(t16 / t8, 2)
    d16, d8 = (out["variants"][k].get("decode_ms_per_token") for k in variants)
    if d16 and d8:
        out["decode_speedup_w8a8"] = round(d16 / d8, 2)
    del base
    pool.free_all_blocks()
    return out


def _decode_ms(cp, model, prompt) -> float:
    """ms per decoded token: one-token forwards with the KV cache after the prompt (the
    same token fed back each step: this times the work, not the text)."""
    from minisq.model import KVCache

    cache = KVCache(model.config.num_layers, reserve=prompt.shape[1] + DECODE_TOKENS + 2)
    _, cache = model.forward(prompt, cache=cache)
    step = prompt[:, -1:]
    for _ in range(2):  # warm-up steps
        _, cache = model.forward(step, cache=cache)
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        _, cache = model.forward(step, cache=cache)
    cp.cuda.Device().synchronize()
    return (time.perf_counter() - t0) / DECODE_TOKENS * 1e3


# ----------------------------------------------------------------------------------------
# the report


def markdown(report: dict) -> str:
    if report["gpu"] is None:
        return f"# minisq GPU report\n\nNo usable GPU: {report['reason']}\n"
    d, t = report["gpu"], report["tests"] or dict(outcome="failed to run", counts={}, seconds="?")
    lines = [
        "# minisq GPU report", "",
        f"{d['name']} (compute {d['compute_capability']}, {d['memory_total_gib']} GiB); CuPy {d['cupy']}, "
        f"CUDA runtime {d['cuda_runtime']}, driver {d['cuda_driver']}, cuBLAS {d['cublas']}; "
        f"{report['finished_utc']}, {report['seconds']} s in all.", "",
        f"`pytest -m gpu`: **{t['outcome']}** {t['counts']} in {t['seconds']} s.", "",
        "## INT8 GEMM (cuBLAS int8, packed weight) vs cuBLAS float16", "",
        "| model | layer | M x K x N | exact | int8 ms | int8 TOPS | fp16 ms | fp16 TFLOPS | int8/fp16 |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["gemm"]:
        lines.append(f"| {r['model']} | {r['layer']} | {r['M']}x{r['K']}x{r['N']} | {r['exact_vs_cpu']} | "
                     f"{r['int8_ms']:.3f} | {r['int8_tops']} | {r['fp16_ms']:.3f} | {r['fp16_tflops']} | "
                     f"**{r['ratio']:.2f}** |")
    lines += ["", "## End to end (SYNTHETIC random weights; speed only)", "",
              "| model | variant | prefill ms (1x512) | tokens/s | decode ms/token | weights GiB | peak pool GiB |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for m in report["models"]:
        for label, r in m["variants"].items():
            if "error" in r:
                lines.append(f"| {m['model']} | {label} | {r['error']} | | | | |")
            else:
                lines.append(f"| {m['model']} | {label} | {r['prefill_ms']} | {r['prefill_tokens_per_s']} | "
                             f"{r['decode_ms_per_token']} | {r['weights_gib']} | {r['peak_pool_gib']} |")
        lines.append(f"| | W8A8 / fp16 speed-up | prefill **{m.get('prefill_speedup_w8a8')}x** | | "
                     f"decode {m.get('decode_speedup_w8a8')}x | | |")
    for key, tb in report.get("errors", {}).items():
        lines += ["", f"## {key}: FAILED", "", "```", tb.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write(out_dir: Path, report: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "gpu_report.md").write_text(markdown(report))
    print(f"wrote {out_dir / 'gpu_report.json'} and {out_dir / 'gpu_report.md'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu_report.json and gpu_report.md")
    ap.add_argument("--quick", action="store_true", help="skip the OPT-6.7B shapes and the OPT-1.3B model")
    ap.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    reason = backend.gpu_unavailable_reason()
    if reason is not None:
        print(f"no usable GPU: {reason}")
        write(args.out, {"gpu": None, "reason": reason})
        return 0

    cp = backend.cupy()
    rng = np.random.default_rng(0)
    report = {"gpu": device_info(cp), "tests": None, "gemm": [], "models": [], "errors": {}}
    print(f"GPU: {report['gpu']}", flush=True)

    def section(key, fn):
        # one failing section is recorded and the others still run; the files are rewritten
        # after every section, so an interrupted run still leaves what it measured
        try:
            report[key] = fn()
        except Exception as exc:  # noqa: BLE001  (a report records failures, it does not stop)
            import traceback
            report["errors"][key] = traceback.format_exc()[-3000:]
            print(f"  {key} FAILED: {type(exc).__name__}: {exc}", flush=True)
        report["seconds"] = round(time.perf_counter() - t_start, 1)
        report["finished_utc"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        write(args.out, report)

    if args.skip_tests:
        report["tests"] = dict(outcome="not run (--skip-tests)", returncode=None, counts={}, seconds=0, tail="")
    else:
        print("running pytest -m gpu ...", flush=True)
        section("tests", lambda: run_gpu_tests(PYTEST_TIMEOUT_S))
        print(f"  {report['tests']}"[:300], flush=True)
    print("INT8 GEMM vs float16:", flush=True)
    section("gemm", lambda: bench_gemm(cp, args.quick, rng))
    print("end to end:", flush=True)
    names = ["GPT-2 small"] if args.quick else ["GPT-2 small", "OPT-1.3B"]
    for name in names:
        section("models", lambda name=name: report["models"] + [bench_model(cp, name, rng)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
