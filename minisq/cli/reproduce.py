"""``minisq reproduce``: the paper's emergence curve, on a family of models.

SmoothQuant's story is a curve over model size: naive W8A8 keeps up with the float model
on small OPTs and collapses from about 6.7B parameters up, where outlier channels emerge;
SmoothQuant stays on the float curve at every size (Xiao et al. 2023, Figure 7 and Table 3).
This command measures that curve with minisq: for each model (default the OPT family
125m ... 6.7b; any GPT-2/OPT hub id or local folder) it evaluates

* **FP32**: the checkpoint's weights computed in float32 on the CPU. The paper's baseline
  is FP16 on a GPU; minisq's CPU path computes in float32, so this row is *not* FP16;
* **W8A8 naive**: per-tensor weights, per-tensor dynamic activations, no smoothing;
* **SmoothQuant-O1/O2/O3**: smoothed (α), then quantized with the paper's Table 2 presets
  (O3's static scales calibrated on the smoothed model),

on WikiText-2 perplexity and LAMBADA last-word accuracy, and writes

* ``table.md``: minisq's numbers with the paper's published ones beside them where the
  paper has them (:data:`PAPER`, each with its source), blanks elsewhere;
* ``emergence.png``: accuracy (and perplexity) against parameter count, log x: FP32, naive
  W8A8 and SmoothQuant-O3, minisq's points solid, the paper's hollow;
* ``results.json``: every number, with the settings that produced it.

**Resuming.** Each (model, variant) result is cached as one JSON file under
``<out>/cache``, named by a hash of everything that changes the number (model id or
folder, variant, α, calibration samples and length, eval tokens, window, LAMBADA samples
and metric, attention quantization, seed, minisq version). The file is written whole
(temp file + rename), so an interrupted run leaves no half result; running the same
command again re-uses finished entries and computes only the missing ones, and a model
whose entries are all cached is not even loaded.

**Memory.** One model is held at a time, with at most its smoothed copy and one quantized
variant beside it. A model whose float32 run would not fit (estimated from its weight
files) is loaded lazily when ``minisq.load`` offers ``lazy=True``, with a line saying so:
memory-mapped, evaluated layer by layer, and its W8A8 variants written layer by layer by
:func:`minisq.quantize_checkpoint` into ``<out>/models`` (resumable; deleted once the number
is cached) and loaded from there. Otherwise it is refused with the memory it needs.

**Random weights.** Offline, CI runs this on small random checkpoints. A model whose float
perplexity is no better than a tenth of a uniform guess over its vocabulary is labeled
"random weights" in every row, the table and the figure: its numbers say nothing about
SmoothQuant, only that the pipeline runs.

The default family needs the Hugging Face hub (about 22 GB of float16 checkpoints for
125m ... 6.7b) and many hours of CPU time; ``--eval-tokens`` and ``--lambada-samples`` trade
precision for time.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from .. import __version__
from ..eval import data as datasets
from ..calibrate import calibrate
from ..errors import MinisqError
from ..eval.evaluate import LAMBADA_METRICS, lambada_accuracy, perplexity
from ..qlinear import quantize
from ..smooth import smooth

DEFAULT_MODELS = ("facebook/opt-125m", "facebook/opt-350m", "facebook/opt-1.3b",
                  "facebook/opt-2.7b", "facebook/opt-6.7b")

# variant -> (row label, smoothed first?, quantization preset or None for float)
VARIANTS = {
    "fp32": ("FP32 (CPU; paper: FP16)", False, None),
    "naive": ("W8A8 naive", False, "naive"),
    "O1": ("SmoothQuant-O1", True, "O1"),
    "O2": ("SmoothQuant-O2", True, "O2"),
    "O3": ("SmoothQuant-O3", True, "O3"),
}
# The three lines of the emergence figure: (variant, colour).
FIGURE_LINES = (("fp32", "black"), ("naive", "tab:red"), ("O3", "tab:blue"))
FIGURE_LABELS = {"fp32": "FP32 on CPU", "naive": "W8A8 naive", "O3": "SmoothQuant-O3"}
# How the paper's rows are named (its baseline is FP16 on a GPU).
PAPER_LABELS = {"fp32": "FP16", "naive": "W8A8 naive", "O1": "SmoothQuant-O1", "O2": "SmoothQuant-O2",
                "O3": "SmoothQuant-O3"}

# A model's float perplexity above this fraction of its vocabulary size (a uniform guess
# scores exactly V) marks it as random weights. Trained GPT-2/OPT models score 10-40.
RANDOM_PPL_FRACTION = 0.1
RANDOM_LABEL = "random weights"

# Peak memory of an eager run, in float32 model sizes: the model, its smoothed copy, and one
# quantized variant (int8 weights, a quarter) with activations.
EAGER_PEAK_FACTOR = 2.5

# ------------------------------------------------------------------ the paper's numbers
#
# Only numbers read in a source are here; every other cell of the table stays blank.
# LAMBADA as a fraction, WikiText as perplexity; None = not published.
#
# [T3], [T5]: Xiao et al., "SmoothQuant", arXiv 2211.10438 (ICML 2023), read from the arXiv
#   HTML rendering https://ar5iv.labs.arxiv.org/html/2211.10438: Table 3 (OPT-175B, its
#   LAMBADA and WikiText columns; numbered Table 4 in some versions of the paper) and Table 5
#   (OPT-IML-30B). Protocol: lm-eval-harness, zero-shot, LAMBADA last-word accuracy; the
#   WikiText perplexity is lm-eval-harness's, not the windowed token perplexity minisq
#   computes, so compare its *relative* change, as the paper itself says ("we focus on the
#   relative performance change"). The paper's "W8A8" row is per-tensor weights, per-tensor
#   dynamic activations: minisq's "naive" preset.
# [NB]: the official repo's examples/smoothquant_opt_demo.ipynb (github.com/mit-han-lab/
#   smoothquant), printed outputs for OPT-13B: a different protocol, last-*token* accuracy
#   on the first 1000 passages of LAMBADA's *validation* split (the notebook's own words:
#   "simplified", "for demonstration purposes"); its SmoothQuant model is α=0.5 with
#   per-tensor dynamic W8A8 = O2 (BMM inputs quantized too).
# The paper's Figure 7 (accuracy of OPT 1.3B ... 175B, FP16 / LLM.int8() / SmoothQuant-O3)
# is a plot whose values are not printed anywhere we found, and the official README gives no
# OPT numbers: the default family 125m ... 6.7b therefore has no published numbers here.
PAPER = {
    "opt-175b": dict(params=175e9, source="[T3]", results={
        "fp32": (0.747, 10.99), "naive": (0.000, 93080.0), "O1": (0.747, 11.11),
        "O2": (0.750, 11.14), "O3": (0.746, 11.17)}),
    "opt-iml-30b": dict(params=30e9, source="[T5]", results={
        "fp32": (0.6912, 14.26), "naive": (0.0421, 576.53), "O3": (0.6977, 14.37)}),
    "opt-13b": dict(params=13e9, source="[NB]", results={
        "fp32": (0.786, None), "naive": (0.048, None), "O2": (0.793, None)}),
}
PAPER_SOURCES = {
    "[T3]": "SmoothQuant (arXiv 2211.10438), Table 3, OPT-175B; lm-eval-harness zero-shot",
    "[T5]": "SmoothQuant (arXiv 2211.10438), Table 5, OPT-IML-30B; lm-eval-harness zero-shot",
    "[NB]": ("mit-han-lab/smoothquant examples/smoothquant_opt_demo.ipynb, OPT-13B: last-token accuracy "
             "on the first 1000 LAMBADA validation passages (not the paper's protocol)"),
}


def paper_entry(model_id: str) -> dict | None:
    """The published numbers for a model id or folder, by its last path component
    ("facebook/opt-175b" and "./opt-175b" both give ``PAPER["opt-175b"]``)."""
    return PAPER.get(Path(str(model_id).rstrip("/")).name.lower())


class MemoryLimitError(MinisqError):
    """A model's float32 weights would not fit in the memory available, and it cannot be
    loaded lazily."""


# ------------------------------------------------------------------ settings and the cache


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything besides the model and the variant that changes a number."""

    alpha: float
    calib_samples: int
    calib_len: int
    eval_tokens: int
    seq_len: int
    lambada_samples: int
    metric: str
    attn_bmm: bool
    seed: int
    minisq_version: str = __version__


