"""``python -m minisq.demo``: the SmoothQuant story on one model, in one command.

Loads a model (default ``gpt2``; any GPT-2/OPT/Llama-family hub id or local folder, or ``synthetic``),
calibrates it on WikiText-2 text, smooths it, and evaluates the float model against W8A8
variants with and without smoothing. Prints one table (perplexity, LAMBADA accuracy,
weight memory, time), writes figures and a JSON/Markdown report to ``--out``, and ends
with generated text from the float and the SmoothQuant W8A8 model side by side.

Offline, or when the default model cannot be downloaded, it falls back to the labeled
synthetic-outlier model (random weights with planted outlier channels).
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

from . import data as datasets
from . import plots
from .calibrate import calibrate
from .backend import to_numpy
from .diagnostics import layer_errors, logit_error
from .config import ModelConfig
from .errors import DataError, MinisqError
from .evaluate import lambada_accuracy, perplexity
from .loading import load
from .baselines import BASELINES, largest_group_size
from .qlinear import DEFAULT_SKIP, PRESETS, quantize, weight_memory
from .smooth import smooth
from .synthetic import SYNTHETIC_LABEL, synthetic_model

DEFAULT_MODEL = "gpt2"
# --quick on the synthetic model: a small GPT-2 with GPT-2's vocabulary (so real text works)
QUICK_SYNTHETIC = ModelConfig(hidden_size=256, num_layers=4, num_heads=4, ffn_dim=1024)
PROMPT = "The capital of France is"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m minisq.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
               "  python -m minisq.demo                      # GPT-2 small (downloads ~500 MB once)\n"
               "  python -m minisq.demo --model facebook/opt-125m --alpha 0.5\n"
               "  python -m minisq.demo --model HuggingFaceTB/SmolLM-135M   # a Llama\n"
               "  python -m minisq.demo --model synthetic --quick   # offline, under a minute\n"
               "  python -m minisq.demo --model ./my-gpt2-folder --device gpu\n")
    ap.add_argument("--model", default=None,
                    help=f"hub id (gpt2, gpt2-medium, facebook/opt-125m, HuggingFaceTB/SmolLM-135M, ...), a local HF folder, or 'synthetic' "
                         f"(default: {DEFAULT_MODEL}; falls back to synthetic when it cannot be downloaded)")
    ap.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength α in [0, 1] (default 0.5)")
    ap.add_argument("--calib-samples", type=int, default=None,
                    help="number of WikiText-2 paragraphs to calibrate on (default 64; --quick 8)")
    ap.add_argument("--eval-tokens", type=int, default=None,
                    help="WikiText-2 test tokens for perplexity (default 4096; --quick 1024)")
    ap.add_argument("--lambada-samples", type=int, default=None,
                    help="LAMBADA passages to score, 0 to skip (default 100; --quick 16)")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="perplexity window length (default: the model's context, at most 1024; 256 with --quick "
                         "or the synthetic model)")
    ap.add_argument("--alphas", default="0,0.25,0.5,0.75,1",
                    help="comma-separated α values for the α-sweep figure, '' to skip (default 0,0.25,0.5,0.75,1)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="run on the CPU (NumPy) or GPU (CuPy)")
    ap.add_argument("--out", default="minisq-out", help="folder for figures and the report (default ./minisq-out)")
    ap.add_argument("--data-dir", default=None,
                    help="folder with wikitext-2-raw/ and lambada/ (default $MINISQ_DATA_DIR, else download)")
    ap.add_argument("--quick", action="store_true", help="a small, fast run (smaller synthetic model, fewer tokens)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the synthetic model and sampling")
    args = ap.parse_args(argv)
    defaults = dict(calib_samples=(8, 64), eval_tokens=(1024, 4096), lambada_samples=(16, 100))
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

def _gpt2_tokenizer(data_dir):
    """GPT-2's tokenizer from the data folder (for the synthetic model), or None."""
    from .tokenizer import load_tokenizer

    d = datasets.data_dir(data_dir)
    if d is None or not (d / "gpt2").is_dir():
        return None
    try:
        return load_tokenizer(d / "gpt2", "gpt2")
    except MinisqError:
        return None


