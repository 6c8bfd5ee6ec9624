"""BLOOM (BigScience 2022), the 176B model of the SmoothQuant paper's Table 4: everything
minisq knows about it, in one file.

Legend: B batch, T new tokens, S past + new tokens, C hidden, H heads, D = C / H head dim,
F = 4C MLP width, V vocab.

Pre-LN blocks like GPT-2's, with three differences:

* a LayerNorm right after the token embedding (``word_embeddings_layernorm``), and no
  position table: position enters as **ALiBi**, a per-head bias on the attention scores
  that grows linearly with the key's position, ``scores[h, t, s] += m_h · s``
  (Press et al. 2022; shifting every key of a row by the same amount leaves the softmax
  unchanged, so ``m_h · s`` acts as ``-m_h · (t - s)``);
* one fused ``query_key_value`` ``[C, 3C]`` whose outputs are interleaved **per head**:
  ``[H, 3, D]`` (head 0's q, k, v, then head 1's, ...), not GPT-2's ``[3, H, D]``;
* GELU written with the truncated constant 0.79788456 for sqrt(2/π) (Megatron's kernel).

The lm_head is tied to the embedding. The checkpoint's ``nn.Linear`` layers store
``[C_out, C_in]`` and are transposed at load.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import nn
from ..backend import get_array_module
from ..kernels import cpu as kernels
from ..config import ModelConfig, read_field, validate
from ..errors import ConfigError
from .base import Mapping, SpecialTokens, make_lm_head, self_attention, strip_prefix, Taker

MODEL_TYPES = ("bloom",)
EMBEDDING = "word_embeddings"   # the token embedding [V, C] in the parameter tree
LAYER_PREFIX = "h.{i}"          # dotted name of layer i

# Where the SmoothQuant paper publishes BLOOM-176B's numbers, for `reproduce` to print beside
# minisq's own. The values themselves are not copied here: no copy of the paper was at hand to
# check them against, and a wrong published number is worse than none.
PAPER_BLOOM_176B = {
    "source": "Xiao et al., SmoothQuant, ICML 2023 (arXiv:2211.10438), Table 4, column BLOOM-176B",
    "metric": "average zero-shot accuracy (%): FP16, W8A8, ZeroQuant, LLM.int8(), Outlier Suppression, "
              "SmoothQuant-O1/O2/O3",
    "values": {},   # method -> accuracy, to be filled from the paper itself
}


# --- config.json ----------------------------------------------------------------------------

def config_from_hf(raw: dict, source: str) -> ModelConfig:
    """A BLOOM config.json (``n_head``/``n_layer``, ``hidden_size`` or the older ``n_embed``)."""
    if raw.get("apply_residual_connection_post_layernorm"):
        raise ConfigError(f"{source}: apply_residual_connection_post_layernorm=True is not supported "
                          "(the residual would be the LayerNorm's output, which smoothing divides by s)")
    if read_field(raw, "pretraining_tp", 1) > 1 and raw.get("slow_but_exact"):
        raise ConfigError(f"{source}: slow_but_exact=True with pretraining_tp>1 (sliced linears) is not supported")
    C = read_field(raw, "hidden_size", raw.get("n_embed"))
    if C is None:
        raise ConfigError(f"{source}: config.json has neither 'hidden_size' nor 'n_embed'")
    cfg = ModelConfig(
        model_type="bloom",
        vocab_size=read_field(raw, "vocab_size", required=True, source=source),
        hidden_size=C,
        num_layers=read_field(raw, "n_layer", raw.get("num_hidden_layers")),
        num_heads=read_field(raw, "n_head", raw.get("num_attention_heads")),
        ffn_dim=4 * C,
        # ALiBi has no position table; BLOOM was trained on 2048-token sequences
        max_positions=read_field(raw, "seq_length", 2048),
        layer_norm_eps=float(read_field(raw, "layer_norm_epsilon", 1e-5)),
        activation="gelu_bloom",
        alibi=True,
        bos_token_id=read_field(raw, "bos_token_id", 1),
        eos_token_id=read_field(raw, "eos_token_id", 2),
        pad_token_id=read_field(raw, "pad_token_id", 3),
        name=raw.get("_name_or_path", "") or "",
    )
    return validate(cfg, source)


def config_to_hf(cfg: ModelConfig) -> dict:
    """The config.json that :func:`config_from_hf` reads back as ``cfg`` (for writing checkpoints)."""
    return dict(model_type="bloom", architectures=["BloomForCausalLM"], vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                seq_length=cfg.max_positions, layer_norm_epsilon=cfg.layer_norm_eps,
                bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                _name_or_path=cfg.name)


# --- checkpoint names -> parameter tree --------------------------------------------------------

def params_from_state_dict(cfg: ModelConfig, state: dict, dtype, source: str) -> dict:
    """The parameter tree from an HF BLOOM state dict (``transformer.`` prefix optional)."""
    take = Taker(strip_prefix(state, ("transformer.",)), dtype, source)
    C, F, V = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size
    lin = lambda key, c_in, c_out: take.linear(key, c_in, c_out, transpose=True)  # noqa: E731  [out, in] on disk
    embed = take("word_embeddings.weight", (V, C))
    params = {
        "word_embeddings": embed,                                                    # [V, C]
        "word_embeddings_layernorm": take.norm("word_embeddings_layernorm", C),
        "h": [
            {
                "input_layernorm": take.norm(f"h.{i}.input_layernorm", C),
                "self_attention": {
                    "query_key_value": lin(f"h.{i}.self_attention.query_key_value", C, 3 * C),  # [H, 3, D] outputs
                    "dense": lin(f"h.{i}.self_attention.dense", C, C),
                },
                "post_attention_layernorm": take.norm(f"h.{i}.post_attention_layernorm", C),
                "mlp": {
                    "dense_h_to_4h": lin(f"h.{i}.mlp.dense_h_to_4h", C, F),
                    "dense_4h_to_h": lin(f"h.{i}.mlp.dense_4h_to_h", F, C),
                },
            }
            for i in range(cfg.num_layers)
        ],
        "ln_f": take.norm("ln_f", C),
    }
    params["lm_head"] = make_lm_head(take, "lm_head.weight", embed, V, C)
    return params


# --- the building blocks: ALiBi and BLOOM's GELU ---------------------------------------------

def alibi_slopes(H: int) -> np.ndarray:
    """The per-head slopes m_h: [H] float32, computed as transformers computes them.

    For H a power of two, m_h = b^(h+1) with b = 2^(-8/H) (a geometric sequence from 2^(-8/H)
    down to 2^-8). Otherwise the first n = 2^⌊log2 H⌋ heads take the slopes of n heads, and
    the other H - n heads take every other slope of 2n heads (the odd powers of 2^(-8/2n)).
    In float32, as transformers does, so that the biases are bit for bit the checkpoint's.
    """
    n = 2 ** math.floor(math.log2(H))
    base = np.float32(2 ** (-(2 ** -(math.log2(n) - 3))))
    slopes = base ** np.arange(1, n + 1, dtype=np.float32)
    if n != H:
        extra = np.float32(2 ** (-(2 ** -(math.log2(2 * n) - 3))))
        slopes = np.concatenate([slopes, extra ** np.arange(1, 1 + 2 * min(n, H - n), 2, dtype=np.float32)])
    return slopes.astype(np.float32)


def alibi_bias(mask, H: int, dtype):
    # [B, S] real-token mask -> [B, H, 1, S]: m_h · (position of key s), positions counting real
    # tokens only (so left padding does not shift them); float32 products as in transformers
    xp = get_array_module(mask)
    positions = ((xp.cumsum(mask, axis=1) - 1) * mask).astype(xp.float32)        # [B, S]
    slopes = xp.asarray(alibi_slopes(H))                                           # [H]
    return (slopes[None, :, None, None] * positions[:, None, None, :]).astype(dtype)


def gelu_bloom(x):
    # [...] -> [...]: x · 0.5 · (1 + tanh(0.79788456 · x · (1 + 0.044715 x²))), BLOOM's own constant
    xp = get_array_module(x)
    t = x.dtype.type
    return x * t(0.5) * (t(1.0) + xp.tanh(t(0.79788456) * x * (t(1.0) + t(0.044715) * x * x)))


# --- the forward pass, in pieces a layer-outer driver can call ----------------------------------

def embed(model, ids, positions, m):
    # [B, T] ids -> [B, T, C]: the token embedding, then its LayerNorm (no positions: ALiBi)
    p, eps = model.params, model.config.layer_norm_eps
    return kernels.layer_norm(p["word_embeddings"][ids], **p["word_embeddings_layernorm"], eps=eps)


def layers(params) -> list:
    """The per-layer parameter dicts; layer i's dotted prefix is ``LAYER_PREFIX.format(i=i)``."""
    return params["h"]


