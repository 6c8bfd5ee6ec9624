"""W8A8 linear leaves and whole-model quantization (SmoothQuant Section 4, Table 2).

Legend: B batch, T tokens, N = B·T all tokens, C_in / C_out a linear's widths, H heads, D head dim,
S tokens attended to.

A :class:`W8A8Linear` replaces a float :class:`~minisq.nn.Linear` leaf. Its weight is
stored as real int8 with its scale(s); activations are quantized just before the matmul:

    Y[t, j] = Δx[t] · (Σ_k X̄[t, k] · W̄[k, j]) · Δw[j] + b[j]          (path="int")

with X̄, W̄ int8, the inner sum an INT8 GEMM into int32 and the scales applied once per
output element by the epilogue. ``path="fake"`` is the simulation most papers report:
``dequantize(X̄, Δx) @ dequantize(W̄, Δw) + b`` in float; both paths use the very same
integers, so one layer's outputs agree to float rounding (float64: ~1e-15 relative).

Through a whole model, that rounding can move a value that lies within an ulp of a
rounding boundary (x/Δ = n + ½) to the other side in a later layer, flipping one int8 code,
and the flip cascades. Measured in float32 on tiny random GPT-2/OPT models: ~2e-7 relative
on the logits without a flip, up to 3e-4 relative with one; 9.5e-2 max abs was seen on a
3-layer OPT with planted outliers. In float64 the paths agree to ~1e-15 *off exact rounding
ties*. Exact ties are rare with non-zero biases but do occur structurally: with per-tensor
scales and attention quantization, a one-hot attention row puts an output exactly on v's
int8 grid (see tests/test_official.py). Compare whole models in float64.

**Per-tensor dynamic = per sequence.** Leaves are called as ``leaf(x, mask)`` with ``x``
``[B, T, C_in]`` and ``mask`` ``[B, T]`` (1 = real token). A per-tensor dynamic scale is
taken over each sequence's real tokens, as in the official code, which runs one sequence
per forward: padding and the other sequences of a batch never set it, so a result does not
depend on what it was batched with.

Granularities (the paper's Table 2, "dynamic" = scale from the current tensor):

=======  ====================  ============================
preset   weights               activations
=======  ====================  ============================
naive    per-tensor            per-tensor, dynamic
O1       per-tensor            per-token, dynamic
O2       per-tensor            per-tensor, dynamic
O3       per-tensor            per-tensor, static (calibrated)
=======  ====================  ============================

naive and O2 quantize alike; the paper's point is that SmoothQuant-O2 (smooth, then O2)
works where naive W8A8 fails. By default (``skip``) the LM head and OPT's ``project_in`` /
``project_out`` stay float, as in the official code, which quantizes decoder layers only.

Per-channel *activation* scales are not in the table: a scale per input channel k cannot
be pulled out of the sum over k, so the GEMM could not run on integers. That is the
problem SmoothQuant solves by moving the channel ranges into the weights first. minisq
offers them as ``acts="per_channel"`` in ``path="fake"`` only, the paper's accurate but
not GEMM-able reference.

The paper's other baselines (W8A16, ZeroQuant, LLM.int8(); its Tables 1 and 4) are presets
too (:data:`minisq.baselines.BASELINES`), with their own leaves in :mod:`minisq.baselines`;
``quantize(..., kv_cache="int8")`` also stores the KV cache in int8 (:mod:`minisq.kvquant`).
"""

from __future__ import annotations

import dataclasses
import fnmatch

import numpy as np

from .backend import get_array_module, is_gpu_array, to_numpy
from .baselines import BASELINES, GroupW8A8Linear, LLMInt8Linear, W8A16Linear, check_group_size, quantize_per_group
from .errors import CalibrationError, ConfigError, ShapeError
from .families import KEEP_FLOAT
from .gemm import int8_linear, pack_weight_tn
from .nn import Int8WeightShape, Linear
from .io.storage import materialize
from .tree import _map
from .attnquant import AttentionQuant, attention_quant, qkv_scales, static_qkv_scales  # noqa: F401
from .quant import (
    CONVENTIONS, dequantize, dynamic_scale, quantize_per_channel, quantize_per_input_channel, quantize_per_sequence,
    quantize_per_tensor, quantize_per_token,
)

