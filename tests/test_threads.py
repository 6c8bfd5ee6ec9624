"""minisq's own CPU threads (minisq.kernels.threads: run_parallel, split_rows, matmul_rows,
one_blas_thread) and the code that shares its rows or heads out over them: every threaded
path equals the same code on one thread bit for bit (or, for float BLAS products cut by
rows, to float rounding), whatever the number of threads, uneven splits included.

Legend: M rows (tokens), K reduced axis (C_in), N columns (C_out), H heads, T/S tokens.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from minisq import nn
from minisq.kernels import cpu as kcpu
from minisq.kernels import int8_cpu
from minisq.kernels import threads as kthreads
from minisq.gemm import dequant_epilogue, int8_gemm_reference, int8_linear
from minisq.quant import quantize_per_token


@pytest.fixture
def threads(monkeypatch):
    """``threads(n)``: make minisq share its CPU work out over n threads from now on, down to
    small sizes (so that small test arrays take the threaded paths)."""
    def use(n: int):
        monkeypatch.setattr(kthreads, "cpu_threads", lambda: n)
        monkeypatch.setattr(kthreads, "PARALLEL_MIN_ELEMENTS", 1 << 12)
        monkeypatch.setattr(kthreads, "PARALLEL_MIN_WORK", 1 << 16)
        monkeypatch.setattr(kthreads, "PARALLEL_MIN_ROWS", 2)
    return use


def _two_ways(threads, fn, counts=(1, 2, 3)):
    """fn() computed with each thread count in ``counts``."""
    out = []
    for n in counts:
        threads(n)
        out.append(fn())
    return out


# ----------------------------------------------------------------------------------------
# the helpers themselves


def test_row_ranges_cover_every_row_once_in_near_equal_blocks():
    for rows in (1, 2, 7, 1024):
        for n in (1, 2, 3, 8, 2000):
            r = kthreads.row_ranges(rows, n)
            assert r[0][0] == 0 and r[-1][1] == rows and len(r) == min(n, rows)
            assert all(a[1] == b[0] for a, b in zip(r, r[1:]))
            sizes = [b - a for a, b in r]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_run_parallel_keeps_order_uses_other_threads_and_nests_without_deadlock(threads):
    threads(2)
    seen = []

    def part(p):
        seen.append(threading.current_thread().name)
        inner = kthreads.run_parallel(lambda q: (p, q), [0, 1, 2])    # from a worker: runs in it
        return p * 10, inner

    got = kthreads.run_parallel(part, list(range(5)))
    assert got == [(p * 10, [(p, 0), (p, 1), (p, 2)]) for p in range(5)]
    main = threading.current_thread().name
    assert main in seen and any(name.startswith("minisq-cpu") for name in seen)   # the caller works too
    threads(1)
    seen.clear()
    assert kthreads.run_parallel(part, [3])[0][0] == 30 and seen == [threading.current_thread().name]


def test_one_blas_thread_holds_one_thread_nested_and_restores_the_count():
    api = kthreads._openblas_thread_api()
    if api is None:
        pytest.skip("NumPy's BLAS here is not OpenBLAS: one_blas_thread is a documented no-op")
    get, set_ = api
    before = get()
    set_(2)
    try:
        with kthreads.one_blas_thread():
            assert get() == 1 and kthreads.cpu_threads() == 2     # the count from before
            with kthreads.one_blas_thread():
                assert get() == 1
            assert get() == 1                                     # the inner block does not restore
        assert get() == 2 and kthreads.cpu_threads() == 2
        with pytest.raises(RuntimeError), kthreads.one_blas_thread():
            raise RuntimeError("restored on the way out too")
        assert get() == 2
    finally:
        set_(before)


def test_split_rows_is_one_call_bit_for_bit_and_leaves_small_or_strided_arrays_whole(threads):
    x = np.random.default_rng(0).standard_normal((3, 700, 150)).astype(np.float32)
    calls = []

    def fn(a, out):
        calls.append(a.shape)
        np.exp(a, out=out)
        out *= a

    one, three = _two_ways(threads, lambda: kthreads.split_rows(fn, x, np.empty_like(x)), counts=(1, 3))
    np.testing.assert_array_equal(one, three)
    assert calls == [(2100, 150)] + [(700, 150)] * 3      # rows [2100, 150]: whole, then cut in 3
    calls.clear()
    kthreads.split_rows(fn, x[:, ::2], np.empty_like(x[:, ::2]))              # strided: one call
    kthreads.split_rows(fn, x[0, :10], np.empty_like(x[0, :10]))              # small: one call
    assert calls == [(3, 350, 150), (10, 150)]


@pytest.mark.parametrize("M", [1, 5, 257, 1024])
def test_matmul_rows_is_x_at_w_plus_b(threads, M):
    rng = np.random.default_rng(M)
    a = rng.standard_normal((M, 384)).astype(np.float32)
    w = rng.standard_normal((384, 700)).astype(np.float32)
    b = rng.standard_normal(700).astype(np.float32)
    ref = a.astype(np.float64) @ w.astype(np.float64) + b
    for y in _two_ways(threads, lambda: kthreads.matmul_rows(a, w, b)):
        assert y.dtype == np.float32 and y.shape == (M, 700)
        np.testing.assert_allclose(y, ref, rtol=0, atol=2e-4 * np.abs(ref).max())
    y64 = kthreads.matmul_rows(a.astype(np.float64), w.T.astype(np.float64).T)   # F-ordered weight, no bias
    np.testing.assert_allclose(y64, ref - b, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------
# the float forward's elementwise passes and attention


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activations_and_norms_on_threads_equal_one_thread_bit_for_bit(threads, dtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 300, 768)) * 4).astype(dtype)
    g, b = rng.standard_normal((2, 768)).astype(dtype)
    for fn in (kcpu.gelu_tanh, kcpu.silu, lambda a: kcpu.layer_norm(a, g, b), lambda a: kcpu.rms_norm(a, g, 1e-6)):
        one, two, three = _two_ways(threads, lambda: fn(x))
        assert one.dtype == dtype
        np.testing.assert_array_equal(one, two)
        np.testing.assert_array_equal(one, three)


def _bias_with_window(mask, T, window, dtype):
    """attention_bias plus a sliding window: key s is hidden from query t when t - s >= window."""
    bias = nn.attention_bias(mask, T, dtype).copy()
    S = mask.shape[1]
    t = np.arange(S - T, S)[:, None]
    bias[:, :, (t - np.arange(S)[None, :]) >= window] = np.finfo(dtype).min
    return bias


@pytest.mark.parametrize("case", ["no padding", "padding", "window", "past"])
def test_attention_on_threads_equals_one_thread_and_the_plain_reference(threads, case):
    """The blocked, threaded attention against plain attention (float64), and its thread
    counts against each other (bit for bit). "no padding" takes the path that adds the bias
    only from each block's first query on; padding and a sliding window must not."""
    rng = np.random.default_rng(7)
    B, H, T, D = 2, 5, 200, 16
    S = T + (37 if case == "past" else 0)
    q = rng.standard_normal((B, H, T, D))
    k, v = rng.standard_normal((2, B, H, S, D))
    mask = np.ones((B, S), int)
    if case == "padding":
        mask[1, :11] = 0                                  # left padding
    dtype = np.dtype(np.float64)
    bias = _bias_with_window(mask, T, 50, dtype) if case == "window" else nn.attention_bias(mask, T, dtype)
    ref = nn.attention(q, k, v, bias, 0.25)
    outs = _two_ways(threads, lambda: kcpu.attention_causal_blocked(q, k, v, bias, 0.25, block=64))
    real = mask[:, S - T:] > 0
    for got in outs:
        np.testing.assert_allclose(got.transpose(0, 2, 1, 3)[real], ref.transpose(0, 2, 1, 3)[real],
                                   rtol=0, atol=1e-13)
        np.testing.assert_array_equal(got, outs[0])


