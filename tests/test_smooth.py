"""Calibration, smoothing equivalence, the α search and the synthetic-outlier model."""


import numpy as np
import pytest

import minisq
from minisq.calibrate import CalibrationStats, calibrate
from minisq.diagnostics import check_equivalence, logit_error
from minisq.config import ModelConfig
from minisq.qlinear import quantize
from minisq.smooth import SMOOTHING_TABLE, mappings_for, search_alpha, smooth, smoothing_factors
from minisq.synthetic import synthetic_model
from minisq.tree import _walk

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _ids(seed, shape, V=101):
    return np.random.default_rng(seed).integers(0, V, shape)


@pytest.fixture(scope="module")
def float64_models(make_checkpoint):
    return {
        "gpt2": minisq.load(make_checkpoint("gpt2")[0], dtype="float64"),
        "opt": minisq.load(make_checkpoint("opt")[0], dtype="float64"),
    }


@pytest.fixture(scope="module")
def float64_stats(float64_models):
    return {k: calibrate(m, [_ids(1, (2, 16)), _ids(2, (1, 24))], progress=False) for k, m in float64_models.items()}


# --- smoothing factors ----------------------------------------------------------------------

def test_smoothing_factors_formula_and_guards():
    act = np.array([4.0, 1.0, 0.0, 9.0])
    w = np.array([1.0, 4.0, 2.0, 0.0])
    s = smoothing_factors(act, w, 0.5)
    # s_j = act^0.5 / w^0.5, with w clamped to 1e-5 and zero-range activation channels at s = 1
    np.testing.assert_allclose(s, [2.0, 0.5, 1.0, 3.0 / np.sqrt(1e-5)])
    np.testing.assert_array_equal(smoothing_factors(act, w, 1.0)[:2], [4.0, 1.0])   # α=1: all into weights
    np.testing.assert_allclose(smoothing_factors(act, w, 0.0)[:2], [1.0, 0.25])     # α=0: 1/max|W|
    assert (smoothing_factors(np.full(3, 1e-30), np.full(3, 1e3), 0.0) >= 1e-5).all()  # clamp s >= 1e-5
    with pytest.raises(minisq.ConfigError, match="alpha"):
        smoothing_factors(act, w, 1.5)
    with pytest.raises(minisq.CalibrationError, match="NaN"):
        smoothing_factors(np.array([np.nan, 1.0]), np.ones(2), 0.5)


def test_table_is_data_and_explains_what_cannot_be_folded():
    groups = {m.group for m in SMOOTHING_TABLE["opt"]}
    assert groups == {"ln_qkv", "ln_fc1", "fc1_fc2", "v_out"}
    assert all(m.why for table in SMOOTHING_TABLE.values() for m in table)
    from minisq.smooth import NOT_FOLDABLE
    assert "GELU" in NOT_FOLDABLE["gpt2"]["h.{i}.mlp.c_fc -> h.{i}.mlp.c_proj"]


# --- equivalence in float64 -------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "opt"])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_smoothing_is_an_equivalence(float64_models, float64_stats, family, alpha):
    model = float64_models[family]
    smoothed = smooth(model, float64_stats[family], alpha=alpha, groups="all")
    report = check_equivalence(model, smoothed, _ids(3, (2, 20)))
    assert report.passed, str(report)
    assert report.max_rel <= 1e-10
    assert all(rel <= 1e-10 for _, rel in report.layers.values())
    # and the weights did change (not a no-op) whenever some s != 1
    name = "h.0.attn.c_attn" if family == "gpt2" else "layers.0.self_attn.q_proj"
    assert not np.array_equal(model.linears()[name].w, smoothed.linears()[name].w)


@pytest.mark.parametrize("group", ["fc1_fc2", "v_out", "ln_qkv", "ln_fc1"])
def test_each_opt_mapping_alone_is_an_equivalence(float64_models, float64_stats, group):
    model = float64_models["opt"]
    smoothed = smooth(model, float64_stats["opt"], alpha=0.5, groups=(group,))
    assert check_equivalence(model, smoothed, _ids(4, (1, 20))).max_rel <= 1e-10


def test_equivalence_check_catches_a_wrong_fold(float64_models, float64_stats):
    """The check is not vacuous: folding s into the wrong side (multiplying the LayerNorm) fails."""
    model = float64_models["gpt2"]
    smoothed = smooth(model, float64_stats["gpt2"], alpha=0.5)
    ln = smoothed.params["h"][0]["ln_1"]
    s = smoothed.info["smoothing"]["factors"]["h.0.ln_1"]
    broken = dict(smoothed.params)
    broken["h"] = list(broken["h"])
    broken["h"][0] = {**broken["h"][0], "ln_1": {"g": ln["g"] * s * s, "b": ln["b"] * s * s}}
    report = check_equivalence(model, smoothed.evolve(params=broken), _ids(5, (1, 12)))
    assert not report.passed and report.max_rel > 1e-3
    assert "FAIL" in str(report)


