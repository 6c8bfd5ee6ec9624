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
import shutil
import sys
import time
from pathlib import Path

from .. import MinisqError, ModelConfig, logit_error, synthetic_model, weight_memory
from ..backend import to_numpy
from ..eval import plots
from ..io.tokenizer import packaged_gpt2_tokenizer
from ..synthetic import SYNTHETIC_LABEL
from .common import add_debug_option, load_model, run_program, say
from .report import finish, make_figures, side_by_side
from .texts import real_text, synthetic_text
from .variants import CORE, VARIANTS, Builder, evaluate

DEFAULT_MODEL = "gpt2"
# --quick on the synthetic model: a small GPT-2 with GPT-2's vocabulary (so real text works)
QUICK_SYNTHETIC = ModelConfig(hidden_size=256, num_layers=4, num_heads=4, ffn_dim=1024)
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

Exit status: 0 done; 1 an error (one line on stderr; --debug adds the traceback);
2 bad arguments.

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
    add_debug_option(ap)
    args = ap.parse_args(argv)
    defaults = dict(calib_samples=(8, 64), eval_tokens=(512, 4096), lambada_samples=(16, 100))
    for key, (quick, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if not 0.0 <= args.alpha <= 1.0:
        ap.error(f"--alpha must be in [0, 1], got {args.alpha}")
    for key, least in (("calib_samples", 1), ("eval_tokens", 1), ("lambada_samples", 0), ("seq_len", 2)):
        if getattr(args, key) is not None and getattr(args, key) < least:
            ap.error(f"--{key.replace('_', '-')} must be at least {least}, got {getattr(args, key)}")
    try:
        args.alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        ap.error(f"--alphas must be comma-separated numbers, got {args.alphas!r}")
    if not all(0.0 <= a <= 1.0 for a in args.alphas):
        ap.error(f"every --alphas value must be in [0, 1], got {args.alphas}")
    return args


def banner(text: str) -> None:
    line = "=" * min(100, max(60, len(text) + 4))
    say(line)
    say(f"  {text}")
    say(line)


def load_demo_model(args):
    """(model, folder, note): the asked-for model (lazy when too big for memory or with
    --lazy), or the synthetic one with a note saying why."""
    name = args.model or DEFAULT_MODEL
    if name != "synthetic":
        try:
            model, folder, _ = load_model(name, lazy=args.lazy, device=args.device)
            return model, folder, None
        except MinisqError as exc:
            if args.model is not None:  # the user named this model: do not silently swap it
                raise
            note = f"could not load the default model {name!r} ({str(exc).splitlines()[0][:200]})"
    else:
        note = "asked for with --model synthetic"
    cfg = QUICK_SYNTHETIC if args.quick else ModelConfig()
    model = synthetic_model(cfg, outlier_scale=60.0, n_outliers=6, seed=args.seed,
                            tokenizer=packaged_gpt2_tokenizer())   # GPT-2's vocabulary: decodes offline
    return model.to(args.device), None, note


def row(key: str, label: str, m, builder: Builder, data, fp_logits) -> dict:
    """One line of the table: the variant ``m`` evaluated, and its KL to the float model over
    the first eval window (``fp_logits``: the float model's logits there)."""
    v = VARIANTS[key]
    r = evaluate(m, data, progress=True)
    kl = logit_error(fp_logits, to_numpy(m(data.eval_ids[None, :data.seq_len])))["kl"]
    weights, acts = v.granularity()
    say(f"  {label:<38} ppl {r['perplexity']:10.3f}   KL to FP {kl:.2e}"
        + (f"   LAMBADA {r['lambada_acc']:6.1%}" if r["lambada_acc"] is not None else "") + f"   ({r['seconds']:.1f} s)")
    return dict(variant=label, smoothed=v.smoothed, preset=v.preset, weights=weights, acts=acts,
                perplexity=r["perplexity"], kl_to_fp=kl, lambada_acc=r["lambada_acc"],
                weight_mib=weight_memory(m)["stored_bytes"] / 2**20, seconds=r["seconds"],
                kv_bytes_per_token=m.kv_cache_bytes_per_token(), options=builder.options(key))


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, folder, note = load_demo_model(args)
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
    if model.config.is_synthetic:
        data = synthetic_text(model, args.calib_samples, args.eval_tokens, seq_len, args.seed)
    else:
        data = real_text(model, args.calib_samples, 512, args.eval_tokens, seq_len, args.lambada_samples,
                         args.data_dir, args.seed, lambada_optional=True)
    say(f"data: {data.source}; {len(data.calib)} calibration sequences, {len(data.eval_ids)} eval tokens "
        f"(windows of {data.seq_len}), {len(data.passages)} LAMBADA passages")

    builder = Builder(model, folder, data.calib, args.alpha, keep_samples=256, progress=True)
    if model.lazy:
        say("lazy model: rows are the float model and SmoothQuant's presets (each W8A8 model written layer by "
            "layer, then loaded as int8); the figures and baselines that need whole float models in memory "
            "are skipped")
    else:
        t0 = time.perf_counter()
        builder.smoothed_stats()
        say(f"calibrated and smoothed (α={args.alpha}) in {time.perf_counter() - t0:.1f} s")
    fp_logits = to_numpy(model(data.eval_ids[None, :data.seq_len]))
    rows, o3 = [], None
    for key in CORE if model.lazy else VARIANTS:
        work = out / "models" / key              # lazy models only: the streamed W8A8 checkpoint
        if model.lazy and work.exists():         # from an earlier run, perhaps of other arguments
            shutil.rmtree(work)
        m = builder.build(key, work)
        label = "FP32 (float, layer by layer)" if model.lazy and key == "fp32" else VARIANTS[key].label
        rows.append(row(key, label, m, builder, data, fp_logits))
        o3 = m if key == "O3" else o3
        if model.lazy:
            shutil.rmtree(work, ignore_errors=True)

    figures, sweep = ([], None) if model.lazy else make_figures(args, builder, data, out, name, rows)
    plots.landscape(rows, title="KL to float" if model.lazy else "the paper's comparison: KL to float",
                    model_name=name, path=out / "landscape.png")
    figures.append("landscape.png")
    text = side_by_side(model, o3, max_new_tokens=8 if model.lazy else 16)
    report = dict(model=name, synthetic=model.config.is_synthetic, note=note, alpha=args.alpha,
                  data=data.source, eval_tokens=int(len(data.eval_ids)), seq_len=data.seq_len,
                  **(dict(lazy=True) if model.lazy else {}), lambada_passages=len(data.passages),
                  calib_sequences=len(data.calib), device="cpu" if model.lazy else args.device,
                  rows=rows, figures=figures, alpha_sweep=sweep, generation=text)
    return finish(out, report, model)


def main(argv=None, prog: str = "minisq demo") -> int:
    args = parse_args(argv, prog)  # exits with status 2 on bad arguments
    return run_program(prog, run, args)


if __name__ == "__main__":
    sys.exit(main())
