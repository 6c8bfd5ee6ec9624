"""One module per model family; :data:`FAMILIES` finds it by config.json's ``model_type``.

Everything minisq knows about an architecture lives in its family's file, and the generic
code (loading, the forward driver in :mod:`minisq.model`, calibration, smoothing,
quantization, evaluation, export, the synthetic model) asks the family instead of branching
on ``model_type``. Adding a family is one new file plus its tests; read ``gpt2.py`` first,
then ``docs/adding-a-family.md`` (shown on BLOOM; Falcon and Mixtral for the harder cases).

A family module provides (legend: B batch, T new tokens, S past + new tokens, C hidden, V vocab):

``MODEL_TYPES``
    the config.json ``model_type`` values it loads.
``config_from_hf(raw, source) -> ModelConfig``
    its config.json, with a :class:`~minisq.ConfigError` naming any option it does not implement.
``params_from_state_dict(config, state, dtype, source) -> dict``
    checkpoint tensor names -> the parameter tree (linear weights ``[C_in, C_out]``, tied lm_head),
    taking each tensor through :class:`~minisq.families.base.Taker`, which notes it: a tensor
    no family code took is refused by name (see :func:`params_from_state_dict` below).
``IGNORED_TENSORS`` (optional)
    regex patterns of checkpoint names that hold no weights (GPT-2's causal-mask buffers).
``EMBEDDING``
    the key of the token embedding ``[V, E]`` in the tree (its dtype and device are the model's).
The forward pass, in pieces a layer-outer (streamed) driver can call one at a time:

``embed(model, ids, positions, mask) -> x [B, T, C]``
    ``ids``/``positions``/``mask`` ``[B, T]``; ``mask`` marks real tokens (1) and padding (0).
``attention_bias(config, mask, T, dtype) -> bias [B, 1, T, S] or [B, H, T, S]``
    the additive attention mask from the ``[B, S]`` real-token mask of all S tokens (causal
    and padding; Mistral also its sliding window; BLOOM's ALiBi per head), computed once and
    given to every block.
``layers(params) -> list``
    the per-layer parameter dicts; ``LAYER_PREFIX.format(i=i)`` is layer i's dotted name
    (``h.{i}``, ``layers.{i}``), the prefix of every tensor and leaf in it.
``block(model, i, layer_params, x, bias, mask, cache, positions=None) -> x [B, T, C]``
    one decoder layer. ``bias`` ``[B, 1, T, S]`` is the additive attention mask, ``mask``
    ``[B, T]`` the real-token mask every linear leaf receives as ``leaf(x, mask)``, ``cache``
    a :class:`~minisq.model.KVCache` or None (extended in place), ``positions`` ``[B, T]``
    (families with rotary embeddings need them; others ignore them). Attention goes through
    :func:`minisq.families.base.self_attention` (and ``model.attn_quant`` when quantized).
``head(model, x, mask) -> logits [B, T, V]``
    final norm and the output projection.

Smoothing, calibration, tokenizer and synthetic model:

``SMOOTHING``, ``NOT_FOLDABLE``, ``DEFAULT_GROUPS``, ``foldable(config, chosen)``, ``default_groups(config)``
    its rows of the smoothing table (:class:`~minisq.families.base.Mapping`, each with its
    reason), the places that look smoothable but are not (and why), and which rows a given
    config can use (Falcon: its layout's rows; Mixtral: "*" written out for every expert, and
    a row that scales the router apart from its experts refused).
``QKV_OUTPUTS``, ``attention_input_absmax(config, which, channel_absmax)``
    ``(leaf, part, parts)`` for q, k, v: the output of ``leaf`` cut into ``parts`` equal
    pieces along C_out, piece ``part``; and the static range of attention's q/k/v input from
    that piece's calibrated per-channel ranges (its max, or a bound when RoPE rotates first).
``SPECIAL_TOKENS``
    the :class:`~minisq.families.base.SpecialTokens` defaults of its tokenizer files.
``synthetic_config(config)``, ``synthetic_state_dict(config, normal, gain, bias, final_gain)``
    its synthetic-outlier recipe (see :mod:`minisq.synthetic`).
``KEEP_FLOAT`` (optional)
    leaf-name patterns :func:`minisq.quantize` keeps in float by default (Mixtral's router).

Nothing here is model-specific except through the modules themselves; hub downloads
(:mod:`minisq.io.hub`) happen before the config is read and need no family.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..io.jsonfile import read_json
from . import bloom, falcon, gpt2, llama, mixtral, opt
from .base import TrackedState

# model_type -> family module
FAMILIES = {model_type: family for family in (gpt2, opt, llama, bloom, falcon, mixtral) for model_type in family.MODEL_TYPES}

# Leaf-name patterns that quantize() keeps in float by default, from the families that have
# them (Mixtral's router), beside the LM head: see minisq.qlinear.DEFAULT_SKIP.
KEEP_FLOAT = tuple(p for family in dict.fromkeys(FAMILIES.values()) for p in getattr(family, "KEEP_FLOAT", ()))


def family_for(model_type: str, source: str = ""):
    """The family module of ``model_type`` (a str or anything with ``.model_type``)."""
    model_type = getattr(model_type, "model_type", model_type)
    family = FAMILIES.get(model_type)
    if family is None:
        where = f"{source}: " if source else ""
        raise ConfigError(
            f"{where}model_type {model_type!r} is not supported; minisq loads {tuple(FAMILIES)}"
        )
    return family


def config_from_hf(raw: dict, source: str = "config.json"):
    """Map a Hugging Face config dict to a :class:`~minisq.config.ModelConfig`, through its family."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise ConfigError(f"{source}: model_type must be a string such as 'gpt2', got {model_type!r:.60}")
    return family_for(model_type, source).config_from_hf(raw, source)


def read_config(folder: Path):
    """Read ``folder/config.json`` into a :class:`~minisq.config.ModelConfig`, with clear errors."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a Hugging Face model folder needs a config.json beside its weights")
    raw = read_json(path, what="the file looks corrupt, re-download it")
    cfg = config_from_hf(raw, source=str(path))
    if not cfg.name:
        cfg = dataclasses.replace(cfg, name=Path(folder).name)
    return cfg


def params_from_state_dict(config, state: dict, dtype, source: str = "checkpoint") -> dict:
    """The parameter tree of a model from its (HF-named) state dict, through its family.

    Every tensor of the state dict must be used: one the config does not account for (a
    layer past ``num_layers``, a bias the config turns off, an lm_head the config ties to
    the embedding) means config.json does not describe these weights, and is refused with
    its name. Buffers that hold no weights (a family's ``IGNORED_TENSORS`` patterns, such
    as GPT-2's causal-mask ``attn.bias``) are skipped."""
    family = family_for(config)
    tracked = TrackedState(state)
    params = family.params_from_state_dict(config, tracked, np.dtype(dtype), source)
    ignored = [re.compile(p) for p in getattr(family, "IGNORED_TENSORS", ())]
    unused = [k for k in state if k not in tracked.taken and not any(p.search(k) for p in ignored)]
    if unused:
        shown = ", ".join(repr(k) for k in sorted(unused, key=_natural)[:8])
        more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
        raise CheckpointError(
            f"{source}: {len(unused)} tensor(s) of the checkpoint are not used by its config "
            f"({config.model_type}, {config.num_layers} layers): {shown}{more}. config.json does not "
            "describe these weights (an edited or mismatched config.json?); fix config.json or the weights")
    return params


def _natural(name: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
