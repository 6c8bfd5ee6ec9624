"""OPT (Zhang et al. 2022), the models of the SmoothQuant paper: everything minisq knows
about it, in one file.

Legend: B batch, T new tokens, C hidden, F MLP width, V vocab, P positions, E token-embedding
width (= C except opt-350m).

Blocks like GPT-2's with separate q, k, v projections, ReLU, and learned positions whose
table has two extra leading rows (``position_offset = 2``, a fairseq legacy). opt-350m is
post-LN (``do_layer_norm_before=False``) and embeds in E = 512 with ``project_in``/``project_out``.
The checkpoint's ``nn.Linear`` layers store ``[C_out, C_in]`` and are transposed at load.
"""

from __future__ import annotations

import dataclasses
import warnings

from .. import nn
from ..kernels import cpu as kernels
from ..config import ModelConfig, check_activation, read_field, validate
from .base import Mapping, SpecialTokens, make_lm_head, self_attention, strip_prefix, Taker

MODEL_TYPES = ("opt",)
EMBEDDING = "embed_tokens"   # the token embedding [V, E] in the parameter tree
LAYER_PREFIX = "layers.{i}"  # dotted name of layer i


# --- config.json ----------------------------------------------------------------------------

def config_from_hf(raw: dict, source: str) -> ModelConfig:
    """An OPT config.json as a :class:`ModelConfig`."""
    def field(key, default=None, kind="int", required=False):
        return read_field(raw, key, default, required=required, source=source, kind=kind)

    C = field("hidden_size", required=True)
    proj = field("word_embed_proj_dim", C)
    cfg = ModelConfig(
        model_type="opt",
        vocab_size=field("vocab_size", required=True),
        hidden_size=C,
        num_layers=field("num_hidden_layers", required=True),
        num_heads=field("num_attention_heads", required=True),
        ffn_dim=field("ffn_dim", required=True),
        max_positions=field("max_position_embeddings", 2048),
        layer_norm_eps=1e-5,  # OPT's LayerNorms use torch's default eps
        activation=check_activation(field("activation_function", "relu", "str"), source),
        do_layer_norm_before=field("do_layer_norm_before", True, "bool"),
        word_embed_proj_dim=proj if proj != C else None,
        enable_bias=field("enable_bias", True, "bool"),
        layer_norm_elementwise_affine=field("layer_norm_elementwise_affine", True, "bool"),
        remove_final_layer_norm=field("_remove_final_layer_norm", False, "bool"),
        position_offset=2,
        bos_token_id=field("bos_token_id", 2),
        eos_token_id=field("eos_token_id", 2, "ids"),
        pad_token_id=field("pad_token_id", 1),
        name=field("_name_or_path", "", "str"),
    )
    return validate(cfg, source)


def config_to_hf(cfg: ModelConfig) -> dict:
    """The config.json that :func:`config_from_hf` reads back as ``cfg`` (for writing checkpoints)."""
    return dict(model_type="opt", architectures=["OPTForCausalLM"], vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                ffn_dim=cfg.ffn_dim, max_position_embeddings=cfg.max_positions, activation_function=cfg.activation,
                do_layer_norm_before=cfg.do_layer_norm_before, word_embed_proj_dim=cfg.embed_dim,
                enable_bias=cfg.enable_bias, layer_norm_elementwise_affine=cfg.layer_norm_elementwise_affine,
                _remove_final_layer_norm=cfg.remove_final_layer_norm, bos_token_id=cfg.bos_token_id,
                eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, _name_or_path=cfg.name)


# --- checkpoint names -> parameter tree --------------------------------------------------------

