"""One config for every model family, read from a Hugging Face ``config.json``.

The decoder-only transformers minisq loads share most of their numbers under different
names. Each family module (:mod:`minisq.families`) reads its own config.json into this one
dataclass (``minisq.families.read_config`` finds the family by ``model_type``).
:class:`ModelConfig` keeps the shared numbers under one set of names (the legend used
across minisq: ``C`` hidden, ``H`` heads, ``D = C // H`` head dim, ``F`` MLP width, ``V``
vocab, ``P`` positions) and the family switches beside them. Anything a real
checkpoint could set that minisq does not implement is refused with a :class:`ConfigError`
naming the option, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math

from .errors import ConfigError

# Activation names as spelled in HF configs -> minisq's implementation.
# "gelu_new" and "gelu_pytorch_tanh" are the same tanh approximation of GELU.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture of a checkpoint of any supported family.

    Defaults are GPT-2 small's. ``position_offset`` is 2 for OPT, whose learned position
    table has two extra leading rows (a fairseq legacy), and 0 for GPT-2. The Llama-family
    switches (Llama, Mistral, Qwen2) default to "absent", so GPT-2/OPT configs ignore them.
    """

    model_type: str = "gpt2"
    vocab_size: int = 50257          # V
    hidden_size: int = 768           # C
    num_layers: int = 12
    num_heads: int = 12              # H
    ffn_dim: int = 3072              # F
    max_positions: int = 1024        # P: the longest sequence the model can see
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    # GPT-2 switches
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False   # scores /= (layer index + 1)
    reorder_and_upcast_attn: bool = False           # fp16 trick; a no-op for our fp32/fp64 math
    # OPT switches
    do_layer_norm_before: bool = True               # False: post-LN (opt-350m)
    word_embed_proj_dim: int | None = None          # embedding width when != C (opt-350m: 512)
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    remove_final_layer_norm: bool = False
    position_offset: int = 0
    # Llama-family switches (llama, mistral, qwen2)
    num_kv_heads: int | None = None                 # G: key/value heads (GQA: G < H; MQA: G = 1); None = H
    head_size: int | None = None                    # D when config.json sets head_dim != C // H
    rope: dict | None = None                        # rotary embedding: {"rope_type", "rope_theta", ...}
    qkv_bias: bool = False                          # q, k, v projections have biases (Qwen2)
    o_bias: bool = False                            # o_proj has a bias (Llama attention_bias=True)
    mlp_bias: bool = False                          # gate, up, down have biases
    sliding_window: int | None = None               # Mistral: a query sees at most this many keys
    tie_word_embeddings: bool = True                # lm_head is the token embedding (else read from the file)
    # BLOOM / Falcon / Mixtral switches
    alibi: bool = False                             # ALiBi: a per-head linear bias on key distance, no positions
    parallel_attn: bool = False                     # Falcon: attention and MLP read the same input, summed
    new_decoder_architecture: bool = False          # Falcon-40B/180B: ln_attn + ln_mlp, grouped kv heads
    num_experts: int | None = None                  # Mixtral: experts per MoE block (None: a dense MLP)
    experts_per_token: int | None = None            # Mixtral: top-k experts each token is routed to
    # tokens
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None           # a list when several tokens end text (Llama 3)
    pad_token_id: int | None = None
    # A label shown everywhere the model is printed; "synthetic" models say so here.
    name: str = ""

    @property
    def head_dim(self) -> int:       # D
        return self.head_size or self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:       # G: heads of k and v (= H without grouped-query attention)
        return self.num_kv_heads or self.num_heads

    @property
    def embed_dim(self) -> int:      # width of the token embedding (= C except opt-350m)
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def is_synthetic(self) -> bool:
        return "synthetic" in self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown minisq config keys {sorted(unknown)}")
        return cls(**d)


# What a config.json value of each kind may be. JSON's true/false are not numbers here
# (Python calls them ints), and a string is never a boolean: "false" would count as true.
KINDS = {
    "int": ("an integer", lambda v: type(v) is int),
    "float": ("a number", lambda v: type(v) in (int, float) and math.isfinite(v)),
    "bool": ("true or false", lambda v: type(v) is bool),
    "str": ("a string", lambda v: type(v) is str),
    "ids": ("a token id or a list of them", lambda v: type(v) is int or (
        type(v) is list and all(type(i) is int for i in v))),
}


def read_field(raw: dict, key: str, default=None, required: bool = False, source: str = "", kind: str | None = None):
    """``raw[key]`` (``default`` when absent or null), checked to be of ``kind`` (see KINDS)
    with a :class:`ConfigError` naming the field; a "float" comes back as a float."""
    if key not in raw or raw[key] is None:
        if required:
            raise ConfigError(f"{source}: config.json has no {key!r}, which a {raw.get('model_type')} model needs")
        return default
    value = raw[key]
    if kind is None:
        return value
    what, ok = KINDS[kind]
    if not ok(value):
        raise ConfigError(f"{source}: {key} must be {what}, got {value!r:.60}")
    return float(value) if kind == "float" else value


def check_activation(name: str, source: str) -> str:
    if name not in ACTIVATIONS:
        raise ConfigError(
            f"{source}: activation_function {name!r} is not supported; minisq implements {sorted(ACTIVATIONS)}"
        )
    return name


# The kinds each ModelConfig field may hold, from its annotation ("int | None" -> int or None).
_ANNOTATION_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
                     "dict": (dict,), "list": (list,), "None": (type(None),)}


def check_types(cfg: ModelConfig, source: str) -> None:
    """Every field of ``cfg`` holds what its annotation says (a bool is not an int, a float
    is finite), else a ConfigError naming the field. Guards configs not read through
    :func:`read_field`, such as a saved model's minisq.json."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        parts = [_ANNOTATION_TYPES.get(part.strip()) for part in str(field.type).split("|")]
        if None in parts:      # an annotation this table does not know: nothing to check against
            continue
        allowed = tuple(t for types in parts for t in types)
        ok = isinstance(value, allowed) and (type(value) is not bool or bool in allowed)
        if ok and isinstance(value, float):
            ok = math.isfinite(value)
        if ok and field.name == "eos_token_id" and isinstance(value, list):
            ok = all(type(i) is int for i in value)
        if not ok:
            raise ConfigError(f"{source}: {field.name} must be {field.type}, got {value!r:.60}")


def validate(cfg: ModelConfig, source: str) -> ModelConfig:
    """The checks every family's config passes: field types, positive sizes, heads that divide
    the hidden size, a positive epsilon."""
    check_types(cfg, source)
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_dim", "max_positions"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
    if cfg.head_size is None and cfg.hidden_size % cfg.num_heads:
        raise ConfigError(
            f"{source}: hidden size {cfg.hidden_size} is not divisible by the number of heads {cfg.num_heads}"
        )
    if not cfg.layer_norm_eps > 0:
        raise ConfigError(f"{source}: the normalization epsilon must be > 0, got {cfg.layer_norm_eps!r}")
    for key in ("num_kv_heads", "head_size", "word_embed_proj_dim", "sliding_window"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
    if not 0 <= cfg.position_offset <= 2:
        raise ConfigError(f"{source}: position_offset must be 0, 1 or 2, got {cfg.position_offset!r}")
    return cfg
