"""The paper's comparison, live: W8A16, ZeroQuant and LLM.int8() linear leaves.

Legend: T tokens (all leading axes flattened to N), C_in / C_out a linear's widths,
G groups of g = C_in / G input channels (ZeroQuant), K outlier channels (LLM.int8()).

SmoothQuant (Tables 1 and 4) places itself among the alternatives. Each is a leaf here,
built by :func:`minisq.qlinear.quantize` from the presets in :data:`BASELINES`, and each
holds real int8 weights with their scales:

* **W8A16** (weight-only INT8): ``y = x @ dequantize(W̄, Δw) + b`` with float activations.
  Accurate, half the weight memory of float16, but the GEMM runs in float: it saves memory
  traffic, not arithmetic. (A real kernel dequantizes tiles on the fly; minisq dequantizes
  the whole ``[C_in, C_out]`` weight per call, a temporary.)
* **ZeroQuant** (Yao et al. 2022): group-wise weight scales (g input channels of one output
  channel share a scale) and dynamic per-token activations. Each group's int32 partial sum
  gets its own scale in the epilogue:
  ``Y[t, j] = Δx[t] · Σ_G Δw[G, j] · (Σ_{k∈G} X̄[t, k] W̄[k, j]) + b[j]`` — one batched
  INT8 GEMM over the groups, then a scaled sum. Finer weights, but the activations are still
  quantized per token over *all* channels, so an outlier channel still crushes the others.
* **LLM.int8()** (Dettmers et al. 2022): vector-wise INT8 (per-token activations,
  per-channel weights) with a *mixed-precision decomposition*: the input channels where
  some real token of the sequence has ``|x| ≥ threshold`` (6.0 in the paper) are taken out
  and multiplied in floating point; the rest go through the INT8 GEMM; the two results are
  added. Accurate, but every GEMM is split in two and the outlier columns must be found
  and gathered at run time — the cost SmoothQuant avoids.

Which weights the float part uses: bitsandbytes (``MatMul8bitLt`` with int8 weights,
``has_fp16_weights=False``) keeps only the int8 weight ``CB`` and its row scales ``SCB``,
and for the outlier columns computes ``subB = CB[:, idx] * SCB / 127`` — the *dequantized
int8* rows — then adds ``A[:, idx] @ subB`` to the dequantized INT8 result. minisq does the
same: the float part multiplies the outlier activations (unquantized) by
``dequantize(W̄[idx], Δw)``. So the stored weight memory is exactly that of per-channel
W8A8 (int8 + one scale per output channel + float bias); the ``[K, C_out]`` float rows are
a per-call temporary. One deliberate difference: bitsandbytes zeroes only the activation
*values* ≥ threshold before taking each token's scale (and then zeroes the whole columns
in the int8 codes); minisq zeroes the whole outlier columns first, so each token's scale
is the max over exactly the channels that go through INT8. Outlier channels are decided
per sequence over its real tokens (bitsandbytes: over the whole batch tensor), so a
sequence gives the same result alone or padded in a batch.

``threshold=inf`` takes no channel out: per-channel/per-token W8A8, bit for bit.
``threshold=0`` takes every channel out (``|x| ≥ 0`` always): W8A16 up to float rounding.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .backend import get_array_module
from .errors import ConfigError, ShapeError
from .gemm import dequant_epilogue, int8_bmm, int8_gemm
from .nn import Int8WeightShape
from .quant import dequantize, quantize_per_token

# The paper's baselines as presets of minisq.quantize (SmoothQuant Tables 1 and 4), beside
# minisq.qlinear.PRESETS (the paper's Table 2). The options are defaults: quantize(...,
# group_size=..., threshold=...) overrides them.
BASELINES = {
    "w8a16": dict(weights="per_channel", acts="float"),
    "zeroquant": dict(weights="per_group", acts="per_token", group_size=128),
    "llm.int8": dict(weights="per_channel", acts="per_token", threshold=6.0),
}


def _check_width(x, c_in: int, what: str) -> None:
    if x.shape[-1] != c_in:
        raise ShapeError(f"{what} expects inputs [..., {c_in}], got {x.shape}")


def _add_bias(y, b):
    return y if b is None else y + b


# ----------------------------------------------------------------------------------------
# W8A16: weight-only INT8


@dataclasses.dataclass(frozen=True, eq=False)
class W8A16Linear(Int8WeightShape):
    """Weight-only INT8: int8 weight ``w_q`` ``[C_in, C_out]`` with per-channel ``[1, C_out]``
    (or per-tensor, 0-d) scales, float activations: ``y = x @ (W̄ · Δw) + b``.

    There is no integer GEMM (the activations are float), so ``path`` is recorded only for
    uniformity: "int" and "fake" compute the same thing.
    """

    w_q: object
    w_scale: object
    b: object = None
    path: str = "int"

    def __call__(self, x, mask=None):
        # [..., T, C_in] float, mask unused -> [..., T, C_out] float (same dtype as x)
        _check_width(x, self.in_features, "W8A16Linear")
        w = dequantize(self.w_q, self.w_scale.astype(x.dtype))       # [C_in, C_out] float, a temporary
        return _add_bias(x @ w, self.b)

    def describe(self) -> str:
        return f"W8A16 [{self.in_features}->{self.out_features}] weight-only int8, float activations"


# ----------------------------------------------------------------------------------------
# ZeroQuant: group-wise weights, per-token activations


def quantize_per_group(w, group_size: int):
    """Group-wise weight scales: ``Δ[G, j] = max_{k ∈ G} |w[k, j]| / 127`` over groups of
    ``group_size`` consecutive input channels of each output channel (ZeroQuant).

    ``group_size`` must divide C_in (ConfigError otherwise: no padding rule).
    """
    # [C_in, C_out] float -> [C_in, C_out] int8, [G, C_out] float
    from .quant import _float_input, _quantize, dynamic_scale

    xp, w = _float_input(w, "w")
    if w.ndim != 2:
        raise ShapeError(f"w has shape {w.shape}: group-wise quantization takes a 2-D weight [C_in, C_out]")
    c_in, c_out = w.shape
    check_group_size(group_size, c_in)
    wg = w.reshape(c_in // group_size, group_size, c_out)              # [G, g, C_out]
    s = dynamic_scale(xp, xp.max(xp.abs(wg), axis=1))                  # [G, C_out]
    return _quantize(xp, wg, s[:, None, :]).reshape(c_in, c_out), s


def check_group_size(group_size, c_in: int, name: str = "") -> None:
    """ConfigError unless ``group_size`` is a positive integer dividing ``c_in``."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ConfigError(f"group_size must be a positive integer, got {group_size!r}")
    if c_in % group_size:
        divisors = [d for d in (256, 128, 64, 32, 16, 8) if c_in % d == 0]
        raise ConfigError(
            f"group_size={group_size} does not divide C_in={c_in}{f' of {name}' if name else ''}: "
            f"ZeroQuant groups tile each output channel's C_in input channels exactly (no padding); "
            f"choose a divisor{f' such as {divisors[0]}' if divisors else ''}, or skip this layer")