def params_from_state_dict(cfg: ModelConfig, state: dict, dtype, source: str) -> dict:
    """The parameter tree from an HF OPT state dict (``model.decoder.`` prefix optional)."""
    take = Taker(strip_prefix(state, ("model.decoder.", "decoder.", "model.")), dtype, source)
    C, F, V, E = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size, cfg.embed_dim
    bias, affine = cfg.enable_bias, cfg.layer_norm_elementwise_affine
    proj = cfg.word_embed_proj_dim is not None
    embed = take("embed_tokens.weight", (V, E))
    # nn.Linear stores [out, in]: transpose=True gives minisq's [in, out]
    lin = lambda key, c_in, c_out, b=bias: take.linear(key, c_in, c_out, bias=b, transpose=True)  # noqa: E731
    params = {
        "embed_tokens": embed,                                                         # [V, E]
        "embed_positions": take("embed_positions.weight", (cfg.max_positions + cfg.position_offset, C)),
        "project_in": lin("project_in", E, C, b=False) if proj else None,
        "layers": [
            {
                "self_attn_layer_norm": take.norm(f"layers.{i}.self_attn_layer_norm", C, affine),
                "self_attn": {
                    name: lin(f"layers.{i}.self_attn.{name}", C, C)
                    for name in ("q_proj", "k_proj", "v_proj", "out_proj")
                },
                "final_layer_norm": take.norm(f"layers.{i}.final_layer_norm", C, affine),
                "fc1": lin(f"layers.{i}.fc1", C, F),
                "fc2": lin(f"layers.{i}.fc2", F, C),
            }
            for i in range(cfg.num_layers)
        ],
        "final_layer_norm": (take.norm("final_layer_norm", C, affine)
                             if cfg.do_layer_norm_before and not cfg.remove_final_layer_norm else None),
        "project_out": lin("project_out", C, E, b=False) if proj else None,
    }
    params["lm_head"] = make_lm_head(take, "lm_head.weight", embed, V, E)
    return params


# --- the forward pass, in pieces a layer-outer driver can call ----------------------------------

def embed(model, ids, positions, m):
    # [B, T] ids, [B, T] positions, [B, T] real-token mask m -> [B, T, C]
    cfg, p = model.config, model.params
    x = p["embed_tokens"][ids]                                        # [B, T, E]
    if p["project_in"] is not None:
        x = p["project_in"](x, m)                                     # [B, T, C]
    return x + p["embed_positions"][positions + cfg.position_offset]


def layers(params) -> list:
    """The per-layer parameter dicts; layer i's dotted prefix is ``LAYER_PREFIX.format(i=i)``."""
    return params["layers"]


def attention_bias(config, mask, T: int, dtype):
    """[B, S] mask -> [B, 1, T, S]: causal and padding (:func:`minisq.nn.attention_bias`)."""
    return nn.attention_bias(mask, T, dtype)


def block(model, i, layer, x, bias, m, cache, positions=None):
    # [B, T, C], [B, 1, T, S] bias, [B, T] real-token mask m -> [B, T, C] (cache extended in place)
    cfg = model.config
    act = kernels.ACTIVATION_FNS[cfg.activation]
    eps = cfg.layer_norm_eps
    pre = cfg.do_layer_norm_before
    attn = layer["self_attn"]
    h = kernels.layer_norm(x, **layer["self_attn_layer_norm"], eps=eps) if pre else x
    a = self_attention(model, attn["q_proj"](h, m), attn["k_proj"](h, m), attn["v_proj"](h, m),
                        cache, i, bias, cfg.head_dim ** -0.5, m)
    x = x + attn["out_proj"](a, m)
    if not pre:  # post-LN (opt-350m): normalize after the residual add
        x = kernels.layer_norm(x, **layer["self_attn_layer_norm"], eps=eps)
    h = kernels.layer_norm(x, **layer["final_layer_norm"], eps=eps) if pre else x
    x = x + layer["fc2"](act(layer["fc1"](h, m)), m)              # [B, T, F] inside
    if not pre:
        x = kernels.layer_norm(x, **layer["final_layer_norm"], eps=eps)
    return x


def head(model, x, m):
    # [B, T, C], [B, T] -> [B, T, V] logits
    cfg, p = model.config, model.params
    if p["final_layer_norm"] is not None:
        x = kernels.layer_norm(x, **p["final_layer_norm"], eps=cfg.layer_norm_eps)
    if p["project_out"] is not None:
        x = p["project_out"](x, m)                                    # [B, T, E]
    return p["lm_head"](x, m)                                         # [B, T, V]


# --- smoothing: what may be folded into what ------------------------------------------------------

# llm-compressor's mappings as minisq groups: the OPT recipe in its SmoothQuantModifier docstring
LLMCOMPRESSOR_GROUPS = ("ln_qkv", "ln_fc1")

