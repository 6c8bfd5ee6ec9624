"""The speed paths held against their references on the CPU: the one-call exact float32
GEMM and its bound, the fused int8_linear, the packed (TN) weight the GPU keeps, the
float16 epilogue, the GPU's fused per-token quantizer (through an emulator of its steps,
and compiled with NVRTC where that is importable), and the float forward's rewritten
pieces (GELU, LayerNorm, attention, finiteness check).

Legend: M rows (tokens), K reduced axis (C_in), N columns (C_out).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from test_gemm import FakeCublas, as_device_pointer, emulate_cublas_tn, random_int8

from minisq import backend, nn
from minisq.kernels import cpu as kcpu
from minisq.kernels import cuda, int8_cpu
from minisq.errors import InputError, ShapeError
from minisq.gemm import (
    BLOCK_K, TNWeight, dequant_epilogue, int8_gemm, int8_gemm_reference, int8_linear, pack_weight_tn,
)
from minisq.nn import Linear
from minisq.qlinear import quantize_linear
from minisq.quant import quantize_per_token

# ----------------------------------------------------------------------------------------
# one float32 BLAS call over all of K, when the rows' L1 norms prove it exact


def rows_with_l1(rng, M, K, l1):
    """int8 rows [M, K] whose absolute values sum to exactly ``l1`` each (values in ±127)."""
    a = np.zeros((M, K), dtype=np.int64)
    for i in range(M):
        left = l1
        for k in rng.permutation(K):
            v = min(127, left)
            a[i, k] = v if rng.random() < 0.5 else -v
            left -= v
            if left == 0:
                break
        assert left == 0
    return a.astype(np.int8)


@pytest.mark.parametrize("K", [2048, 3072, 16384])
def test_one_call_is_used_up_to_the_bound_and_exact_there(K):
    """At the bound (128 · Σ|a| = 2^24) every partial sum fits float32: one call, exact.
    Column 0 of b follows row 0's signs (-128 / 127), so that row's sum comes within 1% of
    2^24 (the odd values in it would be rounded by float32 past 2^24)."""
    rng = np.random.default_rng(K)
    a = rows_with_l1(rng, 3, K, 2**24 // 128)
    b = np.where(rng.random((K, 4)) < 0.5, -128, 127).astype(np.int8)
    b[:, 0] = np.where(a[0] < 0, -128, 127)  # column 0 aligned with row 0's signs
    assert int8_cpu.float32_sums(a, int8_cpu.as_float32(b)) is not None
    np.testing.assert_array_equal(int8_gemm(a, b), int8_gemm_reference(a, b))
    over = a.copy()
    k = int(np.flatnonzero(over[1] == 0)[0])
    over[1, k] = 1  # one more in one row: the bound no longer holds, the blocks take over
    assert int8_cpu.float32_sums(over, int8_cpu.as_float32(b)) is None
    np.testing.assert_array_equal(int8_gemm(over, b), int8_gemm_reference(over, b))


def test_the_bound_is_needed_one_call_past_it_can_round():
    """Past the bound one float32 call really does round (so the check is not decoration):
    rows of all 127 times a column of all 127, K = 16384, go to the blocks and stay exact."""
    K = 16384
    a = np.full((2, K), 127, dtype=np.int8)
    b = np.full((K, 2), 127, dtype=np.int8)
    assert int8_cpu.float32_sums(a, int8_cpu.as_float32(b)) is None
    rng = np.random.default_rng(5)
    a = rng.integers(100, 128, size=(4, K), dtype=np.int8)
    b = rng.integers(100, 128, size=(K, 4), dtype=np.int8)
    one_call = (a.astype(np.float32) @ b.astype(np.float32)).astype(np.int64)
    assert not np.array_equal(one_call, int8_gemm_reference(a, b))
    np.testing.assert_array_equal(int8_gemm(a, b), int8_gemm_reference(a, b))


def test_quantized_activations_usually_take_one_call():
    """Per-token int8 rows of a GELU-like activation (one large entry, most small) pass the
    bound at GPT-2's MLP width; uniform full-range rows do not."""
    rng = np.random.default_rng(3)
    h = rng.normal(size=(8, 3072)).astype(np.float32)
    x_q, _ = quantize_per_token(h * (h > 0))  # ReLU/GELU-like
    w_q = random_int8(rng, (3072, 16))
    assert int8_cpu.float32_sums(x_q, int8_cpu.as_float32(w_q)) is not None
    np.testing.assert_array_equal(int8_gemm(x_q, w_q), int8_gemm_reference(x_q, w_q))
    assert int8_cpu.float32_sums(random_int8(rng, (8, 3072)), int8_cpu.as_float32(w_q)) is None


