"""The GPU kernels: cuBLAS's int8 GEMM (TN layout), the fused dequantization epilogue and the
fused per-token quantizer, each computing bit for bit what its CPU reference computes.

Legend: M rows of the left operand (tokens T), K the reduced axis (C_in), N columns
(C_out), B a batch axis, ``...`` leading axes.

CuPy comes from :mod:`minisq.backend` (``backend.cupy()``, ``backend.cublas_module()``),
the one module that imports it. The operand shuffling for cuBLAS (:class:`TNPlan`,
:func:`int8_matmul_tn`) is pure Python over the array module, so the tests check it on the
CPU too with a NumPy emulator of cuBLAS. The references: :func:`minisq.gemm.int8_gemm_reference`,
:func:`minisq.gemm.dequant_epilogue` on NumPy, :func:`minisq.quant.quantize_per_token` on NumPy.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import numpy as np

from .. import backend
from ..backend import get_array_module
from ..errors import ShapeError


# ----------------------------------------------------------------------------------------
# the int8 GEMM: cuBLAS (column-major), with its argument logic in pure Python


@dataclasses.dataclass(frozen=True)
class TNPlan:
    """The arguments of the column-major cuBLAS call that computes row-major ``C = A @ B``.

    cuBLAS reads matrices column-major: a row-major ``[R, S]`` buffer is, to cuBLAS, the
    ``S x R`` matrix (its transpose) with leading dimension ``S``. So row-major
    ``C[M, N] = A[M, K] @ B[K, N]`` is asked for as column-major ``C^T = B^T A^T`` — the
    operands swap places. The int8 tensor-core (IMMA) kernels want the "TN" form (first
    operand transposed, second not: both read along K), leading dimensions and m, k
    multiples of 4, and 4-byte aligned pointers (our reading of the cuBLAS/cuBLASLt docs;
    newer versions may accept more, and a refused call falls back, see
    :func:`int8_matmul_gpu`). So the GPU path hands cuBLAS:

    * as cuBLAS's A (``op = T``): ``B^T`` stored row-major ``[N4, K4]`` (like torch's Linear
      weight ``[C_out, C_in]``); column-major that is ``K4 x N4``, ``lda = K4``;
    * as cuBLAS's B (``op = N``): ``A`` stored row-major ``[M, K4]``: column-major
      ``K4 x M``, ``ldb = K4``;
    * as cuBLAS's C: row-major ``[M, N4]``: column-major ``N4 x M``, ``ldc = N4``;

    with K4, N4 = K, N rounded up to multiples of 4 by zero padding (zeros add nothing to
    the sums; padded columns of C are dropped). Operands start 16-byte aligned
    (:func:`zero_pad`) and every per-batch offset below is a multiple of 4 bytes.
    """

    m: int  # rows of op(A) and of C, in cuBLAS's terms: N4
    n: int  # columns of op(B) and of C: M
    k: int  # the reduced axis: K4
    lda: int
    ldb: int
    ldc: int
    batch: int = 1
    stride_a: int = 0  # elements between batches of cuBLAS's A, B, C
    stride_b: int = 0
    stride_c: int = 0
    transa: str = "T"
    transb: str = "N"


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def int8_gemm_plan(M: int, K: int, N: int, batch: int = 1) -> TNPlan:
    """The :class:`TNPlan` for ``[batch, M, K] @ [batch, K, N]`` (see its docstring)."""
    K4, N4 = round_up(K, 4), round_up(N, 4)
    return TNPlan(m=N4, n=M, k=K4, lda=K4, ldb=K4, ldc=N4, batch=batch,
                  stride_a=N4 * K4, stride_b=M * K4, stride_c=M * N4)


def meets_int8_rules(plan: TNPlan) -> bool:
    """True when a plan meets cuBLAS's int8 tensor-core rules (TN; m, k, lda, ldb, ldc % 4 == 0)."""
    return (plan.transa, plan.transb) == ("T", "N") and all(
        v % 4 == 0 for v in (plan.m, plan.k, plan.lda, plan.ldb, plan.ldc,
                             plan.stride_a, plan.stride_b)
    )