def load_model(args):
    """(model, note): the asked-for model, or the synthetic one with a note saying why."""
    name = args.model or DEFAULT_MODEL
    if name != "synthetic":
        try:
            return load(name, device=args.device), None
        except MinisqError as exc:
            if args.model is not None:  # the user named this model: do not silently swap it
                raise
            note = f"could not load the default model {name!r} ({str(exc).splitlines()[0][:200]})"
    else:
        note = "asked for with --model synthetic"
    cfg = QUICK_SYNTHETIC if args.quick else ModelConfig()
    model = synthetic_model(cfg, outlier_scale=60.0, n_outliers=6, seed=args.seed,
                            tokenizer=_gpt2_tokenizer(args.data_dir))
    return model.to(args.device), note


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
    perplexity and every quantization error shows. Calibration uses other samples."""
    n_eval = max(1, -(-args.eval_tokens // seq_len))
    calib_len = min(seq_len, 128)
    with_prompt = lambda n, seed: np.random.default_rng(seed).integers(0, model.config.vocab_size, (n, 1))  # noqa: E731
    t0 = time.perf_counter()
    eval_rows = model.generate_ids(with_prompt(n_eval, args.seed + 1), max_new_tokens=seq_len - 1,
                                   temperature=1.0, seed=args.seed + 1)
    calib_rows = model.generate_ids(with_prompt(args.calib_samples, args.seed + 2), max_new_tokens=calib_len - 1,
                                    temperature=1.0, seed=args.seed + 2)
    say(f"sampled {eval_rows.size + calib_rows.size} SYNTHETIC tokens from the float model "
        f"in {time.perf_counter() - t0:.1f} s (LAMBADA skipped: meaningless for random weights)")
    return list(calib_rows), eval_rows.reshape(-1), [], "SYNTHETIC token streams sampled from the float model"


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
    # token by token from the float model (shorter windows sample in parallel).
    short = args.quick or model.config.is_synthetic
    seq_len = args.seq_len or min(model.config.max_positions, 256 if short else 1024)
    calib, eval_ids, passages, source = load_texts(args, model, seq_len)
    eval_ids = eval_ids[: max(args.eval_tokens, seq_len)]
    say(f"data: {source}; {len(calib)} calibration sequences, {len(eval_ids)} eval tokens "
        f"(windows of {seq_len}), {len(passages)} LAMBADA passages")

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
                         weight_mb=mem["stored_bytes"] / 2**20, seconds=secs,
                         kv_bytes_per_token=m.kv_cache_bytes_per_token(), options=opts))
        say(f"  {label:<38} ppl {ppl:10.3f}   KL to FP {kl:.2e}"
            + (f"   LAMBADA {acc:6.1%}" if acc is not None else "") + f"   ({secs:.1f} s)")

    figures = make_figures(args, model, smoothed, stats, s_stats, eval_ids, seq_len, out, name)
    plots.landscape(rows, title="the paper's comparison: KL to float", model_name=name,
                    path=out / "landscape.png")
    figures.append("landscape.png")
    text = side_by_side(model, quantize(smoothed, "O3", stats=s_stats))
    report = dict(model=name, synthetic=model.config.is_synthetic, note=note, alpha=args.alpha,
                  data=source, eval_tokens=int(len(eval_ids)), seq_len=seq_len,
                  lambada_passages=len(passages), calib_sequences=len(calib), device=args.device,
                  rows=rows, figures=figures, generation=text)
    table = format_table(rows, name, model.config.is_synthetic)
    say("")
    say(table)
    write_report(out, report, table)
    say("")
    say(f'Generated text, greedy, prompt {text["prompt"]!r}:')
    say(f'  FP32           : {text["float"]!r}')
    say(f'  SmoothQuant-O3 : {text["w8a8"]!r}')
    say("")
    say(f"Report: {out / 'report.md'} and {out / 'report.json'}; figures: {', '.join(figures)}")
    return report


def make_figures(args, model, smoothed, stats, s_stats, eval_ids, seq_len, out: Path, name: str) -> list:
    """Write the figures; returns their file names."""
    layer = model.config.num_layers // 2
    qkv = model.family.QKV_OUTPUTS[0][0].format(i=layer)          # the leaf that gives q
    files = []
    plots.activation_surfaces(stats.samples[qkv][:64], s_stats.samples[qkv][:64],
                              model.linears()[qkv].w, smoothed.linears()[qkv].w,
                              title=f"{qkv} input before/after smoothing (α={args.alpha})", model_name=name,
                              path=out / "activations.png")
    files.append("activations.png")
    plots.channel_max_bars(stats.channel_absmax[qkv], after=s_stats.channel_absmax[qkv],
                           title=f"per-channel max |x| into {qkv}", model_name=name, path=out / "channel_max.png")
    files.append("channel_max.png")
    plots.layer_sqnr(layer_errors(model, stats, "naive"), layer_errors(smoothed, s_stats, "naive"),
                     title="per-layer SQNR, W8A8 naive (per-tensor)", model_name=name, path=out / "layer_sqnr.png")
    files.append("layer_sqnr.png")
    alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    if alphas:
        sweep_ids = eval_ids[: max(seq_len, min(len(eval_ids), 2 * seq_len))]
        ppls = []
        for a in alphas:
            ppls.append(perplexity(quantize(smooth(model, stats, alpha=a, groups=smoothing_groups(model)), "O2"), sweep_ids, seq_len=seq_len,
                                   progress=False))
        fp = perplexity(model, sweep_ids, seq_len=seq_len, progress=False)
        plots.alpha_sweep(alphas, ppls, ylabel=f"perplexity ({len(sweep_ids)} tokens)",
                          title="SmoothQuant-O2 perplexity vs α", model_name=name, baseline=fp,
                          path=out / "alpha_sweep.png")
        files.append("alpha_sweep.png")
    return files


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
    head += f" {'weights MB':>10} | {'KV B/tok':>8} | {'time s':>7} |"
    sep = "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"
    lines = [f"{'SYNTHETIC model (random weights, planted outliers): ' if synthetic else ''}{name}", head, sep]
    for r in rows:
        line = (f"| {r['variant']:<38} | {r['weights']:<11} | {r['acts']:<11} | {r['perplexity']:>14.3f} |"
                f" {r['kl_to_fp']:>9.2e} |")
        if has_acc:
            acc = r["lambada_acc"]
            line += f" {acc:>8.1%} |" if acc is not None else f" {'-':>8} |"
        line += f" {r['weight_mb']:>10.1f} | {r['kv_bytes_per_token']:>8,d} | {r['seconds']:>7.1f} |"
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
           "model's, over the first evaluation window (0 = identical). KV B/tok: bytes the KV cache holds "
           "per token of one sequence. The rows after SmoothQuant-O3 are the paper's baselines "
           "(minisq.baselines): per-channel activation scales (accurate, but no INT8 GEMM can use them), "
           "weight-only INT8, ZeroQuant, LLM.int8() (outlier channels in float), and an INT8 KV cache.", ""]
    md += [f"- α = {report['alpha']}, data: {report['data']}",
           f"- {report['eval_tokens']} eval tokens in windows of {report['seq_len']}, "
           f"{report['lambada_passages']} LAMBADA passages, {report['calib_sequences']} calibration sequences",
           f"- device: {report['device']}", "", "```", table, "```", ""]
    md += [f"![{f}]({f})" for f in report["figures"]]
    g = report["generation"]
    md += ["", f"Prompt {g['prompt']!r}:", "", f"- FP32: {g['float']!r}", f"- SmoothQuant-O3: {g['w8a8']!r}", ""]
    (out / "report.md").write_text("\n".join(md))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except MinisqError as exc:
        print(f"minisq demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
