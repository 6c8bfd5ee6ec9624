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

import warnings
from pathlib import Path

import numpy as np

from ..backend import check_device
from .checkpoint import bf16_to_float32, decode, float32_to_bf16
from ..config import ModelConfig
from ..errors import ConfigError, MinisqError, NonFiniteError
from .compressed_tensors import is_compressed_tensors, load_compressed_tensors
from .export import load_saved
from ..families import params_from_state_dict, read_config  # noqa: F401  (params_from_state_dict: public here)
from .hub import resolve_model_dir
from ..model import FLOAT_DTYPES, Model
from .storage import STORAGE_DTYPES, StoredTensor
from ..synthetic import synthetic_model
from .tokenizer import load_tokenizer


def load(name_or_path: str | Path, dtype: str = "float32", device: str = "cpu", tokenizer: bool = True,
         lazy: bool = False) -> Model:
    """Load a checkpoint of a supported family (local folder or hub id) as a float :class:`Model`.

    ``dtype``: "float32" (default) or "float64" (for equivalence checks) load every weight
    converted to that dtype, which is also the compute dtype. "float16" or "bfloat16" keep
    the weights in that dtype in memory (half of float32; bfloat16 as its raw bits) and
    compute each layer in float32 (see :mod:`minisq.io.storage`).

    ``lazy=True`` memory-maps the checkpoint instead of reading it: weights stay in the file
    (page cache) in its own dtype, and one decoder layer at a time is widened to the
    compute dtype (float32, or float64 with ``dtype="float64"``) while it runs. Forward,
    calibration and evaluation then run layer by layer; peak memory is about one layer plus
    the activations. A lazily loaded weight is not scanned for NaN/inf at load time (that
    would read the whole file); a NaN shows up as a ``NonFiniteError`` from the forward pass.

    ``dtype`` is the compute dtype (float32 by default; float64 for equivalence checks).
    A folder written by ``model.save`` (smoothed or quantized) is loaded back as it was saved
    (with ``lazy=True``, its arrays are read-only memory-mapped views of its files), and a
    compressed-tensors int-quantized W8A8 checkpoint as a W8A8 model
    (:mod:`minisq.io.compressed_tensors`).
    """
    try:
        dtype = "bfloat16" if str(dtype) == "bfloat16" else np.dtype(dtype).name
    except TypeError:   # not a dtype NumPy knows ("float8", 3, ...)
        pass
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    if not isinstance(lazy, bool) or not isinstance(tokenizer, bool):
        raise ConfigError(f"lazy and tokenizer must be True or False, got {lazy!r} and {tokenizer!r}")
    if str(name_or_path) == "synthetic":
        return synthetic_model(dtype=dtype if dtype in FLOAT_DTYPES else "float32").to(device)
    check_device(device)
    folder = resolve_model_dir(name_or_path)
    if (folder / "minisq.json").is_file():
        model = Model(**load_saved(folder, lazy=lazy))
        return model.to(device) if device != "cpu" else model
    if is_compressed_tensors(folder):   # W8A8 from llm-compressor or model.save(format="compressed-tensors")
        if lazy or dtype not in ("float32", "float64"):
            raise ConfigError("a compressed-tensors checkpoint loads eagerly in float32 or float64 "
                              "(its int8 codes are held as they are)")
        model = Model(**load_compressed_tensors(folder, dtype))
        return model.to(device) if device != "cpu" else model
    config = read_config(folder)
    from .checkpoint import read_state_dict
    stored = lazy or dtype in ("float16", "bfloat16")
    compute = "float64" if dtype == "float64" else "float32"
    state = read_state_dict(folder, raw=stored, lazy=lazy)
    if stored:
        state = {k: _stored(k, elem, a, "as_stored" if lazy else dtype, str(folder)) for k, (elem, a) in state.items()}
    params = params_from_state_dict(config, state, np.dtype(compute), source=str(folder))
    tok = _maybe_tokenizer(folder, config) if tokenizer else None
    info = {"source": str(name_or_path)}
    if stored:
        info["storage"] = {"dtype": "as stored" if lazy else dtype, "lazy": bool(lazy), "compute": compute}
    if lazy and device != "cpu":
        raise ConfigError("a lazy (memory-mapped) model runs on the CPU; load it eagerly to use a GPU")
    model = Model(config, params, tokenizer=tok, info=info)
    return model.to(device) if device != "cpu" else model


def _stored(key: str, elem: str, a: np.ndarray, storage: str, source: str):
    """A state-dict entry kept as stored: a :class:`StoredTensor` for float tensors, the
    decoded array for anything else. ``storage`` "float16"/"bfloat16" converts to that type
    (round to nearest even; exact when the file already holds it) after checking the values
    are finite; "as_stored" keeps the file's bytes (memory-mapped) unread."""
    if elem not in ("f2", "bf16", "f4", "f8"):
        return decode(np.asarray(a), elem)
    if storage != "as_stored":
        finite = np.isfinite(bf16_to_float32(a) if elem == "bf16" else a)
        if not finite.all():
            raise NonFiniteError(f"{source}: tensor {key!r} holds {int((~finite).sum())} NaN/inf values; "
                                 "the checkpoint is corrupt (or was saved after a diverged training run)")
    target = {"float16": "f2", "bfloat16": "bf16"}.get(storage, elem)
    if target != elem:
        wide = bf16_to_float32(a) if elem == "bf16" else a.astype(np.float32)
        a, elem = (wide.astype(np.float16), "f2") if target == "f2" else (float32_to_bf16(wide), "bf16")
    return StoredTensor(a, elem)


# Files any tokenizer of a model folder is read from; a folder with none of them is weights-only.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


def _maybe_tokenizer(folder: Path, config: ModelConfig):
    """The folder's tokenizer; None for a weights-only folder (it still runs on token ids), and
    None with a warning saying why when tokenizer files are there but cannot be used."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return load_tokenizer(folder, config.model_type)
    except MinisqError as e:
        warnings.warn(f"the tokenizer was dropped, the model runs on token ids only: {e}", stacklevel=3)
        return None
