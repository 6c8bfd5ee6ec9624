"""Write the teaching notebooks of minisq from the sources in this file.

    python notebooks/build_notebooks.py          # rewrite notebooks/*.ipynb
    python notebooks/build_notebooks.py --check  # exit 1 if a committed notebook differs

The notebooks are kept in git WITHOUT outputs, and this script is their source of truth:
edit the text below, run the script, commit both. ``tests/test_notebooks.py`` checks that
the committed ``.ipynb`` files equal what this script writes, and executes every one.

Each notebook is one string. A line ``%% md`` starts a markdown cell, ``%% code`` a code
cell, and ``%% include NAME`` inserts the shared cells of :data:`SHARED` (the same model,
data and check cells in every notebook, so they cannot drift apart). Cell ids are derived
from the notebook name and the cell's position, so the output is byte-for-byte stable.

The notebooks import minisq and never redefine its math (STYLE.md, point 10); each stage
ends with ``check(...)``, which prints what was expected and what was seen and asserts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

# ------------------------------------------------------------------------------------------
# cells shared by every notebook

SHARED = {}

SHARED["MODEL"] = r'''
%% code
# The one line to change. "synthetic" runs anywhere in seconds; for a real model give a
# Hugging Face hub id (downloaded once into the HF cache) or a local checkpoint folder.
MODEL = "synthetic"  # or "gpt2", "facebook/opt-125m", "HuggingFaceTB/SmolLM-135M" (a Llama), or a local folder
'''

SHARED["SETUP"] = r'''
%% code
%matplotlib inline
import numpy as np
import matplotlib.pyplot as plt

import minisq
from minisq import plots
from minisq.eval.data import data_dir
from minisq.smooth import mappings_for

np.set_printoptions(precision=4, suppress=True, linewidth=110)

if MODEL == "synthetic":
    # A tiny GPT-2-shaped model with random weights whose LayerNorm gains carry 4 channels
    # scaled x60: the outlier mechanism SmoothQuant (Sec. 3) found in real LLMs, planted.
    config = minisq.ModelConfig(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4,
                                ffn_dim=512, max_positions=128)
    model = minisq.synthetic_model(config, outlier_scale=60)
else:
    model = minisq.load(MODEL)  # float32 GPT-2 / OPT / Llama-family
SYNTHETIC = model.config.is_synthetic
NAME = (model.config.name or MODEL) + (" [SYNTHETIC random weights]" if SYNTHETIC else "")
DATA = data_dir()  # the folder named by $MINISQ_DATA_DIR (WikiText-2, LAMBADA), or None

# The linears fed by each LayerNorm, from minisq.SMOOTHING_TABLE: per layer, the first
# q/k/v projection ("qkv") and the MLP's first linear ("fc1").
QKV = [m.targets[0] for m in mappings_for(model.config) if m.group == "ln_qkv"]
FC1 = [m.targets[0] for m in mappings_for(model.config) if m.group == "ln_fc1"]


def check(what, expected, seen, ok):
    """One stage's check: print expected vs seen, and stop the notebook if it fails."""
    print(f"check: {what}: expected {expected}, seen {seen} -> {'OK' if ok else 'MISMATCH'}")
    assert ok, f"{what}: expected {expected}, seen {seen}"


print(model)
print("model:", NAME)
print("data folder:", DATA or "none ($MINISQ_DATA_DIR is not set): synthetic tokens only")
'''

SHARED["TOKENS"] = r'''
%% md
**Tokens.** With a tokenizer and a data folder the model calibrates on real WikiText-2
paragraphs. Otherwise the tokens are **SYNTHETIC**: sequences sampled from the float model
itself (seeded). On its own samples a random-weight model is as confident as a language
model on text, so quantization errors show up in its perplexity, while on uniformly random
ids every variant would be equally lost.
%% code
T = min(128, model.config.max_positions)  # tokens per sequence
if model.tokenizer is not None and DATA is not None:
    texts = minisq.eval.data.calibration_texts(n=8, data_dir=DATA)
    calib = [np.asarray(model.tokenizer.encode(t))[:T] for t in texts]
    TOKENS = "8 WikiText-2 paragraphs (real text)"
else:
    prompts = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(8, 1))
    calib = list(model.generate_ids(prompts, max_new_tokens=T - 1, temperature=1.0, seed=0))
    TOKENS = f"SYNTHETIC tokens: 8 x {T} sampled from the float model (seed 0)"
print("calibration tokens:", TOKENS, "|", sum(len(c) for c in calib), "tokens")
'''


# ------------------------------------------------------------------------------------------
# 01: the INT8 GEMM

NB01 = r'''
%% md
# 01 · The INT8 GEMM: int8 in, int32 out, scales after

SmoothQuant's W8A8 linear layer (Xiao et al. 2022, Sec. 2, Eq. 1 and Fig. 3) multiplies
**int8 activations by int8 weights** and gets floats back with one multiplication per
output element:

$$Y[t, j] \;=\; \Delta_x[t]\;\Delta_w[j]\;\sum_k \bar X[t, k]\,\bar W[k, j] \;+\; b[j]$$

$\bar X$, $\bar W$ are int8 arrays, $\Delta_x$ one scale per token, $\Delta_w$ one scale per
output channel. This notebook takes the formula apart with `minisq.gemm`:

1. the integer sum as a loop, on numbers small enough to check by eye;
2. why the accumulator is int32;
3. why the scales come out of the sum, and which scales can;
4. the dequantization epilogue, `minisq.dequant_epilogue`;
5. how the CPU gets an *exact* int8 GEMM out of float32 BLAS, and where naive float32 fails;
6. the GPU path (cuBLAS int8 GEMM), run only where there is a GPU;
7. one real layer of the model, end to end.

Legend: `M` = `T` rows (tokens), `K` = `C_in` the summed axis, `N` = `C_out` columns.
Weights are stored `[C_in, C_out]`, so `y = x @ w`.
%% include MODEL
%% include SETUP
%% md
## 1. The loop form

$C[i, j] = \sum_k A[i, k]\,B[k, j]$, with $A$, $B$ int8. `minisq.gemm.int8_gemm_loops` is
literally that triple loop over Python integers (which never overflow): the slowest and
most obviously correct oracle. `minisq.int8_gemm_reference` is the same sum as an int64
matmul, and `minisq.int8_gemm` the fast path used by the model. All three must agree
bit for bit.
%% code
x_q = np.array([[1, -2, 3, 4],
                [127, 127, -127, 0]], dtype=np.int8)   # X̄ [M=2, K=4] int8
w_q = np.array([[1, 0, 2],
                [3, -1, 0],
                [0, 5, 1],
                [-2, 2, 127]], dtype=np.int8)          # W̄ [K=4, N=3] int8

acc_loops = minisq.gemm.int8_gemm_loops(x_q, w_q)      # [2, 3] int32, Python-int triple loop
acc_ref = minisq.int8_gemm_reference(x_q, w_q)         # [2, 3] int32, via int64 matmul
acc_fast = minisq.int8_gemm(x_q, w_q)                  # [2, 3] int32, the fast path
print("X̄ =\n", x_q, "\nW̄ =\n", w_q)
print(f"C = X̄ W̄ ({acc_loops.dtype}) =\n", acc_loops)

by_hand = 1 * 1 + (-2) * 3 + 3 * 0 + 4 * (-2)          # row 0 of X̄ times column 0 of W̄
check("C[0, 0] by hand", by_hand, int(acc_loops[0, 0]), int(acc_loops[0, 0]) == by_hand)
same = np.array_equal(acc_loops, acc_ref) and np.array_equal(acc_ref, acc_fast)
check("loops == reference == fast, bit for bit", True, same, same and acc_fast.dtype == np.int32)
%% md
## 2. Why the accumulator is int32

One product of two int8 values can be as large as $127 \cdot 127 = 16129$: it does not fit
in int8 (max 127), and three of them overflow int16 (max 32767). The sum over $K$ needs
$\log_2(K \cdot 128^2) + 1$ bits: int32 is enough up to $K = 131071$
(`minisq.gemm.MAX_K`). NumPy, like the hardware, **wraps around silently** when a fixed-width
integer overflows, so a too-small accumulator gives a wrong number, not an error.
%% code
row = np.full(4, 127, dtype=np.int8)                 # one row of X̄, K = 4, all at the int8 max
col = np.full(4, 127, dtype=np.int8)                 # one column of W̄
products = row.astype(np.int32) * col                # [4] int32: 16129 each
exact = int(products.sum())                          # 64516

print("one product in int8 :", products[:1].astype(np.int8), " (16129 mod 256 = 1)")
print("running sum in int16:", np.cumsum(products, dtype=np.int16))
print("running sum in int32:", np.cumsum(products, dtype=np.int32))
print(f"K ≤ MAX_K = {minisq.gemm.MAX_K} keeps |Σ| ≤ K·128² below 2^31")

int16_sum = int(np.cumsum(products, dtype=np.int16)[-1])
check("int16 accumulator wraps (wrong sum)", f"≠ {exact}", int16_sum, int16_sum != exact)
check("int32 accumulator is exact", exact, int(minisq.int8_gemm(row[None], col[:, None])[0, 0]),
      int(minisq.int8_gemm(row[None], col[:, None])[0, 0]) == exact)
%% md
## 3. Why the scales come out of the sum

With $X \approx \Delta_x[t]\,\bar X[t, k]$ and $W \approx \Delta_w[j]\,\bar W[k, j]$:

$$\sum_k \big(\Delta_x[t]\,\bar X[t,k]\big)\big(\Delta_w[j]\,\bar W[k,j]\big)
  \;=\; \Delta_x[t]\,\Delta_w[j]\,\sum_k \bar X[t,k]\,\bar W[k,j]$$

