"""Tests of the INT8 GEMM and its epilogue (minisq.gemm) against exact integer arithmetic.

Legend: M rows (tokens), K reduced axis (C_in), N columns (C_out), B batch.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # a GPU machine running only pytest -m gpu: the property tests skip
    from _no_hypothesis import given, settings, st

from minisq import backend
from minisq.kernels import cuda
from minisq.errors import ConfigError, ShapeError
from minisq.gemm import (
    BLOCK_K, MAX_K, dequant_epilogue, int8_bmm, int8_bmm_reference, int8_gemm, int8_gemm_loops,
    int8_gemm_plan, int8_gemm_reference, meets_int8_rules,
)
from minisq.quant import dequantize, quantize_per_channel, quantize_per_tensor, quantize_per_token

requires_gpu = pytest.mark.skipif(not backend.gpu_available(), reason="no usable CUDA GPU (cupy + driver)")

# (M, K, N): ones, odd sizes, K not a multiple of 4, and K around the 1024 block boundary
SHAPES = [
    (1, 1, 1), (1, 7, 1), (1, 5, 9), (9, 3, 1), (3, 5, 7), (13, 31, 17), (2, 1023, 3),
    (3, 1024, 5), (5, 1025, 2), (2, 2047, 3), (4, 4097, 3), (64, 100, 48), (0, 5, 3),
    (3, 0, 4), (3, 5, 0), (0, 2000, 3), (3, 2000, 0),
]


def random_int8(rng, shape):
    return rng.integers(-128, 128, size=shape, dtype=np.int8)  # the full int8 range, -128 too


# ----------------------------------------------------------------------------------------
# the fast path == the references, bit for bit


def test_references_agree_with_python_integers():
    rng = np.random.default_rng(0)
    for M, K, N in [(1, 1, 1), (3, 5, 7), (4, 33, 2), (2, 0, 3)]:
        a, b = random_int8(rng, (M, K)), random_int8(rng, (K, N))
        np.testing.assert_array_equal(int8_gemm_reference(a, b), int8_gemm_loops(a, b))
        np.testing.assert_array_equal(int8_gemm(a, b), int8_gemm_loops(a, b))


@pytest.mark.parametrize("M, K, N", SHAPES)
def test_int8_gemm_equals_reference(M, K, N):
    rng = np.random.default_rng(M * 10007 + K * 101 + N)
    a, b = random_int8(rng, (M, K)), random_int8(rng, (K, N))
    c = int8_gemm(a, b)
    assert c.dtype == np.int32 and c.shape == (M, N)
    np.testing.assert_array_equal(c, int8_gemm_reference(a, b))


@settings(deadline=None, max_examples=40)
@given(M=st.integers(1, 24), K=st.integers(1, 2100), N=st.integers(1, 24), seed=st.integers(0, 2**32 - 1))
def test_int8_gemm_equals_reference_on_random_shapes(M, K, N, seed):
    rng = np.random.default_rng(seed)
    a, b = random_int8(rng, (M, K)), random_int8(rng, (K, N))
    np.testing.assert_array_equal(int8_gemm(a, b), int8_gemm_reference(a, b))


def test_int8_gemm_keeps_leading_axes_and_does_not_modify_inputs():
    rng = np.random.default_rng(1)
    a, b = random_int8(rng, (2, 3, 1030)), random_int8(rng, (1030, 5))
    a0, b0 = a.copy(), b.copy()
    c = int8_gemm(a, b)
    assert c.shape == (2, 3, 5)
    np.testing.assert_array_equal(c, int8_gemm_reference(a, b))
    np.testing.assert_array_equal(int8_gemm(a[0, 0], b), int8_gemm_reference(a[0, 0], b))  # [K] -> [N]
    np.testing.assert_array_equal(int8_gemm(a[:, :, ::2], b[::2]), int8_gemm_reference(a[:, :, ::2], b[::2]))
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)


@pytest.mark.parametrize("lead, M, K, N",
                         [((1,), 1, 1, 1), ((3,), 5, 7, 2), ((2, 3), 4, 1025, 6), ((2,), 7, 64, 7)])
def test_int8_bmm_equals_reference(lead, M, K, N):
    rng = np.random.default_rng(K)
    a, b = random_int8(rng, lead + (M, K)), random_int8(rng, lead + (K, N))
    c = int8_bmm(a, b)
    assert c.dtype == np.int32 and c.shape == lead + (M, N)
    np.testing.assert_array_equal(c, int8_bmm_reference(a, b))
    for index in np.ndindex(lead):  # each batch entry is an ordinary GEMM
        np.testing.assert_array_equal(c[index], int8_gemm_reference(a[index], b[index]))


# ----------------------------------------------------------------------------------------
# adversarial extremes: where float32 accumulation without blocks goes wrong


@pytest.mark.parametrize("K", [1024, 1025, 4097, 16384])
@pytest.mark.parametrize("va, vb", [(127, 127), (127, -127), (-128, -128), (-128, 127)])
def test_extreme_values_are_exact(K, va, vb):
    a = np.full((2, K), va, dtype=np.int8)
    b = np.full((K, 3), vb, dtype=np.int8)
    c = int8_gemm(a, b)
    np.testing.assert_array_equal(c, np.full((2, 3), K * va * vb))
    np.testing.assert_array_equal(c, int8_gemm_reference(a, b))


def test_unblocked_float32_accumulation_is_wrong_on_the_same_inputs():
    """The K-blocks matter: past 2^24 float32 cannot hold every integer.

    A running float32 sum of 16384 products 127 * 127 ends at 264,242,192, 15,344 short of
    the exact 264,257,536: once the sum passes 2^24, each addition of an odd number rounds.
    And float32 BLAS over all of K at once (no blocks) disagrees with the exact result on
    near-extreme random inputs. (On constant inputs BLAS can be lucky: it sums in several
    lanes whose partial sums 16129 * j * 2^i stay exact, so constant inputs alone would
    not catch a broken BLOCK_K; the random near-extreme tests below do.)
    """
    K = 16384
    exact = K * 127 * 127
    running = np.cumsum(np.full(K, 127 * 127, dtype=np.float32), dtype=np.float32)[-1]
    assert exact > 2**24 and int(running) == 264_242_192 != exact

    rng = np.random.default_rng(5)
    a = rng.integers(100, 128, size=(4, K), dtype=np.int8)
    b = rng.integers(100, 128, size=(K, 4), dtype=np.int8)
    unblocked = (a.astype(np.float32) @ b.astype(np.float32)).astype(np.int64)
    assert not np.array_equal(unblocked, int8_gemm_reference(a, b))
    np.testing.assert_array_equal(int8_gemm(a, b), int8_gemm_reference(a, b))


@pytest.mark.parametrize("K", [1025, 2048, 4097, 16384])
@pytest.mark.parametrize("sign", [1, -1])
def test_near_extreme_random_values_are_exact(K, sign):
    rng = np.random.default_rng(K)
    a = rng.integers(100, 128, size=(5, K), dtype=np.int8)
    b = (sign * rng.integers(100, 128, size=(K, 6))).astype(np.int8)
    np.testing.assert_array_equal(int8_gemm(a, b), int8_gemm_reference(a, b))
    np.testing.assert_array_equal(int8_bmm(a[None], b[None]), int8_bmm_reference(a[None], b[None]))


def test_the_largest_k_is_exact_and_one_more_is_refused():
    assert BLOCK_K * 128 * 128 == 2**24 and MAX_K * 128 * 128 <= 2**31 - 1 < (MAX_K + 1) * 128 * 128
    a = np.full((1, MAX_K), -128, dtype=np.int8)
    np.testing.assert_array_equal(int8_gemm(a, a.T.copy()), [[MAX_K * 128 * 128]])  # 2,147,467,264
    big = np.zeros((1, MAX_K + 1), dtype=np.int8)
    with pytest.raises(ShapeError, match="overflow"):
        int8_gemm(big, big.T)
    with pytest.raises(ShapeError, match="overflow"):
        int8_gemm_reference(big, big.T)


# ----------------------------------------------------------------------------------------
# bad operands


def test_bad_operands_raise_shape_error_naming_both_shapes():
    a8, b8 = np.zeros((3, 5), np.int8), np.zeros((4, 6), np.int8)
    with pytest.raises(ShapeError, match=r"\(3, 5\).*\(4, 6\)"):
        int8_gemm(a8, b8)  # inner dims 5 != 4
    with pytest.raises(ShapeError, match=r"\(3, 5\) int32.*\(5, 6\) int8"):
        int8_gemm(np.zeros((3, 5), np.int32), np.zeros((5, 6), np.int8))
    with pytest.raises(ShapeError, match=r"\(3, 5\) float32.*\(5, 6\) float32"):
        int8_gemm(np.zeros((3, 5), np.float32), np.zeros((5, 6), np.float32))
    with pytest.raises(ShapeError, match=r"\(2, 5, 6\)"):
        int8_gemm(a8, np.zeros((2, 5, 6), np.int8))  # b must be [K, N]
    with pytest.raises(ShapeError, match=r"\(2, 3, 5\).*\(3, 5, 4\)"):
        int8_bmm(np.zeros((2, 3, 5), np.int8), np.zeros((3, 5, 4), np.int8))  # batch differs
    with pytest.raises(ShapeError):
        int8_bmm(a8, np.zeros((5, 2), np.int8))  # no batch axis
    with pytest.raises(ShapeError, match=r"\(2, 3, 5\).*\(2, 4, 4\)"):
        int8_bmm(np.zeros((2, 3, 5), np.int8), np.zeros((2, 4, 4), np.int8))


# ----------------------------------------------------------------------------------------
# the GPU path's argument logic, run on the CPU through a BLAS emulator


def colmajor(buf, rows: int, cols: int, ld: int):
    """The column-major ``rows x cols`` matrix with leading dimension ``ld`` in a flat buffer,
    read as BLAS defines it: element (r, c) at ``buf[r + c * ld]``. Asserts what BLAS requires."""
    assert ld >= max(1, rows), "BLAS needs ld >= rows"
    assert (cols - 1) * ld + rows <= buf.size, "the matrix would run past its buffer"
    strides = (buf.itemsize, ld * buf.itemsize)
    return np.lib.stride_tricks.as_strided(buf, (rows, cols), strides, writeable=True)


def emulate_cublas_tn(plan, bt_p, a_p, c):
    """What cublasGemm(StridedBatched)Ex computes for a TNPlan, from the BLAS definition:
    C = op(A) op(B) with column-major A (k x m, op T), B (k x n, op N), C (m x n)."""
    assert (plan.transa, plan.transb) == ("T", "N")
    A, B, C = bt_p.reshape(-1), a_p.reshape(-1), c.reshape(-1)  # flat, like device pointers
    assert np.shares_memory(C, c)
    for i in range(plan.batch):
        Ai = colmajor(A[i * plan.stride_a:], plan.k, plan.m, plan.lda)
        Bi = colmajor(B[i * plan.stride_b:], plan.k, plan.n, plan.ldb)
        Ci = colmajor(C[i * plan.stride_c:], plan.m, plan.n, plan.ldc)
        Ci[...] = Ai.T.astype(np.int64) @ Bi.astype(np.int64)


@pytest.mark.parametrize("M, K, N", [(M, K, N) for M, K, N in SHAPES if 0 not in (M, K, N)])
@pytest.mark.parametrize("batch", [1, 3])
def test_gpu_operand_swap_and_padding_logic_is_exact(M, K, N, batch):
    rng = np.random.default_rng(M + K + N)
    a, b = random_int8(rng, (batch, M, K)), random_int8(rng, (batch, K, N))
    c = cuda.int8_matmul_tn(a, b, emulate_cublas_tn)
    assert c.dtype == np.int32 and c.shape == (batch, M, N) and c.flags.c_contiguous
    np.testing.assert_array_equal(c, int8_bmm_reference(a, b))


class FakeCublas:
    """Stands in for cupy_backends' cuBLAS binding on the CPU: same positional signatures as
    ``gemmEx`` / ``gemmStridedBatchedEx`` (parameter names as CuPy declares them), reading
    and writing host memory through the raw pointers it is given, column-major as cuBLAS."""

    CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
    CUBLAS_POINTER_MODE_HOST, CUBLAS_POINTER_MODE_DEVICE = 0, 1
    CUBLAS_COMPUTE_32I, CUBLAS_GEMM_DEFAULT = 72, -1

    class CUBLASError(RuntimeError):
        pass

    def __init__(self):
        self.mode = self.CUBLAS_POINTER_MODE_DEVICE  # something else than HOST to start with
        self.calls = []

    def getPointerMode(self, handle):
        return self.mode

    def setPointerMode(self, handle, mode):
        self.mode = mode

    @staticmethod
    def _matrix(ptr, dtype, rows, cols, ld):
        import ctypes
        n = (cols - 1) * ld + rows
        ctype = {np.int8: ctypes.c_int8, np.int32: ctypes.c_int32}[dtype]
        flat = np.ctypeslib.as_array((ctype * n).from_address(ptr))
        return colmajor(flat, rows, cols, ld)

    def gemmEx(self, handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb,
               beta, C, Ctype, ldc, computeType, algo):
        self.gemmStridedBatchedEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, 0, B, Btype,
                                  ldb, 0, beta, C, Ctype, ldc, 0, 1, computeType, algo)

    def gemmStridedBatchedEx(self, handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA,
                             B, Btype, ldb, strideB, beta, C, Ctype, ldc, strideC, batchCount,
                             computeType, algo):
        import ctypes
        self.calls.append(dict(transa=transa, transb=transb, m=m, n=n, k=k, batch=batchCount))
        assert self.mode == self.CUBLAS_POINTER_MODE_HOST  # alpha, beta are host pointers
        assert (Atype, Btype, Ctype, computeType) == (cuda.CUDA_R_8I, cuda.CUDA_R_8I, cuda.CUDA_R_32I, 72)
        assert ctypes.c_int32.from_address(alpha).value == 1 and ctypes.c_int32.from_address(beta).value == 0
        assert A % 4 == 0 and B % 4 == 0 and C % 4 == 0  # 4-byte aligned pointers
        for i in range(batchCount):
            a = self._matrix(A + i * strideA, np.int8, k if transa == self.CUBLAS_OP_T else m,
                             m if transa == self.CUBLAS_OP_T else k, lda)
            b = self._matrix(B + i * strideB, np.int8, n if transb == self.CUBLAS_OP_T else k,
                             k if transb == self.CUBLAS_OP_T else n, ldb)
            c = self._matrix(C + 4 * i * strideC, np.int32, m, n, ldc)
            op_a = a.T if transa == self.CUBLAS_OP_T else a
            op_b = b.T if transb == self.CUBLAS_OP_T else b
            c[...] = op_a.astype(np.int64) @ op_b.astype(np.int64)


def as_device_pointer(x):
    """A NumPy array dressed as a CuPy one, as far as ``cuda.cublas_tn`` looks: ``x.data.ptr``."""
    from types import SimpleNamespace
    return SimpleNamespace(data=SimpleNamespace(ptr=x.ctypes.data), shape=x.shape, dtype=x.dtype)


@pytest.mark.parametrize("M, K, N, batch",
                         [(1, 1, 1, 1), (3, 5, 7, 1), (5, 1025, 2, 1), (4, 9, 6, 3), (2, 16, 8, 2)])
def test_cublas_call_passes_its_arguments_in_cupys_order(M, K, N, batch, monkeypatch):
    fake = FakeCublas()
    monkeypatch.setattr(backend, "cublas_module", lambda: fake)
    monkeypatch.setattr(backend, "cublas_handle", lambda: 0)
    rng = np.random.default_rng(M * K * N)
    a, b = random_int8(rng, (batch, M, K)), random_int8(rng, (batch, K, N))

    def run_tn(plan, bt_p, a_p, c):
        cuda.cublas_tn(plan, *(as_device_pointer(v) for v in (bt_p, a_p, c)))

    c = cuda.int8_matmul_tn(a, b, run_tn)
    np.testing.assert_array_equal(c, int8_bmm_reference(a, b))
    (call,) = fake.calls
    assert (call["transa"], call["transb"]) == (FakeCublas.CUBLAS_OP_T, FakeCublas.CUBLAS_OP_N)
    assert call["batch"] == batch and call["n"] == M
    assert fake.mode == FakeCublas.CUBLAS_POINTER_MODE_DEVICE  # restored afterwards


def test_gpu_path_falls_back_to_an_exact_integer_matmul_when_cublas_refuses(monkeypatch):
    fake = FakeCublas()
    monkeypatch.setattr(backend, "cublas_module", lambda: fake)

    def refuse(*args):
        raise FakeCublas.CUBLASError("CUBLAS_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(cuda, "cublas_tn", refuse)
    rng = np.random.default_rng(14)
    a, b = random_int8(rng, (2, 3, 1030)), random_int8(rng, (2, 1030, 5))
    with pytest.warns(RuntimeWarning, match="NOT_SUPPORTED"):
        c = cuda.int8_matmul_gpu(a, b)
    assert c.dtype == np.int32
    np.testing.assert_array_equal(c, int8_bmm_reference(a, b))


@pytest.mark.parametrize("M, K, N", [(1, 1, 1), (5, 7, 3), (8, 1024, 12), (3, 1025, 4097)])
def test_plans_meet_the_int8_rules(M, K, N):
    plan = int8_gemm_plan(M, K, N, batch=2)
    assert meets_int8_rules(plan)
    assert (plan.m, plan.n) == (cuda.round_up(N, 4), M) and plan.k == cuda.round_up(K, 4)
    assert plan.k >= K and plan.k - K < 4 and plan.m - N < 4
    assert plan.stride_c * 4 % 4 == 0 and plan.stride_a % 4 == 0 and plan.stride_b % 4 == 0


def test_int8_rules_check_can_fail():
    plan = int8_gemm_plan(3, 8, 8)
    assert not meets_int8_rules(dataclasses.replace(plan, lda=6))
    assert not meets_int8_rules(dataclasses.replace(plan, transa="N"))


def test_transposed_view_of_a_contiguous_weight_needs_no_copy():
    """Storing the weight as [N, K] (torch Linear layout) and passing ``w_t.T`` makes the
    GPU path's transposed operand a no-copy view when K and N are multiples of 4."""
    w_t = np.arange(96).astype(np.int8).reshape(1, 8, 12)  # [B, N, K], C-contiguous
    b = np.swapaxes(w_t, -1, -2)  # [B, K, N]: the view int8_bmm (or int8_gemm) is handed
    bt_p = cuda.zero_pad(np, np.swapaxes(b, -1, -2), (1, 8, 12))
    assert np.shares_memory(bt_p, w_t)
    odd = cuda.zero_pad(np, np.swapaxes(b[:, :11], -1, -2), (1, 8, 12))  # K = 11: padded copy
    assert not np.shares_memory(odd, w_t) and np.all(odd[..., 11] == 0)
    flat = np.arange(1 + 96).astype(np.int8)
    shifted = flat[1:].reshape(1, 8, 12)  # contiguous, but starts 1 byte past an aligned one
    assert cuda.zero_pad(np, shifted, (1, 8, 12)).ctypes.data % 16 == 0


