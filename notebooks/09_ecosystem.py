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
# # 09 · The ecosystem: compressed-tensors and llm-compressor
#
# In production, SmoothQuant is run by **llm-compressor** (`SmoothQuantModifier`, then a W8A8
# `QuantizationModifier`), whose output, a **compressed-tensors** `int-quantized` checkpoint, is
# what vLLM serves and transformers loads. This notebook
#
# 1. writes a minisq W8A8 model in that format and reads it back, bit for bit;
# 2. shows the format's rounding rule beside SmoothQuant's (`convention=`);
# 3. runs the paper's smoothing and llm-compressor's side by side (`smooth(..., convention=)`)
#    on a **SYNTHETIC** OPT-shaped model whose outlier channel a LayerNorm bias pushes to one
#    side, and measures each one's KL and perplexity.
#
# Runs on a CPU in under a minute: `python notebooks/09_ecosystem.py`.

# %%
import json
import tempfile
from pathlib import Path

import numpy as np

import minisq
from minisq.families import params_from_state_dict
from minisq.model import Model
from minisq.course.notebook import check
from minisq.synthetic import SYNTHETIC_LABEL, outlier_channels, synthetic_state_dict

np.set_printoptions(precision=4, suppress=True, linewidth=110)


# %% [markdown]
# ## The model: SYNTHETIC, with one outlier channel pushed to one side
#
# `minisq.synthetic` plants outlier channels in every LayerNorm gain (×40, random signs), as
# real OPT models have them. Here one of them also gets a large LayerNorm **bias**: that
# channel's activations then sit around +bias in every token instead of around 0. This is
# where the two definitions of the activation range part: `max|X|` (the paper) counts the
# offset, `max X − min X` (llm-compressor) does not.

# %%
config = minisq.ModelConfig(model_type="opt", vocab_size=512, hidden_size=128, num_layers=2, num_heads=4,
                            ffn_dim=512, max_positions=128, position_offset=2, activation="relu",
                            name="synthetic-outliers-opt-L2-C128-one-sided")
HOT = outlier_channels(config.hidden_size, 4, 0)       # the planted outlier channels
SIDE = int(HOT[0])                                     # the one a bias pushes to one side
BIAS = 160.0                                          # above the channel's own spread (gain ×40)
sd = synthetic_state_dict(config, n_outliers=4, outlier_scale=40.0, seed=0)
for i in range(config.num_layers):
    for ln in ("self_attn_layer_norm", "final_layer_norm"):
        b = sd[f"layers.{i}.{ln}.bias"].copy()
        b[SIDE] = BIAS
        sd[f"layers.{i}.{ln}.bias"] = b
model = Model(config, params_from_state_dict(config, sd, np.float32, config.name),
              info={"synthetic": SYNTHETIC_LABEL, "outlier_channels": HOT.tolist()})
print(model, "| outlier channels", HOT, "| pushed to one side:", SIDE, f"(LayerNorm bias {BIAS})")

# SYNTHETIC tokens: sequences sampled from the float model itself (seeded), as in notebook 05
T = 128
calib = list(model.generate_ids(np.random.default_rng(0).integers(0, 512, (8, 1)), max_new_tokens=T - 1,
                                temperature=1.0, seed=0))
eval_ids = model.generate_ids(np.random.default_rng(1).integers(0, 512, (16, 1)), max_new_tokens=T - 1,
                              temperature=1.0, seed=1).reshape(-1)
probe = eval_ids[:T]
ref_logits = model(probe)


def evaluate(m):
    """(perplexity on the SYNTHETIC eval tokens, mean KL(float || m) on one window)."""
    return (minisq.perplexity(m, eval_ids, seq_len=T, progress=False),
            minisq.logit_error(ref_logits, m(probe))["kl"])


stats = minisq.calibrate(model, calib, progress=False)
QKV = "layers.0.self_attn.q_proj"
lo, hi = stats.channel_min[QKV][SIDE], stats.channel_max[QKV][SIDE]
print(f"channel {SIDE} into {QKV}: min {lo:.1f}, max {hi:.1f}: max|X| = {max(-lo, hi):.1f}, "
      f"max - min = {hi - lo:.1f}")
