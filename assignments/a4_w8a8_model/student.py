# Your answers. GENERATED from solution.py by assignments/make_stubs.py: fill in every
# `raise NotImplementedError`, keep the signatures, and run the grader (see HANDOUT.md).
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
    raise NotImplementedError("Task 4.1: implement calibrate_channel_absmax (see HANDOUT.md)")


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
    raise NotImplementedError("Task 4.2: implement static_scale (see HANDOUT.md)")


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
        raise NotImplementedError("Task 4.3: implement QLinear.__call__ (see HANDOUT.md)")


def quantize_leaf(leaf, weights="per_channel", acts="per_token", x_scale=None, path="int"):
    """A :class:`QLinear` from a float leaf (``leaf.w`` ``[C_in, C_out]``, ``leaf.b``).

    ``weights`` picks the weight quantizer (:data:`WEIGHT_QUANTIZERS`); ``acts="static"``
    needs ``x_scale`` (from :func:`static_scale`). ValueError for unknown choices or a
    missing static scale.
    """
    # Task 4.3
    # Linear [C_in, C_out] -> QLinear
    raise NotImplementedError("Task 4.3: implement quantize_leaf (see HANDOUT.md)")


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
    raise NotImplementedError("Task 4.4: implement quantize_model (see HANDOUT.md)")
