"""Save and reload smoothed and quantized models: safetensors for the arrays, JSON for the rest.

A saved folder holds

* ``model.safetensors``: every array of the parameter tree under its dotted name —
  float weights, LayerNorm gains, and for quantized leaves (W8A8 and the baselines of
  :mod:`minisq.baselines`) the int8 weights (``.w_q``), their scales (``.w_scale``), biases
  and static activation scales (``.x_scale``); LLM.int8()'s threshold is in the JSON;
* ``minisq.json``: what it is — the config, the tree's skeleton (which leaf is float and
  which W8A8, with its activation granularity and path), the preset and α used, and the
  smoothing factors' tensor names;
* ``tokenizer.json`` and ``tokenizer_config.json`` (its special tokens) when the model has a tokenizer.

A big model written layer by layer (:func:`minisq.quantize_checkpoint`) keeps its arrays in
several safetensors shards instead, listed under ``"shards"`` in ``minisq.json``.

The float weights are not needed to reload a quantized model, and a reloaded model gives
bit-identical logits. ``minisq.load(folder)`` recognizes such a folder by its minisq.json.
``model.save(folder, format="compressed-tensors")`` writes the ecosystem's W8A8 format instead
(:mod:`minisq.io.compressed_tensors`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from ..config import ModelConfig, check_types, validate
from ..errors import CheckpointError, ConfigError
from ..families import family_for
from ..nn import Linear
from ..baselines import GroupW8A8Linear, LLMInt8Linear, W8A16Linear
from ..qlinear import ACT_GRANULARITIES, PATHS, AttentionQuant, W8A8Linear
from .jsonfile import parse_json, read_json
from .storage import materialize
from .tokenizer import load_tokenizer
from ..tree import _walk, is_linear_leaf

FORMAT = "minisq-model-v1"
LEAF_TYPES = {"Linear": Linear, "W8A8Linear": W8A8Linear, "W8A16Linear": W8A16Linear,
              "GroupW8A8Linear": GroupW8A8Linear, "LLMInt8Linear": LLMInt8Linear}


def _encode(node, name: str, tensors: dict, embedding=None):
    """The JSON skeleton of a tree; arrays go into ``tensors`` under their dotted name."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, dict):
        return {"dict": {k: _encode(v, f"{name}.{k}" if name else k, tensors, embedding) for k, v in node.items()}}
    if isinstance(node, (list, tuple)):
        return {"list": [_encode(v, f"{name}.{i}", tensors, embedding) for i, v in enumerate(node)]}
    if hasattr(node, "shape") and hasattr(node, "dtype"):
        arr = np.ascontiguousarray(to_numpy(node))
        if embedding is not None and node is not embedding and _is_transpose_of(node, embedding):
            return {"transpose_of": _name_of(tensors, embedding)}   # the tied lm_head: not stored twice
        tensors[name] = arr
        return {"tensor": name}
    if is_linear_leaf(node) and type(node).__name__ in LEAF_TYPES:
        fields = {f.name: _encode(getattr(node, f.name), f"{name}.{f.name}", tensors, embedding)
                  for f in dataclasses.fields(node)}
        return {"leaf": type(node).__name__, "fields": fields}
    raise ConfigError(f"cannot save {name!r}: a {type(node).__name__} (save the model itself, not a "
                      "calibration wrapper)")


def _is_transpose_of(a, b) -> bool:
    return a.ndim == 2 and a.shape == b.shape[::-1] and a.base is not None and np.shares_memory(a, b)


def _name_of(tensors: dict, array) -> str:
    for k, v in tensors.items():
        if v is array or np.shares_memory(v, array):
            return k
    raise ConfigError("internal: tied tensor saved before its source")