# ----------------------------------------------------------------------------------------
# int8_linear == dequant_epilogue(int8_gemm(...)) bit for bit


@pytest.mark.parametrize("K", [1, 5, 768, BLOCK_K, 1025, 3072])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("row, col, bias", [("token", "channel", True), ("tensor", "tensor", False),
                                            ("token", "tensor", True)])
@pytest.mark.parametrize("values", ["activations", "full range"])
def test_int8_linear_equals_gemm_then_epilogue_bit_for_bit(K, dtype, row, col, bias, values):
    rng = np.random.default_rng(K * 7 + len(row) + len(col))
    M, N = 9, 13
    if values == "activations":
        a, _ = quantize_per_token(rng.standard_t(3, size=(M, K)).astype(np.float32))
    else:
        a = random_int8(rng, (M, K))  # long K: these take the blocked path
    w = random_int8(rng, (K, N))
    compute = np.float32 if dtype == np.float16 else dtype
    r = rng.uniform(1e-4, 1e-1, (M, 1) if row == "token" else ()).astype(compute)
    c = rng.uniform(1e-4, 1e-1, (1, N) if col == "channel" else ()).astype(compute)
    b = rng.normal(size=N).astype(compute) if bias else None
    ref = dequant_epilogue(int8_gemm(a, w), r, c, b, out_dtype=dtype)
    for weight in (w, pack_weight_tn(w)):
        y = int8_linear(a, weight, r, c, b, out_dtype=dtype)
        assert y.dtype == dtype and y.shape == (M, N)
        np.testing.assert_array_equal(y, ref)


def test_int8_linear_keeps_leading_axes_and_checks_operands():
    rng = np.random.default_rng(2)
    a, w = random_int8(rng, (2, 3, 40)), random_int8(rng, (40, 5))
    r = rng.uniform(0.01, 0.1, (2, 3, 1)).astype(np.float32)
    y = int8_linear(a, w, r, np.float32(0.02))
    np.testing.assert_array_equal(y, dequant_epilogue(int8_gemm(a, w), r, np.float32(0.02)))
    np.testing.assert_array_equal(int8_linear(a[0, 0], w, np.float32(0.5), np.float32(0.02)),
                                  dequant_epilogue(int8_gemm(a[0, :1], w), np.float32(0.5), np.float32(0.02))[0])
    with pytest.raises(ShapeError, match="int8"):
        int8_linear(a.astype(np.float32), w, r, 1.0)
    with pytest.raises(ShapeError, match="row_scale"):
        int8_linear(a, w, np.ones((3, 1), np.float32), 1.0)


def test_float16_epilogue_is_the_float32_epilogue_rounded_once():
    rng = np.random.default_rng(4)
    acc = rng.integers(-2**24, 2**24, size=(4, 6)).astype(np.int32)
    r = rng.uniform(1e-3, 1.0, (4, 1)).astype(np.float32)
    c = rng.uniform(1e-3, 1.0, (1, 6)).astype(np.float32)
    b = rng.normal(size=6).astype(np.float32)
    y16 = dequant_epilogue(acc, r, c, b, out_dtype=np.float16)
    assert y16.dtype == np.float16
    np.testing.assert_array_equal(y16, dequant_epilogue(acc, r, c, b).astype(np.float16))
    assert np.isinf(dequant_epilogue(np.array([[2**30]], np.int32), 1.0, 1.0, out_dtype=np.float16)).all()


# ----------------------------------------------------------------------------------------
# the packed weight (cuBLAS's TN layout), checked through the BLAS emulator