def model_key(source: str) -> str:
    """How a model is named in the cache: an existing folder by its absolute path, else
    the hub id as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.is_dir() else str(source)


# Settings a variant's number does not depend on, left out of its key: the float and the
# naive rows are not recomputed when only α or the calibration set changes.
UNUSED_SETTINGS = {
    "fp32": {"alpha", "calib_samples", "calib_len", "seed", "attn_bmm"},
    "naive": {"alpha", "calib_samples", "calib_len", "seed"},
}


def cache_key(model: str, variant: str, settings: Settings) -> dict:
    """What one cached number depends on: the model, the variant and its settings."""
    used = {k: v for k, v in dataclasses.asdict(settings).items() if k not in UNUSED_SETTINGS.get(variant, ())}
    return {"model": model, "variant": variant, **used}


def cache_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", Path(key["model"]).name or key["model"])[:60]
    return cache_dir / f"{slug}__{key['variant']}__{digest}.json"


def read_cached(path: Path, key: dict) -> dict | None:
    """The cached result for ``key``, or None when absent; an unreadable file or one made
    with other settings is ignored (and recomputed), with a line saying so."""
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        if entry.get("key") == key and isinstance(entry.get("result"), dict):
            return entry["result"]
    except (OSError, ValueError):
        pass
    say(f"! ignoring {path.name}: not a finished result of these settings; recomputing it")
    return None


def write_cached(path: Path, key: dict, result: dict) -> None:
    """Written whole or not at all: a temp file in the same folder, then an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "result": result}, indent=1, allow_nan=True))
    os.replace(tmp, path)


