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
# # 01 · The INT8 GEMM: int8 in, int32 out, scales after
#
# SmoothQuant's W8A8 linear layer (Xiao et al. 2022, Sec. 2, Eq. 1 and Fig. 3) multiplies
# **int8 activations by int8 weights** and gets floats back with one multiplication per
# output element:
#
# $$Y[t, j] \;=\; \Delta_x[t]\;\Delta_w[j]\;\sum_k \bar X[t, k]\,\bar W[k, j] \;+\; b[j]$$
#
# $\bar X$, $\bar W$ are int8 arrays, $\Delta_x$ one scale per token, $\Delta_w$ one scale per
# output channel. This notebook takes the formula apart with `minisq.gemm`:
#
# 1. the integer sum as a loop, on numbers small enough to check by eye;
# 2. why the accumulator is int32;
# 3. why the scales come out of the sum, and which scales can;
# 4. the dequantization epilogue, `minisq.dequant_epilogue`;
# 5. how the CPU gets an *exact* int8 GEMM out of float32 BLAS, and where naive float32 fails;
# 6. the GPU path (cuBLAS int8 GEMM), run only where there is a GPU;
# 7. one real layer of the model, end to end.
#
# Legend: `M` = `T` rows (tokens), `K` = `C_in` the summed axis, `N` = `C_out` columns.
# Weights are stored `[C_in, C_out]`, so `y = x @ w`.

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
# ## 1. The loop form
#
# $C[i, j] = \sum_k A[i, k]\,B[k, j]$, with $A$, $B$ int8. `minisq.gemm.int8_gemm_loops` is
# literally that triple loop over Python integers (which never overflow): the slowest and
# most obviously correct oracle. `minisq.int8_gemm_reference` is the same sum as an int64
# matmul, and `minisq.int8_gemm` the fast path used by the model. All three must agree
# bit for bit.

# %%
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

# %% [markdown]
# ## 2. Why the accumulator is int32
#
# One product of two int8 values can be as large as $127 \cdot 127 = 16129$: it does not fit
# in int8 (max 127), and three of them overflow int16 (max 32767). The sum over $K$ needs
# $\log_2(K \cdot 128^2) + 1$ bits: int32 is enough up to $K = 131071$
# (`minisq.gemm.MAX_K`). NumPy, like the hardware, **wraps around silently** when a fixed-width
# integer overflows, so a too-small accumulator gives a wrong number, not an error.

# %%
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

# %% [markdown]
# ## 3. Why the scales come out of the sum
#
# With $X \approx \Delta_x[t]\,\bar X[t, k]$ and $W \approx \Delta_w[j]\,\bar W[k, j]$:
#
# $$\sum_k \big(\Delta_x[t]\,\bar X[t,k]\big)\big(\Delta_w[j]\,\bar W[k,j]\big)
#   \;=\; \Delta_x[t]\,\Delta_w[j]\,\sum_k \bar X[t,k]\,\bar W[k,j]$$
#
# The step is allowed because **neither scale depends on $k$**, the index being summed: a
# per-token scale depends on $t$ only, a per-output-channel weight scale on $j$ only (and a
# per-tensor scale on nothing). So the sum is pure integer arithmetic and the scales are
# applied once per output element. Below, the float simulation (dequantize first, then a
# float matmul) and the integer path (int8 GEMM, then scale) give the same numbers; in
# float64 they differ only by rounding.

# %%
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

# %% [markdown]
# ## 4. The epilogue
#
# `minisq.dequant_epilogue(acc, row_scale, col_scale, bias)` turns the int32 accumulator back
# into floats: `acc * (row_scale * col_scale) + bias`, combined scale first (its docstring
# says why that order). Here it is on one element, by hand, in float32: the same three IEEE
# operations in the same order give the same bits.

# %%
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

# %% [markdown]
# ## 5. An exact int8 GEMM from float32 BLAS (CPU)
#
# NumPy has no fast int8 matmul (integer matmul skips BLAS and is slow), but float32 BLAS is
# fast. float32 holds every integer up to $2^{24}$ exactly, and an int8 product is at most
# $128^2 = 2^{14}$, so **any sum of at most $2^{24} / 2^{14} = 1024$ products is exact in
# float32, in whatever order BLAS adds it**. `minisq.int8_gemm` cuts $K$ into blocks of
# `BLOCK_K = 1024`, runs float32 BLAS per block and adds the block results in int32.
# (The same argument per row: when $128 \cdot \sum_k |a_{ik}| \le 2^{24}$ for every row, no
# partial sum can pass $2^{24}$ and one float32 call over all of $K$ is exact. Quantized
# activations usually pass this check, and `int8_gemm` then skips the blocks; the
# all-127 rows below do not.)
#
# Naive float32 over the whole $K$ is not exact. A guaranteed counter-example: 2000 products
# of $127 \cdot 127$ plus one $1 \cdot 1$ sum to $32\,258\,001$, an odd number above $2^{24}$;
# float32 cannot represent it at all (its spacing there is 2), so any float32 result is wrong.

# %%
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

# %%
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

# %% [markdown]
# ## 6. The GPU path
#
# On a GPU, `minisq.int8_gemm` calls cuBLAS's int8 GEMM (`cublasGemmEx` with int8 inputs and
# an int32 accumulator: tensor cores, exact). cuBLAS is column-major and its int8 kernels
# want the "TN" layout with sizes that are multiples of 4, so the row-major
# `C = A @ B` is asked for as the column-major `Cᵀ = Bᵀ Aᵀ`, with `K` and `N` zero-padded to
# multiples of 4 (zeros add nothing to the sums). `minisq.gemm.int8_gemm_plan` computes those
# arguments in pure Python, so they can be read (and tested) without a GPU. Only
# `minisq.backend` imports CuPy; the rest of minisq never asks which device it runs on.

# %%
plan = minisq.gemm.int8_gemm_plan(M=5, K=30, N=7)
print(plan)
print("meets cuBLAS's int8 rules:", minisq.gemm.meets_int8_rules(plan))
check("K = 30 and N = 7 padded to multiples of 4", (32, 8), (plan.k, plan.m),
      (plan.k, plan.m) == (32, 8) and minisq.gemm.meets_int8_rules(plan))

if minisq.backend.gpu_available():
    on_gpu = minisq.backend.to_numpy(minisq.int8_gemm(minisq.backend.to_device(A, "gpu"),
                                                      minisq.backend.to_device(B, "gpu")))
    check("GPU int8 GEMM == CPU reference", "all equal", f"{int((on_gpu != ref).sum())} differ",
          np.array_equal(on_gpu, ref))
else:
    print("no GPU here (minisq.backend.gpu_available() is False): the GPU run is skipped")

# %% [markdown]
# ## 7. One real layer, end to end
#
# `minisq.calibrate` records what flows into every linear layer; we keep 64 input rows of the
# model's first linear (a q/k/v projection), quantize its weight per output channel, the
# inputs per token, and run exactly the steps above. `minisq.quantize_linear` gives the
# W8A8 layer that the whole-model `minisq.quantize` builds; calling it must be the same
# three steps bit for bit. Its inputs come from calibration tokens: WikiText-2 paragraphs for
# a real model with a data folder, otherwise tokens sampled from the model itself (SYNTHETIC).

# %%
calib, TOKENS = calibration_tokens(model, DATA)

# %%
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
