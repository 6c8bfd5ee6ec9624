"""The transformer's building blocks as small pure functions (picoGPT style).

Legend: B batch, T new tokens, S tokens attended to (past + new), C hidden, H heads,
D = C // H head dim, F MLP width, V vocab.

Every function takes whatever array module its input lives in (NumPy or CuPy) and keeps
the input's float dtype: constants are cast to ``x.dtype`` first, because under NumPy 2
``x32 * np.sqrt(2 / np.pi)`` silently promotes a float32 array to float64.

**Linear layers are swappable leaves.** A linear layer in the parameter tree is an object
``leaf`` with ``leaf(x, mask) -> y``; the float one is :class:`Linear` (``y = x @ w + b`` with
``w`` stored ``[C_in, C_out]``). ``mask`` ``[B, T]`` (1 = real token, 0 = padding, or None)
is what the forward pass knows about padding: a float layer ignores it, a W8A8 layer's
per-sequence scale and calibration's statistics use the real tokens only. Calibration wraps these leaves to record what flows into
them, and quantization replaces them with W8A8 leaves; the forward pass never asks which
kind it holds.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import backend
from .backend import get_array_module


@dataclasses.dataclass(frozen=True, eq=False)
class Linear:
    """A float linear layer: ``y = x @ w + b``.

    ``w`` is ``[C_in, C_out]`` whatever the checkpoint stored (GPT-2's Conv1D already is;
    OPT's nn.Linear ``[C_out, C_in]`` is transposed at load). ``b`` is ``[C_out]`` or None.
    """

    w: object   # [C_in, C_out] float
    b: object = None   # [C_out] float or None

    @property
    def in_features(self) -> int:
        return self.w.shape[0]

    @property
    def out_features(self) -> int:
        return self.w.shape[1]

    def __call__(self, x, mask=None):
        # [..., C_in] -> [..., C_out]; the token mask does not change a float layer
        return linear(x, self.w, self.b)


class Int8WeightShape:
    """The widths of a quantized leaf that holds its int8 weight as ``w_q`` ``[C_in, C_out]``
    (W8A8, W8A16, ZeroQuant, LLM.int8() leaves), as :class:`Linear` gives them for ``w``."""

    @property
    def in_features(self) -> int:
        return self.w_q.shape[0]

    @property
    def out_features(self) -> int:
        return self.w_q.shape[1]


def linear(x, w, b=None):
    # [..., C_in], [C_in, C_out], [C_out] -> [..., C_out]
    # One 2-D matmul over all tokens: NumPy would treat [B, T, C_in] @ w as B separate
    # products, each streaming all of w from memory (B times the traffic when decoding).
    # On the CPU its rows are shared out over the cores (x @ w + b, bias added in place).
    y = backend.matmul_rows(x.reshape(-1, x.shape[-1]), w, b)   # [B·T, C_out]
    return y.reshape(*x.shape[:-1], w.shape[1])


def layer_norm(x, g=None, b=None, eps: float = 1e-5):
    # [..., C], [C], [C] -> [..., C]; normalized over the last axis, biased variance (as torch)
    # On the CPU the rows go to all cores (backend.split_rows): NumPy's ufuncs use one.
    xp = get_array_module(x)
    return backend.split_rows(lambda xs, ys: _layer_norm_into(xs, g, b, eps, ys), x, xp.empty(x.shape, x.dtype))


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


def gelu_tanh(x):
    # [...] -> [...]; GPT-2's "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    # On the CPU the rows go to all cores (backend.split_rows): NumPy's ufuncs use one.
    xp = get_array_module(x)
    return backend.split_rows(_gelu_tanh_into, x, xp.empty_like(x))


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
    # [...] -> [...]
    xp = get_array_module(x)
    return xp.maximum(x, x.dtype.type(0))


ACTIVATION_FNS = {"gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh, "relu": relu}


def softmax(x, axis: int = -1, inplace: bool = False):
    # [..., S] -> [..., S]; inplace=True reuses x's memory (for scores no one else holds)
    xp = get_array_module(x)
    e = x if inplace else x.copy()
    e -= e.max(axis=axis, keepdims=True)
    xp.exp(e, out=e)
    e *= 1 / e.sum(axis=axis, keepdims=True)
    return e


def log_softmax(x, axis: int = -1):
    # [..., V] -> [..., V]: log p, computed stably as (x - max) - log Σ exp(x - max)
    xp = get_array_module(x)
    z = x - x.max(axis=axis, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=axis, keepdims=True))


def split_heads(x, n_head: int):
    # [B, T, C] -> [B, H, T, D]
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    # [B, H, T, D] -> [B, T, C]
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def attention_bias(mask, T: int, dtype):
    """Additive bias ``[B, 1, T, S]``: 0 where a query may look, a large negative elsewhere.

    ``mask`` is ``[B, S]`` (1 = real token, 0 = padding) over all S = past + T tokens; the
    new tokens are the last T. Query t (absolute index S - T + t) sees key s when s <= its
    index and key s is real. A large finite negative (not -inf) keeps fully-masked rows
    (padding queries) finite instead of NaN, as Hugging Face does.
    """
    xp = get_array_module(mask)
    B, S = mask.shape
    q_index = xp.arange(S - T, S)[:, None]          # [T, 1]
    causal = xp.arange(S)[None, :] <= q_index        # [T, S]
    allowed = causal[None] & (mask[:, None, :] > 0)  # [B, T, S]
    bias = xp.where(allowed, dtype.type(0), xp.finfo(dtype).min).astype(dtype)
    return bias[:, None]                             # [B, 1, T, S]


def attention(q, k, v, bias, scale: float, matmul=None):
    """Scaled dot-product attention, all heads at once.

    softmax(q kᵀ · scale + bias) v
    # [B, H, T, D], [B, H, S, D], [B, H, S, D], [B, 1, T, S] -> [B, H, T, D]

    ``matmul(a, b)`` computes the two batched products (q·kᵀ and p·v); the default is ``@``.
    The INT8 attention BMM passes a quantized one.
    """
    mm = matmul or (lambda a, b: a @ b)
    # scaling q [.., T, D] costs T·D multiplies; scaling the scores would cost T·S
    scores = mm(q * q.dtype.type(scale), k.swapaxes(-1, -2))   # [B, H, T, S], a fresh array
    scores += bias
    p = softmax(scores, inplace=True)
    return mm(p, v)


def attention_causal_blocked(q, k, v, bias, scale: float, block: int = 128):
    """The same as :func:`attention` (float only), faster for long prompts: queries go in
    blocks of ``block``, and each block multiplies only the keys it can see (up to its last
    position), skipping the masked upper triangle — about half of the work at T = S. Each
    block normalizes after the second product (:func:`_attention_block`), and adds the bias
    only from its first query's position on when the bias is 0 on every key before that
    (no padding and no window: the common case). On the CPU the heads are shared out over
    the cores (:func:`minisq.backend.run_parallel`), each core running its heads' small
    products on one BLAS thread; the result is the same bit for bit as one core doing
    every head. Checked against :func:`attention` in the tests.

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
    threads = backend.cpu_threads() if B * H * T * S >= backend.PARALLEL_MIN_ELEMENTS else 1
    with backend.one_blas_thread():
        backend.run_parallel(heads, backend.row_ranges(H, threads))
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
    """True when no element of x is NaN or ±inf.

    One matrix-vector product ``x · 1`` first (BLAS, no temporary of x's size): a NaN or
    infinity anywhere makes its row sum NaN or infinite, so a finite result proves every
    element finite. Only when it is not (a bad value, or a row sum that overflowed by
    itself) does the exact elementwise test decide. On one BLAS thread: this memory-bound
    product gains little from more, and OpenBLAS's woken workers would spin on the cores
    that the next forward's threads need (see :func:`minisq.backend.one_blas_thread`).
    """
    # [..., N] float -> bool
    xp = get_array_module(x)
    if x.size == 0:
        return True
    with np.errstate(over="ignore", invalid="ignore"), backend.one_blas_thread():  # an inf/NaN sum is the answer
        rows = x.reshape(-1, x.shape[-1]) @ xp.ones(x.shape[-1], dtype=x.dtype)   # [M]
    return bool(xp.isfinite(rows).all()) or bool(xp.isfinite(x).all())