# ------------------------------------------------------------------ loading


def say(msg: str = "") -> None:
    print(msg, flush=True)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_STORAGE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def float32_bytes(folder: Path) -> int:
    """Estimated bytes of a checkpoint's weights as float32: its weight files' size scaled
    by 4 / the stored element size (config.json's ``torch_dtype``; float32 when absent)."""
    files = [p for pattern in ("*.safetensors", "*.bin", "*.npz", "*.npy") for p in folder.glob(pattern)]
    stored = sum(p.stat().st_size for p in files)
    try:
        dtype = json.loads((folder / "config.json").read_text()).get("torch_dtype") or "float32"
    except (OSError, ValueError):
        dtype = "float32"
    return stored * 4 // _STORAGE_BYTES.get(str(dtype), 4)


def load_accepts_lazy() -> bool:
    """Whether this minisq's ``load`` takes ``lazy=`` (memory-mapped, layer-at-a-time models)."""
    from ..io.loading import load

    return "lazy" in inspect.signature(load).parameters


def load_model(source: str):
    """``(model, folder, lazy)`` for a hub id or folder: eager when its float32 weights fit in the
    available memory (with the headroom of :data:`EAGER_PEAK_FACTOR`), else lazy when
    ``minisq.load`` can, else :class:`MemoryLimitError`."""
    from ..io.hub import resolve_model_dir
    from ..io.loading import load

    folder = resolve_model_dir(source)
    need = int(float32_bytes(folder) * EAGER_PEAK_FACTOR)
    avail = available_memory()
    if avail is None or need <= avail:
        return load(folder), folder, False
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    if not load_accepts_lazy():
        raise MemoryLimitError(
            f"{source}: an eager run needs about {gib(need)} ({EAGER_PEAK_FACTOR}x its float32 weights: "
            f"the model, its smoothed copy and one quantized variant), but only {gib(avail)} is "
            "available, and this minisq's load() has no lazy=True to stream it layer by layer. "
            "Free memory, use a machine with more, or leave this model out of --models.")
    say(f"  {source}: float32 needs about {gib(need)} with headroom, {gib(avail)} available: "
        "loading it lazily (memory-mapped, one layer at a time; slower, through the page cache)")
    return load(folder, lazy=True), folder, True


