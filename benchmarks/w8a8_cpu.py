"""The W8A8 integer path against the float forward on the CPU, same process, same model.

A SYNTHETIC random-weight model of GPT-2 small's shapes (speed, not quality), one forward
of 1 x 512 tokens (fp32): the float model and ``minisq.quantize(model, "O1")`` (per-tensor
int8 weights, per-token dynamic int8 activations, path="int": every linear but lm_head runs
the exact INT8 GEMM and the epilogue). Checks first: the integer path equals the fake-quant
path on every linear of the first block to float32 rounding, and the quantized model keeps
no float32 copy of its int8 weights. Then the two forwards take turns ``--repeats`` times
and the ratio int / float is printed (target <= 1.15) with the CPU model, NumPy's BLAS
kernel and the load average. ``--profile`` adds where each forward's time goes, stage by stage.

    python benchmarks/w8a8_cpu.py [--tokens 512] [--repeats 5] [--profile]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _machine  # noqa: E402


def check(model, qmodel, ids) -> None:
    """int path == fake path (one layer at a time) and no float32 weight copies."""
    import minisq
    from minisq.qlinear import W8A8Linear

    leaves = qmodel.linears()
    x = np.random.default_rng(1).standard_normal((ids.shape[1], 768)).astype(np.float32)
    for name in ("h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj"):
        leaf = leaves[name]
        xin = x if leaf.in_features == 768 else np.abs(np.repeat(x, 4, axis=1))  # fc2 sees 3072 wide
        y_int = leaf(xin)
        y_fake = dataclasses.replace(leaf, path="fake")(xin)
        assert y_int.dtype == np.float32
        np.testing.assert_allclose(y_int, y_fake, rtol=1e-5, atol=1e-5 * float(np.abs(y_fake).max()))
    for leaf in leaves.values():
        if isinstance(leaf, W8A8Linear):
            assert leaf.w_q.dtype == np.int8 and leaf.w_packed is None  # the int8 weight only
    mem = minisq.weight_memory(qmodel)
    print(f"check: int path == fake path on h.0's four linears (float32 rounding); stored linear "
          f"weights {mem['stored_bytes'] / 2**20:.0f} MiB vs {mem['float32_bytes'] / 2**20:.0f} MiB "
          f"in float32 ({mem['quantized_layers']} int8 layers; lm_head float)")


def stages(model, qmodel, ids, runs: int = 5) -> None:
    """Where each forward's wall time goes, stage by stage (median of ``runs``; minisq's
    worker threads make a profiler of the main thread blind, so the stages are timed)."""
    import collections
    import time

    from minisq import qlinear
    from minisq.kernels import cpu as kernels
    from minisq.kernels import threads

    spent = collections.defaultdict(float)

    def timed(owner, name, label):
        fn = owner[name] if isinstance(owner, dict) else getattr(owner, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] += time.perf_counter() - t0
        return fn, wrapper

    hooks = [(qlinear.W8A8Linear, "quantize_input", "int8: quantize activations"),
             (qlinear, "int8_linear", "int8: GEMM + epilogue"),
             (threads, "matmul_rows", "float: linear (lm_head on W8A8)"),
             (kernels, "attention_causal_blocked", "attention"),
             (kernels.ACTIVATION_FNS, "gelu_new", "GELU"),
             (kernels, "layer_norm", "LayerNorm")]
    saved = []
    for owner, name, label in hooks:
        fn, wrapper = timed(owner, name, label)
        saved.append((owner, name, fn))
        if isinstance(owner, dict):
            owner[name] = wrapper
        else:
            setattr(owner, name, wrapper)
    try:
        for which, m in (("float", model), ("int", qmodel)):
            per_run = []
            for _ in range(runs):
                spent.clear()
                t0 = time.perf_counter()
                m(ids)
                total = time.perf_counter() - t0
                per_run.append(dict(spent, total=total, other=total - sum(spent.values())))
            print(f"{which} forward, median of {runs} (ms):")
            for label in per_run[0]:
                print(f"  {label:<34} {statistics.median(r[label] for r in per_run) * 1e3:8.1f}")
    finally:
        for owner, name, fn in saved:
            if isinstance(owner, dict):
                owner[name] = fn
            else:
                setattr(owner, name, fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    import minisq

    model = minisq.synthetic_model()       # GPT-2 small shapes, SYNTHETIC random weights
    qmodel = minisq.quantize(model, "O1")  # path="int"
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, args.tokens))
    check(model, qmodel, ids)

    load_before = _machine.load()
    t = _machine.interleaved({"float": lambda: model(ids), "int": lambda: qmodel(ids)}, args.repeats)
    print(f"SYNTHETIC GPT-2-small-shaped model, 1 x {args.tokens} tokens, fp32, same process, "
          f"{args.repeats} interleaved repeats; W8A8 = quantize(model, 'O1'), path='int'")
    print(f"CPU: {_machine.cpu_model()}; BLAS: {_machine.blas_kernel()}")
    print(f"{load_before} before, {_machine.load()} after")
    _machine.print_ratio(t, {"float": "float32 forward", "int": "W8A8 O1 integer"}, "int", "float", "<= 1.15",
                         digits=3)

    if args.profile:
        stages(model, qmodel, ids)


if __name__ == "__main__":
    main()
