"""Grader for Assignment 4 (calibration + a W8A8 model): the public tests. Run it with

    pytest assignments/a4_w8a8_model            # every task
    pytest assignments/a4_w8a8_model -m a4_4    # Task 4.4 only

Calibration is held to ``minisq.calibrate``, the static scale and the leaf to
``minisq.quantize_linear``, and the whole quantized model's logits to
``minisq.quantize(model, preset, path="int" | "fake")`` with ``minisq.check_equivalence``.
Hidden tests (``grader_hidden.py``) add the edge cases HANDOUT.md lists.
"""

import fnmatch

import numpy as np
import pytest

import minisq
from minisq.course.grading import (assert_equal, assert_equivalent, assert_raises_value_error, check_channel_absmax,
                                   check_static_scale, check_w8a8_leaf)
from minisq.config import ModelConfig
from minisq.nn import Linear

TINY_GPT2 = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, ffn_dim=64, max_positions=32)
CASES = [(preset, minisq.PRESETS[preset]) for preset in ("naive", "O1", "O3")] + [
    ("W8A8 per-channel/per-token", dict(weights="per_channel", acts="per_token"))]


def ids(seed, shape, V=97):
    return np.random.default_rng(seed).integers(0, V, shape)


@pytest.fixture(scope="module")
def gpt2():
    model = minisq.synthetic_model(TINY_GPT2, seed=3)
    batches = [ids(1, (2, 16)), ids(2, (1, 9))]
    return model, batches, minisq.calibrate(model, batches, progress=False)


# --- Task 4.1 ---------------------------------------------------------------------------------

@pytest.mark.a4_1
def test_channel_absmax_matches_minisq_calibrate(student, gpt2):
    model, batches, stats = gpt2
    got = student.calibrate_channel_absmax(model, batches)
    check_channel_absmax("calibrate_channel_absmax", got, stats.channel_absmax)


# --- Task 4.2 ---------------------------------------------------------------------------------

@pytest.mark.a4_2
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_static_scale(student, dtype):
    absmax = np.array([0.5, 3.0, 41.2, 1.25])
    check_static_scale("static_scale", student.static_scale(absmax, dtype), absmax, dtype)


# --- Task 4.3 ---------------------------------------------------------------------------------

def float_leaf(C_in=24, C_out=10, seed=0, dtype=np.float32, bias=True):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((C_in, C_out)) * 0.05).astype(dtype)
    b = (rng.standard_normal(C_out) * 0.1).astype(dtype) if bias else None
    x = rng.standard_normal((5, C_in)) * np.where(np.arange(C_in) % 6 == 0, 25, 1)
    return Linear(w, b), x.astype(dtype)


def check_leaf(student, leaf, x, weights, acts, path, x_absmax=None, mask=None):
    want_leaf = minisq.quantize_linear(leaf, weights, acts, x_absmax, path)
    mine = student.quantize_leaf(leaf, weights, acts, want_leaf.x_scale, path)
    assert_equal("quantize_leaf(...).w_q", mine.w_q, want_leaf.w_q,
                 explain=f"the weight's int8 codes, quantized {weights}")
    check_w8a8_leaf("your W8A8 leaf's output", mine(x) if mask is None else mine(x, mask), leaf, x, weights, acts,
                    path, x_absmax, mask)


@pytest.mark.a4_3
@pytest.mark.parametrize("path", ["int", "fake"])
@pytest.mark.parametrize("weights, acts", [("per_channel", "per_token"), ("per_tensor", "per_tensor"),
                                           ("per_tensor", "static")])
def test_leaf(student, weights, acts, path):
    leaf, x = float_leaf()
    check_leaf(student, leaf, x, weights, acts, path, x_absmax=float(np.abs(x).max()))


# --- Task 4.4 ---------------------------------------------------------------------------------

def check_model(student, model, stats, config, path, input_ids, skip=("lm_head",), preset=None):
    ref = minisq.quantize(model, preset=preset, weights=config["weights"], acts=config["acts"],
                          stats=stats, path=path, skip=skip)
    mine = student.quantize_model(model, config["weights"], config["acts"], stats.channel_absmax, path, skip)
    for name, leaf in mine.linears().items():
        quantized = not isinstance(leaf, Linear)
        should = not any(fnmatch.fnmatchcase(name, p) for p in skip)
        assert quantized == should, (f"quantize_model: layer {name!r} is {'W8A8' if quantized else 'float'}, expected "
                                     f"{'W8A8' if should else 'float (it matches skip)'}")
    report = minisq.check_equivalence(ref, mine, input_ids, dtype=str(model.dtype), tol=1e-4)
    assert_equivalent(f"quantize_model({config['weights']}, {config['acts']}, path={path!r}) vs minisq.quantize",
                      report)


