"""Assignment 5 written from HANDOUT.md alone (see README.md here)."""

import numpy as np

from minisq import get_param, smoothing_factors, weight_absmax
from minisq.smooth import Mapping, apply_smoothing

ATTN, MLP = "layers.{i}.self_attn.", "layers.{i}.mlp."


def smoothing_rows():
    return (
        Mapping("qkv", "layers.{i}.input_layernorm", "rmsnorm", (ATTN + "q_proj", ATTN + "k_proj", ATTN + "v_proj"),
                "the norm's output is read by q, k and v"),
        Mapping("mlp_in", "layers.{i}.post_attention_layernorm", "rmsnorm", (MLP + "gate_proj", MLP + "up_proj"),
                "the norm's output is read by gate and up"),
        Mapping("up", MLP + "up_proj", "linear", (MLP + "down_proj",), "silu(g) * u is linear in u"),
        Mapping("v", ATTN + "v_proj", "linear", (ATTN + "o_proj",), "attention is a weighted average of v"),
    )


def row_factors(act_max, w_max, alpha, source_width, head_dim):
    a = np.asarray(act_max, dtype=np.float64)
    w = np.asarray(w_max, dtype=np.float64)
    n = a.size
    if source_width == n:
        return smoothing_factors(a, w, alpha)
    kv, per_kv = source_width // head_dim, n // source_width
    a_kv = a.reshape(kv, per_kv, head_dim).max(axis=1)          # [G, D]
    w_kv = w.reshape(kv, per_kv, head_dim).max(axis=1)
    s = smoothing_factors(a_kv.ravel(), w_kv.ravel(), alpha).reshape(kv, 1, head_dim)
    return np.tile(s, (1, per_kv, 1)).ravel()


def smooth_llama(model, stats, alpha=0.5):
    params = model.params
    for layer in range(model.config.num_layers):
        for r in smoothing_rows():
            source = r.source.format(i=layer)
            targets = tuple(t.format(i=layer) for t in r.targets)
            row = Mapping(r.group, source, r.kind, targets, r.why)
            act = stats.channel_absmax[targets[0]]
            width = act.shape[0] if r.kind == "rmsnorm" else get_param(params, source).w.shape[1]
            s = row_factors(act, weight_absmax(params, targets), alpha, width, model.config.head_dim)
            params = apply_smoothing(params, row, s, model.config.head_dim)
    return model.evolve(params=params)
