"""INT8 GEMM speed: minisq's exact int8 x int8 -> int32 paths against float BLAS.

Checks first, times second (llm.c's rule): every fast path must equal the exact integer
reference on the very shapes it is timed on (a row sample for the largest ones), plus a
naive-loop check and the adversarial all-127 case. Then it times, in one process, best of
several interleaved repeats:

CPU   minisq ``int8_gemm`` (float32 BLAS over K-blocks, bit-exact; includes the int8 ->
      float32 conversions and the int32 output) vs float32 BLAS on float32 copies of the
      same integers (``a32 @ b32``), on LLM layer shapes (T x C_in x C_out). Reported:
      ratio = exact-path throughput / float32 throughput (target >= 0.8). NumPy's own
      integer matmul (``a.astype(int32) @ b.astype(int32)``) has no BLAS and is ~100-200x
      slower, so it is timed on one small shape only.
GPU   (when one is usable) minisq ``int8_gemm`` (cuBLAS int8 tensor cores) vs CuPy float16
      matmul at 4096^3 and GPT-2 / OPT layer shapes, timed with CUDA events after warm-up,
      several calls per event pair. Ratio = int8 throughput / float16 throughput (target
      >= 1.6). The weight is passed as the transposed view of a [C_out, C_in] array (the
      layout a deployed layer keeps, no per-call copy); a [C_in, C_out] weight, transposed
      per call, is timed too.

    python benchmarks/int8_gemm.py [--quick] [--repeats 5]

--quick skips the 2048 x 4096 x 4096 CPU shape and the larger GPU shapes.
"""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np

import _machine  # benchmarks/ (this script's folder)
from minisq import backend
from minisq.gemm import int8_bmm, int8_bmm_reference, int8_gemm, int8_gemm_loops, int8_gemm_reference

CPU_SHAPES = [(512, 768, 3072), (512, 3072, 768), (2048, 4096, 4096)]  # T x C_in x C_out
CPU_SMALL = (64, 768, 3072)  # where NumPy's integer matmul is timed too
GPU_SHAPES = [  # (name, T, C_in, C_out)
    ("square 4096^3", 4096, 4096, 4096),
    ("GPT-2 fc1 (8192 tok)", 8192, 768, 3072),
    ("GPT-2 fc2 (8192 tok)", 8192, 3072, 768),
    ("GPT-2 qkv (8192 tok)", 8192, 768, 2304),
    ("GPT-2 out (8192 tok)", 8192, 768, 768),
    ("OPT-6.7B fc1 (4096 tok)", 4096, 4096, 16384),
    ("OPT-6.7B fc2 (4096 tok)", 4096, 16384, 4096),
]
GPU_QUICK = 3  # the first three under --quick
ATTENTION = (12 * 8, 1024, 64)  # batch x heads, T, head dim: Q K^T is [BH, T, D] x [BH, D, T]


def blas_info() -> str:
    try:
        import threadpoolctl

        pools = threadpoolctl.threadpool_info()
        return "; ".join(f"{p.get('internal_api')} {p.get('version')} ({p.get('num_threads')} threads, "
                         f"{p.get('architecture')})" for p in pools if p.get("user_api") == "blas")
    except ImportError:
        pass
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')} ({blas.get('openblas configuration', '')})"
    except Exception:  # older NumPy: no mode="dicts"
        return "unknown (install threadpoolctl to see it)"


def random_int8(rng, shape):
    return rng.integers(-128, 128, size=shape, dtype=np.int8)


def interleaved_best(fns: dict, repeats: int) -> dict:
    """Best wall time of each function, running them round-robin so load changes hit all."""
    return {name: min(t) for name, t in _machine.interleaved(fns, repeats).items()}


# ----------------------------------------------------------------------------------------
# correctness first


