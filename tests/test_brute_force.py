"""Every scale, factor and statistic minisq computes, held against a brute-force computation
from its definition: Python loops over Python floats (IEEE double, ``round`` = half to even),
never minisq's own helpers.

Legend: T tokens, C channels, C_in / C_out a linear's widths, H heads, D head dim, N samples.
"""

from __future__ import annotations

import numpy as np
import pytest

import minisq
from minisq.baselines import quantize_per_group
from minisq.quant import quantize_per_input_channel

QMAX = 127


def _ids(seed, shape, V=101):
    return np.random.default_rng(seed).integers(0, V, shape)


def _delta(values) -> float:
    # one group's dynamic scale: max |x| / 127, and 1 for an all-zero group
    m = max(abs(float(v)) for v in values)
    return m / QMAX if m > 0 else 1.0


def _code(v: float, delta: float) -> int:
    # clip(round-half-even(v / Δ), ±127) with Python's round
    return max(-QMAX, min(QMAX, round(float(v) / delta)))


def _x(seed, shape):
    """float64 values with exact rounding ties: each row's max is 127 · 2^-3, so Δ = 2^-3 and
    the row's other entries k · 2^-4 land on halves (k odd)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2000, 2000, shape) / 16.0
    x = np.clip(x, -127 / 8, 127 / 8)
    x[..., 0] = 127 / 8
    return x


# --- the quantizers -----------------------------------------------------------------------------

def test_per_tensor_token_and_channel_codes_and_scales_equal_brute_force():
    x = _x(1, (6, 9))
    x[2] *= 0.0                                      # an all-zero token: Δ = 1, codes 0
    x[4, 3] = 1e3                                    # an outlier that sets its token's and column's scale
    q, s = minisq.quantize_per_tensor(x)
    d = _delta(x.ravel())
    assert float(s) == d
    assert q.tolist() == [[_code(v, d) for v in row] for row in x]
    q, s = minisq.quantize_per_token(x)
    for t, row in enumerate(x):
        assert float(s[t, 0]) == _delta(row)
        assert q[t].tolist() == [_code(v, _delta(row)) for v in row]
    w = x                                            # as a weight [C_in, C_out]: one scale per column
    q, s = minisq.quantize_per_channel(w)
    for j in range(w.shape[1]):
        col = w[:, j]
        assert float(s[0, j]) == _delta(col)
        assert q[:, j].tolist() == [_code(v, _delta(col)) for v in col]
    assert (np.abs(x[0] / _delta(x[0])) % 1 == 0.5).any()       # real ties were rounded


def test_static_scale_codes_clip_at_127_and_round_half_even():
    x = np.array([[-300.0, 126.5, 127.5, 0.5, -2.5, 3.0]])
    q, _ = minisq.quantize_per_tensor(x, scale=1.0)
    assert q.tolist() == [[-127, 126, 127, 0, -2, 3]]
    q, _ = minisq.quantize_per_token(x, scale=np.array([[2.0]]))
    assert q.tolist() == [[_code(v, 2.0) for v in x[0]]]


def test_per_sequence_scales_take_real_tokens_of_each_sequence_only():
    x = _x(2, (3, 5, 4))
    x[1, 0, 2] = 500.0                               # on a padding token: never sets a scale
    x[2, 4, 1] = -90.0                               # on a real token: sets sequence 2's scale
    mask = np.ones((3, 5), np.int64)
    mask[1, :2] = 0
    q, s = minisq.quantize_per_sequence(x, mask)
    for b in range(3):
        d = _delta([x[b, t, c] for t in range(5) if mask[b, t] for c in range(4)])
        assert float(s[b, 0, 0]) == d
        assert q[b].tolist() == [[_code(v, d) for v in row] for row in x[b]]   # padding clipped to ±127
    assert q[1, 0, 2] == 127


def test_per_input_channel_scales_take_real_tokens_of_each_sequence_only():
    x = _x(3, (2, 6, 5))
    x[0, 0, 3] = 400.0
    mask = np.ones((2, 6), np.int64)
    mask[0, 0] = 0
    q, s = quantize_per_input_channel(x, mask)
    for b in range(2):
        for k in range(5):
            d = _delta([x[b, t, k] for t in range(6) if mask[b, t]])
            assert float(s[b, 0, k]) == d
            assert q[b, :, k].tolist() == [_code(v, d) for v in x[b, :, k]]


def test_per_group_weight_scales_and_codes_equal_brute_force():
    w = _x(4, (12, 5))                               # [C_in, C_out], groups of 4 input channels
    w[5, 2] = -77.0
    q, s = quantize_per_group(w, 4)
    for g in range(3):
        for j in range(5):
            rows = range(4 * g, 4 * g + 4)
            d = _delta([w[r, j] for r in rows])
            assert float(s[g, j]) == d
            assert [int(q[r, j]) for r in rows] == [_code(w[r, j], d) for r in rows]


# --- calibration statistics, smoothing factors, static scales ------------------------------------

@pytest.fixture(scope="module")
def opt_float64(make_checkpoint):
    return minisq.load(make_checkpoint("opt")[0], dtype="float64")


@pytest.fixture(scope="module")
def gpt2_float64(make_checkpoint):
    return minisq.load(make_checkpoint("gpt2")[0], dtype="float64")


CALIB = [_ids(30, (2, 9)), _ids(31, 13), _ids(32, (1, 6))]


def _seen(model, batches):
    """Every input and output row of every linear over these batches: name -> ([N, C_in], [N, C_out])."""
    xs, ys = {}, {}

    def spy(name, leaf):
        def run(x, mask=None):
            y = leaf(x, mask)
            xs.setdefault(name, []).append(np.asarray(x).reshape(-1, x.shape[-1]))
            ys.setdefault(name, []).append(np.asarray(y).reshape(-1, y.shape[-1]))
            return y
        return run

    spied = model.replace_linears(spy)
    for b in batches:
        spied(b)
    return {k: (np.concatenate(xs[k]), np.concatenate(ys[k])) for k in xs}


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_calibration_statistics_equal_brute_force(gpt2_float64, opt_float64, family):
    """channel max, per-tensor max of input and output, and output-channel max, over every
    token of every batch."""
    model = {"gpt2": gpt2_float64, "opt": opt_float64}[family]
    stats = minisq.calibrate(model, CALIB, progress=False)
    seen = _seen(model, CALIB)
    assert set(stats.channel_absmax) == set(seen)
    for name, (X, Y) in seen.items():
        N, C_in = X.shape
        assert stats.channel_absmax[name].tolist() == [max(abs(X[t, k]) for t in range(N)) for k in range(C_in)]
        assert stats.output_channel_absmax[name].tolist() == \
            [max(abs(Y[t, j]) for t in range(N)) for j in range(Y.shape[1])]
        assert stats.input_absmax[name] == max(abs(v) for v in X.ravel())
        assert stats.output_absmax[name] == max(abs(v) for v in Y.ravel())
    # the maxima come from more than one batch (a statistic of the last batch only would show)
    argmax_rows = {int(np.abs(X).max(axis=1).argmax()) for X, _ in seen.values()}
    assert len({r >= 18 for r in argmax_rows}) == 2


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_static_qkv_scales_equal_calibrated_q_k_v_ranges_over_127(gpt2_float64, opt_float64, family):
    """Δq, Δk, Δv per layer: max |q|, |k|, |v| over the calibration tokens / 127 — GPT-2's q, k, v
    are the thirds of c_attn's output, OPT's the outputs of q_proj, k_proj, v_proj."""
    model = {"gpt2": gpt2_float64, "opt": opt_float64}[family]
    stats = minisq.calibrate(model, CALIB, progress=False)
    q = minisq.quantize(model, "O3", stats=stats, attn_bmm="static")
    seen = _seen(model, CALIB)
    C = model.config.hidden_size
    for i in range(model.config.num_layers):
        if family == "gpt2":
            Y = seen[f"h.{i}.attn.c_attn"][1]
            parts = [Y[:, :C], Y[:, C:2 * C], Y[:, 2 * C:]]
        else:
            parts = [seen[f"layers.{i}.self_attn.{p}_proj"][1] for p in "qkv"]
        want = [max(abs(v) for v in part.ravel()) / QMAX for part in parts]
        assert [float(s) for s in q.attn_quant.static[i]] == want, i
        assert len(set(want)) == 3


def test_llama_static_q_k_ranges_are_the_largest_rotated_pair_norms(make_checkpoint, tmp_path):
    """RoPE rotates channels (j, j + D/2) of each head together: the static range of q and k is
    the largest sqrt(max|a_j|² + max|a_{j+D/2}|²) over heads and pairs, that of v its max."""
    from test_llama import hf_llama

    hf = hf_llama("llama", seed=3)
    hf.save_pretrained(tmp_path)
    model = minisq.load(tmp_path, dtype="float64")
    stats = minisq.calibrate(model, CALIB[:2], progress=False)
    seen = _seen(model, CALIB[:2])
    D = model.config.head_dim
    for i in range(model.config.num_layers):
        want = []
        for p in "qk":
            Y = seen[f"layers.{i}.self_attn.{p}_proj"][1]
            ch = [max(abs(v) for v in Y[:, c]) for c in range(Y.shape[1])]
            want.append(max((ch[h * D + j] ** 2 + ch[h * D + j + D // 2] ** 2) ** 0.5
                            for h in range(Y.shape[1] // D) for j in range(D // 2)))
        want.append(max(abs(v) for v in seen[f"layers.{i}.self_attn.v_proj"][1].ravel()))
        np.testing.assert_allclose(stats.qkv_absmax(model, i), want, rtol=1e-15, atol=0)


def test_linear_source_factors_equal_brute_force(opt_float64):
    """Eq. 4 with its clamps for the rows whose source is a linear (OPT's fc1 -> fc2, v -> out):
    act = max over tokens of the target's input channel, w = max over the target's row."""
    model, alpha = opt_float64, 0.65
    stats = minisq.calibrate(model, CALIB, progress=False)
    smoothed = minisq.smooth(model, stats, alpha=alpha, groups=("fc1_fc2", "v_out"))
    factors = smoothed.info["smoothing"]["factors"]
    for i in range(model.config.num_layers):
        for source, target in ((f"layers.{i}.fc1", f"layers.{i}.fc2"),
                               (f"layers.{i}.self_attn.v_proj", f"layers.{i}.self_attn.out_proj")):
            a = stats.channel_absmax[target]
            W = model.linears()[target].w
            want = []
            for j in range(W.shape[0]):
                w = max(max(abs(v) for v in W[j]), 1e-5)
                want.append(max(a[j] ** alpha / w ** (1 - alpha), 1e-5) if a[j] > 0 else 1.0)
            np.testing.assert_allclose(factors[source], want, rtol=1e-14, atol=0)


# --- the α search's error metric -------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["O1", "O3"])
def test_alpha_search_error_is_the_relative_squared_error_of_the_targets(opt_float64, preset):
    """errors[source][α] = Σ_targets ‖Y - Ŷ‖² / Σ_targets ‖Y‖² on the kept samples X, with
    Y = X W + b and Ŷ the preset's W8A8 output of the smoothed (X / s, diag(s) W): per-tensor
    weights; per-token activations (O1) or one static scale max|X / s| / 127 (O3)."""
    model = opt_float64
    stats = minisq.calibrate(model, CALIB, progress=False, keep_samples=12)
    result = minisq.search_alpha(model, stats, grid=(0.2, 0.8), preset=preset, groups=("ln_qkv",))
    source = "layers.1.self_attn_layer_norm"
    targets = [f"layers.1.self_attn.{p}_proj" for p in "qkv"]
    X = stats.samples[targets[0]].astype(np.float64)                           # [N, C_in]
    C_in = X.shape[1]
    for alpha in (0.2, 0.5, 0.8):
        act = stats.channel_absmax[targets[0]]
        w_max = [max(abs(model.linears()[t].w[j, k]) for t in targets for k in range(C_in)) for j in range(C_in)]
        s = np.array([max(act[j] ** alpha / max(w_max[j], 1e-5) ** (1 - alpha), 1e-5) if act[j] > 0 else 1.0
                      for j in range(C_in)])
        Xs = X / s
        if preset == "O1":
            x_hat = np.array([[_code(v, _delta(row)) * _delta(row) for v in row] for row in Xs])
        else:
            d = _delta(Xs.ravel())
            x_hat = np.array([[_code(v, d) * d for v in row] for row in Xs])
        num = den = 0.0
        for t in targets:
            leaf = model.linears()[t]
            Ws = leaf.w * s[:, None]
            dw = _delta(Ws.ravel())
            w_hat = np.array([[_code(v, dw) * dw for v in row] for row in Ws])
            Y = X @ leaf.w + leaf.b
            num += float(((Y - (x_hat @ w_hat + leaf.b)) ** 2).sum())
            den += float((Y ** 2).sum())
        np.testing.assert_allclose(result.errors[source][alpha], num / den, rtol=1e-9)
