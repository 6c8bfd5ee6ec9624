"""Every fast kernel (minisq.kernels) against its reference (minisq.nn, minisq.gemm): bit for
bit where the two perform the same operations in the same order, otherwise within a float
bound stated beside the test together with why the roundings differ. float32 and float64,
odd shapes, padding and bias where they apply, one thread and three (the threaded paths
forced down to small sizes), output dtypes asserted. RoPE, which has no fast version, is
held against transformers' own apply_rotary_pos_emb.

Legend: B batch, T new tokens, S tokens attended to, C hidden, H heads, D head dim,
M rows, K reduced axis, N columns. u = the unit roundoff, eps = 2u (np.finfo(dtype).eps).
"""

from __future__ import annotations

import numpy as np
import pytest

from minisq import backend, gemm, nn
from minisq.kernels import cpu as kernels
from minisq.kernels import cuda, int8_cpu
from minisq.kernels import threads as kthreads
from minisq.quant import quantize_per_token

FLOATS = [np.float32, np.float64]


@pytest.fixture(params=[1, 3], ids=["1 thread", "3 threads"])
def n_threads(request, monkeypatch):
    """Run the kernels on 1 or 3 threads, with the sharing-out thresholds lowered so that
    the small arrays here take the threaded paths too."""
    monkeypatch.setattr(kthreads, "cpu_threads", lambda: request.param)
    monkeypatch.setattr(kthreads, "PARALLEL_MIN_ELEMENTS", 1 << 8)
    monkeypatch.setattr(kthreads, "PARALLEL_MIN_WORK", 1 << 10)
    monkeypatch.setattr(kthreads, "PARALLEL_MIN_ROWS", 2)
    return request.param


def _eps(dtype) -> float:
    return float(np.finfo(dtype).eps)


# ----------------------------------------------------------------------------------------
# norms


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 1, 5), (3, 7, 33), (2, 50, 771)])
@pytest.mark.parametrize("affine", ["g and b", "g only", "none"])
def test_layer_norm_kernel_is_the_reference(n_threads, dtype, shape, affine):
    """Bound: 16 eps (|x̂ g| + |b|), x̂ the normalized x. The two sum the variance in a
    different order (einsum of the centered x vs the mean of its squares) and the kernel
    multiplies by 1/std where the reference divides: a few roundings apart on each output."""
    rng = np.random.default_rng(sum(shape))
    C = shape[-1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    g, b = rng.standard_normal((2, C)).astype(dtype)
    g, b = {"g and b": (g, b), "g only": (g, None), "none": (None, None)}[affine]
    x0 = x.copy()
    got, ref = kernels.layer_norm(x, g, b), nn.layer_norm(x, g, b)
    assert got.dtype == ref.dtype == dtype and got.shape == shape
    scale = np.abs(nn.layer_norm(x)) * (1 if g is None else np.abs(g)) + (0 if b is None else np.abs(b))
    assert np.all(np.abs(got - ref) <= 16 * _eps(dtype) * scale)
    np.testing.assert_array_equal(x, x0)                      # nothing changed in place


def test_layer_norm_reference_is_torch():
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 24)) * 2 + 3
    g, b = rng.standard_normal((2, 24))
    want = torch.nn.functional.layer_norm(torch.from_numpy(x), (24,), torch.from_numpy(g),
                                          torch.from_numpy(b), eps=1e-5).numpy()
    np.testing.assert_allclose(nn.layer_norm(x, g, b), want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 7, 33), (2, 50, 771)])
def test_rms_norm_kernel_is_the_reference(n_threads, dtype, shape):
    """Bound: 16 eps |ref|. The kernel sums x² with einsum (the reference: mean of x * x,
    another order) and multiplies by 1/rms where the reference divides."""
    rng = np.random.default_rng(sum(shape) + 1)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    g = rng.standard_normal(shape[-1]).astype(dtype)
    got, ref = kernels.rms_norm(x, g, 1e-6), nn.rms_norm(x, g, 1e-6)
    assert got.dtype == ref.dtype == dtype
    assert np.all(np.abs(got - ref) <= 16 * _eps(dtype) * np.abs(ref))


