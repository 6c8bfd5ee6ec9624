"""The Llama family — Llama 2/3, Mistral, Qwen2 (and SmolLM, TinyLlama, which are Llamas):
everything minisq knows about it, in one file.

Legend: B batch, T new tokens, S past + new tokens, C hidden, H query heads, G key/value
heads (G < H: grouped-query attention, G = 1: multi-query), D head dim, F MLP width, V vocab.

A pre-norm block with RMSNorm (a gain, no bias, no mean subtraction), rotary position
embeddings on q and k instead of a position table, grouped-query attention and a SwiGLU MLP:

    h = rms_norm(x) · g₁;  x = x + o_proj(attention(rope(q_proj h), rope(k_proj h), v_proj h))
    h = rms_norm(x) · g₂;  x = x + down_proj(silu(gate_proj h) · up_proj h)

Mistral adds a sliding window (a query sees at most ``sliding_window`` keys); Qwen2 adds
biases to q, k and v. The checkpoint's ``nn.Linear`` layers store ``[C_out, C_in]`` and
are transposed at load.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import nn
from ..backend import get_array_module
from ..config import ModelConfig, read_field
from ..config import validate as check_config
from ..errors import CheckpointError, ConfigError
from ..io.storage import materialize
from ..kernels.cpu import rms_norm, silu
from ..nn import Linear, apply_rotary
from .base import Mapping, SpecialTokens, self_attention, strip_prefix, Taker

MODEL_TYPES = ("llama", "mistral", "qwen2")
EMBEDDING = "embed_tokens"   # the token embedding [V, C] in the parameter tree
LAYER_PREFIX = "layers.{i}"  # dotted name of layer i
# Buffers of older checkpoints that hold no weights (rotary frequencies, recomputed here).
IGNORED_TENSORS = (r"rotary_emb\.inv_freq$",)

# What each RoPE type needs from config.json besides rope_theta.
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


# --- config.json ----------------------------------------------------------------------------

def config_from_hf(raw: dict, source: str) -> ModelConfig:
    """A Llama / Mistral / Qwen2 config.json as a :class:`ModelConfig`."""
    def field(key, default=None, kind="int", required=False):
        return read_field(raw, key, default, required=required, source=source, kind=kind)

    model_type = raw["model_type"]
    act = field("hidden_act", "silu", "str")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported; the Llama family here uses 'silu'")
    if field("pretraining_tp", 1) != 1:
        raise ConfigError(f"{source}: pretraining_tp={raw['pretraining_tp']} (sliced linears) is not supported")
    if model_type == "qwen2" and field("use_sliding_window", False, "bool"):
        raise ConfigError(f"{source}: use_sliding_window=True (Qwen2's per-layer windows) is not supported")
    H = field("num_attention_heads", required=True)
    P = field("max_position_embeddings", 2048)
    rope = read_rope(raw, source)
    attention_bias = field("attention_bias", False, "bool")
    if rope["rope_type"] == "dynamic" and P * rope["factor"] > 2 ** 31:
        raise ConfigError(f"{source}: max_position_embeddings × dynamic RoPE factor is {P * rope['factor']:.3g} positions")
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=field("vocab_size", required=True),
        hidden_size=field("hidden_size", required=True),
        num_layers=field("num_hidden_layers", required=True),
        num_heads=H,
        ffn_dim=field("intermediate_size", required=True),
        # dynamic NTK scaling exists to run past the trained context: allow factor x as long
        max_positions=int(P * rope["factor"]) if rope["rope_type"] == "dynamic" else P,
        layer_norm_eps=field("rms_norm_eps", 1e-6, "float"),
        activation="silu",
        enable_bias=False,
        num_kv_heads=field("num_key_value_heads", H),
        head_size=field("head_dim"),
        rope=rope,
        qkv_bias=True if model_type == "qwen2" else attention_bias,   # Qwen2: q, k, v always biased
        o_bias=attention_bias if model_type == "llama" else False,
        mlp_bias=field("mlp_bias", False, "bool"),
        sliding_window=field("sliding_window") if model_type == "mistral" else None,
        tie_word_embeddings=field("tie_word_embeddings", False, "bool"),
        bos_token_id=field("bos_token_id"),
        eos_token_id=field("eos_token_id", kind="ids"),
        pad_token_id=field("pad_token_id"),
        name=field("_name_or_path", "", "str"),
    )
    return validate(cfg, source)


def read_rope(raw: dict, source: str) -> dict:
    """The rotary settings from either form real checkpoints use: hub-style ``rope_theta`` +
    ``rope_scaling`` (``{"type"|"rope_type": ..., "factor": ...}``), or the newer
    ``rope_parameters`` (``{"rope_type": ..., "rope_theta": ...}``)."""
    params = raw.get("rope_parameters")
    if params is None:
        params = raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters/rope_scaling must be a JSON object, got {params!r:.60}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise ConfigError(f"{source}: RoPE type {rope_type!r:.60} is not supported; minisq implements {sorted(ROPE_TYPES)}")
    if read_field(params, "partial_rotary_factor", 1.0, source=source, kind="float") != 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    theta = params["rope_theta"] if params.get("rope_theta") is not None else raw.get("rope_theta", 10000.0)
    theta = read_field({"rope_theta": theta}, "rope_theta", 10000.0, source=source, kind="float")
    rope = {"rope_type": rope_type, "rope_theta": theta}
    for key in ROPE_TYPES[rope_type]:
        if params.get(key) is None:
            raise ConfigError(f"{source}: RoPE type {rope_type!r} needs {key!r} in its parameters")
        rope[key] = read_field(params, key, source=source, kind="float")
    if rope_type == "dynamic":   # transformers scales from max_position_embeddings
        rope["original_max_position_embeddings"] = read_field(raw, "max_position_embeddings", 2048.0,
                                                              source=source, kind="float")
    return check_rope(rope, source)


# The valid range of each RoPE parameter: (test, what it must be). A linear factor scales
# positions down (any > 0); a dynamic factor only ever lengthens the context (>= 1; below 1 it
# would silently shorten it); llama3 blends between two frequency bounds that must differ.
ROPE_RANGES = {
    "rope_theta": (lambda v: v > 0, "> 0"),
    "factor": (lambda v: v > 0, "> 0"),
    "low_freq_factor": (lambda v: v > 0, "> 0"),
    "high_freq_factor": (lambda v: v > 0, "> 0"),
    "original_max_position_embeddings": (lambda v: v >= 1, ">= 1"),
}


def check_rope(rope, source: str) -> dict:
    """``rope`` (as :func:`read_rope` gives it) if every value is a finite number in its range,
    else a ConfigError naming the value."""
    if not isinstance(rope, dict) or rope.get("rope_type") not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope must be an object with a rope_type of {sorted(ROPE_TYPES)}, got {rope!r:.80}")
    needed = {"rope_type", "rope_theta", *ROPE_TYPES[rope["rope_type"]]}
    if rope["rope_type"] == "dynamic":
        needed.add("original_max_position_embeddings")
    if set(rope) != needed:
        raise ConfigError(f"{source}: a {rope['rope_type']!r} rope needs exactly {sorted(needed)}, got {sorted(rope)}")
    for key in needed - {"rope_type"}:
        value = rope[key]
        test, what = ROPE_RANGES[key]
        if type(value) not in (int, float) or not math.isfinite(value) or not test(value):
            raise ConfigError(f"{source}: RoPE {key} must be a finite number {what}, got {value!r:.60}")
    if rope["rope_type"] == "dynamic" and rope["factor"] < 1:
        raise ConfigError(f"{source}: a dynamic RoPE factor must be >= 1 (it lengthens the context), got {rope['factor']}")
    if rope["rope_type"] == "llama3" and rope["high_freq_factor"] <= rope["low_freq_factor"]:
        raise ConfigError(f"{source}: llama3 RoPE needs high_freq_factor > low_freq_factor, got "
                          f"{rope['high_freq_factor']} and {rope['low_freq_factor']}")
    return rope


def validate(cfg: ModelConfig, source: str) -> ModelConfig:
    """The generic checks (:func:`minisq.config.validate`) and the Llama family's own: key/value
    heads that divide the query heads, an even head dim, a valid RoPE."""
    check_config(cfg, source)
    if cfg.num_kv_heads is None or cfg.num_kv_heads <= 0:
        raise ConfigError(f"{source}: num_kv_heads must be a positive integer, got {cfg.num_kv_heads!r}")
    if cfg.num_heads % cfg.kv_heads:
        raise ConfigError(f"{source}: {cfg.num_heads} query heads cannot share {cfg.kv_heads} key/value heads "
                          "evenly (num_attention_heads must be a multiple of num_key_value_heads)")
    if cfg.head_dim % 2:
        raise ConfigError(f"{source}: head_dim {cfg.head_dim} is odd; rotary embeddings rotate pairs of channels")
    check_rope(cfg.rope, source)
    return cfg


# --- checkpoint names -> parameter tree --------------------------------------------------------

def params_from_state_dict(cfg: ModelConfig, state: dict, dtype, source: str) -> dict:
    """The parameter tree from an HF Llama/Mistral/Qwen2 state dict (``model.`` prefix optional)."""
    take = Taker(strip_prefix(state, ("model.",)), dtype, source)
    C, F, V, D = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    H, G = cfg.num_heads, cfg.kv_heads

    def lin(key, c_in, c_out, bias):  # nn.Linear stores [out, in]: transposed to minisq's [in, out]
        return take.linear(key, c_in, c_out, bias=bias, transpose=True)

    embed = take("embed_tokens.weight", (V, C))
    params = {
        "embed_tokens": embed,                                                         # [V, C]
        "layers": [
            {
                "input_layernorm": {"g": take(f"layers.{i}.input_layernorm.weight", (C,))},
                "self_attn": {
                    "q_proj": lin(f"layers.{i}.self_attn.q_proj", C, H * D, cfg.qkv_bias),
                    "k_proj": lin(f"layers.{i}.self_attn.k_proj", C, G * D, cfg.qkv_bias),
                    "v_proj": lin(f"layers.{i}.self_attn.v_proj", C, G * D, cfg.qkv_bias),
                    "o_proj": lin(f"layers.{i}.self_attn.o_proj", H * D, C, cfg.o_bias),
                },
                "post_attention_layernorm": {"g": take(f"layers.{i}.post_attention_layernorm.weight", (C,))},
                "mlp": {
                    "gate_proj": lin(f"layers.{i}.mlp.gate_proj", C, F, cfg.mlp_bias),
                    "up_proj": lin(f"layers.{i}.mlp.up_proj", C, F, cfg.mlp_bias),
                    "down_proj": lin(f"layers.{i}.mlp.down_proj", F, C, cfg.mlp_bias),
                },
            }
            for i in range(cfg.num_layers)
        ],
        "norm": {"g": take("norm.weight", (C,))},
    }
    # Tied (SmolLM, Qwen2.5-0.5B, Llama-3.2-1B): lm_head is the embedding; the leaf holds its
    # transpose [C, V], a view. Untied: lm_head.weight [V, C] must be in the file.
    w = embed if cfg.tie_word_embeddings else take("lm_head.weight", (V, C))
    if cfg.tie_word_embeddings and "lm_head.weight" in take.state:   # honoured only if it is the embedding
        stored = take("lm_head.weight", (V, C))
        if not np.array_equal(materialize(stored, np.float32), materialize(embed, np.float32)):
            raise CheckpointError(
                f"{source}: config.json says tie_word_embeddings: true (lm_head is the token embedding), "
                "but the checkpoint stores an lm_head.weight that differs from it; set "
                "tie_word_embeddings to false to use the stored lm_head")
    params["lm_head"] = Linear(w.T, None)
    return params


# --- the building blocks: RMSNorm, rotary embeddings, SwiGLU ------------------------------------
# rms_norm and silu are the fast kernels (references: minisq.nn.rms_norm, minisq.nn.silu);
# apply_rotary is minisq.nn.apply_rotary (RoPE). What is Llama's own: the rotation angles.

def inverse_frequencies(rope: dict, D: int, seq_len: int = 0) -> np.ndarray:
    """θ_j = 1 / base^(2j/D) for the D/2 channel pairs, rescaled by the RoPE type: [D/2] float32.

    Computed in float32, as transformers does, so that the angles below are bit for bit the
    ones the checkpoint ran with:
    ``linear`` divides every θ by ``factor`` (positions interpolated); ``dynamic`` (NTK)
    raises the base once the sequence (``seq_len``) outgrows the trained context;
    ``llama3`` divides only the low frequencies (wavelength > context / low_freq_factor) by
    ``factor``, keeps the high ones, and blends in between.
    """
    f32 = np.float32
    base = f32(rope["rope_theta"])
    if rope["rope_type"] == "dynamic" and seq_len > rope["original_max_position_embeddings"]:
        P, factor = rope["original_max_position_embeddings"], rope["factor"]
        base = base * (f32(factor) * f32(seq_len) / f32(P) - f32(factor - 1)) ** f32(D / (D - 2))
    inv = f32(1.0) / (base ** (np.arange(0, D, 2).astype(f32) / f32(D)))
    if rope["rope_type"] == "linear":
        inv = inv / np.float32(rope["factor"])
    elif rope["rope_type"] == "llama3":
        inv = _llama3_frequencies(inv, rope)
    return inv.astype(np.float32)


def _llama3_frequencies(inv, rope: dict):
    # [D/2] float32 -> [D/2] float32 (Llama 3.1's "llama3" rope_scaling)
    factor, low, high = (np.float32(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    context = rope["original_max_position_embeddings"]
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > context / low, inv / factor, inv)
    smooth = (np.float32(context) / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) & ~(wavelen > context / low)
    return np.where(medium, blended, scaled)


def rotary_tables(config: ModelConfig, positions, dtype):
    # [B, T] positions -> cos, sin [B, T, 1, D] in dtype (the same for every head). The angles are
    # float32 products as in transformers; cos and sin are taken in the model's dtype (transformers
    # takes them in float32 even for a float64 model, a ~1e-7 difference the float64 tests patch out)
    xp = get_array_module(positions)
    seq_len = int(positions.max()) + 1 if positions.size else 0
    inv = xp.asarray(inverse_frequencies(config.rope, config.head_dim, seq_len))       # [D/2] float32
    angles = positions.astype(xp.float32)[..., None] * inv                              # [B, T, D/2] float32
    angles = xp.concatenate([angles, angles], axis=-1).astype(dtype)[:, :, None, :]     # [B, T, 1, D]
    return xp.cos(angles), xp.sin(angles)


# --- the forward pass, in pieces a layer-outer driver can call ----------------------------------

def embed(model, ids, positions, m):
    # [B, T] ids -> [B, T, C]: the token embedding only (positions enter through the rotary angles)
    return model.params["embed_tokens"][ids]


def layers(params) -> list:
    """The per-layer parameter dicts; layer i's dotted prefix is ``LAYER_PREFIX.format(i=i)``."""
    return params["layers"]


