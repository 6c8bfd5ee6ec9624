"""Falcon (TII 2023), both layouts, and its older ``RefinedWeb`` / ``RefinedWebModel``
config names: everything minisq knows about it, in one file.

Legend: B batch, T new tokens, S past + new tokens, C hidden, H query heads, G key/value
heads, D = C / H head dim, F MLP width, V vocab.

Every layout has RoPE on q and k, one fused ``query_key_value`` whose outputs are grouped
per key/value head ``[G, H/G + 2, D]`` (each group's H/G query heads, then its k, then its
v), an exact-GELU MLP, no biases (``bias: false``) and a tied lm_head. The layouts differ
in how the attention and the MLP read the residual stream:

* **Falcon-7B** (``parallel_attn``, ``multi_query``: G = 1): one ``input_layernorm`` feeds
  both branches, ``x + (mlp(h) + attention(h))`` with ``h = input_layernorm(x)``;
* **Falcon-40B/180B** (``new_decoder_architecture``, the old ``RefinedWeb``): two norms,
  ``x + (mlp(ln_mlp(x)) + attention(ln_attn(x)))``, and G grouped kv heads;
* sequential (``parallel_attn: false``): ``input_layernorm`` → attention, then
  ``post_attention_layernorm`` → MLP, as GPT-2.

The grouping ``[G, H/G + 2, D]`` covers the three checkpoints' q/k/v orders at once:
multi-query is G = 1 (``[H + 2, D]``), the old non-multi-query one G = H (``[H, 3, D]``).
The checkpoint's ``nn.Linear`` layers store ``[C_out, C_in]`` and are transposed at load.
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
from . import llama
from .base import Mapping, SpecialTokens, make_lm_head, self_attention, strip_prefix, Taker

MODEL_TYPES = ("falcon", "RefinedWeb", "RefinedWebModel")
EMBEDDING = "word_embeddings"   # the token embedding [V, C] in the parameter tree
LAYER_PREFIX = "h.{i}"          # dotted name of layer i


# --- config.json ----------------------------------------------------------------------------

def config_from_hf(raw: dict, source: str) -> ModelConfig:
    """A Falcon config.json, or an older RefinedWeb (40B layout) / RefinedWebModel (7B) one."""
    model_type = raw["model_type"]
    if raw.get("alibi"):
        raise ConfigError(f"{source}: alibi=True is not supported for Falcon (no released Falcon uses it; "
                          "minisq's Falcon has rotary embeddings only)")
    act = read_field(raw, "activation", "gelu")
    if act != "gelu":
        raise ConfigError(f"{source}: activation {act!r} is not supported; Falcon here uses exact 'gelu'")
    new_arch = bool(read_field(raw, "new_decoder_architecture", model_type == "RefinedWeb"))
    parallel = bool(read_field(raw, "parallel_attn", True))
    if new_arch and not parallel:
        raise ConfigError(f"{source}: new_decoder_architecture=True needs parallel_attn=True")
    if new_arch and read_field(raw, "num_ln_in_parallel_attn", 2) != 2:
        raise ConfigError(f"{source}: num_ln_in_parallel_attn={raw['num_ln_in_parallel_attn']} (one norm in the "
                          "new decoder architecture, Falcon2-11B) is not supported; minisq implements 2")
    C = read_field(raw, "hidden_size", raw.get("n_embed"))
    H = read_field(raw, "num_attention_heads", raw.get("n_head"))
    L = read_field(raw, "num_hidden_layers", raw.get("n_layer"))
    for key, value in (("hidden_size", C), ("num_attention_heads", H), ("num_hidden_layers", L)):
        if value is None:
            raise ConfigError(f"{source}: config.json has no {key!r}, which a {model_type} model needs")
    kv = read_field(raw, "num_kv_heads", raw.get("n_head_kv"))
    if new_arch:
        G = kv or H
    else:   # the 7B layout: one kv head when multi_query, else one per query head
        G = 1 if read_field(raw, "multi_query", True) else H
    rope = llama.read_rope(raw, source)
    P = read_field(raw, "max_position_embeddings", 2048)
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=read_field(raw, "vocab_size", required=True, source=source),
        hidden_size=C,
        num_layers=L,
        num_heads=H,
        ffn_dim=read_field(raw, "ffn_hidden_size", 4 * C),
        max_positions=int(P * rope["factor"]) if rope["rope_type"] == "dynamic" else P,
        layer_norm_eps=float(read_field(raw, "layer_norm_epsilon", 1e-5)),
        activation="gelu",
        enable_bias=bool(read_field(raw, "bias", False)),
        num_kv_heads=G,
        rope=rope,
        parallel_attn=parallel,
        new_decoder_architecture=new_arch,
        tie_word_embeddings=bool(read_field(raw, "tie_word_embeddings", True)),
        bos_token_id=read_field(raw, "bos_token_id", 11),
        eos_token_id=read_field(raw, "eos_token_id", 11),
        pad_token_id=read_field(raw, "pad_token_id"),
        name=raw.get("_name_or_path", "") or "",
    )
    cfg = validate(cfg, source)
    if not (isinstance(G, int) and 0 < G <= H and H % G == 0):
        raise ConfigError(f"{source}: {H} query heads cannot share {G} key/value heads evenly (num_kv_heads "
                          "must divide num_attention_heads)")
    if cfg.head_dim % 2:
        raise ConfigError(f"{source}: head_dim {cfg.head_dim} is odd; rotary embeddings rotate pairs of channels")
    return cfg


def config_to_hf(cfg: ModelConfig) -> dict:
    """The config.json that :func:`config_from_hf` reads back as ``cfg`` (for writing checkpoints)."""
    return dict(model_type="falcon", architectures=["FalconForCausalLM"], vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_kv_heads=cfg.kv_heads, multi_query=cfg.kv_heads == 1, parallel_attn=cfg.parallel_attn,
                new_decoder_architecture=cfg.new_decoder_architecture, ffn_hidden_size=cfg.ffn_dim,
                bias=cfg.enable_bias, alibi=False, max_position_embeddings=cfg.max_positions,
                layer_norm_epsilon=cfg.layer_norm_eps, rope_theta=cfg.rope["rope_theta"],
                tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
                eos_token_id=cfg.eos_token_id, _name_or_path=cfg.name)


def layout(cfg: ModelConfig) -> str:
    """"two_norms" (40B/180B), "parallel" (7B) or "sequential": which norms feed which branch."""
    if cfg.new_decoder_architecture:
        return "two_norms"
    return "parallel" if cfg.parallel_attn else "sequential"


NORMS = {"two_norms": ("ln_attn", "ln_mlp"), "parallel": ("input_layernorm",),
         "sequential": ("input_layernorm", "post_attention_layernorm")}


# --- checkpoint names -> parameter tree --------------------------------------------------------

def params_from_state_dict(cfg: ModelConfig, state: dict, dtype, source: str) -> dict:
    """The parameter tree from an HF Falcon / RefinedWeb state dict (``transformer.`` prefix optional)."""
    take = Taker(strip_prefix(state, ("transformer.",)), dtype, source)
    C, F, V, D = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    H, G, bias = cfg.num_heads, cfg.kv_heads, cfg.enable_bias
    lin = lambda key, c_in, c_out: take.linear(key, c_in, c_out, bias=bias, transpose=True)  # noqa: E731
    embed = take("word_embeddings.weight", (V, C))
    params = {
        "word_embeddings": embed,                                                     # [V, C]
        "h": [
            {
                **{ln: take.norm(f"h.{i}.{ln}", C) for ln in NORMS[layout(cfg)]},
                "self_attention": {
                    "query_key_value": lin(f"h.{i}.self_attention.query_key_value", C, (H + 2 * G) * D),
                    "dense": lin(f"h.{i}.self_attention.dense", H * D, C),
                },
                "mlp": {
                    "dense_h_to_4h": lin(f"h.{i}.mlp.dense_h_to_4h", C, F),
                    "dense_4h_to_h": lin(f"h.{i}.mlp.dense_4h_to_h", F, C),
                },
            }
            for i in range(cfg.num_layers)
        ],
        "ln_f": take.norm("ln_f", C),
    }
    if cfg.tie_word_embeddings:
        params["lm_head"] = make_lm_head(take, "lm_head.weight", embed, V, C)
    else:
        params["lm_head"] = nn.Linear(take("lm_head.weight", (V, C)).T, None)
    return params


# --- the building blocks: exact GELU --------------------------------------------------------------

# erfc(z) = t · exp(-z² + P(t)) for z >= 0, t = 2 / (2 + z), P a Chebyshev series in 4t - 2
# (Numerical Recipes, 3rd ed., §6.2.2: relative error below 1.2e-16).
_ERFC_COEFFICIENTS = (
    -1.3026537197817094, 6.4196979235649026e-1, 1.9476473204185836e-2, -9.561514786808631e-3,
    -9.46595344482036e-4, 3.66839497852761e-4, 4.2523324806907e-5, -2.0278578112534e-5, -1.624290004647e-6,
    1.303655835580e-6, 1.5626441722e-8, -8.5238095915e-8, 6.529054439e-9, 5.059343495e-9, -9.91364156e-10,
    -2.27365122e-10, 9.6467911e-11, 2.394038e-12, -6.886027e-12, 8.94487e-13, 3.13092e-13, -1.12708e-13,
    3.81e-16, 7.106e-15, -1.523e-15, -9.4e-17, 1.21e-16, -2.8e-17,
)


def erfc(x):
    # [...] -> [...]: the complementary error function 1 - erf(x), in float64 inside
    xp = get_array_module(x)
    z = xp.abs(x.astype(xp.float64))
    t = 2.0 / (2.0 + z)
    ty = 4.0 * t - 2.0
    d = dd = xp.zeros_like(z)
    for c in _ERFC_COEFFICIENTS[:0:-1]:          # Clenshaw's recurrence, last coefficient first
        d, dd = ty * d - dd + c, d
    r = t * xp.exp(-z * z + 0.5 * (_ERFC_COEFFICIENTS[0] + ty * d) - dd)
    return xp.where(x >= 0, r, 2.0 - r)


def gelu(x):
    # [...] -> [...]: exact GELU, x · Φ(x) = 0.5 · x · erfc(-x / √2), in x's dtype
    return (0.5 * x * erfc(-x * x.dtype.type(1 / math.sqrt(2)))).astype(x.dtype)


# --- the forward pass, in pieces a layer-outer driver can call ----------------------------------

def embed(model, ids, positions, m):
    # [B, T] ids -> [B, T, C]: the token embedding only (positions enter through the rotary angles)
    return model.params["word_embeddings"][ids]


def layers(params) -> list:
    """The per-layer parameter dicts; layer i's dotted prefix is ``LAYER_PREFIX.format(i=i)``."""
    return params["h"]


