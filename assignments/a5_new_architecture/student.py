# Your answers. GENERATED from solution.py by assignments/make_stubs.py: fill in every
# `raise NotImplementedError`, keep the signatures, and run the grader (see HANDOUT.md).
"""Assignment 5: smoothing a new architecture — the Llama block's rows (SmoothQuant Sec. 4).

Legend: C hidden, H query heads, G key/value heads (G < H: grouped-query attention, GQA),
D head dim, F MLP width; weights are ``[C_in, C_out]`` (``y = x @ w``); ``{i}`` a layer index.

A Llama block (minisq/families/llama.py has its forward; its smoothing rows are what you write):

    h = rms_norm(x) · g₁;   x = x + o_proj(attention(rope(q_proj h), rope(k_proj h), v_proj h))
    h = rms_norm(x) · g₂;   x = x + down_proj(silu(gate_proj h) · up_proj h)

A smoothing *row* says: divide the output of ``source`` by s (an RMSNorm's gain, or a linear's
output columns and bias) and multiply the rows of every linear in ``targets`` by s. It is
allowed only where that leaves the model's function unchanged: the source's output must reach
the targets through nothing but linear, per-channel operations, and *every* linear that reads
it must be a target. A row is a ``Mapping(group, source, kind, targets, why)``
(``minisq.smooth.Mapping``): ``kind`` is "rmsnorm" or "linear".

The factor rule is Eq. 4 on the targets' input channels, with one twist under GQA: o_proj
reads H·D channels, but v_proj makes only G·D; channel (h, d) of o_proj's input is kv channel
(h // (H/G), d). Dividing v_proj's output by s can only give one factor per kv channel, so the
H/G query channels that read it must share it: take the max of their ranges (activations and
weights) first, then Eq. 4, then repeat the factor for each of them.
"""

import numpy as np

from minisq import get_param, smoothing_factors, weight_absmax   # tree access, Eq. 4 (a3), max|W| per row: given
from minisq.smooth import Mapping, apply_smoothing            # the row type, and the fold (Assignment 3): given


def smoothing_rows():
    """The Llama block's smoothing rows, with ``{i}`` for the layer index.

    Returns a tuple of :class:`minisq.smooth.Mapping`, one per producer whose output can be
    divided by s: each RMSNorm (with every linear that reads it), and each linear whose
    output reaches the next linear only through operations that commute with a per-channel
    factor. ``why`` says in a sentence why the row is an equivalence.
    """
    # Task 5.1
    # () -> tuple of Mapping(group, source, kind, targets, why)
    raise NotImplementedError("Task 5.1: implement smoothing_rows (see HANDOUT.md)")


def row_factors(act_max, w_max, alpha, source_width, head_dim):
    """Eq. 4 for one row: ``[C_in]`` factors for the targets' input channels, float64.

    ``act_max``, ``w_max``: ``[C_in]`` ranges of the targets' input channels (activations, and
    max |w| per row over every target). ``source_width`` is the width of the source's output
    (C_in for a norm or an ordinary linear). When it is narrower than C_in (v_proj → o_proj
    under GQA: G·D < H·D), channel (h, d) of the targets reads source channel
    (h // (C_in / source_width), d) of head size ``head_dim``: one factor per source channel,
    from the max of the ranges of every channel that reads it, repeated for each of them.
    """
    # Task 5.2
    # [C_in] float, [C_in] float, float, int, int -> [C_in] float64
    raise NotImplementedError("Task 5.2: implement row_factors (see HANDOUT.md)")


def smooth_llama(model, stats, alpha=0.5):
    """A new Llama model with every row of :func:`smoothing_rows` applied in every layer.

    For each row (``{i}`` filled in): ``act_max = stats.channel_absmax[first target]``,
    ``w_max = weight_absmax(params, targets)``, s from **your** :func:`row_factors`, folded with
    ``apply_smoothing(params, row, s, head_dim)``. The input model is untouched.
    """
    # Task 5.3
    # Model (Llama, float), CalibrationStats, float -> Model (same function, smoothed parameters)
    raise NotImplementedError("Task 5.3: implement smooth_llama (see HANDOUT.md)")