def parameter_count(model) -> int:
    """Number of distinct weights in the parameter tree (a tied LM head counted once).

    Any array-like leaf with a ``shape`` counts; NumPy arrays (and memory maps) that start
    at the same address with the same sizes — the LM head as a transposed view of the
    embedding — count once."""
    seen, total = set(), 0

    def visit(node):
        nonlocal total
        if isinstance(node, dict):
            for v in node.values():
                visit(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                visit(v)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for f in dataclasses.fields(node):
                visit(getattr(node, f.name))
        elif hasattr(node, "shape") and hasattr(node, "dtype"):
            key = ((node.__array_interface__["data"][0], tuple(sorted(node.shape)))
                   if isinstance(node, np.ndarray) else id(node))
            if key not in seen:
                seen.add(key)
                total += int(np.prod(node.shape))

    visit(model.params)
    return total


# ------------------------------------------------------------------ data


@dataclasses.dataclass
class EvalData:
    """One model's evaluation data, in its tokenizer's ids."""

    calib: list          # calibration sequences, int64 [T] each
    eval_ids: np.ndarray  # WikiText-2 test tokens [N] int64
    passages: list       # LAMBADA passages (text)
    seq_len: int         # perplexity window
    calib_split: str     # the WikiText-2 split the calibration paragraphs come from


def head_tokens(tokenizer, text: str, n: int) -> np.ndarray:
    """The first ``n`` tokens of ``text`` without tokenizing all of it: a prefix that gives
    at least 64 tokens more than ``n`` is tokenized, so the cut falls far from the tokens kept
    (BPE words are split locally)."""
    chars = 8 * n + 1024
    while True:
        ids = tokenizer.encode(text[:chars])
        if len(ids) >= n + 64 or chars >= len(text):
            return np.asarray(ids[:n], np.int64)
        chars *= 2


def load_data(model, settings: Settings, data_dir) -> EvalData:
    tok = model.tokenizer
    if tok is None:
        raise MinisqError(f"{model.config.name or 'this model'} has no tokenizer files (vocab.json + merges.txt "
                          "or tokenizer.json) in its folder; reproduce evaluates text and needs them")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        texts = datasets.calibration_texts(n=settings.calib_samples, data_dir=data_dir, seed=settings.seed)
    if caught:
        say("  ! calibrating on WikiText-2 *test* paragraphs (the train split was not found): "
            "perplexity then sees text the scales were calibrated on")
    calib = [np.asarray(tok.encode(t), np.int64)[: min(settings.calib_len, model.config.max_positions)]
             for t in texts]
    seq_len = min(settings.seq_len, model.config.max_positions)
    eval_ids = head_tokens(tok, datasets.wikitext2("test", data_dir), max(settings.eval_tokens, seq_len))
    passages = datasets.lambada(data_dir)[: settings.lambada_samples] if settings.lambada_samples else []
    return EvalData(calib, eval_ids, passages, seq_len, "test" if caught else "train")


# ------------------------------------------------------------------ one model


def smoothing_groups(model) -> tuple:
    from .demo import smoothing_groups as groups  # the demo's rule: in-block rows for post-LN OPT

    return groups(model)


class Variants:
    """Builds each variant of one float model on demand; the smoothed model and both
    calibrations are computed once, and only if a SmoothQuant variant is asked for.

    A lazy (memory-mapped) model is not smoothed or quantized in memory: its W8A8 variants
    are written layer by layer by :func:`minisq.quantize_checkpoint` (resumable) into
    ``work`` and loaded from there (int8 weights: about a quarter of the float32 size).
    """

    def __init__(self, model, folder, data: EvalData, settings: Settings, progress: bool):
        self.model, self.folder, self.data, self.settings, self.progress = model, folder, data, settings, progress
        self._smoothed = None

    def smoothed(self):
        if self._smoothed is None:
            t0 = time.perf_counter()
            stats = calibrate(self.model, self.data.calib, progress=self.progress)
            sm = smooth(self.model, stats, alpha=self.settings.alpha, groups=smoothing_groups(self.model))
            s_stats = calibrate(sm, self.data.calib, progress=self.progress)
            self._smoothed = (sm, s_stats)
            say(f"  calibrated, smoothed (α={self.settings.alpha}) and recalibrated on "
                f"{len(self.data.calib)} sequences in {time.perf_counter() - t0:.1f} s")
        return self._smoothed

    def build(self, variant: str, work: Path):
        _, smoothed, preset = VARIANTS[variant]
        if preset is None:
            return self.model
        if self.model.lazy:
            return self.streamed(variant, work)
        base, stats = self.smoothed() if smoothed else (self.model, None)
        return quantize(base, preset, stats=stats if preset == "O3" else None, attn_bmm=self.settings.attn_bmm)

    def streamed(self, variant: str, work: Path):
        """The variant written by quantize_checkpoint into ``work`` (or found finished there)."""
        from ..io.loading import load
        from ..pipeline import RUN_FILE, quantize_checkpoint

        _, smoothed, preset = VARIANTS[variant]
        run_file = work / RUN_FILE
        finished = run_file.is_file() and json.loads(run_file.read_text()).get("finished") is True
        if not finished:
            t0 = time.perf_counter()
            quantize_checkpoint(self.folder, work, self.data.calib, preset=preset, alpha=self.settings.alpha,
                                smooth=smoothed, groups=smoothing_groups(self.model),
                                attn_bmm=self.settings.attn_bmm, progress=self.progress)
            say(f"  streamed {VARIANTS[variant][0]} layer by layer into {work} in {time.perf_counter() - t0:.1f} s")
        return load(work)


def evaluate_variant(model, data: EvalData, settings: Settings, progress: bool = False) -> dict:
    """WikiText-2 perplexity and LAMBADA accuracy of one model variant (the unit cached)."""
    t0 = time.perf_counter()
    ppl = perplexity(model, data.eval_ids, seq_len=data.seq_len, progress=progress)
    acc = (lambada_accuracy(model, data.passages, progress=progress, metric=settings.metric)
           if data.passages else None)
    return dict(perplexity=ppl, lambada_acc=acc, seconds=time.perf_counter() - t0)


def run_model(source: str, index: str, settings: Settings, variants: list, cache_dir: Path,
              data_dir, progress: bool) -> list:
    """Every asked-for variant of one model, from the cache or computed; returns result rows."""
    key_model = model_key(source)
    keys = {v: cache_key(key_model, v, settings) for v in variants}
    rows, todo = {}, []
    for v in variants:
        hit = read_cached(cache_path(cache_dir, keys[v]), keys[v])
        if hit is None:
            todo.append(v)
        else:
            rows[v] = hit
            say(f"{index} {VARIANTS[v][0]:<24} {_summary(hit)}  (cached)")
    if todo:
        t0 = time.perf_counter()
        model, folder, lazy = load_model(source)
        info = dict(params=parameter_count(model), vocab_size=model.config.vocab_size,
                    model_type=model.config.model_type, lazy=lazy,
                    synthetic=model.config.is_synthetic)
        say(f"{index} loaded {model} ({info['params'] / 1e6:.1f}M parameters) in {time.perf_counter() - t0:.1f} s")
        data = load_data(model, settings, data_dir)
        say(f"  data: {len(data.eval_ids)} WikiText-2 test tokens in windows of {data.seq_len}, "
            f"{len(data.passages)} LAMBADA passages, {len(data.calib)} calibration sequences")
        built = Variants(model, folder, data, settings, progress)
        for v in todo:
            work = cache_dir.parent / "models" / cache_path(cache_dir, keys[v]).stem  # lazy models only
            variant_model = built.build(v, work)
            result = {**evaluate_variant(variant_model, data, settings, progress), **info}
            if VARIANTS[v][1]:  # the smoothed (calibrated) variants say on what
                result["calib_split"] = data.calib_split
            del variant_model
            write_cached(cache_path(cache_dir, keys[v]), keys[v], result)
            if work.exists():  # the streamed checkpoint served its purpose once the number is cached
                shutil.rmtree(work)
            rows[v] = result
            say(f"{index} {VARIANTS[v][0]:<24} {_summary(result)}  ({result['seconds']:.1f} s)")
    return [dict(model=source, variant=v, **rows[v]) for v in variants]


def _summary(r: dict) -> str:
    acc = r.get("lambada_acc")
    return f"ppl {r['perplexity']:12.3f}" + (f"   LAMBADA {acc:6.1%}" if acc is not None else "")


def is_random(rows_of_model: list) -> bool:
    """True when the model's float perplexity is within 1/RANDOM_PPL_FRACTION of a uniform guess."""
    fp = next((r for r in rows_of_model if r["variant"] == "fp32"), None)
    return bool(fp is not None and fp["perplexity"] > RANDOM_PPL_FRACTION * fp["vocab_size"])


# ------------------------------------------------------------------ the table and the figure


def _fmt(x, kind: str) -> str:
    if x is None:
        return ""
    if kind == "acc":
        return f"{x:.1%}"
    return f"{x:.2f}" if math.isfinite(x) and x < 1e5 else f"{x:.3g}"


def _fmt_params(n) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_table(rows: list, settings: Settings) -> str:
    """The Markdown report: one row per model × variant, the paper's numbers beside minisq's."""
    by_model = _group(rows)
    lines = ["# SmoothQuant across model sizes: minisq vs the paper", ""]
    if any(is_random(rs) for rs in by_model.values()):
        lines += [f"**Rows marked \"{RANDOM_LABEL}\" come from untrained (random) checkpoints**: their float "
                  "perplexity is no better than guessing, and their numbers only show that the pipeline runs.", ""]
    lines += [
        "minisq's **FP32** row computes the checkpoint's weights in float32 on the CPU; the paper's baseline "
        "is FP16 on a GPU. W8A8 rows quantize the decoder layers' linears (and, with attention "
        f"quantization {'on' if settings.attn_bmm else 'off'}, the q/k/v outputs, as the official code does).",
        "",
        f"Settings: α = {settings.alpha}; {settings.calib_samples} WikiText-2 calibration paragraphs of ≤ "
        f"{settings.calib_len} tokens; {settings.eval_tokens} WikiText-2 test tokens in windows of ≤ "
        f"{settings.seq_len}; {settings.lambada_samples} LAMBADA passages, metric {settings.metric}; "
        f"seed {settings.seed}; minisq {settings.minisq_version}.",
        "",
    ]
    if any(r.get("calib_split") == "test" for r in rows):
        lines += ["**Calibrated on WikiText-2 *test* paragraphs** (the train split was not found): the "
                  "SmoothQuant rows' perplexity is measured on text their scales saw.", ""]
    lines += [
        "| model | parameters | variant | WikiText-2 ppl (minisq) | WikiText ppl (paper) "
        "| LAMBADA acc (minisq) | LAMBADA acc (paper) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for model, rs in by_model.items():
        name = model + (f" ({RANDOM_LABEL})" if is_random(rs) else "")
        paper = paper_entry(model)
        for r in rs:
            p_acc, p_ppl = (paper or {}).get("results", {}).get(r["variant"], (None, None))
            src = f" {paper['source']}" if paper and (p_acc is not None or p_ppl is not None) else ""
            lines.append(
                f"| {name} | {_fmt_params(r['params'])} | {VARIANTS[r['variant']][0]} "
                f"| {_fmt(r['perplexity'], 'ppl')} | {_fmt(p_ppl, 'ppl')}{src if p_ppl is not None else ''} "
                f"| {_fmt(r['lambada_acc'], 'acc')} | {_fmt(p_acc, 'acc')}{src if p_acc is not None else ''} |")
    lines += ["", "## The paper's published numbers (all that were found)", "",
              "| model | variant | LAMBADA acc | WikiText ppl | source |", "|---|---|---:|---:|---|"]
    for name, entry in PAPER.items():
        for v, (acc, ppl) in entry["results"].items():
            lines.append(f"| {name} | {PAPER_LABELS[v]} | {_fmt(acc, 'acc')} | {_fmt(ppl, 'ppl')} | {entry['source']} |")
    lines += [""] + [f"- {tag}: {text}" for tag, text in PAPER_SOURCES.items()]
    lines += ["- Blank cells: no published number was found. The paper's FP16 column is shown in the FP32 row.",
              "- The paper's WikiText perplexities come from lm-eval-harness and are not on minisq's scale; "
              "compare relative changes.", "", "![emergence](emergence.png)", ""]
    return "\n".join(lines)


def _group(rows: list) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r["model"], []).append(r)
    return out


def emergence_figure(rows: list, path: Path):
    """LAMBADA accuracy (left) and WikiText-2 perplexity (right) against parameters (log x):
    FP32, naive W8A8 and SmoothQuant-O3; minisq's points filled and joined, the published
    ones hollow and named."""
    from matplotlib.figure import Figure

    by_model = _group(rows)
    random = any(is_random(rs) for rs in by_model.values())
    fig = Figure(figsize=(11, 4.2))
    panels = (("lambada_acc", 0, "LAMBADA last-word accuracy", False),
              ("perplexity", 1, "WikiText-2 perplexity", True))
    for field, col, ylabel, logy in panels:
        ax = fig.add_subplot(1, 2, col + 1)
        named = set()  # each published model is named once per panel
        for variant, colour in FIGURE_LINES:
            pts = sorted((r["params"], r[field]) for rs in by_model.values() for r in rs
                         if r["variant"] == variant and r[field] is not None)
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, "o-", color=colour, label=f"{FIGURE_LABELS[variant]} (minisq)")
            # The paper's points come from different tables and protocols: hollow, each
            # named, and not joined into a line.
            first = True
            for name, e in PAPER.items():
                value = e["results"].get(variant, (None, None))[col]
                if value is None:
                    continue
                ax.plot([e["params"]], [value], "o", color=colour, markerfacecolor="none", markersize=8,
                        label=f"{PAPER_LABELS[variant]} (published)" if first else None)
                if name not in named:
                    named.add(name)
                    ax.annotate(f"{name} {e['source']}", (e["params"], value), textcoords="offset points",
                                xytext=(-6, 6), ha="right", fontsize=6)
                first = False
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    title = "SmoothQuant emergence: naive W8A8 vs SmoothQuant-O3 against model size"
    if random:
        title += f"\n(minisq points include {RANDOM_LABEL.upper()}: untrained checkpoints, not a result)"
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


