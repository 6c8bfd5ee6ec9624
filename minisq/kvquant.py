"""The KV cache in INT8: keys and values stored as int8 codes with per-token, per-head scales.

Legend: B batch, H heads, T new tokens, S tokens attended to (past + new), D head dim,
L layers, C = H · D hidden.

Decoding keeps every past token's keys and values; for long sequences and big batches that
cache, not the weights, fills the memory. ``minisq.quantize(model, preset, kv_cache="int8")``
stores them as int8 with one scale per token and head (the symmetric absmax quantizer of
:mod:`minisq.quant` over the D values of one head of one token):

    K̄[b, h, s, :] = round(K[b, h, s, :] / Δk[b, h, s]),   Δk[b, h, s] = max_d |K[b, h, s, d]| / 127

and the same for V: ``C + H`` scale-sized numbers per token and layer for each of K and V
instead of ``C`` floats, about a quarter of float32 (:func:`kv_cache_bytes_per_token`).
Attention then reads ``dequantize(K̄, Δk)`` and ``dequantize(V̄, Δv)``.

The keys and values are quantized the same way **with or without a cache** (a full forward
pass sees them as the cache would store them), so perplexity measures the cost of the int8
cache and a decode with the cache equals the full forward: per-token scales make each
token's codes independent of the others. minisq dequantizes the cached ``[B, H, S, D]``
arrays each step (a temporary); a fused kernel would dequantize tiles on the fly.

The storage mode is recorded in ``model.info["quantization"]["kv_cache"]`` (so it is
printed, saved and reloaded with the model), and :func:`attend_kv` — called from one place
in the attention function — reads it.
"""

from __future__ import annotations

from .quant import dequantize, quantize_per_token


def kv_mode(model) -> str:
    """"int8" when the model stores its KV cache in int8, else "float"."""
    return (model.info.get("quantization") or {}).get("kv_cache", "float")


def quantize_kv(a):
    """Keys or values as int8 codes with one scale per token and head."""
    # [B, H, T, D] float -> [B, H, T, D] int8, [B, H, T, 1] float
    return quantize_per_token(a)


def attend_kv(model, cache, i: int, k, v):
    """Layer ``i``'s keys and values as attention sees them, after storing the new ones in
    the cache (if any): float as given, or through int8 codes for ``kv_cache="int8"``."""
    # [B, H, T, D] x2 (+ the cache's S - T past tokens) -> [B, H, S, D] x2 float
    if kv_mode(model) != "int8":
        return cache.update(i, k, v) if cache is not None else (k, v)
    (k_q, k_s), (v_q, v_s) = quantize_kv(k), quantize_kv(v)            # int8 codes, [B, H, T, 1] scales
    if cache is not None:
        k_q, k_s, v_q, v_s = cache.update(i, k_q, k_s, v_q, v_s)       # [B, H, S, D] int8, [B, H, S, 1]
    return dequantize(k_q, k_s), dequantize(v_q, v_s)


def kv_cache_bytes_per_token(model) -> int:
    """Bytes the KV cache holds per token of one sequence, all layers together:

    * float attention: ``2 · L · C · itemsize`` (K and V in the model's dtype);
    * ``kv_cache="int8"``: ``2 · L · (C + H · itemsize)`` (int8 codes + a scale per head);
    * quantized attention (``attn_bmm``): ``2 · L · (C + itemsize)`` (int8 codes + one
      per-token scale for all heads, :class:`minisq.qlinear.AttentionQuant`).
    """
    cfg = model.config
    item = model.dtype.itemsize
    C, H, L = cfg.hidden_size, cfg.num_heads, cfg.num_layers
    if model.attn_quant is not None:
        per_layer = 2 * (C + item)
    elif kv_mode(model) == "int8":
        per_layer = 2 * (C + H * item)
    else:
        per_layer = 2 * C * item
    return L * per_layer
