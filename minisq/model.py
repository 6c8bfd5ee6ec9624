"""A decoder-only transformer (GPT-2 and OPT) as pure array code over a parameter tree.

Legend: B batch, T new tokens, S tokens attended to (past + new), C hidden, H heads,
D head dim, F MLP width, V vocab, E token-embedding width (= C except opt-350m).

The parameters are nested dicts under the checkpoint's own names (``h.3.attn.c_attn``
for GPT-2, ``layers.3.self_attn.q_proj`` for OPT), with one kind of leaf for every linear
layer (see :mod:`minisq.nn`): ``model.linears()`` lists them by dotted name and
``model.replace_linears(fn)`` returns a new model with some of them swapped, which is all
that calibration and quantization need. A model is never changed in place.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from . import nn
from .backend import get_array_module, to_device, to_numpy
from .config import ModelConfig
from .errors import ConfigError, InputError, NonFiniteError

FLOAT_DTYPES = ("float16", "float32", "float64")


class KVCache:
    """Keys and values of the tokens seen so far, per layer, and their padding mask.

    Layer i's keys are ``keys[i][:, :, :length]`` ``[B, H, S, D]`` (likewise values), kept
    in buffers with room to grow, so that decoding one token appends in place instead of
    copying the whole cache every step (which made long generations quadratic in memory
    traffic). ``mask`` is ``[B, S]`` (1 = real). A cache is decoding state: each
    ``forward(..., cache=cache)`` extends it and returns it.
    """

    def __init__(self, num_layers: int, reserve: int = 0):
        self.keys = [None] * num_layers
        self.values = [None] * num_layers
        self.mask = None
        self.length = 0
        self.reserve = reserve   # capacity to allocate at the first append (e.g. prompt + new tokens)

    def update(self, i: int, k, v):
        # [B, H, T, D] new keys/values of layer i -> all of layer i's [B, H, S, D] (views)
        end = self.length + k.shape[2]
        for store in (self.keys, self.values):
            buf = store[i]
            if buf is None or buf.shape[2] < end:
                xp = get_array_module(k)
                old = 0 if buf is None else buf.shape[2]
                grown = xp.empty(k.shape[:2] + (max(end, self.reserve, 2 * old), k.shape[3]), dtype=k.dtype)
                if buf is not None:
                    grown[:, :, :self.length] = buf[:, :, :self.length]
                store[i] = grown
        self.keys[i][:, :, self.length:end] = k
        self.values[i][:, :, self.length:end] = v
        return self.keys[i][:, :, :end], self.values[i][:, :, :end]

    def advance(self, mask) -> None:
        """Record that the new tokens are in: ``mask`` ``[B, S]`` covers all of them."""
        self.mask = mask
        self.length = mask.shape[1]


def is_linear_leaf(node) -> bool:
    """True for the swappable linear leaves of the parameter tree (anything callable that is
    not a container or array)."""
    return callable(node) and not isinstance(node, (dict, list, tuple)) and not hasattr(node, "shape")


def _walk(node, prefix: str):
    # yields (dotted name, leaf) for every linear leaf below node
    if isinstance(node, dict):
        for key, child in node.items():
            yield from _walk(child, f"{prefix}{key}.")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _walk(child, f"{prefix}{i}.")
    elif is_linear_leaf(node):
        yield prefix[:-1], node


def _map(node, fn, prefix: str):
    # a new tree where every linear leaf is replaced by fn(name, leaf); arrays are shared
    if isinstance(node, dict):
        return {key: _map(child, fn, f"{prefix}{key}.") for key, child in node.items()}
    if isinstance(node, list):
        return [_map(child, fn, f"{prefix}{i}.") for i, child in enumerate(node)]
    if is_linear_leaf(node):
        return fn(prefix[:-1], node)
    return node


def get_param(params, dotted: str):
    """The node at a dotted name of a parameter tree, e.g. ``get_param(p, "h.0.ln_1")``."""
    node = params
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def replace_param(params, dotted: str, value):
    """A new tree with the node at ``dotted`` replaced by ``value``. The containers along
    the path are copied, everything else is shared: the input tree is not changed."""
    head, _, rest = dotted.partition(".")
    if isinstance(params, list):
        out = list(params)
        i = int(head)
        out[i] = replace_param(params[i], rest, value) if rest else value
        return out
    out = dict(params)
    out[head] = replace_param(params[head], rest, value) if rest else value
    return out


class Model:
    """A GPT-2 or OPT language model: config + parameter tree (+ tokenizer).

    ``model(input_ids, attention_mask=None)`` gives logits ``[B, T, V]`` (or ``[T, V]``
    for ``[T]`` ids). ``info`` records what was done to the model (smoothing, quantization)
    so that it can be printed, saved and compared.
    """

    def __init__(self, config: ModelConfig, params: dict, tokenizer=None, info: dict | None = None,
                 attn_matmul: Callable | None = None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.info = dict(info or {})
        # Batched matmul used inside attention (q·kᵀ and p·v); None = float ``@``.
        # The opt-in INT8 attention BMM of minisq.quantize sets it.
        self.attn_matmul = attn_matmul

    # --- the parameter tree -------------------------------------------------------------
    def linears(self) -> dict:
        """Every linear leaf by dotted checkpoint name, e.g. ``{"h.0.attn.c_attn": leaf}``."""
        return dict(_walk(self.params, ""))

    def replace_linears(self, fn: Callable, **info) -> "Model":
        """A new model whose linear leaves are ``fn(name, leaf)``; ``info`` is merged into
        the new model's info. The original is untouched."""
        params = _map(self.params, fn, "")
        return self.evolve(params=params, info={**self.info, **info})

    def evolve(self, **changes) -> "Model":
        """A shallow copy with some fields replaced (params, config, info, attn_matmul, tokenizer)."""
        fields = dict(config=self.config, params=self.params, tokenizer=self.tokenizer,
                      info=self.info, attn_matmul=self.attn_matmul)
        fields.update(changes)
        return Model(**fields)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._embedding().dtype)

    @property
    def device(self) -> str:
        return "cpu" if get_array_module(self._embedding()) is np else "gpu"

    def _embedding(self):
        return self.params["wte"] if self.config.model_type == "gpt2" else self.params["embed_tokens"]

    def __repr__(self) -> str:
        c = self.config
        label = c.name or c.model_type
        done = ", ".join(f"{k}={v}" for k, v in self.info.items() if not isinstance(v, dict)) or "float"
        return (f"Model({label!r}: {c.model_type}, {c.num_layers} layers, C={c.hidden_size}, "
                f"H={c.num_heads}, V={c.vocab_size}, {self.dtype}, {self.device}; {done})")

    # --- forward ------------------------------------------------------------------------
    def __call__(self, input_ids, attention_mask=None):
        logits, _ = self.forward(input_ids, attention_mask)
        return logits

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None, use_cache: bool = False,
                trace: list | None = None):
        """Logits for ``input_ids`` ``[B, T]`` (or ``[T]``) and the updated KV cache.

        With ``cache``, ``input_ids`` are the T new tokens after the cached ones and
        ``attention_mask`` (if given) covers all S = past + T tokens. A ``trace`` list
        receives ``(name, hidden [B, T, C])`` after the embeddings and after every block
        (used by the per-layer equivalence report).
        Returns ``(logits [B, T, V], cache or None)``.
        """
        ids, mask, squeeze = self._check_inputs(input_ids, attention_mask, cache)
        xp = get_array_module(self._embedding())
        ids, mask = xp.asarray(ids), xp.asarray(mask)
        T = ids.shape[1]
        # Positions count real tokens only, so left padding does not shift them.
        positions = xp.maximum(xp.cumsum(mask, axis=1) - 1, 0)[:, -T:]   # [B, T]
        bias = nn.attention_bias(mask, T, self.dtype)                     # [B, 1, T, S]
        if cache is None and use_cache:
            cache = KVCache(self.config.num_layers)
        forward = FORWARDS[self.config.model_type]
        logits = forward(self, ids, positions, bias, cache, trace if trace is not None else [])
        if not nn.all_finite(logits):
            raise NonFiniteError(
                f"the forward pass produced NaN/inf logits ({self.dtype}). In float16 this is the known "
                "activation overflow of GPT-2/OPT (values beyond 65504): run in float32; otherwise check "
                "the weights and inputs"
            )
        if cache is not None:
            cache.advance(mask)
        return (logits[0] if squeeze else logits), cache

    def _check_inputs(self, input_ids, attention_mask, cache):
        ids = to_numpy(input_ids)
        squeeze = ids.ndim == 1
        if squeeze:
            ids = ids[None]
        if ids.ndim != 2:
            raise InputError(f"input_ids must be [T] or [B, T] token ids, got shape {ids.shape}")
        if ids.size == 0:
            raise InputError(f"input_ids is empty (shape {ids.shape}): give at least one token")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids must be integers (token ids), got dtype {ids.dtype}")
        V = self.config.vocab_size
        bad = (ids < 0) | (ids >= V)
        if bad.any():
            b, t = np.argwhere(bad)[0]
            raise InputError(
                f"token id {ids[b, t]} at position [{b}, {t}] is outside the vocabulary [0, {V}); "
                "was the text encoded with this model's tokenizer?"
            )
        past = cache.length if cache is not None else 0
        S = past + ids.shape[1]
        if attention_mask is None:
            mask = np.ones((ids.shape[0], S), dtype=np.int64)
            if cache is not None:
                mask[:, :past] = to_numpy(cache.mask)
        else:
            mask = to_numpy(attention_mask)
            if squeeze and mask.ndim == 1:
                mask = mask[None]
            if mask.shape != (ids.shape[0], S):
                raise InputError(
                    f"attention_mask has shape {mask.shape}, expected {(ids.shape[0], S)} "
                    f"(batch, cached {past} + new {ids.shape[1]} tokens)"
                )
            if not np.isin(mask, (0, 1)).all():
                raise InputError("attention_mask must hold only 0 (padding) and 1 (real token)")
            mask = mask.astype(np.int64)
        if S > self.config.max_positions:
            raise InputError(
                f"sequence of {S} tokens is longer than the model's context of "
                f"{self.config.max_positions} positions; truncate it or evaluate in windows"
            )
        return ids, mask, squeeze

    # --- generation ---------------------------------------------------------------------
    def generate(self, prompt_or_ids, max_new_tokens: int = 20, temperature: float = 0.0,
                 top_k: int | None = None, seed: int | None = None, stop_at_eos: bool = False):
        """Continue a prompt with the KV cache: greedy when ``temperature == 0``, else
        sampling from ``softmax(logits / temperature)`` restricted to the ``top_k`` best.

        A string prompt (needs the tokenizer) gives back the whole text, prompt included.
        Token ids ``[T]`` or ``[B, T]`` give back the ids ``[.., T + new]``. A batch of
        prompts of different lengths is passed left-padded with an ``attention_mask`` via
        :meth:`generate_ids`.
        """
        if isinstance(prompt_or_ids, str):
            if self.tokenizer is None:
                raise InputError("a text prompt needs a tokenizer; this model has none, pass token ids")
            ids = np.asarray(self.tokenizer.encode(prompt_or_ids), dtype=np.int64)
            # OPT's embedding has padding rows past the tokenizer's vocabulary: never pick them
            out = self.generate_ids(ids[None], max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_k=top_k, seed=seed, stop_at_eos=stop_at_eos,
                                    vocab_limit=self.tokenizer.vocab_size)
            return self.tokenizer.decode(out[0].tolist())
        ids = to_numpy(prompt_or_ids)
        squeeze = ids.ndim == 1
        out = self.generate_ids(ids[None] if squeeze else ids, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k, seed=seed, stop_at_eos=stop_at_eos)
        return out[0] if squeeze else out

    def generate_ids(self, ids, attention_mask=None, max_new_tokens: int = 20, temperature: float = 0.0,
                     top_k: int | None = None, seed: int | None = None, stop_at_eos: bool = False,
                     vocab_limit: int | None = None):
        # [B, T] int, [B, T] -> [B, T + new] int (NumPy); only ids < vocab_limit are picked
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ConfigError(f"top_k must be a positive integer or None, got {top_k}")
        rng = np.random.default_rng(seed)
        ids = np.asarray(ids)
        mask = np.ones(ids.shape, np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        eos = self.config.eos_token_id
        done = np.zeros(ids.shape[0], dtype=bool)
        cache = KVCache(self.config.num_layers, reserve=ids.shape[1] + max_new_tokens)
        logits, cache = self.forward(ids, mask, cache=cache)
        out = [ids]
        for step in range(max_new_tokens):
            nxt = _pick(to_numpy(logits[:, -1, :vocab_limit]).astype(np.float64), temperature, top_k, rng)  # [B]
            if stop_at_eos and eos is not None:
                nxt = np.where(done, eos, nxt)
                done |= nxt == eos
            out.append(nxt[:, None])
            if step == max_new_tokens - 1 or (stop_at_eos and done.all()):
                break
            mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)
            logits, cache = self.forward(nxt[:, None], mask, cache=cache)
        return np.concatenate(out, axis=1)

    def save(self, folder):
        """Write this model (float, smoothed or quantized) to ``folder``; reload it with
        ``minisq.load(folder)``. See :mod:`minisq.export`."""
        from .export import save_model

        return save_model(self, folder)

    # --- conversions --------------------------------------------------------------------
    def to(self, device: str) -> "Model":
        """The same model with every array on 'cpu' (NumPy) or 'gpu' (CuPy)."""
        return self.evolve(params=_map_arrays(self.params, lambda a: to_device(a, device)))

    def astype(self, dtype) -> "Model":
        """The same float model in another float dtype (float32 or float64 for equivalence checks)."""
        dtype = np.dtype(dtype)
        if dtype.name not in FLOAT_DTYPES:
            raise ConfigError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        return self.evolve(params=_map_arrays(self.params, lambda a: a.astype(dtype) if a.dtype.kind == "f" else a))