def _decode(node, tensors: dict, source: str):
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if "dict" in node:
        return {k: _decode(v, tensors, source) for k, v in node["dict"].items()}
    if "list" in node:
        return [_decode(v, tensors, source) for v in node["list"]]
    if "tensor" in node:
        if node["tensor"] not in tensors:
            raise CheckpointError(f"{source}: tensor {node['tensor']!r} is missing from model.safetensors")
        return tensors[node["tensor"]]
    if "transpose_of" in node:
        return tensors[node["transpose_of"]].T
    if "leaf" in node:
        cls = LEAF_TYPES.get(node["leaf"])
        if cls is None:
            raise CheckpointError(f"{source}: unknown leaf type {node['leaf']!r}")
        return cls(**{k: _decode(v, tensors, source) for k, v in node["fields"].items()})
    raise CheckpointError(f"{source}: unreadable entry {str(node)[:80]}")


# format name -> what model.save(folder, format=...) writes
SAVE_FORMATS = ("minisq", "compressed-tensors")


def save_model(model, folder, format: str = "minisq") -> Path:
    """Write ``model`` (float, smoothed or quantized) to ``folder``; returns the folder.
    ``format="compressed-tensors"``: see :mod:`minisq.io.compressed_tensors`."""
    from safetensors.numpy import save_file

    if format not in SAVE_FORMATS:
        raise ConfigError(f"format={format!r} is not one of {SAVE_FORMATS}")
    if format == "compressed-tensors":
        from .compressed_tensors import save_compressed_tensors
        return save_compressed_tensors(model, folder)

    if model.device != "cpu":
        model = model.to("cpu")
    if model.stored:   # weights kept as float16/bfloat16 or memory-mapped: written in the compute dtype
        model = model.evolve(params=materialize(model.params, model.dtype),
                             info={k: v for k, v in model.info.items() if k != "storage"})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    embedding = model._embedding()
    # the embedding first, so that the tied lm_head can refer to it
    params = {family_for(model.config).EMBEDDING: embedding,
              **{k: v for k, v in model.params.items() if v is not embedding}}
    skeleton = _encode(params, "", tensors, embedding)
    info = _encode(model.info, "info", tensors)
    attn = None
    if model.attn_quant is not None:
        if not isinstance(model.attn_quant, AttentionQuant):
            raise ConfigError(f"cannot save a custom attention quantizer {model.attn_quant!r}")
        fields = {f.name: getattr(model.attn_quant, f.name) for f in dataclasses.fields(AttentionQuant)}
        attn = _encode(fields, "attn_quant", tensors)
    meta = dict(format=FORMAT, config=model.config.to_dict(), params=skeleton, info=info, attn_quant=attn,
                tokenizer=model.tokenizer is not None)
    save_file(tensors, str(folder / "model.safetensors"),
              metadata={"format": FORMAT, "config": config_fingerprint(model.config.to_dict())})
    (folder / "minisq.json").write_text(json.dumps(meta, indent=1))
    if model.tokenizer is not None:
        model.tokenizer.save(folder)
    return folder


