"""GPT-2 (Radford et al. 2019): everything minisq knows about it, in one file.

Legend: B batch, T new tokens, C hidden, F MLP width, V vocab, P positions.

Pre-LN blocks ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` with a fused q,k,v projection
``c_attn`` ``[C, 3C]``, GELU (tanh approximation), learned positions, a final ``ln_f`` and
an lm_head tied to the token embedding. The checkpoint's Conv1D layers already store
``[C_in, C_out]``, so nothing is transposed.
"""

from __future__ import annotations

from .. import nn
from ..kernels import cpu as kernels
from ..config import ModelConfig, check_activation, read_field, validate
from ..errors import ConfigError
from .base import Mapping, SpecialTokens, make_lm_head, self_attention, strip_prefix, Taker

MODEL_TYPES = ("gpt2",)
EMBEDDING = "wte"            # the token embedding [V, C] in the parameter tree
LAYER_PREFIX = "h.{i}"       # dotted name of layer i
# Buffers of HF GPT-2 checkpoints that hold no weights (the causal mask and its fill value).
IGNORED_TENSORS = (r"(^|\.)h\.\d+\.attn\.(masked_)?bias$",)


# --- config.json ----------------------------------------------------------------------------

def config_from_hf(raw: dict, source: str) -> ModelConfig:
    """A GPT-2 config.json (``n_embd``, ``n_layer``, ...) as a :class:`ModelConfig`."""
    def field(key, default=None, kind="int", required=False):
        return read_field(raw, key, default, required=required, source=source, kind=kind)

    if field("add_cross_attention", False, "bool"):
        raise ConfigError(f"{source}: add_cross_attention=True (an encoder-decoder GPT-2) is not supported")
    C = field("n_embd", required=True)
    n_inner = field("n_inner")
    cfg = ModelConfig(
        model_type="gpt2",
        vocab_size=field("vocab_size", required=True),
        hidden_size=C,
        num_layers=field("n_layer", required=True),
        num_heads=field("n_head", required=True),
        ffn_dim=n_inner if n_inner else 4 * C,
        max_positions=field("n_positions", 1024),
        layer_norm_eps=field("layer_norm_epsilon", 1e-5, "float"),
        activation=check_activation(field("activation_function", "gelu_new", "str"), source),
        scale_attn_weights=field("scale_attn_weights", True, "bool"),
        scale_attn_by_inverse_layer_idx=field("scale_attn_by_inverse_layer_idx", False, "bool"),
        reorder_and_upcast_attn=field("reorder_and_upcast_attn", False, "bool"),
        bos_token_id=field("bos_token_id", 50256),
        eos_token_id=field("eos_token_id", 50256, "ids"),
        pad_token_id=field("pad_token_id"),
        name=field("_name_or_path", "", "str"),
    )
    return validate(cfg, source)


def config_to_hf(cfg: ModelConfig) -> dict:
    """The config.json that :func:`config_from_hf` reads back as ``cfg`` (for writing checkpoints)."""
    return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.ffn_dim,
                n_positions=cfg.max_positions, layer_norm_epsilon=cfg.layer_norm_eps,
                activation_function=cfg.activation, scale_attn_weights=cfg.scale_attn_weights,
                scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx,
                bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, _name_or_path=cfg.name)


# --- checkpoint names -> parameter tree --------------------------------------------------------

def params_from_state_dict(cfg: ModelConfig, state: dict, dtype, source: str) -> dict:
    """The parameter tree from an HF GPT-2 state dict (``transformer.`` prefix optional)."""
    take = Taker(strip_prefix(state, ("transformer.",)), dtype, source)
    C, F, V = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size
    wte = take("wte.weight", (V, C))
    params = {
        "wte": wte,                                            # [V, C]
        "wpe": take("wpe.weight", (cfg.max_positions, C)),     # [P, C]
        "h": [
            {
                "ln_1": take.norm(f"h.{i}.ln_1", C),
                "attn": {
                    "c_attn": take.linear(f"h.{i}.attn.c_attn", C, 3 * C),   # fused q, k, v
                    "c_proj": take.linear(f"h.{i}.attn.c_proj", C, C),
                },
                "ln_2": take.norm(f"h.{i}.ln_2", C),
                "mlp": {
                    "c_fc": take.linear(f"h.{i}.mlp.c_fc", C, F),
                    "c_proj": take.linear(f"h.{i}.mlp.c_proj", F, C),
                },
            }
            for i in range(cfg.num_layers)
        ],
        "ln_f": take.norm("ln_f", C),
    }
    params["lm_head"] = make_lm_head(take, "lm_head.weight", wte, V, C)
    return params


# --- the forward pass, in pieces a layer-outer driver can call ----------------------------------

def embed(model, ids, positions, mask):
    # [B, T] ids, [B, T] positions, [B, T] real-token mask -> [B, T, C]
    p = model.params
    return p["wte"][ids] + p["wpe"][positions]                       # [B, T, C]


