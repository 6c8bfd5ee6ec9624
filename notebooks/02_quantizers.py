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
# # 02 · Quantizers: granularity, dynamic vs static, and what fits an INT8 GEMM
#
# A symmetric INT8 quantizer (SmoothQuant Sec. 2, Eq. 1) maps a group of floats to integers
# with one scale:
#
# $$\Delta = \frac{\max |X|}{127}, \qquad \bar X = \mathrm{clip}\big(\mathrm{round}(X / \Delta),\, -127,\, 127\big), \qquad \hat X = \Delta\,\bar X$$
#
# The question is **which values share a Δ** (paper Fig. 3): the whole tensor
# (per-tensor), one row of activations (per-token), or one output channel of a weight
# (per-channel). And when Δ is computed: from the tensor at hand at run time (*dynamic*) or
# once, from calibration data (*static*). `minisq.quantize_per_*` return the real int8 array
# and its scale; `minisq.fake_quantize` is literally `dequantize(quantize(x))`.
#
# Legend: `T` tokens, `C` channels (`C_in`), `C_out` output channels.

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
stats = minisq.calibrate(model, calib, keep_samples=256, progress=False)
X = stats.samples[QKV[0]].astype(np.float64)        # [n, C] what enters layer 0's q/k/v projection
W = model.linears()[QKV[0]].w.astype(np.float64)    # [C, C_out] that projection's weight
ch_max = np.abs(X).max(axis=0)                      # [C] per-channel range
K_TOP = len(model.info.get("outlier_channels", [])) or 4
outliers = np.sort(np.argsort(ch_max)[-K_TOP:])     # the K_TOP widest channels
normal = np.setdiff1d(np.arange(X.shape[1]), outliers)
print(f"X: {X.shape} from {QKV[0]} ({NAME})")
print(f"widest channels {outliers.tolist()}: max|x| {ch_max[outliers].round(1).tolist()}; "
      f"median channel max|x| {np.median(ch_max):.2f}")

# %% [markdown]
# ## 1. Three granularities on a 3 x 4 example
#
# `quantize_per_channel` is written for weights `[C_in, C_out]` and gives one scale per
# column. Applied to activations `[T, C]`, the columns are the *input* channels: we use that
# below to see what per-channel activation scales would buy, and why they cannot be used.

# %%
x = np.array([[0.1, -0.5, 2.0, 0.3],
              [0.2, 0.1, -0.05, 0.4],
              [-3.0, 0.2, 0.1, 0.0]])               # [T=3, C=4] float64
QUANTIZERS = {"per-tensor": minisq.quantize_per_tensor,
              "per-token": minisq.quantize_per_token,
              "per-channel": minisq.quantize_per_channel}
for label, quantize in QUANTIZERS.items():
    q, s = quantize(x)                              # int8 [3, 4], float scale
    print(f"{label:11s} scale {s.shape!s:7s} = {np.ravel(s)}")
    print(q)

q_t, s_t = minisq.quantize_per_token(x)
row_max = np.abs(q_t).max(axis=1)
check("each token's largest |value| becomes 127", [127, 127, 127], row_max.tolist(), (row_max == 127).all())
same = np.array_equal(minisq.fake_quantize(x, "per_token"), minisq.dequantize(q_t, s_t))
check("fake_quantize(x) == dequantize(*quantize_per_token(x))", True, same, same)

# %% [markdown]
# ## 2. Error against granularity, on an activation with outlier channels
#
# SQNR (signal-to-quantization-noise ratio, $10 \log_{10} \sum X^2 / \sum (X - \hat X)^2$,
# higher is better; each bit is worth about 6 dB). "levels" counts how many of the 255 int8
# values a typical non-outlier channel actually uses: with one Δ per tensor or per token,
# the outliers set Δ and the other channels are squeezed into a handful of levels.