check("the pushed channel lies on one side", "min > 0", f"min {lo:.1f}", lo > 0)

# %% [markdown]
# ## 1. Rounding: SmoothQuant's ±127 at max|x|/127, compressed-tensors' [−128, 127] at max|x|/127.5
#
# compressed-tensors' symmetric int8 scale is `max|x| / 127.5` (half of the 255-wide range),
# and codes clip to [−128, 127]. SmoothQuant's `max|x| / 127` never produces −128.
# `convention=` picks one, in the quantizers, in the W8A8 leaves and in `minisq.quantize`.
#
# Under the 127.5 rule a group's most negative value lands on a rounding **tie**: x/Δ = −127.5,
# up to the last bit of Δ. When Δ is exact (max|x| = 127.5 · 2^k) round-half-to-even gives −128;
# otherwise the last bit decides between −128 and −127. Two implementations that disagree in
# the last bit of an activation can therefore disagree on that code (`docs/compressed-tensors.md`
# says what this means for comparing minisq with transformers).

# %%
for row in ([-127.5 / 64, -1.0, 0.3, 1.0, 1.9], [-2.0, -1.0, 0.3, 1.0, 1.9]):
    x = np.array([row], np.float32)
    for name in ("smoothquant", "compressed-tensors"):
        q, s = minisq.quantize_per_token(x, convention=name)
        print(f"max|x| = {-row[0]:<10} {name:>19s}: scale {s[0, 0]:.9f}, codes {q[0]}, x[0]/scale = {x[0, 0] / s[0, 0]:.6f}")
q, _ = minisq.quantize_per_token(np.array([[-127.5 / 64, 1.0]], np.float32), convention="compressed-tensors")
check("compressed-tensors reaches -128 (exact tie, to even)", -128, int(q.min()), int(q.min()) == -128)

# %% [markdown]
# ## 2. Write compressed-tensors, read it back
#
# `model.save(dst, format="compressed-tensors")` writes the checkpoint's own Hugging Face names,
# int8 `weight [out, in]`, `weight_scale`, `input_scale` for static activations, and the
# `quantization_config` compressed-tensors defines. Only a W8A8 model quantized with the
# format's own rounding is accepted: every engine that reads the file quantizes activations its
# way, and minisq should compute what they compute.

# %%
smoothed = minisq.smooth(model, stats, alpha=0.5)
qmodel = minisq.quantize(smoothed, weights="per_channel", acts="per_token", convention="compressed-tensors")
with tempfile.TemporaryDirectory() as tmp:
    dst = qmodel.save(Path(tmp) / "opt-w8a8", format="compressed-tensors")
    qconfig = json.loads((dst / "config.json").read_text())["quantization_config"]
    back = minisq.load(dst)
    print(json.dumps(qconfig["config_groups"]["group_0"], indent=1))
    same = np.array_equal(back(probe), qmodel(probe))
check("minisq -> compressed-tensors -> minisq is bit-identical", True, same, same)

# %% [markdown]
# ## 3. The paper's smoothing and llm-compressor's, side by side
#
# | | SmoothQuant (paper, official code) | llm-compressor |
# |---|---|---|
# | activation statistic | `max|X_j|` | `max X_j − min X_j` |
# | weight statistic | `max|W_j|` (≥ 1e-5) | `2 · max|W_j|` |
# | floor | s ≥ 1e-5, s = 1 where the range is 0 | s ≥ 1e-5 |
#
# For a channel symmetric about 0, `max − min = 2·max|X|` and the 2 on the weight side cancels
# it at α = 0.5; the factors differ by `2^(2α−1)` there. The pushed channel is where they part.

# %%
factors = {}
smoothed_by = {}
for conv in ("smoothquant", "llm-compressor"):
    smoothed_by[conv] = minisq.smooth(model, stats, alpha=0.5, convention=conv)
    factors[conv] = smoothed_by[conv].info["smoothing"]["factors"]["layers.0.self_attn_layer_norm"]
ratio = factors["smoothquant"] / factors["llm-compressor"]
print("s(paper) / s(llm-compressor) at layers.0.self_attn_layer_norm:")
print(f"  median over channels {np.median(ratio):.3f}, outlier channels {HOT}: {ratio[HOT]}")
print(f"  most different: channel {int(np.argmax(ratio))} (ratio {ratio.max():.2f})")
check("they differ most at the pushed channel", SIDE, int(np.argmax(ratio)), int(np.argmax(ratio)) == SIDE)