def validate_cpu(shapes, rng) -> None:
    a, b = random_int8(rng, (6, 40)), random_int8(rng, (40, 5))
    loops = int8_gemm_loops(a, b)
    assert np.array_equal(int8_gemm(a, b), loops) and np.array_equal(int8_gemm_reference(a, b), loops)
    print("check: int8_gemm == Python-int triple loop == int64 reference (6 x 40 x 5)")

    K = 16384
    c = int8_gemm(np.full((2, K), 127, np.int8), np.full((K, 3), -127, np.int8))
    running = np.cumsum(np.full(K, 127 * 127, np.float32), dtype=np.float32)[-1]
    assert np.array_equal(c, np.full((2, 3), -K * 127 * 127)), c
    print(f"check: all 127 x -127, K = {K}: exact {-K * 127 * 127}; a running float32 sum "
          f"would give {-int(running)}")

    for M, Kk, N in shapes:
        a, b = random_int8(rng, (M, Kk)), random_int8(rng, (Kk, N))
        rows = np.arange(M) if M * Kk * N <= 2**31 else np.sort(rng.choice(M, 64, replace=False))
        assert np.array_equal(int8_gemm(a, b)[rows], int8_gemm_reference(a[rows], b)), (M, Kk, N)
        what = "all rows" if len(rows) == M else f"{len(rows)} random rows"
        print(f"check: int8_gemm == int64 reference at {M} x {Kk} x {N} ({what})")
    a, b = random_int8(rng, (4, 128, 1100)), random_int8(rng, (4, 1100, 96))
    assert np.array_equal(int8_bmm(a, b), int8_bmm_reference(a, b))
    print("check: int8_bmm == int64 reference at 4 x [128 x 1100 x 96]")


# ----------------------------------------------------------------------------------------
# CPU timings


