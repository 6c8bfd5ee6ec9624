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
# # 04 · Smoothing: migrate the outliers into the weights
#
# SmoothQuant (Sec. 4, Eq. 3-4) divides each input channel of X by a factor $s_j$ and
# multiplies the matching row of W by it, which leaves the product unchanged:
#
# $$Y = (X\,\mathrm{diag}(s)^{-1})\,(\mathrm{diag}(s)\,W), \qquad
#   s_j = \frac{\max |X_j|^{\alpha}}{\max |W_j|^{1-\alpha}}$$
#
# α is the *migration strength*: α = 0 leaves X alone (well, it flattens W), α = 1 flattens
# X completely and puts all of its range into W, α = 0.5 splits the difficulty evenly. The
# division of X costs nothing at run time: it is **folded** into whatever produces X (a
# LayerNorm's gain and bias), so the smoothed model is a different set of weights that
# computes the same function.
#
# `minisq.smoothing_factors` computes s, `minisq.smooth` returns a new, smoothed model (the
# input model is untouched), and `minisq.check_equivalence` proves that it is the same
# function, in float64, to 1e-10.

# %%
# The one line to change. "synthetic" runs anywhere in seconds; for a real model give a
# Hugging Face hub id (downloaded once into the HF cache) or a local checkpoint folder.
MODEL = "synthetic"  # or "gpt2", "facebook/opt-125m", "HuggingFaceTB/SmolLM-135M" (a Llama), or a local folder

# %%
import numpy as np

import minisq
from minisq.course.notebook import calibration_tokens, check, open_model, show
from minisq.eval import plots

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
from minisq.nn import gelu_tanh, relu

stats = minisq.calibrate(model, calib, keep_samples=256, progress=False)
K_TOP = len(model.info.get("outlier_channels", [])) or 4
m0 = minisq.mappings_for(model.config)[0]                  # layer 0: LayerNorm -> q/k/v projection(s)
act_max = stats.channel_absmax[m0.targets[0]]       # [C] max|X_j| over calibration tokens
w_max = minisq.weight_absmax(model.params, m0.targets)     # [C] max|W_j| over every target's output columns
print(f"{m0.source} -> {m0.targets}: {m0.why}")

# %% [markdown]
# ## 1. The factors, and what α does
#
# At α = 0.5, $s_j = \sqrt{\max|X_j| / \max|W_j|}$, and after smoothing channel $j$ has the
# **same range** in the activation and in the weight: $\max|X_j| / s_j = \max|W_j| \cdot s_j$.