def attention_bias(config: ModelConfig, mask, T: int, dtype):
    """[B, S] mask -> [B, 1, T, S]: :func:`minisq.nn.attention_bias`, plus Mistral's sliding window: query
    at index q sees key k only when q - k < sliding_window (as transformers)."""
    bias = nn.attention_bias(mask, T, dtype)
    W, S = config.sliding_window, mask.shape[1]
    if W is None or S <= W:
        return bias
    xp = get_array_module(mask)
    too_far = xp.arange(S)[None, :] <= xp.arange(S - T, S)[:, None] - W             # [T, S]
    return xp.where(too_far, xp.finfo(dtype).min, bias).astype(dtype)


def block(model, i, layer, x, bias, m, cache, positions=None):
    # [B, T, C], [B, 1, T, S] bias, [B, T] real-token mask m, [B, T] positions -> [B, T, C]
    cfg = model.config
    H, G, D = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    attn, mlp = layer["self_attn"], layer["mlp"]
    cos, sin = rotary_tables(cfg, positions, x.dtype)                             # [B, T, 1, D]
    h = rms_norm(x, layer["input_layernorm"]["g"], cfg.layer_norm_eps)
    q = apply_rotary(attn["q_proj"](h, m), cos, sin, H)                           # [B, T, H*D]
    k = apply_rotary(attn["k_proj"](h, m), cos, sin, G)                           # [B, T, G*D]
    v = attn["v_proj"](h, m)                                                      # [B, T, G*D]
    a = self_attention(model, q, k, v, cache, i, bias, D ** -0.5, m, kv_heads=G)
    x = x + attn["o_proj"](a, m)
    h = rms_norm(x, layer["post_attention_layernorm"]["g"], cfg.layer_norm_eps)
    gated = silu(mlp["gate_proj"](h, m))                                          # [B, T, F], a fresh array
    gated *= mlp["up_proj"](h, m)                                                 # SwiGLU, in place
    return x + mlp["down_proj"](gated, m)