def test_the_bias_free_shortcut_is_taken_exactly_when_the_bias_is_zero_there(monkeypatch):
    """Which keys each block adds the bias to: from its first query on without padding, all
    of them with left padding (the shortcut would otherwise let padding through)."""
    seen = []
    real_block = kcpu._attention_block

    def spy(q, k, v, bias, scale, from_key=0):
        seen.append(from_key)
        return real_block(q, k, v, bias, scale, from_key)

    monkeypatch.setattr(kcpu, "_attention_block", spy)
    q = k = v = np.zeros((1, 2, 10, 4))
    mask = np.ones((1, 10), int)
    kcpu.attention_causal_blocked(q, k, v, nn.attention_bias(mask, 10, np.dtype(np.float64)), 1.0, block=4)
    assert seen == [0, 4, 8]                          # keys before each block's first query: no bias
    seen.clear()
    mask[0, 0] = 0
    kcpu.attention_causal_blocked(q, k, v, nn.attention_bias(mask, 10, np.dtype(np.float64)), 1.0, block=4)
    assert seen == [0, 0, 0]


# ----------------------------------------------------------------------------------------
# the W8A8 layer's integer math, rows shared out start to finish


@pytest.mark.parametrize("out_dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("acts", ["per_token", "per_tensor"])
def test_int8_linear_on_threads_is_the_reference_bit_for_bit(threads, out_dtype, acts):
    """Big enough to be shared out (M·K·N = 2^25); every thread count gives exactly
    dequant_epilogue(int8_gemm_reference(...)), the exact integer sums then the epilogue."""
    rng = np.random.default_rng(3)
    M, K, N = 257, 512, 256
    x = rng.standard_normal((M, K)).astype(np.float32)
    if acts == "per_token":
        a_q, r = quantize_per_token(x)
    else:
        r = np.float32(np.abs(x).max() / 127)
        a_q = np.clip(np.round(x / r), -127, 127).astype(np.int8)
    w_q = rng.integers(-127, 128, (K, N), dtype=np.int8)
    c = (rng.random(N) * 1e-2 + 1e-3).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    threads(3)
    assert len(kthreads.row_blocks(M, M * K * N)) == 3          # really shared out
    ref = dequant_epilogue(int8_gemm_reference(a_q, w_q), r, c, bias, out_dtype=out_dtype)
    for got in _two_ways(threads, lambda: int8_linear(a_q, w_q, r, c, bias, out_dtype=out_dtype)):
        assert got.dtype == np.dtype(out_dtype)
        np.testing.assert_array_equal(got, ref)


def test_int8_linear_on_threads_when_one_block_of_rows_needs_the_k_blocks(threads):
    """K = 3072 with the last rows all ±127 (past the one-call bound): that thread's rows go
    through the exact K-blocks, the others through one call; the result is still exact."""
    rng = np.random.default_rng(4)
    M, K, N = 96, 3072, 128
    a_q = rng.integers(-20, 21, (M, K), dtype=np.int8)
    a_q[-8:] = np.where(rng.random((8, K)) < 0.5, -127, 127)
    assert int8_cpu.float32_sums(a_q[:48], int8_cpu.as_float32(np.zeros((K, 1), np.int8))) is not None
    assert int8_cpu.float32_sums(a_q[48:], int8_cpu.as_float32(np.zeros((K, 1), np.int8))) is None
    w_q = rng.integers(-127, 128, (K, N), dtype=np.int8)
    r = (rng.random((M, 1)) * 1e-2 + 1e-3).astype(np.float32)
    c = (rng.random(N) * 1e-2 + 1e-3).astype(np.float32)
    ref = dequant_epilogue(int8_gemm_reference(a_q, w_q), r, c)
    for got in _two_ways(threads, lambda: int8_linear(a_q, w_q, r, c), counts=(1, 2)):
        np.testing.assert_array_equal(got, ref)


def test_the_weight_converts_to_float32_exactly_on_threads(threads):
    w = np.random.default_rng(5).integers(-128, 128, (1024, 768), dtype=np.int8)
    threads(3)
    np.testing.assert_array_equal(int8_cpu.as_float32(w, threaded=True), w.astype(np.float32))
    np.testing.assert_array_equal(int8_cpu.as_float32(w), w.astype(np.float32))

