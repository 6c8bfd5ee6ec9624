# Your answers. GENERATED from solution.py by assignments/make_stubs.py: fill in every
# `raise NotImplementedError`, keep the signatures, and run the grader (see HANDOUT.md).
"""Assignment 2: the INT8 GEMM and its dequantization epilogue (SmoothQuant Sec. 2, Eq. 1).

Legend: M rows of the left operand (tokens T), K the reduced axis (C_in), N columns of the
right operand (C_out). Weights are stored ``[K, N] = [C_in, C_out]`` so that ``y = x @ w``.

A W8A8 linear layer computes, with X̄, W̄ the int8 codes and Δ their scales,

    Y[t, j] = Δx[t] · Δw[j] · (Σ_k X̄[t, k] · W̄[k, j]) + b[j]

The sum is integer arithmetic — int8 × int8 products summed into an int32 accumulator — and
the two scales are applied once per output element afterwards (the "epilogue"). This works
only because each scale is constant along k: per-token (or per-tensor) for X, per-output-
channel (or per-tensor) for W.
"""

import numpy as np

import minisq

# Every int8 product is at most 128 · 128 = 2^14 in magnitude, and float32 holds every integer
# up to 2^24 exactly: a float32 sum of at most 2^24 / 2^14 = 1024 products is exact.
BLOCK_K = 1024


def check_int8_operands(a_q, b_q) -> None:
    """Raise ValueError unless a_q [M, K] and b_q [K, N] are int8 with matching K (given)."""
    if a_q.dtype != np.int8 or b_q.dtype != np.int8:
        raise ValueError(f"the INT8 GEMM takes int8 operands, got {a_q.dtype} and {b_q.dtype}")
    if a_q.ndim != 2 or b_q.ndim != 2 or a_q.shape[1] != b_q.shape[0]:
        raise ValueError(f"expected [M, K] @ [K, N], got {a_q.shape} @ {b_q.shape}")


def int8_matmul(a_q, b_q):
    """``C = A @ B`` on int8 codes, exact: ``C[i, j] = Σ_k A[i, k] · B[k, j]`` as int32.

    Widen both operands to int32 *before* multiplying: int8 · int8 reaches 2^14, and a sum
    of K of them needs K · 2^14 < 2^31, i.e. int32 for any K up to 131071.
    """
    # Task 2.1
    # [M, K] int8, [K, N] int8 -> [M, N] int32
    raise NotImplementedError("Task 2.1: implement int8_matmul (see HANDOUT.md)")


def int8_matmul_float32(a_q, b_q, block_k=BLOCK_K):
    """The same exact ``C = A @ B``, computed with float32 matmuls over K-blocks of ``block_k``.

    NumPy's integer matmul has no BLAS behind it; float32 matmul does, and is exact here: a
    block of at most 1024 products sums to at most 2^24 in magnitude, where every integer is a
    float32, so no addition in any order rounds. Each block's float32 result converts to int32
    exactly, and the blocks are added in int32. ``block_k`` must be in [1, 1024] (ValueError).
    """
    # Task 2.2
    # [M, K] int8, [K, N] int8 -> [M, N] int32
    raise NotImplementedError("Task 2.2: implement int8_matmul_float32 (see HANDOUT.md)")


def dequant_epilogue(acc, row_scale, col_scale, bias=None, out_dtype=np.float32):
    """``Y = acc · (Δrow · Δcol) + b``: the int32 GEMM result back to floats, in ``out_dtype``.

    ``row_scale``: the activation scale, per-token ``[M, 1]`` or per-tensor (0-d);
    ``col_scale``: the weight scale, per-channel ``[N]`` / ``[1, N]`` or per-tensor (0-d);
    ``bias``: ``[N]`` or None. Everything is cast to ``out_dtype`` first; the combined scale
    ``Δrow · Δcol`` is formed first (one rounding), then one multiply, then the bias add.
    """
    # Task 2.3
    # [M, N] int32, [M, 1] | [], [N] | [1, N] | [], [N] | None -> [M, N] out_dtype
    raise NotImplementedError("Task 2.3: implement dequant_epilogue (see HANDOUT.md)")


def w8a8_linear(x, w, b=None):
    """A W8A8 linear forward from the pieces: ``y ≈ x @ w + b`` with int8 x and w.

    x is quantized per token and w per output channel (with minisq's quantizers: Assignment 1),
    the codes are multiplied with :func:`int8_matmul`, and :func:`dequant_epilogue` scales the
    int32 result back to x's dtype. x may have leading axes ``[..., C_in]``.
    """
    # Task 2.4
    # [..., C_in] float, [C_in, C_out] float, [C_out] | None -> [..., C_out] float (x's dtype)
    raise NotImplementedError("Task 2.4: implement w8a8_linear (see HANDOUT.md)")