# %%
s = minisq.smoothing_factors(act_max, w_max, alpha=0.5)      # [C] float64
top = np.argsort(act_max)[-K_TOP:][::-1]
print(f"{'channel':>8s}{'max|X_j|':>10s}{'max|W_j|':>10s}{'s_j':>9s}{'X range after':>15s}{'W range after':>15s}")
for j in list(top) + [int(np.argsort(act_max)[len(act_max) // 2])]:
    print(f"{j:8d}{act_max[j]:10.3f}{w_max[j]:10.4f}{s[j]:9.3f}{act_max[j] / s[j]:15.4f}{w_max[j] * s[j]:15.4f}")
print("(the last row is a median channel)")
live = act_max > 0
balanced = np.allclose((act_max / s)[live], (w_max * s)[live], rtol=1e-12, atol=0)
check("α = 0.5 gives equal X and W ranges in every channel", True, balanced, balanced)


# %%
def spread(r):
    return r.max() / np.median(r)   # max/median of per-channel ranges: 1 = perfectly flat


print(f"{'α':>5s}{'X max/median':>14s}{'W max/median':>14s}{'max X range':>13s}{'max W range':>13s}   [{NAME}]")
after = {}
for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
    s_a = minisq.smoothing_factors(act_max, w_max, alpha)
    after[alpha] = (act_max / s_a, w_max * s_a)
    print(f"{alpha:5.2f}{spread(after[alpha][0]):14.1f}{spread(after[alpha][1]):14.1f}"
          f"{after[alpha][0].max():13.3f}{after[alpha][1].max():13.3f}")
print(f"before{spread(act_max):13.1f}{spread(w_max):14.1f}")
flat_x = np.allclose(after[1.0][0][live], 1.0, rtol=1e-12)
flat_w = np.allclose(after[0.0][1], 1.0, rtol=1e-12)
check("α = 1 flattens X (every channel range 1), α = 0 flattens W", (True, True), (flat_x, flat_w), flat_x and flat_w)

# %% [markdown]
# ## 2. Folding s into the model
#
# Dividing X by s is free because X is the output of a LayerNorm, $\mathrm{LN}(x) = g \odot
# \hat x + b$: divide $g$ and $b$ by s and the LayerNorm produces $X / s$. The rows of every
# linear that reads X are multiplied by s. *What* may be folded into *what* is data,
# `minisq.SMOOTHING_TABLE`, with a reason for each row:

# %%
for m in minisq.SMOOTHING_TABLE[model.config.model_type]:
    print(f"{m.group:8s} {m.source:34s} ({m.kind:9s}) -> {', '.join(m.targets)}\n{'':9s}why: {m.why}")
print("\nNOT foldable:")
for where, why in minisq.NOT_FOLDABLE[model.config.model_type].items():
    print(f"  {where}: {why}")

# %% [markdown]
# The GELU note, in numbers: a ReLU is positively homogeneous ($\mathrm{ReLU}(x/s) =
# \mathrm{ReLU}(x)/s$ for $s > 0$), which is why OPT can also smooth fc1 → fc2; GELU is not,
# so GPT-2's `c_fc` → `c_proj` cannot be smoothed.

# %%
z = np.linspace(-3, 3, 13)
relu_gap = np.abs(relu(z / 2) - relu(z) / 2).max()
gelu_gap = np.abs(gelu_tanh(z / 2) - gelu_tanh(z) / 2).max()
print(f"max |f(z/2) - f(z)/2|: ReLU {relu_gap:.1e}, GELU {gelu_gap:.3f}")
check("ReLU commutes with 1/s, GELU does not", "0 and > 0.01", f"{relu_gap:.1e} and {gelu_gap:.3f}",
      relu_gap == 0 and gelu_gap > 0.01)

# %%
g_before = np.array(minisq.get_param(model.params, m0.source)["g"])            # a copy, to show nothing changes in place
smoothed = minisq.smooth(model, stats, alpha=0.5)            # a NEW model; `model` is untouched
s0 = smoothed.info["smoothing"]["factors"][m0.source]        # [C] the factors it used for layer 0
s32 = s0.astype(model.dtype)
g_ok = np.array_equal(minisq.get_param(smoothed.params, m0.source)["g"], minisq.get_param(model.params, m0.source)["g"] / s32)
w_ok = all(np.array_equal(smoothed.linears()[t].w, model.linears()[t].w * s32[:, None]) for t in m0.targets)
untouched = np.array_equal(minisq.get_param(model.params, m0.source)["g"], g_before)
print(smoothed)
check("LayerNorm gain is g / s, target rows are W * s, the original is unchanged", (True, True, True),
      (g_ok, w_ok, untouched), g_ok and w_ok and untouched)

# %% [markdown]
# ## 3. The same function, to 1e-10, in float64
#
# `check_equivalence` runs both models on the same tokens in float64 and compares logits (and
# every block's output). The smoothing itself must also happen in float64: smoothing a
# float32 model rounds $g / s$ and $W s$ to float32, and those roundings (~1e-7 relative)
# show up in any float64 comparison. `groups="all"` applies every row of the table
# (for OPT that includes fc1 → fc2 and v → out_proj).

# %%
ids = calib[0][None]                                          # [1, T]
model64 = model.astype("float64")
stats64 = minisq.calibrate(model64, calib, progress=False)
smoothed64 = minisq.smooth(model64, stats64, alpha=0.5, groups="all")
report = minisq.check_equivalence(model64, smoothed64, ids)   # float64, tol 1e-10 relative
print(report)
check("smoothed in float64 == original (logits, relative)", "≤ 1e-10", f"{report.max_rel:.1e}", report.passed)

report32 = minisq.check_equivalence(model, smoothed, ids, tol=1e-4)   # smoothed in float32: float32 rounding
print(report32)
check("smoothed in float32: equal to float32 rounding only", "1e-10 < diff < 1e-4", f"{report32.max_rel:.1e}",
      1e-10 < report32.max_rel < 1e-4)

# %% [markdown]
# ## 4. The activations before and after
#
# Recalibrating the smoothed model shows what its quantizers will see: the outlier channels
# are gone from X, and the weights got a little harder instead.

# %%
stats_sm = minisq.calibrate(smoothed, calib, keep_samples=256, progress=False)
show(plots.channel_max_bars(stats.channel_absmax[QKV[0]], top=K_TOP, after=stats_sm.channel_absmax[QKV[0]],
                               channels=model.info.get("outlier_channels"), title=f"input of {QKV[0]}, α = 0.5",
                               model_name=NAME))
show(plots.activation_surfaces(stats.samples[QKV[0]][:64], stats_sm.samples[QKV[0]][:64],
                                  model.linears()[QKV[0]].w, smoothed.linears()[QKV[0]].w, model_name=NAME))

# %%
print(f"{'smoothed input':28s}{'X max/median before':>21s}{'after':>8s}{'W max/median before':>22s}{'after':>8s}")
drops = {}
for m in minisq.mappings_for(model.config):
    t = m.targets[0]
    x0, x1 = stats.channel_absmax[t], stats_sm.channel_absmax[t]
    w0, w1 = minisq.weight_absmax(model.params, m.targets), minisq.weight_absmax(smoothed.params, m.targets)
    drops[t] = spread(x0) / spread(x1)
    print(f"{t:28s}{spread(x0):21.1f}{spread(x1):8.1f}{spread(w0):22.1f}{spread(w1):8.1f}")
if SYNTHETIC:
    check("the activation max/median ratio drops in every smoothed input", "> 3x", f"{min(drops.values()):.1f}x (smallest)",
          min(drops.values()) > 3)
else:
    print(f"activation max/median ratio drop, smallest over the inputs: {min(drops.values()):.1f}x "
          "(a real model: printed, not asserted; it is large where there are outliers)")