def _address(x) -> int:
    """The address of an array's first element (CuPy: device pointer, NumPy: host pointer)."""
    return x.data.ptr if hasattr(x.data, "ptr") else x.ctypes.data


def zero_pad(xp, x, shape: tuple):
    """x as a C-contiguous, 16-byte aligned array, zero-padded at the end of each axis up to
    ``shape``; x itself (no copy) when it already is all that."""
    if tuple(x.shape) == shape:
        x = xp.ascontiguousarray(x)
        # a view can start at any byte (e.g. flat[1:].reshape(...)); a fresh array is aligned
        return x if _address(x) % 16 == 0 else x.copy()
    out = xp.zeros(shape, dtype=x.dtype)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out


def int8_matmul_tn(a, b, run_tn):
    """``[B, M, K] @ [B, K, N]`` through a column-major TN int8 GEMM ``run_tn``.

    ``run_tn(plan, bt_p, a_p, c)`` must fill ``c`` as cuBLAS would (see :class:`TNPlan`):
    on the GPU it is :func:`cublas_tn`; the tests pass a NumPy emulator of the BLAS
    convention, so all of this operand shuffling is checked on the CPU too. ``b`` is
    transposed and padded here, per call (no copy for the transposed view of a
    C-contiguous ``[B, N, K]`` with K, N multiples of 4); :class:`TNWeight` does it once.
    """
    # [B, M, K] int8, [B, K, N] int8 -> [B, M, N] int32
    xp = get_array_module(a)
    nb, K, N = b.shape
    bt_p = zero_pad(xp, xp.swapaxes(b, -1, -2), (nb, round_up(N, 4), round_up(K, 4)))  # [B, N4, K4]
    return int8_matmul_tn_packed(a, bt_p, N, run_tn)


def int8_matmul_tn_packed(a, bt_p, N: int, run_tn):
    """``[B, M, K] @ B`` with B already packed as ``bt_p`` ``[B, N4, K4]`` (zero-padded Bᵀ)."""
    # [B, M, K] int8, [B, N4, K4] int8 -> [B, M, N] int32
    xp = get_array_module(a)
    nb, M, K = a.shape
    plan = int8_gemm_plan(M, K, N, batch=nb)
    assert bt_p.shape == (nb, plan.m, plan.k), (bt_p.shape, plan)
    a_p = zero_pad(xp, a, (nb, M, plan.k))                               # [B, M, K4]
    c = xp.empty((nb, M, plan.m), dtype=xp.int32)                         # [B, M, N4]
    run_tn(plan, bt_p, a_p, c)
    return c if plan.m == N else xp.ascontiguousarray(c[..., :N])


@dataclasses.dataclass(frozen=True, eq=False)
class TNWeight:
    """An int8 weight ``[C_in, C_out] = [K, N]`` packed once in cuBLAS's TN layout.

    ``tn`` is ``[N4, K4]`` int8, C-contiguous, 16-byte aligned and zero-padded: the
    transposed weight (torch's Linear layout ``[C_out, C_in]``), K and N rounded up to
    multiples of 4 (see :class:`TNPlan`). :func:`minisq.gemm.int8_gemm` hands it to cuBLAS
    as it is, so a W8A8 layer on the GPU never transposes or pads its weight per call.
    :meth:`view` is the ``[K, N]`` weight as a view of the same memory (no second copy).
    """

    tn: object      # [N4, K4] int8
    shape: tuple    # (K, N): the logical weight [C_in, C_out]

    def view(self):
        # [N4, K4] int8 -> [K, N] int8 (a transposed view: no copy)
        K, N = self.shape
        return self.tn[:N, :K].T

    @property
    def dtype(self):
        return self.tn.dtype