def test_rms_norm_reference_is_transformers_llama_rms_norm():
    """In float32: LlamaRMSNorm computes in float32 whatever the input (so float64 would be
    compared with float32 arithmetic). Bound: 8 eps, summation orders apart."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 5, 16)) * 3).astype(np.float32)
    g = rng.standard_normal(16).astype(np.float32)
    norm = LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(g))
        want = norm(torch.from_numpy(x)).numpy()
    got = nn.rms_norm(x, g, 1e-6)
    assert got.dtype == np.float32
    assert np.all(np.abs(got - want) <= 8 * _eps(np.float32) * np.abs(want))


# ----------------------------------------------------------------------------------------
# activations


def _activation_inputs(dtype):
    rng = np.random.default_rng(2)
    grid = np.linspace(-60, 60, 4004)
    return np.concatenate([grid, rng.standard_normal(3000) * 4, [0.0, -0.0, 1e-30]]).astype(dtype).reshape(-1, 7)


@pytest.mark.parametrize("dtype", FLOATS)
def test_gelu_kernel_is_the_reference(n_threads, dtype):
    """Bound: 8 eps max(|x|, 1). The kernel computes x · sigmoid(2u) = x / (1 + exp(-2u)),
    the reference 0.5 x (1 + tanh u): the same function by other operations, and the
    reference loses digits to cancellation in 1 + tanh u for negative x (an absolute error
    of a few eps · |x| there)."""
    x = _activation_inputs(dtype)
    got, ref = kernels.gelu_tanh(x), nn.gelu_tanh(x)
    assert got.dtype == ref.dtype == dtype
    assert np.all(np.abs(got - ref) <= 8 * _eps(dtype) * np.maximum(np.abs(x), 1))
    assert np.all(np.abs(got - ref)[x > 0] <= 8 * _eps(dtype) * ref[x > 0])   # no cancellation there


@pytest.mark.parametrize("dtype", FLOATS)
def test_silu_kernel_is_the_reference_bit_for_bit(n_threads, dtype):
    """The same operations in the same order (negate, exp, add 1, divide x by it)."""
    x = _activation_inputs(dtype)
    got = kernels.silu(x)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, nn.silu(x))
    far = kernels.silu(np.array([-1000.0, 1000.0], dtype))   # exp(1000) = inf: -1000 / inf = -0, no NaN
    np.testing.assert_array_equal(far, nn.silu(np.array([-1000.0, 1000.0], dtype)))
    assert far[0] == 0 and np.signbit(far[0]) and far[1] == 1000


@pytest.mark.parametrize("dtype", FLOATS)
def test_relu_kernel_is_the_reference_and_the_tables_agree(dtype):
    x = _activation_inputs(dtype)
    np.testing.assert_array_equal(kernels.relu(x), nn.relu(x))
    assert kernels.relu(x).dtype == dtype
    assert kernels.ACTIVATION_FNS.keys() == nn.ACTIVATION_FNS.keys()
    for name, fast in kernels.ACTIVATION_FNS.items():       # each name runs its reference's function
        ref = nn.ACTIVATION_FNS[name](x)
        assert np.all(np.abs(fast(x) - ref) <= 8 * _eps(dtype) * np.maximum(np.abs(x), 1)), name


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_kernel_is_the_reference(dtype, axis):
    """Bound: 4 eps · p. The kernel multiplies by 1 / Σ (one rounding more than the
    reference's division)."""
    x = (np.random.default_rng(3).standard_normal((3, 5, 129)) * 10).astype(dtype)
    x[0, 0, :5] = np.finfo(dtype).min                        # masked entries: exp gives exactly 0
    ref = nn.softmax(x, axis=axis)
    for got in (kernels.softmax(x, axis=axis), kernels.softmax(x.copy(), axis=axis, inplace=True)):
        assert got.dtype == dtype
        assert np.all(np.abs(got - ref) <= 4 * _eps(dtype) * ref)
    kept = x.copy()
    kernels.softmax(x, axis=axis)
    np.testing.assert_array_equal(x, kept)                    # inplace=False leaves x alone


# ----------------------------------------------------------------------------------------
# attention


def _window_bias(mask, T, window, dtype):
    # attention_bias plus a sliding window: key s is hidden from query t when t - s >= window
    bias = nn.attention_bias(mask, T, dtype).copy()
    S = mask.shape[1]
    t = np.arange(S - T, S)[:, None]
    bias[:, :, (t - np.arange(S)[None, :]) >= window] = np.finfo(dtype).min
    return bias


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", ["no padding", "padding", "window", "past", "decode"])
def test_blocked_attention_kernel_is_the_reference(n_threads, dtype, case):
    """Bound: 8 eps max|v| on every real query. The kernel scales q before q kᵀ (the
    reference scales the scores), skips the masked keys' products, and divides by Σ exp
    after the product with v: the same sums in another order, a few roundings of outputs
    that are averages of v. Padding queries' rows are arbitrary in both (never used)."""
    rng = np.random.default_rng(4)
    B, H, D = 2, 3, 16
    T, past = {"decode": (1, 40), "past": (70, 13)}.get(case, (70, 0))
    S = T + past
    q = rng.standard_normal((B, H, T, D)).astype(dtype)
    k, v = rng.standard_normal((2, B, H, S, D)).astype(dtype)
    mask = np.ones((B, S), int)
    if case == "padding":
        mask[1, :9] = 0                                        # left padding
    dt = np.dtype(dtype)
    bias = _window_bias(mask, T, 20, dt) if case == "window" else nn.attention_bias(mask, T, dt)
    got = kernels.attention_causal_blocked(q, k, v, bias, D ** -0.5, block=32)
    ref = nn.attention(q, k, v, bias, D ** -0.5)
    assert got.dtype == ref.dtype == dtype and got.shape == (B, H, T, D)
    real = mask[:, S - T:] > 0                                 # [B, T]
    err = np.abs(got - ref).transpose(0, 2, 1, 3)[real]
    assert err.max() <= 8 * _eps(dtype) * np.abs(v).max()


# ----------------------------------------------------------------------------------------
# linear


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 5), (3, 33, 65), (2, 130, 96)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_kernel_is_the_reference(n_threads, dtype, shape, with_bias):
    """Bound: 2 (K + 1) eps (|x| @ |w| + |b|), the worst case of two different summation
    orders of a K-term dot product plus the bias: the kernel makes one 2-D product of all
    the tokens, cut into row blocks over the threads; the reference multiplies [B, T, K]
    by w per sequence. (For 2-D x on one thread they are one and the same call.)"""
    rng = np.random.default_rng(sum(shape))
    K, N = shape[-1], 47
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((K, N)).astype(dtype)
    b = rng.standard_normal(N).astype(dtype) if with_bias else None
    got, ref = kernels.linear(x, w, b), nn.linear(x, w, b)
    assert got.dtype == ref.dtype == dtype and got.shape == shape[:-1] + (N,)
    bound = np.abs(x) @ np.abs(w) + (0 if b is None else np.abs(b))
    assert np.all(np.abs(got - ref) <= 2 * (K + 1) * _eps(dtype) * bound)
    if len(shape) == 2 and n_threads == 1:
        np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(nn.Linear(w, b)(x), got)    # the float leaf runs the kernel