# ----------------------------------------------------------------------------------------
# the epilogue


def test_epilogue_float64_is_the_correctly_rounded_exact_value():
    """With float32 scales, float64 ``acc * (r * c) + b`` rounds once for the product:
    it equals the exact rational value rounded to nearest (Fraction -> float)."""
    rng = np.random.default_rng(6)
    acc = rng.integers(-2**31 + 1, 2**31 - 1, size=(4, 5)).astype(np.int32)
    r = rng.uniform(1e-4, 1e-1, (4, 1)).astype(np.float32)
    c = rng.uniform(1e-4, 1e-1, (5,)).astype(np.float32)
    y = dequant_epilogue(acc, r, c, out_dtype=np.float64)
    assert y.dtype == np.float64
    exact = [[float(Fraction(int(acc[i, j])) * Fraction(float(r[i, 0])) * Fraction(float(c[j])))
              for j in range(5)] for i in range(4)]
    np.testing.assert_array_equal(y, exact)


def test_epilogue_float32_is_within_three_roundings_of_float64():
    rng = np.random.default_rng(7)
    acc = rng.integers(-2**30, 2**30, size=(2, 3, 6)).astype(np.int32)
    r = rng.uniform(1e-4, 1e-1, (2, 3, 1)).astype(np.float32)
    c = rng.uniform(1e-4, 1e-1, (1, 6)).astype(np.float32)
    bias = rng.normal(size=6).astype(np.float32)
    y32 = dequant_epilogue(acc, r, c, bias)
    y64 = acc.astype(np.float64) * (r.astype(np.float64) * c) + bias.astype(np.float64)
    assert y32.dtype == np.float32 and y32.shape == acc.shape
    u = 2.0**-24
    prod = np.abs(acc * (r.astype(np.float64) * c))
    assert np.all(np.abs(y32 - y64) <= 3.01 * u * prod + u * np.abs(y64))


