"""Grader for Assignment 4 (calibration + a W8A8 model): the hidden edge cases (not handed out).

Calibration over [T] and [B, T] batches of different lengths (one token too) on OPT, an empty
batch list (an error is expected); static scales of an all-zero layer, float64, NaN and
negative ranges; leaves with leading axes, M = 1, clipping static scales, float64 and no
bias, invalid choices; OPT for every preset, skip patterns, float64 models, the input model
untouched.
"""

import fnmatch

import numpy as np
import pytest

import minisq
from minisq.course.grading import assert_close, assert_equivalent, check_channel_absmax, check_static_scale
from minisq.config import ModelConfig
from minisq.nn import Linear

TINY_OPT = ModelConfig(model_type="opt", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, ffn_dim=64,
                       max_positions=32, activation="relu", position_offset=2)
TINY_GPT2 = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, ffn_dim=64, max_positions=32)


def ids(seed, shape, V=97):
    return np.random.default_rng(seed).integers(0, V, shape)


@pytest.fixture(scope="module")
def opt():
    model = minisq.synthetic_model(TINY_OPT, seed=4)
    batches = [ids(1, (11,)), ids(2, (2, 7)), ids(3, (1, 1))]
    return model, batches, minisq.calibrate(model, batches, progress=False)


# --- Task 4.1 ---------------------------------------------------------------------------------

@pytest.mark.a4_1
def test_opt_mixed_batches(student, opt):
    model, batches, stats = opt
    check_channel_absmax("calibrate_channel_absmax", student.calibrate_channel_absmax(model, batches),
                         stats.channel_absmax)


@pytest.mark.a4_1
def test_single_one_token_batch(student):
    model = minisq.synthetic_model(TINY_GPT2, seed=5)
    batches = [ids(4, (1,))]
    check_channel_absmax("calibrate_channel_absmax", student.calibrate_channel_absmax(model, batches),
                         minisq.calibrate(model, batches, progress=False).channel_absmax)


@pytest.mark.a4_1
def test_empty_batch_list_raises(student, opt):
    with pytest.raises(ValueError):
        student.calibrate_channel_absmax(opt[0], [])


# --- Task 4.2 ---------------------------------------------------------------------------------

@pytest.mark.a4_2
@pytest.mark.parametrize("absmax, dtype", [
    (np.zeros(4), np.float32), (np.zeros(3), np.float64), (np.array([7.0]), np.float32),
    (np.array([1e-3, 2e4, 5.0], np.float32), np.float64),
], ids=["all-zero-float32", "all-zero-float64", "one-channel", "float32-ranges-float64-scale"])
def test_static_scale_edge_cases(student, absmax, dtype):
    check_static_scale("static_scale", student.static_scale(absmax, dtype), absmax, dtype)


@pytest.mark.a4_2
@pytest.mark.parametrize("absmax", [np.array([1.0, np.nan]), np.array([1.0, np.inf]), np.array([-1.0, 2.0])],
                         ids=["nan", "inf", "negative"])
def test_static_scale_rejects_bad_ranges(student, absmax):
    with pytest.raises(ValueError):
        student.static_scale(absmax, np.float32)


# --- Task 4.3 ---------------------------------------------------------------------------------

def leaf_and_x(x_shape, C_out, seed=0, dtype=np.float32, bias=True):
    rng = np.random.default_rng(seed)
    C_in = x_shape[-1]
    w = (rng.standard_normal((C_in, C_out)) * 0.05).astype(dtype)
    b = (rng.standard_normal(C_out) * 0.1).astype(dtype) if bias else None
    x = (rng.standard_normal(x_shape) * np.where(np.arange(C_in) % 5 == 0, 30, 1)).astype(dtype)
    return Linear(w, b), x


