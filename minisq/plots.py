"""Figures for the SmoothQuant story (matplotlib). Each returns the Figure and, given
``path``, also saves it as a PNG.

Legend: N tokens, C channels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .backend import to_numpy


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

    ``x_*`` ``[N, C]``; ``w_*`` ``[C, C_out]``.
    """
    panels = [("activation |X| (original)", x_before), ("activation |X̂| (smoothed)", x_after)]
    if w_before is not None and w_after is not None:
        panels += [("weight |W| (original)", w_before.T), ("weight |Ŵ| (smoothed)", w_after.T)]
    fig = _figure(figsize=(5 * len(panels), 4.2))
    zmax = max(float(np.abs(to_numpy(a)).max()) for _, a in panels[:2])
    for i, (name, a) in enumerate(panels):
        a = np.abs(np.asarray(to_numpy(a), np.float32))
        step_r, step_c = max(1, a.shape[0] // 64), max(1, a.shape[1] // 256)
        a = a[::step_r, ::step_c]
        ax = fig.add_subplot(1, len(panels), i + 1, projection="3d")
        cols, rows = np.meshgrid(np.arange(a.shape[1]) * step_c, np.arange(a.shape[0]) * step_r)
        ax.plot_surface(cols, rows, a, cmap="coolwarm", linewidth=0, antialiased=False)
        ax.set_xlabel("channel")
        ax.set_ylabel("token" if "activation" in name else "out channel")
        ax.set_title(name, fontsize=10)
        if i < 2:
            ax.set_zlim(0, zmax)
    fig.suptitle((title or "SmoothQuant migrates the activation outliers into the weights") + _label(model_name))
    return _save(fig, path)


def channel_max_bars(act_max, top: int = 5, title: str = "", model_name: str = "", path=None, after=None,
                     log: bool | None = None):
    """Per-channel max |x| as bars, the ``top`` outlier channels named; ``after`` overlays
    the smoothed ranges. ``log`` (default: when ``after`` is given) uses a log y axis, so
    that small smoothed ranges stay visible beside 100x outliers."""
    a = np.asarray(to_numpy(act_max), np.float64)
    fig = _figure(figsize=(10, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(np.arange(a.size), a, width=1.0, color="tab:red", label="original")
    if after is not None:
        ax.bar(np.arange(a.size), np.asarray(to_numpy(after)), width=1.0, color="tab:blue", alpha=0.8,
               label="smoothed")
        ax.legend()
    for ch in np.argsort(a)[::-1][:top]:
        ax.annotate(f"ch {ch}", (ch, a[ch]), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    if log or (log is None and after is not None):
        ax.set_yscale("log")
    ax.set_xlabel("input channel")
    ax.set_ylabel("max |x| over calibration tokens")
    ax.set_title((title or "Outliers live in a few channels") +
                 f": max/median = {a.max() / max(np.median(a), 1e-30):.0f}" + _label(model_name))
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


def layer_sqnr(before: dict, after: dict, title: str = "", model_name: str = "", path=None):
    """Per-linear SQNR (dB) of the W8A8 output, without and with smoothing (higher is better).

    ``before``/``after``: ``{layer name: {"sqnr_db": ...}}`` from :func:`minisq.layer_errors`.
    """
    names = [n for n in before if n in after]
    fig = _figure(figsize=(max(8, 0.35 * len(names)), 4))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [before[n]["sqnr_db"] for n in names], 0.4, label="no smoothing", color="tab:red")
    ax.bar(x + 0.2, [after[n]["sqnr_db"] for n in names], 0.4, label="smoothed", color="tab:blue")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("SQNR (dB)")
    ax.legend()
    ax.set_title((title or "Per-layer quantization SQNR") + _label(model_name))
    return _save(fig, path)


def landscape(rows, title: str = "", model_name: str = "", path=None):
    """The paper's comparison as one picture: each method's KL to the float model (log
    scale, lower is better) as a horizontal bar, best at the top, its label carrying the
    weight memory and the KV cache's bytes per token.

    ``rows``: dicts with ``variant``, ``kl_to_fp``, ``weight_mb`` and (optionally)
    ``kv_bytes_per_token`` (the demo's rows).
    """
    rows = sorted((r for r in rows if r["kl_to_fp"] > 0), key=lambda r: r["kl_to_fp"], reverse=True)
    fig = _figure(figsize=(9, 0.4 * len(rows) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(rows))
    ax.barh(y, [r["kl_to_fp"] for r in rows], color="tab:blue")
    labels = [f"{r['variant']}  ({r['weight_mb']:.1f} MB"
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
