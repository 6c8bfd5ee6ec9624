"""Mixtral (Mistral AI 2024), a mixture of experts: everything minisq knows about it, in one file.

Legend: B batch, T new tokens, S past + new tokens, C hidden, H query heads, G key/value
heads, D head dim, F expert MLP width, E experts, k experts per token, V vocab, T_e the
most tokens of one sequence routed to expert e.

A Mistral block (RMSNorm, RoPE, grouped-query attention) whose MLP is a sparse mixture of
E SwiGLU experts. A router (``gate``, a linear ``[C, E]`` without bias) scores the experts
for every token; each token goes to its k best, and their outputs are summed with the
router's probabilities renormalised over those k (as transformers computes it):

    p = softmax(h · W_gate);  K = top-k of p;  y = Σ_{e ∈ K} (p_e / Σ_{K} p) · expert_e(h)
    expert_e(h) = w2(silu(w1 h) · w3 h)

Every expert is three linear leaves in the parameter tree under the hub checkpoint's own
names (``layers.{i}.block_sparse_moe.experts.{e}.w1``), so calibration, smoothing and
quantization see each expert as they see any linear, and an expert runs only on the tokens
routed to it (:func:`moe`, one array operation per expert, no loop over tokens). Both
weight layouts load: the hub's ``block_sparse_moe.experts.N.w1/w2/w3`` (what transformers'
``save_pretrained`` writes too) and transformers' in-memory ``mlp.experts.gate_up_proj`` /
``down_proj`` stacks.
"""

from __future__ import annotations

import dataclasses

from .. import nn
from ..backend import get_array_module
from ..config import ModelConfig, read_field
from ..errors import CheckpointError, ConfigError
from ..io.storage import StoredTensor
from ..nn import Linear
from . import llama
from .base import Mapping, self_attention, strip_prefix, Taker, TrackedState

MODEL_TYPES = ("mixtral",)
EMBEDDING = "embed_tokens"   # the token embedding [V, C] in the parameter tree
LAYER_PREFIX = "layers.{i}"  # dotted name of layer i
MOE = "layers.{i}.block_sparse_moe"

# Leaves kept in float unless asked (minisq.quantize(..., skip=...)): the router, as
# llm-compressor and TensorRT-LLM do; the official code quantizes it too (skip=("lm_head",)).
KEEP_FLOAT = ("layers.*.block_sparse_moe.gate",)


# --- config.json ----------------------------------------------------------------------------

def config_from_hf(raw: dict, source: str) -> ModelConfig:
    """A Mixtral config.json: Mistral's fields (read by the Llama family) plus the experts."""
    E = read_field(raw, "num_local_experts", required=True, source=source)
    k = read_field(raw, "num_experts_per_tok", required=True, source=source)
    if not (isinstance(E, int) and isinstance(k, int) and 1 <= k <= E):
        raise ConfigError(f"{source}: num_experts_per_tok={k!r} must be between 1 and num_local_experts={E!r}")
    cfg = llama.config_from_hf({**raw, "model_type": "mistral"}, source)
    return dataclasses.replace(cfg, model_type="mixtral", num_experts=E, experts_per_token=k)


def config_to_hf(cfg: ModelConfig) -> dict:
    """The config.json that :func:`config_from_hf` reads back as ``cfg`` (for writing checkpoints)."""
    return dict(model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.ffn_dim, head_dim=cfg.head_dim,
                max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.layer_norm_eps,
                rope_theta=cfg.rope["rope_theta"], sliding_window=cfg.sliding_window,
                num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
                tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
                eos_token_id=cfg.eos_token_id, _name_or_path=cfg.name)


# --- checkpoint names -> parameter tree --------------------------------------------------------

def _part(a, index):
    # a slice of a stacked tensor, an array view or a StoredTensor over the sliced bytes
    return dataclasses.replace(a, data=a.data[index]) if isinstance(a, StoredTensor) else a[index]