# %%
print(f"{'granularity':22s}{'scales':>8s}{'SQNR all':>11s}{'SQNR normal ch.':>17s}{'levels':>8s}   ({NAME})")
sqnr, sqnr_normal = {}, {}
for label, quantize in QUANTIZERS.items():
    q, s = quantize(X)
    X_hat = minisq.dequantize(q, s)
    levels = np.median([len(np.unique(q[:, c])) for c in normal])
    sqnr[label] = minisq.sqnr_db(X, X_hat)
    sqnr_normal[label] = minisq.sqnr_db(X[:, normal], X_hat[:, normal])
    tag = label + (" (of X)" if label == "per-channel" else "")
    print(f"{tag:22s}{s.size:8d}{sqnr[label]:9.1f} dB{sqnr_normal[label]:12.1f} dB{levels:8.0f}")

w_sqnr = {g: minisq.sqnr_db(W, minisq.fake_quantize(W, g)) for g in ("per_tensor", "per_channel")}
print(f"\nthe weight W {W.shape}: per-tensor {w_sqnr['per_tensor']:.1f} dB, "
      f"per-channel {w_sqnr['per_channel']:.1f} dB  (weights are easy, Sec. 3)")
gain = sqnr["per-channel"] - sqnr["per-tensor"]
check("per-channel activation scales beat per-tensor", "> 0 dB", f"{gain:+.1f} dB", gain > 0)
if SYNTHETIC:
    check("per-channel helps a lot", "> 10 dB", f"{gain:+.1f} dB", gain > 10)
    lost = sqnr_normal["per-channel"] - sqnr_normal["per-token"]
    check("outliers sit in every token: per-token still squeezes the normal channels",
          "> 15 dB behind per-channel", f"{lost:.1f} dB behind", lost > 15)
    check("the weight is easier than the activation (per-tensor)", f"> {sqnr['per-tensor']:.1f} dB",
          f"{w_sqnr['per_tensor']:.1f} dB", w_sqnr["per_tensor"] > sqnr["per-tensor"])

# %% [markdown]
# ## 3. Dynamic vs static scales, and clipping
#
# *Dynamic* scales (O1, O2) are computed from each tensor at run time: always the right
# range, at the cost of a max-reduction per call. *Static* scales (O3) are fixed from
# calibration: free at run time, but a value beyond $\pm 127\,\Delta$ is **clipped** to
# ±127. Below, the static scale comes from 7 of the calibration sequences and is applied to
# the 8th, which it has never seen.

# %%
held_out = minisq.calibrate(model, calib[:-1], progress=False)           # 7 sequences
s_static = held_out.input_absmax[QKV[0]] / 127                          # O3's scale for this layer
X_new = minisq.calibrate(model, calib[-1:], keep_samples=T, progress=False).samples[QKV[0]].astype(np.float64)

q_dyn, s_dyn = minisq.quantize_per_tensor(X_new)                        # Δ from X_new itself
q_sta, _ = minisq.quantize_per_tensor(X_new, s_static)                  # Δ from calibration
n_clip = int((np.abs(X_new) / s_static >= 127.5).sum())
print(f"dynamic Δ {float(s_dyn):.4g}: SQNR {minisq.sqnr_db(X_new, minisq.dequantize(q_dyn, s_dyn)):.1f} dB")
print(f"static  Δ {s_static:.4g}: SQNR {minisq.sqnr_db(X_new, minisq.dequantize(q_sta, np.float64(s_static))):.1f} dB, "
      f"{n_clip} of {X_new.size} values beyond ±127Δ (clipped)")

# %% [markdown]
# Clipping can also be a choice: a smaller Δ gives the many small values more levels, at
# the price of clipping the large ones. With outlier channels that is a bad trade, because
# the outliers carry much of the signal (and, in LLMs, matter for accuracy).

