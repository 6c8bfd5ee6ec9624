"""Quantized attention: the official SmoothQuant scheme for the two batched matmuls.

Legend: B batch, T new tokens, S tokens attended to (past + new), C hidden, H heads,
D head dim, L layers.

``minisq.quantize(model, preset, attn_bmm=True | "static")`` sets ``model.attn_quant`` to an
:class:`AttentionQuant`, which every family's self-attention calls instead of float
attention; :func:`attention_quant` builds it from the quantization's options and, for
static scales, the calibrated ranges of the q, k and v projections, for the in-memory
:func:`minisq.quantize` and the streamed :func:`minisq.quantize_checkpoint` alike.
"""

from __future__ import annotations

import dataclasses

from .backend import get_array_module
from .gemm import int8_bmm
from .kernels.cpu import softmax
from .nn import merge_heads, split_heads
from .quant import (
    QMAX, dequantize, dynamic_scale, quantize_per_sequence, quantize_per_tensor, quantize_per_token,
)


def attention_quant(spec, model, qkv_absmax=None):
    """The :class:`AttentionQuant` of a quantization ``spec`` (:class:`minisq.qlinear.QuantSpec`),
    or None when ``spec.attn_bmm`` is False. ``qkv_absmax`` holds, per layer, the calibrated
    ``(max|q|, max|k|, max|v|)`` (see :meth:`minisq.CalibrationStats.qkv_absmax`); static
    activations need it."""
    if spec.attn_bmm is False:
        return None
    static = tuple(qkv_scales(model, maxima) for maxima in qkv_absmax) if spec.acts == "static" else None
    return AttentionQuant(spec.acts, spec.path, static, probs_int8=spec.attn_bmm == "static")


def static_qkv_scales(model, stats) -> tuple:
    """Per layer ``(Δq, Δk, Δv)`` = calibrated ``max|y| / 127`` of the q, k and v projection
    outputs (the official ``get_static_decoder_layer_scales``), in the model's dtype, with the
    quantizers' zero-range guard. GPT-2's fused ``c_attn`` gives q, k, v as thirds of its
    output: each third has its own range."""
    return tuple(qkv_scales(model, stats.qkv_absmax(model, i)) for i in range(model.config.num_layers))


def qkv_scales(model, maxima) -> tuple:
    """``(Δq, Δk, Δv)`` of one layer from its calibrated ``(max|q|, max|k|, max|v|)``: ``max / 127``
    in the model's dtype, with the quantizers' zero-range guard."""
    xp = model.xp
    return tuple(dynamic_scale(xp, xp.asarray(m, dtype=model.dtype)) for m in maxima)


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionQuant:
    """Attention with quantized q, k, v — the official SmoothQuant scheme.

    The official fake-quant code does not quantize the operands of the two batched matmuls
    directly: it quantizes the *outputs of the q, k and v projections* with the activation
    granularity (per-token, or per-tensor = per sequence), before q is multiplied by 1/√D,
    and it leaves the softmax probabilities P in float:

        scores = (q̂ · 1/√D) k̂ᵀ + bias,   P = softmax(scores),   out = P v̂

    with ``x̂ = dequantize(quantize(x))``. ``path="int"`` computes the same thing on the
    integers: ``q̄ k̄ᵀ`` is an INT8 BMM into int32 and the epilogue multiplies by
    ``(Δq[t] · 1/√D) · Δk[s]`` (a row and a column scale, as in a W8A8 GEMM); ``P v̂`` stays
    a float matmul because P has no int8 form in this scheme.

    ``probs_int8=True`` (``acts="static"`` only) is the official *int8* OPT model: static
    q/k/v scales and P quantized to int8 with the fixed scale 1/127 (P ∈ [0, 1]), so P·V is
    an INT8 BMM too: ``out = (1/127 · Δv) · (P̄ V̄)``. ``static`` holds ``(Δq, Δk, Δv)`` per
    layer. Differences that remain from the official int8 kernels: minisq keeps the linear
    biases in float (torch-int quantizes them to int8), folds 1/√D into the epilogue rather
    than into q_proj's weights (the same up to rounding), and clips codes to ±127 (the
    official kernels can produce -128).
    """

    acts: str = "per_token"
    path: str = "int"
    static: tuple | None = None
    probs_int8: bool = False

    def quantize(self, x, mask, which: int, layer: int):
        # [B, T, C] float, [B, T] -> [B, T, C] int8, scale [B, T, 1] (broadcast per token)
        if self.acts == "per_token":
            x_q, s = quantize_per_token(x)
        elif self.acts == "per_tensor":
            x_q, s = quantize_per_sequence(x, mask)
        else:
            x_q, s = quantize_per_tensor(x, self.static[layer][which])
        xp = get_array_module(x)
        return x_q, xp.broadcast_to(xp.asarray(s, dtype=x.dtype), x.shape[:-1] + (1,))

    def __call__(self, layer: int, q, k, v, mask, bias, scale: float, num_heads: int, cache=None):
        """Attention output ``[B, T, C]`` from the q, k, v projection outputs ``[B, T, C]``
        (``mask`` ``[B, T]`` marks the new tokens that are real; ``bias`` ``[B, 1, T, S]``).
        The KV cache stores k and v as int8 codes with their per-token scales."""
        xp = get_array_module(q)
        dtype = q.dtype
        (q_q, q_s), (k_q, k_s), (v_q, v_s) = (self.quantize(a, mask, j, layer) for j, a in enumerate((q, k, v)))
        q_q, k_q, v_q = (split_heads(a, num_heads) for a in (q_q, k_q, v_q))      # [B, H, T, D] int8
        q_s, k_s, v_s = (s[:, None] for s in (q_s, k_s, v_s))                     # [B, 1, T, 1]
        if cache is not None:
            k_q, k_s, v_q, v_s = cache.update(layer, k_q, k_s, v_q, v_s)         # [.., S, ..]
        if self.path == "fake":
            scores = (dequantize(q_q, q_s) * dtype.type(scale)) @ dequantize(k_q, k_s).swapaxes(-1, -2)
        else:
            acc = int8_bmm(q_q, k_q.swapaxes(-1, -2))                          # [B, H, T, S] int32
            # the W8A8 epilogue with a row (query token) and a column (key token) scale
            scores = acc.astype(dtype) * ((q_s * dtype.type(scale)) * k_s.swapaxes(-1, -2))
        scores += bias
        p = softmax(scores, inplace=True)                                     # [B, H, T, S]
        if not self.probs_int8:
            return merge_heads(p @ dequantize(v_q, v_s))
        p_q = xp.clip(xp.rint(p * dtype.type(QMAX)), 0, QMAX).astype(xp.int8)  # P̄ = round(127 P)
        p_s = xp.asarray(1 / QMAX, dtype=dtype)
        v_s0 = self.static[layer][2]                                         # static: one Δv
        if self.path == "fake":
            return merge_heads(dequantize(p_q, p_s) @ dequantize(v_q, v_s0))
        acc = int8_bmm(p_q, v_q)                                             # [B, H, T, D] int32
        return merge_heads(acc.astype(dtype) * (p_s * v_s0))
