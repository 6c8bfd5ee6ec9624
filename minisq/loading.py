"""Load a Hugging Face checkpoint into a minisq :class:`~minisq.model.Model`.

``minisq.load("gpt2")`` (hub id, fetched into the usual HF cache) or
``minisq.load("/path/to/folder")`` (a local folder with ``config.json`` and weights).
The model's family (:mod:`minisq.families`, by config.json's ``model_type``) reads its
config and maps the checkpoint's tensors to the parameter tree: every tensor is checked
against the config, with a message naming the tensor, and every linear weight is
normalized to ``[C_in, C_out]`` (``y = x @ w + b``): GPT-2's Conv1D already stores
``[in, out]``; ``nn.Linear`` (OPT and the rest) stores ``[out, in]`` and is transposed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .backend import check_device
from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .export import load_saved
from .families import params_from_state_dict, read_config  # noqa: F401  (params_from_state_dict: public here)
from .hub import resolve_model_dir
from .model import FLOAT_DTYPES, Model
from .synthetic import synthetic_model
from .tokenizer import load_tokenizer


def load(name_or_path: str | Path, dtype: str = "float32", device: str = "cpu", tokenizer: bool = True) -> Model:
    """Load a checkpoint of a supported family (local folder or hub id) as a float :class:`Model`.

    ``dtype`` is the compute dtype (float32 by default; float64 for equivalence checks).
    A folder written by ``model.save`` (smoothed or quantized) is loaded back as it was saved.
    """
    if str(name_or_path) == "synthetic":
        return synthetic_model(dtype=dtype).to(device)
    if np.dtype(dtype).name not in FLOAT_DTYPES:
        raise ConfigError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    check_device(device)
    folder = resolve_model_dir(name_or_path)
    if (folder / "minisq.json").is_file():
        model = Model(**load_saved(folder))
        return model.to(device) if device != "cpu" else model
    config = read_config(folder)
    from .checkpoint import read_state_dict
    state = read_state_dict(folder)
    params = params_from_state_dict(config, state, np.dtype(dtype), source=str(folder))
    tok = _maybe_tokenizer(folder, config) if tokenizer else None
    model = Model(config, params, tokenizer=tok, info={"source": str(name_or_path)})
    return model.to(device) if device != "cpu" else model


def _maybe_tokenizer(folder: Path, config: ModelConfig):
    try:
        return load_tokenizer(folder, config.model_type)
    except CheckpointError:
        return None  # a weights-only folder still runs on token ids