# per_group: ZeroQuant (needs group_size); per_channel activations: fake path only; float
# activations: weight-only W8A16. See minisq.baselines.
WEIGHT_GRANULARITIES = ("per_channel", "per_tensor", "per_group")
ACT_GRANULARITIES = ("per_token", "per_tensor", "static", "per_channel", "float")
PATHS = ("int", "fake")
KV_CACHE_MODES = ("float", "int8")

PRESETS = {
    "naive": dict(weights="per_tensor", acts="per_tensor"),
    "O1": dict(weights="per_tensor", acts="per_token"),
    "O2": dict(weights="per_tensor", acts="per_tensor"),
    "O3": dict(weights="per_tensor", acts="static"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class W8A8Linear(Int8WeightShape):
    """A linear layer with int8 weights and int8 activations.

    ``w_q`` int8 ``[C_in, C_out]``; ``w_scale`` ``[1, C_out]`` (per-channel) or 0-d
    (per-tensor); ``b`` float ``[C_out]`` or None; ``x_scale`` the static activation scale
    (0-d) for ``acts="static"``, else None. ``acts="per_channel"`` exists in ``path="fake"``
    only (:func:`quantize_linear` refuses it on the integer path). On the GPU the weight is
    packed once in cuBLAS's layout (``w_packed``, a :class:`~minisq.gemm.TNWeight`) and
    ``w_q`` is a ``[C_in, C_out]`` view of it: one int8 copy, never transposed per call.
    ``convention`` is the activations' rounding rule (:data:`minisq.quant.CONVENTIONS`).
    """

    w_q: object
    w_scale: object
    b: object = None
    acts: str = "per_token"
    x_scale: object = None
    path: str = "int"
    convention: str = "smoothquant"
    w_packed: object = dataclasses.field(default=None, repr=False)  # set by __post_init__

    def __post_init__(self):
        # derived from w_q every time (a stale packing can never survive a replace); frozen,
        # hence object.__setattr__
        packed = pack_weight_tn(self.w_q) if is_gpu_array(self.w_q) else None
        object.__setattr__(self, "w_packed", packed)
        if packed is not None:
            object.__setattr__(self, "w_q", packed.view())

    @property
    def weights(self) -> str:
        return "per_tensor" if self.w_scale.ndim == 0 else "per_channel"

    def quantize_input(self, x, mask=None):
        """The input's int8 codes and its scale, per ``acts``:

        * ``per_token``: one scale per token, ``[..., T, 1]``;
        * ``per_tensor``: one scale per *sequence* over its real tokens (``mask`` ``[..., T]``,
          1 = real), ``[..., 1, 1]`` (see :func:`~minisq.quant.quantize_per_sequence`), so a
          sequence quantizes the same alone or padded in a batch;
        * ``static``: the calibrated scale, 0-d;
        * ``per_channel`` (fake path only): one scale per input channel of each sequence,
          ``[..., 1, C_in]`` (see :func:`~minisq.quant.quantize_per_input_channel`).
        """
        # [..., T, C_in] float -> [..., T, C_in] int8, scale broadcastable to [..., T, 1] ([..., 1, C_in])
        if self.acts == "per_token":
            return quantize_per_token(x, convention=self.convention)
        if self.acts == "per_tensor":
            return quantize_per_sequence(x, mask, self.convention)
        if self.acts == "per_channel":
            return quantize_per_input_channel(x, mask)
        return quantize_per_tensor(x, self.x_scale, self.convention)

    def __call__(self, x, mask=None):
        # [..., T, C_in] float, [..., T] 0/1 or None -> [..., T, C_out] float (same dtype as x)
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"W8A8Linear expects inputs [..., {self.in_features}], got {x.shape}")
        lead = x.shape[:-1]
        x_q, x_s = self.quantize_input(x, mask)                      # int8, scale
        w_s = self.w_scale.astype(x.dtype)
        if self.path == "int":
            x_q = x_q.reshape(-1, self.in_features)                  # [N, C_in], N = all tokens
            if x_s.ndim > 0:                                         # per token / per sequence
                xp = get_array_module(x_s)
                x_s = xp.broadcast_to(x_s, lead + (1,)).reshape(-1, 1)   # [N, 1]
            w = self.w_q if self.w_packed is None else self.w_packed
            y = int8_linear(x_q, w, x_s, w_s, self.b, out_dtype=x.dtype)   # int32 sums inside
        else:
            x_hat = dequantize(x_q, x_s).reshape(-1, self.in_features)   # [N, C_in] float
            y = x_hat @ dequantize(self.w_q, w_s)                    # [N, C_out] float
            if self.b is not None:
                y = y + self.b
        return y.reshape(*lead, self.out_features)


def quantize_linear(leaf: Linear, weights: str = "per_channel", acts: str = "per_token",
                    x_absmax=None, path: str = "int", threshold: float | None = None,
                    group_size: int | None = None, convention: str = "smoothquant"):
    """A quantized leaf from a float leaf: a :class:`W8A8Linear`, or one of the paper's
    baselines (:mod:`minisq.baselines`), chosen by the table :data:`LEAF_KINDS`.
    ``x_absmax`` is the calibrated max |x| of the leaf's input, needed for ``acts="static"``
    (scale = max|x| / 127); ``threshold`` makes an LLM.int8() leaf; ``group_size`` goes
    with ``weights="per_group"`` (ZeroQuant); ``convention`` the rounding rule of a W8A8 leaf."""
    _check_options(weights, acts, path, threshold, group_size)
    kind = leaf_kind(weights, acts, threshold)
    if kind != "w8a8" and convention != "smoothquant":
        raise ConfigError(f"convention={convention!r} is for W8A8 leaves; the {kind} baseline rounds as SmoothQuant")
    if kind == "w8a16":
        w_q, w_scale = (quantize_per_channel if weights == "per_channel" else quantize_per_tensor)(leaf.w)
        return W8A16Linear(w_q, w_scale, leaf.b, path=path)
    if kind == "zeroquant":
        check_group_size(group_size, leaf.w.shape[0])
        w_q, w_scale = quantize_per_group(leaf.w, group_size)
        return GroupW8A8Linear(w_q, w_scale, leaf.b, path=path)
    if kind == "llm.int8":
        w_q, w_scale = quantize_per_channel(leaf.w)
        return LLMInt8Linear(w_q, w_scale, leaf.b, threshold=float(threshold), path=path)
    quantize_w = quantize_per_channel if weights == "per_channel" else quantize_per_tensor
    w_q, w_scale = quantize_w(leaf.w, convention=convention)
    x_scale = None
    if acts == "static":
        if x_absmax is None:
            raise CalibrationError("acts='static' needs the calibrated input range of every layer: "
                                   "pass stats=minisq.calibrate(model, batches)")
        x_absmax = float(x_absmax)
        if not (x_absmax >= 0.0 and np.isfinite(x_absmax)):
            raise CalibrationError(f"calibrated input range {x_absmax} is not a finite number >= 0; recalibrate")
        xp = get_array_module(leaf.w)
        # Δ = max|x| / 127 in the layer's dtype, with the quantizers' zero-range guard (Δ = 1)
        x_scale = dynamic_scale(xp, xp.asarray(x_absmax, dtype=leaf.w.dtype), convention)
    return W8A8Linear(w_q, w_scale, leaf.b, acts=acts, x_scale=x_scale, path=path, convention=convention)


def _check_choice(name: str, value: str, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"{name}={value!r} is not one of {options}")


# The kinds of quantized leaf and their classes; leaf_kind picks the kind for a choice of
# (weights, acts, outlier threshold), quantize_linear builds it.
LEAF_KINDS = {
    "w8a8": W8A8Linear,            # SmoothQuant's W8A8 at every granularity of Table 2 (+ per-channel acts, fake)
    "w8a16": W8A16Linear,          # weights="per_channel"/"per_tensor", acts="float"
    "zeroquant": GroupW8A8Linear,  # weights="per_group", acts="per_token"
    "llm.int8": LLMInt8Linear,     # weights="per_channel", acts="per_token", threshold=t
}


def leaf_kind(weights: str, acts: str, threshold=None) -> str:
    """The key of :data:`LEAF_KINDS` for a granularity choice (assumed valid)."""
    if acts == "float":
        return "w8a16"
    if weights == "per_group":
        return "zeroquant"
    return "w8a8" if threshold is None else "llm.int8"


def _check_options(weights, acts, path, threshold, group_size) -> None:
    """ConfigError for a choice of granularities and options that does not make a leaf."""
    _check_choice("weights", weights, WEIGHT_GRANULARITIES)
    _check_choice("acts", acts, ACT_GRANULARITIES)
    _check_choice("path", path, PATHS)
    if acts == "per_channel" and path == "int":
        raise ConfigError("acts='per_channel' cannot run on the integer path: its scale varies along the input "
                          "channels, the axis the GEMM sums over, so it cannot be pulled out of the int32 sum "
                          "(that is the problem SmoothQuant solves). Use path='fake' for this reference")
    if weights == "per_group":
        if acts != "per_token":
            raise ConfigError(f"weights='per_group' (ZeroQuant) goes with acts='per_token', not {acts!r}")
        if group_size is None:
            raise ConfigError("weights='per_group' needs a group_size (ZeroQuant: 128 input channels per group)")
    elif group_size is not None:
        raise ConfigError(f"group_size goes with weights='per_group' (ZeroQuant), not weights={weights!r}")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) \
                or not float(threshold) >= 0:
            raise ConfigError(f"threshold must be a number >= 0 (LLM.int8(): |x| >= threshold runs in float; "
                              f"0 = every channel, inf = none), got {threshold!r}")
        if (weights, acts) != ("per_channel", "per_token"):
            raise ConfigError(f"threshold is LLM.int8()'s outlier threshold: it goes with weights='per_channel', "
                              f"acts='per_token' (preset 'llm.int8'), not weights={weights!r}, acts={acts!r}")