def largest_group_size(model, at_most: int = 128, skip=()) -> int:
    """The largest power of two ≤ ``at_most`` dividing every linear's C_in (leaves matching
    ``skip`` excepted): a ZeroQuant group size that fits a whole model (1 at worst)."""
    import fnmatch

    widths = [leaf.w.shape[0] for name, leaf in model.linears().items()
              if not any(fnmatch.fnmatchcase(name, p) for p in skip)]
    g = 1
    while g * 2 <= at_most and all(c % (g * 2) == 0 for c in widths):
        g *= 2
    return g


@dataclasses.dataclass(frozen=True, eq=False)
class GroupW8A8Linear(Int8WeightShape):
    """ZeroQuant's W8A8: int8 ``w_q`` ``[C_in, C_out]`` with group-wise scales ``w_scale``
    ``[G, C_out]`` (groups of ``C_in / G`` consecutive input channels), dynamic per-token
    activations. ``path="int"``: one batched INT8 GEMM over the G groups, each group's int32
    partial sum scaled by its own ``Δx[t] · Δw[G, j]``, then summed (see :func:`group_epilogue`).
    ``path="fake"``: ``dequantize(X̄) @ dequantize(W̄) + b`` with the same integers.
    """

    w_q: object
    w_scale: object
    b: object = None
    path: str = "int"

    @property
    def groups(self) -> int:
        return self.w_scale.shape[0]

    @property
    def group_size(self) -> int:
        return self.in_features // self.groups

    def dequantized_weight(self, dtype):
        # -> [C_in, C_out] float: each group's rows times its scales
        G, g = self.groups, self.group_size
        w = dequantize(self.w_q.reshape(G, g, self.out_features), self.w_scale.astype(dtype)[:, None, :])
        return w.reshape(self.in_features, self.out_features)

    def __call__(self, x, mask=None):
        # [..., T, C_in] float, mask unused (per-token scales) -> [..., T, C_out] float
        _check_width(x, self.in_features, "GroupW8A8Linear")
        lead, (G, g) = x.shape[:-1], (self.groups, self.group_size)
        x_q, x_s = quantize_per_token(x)                                  # [..., T, C_in] int8, [..., T, 1]
        x_q, x_s = x_q.reshape(-1, self.in_features), x_s.reshape(-1, 1)  # [N, C_in], [N, 1]
        w_s = self.w_scale.astype(x.dtype)                                # [G, C_out]
        if self.path == "int":
            x_g = x_q.reshape(-1, G, g).swapaxes(0, 1)                    # [G, N, g] int8
            w_g = self.w_q.reshape(G, g, self.out_features)               # [G, g, C_out] int8
            acc = int8_bmm(x_g, w_g)                                      # [G, N, C_out] int32
            y = group_epilogue(acc, x_s, w_s, self.b, x.dtype)
        else:
            y = _add_bias(dequantize(x_q, x_s) @ self.dequantized_weight(x.dtype), self.b)
        return y.reshape(*lead, self.out_features)

    def describe(self) -> str:
        return (f"ZeroQuant W8A8 [{self.in_features}->{self.out_features}] w:per_group "
                f"(g={self.group_size}, G={self.groups}) a:per_token path:{self.path}")