def attention_bias(config: ModelConfig, mask, T: int, dtype):
    """[B, S] mask -> [B, H, T, S]: ALiBi's per-head bias where a query may look (causal, real
    keys), a large negative elsewhere. Every block adds it to its scaled scores."""
    xp = get_array_module(mask)
    allowed = nn.attention_bias(mask, T, dtype) == 0                               # [B, 1, T, S]
    return xp.where(allowed, alibi_bias(mask, config.num_heads, dtype), xp.finfo(dtype).min).astype(dtype)


def split_qkv(qkv, H: int):
    # [B, T, 3C] interleaved per head ([H, 3, D]) -> q, k, v [B, T, C] each (fresh arrays)
    B, T, _ = qkv.shape
    per_head = qkv.reshape(B, T, H, 3, -1)
    return tuple(per_head[:, :, :, j].reshape(B, T, -1) for j in range(3))


def block(model, i, layer, x, bias, m, cache, positions=None):
    # [B, T, C], [B, H, T, S] bias (ALiBi + mask), [B, T] real-token mask m -> [B, T, C]
    cfg = model.config
    eps, attn, mlp = cfg.layer_norm_eps, layer["self_attention"], layer["mlp"]
    h = kernels.layer_norm(x, **layer["input_layernorm"], eps=eps)
    q, k, v = split_qkv(attn["query_key_value"](h, m), cfg.num_heads)
    x = x + attn["dense"](self_attention(model, q, k, v, cache, i, bias, cfg.head_dim ** -0.5, m), m)
    h = kernels.layer_norm(x, **layer["post_attention_layernorm"], eps=eps)
    return x + mlp["dense_4h_to_h"](gelu_bloom(mlp["dense_h_to_4h"](h, m)), m)    # [B, T, F] inside


