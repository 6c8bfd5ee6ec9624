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
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = np.asarray(act_max, dtype=np.float64)
    w = np.asarray(w_max, dtype=np.float64)
    if a.ndim != 1 or a.shape != w.shape:
        raise ValueError(f"act_max {a.shape} and w_max {w.shape} must both be [C]")
    if not (np.isfinite(a).all() and np.isfinite(w).all()):
        raise ValueError("act_max or w_max holds NaN/inf")
    s = a ** alpha / np.maximum(w, 1e-5) ** (1.0 - alpha)
    s = np.maximum(s, 1e-5)
    return np.where(a > 0, s, 1.0)                                 # silent channels: s = 1


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
    dtype = targets[0].w.dtype
    s = np.asarray(s, dtype=dtype)                                 # [C]
    C = s.shape[0]
    g = ln["g"] if ln["g"] is not None else np.ones(C, dtype)
    b = ln["b"] if ln["b"] is not None else np.zeros(C, dtype)
    new_ln = {"g": g / s, "b": b / s}                              # the LayerNorm now outputs X / s
    new_targets = [Linear(t.w * s[:, None], t.b) for t in targets]  # and the weights take the s
    return new_ln, new_targets


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
    params = model.params
    for m in mappings_for(model.config):
        if m.kind != "layernorm":
            continue
        leaves = [get_node(params, t) for t in m.targets]
        w_max = np.max([np.abs(leaf.w).max(axis=1) for leaf in leaves], axis=0)   # [C]
        s = smoothing_factors(stats.channel_absmax[m.targets[0]], w_max, alpha)
        new_ln, new_leaves = fold_smoothing(get_node(params, m.source), leaves, s)
        params = set_node(params, m.source, new_ln)
        for name, leaf in zip(m.targets, new_leaves):
            params = set_node(params, name, leaf)
    return model.evolve(params=params)