ATTN_BMM_MODES = (False, True, "static")

# Leaves kept in float: the official code quantizes decoder-layer linears only, so the LM head and
# opt-350m's project_in/out stay float; so do the families' KEEP_FLOAT (Mixtral's router).
DEFAULT_SKIP = ("lm_head", "project_in", "project_out") + KEEP_FLOAT


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how, checked (see :func:`quant_spec`): the granularities, the
    path, the leaves kept in float, attention, the baselines' options and the KV cache."""

    preset: str
    weights: str
    acts: str
    path: str = "int"
    skip: tuple = DEFAULT_SKIP
    attn_bmm: object = False
    threshold: float | None = None
    group_size: int | None = None
    kv_cache: str = "float"
    convention: str = "smoothquant"

    def skips(self, name: str) -> bool:
        """True for a leaf that stays float (its dotted name matches a ``skip`` pattern)."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.skip)

    def info(self) -> dict:
        """What ``model.info["quantization"]`` records (minisq.kvquant reads kv_cache from it)."""
        info = dict(preset=self.preset, weights=self.weights, acts=self.acts, path=self.path,
                    skip=list(self.skip), attn_bmm=self.attn_bmm)
        # the baselines' options and the KV cache's storage, recorded only where they apply
        info.update({k: v for k, v in dict(threshold=None if self.threshold is None else float(self.threshold),
                                           group_size=self.group_size).items() if v is not None})
        if self.kv_cache != "float":
            info["kv_cache"] = self.kv_cache
        if self.convention != "smoothquant":
            info["convention"] = self.convention
        return info


def quant_spec(preset: str | None = None, weights: str = "per_channel", acts: str = "per_token", path: str = "int",
               skip=DEFAULT_SKIP, attn_bmm=False, threshold: float | None = None, group_size: int | None = None,
               kv_cache: str = "float", convention: str = "smoothquant") -> QuantSpec:
    """The :class:`QuantSpec` of :func:`quantize`'s options (a preset sets ``weights``,
    ``acts`` and the baselines' defaults), or a ConfigError naming the option that does not fit."""
    if preset is not None:
        table = {**PRESETS, **BASELINES}
        if preset not in table:
            raise ConfigError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)} (SmoothQuant) "
                              f"or {sorted(BASELINES)} (the paper's baselines)")
        cfg = table[preset]
        weights, acts = cfg["weights"], cfg["acts"]
        if group_size is None:
            group_size = cfg.get("group_size")
        if threshold is None:
            threshold = cfg.get("threshold")
    _check_options(weights, acts, path, threshold, group_size)
    _check_choice("kv_cache", kv_cache, KV_CACHE_MODES)
    _check_choice("convention", convention, tuple(CONVENTIONS))
    if convention != "smoothquant" and attn_bmm is not False:
        raise ConfigError("attn_bmm (attention-BMM quantization) rounds by SmoothQuant's rule only, which compressed-tensors "
                          "cannot hold: use convention='smoothquant'")
    if kv_cache != "float" and attn_bmm is not False:
        raise ConfigError("kv_cache='int8' is for float attention: with attn_bmm the cache already holds the "
                          "int8 codes of k and v with their activation scales")
    if attn_bmm is not False and acts in ("float", "per_channel"):
        raise ConfigError(f"attn_bmm quantizes q, k, v with the activation granularity; acts={acts!r} has none "
                          "that attention can use (choose per_token, per_tensor or static)")
    if not any(attn_bmm is mode or (isinstance(attn_bmm, str) and attn_bmm == mode) for mode in ATTN_BMM_MODES):
        raise ConfigError(f"attn_bmm={attn_bmm!r} is not one of {ATTN_BMM_MODES}")
    if attn_bmm == "static" and acts != "static":
        raise ConfigError("attn_bmm='static' is the official int8 O3 path: it needs acts='static' (preset 'O3') "
                          "and calibration stats")
    if isinstance(skip, str):
        skip = (skip,)
    return QuantSpec(preset or "custom", weights, acts, path, tuple(skip), attn_bmm, threshold, group_size, kv_cache,
                     convention)