@pytest.mark.parametrize("K, N", [(1, 1), (5, 7), (8, 12), (768, 2304), (1025, 3)])
def test_packed_weight_layout(K, N):
    rng = np.random.default_rng(K + N)
    w = random_int8(rng, (K, N))
    p = pack_weight_tn(w)
    K4, N4 = cuda.round_up(K, 4), cuda.round_up(N, 4)
    assert isinstance(p, TNWeight) and p.shape == (K, N) and p.dtype == np.int8
    assert p.tn.shape == (N4, K4) and p.tn.flags.c_contiguous and p.tn.ctypes.data % 16 == 0
    np.testing.assert_array_equal(p.tn[:N, :K], w.T)                 # torch's Linear layout
    assert not p.tn[N:].any() and not p.tn[:, K:].any()              # the padding is zeros
    view = p.view()
    assert view.shape == (K, N) and np.shares_memory(view, p.tn)     # no second copy
    np.testing.assert_array_equal(view, w)
    assert pack_weight_tn(p) is p
    with pytest.raises(ShapeError, match="int8"):
        pack_weight_tn(w.astype(np.int32))


@pytest.mark.parametrize("M, K, N", [(1, 1, 1), (3, 5, 7), (13, 31, 17), (5, 1025, 2), (64, 100, 48)])
def test_packed_weight_through_the_tn_gemm_emulator(M, K, N):
    rng = np.random.default_rng(M * K * N)
    a, w = random_int8(rng, (M, K)), random_int8(rng, (K, N))
    p = pack_weight_tn(w)
    c = cuda.int8_matmul_tn_packed(a[None], p.tn[None], N, emulate_cublas_tn)[0]
    assert c.dtype == np.int32 and c.shape == (M, N) and c.flags.c_contiguous
    np.testing.assert_array_equal(c, int8_gemm_reference(a, w))
    np.testing.assert_array_equal(int8_gemm(a, p), int8_gemm_reference(a, w))  # CPU: the view


def test_packed_weight_reaches_cublas_without_a_copy(monkeypatch):
    """The GPU path hands the packed buffer itself to cuBLAS (FakeCublas reads host memory)."""
    fake = FakeCublas()
    monkeypatch.setattr(backend, "cublas_module", lambda: fake)
    monkeypatch.setattr(backend, "cublas_handle", lambda: 0)
    rng = np.random.default_rng(8)
    a, w = random_int8(rng, (6, 10)), random_int8(rng, (10, 7))
    p = pack_weight_tn(w)
    seen = []

    def run_tn(plan, bt_p, a_p, c):
        seen.append(bt_p)
        cuda.cublas_tn(plan, *(as_device_pointer(v) for v in (bt_p, a_p, c)))

    c = cuda.int8_matmul_tn_packed(a[None], p.tn[None], 7, run_tn)[0]
    np.testing.assert_array_equal(c, int8_gemm_reference(a, w))
    assert np.shares_memory(seen[0], p.tn) and fake.calls[0]["k"] == 12 and fake.calls[0]["m"] == 8


def test_w8a8_leaf_on_the_cpu_keeps_one_int8_weight_and_no_packing():
    rng = np.random.default_rng(6)
    leaf = Linear(rng.normal(size=(10, 6)).astype(np.float32), rng.normal(size=6).astype(np.float32))
    q = quantize_linear(leaf, "per_tensor", "per_token")
    assert q.w_packed is None and q.w_q.dtype == np.int8 and q.w_q.shape == (10, 6)
    again = dataclasses.replace(q, path="fake")
    assert again.w_packed is None and again.w_q is q.w_q


# ----------------------------------------------------------------------------------------
# the GPU's fused per-token quantizer: its steps emulated on the CPU, its source compiled


def emulate_quantize_rows(x, threads=cuda.QUANTIZE_ROWS_THREADS):
    """QUANTIZE_ROWS_SOURCE step by step in NumPy, one row at a time: per-thread strided
    NaN-keeping max of |x|, the shared-memory tree reduction, the guarded scale, then
    rint(x / s) clipped and cast, in the kernel's compute dtype."""
    F = np.float64 if x.dtype == np.float64 else np.float32

    def nan_max(a, b):
        return a if (a != a or a > b) else b

    T, C = x.shape
    q = np.empty((T, C), np.int8)
    s_out = np.empty(T, F)
    for row in range(T):
        xr = x[row].astype(F)                                   # widen (exact for float16)
        partial = [F(0)] * threads
        for tid in range(threads):
            for k in range(tid, C, threads):
                partial[tid] = nan_max(partial[tid], F(abs(xr[k])))
        half = threads // 2
        while half > 0:
            for tid in range(half):
                partial[tid] = nan_max(partial[tid], partial[tid + half])
            half //= 2
        s = F(partial[0] / F(127))
        if s < np.finfo(F).tiny:
            s = F(1)
        s_out[row] = s
        v = np.rint(xr / s)
        q[row] = np.minimum(np.maximum(v, F(-127)), F(127)).astype(np.int8)
    return q, s_out[:, None]