def pack_weight_tn(w_q) -> TNWeight:
    """Pack an int8 weight ``[K, N]`` into a :class:`TNWeight` (one transposed, padded copy)."""
    # [K, N] int8 -> TNWeight [N4, K4] int8
    if isinstance(w_q, TNWeight):
        return w_q
    xp = get_array_module(w_q)
    if w_q.dtype != np.int8 or w_q.ndim != 2:
        raise ShapeError(f"pack_weight_tn takes an int8 weight [K, N], got {tuple(w_q.shape)} {w_q.dtype}")
    K, N = w_q.shape
    tn = xp.zeros((round_up(N, 4), round_up(K, 4)), dtype=xp.int8)  # fresh: C-contiguous, aligned
    tn[:N, :K] = w_q.T
    return TNWeight(tn, (K, N))


# cudaDataType_t values from CUDA's library_types.h (CuPy's runtime module lacks CUDA_R_32I),
# and cublasComputeType_t's CUBLAS_COMPUTE_32I from cublas_api.h (not every CuPy release
# exports it; CuPy's gemmEx takes the v11 compute-type path for values >= 64).
CUDA_R_8I = 3
CUDA_R_32I = 10
CUBLAS_COMPUTE_32I = 72


def cublas_tn(plan: TNPlan, bt_p, a_p, c) -> None:
    """Run a :class:`TNPlan` with ``cublasGemmEx`` (or its strided-batched form) into ``c``."""
    cublas = backend.cublas_module()
    handle = backend.cublas_handle()
    # CUBLAS_COMPUTE_32I takes int32 alpha and beta; they are read from host memory.
    one = np.ones((), dtype=np.int32)
    zero = np.zeros((), dtype=np.int32)
    op = {"N": cublas.CUBLAS_OP_N, "T": cublas.CUBLAS_OP_T}
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    try:
        if plan.batch == 1:
            cublas.gemmEx(
                handle, op[plan.transa], op[plan.transb], plan.m, plan.n, plan.k,
                one.ctypes.data,
                bt_p.data.ptr, CUDA_R_8I, plan.lda,
                a_p.data.ptr, CUDA_R_8I, plan.ldb,
                zero.ctypes.data,
                c.data.ptr, CUDA_R_32I, plan.ldc,
                CUBLAS_COMPUTE_32I, cublas.CUBLAS_GEMM_DEFAULT)
        else:
            cublas.gemmStridedBatchedEx(
                handle, op[plan.transa], op[plan.transb], plan.m, plan.n, plan.k,
                one.ctypes.data,
                bt_p.data.ptr, CUDA_R_8I, plan.lda, plan.stride_a,
                a_p.data.ptr, CUDA_R_8I, plan.ldb, plan.stride_b,
                zero.ctypes.data,
                c.data.ptr, CUDA_R_32I, plan.ldc, plan.stride_c,
                plan.batch, CUBLAS_COMPUTE_32I, cublas.CUBLAS_GEMM_DEFAULT)
    finally:
        cublas.setPointerMode(handle, mode)


def int8_matmul_gpu(a, b):
    """``[B, M, K] @ [B, K, N]`` int8 -> int32 on the GPU: cuBLAS int8 GEMM, exact.

    ``b`` may be a :class:`TNWeight` (B = 1): then it goes to cuBLAS as packed. Falls back
    (with a warning) to CuPy's integer matmul in int32 — also exact, but without tensor
    cores — if cuBLAS refuses the call (e.g. CUBLAS_STATUS_NOT_SUPPORTED on a GPU without
    int8 support).
    """
    # [B, M, K] int8, [B, K, N] int8 | TNWeight -> [B, M, N] int32
    xp = get_array_module(a)
    packed = isinstance(b, TNWeight)
    N = b.shape[1] if packed else b.shape[-1]
    if 0 in a.shape or 0 in b.shape:
        return xp.zeros(a.shape[:-1] + (N,), dtype=xp.int32)
    cublas = backend.cublas_module()
    try:
        if packed:
            return int8_matmul_tn_packed(a, b.tn[None], N, cublas_tn)
        return int8_matmul_tn(a, b, cublas_tn)
    except cublas.CUBLASError as e:
        warnings.warn(f"cuBLAS int8 GEMM refused ({e}); using CuPy's int32 matmul (exact, slower)",
                      RuntimeWarning, stacklevel=3)
        b = b.view()[None] if packed else b
        return xp.matmul(a.astype(xp.int32), b.astype(xp.int32))