def head(model, x, m):
    # [B, T, C], [B, T] -> [B, T, V] logits
    p = model.params
    return p["lm_head"](kernels.layer_norm(x, **p["ln_f"], eps=model.config.layer_norm_eps), m)


# --- smoothing: what may be folded into what ------------------------------------------------------

SMOOTHING = (
    Mapping("ln_qkv", "h.{i}.input_layernorm", "layernorm", ("h.{i}.self_attention.query_key_value",),
            "input_layernorm feeds only the fused query_key_value: one s for q, k and v (official)"),
    Mapping("ln_fc1", "h.{i}.post_attention_layernorm", "layernorm", ("h.{i}.mlp.dense_h_to_4h",),
            "post_attention_layernorm feeds only dense_h_to_4h (official)"),
)

NOT_FOLDABLE = {
    "h.{i}.mlp.dense_h_to_4h -> h.{i}.mlp.dense_4h_to_h":
        "GELU(x/s) != GELU(x)/s: GELU is not positively homogeneous",
    "h.{i}.self_attention.query_key_value (v part) -> h.{i}.self_attention.dense":
        "v is a third of the fused, per-head interleaved query_key_value: a row divides all of a source's "
        "outputs, and dividing q and k too would change the attention scores",
    "h.{i}.word_embeddings_layernorm":
        "it feeds the residual stream, not a linear",
}

DEFAULT_GROUPS = ("ln_qkv", "ln_fc1")  # what the official SmoothQuant code smooths for BLOOM


def foldable(config, chosen: list) -> list:
    """The chosen mappings that are equivalences for this config (all of them)."""
    return chosen


def default_groups(config) -> tuple:
    """The groups the demo smooths: the official code's."""
    return DEFAULT_GROUPS


# --- attention's q, k, v: query_key_value's whole output, cut per head by attention_input_absmax -----

QKV_OUTPUTS = (("h.{i}.self_attention.query_key_value", 0, 1),) * 3


def attention_input_absmax(config: ModelConfig, which: int, channel_absmax) -> float:
    """The static range of q (0), k (1) or v (2) from query_key_value's per-channel output
    ranges ``[3C]``, which are interleaved per head ``[H, 3, D]``."""
    a = np.asarray(channel_absmax, np.float64).reshape(config.num_heads, 3, config.head_dim)
    return float(a[:, which].max())


# --- tokenizer: bigscience/bloom's tokenizer_config.json defaults ----------------------------------

SPECIAL_TOKENS = SpecialTokens(bos="<s>", eos="</s>", pad="<pad>", add_bos=False)


# --- the synthetic-outlier recipe (see minisq.synthetic) ---------------------------------------------

def synthetic_config(cfg: ModelConfig) -> ModelConfig:
    """A BLOOM-shaped synthetic config: F = 4C, ALiBi, tied embeddings."""
    return dataclasses.replace(cfg, ffn_dim=4 * cfg.hidden_size, activation="gelu_bloom", alibi=True,
                               tie_word_embeddings=True)


def synthetic_state_dict(cfg: ModelConfig, normal, gain, bias, final_gain) -> dict:
    """An HF-named state dict drawn with the generic helpers of :mod:`minisq.synthetic`:
    both block LayerNorm gains of every layer from ``gain()`` (planted outliers), the last from
    ``final_gain()``; the embedding LayerNorm plain."""
    C, F, V = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size
    sd = {"word_embeddings.weight": normal(V, C),
          "word_embeddings_layernorm.weight": 1.0 + normal(C, std=0.1), "word_embeddings_layernorm.bias": bias(C)}
    for i in range(cfg.num_layers):
        p = f"h.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = gain(), bias(C)
        for name, (c_out, c_in) in (("self_attention.query_key_value", (3 * C, C)), ("self_attention.dense", (C, C)),
                                    ("mlp.dense_h_to_4h", (F, C)), ("mlp.dense_4h_to_h", (C, F))):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = normal(c_out, c_in), bias(c_out)
    sd["ln_f.weight"], sd["ln_f.bias"] = final_gain(), bias(C)
    return sd
