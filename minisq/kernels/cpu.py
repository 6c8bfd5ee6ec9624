"""The fast versions of :mod:`minisq.nn`'s building blocks, the ones the model runs.

Legend: B batch, T new tokens, S tokens attended to (past + new), C hidden, H heads,
D head dim.

Each function computes what its reference in :mod:`minisq.nn` computes (same signature,
same dtype out), but writes into fresh buffers in place, fuses passes, and on the CPU
shares rows (or attention's heads) out over the cores (:mod:`minisq.kernels.threads`):
NumPy's ufuncs use one core. CuPy arrays get the same arithmetic in one plain call.
``tests/test_kernels.py`` holds each against its reference: bit for bit where the
operations are the same, otherwise to a stated float bound.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module
from . import threads


def linear(x, w, b=None):
    # [..., C_in], [C_in, C_out], [C_out] -> [..., C_out]
    # One 2-D matmul over all tokens: NumPy would treat [B, T, C_in] @ w as B separate
    # products, each streaming all of w from memory (B times the traffic when decoding).
    # On the CPU its rows are shared out over the cores (x @ w + b, bias added in place).
    y = threads.matmul_rows(x.reshape(-1, x.shape[-1]), w, b)   # [B·T, C_out]
    return y.reshape(*x.shape[:-1], w.shape[1])


def layer_norm(x, g=None, b=None, eps: float = 1e-5):
    # [..., C], [C], [C] -> [..., C]; the rows go to all cores (threads.split_rows)
    xp = get_array_module(x)
    return threads.split_rows(lambda xs, ys: _layer_norm_into(xs, g, b, eps, ys), x, xp.empty(x.shape, x.dtype))


def _layer_norm_into(x, g, b, eps: float, y):
    # [..., C], [C], [C], [..., C] -> y: layer_norm(x, g, b, eps)
    # Passes over x: mean, subtract, sum of squares (einsum: no squared temporary), then
    # three in-place passes (1/std, g, b) on y.
    xp = get_array_module(x)
    mean = x.mean(axis=-1, keepdims=True)
    xp.subtract(x, mean, out=y)                                     # centered
    var = xp.einsum("...c,...c->...", y, y)[..., None] / y.dtype.type(x.shape[-1])
    y *= 1 / xp.sqrt(var + x.dtype.type(eps))
    if g is not None:
        y *= g
    if b is not None:
        y += b
    return y


def rms_norm(x, g, eps: float):
    # [..., C], [C] -> [..., C]: x / sqrt(mean(x²) + eps) · g; the rows go to all cores
    xp = get_array_module(x)
    return threads.split_rows(lambda xs, ys: _rms_norm_into(xs, g, eps, ys), x, xp.empty(x.shape, x.dtype))


def _rms_norm_into(x, g, eps: float, y):
    # [..., C], [C], [..., C] -> y: rms_norm(x, g, eps); mean(x²) by einsum (no squared temporary)
    xp = get_array_module(x)
    mean_sq = xp.einsum("...c,...c->...", x, x)[..., None] / x.dtype.type(x.shape[-1])   # [..., 1]
    xp.multiply(x, 1 / xp.sqrt(mean_sq + x.dtype.type(eps)), out=y)
    y *= g
    return y


def gelu_tanh(x):
    # [...] -> [...]; the rows go to all cores (threads.split_rows)
    xp = get_array_module(x)
    return threads.split_rows(_gelu_tanh_into, x, xp.empty_like(x))


def _gelu_tanh_into(x, out):
    # [...], [...] -> out: gelu_tanh(x), computed as x · sigmoid(2u) = x / (1 + exp(-2u)),
    # u = sqrt(2/pi) (x + 0.044715 x^3): the same function (0.5 (1 + tanh u) = sigmoid(2u))
    # in 7 elementwise passes instead of 9, and without the cancellation in 1 + tanh(u) for
    # negative x.
    xp = get_array_module(x)
    t = x.dtype.type
    c = math.sqrt(2.0 / math.pi)
    e = xp.multiply(x, x, out=out)             # updated in place from here
    e *= t(-2.0 * c * 0.044715)
    e -= t(2.0 * c)
    e *= x                                     # -2u
    return times_sigmoid_into(x, e)


def silu(x):
    # [...] -> [...]: x · sigmoid(x) = x / (1 + exp(-x)); the rows go to all cores
    xp = get_array_module(x)
    return threads.split_rows(_silu_into, x, xp.empty_like(x))


def _silu_into(x, out):
    # [...], [...] -> out: silu(x) in 4 elementwise passes (-x, then times_sigmoid_into)
    xp = get_array_module(x)
    return times_sigmoid_into(x, xp.negative(x, out=out))


def times_sigmoid_into(x, e):
    # [...], [...] -> e: x · sigmoid(s) = x / (1 + exp(-s)), given e = -s, overwritten in place
    # (3 passes). exp(-s) overflows to inf where s is very negative: x / inf = -0, the right
    # limit, so that warning is silenced. GELU (s = 2u) and SiLU (s = x) end with this.
    xp = get_array_module(x)
    with np.errstate(over="ignore"):
        xp.exp(e, out=e)
    e += x.dtype.type(1)
    return xp.divide(x, e, out=e)


def relu(x):
    # [...] -> [...]: max(x, 0), one pass (the reference's own arithmetic)
    xp = get_array_module(x)
    return xp.maximum(x, x.dtype.type(0))


# What a config's activation name runs in the model (minisq.nn.ACTIVATION_FNS: the references).
ACTIVATION_FNS = {"gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh, "relu": relu}


def softmax(x, axis: int = -1, inplace: bool = False):
    # [..., S] -> [..., S]: exp(x - max) · (1 / Σ exp); inplace=True reuses x's memory (for
    # scores no one else holds). One reciprocal per row and a multiply instead of S divisions.
    xp = get_array_module(x)
    e = x if inplace else x.copy()
    e -= e.max(axis=axis, keepdims=True)
    xp.exp(e, out=e)
    e *= 1 / e.sum(axis=axis, keepdims=True)
    return e


def attention_causal_blocked(q, k, v, bias, scale: float, block: int = 128):
    """:func:`minisq.nn.attention` (float only), faster for long prompts: queries go in
    blocks of ``block``, and each block multiplies only the keys it can see (up to its last
    position), skipping the masked upper triangle — about half of the work at T = S. Each
    block normalizes after the second product (:func:`_attention_block`), and adds the bias
    only from its first query's position on when the bias is 0 on every key before that
    (no padding and no window: the common case). On the CPU the heads are shared out over
    the cores (:func:`minisq.kernels.threads.run_parallel`), each core running its heads'
    small products on one BLAS thread; the result is the same bit for bit as one core doing
    every head.

    # [B, H, T, D], [B, H, S, D], [B, H, S, D], [B, 1 or H, T, S] -> [B, H, T, D]
    """
    xp = get_array_module(q)
    B, H, T, _ = q.shape
    S = k.shape[2]
    out = xp.empty_like(q)
    blocks = []                                    # (t0, t1, keys seen, first key the bias must be added to)
    for t0 in range(0, T, block):
        t1, before = min(t0 + block, T), S - T + t0    # keys before the block's first query
        free = not bool(bias[:, :, t0:t1, :before].any())   # bias 0 there: nothing to add
        blocks.append((t0, t1, S - T + t1, before if free else 0))

    def heads(h):
        # the heads h[0] <= j < h[1] of every sequence, all query blocks -> out[:, h0:h1]
        h0, h1 = h
        b = bias if bias.shape[1] == 1 else bias[:, h0:h1]     # one bias for all heads, or one per head (ALiBi)
        for t0, t1, seen, from_key in blocks:
            out[:, h0:h1, t0:t1] = _attention_block(q[:, h0:h1, t0:t1], k[:, h0:h1, :seen],
                                                    v[:, h0:h1, :seen], b[:, :, t0:t1, :seen],
                                                    scale, from_key)

    if xp is not np:
        heads((0, H))
        return out
    # a decoding step's few scores are not worth a hand-off between threads
    n = threads.cpu_threads() if B * H * T * S >= threads.PARALLEL_MIN_ELEMENTS else 1
    with threads.one_blas_thread():
        threads.run_parallel(heads, threads.row_ranges(H, n))
    return out


def _attention_block(q, k, v, bias, scale: float, from_key: int = 0):
    """softmax(q kᵀ · scale + bias) v with the division by Σ exp moved after the product
    with v: ``(exp(s - max) @ v) / Σ exp(s - max)`` divides T·D numbers instead of T·S
    (one elementwise pass over the scores fewer; same math, float rounding apart). The
    bias is added to keys ``from_key`` on only (the caller knows it is 0 before).

    # [B, H, T, D], [B, H, S, D], [B, H, S, D], [B, 1, T, S] -> [B, H, T, D]
    """
    xp = get_array_module(q)
    e = q * q.dtype.type(scale) @ k.swapaxes(-1, -2)   # [B, H, T, S], a fresh array
    e[..., from_key:] += bias[..., from_key:]
    e -= e.max(axis=-1, keepdims=True)
    xp.exp(e, out=e)
    out = e @ v                                         # [B, H, T, D]
    out /= e.sum(axis=-1, keepdims=True)
    return out


def all_finite(x) -> bool:
    """True when no element of x is NaN or ±inf (the model's check on its logits).

    One matrix-vector product ``x · 1`` first (BLAS, no temporary of x's size): a NaN or
    infinity anywhere makes its row sum NaN or infinite, so a finite result proves every
    element finite. Only when it is not (a bad value, or a row sum that overflowed by
    itself) does the exact elementwise test ``isfinite(x).all()`` decide. On one BLAS
    thread: this memory-bound product gains little from more, and OpenBLAS's woken workers
    would spin on the cores that the next forward's threads need
    (see :func:`minisq.kernels.threads.one_blas_thread`).
    """
    # [..., N] float -> bool
    xp = get_array_module(x)
    if x.size == 0:
        return True
    with np.errstate(over="ignore", invalid="ignore"), threads.one_blas_thread():  # an inf/NaN sum is the answer
        rows = x.reshape(-1, x.shape[-1]) @ xp.ones(x.shape[-1], dtype=x.dtype)   # [M]
    return bool(xp.isfinite(rows).all()) or bool(xp.isfinite(x).all())