# ----------------------------------------------------------------------------------------
# the dequantization epilogue

# a fused multiply-add, which would round once instead of twice and differ from NumPy.
# For float16 output the kernel computes in float32 and converts with CuPy's float16
# constructor (__float2half_rn: to nearest, ties to even, as NumPy's astype).
_EPILOGUE_PREAMBLE = r"""
__device__ __forceinline__ float  mul_rn(float a, float b)   { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float  add_rn(float a, float b)   { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
"""

# (with bias, float16 output) -> (params, operation): T is the compute dtype, Y the output's
_EPILOGUE_KERNELS = {
    (False, False): ("I acc, T row_scale, T col_scale", "T y",
                     "y = mul_rn((T)acc, mul_rn(row_scale, col_scale))"),
    (True, False): ("I acc, T row_scale, T col_scale, T bias", "T y",
                    "y = add_rn(mul_rn((T)acc, mul_rn(row_scale, col_scale)), bias)"),
    (False, True): ("I acc, T row_scale, T col_scale", "Y y",
                    "y = (Y)mul_rn((T)acc, mul_rn(row_scale, col_scale))"),
    (True, True): ("I acc, T row_scale, T col_scale, T bias", "Y y",
                   "y = (Y)add_rn(mul_rn((T)acc, mul_rn(row_scale, col_scale)), bias)"),
}


@functools.lru_cache(maxsize=4)
def _epilogue_kernel(with_bias: bool, half_out: bool):
    params, out, op = _EPILOGUE_KERNELS[with_bias, half_out]
    name = "minisq_dequant_epilogue" + ("_bias" if with_bias else "") + ("_f16" if half_out else "")
    return backend.cupy().ElementwiseKernel(params, out, op, name, preamble=_EPILOGUE_PREAMBLE)


def epilogue(acc, r, c, b, dtype):
    # [..., M, N] int, [..., M, 1] | [], [N] | [1, N] | [], [N] | None -> [..., M, N] dtype
    half_out = dtype == np.float16
    kernel = _epilogue_kernel(b is not None, half_out)
    args = (acc, r, c) if b is None else (acc, r, c, b)
    if half_out:  # the output array fixes Y = float16 (it cannot be inferred from the inputs)
        return kernel(*args, backend.cupy().empty(acc.shape, dtype=np.float16))
    return kernel(*args)


# ----------------------------------------------------------------------------------------
# the per-token quantizer

