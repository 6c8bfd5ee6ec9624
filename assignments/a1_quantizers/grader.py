"""Grader for Assignment 1 (quantizers): the public tests. Run it with

    pytest assignments/a1_quantizers            # every task
    pytest assignments/a1_quantizers -m a1_2    # Task 1.2 only

Each answer is compared with minisq's own quantizer through ``minisq.course.grading``, whose failure
messages say which group or code is wrong and why. The instructor also runs hidden tests
(``grader_hidden.py``) with the edge cases HANDOUT.md lists: pass those by following the rules,
not by fitting these tests.
"""

import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minisq
from minisq.course.grading import assert_equal, assert_raises_value_error, assert_returns, check_quantized

# derandomize: a grade must not depend on luck; no explain phase: our messages already explain
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    phases=(Phase.explicit, Phase.generate, Phase.shrink))
DTYPES = [np.float32, np.float64]


def activations(shape, dtype=np.float32, seed=0):
    """LLM-like activations: mostly N(0, 1), with every third channel 20x larger (outliers)."""
    x = np.random.default_rng(seed).standard_normal(shape)
    x[..., ::3] *= 20
    return x.astype(dtype)


@st.composite
def float_arrays(draw, min_dims=1, max_dims=3):
    """Finite float32/float64 arrays whose values span a chosen magnitude (zeros included)."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=7))
    magnitude = float(dtype(draw(st.sampled_from([1e-3, 1.0, 300.0, 1e6]))))
    width = 8 * np.dtype(dtype).itemsize
    return draw(hnp.arrays(dtype, shape, elements=st.floats(-magnitude, magnitude, width=width)))


def answer(student, fn, x, *args):
    """Call the student's ``fn`` on a copy of x, check x was not modified, unpack ``(q, scale)``."""
    mine = x.copy()
    result = getattr(student, fn)(mine, *args)
    assert_equal(f"{fn}: x after the call", mine, x, explain="do not modify x in place; compute new arrays")
    return assert_returns(fn, result, ("q", "scale"))


# --- Task 1.1 ---------------------------------------------------------------------------------

@pytest.mark.a1_1
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_tensor(student, dtype):
    x = activations((6, 10), dtype)
    q, s = answer(student, "quantize_per_tensor", x)
    check_quantized("quantize_per_tensor", q, s, x, "per_tensor")


@pytest.mark.a1_1
@SETTINGS
@given(x=float_arrays())
def test_per_tensor_any_shape(student, x):
    q, s = answer(student, "quantize_per_tensor", x)
    check_quantized("quantize_per_tensor", q, s, x, "per_tensor")


# --- Task 1.2 ---------------------------------------------------------------------------------

@pytest.mark.a1_2
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token(student, dtype):
    x = activations((5, 12), dtype, seed=1)
    q, s = answer(student, "quantize_per_token", x)
    check_quantized("quantize_per_token", q, s, x, "per_token")


@pytest.mark.a1_2
@SETTINGS
@given(x=float_arrays(min_dims=2))
def test_per_token_any_shape(student, x):
    q, s = answer(student, "quantize_per_token", x)
    check_quantized("quantize_per_token", q, s, x, "per_token")


# --- Task 1.3 ---------------------------------------------------------------------------------

@pytest.mark.a1_3
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_channel(student, dtype):
    w = (np.random.default_rng(2).standard_normal((16, 6)) * np.array([1, 5, 0.1, 2, 30, 1])).astype(dtype)
    q, s = answer(student, "quantize_per_channel", w)
    check_quantized("quantize_per_channel", q, s, w, "per_channel")


@pytest.mark.a1_3
@SETTINGS
@given(w=float_arrays(min_dims=2, max_dims=2))
def test_per_channel_any_shape(student, w):
    q, s = answer(student, "quantize_per_channel", w)
    check_quantized("quantize_per_channel", q, s, w, "per_channel")


# --- Task 1.4 ---------------------------------------------------------------------------------

@pytest.mark.a1_4
@pytest.mark.parametrize("granularity", ["per_tensor", "per_token", "per_channel"])
def test_dequantize_is_q_times_scale(student, granularity):
    x = activations((7, 9), np.float32, seed=3)
    q, s = minisq.quant.QUANTIZERS[granularity](x)
    got = student.dequantize(q, s)
    assert_equal("dequantize", got, minisq.dequantize(q, s),
                 explain="x̂ = q · scale, in the scale's dtype (cast q first, then one multiply)")


@pytest.mark.a1_4
def test_round_trip_error_is_at_most_half_a_step(student):
    x = activations((4, 30), np.float64, seed=4)
    q, s = minisq.quantize_per_token(x)
    err = np.abs(student.dequantize(q, s) - x)
    assert np.all(err <= s / 2 * (1 + 1e-12)), (
        f"dequantize: |x - x̂| reaches {float((err / s).max()):.3f} steps; rounding to the nearest code "
        f"keeps it within half a step (scale / 2)")