@pytest.mark.parametrize("row, col", [((), ()), ((4, 1), ()), ((), (6,)), ((4, 1), (1, 6)), ((1,), (1, 1))])
def test_epilogue_accepts_per_tensor_per_token_and_per_channel_scales(row, col):
    rng = np.random.default_rng(8)
    acc = rng.integers(-1000, 1000, size=(4, 6)).astype(np.int32)
    r = rng.uniform(0.5, 2, row)
    c = rng.uniform(0.5, 2, col)
    y = dequant_epilogue(acc, r, c, np.arange(6.0), out_dtype=np.float64)
    r2 = r.reshape(()) if r.size == 1 else r  # [4, 1] broadcasts along N as it is
    c2 = c.reshape(()) if c.size == 1 else c.reshape(1, 6)
    np.testing.assert_array_equal(y, acc * (r2 * c2) + np.arange(6.0))


def test_epilogue_validates_shapes_and_dtypes():
    acc = np.zeros((4, 6), np.int32)
    with pytest.raises(ShapeError, match=r"row_scale.*\(4, 1\)"):
        dequant_epilogue(acc, np.ones((6, 1)), 1.0)
    with pytest.raises(ShapeError, match=r"row_scale"):
        dequant_epilogue(acc, np.ones(4), 1.0)  # [M] would broadcast along the wrong axis
    with pytest.raises(ShapeError, match=r"col_scale.*\(6,\)"):
        dequant_epilogue(acc, 1.0, np.ones((6, 1)))
    with pytest.raises(ShapeError, match=r"bias"):
        dequant_epilogue(acc, 1.0, 1.0, np.ones(4))
    with pytest.raises(ShapeError, match="integer"):
        dequant_epilogue(acc.astype(np.float32), 1.0, 1.0)
    with pytest.raises(ShapeError):
        dequant_epilogue(np.zeros(6, np.int32), 1.0, 1.0)
    with pytest.raises(ConfigError):
        dequant_epilogue(acc, 1.0, 1.0, out_dtype=np.int32)


