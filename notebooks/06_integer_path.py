# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · The real integer path, INT8 attention, the KV cache, and memory
#
# Most papers *simulate* W8A8 ("fake quantization": round to the int8 grid, then compute in
# float). minisq also runs the real thing: int8 weights are stored, activations are quantized
# to int8 arrays, the GEMM accumulates in int32 (`minisq.int8_gemm`), and the epilogue
# scales the result back. `minisq.quantize(..., path="int")` (the default) builds that model;
# `path="fake"` builds the simulation with the very same integers. This notebook checks that
# they agree, looks inside one layer, quantizes the attention products, decodes with a KV
# cache, generates text, and counts bytes.

# %%
# The one line to change. "synthetic" runs anywhere in seconds; for a real model give a
# Hugging Face hub id (downloaded once into the HF cache) or a local checkpoint folder.
MODEL = "synthetic"  # or "gpt2", "facebook/opt-125m", "HuggingFaceTB/SmolLM-135M" (a Llama), or a local folder

# %%
import numpy as np

import minisq
from minisq.course.notebook import calibration_tokens, check, open_model

np.set_printoptions(precision=4, suppress=True, linewidth=110)

# The model (SYNTHETIC: 2 layers, C = 128, 4 outlier channels x60), its printable name, the
# data folder its text comes from, and per layer the linears fed by each norm.
model, NAME, SYNTHETIC, DATA, QKV, FC1 = open_model(MODEL)

# %% [markdown]
# **Tokens.** A real model with a tokenizer and a data folder calibrates on WikiText-2
# paragraphs. Otherwise the tokens are **SYNTHETIC**: sequences sampled from the float model
# itself (seeded). On its own samples a random-weight model is as confident as a language
# model on text, so quantization errors show up in its perplexity, while on uniformly random
# ids every variant would be equally lost.

# %%
T = min(128, model.config.max_positions)  # tokens per sequence
calib, TOKENS = calibration_tokens(model, DATA, n=8, length=T)

# %%
stats = minisq.calibrate(model, calib, keep_samples=64, progress=False)
smoothed = minisq.smooth(model, stats, alpha=0.5)
stats_sm = minisq.calibrate(smoothed, calib, keep_samples=64, progress=False)

# The same recipe in float64, for the checks that must hold to ~1e-12 (float64 quantized
# models keep int8 weights; only their activations and scales are float64).
model64 = model.astype("float64")
stats64 = minisq.calibrate(model64, calib, progress=False)
smoothed64 = minisq.smooth(model64, stats64, alpha=0.5)
stats_sm64 = minisq.calibrate(smoothed64, calib, progress=False)

L = min(64, *(len(c) for c in calib[:2]))
ids = np.stack([c[:L] for c in calib[:2]])        # [B=2, L] token ids
print("ids", ids.shape)

# %% [markdown]
# ## 1. Integer path vs fake quantization
#
# Both paths quantize the same activations with the same scales to the same int8 values; the
# integer path sums them exactly in int32 and scales once, the fake path multiplies the
# dequantized floats. So a layer's outputs differ only by float rounding, and in float64 the
# logits agree to ~1e-15. In float32 the rounding differences (~1e-7) can land an activation
# of a *later* layer on the other side of a rounding boundary, flipping its int8 code by one
# step: the logits then differ by about one quantization step (~1e-3), not by 1e-7. That is
# why the exact checks in this notebook run in float64.

# %%
rel = {}
for dtype, base, st in (("float32", smoothed, stats_sm), ("float64", smoothed64, stats_sm64)):
    y_int = minisq.quantize(base, "O3", stats=st, path="int")(ids)
    y_fake = minisq.quantize(base, "O3", stats=st, path="fake")(ids)
    rel[dtype] = float(np.abs(y_int - y_fake).max() / np.abs(y_fake).max())
    print(f"{dtype}: max |logits_int - logits_fake| / max |logits| = {rel[dtype]:.1e}")
check("integer path == fake quantization in float64 (relative)", "≤ 1e-12", f"{rel['float64']:.1e}",
      rel["float64"] <= 1e-12)
check("... and in float32, up to a few one-step code flips", "≤ 1e-2", f"{rel['float32']:.1e}",
      rel["float32"] <= 1e-2)

# %% [markdown]
# ## 2. Inside one W8A8 layer
#
# The layer holds an int8 weight and its scale (per-tensor under O3) and a static activation
# scale. Feeding it real inputs step by step shows every intermediate array.

