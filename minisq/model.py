"""A decoder-only transformer as pure array code over a parameter tree.

Legend: B batch, T new tokens, S tokens attended to (past + new), C hidden, H heads,
D head dim, F MLP width, V vocab, E token-embedding width (= C except opt-350m).

The parameters are nested dicts under the checkpoint's own names (``h.3.attn.c_attn`` for
GPT-2, ``layers.3.self_attn.q_proj`` for OPT), one kind of leaf per linear (:mod:`minisq.nn`):
``model.linears()`` lists them by dotted name, ``model.replace_linears(fn)`` returns a new model
with some swapped, which is all calibration and quantization need. Never changed in place.
What differs between architectures lives in one module per family (:mod:`minisq.families`):
``Model.forward`` is the family's ``embed``, its ``block`` for every layer, then its ``head``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from . import checks, nn
from .backend import available_memory, get_array_module, to_device, to_numpy
from .config import ModelConfig
from .errors import ConfigError, InputError, NonFiniteError
from .families import family_for
from .io.storage import is_stored, materialize
from .tree import _map, _map_arrays, _walk, get_param, is_linear_leaf, replace_param  # noqa: F401

FLOAT_DTYPES = ("float16", "float32", "float64")


class KVCache:
    """What each layer keeps of the tokens seen so far, and their padding mask.

    For float attention a layer keeps its keys and values ``[B, H, S, D]``; quantized
    attention keeps int8 codes and their per-token scales (``[B, 1, S, 1]``) instead. Each
    array grows along axis 2 (the token axis) in a buffer with room to spare, so that
    decoding one token appends in place instead of copying the whole cache every step
    (which made long generations quadratic in memory traffic). ``mask`` is ``[B, S]``
    (1 = real). A cache is decoding state: each ``forward(..., cache=cache)`` extends it.
    """

    def __init__(self, num_layers: int, reserve: int = 0):
        self.store = [None] * num_layers     # layer -> list of buffers [B, *, capacity, *]
        self.mask = None
        self.length = 0
        self.reserve = reserve   # capacity to allocate at the first append (e.g. prompt + new tokens)

    @property
    def keys(self) -> list:
        """Layer i's cached float keys ``[B, G, S, D]``, for inspection (None where the layer
        caches int8 codes and scales instead: see ``store``)."""
        return [b[0][:, :, :self.length] if b is not None and len(b) == 2 else None for b in self.store]

    @property
    def values(self) -> list:
        """Layer i's cached float values ``[B, G, S, D]`` (None where cached as int8: see ``store``)."""
        return [b[1][:, :, :self.length] if b is not None and len(b) == 2 else None for b in self.store]

    def update(self, i: int, *arrays):
        # layer i's new [B, *, T, *] arrays (keys, values, ...) -> all of them [B, *, S, *] (views)
        end = self.length + arrays[0].shape[2]
        bufs = self.store[i]
        if bufs is None or bufs[0].shape[2] < end:
            xp = get_array_module(arrays[0])
            old = 0 if bufs is None else bufs[0].shape[2]
            size = max(end, self.reserve, 2 * old)
            grown = [xp.empty(a.shape[:2] + (size,) + a.shape[3:], dtype=a.dtype) for a in arrays]
            if bufs is not None:
                for g, b in zip(grown, bufs):
                    g[:, :, :self.length] = b[:, :, :self.length]
            self.store[i] = bufs = grown
        for buf, a in zip(bufs, arrays):
            buf[:, :, self.length:end] = a
        return tuple(buf[:, :, :end] for buf in bufs)

    def advance(self, mask) -> None:
        """Record that the new tokens are in: ``mask`` ``[B, S]`` covers all of them."""
        self.mask = mask
        self.length = mask.shape[1]


@dataclasses.dataclass
class Inputs:
    """One forward call's inputs, checked: ids/positions/new_mask ``[B, T]``, mask ``[B, S]``
    (all tokens, cached ones included), bias ``[B, 1, T, S]``."""

    ids: object
    mask: object
    positions: object
    bias: object
    new_mask: object
    squeeze: bool


