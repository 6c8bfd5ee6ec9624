"""Grader for Assignment 1 (quantizers): the hidden edge cases (not handed out).

Zero groups and groups whose max|x| / 127 is subnormal (the zero-range guard), one-element groups, M = 1, odd shapes, extreme and
float64 values, exact ties, NaN/inf inputs (an error is expected) and invalid static scales.
"""

import numpy as np
import pytest

from minisq.course.grading import check_quantized
from minisq.quant import QUANTIZERS

FNS = {"per_tensor": "quantize_per_tensor", "per_token": "quantize_per_token", "per_channel": "quantize_per_channel"}
MARKS = {"per_tensor": pytest.mark.a1_1, "per_token": pytest.mark.a1_2, "per_channel": pytest.mark.a1_3}


def each_quantizer(*cases):
    """Parametrize over (granularity, case), each with the marker of its task."""
    return pytest.mark.parametrize("granularity, x", [
        pytest.param(g, x, marks=MARKS[g], id=f"{g}-{name}") for g in FNS for name, x in cases
    ])


def run(student, granularity, x):
    result = getattr(student, FNS[granularity])(x.copy())
    assert isinstance(result, tuple) and len(result) == 2, f"{FNS[granularity]} must return (q, scale)"
    check_quantized(FNS[granularity], *result, x, granularity)


rng = np.random.default_rng(42)
with_zero_groups = rng.standard_normal((5, 6)).astype(np.float32)
with_zero_groups[2, :] = 0.0
with_zero_groups[:, 4] = 0.0

CASES = [
    ("all-zeros", np.zeros((3, 4), np.float32)),
    ("zero-row-and-column", with_zero_groups),
    ("one-element", np.array([[-2.5]], np.float32)),
    ("one-row", rng.standard_normal((1, 9)).astype(np.float32)),
    ("one-column", rng.standard_normal((9, 1)).astype(np.float64)),
    ("odd-shape", rng.standard_normal((7, 13)).astype(np.float64) * 1e4),
    ("huge-float32", (rng.standard_normal((4, 5)) * 1e35).astype(np.float32)),
    ("tiny-float64", rng.standard_normal((4, 5)) * 1e-200),
    # max|x| / 127 below the smallest normal float (subnormal): the zero-range guard gives scale 1
    ("subnormal-quotient-float32", (rng.uniform(-1, 1, (3, 4)) * 1e-37).astype(np.float32)),
    ("subnormal-input-float32", np.array([[1e-40, -3e-41], [0.0, 2e-42]], np.float32)),
    ("subnormal-quotient-float64", rng.uniform(-1, 1, (2, 3)) * 1e-307),
    ("subnormal-input-float64", np.array([[1e-310, -5e-312, 0.0]])),
    ("one-subnormal-row", np.array([[1.0, -2.0, 3.0], [1e-39, 0.0, -1e-39]], np.float32)),
    ("ties", np.array([[127.0, 63.5, -0.5, 1.5], [2.5, -2.5, 0.5, 126.5]])),
]


@each_quantizer(*CASES)
def test_edge_cases(student, granularity, x):
    run(student, granularity, x)


@pytest.mark.parametrize("granularity, x", [
    pytest.param(g, x, marks=MARKS[g], id=f"{g}-3d") for g in ("per_tensor", "per_token")
    for x in [rng.standard_normal((2, 3, 5)).astype(np.float32)]
])
def test_leading_axes(student, granularity, x):
    run(student, granularity, x)


@pytest.mark.parametrize("granularity, bad", [
    pytest.param(g, bad, marks=MARKS[g], id=f"{g}-{bad}") for g in FNS for bad in ("nan", "inf")
])
def test_nan_or_inf_raises(student, granularity, bad):
    x = np.ones((3, 4), np.float32)
    x[1, 2] = float(bad)
    with pytest.raises(ValueError):
        getattr(student, FNS[granularity])(x)


@pytest.mark.a1_3
def test_per_channel_wants_a_matrix(student):
    with pytest.raises(ValueError):
        student.quantize_per_channel(np.ones(5, np.float32))


@pytest.mark.a1_4
@pytest.mark.parametrize("granularity", sorted(QUANTIZERS))
def test_dequantize_float64_and_extremes(student, granularity):
    x = np.array([[127.0, -127.0, 3.0], [-1e-3, 5.0, 1e3]])          # float64, extreme codes
    q, s = QUANTIZERS[granularity](x)
    got = student.dequantize(q, s)
    assert got.dtype == np.float64, f"dequantize returned {got.dtype}; expected the scale's dtype float64"
    np.testing.assert_array_equal(got, q.astype(np.float64) * s, err_msg="dequantize: x̂ = q · scale exactly")


@pytest.mark.a1_5
@pytest.mark.parametrize("scale", [0.05, np.float64(0.5), np.asarray(2.0, np.float32)])
def test_static_scale_types(student, scale):
    x = rng.standard_normal((3, 7)).astype(np.float32) * 10
    q, s = student.quantize_static(x.copy(), scale)
    check_quantized("quantize_static", q, s, x, "per_tensor", static_scale=scale)


@pytest.mark.a1_5
def test_static_scale_clips_both_ends_in_float64(student):
    x = np.array([[-1000.0, -127.5, 0.0, 63.75, 127.4, 1e9]])
    q, s = student.quantize_static(x.copy(), 1.0)
    check_quantized("quantize_static", q, s, x, "per_tensor", static_scale=1.0)


@pytest.mark.a1_5
@pytest.mark.parametrize("scale", [0.0, -0.1, float("nan"), float("inf"), 1e-50])  # 1e-50: 0 in float32
def test_static_scale_must_be_positive_and_finite(student, scale):
    with pytest.raises(ValueError):
        student.quantize_static(np.ones((2, 2), np.float32), scale)


@pytest.mark.a1_5
def test_static_nan_input_raises(student):
    with pytest.raises(ValueError):
        student.quantize_static(np.array([1.0, np.nan], np.float32), 0.1)
