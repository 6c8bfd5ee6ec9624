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
# # 03 · Where the outliers live: channels, not tokens
#
# SmoothQuant's key observation (Sec. 3, Fig. 4): in LLM activations a few **channels** are
# 10-100x larger than the rest, and they are large in **every token**. Per-token scales
# cannot isolate them (notebook 02), but because they sit in fixed channels they can be
# moved into the weights (notebook 04). Here we find them: `minisq.calibrate` wraps every
# linear layer, runs the float model over the calibration tokens, and records the
# per-channel max |x| of every layer input (and, with `keep_samples`, some input rows).
#
# On the synthetic model we know the answer in advance: `model.info["outlier_channels"]`
# lists the channels whose LayerNorm gains were scaled; they must come out on top.

# %%
# The one line to change. "synthetic" runs anywhere in seconds; for a real model give a
# Hugging Face hub id (downloaded once into the HF cache) or a local checkpoint folder.
MODEL = "synthetic"  # or "gpt2", "facebook/opt-125m", "HuggingFaceTB/SmolLM-135M" (a Llama), or a local folder

# %%
import matplotlib.pyplot as plt
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
stats = minisq.calibrate(model, calib, keep_samples=256, progress=False)
planted = model.info.get("outlier_channels")          # only the synthetic model knows its outliers
K_TOP = len(planted) if planted else 4
print(f"calibrated on {stats.n_tokens} tokens; {len(stats.channel_absmax)} linear inputs recorded")
print("planted outlier channels:", planted if planted else "n/a (a real model)")
print("qkv inputs:", QKV, "\nfc1 inputs:", FC1)

# %% [markdown]
# ## 1. Per-channel ranges
#
# The max |x| of every input channel of layer 0's q/k/v projection and of its first MLP
# linear (`channel_absmax`), with the widest channels named.

# %%
show(plots.channel_max_bars(stats.channel_absmax[QKV[0]], top=K_TOP, channels=planted,
                               title=f"input of {QKV[0]}", model_name=NAME))
show(plots.channel_max_bars(stats.channel_absmax[FC1[0]], top=K_TOP, channels=planted,
                               title=f"input of {FC1[0]}", model_name=NAME))

# %% [markdown]
# ## 2. Tokens x channels
#
# The same activation, every kept token as a row: the outliers are bright **columns**
# (channels), present in every row (token). The 3D view is the paper's Figure 4.

# %%
A = np.abs(stats.samples[QKV[0]][:64])                 # [64 tokens, C] |x|
fig, ax = plt.subplots(figsize=(10, 3.5))
im = ax.imshow(A, aspect="auto", cmap="magma", interpolation="nearest")
ax.set(xlabel="channel", ylabel="token", title=f"|x| entering {QKV[0]} [{NAME}]")
fig.colorbar(im, ax=ax, label="|x|")
show(fig)

fig = plt.figure(figsize=(8, 5))
ax = fig.add_subplot(projection="3d")
channels, tokens = np.meshgrid(np.arange(A.shape[1]), np.arange(A.shape[0]))
ax.plot_surface(channels, tokens, A, cmap="coolwarm", linewidth=0, antialiased=False)
ax.set(xlabel="channel", ylabel="token", zlabel="|x|", title=f"|x| entering {QKV[0]} [{NAME}]")
show(fig)

# %% [markdown]
# ## 3. Channels, not tokens, in numbers
#
# For every qkv and fc1 input: the widest channels, **max/median over channels** of the
# per-channel range (how much wider the outlier channels are), and **max/median over tokens**
# of the per-token range (how much the tokens differ). Outliers in channels make the first
# ratio large; the second stays small because every token carries them. The last column
# counts the tokens whose largest |x| falls in one of those widest channels.

# %%
print(f"{'layer input':28s}{'widest channels':>24s}{'max/med channels':>18s}{'max/med tokens':>16s}"
      f"{'tokens led by them':>20s}   [{NAME}]")
found = {}
for name in QKV + FC1:
    ch = stats.channel_absmax[name]                        # [C] max over tokens
    xs = np.abs(stats.samples[name])                       # [n, C]
    tok = xs.max(axis=1)                                   # [n] max over channels
    top = np.sort(np.argsort(ch)[-K_TOP:])
    led = np.isin(xs.argmax(axis=1), top).mean()
    found[name] = {"top": top.tolist(), "by_channel": ch.max() / np.median(ch), "by_token": tok.max() / np.median(tok), "led": led}
    print(f"{name:28s}{top.tolist()!s:>24s}{found[name]['by_channel']:18.1f}{found[name]['by_token']:16.2f}{led:19.0%}")

if SYNTHETIC:
    tops = {tuple(f["top"]) for f in found.values()}
    check("the planted channels are the widest in every qkv/fc1 input", [tuple(planted)], sorted(tops),
          tops == {tuple(planted)})
    worst = min(f["by_channel"] / f["by_token"] for f in found.values())
    check("channel ratio >> token ratio in every layer", "> 5x", f"{worst:.1f}x (smallest)", worst > 5)
else:
    print("(a real model: the paper expects large channel ratios and small token ratios; printed, not asserted)")


# %% [markdown]
# ## 4. Where they come from
#
# SmoothQuant traces the outlier channels to the **LayerNorm gains** in front of the qkv and
# fc1 projections: LayerNorm normalizes each token, then multiplies channel $j$ by $g_j$, so
# a large $|g_j|$ makes channel $j$ large in every token. (The synthetic model plants exactly
# that.) The LayerNorm feeding each input comes from `minisq.SMOOTHING_TABLE`.

# %%
agree = {}
for m in minisq.mappings_for(model.config):
    if m.kind != "layernorm":
        continue
    g = np.abs(minisq.get_param(model.params, m.source)["g"])                 # [C] |gain|
    top_g = np.sort(np.argsort(g)[-K_TOP:])
    agree[m.source] = len(set(top_g.tolist()) & set(found[m.targets[0]]["top"]))
    print(f"{m.source:32s} largest |g| at {top_g.tolist()} (|g| {[f'{v:.1f}' for v in np.sort(g)[-K_TOP:]]}, "
          f"median {np.median(g):.2f}); {agree[m.source]}/{K_TOP} are the widest input channels")
if SYNTHETIC:
    check("the widest channels are the LayerNorm channels with the largest gains", f"{K_TOP}/{K_TOP} everywhere",
          f"min {min(agree.values())}/{K_TOP}", min(agree.values()) == K_TOP)
