"""Assignment 4: calibration and a whole W8A8 model, end to end (SmoothQuant Sec. 4, Table 2).

Legend: B batch, T tokens, C_in / C_out a linear's widths (weights ``[C_in, C_out]``,
``y = x @ w``), N calibration tokens over every batch.

A model's linear layers are *leaves* of its parameter tree (``model.linears()`` lists them by
dotted name, e.g. ``h.0.attn.c_attn``); ``model.replace_linears(fn)`` returns a new model
whose every leaf is ``fn(name, leaf)``. That one operation is all calibration and
quantization need:

* calibration wraps each leaf in an observer that records what flows in, then runs the model;
* quantization swaps each float leaf for a W8A8 leaf: int8 weight + scale, activations
  quantized on every call, an INT8 GEMM and the epilogue (Assignments 1-2; minisq's versions
  are used here):

    Y = Δx · Δw · (X̄ @ W̄) + b           (path="int")
    Y = (X̄ · Δx) @ (W̄ · Δw) + b         (path="fake": the same integers, float matmul)

The granularities are SmoothQuant's Table 2 (``minisq.PRESETS``): weights per-tensor or
per-channel; activations per-token (dynamic), per-tensor (dynamic) or static — one scale
per layer fixed at calibration time (O3).
"""

import dataclasses
import fnmatch

import numpy as np

from minisq import (dequant_epilogue, dequantize, int8_gemm, quantize_per_channel, quantize_per_sequence,
                    quantize_per_tensor, quantize_per_token)

QMAX = 127
WEIGHT_QUANTIZERS = {"per_channel": quantize_per_channel, "per_tensor": quantize_per_tensor}
ACTS = ("per_token", "per_tensor", "static")


def calibrate_channel_absmax(model, batches):
    """Per-channel input ranges of every linear leaf: ``{name: max over all tokens of |x[:, k]|}``.

    ``batches`` is a non-empty list of token-id arrays (``[T]`` or ``[B, T]``), each run through
    the model on its own. Wrap every leaf (``model.replace_linears``) in a function that
    records ``max |x|`` over all leading axes and computes exactly what the leaf computes.
    Returns ``{name: [C_in] float64}``; ValueError for an empty list.
    """
    # Task 4.1
    # list of [B, T] | [T] int -> {name: [C_in] float64}
    if len(batches) == 0:
        raise ValueError("calibration needs at least one batch of token ids")
    absmax = {}

    def observe(name, leaf):
        def observed(x, mask=None):
            # [..., C_in] -> [..., C_out]; records max |x| per input channel
            seen = np.abs(x).reshape(-1, x.shape[-1]).max(axis=0).astype(np.float64)   # [C_in]
            absmax[name] = np.maximum(absmax[name], seen) if name in absmax else seen
            return leaf(x, mask)
        return observed

    observed_model = model.replace_linears(observe)
    for ids in batches:
        observed_model(np.asarray(ids))
    return absmax