HARD_ROWS = {
    "normal": lambda rng, C: rng.normal(size=C),
    "zeros": lambda rng, C: np.zeros(C),
    "subnormal range": lambda rng, C: rng.normal(size=C) * 1e-39,
    "ties": lambda rng, C: np.r_[127.0, rng.integers(-127, 128, C - 1) + 0.5],  # s = 1: x / s on .5
    "one outlier": lambda rng, C: np.r_[rng.normal(size=C - 1) * 1e-3, -5e3],
    "huge": lambda rng, C: rng.normal(size=C) * 1e30,
}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("C", [1, 7, 300, 777])
def test_fused_quantizer_steps_equal_quantize_per_token(dtype, C):
    rng = np.random.default_rng(C)
    rows = [make(rng, C) for make in HARD_ROWS.values()]
    x = np.stack(rows)
    with np.errstate(over="ignore"):
        x = x.astype(dtype)
    x = np.where(np.isfinite(x), x, 0).astype(dtype)  # float16 cannot hold the huge row
    q, s = emulate_quantize_rows(x)
    q_ref, s_ref = quantize_per_token(x)
    assert s.dtype == s_ref.dtype == (np.float64 if dtype == np.float64 else np.float32)
    np.testing.assert_array_equal(s, s_ref)
    np.testing.assert_array_equal(q, q_ref)


def test_fused_quantizer_steps_make_a_nan_row_visible_in_its_scale():
    """The host checks the scales for NaN/inf (one small reduction) instead of x itself."""
    x = np.ones((3, 300), np.float32)
    x[1, 299] = np.nan
    x[2, 5] = -np.inf
    with np.errstate(invalid="ignore"):  # the NaN row's codes are garbage; the host raises
        _, s = emulate_quantize_rows(x)
    assert np.isfinite(s[0]) and np.isnan(s[1]) and np.isinf(s[2])
    with pytest.raises(InputError, match="2 NaN/inf"):
        quantize_per_token(x)


def nvrtc_or_skip():
    """cupy.cuda.nvrtc if it imports and compiles a trivial program (no GPU needed), else skip."""
    cp = backend._cupy()
    if cp is None:
        pytest.skip("CuPy is not importable here, so NVRTC is not either (pip install cupy-cuda12x "
                    "nvidia-cuda-nvrtc-cu12 to compile the kernel sources without a GPU)")
    try:
        from cupy.cuda import nvrtc
        prog = nvrtc.createProgram('extern "C" __global__ void k() {}', "k.cu", [], [])
        nvrtc.compileProgram(prog, ["--gpu-architecture=compute_70"])
    except Exception as exc:  # noqa: BLE001  (the library is missing or cannot load)
        pytest.skip(f"NVRTC is not usable here ({type(exc).__name__}: {str(exc)[:120]})")
    return nvrtc


