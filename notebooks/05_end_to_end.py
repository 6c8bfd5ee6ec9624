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
# # 05 · End to end: calibrate → smooth → quantize → evaluate
#
# The whole SmoothQuant recipe (Sec. 4-5) on one model:
#
# 1. **calibrate** the float model: per-channel activation ranges of every linear input;
# 2. **smooth** with α = 0.5: a new model, the same function, outliers moved into weights;
# 3. **quantize** with the paper's presets (Table 2), with and without smoothing;
# 4. **evaluate**: perplexity (lower is better), the KL divergence of each variant's next-token
#    distribution from the float model's (0 = identical), and LAMBADA accuracy when there is
#    data and a tokenizer;
# 5. sweep **α** and let `minisq.search_alpha` pick one per layer.
#
# | preset | weights | activations |
# |---|---|---|
# | naive | per-tensor | per-tensor, dynamic |
# | O1 | per-tensor | per-token, dynamic |
# | O2 | per-tensor | per-tensor, dynamic |
# | O3 | per-tensor | per-tensor, **static** (from calibration) |
#
# "naive" and O2 have the same settings: the paper's *W8A8 naive* baseline is O2 without
# smoothing, and *SmoothQuant-O2* is O2 with it. O3's static scales are calibrated ranges of
# **the model being quantized**: after smoothing, calibrate again.
#
# On the synthetic model, perplexity is measured on tokens sampled from the float model, so
# its absolute value means nothing outside this notebook; only the comparison between
# variants does. Point `MODEL` at GPT-2 or OPT (with `$MINISQ_DATA_DIR` set) for real
# WikiText-2 perplexities.

# %%
# The one line to change. "synthetic" runs anywhere in seconds; for a real model give a
# Hugging Face hub id (downloaded once into the HF cache) or a local checkpoint folder.
MODEL = "synthetic"  # or "gpt2", "facebook/opt-125m", "HuggingFaceTB/SmolLM-135M" (a Llama), or a local folder

# %%
import numpy as np

import minisq
from minisq.course.notebook import (
    calibration_tokens,
    check,
    eval_tokens,
    open_model,
    show,
)
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
# How much to evaluate. The paper scores the whole WikiText-2 test split in windows of the
# model's context; on a CPU a few thousand tokens already rank the variants.
EVAL_TOKENS = 2048 if SYNTHETIC else 4096   # None: the whole test split (slow on a CPU)
SEQ_LEN = min(model.config.max_positions, 1024)
N_LAMBADA = 100                             # LAMBADA passages (with data and a tokenizer)
ALPHA = 0.5

eval_ids, EVAL = eval_tokens(model, DATA, EVAL_TOKENS, SEQ_LEN)   # WikiText-2 test, or SYNTHETIC samples
probe = eval_ids[:SEQ_LEN]            # one window, for KL(float || variant)
ref_logits = model(probe)             # [SEQ_LEN, V] float logits


def evaluate(m):
    # (perplexity on eval_ids, mean KL of m's next-token distribution from the float model's)
    ppl = minisq.perplexity(m, eval_ids, seq_len=SEQ_LEN, progress=False)
    return ppl, minisq.logit_error(ref_logits, m(probe))["kl"]


print(f"evaluating on {len(eval_ids)} tokens of {EVAL}, windows of {SEQ_LEN}")

# %% [markdown]
# ## 1. Calibrate, smooth, recalibrate

# %%
stats = minisq.calibrate(model, calib, keep_samples=128, progress=False)       # ranges of the float model
smoothed = minisq.smooth(model, stats, alpha=ALPHA)                           # a new model, same function
stats_sm = minisq.calibrate(smoothed, calib, keep_samples=128, progress=False) # ranges of the SMOOTHED model
print(smoothed)
print(f"qkv input max|x|: {stats.input_absmax[QKV[0]]:.2f} before smoothing, "
      f"{stats_sm.input_absmax[QKV[0]]:.2f} after")

