"""llm-compressor's SmoothQuant, as data and one formula beside the paper's.

Legend: C_in the input width of the smoothed (balance) linears, one factor s_j per channel j.

llm-compressor (``SmoothQuantModifier(smoothing_strength=α)``, read from llmcompressor
0.14.0.1, ``modifiers/transform/smoothquant/base.py`` and ``utils.py``) folds the same
``Y = (X diag(s)^-1)(diag(s) W)`` as the paper, with other definitions:

=====================  =======================================  ==========================================
                       SmoothQuant (paper, official code)       llm-compressor
=====================  =======================================  ==========================================
activation statistic   ``max|X_j|`` over calibration tokens     ``max X_j − min X_j`` of the smooth layer's
                                                                output (the balance layers' input)
weight statistic       ``max|W_j|`` over the targets' outputs,  ``2 · max|W_j|`` over the balance layers'
                       clamped at 1e-5                          outputs, unclamped
factor                 ``a^α / w^(1−α)``, 1 where a = 0         ``a^α / w^(1−α)``, ``a`` where w = 0
floor                  s ≥ 1e-5                                 s ≥ 1e-5 (so a = 0 gives 1e-5, not 1)
=====================  =======================================  ==========================================

The two activation statistics differ when a channel is pushed to one side: a channel whose
values lie in [20, 24] has max|X| = 24 but max − min = 4. For a channel symmetric about 0,
max − min = 2·max|X|, which the factor 2 on the weight side balances at α = 0.5.

Mappings (each family's ``LLMCOMPRESSOR_GROUPS``): llm-compressor's registry gives Llama, Mistral and Qwen2
``input_layernorm → q, k, v`` and ``post_attention_layernorm → gate, up`` (its
``DEFAULT_SMOOTHQUANT_MAPPINGS``), minisq's groups ``ln_qkv`` and ``ln_fc1``. OPT has no entry
in the registry, and the default's Llama names match no OPT module, so llm-compressor smooths
nothing there unless given mappings; minisq uses the ones its ``SmoothQuantModifier``
docstring gives for OPT (``self_attn_layer_norm → q, k, v``, ``final_layer_norm → fc1``), the
same two groups. Families without ``LLMCOMPRESSOR_GROUPS`` (its MoE and other entries have not
been checked against minisq's rows) are refused.
"""

from __future__ import annotations

import numpy as np

from .errors import CalibrationError, ConfigError
from .families import family_for

MINIMUM_SMOOTHING_SCALE = 1e-5   # llm-compressor's floor on s

def llmcompressor_groups(config) -> tuple:
    """The smoothing groups llm-compressor's mappings amount to for this model (its family's
    ``LLMCOMPRESSOR_GROUPS``)."""
    groups = getattr(family_for(config), "LLMCOMPRESSOR_GROUPS", None)
    if groups is None:
        raise ConfigError(f"no llm-compressor mappings for {config.model_type!r} in minisq (they are known for "
                          "the OPT and Llama families)")
    return groups


def activation_range(stats, name: str):
    """``max X_j − min X_j`` ``[C_in]`` of leaf ``name``'s input, from calibration's signed extremes."""
    if name not in stats.channel_min or name not in stats.channel_max:
        raise CalibrationError(f"these stats have no per-channel min/max for {name!r} (calibrated by an older "
                               "minisq?): recalibrate with minisq.calibrate for convention='llm-compressor'")
    return np.asarray(stats.channel_max[name], np.float64) - np.asarray(stats.channel_min[name], np.float64)


def llmcompressor_factors(act_range, w_absmax, alpha: float):
    """llm-compressor's ``_calculate_smoothing_scales`` and floor, for one mapping:

        w_j = 2 · max|W_j|,   s_j = a_j^α / w_j^(1−α)  (a_j where w_j = 0),   s_j ← max(s_j, 1e-5)

    ``act_range`` ``[C_in]`` is ``max − min`` per channel, ``w_absmax`` ``[C_in]`` the max |W|
    per input channel over all balance layers. Computed in float64.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    a = np.asarray(act_range, np.float64)
    w = 2.0 * np.asarray(w_absmax, np.float64)
    if a.shape != w.shape or a.ndim != 1:
        raise ConfigError(f"act_range {a.shape} and w_absmax {w.shape} must both be [C_in]")
    if not (np.isfinite(a).all() and np.isfinite(w).all()):
        raise CalibrationError("activation or weight ranges hold NaN/inf; recalibrate in float32")
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(w > 0, a ** alpha / w ** (1.0 - alpha), a)
    return np.maximum(s, MINIMUM_SMOOTHING_SCALE)
