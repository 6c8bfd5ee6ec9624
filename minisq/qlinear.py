"""W8A8 linear leaves and whole-model quantization (SmoothQuant Section 4, Table 2).

Legend: T tokens (all leading axes flattened), C_in / C_out a linear's widths.

A :class:`W8A8Linear` replaces a float :class:`~minisq.nn.Linear` leaf. Its weight is
stored as real int8 with its scale(s); activations are quantized just before the matmul:

    Y[t, j] = Δx[t] · (Σ_k X̄[t, k] · W̄[k, j]) · Δw[j] + b[j]          (path="int")

with X̄, W̄ int8, the inner sum an INT8 GEMM into int32 and the scales applied once per
output element by the epilogue. ``path="fake"`` is the simulation most papers report:
``dequantize(X̄, Δx) @ dequantize(W̄, Δw) + b`` in float; both paths use the very same
integers, so one layer's outputs agree to float rounding. Through a whole model in float32
that rounding can flip an int8 code in a later layer (~1e-3 on the logits): compare whole
models in float64, where they agree to ~1e-15.

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
works where naive W8A8 fails. Per-channel *activation* scales are not in the table: a scale per input channel k cannot
be pulled out of the sum over k, so the GEMM could not run on integers. That is the
problem SmoothQuant solves by moving the channel ranges into the weights first.
"""

from __future__ import annotations

import dataclasses
import fnmatch

import numpy as np

from .backend import get_array_module, is_gpu_array, to_numpy
from .errors import CalibrationError, ConfigError, ShapeError
from .gemm import dequant_epilogue, int8_bmm, int8_linear, pack_weight_tn
from .nn import Linear
from .quant import dequantize, dynamic_scale, quantize_per_channel, quantize_per_tensor, quantize_per_token

WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
ACT_GRANULARITIES = ("per_token", "per_tensor", "static")
PATHS = ("int", "fake")