def group_epilogue(acc, x_scale, w_scale, bias, dtype):
    """``Y = Σ_G acc[G] · (Δx · Δw[G]) + b``: each group's int32 partial sums scaled by its
    own weight scales, then added. The grouping ``acc · (Δx · Δw)`` is the one of
    :func:`minisq.gemm.dequant_epilogue`, so one group (g = C_in) gives exactly its result.
    Holds ``[G, N, C_out]`` floats at once (G times the output).
    """
    # [G, N, C_out] int32, [N, 1], [G, C_out], [C_out] | None -> [N, C_out] float
    if acc.shape[0] == 1:  # one group: the W8A8 epilogue itself
        return dequant_epilogue(acc[0], x_scale, w_scale[0], bias, out_dtype=dtype)
    y = (acc.astype(dtype) * (x_scale[None] * w_scale[:, None, :])).sum(axis=0)
    return _add_bias(y, bias)


# ----------------------------------------------------------------------------------------
# LLM.int8(): vector-wise INT8 with the outlier channels in float


def outlier_channels(x, mask=None, threshold: float = 6.0):
    """LLM.int8()'s outlier test: input channel k of a sequence is an outlier when some real
    token of it has ``|x[t, k]| ≥ threshold``. Padding tokens (``mask == 0``) never decide.
    """
    # [..., T, C] float, [..., T] 0/1 or None -> [..., 1, C] bool  ([1, C] for x [T, C] or [C])
    xp = get_array_module(x)
    a = xp.abs(x if x.ndim >= 2 else x[None])                            # [..., T, C]
    if mask is not None:
        a = xp.where(xp.asarray(mask)[..., None] > 0, a, xp.zeros_like(a))
    return xp.max(a, axis=-2, keepdims=True) >= threshold


