"""Figures for the SmoothQuant story (matplotlib). Each returns the Figure and, given
``path``, also saves it as a PNG.

Legend: N tokens, C channels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..backend import to_numpy


def _figure(*args, **kwargs):
    # A bare Figure (no pyplot): no global state, no display needed; Jupyter shows it inline.
    from matplotlib.figure import Figure

    return Figure(*args, **kwargs)


def _save(fig, path):
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _label(model_name: str) -> str:
    return f" [{model_name}]" if model_name else ""


def activation_surfaces(x_before, x_after, w_before=None, w_after=None, title: str = "",
                        model_name: str = "", path=None):
    """|X| over tokens × channels before and after smoothing, as 3D surfaces (the paper's
    Figure 4); with the weights' |W| per input channel beside them when given.

    ``x_*`` ``[N, C]``; ``w_*`` ``[C, C_out]``. The two activation panels share one z scale,
    and so do the two weight panels, so that before and after compare at a glance.
    """
    panels = [("activation |X| (original)", x_before), ("activation |X̂| (smoothed)", x_after)]
    if w_before is not None and w_after is not None:
        panels += [("weight |W| (original)", w_before.T), ("weight |Ŵ| (smoothed)", w_after.T)]
    fig = _figure(figsize=(5 * len(panels), 4.2))
    zmax = [max(float(np.abs(to_numpy(a)).max()) for _, a in panels[k:k + 2]) for k in range(0, len(panels), 2)]
    for i, (name, a) in enumerate(panels):
        a = np.abs(np.asarray(to_numpy(a), np.float32))
        step_r, step_c = max(1, a.shape[0] // 64), max(1, a.shape[1] // 256)
        a = a[::step_r, ::step_c]
        ax = fig.add_subplot(1, len(panels), i + 1, projection="3d")
        cols, rows = np.meshgrid(np.arange(a.shape[1]) * step_c, np.arange(a.shape[0]) * step_r)
        ax.plot_surface(cols, rows, a, cmap="coolwarm", linewidth=0, antialiased=False)
        ax.set_xlabel("channel" if "activation" in name else "input channel")
        ax.set_ylabel("token" if "activation" in name else "out channel")
        ax.set_zlabel("|X|" if "activation" in name else "|W|")
        ax.set_title(name, fontsize=10)
        ax.set_zlim(0, zmax[i // 2])      # shared within the pair (before, after)
    fig.suptitle((title or "SmoothQuant migrates the activation outliers into the weights") + _label(model_name))
    return _save(fig, path)


def _spread(a) -> float:
    """max/median of per-channel ranges: how much wider the widest channel is (1 = flat)."""
    return float(a.max() / max(np.median(a), 1e-30))


def _spread_out(xs, gap: float, lo: float, hi: float) -> np.ndarray:
    """Label positions near sorted ``xs``, at least ``gap`` apart and within [lo, hi]."""
    pos = np.asarray(xs, np.float64).copy()
    for i in range(1, len(pos)):                     # push right ...
        pos[i] = max(pos[i], pos[i - 1] + gap)
    pos -= max(0.0, pos[-1] - hi) if len(pos) else 0.0
    for i in range(len(pos) - 2, -1, -1):            # ... and back left where that ran past hi
        pos[i] = min(pos[i], pos[i + 1] - gap)
    return np.maximum(pos, lo)


def channel_max_bars(act_max, top: int = 5, title: str = "", model_name: str = "", path=None, after=None,
                     log: bool | None = None, channels=None):
    """Per-channel max |x| as bars, with the ``top`` widest channels (or the given ``channels``,
    e.g. a synthetic model's planted outliers) named; ``after`` overlays the smoothed ranges.
    ``log`` (default: when ``after`` is given) uses a log y axis, so that small smoothed ranges
    stay visible beside 100x outliers. The title gives max/median of each set of bars shown.

    ``act_max``, ``after``: ``[C]``. Labels stand in a band above the bars, spread apart where
    channels are neighbours and tied to their bars by a line, so that no two overlap.
    """
    a = np.asarray(to_numpy(act_max), np.float64)
    fig = _figure(figsize=(10, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(np.arange(a.size), a, width=1.0, color="tab:red", label="original")
    if after is not None:
        b = np.asarray(to_numpy(after), np.float64)
        ax.bar(np.arange(a.size), b, width=1.0, color="tab:blue", alpha=0.8, label="smoothed")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    named = np.sort(np.asarray(channels if channels is not None else np.argsort(a)[::-1][:top], int))
    logscale = log or (log is None and after is not None)
    if logscale:
        ax.set_yscale("log")
    ax.set_ylim(top=a.max() * (40 if logscale else 1.5))     # a band above the bars for the labels
    y_text = a.max() * (2.5 if logscale else 1.08)
    for ch, x_text in zip(named, _spread_out(named, gap=a.size / 45, lo=0, hi=a.size - 1)):
        ax.annotate(f"ch {ch}", (ch, a[ch]), xytext=(x_text, y_text), textcoords="data", ha="center",
                    va="bottom", rotation=90, fontsize=7, arrowprops=dict(arrowstyle="-", lw=0.5, color="gray"))
    ax.set_xlabel("input channel")
    ax.set_ylabel("max |x| over calibration tokens")
    spread = f"max/median = {_spread(a):.0f}" + ("" if after is None else
                                                 f" original, {_spread(b):.1f} smoothed")
    ax.set_title((title or "Outliers live in a few channels") + f": {spread}" + _label(model_name))
    return _save(fig, path)


def alpha_sweep(alphas, values, ylabel: str = "perplexity", title: str = "", model_name: str = "", path=None,
                baseline: float | None = None):
    """A metric (perplexity, error) against the migration strength α."""
    fig = _figure(figsize=(6, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(alphas, values, "o-", label="SmoothQuant W8A8")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label="float")
        ax.legend()
    best = int(np.nanargmin(values))
    ax.annotate(f"best α={alphas[best]:g}", (alphas[best], values[best]), textcoords="offset points",
                xytext=(0, 8), ha="center")
    ax.set_xlabel("α (migration strength)")
    ax.set_ylabel(ylabel)
    ax.set_title((title or "α sweep") + _label(model_name))
    return _save(fig, path)


def layer_sqnr(before: dict, after: dict, title: str = "", model_name: str = "", path=None,
               skip=("lm_head",)):
    """Per-linear SQNR (dB) of the W8A8 output, without and with smoothing (higher is better).

    ``before``/``after``: ``{layer name: {"sqnr_db": ...}}`` from :func:`minisq.layer_errors`.
    Layers matching a ``skip`` pattern (default ``lm_head``, which :func:`minisq.quantize`
    keeps in float unless told otherwise) are left out, and a note under the axis says so.
    """
    from fnmatch import fnmatchcase

    left_out = [n for n in before if any(fnmatchcase(n, p) for p in skip)]
    names = [n for n in before if n in after and n not in left_out]
    fig = _figure(figsize=(max(8, 0.35 * len(names)), 4))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [before[n]["sqnr_db"] for n in names], 0.4, label="no smoothing", color="tab:red")
    ax.bar(x + 0.2, [after[n]["sqnr_db"] for n in names], 0.4, label="smoothed", color="tab:blue")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_xlabel("linear layer"
                  + (f"; not shown: {', '.join(left_out)} (kept in float by default)" if left_out else ""))
    ax.set_ylabel("SQNR (dB)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))   # beside the axes, never over a bar
    ax.set_title((title or "Per-layer quantization SQNR") + _label(model_name))
    return _save(fig, path)


def landscape(rows, title: str = "", model_name: str = "", path=None):
    """The paper's comparison as one picture: each method's KL to the float model (log
    scale, lower is better) as a horizontal bar, best at the top, its label carrying the
    weight memory and the KV cache's bytes per token.

    ``rows``: dicts with ``variant``, ``kl_to_fp``, ``weight_mib`` and (optionally)
    ``kv_bytes_per_token`` (the demo's rows).
    """
    rows = sorted((r for r in rows if r["kl_to_fp"] > 0), key=lambda r: r["kl_to_fp"], reverse=True)
    fig = _figure(figsize=(9, 0.4 * len(rows) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(rows))
    ax.barh(y, [r["kl_to_fp"] for r in rows], color="tab:blue")
    labels = [f"{r['variant']}  ({r['weight_mib']:.1f} MiB"
              + (f", KV {r['kv_bytes_per_token']:,} B/tok" if "kv_bytes_per_token" in r else "") + ")"
              for r in rows]
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter
    ax.xaxis.set_minor_formatter(NullFormatter())   # decades only: the minor labels overlap
    ax.set_xlabel("KL(float || method), log scale (lower is better)")
    ax.set_title((title or "Accuracy of each method") + _label(model_name))
    return _save(fig, path)