class Model:
    """A language model of any family in :mod:`minisq.families`: config + parameter tree (+ tokenizer).

    ``model(input_ids, attention_mask=None)`` gives logits ``[B, T, V]`` (or ``[T, V]``
    for ``[T]`` ids). ``info`` records what was done to the model (smoothing, quantization)
    so that it can be printed, saved and compared.
    """

    def __init__(self, config: ModelConfig, params: dict, tokenizer=None, info: dict | None = None,
                 attn_quant: Callable | None = None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.info = dict(info or {})
        # Quantized attention (minisq.attnquant.AttentionQuant, set by quantize(..., attn_bmm=...));
        # None = float attention.
        self.attn_quant = attn_quant
        self._outer = None   # see outer(): the widened non-layer weights of a stored model

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
        """A shallow copy with some fields replaced (params, config, info, attn_quant, tokenizer)."""
        fields = dict(config=self.config, params=self.params, tokenizer=self.tokenizer,
                      info=self.info, attn_quant=self.attn_quant)
        fields.update(changes)
        return Model(**fields)

    @property
    def dtype(self) -> np.dtype:
        """The compute dtype (float32 for weights kept as float16/bfloat16 or memory-mapped)."""
        embedding = self._embedding()
        if is_stored(embedding):
            return np.dtype(self.info.get("storage", {}).get("compute", "float32"))
        return np.dtype(embedding.dtype)

    @property
    def stored(self) -> bool:
        """True when weights are kept as stored (float16/bfloat16 or memory-mapped) and widened
        to the compute dtype layer by layer (see :mod:`minisq.io.storage`)."""
        return is_stored(self._embedding())

    @property
    def lazy(self) -> bool:
        """True for a memory-mapped model (``minisq.load(..., lazy=True)``)."""
        return bool(self.info.get("storage", {}).get("lazy"))

    def outer(self) -> "Model":
        """This model with every parameter outside the decoder layers (embeddings, final
        norm, head) in the compute dtype; the layers stay as stored. The identity for a
        model whose weights are all arrays already. Kept after the first call."""
        if not self.stored:
            return self
        if self._outer is None:
            key = self.family.LAYER_PREFIX.split(".")[0]
            memo: dict = {}
            params = {k: (v if k == key else materialize(v, self.dtype, memo)) for k, v in self.params.items()}
            self._outer = self.evolve(params=params)
        return self._outer

    def layer(self, i: int):
        """Decoder layer ``i``'s parameters in the compute dtype (widened now if stored)."""
        layer = self.family.layers(self.params)[i]
        return materialize(layer, self.dtype) if self.stored else layer

    @property
    def xp(self):
        """The array module the weights live in: NumPy on the CPU, CuPy on a GPU."""
        return get_array_module(self._embedding())

    @property
    def device(self) -> str:
        return "cpu" if get_array_module(self._embedding()) is np else "gpu"

    @property
    def family(self):
        """The module of :mod:`minisq.families` that knows this architecture."""
        return family_for(self.config.model_type)

    def _embedding(self):
        return self.params[self.family.EMBEDDING]

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
        inp = self.prepare(input_ids, attention_mask, cache)
        if cache is None and use_cache:
            cache = KVCache(self.config.num_layers)
        logits = self._layers_forward(inp.ids, inp.positions, inp.bias, inp.new_mask, cache,
                                      trace if trace is not None else [])
        self.check_logits(logits)
        if cache is not None:
            cache.advance(inp.mask)
        return (logits[0] if inp.squeeze else logits), cache

    def prepare(self, input_ids, attention_mask=None, cache=None) -> "Inputs":
        """Checked inputs of one forward call and what every layer needs from them."""
        ids, mask, squeeze = self._check_inputs(input_ids, attention_mask, cache)
        xp = self.xp
        ids, mask = xp.asarray(ids), xp.asarray(mask)
        T = ids.shape[1]
        # Positions count real tokens only, so left padding does not shift them.
        positions = xp.maximum(xp.cumsum(mask, axis=1) - 1, 0)[:, -T:]   # [B, T]
        bias = self.family.attention_bias(self.config, mask, T, self.dtype)   # [B, 1, T, S]
        # [B, T]: which of the new tokens are real. Every linear leaf gets it, so that dynamic
        # per-sequence scales and calibration statistics see real tokens only, never padding.
        return Inputs(ids, mask, positions, bias, mask[:, -T:], squeeze)

    def check_logits(self, logits) -> None:
        """Raise NonFiniteError for NaN/inf logits."""
        if not nn.all_finite(logits):
            raise NonFiniteError(f"the forward pass produced NaN/inf logits ({self.dtype}): {self._non_finite_cause()}")

    def _non_finite_cause(self) -> str:
        """Why the logits are not finite: the config, the weights, and only then float16's range."""
        c = self.config
        if not c.layer_norm_eps >= 0:
            return f"the config's normalization epsilon is {c.layer_norm_eps} (must be >= 0)"
        theta = (c.rope or {}).get("rope_theta")
        if theta is not None and not theta > 0:
            return f"the config's rope_theta is {theta} (must be > 0)"
        limit = float(np.finfo(self.dtype).max) if self.dtype == np.float16 else np.inf
        for name, a in _float_arrays(self.params, ""):
            a = to_numpy(a)
            if not np.isfinite(a).all():
                return f"the weight {name} holds NaN/inf values"
            if np.abs(a).max(initial=0.0) > limit:
                return f"the weight {name} holds values beyond float16's range (65504)"
        if self.dtype == np.float16:
            return ("the weights are finite, so this is the known float16 activation overflow of GPT-2/OPT "
                    "(values beyond 65504): run in float32")
        return "the weights and the config are finite: check the inputs"

    def _layers_forward(self, ids, positions, bias, m, cache, trace):
        # [B, T] ids, [B, T] positions, [B, 1, T, S] bias, [B, T] real-token mask m -> [B, T, V]:
        # the family's embed -> every block -> head (the cache is extended in place)
        # Weights kept as stored (float16/bfloat16, memory-mapped) are widened one layer at a time.
        family, outer = self.family, self.outer()
        x = family.embed(outer, ids, positions, m)                    # [B, T, C]
        trace.append(("embeddings", x))
        for i in range(self.config.num_layers):
            x = family.block(outer, i, self.layer(i), x, bias, m, cache, positions)
            trace.append((family.LAYER_PREFIX.format(i=i), x))
        return family.head(outer, x, m)                               # [B, T, V]

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
        sampling from ``softmax(logits / temperature)`` restricted to the ``top_k`` best. Every
        argument, the context length and the KV cache's size are checked before anything runs.

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
        temperature = checks.real("temperature (0 = greedy)", temperature, 0.0)
        top_k = None if top_k is None else checks.integer("top_k", top_k, 1)
        max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, 0)
        seed = None if seed is None else checks.integer("seed", seed, 0)
        stop_at_eos = checks.flag("stop_at_eos", stop_at_eos)
        ids, mask, _ = self._check_inputs(ids, attention_mask, None)
        (B, T), P = ids.shape, self.config.max_positions
        if T + max_new_tokens > P:
            raise InputError(f"the prompt's {T} tokens + max_new_tokens={max_new_tokens} exceed the model's "
                             f"context of {P} positions: pass max_new_tokens <= {P - T}")
        _check_cache_fits(B * (T + max_new_tokens) * self.kv_cache_bytes_per_token(), self.device)
        rng = np.random.default_rng(seed)
        eos = self.config.eos_token_id                # an id, or a list of ids (Llama 3), or None
        eos_ids = None if eos is None else np.atleast_1d(np.asarray(eos, np.int64))
        done = np.zeros(ids.shape[0], dtype=bool)
        cache = KVCache(self.config.num_layers, reserve=ids.shape[1] + max_new_tokens)
        logits, cache = self.forward(ids, mask, cache=cache)
        out = [ids]
        for step in range(max_new_tokens):
            nxt = _pick(to_numpy(logits[:, -1, :vocab_limit]).astype(np.float64), temperature, top_k, rng)  # [B]
            if stop_at_eos and eos_ids is not None:
                nxt = np.where(done, eos_ids[0], nxt)        # finished rows repeat an EOS
                done |= np.isin(nxt, eos_ids)
            out.append(nxt[:, None])
            if step == max_new_tokens - 1 or (stop_at_eos and done.all()):
                break
            mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)
            logits, cache = self.forward(nxt[:, None], mask, cache=cache)
        return np.concatenate(out, axis=1)

    def kv_cache_bytes_per_token(self) -> int:
        """Bytes the KV cache holds per token of one sequence, all layers (float, int8 with
        ``kv_cache="int8"``, or int8 codes under ``attn_bmm``); see :mod:`minisq.kvquant`."""
        from .kvquant import kv_cache_bytes_per_token

        return kv_cache_bytes_per_token(self)

    def save(self, folder, format: str = "minisq"):
        """Write this model (float, smoothed or quantized) to ``folder``; reload it with
        ``minisq.load(folder)``. ``format="compressed-tensors"`` writes a W8A8 model as a
        compressed-tensors int-quantized checkpoint (vLLM, transformers). See :mod:`minisq.io.export`."""
        from .io.export import save_model

        return save_model(self, folder, format=format)

    # --- conversions --------------------------------------------------------------------
    def to(self, device: str) -> "Model":
        """The same model with every array on 'cpu' (NumPy) or 'gpu' (CuPy)."""
        if self.stored and device != "cpu":
            raise ConfigError("this model keeps its weights as stored (float16/bfloat16 or memory-mapped), "
                              "which runs on the CPU: model.astype('float32').to('gpu') widens them first")
        fn = lambda a: to_device(a, device)  # noqa: E731
        return self.evolve(params=_map_arrays(self.params, fn), attn_quant=_map_arrays(self.attn_quant, fn))

    def astype(self, dtype) -> "Model":
        """The same float model in another float dtype (float32 or float64 for equivalence
        checks). Weights kept as stored are all widened: the result holds them in memory."""
        dtype = np.dtype(dtype)
        if dtype.name not in FLOAT_DTYPES:
            raise ConfigError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        params = materialize(self.params, dtype) if self.stored else self.params
        info = {k: v for k, v in self.info.items() if k != "storage"}
        # copy=False: arrays already of dtype (all of them once widened) are kept, so a tied lm_head
        # stays a view of the embedding instead of becoming a second copy of the biggest matrix
        return self.evolve(params=_map_arrays(params, lambda a: a.astype(dtype, copy=False) if a.dtype.kind == "f"
                                              else a), info=info)


def _float_arrays(node, name: str):
    # (dotted name, array) for every float array held in memory below node (memory-mapped ones skipped)
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _float_arrays(v, f"{name}.{k}" if name else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _float_arrays(v, f"{name}.{i}")
    elif dataclasses.is_dataclass(node):                                       # a linear leaf
        yield from _float_arrays({f.name: getattr(node, f.name) for f in dataclasses.fields(node)}, name)
    elif hasattr(node, "dtype") and hasattr(node, "shape") and not is_stored(node) and node.dtype.kind == "f":
        yield name, node


def _check_cache_fits(nbytes: int, device: str) -> None:
    """Refuse a KV cache bigger than the machine's available memory before reserving it."""
    free = available_memory() if device == "cpu" else None
    if free is not None and nbytes > free:
        raise InputError(f"the KV cache would take {nbytes / 2**30:.1f} GiB, more than the {free / 2**30:.1f} "
                         "GiB available: generate fewer tokens or a smaller batch")


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
