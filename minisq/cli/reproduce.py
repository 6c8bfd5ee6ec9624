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
  paper has them (:data:`minisq.cli.paper.PAPER`, each with its source), blanks elsewhere;
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
files) is loaded lazily, with a line saying so: memory-mapped, evaluated layer by layer, and
its W8A8 variants written layer by layer by :func:`minisq.quantize_checkpoint` into
``<out>/models`` (resumable; deleted once the number is cached) and loaded from there.

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
import json
import shutil
import sys
import time
from pathlib import Path

from ..eval.evaluate import LAMBADA_METRICS
from .cache import Settings, cache_key, cache_path, model_key, read_cached, write_cached
from .common import add_debug_option, load_model, parameter_count, run_program, say
from .paper import RANDOM_LABEL, emergence_figure, format_table, group_by_model, is_random, row_label
from .texts import real_text
from .variants import CORE, VARIANTS, Builder, evaluate

DEFAULT_MODELS = ("facebook/opt-125m", "facebook/opt-350m", "facebook/opt-1.3b",
                  "facebook/opt-2.7b", "facebook/opt-6.7b")


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
            say(f"{index} {row_label(v):<24} {_summary(hit)}  (cached)")
    if todo:
        t0 = time.perf_counter()
        model, folder, lazy = load_model(source)
        info = dict(params=parameter_count(model), vocab_size=model.config.vocab_size,
                    model_type=model.config.model_type, lazy=lazy,
                    synthetic=model.config.is_synthetic)
        say(f"{index} loaded {model} ({info['params'] / 1e6:.1f}M parameters) in {time.perf_counter() - t0:.1f} s")
        data = real_text(model, settings.calib_samples, settings.calib_len, settings.eval_tokens, settings.seq_len,
                         settings.lambada_samples, data_dir, settings.seed)
        say(f"  data: {len(data.eval_ids)} WikiText-2 test tokens in windows of {data.seq_len}, "
            f"{len(data.passages)} LAMBADA passages, {len(data.calib)} calibration sequences")
        builder = Builder(model, folder, data.calib, settings.alpha, attn_bmm=settings.attn_bmm, progress=progress)
        for v in todo:
            work = cache_dir.parent / "models" / cache_path(cache_dir, keys[v]).stem  # lazy models only
            t0 = time.perf_counter()
            variant_model = builder.build(v, work)
            built = time.perf_counter() - t0
            result = {**evaluate(variant_model, data, settings.metric, progress), **info}
            if VARIANTS[v].smoothed:  # the smoothed (calibrated) variants say on what
                result["calib_split"] = data.calib_split
            del variant_model
            write_cached(cache_path(cache_dir, keys[v]), keys[v], result)
            if work.exists():  # the streamed checkpoint served its purpose once the number is cached
                shutil.rmtree(work)
            rows[v] = result
            say(f"{index} {row_label(v):<24} {_summary(result)}  "
                f"(built in {built:.1f} s, evaluated in {result['seconds']:.1f} s)")
    return [dict(model=source, variant=v, **rows[v]) for v in variants]


def _summary(r: dict) -> str:
    acc = r.get("lambada_acc")
    return f"ppl {r['perplexity']:12.3f}" + (f"   LAMBADA {acc:6.1%}" if acc is not None else "")


# ------------------------------------------------------------------ the command


def parse_args(argv=None, prog: str = "minisq reproduce") -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog=prog, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
               "  minisq reproduce                     # OPT 125m ... 6.7b: hub downloads, hours on a CPU\n"
               "  minisq reproduce --models facebook/opt-125m gpt2 --eval-tokens 4096\n"
               "  minisq reproduce --models ./opt-a ./opt-b --out runs/opt   # local folders\n"
               "\nExit status: 0 done; 1 an error (one line on stderr; --debug adds the traceback); "
               "2 bad arguments.\n")
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                    help="GPT-2/OPT hub ids or local folders (default: the OPT family 125m ... 6.7b)")
    ap.add_argument("--variants", nargs="+", default=list(CORE), choices=list(CORE),
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
    add_debug_option(ap)
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
    args.variants = ["fp32"] + [v for v in CORE if v in args.variants and v != "fp32"]
    return args


def settings_of(args) -> Settings:
    return Settings(alpha=args.alpha, calib_samples=args.calib_samples, calib_len=args.calib_len,
                    eval_tokens=args.eval_tokens, seq_len=args.seq_len, lambada_samples=args.lambada_samples,
                    metric=args.metric, attn_bmm=args.attn_bmm == "on", seed=args.seed)


def run(args) -> list:
    out = Path(args.out)
    (out / "cache").mkdir(parents=True, exist_ok=True)  # an unwritable --out fails before any work
    settings = settings_of(args)
    rows = []
    t0 = time.perf_counter()
    for i, source in enumerate(args.models, start=1):
        index = f"[{i}/{len(args.models)} {source}]"
        rows += run_model(source, index, settings, args.variants, out / "cache", args.data_dir, args.progress)
    for model, rs in group_by_model(rows).items():
        if is_random(rs):
            say(f"! {model}: float perplexity {rs[0]['perplexity']:.0f} over a vocabulary of {rs[0]['vocab_size']}: "
                f"{RANDOM_LABEL.upper()}, labeled so in the table and the figure")
    (out / "table.md").write_text(format_table(rows, settings))
    (out / "results.json").write_text(json.dumps(
        dict(settings=dataclasses.asdict(settings), rows=rows,
             random_weights=[m for m, rs in group_by_model(rows).items() if is_random(rs)]), indent=1))
    emergence_figure(rows, out / "emergence.png")
    say(f"wrote {out / 'table.md'}, {out / 'emergence.png'} and {out / 'results.json'} "
        f"({time.perf_counter() - t0:.1f} s)")
    return rows


def main(argv=None, prog: str = "minisq reproduce") -> int:
    args = parse_args(argv, prog)  # exits with status 2 on bad arguments
    return run_program(prog, run, args)


if __name__ == "__main__":
    sys.exit(main())