PRESETS = {
    "naive": dict(weights="per_tensor", acts="per_tensor"),
    "O1": dict(weights="per_tensor", acts="per_token"),
    "O2": dict(weights="per_tensor", acts="per_tensor"),
    "O3": dict(weights="per_tensor", acts="static"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class W8A8Linear:
    """A linear layer with int8 weights and int8 activations.

    ``w_q`` int8 ``[C_in, C_out]``; ``w_scale`` ``[1, C_out]`` (per-channel) or 0-d
    (per-tensor); ``b`` float ``[C_out]`` or None; ``x_scale`` the static activation scale
    (0-d) for ``acts="static"``, else None. On the GPU the weight is packed once in
    cuBLAS's layout (``w_packed``, a :class:`~minisq.gemm.TNWeight`) and ``w_q`` is a
    ``[C_in, C_out]`` view of it: one int8 copy, never transposed per call.
    """

    w_q: object
    w_scale: object
    b: object = None
    acts: str = "per_token"
    x_scale: object = None
    path: str = "int"
    w_packed: object = dataclasses.field(default=None, repr=False)  # set by __post_init__

    def __post_init__(self):
        # derived from w_q every time (a stale packing can never survive a replace); frozen,
        # hence object.__setattr__
        packed = pack_weight_tn(self.w_q) if is_gpu_array(self.w_q) else None
        object.__setattr__(self, "w_packed", packed)
        if packed is not None:
            object.__setattr__(self, "w_q", packed.view())

    @property
    def in_features(self) -> int:
        return self.w_q.shape[0]

    @property
    def out_features(self) -> int:
        return self.w_q.shape[1]

    @property
    def weights(self) -> str:
        return "per_tensor" if self.w_scale.ndim == 0 else "per_channel"

    def quantize_input(self, x):
        # [T, C_in] float -> [T, C_in] int8, scale [T, 1] or 0-d
        if self.acts == "per_token":
            return quantize_per_token(x)
        if self.acts == "per_tensor":
            return quantize_per_tensor(x)
        return quantize_per_tensor(x, self.x_scale)

    def __call__(self, x):
        # [..., C_in] float -> [..., C_out] float (same dtype as x)
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"W8A8Linear expects inputs [..., {self.in_features}], got {x.shape}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)                          # [T, C_in]
        x_q, x_s = self.quantize_input(x2)                            # int8, scale
        w_s = self.w_scale.astype(x.dtype)
        if self.path == "int":
            w = self.w_q if self.w_packed is None else self.w_packed
            y = int8_linear(x_q, w, x_s, w_s, self.b, out_dtype=x.dtype)   # int32 sums inside
        else:
            y = dequantize(x_q, x_s) @ dequantize(self.w_q, w_s)      # [T, C_out] float
            if self.b is not None:
                y = y + self.b
        return y.reshape(*lead, self.out_features)


def quantize_linear(leaf: Linear, weights: str = "per_channel", acts: str = "per_token",
                    x_absmax=None, path: str = "int") -> W8A8Linear:
    """A :class:`W8A8Linear` from a float leaf. ``x_absmax`` is the calibrated max |x| of
    the leaf's input, needed for ``acts="static"`` (scale = max|x| / 127)."""
    _check_choice("weights", weights, WEIGHT_GRANULARITIES)
    _check_choice("acts", acts, ACT_GRANULARITIES)
    _check_choice("path", path, PATHS)
    quantize_w = quantize_per_channel if weights == "per_channel" else quantize_per_tensor
    w_q, w_scale = quantize_w(leaf.w)
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
        x_scale = dynamic_scale(xp, xp.asarray(x_absmax, dtype=leaf.w.dtype))
    return W8A8Linear(w_q, w_scale, leaf.b, acts=acts, x_scale=x_scale, path=path)


def _check_choice(name: str, value: str, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"{name}={value!r} is not one of {options}")


def quantize(model, preset: str | None = None, weights: str = "per_channel", acts: str = "per_token",
             stats=None, path: str = "int", skip=("lm_head",), attn_bmm: bool = False):
    """A new W8A8 model: every float linear leaf (except ``skip``) becomes a W8A8 leaf.

    ``preset`` ("naive", "O1", "O2", "O3") sets ``weights`` and ``acts`` as in the paper's
    Table 2. ``acts="static"`` needs ``stats`` from :func:`minisq.calibrate` on this very
    model (after smoothing, if it was smoothed). ``skip`` holds glob patterns of leaf names
    kept in float. ``attn_bmm=True`` also quantizes the attention products q·kᵀ and p·v
    (per-tensor dynamic INT8 operands). The input model is untouched.
    """
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
        weights, acts = PRESETS[preset]["weights"], PRESETS[preset]["acts"]
    _check_choice("weights", weights, WEIGHT_GRANULARITIES)
    _check_choice("acts", acts, ACT_GRANULARITIES)
    _check_choice("path", path, PATHS)
    if model.info.get("quantization"):
        raise ConfigError("this model is already quantized; quantize the float (or smoothed) model instead")
    if model.dtype not in (np.float32, np.float64):
        raise ConfigError(f"quantize a float32 or float64 model (this one is {model.dtype}): "
                          "the W8A8 epilogue computes in float32 or float64")
    if acts == "static":
        if stats is None:
            raise CalibrationError("acts='static' (preset O3) needs calibration stats: "
                                   "stats = minisq.calibrate(model, batches), then quantize(model, ..., stats=stats)")
        stats.check_matches(model)

    def swap(name, leaf):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in skip):
            return leaf
        x_absmax = stats.input_absmax_of(name) if acts == "static" else None
        return quantize_linear(leaf, weights, acts, x_absmax, path)

    info = dict(preset=preset or "custom", weights=weights, acts=acts, path=path,
                skip=list(skip), attn_bmm=attn_bmm)
    qmodel = model.replace_linears(swap, quantization=info)
    if attn_bmm:
        qmodel = qmodel.evolve(attn_matmul=Int8BMM(path))
    return qmodel


@dataclasses.dataclass(frozen=True)
class Int8BMM:
    """Batched matmul on int8 operands: ``a @ b`` ≈ Δa · (Ā @ B̄) · Δb, per-tensor dynamic
    scales (the official code's BMM quantization of q·kᵀ and p·v)."""

    path: str = "int"

    def __call__(self, a, b):
        # [..., M, K] float, [..., K, N] float -> [..., M, N] float
        a_q, a_s = quantize_per_tensor(a)
        b_q, b_s = quantize_per_tensor(b)
        if self.path == "fake":
            return dequantize(a_q, a_s) @ dequantize(b_q, b_s)
        lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        A = a_q.reshape(-1, *a.shape[-2:])
        B = b_q.reshape(-1, *b.shape[-2:])
        acc = int8_bmm(A, B)                                          # [batch, M, N] int32
        return dequant_epilogue(acc, a_s, b_s, None, out_dtype=a.dtype).reshape(*lead, *acc.shape[-2:])


def weight_memory(model) -> dict:
    """Bytes of the linear weights as stored (int8 + scales + biases for W8A8 leaves) and
    what the same layers take in float32 and float16."""
    stored = f32 = f16 = 0
    n_quantized = n_float = 0
    for leaf in model.linears().values():
        if isinstance(leaf, W8A8Linear):
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
    if isinstance(leaf, W8A8Linear):
        return (f"W8A8 [{leaf.in_features}->{leaf.out_features}] w:{leaf.weights} a:{leaf.acts} "
                f"path:{leaf.path}")
    return f"float [{leaf.w.shape[0]}->{leaf.w.shape[1]}] {to_numpy(leaf.w).dtype}"