def head(model, x, m):
    # [B, T, C], [B, T] -> [B, T, V] logits
    p = model.params
    return p["lm_head"](rms_norm(x, p["norm"]["g"], model.config.layer_norm_eps), m)


# --- smoothing: what may be folded into what ------------------------------------------------------

# llm-compressor's mappings as minisq groups: its DEFAULT_SMOOTHQUANT_MAPPINGS (Llama, Mistral, Qwen2)
LLMCOMPRESSOR_GROUPS = ("ln_qkv", "ln_fc1")

SMOOTHING = (
    Mapping("ln_qkv", "layers.{i}.input_layernorm", "rmsnorm",
            ("layers.{i}.self_attn.q_proj", "layers.{i}.self_attn.k_proj", "layers.{i}.self_attn.v_proj"),
            "input_layernorm feeds q, k and v: one s shared by the three, folded into the RMSNorm gain "
            "(the official code's Llama row)"),
    Mapping("ln_fc1", "layers.{i}.post_attention_layernorm", "rmsnorm",
            ("layers.{i}.mlp.gate_proj", "layers.{i}.mlp.up_proj"),
            "post_attention_layernorm feeds the MLP's gate and up projections: one s for both (official)"),
    Mapping("up_down", "layers.{i}.mlp.up_proj", "linear", ("layers.{i}.mlp.down_proj",),
            "SwiGLU is linear in up: silu(g)·(u/s) = (silu(g)·u)/s, so up_proj's outputs carry 1/s into "
            "down_proj (gate's cannot: silu is not homogeneous)"),
    Mapping("v_out", "layers.{i}.self_attn.v_proj", "linear", ("layers.{i}.self_attn.o_proj",),
            "attention averages v over tokens: Σ p·(v/s) = (Σ p·v)/s per channel; under GQA each of the "
            "G·D kv channels is read by H/G query heads, so one factor per kv channel is repeated for each"),
)