@pytest.mark.a4_3
@pytest.mark.parametrize("x_shape, dtype, bias, weights, acts, path, absmax_factor", [
    ((2, 3, 16), np.float32, True, "per_channel", "per_token", "int", 1.0),      # leading axes
    ((1, 13), np.float32, True, "per_tensor", "per_tensor", "int", 1.0),         # M = 1, odd C_in
    ((4, 8), np.float64, False, "per_channel", "per_token", "fake", 1.0),        # float64, no bias
    ((6, 10), np.float32, True, "per_tensor", "static", "int", 0.25),           # static scale that clips
    ((6, 10), np.float32, True, "per_channel", "static", "fake", 0.25),
], ids=["leading-axes", "M1", "float64-no-bias", "static-clipping-int", "static-clipping-fake"])
def test_leaf_edge_cases(student, x_shape, dtype, bias, weights, acts, path, absmax_factor):
    leaf, x = leaf_and_x(x_shape, 6, dtype=dtype, bias=bias)
    want = minisq.quantize_linear(leaf, weights, acts, float(np.abs(x).max()) * absmax_factor, path)
    mine = student.quantize_leaf(leaf, weights, acts, want.x_scale, path)
    y = want(x)
    assert_close("your W8A8 leaf's output", mine(x), y, rtol=1e-5, atol=1e-6 * float(np.abs(y).max()),
                 explain=f"weights {weights}, acts {acts}, path {path}")


@pytest.mark.a4_3
@pytest.mark.parametrize("acts", ["per_tensor", "per_token"])
def test_leaf_with_padding_mask(student, acts):
    """A right-padded batch: per-tensor scales are per sequence, over real tokens only."""
    leaf, x = leaf_and_x((2, 5, 12), 6, seed=3)
    x[1, 3:] *= 50.0                                    # huge padding tokens must not set the scale
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    want = minisq.quantize_linear(leaf, "per_channel", acts, None, "int")
    mine = student.quantize_leaf(leaf, "per_channel", acts, None, "int")
    y = want(x, mask)
    assert_close("your W8A8 leaf's output on a padded batch", mine(x, mask), y, rtol=1e-5,
                 atol=1e-6 * float(np.abs(y).max()),
                 explain="per_tensor: Δx per sequence = max |x| over its real tokens (mask == 1) / 127")


@pytest.mark.a4_3
@pytest.mark.parametrize("kwargs", [dict(weights="per_row"), dict(acts="per_channel"), dict(acts="static"),
                                    dict(path="float")], ids=["weights", "acts", "static-without-scale", "path"])
def test_leaf_rejects_bad_choices(student, kwargs):
    leaf, _ = leaf_and_x((2, 4), 3)
    with pytest.raises(ValueError):
        student.quantize_leaf(leaf, **kwargs)


# --- Task 4.4 ---------------------------------------------------------------------------------

def compare(student, model, stats, weights, acts, path, skip=("lm_head",)):
    ref = minisq.quantize(model, weights=weights, acts=acts, stats=stats, path=path, skip=skip)
    mine = student.quantize_model(model, weights, acts, stats.channel_absmax, path, skip)
    for name, leaf in mine.linears().items():
        should = not any(fnmatch.fnmatchcase(name, p) for p in skip)
        assert (not isinstance(leaf, Linear)) == should, f"quantize_model: layer {name!r} quantized={not should}?"
    report = minisq.check_equivalence(ref, mine, ids(9, (2, 10)), dtype=str(model.dtype), tol=1e-4)
    assert_equivalent(f"quantize_model({weights}, {acts}, path={path!r})", report)


@pytest.mark.a4_4
@pytest.mark.parametrize("path", ["int", "fake"])
@pytest.mark.parametrize("preset", ["naive", "O1", "O2", "O3"])
def test_opt_presets(student, opt, preset, path):
    model, _, stats = opt
    compare(student, model, stats, **minisq.PRESETS[preset], path=path)


@pytest.mark.a4_4
def test_skip_patterns(student, opt):
    model, _, stats = opt
    compare(student, model, stats, "per_channel", "static", "int", skip=("lm_head", "*.fc2", "layers.1.*"))


@pytest.mark.a4_4
def test_float64_model(student):
    model = minisq.synthetic_model(TINY_GPT2, seed=6, dtype="float64")
    stats = minisq.calibrate(model, [ids(10, (2, 8))], progress=False)
    compare(student, model, stats, "per_tensor", "static", "int")


@pytest.mark.a4_4
def test_input_model_untouched_and_static_needs_ranges(student, opt):
    model, _, stats = opt
    before = {name: type(leaf) for name, leaf in model.linears().items()}
    student.quantize_model(model, "per_channel", "per_token", None, "int")
    assert {name: type(leaf) for name, leaf in model.linears().items()} == before, \
        "quantize_model changed the input model; return a new one (model.replace_linears)"
    with pytest.raises(ValueError):
        student.quantize_model(model, "per_tensor", "static", None, "int")