# ------------------------------------------------------------------ the command


def parse_args(argv=None, prog: str = "minisq reproduce") -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog=prog, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
               "  minisq reproduce                     # OPT 125m ... 6.7b: hub downloads, hours on a CPU\n"
               "  minisq reproduce --models facebook/opt-125m gpt2 --eval-tokens 4096\n"
               "  minisq reproduce --models ./opt-a ./opt-b --out runs/opt   # local folders\n")
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                    help="GPT-2/OPT hub ids or local folders (default: the OPT family 125m ... 6.7b)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="which variants to run (default all; fp32 is always run, it is the baseline)")
    ap.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength α in [0, 1] (default 0.5)")
    ap.add_argument("--calib-samples", type=int, default=64, help="WikiText-2 calibration paragraphs (default 64)")
    ap.add_argument("--calib-len", type=int, default=512, help="tokens kept of each calibration paragraph (default 512)")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="WikiText-2 test tokens for perplexity (default 16384)")
    ap.add_argument("--seq-len", type=int, default=2048,
                    help="perplexity window, capped at each model's context (default 2048)")
    ap.add_argument("--lambada-samples", type=int, default=500, help="LAMBADA passages, 0 to skip (default 500)")
    ap.add_argument("--metric", choices=LAMBADA_METRICS, default="last_word",
                    help="LAMBADA rule: last_word (the paper's, lm-eval's) or last_token (default last_word)")
    ap.add_argument("--attn-bmm", choices=("on", "off"), default="on",
                    help="also quantize attention's q/k/v outputs, as the paper and official code do (default on)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration sample (default 0)")
    ap.add_argument("--data-dir", default=None,
                    help="folder with wikitext-2-raw/ and lambada/ (default $MINISQ_DATA_DIR, else download)")
    ap.add_argument("--out", default="minisq-reproduce", help="output folder; its cache/ makes reruns resume")
    ap.add_argument("--progress", action="store_true", help="progress bars inside each evaluation")
    args = ap.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        ap.error(f"--alpha must be in [0, 1], got {args.alpha}")
    for name in ("calib_samples", "calib_len", "eval_tokens", "seq_len"):
        if getattr(args, name) < 2:
            ap.error(f"--{name.replace('_', '-')} must be at least 2, got {getattr(args, name)}")
    if args.lambada_samples < 0:
        ap.error(f"--lambada-samples must be >= 0, got {args.lambada_samples}")
    if len(set(args.models)) != len(args.models):
        ap.error("--models lists a model twice")
    args.variants = ["fp32"] + [v for v in VARIANTS if v in args.variants and v != "fp32"]
    return args