The step is allowed because **neither scale depends on $k$**, the index being summed: a
per-token scale depends on $t$ only, a per-output-channel weight scale on $j$ only (and a
per-tensor scale on nothing). So the sum is pure integer arithmetic and the scales are
applied once per output element. Below, the float simulation (dequantize first, then a
float matmul) and the integer path (int8 GEMM, then scale) give the same numbers; in
float64 they differ only by rounding.
%% code
rng = np.random.default_rng(1)
x = rng.standard_normal((5, 64))          # [T=5, K=64] float64 activations
x[:, 7] *= 30                             # one outlier channel, as in an LLM
w = rng.standard_normal((64, 6)) * 0.02   # [K=64, N=6] float64 weights

x_q, x_s = minisq.quantize_per_token(x)     # [5, 64] int8, [5, 1] float64: Δx[t]
w_q, w_s = minisq.quantize_per_channel(w)   # [64, 6] int8, [1, 6] float64: Δw[j]
print("x_s", x_s.shape, "depends on t only;  w_s", w_s.shape, "depends on j only")

y_fake = minisq.dequantize(x_q, x_s) @ minisq.dequantize(w_q, w_s)     # Σ_k (Δx X̄)(Δw W̄)
acc = minisq.int8_gemm(x_q, w_q)                                       # Σ_k X̄ W̄, [5, 6] int32
y_int = minisq.dequant_epilogue(acc, x_s, w_s, out_dtype=np.float64)   # Δx[t] Δw[j] · acc
rel = float(np.abs(y_int - y_fake).max() / np.abs(y_fake).max())
print(f"W8A8 vs float x @ w: SQNR {minisq.sqnr_db(x @ w, y_int):.1f} dB")
check("scales outside the sum == dequantize-then-matmul (float64, relative)", "≤ 1e-12",
      f"{rel:.1e}", rel <= 1e-12)
%% md
## 4. The epilogue

`minisq.dequant_epilogue(acc, row_scale, col_scale, bias)` turns the int32 accumulator back
into floats: `acc * (row_scale * col_scale) + bias`, combined scale first (its docstring
says why that order). Here it is on one element, by hand, in float32: the same three IEEE
operations in the same order give the same bits.
%% code
x_q32, x_s32 = minisq.quantize_per_token(x.astype(np.float32))     # [5, 64] int8, [5, 1] float32
w_q32, w_s32 = minisq.quantize_per_channel(w.astype(np.float32))   # [64, 6] int8, [1, 6] float32
b = (rng.standard_normal(6) * 0.1).astype(np.float32)              # [6] float32 bias
acc32 = minisq.int8_gemm(x_q32, w_q32)                             # [5, 6] int32
y = minisq.dequant_epilogue(acc32, x_s32, w_s32, b)                # [5, 6] float32
print("acc:", acc32.dtype, acc32.shape, "-> y:", y.dtype, y.shape)
print("acc[0] =", acc32[0])
print("y[0]   =", y[0])

y00 = np.float32(acc32[0, 0]) * (x_s32[0, 0] * w_s32[0, 0]) + b[0]
check("epilogue y[0, 0] == acc·(Δx·Δw) + b by hand (bitwise)", y00, y[0, 0], y[0, 0] == y00)
%% md
## 5. An exact int8 GEMM from float32 BLAS (CPU)

NumPy has no fast int8 matmul (integer matmul skips BLAS and is slow), but float32 BLAS is
fast. float32 holds every integer up to $2^{24}$ exactly, and an int8 product is at most
$128^2 = 2^{14}$, so **any sum of at most $2^{24} / 2^{14} = 1024$ products is exact in
float32, in whatever order BLAS adds it**. `minisq.int8_gemm` cuts $K$ into blocks of
`BLOCK_K = 1024`, runs float32 BLAS per block and adds the block results in int32.
(The same argument per row: when $128 \cdot \sum_k |a_{ik}| \le 2^{24}$ for every row, no
partial sum can pass $2^{24}$ and one float32 call over all of $K$ is exact. Quantized
activations usually pass this check, and `int8_gemm` then skips the blocks; the
all-127 rows below do not.)

Naive float32 over the whole $K$ is not exact. A guaranteed counter-example: 2000 products
of $127 \cdot 127$ plus one $1 \cdot 1$ sum to $32\,258\,001$, an odd number above $2^{24}$;
float32 cannot represent it at all (its spacing there is 2), so any float32 result is wrong.
%% code
print(f"BLOCK_K = {minisq.gemm.BLOCK_K} = 2^24 / 128^2")
a_q = np.full((1, 2001), 127, dtype=np.int8)
a_q[0, -1] = 1                                        # [1, 2001] int8
b_q = np.full((2001, 1), 127, dtype=np.int8)
b_q[-1, 0] = 1                                        # [2001, 1] int8
exact = 2000 * 127 * 127 + 1                          # 32_258_001, Python int

naive = float((a_q.astype(np.float32) @ b_q.astype(np.float32))[0, 0])
fast = int(minisq.int8_gemm(a_q, b_q)[0, 0])
ref = int(minisq.int8_gemm_reference(a_q, b_q)[0, 0])
print(f"exact {exact:,} | naive float32 {naive:,.0f} | int8_gemm {fast:,} | reference {ref:,}")
check("naive float32 matmul is wrong", f"≠ {exact:,}", f"{naive:,.0f}", naive != exact)
check("int8_gemm (blocks of 1024) is exact", f"{exact:,}", f"{fast:,}", fast == exact == ref)
%% code
# A larger random case with large same-sign values (so the sums pass 2^24): how often does
# naive float32 miss, and is the blocked path exact?
A = rng.integers(64, 128, size=(64, 4096), dtype=np.int8)    # [M, K] int8
B = rng.integers(64, 128, size=(4096, 64), dtype=np.int8)    # [K, N] int8
ref = minisq.int8_gemm_reference(A, B)                        # [64, 64] int32, exact
naive = (A.astype(np.float32) @ B.astype(np.float32)).astype(np.int64)
print(f"naive float32 differs from the exact sum in {int((naive != ref).sum())} of {ref.size} "
      f"outputs (K = 4096; it depends on the BLAS's summation order)")
fast = minisq.int8_gemm(A, B)
check("int8_gemm == int8_gemm_reference on [64, 4096] x [4096, 64]", "all equal",
      f"{int((fast != ref).sum())} differ", np.array_equal(fast, ref))
%% md
## 6. The GPU path

On a GPU, `minisq.int8_gemm` calls cuBLAS's int8 GEMM (`cublasGemmEx` with int8 inputs and
an int32 accumulator: tensor cores, exact). cuBLAS is column-major and its int8 kernels
want the "TN" layout with sizes that are multiples of 4, so the row-major
`C = A @ B` is asked for as the column-major `Cᵀ = Bᵀ Aᵀ`, with `K` and `N` zero-padded to
multiples of 4 (zeros add nothing to the sums). `minisq.gemm.int8_gemm_plan` computes those
arguments in pure Python, so they can be read (and tested) without a GPU. Only
`minisq.backend` imports CuPy; the rest of minisq never asks which device it runs on.
%% code
plan = minisq.gemm.int8_gemm_plan(M=5, K=30, N=7)
print(plan)
print("meets cuBLAS's int8 rules:", minisq.gemm.meets_int8_rules(plan))
check("K = 30 and N = 7 padded to multiples of 4", (32, 8), (plan.k, plan.m),
      (plan.k, plan.m) == (32, 8) and minisq.gemm.meets_int8_rules(plan))

if minisq.backend.gpu_available():
    from minisq.backend import to_device, to_numpy

    on_gpu = to_numpy(minisq.int8_gemm(to_device(A, "gpu"), to_device(B, "gpu")))
    check("GPU int8 GEMM == CPU reference", "all equal", f"{int((on_gpu != ref).sum())} differ",
          np.array_equal(on_gpu, ref))
else:
    print("no GPU here (minisq.backend.gpu_available() is False): the GPU run is skipped")
%% md
## 7. One real layer, end to end

`minisq.calibrate` records what flows into every linear layer; we keep 64 input rows of the
model's first linear (a q/k/v projection), quantize its weight per output channel, the
inputs per token, and run exactly the steps above. `minisq.quantize_linear` gives the
W8A8 layer that the whole-model `minisq.quantize` builds; calling it must be the same
three steps bit for bit.
%% include TOKENS
%% code
name, leaf = next(iter(model.linears().items()))          # the first linear of layer 0
stats = minisq.calibrate(model, calib[:1], keep_samples=64, progress=False)
x = stats.samples[name]                                   # [64, C_in] float32: its real inputs
qleaf = minisq.quantize_linear(leaf, weights="per_channel", acts="per_token")

x_q, x_s = qleaf.quantize_input(x)                        # [64, C_in] int8, [64, 1] float32
acc = minisq.int8_gemm(x_q, qleaf.w_q)                    # [64, C_out] int32
y_steps = minisq.dequant_epilogue(acc, x_s, qleaf.w_scale, qleaf.b)   # [64, C_out] float32
y_leaf = qleaf(x)
print(f"{name}: x {x.shape} {x.dtype} -> x_q {x_q.dtype}, w_q {qleaf.w_q.shape} {qleaf.w_q.dtype} "
      f"-> acc {acc.dtype} -> y {y_steps.dtype}")
print(f"W8A8 vs float output: SQNR {minisq.sqnr_db(leaf(x), y_leaf):.1f} dB  ({NAME})")
check("W8A8 layer == quantize, int8 GEMM, epilogue by hand (bitwise)", True,
      np.array_equal(y_steps, y_leaf), np.array_equal(y_steps, y_leaf))
