"""Symmetric absmax INT8 quantizers: float arrays in, real int8 arrays and their scales out.

Legend: T tokens, C_in input channels, C_out output channels (weights are stored
``[C_in, C_out]`` so that ``y = x @ w``); ``...`` any leading axes.

SmoothQuant (Xiao et al. 2022, Sec. 2 "Preliminaries", Eq. 1) quantizes with one scale
per group of values:

    Δ = max|X| / (2^(N-1) - 1) = max|X| / 127,      X̄ = clip(round(X / Δ), -127, 127)

and the group is the whole tensor (per-tensor), one row of activations (per-token) or one
output channel of the weights (per-channel) (Sec. 2, Fig. 3). The range is the symmetric
[-127, 127]; -128 is never produced, so negation never overflows.

Conventions here, the same for every function:

* The integers are real: ``quantize_*`` gives back ``(q, scale)`` with ``q`` an int8 array
  of x's shape, and ``fake_quantize`` is literally ``dequantize(*quantize_*(x))``.
* ``scale`` has x's float dtype (float32 or float64); a float16 x is computed in float32
  (the scale, the division and the fake-quantized result are float32).
* Rounding is round-half-to-even (``rint``), the division is ``x / scale`` in the scale's
  dtype, and ``clip`` keeps [-127, 127].
* Dynamic scales (``scale=None``) are ``max|x| / 127`` per group. **Zero-range guard:**
  where that quotient is below the smallest normal float ``tiny`` (an all-zero group, or
  one so tiny that ``max|x| / 127`` would underflow into subnormals), the scale is 1: every
  q in that group is then 0 and dequantizing gives exact zeros, an error of at most
  ``max|x| < 127 * tiny`` (1.5e-36 in float32). No NaN is ever produced, and every scale
  is a normal float, which keeps ``q * scale`` accurate to one rounding.
* Static scales (``scale=`` given, e.g. from calibration) are cast to x's compute dtype and
  must be finite and > 0; values of x beyond ±127·scale clip to ±127.
* Inputs must be finite floats: NaN/inf raise :class:`InputError`, integer arrays raise
  :class:`ShapeError` (they are already quantized, or are token ids). Nothing is modified
  in place.

**Rounding conventions** (:data:`CONVENTIONS`). Everything above is ``convention=
"smoothquant"``, the default: the paper's and the official code's ``Δ = max|x| / 127`` and
codes in ±127. ``convention="compressed-tensors"`` is the compressed-tensors format's rule
(what llm-compressor writes and vLLM and transformers evaluate; its ``calculate_qparams`` and
``round_to_quantized_type_args``): ``Δ = max|x| / 127.5`` (255 / 2) and codes clipped to
[-128, 127]. Both round half to even; for an all-zero group compressed-tensors uses Δ = eps
where the guard here uses 1 (every code is 0 either way).
"""

from __future__ import annotations

import collections

import numpy as np

from .backend import get_array_module
from .kernels import cuda
from .errors import ConfigError, DeviceError, InputError, ShapeError

QMAX = 127  # 2^(8-1) - 1: the symmetric int8 range is [-QMAX, QMAX]


Convention = collections.namedtuple("Convention", "divisor qmin qmax")   # Δ = max|x| / divisor, clip to [qmin, qmax]
CONVENTIONS = {
    "smoothquant": Convention(127.0, -127, 127),          # the paper (Eq. 1) and the official code: the default
    "compressed-tensors": Convention(127.5, -128, 127),   # compressed-tensors' int8: 255 / 2, the full range
}


def convention_of(name: str) -> Convention:
    if name not in CONVENTIONS:
        raise ConfigError(f"convention={name!r} is not one of {tuple(CONVENTIONS)}")
    return CONVENTIONS[name]


# ----------------------------------------------------------------------------------------
# checks shared by the quantizers


def _float_input(x, name: str = "x"):
    """(xp, x as an array of its float compute dtype); float16 is widened to float32."""
    xp = get_array_module(x)
    x = xp.asarray(x)
    if x.dtype.kind != "f":
        raise ShapeError(
            f"{name} has dtype {x.dtype}, but only float arrays can be quantized: an integer "
            f"array is already quantized (or holds token ids); pass the float values instead"
        )
    if x.dtype == xp.float16:
        x = x.astype(xp.float32)  # float16 has too little range/precision for x / scale
    return xp, x


def _check_finite(xp, x, name: str = "x") -> None:
    """Raise InputError when x holds NaN/inf (counting them for the message)."""
    bad = int(xp.count_nonzero(~xp.isfinite(x)))
    if bad:
        raise InputError(
            f"{name} has {bad} NaN/inf value(s) out of {x.size}: quantization needs finite "
            f"inputs (a NaN would poison its whole scale group); find where they come from "
            f"(a float16 overflow? a division by zero?) and fix or mask them first"
        )