# ----------------------------------------------------------------------------------------
# the integer path == the fake-quant path


ACT = {"per_token": quantize_per_token, "per_tensor": quantize_per_tensor}
WGT = {"per_channel": quantize_per_channel, "per_tensor": quantize_per_tensor}


def integer_path(x, w, b, act, wgt, dtype, x_scale=None, w_scale=None):
    qx, sx = ACT[act](x, x_scale)
    qw, sw = WGT[wgt](w, w_scale)
    return dequant_epilogue(int8_gemm(qx, qw), sx, sw, b, out_dtype=dtype), (qx, sx, qw, sw)


def fake_path(qx, sx, qw, sw, b, dtype):
    y = dequantize(qx, sx, dtype) @ dequantize(qw, sw, dtype)
    return y if b is None else y + b.astype(dtype)


@pytest.mark.parametrize("act", sorted(ACT))
@pytest.mark.parametrize("wgt", sorted(WGT))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_integer_path_equals_fake_quant_path_exactly_when_every_step_is_exact(act, wgt, dtype):
    """Power-of-two scales make every product and partial sum exact in both paths (in
    float32 too, for K <= 1024: |Σ| <= 1024 * 2^14), so the two must agree bit for bit."""
    rng = np.random.default_rng(9)
    T, C_in, C_out = 6, 1000, 7
    x = rng.normal(size=(T, C_in))
    w = rng.normal(size=(C_in, C_out))
    b = rng.integers(-8, 8, C_out) / 4.0  # exact in float32
    x_scale = {"per_token": 2.0 ** -rng.integers(4, 8, (T, 1)), "per_tensor": 2.0**-5}[act]
    w_scale = {"per_channel": 2.0 ** -rng.integers(5, 9, (1, C_out)), "per_tensor": 2.0**-6}[wgt]
    x, w = x.astype(dtype), w.astype(dtype)
    y_int, (qx, sx, qw, sw) = integer_path(x, w, b, act, wgt, dtype, x_scale, w_scale)
    y_fake = fake_path(qx, sx, qw, sw, b, dtype)
    assert y_int.dtype == y_fake.dtype == dtype
    np.testing.assert_array_equal(y_int, y_fake)