def test_post_ln_opt_smooths_only_what_is_equivalent(make_checkpoint):
    model = minisq.load(make_checkpoint("opt", do_layer_norm_before=False, word_embed_proj_dim=16)[0], dtype="float64")
    stats = calibrate(model, [_ids(6, (2, 16))], progress=False)
    with pytest.warns(UserWarning, match="post-LN"):
        smoothed = smooth(model, stats, alpha=0.5, groups="all")
    assert set(smoothed.info["smoothing"]["factors"]) == {f"layers.{i}.{s}" for i in range(2)
                                                         for s in ("fc1", "self_attn.v_proj")}
    assert check_equivalence(model, smoothed, _ids(7, (1, 16))).max_rel <= 1e-10


def test_smooth_leaves_the_original_untouched(float64_models, float64_stats):
    model = float64_models["opt"]
    before = {k: v.w.copy() for k, v in model.linears().items()}
    ln_before = model.params["layers"][0]["self_attn_layer_norm"]["g"].copy()
    smooth(model, float64_stats["opt"], alpha=0.5, groups="all")
    for k, v in model.linears().items():
        np.testing.assert_array_equal(v.w, before[k])
    np.testing.assert_array_equal(model.params["layers"][0]["self_attn_layer_norm"]["g"], ln_before)


# --- smoothing does what the paper says on a model with outliers --------------------------------

SYN = ModelConfig(vocab_size=500, hidden_size=128, num_layers=3, num_heads=4, ffn_dim=512, max_positions=128)


@pytest.fixture(scope="module")
def synthetic():
    model = synthetic_model(SYN, outlier_scale=100, seed=0)
    calib = [_ids(10 + i, (4, 64), V=500) for i in range(4)]
    return model, calib


def test_synthetic_model_is_labeled(synthetic):
    model, _ = synthetic
    assert "synthetic" in model.config.name and model.config.is_synthetic
    assert "synthetic" in repr(model).lower() and "SYNTHETIC" in model.info["synthetic"]


def test_smoothing_flattens_the_activations_as_predicted(synthetic):
    model, calib = synthetic
    model = model.astype("float64")
    stats = calibrate(model, calib, progress=False)
    smoothed = smooth(model, stats, alpha=0.5)
    after = calibrate(smoothed, calib, progress=False)
    for name in ("h.0.attn.c_attn", "h.2.mlp.c_fc"):
        source = name.replace("attn.c_attn", "ln_1").replace("mlp.c_fc", "ln_2")
        s = smoothed.info["smoothing"]["factors"][source]
        # every channel's range is divided by exactly its s
        np.testing.assert_allclose(after.channel_absmax[name], stats.channel_absmax[name] / s, rtol=1e-12)
        # the weights' rows are multiplied by exactly s
        np.testing.assert_array_equal(smoothed.linears()[name].w, model.linears()[name].w * s[:, None])
        ratio = lambda a: a.max() / np.median(a)  # noqa: E731
        before_r, after_r = ratio(stats.channel_absmax[name]), ratio(after.channel_absmax[name])
        print(f"{name}: max/median channel range {before_r:.1f} -> {after_r:.1f}")
        assert before_r > 50 and after_r < before_r / 5


def test_smoothquant_beats_naive_w8a8_on_outliers(synthetic):
    model, calib = synthetic
    stats = calibrate(model, calib, progress=False)
    smoothed = smooth(model, stats, alpha=0.5)
    s_stats = calibrate(smoothed, calib, progress=False)
    ids = _ids(20, (4, 64), V=500)
    ref = model(ids)
    rows = {
        "naive W8A8 (per-tensor)": logit_error(ref, quantize(model, "naive")(ids)),
        "O1 per-token, no smoothing": logit_error(ref, quantize(model, "O1")(ids)),
        "SmoothQuant-O1": logit_error(ref, quantize(smoothed, "O1")(ids)),
        "SmoothQuant-O2": logit_error(ref, quantize(smoothed, "O2")(ids)),
        "SmoothQuant-O3": logit_error(ref, quantize(smoothed, "O3", stats=s_stats)(ids)),
    }
    print(f"\nSYNTHETIC outlier model {model.config.name}: logits vs float")
    for name, e in rows.items():
        print(f"  {name:<30} rel err {e['rel_err']:.4f}   KL {e['kl']:.2e}")
    naive, o1 = rows["naive W8A8 (per-tensor)"], rows["O1 per-token, no smoothing"]
    for sq in ("SmoothQuant-O1", "SmoothQuant-O2", "SmoothQuant-O3"):
        assert naive["kl"] > 4 * rows[sq]["kl"], sq   # measured 0.307 vs <= 0.064 (per-sequence scales)
        assert naive["rel_err"] > 2 * rows[sq]["rel_err"], sq   # measured 0.233 vs <= 0.107
    # per-token activations without smoothing sit in between
    assert naive["kl"] > 1.5 * o1["kl"] and o1["kl"] > 1.5 * rows["SmoothQuant-O1"]["kl"]