def quantize_leaves(tree, spec: QuantSpec, stats=None, dtype=np.float32, prefix: str = ""):
    """A new parameter (sub)tree whose float linear leaves are quantized per ``spec``
    (:func:`quantize_linear`); leaves matching ``spec.skip`` stay as they are.

    ``prefix`` is the subtree's dotted name (``""`` for a whole model, ``"h.3"`` for one
    layer): skip patterns and ``stats`` see full names. Static activations take their
    scale from ``stats.input_absmax_of(name)``; a ZeroQuant group size must divide every
    quantized leaf's C_in. Weights kept as stored (float16/bfloat16, memory-mapped) are
    widened to ``dtype`` one leaf at a time. The in-memory :func:`quantize` and the streamed
    :func:`minisq.quantize_checkpoint` both call it.
    """
    if spec.acts == "static" and stats is None:
        raise CalibrationError("acts='static' (preset O3) needs calibration stats: pass stats=minisq.calibrate(...)")

    def swap(name, leaf):
        if spec.skips(name):
            return leaf
        x_absmax = stats.input_absmax_of(name) if spec.acts == "static" else None
        if spec.group_size is not None:
            check_group_size(spec.group_size, leaf.w.shape[0], name)
        return quantize_linear(materialize(leaf, dtype), spec.weights, spec.acts, x_absmax, spec.path,
                               spec.threshold, spec.group_size, spec.convention)

    return _map(tree, swap, f"{prefix}." if prefix else "")


