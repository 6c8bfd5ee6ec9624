"""Grader for Assignment 3 (smoothing + equivalence): the public tests. Run it with

    pytest assignments/a3_smoothing            # every task
    pytest assignments/a3_smoothing -m a3_3    # Task 3.3 only

Factors are held to ``minisq.smoothing_factors``, the fold to the formula (g / s, b / s,
w * s[:, None]) through ``minisq.course.grading``, and the smoothed model to the original with
``minisq.check_equivalence`` in float64, and to ``minisq.smooth``. Hidden tests
(``grader_hidden.py``) add the edge cases HANDOUT.md lists.
"""

import copy

import numpy as np
import pytest

import minisq
from minisq.course.grading import (assert_close, assert_equal, assert_equivalent, assert_raises_value_error,
                                   check_smoothed_layernorms, check_smoothing_factors, check_smoothing_fold)
from minisq.config import ModelConfig
from minisq.nn import Linear

TINY_GPT2 = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, ffn_dim=64, max_positions=32)
TINY_OPT = ModelConfig(model_type="opt", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, ffn_dim=64,
                       max_positions=32, activation="relu", position_offset=2)


def ids(seed, shape, V=97):
    return np.random.default_rng(seed).integers(0, V, shape)


# --- Task 3.1 ---------------------------------------------------------------------------------

@pytest.mark.a3_1
def test_factors_formula(student):
    act, w = np.array([4.0, 1.0, 9.0, 0.5]), np.array([1.0, 4.0, 0.25, 2.0])
    check_smoothing_factors("smoothing_factors", student.smoothing_factors(act, w, 0.5), act, w, 0.5)


@pytest.mark.a3_1
@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.75, 1.0])
def test_factors_any_alpha(student, alpha):
    rng = np.random.default_rng(1)
    act, w = rng.uniform(0.01, 50, 16), rng.uniform(0.001, 2, 16)
    check_smoothing_factors("smoothing_factors", student.smoothing_factors(act, w, alpha), act, w, alpha)


# --- Task 3.2 ---------------------------------------------------------------------------------

