"""The paper's published numbers, and ``minisq reproduce``'s table and figure that set
minisq's numbers beside them."""

from __future__ import annotations

import math
from pathlib import Path

from .cache import Settings
from .variants import VARIANTS

FIGURE_LINES = (("fp32", "black"), ("naive", "tab:red"), ("O3", "tab:blue"))
FIGURE_LABELS = {"fp32": "FP32 on CPU", "naive": "W8A8 naive", "O3": "SmoothQuant-O3"}
# How the paper's rows are named (its baseline is FP16 on a GPU).
PAPER_LABELS = {"fp32": "FP16", "naive": "W8A8 naive", "O1": "SmoothQuant-O1", "O2": "SmoothQuant-O2",
                "O3": "SmoothQuant-O3"}

# A model's float perplexity above this fraction of its vocabulary size (a uniform guess
# scores exactly V) marks it as random weights. Trained GPT-2/OPT models score 10-40.
RANDOM_PPL_FRACTION = 0.1
RANDOM_LABEL = "random weights"


def row_label(variant: str) -> str:
    """How ``minisq reproduce`` names a row of :data:`minisq.cli.variants.VARIANTS`."""
    return VARIANTS[variant].short or VARIANTS[variant].label


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
    by_model = group_by_model(rows)
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
                f"| {name} | {_fmt_params(r['params'])} | {row_label(r['variant'])} "
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


def group_by_model(rows: list) -> dict:
    """model -> its rows, in order."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["model"], []).append(r)
    return out


def emergence_figure(rows: list, path: Path):
    """LAMBADA accuracy (left) and WikiText-2 perplexity (right) against parameters (log x):
    FP32, naive W8A8 and SmoothQuant-O3; minisq's points filled and joined, the published
    ones hollow and named."""
    from matplotlib.figure import Figure

    by_model = group_by_model(rows)
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


