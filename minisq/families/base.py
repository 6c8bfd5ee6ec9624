"""What every family module shares: the smoothing-row and special-token records, the
checkpoint reader that checks each tensor's shape, and the self-attention every block calls.

Legend: B batch, T new tokens, S tokens attended to (past + new), C hidden, H heads,
D head dim.

Nothing here knows a family; the families (``gpt2.py``, ``opt.py``, ...) import it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import nn
from ..kernels import cpu as kernels
from ..backend import get_array_module
from ..errors import CheckpointError, NonFiniteError, ShapeError
from ..kvquant import attend_kv
from ..io.storage import StoredTensor
from ..nn import Linear


@dataclasses.dataclass(frozen=True)
class Mapping:
    """Divide the output of ``source`` by s and multiply the rows of ``targets`` by s.

    ``kind`` says what the source is: a "layernorm" (its gain and bias are divided) or a
    "linear" (its weight columns and bias are divided).
    """

    group: str        # a short name users select mappings by
    source: str
    kind: str
    targets: tuple
    why: str


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """The special tokens of one model family, as strings of its vocabulary."""

    bos: str  # prepended to every text when add_bos is true
    eos: str  # ends a document; generation stops on it
    pad: str | None  # fills short rows of a batch; None when the model has none
    add_bos: bool  # HF's ``add_bos_token``


# --- reading a checkpoint -------------------------------------------------------------------

class TrackedState(dict):
    """A state dict that records which of its tensors were taken (by their names in the file),
    so that the loader can name every tensor the config did not use. ``taken`` is shared
    with the dicts :func:`strip_prefix` makes from it."""

    def __init__(self, items=(), taken: set | None = None, names: dict | None = None):
        super().__init__(items)
        self.taken = set() if taken is None else taken     # names in the file
        self.names = names or {}                           # key here -> name in the file

    def note(self, key: str) -> None:
        self.taken.add(self.names.get(key, key))


def strip_prefix(state: dict, prefixes: tuple) -> dict:
    # checkpoints differ: "transformer.h.0..." vs "h.0...", "model.decoder.layers..." vs "decoder.layers..."
    out, names = {}, {}
    for key, value in state.items():
        short = key
        for prefix in prefixes:
            if key.startswith(prefix):
                short = key[len(prefix):]
                break
        out[short], names[short] = value, getattr(state, "names", {}).get(key, key)
    if isinstance(state, TrackedState):
        return TrackedState(out, taken=state.taken, names=names)
    return out


class Taker:
    """Takes tensors out of a state dict, checking each shape against the config.

    A plain array becomes a fresh array of the compute ``dtype``; a
    :class:`~minisq.io.storage.StoredTensor` (weights kept as stored) is kept, transposed
    lazily where the layout needs it. Each tensor taken is noted in a :class:`TrackedState`.
    """

    def __init__(self, state: dict, dtype: np.dtype, source: str):
        self.state, self.dtype, self.source = state, dtype, source

    def __call__(self, key: str, shape: tuple, transpose: bool = False):
        if key not in self.state:
            raise CheckpointError(
                f"{self.source}: tensor {key!r} is missing from the checkpoint; the weights do not match "
                "config.json (wrong or incomplete download?)"
            )
        if isinstance(self.state, TrackedState):
            self.state.note(key)
        a = self.state[key]
        stored = tuple(reversed(shape)) if transpose else tuple(shape)
        if isinstance(a, StoredTensor):   # kept as stored (float16/bfloat16 or memory-mapped): see loading
            if tuple(a.shape) != stored:
                raise ShapeError(
                    f"{self.source}: tensor {key!r} has shape {tuple(a.shape)}, but config.json implies {stored}"
                )
            return a.T if transpose else a
        if a.dtype.kind != "f":
            raise ShapeError(f"{self.source}: tensor {key!r} has dtype {a.dtype}, expected a float tensor")
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


def make_lm_head(take: Taker, key: str, embedding, V: int, C: int) -> Linear:
    # The output projection is usually tied to the token embedding and then absent from the file.
    # Either way it is [V, C] in the file; the leaf holds its transpose [C, V] (a view, no copy).
    w = take(key, (V, C)) if key in take.state else embedding
    return Linear(w.T, None)


# --- attention, shared by every block -------------------------------------------------------

def self_attention(model, q, k, v, cache, i, bias, scale, mask, kv_heads=None):
    # [B, T, H*D], [B, T, G*D] x2 (+ layer i's cached S-T tokens), [B, T] real-token mask -> [B, T, H*D]
    # G = kv_heads (grouped-query attention: each k/v head serves H/G query heads); None: G = H
    H = model.config.num_heads
    G = kv_heads or H
    if model.attn_quant is not None:                                   # quantized q, k, v
        if G != H:   # per-token / per-sequence / static ranges are unchanged by repeating heads
            k, v = repeat_kv_flat(k, G, H // G), repeat_kv_flat(v, G, H // G)
        return model.attn_quant(i, q, k, v, mask, bias, scale, H, cache)
    q, k, v = nn.split_heads(q, H), nn.split_heads(k, G), nn.split_heads(v, G)
    k, v = attend_kv(model, cache, i, k, v)                          # [B, G, S, D]: only the kv heads, cached
                                                                     # as given or as int8 (kv_cache="int8")
    if G != H:
        k, v = repeat_kv(k, H // G), repeat_kv(v, H // G)             # [B, H, S, D]
    a = kernels.attention_causal_blocked(q, k, v, bias, scale)       # nn.attention, skipping the masked half
    return nn.merge_heads(a)


def repeat_kv(x, n_rep: int):
    # [B, G, S, D] -> [B, G * n_rep, S, D]: kv head j serves query heads j*n_rep ... j*n_rep + n_rep - 1
    B, G, S, D = x.shape
    xp = get_array_module(x)
    return xp.broadcast_to(x[:, :, None], (B, G, n_rep, S, D)).reshape(B, G * n_rep, S, D)


def repeat_kv_flat(x, G: int, n_rep: int):
    # [B, T, G*D] -> [B, T, G*n_rep*D]: the same head order as repeat_kv, before the heads are split
    B, T, GD = x.shape
    D = GD // G
    xp = get_array_module(x)
    return xp.broadcast_to(x.reshape(B, T, G, 1, D), (B, T, G, n_rep, D)).reshape(B, T, G * n_rep * D)
