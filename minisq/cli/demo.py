"""``python -m minisq.demo``: the SmoothQuant story on one model, in one command.

Loads a model (default ``gpt2``; any GPT-2/OPT/Llama-family hub id or local folder, or ``synthetic``),
calibrates it on WikiText-2 text, smooths it, and evaluates the float model against W8A8
variants with and without smoothing. Prints one table (perplexity, KL to the float model,
LAMBADA accuracy, weight memory, time), writes figures and a JSON/Markdown report to
``--out``, and ends with generated text from the float and the SmoothQuant W8A8 model side
by side.

Offline, or when the default model cannot be downloaded, it falls back to the labeled
synthetic-outlier model (random weights with planted outlier channels, GPT-2's vocabulary),
which decodes its text with the GPT-2 tokenizer files shipped in ``minisq/assets/gpt2``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from ..eval import data as datasets
from ..eval import plots
from ..calibrate import calibrate
from ..backend import to_numpy
from ..diagnostics import layer_errors, logit_error
from ..config import ModelConfig
from ..errors import DataError, MinisqError
from ..eval.evaluate import lambada_accuracy, perplexity
from ..io.loading import load
from ..baselines import BASELINES, largest_group_size
from ..progress import progress
from ..qlinear import DEFAULT_SKIP, PRESETS, quantize, weight_memory
from ..smooth import smooth
from ..synthetic import SYNTHETIC_LABEL, synthetic_model
from ..io.tokenizer import packaged_gpt2_tokenizer

DEFAULT_MODEL = "gpt2"
# --quick on the synthetic model: a small GPT-2 with GPT-2's vocabulary (so real text works)
QUICK_SYNTHETIC = ModelConfig(hidden_size=256, num_layers=4, num_heads=4, ffn_dim=1024)
PROMPT = "The capital of France is"
# --quick on the synthetic model: perplexity windows of 64 tokens, so that its eval and
# calibration text (sampled token by token from the float model) takes 63 decoding steps
QUICK_SYNTHETIC_SEQ_LEN = 64

DESCRIPTION = """\
The SmoothQuant story on one model, in one command. Loads a model (default gpt2; any
GPT-2/OPT hub id or local folder, or 'synthetic'), calibrates it on WikiText-2 text, smooths
it, and evaluates the float model against W8A8 variants with and without smoothing. Prints
one table, writes figures and a JSON/Markdown report to --out, and ends with text generated
by the float and the SmoothQuant W8A8 model side by side.