def layernorm_and_targets(C=6, widths=(5, 3), dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    ln = {"g": rng.uniform(0.5, 40, C).astype(dtype), "b": rng.standard_normal(C).astype(dtype)}
    targets = [Linear(rng.standard_normal((C, n)).astype(dtype), rng.standard_normal(n).astype(dtype))
               for n in widths]
    s = rng.uniform(0.1, 10, C)
    return ln, targets, s


def check_fold(student, ln, targets, s):
    """Fold with copies of the parameters; check the result and that the originals are untouched."""
    before_ln, before_targets = copy.deepcopy(ln), copy.deepcopy(targets)
    result = student.fold_smoothing(ln, targets, s)
    assert isinstance(result, tuple) and len(result) == 2, "fold_smoothing must return (new_ln, new_targets)"
    check_smoothing_fold("fold_smoothing", *result, before_ln, before_targets, s)
    in_place = "your fold changed its input in place; return new arrays (g / s, not g /= s)"
    for key in ("g", "b"):
        if before_ln[key] is not None:
            assert_equal(f"the original LayerNorm {key}", ln[key], before_ln[key], explain=in_place)
    for old, new in zip(before_targets, targets):
        assert_equal("an original target weight", new.w, old.w, explain=in_place)


@pytest.mark.a3_2
def test_fold_one_layernorm_two_targets(student):
    check_fold(student, *layernorm_and_targets())


@pytest.mark.a3_2
def test_fold_one_target_float64(student):
    check_fold(student, *layernorm_and_targets(C=4, widths=(7,), dtype=np.float64, seed=1))


# --- Task 3.3 ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_float64():
    model = minisq.synthetic_model(TINY_GPT2, seed=1, dtype="float64")
    stats = minisq.calibrate(model, [ids(1, (2, 16)), ids(2, (1, 24))], progress=False)
    return model, stats


def compare_with_minisq(smoothed, reference):
    """Every LayerNorm and linear of the smoothed model against minisq.smooth's."""
    layers = "h" if "h" in reference.params else "layers"
    for i, (mine, want) in enumerate(zip(smoothed.params[layers], reference.params[layers])):
        for ln in [k for k, v in want.items() if isinstance(v, dict) and "g" in v]:
            for key in ("g", "b"):
                assert_close(f"{layers}.{i}.{ln}.{key}", mine[ln][key], want[ln][key], rtol=1e-12,
                             explain="each LayerNorm is divided by the s of the linears it feeds")
    for name, leaf in reference.linears().items():
        assert_close(f"{name}.w", smoothed.linears()[name].w, leaf.w, rtol=1e-12,
                     explain="each linear fed by a LayerNorm has its rows multiplied by that s; "
                             "c_proj and lm_head are not smoothed")


@pytest.mark.a3_3
@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_smoothed_gpt2_is_equivalent(student, gpt2_float64, alpha):
    model, stats = gpt2_float64
    smoothed = student.smooth_model(model, stats, alpha)
    assert not np.array_equal(smoothed.linears()["h.0.attn.c_attn"].w, model.linears()["h.0.attn.c_attn"].w), (
        "smooth_model: h.0.attn.c_attn is unchanged — a model that is not smoothed is trivially equivalent; "
        "fold s into every LayerNorm -> linears mapping")
    check_smoothed_layernorms("smooth_model", smoothed, model, stats, alpha)
    report = minisq.check_equivalence(model, smoothed, ids(3, (2, 20)), dtype="float64", tol=1e-10)
    assert_equivalent("smooth_model (float64 equivalence)", report)
    compare_with_minisq(smoothed, minisq.smooth(model, stats, alpha=alpha))


# --- the rules the handout states -------------------------------------------------------------

FACTOR_RULE = "ValueError for α outside [0, 1], shapes that differ or are not 1-D, NaN/inf"


@pytest.mark.a3_1
@pytest.mark.parametrize("act, w, alpha, what", [
    ([1.0, 2.0], [1.0, 1.0], 1.5, "alpha = 1.5"),
    ([1.0, 2.0], [1.0, 1.0, 1.0], 0.5, "shapes (2,) and (3,)"),
    ([[1.0, 2.0]], [[1.0, 1.0]], 0.5, "2-D ranges"),
    ([1.0, np.nan], [1.0, 1.0], 0.5, "a NaN range"),
], ids=["alpha", "shapes", "2-D", "nan"])
def test_rule_factors_reject_bad_input(student, act, w, alpha, what):
    assert_raises_value_error(f"smoothing_factors with {what}",
                              lambda: student.smoothing_factors(np.asarray(act), np.asarray(w), alpha), FACTOR_RULE)


@pytest.mark.a3_2
def test_rule_layernorm_without_gain_or_bias(student):
    rng = np.random.default_rng(3)
    targets = [Linear(rng.standard_normal((4, 3)).astype(np.float32), None)]
    check_fold(student, {"g": None, "b": None}, targets, rng.uniform(0.5, 4, 4))   # None: ones / zeros


@pytest.mark.a3_3
def test_rule_w_max_over_every_target(student):
    """OPT: one LayerNorm feeds q, k and v; w_max[j] is the max of |w[j, :]| over all three."""
    model = minisq.synthetic_model(TINY_OPT, seed=2, dtype="float64")
    stats = minisq.calibrate(model, [ids(4, (2, 12)), ids(5, (1, 20))], progress=False)
    smoothed = student.smooth_model(model, stats, 0.5)
    check_smoothed_layernorms("smooth_model (OPT)", smoothed, model, stats, 0.5)
    assert_equivalent("smooth_model (OPT, float64 equivalence)",
                      minisq.check_equivalence(model, smoothed, ids(6, (2, 15)), dtype="float64", tol=1e-10))
    compare_with_minisq(smoothed, minisq.smooth(model, stats, alpha=0.5))


@pytest.mark.a3_3
def test_rule_float32_stays_float32_and_the_input_is_untouched(student):
    model = minisq.synthetic_model(TINY_GPT2, seed=2, dtype="float32")
    stats = minisq.calibrate(model, [ids(4, (2, 12))], progress=False)
    before = {name: leaf.w.copy() for name, leaf in model.linears().items()}
    smoothed = student.smooth_model(model, stats, 0.5)
    for name, leaf in smoothed.linears().items():
        assert leaf.w.dtype == np.float32, (f"smooth_model: {name}.w became {leaf.w.dtype}; the rule: a float32 "
                                            f"model stays float32 (cast s to the parameters' dtype)")
    for name, leaf in model.linears().items():
        assert_equal(f"the original {name}.w", leaf.w, before[name],
                     explain="the rule: the input model is untouched (return a new one)")