def quantize(model, preset: str | None = None, weights: str = "per_channel", acts: str = "per_token",
             stats=None, path: str = "int", skip=DEFAULT_SKIP, attn_bmm=False, threshold: float | None = None,
             group_size: int | None = None, kv_cache: str = "float", convention: str = "smoothquant"):
    """A new quantized model: every float linear leaf (except ``skip``) becomes a W8A8 leaf
    (or a baseline's leaf, :mod:`minisq.baselines`).

    ``preset`` ("naive", "O1", "O2", "O3") sets ``weights`` and ``acts`` as in the paper's
    Table 2. The paper's baselines are presets too (:data:`minisq.baselines.BASELINES`):
    "w8a16" (weight-only INT8), "zeroquant" (``group_size``, default 128, must divide every
    quantized layer's C_in) and "llm.int8" (``threshold``, default 6.0). ``kv_cache="int8"``
    stores the attention's keys and values as int8 with per-token, per-head scales (see
    :mod:`minisq.kvquant`). ``acts="static"`` needs ``stats`` from :func:`minisq.calibrate` on this very
    model (after smoothing, if it was smoothed). ``skip`` holds glob patterns of leaf names
    kept in float; the default keeps the official code's layer set (decoder-layer linears
    only: ``lm_head`` and OPT's ``project_in``/``project_out`` stay float).

    ``attn_bmm`` quantizes attention as the official SmoothQuant code does (see
    :class:`~minisq.attnquant.AttentionQuant`): ``True`` quantizes the outputs of the q, k
    and v projections with the activation granularity (static scales for ``acts="static"``)
    and keeps the softmax probabilities P in float; ``"static"`` is the official int8 OPT
    model's scheme (needs ``acts="static"``, i.e. O3): static q/k/v scales and P as int8 at
    1/127. The input model is untouched. The leaves are quantized by :func:`quantize_leaves`.
    ``convention`` is the W8A8 leaves' rounding rule (:data:`minisq.quant.CONVENTIONS`:
    "smoothquant" or "compressed-tensors").
    """
    spec = quant_spec(preset, weights, acts, path, skip, attn_bmm, threshold, group_size, kv_cache, convention)
    if model.info.get("quantization"):
        raise ConfigError("this model is already quantized; quantize the float (or smoothed) model instead")
    if model.dtype not in (np.float32, np.float64):
        raise ConfigError(f"quantize a float32 or float64 model (this one is {model.dtype}): "
                          "the W8A8 epilogue computes in float32 or float64")
    if spec.acts == "static":
        if stats is None:
            raise CalibrationError("acts='static' (preset O3) needs calibration stats: "
                                   "stats = minisq.calibrate(model, batches), then quantize(model, ..., stats=stats)")
        stats.check_matches(model)
    params = quantize_leaves(model.params, spec, stats, model.dtype)
    maxima = None
    if spec.attn_bmm is not False and spec.acts == "static":
        maxima = [stats.qkv_absmax(model, i) for i in range(model.config.num_layers)]
    return model.evolve(params=params, info={**model.info, "quantization": spec.info()},
                        attn_quant=attention_quant(spec, model, maxima))