def hub_names(cfg: ModelConfig, state: dict) -> dict:
    """The state dict under the hub's expert names: transformers' stacked ``mlp.experts.gate_up_proj``
    ``[E, 2F, C]`` / ``down_proj`` ``[E, C, F]`` and ``mlp.gate`` become ``block_sparse_moe.experts.{e}.w1``
    (the first F rows), ``w3`` (the last F), ``w2`` and ``block_sparse_moe.gate``. A tracked state
    stays tracked: each slice counts as taken from the stacked tensor it comes from."""
    out, F = dict(state), cfg.ffn_dim
    names = dict(getattr(state, "names", {}))
    origin = lambda key: names.get(key, key)  # noqa: E731  (the tensor's name in the file)
    for i in range(cfg.num_layers):
        fused, hub = f"layers.{i}.mlp.", f"layers.{i}.block_sparse_moe."
        if fused + "experts.gate_up_proj" not in state:
            continue
        gate_up, down = out.pop(fused + "experts.gate_up_proj"), out.pop(fused + "experts.down_proj", None)
        if down is None or gate_up.shape[0] != cfg.num_experts:
            raise CheckpointError(f"layer {i}: the stacked experts hold {gate_up.shape[0]} experts and "
                                  f"{'no' if down is None else 'a'} down_proj; config.json says {cfg.num_experts}")
        out[hub + "gate.weight"] = out.pop(fused + "gate.weight", None)
        names[hub + "gate.weight"] = origin(fused + "gate.weight")
        for e in range(cfg.num_experts):
            out[f"{hub}experts.{e}.w1.weight"] = _part(gate_up, (e, slice(0, F)))
            out[f"{hub}experts.{e}.w3.weight"] = _part(gate_up, (e, slice(F, 2 * F)))
            out[f"{hub}experts.{e}.w2.weight"] = _part(down, e)
            names[f"{hub}experts.{e}.w1.weight"] = names[f"{hub}experts.{e}.w3.weight"] = \
                origin(fused + "experts.gate_up_proj")
            names[f"{hub}experts.{e}.w2.weight"] = origin(fused + "experts.down_proj")
    out = {k: v for k, v in out.items() if v is not None}
    if isinstance(state, TrackedState):
        return TrackedState(out, taken=state.taken, names=names)
    return out


def params_from_state_dict(cfg: ModelConfig, state: dict, dtype, source: str) -> dict:
    """The parameter tree from a Mixtral state dict, in either layout (``model.`` prefix optional)."""
    state = hub_names(cfg, strip_prefix(state, ("model.",)))
    for i in range(cfg.num_layers):
        missing = [e for e in range(cfg.num_experts) if f"layers.{i}.block_sparse_moe.experts.{e}.w1.weight" not in state]
        if missing:
            raise CheckpointError(f"{source}: layer {i} lacks expert(s) {missing} of the {cfg.num_experts} that "
                                  "config.json's num_local_experts announces (incomplete download?)")
    take = Taker(state, dtype, source)
    C, F, V, D = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    H, G = cfg.num_heads, cfg.kv_heads
    lin = lambda key, c_in, c_out: take.linear(key, c_in, c_out, bias=False, transpose=True)  # noqa: E731

    embed = take("embed_tokens.weight", (V, C))
    params = {
        "embed_tokens": embed,                                                         # [V, C]
        "layers": [
            {
                "input_layernorm": {"g": take(f"layers.{i}.input_layernorm.weight", (C,))},
                "self_attn": {
                    "q_proj": lin(f"layers.{i}.self_attn.q_proj", C, H * D),
                    "k_proj": lin(f"layers.{i}.self_attn.k_proj", C, G * D),
                    "v_proj": lin(f"layers.{i}.self_attn.v_proj", C, G * D),
                    "o_proj": lin(f"layers.{i}.self_attn.o_proj", H * D, C),
                },
                "post_attention_layernorm": {"g": take(f"layers.{i}.post_attention_layernorm.weight", (C,))},
                "block_sparse_moe": {
                    "gate": lin(f"layers.{i}.block_sparse_moe.gate", C, cfg.num_experts),         # the router
                    "experts": [
                        {w: lin(f"layers.{i}.block_sparse_moe.experts.{e}.{w}", *shape)
                         for w, shape in (("w1", (C, F)), ("w2", (F, C)), ("w3", (C, F)))}
                        for e in range(cfg.num_experts)
                    ],
                },
            }
            for i in range(cfg.num_layers)
        ],
        "norm": {"g": take("norm.weight", (C,))},
    }
    w = embed if cfg.tie_word_embeddings else take("lm_head.weight", (V, C))
    params["lm_head"] = Linear(w.T, None)
    return params