# %% [markdown]
# ## 2. Quantize with every preset, with and without smoothing

# %%
results = {"float": evaluate(model)}
qmodels = {}
for preset in ("naive", "O1", "O2", "O3"):
    qmodels[preset, "plain"] = minisq.quantize(model, preset, stats=stats)
    qmodels[preset, "smoothed"] = minisq.quantize(smoothed, preset, stats=stats_sm)   # O3: its own stats
    for kind in ("plain", "smoothed"):
        results[preset, kind] = evaluate(qmodels[preset, kind])

ppl_f, _ = results["float"]
print(f"{NAME}\nperplexity and KL(float || W8A8) on {EVAL}\n")
print(f"{'':8s}{'weights':>12s}{'activations':>13s}{'ppl':>11s}{'ppl (SQ)':>11s}{'KL':>11s}{'KL (SQ)':>11s}")
print(f"{'float':8s}{'':>25s}{ppl_f:11.3f}")
for preset in ("naive", "O1", "O2", "O3"):
    (p0, k0), (p1, k1) = results[preset, "plain"], results[preset, "smoothed"]
    cfg = minisq.PRESETS[preset]
    print(f"{preset:8s}{cfg['weights']:>12s}{cfg['acts']:>13s}{p0:11.3f}{p1:11.3f}{k0:11.4g}{k1:11.4g}")
print("\n(SQ) = smoothed with α = 0.5 before quantizing: SmoothQuant-O1/O2/O3 are the (SQ) columns")

# %% [markdown]
# **A pitfall.** O3's scales must come from the model being quantized. The float model's stats
# *fit* the smoothed model (same layers, same shapes), but their ranges include the outliers
# that smoothing removed: the static scales would come out far too coarse. minisq records which
# smoothing a model had in its calibration stats and refuses the mix-up:

# %%
try:
    minisq.quantize(smoothed, "O3", stats=stats)   # WRONG: the float model's ranges
    refused = ""
except minisq.CalibrationError as err:
    refused = str(err)
print("minisq says:", refused)
check("stale stats are refused", "a CalibrationError", "refused" if refused else "accepted", bool(refused))

# %% [markdown]
# What the guard prevents, built by hand: the same O3 leaves, with the float model's ranges.

# %%
stale_model = smoothed.replace_linears(
    lambda name, leaf: leaf if name == "lm_head" else
    minisq.quantize_linear(leaf, "per_tensor", "static", x_absmax=stats.input_absmax[name]))
stale = evaluate(stale_model)
fresh = results["O3", "smoothed"]
print(f"SmoothQuant-O3 with the smoothed model's stats: ppl {fresh[0]:.3f}, KL {fresh[1]:.4g}")
print(f"SmoothQuant-O3 with the float model's stats:    ppl {stale[0]:.3f}, KL {stale[1]:.4g}")
if SYNTHETIC:
    check("recalibrating after smoothing matters (KL)", f"stale > {fresh[1]:.4g}", f"{stale[1]:.4g}",
          stale[1] > fresh[1])

# %% [markdown]
# Per layer, on the kept calibration inputs: how much each linear's output suffers from O3
# quantization (SQNR, higher is better), without and with smoothing. Only the inputs that
# smoothing touches (qkv and fc1) improve; the others are unchanged.

# %%
before = minisq.layer_errors(model, stats, preset="O3")
after = minisq.layer_errors(smoothed, stats_sm, preset="O3")
show(plots.layer_sqnr(before, after, title="per-layer SQNR under O3", model_name=NAME))
gains = {n: after[n]["sqnr_db"] - before[n]["sqnr_db"] for n in QKV + FC1}
print("SQNR gain from smoothing:", ", ".join(f"{n} {g:+.1f} dB" for n, g in gains.items()))
if SYNTHETIC:
    check("smoothing raises the SQNR of every smoothed layer (O3)", "> 3 dB", f"{min(gains.values()):+.1f} dB (smallest)",
          min(gains.values()) > 3)