# --- calibration --------------------------------------------------------------------------------

def test_calibration_equals_brute_force_max(float64_models):
    model = float64_models["opt"]
    batches = [_ids(30, (2, 9)), _ids(31, (11,)), _ids(32, (1, 5))]
    seen, outs = {}, {}

    def spy(name, leaf):
        def run(x, mask=None):
            y = leaf(x, mask)
            seen.setdefault(name, []).append(x.reshape(-1, x.shape[-1]))
            outs.setdefault(name, []).append(np.abs(y).max())
            return y
        return run

    spied = model.replace_linears(spy)
    for b in batches:
        spied(b)
    stats = calibrate(model, batches, progress=False, keep_samples=7)
    assert stats.n_tokens == 18 + 11 + 5
    for name, xs in seen.items():
        X = np.concatenate(xs)
        np.testing.assert_array_equal(stats.channel_absmax[name], np.abs(X).max(axis=0))
        assert stats.input_absmax[name] == np.abs(X).max()
        np.testing.assert_array_equal(stats.samples[name], X[:7].astype(np.float32))
        assert stats.output_absmax[name] == max(outs[name])


def test_calibration_save_load_roundtrip_and_mismatch(tmp_path, float64_models, float64_stats):
    stats = calibrate(float64_models["gpt2"], [_ids(1, (2, 16))], progress=False, keep_samples=4)
    path = stats.save(tmp_path / "calib.npz")
    back = CalibrationStats.load(path, model=float64_models["gpt2"])
    assert back.input_absmax == stats.input_absmax and back.n_tokens == stats.n_tokens
    for k in stats.channel_absmax:
        np.testing.assert_array_equal(back.channel_absmax[k], stats.channel_absmax[k])
        np.testing.assert_array_equal(back.samples[k], stats.samples[k])
    with pytest.raises(minisq.CalibrationError, match="another model"):
        CalibrationStats.load(path, model=float64_models["opt"])
    with pytest.raises(minisq.CalibrationError, match="another model"):
        smooth(float64_models["opt"], stats)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(minisq.CalibrationError, match="not a minisq calibration file"):
        CalibrationStats.load(tmp_path / "junk.npz")


def test_calibration_rejects_empty_and_non_finite(float64_models):
    model = float64_models["gpt2"]
    with pytest.raises(minisq.CalibrationError, match="empty"):
        calibrate(model, [], progress=False)
    with pytest.raises(minisq.CalibrationError, match="empty"):
        calibrate(model, [np.zeros((1, 0), int)], progress=False)
    bad = dict(model.params)
    bad["wte"] = model.params["wte"].copy()
    bad["wte"][3] = np.inf
    with pytest.raises(minisq.CalibrationError, match="non-finite"):
        calibrate(model.evolve(params=bad), [np.array([3, 4, 5])], progress=False)


# --- α search -----------------------------------------------------------------------------------

def test_alpha_search_never_worse_than_global(synthetic):
    model, calib = synthetic
    stats = calibrate(model, calib, progress=False, keep_samples=128)
    result = search_alpha(model, stats, preset="O1", global_alpha=0.5)
    print("\n" + result.table())
    assert set(result.alpha) == {m.source for m in mappings_for(model.config)}
    for src, a in result.alpha.items():
        assert result.errors[src][a] <= result.errors[src][0.5]
    # on planted outliers the error really depends on α (the search is not vacuous)
    errs = result.errors["h.0.ln_1"]
    assert errs[0.0] > 3 * min(errs.values())
    # the per-layer α dict drives smooth(); the smoothed model stays equivalent
    per_layer = smooth(model.astype("float64"), stats, alpha=result.alpha)
    assert check_equivalence(model.astype("float64"), per_layer, _ids(40, (1, 16), V=500)).passed