NOT_FOLDABLE = {
    "layers.{i}.mlp.gate_proj -> layers.{i}.mlp.down_proj":
        "silu(x/s) != silu(x)/s: SiLU is not positively homogeneous",
    "layers.{i}.self_attn.q_proj / k_proj outputs":
        "RoPE mixes channel j with channel j + D/2 of each head, so a per-channel factor on q or k "
        "does not commute with it (only a factor shared by each rotated pair would)",
}

DEFAULT_GROUPS = ("ln_qkv", "ln_fc1")  # what the official SmoothQuant code smooths for Llama/Mistral


def foldable(config, chosen: list) -> list:
    """The chosen mappings that are equivalences for this config (all of them)."""
    return chosen


def default_groups(config) -> tuple:
    """The groups the demo smooths: the official code's."""
    return DEFAULT_GROUPS


# --- attention's q, k, v: (leaf, part, parts) — each projection's whole output ------------------------
# Quantized attention (quantize(..., attn_bmm=...)) quantizes q and k *after* RoPE, so that Q·Kᵀ
# is a real INT8 BMM; the official fake-quant code quantizes the projection outputs before RoPE
# (its Llama path has no INT8 BMM). Under GQA the quantized path repeats k and v to H heads first
# (per-token, per-sequence and static ranges are unchanged by repeating), so its KV cache holds H
# heads; the float path's cache holds only the G kv heads.

