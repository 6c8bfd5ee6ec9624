"""Assignment 2 written from HANDOUT.md alone (see README.md here)."""

import numpy as np

import minisq

BLOCK_K = 1024


def check_int8_operands(a_q, b_q) -> None:
    if a_q.dtype != np.int8 or b_q.dtype != np.int8:
        raise ValueError("int8 operands only")
    if a_q.ndim != 2 or b_q.ndim != 2 or a_q.shape[1] != b_q.shape[0]:
        raise ValueError("expected [M, K] @ [K, N]")


def int8_matmul(a_q, b_q):
    check_int8_operands(a_q, b_q)
    return np.matmul(a_q.astype(np.int32), b_q.astype(np.int32))      # [M, N] int32


def int8_matmul_float32(a_q, b_q, block_k=BLOCK_K):
    check_int8_operands(a_q, b_q)
    if not (1 <= block_k <= BLOCK_K):
        raise ValueError("block_k must be in [1, 1024]")
    M, K = a_q.shape
    out = np.zeros((M, b_q.shape[1]), np.int32)
    for start in range(0, K, block_k):
        stop = start + block_k
        part = np.matmul(a_q[:, start:stop].astype(np.float32), b_q[start:stop].astype(np.float32))
        out = out + part.astype(np.int32)
    return out


def dequant_epilogue(acc, row_scale, col_scale, bias=None, out_dtype=np.float32):
    combined = np.asarray(row_scale).astype(out_dtype) * np.asarray(col_scale).astype(out_dtype)
    y = acc.astype(out_dtype) * combined
    if bias is not None:
        y = y + np.asarray(bias).astype(out_dtype)
    return y


def w8a8_linear(x, w, b=None):
    c_in = x.shape[-1]
    x_q, x_s = minisq.quantize_per_token(x.reshape(-1, c_in))
    w_q, w_s = minisq.quantize_per_channel(w)
    y = dequant_epilogue(int8_matmul(x_q, w_q), x_s, w_s, b, x.dtype)
    return y.reshape(x.shape[:-1] + (w.shape[1],))