def static_scale(channel_absmax, dtype=np.float32):
    """The static (O3) activation scale of one layer: ``Δ = max_k absmax[k] / 127`` as a 0-d array.

    The per-tensor range is the max of the per-channel ranges, cast to ``dtype`` and divided
    by 127 in ``dtype``. As the quantizers do, a scale below ``np.finfo(dtype).tiny`` (0 for a
    layer whose calibration input was all zeros, or subnormal for one whose range was tiny) is
    1 instead, so nothing is ever divided by 0.
    ValueError for NaN/inf or negative ranges.
    """
    # Task 4.2
    # [C_in] float -> [] dtype
    absmax = np.asarray(channel_absmax, dtype=np.float64)
    if not np.isfinite(absmax).all() or (absmax < 0).any():
        raise ValueError("a calibrated range must be finite and >= 0")
    scale = np.asarray(absmax.max(), dtype=dtype) / np.asarray(QMAX, dtype=dtype)
    return np.asarray(1.0 if scale < np.finfo(dtype).tiny else scale, dtype=dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class QLinear:
    """A W8A8 linear leaf: a real int8 weight and its scale; activations quantized per call."""

    w_q: np.ndarray           # [C_in, C_out] int8
    w_scale: np.ndarray       # [1, C_out] (per-channel) or [] (per-tensor), the model's float dtype
    b: object = None          # [C_out] float or None
    acts: str = "per_token"   # "per_token" | "per_tensor" (dynamic) | "static"
    x_scale: object = None    # [] float: the static activation scale (acts="static"), else None
    path: str = "int"         # "int": INT8 GEMM + epilogue; "fake": dequantize, then float matmul

    @property
    def in_features(self) -> int:
        return self.w_q.shape[0]

    @property
    def out_features(self) -> int:
        return self.w_q.shape[1]

    def __call__(self, x, mask=None):
        """``y ≈ x @ w + b``: quantize x (per ``acts``), then the int or fake path (see module doc).

        ``x`` is ``[..., T, C_in]`` and ``mask`` ``[..., T]`` (1 = real token, 0 = padding, or
        None). "per_tensor" means one dynamic scale per *sequence* over its real tokens
        (``minisq.quantize_per_sequence(x, mask)``); the codes are then flattened to
        ``[N, C_in]`` and the result reshaped back; it has x's dtype.
        """
        # Task 4.3
        # [..., T, C_in] float, [..., T] or None -> [..., T, C_out] float (x's dtype)
        lead = x.shape[:-1]
        if self.acts == "per_token":
            x_q, x_scale = quantize_per_token(x)                           # [..., T, C_in] int8, [..., T, 1]
        elif self.acts == "per_tensor":
            x_q, x_scale = quantize_per_sequence(x, mask)                  # int8, [..., 1, 1] (or [])
        else:
            x_q, x_scale = quantize_per_tensor(x, self.x_scale)            # int8, []
        x_q = x_q.reshape(-1, self.in_features)                            # [N, C_in]
        if x_scale.ndim > 0:
            x_scale = np.broadcast_to(x_scale, lead + (1,)).reshape(-1, 1)  # [N, 1]
        w_scale = self.w_scale.astype(x.dtype)
        if self.path == "int":
            acc = int8_gemm(x_q, self.w_q)                                 # [T, C_out] int32
            y = dequant_epilogue(acc, x_scale, w_scale, self.b, out_dtype=x.dtype)
        else:
            y = dequantize(x_q, x_scale) @ dequantize(self.w_q, w_scale)   # [T, C_out]
            if self.b is not None:
                y = y + self.b
        return y.reshape(*lead, self.out_features)


def quantize_leaf(leaf, weights="per_channel", acts="per_token", x_scale=None, path="int"):
    """A :class:`QLinear` from a float leaf (``leaf.w`` ``[C_in, C_out]``, ``leaf.b``).

    ``weights`` picks the weight quantizer (:data:`WEIGHT_QUANTIZERS`); ``acts="static"``
    needs ``x_scale`` (from :func:`static_scale`). ValueError for unknown choices or a
    missing static scale.
    """
    # Task 4.3
    # Linear [C_in, C_out] -> QLinear
    if weights not in WEIGHT_QUANTIZERS or acts not in ACTS or path not in ("int", "fake"):
        raise ValueError(f"unknown weights={weights!r}, acts={acts!r} or path={path!r}")
    if acts == "static" and x_scale is None:
        raise ValueError("acts='static' needs the calibrated x_scale")
    w_q, w_scale = WEIGHT_QUANTIZERS[weights](leaf.w)
    return QLinear(w_q, w_scale, leaf.b, acts=acts, x_scale=x_scale, path=path)


def quantize_model(model, weights="per_channel", acts="per_token", channel_absmax=None, path="int",
                   skip=("lm_head",)):
    """A new W8A8 model: every linear leaf whose name matches no pattern of ``skip`` becomes a
    :class:`QLinear`. ``acts="static"`` needs ``channel_absmax`` (from
    :func:`calibrate_channel_absmax`) for a :func:`static_scale` per layer, in the model's
    dtype. The new model's ``info["quantization"]`` is ``{"weights": weights, "acts": acts,
    "path": path, "skip": list(skip)}`` (``model.replace_linears(fn, quantization=...)``); the
    input is untouched.
    """
    # Task 4.4
    # Model -> Model (W8A8 leaves)
    if acts == "static" and channel_absmax is None:
        raise ValueError("acts='static' needs channel_absmax from calibrate_channel_absmax")

    def swap(name, leaf):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in skip):
            return leaf
        x_scale = static_scale(channel_absmax[name], leaf.w.dtype) if acts == "static" else None
        return quantize_leaf(leaf, weights, acts, x_scale, path)

    return model.replace_linears(swap, quantization=dict(weights=weights, acts=acts, path=path, skip=list(skip)))