# --- the mixture of experts ----------------------------------------------------------------------

def route(logits, k: int):
    """Top-k routing as transformers computes it: softmax over the E router logits, the k best
    experts, their probabilities renormalised to sum to 1 (in the logits' dtype)."""
    # [..., E] -> weights [..., k] float, experts [..., k] int
    xp = get_array_module(logits)
    p = nn.softmax(logits)
    chosen = xp.argsort(-p, axis=-1)[..., :k]
    top = xp.take_along_axis(p, chosen, axis=-1)
    return top / top.sum(axis=-1, keepdims=True), chosen


def swiglu(expert: dict, x, m):
    # [B, T_e, C], [B, T_e] -> [B, T_e, C]: w2(silu(w1 x) · w3 x), one expert
    gated = llama.silu(expert["w1"](x, m))
    gated *= expert["w3"](x, m)
    return expert["w2"](gated, m)


def moe(block_params: dict, k: int, h, m):
    """The sparse MoE block: every expert runs on the tokens routed to it, and only those.

    For expert e, each sequence's routed tokens are packed to the left of a ``[B, T_e, C]``
    batch (with its ``[B, T_e]`` real-token mask), so that the expert's leaves see sequences as
    every leaf does (per-sequence activation scales, calibration over real tokens) and a W8A8
    expert runs its INT8 GEMM on its own tokens. The outputs, times their routing weights, are
    added back in expert order, as transformers does. Holds one expert's batch at a time.
    """
    # [B, T, C], [B, T] -> [B, T, C]
    xp = get_array_module(h)
    B, _, C = h.shape
    weights, chosen = route(block_params["gate"](h, m), k)                       # [B, T, k] each
    out = xp.zeros_like(h)
    for e, expert in enumerate(block_params["experts"]):
        hit = chosen == e                                                        # [B, T, k]
        routed = hit.any(axis=-1)                                                # [B, T]
        if not bool(routed.any()):
            continue
        b, t = xp.nonzero(routed)                                                # the routed tokens
        rank = (xp.cumsum(routed, axis=1) - 1)[b, t]                             # their place in the batch
        T_e = int(routed.sum(axis=1).max())
        x_e = xp.zeros((B, T_e, C), h.dtype)
        x_e[b, rank] = h[b, t]
        m_e = xp.zeros((B, T_e), m.dtype)
        m_e[b, rank] = m[b, t]
        w_e = (weights * hit).sum(axis=-1)[b, t]                                 # [N_e] routing weights
        out[b, t] += swiglu(expert, x_e, m_e)[b, rank] * w_e[:, None]
    return out


# --- the forward pass, in pieces a layer-outer driver can call ----------------------------------

def embed(model, ids, positions, m):
    # [B, T] ids -> [B, T, C]: the token embedding only (positions enter through the rotary angles)
    return model.params["embed_tokens"][ids]


def layers(params) -> list:
    """The per-layer parameter dicts; layer i's dotted prefix is ``LAYER_PREFIX.format(i=i)``."""
    return params["layers"]


def attention_bias(config: ModelConfig, mask, T: int, dtype):
    """[B, S] mask -> [B, 1, T, S]: causal, padding and Mistral's sliding window (as the Llama family)."""
    return llama.attention_bias(config, mask, T, dtype)


