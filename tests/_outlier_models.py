"""Tiny random OPT and Llama models (transformers, float32) with planted outlier channels,
shared by the compressed-tensors and llm-compressor convention tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers

V = 101
TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, tie_word_embeddings=False)
TINY_OPT = dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                vocab_size=V, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2)
OUTLIERS = (3, 17)   # hidden channels whose norm gains are planted ×25


def outlier_model(family: str, seed: int = 0):
    """A random transformers model (float32, eval) with every 1-D parameter perturbed and
    planted outlier channels in every norm gain before a linear."""
    torch.manual_seed(seed)
    if family == "opt":
        model = transformers.OPTForCausalLM(transformers.OPTConfig(**TINY_OPT))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA, attn_implementation="eager"))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                is_gain = ("norm" in name or "layer_norm" in name) and name.endswith("weight")
                p.copy_((1.0 if is_gain else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
                if is_gain and "layers" in name:
                    p[list(OUTLIERS)] *= 25.0
    return model.eval()


def ids_of(seed, shape=(1, 12)):
    return np.random.default_rng(seed).integers(3, V, shape)


CALIB = [ids_of(s, (1, 16)) for s in range(4)]