# %% [markdown]
# What each costs after quantizing, with compressed-tensors' rounding (what llm-compressor's
# W8A8 output is evaluated with): per-channel weights with per-token activations (the W8A8 preset
# vLLM serves) and O3 (per-tensor weights, static per-tensor activations).

# %%
rows = {"float": evaluate(model)}
SCHEMES = {"W8A8 (channel/token)": dict(weights="per_channel", acts="per_token"), "O3 (tensor/static)": dict(preset="O3")}
for scheme, kw in SCHEMES.items():
    rows[scheme, "none"] = evaluate(minisq.quantize(model, stats=stats, convention="compressed-tensors", **kw))
    for conv, sm in smoothed_by.items():
        sm_stats = minisq.calibrate(sm, calib, progress=False)
        rows[scheme, conv] = evaluate(minisq.quantize(sm, stats=sm_stats, convention="compressed-tensors", **kw))
print(f"{model.config.name} [SYNTHETIC random weights], α = 0.5, perplexity and KL(float || variant)\n")
print(f"{'':22s}{'smoothing':>16s}{'ppl':>10s}{'KL':>12s}")
print(f"{'float':22s}{'':>16s}{rows['float'][0]:>10.3f}{0.0:>12.3g}")
for key, (ppl, kl) in rows.items():
    if key != "float":
        print(f"{key[0]:22s}{key[1]:>16s}{ppl:>10.3f}{kl:>12.4g}")
for scheme in SCHEMES:
    better = min(("smoothquant", "llm-compressor"), key=lambda c: rows[scheme, c][1])
    print(f"{scheme}: lower KL with {better}'s definitions")
check("smoothing helps (W8A8, paper's definitions)", "KL below no smoothing",
      f"{rows['W8A8 (channel/token)', 'smoothquant'][1]:.3g} vs {rows['W8A8 (channel/token)', 'none'][1]:.3g}",
      rows["W8A8 (channel/token)", "smoothquant"][1] < rows["W8A8 (channel/token)", "none"][1])

# %% [markdown]
# **A control.** The same model without the bias push (every planted channel symmetric about
# 0), on the same tokens: for a symmetric channel `max − min = 2·max|X|` and the 2 on the
# weight side balances it, so the gap between the two definitions should shrink.

# %%
sd_sym = synthetic_state_dict(config, n_outliers=4, outlier_scale=40.0, seed=0)
sym = Model(config, params_from_state_dict(config, sd_sym, np.float32, config.name),
            info={"synthetic": SYNTHETIC_LABEL, "outlier_channels": HOT.tolist()})
ref_sym = sym(probe)
stats_sym = minisq.calibrate(sym, calib, progress=False)
control = {}
for conv in ("smoothquant", "llm-compressor"):
    sm = minisq.smooth(sym, stats_sym, alpha=0.5, convention=conv)
    sm_stats = minisq.calibrate(sm, calib, progress=False)
    for scheme, kw in SCHEMES.items():
        qm = minisq.quantize(sm, stats=sm_stats, convention="compressed-tensors", **kw)
        control[scheme, conv] = minisq.logit_error(ref_sym, qm(probe))["kl"]
print(f"{'':22s}{'smoothing':>16s}{'KL, pushed':>14s}{'KL, symmetric':>16s}")
for scheme in SCHEMES:
    for conv in ("smoothquant", "llm-compressor"):
        print(f"{scheme:22s}{conv:>16s}{rows[scheme, conv][1]:>14.3g}{control[scheme, conv]:>16.3g}")

# %% [markdown]
# **Reading the numbers.** The pushed channel's `max|X|` includes the LayerNorm bias, its
# `max − min` does not, so llm-compressor divides it by a smaller factor and leaves more of
# its offset in the activations. That offset is exactly what a per-token or per-tensor int8
# scale has to cover. Which definition wins on a given model depends on how much of each
# outlier is offset and how much is spread; the table above is one SYNTHETIC model, and
# `docs/compressed-tensors.md` records the numbers with the command that reproduces them.