def config_fingerprint(config: dict) -> str:
    """The config as canonical JSON: stored in the tensors' file, so that an edited minisq.json
    is caught by comparing the two."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def load_saved(folder, lazy: bool = False) -> dict:
    """Read a folder written by :func:`save_model`: the fields of a
    :class:`~minisq.model.Model` (``minisq.load`` builds the model from them).

    minisq.json is checked against the tensors it describes: its config must be valid (types
    and ranges, as for a config.json), equal to the config recorded in the tensors' file when
    there is one, and agree with the tree (as many layers as ``num_layers``, an embedding of
    ``[V, E]``); every leaf's settings must be ones minisq knows. ``lazy`` memory-maps the
    shards instead of reading them: the arrays are read-only views of the files (page cache,
    not the program's memory), so a W8A8 model of any depth runs with only its activations
    and one GEMM workspace in memory."""
    from .checkpoint import read_safetensors, read_safetensors_metadata
    from .dtypes import decode

    folder = Path(folder)
    path = folder / "minisq.json"
    meta = read_json(path, what="the saved model looks corrupt, save it again")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    shards = meta.get("shards", ["model.safetensors"])
    if not isinstance(shards, list) or not all(isinstance(shard, str) for shard in shards):
        raise CheckpointError(f"{path}: shards must be a list of file names, got {shards!r:.80}")
    tensors = {}
    for shard in shards:
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{path} names the shard {shard!r}, which is not a file in {folder}")
        if not (folder / shard).is_file():
            raise CheckpointError(f"{folder} lacks {shard}, which {path.name} lists: the saved model is "
                                  "incomplete (an interrupted copy or run?); save or quantize it again")
        recorded = read_safetensors_metadata(folder / shard).get("config")
        if recorded is not None and recorded != config_fingerprint(meta.get("config")):
            raise CheckpointError(f"{path}: its config differs from the one {shard} was saved with "
                                  f"({_config_diff(parse_json(recorded.encode(), shard), meta.get('config'))}); "
                                  "minisq.json was edited: restore it or save the model again")
        if lazy:   # read-only views of the file (no copy for int8, float16 and float32)
            tensors.update({k: decode(a, elem) for k, (elem, a) in read_safetensors(folder / shard, lazy=True).items()})
        else:
            tensors.update(read_safetensors(folder / shard))
    try:
        config = ModelConfig.from_dict(meta["config"])
        params = _decode(meta["params"], tensors, str(folder))
        info = _decode(meta["info"], tensors, str(folder))
        attn = meta.get("attn_quant")
        attn_fields = _decode(attn, tensors, str(folder)) if attn else None
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is malformed ({type(exc).__name__}: {str(exc)[:200]}); "
                              "save the model again") from None
    check_types(config, str(path))
    family = family_for(config, str(path))
    getattr(family, "validate", validate)(config, str(path))
    _check_tree(config, family, params, str(path))
    attn_quant = None
    if attn_fields:
        try:
            if attn_fields.get("static") is not None:
                attn_fields["static"] = tuple(tuple(scales) for scales in attn_fields["static"])
            attn_quant = AttentionQuant(**attn_fields)
        except (TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{path}: attn_quant is malformed ({exc}); save the model again") from None
    tokenizer = None
    if meta.get("tokenizer"):
        tokenizer = load_tokenizer(folder, config.model_type)
    return dict(config=config, params=params, tokenizer=tokenizer, info=info, attn_quant=attn_quant)


def _config_diff(saved, edited) -> str:
    if not (isinstance(saved, dict) and isinstance(edited, dict)):
        return "not an object"
    keys = sorted(k for k in set(saved) | set(edited) if saved.get(k) != edited.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r:.30} in the tensors, {edited.get(k)!r:.30} in minisq.json" for k in keys[:4])


# Settings of a linear leaf that select code paths: the values minisq implements.
LEAF_CHOICES = {"acts": ACT_GRANULARITIES, "path": PATHS}


def _check_tree(config: ModelConfig, family, params, source: str) -> None:
    """The decoded tree agrees with the config: ``num_layers`` layers, a ``[V, E]`` embedding,
    and leaf settings minisq implements."""
    layers = family.layers(params)
    if not isinstance(layers, list) or len(layers) != config.num_layers:
        held = len(layers) if isinstance(layers, list) else type(layers).__name__
        raise CheckpointError(f"{source}: num_layers is {config.num_layers} but the saved tree holds {held} "
                              "layers; minisq.json was edited or is damaged: save the model again")
    embedding = params.get(family.EMBEDDING)
    if getattr(embedding, "shape", None) != (config.vocab_size, config.embed_dim):
        raise CheckpointError(f"{source}: the embedding is {getattr(embedding, 'shape', None)}, but the config "
                              f"says [{config.vocab_size}, {config.embed_dim}]; save the model again")
    for name, leaf in _walk(params, ""):
        for field, allowed in LEAF_CHOICES.items():
            value = getattr(leaf, field, None)
            if value is not None and value not in allowed:
                raise CheckpointError(f"{source}: leaf {name!r} has {field}={value!r:.40}; minisq implements "
                                      f"{allowed}: save the model again")
        if getattr(leaf, "acts", None) == "static" and getattr(leaf, "x_scale", None) is None:
            raise CheckpointError(f"{source}: leaf {name!r} has static activations but no x_scale")


def folder_bytes(folder) -> int:
    """Total size of the files in a folder (for reporting checkpoint sizes)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())