def block(model, i, layer, x, bias, m, cache, positions=None):
    # [B, T, C], [B, 1, T, S] bias, [B, T] real-token mask m, [B, T] positions -> [B, T, C]
    cfg = model.config
    H, G, D, eps = cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.layer_norm_eps
    attn = layer["self_attn"]
    cos, sin = llama.rotary_tables(cfg, positions, x.dtype)                       # [B, T, 1, D]
    h = llama.rms_norm(x, layer["input_layernorm"]["g"], eps)
    q = llama.apply_rotary(attn["q_proj"](h, m), cos, sin, H)                      # [B, T, H*D]
    k = llama.apply_rotary(attn["k_proj"](h, m), cos, sin, G)                      # [B, T, G*D]
    a = self_attention(model, q, k, attn["v_proj"](h, m), cache, i, bias, D ** -0.5, m, kv_heads=G)
    x = x + attn["o_proj"](a, m)
    h = llama.rms_norm(x, layer["post_attention_layernorm"]["g"], eps)
    return x + moe(layer["block_sparse_moe"], cfg.experts_per_token, h, m)


def head(model, x, m):
    # [B, T, C], [B, T] -> [B, T, V] logits
    p = model.params
    return p["lm_head"](llama.rms_norm(x, p["norm"]["g"], model.config.layer_norm_eps), m)


# --- smoothing: what may be folded into what ------------------------------------------------------
# "*" in a row stands for every expert: foldable() writes one target per expert (or one row per
# expert when the source has it). The router comes first: its input statistics (all tokens) give s.

ROUTER, EXPERT = MOE + ".gate", MOE + ".experts.*"
SMOOTHING = (
    Mapping("ln_qkv", "layers.{i}.input_layernorm", "rmsnorm",
            ("layers.{i}.self_attn.q_proj", "layers.{i}.self_attn.k_proj", "layers.{i}.self_attn.v_proj"),
            "input_layernorm feeds q, k and v: one s shared by the three (official; the attention-only policy)"),
    Mapping("ln_fc1", "layers.{i}.post_attention_layernorm", "rmsnorm", (ROUTER, EXPERT + ".w1", EXPERT + ".w3"),
            "post_attention_layernorm feeds the router and every expert's w1 and w3: one s shared by all of "
            "them (the official rule); s comes from the router's input, which sees every token"),
    Mapping("w3_w2", EXPERT + ".w3", "linear", (EXPERT + ".w2",),
            "each expert's SwiGLU is linear in w3: silu(w1 x)·(w3 x / s) = (silu(w1 x)·w3 x)/s, so w3's "
            "outputs carry 1/s into w2 (one s per expert, from the tokens routed to it)"),
    Mapping("v_out", "layers.{i}.self_attn.v_proj", "linear", ("layers.{i}.self_attn.o_proj",),
            "attention averages v over tokens: Σ p·(v/s) = (Σ p·v)/s per channel (one factor per kv channel)"),
)

NOT_FOLDABLE = {
    "layers.{i}.block_sparse_moe.gate alone, or the experts alone":
        "the router and the experts read the same post_attention_layernorm output: dividing it by s and "
        "scaling only the router's rows changes every expert's input (and the reverse changes the routing)",
    "layers.{i}.block_sparse_moe.experts.{e}.w1 -> w2":
        "silu(x/s) != silu(x)/s: SiLU is not positively homogeneous",
    "layers.{i}.self_attn.q_proj / k_proj outputs":
        "RoPE mixes channel j with channel j + D/2 of each head, so a per-channel factor does not commute with it",
}

# The two policies in use: the official code's (attention and the MoE input) and the one of
# llm-compressor and TensorRT-LLM, which leave the router and the experts alone.
POLICIES = {"official": ("ln_qkv", "ln_fc1"), "attention-only": ("ln_qkv",)}
DEFAULT_GROUPS = POLICIES["official"]


