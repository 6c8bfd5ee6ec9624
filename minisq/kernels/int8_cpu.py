"""The exact INT8 GEMM on the CPU: int8 x int8 -> int32 through float32 BLAS, bit for bit.

Legend: M rows of the left operand (tokens), K the reduced axis (C_in), N columns (C_out),
``...`` leading axes.

NumPy's integer matmul has no BLAS behind it and is 100-200x slower than sgemm, so the
integers are multiplied as float32, which is exact as long as no partial sum leaves
float32's integer range (:func:`int8_matmul`). The references these are tested against are
:func:`minisq.gemm.int8_gemm_reference` (int64 matmul) and
:func:`minisq.gemm.dequant_epilogue`; the operands arrive already checked by
:mod:`minisq.gemm`'s public functions.
"""

from __future__ import annotations

import threading

import numpy as np

from . import threads

# Every int8 product is at most 128 * 128 = 2^14 in magnitude. float32 holds every integer
# of magnitude <= 2^24 exactly, so a sum of at most 1024 products never leaves that range,
# whatever order it is added in: a K-block of 1024 is exact.
BLOCK_K = 2**24 // (128 * 128)  # = 1024


def float32_sums(a, b32, out=None):
    """``a @ b`` in one float32 BLAS call, as float32 holding the exact integer sums, or
    None when one call might round (then :func:`int8_matmul` goes block by block).
    ``b32`` is the int8 ``b`` already converted to float32 (exactly, :func:`as_float32`).

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
    return np.matmul(a32, b32, out=out) if _one_call_exact(a32) else None


def _one_call_exact(a32) -> bool:
    """Whether every partial sum of ``a32 @ b`` stays within float32's integers for any int8
    ``b`` (see :func:`float32_sums`)."""
    # [..., M, K] float32 (int8 values) -> bool
    if a32.shape[-1] <= BLOCK_K:
        return True
    # |a| <= 128 and K <= minisq.gemm.MAX_K keep these float32 row sums below 2^24: exact
    row_l1 = np.abs(a32).sum(axis=-1)
    return not (row_l1.size and float(row_l1.max()) * 128 > 2**24)


# One reusable float32 buffer per thread, of bounded size: a weight is converted a block of
# columns at a time into it (:func:`column_blocks`). Converting an int8 weight into a fresh
# array on every call pays the kernel's page faults and zeroing of each new allocation,
# which made the W8A8 forward's time swing by 10-20%; keeping a whole float32 copy per
# weight shape instead held ~0.6 GiB per thread for OPT-6.7B's shapes. WORKSPACE_FLOATS
# (64 MiB) bounds what a W8A8 linear holds beside its operands, whatever the model's size.
WORKSPACE_FLOATS = 2**24
_WORKSPACE = threading.local()


def _workspace(n: int):
    # [n] float32: this thread's buffer (grown to the largest n asked, reused after)
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.size < n:
        _WORKSPACE.buf = None                       # the old one is freed before the new one is made
        buf = _WORKSPACE.buf = np.empty(n, np.float32)
    return buf[:n]


def column_blocks(K: int, N: int) -> list:
    """``(n0, n1)`` column ranges of a ``[K, N]`` weight, each of at most WORKSPACE_FLOATS
    elements (at least one column): the blocks converted to float32 one at a time."""
    nb = max(1, min(N, WORKSPACE_FLOATS // max(K, 1)))
    return [(n0, min(n0 + nb, N)) for n0 in range(0, N, nb)]


def as_float32(b, threaded: bool = False):
    # [K, N] int8 (or a view of its columns) -> [K, N] float32 in this thread's workspace (valid
    # until the next call). threaded=True converts with the rows over the cores: for a GEMM
    # minisq then also shares out itself (a GEMM left to BLAS's own threads leaves them
    # spinning, and a threaded conversion right after would fight them for the cores)
    if b.ndim != 2:
        return b.astype(np.float32)
    buf = _workspace(b.size).reshape(b.shape)
    if threaded:
        threads.split_rows(_copy_into, b, buf)   # int8 -> float32, exact
    else:
        np.copyto(buf, b, casting="unsafe")
    return buf


def _copy_into(src, dst):
    np.copyto(dst, src, casting="unsafe")


def int8_matmul(a, b):
    """Exact int8 matmul through float32 BLAS (sgemm): one call per column block of ``b``
    (:func:`column_blocks`) when the data allows it (:func:`float32_sums`), else over
    K-blocks of 1024.

    NumPy's integer matmul has no BLAS behind it and is 100-200x slower than sgemm, so the
    integers are multiplied as float32 instead. This is exact, not approximate:

    * every int8 is a float32 exactly, and every product |a·b| <= 2^14 is too;
    * within a K-block of at most 1024 terms, any partial sum of any subset of the products
      is an integer of magnitude <= 1024 · 2^14 = 2^24, and float32 represents every such
      integer exactly. So each addition (or fused multiply-add) BLAS performs, in whatever
      order, blocking or vectorization it chooses, has an exact result: nothing is rounded;
    * each block's float32 result is therefore the exact integer, cast to int32 exactly, and
      the blocks are summed in int32, which cannot overflow for K <= minisq.gemm.MAX_K.

    (float64 dgemm would be exact up to K = 2^39 without blocks, but runs at half sgemm's
    speed; the blocks cost one int32 add of the [M, N] output per 1024 of K.) The K-blocks
    are converted into two reused float32 buffers rather than converting all of A and B at
    once: the same arithmetic, less fresh memory to fault in (which dominates the overhead
    on small shapes, and on VMs where page faults are expensive). Column blocks change
    nothing in the arithmetic: each output column is one sum over all of K either way.
    """
    # [..., M, K] int8, [..., K, N] int8 -> [..., M, N] int32  (same leading axes)
    if b.ndim != 2:
        part = float32_sums(a, as_float32(b))
        return int8_matmul_blocked(a, b) if part is None else part.astype(np.int32)
    (K, N), a32 = b.shape, a.astype(np.float32)
    if not _one_call_exact(a32):
        return int8_matmul_blocked(a, b)
    out = np.empty(a.shape[:-1] + (N,), np.float32)                     # [..., M, N] exact sums
    for n0, n1 in column_blocks(K, N):
        np.matmul(a32, as_float32(b[:, n0:n1]), out=out[..., n0:n1])
    return out.astype(np.int32)  # exact: out holds integers of magnitude <= 2^24


def int8_matmul_blocked(a, b):
    """The K-blocked exact path (blocks of 1024, see :func:`int8_matmul`)."""
    # [..., M, K] int8, [..., K, N] int8 -> [..., M, N] int32  (same leading axes)
    K, N = a.shape[-1], b.shape[-1]
    if K == 0:  # an empty sum
        return np.zeros(a.shape[:-1] + (N,), dtype=np.int32)
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


def epilogue_into(y, r, c, b):
    """The epilogue's arithmetic on ``y``, the GEMM's exact sums already in the compute
    dtype, overwritten in place (one pass per operation, no temporaries of y's size but
    ``r * c`` for per-token x per-channel)."""
    # [..., M, N] float (exact integers), scales, bias -> y, [..., M, N] in the compute dtype
    y *= r * c  # [..., M, N] * ([..., M, 1] * [1, N])
    if b is not None:
        y += b
    return y


def int8_linear(a2, b, r, c, bias, compute):
    """``epilogue_into(int8_matmul(a2, b).astype(compute), r, c, bias)`` in one step, bit for
    bit: a whole W8A8 linear layer's integer math on the CPU (:func:`minisq.gemm.int8_linear`
    checks the operands and calls this).

    It skips a round trip: when one float32 BLAS call is exact (:func:`float32_sums`), its
    float32 result already holds the int32 accumulator's exact values, and the epilogue
    scales it in place instead of converting it to int32 and back (two passes over the
    output and a fresh array saved). The weight is converted a block of columns at a time
    into one bounded workspace (:func:`column_blocks`); rows are independent from the GEMM
    to the epilogue, so for each column block every core takes a block of rows through all
    of it (:func:`minisq.kernels.threads.run_row_blocks`). The sums are exact and each output
    element gets the same three operations however the rows and columns are cut.
    """
    # [M, K] int8, [K, N] int8, [M, 1] | [] compute, [N] | [1, N] | [] compute, [N] | None -> [M, N] compute
    (M, K), N = a2.shape, b.shape[1]
    blocks = threads.row_blocks(M, M * K * N)                   # one per thread, or one for all
    y = np.empty((M, N), compute)                               # [M, N]
    a32 = np.empty((M, K), np.float32)                          # [M, K] the int8 codes, exactly
    threads.split_rows(_copy_into, a2, a32) if len(blocks) > 1 else np.copyto(a32, a2, casting="unsafe")
    if not _one_call_exact(a32):                                # adversarial rows: K-blocks of 1024
        def blocked(i):
            i0, i1 = i
            np.copyto(y[i0:i1], int8_matmul_blocked(a2[i0:i1], b), casting="unsafe")
            epilogue_into(y[i0:i1], r[i0:i1] if r.ndim else r, c, bias)
        threads.run_row_blocks(blocked, blocks)
        return y
    for n0, n1 in column_blocks(K, N):
        b32 = as_float32(b[:, n0:n1], threaded=len(blocks) > 1)   # [K, nb] float32 (exact), shared
        c_n = c[..., n0:n1] if c.ndim else c
        bias_n = None if bias is None else bias[n0:n1]

        def rows(i, b32=b32, c_n=c_n, bias_n=bias_n, n0=n0, n1=n1):
            # rows i0:i1 of this column block, start to finish: exact sums into y, then the epilogue
            i0, i1 = i
            y_rows = y[i0:i1, n0:n1]
            if compute == np.float32:
                np.matmul(a32[i0:i1], b32, out=y_rows)
            else:
                np.copyto(y_rows, np.matmul(a32[i0:i1], b32))      # exact for float64
            epilogue_into(y_rows, r[i0:i1] if r.ndim else r, c_n, bias_n)

        threads.run_row_blocks(rows, blocks)
    return y