# %%
q_sq = minisq.quantize(smoothed, "O3", stats=stats_sm)       # SmoothQuant-O3, integer path
leaf = q_sq.linears()[QKV[0]]
print(QKV[0], "->", minisq.qlinear.describe(leaf))
print(f"w_q[:4, :8] ({leaf.w_q.dtype}, {leaf.w_q.shape}):\n{leaf.w_q[:4, :8]}")
print(f"w_scale {float(leaf.w_scale):.4g} (per-tensor), x_scale {float(leaf.x_scale):.4g} (static)")
# (At α = 0.5 the two can coincide: smoothing gave every channel the same range in X and W,
#  max|X_j / s_j| = max|W_j s_j|, so the largest of each is the same number.)

x = stats_sm.samples[QKV[0]]                                 # [64, C] float32: the layer's real inputs
x_q, x_s = leaf.quantize_input(x)                            # [64, C] int8, 0-d scale
acc = minisq.int8_gemm(x_q, leaf.w_q)                        # [64, C_out] int32
y = minisq.dequant_epilogue(acc, x_s, leaf.w_scale, leaf.b)  # [64, C_out] float32
print(f"x_q[:2, :8] ({x_q.dtype}):\n{x_q[:2, :8]}")
print(f"acc[:2, :6] ({acc.dtype}; max |acc| = {int(np.abs(acc).max())}, int16 stops at 32767):\n{acc[:2, :6]}")
exact = np.array_equal(acc, minisq.int8_gemm_reference(x_q, leaf.w_q))
same = np.array_equal(y, leaf(x))
check("accumulator == int64 reference, and the steps == the layer (bitwise)", (True, True), (exact, same),
      exact and same)

# %% [markdown]
# ## 3. Quantized attention, as the official code does it
#
# The official SmoothQuant code does not quantize the operands of attention's two batched
# matmuls directly. It quantizes the **outputs of the q, k and v projections** (with the
# activation granularity, before q is multiplied by $1/\sqrt{D}$) and leaves the softmax
# probabilities $P$ in float. `attn_bmm=True` does exactly that; in `path="int"`, $q k^\top$
# then runs as an INT8 BMM (`minisq.int8_bmm`) whose epilogue multiplies by a row scale
# (query token) and a column scale (key token), and $P v$ stays a float matmul, since $P$ has
# no int8 form in this scheme. `attn_bmm="static"` is the official *int8* OPT model (preset
# O3 only): calibrated static scales for q, k and v, and $P$ as int8 with the fixed scale
# 1/127, so $P v$ is an INT8 BMM too. In float64 the integer and fake paths agree.

# %%
q_bmm = minisq.quantize(smoothed, "O3", stats=stats_sm, attn_bmm=True)
q_static = minisq.quantize(smoothed, "O3", stats=stats_sm, attn_bmm="static")
print("attention quantizer:", q_bmm.attn_quant.acts, "q/k/v scales; P int8:", q_static.attn_quant.probs_int8)
ref = model(ids)
kl = {label: minisq.logit_error(ref, m(ids))["kl"]
      for label, m in (("linears only", q_sq), ("+ q/k/v", q_bmm), ("+ q/k/v + P int8", q_static))}
print("KL(float || W8A8):", ", ".join(f"{k} {v:.4g}" for k, v in kl.items()), f"[{NAME}]")

rel_bmm = 0.0
for mode in (True, "static"):
    a_int = minisq.quantize(smoothed64, "O3", stats=stats_sm64, attn_bmm=mode, path="int")(ids)
    a_fake = minisq.quantize(smoothed64, "O3", stats=stats_sm64, attn_bmm=mode, path="fake")(ids)
    rel_bmm = max(rel_bmm, float(np.abs(a_int - a_fake).max() / np.abs(a_fake).max()))
check("quantized attention: integer path == fake path in float64 (relative)", "≤ 1e-12", f"{rel_bmm:.1e}",
      rel_bmm <= 1e-12)


# %% [markdown]
# ## 4. KV-cache decoding equals the full forward
#
# Decoding feeds one token at a time and keeps the past keys and values. A quantized model
# gives the same logits that way as on the whole sequence **only if each token is quantized
# independently of the others**: per-token scales (O1) and static scales (O3) are; a dynamic
# per-tensor scale (naive/O2) is the max over *all tokens of the sequence in the call*, so a
# one-token call gets a different scale than the full sequence did. (It is never the max over
# the other sequences of a batch, or over padding: a sequence quantizes the same alone or
# batched.)

# %%
def decode_incrementally(m, ids, n_prompt):
    # logits of the prompt in one call, then one call per token with the KV cache: [B, T, V]
    logits, cache = m.forward(ids[:, :n_prompt], use_cache=True)
    steps = [logits]
    for t in range(n_prompt, ids.shape[1]):
        logits, cache = m.forward(ids[:, t:t + 1], cache=cache)
        steps.append(logits)
    return np.concatenate(steps, axis=1)