@dataclasses.dataclass(frozen=True, eq=False)
class LLMInt8Linear(Int8WeightShape):
    """LLM.int8(): int8 ``w_q`` ``[C_in, C_out]`` with per-channel scales ``[1, C_out]``;
    per-token activations over the regular channels; the outlier channels (see
    :func:`outlier_channels`) multiplied in float by the dequantized int8 rows:

        Y = Δx · (X̄_reg W̄) · Δw + b  +  X[:, O] · (W̄[O] · Δw)

    (the module docstring says why the float part uses the int8 rows, as bitsandbytes does).
    """

    w_q: object
    w_scale: object
    b: object = None
    threshold: float = 6.0
    path: str = "int"

    def outlier_channels(self, x, mask=None):
        # [..., T, C_in] float, [..., T] -> [..., 1, C_in] bool
        return outlier_channels(x, mask, self.threshold)

    def __call__(self, x, mask=None):
        # [..., T, C_in] float, [..., T] 0/1 or None -> [..., T, C_out] float (same dtype as x)
        _check_width(x, self.in_features, "LLMInt8Linear")
        xp = get_array_module(x)
        lead = x.shape[:-1]
        out = self.outlier_channels(x, mask)                             # [..., 1, C_in] bool
        x_reg = xp.where(out, xp.zeros((), x.dtype), x)                  # the outlier columns zeroed
        x_q, x_s = quantize_per_token(x_reg)                             # [..., T, C_in] int8, [..., T, 1]
        x_q, x_s = x_q.reshape(-1, self.in_features), x_s.reshape(-1, 1)
        w_s = self.w_scale.astype(x.dtype)
        if self.path == "int":
            y = dequant_epilogue(int8_gemm(x_q, self.w_q), x_s, w_s, self.b, out_dtype=x.dtype)
        else:
            y = _add_bias(dequantize(x_q, x_s) @ dequantize(self.w_q, w_s), self.b)
        # the float part, over the channels that are outliers in at least one sequence
        idx = xp.flatnonzero(out.reshape(-1, self.in_features).any(axis=0))   # [K]
        if idx.size:
            x_out = xp.where(out[..., idx], x[..., idx], xp.zeros((), x.dtype))   # [..., T, K] (0 where regular)
            w_out = dequantize(self.w_q[idx], w_s)                            # [K, C_out]: dequantized int8 rows
            y = y + x_out.reshape(-1, idx.size) @ w_out
        return y.reshape(*lead, self.out_features)

    def describe(self) -> str:
        return (f"LLM.int8() [{self.in_features}->{self.out_features}] w:per_channel a:per_token, "
                f"|x| >= {self.threshold:g} channels in float, path:{self.path}")


def outlier_fractions(model, input_ids, attention_mask=None, threshold: float | None = None) -> dict:
    """Per linear, the fraction of its input channels that LLM.int8() would run in float on
    these inputs, averaged over the sequences: ``{name: fraction}``.

    With ``threshold=None`` only the model's :class:`LLMInt8Linear` leaves are measured, at
    their own threshold; with a threshold, every linear leaf (float models too). One forward
    pass; the model is not changed.
    """
    seen = {}

    def spy(name, leaf):
        t = threshold if threshold is not None else getattr(leaf, "threshold", None)
        if t is None or (threshold is None and not isinstance(leaf, LLMInt8Linear)):
            return leaf

        def observed(x, mask=None):
            seen[name] = float(outlier_channels(x, mask, t).mean())
            return leaf(x, mask)
        return observed

    model.replace_linears(spy)(input_ids, attention_mask)
    return seen