def test_weight_absmax_and_factors_equal_brute_force_on_square_weights(make_checkpoint):
    """q, k, v are square: a max taken over the wrong axis would not crash, only be wrong."""
    from minisq.smooth import weight_absmax

    model = minisq.load(make_checkpoint("opt")[0], dtype="float64")
    stats = calibrate(model, [_ids(30, (2, 20))], progress=False)
    targets = [f"layers.1.self_attn.{p}_proj" for p in "qkv"]
    ws = [model.linears()[t].w for t in targets]                         # [C_in, C_out], C_in == C_out
    assert ws[0].shape[0] == ws[0].shape[1]
    C = ws[0].shape[0]
    brute_w = [max(abs(w[j, k]) for w in ws for k in range(C)) for j in range(C)]
    np.testing.assert_array_equal(weight_absmax(model.params, targets), brute_w)
    smoothed = smooth(model, stats, alpha=0.3)
    act = stats.channel_absmax[targets[0]]
    brute_s = [max(act[j] ** 0.3 / max(brute_w[j], 1e-5) ** 0.7, 1e-5) if act[j] > 0 else 1.0 for j in range(C)]
    np.testing.assert_allclose(smoothed.info["smoothing"]["factors"]["layers.1.self_attn_layer_norm"], brute_s,
                               rtol=1e-14)


def test_alpha_search_breaks_ties_towards_the_global_alpha(synthetic):
    """A mapping whose activations are all zero gets s = 1 for every α: all α tie, and the
    search must keep the global α (not the grid's first)."""
    model, calib = synthetic
    stats = calibrate(model, calib[:1], progress=False, keep_samples=16)
    target = "h.1.attn.c_attn"
    stats.samples[target] = np.zeros_like(stats.samples[target])
    stats.channel_absmax[target] = np.zeros_like(stats.channel_absmax[target])
    result = search_alpha(model, stats, grid=(0.0, 0.25, 0.75, 1.0), global_alpha=0.6)
    errors = result.errors["h.1.ln_1"]
    assert len(set(errors.values())) == 1            # a real tie
    assert result.alpha["h.1.ln_1"] == 0.6


# --- the per-layer steps both drivers call ------------------------------------------------------

def test_groups_resolve_the_same_way_everywhere(float64_models):
    from minisq.smooth import DEFAULT_GROUPS, resolve_groups

    config = float64_models["opt"].config
    assert resolve_groups(config, None) == resolve_groups(config, "default") == DEFAULT_GROUPS
    assert resolve_groups(config, "all") == tuple(m.group for m in SMOOTHING_TABLE["opt"])
    assert resolve_groups(config, "v_out") == ("v_out",)
    assert resolve_groups(config, ["fc1_fc2", "v_out"]) == ("fc1_fc2", "v_out")
    with pytest.raises(minisq.ConfigError, match=r"unknown smoothing groups \['up_down'\] for opt"):
        resolve_groups(config, ("ln_qkv", "up_down"))
    with pytest.raises(minisq.ConfigError, match="groups must be"):
        resolve_groups(config, 3)


def test_one_layer_is_smoothed_from_its_own_stats_alone(float64_models, float64_stats):
    """smooth_layer needs only the layer's subtree and that layer's ranges: given a stats
    object holding layer 1 alone, it folds exactly what smooth folds into layer 1 of the
    whole model."""
    from minisq.smooth import smooth_layer, smoothing_rows

    model, stats = float64_models["opt"], float64_stats["opt"]
    whole = smooth(model, stats, alpha=0.5, groups="all")
    mine = {k: v for k, v in stats.channel_absmax.items() if k.startswith("layers.1.")}
    alone = CalibrationStats(mine, {}, {}, {}, 0, {})
    layer, factors = smooth_layer(model.config, 1, model.params["layers"][1], alone, 0.5,
                                  smoothing_rows(model.config, "all"))
    assert list(factors) == [k for k in whole.info["smoothing"]["factors"] if k.startswith("layers.1.")]
    for src, s in factors.items():
        np.testing.assert_array_equal(s, whole.info["smoothing"]["factors"][src])
    for (na, a), (nb, b) in zip(_walk(layer, ""), _walk(whole.params["layers"][1], "")):
        assert na == nb
        np.testing.assert_array_equal(a.w, b.w)
    np.testing.assert_array_equal(layer["final_layer_norm"]["g"], whole.params["layers"][1]["final_layer_norm"]["g"])
    with pytest.raises(minisq.CalibrationError, match="layers.0.self_attn.q_proj"):   # layer 0's ranges are not in it
        smooth_layer(model.config, 0, model.params["layers"][0], alone, 0.5, smoothing_rows(model.config, "all"))