def attention_bias(config: ModelConfig, mask, T: int, dtype):
    """[B, S] mask -> [B, 1, T, S]: causal and padding (:func:`minisq.nn.attention_bias`)."""
    return nn.attention_bias(mask, T, dtype)


def split_qkv(qkv, H: int, G: int):
    # [B, T, (H + 2G)·D] grouped [G, H/G + 2, D] -> q [B, T, H·D], k and v [B, T, G·D]
    B, T, _ = qkv.shape
    groups = qkv.reshape(B, T, G, H // G + 2, -1)
    return (groups[:, :, :, :-2].reshape(B, T, -1), groups[:, :, :, -2].reshape(B, T, -1),
            groups[:, :, :, -1].reshape(B, T, -1))


def block(model, i, layer, x, bias, m, cache, positions=None):
    # [B, T, C], [B, 1, T, S] bias, [B, T] real-token mask m, [B, T] positions -> [B, T, C]
    cfg = model.config
    H, G, D, eps = cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.layer_norm_eps
    attn, mlp = layer["self_attention"], layer["mlp"]
    cos, sin = llama.rotary_tables(cfg, positions, x.dtype)                        # [B, T, 1, D]

    def attention(h):
        q, k, v = split_qkv(attn["query_key_value"](h, m), H, G)
        q, k = llama.apply_rotary(q, cos, sin, H), llama.apply_rotary(k, cos, sin, G)
        return attn["dense"](self_attention(model, q, k, v, cache, i, bias, D ** -0.5, m, kv_heads=G), m)

    def feed_forward(h):
        return mlp["dense_4h_to_h"](gelu(mlp["dense_h_to_4h"](h, m)), m)          # [B, T, F] inside

    norm = lambda name, a: kernels.layer_norm(a, **layer[name], eps=eps)                # noqa: E731
    kind = layout(cfg)
    if kind == "two_norms":
        return x + (feed_forward(norm("ln_mlp", x)) + attention(norm("ln_attn", x)))
    if kind == "parallel":
        h = norm("input_layernorm", x)
        return x + (feed_forward(h) + attention(h))
    x = x + attention(norm("input_layernorm", x))
    return x + feed_forward(norm("post_attention_layernorm", x))


def head(model, x, m):
    # [B, T, C], [B, T] -> [B, T, V] logits
    p = model.params
    return p["lm_head"](kernels.layer_norm(x, **p["ln_f"], eps=model.config.layer_norm_eps), m)


# --- smoothing: what may be folded into what, per layout -------------------------------------------

QKV, FC1 = "h.{i}.self_attention.query_key_value", "h.{i}.mlp.dense_h_to_4h"
ROWS = {
    "parallel": (
        Mapping("ln_qkv", "h.{i}.input_layernorm", "layernorm", (QKV, FC1),
                "Falcon-7B: the one input_layernorm feeds query_key_value and dense_h_to_4h, so both share "
                "one s (the official rule); smoothing only one of them would change the other's input"),
    ),
    "two_norms": (
        Mapping("ln_qkv", "h.{i}.ln_attn", "layernorm", (QKV,), "Falcon-40B/180B: ln_attn feeds only "
                "query_key_value (official)"),
        Mapping("ln_fc1", "h.{i}.ln_mlp", "layernorm", (FC1,), "ln_mlp feeds only dense_h_to_4h (official)"),
    ),
    "sequential": (
        Mapping("ln_qkv", "h.{i}.input_layernorm", "layernorm", (QKV,), "input_layernorm feeds only "
                "query_key_value when attention and MLP run one after the other (official)"),
        Mapping("ln_fc1", "h.{i}.post_attention_layernorm", "layernorm", (FC1,),
                "post_attention_layernorm feeds only dense_h_to_4h (official)"),
    ),
}
SMOOTHING = tuple(m for rows in ROWS.values() for m in rows)

NOT_FOLDABLE = {
    "h.{i}.mlp.dense_h_to_4h -> h.{i}.mlp.dense_4h_to_h":
        "GELU(x/s) != GELU(x)/s: GELU is not positively homogeneous",
    "h.{i}.self_attention.query_key_value (v part) -> h.{i}.self_attention.dense":
        "v is a slice of the fused query_key_value: a row divides all of a source's outputs, and q, k "
        "then go through RoPE, which a per-channel factor does not commute with",
}

DEFAULT_GROUPS = ("ln_qkv", "ln_fc1")  # what the official SmoothQuant code smooths for Falcon


def foldable(config, chosen: list) -> list:
    """The chosen rows of this config's layout (the 7B layout has ``ln_qkv`` only: its one norm
    takes dense_h_to_4h along)."""
    return [m for m in chosen if m in ROWS[layout(config)]]


def default_groups(config) -> tuple:
    """The groups the demo smooths: the official code's."""
    return DEFAULT_GROUPS


# --- attention's q, k, v: query_key_value's whole output, cut per group by attention_input_absmax ----

QKV_OUTPUTS = ((QKV, 0, 1),) * 3


def attention_input_absmax(config: ModelConfig, which: int, channel_absmax) -> float:
    """The static range of q (0), k (1) or v (2) from query_key_value's per-channel output
    ranges ``[(H + 2G)·D]`` grouped ``[G, H/G + 2, D]``; q and k bounded after RoPE as for Llama."""
    H, G, D = config.num_heads, config.kv_heads, config.head_dim
    groups = np.asarray(channel_absmax, np.float64).reshape(G, H // G + 2, D)
    piece = (groups[:, :-2], groups[:, -2], groups[:, -1])[which].reshape(-1)
    return llama.attention_input_absmax(config, which, piece)


# --- tokenizer: tiiuae/falcon-*'s tokenizer.json: <|endoftext|> (id 11) ends text, no BOS ----------

SPECIAL_TOKENS = SpecialTokens(bos="<|endoftext|>", eos="<|endoftext|>", pad=None, add_bos=False)


# --- the synthetic-outlier recipe (see minisq.synthetic) ---------------------------------------------

def synthetic_config(cfg: ModelConfig) -> ModelConfig:
    """A Falcon-shaped synthetic config: default RoPE when none is given, tied embeddings, no
    biases, the layout the config states (``parallel_attn`` and ``num_kv_heads=1``: 7B;
    ``new_decoder_architecture``: 40B; neither: sequential)."""
    return dataclasses.replace(cfg, rope=cfg.rope or {"rope_type": "default", "rope_theta": 10000.0},
                               activation="gelu", tie_word_embeddings=True, enable_bias=False,
                               parallel_attn=cfg.parallel_attn or cfg.new_decoder_architecture)


def synthetic_state_dict(cfg: ModelConfig, normal, gain, bias, final_gain) -> dict:
    """An HF-named state dict drawn with the generic helpers of :mod:`minisq.synthetic`:
    every block LayerNorm gain from ``gain()`` (planted outliers), the last from ``final_gain()``."""
    C, F, V, D = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    H, G = cfg.num_heads, cfg.kv_heads
    sd = {"word_embeddings.weight": normal(V, C)}
    for i in range(cfg.num_layers):
        p = f"h.{i}."
        for ln in NORMS[layout(cfg)]:
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = gain(), bias(C)
        for name, (c_out, c_in) in (("self_attention.query_key_value", ((H + 2 * G) * D, C)),
                                    ("self_attention.dense", (C, H * D)),
                                    ("mlp.dense_h_to_4h", (F, C)), ("mlp.dense_4h_to_h", (C, F))):
            sd[p + name + ".weight"] = normal(c_out, c_in)
            if cfg.enable_bias:
                sd[p + name + ".bias"] = bias(c_out)
    sd["ln_f.weight"], sd["ln_f.bias"] = final_gain(), bias(C)
    return sd
