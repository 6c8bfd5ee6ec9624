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
# # 08 · Bigger than memory: stored dtypes, lazy models, layer-by-layer SmoothQuant
#
# SmoothQuant's result lives at 6.7B+ parameters, where naive W8A8 collapses. OPT-6.7B is
# 13.4 GB in float16 and 27 GB in float32: the float32 model does not fit a 24 GB laptop.
# The fix is to **swap the two loops**: instead of *for each batch, for each layer* (every
# layer in memory), run *for each layer, for each batch* — read one layer, apply it to every
# batch, drop it, read the next. Peak memory is then one layer plus the activations. This is
# what production tools do (llm-compressor's sequential onloading, NVIDIA ModelOpt's
# layerwise calibration); minisq does it in plain array code.
#
# This notebook writes a **SYNTHETIC** checkpoint to disk (random weights with planted
# outliers, float16, as Hugging Face stores one) and walks through:
#
# 1. weights kept as float16 in memory, widened to float32 one layer at a time;
# 2. a **lazy** (memory-mapped) model: the weights stay in the file;
# 3. layer-outer evaluation: every layer read exactly once;
# 4. `quantize_checkpoint`: SmoothQuant streamed layer by layer — bit-identical to the
#    in-memory pipeline, and resumable.
#
# To run it on a real model, set `MODEL` to a local checkpoint folder (e.g. one made with
# `hf download facebook/opt-1.3b --local-dir opt-1.3b`): these paths read checkpoint files.

# %%
# The one line to change: "synthetic" writes a small SYNTHETIC float16 checkpoint first.
MODEL = "synthetic"  # or a local folder with config.json + *.safetensors, e.g. "opt-1.3b"

# %%
import tempfile
from pathlib import Path

import numpy as np

import minisq
from minisq.course.notebook import check
from minisq.synthetic import save_synthetic_checkpoint

work = Path(tempfile.mkdtemp(prefix="minisq-nb08-"))
CHECKPOINT = MODEL
if MODEL == "synthetic":
    config = minisq.ModelConfig(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4,
                                ffn_dim=512, max_positions=128)
    CHECKPOINT = save_synthetic_checkpoint(work / "synthetic-fp16", config, dtype="float16", outlier_scale=60)
    print("wrote a SYNTHETIC float16 checkpoint (random weights, planted outliers) to", CHECKPOINT)
print(sorted(p.name for p in Path(CHECKPOINT).iterdir()))

# %% [markdown]
# ## 1. float16 in memory, float32 to compute
#
# `minisq.load(folder, dtype="float16")` keeps every weight as float16 (half of float32) and
# widens one decoder layer at a time to float32 while it runs: NumPy has no float16 BLAS, and
# widening float16 (or bfloat16) to float32 is exact, so the logits are *bit for bit* those of
# the float32 model loaded from the same file.

# %%
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

# %% [markdown]
# ## 2. A lazy model: the weights stay in the file
#
# `lazy=True` memory-maps the checkpoint. Nothing is read until a layer runs; the bytes then
# sit in the operating system's page cache, which is not the program's own memory (on Linux:
# `RssAnon` counts the program's memory, mapped file pages do not).

# %%
lazy = minisq.load(CHECKPOINT, lazy=True)
print(lazy)
print("lazy:", lazy.lazy, "| compute dtype:", lazy.dtype)
same = np.array_equal(lazy(ids), eager(ids))
check("lazy logits == eager logits (bitwise)", True, same, same)

# %% [markdown]
# ## 3. Every layer read once
#
# A lazy model's `perplexity`, `lambada_accuracy` and `calibrate` run **layer-outer**: each
# layer is widened once and applied to every window. Count the reads:

# %%
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

# %% [markdown]
# ## 4. SmoothQuant, streamed layer by layer
#
# `minisq.quantize_checkpoint(src, dst, calib, preset, alpha)` does, for each decoder layer in
# turn: calibrate it on the activations that reach it, smooth it, calibrate the smoothed layer
# (static O3 scales), quantize it, write it, and carry the activations on. Because the same
# batches go through the same block code in the same order, it is **bit-identical** to
#
#     quantize(smooth(m, calibrate(m, calib), α), "O3", stats=calibrate(smoothed, calib))
#
# Killed at any point, the same call resumes after the last finished layer. The command-line
# form is `python -m minisq.quantize SRC DST --preset O3 --alpha 0.5`.

# %%
calib = list(np.random.default_rng(2).integers(0, eager.config.vocab_size, size=(4, 64)))
dst = minisq.quantize_checkpoint(CHECKPOINT, work / "sq-o3", calib, preset="O3", alpha=0.5, progress=True)
streamed = minisq.load(dst)
smoothed = minisq.smooth(eager, minisq.calibrate(eager, calib, progress=False), alpha=0.5)
in_memory = minisq.quantize(smoothed, "O3", stats=minisq.calibrate(smoothed, calib, progress=False))
same = np.array_equal(streamed(ids), in_memory(ids))
print(sorted(p.name for p in Path(dst).iterdir()))
check("streamed SmoothQuant-O3 == in-memory SmoothQuant-O3 (bitwise)", True, same, same)

# %% [markdown]
# On a 6.7B-shaped checkpoint (32 layers of OPT-6.7B's shapes, random weights) the
# `benchmarks/memory.py` table in `docs/benchmarks.md` gives the peak memory of each path: the lazy and streamed ones
# stay within a few GB, where the eager float32 model would need 27 GB.