@pytest.mark.a4_4
@pytest.mark.parametrize("path", ["int", "fake"])
@pytest.mark.parametrize("name, config", CASES, ids=[c[0] for c in CASES])
def test_quantized_gpt2_logits(student, gpt2, name, config, path):
    model, _, stats = gpt2
    check_model(student, model, stats, config, path, ids(5, (2, 12)))


# --- the rules the handout states -------------------------------------------------------------

@pytest.mark.a4_1
def test_rule_batches_of_any_shape_and_an_empty_list(student, gpt2):
    model = gpt2[0]
    batches = [ids(6, (7,)), ids(7, (2, 5))]                    # [T] and [B, T]
    check_channel_absmax("calibrate_channel_absmax ([T] and [B, T] batches)",
                         student.calibrate_channel_absmax(model, batches),
                         minisq.calibrate(model, batches, progress=False).channel_absmax)
    assert_raises_value_error("calibrate_channel_absmax(model, [])", lambda: student.calibrate_channel_absmax(model, []),
                              "ValueError for an empty list of batches")


@pytest.mark.a4_2
def test_rule_static_scale_is_exact_in_its_dtype(student):
    absmax = np.array([0.5, 3.0, 41.3, 1.25])      # float32(41.3) / 127 != float32(41.3 / 127)
    check_static_scale("static_scale", student.static_scale(absmax, np.float32), absmax, np.float32)


@pytest.mark.a4_2
@pytest.mark.parametrize("absmax", [[1.0, np.nan], [-1.0, 2.0]], ids=["nan", "negative"])
def test_rule_static_scale_rejects_bad_ranges(student, absmax):
    assert_raises_value_error(f"static_scale({absmax})", lambda: student.static_scale(np.array(absmax), np.float32),
                              "ValueError for NaN/inf or negative ranges")


@pytest.mark.a4_3
@pytest.mark.parametrize("acts", ["per_tensor", "per_token"])
@pytest.mark.parametrize("path", ["int", "fake"])
def test_rule_per_tensor_scales_are_per_sequence(student, acts, path):
    """[B, T, C_in] with a padding mask: one per-tensor scale per sequence, over its real tokens."""
    leaf, x = float_leaf(C_in=12, C_out=6, seed=3)
    x = np.stack([x, x * 0.01])                                 # two sequences, ranges 100x apart
    x[1, 3:] *= 5000.0                                          # huge padding tokens must not set a scale
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    check_leaf(student, leaf, x, "per_channel", acts, path, mask=mask)


@pytest.mark.a4_3
@pytest.mark.parametrize("kwargs", [dict(weights="per_row"), dict(acts="per_channel"), dict(acts="static"),
                                    dict(path="float")], ids=["weights", "acts", "static-without-scale", "path"])
def test_rule_leaf_rejects_bad_choices(student, kwargs):
    leaf, _ = float_leaf(C_in=4, C_out=3)
    assert_raises_value_error(f"quantize_leaf(leaf, {kwargs})", lambda: student.quantize_leaf(leaf, **kwargs),
                              "ValueError for unknown choices or acts='static' without x_scale")


@pytest.mark.a4_4
def test_rule_info_skip_input_untouched_static_needs_ranges(student, gpt2):
    model = gpt2[0]
    before = {name: type(leaf) for name, leaf in model.linears().items()}
    skip = ("lm_head", "h.1.*")
    mine = student.quantize_model(model, "per_tensor", "per_token", None, "fake", skip)
    want = {"weights": "per_tensor", "acts": "per_token", "path": "fake", "skip": list(skip)}
    assert mine.info.get("quantization") == want, (
        f"quantize_model: info['quantization'] is {mine.info.get('quantization')!r}, expected {want!r}; the rule: "
        f"model.replace_linears(..., quantization={{'weights': ..., 'acts': ..., 'path': ..., 'skip': list(skip)}})")
    for name, leaf in mine.linears().items():
        quantized = not isinstance(leaf, Linear)
        assert quantized != any(fnmatch.fnmatchcase(name, p) for p in skip), (
            f"quantize_model: {name!r} is {'W8A8' if quantized else 'float'}; the rule: every leaf except those "
            f"matching a skip glob (fnmatch.fnmatchcase) becomes W8A8")
    assert {name: type(leaf) for name, leaf in model.linears().items()} == before, \
        "quantize_model changed the input model; the rule: the input model is untouched (model.replace_linears)"
    assert_raises_value_error("quantize_model(model, 'per_tensor', 'static', None)",
                              lambda: student.quantize_model(model, "per_tensor", "static", None, "int"),
                              "ValueError for acts='static' without ranges")