@pytest.mark.parametrize("act", sorted(ACT))
@pytest.mark.parametrize("wgt", sorted(WGT))
@pytest.mark.parametrize("dtype, K",
                         [(np.float64, 700), (np.float64, 3000), (np.float32, 700), (np.float32, 3000)])
def test_integer_path_matches_fake_quant_path_within_the_dot_product_bound(act, wgt, dtype, K):
    """With absmax/127 scales, fake(x) @ fake(w) rounds inside its dot products and the
    integer path does not, so they agree to the standard bound
    |error| <= (γ_{K+2} + γ_3) · Δx Δw · (|X̄| @ |W̄|),  γ_n = n u / (1 - n u),
    (fake values round once each, K-term dot product, 3 roundings in the epilogue)."""
    rng = np.random.default_rng(10)
    T, C_out = 5, 9
    x = (rng.normal(size=(T, K)) * rng.uniform(0.1, 10, (T, 1))).astype(dtype)
    w = (rng.normal(size=(K, C_out)) * rng.uniform(0.01, 1, (1, C_out))).astype(dtype)
    b = rng.normal(size=C_out).astype(dtype)
    y_int, (qx, sx, qw, sw) = integer_path(x, w, b, act, wgt, dtype)
    y_fake = fake_path(qx, sx, qw, sw, b, dtype)
    u = np.finfo(dtype).eps / 2

    def gamma(n):
        return n * u / (1 - n * u)

    abs_sum = int8_gemm_reference(np.abs(qx), np.abs(qw)).astype(np.float64)  # |q| <= 127: no wrap
    scale = sx.astype(np.float64) * sw.astype(np.float64)
    y_abs = np.abs(y_int.astype(np.float64))
    bound = 1.001 * ((gamma(K + 2) + gamma(3)) * scale * abs_sum + 2 * u * y_abs)  # 2 bias adds
    err = np.abs(y_int.astype(np.float64) - y_fake.astype(np.float64))
    assert np.all(err <= bound)
    # and the bound means something: about (K + 5) u relative to the sum of |terms|
    assert np.max(bound / (scale * abs_sum + y_abs)) <= 1.01 * (K + 5) * u