# %%
print(f"{'Δ = c·max|X|/127':>18s}{'clipped':>10s}{'SQNR all':>11s}{'normal ch.':>13s}{'outlier ch.':>13s}")
clip_sqnr = {}
for c in (1.0, 0.5, 0.25, 0.1, 0.03):
    s = c * np.abs(X).max() / 127
    q, _ = minisq.quantize_per_tensor(X, s)
    X_hat = minisq.dequantize(q, np.float64(s))
    clip_sqnr[c] = minisq.sqnr_db(X, X_hat)
    print(f"{c:>18g}{100 * (np.abs(X) / s >= 127.5).mean():9.2f}%{clip_sqnr[c]:8.1f} dB"
          f"{minisq.sqnr_db(X[:, normal], X_hat[:, normal]):10.1f} dB{minisq.sqnr_db(X[:, outliers], X_hat[:, outliers]):10.1f} dB")

s = 0.5 * np.abs(X).max() / 127
q, _ = minisq.quantize_per_tensor(X, s)
beyond = np.abs(X) / s >= 127.5
check("every value beyond ±127Δ is clipped to ±127", "all 127", np.unique(np.abs(q[beyond])).tolist(),
      beyond.any() and (np.abs(q[beyond]) == 127).all())
if SYNTHETIC:
    check("clipping the outliers hurts overall", f"< {clip_sqnr[1.0]:.1f} dB at c=1", f"{clip_sqnr[0.03]:.1f} dB at c=0.03",
          clip_sqnr[0.03] < clip_sqnr[1.0])

# %% [markdown]
# ## 4. Why per-channel *activation* scales do not fit an INT8 GEMM
#
# Per-channel scales for X were the clear winner above. But with one scale $\Delta_x[k]$ per
# input channel, the scale depends on $k$, the index that the matmul sums over:
#
# $$Y[t, j] = \sum_k \big(\Delta_x[k]\,\bar X[t, k]\big)\big(\Delta_w[j]\,\bar W[k, j]\big)
#           = \Delta_w[j] \sum_k \Delta_x[k]\,\bar X[t, k]\,\bar W[k, j]$$
#
# $\Delta_x[k]$ stays **inside** the sum, so the sum is no longer integer arithmetic: an
# int8 GEMM cannot compute it, and the epilogue has no place to put a per-$k$ scale. The
# only way out is to move $\Delta_x[k]$ into the weight, $W' = \mathrm{diag}(\Delta_x)\,W$,
# which then has to be quantized again, with the activation's ranges now in its rows. That
# is exactly SmoothQuant's move, done *part of the way* (notebook 04).

# %%
q_c, s_c = minisq.quantize_per_channel(X)          # [n, C] int8, [1, C]: Δx[k], one per input channel
w_q, w_s = minisq.quantize_per_channel(W)          # [C, C_out] int8, [1, C_out]: Δw[j]
acc = minisq.int8_gemm(q_c, w_q)                   # Σ_k X̄ W̄: not the sum we need
try:
    minisq.dequant_epilogue(acc, s_c, w_s)
except minisq.ShapeError as e:
    print("dequant_epilogue refuses a per-input-channel scale:\n ", e)

y_true = minisq.dequantize(q_c, s_c) @ minisq.dequantize(w_q, w_s)         # [n, C_out] float
W_moved = s_c.T * minisq.dequantize(w_q, w_s)                              # diag(Δx) W: float again
y_moved = q_c.astype(np.float64) @ W_moved
rel = float(np.abs(y_true - y_moved).max() / np.abs(y_true).max())
check("Σ_k Δx[k] X̄ W == X̄ @ (diag(Δx) W)  (float64, relative)", "≤ 1e-12", f"{rel:.1e}", rel <= 1e-12)

sq_w, sq_moved = minisq.sqnr_db(W, minisq.fake_quantize(W, "per_channel")), minisq.sqnr_db(
    W_moved, minisq.fake_quantize(W_moved, "per_channel"))
print(f"re-quantizing the weight per channel: W {sq_w:.1f} dB, diag(Δx) W {sq_moved:.1f} dB")
if SYNTHETIC:
    check("the moved weight is harder to quantize", f"< {sq_w:.1f} dB", f"{sq_moved:.1f} dB", sq_moved < sq_w)
