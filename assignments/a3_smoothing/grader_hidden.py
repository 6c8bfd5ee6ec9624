"""Grader for Assignment 3 (smoothing + equivalence): the hidden edge cases (not handed out).

Silent channels (act_max = 0 → s = 1), all-zero weight rows (w_max clamped to 1e-5), the
1e-5 floor on s, C = 1, float32 inputs, invalid α / shapes / NaN (an error is expected);
LayerNorms without affine parameters, linears without bias, dtype preservation; OPT (one s
shared by q, k, v), α at 0 and 1, a float32 model staying float32, the input model untouched.
"""

import copy

import numpy as np
import pytest

import minisq
from minisq.course.grading import assert_close, assert_equal, assert_equivalent, check_smoothing_factors, check_smoothing_fold
from minisq.config import ModelConfig
from minisq.nn import Linear

TINY_GPT2 = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, ffn_dim=64, max_positions=32)
TINY_OPT = ModelConfig(model_type="opt", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, ffn_dim=64,
                       max_positions=32, activation="relu", position_offset=2)


def ids(seed, shape, V=97):
    return np.random.default_rng(seed).integers(0, V, shape)


# --- Task 3.1 ---------------------------------------------------------------------------------

FACTOR_CASES = [
    ("silent-channel", [0.0, 3.0, 2.0], [1.0, 1.0, 1.0], 0.5),
    ("zero-weight-row", [1.0, 3.0], [0.0, 2.0], 0.5),
    ("both-zero", [0.0, 1.0], [0.0, 1.0], 0.7),
    ("floor-1e-5", [1e-30, 2.0], [5.0, 1.0], 1.0),
    ("alpha-0", [2.0, 0.0, 4.0], [0.5, 3.0, 1e3], 0.0),
    ("one-channel", [7.0], [0.1], 0.5),
    ("float32-inputs", np.array([3.0, 1e-3, 60.0], np.float32), np.array([0.2, 0.01, 5.0], np.float32), 0.5),
]


@pytest.mark.a3_1
@pytest.mark.parametrize("name, act, w, alpha", FACTOR_CASES, ids=[c[0] for c in FACTOR_CASES])
def test_factors_edge_cases(student, name, act, w, alpha):
    act, w = np.asarray(act), np.asarray(w)
    check_smoothing_factors("smoothing_factors", student.smoothing_factors(act, w, alpha), act, w, alpha)


@pytest.mark.a3_1
@pytest.mark.parametrize("act, w, alpha", [
    ([1.0, 2.0], [1.0, 1.0], 1.5),
    ([1.0, 2.0], [1.0, 1.0], -0.1),
    ([1.0, 2.0], [1.0, 1.0, 1.0], 0.5),
    ([1.0, np.nan], [1.0, 1.0], 0.5),
    ([1.0, 2.0], [np.inf, 1.0], 0.5),
], ids=["alpha>1", "alpha<0", "shape-mismatch", "nan", "inf"])
def test_factors_reject_bad_input(student, act, w, alpha):
    with pytest.raises(ValueError):
        student.smoothing_factors(np.asarray(act), np.asarray(w), alpha)


# --- Task 3.2 ---------------------------------------------------------------------------------

def fold_and_check(student, ln, targets, s):
    before_ln, before_targets = copy.deepcopy(ln), copy.deepcopy(targets)
    result = student.fold_smoothing(ln, targets, s)
    assert isinstance(result, tuple) and len(result) == 2, "fold_smoothing must return (new_ln, new_targets)"
    check_smoothing_fold("fold_smoothing", *result, before_ln, before_targets, s)
    for key in ("g", "b"):
        if before_ln[key] is not None:
            assert_equal(f"the original LayerNorm {key}", ln[key], before_ln[key], explain="do not modify in place")
    for old, new in zip(before_targets, targets):
        assert_equal("an original target weight", new.w, old.w, explain="do not modify in place")


rng = np.random.default_rng(7)


@pytest.mark.a3_2
@pytest.mark.parametrize("g_none, b_none", [(True, True), (True, False), (False, True)],
                         ids=["no-affine", "no-gain", "no-bias"])