QKV_OUTPUTS = (("layers.{i}.self_attn.q_proj", 0, 1), ("layers.{i}.self_attn.k_proj", 0, 1),
               ("layers.{i}.self_attn.v_proj", 0, 1))


def attention_input_absmax(config: ModelConfig, which: int, channel_absmax) -> float:
    """The static range of attention's q (0), k (1) or v (2) from the calibrated per-channel
    ranges of the projection's output ``[n*D]``. Attention is quantized after RoPE, which
    rotates each pair (j, j + D/2): a rotated value is at most sqrt(a_j² + a_{j+D/2}²), a
    bound that never clips (the pre-RoPE max could, by up to √2)."""
    a = np.asarray(channel_absmax, np.float64)
    if which == 2:
        return float(a.max())
    pairs = a.reshape(-1, 2, config.head_dim // 2)                   # [n, 2, D/2]
    return float(np.sqrt((pairs ** 2).sum(axis=1)).max())


# --- tokenizer: read from tokenizer.json / tokenizer_config.json / generation_config.json -------------

# None: found in the folder's files (the family has no fixed special tokens: Llama 2 "<s>",
# Llama 3 "<|begin_of_text|>", SmolLM "<|endoftext|>", Qwen2 none).
HF_PREFIX = "model."           # transformers' names of the decoder's tensors (compressed-tensors export)

SPECIAL_TOKENS = SpecialTokens(bos=None, eos=None, pad=None, add_bos=None)


# --- the synthetic-outlier recipe (see minisq.synthetic) ---------------------------------------------

def synthetic_config(cfg: ModelConfig) -> ModelConfig:
    """A Llama-shaped synthetic config: default RoPE when none is given, tied embeddings."""
    return dataclasses.replace(cfg, rope=cfg.rope or {"rope_type": "default", "rope_theta": 10000.0},
                               activation="silu", tie_word_embeddings=True)


def synthetic_state_dict(cfg: ModelConfig, normal, gain, bias, final_gain) -> dict:
    """An HF-named state dict drawn with the generic helpers of :mod:`minisq.synthetic`:
    both RMSNorm gains of every layer from ``gain()`` (planted outliers), the last from
    ``final_gain()``; biases only where the config has them."""
    C, F, V, D = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    H, G = cfg.num_heads, cfg.kv_heads
    sd = {"embed_tokens.weight": normal(V, C)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        sd[p + "input_layernorm.weight"], sd[p + "post_attention_layernorm.weight"] = gain(), gain()
        # nn.Linear weights are stored [out, in]
        for name, (c_out, c_in), has_bias in (
                ("self_attn.q_proj", (H * D, C), cfg.qkv_bias), ("self_attn.k_proj", (G * D, C), cfg.qkv_bias),
                ("self_attn.v_proj", (G * D, C), cfg.qkv_bias), ("self_attn.o_proj", (C, H * D), cfg.o_bias),
                ("mlp.gate_proj", (F, C), cfg.mlp_bias), ("mlp.up_proj", (F, C), cfg.mlp_bias),
                ("mlp.down_proj", (C, F), cfg.mlp_bias)):
            sd[p + name + ".weight"] = normal(c_out, c_in)
            if has_bias:
                sd[p + name + ".bias"] = bias(c_out)
    sd["norm.weight"] = final_gain()
    return sd
