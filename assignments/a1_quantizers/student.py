# Your answers. GENERATED from solution.py by assignments/make_stubs.py: fill in every
# `raise NotImplementedError`, keep the signatures, and run the grader (see HANDOUT.md).
"""Assignment 1: symmetric absmax INT8 quantizers (SmoothQuant Sec. 2, Eq. 1; Fig. 3).

Legend: T tokens (rows), C_in input channels, C_out output channels; weights are stored
``[C_in, C_out]`` so that ``y = x @ w``; ``...`` any leading axes.

    Δ = max|X| / 127,      X̄ = clip(rint(X / Δ), -127, 127) as int8,      X ≈ X̄ · Δ

One scale Δ per group of values: the whole tensor (per-tensor), one row of activations
(per-token) or one output channel (column) of a weight (per-channel).

Rules every function here follows (the grader checks each one):

* Inputs are NumPy float32 or float64 arrays; the scale has x's dtype and is computed in it.
* ``q`` is a real int8 array of x's shape: divide by the scale, round half to even
  (``np.rint``), clip to [-127, 127], then cast. -128 is never produced.
* Zero-range guard: where ``max|x| / 127`` (computed in x's dtype) is below
  ``np.finfo(x.dtype).tiny``, the smallest normal float (an all-zero group, or one so tiny
  that the quotient is subnormal), the scale is 1: the codes are then 0 and dequantizing
  gives exact zeros instead of 0/0 = NaN.
* NaN or inf in x raise ``ValueError``: one NaN would poison its whole group's scale.
* Nothing is modified in place.
"""

import numpy as np

QMAX = 127  # 2^(8-1) - 1: the symmetric int8 range is [-127, 127]


def check_finite(x) -> None:
    """Raise ValueError if x holds NaN or inf (given: used by every quantizer)."""
    if not np.isfinite(x).all():
        raise ValueError(f"x holds {int((~np.isfinite(x)).sum())} NaN/inf value(s): quantization needs "
                         f"finite inputs")


def quantize_per_tensor(x):
    """One scale for the whole tensor: ``Δ = max|x| / 127``, ``q = clip(rint(x / Δ), -127, 127)``.

    Returns ``(q, scale)``: q int8 of x's shape, scale a 0-d array of x's dtype (1 where
    ``max|x| / 127 < np.finfo(x.dtype).tiny``: the zero-range guard). Raises ValueError for NaN/inf.
    """
    # Task 1.1
    # [...] float -> [...] int8, [] float
    raise NotImplementedError("Task 1.1: implement quantize_per_tensor (see HANDOUT.md)")


def quantize_per_token(x):
    """One scale per token (row): ``Δ[t] = max_c |x[t, c]| / 127``.

    The last axis is reduced with ``keepdims=True``, so the scale is ``[..., 1]`` and
    broadcasts against x. Rows whose ``max|x| / 127`` is below ``np.finfo(x.dtype).tiny`` (zero
    or subnormal) get scale 1. Raises ValueError for NaN/inf.
    """
    # Task 1.2
    # [..., C] float -> [..., C] int8, [..., 1] float
    raise NotImplementedError("Task 1.2: implement quantize_per_token (see HANDOUT.md)")


def quantize_per_channel(w):
    """One scale per output channel of a weight ``[C_in, C_out]``: ``Δ[j] = max_k |w[k, j]| / 127``.

    Output channels are columns here (``y = x @ w``), so axis 0 is reduced with keepdims and
    the scale is ``[1, C_out]``. Columns whose ``max|w| / 127`` is below ``np.finfo(w.dtype).tiny``
    (zero or subnormal) get scale 1. Raises ValueError for NaN/inf or a w that is not 2-D.
    """
    # Task 1.3
    # [C_in, C_out] float -> [C_in, C_out] int8, [1, C_out] float
    raise NotImplementedError("Task 1.3: implement quantize_per_channel (see HANDOUT.md)")


def dequantize(q, scale):
    """Back to floats: ``x̂ = q · Δ`` in the scale's dtype (q is cast first; one multiply)."""
    # Task 1.4
    # [...] int8, broadcastable float -> [...] float (the scale's dtype)
    raise NotImplementedError("Task 1.4: implement dequantize (see HANDOUT.md)")


def quantize_static(x, scale):
    """Per-tensor quantization with a given (static, calibrated) scale: ``clip(rint(x / Δ), ±127)``.

    ``scale`` is a Python float or a 0-d array; it is cast to x's dtype and returned as a 0-d
    array. Values of x beyond ±127·Δ clip to ±127 — unlike a dynamic scale, a static one does
    not adapt to x. Raises ValueError for NaN/inf in x, and unless the scale, after the cast to
    x's dtype, is finite and greater than 0 (no zero-range guard here: a given scale is used as is).
    """
    # Task 1.5
    # [...] float, [] float -> [...] int8, [] float
    raise NotImplementedError("Task 1.5: implement quantize_static (see HANDOUT.md)")
