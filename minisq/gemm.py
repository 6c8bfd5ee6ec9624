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

The references here are written to be read and are exact:

* :func:`int8_gemm_loops` — Python's unbounded ints in a triple loop; tiny sizes only.
* :func:`int8_gemm_reference` / :func:`int8_bmm_reference` — ``int64 @ int64``: exact, slow.
* :func:`epilogue_reference` — ``acc · (Δrow · Δcol) + b`` in the compute dtype.

The public :func:`int8_gemm`, :func:`int8_bmm`, :func:`dequant_epilogue` and
:func:`int8_linear` check their operands and run the fast kernels, which give the same
numbers bit for bit: exact float32 BLAS on the CPU (:mod:`minisq.kernels.int8_cpu`),
cuBLAS's int8 tensor-core GEMM and a fused epilogue kernel on the GPU
(:mod:`minisq.kernels.cuda`, with the weight packed once: :class:`TNWeight`).
"""

from __future__ import annotations

import math

import numpy as np

from . import backend
from .backend import get_array_module
from .errors import ConfigError, DeviceError, ShapeError
from .kernels import cuda, int8_cpu
# the kernels' public names, kept importable from here: the exact-block size of the CPU
# GEMM and the cuBLAS layout (see minisq.kernels.cuda)
from .kernels.cuda import TNPlan, TNWeight, int8_gemm_plan, meets_int8_rules, pack_weight_tn, round_up  # noqa: F401
from .kernels.int8_cpu import BLOCK_K  # noqa: F401

# Every int8 product is at most 128 * 128 = 2^14 in magnitude ((-128) * (-128); the
# quantizers only produce [-127, 127], but any int8 array is accepted here).
MAX_PRODUCT = 128 * 128
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


def epilogue_reference(acc, r, c, b, compute):
    """The epilogue's arithmetic as written: ``acc · (r · c) + b`` in the ``compute`` dtype
    (the scales and bias already of that dtype, as :func:`dequant_epilogue` makes them)."""
    # [..., M, N] int32, [..., M, 1] | [], [N] | [1, N] | [], [N] | None -> [..., M, N] compute
    y = acc.astype(compute) * (r * c)
    return y if b is None else y + b


# ----------------------------------------------------------------------------------------
# the public GEMMs


def int8_gemm(a_q, b_q):
    """``C = A @ B`` with int8 inputs and an exact int32 result: ``C[i, j] = Σ_k A[i, k] B[k, j]``.

    The integer core of a W8A8 linear layer (paper Sec. 2; Eq. 1 applied to X and W).
    ``a_q`` may carry leading axes (``[..., K]``, e.g. ``[B, T, C_in]``). NumPy arrays take
    the exact float32-BLAS path (:func:`minisq.kernels.int8_cpu.int8_matmul`), CuPy arrays
    cuBLAS's int8 GEMM (:class:`TNPlan`); both equal :func:`int8_gemm_reference` bit for
    bit. ``b_q`` is an int8 ``[K, N]`` array or a :class:`TNWeight` (packed
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
        c = int8_cpu.int8_matmul(a2, b_view)
    else:
        c = cuda.int8_matmul_gpu(a2[None], packed if packed is not None else b_view[None])[0]
    return c.reshape(lead + (N,))


def int8_bmm(a_q, b_q):
    """Batched ``C[b] = A[b] @ B[b]``, int8 in, exact int32 out (e.g. attention's Q·Kᵀ, P·V).

    Same exact paths as :func:`int8_gemm`; both operands share their leading axes.
    """
    # [..., M, K] int8, [..., K, N] int8 -> [..., M, N] int32
    xp = _check_operands(a_q, b_q, "int8_bmm", batched=True)
    if xp is np:
        return int8_cpu.int8_matmul(a_q, b_q)
    lead, (M, K), N = a_q.shape[:-2], a_q.shape[-2:], b_q.shape[-1]
    nb = math.prod(lead)
    c = cuda.int8_matmul_gpu(a_q.reshape(nb, M, K), b_q.reshape(nb, K, N))
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
        return cuda.epilogue(acc, r, c, b, dtype)
    y = int8_cpu.epilogue_into(acc.astype(compute), r, c, b)  # = epilogue_reference, in place
    return y if y.dtype == dtype else y.astype(dtype)


def int8_linear(a_q, b_q, row_scale, col_scale, bias=None, out_dtype=np.float32):
    """A whole W8A8 linear layer's integer math: ``dequant_epilogue(int8_gemm(a_q, b_q), ...)``,
    bit for bit the same result, in one step.

    On the CPU the kernel :func:`minisq.kernels.int8_cpu.int8_linear` takes each block of
    rows from the GEMM through the epilogue without the int32 round trip; on the GPU it is
    exactly the two calls (cuBLAS int8 GEMM, then the fused epilogue kernel).
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
    r = r.reshape(M, 1) if r.ndim else r                        # [M, 1] per token, or one scalar
    y = int8_cpu.int8_linear(a_q.reshape(M, K), b_view, r, c, b, compute).reshape(lead + (N,))
    return y if y.dtype == dtype else y.astype(dtype)