def test_all_finite_kernel_is_isfinite_all():
    x = np.random.default_rng(5).standard_normal((4, 9)).astype(np.float32)
    assert kernels.all_finite(x) and kernels.all_finite(np.zeros((0, 3), np.float32))
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[2, 3] = bad
        assert not kernels.all_finite(y)
    big = np.full((2, 4), np.finfo(np.float32).max, np.float32)   # row sums overflow, values finite
    assert kernels.all_finite(big)


# ----------------------------------------------------------------------------------------
# RoPE: a reference only (nothing faster), held against transformers


def test_apply_rotary_is_transformers_apply_rotary_pos_emb():
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rng = np.random.default_rng(6)
    B, T, H, G, D = 2, 5, 4, 2, 8
    q, k = rng.standard_normal((B, T, H * D)), rng.standard_normal((B, T, G * D))
    angles = rng.standard_normal((B, T, D // 2)) * 3
    angles = np.concatenate([angles, angles], axis=-1)           # [B, T, D], as transformers builds them
    cos, sin = np.cos(angles), np.sin(angles)
    heads = lambda a, n: torch.from_numpy(a.reshape(B, T, n, D).transpose(0, 2, 1, 3))   # noqa: E731
    want_q, want_k = apply_rotary_pos_emb(heads(q, H), heads(k, G), torch.from_numpy(cos), torch.from_numpy(sin))
    got_q = nn.apply_rotary(q, cos[:, :, None], sin[:, :, None], H)
    got_k = nn.apply_rotary(k, cos[:, :, None], sin[:, :, None], G)
    np.testing.assert_array_equal(got_q, want_q.numpy().transpose(0, 2, 1, 3).reshape(B, T, H * D))
    np.testing.assert_array_equal(got_k, want_k.numpy().transpose(0, 2, 1, 3).reshape(B, T, G * D))


# ----------------------------------------------------------------------------------------
# the INT8 GEMM and its epilogue: integers, so bit for bit


INT8_SHAPES = [(1, 1, 1), (3, 5, 7), (13, 31, 17), (2, 1023, 3), (5, 1025, 9), (4, 3000, 6), (0, 5, 3), (3, 0, 4)]


def random_int8(rng, shape):
    return rng.integers(-128, 128, size=shape, dtype=np.int8)   # the full int8 range, -128 too


@pytest.mark.parametrize("M, K, N", INT8_SHAPES)
def test_int8_matmul_kernel_is_the_exact_reference(M, K, N):
    rng = np.random.default_rng(M * 1000 + K + N)
    a, b = random_int8(rng, (M, K)), random_int8(rng, (K, N))
    ref = gemm.int8_gemm_reference(a, b)
    for got in (int8_cpu.int8_matmul(a, b), int8_cpu.int8_matmul_blocked(a, b), gemm.int8_gemm(a, b)):
        assert got.dtype == np.int32 and got.shape == (M, N)
        np.testing.assert_array_equal(got, ref)


def test_int8_matmul_kernel_takes_the_k_blocks_where_one_call_could_round():
    """All ±128 rows of K = 3000: 128 Σ|a| = 2^14 · 3000 > 2^24, so one float32 call could
    round; the kernel falls back to the exact 1024-blocks."""
    rng = np.random.default_rng(7)
    a = np.where(rng.random((4, 3000)) < 0.5, -128, 127).astype(np.int8)
    b = random_int8(rng, (3000, 5))
    assert int8_cpu.float32_sums(a, int8_cpu.as_float32(b)) is None
    np.testing.assert_array_equal(int8_cpu.int8_matmul(a, b), gemm.int8_gemm_reference(a, b))


@pytest.mark.parametrize("lead", [(2, 3), (4,)])
def test_int8_bmm_kernel_is_the_exact_reference(lead):
    rng = np.random.default_rng(8)
    a, b = random_int8(rng, lead + (5, 1030)), random_int8(rng, lead + (1030, 7))
    got = gemm.int8_bmm(a, b)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, gemm.int8_bmm_reference(a, b))


def _epilogue_operands(rng, M, N, dtype, per_token, with_bias):
    r = (rng.random((M, 1)) * 1e-2 + 1e-3) if per_token else np.array(rng.random() * 1e-2 + 1e-3)
    c = rng.random(N) * 1e-2 + 1e-3
    b = rng.standard_normal(N) if with_bias else None
    as_dtype = lambda v: None if v is None else np.asarray(v, dtype)   # noqa: E731
    return as_dtype(r), as_dtype(c), as_dtype(b)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_epilogue_kernel_is_the_reference_bit_for_bit(dtype, per_token, with_bias):
    """The same three operations in the same order (r · c, times acc, plus b), in place."""
    rng = np.random.default_rng(9)
    M, N = 13, 17
    acc = rng.integers(-2**24, 2**24, (M, N), dtype=np.int32)   # float16 results stay finite
    r, c, b = _epilogue_operands(rng, M, N, dtype, per_token, with_bias)
    ref = gemm.epilogue_reference(acc, r, c, b, np.dtype(dtype))
    got = int8_cpu.epilogue_into(acc.astype(dtype), r, c, b)
    assert ref.dtype == got.dtype == dtype
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(gemm.dequant_epilogue(acc, r, c, b, out_dtype=dtype), ref)
    half = gemm.dequant_epilogue(acc, r, c, b, out_dtype=np.float16)   # computed in float32, rounded once
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, gemm.epilogue_reference(acc, r, c, b, np.dtype(np.float32)).astype(np.float16))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("M, K, N", [(1, 7, 3), (5, 31, 17), (70, 96, 40), (9, 3000, 5)])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_linear_kernel_is_gemm_then_epilogue_bit_for_bit(n_threads, dtype, M, K, N, per_token, with_bias):
    rng = np.random.default_rng(M + K + N)
    a, w = random_int8(rng, (M, K)), random_int8(rng, (K, N))
    if K == 3000:
        a[-2:] = 127                                           # rows past the one-call bound: K-blocks
    r, c, b = _epilogue_operands(rng, M, N, dtype, per_token, with_bias)
    ref = gemm.epilogue_reference(gemm.int8_gemm_reference(a, w), r, c, b, np.dtype(dtype))
    got = int8_cpu.int8_linear(a, w, r, c, b, np.dtype(dtype))
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, ref)
    public = gemm.int8_linear(a.reshape(1, M, K), w, r.reshape(1, M, 1) if per_token else r, c, b, out_dtype=dtype)
    np.testing.assert_array_equal(public, ref.reshape(1, M, N))


