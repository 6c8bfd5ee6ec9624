"""Load a Hugging Face GPT-2 or OPT checkpoint into a minisq :class:`~minisq.model.Model`.

``minisq.load("gpt2")`` (hub id, fetched into the usual HF cache) or
``minisq.load("/path/to/folder")`` (a local folder with ``config.json`` and weights).
Every tensor is checked against the config, with a message naming the tensor, and every
linear weight is normalized to ``[C_in, C_out]`` (``y = x @ w + b``): GPT-2's Conv1D
already stores ``[in, out]``; OPT's ``nn.Linear`` stores ``[out, in]`` and is transposed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .backend import check_device
from .config import ModelConfig, read_config
from .errors import CheckpointError, ConfigError, NonFiniteError, ShapeError
from .model import FLOAT_DTYPES, Model
from .nn import Linear


def load(name_or_path: str | Path, dtype: str = "float32", device: str = "cpu", tokenizer: bool = True) -> Model:
    """Load a GPT-2/OPT checkpoint (local folder or hub id) as a float :class:`Model`.

    ``dtype`` is the compute dtype (float32 by default; float64 for equivalence checks).
    A folder written by ``model.save`` (smoothed or quantized) is loaded back as it was saved.
    """
    from .hub import resolve_model_dir

    if str(name_or_path) == "synthetic":
        from .synthetic import synthetic_model
        return synthetic_model(dtype=dtype).to(device)
    if np.dtype(dtype).name not in FLOAT_DTYPES:
        raise ConfigError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    check_device(device)
    folder = resolve_model_dir(name_or_path)
    if (folder / "minisq.json").is_file():
        from .export import load_saved
        return load_saved(folder, device=device)
    config = read_config(folder)
    from .checkpoint import read_state_dict
    state = read_state_dict(folder)
    params = params_from_state_dict(config, state, np.dtype(dtype), source=str(folder))
    tok = _maybe_tokenizer(folder, config) if tokenizer else None
    model = Model(config, params, tokenizer=tok, info={"source": str(name_or_path)})
    return model.to(device) if device != "cpu" else model


def _maybe_tokenizer(folder: Path, config: ModelConfig):
    from .tokenizer import load_tokenizer

    try:
        return load_tokenizer(folder, config.model_type)
    except CheckpointError:
        return None  # a weights-only folder still runs on token ids


def _strip_prefix(state: dict, prefixes: tuple) -> dict:
    # checkpoints differ: "transformer.h.0..." vs "h.0...", "model.decoder.layers..." vs "decoder.layers..."
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


class _Taker:
    """Takes tensors out of a state dict, checking each shape against the config."""

    def __init__(self, state: dict, dtype: np.dtype, source: str):
        self.state, self.dtype, self.source = state, dtype, source

    def __call__(self, key: str, shape: tuple, transpose: bool = False):
        if key not in self.state:
            raise CheckpointError(
                f"{self.source}: tensor {key!r} is missing from the checkpoint; the weights do not match "
                "config.json (wrong or incomplete download?)"
            )
        a = self.state[key]
        if a.dtype.kind != "f":
            raise ShapeError(f"{self.source}: tensor {key!r} has dtype {a.dtype}, expected a float tensor")
        stored = tuple(reversed(shape)) if transpose else tuple(shape)
        if tuple(a.shape) != stored:
            raise ShapeError(
                f"{self.source}: tensor {key!r} has shape {tuple(a.shape)}, but config.json implies {stored}"
            )
        if not np.isfinite(a).all():
            raise NonFiniteError(
                f"{self.source}: tensor {key!r} holds {int((~np.isfinite(a)).sum())} NaN/inf values; "
                "the checkpoint is corrupt (or was saved after a diverged training run)"
            )
        if transpose:
            a = a.T
        # a fresh, contiguous array of the compute dtype: nothing is shared with the file
        return np.ascontiguousarray(a, dtype=self.dtype)

    def linear(self, key: str, c_in: int, c_out: int, bias: bool = True, transpose: bool = False) -> Linear:
        w = self(f"{key}.weight", (c_in, c_out), transpose=transpose)
        b = self(f"{key}.bias", (c_out,)) if bias else None
        return Linear(w, b)

    def norm(self, key: str, C: int, affine: bool = True) -> dict:
        if not affine:
            return {"g": None, "b": None}
        return {"g": self(f"{key}.weight", (C,)), "b": self(f"{key}.bias", (C,))}


def params_from_state_dict(config: ModelConfig, state: dict, dtype=np.float32, source: str = "checkpoint") -> dict:
    """The parameter tree of a model from its (HF-named) state dict."""
    build = {"gpt2": _gpt2_params, "opt": _opt_params}[config.model_type]
    return build(config, state, np.dtype(dtype), source)


def _gpt2_params(cfg: ModelConfig, state: dict, dtype, source: str) -> dict:
    take = _Taker(_strip_prefix(state, ("transformer.",)), dtype, source)
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
    params["lm_head"] = _lm_head(take, "lm_head.weight", wte, V, C)
    return params


def _opt_params(cfg: ModelConfig, state: dict, dtype, source: str) -> dict:
    take = _Taker(_strip_prefix(state, ("model.decoder.", "decoder.", "model.")), dtype, source)
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
    params["lm_head"] = _lm_head(take, "lm_head.weight", embed, V, E)
    return params


def _lm_head(take: _Taker, key: str, embedding, V: int, C: int) -> Linear:
    # The output projection is usually tied to the token embedding and then absent from the file.
    # Either way it is [V, C] in the file; the leaf holds its transpose [C, V] (a view, no copy).
    w = take(key, (V, C)) if key in take.state else embedding
    return Linear(w.T, None)