def _static_scale(xp, scale, dtype, shape: tuple, also: tuple = ()):
    """A user-given scale as an xp array of ``dtype`` and exactly ``shape``, validated.

    ``also`` lists other accepted shapes with the same number of elements (e.g. ``[C_out]``
    for ``[1, C_out]``); they are reshaped to ``shape``.
    """
    if xp is np and get_array_module(scale) is not np:
        raise DeviceError(
            "scale is a CuPy (GPU) array but x is a NumPy (CPU) one: move both to one device "
            "with minisq.backend.to_device"
        )
    s = xp.asarray(scale)
    if s.dtype.kind not in "fiu":
        raise ShapeError(f"scale has dtype {s.dtype}; it must be a positive float")
    if s.shape != shape:
        if s.shape not in also:
            raise ShapeError(
                f"static scale has shape {s.shape}, expected {shape}"
                + (f" (or {', '.join(map(str, also))})" if also else "")
            )
        s = s.reshape(shape)
    s = s.astype(dtype)  # cast first, so an underflow to 0 or overflow to inf is caught below
    bad = int(xp.count_nonzero(~(xp.isfinite(s) & (s > 0))))
    if bad:
        raise InputError(
            f"scale has {bad} value(s) out of {s.size} that are not finite positive "
            f"{np.dtype(dtype).name} numbers (zero, negative, NaN, inf, or lost in the cast): a "
            f"static scale must be > 0 and finite; recalibrate, or pass scale=None for a "
            f"dynamic scale"
        )
    return s


def dynamic_scale(xp, absmax, convention: str = "smoothquant"):
    """max|x| / 127 (``convention="compressed-tensors"``: / 127.5) with the zero-range
    guard: 1 where that would be 0 or subnormal.

    The official SmoothQuant code guards differently: it clamps max|x| at 1e-5 before
    dividing by 127, so a tensor whose range is below 1e-5 gets Δ = 1e-5/127 there and
    Δ = max|x|/127 here (down to float's smallest normal). The two agree on every range
    ≥ 1e-5, which is all real activations and weights.
    """
    # [...] float -> [...] float (same dtype)
    s = absmax / convention_of(convention).divisor   # a Python float: keeps absmax's dtype
    return xp.where(s < xp.finfo(s.dtype).tiny, xp.ones_like(s), s)


def _absmax_checked(xp, x, name: str = "x", axis=None):
    """``max|x|`` over ``axis`` (keepdims), raising InputError when x holds NaN/inf.

    Computed as ``max(max(x), -min(x))``: two reductions and no temporary of x's size (as
    ``abs(x)`` would make). NaN propagates through max and min and an infinity shows up in
    one of them, so a non-finite value anywhere makes its group's absmax non-finite: the
    finiteness check costs a look at the (small) result instead of a pass over x.
    """
    # [...] float -> reduced float (keepdims)
    m = xp.maximum(xp.max(x, axis=axis, keepdims=True), -xp.min(x, axis=axis, keepdims=True))
    if not bool(xp.isfinite(m).all()):
        _check_finite(xp, x, name)  # raises, with the count of bad values
    return m


def _quantize(xp, x, scale, dynamic: bool = False, convention: str = "smoothquant"):
    """q = clip(rint(x / scale), -127, 127) as int8 ([-128, 127] for
    ``convention="compressed-tensors"``); scale broadcasts against x.

    ``dynamic=True`` (the scale is this very group's ``dynamic_scale``) skips the clip,
    which cannot change anything then: s = fl(max|x| / 127) >= (max|x| / 127)(1 - u), so
    |x / s| <= 127 (1 + u) / (1 - u) < 127.5 and rint gives at most 127; where the zero-range
    guard set s = 1, |x| < 127 · tiny and rint gives 0. (Tested against the clipped form.)
    Under compressed-tensors' Δ = max|x| / 127.5 the largest |x / Δ| is 127.5, which rounds
    to ±128: there the clip is always applied.
    """
    # [...] float, broadcastable float -> [...] int8
    rule = convention_of(convention)
    t = x / scale                 # one fresh temporary, rounded (and clipped) in place
    xp.rint(t, out=t)             # round half to even
    if not dynamic or rule.divisor != QMAX:
        xp.clip(t, rule.qmin, rule.qmax, out=t)
    return t.astype(xp.int8)


# ----------------------------------------------------------------------------------------
# the three granularities (paper Sec. 2, Fig. 3)


