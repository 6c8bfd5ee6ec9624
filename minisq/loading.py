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
from .checkpoint import bf16_to_float32, float32_to_bf16
from .config import ModelConfig, read_config
from .errors import CheckpointError, ConfigError, NonFiniteError, ShapeError
from .model import FLOAT_DTYPES, Model
from .nn import Linear
from .storage import STORAGE_DTYPES, StoredTensor


def load(name_or_path: str | Path, dtype: str = "float32", device: str = "cpu", tokenizer: bool = True,
         lazy: bool = False) -> Model:
    """Load a GPT-2/OPT checkpoint (local folder or hub id) as a float :class:`Model`.

    ``dtype``: "float32" (default) or "float64" (for equivalence checks) load every weight
    converted to that dtype, which is also the compute dtype. "float16" or "bfloat16" keep
    the weights in that dtype in memory (half of float32; bfloat16 as its raw bits) and
    compute each layer in float32 (see :mod:`minisq.storage`).

    ``lazy=True`` memory-maps the checkpoint instead of reading it: weights stay in the file
    (page cache) in its own dtype, and one decoder layer at a time is widened to the
    compute dtype (float32, or float64 with ``dtype="float64"``) while it runs. Forward,
    calibration and evaluation then run layer by layer; peak memory is about one layer plus
    the activations. A lazily loaded weight is not scanned for NaN/inf at load time (that
    would read the whole file); a NaN shows up as a ``NonFiniteError`` from the forward pass.

    A folder written by ``model.save`` (smoothed or quantized) is loaded back as it was saved.
    """
    from .hub import resolve_model_dir

    dtype = str(np.dtype(dtype)) if dtype != "bfloat16" else dtype
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    if str(name_or_path) == "synthetic":
        from .synthetic import synthetic_model
        return synthetic_model(dtype=dtype if dtype in FLOAT_DTYPES else "float32").to(device)
    check_device(device)
    folder = resolve_model_dir(name_or_path)
    if (folder / "minisq.json").is_file():
        from .export import load_saved
        return load_saved(folder, device=device)
    config = read_config(folder)
    from .checkpoint import read_state_dict
    stored = lazy or dtype in ("float16", "bfloat16")
    compute = "float64" if dtype == "float64" else "float32"
    state = read_state_dict(folder, raw=stored, lazy=lazy)
    params = params_from_state_dict(config, state, np.dtype(compute), source=str(folder),
                                    storage=None if not stored else ("as_stored" if lazy else dtype))
    tok = _maybe_tokenizer(folder, config) if tokenizer else None
    info = {"source": str(name_or_path)}
    if stored:
        info["storage"] = {"dtype": "as stored" if lazy else dtype, "lazy": bool(lazy), "compute": compute}
    model = Model(config, params, tokenizer=tok, info=info)
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
    """Takes tensors out of a state dict, checking each shape against the config.

    ``storage`` None: every tensor becomes a fresh array of the compute ``dtype``.
    "float16"/"bfloat16": a :class:`~minisq.storage.StoredTensor` in that dtype (the state
    holds ``(element type, stored array)`` pairs). "as_stored": a StoredTensor of the
    file's own bytes (memory-mapped when the state was read lazily).
    """

    def __init__(self, state: dict, dtype: np.dtype, source: str, storage: str | None = None):
        self.state, self.dtype, self.source, self.storage = state, dtype, source, storage

    def __call__(self, key: str, shape: tuple, transpose: bool = False):
        if key not in self.state:
            raise CheckpointError(
                f"{self.source}: tensor {key!r} is missing from the checkpoint; the weights do not match "
                "config.json (wrong or incomplete download?)"
            )
        a = self.state[key]
        elem = None
        if self.storage is not None:
            elem, a = a
            if elem not in ("f2", "bf16", "f4", "f8"):
                raise ShapeError(f"{self.source}: tensor {key!r} has element type {elem}, expected a float tensor")
        elif a.dtype.kind != "f":
            raise ShapeError(f"{self.source}: tensor {key!r} has dtype {a.dtype}, expected a float tensor")
        stored = tuple(reversed(shape)) if transpose else tuple(shape)
        if tuple(a.shape) != stored:
            raise ShapeError(
                f"{self.source}: tensor {key!r} has shape {tuple(a.shape)}, but config.json implies {stored}"
            )
        if self.storage != "as_stored":   # lazily mapped tensors are not read here (see load)
            finite = np.isfinite(bf16_to_float32(a) if elem == "bf16" else a)
            if not finite.all():
                raise NonFiniteError(
                    f"{self.source}: tensor {key!r} holds {int((~finite).sum())} NaN/inf values; "
                    "the checkpoint is corrupt (or was saved after a diverged training run)"
                )
        if self.storage is not None:
            return StoredTensor(*_convert_stored(elem, a, self.storage), transpose=transpose)
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


def _convert_stored(elem: str, a: np.ndarray, storage: str) -> tuple:
    """(stored array, element type) kept for ``storage``: the file's own bytes ("as_stored"),
    or converted to float16 / bfloat16 bits (round to nearest even; exact when the file
    already holds that type)."""
    target = {"float16": "f2", "bfloat16": "bf16"}.get(storage, elem)
    if target == elem:
        return a, elem
    wide = bf16_to_float32(a) if elem == "bf16" else a.astype(np.float32)
    if target == "f2":
        return wide.astype(np.float16), "f2"
    return float32_to_bf16(wide), "bf16"


def params_from_state_dict(config: ModelConfig, state: dict, dtype=np.float32, source: str = "checkpoint",
                           storage: str | None = None) -> dict:
    """The parameter tree of a model from its (HF-named) state dict (``storage``: see _Taker)."""
    build = {"gpt2": _gpt2_params, "opt": _opt_params}[config.model_type]
    return build(config, state, np.dtype(dtype), source, storage)


def _gpt2_params(cfg: ModelConfig, state: dict, dtype, source: str, storage=None) -> dict:
    take = _Taker(_strip_prefix(state, ("transformer.",)), dtype, source, storage)
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


def _opt_params(cfg: ModelConfig, state: dict, dtype, source: str, storage=None) -> dict:
    take = _Taker(_strip_prefix(state, ("model.decoder.", "decoder.", "model.")), dtype, source, storage)
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