def test_leading_axes_flow_through_quantize_gemm_and_epilogue():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 3, 40))  # [B, T, C_in]
    w = rng.normal(size=(40, 5))
    qx, sx = quantize_per_token(x)  # [B, T, 1]
    qw, sw = quantize_per_channel(w)  # [1, C_out]
    y = dequant_epilogue(int8_gemm(qx, qw), sx, sw, out_dtype=np.float64)
    assert y.shape == (2, 3, 5)
    ref = (int8_gemm_reference(qx, qw) * (sx * sw))
    np.testing.assert_array_equal(y, ref)


# ----------------------------------------------------------------------------------------
# the GPU gives the same bits (skipped without a GPU)

GPU_SHAPES = [(1, 1, 1), (1, 7, 1), (3, 5, 7), (13, 31, 17), (2, 1023, 3), (3, 1024, 5), (5, 1025, 2),
              (4, 4097, 3), (64, 768, 3072), (37, 769, 101), (0, 5, 3), (3, 0, 4)]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("M, K, N", GPU_SHAPES)
def test_gpu_int8_gemm_equals_cpu_reference(M, K, N):
    cp = backend.cupy()
    rng = np.random.default_rng(M * 7 + K * 3 + N)
    a, b = random_int8(rng, (M, K)), random_int8(rng, (K, N))
    c = int8_gemm(cp.asarray(a), cp.asarray(b))
    assert isinstance(c, cp.ndarray) and c.dtype == np.int32 and c.shape == (M, N)
    np.testing.assert_array_equal(backend.to_numpy(c), int8_gemm_reference(a, b))
    # the transposed view of a [N, K] weight (torch Linear layout) gives the same bits
    bt = cp.ascontiguousarray(cp.asarray(b).T)
    np.testing.assert_array_equal(backend.to_numpy(int8_gemm(cp.asarray(a), bt.T)), int8_gemm_reference(a, b))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("K", [1024, 16384])
