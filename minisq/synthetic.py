"""A labeled SYNTHETIC model with LLM-like activation outliers, for offline teaching and tests.

Real LLMs (OPT ≥ 6.7B, GPT-2, BLOOM, ...) have a few hidden channels whose activations are
10-100x larger than the rest in *every* token; SmoothQuant (Section 3) traces them to the
LayerNorm gains that feed the qkv and fc1 projections. This module builds a random-weight
model of any shape and family and plants exactly that mechanism: every LayerNorm gain has the
same few channels multiplied by a large factor, so those channels dominate the inputs of
qkv and fc1 in every token, and per-tensor INT8 activations lose the other channels.

The weights are random: the model's text is gibberish and its perplexity meaningless. It is
labeled "synthetic" in its name, its config and every printout.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .config import ModelConfig
from .families import family_for, params_from_state_dict
from .model import Model

SYNTHETIC_LABEL = "SYNTHETIC random-weight model with planted outlier channels"

LOGIT_STD = 4.0  # spread of the synthetic model's logits (see synthetic_state_dict)

# GPT-2 small's shapes, the default of `minisq.load("synthetic")` and the demo.
GPT2_SMALL = ModelConfig()


def outlier_channels(C: int, n_outliers: int, seed: int) -> np.ndarray:
    """The planted outlier channel indices (the same in every layer, as in real models)."""
    return np.sort(np.random.default_rng(seed + 7).choice(C, size=n_outliers, replace=False))


def synthetic_state_dict(cfg: ModelConfig, n_outliers: int = 4, outlier_scale: float = 40.0,
                         seed: int = 0) -> dict:
    """An HF-named float32 state dict of random weights (std 0.02, as GPT-2's init) whose
    LayerNorm gains carry ``n_outliers`` channels scaled by ``outlier_scale``. The draws
    below are generic; which tensors exist is the family's recipe (``synthetic_state_dict``
    in its :mod:`minisq.families` module)."""
    rng = np.random.default_rng(seed)
    C, E = cfg.hidden_size, cfg.embed_dim
    hot = outlier_channels(C, n_outliers, seed)
    signs = np.where(rng.random(n_outliers) < 0.5, -1.0, 1.0)

    def normal(*shape, std=0.02):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def gain():
        g = (1.0 + 0.1 * rng.standard_normal(C)).astype(np.float32)
        g[hot] *= outlier_scale * signs
        return g

    def bias(n):
        return normal(n, std=0.02)

    def final_gain():
        # Random weights give near-uniform next-token distributions (ppl ~ V), which no
        # quantization error can move. The last LayerNorm's gain sets the logits' std to
        # about LOGIT_STD (= gain · 0.02 · sqrt(E) with the tied std-0.02 embedding), so the
        # distributions are peaked and quantization noise shows in perplexity and KL.
        return ((LOGIT_STD / (0.02 * np.sqrt(E))) * (1.0 + 0.1 * rng.standard_normal(C))).astype(np.float32)

    return family_for(cfg).synthetic_state_dict(cfg, normal, gain, bias, final_gain)


def synthetic_model(config: ModelConfig | None = None, n_outliers: int = 4, outlier_scale: float = 40.0,
                    seed: int = 0, dtype="float32", tokenizer=None) -> Model:
    """A random-weight model of ``config``'s shape (default: GPT-2 small) with planted
    outlier channels. Labeled synthetic in its name and ``info``."""
    base = config or GPT2_SMALL
    base = family_for(base).synthetic_config(base)  # e.g. OPT: outliers are planted in pre-LN gains
    name = (f"synthetic-outliers-{base.model_type}-L{base.num_layers}-C{base.hidden_size}"
            f"-{n_outliers}x{outlier_scale:g}")
    cfg = dataclasses.replace(base, name=name)
    sd = synthetic_state_dict(cfg, n_outliers, outlier_scale, seed)
    params = params_from_state_dict(cfg, sd, np.dtype(dtype), source=name)
    info = {"synthetic": SYNTHETIC_LABEL, "outlier_channels": outlier_channels(cfg.hidden_size, n_outliers, seed).tolist()}
    return Model(cfg, params, tokenizer=tokenizer, info=info)