# --- Task 1.5 ---------------------------------------------------------------------------------

@pytest.mark.a1_5
@pytest.mark.parametrize("dtype", DTYPES)
def test_static_scale_inside_the_range(student, dtype):
    x = activations((4, 8), dtype, seed=5)
    scale = dtype(np.abs(x).max() / 127 * 1.5)   # calibrated on larger inputs: no clipping
    q, s = answer(student, "quantize_static", x, scale)
    check_quantized("quantize_static", q, s, x, "per_tensor", static_scale=scale)


@pytest.mark.a1_5
def test_static_scale_clips_outliers(student):
    x = activations((4, 8), np.float32, seed=6)
    scale = np.float32(np.abs(x).max() / 127 / 4)  # calibrated on smaller inputs: outliers must clip
    q, s = answer(student, "quantize_static", x, scale)
    check_quantized("quantize_static", q, s, x, "per_tensor", static_scale=scale)


# --- the rules every quantizer follows (HANDOUT.md, "Rules for every quantizer") ---------------

QUANTIZER_TASKS = [pytest.param("quantize_per_tensor", marks=pytest.mark.a1_1, id="per_tensor"),
                   pytest.param("quantize_per_token", marks=pytest.mark.a1_2, id="per_token"),
                   pytest.param("quantize_per_channel", marks=pytest.mark.a1_3, id="per_channel")]
GRANULARITY = {"quantize_per_tensor": "per_tensor", "quantize_per_token": "per_token",
               "quantize_per_channel": "per_channel"}


@pytest.mark.parametrize("fn", QUANTIZER_TASKS)
def test_rule_nan_or_inf_raises(student, fn):
    for bad in (np.nan, np.inf):
        x = np.ones((3, 4), np.float32)
        x[1, 2] = bad
        assert_raises_value_error(f"{fn} on an x holding {bad}", lambda: getattr(student, fn)(x),
                                  "NaN or inf in x raise ValueError (use the given check_finite)")


@pytest.mark.parametrize("fn", QUANTIZER_TASKS)
def test_rule_zero_range_guard(student, fn):
    x = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 3.0]], np.float32)     # an all-zero row
    if fn == "quantize_per_channel":
        x = x.T.copy()                                                   # an all-zero column
    q, s = answer(student, fn, x if fn != "quantize_per_tensor" else np.zeros((2, 3), np.float32))
    check_quantized(f"{fn} (zero-range guard: scale 1 where max|x| / 127 < np.finfo(dtype).tiny)", q, s,
                    x if fn != "quantize_per_tensor" else np.zeros((2, 3), np.float32), GRANULARITY[fn])
    tiny = np.array([[1e-39, -1e-39, 0.0], [1.0, 2.0, -3.0]], np.float32)   # max|x| / 127 is subnormal
    tiny = tiny.T.copy() if fn == "quantize_per_channel" else tiny
    tiny = tiny[:1] if fn == "quantize_per_tensor" else tiny
    q, s = answer(student, fn, tiny)
    check_quantized(f"{fn} (zero-range guard: scale 1 where max|x| / 127 < np.finfo(dtype).tiny)", q, s, tiny,
                    GRANULARITY[fn])


@pytest.mark.parametrize("fn", QUANTIZER_TASKS)
def test_rule_ties_round_to_even(student, fn):
    x = np.array([[127.0, 2.5, -2.5, 0.5], [127.0, -0.5, 1.5, 126.5]])  # scale 1: x / scale are exact ties
    q, s = answer(student, fn, x)
    check_quantized(f"{fn} (rounding: np.rint, ties to even)", q, s, x, GRANULARITY[fn])


@pytest.mark.a1_3
def test_rule_per_channel_wants_a_matrix(student):
    assert_raises_value_error("quantize_per_channel on a 1-D w", lambda: student.quantize_per_channel(
        np.ones(5, np.float32)), "w is 2-D [C_in, C_out], else ValueError")


@pytest.mark.a1_5
@pytest.mark.parametrize("scale", [0.0, float("nan"), 1e-50], ids=["zero", "nan", "1e-50-is-0-in-float32"])
def test_rule_static_scale_must_be_finite_and_positive(student, scale):
    assert_raises_value_error(f"quantize_static(x float32, scale={scale})",
                              lambda: student.quantize_static(np.ones((2, 2), np.float32), scale),
                              "ValueError unless the scale, cast to x's dtype, is finite and greater than 0")


@pytest.mark.a1_5
def test_rule_static_nan_input_raises(student):
    assert_raises_value_error("quantize_static on an x holding NaN",
                              lambda: student.quantize_static(np.array([1.0, np.nan], np.float32), 0.1),
                              "NaN or inf in x raise ValueError (use the given check_finite)")