def test_cublas_tn_operand_shuffling_is_the_exact_product_on_the_cpu():
    """cuda.py's layout logic with a NumPy emulator of cuBLAS's column-major TN GEMM."""
    from test_gemm import emulate_cublas_tn

    rng = np.random.default_rng(10)
    a, b = random_int8(rng, (2, 5, 1030)), random_int8(rng, (2, 1030, 7))
    np.testing.assert_array_equal(cuda.int8_matmul_tn(a, b, emulate_cublas_tn), gemm.int8_bmm_reference(a, b))
    packed = cuda.pack_weight_tn(b[0])
    got = cuda.int8_matmul_tn_packed(a[:1], packed.tn[None], 7, emulate_cublas_tn)
    np.testing.assert_array_equal(got, gemm.int8_bmm_reference(a[:1], b[:1]))


# ----------------------------------------------------------------------------------------
# on a GPU: the same kernels on CuPy arrays against the CPU references


requires_gpu = pytest.mark.skipif(not backend.gpu_available(), reason="no usable CUDA GPU (cupy + driver)")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", FLOATS)
def test_gpu_float_kernels_are_the_references(dtype):
    cp = backend.cupy()
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((2, 9, 67)) * 3).astype(dtype)
    g, b = rng.standard_normal((2, 67)).astype(dtype)
    eps = _eps(dtype)
    on_gpu = lambda fn, *args: backend.to_numpy(fn(*(cp.asarray(a) for a in args)))   # noqa: E731
    scale = np.abs(nn.layer_norm(x)) * np.abs(g) + np.abs(b)
    assert np.all(np.abs(on_gpu(kernels.layer_norm, x, g, b) - nn.layer_norm(x, g, b)) <= 16 * eps * scale)
    ref = nn.rms_norm(x, g, 1e-6)
    assert np.all(np.abs(on_gpu(lambda a, gg: kernels.rms_norm(a, gg, 1e-6), x, g) - ref) <= 16 * eps * np.abs(ref))
    assert np.all(np.abs(on_gpu(kernels.gelu_tanh, x) - nn.gelu_tanh(x)) <= 8 * eps * np.maximum(np.abs(x), 1))
    # exp may differ in the last bit between CUDA's libm and NumPy's: a bound, not bit for bit
    assert np.all(np.abs(on_gpu(kernels.silu, x) - nn.silu(x)) <= 4 * eps * np.maximum(np.abs(x), 1))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_gpu_epilogue_and_quantizer_kernels_are_the_references_bit_for_bit(dtype):
    cp = backend.cupy()
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((7, 300)) * 5).astype(dtype)
    q, s = cuda.quantize_per_token(cp.asarray(x))
    q_ref, s_ref = quantize_per_token(x)
    np.testing.assert_array_equal(backend.to_numpy(q), q_ref)
    np.testing.assert_array_equal(backend.to_numpy(s), s_ref)
    if dtype == np.float16:
        return
    acc = rng.integers(-2**30, 2**30, (7, 11), dtype=np.int32)
    r, c, b = _epilogue_operands(rng, 7, 11, dtype, True, True)
    got = cuda.epilogue(*(cp.asarray(v) for v in (acc, r, c, b)), np.dtype(dtype))
    np.testing.assert_array_equal(backend.to_numpy(got), gemm.epilogue_reference(acc, r, c, b, np.dtype(dtype)))