@pytest.mark.parametrize("va, vb", [(127, 127), (127, -127), (-128, -128)])
def test_gpu_extremes_are_exact(K, va, vb):
    cp = backend.cupy()
    c = int8_gemm(cp.full((8, K), va, dtype=cp.int8), cp.full((K, 8), vb, dtype=cp.int8))
    np.testing.assert_array_equal(backend.to_numpy(c), np.full((8, 8), K * va * vb))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("lead, M, K, N",
                         [((1,), 1, 1, 1), ((3,), 5, 7, 2), ((2, 3), 4, 1025, 6), ((2, 12), 64, 64, 64)])
def test_gpu_int8_bmm_equals_cpu_reference(lead, M, K, N):
    cp = backend.cupy()
    rng = np.random.default_rng(K + N)
    a, b = random_int8(rng, lead + (M, K)), random_int8(rng, lead + (K, N))
    c = int8_bmm(cp.asarray(a), cp.asarray(b))
    assert c.shape == lead + (M, N) and c.dtype == np.int32
    np.testing.assert_array_equal(backend.to_numpy(c), int8_bmm_reference(a, b))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("row, col, with_bias",
                         [((), (), False), ((2, 5, 1), (7,), True), ((), (1, 7), True), ((2, 5, 1), (), False)])