def _map_arrays(node, fn):
    # apply fn to every array of the tree, rebuilding dataclass leaves field by field
    if isinstance(node, dict):
        return {k: _map_arrays(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [_map_arrays(v, fn) for v in node]
    if hasattr(node, "shape") and hasattr(node, "dtype"):
        return fn(node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {f.name: _map_arrays(getattr(node, f.name), fn) for f in dataclasses.fields(node)}
        return dataclasses.replace(node, **changes)
    return node


def _pick(logits, temperature: float, top_k: int | None, rng) -> np.ndarray:
    # [B, V] float64 -> [B] int64: greedy or top-k temperature sampling
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    u = rng.random((z.shape[0], 1))
    return (p.cumsum(axis=-1) < u).sum(axis=-1).clip(max=z.shape[-1] - 1)


# --- the two families ---------------------------------------------------------------------

def _self_attention(model, q, k, v, cache, i, bias, scale):
    # [B, T, C] x3 (+ layer i's cached [B, H, S-T, D] keys/values) -> [B, T, C]
    H = model.config.num_heads
    q, k, v = (nn.split_heads(a, H) for a in (q, k, v))
    if cache is not None:
        k, v = cache.update(i, k, v)                                 # [B, H, S, D]
    if model.attn_matmul is None:
        a = nn.attention_causal_blocked(q, k, v, bias, scale)        # float: skip the masked half
    else:
        a = nn.attention(q, k, v, bias, scale, matmul=model.attn_matmul)  # INT8 BMM: one call
    return nn.merge_heads(a)


def _gpt2_forward(model, ids, positions, bias, cache, trace):
    # [B, T] ids, [B, T] positions -> [B, T, V] logits (cache extended in place)
    cfg, p = model.config, model.params
    act = nn.ACTIVATION_FNS[cfg.activation]
    x = p["wte"][ids] + p["wpe"][positions]                          # [B, T, C]
    trace.append(("embeddings", x))
    for i, layer in enumerate(p["h"]):
        scale = (cfg.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0)
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= i + 1
        h = nn.layer_norm(x, **layer["ln_1"], eps=cfg.layer_norm_eps)
        qkv = layer["attn"]["c_attn"](h)                             # [B, T, 3C]
        q, k, v = (qkv[..., j * cfg.hidden_size:(j + 1) * cfg.hidden_size] for j in range(3))
        a = _self_attention(model, q, k, v, cache, i, bias, scale)
        x = x + layer["attn"]["c_proj"](a)
        h = nn.layer_norm(x, **layer["ln_2"], eps=cfg.layer_norm_eps)
        x = x + layer["mlp"]["c_proj"](act(layer["mlp"]["c_fc"](h)))  # [B, T, F] inside
        trace.append((f"h.{i}", x))
    x = nn.layer_norm(x, **p["ln_f"], eps=cfg.layer_norm_eps)
    return p["lm_head"](x)                                            # [B, T, V]


def _opt_forward(model, ids, positions, bias, cache, trace):
    # [B, T] ids, [B, T] positions -> [B, T, V] logits (cache extended in place)
    cfg, p = model.config, model.params
    act = nn.ACTIVATION_FNS[cfg.activation]
    eps = cfg.layer_norm_eps
    x = p["embed_tokens"][ids]                                        # [B, T, E]
    if p["project_in"] is not None:
        x = p["project_in"](x)                                        # [B, T, C]
    x = x + p["embed_positions"][positions + cfg.position_offset]
    trace.append(("embeddings", x))
    pre = cfg.do_layer_norm_before
    for i, layer in enumerate(p["layers"]):
        attn = layer["self_attn"]
        h = nn.layer_norm(x, **layer["self_attn_layer_norm"], eps=eps) if pre else x
        a = _self_attention(model, attn["q_proj"](h), attn["k_proj"](h), attn["v_proj"](h),
                            cache, i, bias, cfg.head_dim ** -0.5)
        x = x + attn["out_proj"](a)
        if not pre:  # post-LN (opt-350m): normalize after the residual add
            x = nn.layer_norm(x, **layer["self_attn_layer_norm"], eps=eps)
        h = nn.layer_norm(x, **layer["final_layer_norm"], eps=eps) if pre else x
        x = x + layer["fc2"](act(layer["fc1"](h)))                    # [B, T, F] inside
        if not pre:
            x = nn.layer_norm(x, **layer["final_layer_norm"], eps=eps)
        trace.append((f"layers.{i}", x))
    if p["final_layer_norm"] is not None:
        x = nn.layer_norm(x, **p["final_layer_norm"], eps=eps)
    if p["project_out"] is not None:
        x = p["project_out"](x)                                       # [B, T, E]
    return p["lm_head"](x)                                            # [B, T, V]


FORWARDS = {"gpt2": _gpt2_forward, "opt": _opt_forward}
