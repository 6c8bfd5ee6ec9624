"""``minisq demo``'s outputs: the figures, the table, the generated text side by side, and
``report.md`` / ``report.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .. import layer_errors, perplexity
from ..eval import plots
from ..progress import progress
from ..synthetic import SYNTHETIC_LABEL
from .common import say
from .variants import VARIANTS, Builder

PROMPT = "The capital of France is"


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


def make_figures(args, builder: Builder, data, out: Path, name: str, rows) -> tuple:
    """Write the figures of an eager model; returns their file names and the α sweep's
    numbers (or None).

    The α sweep is SmoothQuant-O2 perplexity on the table's own eval tokens and windows, so
    its float line and its point at ``--alpha`` are the table's FP32 and SmoothQuant-O2 rows.
    """
    model, smoothed, stats, s_stats = builder.model, builder.smoothed(), builder.stats(), builder.smoothed_stats()
    eval_ids, seq_len = data.eval_ids, data.seq_len
    layer = model.config.num_layers // 2
    qkv = model.family.QKV_OUTPUTS[0][0].format(i=layer)          # the leaf that gives q
    files = []
    alphas = args.alphas            # the α values of the sweep, parsed from --alphas
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
            ppls.append(table[VARIANTS["O2"].label])
            continue
        ppls.append(perplexity(builder.with_alpha(a).build("O2"), eval_ids, seq_len=seq_len, progress=False))
    fp = table[VARIANTS["fp32"].label]
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