kv = {}
for preset in ("O1", "O2", "O3"):
    m = minisq.quantize(smoothed64, preset, stats=stats_sm64)
    full, step = m(ids), decode_incrementally(m, ids, n_prompt=L // 2)
    kv[preset] = float(np.abs(full - step).max() / np.abs(full).max())
    print(f"{preset} ({minisq.PRESETS[preset]['acts']:>10s} activations): cache vs full, relative {kv[preset]:.1e}")
check("O1 and O3 decode with the cache exactly as the full forward (float64)", "≤ 1e-12",
      f"{max(kv['O1'], kv['O3']):.1e}", max(kv["O1"], kv["O3"]) <= 1e-12)

# %% [markdown]
# ## 5. Generation side by side
#
# Continuations of the same prompt by the float model, naive W8A8 and SmoothQuant-O3
# (`Model.generate` uses the KV cache): greedy, and sampled at temperature 1 with the same
# seed (so the three models draw the same random numbers, and only their distributions
# differ). On the synthetic model the "text" is token ids from random weights; on GPT-2/OPT
# it is text.

# %%
q_naive = minisq.quantize(model, "naive")
prompt = calib[0][:8]
N_NEW = 24
for how, kwargs in (("greedy", {}), ("sampled", {"temperature": 1.0, "seed": 0})):
    outs = {label: m.generate(prompt, max_new_tokens=N_NEW, **kwargs)
            for label, m in (("float", model), ("W8A8 naive", q_naive), ("SmoothQuant-O3", q_sq))}
    print(f"--- {how} [{NAME}]")
    for label, out in outs.items():
        same = int((out[len(prompt):] == outs["float"][len(prompt):]).sum())
        shown = repr(model.tokenizer.decode(out.tolist())) if model.tokenizer is not None else out[len(prompt):]
        print(f"{label:15s} ({same:2d}/{N_NEW} tokens as float): {shown}")

# %%
# generate() (KV cache) must pick the same greedy tokens as re-running the full sequence.
q64 = minisq.quantize(smoothed64, "O3", stats=stats_sm64)
generated = q64.generate(prompt, max_new_tokens=12)
seq = prompt.copy()
for _ in range(12):
    seq = np.append(seq, q64(seq)[-1].argmax())               # full forward, no cache
check("generate (KV cache) == greedy full-forward decoding", seq[len(prompt):].tolist(),
      generated[len(prompt):].tolist(), np.array_equal(seq, generated))

# %% [markdown]
# ## 6. Memory
#
# `minisq.weight_memory` counts the bytes of the linear layers as stored. The W8A8 layers
# hold one byte per weight plus a scale and a float bias; the output projection (`lm_head`,
# skipped by default, as in the paper) stays float.

# %%
mem_f, mem_q = minisq.weight_memory(model), minisq.weight_memory(q_sq)
print(f"{'':18s}{'stored':>12s}{'as float32':>12s}{'as float16':>12s}{'W8A8 layers':>13s}{'float layers':>13s}")
for label, mem in (("float model", mem_f), ("SmoothQuant-O3", mem_q)):
    print(f"{label:18s}{mem['stored_bytes']:12,d}{mem['float32_bytes']:12,d}{mem['float16_bytes']:12,d}"
          f"{mem['quantized_layers']:13d}{mem['float_layers']:13d}")

# The same count from the layer shapes, independently: int8 weight, float32 scale(s) and bias.
expected, f32_q, int8_q = 0, 0, 0
for leaf in q_sq.linears().values():
    bias = 4 * leaf.out_features if leaf.b is not None else 0
    if isinstance(leaf, minisq.W8A8Linear):
        size = leaf.in_features * leaf.out_features + 4 * leaf.w_scale.size + bias
        int8_q += size
        f32_q += 4 * leaf.in_features * leaf.out_features + bias
    else:
        size = 4 * leaf.in_features * leaf.out_features + bias
    expected += size
print(f"the quantized layers alone: {f32_q:,} bytes in float32 -> {int8_q:,} bytes W8A8 ({f32_q / int8_q:.2f}x smaller)")
check("weight_memory == bytes counted from the layer shapes", f"{expected:,}", f"{mem_q['stored_bytes']:,}",
      expected == mem_q["stored_bytes"])
check("W8A8 layers take about a quarter of float32", "> 3.5x smaller", f"{f32_q / int8_q:.2f}x", f32_q / int8_q > 3.5)