'''


# ------------------------------------------------------------------------------------------
# 02: quantizers

NB02 = r'''
%% md
# 02 · Quantizers: granularity, dynamic vs static, and what fits an INT8 GEMM

A symmetric INT8 quantizer (SmoothQuant Sec. 2, Eq. 1) maps a group of floats to integers
with one scale:

$$\Delta = \frac{\max |X|}{127}, \qquad \bar X = \mathrm{clip}\big(\mathrm{round}(X / \Delta),\, -127,\, 127\big), \qquad \hat X = \Delta\,\bar X$$

The question is **which values share a Δ** (paper Fig. 3): the whole tensor
(per-tensor), one row of activations (per-token), or one output channel of a weight
(per-channel). And when Δ is computed: from the tensor at hand at run time (*dynamic*) or
once, from calibration data (*static*). `minisq.quantize_per_*` return the real int8 array
and its scale; `minisq.fake_quantize` is literally `dequantize(quantize(x))`.

Legend: `T` tokens, `C` channels (`C_in`), `C_out` output channels.
%% include MODEL
%% include SETUP
%% include TOKENS
%% code
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
%% md
## 1. Three granularities on a 3 x 4 example

`quantize_per_channel` is written for weights `[C_in, C_out]` and gives one scale per
column. Applied to activations `[T, C]`, the columns are the *input* channels: we use that
below to see what per-channel activation scales would buy, and why they cannot be used.
%% code
x = np.array([[0.1, -0.5, 2.0, 0.3],
              [0.2, 0.1, -0.05, 0.4],
              [-3.0, 0.2, 0.1, 0.0]])               # [T=3, C=4] float64
QUANTIZERS = {"per-tensor": minisq.quantize_per_tensor,
              "per-token": minisq.quantize_per_token,
              "per-channel": minisq.quantize_per_channel}
for label, quantize in QUANTIZERS.items():
    q, s = quantize(x)                              # int8 [3, 4], float scale
    print(f"{label:11s} scale {str(s.shape):7s} = {np.ravel(s)}")
    print(q)

q_t, s_t = minisq.quantize_per_token(x)
row_max = np.abs(q_t).max(axis=1)
check("each token's largest |value| becomes 127", [127, 127, 127], row_max.tolist(), (row_max == 127).all())
same = np.array_equal(minisq.fake_quantize(x, "per_token"), minisq.dequantize(q_t, s_t))
check("fake_quantize(x) == dequantize(*quantize_per_token(x))", True, same, same)
%% md
## 2. Error against granularity, on an activation with outlier channels

SQNR (signal-to-quantization-noise ratio, $10 \log_{10} \sum X^2 / \sum (X - \hat X)^2$,
higher is better; each bit is worth about 6 dB). "levels" counts how many of the 255 int8
values a typical non-outlier channel actually uses: with one Δ per tensor or per token,
the outliers set Δ and the other channels are squeezed into a handful of levels.
%% code
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
%% md
## 3. Dynamic vs static scales, and clipping

*Dynamic* scales (O1, O2) are computed from each tensor at run time: always the right
range, at the cost of a max-reduction per call. *Static* scales (O3) are fixed from
calibration: free at run time, but a value beyond $\pm 127\,\Delta$ is **clipped** to
±127. Below, the static scale comes from 7 of the calibration sequences and is applied to
the 8th, which it has never seen.
%% code
held_out = minisq.calibrate(model, calib[:-1], progress=False)           # 7 sequences
s_static = held_out.input_absmax[QKV[0]] / 127                          # O3's scale for this layer
X_new = minisq.calibrate(model, calib[-1:], keep_samples=T, progress=False).samples[QKV[0]].astype(np.float64)

q_dyn, s_dyn = minisq.quantize_per_tensor(X_new)                        # Δ from X_new itself
q_sta, _ = minisq.quantize_per_tensor(X_new, s_static)                  # Δ from calibration
n_clip = int((np.abs(X_new) / s_static >= 127.5).sum())
print(f"dynamic Δ {float(s_dyn):.4g}: SQNR {minisq.sqnr_db(X_new, minisq.dequantize(q_dyn, s_dyn)):.1f} dB")
print(f"static  Δ {s_static:.4g}: SQNR {minisq.sqnr_db(X_new, minisq.dequantize(q_sta, np.float64(s_static))):.1f} dB, "
      f"{n_clip} of {X_new.size} values beyond ±127Δ (clipped)")
%% md
Clipping can also be a choice: a smaller Δ gives the many small values more levels, at
the price of clipping the large ones. With outlier channels that is a bad trade, because
the outliers carry much of the signal (and, in LLMs, matter for accuracy).
%% code
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
%% md
## 4. Why per-channel *activation* scales do not fit an INT8 GEMM

Per-channel scales for X were the clear winner above. But with one scale $\Delta_x[k]$ per
input channel, the scale depends on $k$, the index that the matmul sums over:

$$Y[t, j] = \sum_k \big(\Delta_x[k]\,\bar X[t, k]\big)\big(\Delta_w[j]\,\bar W[k, j]\big)
          = \Delta_w[j] \sum_k \Delta_x[k]\,\bar X[t, k]\,\bar W[k, j]$$

$\Delta_x[k]$ stays **inside** the sum, so the sum is no longer integer arithmetic: an
int8 GEMM cannot compute it, and the epilogue has no place to put a per-$k$ scale. The
only way out is to move $\Delta_x[k]$ into the weight, $W' = \mathrm{diag}(\Delta_x)\,W$,
which then has to be quantized again, with the activation's ranges now in its rows. That
is exactly SmoothQuant's move, done *part of the way* (notebook 04).
%% code
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
'''


# ------------------------------------------------------------------------------------------
# 03: outliers

NB03 = r'''
%% md
# 03 · Where the outliers live: channels, not tokens

SmoothQuant's key observation (Sec. 3, Fig. 4): in LLM activations a few **channels** are
10-100x larger than the rest, and they are large in **every token**. Per-token scales
cannot isolate them (notebook 02), but because they sit in fixed channels they can be
moved into the weights (notebook 04). Here we find them: `minisq.calibrate` wraps every
linear layer, runs the float model over the calibration tokens, and records the
per-channel max |x| of every layer input (and, with `keep_samples`, some input rows).

On the synthetic model we know the answer in advance: `model.info["outlier_channels"]`
lists the channels whose LayerNorm gains were scaled; they must come out on top.
%% include MODEL
%% include SETUP
%% include TOKENS
%% code
stats = minisq.calibrate(model, calib, keep_samples=256, progress=False)
planted = model.info.get("outlier_channels")          # only the synthetic model knows its outliers
K_TOP = len(planted) if planted else 4
print(f"calibrated on {stats.n_tokens} tokens; {len(stats.channel_absmax)} linear inputs recorded")
print("planted outlier channels:", planted if planted else "n/a (a real model)")
print("qkv inputs:", QKV, "\nfc1 inputs:", FC1)
%% md
## 1. Per-channel ranges

The max |x| of every input channel of layer 0's q/k/v projection and of its first MLP
linear (`channel_absmax`), with the widest channels named.
%% code
display(plots.channel_max_bars(stats.channel_absmax[QKV[0]], top=K_TOP, channels=planted,
                               title=f"input of {QKV[0]}", model_name=NAME))
display(plots.channel_max_bars(stats.channel_absmax[FC1[0]], top=K_TOP, channels=planted,
                               title=f"input of {FC1[0]}", model_name=NAME))
%% md
## 2. Tokens x channels

The same activation, every kept token as a row: the outliers are bright **columns**
(channels), present in every row (token). The 3D view is the paper's Figure 4.
%% code
A = np.abs(stats.samples[QKV[0]][:64])                 # [64 tokens, C] |x|
fig, ax = plt.subplots(figsize=(10, 3.5))
im = ax.imshow(A, aspect="auto", cmap="magma", interpolation="nearest")
ax.set(xlabel="channel", ylabel="token", title=f"|x| entering {QKV[0]} [{NAME}]")
fig.colorbar(im, ax=ax, label="|x|")
plt.show()

fig = plt.figure(figsize=(8, 5))
ax = fig.add_subplot(projection="3d")
channels, tokens = np.meshgrid(np.arange(A.shape[1]), np.arange(A.shape[0]))
ax.plot_surface(channels, tokens, A, cmap="coolwarm", linewidth=0, antialiased=False)
ax.set(xlabel="channel", ylabel="token", zlabel="|x|", title=f"|x| entering {QKV[0]} [{NAME}]")
plt.show()
%% md
## 3. Channels, not tokens, in numbers

For every qkv and fc1 input: the widest channels, **max/median over channels** of the
per-channel range (how much wider the outlier channels are), and **max/median over tokens**
of the per-token range (how much the tokens differ). Outliers in channels make the first
ratio large; the second stays small because every token carries them. The last column
counts the tokens whose largest |x| falls in one of those widest channels.
%% code
print(f"{'layer input':28s}{'widest channels':>24s}{'max/med channels':>18s}{'max/med tokens':>16s}"
      f"{'tokens led by them':>20s}   [{NAME}]")
found = {}
for name in QKV + FC1:
    ch = stats.channel_absmax[name]                        # [C] max over tokens
    xs = np.abs(stats.samples[name])                       # [n, C]
    tok = xs.max(axis=1)                                   # [n] max over channels
    top = np.sort(np.argsort(ch)[-K_TOP:])
    led = np.isin(xs.argmax(axis=1), top).mean()
    found[name] = dict(top=top.tolist(), by_channel=ch.max() / np.median(ch), by_token=tok.max() / np.median(tok), led=led)
    print(f"{name:28s}{str(top.tolist()):>24s}{found[name]['by_channel']:18.1f}{found[name]['by_token']:16.2f}{led:19.0%}")