@pytest.mark.parametrize("arch", ["compute_70", "compute_80", "compute_90"])
def test_fused_quantizer_source_compiles_with_nvrtc(arch):
    nvrtc = nvrtc_or_skip()
    prog = nvrtc.createProgram(cuda.QUANTIZE_ROWS_SOURCE, "minisq_quantize_rows.cu", [], [])
    try:
        nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", "--std=c++14"])
    except Exception:
        pytest.fail(nvrtc.getProgramLog(prog))
    ptx = nvrtc.getPTX(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    for name, _ in cuda.FUSED_DTYPES.values():
        assert f".entry {name}" in ptx
    assert "div.rn.f32" in ptx and "div.rn.f64" in ptx and "cvt.rni" in ptx  # IEEE division, rint


# ----------------------------------------------------------------------------------------
# the float forward's rewritten pieces


def gelu_tanh_reference(x):
    # the textbook formula in float64
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-7), (np.float64, 1e-15)])
def test_gelu_matches_the_tanh_formula(dtype, tol):
    x = np.concatenate([np.linspace(-60, 60, 20001), [0.0, -0.0, 1e-30]]).astype(dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # exp(-2u) = inf is silenced inside
        y = kcpu.gelu_tanh(x)
    assert y.dtype == dtype
    ref = gelu_tanh_reference(x)
    assert np.all(np.abs(y - ref) <= tol * np.maximum(np.abs(ref), 1.0))
    assert not np.shares_memory(y, x)
    with np.errstate(over="ignore"):  # x^2 itself overflows here, in the textbook formula too
        huge = np.array([-1e30, 1e30], dtype)
        np.testing.assert_array_equal(kcpu.gelu_tanh(huge), [0.0, huge[1]])


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-13)])
def test_layer_norm_matches_float64_textbook(dtype, tol):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(3, 5, 768)) * 3 + 1).astype(dtype)
    g, b = rng.normal(size=768).astype(dtype), rng.normal(size=768).astype(dtype)
    x0 = x.copy()
    y = kcpu.layer_norm(x, g, b)
    xd = x.astype(np.float64)
    ref = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-5) * g + b
    assert y.dtype == dtype
    np.testing.assert_allclose(y, ref, rtol=0, atol=tol * 10)
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("T, S, block", [(7, 7, 3), (300, 300, 256), (5, 12, 2)])
def test_blocked_attention_matches_plain_attention(T, S, block):
    rng = np.random.default_rng(T + S)
    q, k, v = (rng.normal(size=(2, 3, n, 8)) for n in (T, S, S))
    mask = np.ones((2, S), np.int64)
    mask[1, :2] = 0
    bias = nn.attention_bias(mask, T, np.dtype(np.float64))
    ref = nn.attention(q, k, v, bias, 0.35)
    got = kcpu.attention_causal_blocked(q, k, v, bias, 0.35, block=block)
    real = mask[:, S - T:] > 0  # [B, T]: padding queries see nothing, their rows are arbitrary
    np.testing.assert_allclose(got.transpose(0, 2, 1, 3)[real], ref.transpose(0, 2, 1, 3)[real],
                               rtol=0, atol=1e-13)


def test_all_finite_catches_every_kind_of_bad_value_and_overflowing_sums():
    x = np.ones((3, 5, 7), np.float32)
    assert kcpu.all_finite(x) and kcpu.all_finite(np.zeros((0, 4), np.float32))
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[2, 4, 6] = bad
        assert not kcpu.all_finite(y)
    big = np.full((2, 8), 3e38, np.float32)  # each finite, the row sums overflow: still True
    assert kcpu.all_finite(big)
    half = np.full((1, 4), 60000, np.float16)
    assert kcpu.all_finite(half)


def test_a_quantized_model_cast_to_float16_runs_with_float16_activations():
    """The GPU's float16 mode, on the CPU: W8A8 leaves take float16 inputs (quantized in
    float32), the epilogue gives float16. float16 rounding moves some int8 codes by one, so
    the logits differ from the float32 W8A8 model's by about the quantization error itself
    (here up to ~0.3 on logits of std 4); they must stay within 1.5x of that error."""
    import minisq
    from minisq.config import ModelConfig

    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, ffn_dim=256, vocab_size=101, max_positions=64)
    model = minisq.synthetic_model(cfg, n_outliers=2)
    q32 = minisq.quantize(model, "O1")
    q16 = q32.astype("float16")
    ids = np.random.default_rng(0).integers(0, 101, (2, 16))
    ref, y16, y32 = model(ids), q16(ids), q32(ids)
    assert y16.dtype == np.float16 and y32.dtype == np.float32
    err16, err32 = np.abs(y16.astype(np.float32) - ref).max(), np.abs(y32 - ref).max()
    assert 0 < err16 <= 1.5 * err32
    assert np.abs(y16.astype(np.float32) - y32).max() > 0  # it really ran in float16


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dynamic_scales_need_no_clip(dtype):
    """quant._quantize skips the clip for dynamic scales; rint(x / s) never leaves ±127 there
    (rows at every magnitude, the largest entry of each row at ±max, ties, a zero row)."""
    rng = np.random.default_rng(11)
    rows = [rng.normal(size=257) * 10.0 ** rng.integers(-30, 30) for _ in range(300)]
    rows += [np.r_[np.nextafter(np.float32(127.5), 0), -127.4, 0.5], np.zeros(3)]
    for row in rows:
        x = row.astype(dtype)[None]
        x = x if np.isfinite(x).all() else np.zeros_like(x)
        q, s = quantize_per_token(x)
        xs = x.astype(s.dtype)
        np.testing.assert_array_equal(q, np.clip(np.rint(xs / s), -127, 127).astype(np.int8))
        assert np.abs(np.rint(xs / s)).max() <= 127