def layers(params) -> list:
    """The per-layer parameter dicts; layer i's dotted prefix is ``LAYER_PREFIX.format(i=i)``."""
    return params["h"]


def attention_bias(config, mask, T: int, dtype):
    """[B, S] mask -> [B, 1, T, S]: causal and padding (:func:`minisq.nn.attention_bias`)."""
    return nn.attention_bias(mask, T, dtype)


def block(model, i, layer, x, bias, m, cache, positions=None):
    # [B, T, C], [B, 1, T, S] bias, [B, T] real-token mask m -> [B, T, C] (cache extended in place)
    cfg = model.config
    act = kernels.ACTIVATION_FNS[cfg.activation]
    scale = (cfg.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0)
    if cfg.scale_attn_by_inverse_layer_idx:
        scale /= i + 1
    h = kernels.layer_norm(x, **layer["ln_1"], eps=cfg.layer_norm_eps)
    qkv = layer["attn"]["c_attn"](h, m)                          # [B, T, 3C]
    q, k, v = (qkv[..., j * cfg.hidden_size:(j + 1) * cfg.hidden_size] for j in range(3))
    a = self_attention(model, q, k, v, cache, i, bias, scale, m)
    x = x + layer["attn"]["c_proj"](a, m)
    h = kernels.layer_norm(x, **layer["ln_2"], eps=cfg.layer_norm_eps)
    x = x + layer["mlp"]["c_proj"](act(layer["mlp"]["c_fc"](h, m)), m)  # [B, T, F] inside
    return x


def head(model, x, m):
    # [B, T, C], [B, T] -> [B, T, V] logits
    cfg, p = model.config, model.params
    x = kernels.layer_norm(x, **p["ln_f"], eps=cfg.layer_norm_eps)
    return p["lm_head"](x, m)                                         # [B, T, V]


# --- smoothing: what may be folded into what ------------------------------------------------------

SMOOTHING = (
    Mapping("ln_qkv", "h.{i}.ln_1", "layernorm", ("h.{i}.attn.c_attn",),
            "ln_1 feeds only the fused q,k,v projection: one s for all three"),
    Mapping("ln_fc1", "h.{i}.ln_2", "layernorm", ("h.{i}.mlp.c_fc",),
            "ln_2 feeds only the MLP's first linear"),
)

NOT_FOLDABLE = {
    "h.{i}.mlp.c_fc -> h.{i}.mlp.c_proj": "GELU(x/s) != GELU(x)/s: GELU is not positively homogeneous",
}

DEFAULT_GROUPS = ("ln_qkv", "ln_fc1")  # what the official SmoothQuant code smooths


def foldable(config, chosen: list) -> list:
    """The chosen mappings that are equivalences for this config (all of them for GPT-2)."""
    return chosen


def default_groups(config) -> tuple:
    """The groups the demo smooths for this config: the official code's."""
    return DEFAULT_GROUPS


# --- attention's q, k, v: (leaf, part, parts) — c_attn's output cut in three ------------------------

QKV_OUTPUTS = (("h.{i}.attn.c_attn", 0, 3), ("h.{i}.attn.c_attn", 1, 3), ("h.{i}.attn.c_attn", 2, 3))


def attention_input_absmax(config, which: int, channel_absmax) -> float:
    """The static range of q (0), k (1) or v (2): the max of its calibrated per-channel ranges."""
    return float(channel_absmax.max())


# --- tokenizer: openai-community/gpt2's tokenizer_config.json defaults -------------------------------

# why compressed-tensors cannot hold this family (its export has no HF_PREFIX)
NOT_EXPORTABLE = ("GPT-2's Conv1D layers are not nn.Linear, which the format's 'Linear' target and "
                  "transformers' loader expect")

SPECIAL_TOKENS = SpecialTokens(bos="<|endoftext|>", eos="<|endoftext|>", pad=None, add_bos=False)


# --- the synthetic-outlier recipe (see minisq.synthetic) ---------------------------------------------

def synthetic_config(cfg: ModelConfig) -> ModelConfig:
    """The config a synthetic model of ``cfg``'s shape is built with (GPT-2: unchanged)."""
    return cfg


def synthetic_state_dict(cfg: ModelConfig, normal, gain, bias, final_gain) -> dict:
    """An HF-named state dict drawn with the generic helpers of :mod:`minisq.synthetic`:
    every LayerNorm gain from ``gain()`` (planted outliers), the last from ``final_gain()``."""
    C, F, V = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size
    sd = {}
    sd["wte.weight"], sd["wpe.weight"] = normal(V, C), normal(cfg.max_positions, C, std=0.01)
    for i in range(cfg.num_layers):
        p = f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = gain(), bias(C)
        # Conv1D weights are stored [in, out]
        for name, shape in (("attn.c_attn", (C, 3 * C)), ("attn.c_proj", (C, C)),
                            ("mlp.c_fc", (C, F)), ("mlp.c_proj", (F, C))):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = normal(*shape), bias(shape[1])
    sd["ln_f.weight"], sd["ln_f.bias"] = final_gain(), bias(C)
    return sd