if SYNTHETIC:
    tops = {tuple(f["top"]) for f in found.values()}
    check("the planted channels are the widest in every qkv/fc1 input", [tuple(planted)], sorted(tops),
          tops == {tuple(planted)})
    worst = min(f["by_channel"] / f["by_token"] for f in found.values())
    check("channel ratio >> token ratio in every layer", "> 5x", f"{worst:.1f}x (smallest)", worst > 5)
else:
    print("(a real model: the paper expects large channel ratios and small token ratios; printed, not asserted)")
%% md
## 4. Where they come from

SmoothQuant traces the outlier channels to the **LayerNorm gains** in front of the qkv and
fc1 projections: LayerNorm normalizes each token, then multiplies channel $j$ by $g_j$, so
a large $|g_j|$ makes channel $j$ large in every token. (The synthetic model plants exactly
that.) The LayerNorm feeding each input comes from `minisq.SMOOTHING_TABLE`.
%% code
def param(model, dotted):
    # an entry of the parameter tree by its dotted checkpoint name, e.g. "h.0.ln_1"
    node = model.params
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


agree = {}
for m in mappings_for(model.config):
    if m.kind != "layernorm":
        continue
    g = np.abs(param(model, m.source)["g"])                 # [C] |gain|
    top_g = np.sort(np.argsort(g)[-K_TOP:])
    agree[m.source] = len(set(top_g.tolist()) & set(found[m.targets[0]]["top"]))
    print(f"{m.source:32s} largest |g| at {top_g.tolist()} (|g| {[f'{v:.1f}' for v in np.sort(g)[-K_TOP:]]}, "
          f"median {np.median(g):.2f}); {agree[m.source]}/{K_TOP} are the widest input channels")
if SYNTHETIC:
    check("the widest channels are the LayerNorm channels with the largest gains", f"{K_TOP}/{K_TOP} everywhere",
          f"min {min(agree.values())}/{K_TOP}", min(agree.values()) == K_TOP)
'''

# ------------------------------------------------------------------------------------------
# 04: smoothing

NB04 = r'''
%% md
# 04 · Smoothing: migrate the outliers into the weights

SmoothQuant (Sec. 4, Eq. 3-4) divides each input channel of X by a factor $s_j$ and
multiplies the matching row of W by it, which leaves the product unchanged:

$$Y = (X\,\mathrm{diag}(s)^{-1})\,(\mathrm{diag}(s)\,W), \qquad
  s_j = \frac{\max |X_j|^{\alpha}}{\max |W_j|^{1-\alpha}}$$