def test_gpu_epilogue_equals_numpy_bit_for_bit(dtype, row, col, with_bias):
    cp = backend.cupy()
    rng = np.random.default_rng(12)
    acc = rng.integers(-2**31 + 1, 2**31 - 1, size=(2, 5, 7)).astype(np.int32)
    r = rng.uniform(1e-4, 1e-1, row).astype(np.float32)
    c = rng.uniform(1e-4, 1e-1, col).astype(np.float32)
    bias = rng.normal(size=7).astype(np.float32) if with_bias else None
    y = dequant_epilogue(acc, r, c, bias, out_dtype=dtype)
    yg = dequant_epilogue(cp.asarray(acc), cp.asarray(r), cp.asarray(c),
                          None if bias is None else cp.asarray(bias), out_dtype=dtype)
    assert isinstance(yg, cp.ndarray) and yg.dtype == dtype and yg.shape == acc.shape
    np.testing.assert_array_equal(backend.to_numpy(yg), y)


@pytest.mark.gpu
@requires_gpu
def test_gpu_integer_path_equals_cpu_integer_path():
    cp = backend.cupy()
    rng = np.random.default_rng(13)
    x = rng.normal(size=(17, 301)).astype(np.float32)
    w = rng.normal(size=(301, 45)).astype(np.float32)
    qx, sx = quantize_per_token(x)
    qw, sw = quantize_per_channel(w)
    y = dequant_epilogue(int8_gemm(qx, qw), sx, sw)
    qxg, sxg = quantize_per_token(cp.asarray(x))
    qwg, swg = quantize_per_channel(cp.asarray(w))
    yg = dequant_epilogue(int8_gemm(qxg, qwg), sxg, swg)
    np.testing.assert_array_equal(backend.to_numpy(yg), y)
    assert math.isfinite(float(yg.sum()))


def test_exact_gemm_is_right_from_concurrent_threads():
    """The CPU path converts weights into a reused float32 workspace: one per thread, so two
    threads multiplying different weights of the same shape never see each other's."""
    import threading

    from minisq.gemm import int8_gemm, int8_gemm_reference

    rng = np.random.default_rng(0)
    pairs = [(rng.integers(-127, 128, (64, 96)).astype(np.int8), rng.integers(-127, 128, (96, 80)).astype(np.int8))
             for _ in range(4)]
    wrong = []

    def work(a, b):
        want = int8_gemm_reference(a, b)
        for _ in range(50):
            if not np.array_equal(int8_gemm(a, b), want):
                wrong.append(1)

    threads = [threading.Thread(target=work, args=p) for p in pairs]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not wrong