def weight_memory(model) -> dict:
    """Bytes of the linear weights as stored (int8 + scales + biases for every quantized
    leaf: W8A8, W8A16, ZeroQuant's group scales, LLM.int8()) and what the same layers take
    in float32 and float16. LLM.int8() stores exactly what per-channel W8A8 does: its float
    part multiplies by dequantized int8 rows, a per-call temporary (:mod:`minisq.baselines`)."""
    stored = f32 = f16 = 0
    n_quantized = n_float = 0
    for leaf in model.linears().values():
        if hasattr(leaf, "w_q"):
            n = leaf.w_q.size
            stored += leaf.w_q.nbytes + leaf.w_scale.nbytes + (leaf.b.nbytes if leaf.b is not None else 0)
            n_quantized += 1
        else:
            n = leaf.w.size
            stored += leaf.w.nbytes + (leaf.b.nbytes if leaf.b is not None else 0)
            n_float += 1
        nb = leaf.b.size if leaf.b is not None else 0
        f32 += 4 * (n + nb)
        f16 += 2 * (n + nb)
    return dict(stored_bytes=int(stored), float32_bytes=int(f32), float16_bytes=int(f16),
                quantized_layers=n_quantized, float_layers=n_float)


def describe(leaf) -> str:
    """One line about a leaf, for printouts."""
    if hasattr(leaf, "describe"):  # the baselines' leaves describe themselves
        return leaf.describe()
    if isinstance(leaf, W8A8Linear):
        return (f"W8A8 [{leaf.in_features}->{leaf.out_features}] w:{leaf.weights} a:{leaf.acts} "
                f"path:{leaf.path}")
    return f"float [{leaf.w.shape[0]}->{leaf.w.shape[1]}] {to_numpy(leaf.w).dtype}"