def settings_of(args) -> Settings:
    return Settings(alpha=args.alpha, calib_samples=args.calib_samples, calib_len=args.calib_len,
                    eval_tokens=args.eval_tokens, seq_len=args.seq_len, lambada_samples=args.lambada_samples,
                    metric=args.metric, attn_bmm=args.attn_bmm == "on", seed=args.seed)


def run(args) -> list:
    out = Path(args.out)
    settings = settings_of(args)
    rows = []
    t0 = time.perf_counter()
    for i, source in enumerate(args.models, start=1):
        index = f"[{i}/{len(args.models)} {source}]"
        rows += run_model(source, index, settings, args.variants, out / "cache", args.data_dir, args.progress)
    for model, rs in _group(rows).items():
        if is_random(rs):
            say(f"! {model}: float perplexity {rs[0]['perplexity']:.0f} over a vocabulary of {rs[0]['vocab_size']}: "
                f"{RANDOM_LABEL.upper()}, labeled so in the table and the figure")
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows, settings)
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps(
        dict(settings=dataclasses.asdict(settings), rows=rows,
             random_weights=[m for m, rs in _group(rows).items() if is_random(rs)]), indent=1))
    emergence_figure(rows, out / "emergence.png")
    say(f"wrote {out / 'table.md'}, {out / 'emergence.png'} and {out / 'results.json'} "
        f"({time.perf_counter() - t0:.1f} s)")
    return rows


def main(argv=None, prog: str = "minisq reproduce") -> int:
    args = parse_args(argv, prog)  # exits with status 2 on bad arguments
    try:
        run(args)
    except MinisqError as exc:
        print(f"minisq reproduce: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
