"""The transformer's building blocks as small pure functions (picoGPT style).

Legend: B batch, T new tokens, S tokens attended to (past + new), C hidden, H heads,
D = C // H head dim, F MLP width, V vocab.

These are the references, written to be read: LayerNorm, RMSNorm, GELU (tanh), SiLU,
softmax, causal attention, RoPE. The model runs their fast versions in
:mod:`minisq.kernels.cpu` (threaded, in place, blocked attention), which compute the same
functions and are tested against these (``tests/test_kernels.py``).

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

from .backend import get_array_module
from .kernels import cpu as kernels
from .kernels.cpu import all_finite  # noqa: F401  (the model's NaN check; a kernel)


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
        # [..., C_in] -> [..., C_out]; the token mask does not change a float layer.
        # Runs the fast kernel: one matmul over all tokens, rows shared out over the cores.
        return kernels.linear(x, self.w, self.b)


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
    y = x @ w
    return y if b is None else y + b


def layer_norm(x, g=None, b=None, eps: float = 1e-5):
    # [..., C], [C], [C] -> [..., C]: (x - mean) / sqrt(var + eps) · g + b over the last axis,
    # with the biased variance (as torch)
    xp = get_array_module(x)
    mean = x.mean(axis=-1, keepdims=True)                           # [..., 1]
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)            # [..., 1]
    y = (x - mean) / xp.sqrt(var + x.dtype.type(eps))
    if g is not None:
        y = y * g
    if b is not None:
        y = y + b
    return y


def rms_norm(x, g, eps: float):
    # [..., C], [C] -> [..., C]: x / sqrt(mean(x²) + eps) · g   (no mean subtracted, no bias)
    xp = get_array_module(x)
    mean_sq = (x * x).mean(axis=-1, keepdims=True)                  # [..., 1]
    return x / xp.sqrt(mean_sq + x.dtype.type(eps)) * g


def gelu_tanh(x):
    # [...] -> [...]; GPT-2's "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    xp = get_array_module(x)
    t = x.dtype.type
    u = t(math.sqrt(2.0 / math.pi)) * (x + t(0.044715) * x ** 3)
    return t(0.5) * x * (t(1) + xp.tanh(u))


def silu(x):
    # [...] -> [...]: x · sigmoid(x) = x / (1 + exp(-x))   (Llama's MLP gate)
    xp = get_array_module(x)
    with np.errstate(over="ignore"):   # exp(-x) = inf for very negative x: x / inf = -0, the limit
        return x / (x.dtype.type(1) + xp.exp(-x))


def relu(x):
    # [...] -> [...]
    xp = get_array_module(x)
    return xp.maximum(x, x.dtype.type(0))


ACTIVATION_FNS = {"gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh, "relu": relu}


def softmax(x, axis: int = -1):
    # [..., S] -> [..., S]: exp(x - max) / Σ exp(x - max)   (the max subtracted for range only)
    xp = get_array_module(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


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


def attention(q, k, v, bias, scale: float):
    """Scaled dot-product attention, all heads at once: ``softmax(q kᵀ · scale + bias) v``.

    ``bias`` (:func:`attention_bias`) is 0 where a query may look and a large negative
    elsewhere (causal, padding). The model runs :func:`minisq.kernels.cpu.attention_causal_blocked`,
    which skips the masked half of the products and is tested against this.
    """
    # [B, H, T, D], [B, H, S, D], [B, H, S, D], [B, 1, T, S] -> [B, H, T, D]
    scores = q @ k.swapaxes(-1, -2) * q.dtype.type(scale) + bias   # [B, H, T, S]
    return softmax(scores) @ v


def apply_rotary(x, cos, sin, n_heads: int):
    # [B, T, n*D], cos/sin [B, T, 1, D] -> [B, T, n*D]: RoPE. Each head's pairs (j, j + D/2)
    # rotated by the angle of its position: x·cos + rotate_half(x)·sin, rotate_half(a, b) = (-b, a)
    B, T, _ = x.shape
    xp = get_array_module(x)
    h = x.reshape(B, T, n_heads, -1)                                  # [B, T, n, D]
    half = h.shape[-1] // 2
    rotated = xp.concatenate([-h[..., half:], h[..., :half]], axis=-1)
    return (h * cos + rotated * sin).reshape(B, T, -1)