else:
    print("(a real model: printed, not asserted; a model without strong outliers gains little)")

# %% [markdown]
# ## 3. LAMBADA
#
# Last-word accuracy (GPT-2 paper; lm-eval's `lambada_openai`): a passage counts when
# greedy decoding gets every token of its last word. It needs the data folder and a
# tokenizer, so the synthetic model skips it.

# %%
if DATA is not None and model.tokenizer is not None:
    passages = minisq.eval.data.lambada(data_dir=DATA)[:N_LAMBADA]
    for label, m in [("float", model), ("W8A8 naive", qmodels["naive", "plain"]),
                     ("SmoothQuant-O3", qmodels["O3", "smoothed"])]:
        print(f"LAMBADA accuracy, {label:15s}: {minisq.lambada_accuracy(m, passages, progress=False):.3f} "
              f"({len(passages)} passages)")
else:
    why = "no data folder ($MINISQ_DATA_DIR)" if DATA is None else "the model has no tokenizer"
    print(f"LAMBADA skipped: {why} [{NAME}]")

# %% [markdown]
# ## 4. The migration strength α
#
# Each α gives a different smoothed model (and needs its own calibration for O3). α = 0
# flattens the weights and leaves the activations hard, α = 1 the reverse; the paper finds a
# sweet spot around 0.5 for OPT (0.75-0.85 for GLM-130B and some larger models).

# %%
ALPHAS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)
sweep = {}
for a in ALPHAS:
    sm = minisq.smooth(model, stats, alpha=a)
    sweep[a] = evaluate(minisq.quantize(sm, "O3", stats=minisq.calibrate(sm, calib, progress=False)))
    print(f"α = {a:4.2f}: SmoothQuant-O3 ppl {sweep[a][0]:.3f}, KL {sweep[a][1]:.4g}")
show(plots.alpha_sweep(list(ALPHAS), [sweep[a][0] for a in ALPHAS], ylabel="perplexity",
                          title="SmoothQuant-O3", model_name=NAME, baseline=ppl_f))

# %% [markdown]
# `minisq.search_alpha` picks α per smoothed LayerNorm instead: for each, it tries a grid of
# α on the kept calibration inputs and keeps the one with the smallest quantized-output
# error of the linears it feeds (always at least as good as α = 0.5 on that measure).

# %%
search = minisq.search_alpha(model, stats, preset="O3")
print(search.table())
sm = minisq.smooth(model, stats, alpha=search.alpha)
searched = evaluate(minisq.quantize(sm, "O3", stats=minisq.calibrate(sm, calib, progress=False)))
print(f"\nSmoothQuant-O3 with searched α: ppl {searched[0]:.3f}, KL {searched[1]:.4g} "
      f"(α = 0.5: ppl {fresh[0]:.3f}, KL {fresh[1]:.4g})")

# %% [markdown]
# ## 5. Does SmoothQuant beat naive W8A8?

# %%
naive, sq = results["naive", "plain"], results["O3", "smoothed"]
print(f"float {ppl_f:.3f} | W8A8 naive {naive[0]:.3f} | SmoothQuant-O3 {sq[0]:.3f}   [{NAME}, {EVAL}]")
if SYNTHETIC:
    check("SmoothQuant-O3 beats naive W8A8 (perplexity)", f"< {naive[0]:.3f}", f"{sq[0]:.3f}", sq[0] < naive[0])
    check("SmoothQuant-O3 is closer to float than naive (KL)", f"< {naive[1]:.4g}", f"{sq[1]:.4g}", sq[1] < naive[1])
    better = [p for p in ("O1", "O2", "O3") if results[p, "smoothed"][1] < results[p, "plain"][1]]
    check("smoothing helps every preset (KL)", ["O1", "O2", "O3"], better, better == ["O1", "O2", "O3"])
else:
    print("(a real model: the paper reports SmoothQuant-O3 within ~1% of float and naive W8A8 far off for"
          " OPT >= 6.7B; small models suffer less from outliers, so the gap can be small here)")
