"""One config for both model families, read from a Hugging Face ``config.json``.

GPT-2 and OPT are the same decoder-only transformer with different names and a few
switches. :class:`ModelConfig` keeps the shared numbers under one set of names (the legend
used across minisq: ``C`` hidden, ``H`` heads, ``D = C // H`` head dim, ``F`` MLP width,
``V`` vocab, ``P`` positions) and the family switches beside them. Anything a real
checkpoint could set that minisq does not implement is refused with a :class:`ConfigError`
naming the option, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .errors import CheckpointError, ConfigError

MODEL_TYPES = ("gpt2", "opt")
# Activation names as spelled in HF configs -> minisq's implementation.
# "gelu_new" and "gelu_pytorch_tanh" are the same tanh approximation of GELU.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture of a GPT-2 or OPT checkpoint.

    Defaults are GPT-2 small's. ``position_offset`` is 2 for OPT, whose learned position
    table has two extra leading rows (a fairseq legacy), and 0 for GPT-2.
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
    # tokens
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # A label shown everywhere the model is printed; "synthetic" models say so here.
    name: str = ""

    @property
    def head_dim(self) -> int:       # D
        return self.hidden_size // self.num_heads

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


def _get(raw: dict, key: str, default=None, required: bool = False, source: str = ""):
    if key not in raw or raw[key] is None:
        if required:
            raise ConfigError(f"{source}: config.json has no {key!r}, which a {raw.get('model_type')} model needs")
        return default
    return raw[key]


def _check_activation(name: str, source: str) -> str:
    if name not in ACTIVATIONS:
        raise ConfigError(
            f"{source}: activation_function {name!r} is not supported; minisq implements {sorted(ACTIVATIONS)}"
        )
    return name


def config_from_hf(raw: dict, source: str = "config.json") -> ModelConfig:
    """Map a Hugging Face config dict (GPT-2 or OPT) to a :class:`ModelConfig`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; minisq loads {MODEL_TYPES} "
            "(GPT-2 and OPT checkpoints)"
        )
    if model_type == "gpt2":
        return _gpt2_config(raw, source)
    return _opt_config(raw, source)


def _gpt2_config(raw: dict, source: str) -> ModelConfig:
    if raw.get("add_cross_attention"):
        raise ConfigError(f"{source}: add_cross_attention=True (an encoder-decoder GPT-2) is not supported")
    C = _get(raw, "n_embd", required=True, source=source)
    n_inner = _get(raw, "n_inner")
    cfg = ModelConfig(
        model_type="gpt2",
        vocab_size=_get(raw, "vocab_size", required=True, source=source),
        hidden_size=C,
        num_layers=_get(raw, "n_layer", required=True, source=source),
        num_heads=_get(raw, "n_head", required=True, source=source),
        ffn_dim=n_inner if n_inner else 4 * C,
        max_positions=_get(raw, "n_positions", 1024),
        layer_norm_eps=float(_get(raw, "layer_norm_epsilon", 1e-5)),
        activation=_check_activation(_get(raw, "activation_function", "gelu_new"), source),
        scale_attn_weights=bool(_get(raw, "scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(_get(raw, "scale_attn_by_inverse_layer_idx", False)),
        reorder_and_upcast_attn=bool(_get(raw, "reorder_and_upcast_attn", False)),
        bos_token_id=_get(raw, "bos_token_id", 50256),
        eos_token_id=_get(raw, "eos_token_id", 50256),
        pad_token_id=_get(raw, "pad_token_id"),
        name=raw.get("_name_or_path", "") or "",
    )
    return _validate(cfg, source)


def _opt_config(raw: dict, source: str) -> ModelConfig:
    C = _get(raw, "hidden_size", required=True, source=source)
    proj = _get(raw, "word_embed_proj_dim", C)
    cfg = ModelConfig(
        model_type="opt",
        vocab_size=_get(raw, "vocab_size", required=True, source=source),
        hidden_size=C,
        num_layers=_get(raw, "num_hidden_layers", required=True, source=source),
        num_heads=_get(raw, "num_attention_heads", required=True, source=source),
        ffn_dim=_get(raw, "ffn_dim", required=True, source=source),
        max_positions=_get(raw, "max_position_embeddings", 2048),
        layer_norm_eps=1e-5,  # OPT's LayerNorms use torch's default eps
        activation=_check_activation(_get(raw, "activation_function", "relu"), source),
        do_layer_norm_before=bool(_get(raw, "do_layer_norm_before", True)),
        word_embed_proj_dim=proj if proj != C else None,
        enable_bias=bool(_get(raw, "enable_bias", True)),
        layer_norm_elementwise_affine=bool(_get(raw, "layer_norm_elementwise_affine", True)),
        remove_final_layer_norm=bool(_get(raw, "_remove_final_layer_norm", False)),
        position_offset=2,
        bos_token_id=_get(raw, "bos_token_id", 2),
        eos_token_id=_get(raw, "eos_token_id", 2),
        pad_token_id=_get(raw, "pad_token_id", 1),
        name=raw.get("_name_or_path", "") or "",
    )
    return _validate(cfg, source)


def _validate(cfg: ModelConfig, source: str) -> ModelConfig:
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_dim", "max_positions"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(
            f"{source}: hidden size {cfg.hidden_size} is not divisible by the number of heads {cfg.num_heads}"
        )
    return cfg


def read_config(folder: Path) -> ModelConfig:
    """Read ``folder/config.json`` into a :class:`ModelConfig`, with clear errors."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a Hugging Face model folder needs a config.json beside its weights")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the file looks corrupt, re-download it") from None
    cfg = config_from_hf(raw, source=str(path))
    if not cfg.name:
        cfg = dataclasses.replace(cfg, name=Path(folder).name)
    return cfg