Offline, or when the default model cannot be downloaded, it falls back to a labeled SYNTHETIC
model (random weights with planted outlier channels, GPT-2's vocabulary and tokenizer): its
perplexities are measured on text sampled from its own float model, and only the differences
between variants mean anything."""

EPILOG = """\
The table's columns:
  perplexity   exp(mean next-token NLL) on the eval tokens (lower is better)
  KL to FP     mean KL(p_float || p_variant) of the next-token distributions over the
               first eval window: how far each variant is from the float model (0 = same)
  LAMBADA      last-word accuracy (real models only)
  weights MiB  bytes the weights are stored in / 2^20 (int8 weights + scales; lm_head stays float)
  KV B/tok     bytes the KV cache holds per token of one sequence
  time s       seconds to evaluate the variant

Big models: when the float32 weights would not fit in the available memory (or with --lazy)
the model is loaded memory-mapped, the float rows run layer by layer, and each SmoothQuant
variant is written layer by layer (minisq.quantize_checkpoint), loaded as int8 and removed.

Examples:
  python -m minisq.demo                              # GPT-2 small (downloads ~500 MB once)
  python -m minisq.demo --model facebook/opt-125m --alpha 0.5
  python -m minisq.demo --model synthetic --quick    # offline (see README.md for measured times)
  python -m minisq.demo --model ./my-gpt2-folder --device gpu
  python -m minisq.demo --model facebook/opt-6.7b    # bigger than memory: streamed, layer by layer
"""


def parse_args(argv=None, prog: str = "minisq demo") -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG)
    ap.add_argument("--model", default=None,
                    help=f"hub id (gpt2, gpt2-medium, facebook/opt-125m, HuggingFaceTB/SmolLM-135M, ...), a local HF folder, or 'synthetic' "
                         f"(default: {DEFAULT_MODEL}; falls back to synthetic when it cannot be downloaded)")
    ap.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength α in [0, 1] (default 0.5)")
    ap.add_argument("--calib-samples", type=int, default=None,
                    help="number of WikiText-2 paragraphs to calibrate on (default 64; --quick 8)")
    ap.add_argument("--eval-tokens", type=int, default=None,
                    help="WikiText-2 test tokens for perplexity (default 4096; --quick 512)")
    ap.add_argument("--lambada-samples", type=int, default=None,
                    help="LAMBADA passages to score, 0 to skip (default 100; --quick 16)")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="perplexity window length (default: the model's context, at most 1024; 256 with --quick "
                         f"or the synthetic model; {QUICK_SYNTHETIC_SEQ_LEN} with both)")
    ap.add_argument("--alphas", default="0,0.25,0.5,0.75,1",
                    help="comma-separated α values for the α-sweep figure (SmoothQuant-O2 perplexity on the "
                         "table's eval tokens), '' to skip (default 0,0.25,0.5,0.75,1)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="run on the CPU (NumPy) or GPU (CuPy)")
    ap.add_argument("--out", default="minisq-out", help="folder for figures and the report (default ./minisq-out)")
    ap.add_argument("--data-dir", default=None,
                    help="folder with wikitext-2-raw/ and lambada/ (default $MINISQ_DATA_DIR, else download)")
    ap.add_argument("--quick", action="store_true", help="a small, fast run (smaller synthetic model, fewer tokens)")
    ap.add_argument("--lazy", action="store_true",
                    help="load the model memory-mapped and run the streamed path (automatic when its float32 "
                         "weights would not fit in the available memory; see 'Big models' above)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the synthetic model and sampling")
    args = ap.parse_args(argv)
    defaults = dict(calib_samples=(8, 64), eval_tokens=(512, 4096), lambada_samples=(16, 100))
    for key, (quick, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if not 0.0 <= args.alpha <= 1.0:
        ap.error(f"--alpha must be in [0, 1], got {args.alpha}")
    return args


def say(msg: str = "") -> None:
    print(msg, flush=True)


def banner(text: str) -> None:
    line = "=" * min(100, max(60, len(text) + 4))
    say(line)
    say(f"  {text}")
    say(line)


# --- loading -------------------------------------------------------------------------------

def load_model(args):
    """(model, note): the asked-for model, or the synthetic one with a note saying why."""
    name = args.model or DEFAULT_MODEL
    if name != "synthetic":
        try:
            if args.lazy or _too_big(name):
                return load(name, lazy=True), None
            return load(name, device=args.device), None
        except MinisqError as exc:
            if args.model is not None:  # the user named this model: do not silently swap it
                raise
            note = f"could not load the default model {name!r} ({str(exc).splitlines()[0][:200]})"
    else:
        note = "asked for with --model synthetic"
    cfg = QUICK_SYNTHETIC if args.quick else ModelConfig()
    model = synthetic_model(cfg, outlier_scale=60.0, n_outliers=6, seed=args.seed,
                            tokenizer=packaged_gpt2_tokenizer())   # GPT-2's vocabulary: decodes offline
    return model.to(args.device), note


def _too_big(name: str) -> bool:
    """Whether the float32 model, a smoothed copy and one W8A8 variant (2.5x the float32
    weights) would not fit in the available memory; says so when it loads lazily."""
    from ..io.hub import resolve_model_dir
    from .reproduce import available_memory, float32_bytes

    need, avail = float32_bytes(resolve_model_dir(name)), available_memory()
    if avail is None or 2.5 * need <= avail:
        return False
    say(f"the float32 weights of {name} take {need / 2**30:.1f} GiB and {avail / 2**30:.1f} GiB are available: "
        "loading it lazily (memory-mapped) and quantizing it layer by layer (minisq.quantize_checkpoint)")
    return True


# --- data ----------------------------------------------------------------------------------

def load_texts(args, model, seq_len: int):
    """Calibration batches, eval tokens and LAMBADA passages, with a line saying what they are."""
    if model.config.is_synthetic:
        return synthetic_texts(args, model, seq_len)
    calib, eval_ids = None, None
    try:
        if model.tokenizer is None:
            raise DataError("the model folder has no tokenizer files")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            texts = datasets.calibration_texts(n=args.calib_samples, data_dir=args.data_dir, seed=args.seed)
        if caught:
            say("! calibrating on the WikiText-2 test split (the train split was not found); "
                "perplexity then sees text it was calibrated on")
        calib = [np.asarray(model.tokenizer.encode(t), np.int64)[:min(model.config.max_positions, 512)]
                 for t in texts]
        eval_ids = np.asarray(model.tokenizer.encode(datasets.wikitext2("test", args.data_dir)), np.int64)
    except DataError as exc:
        raise DataError(f"the demo needs WikiText-2 text for {model.config.name}: {exc}") from None
    passages = []
    if args.lambada_samples:
        try:
            passages = datasets.lambada(args.data_dir)[: args.lambada_samples]
        except DataError as exc:
            say(f"! LAMBADA skipped: {str(exc).splitlines()[0][:160]}")
    return calib, eval_ids, passages, "WikiText-2 raw test (perplexity), WikiText-2 paragraphs (calibration)"


def synthetic_texts(args, model, seq_len: int):
    """For the synthetic model, real text is noise: its perplexity on WikiText-2 is
    astronomically high whatever the quantization. Instead it is evaluated on token streams
    SAMPLED FROM THE FLOAT MODEL ITSELF (temperature 1), on which the float model has a low
    perplexity and every quantization error shows. Calibration uses other samples.

    Each decoding step reads every weight (lm_head alone is V·C floats) whatever the number
    of rows, so the rows are sampled side by side: eval rows of ``seq_len`` and calibration
    rows of ``min(seq_len, 128)`` in one batch when their lengths agree (``--quick``)."""
    n_eval = max(1, -(-args.eval_tokens // seq_len))
    calib_len = min(seq_len, 128)
    t0 = time.perf_counter()
    say(f"sampling SYNTHETIC text from the float model: {n_eval} eval rows of {seq_len} tokens and "
        f"{args.calib_samples} calibration rows of {calib_len} (LAMBADA skipped: meaningless for random weights)")
    if calib_len == seq_len:
        rows = sample_streams(model, n_eval + args.calib_samples, seq_len, seed=args.seed + 1)
        eval_rows, calib_rows = rows[:n_eval], rows[n_eval:]
    else:
        eval_rows = sample_streams(model, n_eval, seq_len, seed=args.seed + 1)
        calib_rows = sample_streams(model, args.calib_samples, calib_len, seed=args.seed + 2)
    say(f"sampled {eval_rows.size + calib_rows.size} SYNTHETIC tokens in {time.perf_counter() - t0:.1f} s")
    return list(calib_rows), eval_rows.reshape(-1), [], "SYNTHETIC token streams sampled from the float model"


def sample_streams(model, rows: int, length: int, seed: int) -> np.ndarray:
    """``rows`` token streams of ``length`` sampled from ``model`` at temperature 1, with the KV
    cache and a progress bar over the decoding steps (``model.generate_ids`` shows none).

    Sampling is Gumbel-max: ``argmax(logits + Gumbel noise)`` is an exact draw from
    ``softmax(logits)``. Holds one step's logits ``[rows, V]`` and the KV cache.
    """
    # -> [rows, length] int64
    from ..model import KVCache

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.config.vocab_size, (rows, 1))                  # [B, 1] random first tokens
    cache = KVCache(model.config.num_layers, reserve=length)
    logits, cache = model.forward(ids, cache=cache)                             # [B, 1, V]
    out = [ids]
    for _ in progress(range(length - 1), True, "sampling"):
        z = to_numpy(logits[:, -1]).astype(np.float64)                          # [B, V]
        nxt = (z + rng.gumbel(size=z.shape)).argmax(axis=-1)[:, None]           # [B, 1]
        out.append(nxt)
        if len(out) < length:
            logits, cache = model.forward(nxt, cache=cache)
    return np.concatenate(out, axis=1)


# --- the run -------------------------------------------------------------------------------

VARIANTS = (  # (row label, smoothed?, preset or None for float)
    ("FP32 (float)", False, None),
    ("W8A8 naive (= O2 without smoothing)", False, "naive"),
    ("W8A8 O1 without smoothing", False, "O1"),
    ("W8A8 O3 without smoothing", False, "O3"),
    ("SmoothQuant-O1", True, "O1"),
    ("SmoothQuant-O2", True, "O2"),
    ("SmoothQuant-O3", True, "O3"),
    # the paper's baselines (Tables 1 and 4, minisq.baselines), and an int8 KV cache; an
    # optional 4th entry holds quantize() options
    ("W8A8 per-channel acts (fake, no GEMM)", False, "custom", dict(acts="per_channel", path="fake")),
    ("W8A16 (weight-only INT8)", False, "w8a16"),
    ("ZeroQuant (group W, per-token A)", False, "zeroquant"),
    ("LLM.int8() (threshold 6)", False, "llm.int8"),
    ("SmoothQuant-O3 + INT8 KV cache", True, "O3", dict(kv_cache="int8")),
)


def smoothing_groups(model) -> tuple:
    """The official code's LayerNorm mappings; for post-LN OPT (opt-350m), where folding into
    a LayerNorm is not an equivalence, the two in-block mappings instead."""
    return model.family.default_groups(model.config)


def evaluate(model, eval_ids, passages, seq_len):
    t0 = time.perf_counter()
    ppl = perplexity(model, eval_ids, seq_len=seq_len, progress=True)
    acc = lambada_accuracy(model, passages, progress=True) if passages else None
    return ppl, acc, time.perf_counter() - t0


def kl_to_float(fp_logits, model, window) -> float:
    """Mean KL(p_float || p_variant) over the tokens of one window: how far from float."""
    return logit_error(fp_logits, to_numpy(model(window)))["kl"]


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, note = load_model(args)
    name = model.config.name or args.model
    if model.config.is_synthetic:
        banner(f"{SYNTHETIC_LABEL}: {name}")
        say(f"  ({note}). Random weights: perplexities are meaningless in absolute terms;")
        say("  what matters is how far each W8A8 variant is from the float model.")
    else:
        banner(f"minisq SmoothQuant demo: {name}")
    say(f"{model}")
    # Windows of 1024 on real models; 256 on the synthetic one, whose eval text is sampled
    # token by token from the float model (shorter windows sample in parallel); 64 for both.
    short = args.quick or model.config.is_synthetic
    default = QUICK_SYNTHETIC_SEQ_LEN if args.quick and model.config.is_synthetic else 256 if short else 1024
    seq_len = args.seq_len or min(model.config.max_positions, default)
    calib, eval_ids, passages, source = load_texts(args, model, seq_len)
    eval_ids = eval_ids[: max(args.eval_tokens, seq_len)]
    say(f"data: {source}; {len(calib)} calibration sequences, {len(eval_ids)} eval tokens "
        f"(windows of {seq_len}), {len(passages)} LAMBADA passages")

    if model.lazy:
        return run_streamed(args, model, name, note, calib, eval_ids, passages, source, seq_len, out)
    t0 = time.perf_counter()
    stats = calibrate(model, calib, keep_samples=256)
    groups = smoothing_groups(model)
    smoothed = smooth(model, stats, alpha=args.alpha, groups=groups)
    s_stats = calibrate(smoothed, calib, keep_samples=256)
    say(f"calibrated and smoothed (α={args.alpha}) in {time.perf_counter() - t0:.1f} s")

    rows = []
    window = eval_ids[None, :seq_len]
    fp_logits = to_numpy(model(window))
    for label, use_smoothed, preset, *options in VARIANTS:
        base, st = (smoothed, s_stats) if use_smoothed else (model, stats)
        opts = dict(options[0]) if options else {}
        if preset == "zeroquant":  # ZeroQuant's 128, or the largest power of two dividing every C_in
            opts["group_size"] = largest_group_size(base, 128, skip=DEFAULT_SKIP)
        m = base if preset is None else quantize(base, None if preset == "custom" else preset, stats=st, **opts)
        ppl, acc, secs = evaluate(m, eval_ids, passages, seq_len)
        kl = kl_to_float(fp_logits, m, window)
        mem = weight_memory(m)
        cfg = {**PRESETS, **BASELINES}.get(preset, dict(weights="per_channel", acts="per_token"))
        rows.append(dict(variant=label, smoothed=use_smoothed, preset=preset or "float",
                         weights=opts.get("weights", cfg["weights"]) if preset else "fp32",
                         acts=opts.get("acts", cfg["acts"]) if preset else "fp32",
                         perplexity=ppl, kl_to_fp=kl, lambada_acc=acc,
                         weight_mib=mem["stored_bytes"] / 2**20, seconds=secs,
                         kv_bytes_per_token=m.kv_cache_bytes_per_token(), options=opts))
        say(f"  {label:<38} ppl {ppl:10.3f}   KL to FP {kl:.2e}"
            + (f"   LAMBADA {acc:6.1%}" if acc is not None else "") + f"   ({secs:.1f} s)")

    figures, sweep = make_figures(args, model, smoothed, stats, s_stats, eval_ids, seq_len, out, name, rows)
    plots.landscape(rows, title="the paper's comparison: KL to float", model_name=name,
                    path=out / "landscape.png")
    figures.append("landscape.png")
    text = side_by_side(model, quantize(smoothed, "O3", stats=s_stats))
    report = dict(model=name, synthetic=model.config.is_synthetic, note=note, alpha=args.alpha,
                  data=source, eval_tokens=int(len(eval_ids)), seq_len=seq_len,
                  lambada_passages=len(passages), calib_sequences=len(calib), device=args.device,
                  rows=rows, figures=figures, alpha_sweep=sweep, generation=text)
    return finish(out, report, model)


# The rows a lazy (memory-mapped) model gets: each W8A8 variant is written layer by layer by
# quantize_checkpoint, loaded (int8 weights fit where float32 ones do not), evaluated, removed.
STREAMED_VARIANTS = (  # (row label, smoothed?, preset)
    ("W8A8 naive (= O2 without smoothing)", False, "naive"),
    ("SmoothQuant-O1", True, "O1"),
    ("SmoothQuant-O2", True, "O2"),
    ("SmoothQuant-O3", True, "O3"),
)


def run_streamed(args, model, name, note, calib, eval_ids, passages, source, seq_len, out: Path) -> dict:
    """The demo for a model bigger than memory: float rows evaluated layer by layer, each W8A8
    variant made by :func:`minisq.quantize_checkpoint` into ``out/models`` and removed after
    its row. The figures that need whole float models in memory (activations, per-layer SQNR,
    α sweep, the baselines) are left out, with a line saying so."""
    import shutil

    from ..io.hub import resolve_model_dir
    from ..pipeline import quantize_checkpoint

    folder = resolve_model_dir(model.info.get("source", args.model))
    say("lazy model: rows are the float model and SmoothQuant's presets (each W8A8 model written layer by "
        "layer, then loaded as int8); the figures and baselines that need whole float models in memory "
        "are skipped")
    window = eval_ids[None, :seq_len]
    fp_logits = to_numpy(model(window))
    rows = []

    def add_row(label, smoothed, preset, m):
        ppl, acc, secs = evaluate(m, eval_ids, passages, seq_len)
        kl = kl_to_float(fp_logits, m, window)
        cfg = PRESETS.get(preset, dict(weights="fp32", acts="fp32"))
        rows.append(dict(variant=label, smoothed=smoothed, preset=preset or "float", weights=cfg["weights"],
                         acts=cfg["acts"], perplexity=ppl, kl_to_fp=kl, lambada_acc=acc,
                         weight_mib=weight_memory(m)["stored_bytes"] / 2**20, seconds=secs,
                         kv_bytes_per_token=m.kv_cache_bytes_per_token(), options={}))
        say(f"  {label:<38} ppl {ppl:10.3f}   KL to FP {kl:.2e}"
            + (f"   LAMBADA {acc:6.1%}" if acc is not None else "") + f"   ({secs:.1f} s)")

    add_row("FP32 (float, layer by layer)", False, None, model)
    groups = smoothing_groups(model)
    o3 = None
    for label, smoothed, preset in STREAMED_VARIANTS:
        dst = out / "models" / f"{preset}{'-smoothed' if smoothed else ''}"
        if dst.exists():
            shutil.rmtree(dst)
        quantize_checkpoint(folder, dst, calib, preset=preset, alpha=args.alpha, smooth=smoothed, groups=groups)
        m = load(dst)
        add_row(label, smoothed, preset, m)
        if preset == "O3":
            o3 = m
        else:
            del m
        shutil.rmtree(dst)
    text = side_by_side(model, o3, max_new_tokens=8)
    figures = []
    plots.landscape(rows, title="KL to float", model_name=name, path=out / "landscape.png")
    figures.append("landscape.png")
    report = dict(model=name, synthetic=model.config.is_synthetic, note=note, alpha=args.alpha,
                  data=source, eval_tokens=int(len(eval_ids)), seq_len=seq_len, lazy=True,
                  lambada_passages=len(passages), calib_sequences=len(calib), device="cpu",
                  rows=rows, figures=figures, alpha_sweep=None, generation=text)
    return finish(out, report, model)


def finish(out: Path, report: dict, model) -> dict:
    """Print the table and the generated text, write report.md / report.json; the report."""
    table = format_table(report["rows"], report["model"], model.config.is_synthetic)
    say("")
    say(table)
    write_report(out, report, table)
    text = report["generation"]
    say("")
    say(f'Generated text, greedy, prompt {text["prompt"]!r}:')
    say(f'  FP32           : {text["float"]!r}')
    say(f'  SmoothQuant-O3 : {text["w8a8"]!r}')
    say("")
    say(f"Report: {out / 'report.md'} and {out / 'report.json'}; figures: {', '.join(report['figures'])}")
    return report


def make_figures(args, model, smoothed, stats, s_stats, eval_ids, seq_len, out: Path, name: str, rows) -> tuple:
    """Write the figures; returns their file names and the α sweep's numbers (or None).

    The α sweep is SmoothQuant-O2 perplexity on the table's own eval tokens and windows, so
    its float line and its point at ``--alpha`` are the table's FP32 and SmoothQuant-O2 rows.
    """
    layer = model.config.num_layers // 2
    qkv = model.family.QKV_OUTPUTS[0][0].format(i=layer)          # the leaf that gives q
    files = []
    alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    say("figures: activations, channel ranges, per-layer SQNR"
        + (f", α sweep ({len(alphas)} smoothed W8A8 models on {len(eval_ids)} eval tokens)" if alphas else ""))
    plots.activation_surfaces(stats.samples[qkv][:64], s_stats.samples[qkv][:64],
                              model.linears()[qkv].w, smoothed.linears()[qkv].w,
                              title=f"{qkv} input before/after smoothing (α={args.alpha})", model_name=name,
                              path=out / "activations.png")
    files.append("activations.png")
    planted = model.info.get("outlier_channels")   # the synthetic model's planted outliers: name them all
    plots.channel_max_bars(stats.channel_absmax[qkv], after=s_stats.channel_absmax[qkv], channels=planted,
                           top=6, title=f"per-channel max |x| into {qkv}", model_name=name,
                           path=out / "channel_max.png")
    files.append("channel_max.png")
    plots.layer_sqnr(layer_errors(model, stats, "naive"), layer_errors(smoothed, s_stats, "naive"),
                     title="per-layer SQNR, W8A8 naive (per-tensor)", model_name=name, path=out / "layer_sqnr.png")
    files.append("layer_sqnr.png")
    if not alphas:
        return files, None
    table = {r["variant"]: r["perplexity"] for r in rows}
    ppls = []
    for a in progress(alphas, True, "α sweep"):
        if a == args.alpha:     # the table's SmoothQuant-O2 row: the same model on the same tokens
            ppls.append(table["SmoothQuant-O2"])
            continue
        sq = quantize(smooth(model, stats, alpha=a, groups=smoothing_groups(model)), "O2")
        ppls.append(perplexity(sq, eval_ids, seq_len=seq_len, progress=False))
    fp = table["FP32 (float)"]
    plots.alpha_sweep(alphas, ppls, ylabel="perplexity",
                      title=f"SmoothQuant-O2 perplexity vs α\n(the table's {len(eval_ids)} eval tokens, windows of "
                            f"{seq_len})", model_name=name, baseline=fp, path=out / "alpha_sweep.png")
    files.append("alpha_sweep.png")
    return files, dict(alphas=alphas, perplexity=ppls, float_perplexity=fp, eval_tokens=int(len(eval_ids)),
                       preset="O2")


def side_by_side(fp_model, q_model, max_new_tokens: int = 16) -> dict:
    """Greedy continuations of the same prompt from the float and the W8A8 model."""
    if fp_model.tokenizer is None:
        ids = np.arange(1, 6)
        return dict(prompt=str(ids.tolist()),
                    float=str(fp_model.generate(ids, max_new_tokens)[5:].tolist()),
                    w8a8=str(q_model.generate(ids, max_new_tokens)[5:].tolist()))
    return dict(prompt=PROMPT, float=fp_model.generate(PROMPT, max_new_tokens),
                w8a8=q_model.generate(PROMPT, max_new_tokens))


def format_table(rows, name: str, synthetic: bool) -> str:
    has_acc = any(r["lambada_acc"] is not None for r in rows)
    head = f"| {'variant':<38} | {'W':<11} | {'A':<11} | {'perplexity':>14} | {'KL to FP':>9} |"
    head += f" {'LAMBADA':>8} |" if has_acc else ""
    head += f" {'weights MiB':>11} | {'KV B/tok':>8} | {'time s':>7} |"
    sep = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
    lines = [f"{'SYNTHETIC model (random weights, planted outliers): ' if synthetic else ''}{name}", head, sep]
    for r in rows:
        line = (f"| {r['variant']:<38} | {r['weights']:<11} | {r['acts']:<11} | {r['perplexity']:>14.3f} |"
                f" {r['kl_to_fp']:>9.2e} |")
        if has_acc:
            acc = r["lambada_acc"]
            line += f" {acc:>8.1%} |" if acc is not None else f" {'-':>8} |"
        line += f" {r['weight_mib']:>11.1f} | {r['kv_bytes_per_token']:>8,d} | {r['seconds']:>7.1f} |"
        lines.append(line)
    return "\n".join(lines)


def write_report(out: Path, report: dict, table: str) -> None:
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        return x

    rows = [{k: clean(v) for k, v in r.items()} for r in report["rows"]]
    (out / "report.json").write_text(json.dumps({**report, "rows": rows}, indent=2))
    md = [f"# minisq SmoothQuant report: {report['model']}", ""]
    if report["synthetic"]:
        md += [f"**{SYNTHETIC_LABEL}.** Random weights; compare variants with each other, not with real models.", ""]
    md += ["KL to FP: mean KL divergence of each variant's next-token distribution from the float "
           "model's, over the first evaluation window (0 = identical). Weights MiB: bytes the weights "
           "are stored in / 2^20. KV B/tok: bytes the KV cache holds per token of one sequence. The rows "
           "after SmoothQuant-O3 are the paper's baselines (minisq.baselines): per-channel activation scales "
           "(accurate, but no INT8 GEMM can use them), weight-only INT8, ZeroQuant, LLM.int8() (outlier "
           "channels in float), and an INT8 KV cache.", ""]
    md += [f"- α = {report['alpha']}, data: {report['data']}",
           f"- {report['eval_tokens']} eval tokens in windows of {report['seq_len']}, "
           f"{report['lambada_passages']} LAMBADA passages, {report['calib_sequences']} calibration sequences",
           f"- device: {report['device']}", "", "```", table, "```", ""]
    md += [f"![{f}]({f})" for f in report["figures"]]
    g = report["generation"]
    md += ["", f"Prompt {g['prompt']!r}:", "", f"- FP32: {g['float']!r}", f"- SmoothQuant-O3: {g['w8a8']!r}", ""]
    (out / "report.md").write_text("\n".join(md))


def main(argv=None, prog: str = "minisq demo") -> int:
    args = parse_args(argv, prog)
    try:
        run(args)
    except MinisqError as exc:
        print(f"minisq demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
