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
from minisq.course.grading import assert_equal, assert_returns, check_quantized

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