α is the *migration strength*: α = 0 leaves X alone (well, it flattens W), α = 1 flattens
X completely and puts all of its range into W, α = 0.5 splits the difficulty evenly. The
division of X costs nothing at run time: it is **folded** into whatever produces X (a
LayerNorm's gain and bias), so the smoothed model is a different set of weights that
computes the same function.

`minisq.smoothing_factors` computes s, `minisq.smooth` returns a new, smoothed model (the
input model is untouched), and `minisq.check_equivalence` proves that it is the same
function, in float64, to 1e-10.
%% include MODEL
%% include SETUP
%% include TOKENS
%% code
from minisq.nn import gelu_tanh, relu
from minisq.smooth import NOT_FOLDABLE, weight_absmax


def param(model, dotted):
    # an entry of the parameter tree by its dotted checkpoint name, e.g. "h.0.ln_1"
    node = model.params
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


stats = minisq.calibrate(model, calib, keep_samples=256, progress=False)
K_TOP = len(model.info.get("outlier_channels", [])) or 4
m0 = mappings_for(model.config)[0]                  # layer 0: LayerNorm -> q/k/v projection(s)
act_max = stats.channel_absmax[m0.targets[0]]       # [C] max|X_j| over calibration tokens
w_max = weight_absmax(model.params, m0.targets)     # [C] max|W_j| over every target's output columns
print(f"{m0.source} -> {m0.targets}: {m0.why}")
%% md
## 1. The factors, and what α does

At α = 0.5, $s_j = \sqrt{\max|X_j| / \max|W_j|}$, and after smoothing channel $j$ has the
**same range** in the activation and in the weight: $\max|X_j| / s_j = \max|W_j| \cdot s_j$.
%% code
s = minisq.smoothing_factors(act_max, w_max, alpha=0.5)      # [C] float64
top = np.argsort(act_max)[-K_TOP:][::-1]
print(f"{'channel':>8s}{'max|X_j|':>10s}{'max|W_j|':>10s}{'s_j':>9s}{'X range after':>15s}{'W range after':>15s}")
for j in list(top) + [int(np.argsort(act_max)[len(act_max) // 2])]:
    print(f"{j:8d}{act_max[j]:10.3f}{w_max[j]:10.4f}{s[j]:9.3f}{act_max[j] / s[j]:15.4f}{w_max[j] * s[j]:15.4f}")
print("(the last row is a median channel)")
live = act_max > 0
balanced = np.allclose((act_max / s)[live], (w_max * s)[live], rtol=1e-12, atol=0)
check("α = 0.5 gives equal X and W ranges in every channel", True, balanced, balanced)
%% code
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
%% md
## 2. Folding s into the model

Dividing X by s is free because X is the output of a LayerNorm, $\mathrm{LN}(x) = g \odot
\hat x + b$: divide $g$ and $b$ by s and the LayerNorm produces $X / s$. The rows of every
linear that reads X are multiplied by s. *What* may be folded into *what* is data,
`minisq.SMOOTHING_TABLE`, with a reason for each row:
%% code
for m in minisq.SMOOTHING_TABLE[model.config.model_type]:
    print(f"{m.group:8s} {m.source:34s} ({m.kind:9s}) -> {', '.join(m.targets)}\n{'':9s}why: {m.why}")
print("\nNOT foldable:")
for where, why in NOT_FOLDABLE[model.config.model_type].items():
    print(f"  {where}: {why}")
%% md
The GELU note, in numbers: a ReLU is positively homogeneous ($\mathrm{ReLU}(x/s) =
\mathrm{ReLU}(x)/s$ for $s > 0$), which is why OPT can also smooth fc1 → fc2; GELU is not,
so GPT-2's `c_fc` → `c_proj` cannot be smoothed.
%% code
z = np.linspace(-3, 3, 13)
relu_gap = np.abs(relu(z / 2) - relu(z) / 2).max()
gelu_gap = np.abs(gelu_tanh(z / 2) - gelu_tanh(z) / 2).max()
print(f"max |f(z/2) - f(z)/2|: ReLU {relu_gap:.1e}, GELU {gelu_gap:.3f}")
check("ReLU commutes with 1/s, GELU does not", "0 and > 0.01", f"{relu_gap:.1e} and {gelu_gap:.3f}",
      relu_gap == 0 and gelu_gap > 0.01)
%% code
g_before = np.array(param(model, m0.source)["g"])            # a copy, to show nothing changes in place
smoothed = minisq.smooth(model, stats, alpha=0.5)            # a NEW model; `model` is untouched
s0 = smoothed.info["smoothing"]["factors"][m0.source]        # [C] the factors it used for layer 0
s32 = s0.astype(model.dtype)
g_ok = np.array_equal(param(smoothed, m0.source)["g"], param(model, m0.source)["g"] / s32)
w_ok = all(np.array_equal(smoothed.linears()[t].w, model.linears()[t].w * s32[:, None]) for t in m0.targets)
untouched = np.array_equal(param(model, m0.source)["g"], g_before)
print(smoothed)
check("LayerNorm gain is g / s, target rows are W * s, the original is unchanged", (True, True, True),
      (g_ok, w_ok, untouched), g_ok and w_ok and untouched)
%% md
## 3. The same function, to 1e-10, in float64

`check_equivalence` runs both models on the same tokens in float64 and compares logits (and
every block's output). The smoothing itself must also happen in float64: smoothing a
float32 model rounds $g / s$ and $W s$ to float32, and those roundings (~1e-7 relative)
show up in any float64 comparison. `groups="all"` applies every row of the table
(for OPT that includes fc1 → fc2 and v → out_proj).
%% code
ids = calib[0][None]                                          # [1, T]
model64 = model.astype("float64")
stats64 = minisq.calibrate(model64, calib, progress=False)
smoothed64 = minisq.smooth(model64, stats64, alpha=0.5, groups="all")
report = minisq.check_equivalence(model64, smoothed64, ids)   # float64, tol 1e-10 relative
print(report)
check("smoothed in float64 == original (logits, relative)", "≤ 1e-10", f"{report.max_rel:.1e}", report.passed)

report32 = minisq.check_equivalence(model, smoothed, ids)     # smoothed in float32, compared in float64
print(report32)
check("smoothed in float32: equal to float32 rounding only", "1e-10 < diff < 1e-4", f"{report32.max_rel:.1e}",
      1e-10 < report32.max_rel < 1e-4)
%% md
## 4. The activations before and after

Recalibrating the smoothed model shows what its quantizers will see: the outlier channels
are gone from X, and the weights got a little harder instead.
%% code
stats_sm = minisq.calibrate(smoothed, calib, keep_samples=256, progress=False)
display(plots.channel_max_bars(stats.channel_absmax[QKV[0]], top=K_TOP, after=stats_sm.channel_absmax[QKV[0]],
                               channels=model.info.get("outlier_channels"), title=f"input of {QKV[0]}, α = 0.5",
                               model_name=NAME))
display(plots.activation_surfaces(stats.samples[QKV[0]][:64], stats_sm.samples[QKV[0]][:64],
                                  model.linears()[QKV[0]].w, smoothed.linears()[QKV[0]].w, model_name=NAME))
%% code
print(f"{'smoothed input':28s}{'X max/median before':>21s}{'after':>8s}{'W max/median before':>22s}{'after':>8s}")
drops = {}
for m in mappings_for(model.config):
    t = m.targets[0]
    x0, x1 = stats.channel_absmax[t], stats_sm.channel_absmax[t]
    w0, w1 = weight_absmax(model.params, m.targets), weight_absmax(smoothed.params, m.targets)
    drops[t] = spread(x0) / spread(x1)
    print(f"{t:28s}{spread(x0):21.1f}{spread(x1):8.1f}{spread(w0):22.1f}{spread(w1):8.1f}")
if SYNTHETIC:
    check("the activation max/median ratio drops in every smoothed input", "> 3x", f"{min(drops.values()):.1f}x (smallest)",
          min(drops.values()) > 3)
else:
    print(f"activation max/median ratio drop, smallest over the inputs: {min(drops.values()):.1f}x "
          "(a real model: printed, not asserted; it is large where there are outliers)")
'''


# ------------------------------------------------------------------------------------------
# 05: end to end

NB05 = r'''
%% md
# 05 · End to end: calibrate → smooth → quantize → evaluate

The whole SmoothQuant recipe (Sec. 4-5) on one model:

1. **calibrate** the float model: per-channel activation ranges of every linear input;
2. **smooth** with α = 0.5: a new model, the same function, outliers moved into weights;
3. **quantize** with the paper's presets (Table 2), with and without smoothing;
4. **evaluate**: perplexity (lower is better), the KL divergence of each variant's next-token
   distribution from the float model's (0 = identical), and LAMBADA accuracy when there is
   data and a tokenizer;
5. sweep **α** and let `minisq.search_alpha` pick one per layer.

| preset | weights | activations |
|---|---|---|
| naive | per-tensor | per-tensor, dynamic |
| O1 | per-tensor | per-token, dynamic |
| O2 | per-tensor | per-tensor, dynamic |
| O3 | per-tensor | per-tensor, **static** (from calibration) |

"naive" and O2 have the same settings: the paper's *W8A8 naive* baseline is O2 without
smoothing, and *SmoothQuant-O2* is O2 with it. O3's static scales are calibrated ranges of
**the model being quantized**: after smoothing, calibrate again.

On the synthetic model, perplexity is measured on tokens sampled from the float model, so
its absolute value means nothing outside this notebook; only the comparison between
variants does. Point `MODEL` at GPT-2 or OPT (with `$MINISQ_DATA_DIR` set) for real
WikiText-2 perplexities.
%% include MODEL
%% include SETUP
%% include TOKENS
%% code
# How much to evaluate. The paper scores the whole WikiText-2 test split in windows of the
# model's context; on a CPU a few thousand tokens already rank the variants.
EVAL_TOKENS = 2048 if SYNTHETIC else 4096   # None: the whole test split (slow on a CPU)
SEQ_LEN = min(model.config.max_positions, 1024)
N_LAMBADA = 100                             # LAMBADA passages (with data and a tokenizer)
ALPHA = 0.5

if model.tokenizer is not None and DATA is not None:
    eval_ids = np.asarray(model.tokenizer.encode(minisq.eval.data.wikitext2("test", data_dir=DATA)))
    EVAL = "WikiText-2 test (real text)"
else:
    n_seq = -(-(EVAL_TOKENS or 2048) // SEQ_LEN)
    prompts = np.random.default_rng(1).integers(0, model.config.vocab_size, size=(n_seq, 1))
    eval_ids = model.generate_ids(prompts, max_new_tokens=SEQ_LEN - 1, temperature=1.0, seed=1).reshape(-1)
    EVAL = f"SYNTHETIC tokens: {n_seq} x {SEQ_LEN} sampled from the float model (seed 1)"
eval_ids = eval_ids[:EVAL_TOKENS]
probe = eval_ids[:SEQ_LEN]            # one window, for KL(float || variant)
ref_logits = model(probe)             # [SEQ_LEN, V] float logits


def evaluate(m):
    # (perplexity on eval_ids, mean KL of m's next-token distribution from the float model's)
    ppl = minisq.perplexity(m, eval_ids, seq_len=SEQ_LEN, progress=False)
    return ppl, minisq.logit_error(ref_logits, m(probe))["kl"]


print(f"evaluating on {len(eval_ids)} tokens of {EVAL}, windows of {SEQ_LEN}")
%% md
## 1. Calibrate, smooth, recalibrate
%% code
stats = minisq.calibrate(model, calib, keep_samples=128, progress=False)       # ranges of the float model
smoothed = minisq.smooth(model, stats, alpha=ALPHA)                           # a new model, same function
stats_sm = minisq.calibrate(smoothed, calib, keep_samples=128, progress=False) # ranges of the SMOOTHED model
print(smoothed)
print(f"qkv input max|x|: {stats.input_absmax[QKV[0]]:.2f} before smoothing, "
      f"{stats_sm.input_absmax[QKV[0]]:.2f} after")
%% md
## 2. Quantize with every preset, with and without smoothing
%% code
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
%% md
**A pitfall.** O3's scales must come from the model being quantized. The float model's stats
*fit* the smoothed model (same layers, same shapes), but their ranges include the outliers
that smoothing removed: the static scales would come out far too coarse. minisq records which
smoothing a model had in its calibration stats and refuses the mix-up:
%% code
try:
    minisq.quantize(smoothed, "O3", stats=stats)   # WRONG: the float model's ranges
    refused = ""
except minisq.CalibrationError as err:
    refused = str(err)
print("minisq says:", refused)
check("stale stats are refused", "a CalibrationError", "refused" if refused else "accepted", bool(refused))
%% md
What the guard prevents, built by hand: the same O3 leaves, with the float model's ranges.
%% code
from minisq.qlinear import quantize_linear

stale_model = smoothed.replace_linears(
    lambda name, leaf: leaf if name == "lm_head" else
    quantize_linear(leaf, "per_tensor", "static", x_absmax=stats.input_absmax[name]))
stale = evaluate(stale_model)
fresh = results["O3", "smoothed"]
print(f"SmoothQuant-O3 with the smoothed model's stats: ppl {fresh[0]:.3f}, KL {fresh[1]:.4g}")
print(f"SmoothQuant-O3 with the float model's stats:    ppl {stale[0]:.3f}, KL {stale[1]:.4g}")
if SYNTHETIC:
    check("recalibrating after smoothing matters (KL)", f"stale > {fresh[1]:.4g}", f"{stale[1]:.4g}",
          stale[1] > fresh[1])
%% md
Per layer, on the kept calibration inputs: how much each linear's output suffers from O3
quantization (SQNR, higher is better), without and with smoothing. Only the inputs that
smoothing touches (qkv and fc1) improve; the others are unchanged.
%% code
before = minisq.layer_errors(model, stats, preset="O3")
after = minisq.layer_errors(smoothed, stats_sm, preset="O3")
display(plots.layer_sqnr(before, after, title="per-layer SQNR under O3", model_name=NAME))
gains = {n: after[n]["sqnr_db"] - before[n]["sqnr_db"] for n in QKV + FC1}
print("SQNR gain from smoothing:", ", ".join(f"{n} {g:+.1f} dB" for n, g in gains.items()))
if SYNTHETIC:
    check("smoothing raises the SQNR of every smoothed layer (O3)", "> 3 dB", f"{min(gains.values()):+.1f} dB (smallest)",
          min(gains.values()) > 3)
else:
    print("(a real model: printed, not asserted; a model without strong outliers gains little)")
%% md
## 3. LAMBADA

Last-word accuracy (GPT-2 paper; lm-eval's `lambada_openai`): a passage counts when
greedy decoding gets every token of its last word. It needs the data folder and a
tokenizer, so the synthetic model skips it.
%% code
if DATA is not None and model.tokenizer is not None:
    passages = minisq.eval.data.lambada(data_dir=DATA)[:N_LAMBADA]
    for label, m in [("float", model), ("W8A8 naive", qmodels["naive", "plain"]),
                     ("SmoothQuant-O3", qmodels["O3", "smoothed"])]:
        print(f"LAMBADA accuracy, {label:15s}: {minisq.lambada_accuracy(m, passages, progress=False):.3f} "
              f"({len(passages)} passages)")
else:
    why = "no data folder ($MINISQ_DATA_DIR)" if DATA is None else "the model has no tokenizer"
    print(f"LAMBADA skipped: {why} [{NAME}]")
%% md
## 4. The migration strength α

Each α gives a different smoothed model (and needs its own calibration for O3). α = 0
flattens the weights and leaves the activations hard, α = 1 the reverse; the paper finds a
sweet spot around 0.5 for OPT (0.75-0.85 for GLM-130B and some larger models).
%% code
ALPHAS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)
sweep = {}
for a in ALPHAS:
    sm = minisq.smooth(model, stats, alpha=a)
    sweep[a] = evaluate(minisq.quantize(sm, "O3", stats=minisq.calibrate(sm, calib, progress=False)))
    print(f"α = {a:4.2f}: SmoothQuant-O3 ppl {sweep[a][0]:.3f}, KL {sweep[a][1]:.4g}")
display(plots.alpha_sweep(list(ALPHAS), [sweep[a][0] for a in ALPHAS], ylabel="perplexity",
                          title="SmoothQuant-O3", model_name=NAME, baseline=ppl_f))
%% md
`minisq.search_alpha` picks α per smoothed LayerNorm instead: for each, it tries a grid of
α on the kept calibration inputs and keeps the one with the smallest quantized-output
error of the linears it feeds (always at least as good as α = 0.5 on that measure).
%% code
search = minisq.search_alpha(model, stats, preset="O3")
print(search.table())
sm = minisq.smooth(model, stats, alpha=search.alpha)
searched = evaluate(minisq.quantize(sm, "O3", stats=minisq.calibrate(sm, calib, progress=False)))
print(f"\nSmoothQuant-O3 with searched α: ppl {searched[0]:.3f}, KL {searched[1]:.4g} "
      f"(α = 0.5: ppl {fresh[0]:.3f}, KL {fresh[1]:.4g})")
%% md
## 5. Does SmoothQuant beat naive W8A8?
%% code
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
'''

# ------------------------------------------------------------------------------------------
# 06: the integer path

NB06 = r'''
%% md
# 06 · The real integer path, INT8 attention, the KV cache, and memory

Most papers *simulate* W8A8 ("fake quantization": round to the int8 grid, then compute in
float). minisq also runs the real thing: int8 weights are stored, activations are quantized
to int8 arrays, the GEMM accumulates in int32 (`minisq.int8_gemm`), and the epilogue
scales the result back. `minisq.quantize(..., path="int")` (the default) builds that model;
`path="fake"` builds the simulation with the very same integers. This notebook checks that
they agree, looks inside one layer, quantizes the attention products, decodes with a KV
cache, generates text, and counts bytes.
%% include MODEL
%% include SETUP
%% include TOKENS
%% code
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
%% md
## 1. Integer path vs fake quantization

Both paths quantize the same activations with the same scales to the same int8 values; the
integer path sums them exactly in int32 and scales once, the fake path multiplies the
dequantized floats. So a layer's outputs differ only by float rounding, and in float64 the
logits agree to ~1e-15. In float32 the rounding differences (~1e-7) can land an activation
of a *later* layer on the other side of a rounding boundary, flipping its int8 code by one
step: the logits then differ by about one quantization step (~1e-3), not by 1e-7. That is
why the exact checks in this notebook run in float64.
%% code
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
%% md
## 2. Inside one W8A8 layer

The layer holds an int8 weight and its scale (per-tensor under O3) and a static activation
scale. Feeding it real inputs step by step shows every intermediate array.
%% code
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
%% md
## 3. Quantized attention, as the official code does it

The official SmoothQuant code does not quantize the operands of attention's two batched
matmuls directly. It quantizes the **outputs of the q, k and v projections** (with the
activation granularity, before q is multiplied by $1/\sqrt{D}$) and leaves the softmax
probabilities $P$ in float. `attn_bmm=True` does exactly that; in `path="int"`, $q k^\top$
then runs as an INT8 BMM (`minisq.int8_bmm`) whose epilogue multiplies by a row scale
(query token) and a column scale (key token), and $P v$ stays a float matmul, since $P$ has
no int8 form in this scheme. `attn_bmm="static"` is the official *int8* OPT model (preset
O3 only): calibrated static scales for q, k and v, and $P$ as int8 with the fixed scale
1/127, so $P v$ is an INT8 BMM too. In float64 the integer and fake paths agree.
%% code
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
%% md
## 4. KV-cache decoding equals the full forward

Decoding feeds one token at a time and keeps the past keys and values. A quantized model
gives the same logits that way as on the whole sequence **only if each token is quantized
independently of the others**: per-token scales (O1) and static scales (O3) are; a dynamic
per-tensor scale (naive/O2) is the max over *all tokens of the sequence in the call*, so a
one-token call gets a different scale than the full sequence did. (It is never the max over
the other sequences of a batch, or over padding: a sequence quantizes the same alone or
batched.)
%% code
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
%% md
## 5. Generation side by side

Continuations of the same prompt by the float model, naive W8A8 and SmoothQuant-O3
(`Model.generate` uses the KV cache): greedy, and sampled at temperature 1 with the same
seed (so the three models draw the same random numbers, and only their distributions
differ). On the synthetic model the "text" is token ids from random weights; on GPT-2/OPT
it is text.
%% code
q_naive = minisq.quantize(model, "naive")
prompt = calib[0][:8]
N_NEW = 24
for how, kwargs in (("greedy", {}), ("sampled", dict(temperature=1.0, seed=0))):
    outs = {label: m.generate(prompt, max_new_tokens=N_NEW, **kwargs)
            for label, m in (("float", model), ("W8A8 naive", q_naive), ("SmoothQuant-O3", q_sq))}
    print(f"--- {how} [{NAME}]")
    for label, out in outs.items():
        same = int((out[len(prompt):] == outs["float"][len(prompt):]).sum())
        shown = repr(model.tokenizer.decode(out.tolist())) if model.tokenizer is not None else out[len(prompt):]
        print(f"{label:15s} ({same:2d}/{N_NEW} tokens as float): {shown}")
%% code
# generate() (KV cache) must pick the same greedy tokens as re-running the full sequence.
q64 = minisq.quantize(smoothed64, "O3", stats=stats_sm64)
generated = q64.generate(prompt, max_new_tokens=12)
seq = prompt.copy()
for _ in range(12):
    seq = np.append(seq, q64(seq)[-1].argmax())               # full forward, no cache
check("generate (KV cache) == greedy full-forward decoding", seq[len(prompt):].tolist(),
      generated[len(prompt):].tolist(), np.array_equal(seq, generated))
%% md
## 6. Memory

`minisq.weight_memory` counts the bytes of the linear layers as stored. The W8A8 layers
hold one byte per weight plus a scale and a float bias; the output projection (`lm_head`,
skipped by default, as in the paper) stays float.
%% code
mem_f, mem_q = minisq.weight_memory(model), minisq.weight_memory(q_sq)
print(f"{'':18s}{'stored':>12s}{'as float32':>12s}{'as float16':>12s}{'W8A8 layers':>13s}{'float layers':>13s}")
for label, mem in (("float model", mem_f), ("SmoothQuant-O3", mem_q)):
    print(f"{label:18s}{mem['stored_bytes']:12,d}{mem['float32_bytes']:12,d}{mem['float16_bytes']:12,d}"
          f"{mem['quantized_layers']:13d}{mem['float_layers']:13d}")

# The same count from the layer shapes, independently: int8 weight, float32 scale(s) and bias.
expected, f32_q, int8_q = 0, 0, 0
for name, leaf in q_sq.linears().items():
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
'''


# ------------------------------------------------------------------------------------------
# 07: the landscape (issue 13)

NB07 = r'''
%% md
# 07 · The landscape: SmoothQuant beside LLM.int8(), ZeroQuant, W8A16 and an INT8 KV cache

The paper (Tables 1 and 4) places SmoothQuant among the alternatives. Here they all run on
the same model with the same kernels (`minisq.baselines`, `minisq.kvquant`), so you can see
*why* SmoothQuant won:

| method | weights | activations | INT8 GEMM? | what happens to the outlier channels |
|---|---|---|---|---|
| W8A8 naive | per-tensor | per-tensor | yes | they set the scale; the other channels round to 0 |
| per-channel activations | per-channel | **per input channel** | **no** | each channel has its own scale: accurate, but the scale varies along the summed axis |
| W8A16 | per-channel | float | no (float GEMM) | untouched: only the weights are int8 |
| ZeroQuant | **per group** of 128 | per-token | yes (one per group) | still share each token's scale with every other channel |
| LLM.int8() | per-channel | per-token + **float outlier columns** | yes, plus a float GEMM | taken out (\|x\| ≥ 6) and multiplied in float |
| SmoothQuant-O1/O3 | per-tensor | per-token / static | yes | moved into the weights *offline* by smoothing |

and an orthogonal one: an **INT8 KV cache** (keys and values stored as int8 with one scale
per token and head). Each section explains one method in a cell or two and ends with a
check; the last one puts them in one table, like the paper's Table 1.
%% include MODEL
%% include SETUP
%% include TOKENS
%% code
import time
from minisq.baselines import largest_group_size
from minisq.qlinear import DEFAULT_SKIP, describe

# Evaluation tokens: WikiText-2 for a real model with data, else SYNTHETIC samples of the float model.
SEQ_LEN = min(model.config.max_positions, 128 if SYNTHETIC else 512)
if model.tokenizer is not None and DATA is not None:
    eval_ids = np.asarray(model.tokenizer.encode(minisq.eval.data.wikitext2("test", data_dir=DATA)))[:4 * SEQ_LEN]
    EVAL = "WikiText-2 test (real text)"
else:
    prompts = np.random.default_rng(1).integers(0, model.config.vocab_size, size=(4, 1))
    eval_ids = model.generate_ids(prompts, max_new_tokens=SEQ_LEN - 1, temperature=1.0, seed=1).reshape(-1)
    EVAL = f"SYNTHETIC tokens: 4 x {SEQ_LEN} sampled from the float model (seed 1)"
probe = eval_ids[:SEQ_LEN]
ref_logits = model(probe)
stats = minisq.calibrate(model, calib, keep_samples=64, progress=False)
smoothed = minisq.smooth(model, stats, alpha=0.5)
stats_sm = minisq.calibrate(smoothed, calib, progress=False)


def kl(m):
    # mean KL(float || m) over the probe window's next-token distributions
    return minisq.logit_error(ref_logits, m(probe))["kl"]


print(f"evaluating on {len(eval_ids)} tokens of {EVAL}")
%% md
## 1. Per-channel activation scales: accurate, but not GEMM-able

A scale per *input* channel $k$ would isolate each outlier channel. But the GEMM sums over
$k$: in $\sum_k \Delta_x[k]\,\bar X[t,k]\,\bar W[k,j]$ the scale cannot come out of the sum,
so the product cannot run on integers. minisq computes it in fake quantization only (the
paper's "ideal" reference) and refuses the integer path, saying why:
%% code
per_channel = minisq.quantize(model, acts="per_channel", path="fake")
try:
    minisq.quantize(model, acts="per_channel", path="int")
    refusal = ""
except minisq.ConfigError as err:
    refusal = str(err)
print("minisq says:", refusal)
x = stats.samples[QKV[0]][:16]                                       # [16, C] real inputs of a qkv layer
x_q, x_s = per_channel.linears()[QKV[0]].quantize_input(x)
print(f"{QKV[0]}: activation scale shape {x_s.shape} (one per input channel), codes {x_q.dtype}")
check("per-channel activations are refused on the integer path", "a ConfigError", "refused" if refusal else "accepted",
      "sums over" in refusal)
%% md
## 2. W8A16: weight-only INT8

Store the weights in int8 (per output channel), keep the activations in float:
$y = x\,(\bar W \Delta_w) + b$. No activation is rounded, so outliers do no harm — but the
matrix product is a float GEMM: it halves the weight memory of float16 without using the
INT8 tensor cores.
%% code
w8a16 = minisq.quantize(model, "w8a16")
leaf = w8a16.linears()[QKV[0]]
print(QKV[0], "->", describe(leaf), "| w_q", leaf.w_q.dtype, leaf.w_q.shape, "| w_scale", leaf.w_scale.shape)
naive = minisq.quantize(model, "naive")
kl_w8a16, kl_naive = kl(w8a16), kl(naive)
print(f"KL to float: W8A16 {kl_w8a16:.3g}, W8A8 naive {kl_naive:.3g}   [{NAME}]")
if SYNTHETIC:
    check("W8A16 is far closer to float than naive W8A8 (KL)", f"< {kl_naive / 10:.3g}", f"{kl_w8a16:.3g}",
          kl_w8a16 < kl_naive / 10)
%% md
## 3. ZeroQuant: group-wise weights, per-token activations

ZeroQuant gives each group of 128 consecutive input channels of each output channel its own
weight scale, and quantizes activations per token. On the integer path each group is its
own INT8 GEMM (one batched call), and each group's int32 partial sum gets its own scale:

$$Y[t,j] = \Delta_x[t] \sum_{G} \Delta_w[G,j] \sum_{k\in G} \bar X[t,k]\,\bar W[k,j] + b[j]$$

Finer weight scales help the weights; the activations are still quantized per token over
*all* channels, so the outlier channels still crush the others.
%% code
GROUP = largest_group_size(model, 128, skip=DEFAULT_SKIP)      # 128, or what divides every C_in
zeroquant = minisq.quantize(model, "zeroquant", group_size=GROUP)
# the widest layer has the most groups (on the synthetic model C = 128: qkv and fc1 have one)
zname, zleaf = max(((n, l) for n, l in zeroquant.linears().items() if n not in DEFAULT_SKIP),
                   key=lambda item: item[1].in_features)
print(zname, "->", describe(zleaf), "| w_scale", zleaf.w_scale.shape, "= [G, C_out]")
xz = stats.samples[zname][:16]                                         # [16, C_in] its real inputs
xz_q, xz_s = minisq.quantize_per_token(xz)
acc = minisq.int8_bmm(xz_q.reshape(16, zleaf.groups, -1).swapaxes(0, 1),
                      zleaf.w_q.reshape(zleaf.groups, zleaf.group_size, -1))   # [G, 16, C_out] int32
by_hand = (acc * (xz_s[None] * zleaf.w_scale[:, None, :])).sum(axis=0) + zleaf.b
print(f"per-group int32 partial sums: {acc.shape} {acc.dtype}")
close = np.allclose(by_hand, zleaf(xz), rtol=1e-5, atol=1e-5 * np.abs(by_hand).max())
check("each group's partial sum times its own scale, summed == the layer", True, close, close)
# With a single group (g = C_in) ZeroQuant is per-channel / per-token W8A8, bit for bit:
float_leaf = model.linears()[QKV[0]]
one_group = minisq.quantize_linear(float_leaf, "per_group", "per_token", group_size=float_leaf.w.shape[0])
vector_wise = minisq.quantize_linear(float_leaf, "per_channel", "per_token")
same = np.array_equal(one_group(x), vector_wise(x))
check("ZeroQuant with one group == per-channel/per-token W8A8 (bitwise)", True, same, same)
%% md
## 4. LLM.int8(): the outlier channels in float

LLM.int8() keeps vector-wise INT8 (per-token activations, per-channel weights) but first
takes out the input channels where some token of the sequence has $|x| \ge 6$: those columns
are multiplied in floating point (by the *dequantized int8* weight rows, as bitsandbytes
does, so no float weights are stored), the rest through the INT8 GEMM, and the two results
are added. Accurate, but every GEMM is split in two, and which channels are outliers is
found at run time. `minisq.outlier_fractions` says how many channels each layer sends to
float on given inputs:
%% code
llm_int8 = minisq.quantize(model, "llm.int8", threshold=6.0)
fractions = minisq.outlier_fractions(llm_int8, probe)
for name, f in list(fractions.items())[:8]:
    print(f"{name:28s} {f:6.1%} of input channels in float")
if SYNTHETIC:
    planted = len(model.info["outlier_channels"]) / model.config.hidden_size
    check("LLM.int8() takes out exactly the planted outlier channels of qkv", f"{planted:.1%}",
          f"{fractions[QKV[0]]:.1%}", fractions[QKV[0]] == planted)
# At its limits LLM.int8() is two other methods: threshold = inf takes nothing out.
inf_model = minisq.quantize(model, "llm.int8", threshold=float("inf"))
vw_model = minisq.quantize(model, weights="per_channel", acts="per_token")
same = np.array_equal(inf_model(probe), vw_model(probe))
check("LLM.int8() with threshold = inf == vector-wise W8A8 (bitwise logits)", True, same, same)
%% md
## 5. An INT8 KV cache

While generating, every past token's keys and values stay in memory; for long sequences and
big batches that cache outgrows the weights. `kv_cache="int8"` stores them as int8 with one
scale per token and head: about a quarter of float32, plus the scales.
%% code
sq_o3 = minisq.quantize(smoothed, "O3", stats=stats_sm)
sq_o3_kv = minisq.quantize(smoothed, "O3", stats=stats_sm, kv_cache="int8")
_, cache = sq_o3_kv.forward(probe[None, :32], use_cache=True)
stored = sum(buf[:, :, :cache.length].nbytes for bufs in cache.store for buf in bufs)
print("layer 0 cache arrays:", [(b.dtype.name, b[:, :, :cache.length].shape) for b in cache.store[0]])
print(f"bytes per token: float32 cache {sq_o3.kv_cache_bytes_per_token():,}, "
      f"int8 cache {sq_o3_kv.kv_cache_bytes_per_token():,}")
check("kv_cache_bytes_per_token == the cache's arrays", f"{stored / 32:,.0f}",
      f"{sq_o3_kv.kv_cache_bytes_per_token():,}", sq_o3_kv.kv_cache_bytes_per_token() == stored / 32)
%% md
## 6. Side by side: a Table-1-like comparison

Every method on the same tokens: perplexity, KL to the float model, the bytes of the linear
weights as stored, the KV cache's bytes per token, and the time of one forward pass over the
probe window (NumPy on this CPU: a teaching number, not a kernel benchmark — the fake path
and the float parts are not what a GPU kernel would do).
%% code
METHODS = [
    ("float", model),
    ("W8A8 naive", naive),
    ("W8A8 per-channel acts (fake)", per_channel),
    ("W8A16", w8a16),
    ("ZeroQuant", zeroquant),
    ("LLM.int8()", llm_int8),
    ("SmoothQuant-O1", minisq.quantize(smoothed, "O1")),
    ("SmoothQuant-O3", sq_o3),
    ("SmoothQuant-O3 + INT8 KV", sq_o3_kv),
]
table = {}
print(f"{NAME} | {EVAL}\n")
print(f"{'method':30s}{'ppl':>10s}{'KL':>11s}{'weights MB':>12s}{'KV B/tok':>10s}{'forward s':>11s}")
for label, m in METHODS:
    secs = []
    for _ in range(2):                       # the faster of two runs: less noise from a busy CPU
        t0 = time.perf_counter()
        k = kl(m)
        secs.append(time.perf_counter() - t0)
    secs = min(secs)
    ppl = minisq.perplexity(m, eval_ids, seq_len=SEQ_LEN, progress=False)
    mb = minisq.weight_memory(m)["stored_bytes"] / 2**20
    table[label] = dict(ppl=ppl, kl=k, mb=mb)
    print(f"{label:30s}{ppl:10.3f}{k:11.3g}{mb:12.2f}{m.kv_cache_bytes_per_token():10,d}{secs:11.3f}")
%% md
What to read in it (on the synthetic model the ranking is what the paper reports for OPT ≥ 6.7B):

* **naive W8A8** is far off: the outlier channels set every per-tensor scale;
* **per-channel activations**, **W8A16** and **LLM.int8()** are close to float, but none runs
  as one INT8 GEMM: the first is not computable on integers at all, the second multiplies in
  float, the third splits every GEMM and gathers the outlier columns at run time;
* **ZeroQuant** improves the weights, not the activations, and stays well behind;
* **SmoothQuant** gets close with *plain* INT8 GEMMs, because smoothing moved the outliers
  into the weights before quantizing.
%% code
r = {k: v["kl"] for k, v in table.items()}
if SYNTHETIC:
    check("LLM.int8() and W8A16 far closer to float than naive W8A8 (KL)", f"< {r['W8A8 naive'] / 10:.3g}",
          f"{r['LLM.int8()']:.3g}, {r['W8A16']:.3g}", max(r["LLM.int8()"], r["W8A16"]) < r["W8A8 naive"] / 10)
    check("SmoothQuant-O1 closer to float than ZeroQuant (KL)", f"< {r['ZeroQuant']:.3g}",
          f"{r['SmoothQuant-O1']:.3g}", r["SmoothQuant-O1"] < r["ZeroQuant"])
else:
    print("(a real model: printed, not asserted; small models have milder outliers than OPT-6.7B and up)")
'''


NB08 = r'''
%% md
# 08 · Bigger than memory: stored dtypes, lazy models, layer-by-layer SmoothQuant

SmoothQuant's result lives at 6.7B+ parameters, where naive W8A8 collapses. OPT-6.7B is
13.4 GB in float16 and 27 GB in float32: the float32 model does not fit a 24 GB laptop.
The fix is to **swap the two loops**: instead of *for each batch, for each layer* (every
layer in memory), run *for each layer, for each batch* — read one layer, apply it to every
batch, drop it, read the next. Peak memory is then one layer plus the activations. This is
what production tools do (llm-compressor's sequential onloading, NVIDIA ModelOpt's
layerwise calibration); minisq does it in plain array code.

This notebook writes a **SYNTHETIC** checkpoint to disk (random weights with planted
outliers, float16, as Hugging Face stores one) and walks through:

1. weights kept as float16 in memory, widened to float32 one layer at a time;
2. a **lazy** (memory-mapped) model: the weights stay in the file;
3. layer-outer evaluation: every layer read exactly once;
4. `quantize_checkpoint`: SmoothQuant streamed layer by layer — bit-identical to the
   in-memory pipeline, and resumable.

To run it on a real model, set `MODEL` to a local checkpoint folder (e.g. one made with
`hf download facebook/opt-1.3b --local-dir opt-1.3b`): these paths read checkpoint files.
%% code
# The one line to change: "synthetic" writes a small SYNTHETIC float16 checkpoint first.
MODEL = "synthetic"  # or a local folder with config.json + *.safetensors, e.g. "opt-1.3b"
%% code
import tempfile
from pathlib import Path

import numpy as np

import minisq
from minisq.synthetic import save_synthetic_checkpoint


def check(what, expected, seen, ok):
    # One stage's check: print expected vs seen, and stop the notebook if it fails.
    print(f"check: {what}: expected {expected}, seen {seen} -> {'OK' if ok else 'MISMATCH'}")
    assert ok, f"{what}: expected {expected}, seen {seen}"


work = Path(tempfile.mkdtemp(prefix="minisq-nb08-"))
CHECKPOINT = MODEL
if MODEL == "synthetic":
    config = minisq.ModelConfig(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4,
                                ffn_dim=512, max_positions=128)
    CHECKPOINT = save_synthetic_checkpoint(work / "synthetic-fp16", config, dtype="float16", outlier_scale=60)
    print("wrote a SYNTHETIC float16 checkpoint (random weights, planted outliers) to", CHECKPOINT)
print(sorted(p.name for p in Path(CHECKPOINT).iterdir()))
%% md
## 1. float16 in memory, float32 to compute

`minisq.load(folder, dtype="float16")` keeps every weight as float16 (half of float32) and
widens one decoder layer at a time to float32 while it runs: NumPy has no float16 BLAS, and
widening float16 (or bfloat16) to float32 is exact, so the logits are *bit for bit* those of
the float32 model loaded from the same file.
%% code
eager = minisq.load(CHECKPOINT)                      # every weight converted to float32
half = minisq.load(CHECKPOINT, dtype="float16")      # kept as stored
ids = np.random.default_rng(0).integers(0, eager.config.vocab_size, size=(2, 32))


def weight_bytes(m):
    # bytes of every weight the model holds (stored tensors at their stored size)
    total = 0
    def visit(node):
        nonlocal total
        if isinstance(node, dict):
            [visit(v) for v in node.values()]
        elif isinstance(node, (list, tuple)):
            [visit(v) for v in node]
        elif hasattr(node, "nbytes") and hasattr(node, "shape"):
            total += node.nbytes
        elif hasattr(node, "__dataclass_fields__"):
            [visit(getattr(node, f)) for f in node.__dataclass_fields__]
    visit(m.params)
    return total


print(f"weights held: float32 model {weight_bytes(eager) / 2**20:.1f} MiB, float16-stored model "
      f"{weight_bytes(half) / 2**20:.1f} MiB (the tied LM head counted once in each)")
name, leaf = next(iter(half.linears().items()))
print(f"{name}.w is {leaf.w!r}; widened for its layer: {leaf.w.materialize().dtype} {leaf.w.materialize().shape}")
same = np.array_equal(half(ids), eager(ids))
check("float16-stored logits == float32 logits (bitwise)", True, same, same)
%% md
## 2. A lazy model: the weights stay in the file

`lazy=True` memory-maps the checkpoint. Nothing is read until a layer runs; the bytes then
sit in the operating system's page cache, which is not the program's own memory (on Linux:
`RssAnon` counts the program's memory, mapped file pages do not).
%% code
lazy = minisq.load(CHECKPOINT, lazy=True)
print(lazy)
print("lazy:", lazy.lazy, "| compute dtype:", lazy.dtype)
same = np.array_equal(lazy(ids), eager(ids))
check("lazy logits == eager logits (bitwise)", True, same, same)
%% md
## 3. Every layer read once

A lazy model's `perplexity`, `lambada_accuracy` and `calibrate` run **layer-outer**: each
layer is widened once and applied to every window. Count the reads:
%% code
reads = []
original = type(lazy).layer
type(lazy).layer = lambda self, i: reads.append(i) or original(self, i)
stream = np.random.default_rng(1).integers(0, lazy.config.vocab_size, 8 * 64)
ppl_lazy = minisq.perplexity(lazy, stream, seq_len=64, batch_size=2, progress=False)   # 8 windows, 4 batches
type(lazy).layer = original
ppl_eager = minisq.perplexity(eager, stream, seq_len=64, batch_size=2, progress=False)
print(f"perplexity of random ids (meaningless; the point is lazy == eager): lazy {ppl_lazy:.4f}, "
      f"eager {ppl_eager:.4f}; layers read: {reads}")
check("each layer read once for 4 batches", list(range(lazy.config.num_layers)), reads,
      reads == list(range(lazy.config.num_layers)) and ppl_lazy == ppl_eager)
%% md
## 4. SmoothQuant, streamed layer by layer

`minisq.quantize_checkpoint(src, dst, calib, preset, alpha)` does, for each decoder layer in
turn: calibrate it on the activations that reach it, smooth it, calibrate the smoothed layer
(static O3 scales), quantize it, write it, and carry the activations on. Because the same
batches go through the same block code in the same order, it is **bit-identical** to

    quantize(smooth(m, calibrate(m, calib), α), "O3", stats=calibrate(smoothed, calib))

Killed at any point, the same call resumes after the last finished layer. The command-line
form is `minisq quantize SRC DST --preset O3 --alpha 0.5`.
%% code
calib = list(np.random.default_rng(2).integers(0, eager.config.vocab_size, size=(4, 64)))
dst = minisq.quantize_checkpoint(CHECKPOINT, work / "sq-o3", calib, preset="O3", alpha=0.5, progress=True)
streamed = minisq.load(dst)
smoothed = minisq.smooth(eager, minisq.calibrate(eager, calib, progress=False), alpha=0.5)
in_memory = minisq.quantize(smoothed, "O3", stats=minisq.calibrate(smoothed, calib, progress=False))
same = np.array_equal(streamed(ids), in_memory(ids))
print(sorted(p.name for p in Path(dst).iterdir()))
check("streamed SmoothQuant-O3 == in-memory SmoothQuant-O3 (bitwise)", True, same, same)
%% md
On a 6.7B-shaped checkpoint (32 layers of OPT-6.7B's shapes, random weights) the README's
`benchmarks/memory.py` table gives the peak memory of each path: the lazy and streamed ones
stay within a few GB, where the eager float32 model would need 27 GB.
'''


NOTEBOOKS = {
    "01_int8_gemm": NB01,
    "02_quantizers": NB02,
    "03_outliers": NB03,
    "04_smoothing": NB04,
    "05_end_to_end": NB05,
    "06_integer_path": NB06,
    "07_landscape": NB07,
    "08_big_models": NB08,
}


# ------------------------------------------------------------------------------------------
# building


def parse_cells(source: str) -> list:
    """``[(kind, text)]`` from a notebook source string (see the module docstring)."""
    cells, kind, lines = [], None, []

    def flush():
        if kind is not None:
            text = "\n".join(lines).strip("\n")
            if not text.strip():
                raise ValueError(f"empty {kind} cell")
            cells.append((kind, text))

    for line in source.splitlines():
        if line.startswith("%% include "):
            flush()
            kind, lines = None, []
            cells.extend(parse_cells(SHARED[line.split(maxsplit=2)[2].strip()]))
        elif line.strip() in ("%% md", "%% code"):
            flush()
            kind, lines = line.strip()[3:], []
        elif kind is None:
            if line.strip():
                raise ValueError(f"text outside a cell: {line!r}")
        else:
            lines.append(line)
    flush()
    return cells


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` (e.g. "01_int8_gemm") as an output-free NotebookNode."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, text) in enumerate(parse_cells(NOTEBOOKS[name])):
        cell = nbformat.v4.new_markdown_cell(text) if kind == "md" else nbformat.v4.new_code_cell(text)
        cell.id = f"{name[:2]}-{i:02d}"  # stable ids: nbformat would draw random ones
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    """The exact text of ``notebooks/<name>.ipynb``."""
    return nbformat.writes(build(name)) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if a notebook differs")
    args = ap.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = HERE / f"{name}.ipynb"
        text = render(name)
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path.name)
        if not args.check:
            path.write_text(text, encoding="utf-8")
    verb = "differ from this script" if args.check else "written"
    print(f"{len(stale)} notebook(s) {verb}: {', '.join(stale) or '-'}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
