"""The demo's and notebooks' figures say what they show: every planted outlier
channel named, labels that do not overlap, lm_head marked as left out, shared z scales."""

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from minisq import plots  # noqa: E402


def _renderer(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)   # the figures are bare Figures (no pyplot): give one a canvas
    canvas.draw()
    return canvas.get_renderer()


def _overlaps(fig, texts) -> list:
    renderer = _renderer(fig)
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t, renderer) for t in texts]   # the text itself, not its leader line
    return [(texts[i].get_text(), texts[j].get_text()) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
            if boxes[i].overlaps(boxes[j])]


def _ranges(C=256, hot=(147, 157, 173, 198, 227, 237), seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(1, 4, C)
    a[list(hot)] = rng.uniform(100, 200, len(hot))
    return a


def test_channel_max_names_every_given_channel_without_overlap():
    hot = [147, 157, 173, 198, 227, 237]
    a = _ranges(hot=hot)
    a[237] = 3.0                                # a planted channel that is not among the 6 widest
    fig = plots.channel_max_bars(a, after=a / 20, channels=hot, top=5)
    texts = fig.axes[0].texts
    assert sorted(t.get_text() for t in texts) == sorted(f"ch {c}" for c in hot)
    assert _overlaps(fig, texts) == []


def test_channel_max_top_labels_of_neighbouring_channels_do_not_overlap():
    a = _ranges(hot=(100, 101, 103, 104, 106, 108))
    fig = plots.channel_max_bars(a, top=6)
    assert len(fig.axes[0].texts) == 6 and _overlaps(fig, fig.axes[0].texts) == []


def test_channel_max_title_gives_the_ratio_of_both_sets_of_bars():
    a = _ranges()
    b = a / np.where(a > 50, 40, 1)
    title = plots.channel_max_bars(a, after=b).axes[0].get_title()
    before, after = a.max() / np.median(a), b.max() / np.median(b)
    assert f"max/median = {before:.0f} original, {after:.1f} smoothed" in title


def test_layer_sqnr_leaves_out_lm_head_says_so_and_keeps_the_legend_off_the_bars():
    names = ["h.0.attn.c_attn", "h.0.mlp.c_fc", "lm_head"]
    before = {n: {"sqnr_db": 20.0 + i} for i, n in enumerate(names)}
    after = {n: {"sqnr_db": 35.0 + i} for i, n in enumerate(names)}
    fig = plots.layer_sqnr(before, after)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == names[:2]
    assert "lm_head" in ax.get_xlabel() and "kept in float" in ax.get_xlabel()
    renderer = _renderer(fig)
    legend = ax.get_legend().get_window_extent(renderer)
    axes_box = ax.get_window_extent(renderer)
    assert legend.x0 >= axes_box.x1, "the legend sits beside the axes"


def test_activation_surfaces_share_z_scales_in_pairs_with_z_labels():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 32)).astype(np.float32)
    x[:, 5] *= 50
    w = rng.standard_normal((32, 8)).astype(np.float32) * 0.02
    s = np.ones(32, np.float32)
    s[5] = 7.0
    fig = plots.activation_surfaces(x, x / s, w, w * s[:, None])
    axes = fig.axes
    assert [ax.get_zlabel() for ax in axes] == ["|X|", "|X|", "|W|", "|W|"]
    assert axes[0].get_zlim() == axes[1].get_zlim() and axes[2].get_zlim() == axes[3].get_zlim()
    assert axes[3].get_zlim()[1] == pytest.approx(float(np.abs(w * s[:, None]).max()))