# One thread block per token (row): the threads stride over the row taking max |x|
# (NaN-propagating, like np.max), reduce it in shared memory, compute the scale with the
# zero-range guard, then quantize the row they just read (now in cache) and write int8.
# Every step is the IEEE operation NumPy performs: division rounded to nearest
# (__fdiv_rn / __ddiv_rn, which fast-math could not replace), rint = round half to even,
# clip to ±127, and the exact cast of an integral value to int8. float16 input is widened
# to float32 exactly (cvt.f32.f16), as _float_input does. So the GPU's q and scale equal
# NumPy's bit for bit (tests/test_fast_paths.py holds an emulator of these steps against
# quantize_per_token on the CPU, and compiles this source with NVRTC where it can).
QUANTIZE_ROWS_THREADS = 256
QUANTIZE_ROWS_SOURCE = r"""
#define QMAX 127
#define THREADS 256

__device__ __forceinline__ float  widen(float v)  { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float  widen(unsigned short h) {   // float16 bits -> float32, exact
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ float  div_rn(float a, float b)   { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float  smallest_normal(float)  { return 1.17549435e-38f; }
__device__ __forceinline__ double smallest_normal(double) { return 2.2250738585072014e-308; }
// max that keeps a NaN from either side (fmax would drop it)
template <typename F> __device__ __forceinline__ F nan_max(F a, F b) { return (a != a || a > b) ? a : b; }

// x [T, C] (In) -> q [T, C] int8, scale [T] (F); one block of THREADS threads per row
template <typename In, typename F>
__device__ void quantize_rows(const In* x, signed char* q, F* scale, long long C) {
    __shared__ F partial[THREADS];
    const long long row = blockIdx.x;
    const In* xr = x + row * C;
    signed char* qr = q + row * C;
    F m = 0;
    for (long long k = threadIdx.x; k < C; k += THREADS) m = nan_max(m, fabs(widen(xr[k])));
    partial[threadIdx.x] = m;
    __syncthreads();
    for (int half = THREADS / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] = nan_max(partial[threadIdx.x], partial[threadIdx.x + half]);
        __syncthreads();
    }
    F s = div_rn(partial[0], (F)QMAX);            // dynamic_scale: max|x| / 127 ...
    if (s < smallest_normal(s)) s = (F)1;          // ... with the zero-range guard (NaN stays NaN)
    if (threadIdx.x == 0) scale[row] = s;
    for (long long k = threadIdx.x; k < C; k += THREADS) {
        F v = rint(div_rn(widen(xr[k]), s));      // round half to even
        v = fmin(fmax(v, (F)-QMAX), (F)QMAX);     // clip
        qr[k] = (signed char)v;
    }
}

extern "C" __global__ void minisq_quantize_rows_f32(const float* x, signed char* q, float* scale, long long C) {
    quantize_rows<float, float>(x, q, scale, C);
}
extern "C" __global__ void minisq_quantize_rows_f64(const double* x, signed char* q, double* scale, long long C) {
    quantize_rows<double, double>(x, q, scale, C);
}
extern "C" __global__ void minisq_quantize_rows_f16(const unsigned short* x, signed char* q, float* scale, long long C) {
    quantize_rows<unsigned short, float>(x, q, scale, C);
}
"""
# x's dtype -> (kernel name, scale dtype)
FUSED_DTYPES = {
    np.dtype(np.float32): ("minisq_quantize_rows_f32", np.float32),
    np.dtype(np.float64): ("minisq_quantize_rows_f64", np.float64),
    np.dtype(np.float16): ("minisq_quantize_rows_f16", np.float32),  # float16 bits, computed in float32
}


@functools.lru_cache(maxsize=1)
def _quantize_rows_module():
    """The compiled :data:`QUANTIZE_ROWS_SOURCE` (NVRTC, once per process)."""
    return backend.cupy().RawModule(code=QUANTIZE_ROWS_SOURCE, options=("--std=c++14",))


def quantize_per_token(x):
    """:func:`minisq.quant.quantize_per_token` with a dynamic scale, one kernel launch.

    ``x`` is a CuPy array of a dtype in :data:`FUSED_DTYPES` with a non-empty last axis
    (the caller checks). A row holding NaN/inf gets a NaN/inf scale: the caller checks
    the (small) scales, not x.
    """
    # [..., C] float16/32/64 (CuPy) -> [..., C] int8, [..., 1] float32/64
    cp = backend.cupy()
    name, scale_dtype = FUSED_DTYPES[x.dtype]
    C = x.shape[-1]
    T = x.size // C
    x2 = cp.ascontiguousarray(x).reshape(T, C)
    q = cp.empty((T, C), dtype=cp.int8)
    s = cp.empty((T,), dtype=scale_dtype)
    if T:
        src = x2.view(cp.uint16) if x.dtype == np.float16 else x2
        _quantize_rows_module().get_function(name)((T,), (QUANTIZE_ROWS_THREADS,), (src, q, s, np.int64(C)))
    return q.reshape(x.shape), s.reshape(x.shape[:-1] + (1,))