def bench_cpu(shapes, repeats: int, rng) -> None:
    print(f"\nCPU: best of {repeats} (interleaved), times in ms, throughput in GOP/s (2 M K N / t)")
    print(f"{'M x K x N':>18} | {'exact int8':>10} {'GOP/s':>7} | {'f32 BLAS':>9} {'GOP/s':>7} | "
          f"{'ratio':>5} (target >= 0.8)")
    for M, K, N in shapes:
        a8, b8 = random_int8(rng, (M, K)), random_int8(rng, (K, N))
        a32, b32 = a8.astype(np.float32), b8.astype(np.float32)
        t = interleaved_best({"exact": lambda: int8_gemm(a8, b8), "f32": lambda: a32 @ b32}, repeats)
        ops = 2 * M * K * N
        print(f"{f'{M} x {K} x {N}':>18} | {t['exact'] * 1e3:10.1f} {ops / t['exact'] / 1e9:7.1f} | "
              f"{t['f32'] * 1e3:9.1f} {ops / t['f32'] / 1e9:7.1f} | {t['f32'] / t['exact']:5.2f}")

    M, K, N = CPU_SMALL
    a8, b8 = random_int8(rng, (M, K)), random_int8(rng, (K, N))
    a32, b32 = a8.astype(np.float32), b8.astype(np.float32)
    a_i, b_i = a8.astype(np.int32), b8.astype(np.int32)
    assert np.array_equal(a_i @ b_i, int8_gemm(a8, b8))
    t = interleaved_best({"exact": lambda: int8_gemm(a8, b8), "f32": lambda: a32 @ b32,
                          "int32": lambda: a_i @ b_i}, max(2, repeats // 2))
    ops = 2 * M * K * N
    print(f"\nsmall shape {M} x {K} x {N} (NumPy's integer matmul, no BLAS, is too slow for the others):")
    for name, label in [("exact", "minisq int8_gemm (exact)"), ("f32", "float32 BLAS"),
                        ("int32", "NumPy int32 matmul (exact)")]:
        print(f"  {label:<28} {t[name] * 1e3:8.1f} ms {ops / t[name] / 1e9:7.1f} GOP/s")
    print(f"  exact path is {t['int32'] / t['exact']:.0f}x faster than NumPy's int32 matmul; "
          f"ratio to float32 BLAS {t['f32'] / t['exact']:.2f}")


# ----------------------------------------------------------------------------------------
# GPU timings


def gpu_best_ms(cp, fn, repeats: int, inner: int = 10) -> float:
    """Best per-call time in ms over ``repeats`` CUDA-event pairs of ``inner`` back-to-back calls."""
    for _ in range(3):
        fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / inner)
    return min(times)


def bench_gpu(shapes, repeats: int, rng) -> None:
    cp = backend.cupy()
    dev = cp.cuda.Device()
    name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    print(f"\nGPU: {name}; CuPy {cp.__version__}; CUDA events, best of {repeats} x 10 calls")
    refused = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows_table = []
        for label, M, K, N in shapes:
            a8 = cp.asarray(random_int8(rng, (M, K)))
            w_t = cp.asarray(random_int8(rng, (N, K)))  # [C_out, C_in], contiguous
            b8 = cp.ascontiguousarray(w_t.T)             # [C_in, C_out], contiguous
            sample = cp.asarray(np.sort(rng.choice(M, 8, replace=False)))
            ref = int8_gemm_reference(backend.to_numpy(a8[sample]), backend.to_numpy(b8))
            for b in (w_t.T, b8):
                got = backend.to_numpy(int8_gemm(a8, b)[sample])
                assert np.array_equal(got, ref), f"GPU int8_gemm is not exact at {label}"
            a16, b16 = a8.astype(cp.float16), b8.astype(cp.float16)
            t8 = gpu_best_ms(cp, lambda: int8_gemm(a8, w_t.T), repeats)
            t8t = gpu_best_ms(cp, lambda: int8_gemm(a8, b8), repeats)
            t16 = gpu_best_ms(cp, lambda: cp.matmul(a16, b16), repeats)
            rows_table.append((label, M, K, N, t8, t8t, t16))
        BH, T, D = ATTENTION
        q = cp.asarray(random_int8(rng, (BH, T, D)))
        kt = cp.asarray(random_int8(rng, (BH, D, T)))
        ref = int8_bmm_reference(backend.to_numpy(q[:2]), backend.to_numpy(kt[:2]))
        assert np.array_equal(backend.to_numpy(int8_bmm(q, kt)[:2]), ref), "GPU int8_bmm is not exact"
        q16, kt16 = q.astype(cp.float16), kt.astype(cp.float16)
        tb8 = gpu_best_ms(cp, lambda: int8_bmm(q, kt), repeats)
        tb16 = gpu_best_ms(cp, lambda: cp.matmul(q16, kt16), repeats)
        refused = [str(w.message) for w in caught if "cuBLAS" in str(w.message)]
    print("check: GPU int8_gemm == CPU int64 reference on 8 random rows of every shape, both "
          "weight layouts; int8_bmm on 2 batch entries")
    if refused:
        print(f"NOTE: {refused[0]} -- the int8 timings below are of the fallback")
    print(f"{'shape':>24} {'M x K x N':>19} | {'int8 ms':>8} {'TOP/s':>6} | {'int8,Wᵀ/call':>12} | "
          f"{'fp16 ms':>8} {'TFLOP/s':>7} | {'ratio':>5} (target >= 1.6)")
    for label, M, K, N, t8, t8t, t16 in rows_table:
        ops = 2 * M * K * N
        print(f"{label:>24} {f'{M}x{K}x{N}':>19} | {t8:8.3f} {ops / t8 / 1e9:6.0f} | {t8t:12.3f} | "
              f"{t16:8.3f} {ops / t16 / 1e9:7.0f} | {t16 / t8:5.2f}")
    ops = 2 * BH * T * D * T
    print(f"{'attention Q·Kᵀ (bmm)':>24} {f'{BH}x[{T}x{D}x{T}]':>19} | "
          f"{tb8:8.3f} {ops / tb8 / 1e9:6.0f} | "
          f"{'':>12} | {tb16:8.3f} {ops / tb16 / 1e9:7.0f} | {tb16 / tb8:5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="skip the largest shapes")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)

    print(f"NumPy {np.__version__}; BLAS: {blas_info()}")
    if os.environ.get("OPENBLAS_CORETYPE"):
        print(f"OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} (set in the environment; left as is)")
    cpu_shapes = CPU_SHAPES[:2] if args.quick else CPU_SHAPES
    validate_cpu(cpu_shapes, rng)
    bench_cpu(cpu_shapes, args.repeats, rng)
    if backend.gpu_available():
        bench_gpu(GPU_SHAPES[:GPU_QUICK] if args.quick else GPU_SHAPES, args.repeats * 4, rng)
    else:
        print("\nGPU: none usable here (CuPy + CUDA driver); GPU timings skipped")


if __name__ == "__main__":
    main()