def quantize_per_tensor(x, scale=None, convention: str = "smoothquant"):
    """One scale for the whole tensor: ``Δ = max|x| / 127``, ``q = clip(round(x / Δ))``.

    Paper Sec. 2 (Eq. 1), "per-tensor" in Fig. 3. SmoothQuant's O1–O3 settings quantize
    weights this way, and O2/O3 activations too (dynamic / static scale; our reading of
    the paper's table of settings). ``scale``: None (dynamic) or a static scale of size 1.
    """
    # [...] float -> [...] int8, [] float
    xp, x = _float_input(x)
    if x.size == 0:
        raise ShapeError(f"x has shape {x.shape} and no elements: there is no max|x| to scale by")
    if scale is None:
        s = dynamic_scale(xp, _absmax_checked(xp, x).reshape(()), convention)
    else:
        _check_finite(xp, x)
        s = _static_scale(xp, scale, x.dtype, (), also=((1,), (1, 1)))
    return _quantize(xp, x, s, scale is None, convention), xp.asarray(s)


def quantize_per_token(x, scale=None, convention: str = "smoothquant"):
    """One scale per token (row): ``Δ[t] = max_c |x[t, c]| / 127``.

    Paper Sec. 2, "per-token" in Fig. 3 (dynamic per-token activation quantization, as in
    ZeroQuant and LLM.int8()). The last axis is reduced with keepdims, so the scale is
    ``[..., 1]`` and ``q * scale`` broadcasts. ``scale``: None (dynamic) or a static
    ``[..., 1]`` (or ``[...]``) array.
    """
    # [..., C] float -> [..., C] int8, [..., 1] float
    if (scale is None and convention == "smoothquant" and getattr(x, "dtype", None) in cuda.FUSED_DTYPES
            and get_array_module(x) is not np):
        return _quantize_per_token_fused(x)  # the GPU: the same arithmetic, one fused kernel
    xp, x = _float_input(x)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ShapeError(f"x has shape {x.shape}: per-token quantization needs a non-empty last axis")
    if scale is None:
        s = dynamic_scale(xp, _absmax_checked(xp, x, axis=-1), convention)
    else:
        _check_finite(xp, x)
        s = _static_scale(xp, scale, x.dtype, x.shape[:-1] + (1,), also=(x.shape[:-1],))
    return _quantize(xp, x, s, scale is None, convention), s


def _quantize_per_token_fused(x):
    """:func:`quantize_per_token` with a dynamic scale on a CuPy array, by
    :func:`minisq.kernels.cuda.quantize_per_token` (q and scale equal bit for bit)."""
    # [..., C] float16/32/64 (CuPy) -> [..., C] int8, [..., 1] float32/64
    xp = get_array_module(x)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ShapeError(f"x has shape {x.shape}: per-token quantization needs a non-empty last axis")
    q, s = cuda.quantize_per_token(x)
    if not bool(xp.isfinite(s).all()):  # a NaN/inf in a row makes its scale NaN/inf
        _check_finite(xp, x)
    return q, s


def quantize_per_sequence(x, mask=None, convention: str = "smoothquant"):
    """Per-tensor dynamic quantization of *each sequence* over its real tokens:
    ``Δ[b] = max_{t real, c} |x[b, t, c]| / 127``.

    This is what "per-tensor dynamic" means for a batch: the official SmoothQuant code runs
    one sequence per forward, so its per-tensor scale is one sequence's. Taking the max over
    the whole ``[B, T, C]`` batch instead would let padding tokens and *other sequences* set
    each sequence's scale, and a result would depend on what it was batched with. Padding
    tokens (``mask == 0``) are quantized with their sequence's scale (clipped to ±127) but
    never set it. ``x`` of 1 or 2 dimensions (``[C]``, ``[T, C]``) is one sequence.
    """
    # [..., T, C] float, [..., T] 0/1 or None -> [..., T, C] int8, [..., 1, 1] float ([] for x [T, C])
    xp, x = _float_input(x)
    if x.size == 0:
        raise ShapeError(f"x has shape {x.shape} and no elements: there is no max|x| to scale by")
    token_max = _absmax_checked(xp, x, axis=-1)[..., 0]                          # [..., T]
    if mask is not None:
        mask = xp.asarray(mask)
        if mask.shape != x.shape[:-1]:
            raise ShapeError(f"mask has shape {mask.shape}, expected {x.shape[:-1]} for x {x.shape}")
        token_max = xp.where(mask > 0, token_max, xp.zeros_like(token_max))
    if x.ndim < 3:
        s = dynamic_scale(xp, xp.asarray(xp.max(token_max)), convention)                # []
    else:
        s = dynamic_scale(xp, xp.max(token_max, axis=-1)[..., None, None], convention)  # [..., 1, 1]
    return _quantize(xp, x, s, convention=convention), s