def test_fold_layernorm_without_affine(student, g_none, b_none):
    C = 5
    ln = {"g": None if g_none else rng.uniform(1, 3, C).astype(np.float32),
          "b": None if b_none else rng.standard_normal(C).astype(np.float32)}
    targets = [Linear(rng.standard_normal((C, 4)).astype(np.float32), None)]
    fold_and_check(student, ln, targets, rng.uniform(0.5, 4, C))


@pytest.mark.a3_2
def test_fold_one_channel_three_targets(student):
    ln = {"g": np.array([30.0]), "b": np.array([-1.0])}
    targets = [Linear(rng.standard_normal((1, n)), rng.standard_normal(n)) for n in (2, 2, 3)]   # q, k, v
    fold_and_check(student, ln, targets, np.array([6.5]))


@pytest.mark.a3_2
def test_fold_keeps_float32(student):
    C = 8
    ln = {"g": rng.uniform(1, 50, C).astype(np.float32), "b": rng.standard_normal(C).astype(np.float32)}
    targets = [Linear(rng.standard_normal((C, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32))]
    fold_and_check(student, ln, targets, rng.uniform(0.1, 20, C))      # s is float64


@pytest.mark.a3_2
def test_fold_square_weight_rows_not_columns(student):
    C = 4
    ln = {"g": np.ones(C), "b": np.zeros(C)}
    targets = [Linear(rng.standard_normal((C, C)), None)]
    fold_and_check(student, ln, targets, np.array([1.0, 2.0, 4.0, 8.0]))


# --- Task 3.3 ---------------------------------------------------------------------------------

def calibrated(config, dtype):
    model = minisq.synthetic_model(config, seed=2, dtype=dtype)
    return model, minisq.calibrate(model, [ids(4, (2, 12)), ids(5, (1, 20))], progress=False)


def params_close(smoothed, reference, rtol):
    for name, leaf in reference.linears().items():
        assert_close(f"{name}.w", smoothed.linears()[name].w, leaf.w, rtol=rtol,
                     explain="compare with minisq.smooth(model, stats, alpha)")


@pytest.mark.a3_3
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_opt_qkv_share_one_s(student, alpha):
    model, stats = calibrated(TINY_OPT, "float64")
    smoothed = student.smooth_model(model, stats, alpha)
    report = minisq.check_equivalence(model, smoothed, ids(6, (2, 15)), dtype="float64", tol=1e-10)
    assert_equivalent("smooth_model (OPT, float64)", report)
    params_close(smoothed, minisq.smooth(model, stats, alpha=alpha), 1e-12)


@pytest.mark.a3_3
def test_gpt2_alpha_1(student):
    model, stats = calibrated(TINY_GPT2, "float64")
    smoothed = student.smooth_model(model, stats, 1.0)
    assert_equivalent("smooth_model (α = 1)", minisq.check_equivalence(model, smoothed, ids(7, (1, 10))))
    params_close(smoothed, minisq.smooth(model, stats, alpha=1.0), 1e-12)


@pytest.mark.a3_3
def test_float32_model_stays_float32_and_original_untouched(student):
    model, stats = calibrated(TINY_GPT2, "float32")
    before = {name: leaf.w.copy() for name, leaf in model.linears().items()}
    g_before = model.params["h"][0]["ln_1"]["g"].copy()
    smoothed = student.smooth_model(model, stats, 0.5)
    for name, leaf in smoothed.linears().items():
        assert leaf.w.dtype == np.float32, f"smooth_model: {name}.w became {leaf.w.dtype}; keep the model's dtype"
    assert smoothed.params["h"][0]["ln_1"]["g"].dtype == np.float32, "smooth_model: h.0.ln_1.g changed dtype"
    params_close(smoothed, minisq.smooth(model, stats, alpha=0.5), 1e-6)
    for name, leaf in model.linears().items():
        assert_equal(f"the original {name}.w", leaf.w, before[name], explain="smooth_model must not modify its input")
    assert_equal("the original h.0.ln_1.g", model.params["h"][0]["ln_1"]["g"], g_before,
                 explain="smooth_model must not modify its input")