def foldable(config, chosen: list) -> list:
    """The chosen rows with "*" written out for every expert, after :func:`check_moe_rows`."""
    E = config.num_experts

    def every(name):   # "...experts.*.w1" -> one name per expert
        return [name.replace("*", str(e)) for e in range(E)] if "*" in name else [name]

    out = []
    for m in chosen:
        if "*" in m.source:
            out += [dataclasses.replace(m, source=m.source.replace("*", str(e)),
                                        targets=tuple(t.replace("*", str(e)) for t in m.targets)) for e in range(E)]
        else:
            out.append(dataclasses.replace(m, targets=tuple(n for t in m.targets for n in every(t))))
    check_moe_rows(config, out)
    return out


def check_moe_rows(config, rows: list) -> None:
    """ConfigError for a row that smooths some of the linears reading post_attention_layernorm
    (the router and every expert's w1 and w3) but not all of them, or that scales one of them
    with a factor folded elsewhere: the router without its experts, or the reverse."""
    readers = [ROUTER] + [f"{MOE}.experts.{e}.{w}" for e in range(config.num_experts) for w in ("w1", "w3")]
    for m in rows:
        touched = [r for r in readers if r in m.targets]
        if not touched:
            continue
        if m.source != "layers.{i}.post_attention_layernorm" or len(touched) != len(readers):
            left = [r for r in readers if r not in m.targets]
            raise ConfigError(
                f"smoothing row {m.group!r} ({m.source} -> {len(touched)} of the {len(readers)} linears that read "
                f"post_attention_layernorm; not {left[:3]}...) is not an equivalence: "
                + NOT_FOLDABLE["layers.{i}.block_sparse_moe.gate alone, or the experts alone"])


def default_groups(config) -> tuple:
    """The groups the demo smooths: the official policy."""
    return DEFAULT_GROUPS


# --- attention's q, k, v, tokenizer: as the Llama family ------------------------------------------

QKV_OUTPUTS = llama.QKV_OUTPUTS
attention_input_absmax = llama.attention_input_absmax
SPECIAL_TOKENS = llama.SPECIAL_TOKENS


# --- the synthetic-outlier recipe (see minisq.synthetic) ---------------------------------------------

def synthetic_config(cfg: ModelConfig) -> ModelConfig:
    """A Mixtral-shaped synthetic config: Llama's, with 4 experts and top-2 unless given."""
    cfg = llama.synthetic_config(cfg)
    return dataclasses.replace(cfg, num_experts=cfg.num_experts or 4, experts_per_token=cfg.experts_per_token or 2)


def synthetic_state_dict(cfg: ModelConfig, normal, gain, bias, final_gain) -> dict:
    """An HF-named state dict (hub layout) drawn with the generic helpers of :mod:`minisq.synthetic`:
    both RMSNorm gains of every layer from ``gain()`` (planted outliers), the last from ``final_gain()``."""
    C, F, V, D = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    H, G = cfg.num_heads, cfg.kv_heads
    sd = {"embed_tokens.weight": normal(V, C)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        sd[p + "input_layernorm.weight"], sd[p + "post_attention_layernorm.weight"] = gain(), gain()
        for name, (c_out, c_in) in (("self_attn.q_proj", (H * D, C)), ("self_attn.k_proj", (G * D, C)),
                                    ("self_attn.v_proj", (G * D, C)), ("self_attn.o_proj", (C, H * D))):
            sd[p + name + ".weight"] = normal(c_out, c_in)
        sd[p + "block_sparse_moe.gate.weight"] = normal(cfg.num_experts, C, std=0.1)
        for e in range(cfg.num_experts):
            for w, shape in (("w1", (F, C)), ("w2", (C, F)), ("w3", (F, C))):
                sd[f"{p}block_sparse_moe.experts.{e}.{w}.weight"] = normal(*shape)
    sd["norm.weight"] = final_gain()
    return sd
