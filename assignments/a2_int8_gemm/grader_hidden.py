"""Grader for Assignment 2 (INT8 GEMM + epilogue): the hidden edge cases (not handed out).

M = 1, K = 1, K not a multiple of 4, K = 0, K around and beyond 1024, all-(-128) operands,
wrong dtypes and shapes (an error is expected), extreme accumulators, float64 outputs,
scale shapes [N] / [1, N] / 0-d, leading axes and C_in > 1024 in the linear forward.
"""

import numpy as np
import pytest

import minisq
from minisq.course.grading import assert_close, check_epilogue, check_int_gemm
from minisq.nn import Linear

FNS = {"int8_matmul": pytest.mark.a2_1, "int8_matmul_float32": pytest.mark.a2_2}


def codes(shape, seed=0):
    return np.random.default_rng(seed).integers(-128, 128, shape).astype(np.int8)


def both_gemms(*cases):
    return pytest.mark.parametrize("fn, a, b", [
        pytest.param(fn, a, b, marks=mark, id=f"{fn}-{name}") for fn, mark in FNS.items() for name, a, b in cases
    ])


CASES = [
    ("M1", codes((1, 9)), codes((9, 4), 1)),
    ("K1", codes((3, 1)), codes((1, 5), 2)),
    ("N1", codes((4, 6)), codes((6, 1), 3)),
    ("K13-not-a-multiple-of-4", codes((5, 13)), codes((13, 7), 4)),
    ("K1023", codes((2, 1023)), codes((1023, 3), 5)),
    ("K1025", codes((2, 1025)), codes((1025, 3), 6)),
    ("K2500", codes((3, 2500)), codes((2500, 2), 7)),
    ("all-minus-128-K4096", np.full((2, 4096), -128, np.int8), np.full((4096, 3), -128, np.int8)),
    ("all-plus-127-K3001", np.full((1, 3001), 127, np.int8), np.full((3001, 2), 127, np.int8)),
    ("mixed-extremes-K5000", np.where(codes((2, 5000), 8) > 0, 127, -128).astype(np.int8),
     np.where(codes((5000, 3), 9) > -30, 127, -127).astype(np.int8)),
    ("K0", np.zeros((2, 0), np.int8), np.zeros((0, 3), np.int8)),
]


@both_gemms(*CASES)
def test_gemm_edge_cases(student, fn, a, b):
    check_int_gemm(fn, getattr(student, fn)(a, b), a, b)


@pytest.mark.parametrize("fn, a, b", [
    pytest.param(fn, a, b, marks=mark, id=f"{fn}-{name}") for fn, mark in FNS.items() for name, a, b in [
        ("float-operands", np.ones((2, 3), np.float32), np.ones((3, 2), np.float32)),
        ("int32-operands", np.ones((2, 3), np.int32), np.ones((3, 2), np.int32)),
        ("K-mismatch", codes((2, 3)), codes((4, 2))),
    ]
])
def test_gemm_rejects_bad_operands(student, fn, a, b):
    with pytest.raises(ValueError):
        getattr(student, fn)(a, b)


@pytest.mark.a2_2
@pytest.mark.parametrize("block_k", [0, 1025, 4096])
def test_float32_block_too_large_or_empty_raises(student, block_k):
    with pytest.raises(ValueError):
        student.int8_matmul_float32(codes((2, 8)), codes((8, 2), 1), block_k)


@pytest.mark.a2_2
def test_float32_blocks_odd_block_with_big_sums(student):
    a, b = np.full((2, 2100), 127, np.int8), np.full((2100, 2), -127, np.int8)
    check_int_gemm("int8_matmul_float32(block_k=999)", student.int8_matmul_float32(a, b, 999), a, b)


# --- Task 2.3 ---------------------------------------------------------------------------------

def acc(M, N, seed=0):
    out = np.random.default_rng(seed).integers(-2**31 + 1, 2**31 - 1, (M, N)).astype(np.int32)
    out.flat[0], out.flat[-1] = 2**31 - 1, -2**31 + 1      # the int32 extremes
    return out


EPILOGUES = [
    ("per-token-x-per-channel-N", acc(4, 5), np.full((4, 1), 1e-3, np.float32),
     np.linspace(1e-4, 5e-4, 5, dtype=np.float32), np.arange(5, dtype=np.float32), np.float32),
    ("per-channel-1xN-float64", acc(3, 4, 1), np.linspace(0.1, 0.3, 3)[:, None], np.full((1, 4), 2e-6),
     np.ones(4), np.float64),
    ("per-tensor-both-M1", acc(1, 6, 2), np.asarray(3e-3, np.float32), np.asarray(7e-5, np.float32),
     None, np.float32),
    ("float32-scales-float64-out", acc(2, 3, 3), np.asarray([[0.013], [0.017]], np.float32),
     np.asarray([0.1, 0.2, 0.3], np.float32), None, np.float64),
]


@pytest.mark.a2_3
@pytest.mark.parametrize("name, acc_, row, col, bias, dtype", EPILOGUES, ids=[e[0] for e in EPILOGUES])
def test_epilogue_edge_cases(student, name, acc_, row, col, bias, dtype):
    y = student.dequant_epilogue(acc_, row, col, bias, dtype)
    check_epilogue("dequant_epilogue", y, acc_, row, col, bias, dtype)


# --- Task 2.4 ---------------------------------------------------------------------------------

def check_linear(student, x, w, b):
    want = minisq.quantize_linear(Linear(w, b), "per_channel", "per_token", path="int")(x)
    got = student.w8a8_linear(x, w, b)
    assert_close("w8a8_linear", got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()),
                 explain="quantize x per token and w per channel, int8_matmul, then dequant_epilogue")


def layer(shape_x, C_out, seed=0, dtype=np.float32, zero_row=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape_x) * np.where(np.arange(shape_x[-1]) % 7 == 0, 40, 1)
    if zero_row:
        x.reshape(-1, shape_x[-1])[0] = 0
    w = rng.standard_normal((shape_x[-1], C_out)) * 0.05
    return x.astype(dtype), w.astype(dtype), (rng.standard_normal(C_out) * 0.1).astype(dtype)


@pytest.mark.a2_4
@pytest.mark.parametrize("shape_x, C_out, dtype, zero_row", [
    ((2, 3, 12), 5, np.float32, False),     # leading axes [B, T, C_in]
    ((1, 13), 7, np.float32, False),        # M = 1, C_in not a multiple of 4
    ((5, 16), 4, np.float64, False),        # float64 in, float64 out
    ((4, 9), 3, np.float32, True),          # a token of zeros
    ((3, 1500), 6, np.float32, False),      # C_in > 1024
], ids=["leading-axes", "M1-K13", "float64", "zero-token", "K1500"])
def test_w8a8_linear_edge_cases(student, shape_x, C_out, dtype, zero_row):
    check_linear(student, *layer(shape_x, C_out, dtype=dtype, zero_row=zero_row))