SMOOTHING = (
    Mapping("ln_qkv", "layers.{i}.self_attn_layer_norm", "layernorm",
            ("layers.{i}.self_attn.q_proj", "layers.{i}.self_attn.k_proj", "layers.{i}.self_attn.v_proj"),
            "self_attn_layer_norm feeds q, k and v: one s shared by the three"),
    Mapping("ln_fc1", "layers.{i}.final_layer_norm", "layernorm", ("layers.{i}.fc1",),
            "final_layer_norm feeds only fc1"),
    Mapping("fc1_fc2", "layers.{i}.fc1", "linear", ("layers.{i}.fc2",),
            "ReLU(x/s) = ReLU(x)/s for s > 0, so fc1's outputs can carry 1/s through the ReLU"),
    Mapping("v_out", "layers.{i}.self_attn.v_proj", "linear", ("layers.{i}.self_attn.out_proj",),
            "attention averages v over tokens with weights p: Σ p·(v_j/s_j) = (Σ p·v_j)/s_j per channel"),
)

NOT_FOLDABLE = {
    "post-LN LayerNorms (do_layer_norm_before=False, opt-350m)":
        "the LayerNorm's output is also the residual stream, so dividing it by s changes every later layer",
}

DEFAULT_GROUPS = ("ln_qkv", "ln_fc1")  # what the official SmoothQuant code smooths


def foldable(config, chosen: list) -> list:
    """The chosen mappings that are equivalences for this config: a post-LN model
    (opt-350m) loses the LayerNorm rows, with a warning."""
    if not config.do_layer_norm_before:
        skipped = [m.group for m in chosen if m.kind == "layernorm"]
        chosen = [m for m in chosen if m.kind != "layernorm"]
        if skipped:
            warnings.warn(
                f"post-LN model (do_layer_norm_before=False): {skipped} not smoothed, because "
                + NOT_FOLDABLE["post-LN LayerNorms (do_layer_norm_before=False, opt-350m)"],
                stacklevel=4,
            )
    return chosen


def default_groups(config) -> tuple:
    """The official code's LayerNorm mappings; for post-LN OPT (opt-350m), where folding into
    a LayerNorm is not an equivalence, the two in-block mappings instead."""
    if not config.do_layer_norm_before:
        return ("fc1_fc2", "v_out")
    return DEFAULT_GROUPS


# --- attention's q, k, v: (leaf, part, parts) — each projection's whole output ------------------------

QKV_OUTPUTS = (("layers.{i}.self_attn.q_proj", 0, 1), ("layers.{i}.self_attn.k_proj", 0, 1),
               ("layers.{i}.self_attn.v_proj", 0, 1))


def attention_input_absmax(config, which: int, channel_absmax) -> float:
    """The static range of q (0), k (1) or v (2): the max of its calibrated per-channel ranges."""
    return float(channel_absmax.max())


# --- tokenizer: facebook/opt-*'s tokenizer_config.json defaults: prepends </s> ----------------------

HF_PREFIX = "model.decoder."   # transformers' names of the decoder's tensors (compressed-tensors export)

SPECIAL_TOKENS = SpecialTokens(bos="</s>", eos="</s>", pad="<pad>", add_bos=True)


# --- the synthetic-outlier recipe (see minisq.synthetic) ---------------------------------------------

def synthetic_config(cfg: ModelConfig) -> ModelConfig:
    """Outliers are planted in pre-LN gains: a post-LN shape is built pre-LN."""
    if not cfg.do_layer_norm_before:
        return dataclasses.replace(cfg, do_layer_norm_before=True)
    return cfg


def synthetic_state_dict(cfg: ModelConfig, normal, gain, bias, final_gain) -> dict:
    """An HF-named state dict drawn with the generic helpers of :mod:`minisq.synthetic`:
    every LayerNorm gain from ``gain()`` (planted outliers), the last from ``final_gain()``."""
    C, F, V, E = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size, cfg.embed_dim
    sd = {}
    sd["embed_tokens.weight"] = normal(V, E)
    sd["embed_positions.weight"] = normal(cfg.max_positions + cfg.position_offset, C, std=0.01)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = gain(), bias(C)
        # nn.Linear weights are stored [out, in]
        for name, (c_out, c_in) in (("self_attn.q_proj", (C, C)), ("self_attn.k_proj", (C, C)),
                                    ("self_attn.v_proj", (C, C)), ("self_attn.out_proj", (C, C)),
                                    ("fc1", (F, C)), ("fc2", (C, F))):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = normal(c_out, c_in), bias(c_out)
    sd["final_layer_norm.weight"], sd["final_layer_norm.bias"] = final_gain(), bias(C)
    if cfg.word_embed_proj_dim is not None:
        sd["project_in.weight"], sd["project_out.weight"] = normal(C, E), normal(E, C)
    return sd
