"""The INT8 GEMM (int8 x int8 -> int32) and its dequantization epilogue.

Legend: M rows of the left operand (tokens T), K the reduced axis (C_in), N columns of the
right operand (C_out), B a batch axis (e.g. batch x heads for attention), ``...`` any
leading axes. Weights are stored ``[K, N] = [C_in, C_out]`` so that ``y = x @ w``.

SmoothQuant's W8A8 linear layer (paper Sec. 2, Eq. 1 and Fig. 3) computes

    Y[t, j] = Δx[t] · Δw[j] · (Σ_k X̄[t, k] · W̄[k, j]) + b[j]

with X̄, W̄ the int8 arrays of :mod:`minisq.quant`: the sum is integer arithmetic (an int32
accumulator, :func:`int8_gemm`) and the scales are applied once per output element
afterwards (:func:`dequant_epilogue`). This only works because each scale is constant
along k: per-token (or per-tensor) for X, per-output-channel (or per-tensor) for W — the
"outer dimensions" of the paper's Fig. 3 caption; a per-input-channel scale would break
the integer sum.

Three ways to get the integer sum, kept side by side and tested against each other:

* :func:`int8_gemm_loops` — Python's unbounded ints in a triple loop; tiny sizes only.
* :func:`int8_gemm_reference` — ``int64 @ int64`` in the array library: exact, slow.
* :func:`int8_gemm` / :func:`int8_bmm` — the fast paths: float32 BLAS in one call or over
  K-blocks on the CPU (bit-exact, see :func:`_int8_matmul_cpu`), cuBLAS's int8 tensor-core
  GEMM on the GPU (with the weight packed once: :class:`TNWeight`).

:func:`int8_linear` is a whole layer's integer math, ``dequant_epilogue(int8_gemm(...))``
bit for bit, in one step (the W8A8 layers call it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import warnings

import numpy as np

from . import backend
from .backend import get_array_module
from .errors import ConfigError, DeviceError, ShapeError

# Every int8 product is at most 128 * 128 = 2^14 in magnitude ((-128) * (-128); the
# quantizers only produce [-127, 127], but any int8 array is accepted here).
MAX_PRODUCT = 128 * 128
# float32 holds every integer of magnitude <= 2^24 exactly. A sum of at most 1024 products
# never leaves that range, whatever order it is added in: a K-block of 1024 is exact.
BLOCK_K = 2**24 // MAX_PRODUCT  # = 1024
# The int32 accumulator holds |sum| <= K * 2^14 as long as that is <= 2^31 - 1.
MAX_K = (2**31 - 1) // MAX_PRODUCT  # = 131071


# ----------------------------------------------------------------------------------------
# operand checks


def _check_operands(a_q, b_q, what: str, batched: bool):
    """The array module of two int8 operands whose inner dimensions agree; ShapeError if not."""
    xp = get_array_module(a_q)
    if get_array_module(b_q) is not xp:
        raise DeviceError(
            f"{what}: a_q and b_q live on different devices (one NumPy, one CuPy): move both "
            f"with minisq.backend.to_device"
        )
    desc = f"a_q {tuple(a_q.shape)} {a_q.dtype} and b_q {tuple(b_q.shape)} {b_q.dtype}"
    if a_q.dtype != np.int8 or b_q.dtype != np.int8:
        raise ShapeError(f"{what} takes two int8 arrays, got {desc}: quantize them first (minisq.quant)")
    if batched:
        if a_q.ndim < 3 or b_q.ndim != a_q.ndim or a_q.shape[:-2] != b_q.shape[:-2]:
            raise ShapeError(
                f"{what} takes [..., M, K] x [..., K, N] with the same leading axes (at least "
                f"one), got {desc}"
            )
        ka, kb = a_q.shape[-1], b_q.shape[-2]
    else:
        if a_q.ndim < 1 or b_q.ndim != 2:
            raise ShapeError(f"{what} takes [..., K] x [K, N], got {desc}")
        ka, kb = a_q.shape[-1], b_q.shape[0]
    if ka != kb:
        raise ShapeError(f"{what}: inner dimensions differ ({ka} != {kb}) for {desc}")
    if ka > MAX_K:
        raise ShapeError(
            f"{what}: K = {ka} could overflow the int32 accumulator (|sum| <= K * 128^2 must "
            f"stay below 2^31, so K <= {MAX_K}); split K and add the int32 parts in int64"
        )
    return xp


# ----------------------------------------------------------------------------------------
# references: exact integer arithmetic, written to be read


def int8_gemm_loops(a_q, b_q):
    """``C[i, j] = Σ_k A[i, k] · B[k, j]`` as a triple loop over Python ints (never overflow).

    The most independent oracle there is; O(M·N·K) Python steps, so tiny sizes only.
    """
    # [M, K] int8, [K, N] int8 -> [M, N] int32
    _check_operands(a_q, b_q, "int8_gemm_loops", batched=False)
    if a_q.ndim != 2:
        raise ShapeError(f"int8_gemm_loops takes a 2-D a_q [M, K], got shape {a_q.shape}")
    (M, K), N = a_q.shape, b_q.shape[1]
    a = backend.to_numpy(a_q).tolist()  # nested lists of Python ints
    b = backend.to_numpy(b_q).tolist()
    c = [[sum(a[i][k] * b[k][j] for k in range(K)) for j in range(N)] for i in range(M)]
    return np.array(c, dtype=np.int32).reshape(M, N)


def int8_gemm_reference(a_q, b_q):
    """``A @ B`` in int64 (exact for any K here), returned as int32.

    The oracle of the fast paths; no BLAS, so it is slow (~1 GMAC/s on a CPU core).
    """
    # [..., K] int8, [K, N] int8 -> [..., N] int32
    xp = _check_operands(a_q, b_q, "int8_gemm_reference", batched=False)
    acc = xp.matmul(a_q.astype(xp.int64), b_q.astype(xp.int64))
    return acc.astype(xp.int32)  # |acc| <= K * 2^14 <= 2^31 - 1: checked above


def int8_bmm_reference(a_q, b_q):
    """Batched ``A[b] @ B[b]`` in int64, returned as int32 (the oracle of :func:`int8_bmm`)."""
    # [..., M, K] int8, [..., K, N] int8 -> [..., M, N] int32
    xp = _check_operands(a_q, b_q, "int8_bmm_reference", batched=True)
    return xp.matmul(a_q.astype(xp.int64), b_q.astype(xp.int64)).astype(xp.int32)


# ----------------------------------------------------------------------------------------
# CPU fast path: float32 BLAS (one call, or over K-blocks), bit-exact


def _float32_sums(a, b32, out=None):
    """``a @ b`` in one float32 BLAS call, as float32 holding the exact integer sums, or
    None when one call might round (then :func:`_int8_matmul_cpu` goes block by block).
    ``b32`` is the int8 ``b`` already converted to float32 (exactly, :func:`_as_float32`).

    Float32 holds every integer of magnitude <= 2^24. Every product |a·b| <= 128 · |a|, so
    every partial sum BLAS can form for row i, in any order, has magnitude at most
    ``128 · Σ_k |a[i, k]|``. When that bound is <= 2^24 for every row, every addition
    (or fused multiply-add) is exact and one call over all of K is exact. K <= 1024 always
    qualifies (1024 · 2^14 = 2^24); for longer K the row sums are checked on the data.
    Quantized activations usually pass, since a per-token row has one entry at ±127 and
    most far below (int8 codes of GELU(N(0, 1)) rows, K = 3072: at most 44% of the bound;
    of N(0, 1) rows: 80%), which saves the blocks' extra BLAS calls and int32 adds;
    adversarial rows (e.g. all ±127) take the blocks.
    """
    # [..., M, K] int8, [..., K, N] float32 -> [..., M, N] float32 (exact integers; out if given) or None
    a32 = a.astype(np.float32)
    if a.shape[-1] > BLOCK_K:
        # |a| <= 128 and K <= MAX_K keep these float32 row sums below 2^24: exact
        row_l1 = np.abs(a32).sum(axis=-1)
        if row_l1.size and float(row_l1.max()) * 128 > 2**24:
            return None
    return np.matmul(a32, b32, out=out)


# One reusable float32 buffer per weight shape (and per thread): converting an int8 weight
# into a fresh array on every call pays the kernel's page faults and zeroing of each new
# allocation, which made the W8A8 forward's time swing by 10-20%. This is a workspace, not
# a float32 copy of the weights: one buffer per distinct shape (GPT-2 small: 4 shapes, 30
# MiB; OPT-6.7B: 4 shapes, 1 GiB), overwritten by every call.
_WORKSPACE = threading.local()


def _as_float32(b, threaded: bool = False):
    # [K, N] int8 -> [K, N] float32, in this thread's buffer for the shape (valid until the next call)
    # threaded=True converts with the rows over the cores: for a GEMM minisq then also shares
    # out itself (a GEMM left to BLAS's own threads leaves them spinning, and a threaded
    # conversion right after would fight them for the cores)
    if b.ndim != 2:
        return b.astype(np.float32)
    buffers = getattr(_WORKSPACE, "buffers", None)
    if buffers is None:
        buffers = _WORKSPACE.buffers = {}
    buf = buffers.get(b.shape)
    if buf is None:
        if len(buffers) >= 8:
            buffers.clear()
        buf = buffers[b.shape] = np.empty(b.shape, np.float32)
    if threaded:
        backend.split_rows(_copy_into, b, buf)   # int8 -> float32, exact
    else:
        np.copyto(buf, b, casting="unsafe")
    return buf


def _copy_into(src, dst):
    np.copyto(dst, src, casting="unsafe")


def _int8_matmul_cpu(a, b):
    """Exact int8 matmul through float32 BLAS (sgemm): one call when the data allows it
    (:func:`_float32_sums`), else over K-blocks of 1024.

    NumPy's integer matmul has no BLAS behind it and is 100-200x slower than sgemm, so the
    integers are multiplied as float32 instead. This is exact, not approximate:

    * every int8 is a float32 exactly, and every product |a·b| <= 2^14 is too;
    * within a K-block of at most 1024 terms, any partial sum of any subset of the products
      is an integer of magnitude <= 1024 · 2^14 = 2^24, and float32 represents every such
      integer exactly. So each addition (or fused multiply-add) BLAS performs, in whatever
      order, blocking or vectorization it chooses, has an exact result: nothing is rounded;
    * each block's float32 result is therefore the exact integer, cast to int32 exactly, and
      the blocks are summed in int32, which cannot overflow for K <= MAX_K.

    (float64 dgemm would be exact up to K = 2^39 without blocks, but runs at half sgemm's
    speed; the blocks cost one int32 add of the [M, N] output per 1024 of K.) The K-blocks
    are converted into two reused float32 buffers rather than converting all of A and B at
    once: the same arithmetic, less fresh memory to fault in (which dominates the overhead
    on small shapes, and on VMs where page faults are expensive).
    """
    # [..., M, K] int8, [..., K, N] int8 -> [..., M, N] int32  (same leading axes)
    part = _float32_sums(a, _as_float32(b))
    if part is not None:
        return part.astype(np.int32)  # exact: part holds integers of magnitude <= 2^24
    return _int8_matmul_cpu_blocked(a, b)


def _int8_matmul_cpu_blocked(a, b):
    """The K-blocked exact path (blocks of 1024, see :func:`_int8_matmul_cpu`)."""
    # [..., M, K] int8, [..., K, N] int8 -> [..., M, N] int32  (same leading axes)
    K, N = a.shape[-1], b.shape[-1]
    a_blk = np.empty(a.shape[:-1] + (BLOCK_K,), dtype=np.float32)    # [..., M, 1024]
    b_blk = np.empty(b.shape[:-2] + (BLOCK_K, N), dtype=np.float32)  # [..., 1024, N]
    part = np.empty(a.shape[:-1] + (N,), dtype=np.float32)  # [..., M, N] one block's exact sums
    acc = np.empty(part.shape, dtype=np.int32)               # [..., M, N] the running total
    for k0 in range(0, K, BLOCK_K):
        kb = min(BLOCK_K, K - k0)
        a32, b32 = a_blk[..., :kb], b_blk[..., :kb, :]
        np.copyto(a32, a[..., k0:k0 + kb])  # int8 -> float32, exact
        np.copyto(b32, b[..., k0:k0 + kb, :])
        np.matmul(a32, b32, out=part)
        if k0 == 0:
            np.copyto(acc, part, casting="unsafe")  # float32 -> int32: exact, part holds integers
        else:
            np.add(acc, part, out=acc, dtype=np.int32, casting="unsafe")
    return acc


# ----------------------------------------------------------------------------------------
# GPU path: cuBLAS int8 GEMM (column-major), with its argument logic in pure Python


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
    :func:`_int8_matmul_gpu`). So the GPU path hands cuBLAS:

    * as cuBLAS's A (``op = T``): ``B^T`` stored row-major ``[N4, K4]`` (like torch's Linear
      weight ``[C_out, C_in]``); column-major that is ``K4 x N4``, ``lda = K4``;
    * as cuBLAS's B (``op = N``): ``A`` stored row-major ``[M, K4]``: column-major
      ``K4 x M``, ``ldb = K4``;
    * as cuBLAS's C: row-major ``[M, N4]``: column-major ``N4 x M``, ``ldc = N4``;

    with K4, N4 = K, N rounded up to multiples of 4 by zero padding (zeros add nothing to
    the sums; padded columns of C are dropped). Operands start 16-byte aligned
    (:func:`_zero_pad`) and every per-batch offset below is a multiple of 4 bytes.
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


def _zero_pad(xp, x, shape: tuple):
    """x as a C-contiguous, 16-byte aligned array, zero-padded at the end of each axis up to
    ``shape``; x itself (no copy) when it already is all that."""
    if tuple(x.shape) == shape:
        x = xp.ascontiguousarray(x)
        # a view can start at any byte (e.g. flat[1:].reshape(...)); a fresh array is aligned
        return x if _address(x) % 16 == 0 else x.copy()
    out = xp.zeros(shape, dtype=x.dtype)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out


def _int8_matmul_tn(a, b, run_tn):
    """``[B, M, K] @ [B, K, N]`` through a column-major TN int8 GEMM ``run_tn``.

    ``run_tn(plan, bt_p, a_p, c)`` must fill ``c`` as cuBLAS would (see :class:`TNPlan`):
    on the GPU it is :func:`_cublas_tn`; the tests pass a NumPy emulator of the BLAS
    convention, so all of this operand shuffling is checked on the CPU too. ``b`` is
    transposed and padded here, per call (no copy for the transposed view of a
    C-contiguous ``[B, N, K]`` with K, N multiples of 4); :class:`TNWeight` does it once.
    """
    # [B, M, K] int8, [B, K, N] int8 -> [B, M, N] int32
    xp = get_array_module(a)
    nb, K, N = b.shape
    bt_p = _zero_pad(xp, xp.swapaxes(b, -1, -2), (nb, round_up(N, 4), round_up(K, 4)))  # [B, N4, K4]
    return _int8_matmul_tn_packed(a, bt_p, N, run_tn)


def _int8_matmul_tn_packed(a, bt_p, N: int, run_tn):
    """``[B, M, K] @ B`` with B already packed as ``bt_p`` ``[B, N4, K4]`` (zero-padded Bᵀ)."""
    # [B, M, K] int8, [B, N4, K4] int8 -> [B, M, N] int32
    xp = get_array_module(a)
    nb, M, K = a.shape
    plan = int8_gemm_plan(M, K, N, batch=nb)
    assert bt_p.shape == (nb, plan.m, plan.k), (bt_p.shape, plan)
    a_p = _zero_pad(xp, a, (nb, M, plan.k))                               # [B, M, K4]
    c = xp.empty((nb, M, plan.m), dtype=xp.int32)                         # [B, M, N4]
    run_tn(plan, bt_p, a_p, c)
    return c if plan.m == N else xp.ascontiguousarray(c[..., :N])


@dataclasses.dataclass(frozen=True, eq=False)
class TNWeight:
    """An int8 weight ``[C_in, C_out] = [K, N]`` packed once in cuBLAS's TN layout.

    ``tn`` is ``[N4, K4]`` int8, C-contiguous, 16-byte aligned and zero-padded: the
    transposed weight (torch's Linear layout ``[C_out, C_in]``), K and N rounded up to
    multiples of 4 (see :class:`TNPlan`). :func:`int8_gemm` hands it to cuBLAS as it is, so
    a W8A8 layer on the GPU never transposes or pads its weight per call.
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


def _cublas_tn(plan: TNPlan, bt_p, a_p, c) -> None:
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


def _int8_matmul_gpu(a, b):
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
            return _int8_matmul_tn_packed(a, b.tn[None], N, _cublas_tn)
        return _int8_matmul_tn(a, b, _cublas_tn)
    except cublas.CUBLASError as e:
        warnings.warn(f"cuBLAS int8 GEMM refused ({e}); using CuPy's int32 matmul (exact, slower)",
                      RuntimeWarning, stacklevel=3)
        b = b.view()[None] if packed else b
        return xp.matmul(a.astype(xp.int32), b.astype(xp.int32))


# ----------------------------------------------------------------------------------------
# the public GEMMs


def int8_gemm(a_q, b_q):
    """``C = A @ B`` with int8 inputs and an exact int32 result: ``C[i, j] = Σ_k A[i, k] B[k, j]``.

    The integer core of a W8A8 linear layer (paper Sec. 2; Eq. 1 applied to X and W).
    ``a_q`` may carry leading axes (``[..., K]``, e.g. ``[B, T, C_in]``). NumPy arrays take
    the exact float32-BLAS path (:func:`_int8_matmul_cpu`), CuPy arrays cuBLAS's int8 GEMM
    (:class:`TNPlan`). ``b_q`` is an int8 ``[K, N]`` array or a :class:`TNWeight` (packed
    once, as W8A8 layers on the GPU keep their weights). On the GPU, a plain ``[K, N]`` is
    transposed and padded per call, except the transposed view ``w_t.T`` of a C-contiguous
    ``[N, K]`` with K and N multiples of 4. Raises ShapeError for non-int8 inputs,
    mismatched K, or K > MAX_K.
    """
    # [..., K] int8, [K, N] int8 | TNWeight -> [..., N] int32
    packed = b_q if isinstance(b_q, TNWeight) else None
    b_view = b_q.view() if packed is not None else b_q
    xp = _check_operands(a_q, b_view, "int8_gemm", batched=False)
    lead, K, N = a_q.shape[:-1], a_q.shape[-1], b_view.shape[1]
    a2 = a_q.reshape(math.prod(lead), K)  # [M, K]
    if xp is np:
        c = _int8_matmul_cpu(a2, b_view)
    else:
        c = _int8_matmul_gpu(a2[None], packed if packed is not None else b_view[None])[0]
    return c.reshape(lead + (N,))


def int8_bmm(a_q, b_q):
    """Batched ``C[b] = A[b] @ B[b]``, int8 in, exact int32 out (e.g. attention's Q·Kᵀ, P·V).

    Same exact paths as :func:`int8_gemm`; both operands share their leading axes.
    """
    # [..., M, K] int8, [..., K, N] int8 -> [..., M, N] int32
    xp = _check_operands(a_q, b_q, "int8_bmm", batched=True)
    if xp is np:
        return _int8_matmul_cpu(a_q, b_q)
    lead, (M, K), N = a_q.shape[:-2], a_q.shape[-2:], b_q.shape[-1]
    nb = math.prod(lead)
    c = _int8_matmul_gpu(a_q.reshape(nb, M, K), b_q.reshape(nb, K, N))
    return c.reshape(lead + (M, N))


# ----------------------------------------------------------------------------------------
# the epilogue: back to floats


# out_dtype -> the dtype the epilogue computes in: float16 results are computed in float32
# and rounded once at the end (float16 has too little range for acc · Δx · Δw on the way).
EPILOGUE_COMPUTE = {np.dtype(np.float16): np.dtype(np.float32),
                    np.dtype(np.float32): np.dtype(np.float32),
                    np.dtype(np.float64): np.dtype(np.float64)}


def _epilogue_dtypes(out_dtype):
    dtype = np.dtype(out_dtype)
    if dtype not in EPILOGUE_COMPUTE:
        raise ConfigError(f"out_dtype {dtype} is not supported: use float16, float32 or float64")
    return dtype, EPILOGUE_COMPUTE[dtype]


def _epilogue_operands(xp, shape, row_scale, col_scale, bias, dtype):
    """Validate the epilogue's shapes (acc is ``shape``); return the scales and bias as
    arrays of ``dtype``."""
    N = shape[-1]
    r = xp.asarray(row_scale, dtype=dtype)
    c = xp.asarray(col_scale, dtype=dtype)
    per_token = shape[:-1] + (1,)
    if r.size == 1 and r.ndim <= len(shape):
        r = r.reshape(())
    elif r.shape != per_token:
        raise ShapeError(
            f"row_scale has shape {r.shape}: for acc {shape} it must be a scalar "
            f"(per-tensor) or {per_token} (per-token)"
        )
    if c.size == 1 and c.ndim <= 2:
        c = c.reshape(())
    elif c.shape not in ((N,), (1, N)):
        raise ShapeError(
            f"col_scale has shape {c.shape}: for acc {shape} it must be a scalar "
            f"(per-tensor) or ({N},) / (1, {N}) (per-channel)"
        )
    b = None
    if bias is not None:
        b = xp.asarray(bias, dtype=dtype)
        if b.shape != (N,):
            raise ShapeError(f"bias has shape {b.shape}: for acc {shape} it must be ({N},)")
    return r, c, b


def dequant_epilogue(acc, row_scale, col_scale, bias=None, out_dtype=np.float32):
    """``Y = acc · (Δrow · Δcol) + b``: the int32 GEMM result back to floats (paper Sec. 2).

    ``row_scale`` is the activation scale, per-token ``[..., M, 1]`` or per-tensor (a
    scalar); ``col_scale`` the weight scale, per-channel ``[N]``/``[1, N]`` or per-tensor;
    ``bias`` ``[N]`` or None. Everything is computed in ``out_dtype`` (float32 or float64);
    ``out_dtype=float16`` computes in float32 and rounds the result once to float16 (the
    GPU's float16 activations).

    **Association order: the combined scale first, ``acc * (row_scale * col_scale)``**,
    then ``+ bias`` — the grouping of ``Y = diag(Δx) (X̄ W̄) diag(Δw)``, and one scalar for
    per-tensor × per-tensor (the ``alpha`` of int8 GEMM APIs). Why this order:

    * in float64 with float32 scales, ``Δrow · Δcol`` is exact (24 + 24 bits <= 53) and the
      int32 ``acc`` converts exactly, so the only roundings are the one multiply and the
      bias add: the result is the correctly rounded value of the exact real product
      ``Δx Δw Σ X̄ W̄`` (``(acc · Δrow) · Δcol`` would round twice);
    * the fake-quant path ``fake(x) @ fake(w)`` computes the same real number with K
      roundings in its dot products; the two agree exactly whenever those are exact (e.g.
      power-of-two scales) and otherwise to within the dot-product bound
      ``(γ_K + γ_2) · Δx Δw · (|X̄| @ |W̄|)`` with ``γ_n = n u / (1 - n u)`` (tests check
      both); in float32 the epilogue itself is within 3 roundings of the exact value;
    * the GPU kernel performs the same three IEEE operations in the same order with
      round-to-nearest intrinsics (no fused multiply-add), and rounds to float16 the same
      way (to nearest, ties to even), so GPU == CPU bit for bit.

    Scales are not checked for positivity here (the quantizers did that).
    """
    # [..., M, N] int32, [..., M, 1] | [], [N] | [1, N] | [], [N] -> [..., M, N] float
    xp = get_array_module(acc)
    dtype, compute = _epilogue_dtypes(out_dtype)
    if acc.dtype.kind not in "iu":
        raise ShapeError(f"acc has dtype {acc.dtype}: the epilogue takes the integer GEMM result")
    if acc.ndim < 2:
        raise ShapeError(f"acc has shape {acc.shape}: the epilogue takes [..., M, N]")
    r, c, b = _epilogue_operands(xp, acc.shape, row_scale, col_scale, bias, compute)
    if xp is not np:
        return _epilogue_gpu(acc, r, c, b, dtype)
    y = _epilogue_cpu(acc.astype(compute), r, c, b)  # astype: a fresh array, ours to overwrite
    return y if y.dtype == dtype else y.astype(dtype)


def _epilogue_cpu(y, r, c, b):
    """The epilogue's arithmetic on ``y``, the GEMM's exact sums already in the compute
    dtype, overwritten in place (one pass per operation, no temporaries of y's size but
    ``r * c`` for per-token x per-channel)."""
    # [..., M, N] float (exact integers), scales, bias -> y, [..., M, N] in the compute dtype
    y *= r * c  # [..., M, N] * ([..., M, 1] * [1, N])
    if b is not None:
        y += b
    return y


def int8_linear(a_q, b_q, row_scale, col_scale, bias=None, out_dtype=np.float32):
    """A whole W8A8 linear layer's integer math: ``dequant_epilogue(int8_gemm(a_q, b_q), ...)``,
    bit for bit the same result, in one step.

    On the CPU this skips a round trip: when one float32 BLAS call is exact
    (:func:`_float32_sums`), its float32 result already holds the int32 accumulator's exact
    values, and the epilogue scales it in place instead of converting it to int32 and back
    (two passes over the output and a fresh array saved). Rows are independent from the
    GEMM to the epilogue, so each core takes a block of rows through all of it
    (:func:`minisq.backend.run_row_blocks`); the sums are exact and each output element
    gets the same three operations however the rows are cut. On the GPU it is exactly the
    two calls (cuBLAS int8 GEMM, then the fused epilogue kernel).
    """
    # [..., K] int8, [K, N] int8 | TNWeight, [..., 1] | [], [N] | [1, N] | [], [N] -> [..., N] float
    xp = get_array_module(a_q)
    if xp is not np:
        return dequant_epilogue(int8_gemm(a_q, b_q), row_scale, col_scale, bias, out_dtype)
    b_view = b_q.view() if isinstance(b_q, TNWeight) else b_q
    _check_operands(a_q, b_view, "int8_linear", batched=False)
    dtype, compute = _epilogue_dtypes(out_dtype)
    lead, K, N = a_q.shape[:-1], a_q.shape[-1], b_view.shape[1]
    if len(lead) == 0:  # a single row [K]: the epilogue takes [..., M, N]
        return int8_linear(a_q[None], b_q, row_scale, col_scale, bias, out_dtype)[0]
    r, c, b = _epilogue_operands(np, lead + (N,), row_scale, col_scale, bias, compute)
    M = math.prod(lead)
    a2 = a_q.reshape(M, K)                                      # [M, K]
    r = r.reshape(M, 1) if r.ndim else r                        # [M, 1] per token, or one scalar
    blocks = backend.row_blocks(M, M * K * N)                  # one per thread, or one for all
    b32 = _as_float32(b_view, threaded=len(blocks) > 1)         # [K, N] float32 (exact), shared
    y = np.empty((M, N), compute)                               # [M, N]

    def rows(i):
        # rows i0:i1 of the layer, start to finish: exact sums into y's rows, then the epilogue
        i0, i1 = i
        y_rows = y[i0:i1]
        sums = _float32_sums(a2[i0:i1], b32, out=y_rows if compute == np.float32 else None)
        if sums is None:
            sums = _int8_matmul_cpu_blocked(a2[i0:i1], b_view)  # int32
        if sums is not y_rows:
            np.copyto(y_rows, sums, casting="unsafe")           # exact for float64; as astype for float32
        _epilogue_cpu(y_rows, r[i0:i1] if r.ndim else r, c, b)

    backend.run_row_blocks(rows, blocks)
    y = y.reshape(lead + (N,))
    return y if y.dtype == dtype else y.astype(dtype)


# The GPU epilogue: one fused elementwise kernel. __fmul_rn/__fadd_rn (and the double
# versions) are IEEE round-to-nearest operations that the compiler may not contract into
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


def _epilogue_gpu(acc, r, c, b, dtype):
    # [..., M, N] int, [..., M, 1] | [], [N] | [1, N] | [], [N] | None -> [..., M, N] dtype
    half_out = dtype == np.float16
    kernel = _epilogue_kernel(b is not None, half_out)
    args = (acc, r, c) if b is None else (acc, r, c, b)
    if half_out:  # the output array fixes Y = float16 (it cannot be inferred from the inputs)
        return kernel(*args, backend.cupy().empty(acc.shape, dtype=np.float16))
    return kernel(*args)
