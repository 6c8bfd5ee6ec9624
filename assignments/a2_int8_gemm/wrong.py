"""Assignment 2, deliberately wrong: classic mistakes the graders must catch, with a message
that says what went wrong. Every task not redefined here is the reference answer."""

import numpy as np

from solution import *  # noqa: F401,F403  -- the right answers for every other task
from solution import BLOCK_K, check_int8_operands


def int8_matmul(a_q, b_q):
    """WRONG (Task 2.1): accumulates in int16, which wraps around once a sum passes 32767."""
    # [M, K] int8, [K, N] int8 -> [M, N] int32
    check_int8_operands(a_q, b_q)
    return (a_q.astype(np.int16) @ b_q.astype(np.int16)).astype(np.int32)


def int8_matmul_float32(a_q, b_q, block_k=BLOCK_K):
    """WRONG (Task 2.2): one float32 matmul over all of K — sums beyond 2^24 round."""
    # [M, K] int8, [K, N] int8 -> [M, N] int32
    check_int8_operands(a_q, b_q)
    if not 1 <= block_k <= BLOCK_K:
        raise ValueError(f"block_k={block_k} must be in [1, {BLOCK_K}]")
    return (a_q.astype(np.float32) @ b_q.astype(np.float32)).astype(np.int32)


def dequant_epilogue(acc, row_scale, col_scale, bias=None, out_dtype=np.float32):
    """WRONG (Task 2.3): forgets the bias."""
    # [M, N] int32, [M, 1] | [], [N] | [1, N] | [], [N] | None -> [M, N] out_dtype
    row = np.asarray(row_scale, dtype=out_dtype)
    col = np.asarray(col_scale, dtype=out_dtype)
    return acc.astype(out_dtype) * (row * col)