def quantize_per_input_channel(x, mask=None):
    """Per-channel *activation* scales, one per input channel of each sequence over its real
    tokens: ``Δ[b, k] = max_{t real} |x[b, t, k]| / 127``.

    The paper's "ideal but not GEMM-able" reference (Sec. 2, Fig. 3; the per-channel rows of
    its Table 1): the scale varies along k, the axis a GEMM sums over, so it cannot be pulled
    out of ``Σ_k X̄[t, k] W̄[k, j]`` and the product cannot run on integers. minisq offers it
    only in fake quantization. Padding tokens (``mask == 0``) never set a scale.
    """
    # [..., T, C] float, [..., T] 0/1 or None -> [..., T, C] int8, [..., 1, C] float ([C] for x [C])
    xp, x = _float_input(x)
    if x.size == 0:
        raise ShapeError(f"x has shape {x.shape} and no elements: there is no max|x| to scale by")
    _check_finite(xp, x)
    x2 = x if x.ndim >= 2 else x[None]                                           # [..., T, C]
    a = xp.abs(x2)
    if mask is not None:
        mask = xp.asarray(mask)
        if mask.shape != x2.shape[:-1]:
            raise ShapeError(f"mask has shape {mask.shape}, expected {x2.shape[:-1]} for x {x.shape}")
        a = xp.where(mask[..., None] > 0, a, xp.zeros_like(a))
    s = dynamic_scale(xp, xp.max(a, axis=-2, keepdims=True))                    # [..., 1, C]
    if x.ndim == 1:
        s = s[0]                                                                # [C]
    return _quantize(xp, x, s), s


def quantize_per_channel(w, scale=None, convention: str = "smoothquant"):
    """One scale per output channel of a ``[C_in, C_out]`` weight: ``Δ[j] = max_k |w[k, j]| / 127``.

    Paper Sec. 2, "per-channel" in Fig. 3: the weight's output channels are its columns here
    (``y = x @ w``), so axis 0 is reduced and the scale is ``[1, C_out]``. Per-channel
    weight scales factor out of the GEMM (each column of y has one Δw), which is why they
    keep the INT8 GEMM possible. ``scale``: None (dynamic) or static ``[1, C_out]``/``[C_out]``.
    """
    # [C_in, C_out] float -> [C_in, C_out] int8, [1, C_out] float
    xp, w = _float_input(w, "w")
    if w.ndim != 2 or w.shape[0] == 0:
        raise ShapeError(
            f"w has shape {w.shape}: per-channel quantization takes a non-empty 2-D weight "
            f"[C_in, C_out] (stored so that y = x @ w)"
        )
    if scale is None:
        s = dynamic_scale(xp, _absmax_checked(xp, w, "w", axis=0), convention)
    else:
        _check_finite(xp, w, "w")
        s = _static_scale(xp, scale, w.dtype, (1, w.shape[1]), also=((w.shape[1],),))
    return _quantize(xp, w, s, scale is None, convention), s


def dequantize(q, scale, dtype=None):
    """Back to floats: ``x̂ = q · Δ``, computed in ``dtype`` (default: the scale's dtype).

    Both factors are cast to ``dtype`` first and multiplied once, so the result is the
    correctly rounded product (exact in float64 for float32 scales: 8 + 24 bits < 53).
    """
    # [...] int, broadcastable float -> [...] float
    xp = get_array_module(q)
    q = xp.asarray(q)
    scale = xp.asarray(scale)
    if q.dtype.kind not in "iu":
        raise ShapeError(f"q has dtype {q.dtype}: dequantize takes the integer array that quantize gave")
    if scale.dtype.kind != "f":
        raise ShapeError(f"scale has dtype {scale.dtype}: a scale is a float array")
    dtype = scale.dtype if dtype is None else np.dtype(dtype)
    if dtype.kind != "f":
        raise ShapeError(f"dtype {dtype} is not a float dtype")
    try:
        shape = np.broadcast_shapes(q.shape, scale.shape)
    except ValueError:
        shape = None
    if shape != q.shape:
        raise ShapeError(f"scale of shape {scale.shape} does not broadcast to q's shape {q.shape}")
    return q.astype(dtype) * scale.astype(dtype)


# The granularity names, as data: what a config string means.
QUANTIZERS = {
    "per_tensor": quantize_per_tensor,
    "per_token": quantize_per_token,
    "per_channel": quantize_per_channel,
}


def fake_quantize(x, granularity: str = "per_tensor", scale=None):
    """Simulated quantization: literally ``dequantize(*quantize_<granularity>(x, scale))``.

    Gives floats that lie exactly on the int8 grid; the INT8 GEMM path reproduces
    ``fake(x) @ fake(w)`` (see :mod:`minisq.gemm`). Returns the scale's dtype (float32 for
    float16 input). Re-quantizing the result is a no-op: ``fake(fake(x)) == fake(x)``
    bit for bit (the tests say why).
    """
    # [...] float -> [...] float
    if granularity not in QUANTIZERS:
        raise ConfigError(f"unknown granularity {granularity!r}: use one of {sorted(QUANTIZERS)}")
    return dequantize(*QUANTIZERS[granularity](x, scale))
