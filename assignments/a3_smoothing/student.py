# Your answers. GENERATED from solution.py by assignments/make_stubs.py: fill in every
# `raise NotImplementedError`, keep the signatures, and run the grader (see HANDOUT.md).
"""Assignment 3: smoothing — migrate activation outliers into the weights (SmoothQuant Sec. 4).

Legend: C the width of a LayerNorm's output = the input width C_in of the linears it feeds,
one smoothing factor s_j per channel j; weights are ``[C_in, C_out]`` (``y = x @ w``).

    Y = (X diag(s)^-1) (diag(s) W),        s_j = max|X_j|^α / max|W_j|^(1-α)        (Eq. 3-4)

Dividing X by s is never a separate operation: X comes out of a LayerNorm,
``X = g ⊙ norm(h) + b``, so dividing g and b by s gives X / s for free; multiplying the rows
(input channels) of every linear that reads X by s undoes it. In real arithmetic the model
computes the same function; in float64 it does to ~1e-15, which is how we check it.
"""

import numpy as np

from minisq.nn import Linear
from minisq.model import get_param as get_node, replace_param as set_node  # tree access: given
from minisq import mappings_for


def smoothing_factors(act_max, w_max, alpha):
    """``s_j = max|X_j|^α / max|W_j|^(1-α)`` per channel, in float64 (paper Eq. 4).

    ``act_max[j]`` is the calibrated max |x| of channel j, ``w_max[j]`` the max |w| of row j over
    every linear that reads the channel. As in the paper's code, ``w_max`` is clamped to at
    least 1e-5 before the power and s to at least 1e-5 after; a channel whose ``act_max`` is 0
    (it never fires) gets s = 1. ValueError for α outside [0, 1], shapes that are not the same
    ``[C]``, or NaN/inf ranges.
    """
    # Task 3.1
    # [C] float, [C] float, float -> [C] float64
    raise NotImplementedError("Task 3.1: implement smoothing_factors (see HANDOUT.md)")


def fold_smoothing(ln, targets, s):
    """Fold s into a LayerNorm and the linears that read its output; returns new objects.

    ``ln`` is ``{"g": [C] | None, "b": [C] | None}`` (None: no affine parameter, i.e. ones /
    zeros); ``targets`` a list of :class:`minisq.nn.Linear` with weights ``[C, C_out_i]``.
    Returns ``(new_ln, new_targets)``: ``{"g": g / s, "b": b / s}`` and, for every target,
    ``Linear(w * s[:, None], b)`` (rows = input channels times s; the linear's bias is added
    after ``x @ w`` and stays). s is cast to the parameters' dtype first, so a float32 model
    stays float32. Nothing is modified in place.
    """
    # Task 3.2
    # {"g": [C], "b": [C]}, [Linear [C, C_out_i]], [C] -> {"g": [C], "b": [C]}, [Linear [C, C_out_i]]
    raise NotImplementedError("Task 3.2: implement fold_smoothing (see HANDOUT.md)")


def smooth_model(model, stats, alpha=0.5):
    """A new model with every LayerNorm → linears group of ``minisq.SMOOTHING_TABLE`` smoothed.

    For each such mapping (``mappings_for(model.config)``: ln_1 → c_attn and ln_2 → c_fc in
    GPT-2; self_attn_layer_norm → q, k, v and final_layer_norm → fc1 in OPT): s from
    :func:`smoothing_factors` with the targets' input range ``stats.channel_absmax[target]``
    and ``w_max`` = max |w| per row over *all* targets, folded with :func:`fold_smoothing`.
    ``stats`` come from ``minisq.calibrate(model, ...)``. The input model is untouched.
    """
    # Task 3.3
    # Model, CalibrationStats, float -> Model (same function, smoothed parameters)
    raise NotImplementedError("Task 3.3: implement smooth_model (see HANDOUT.md)")
