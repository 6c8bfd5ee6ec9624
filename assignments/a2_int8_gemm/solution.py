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
    check_int8_operands(a_q, b_q)
    return a_q.astype(np.int32) @ b_q.astype(np.int32)


def int8_matmul_float32(a_q, b_q, block_k=BLOCK_K):
    """The same exact ``C = A @ B``, computed with float32 matmuls over K-blocks of ``block_k``.

    NumPy's integer matmul has no BLAS behind it; float32 matmul does, and is exact here: a
    block of at most 1024 products sums to at most 2^24 in magnitude, where every integer is a
    float32, so no addition in any order rounds. Each block's float32 result converts to int32
    exactly, and the blocks are added in int32. ``block_k`` must be in [1, 1024] (ValueError).
    """
    # Task 2.2
    # [M, K] int8, [K, N] int8 -> [M, N] int32
    check_int8_operands(a_q, b_q)
    if not 1 <= block_k <= BLOCK_K:
        raise ValueError(f"block_k={block_k}: a float32 sum of more than {BLOCK_K} int8 products may round")
    a32, b32 = a_q.astype(np.float32), b_q.astype(np.float32)
    (M, K), N = a_q.shape, b_q.shape[1]
    acc = np.zeros((M, N), dtype=np.int32)
    for k0 in range(0, K, block_k):
        part = a32[:, k0:k0 + block_k] @ b32[k0:k0 + block_k]    # [M, N] float32, exact integers
        acc += part.astype(np.int32)
    return acc


def dequant_epilogue(acc, row_scale, col_scale, bias=None, out_dtype=np.float32):
    """``Y = acc · (Δrow · Δcol) + b``: the int32 GEMM result back to floats, in ``out_dtype``.

    ``row_scale``: the activation scale, per-token ``[M, 1]`` or per-tensor (0-d);
    ``col_scale``: the weight scale, per-channel ``[N]`` / ``[1, N]`` or per-tensor (0-d);
    ``bias``: ``[N]`` or None. Everything is cast to ``out_dtype`` first; the combined scale
    ``Δrow · Δcol`` is formed first (one rounding), then one multiply, then the bias add.
    """
    # Task 2.3
    # [M, N] int32, [M, 1] | [], [N] | [1, N] | [], [N] | None -> [M, N] out_dtype
    row = np.asarray(row_scale, dtype=out_dtype)
    col = np.asarray(col_scale, dtype=out_dtype)
    y = acc.astype(out_dtype) * (row * col)                     # [M, N] * ([M, 1] * [1, N])
    if bias is not None:
        y = y + np.asarray(bias, dtype=out_dtype)
    return y


def w8a8_linear(x, w, b=None):
    """A W8A8 linear forward from the pieces: ``y ≈ x @ w + b`` with int8 x and w.

    x is quantized per token and w per output channel (with minisq's quantizers: Assignment 1),
    the codes are multiplied with :func:`int8_matmul`, and :func:`dequant_epilogue` scales the
    int32 result back to x's dtype. x may have leading axes ``[..., C_in]``.
    """
    # Task 2.4
    # [..., C_in] float, [C_in, C_out] float, [C_out] | None -> [..., C_out] float (x's dtype)
    lead, c_in = x.shape[:-1], x.shape[-1]
    x_q, x_scale = minisq.quantize_per_token(x.reshape(-1, c_in))   # [T, C_in] int8, [T, 1]
    w_q, w_scale = minisq.quantize_per_channel(w)                   # [C_in, C_out] int8, [1, C_out]
    acc = int8_matmul(x_q, w_q)                                     # [T, C_out] int32
    y = dequant_epilogue(acc, x_scale, w_scale, b, out_dtype=x.dtype)
    return y.reshape(*lead, w.shape[1])
