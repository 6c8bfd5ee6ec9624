"""Grader for Assignment 2 (INT8 GEMM + epilogue): the public tests. Run it with

    pytest assignments/a2_int8_gemm            # every task
    pytest assignments/a2_int8_gemm -m a2_1    # Task 2.1 only

The GEMMs are held to minisq's exact int64 reference (bit for bit), the epilogue to
``minisq.dequant_epilogue`` and the linear forward to minisq's W8A8 leaf, through
``minisq.course.grading``. Hidden tests (``grader_hidden.py``) add the edge cases HANDOUT.md lists.
"""

import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minisq
from minisq.course.grading import assert_close, assert_raises_value_error, check_epilogue, check_int_gemm
from minisq.nn import Linear

# derandomize: a grade must not depend on luck; no explain phase: our messages already explain
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    phases=(Phase.explicit, Phase.generate, Phase.shrink))


def codes(shape, seed=0, low=-128, high=127):
    """Random int8 codes in [low, high]."""
    return np.random.default_rng(seed).integers(low, high + 1, shape).astype(np.int8)


@st.composite
def operands(draw, max_side=24):
    M, K, N = (draw(st.integers(1, max_side)) for _ in range(3))
    a = draw(hnp.arrays(np.int8, (M, K)))
    b = draw(hnp.arrays(np.int8, (K, N)))
    return a, b


# --- Task 2.1 ---------------------------------------------------------------------------------

@pytest.mark.a2_1
def test_int8_matmul_small(student):
    a, b = codes((5, 7)), codes((7, 3), seed=1)
    check_int_gemm("int8_matmul", student.int8_matmul(a, b), a, b)


@pytest.mark.a2_1
def test_int8_matmul_large_sums(student):
    """Sums far beyond int16: 64 products of ±127."""
    a, b = codes((4, 64), seed=2, low=120), codes((64, 5), seed=3, low=120)
    check_int_gemm("int8_matmul", student.int8_matmul(a, b), a, b)


@pytest.mark.a2_1
@SETTINGS
@given(ab=operands())
def test_int8_matmul_any_shape(student, ab):
    a, b = ab
    check_int_gemm("int8_matmul", student.int8_matmul(a, b), a, b)


# --- Task 2.2 ---------------------------------------------------------------------------------

@pytest.mark.a2_2
def test_float32_blocks_small(student):
    a, b = codes((6, 40), seed=4), codes((40, 9), seed=5)
    check_int_gemm("int8_matmul_float32", student.int8_matmul_float32(a, b), a, b)


@pytest.mark.a2_2
def test_float32_blocks_beyond_2_to_24(student):
    """K = 3000 products of codes in [100, 127]: sums beyond 2^24, where one float32 matmul rounds."""
    a, b = codes((8, 3000), seed=6, low=100), codes((3000, 8), seed=7, low=100)
    check_int_gemm("int8_matmul_float32", student.int8_matmul_float32(a, b), a, b)


@pytest.mark.a2_2
@pytest.mark.parametrize("block_k", [1, 5, 1024])
def test_float32_block_sizes(student, block_k):
    a, b = codes((3, 37), seed=8), codes((37, 4), seed=9)
    check_int_gemm(f"int8_matmul_float32(block_k={block_k})", student.int8_matmul_float32(a, b, block_k), a, b)


# --- Task 2.3 ---------------------------------------------------------------------------------

def accumulator(M, N, seed=0, bound=2**20):
    return np.random.default_rng(seed).integers(-bound, bound, (M, N)).astype(np.int32)


@pytest.mark.a2_3
def test_epilogue_per_token_per_channel_with_bias(student):
    acc = accumulator(5, 6)
    row = np.linspace(0.01, 0.05, 5, dtype=np.float32)[:, None]   # [M, 1]
    col = np.linspace(1e-3, 4e-3, 6, dtype=np.float32)[None, :]   # [1, N]
    bias = np.linspace(-1, 1, 6, dtype=np.float32)
    y = student.dequant_epilogue(acc, row, col, bias)
    check_epilogue("dequant_epilogue", y, acc, row, col, bias)


@pytest.mark.a2_3
def test_epilogue_per_tensor_float64_no_bias(student):
    acc = accumulator(3, 4, seed=1)
    row, col = np.asarray(0.02, np.float32), np.asarray(3e-3, np.float32)
    y = student.dequant_epilogue(acc, row, col, None, np.float64)
    check_epilogue("dequant_epilogue", y, acc, row, col, None, np.float64)


# --- Task 2.4 ---------------------------------------------------------------------------------

def layer(C_in, C_out, seed=0, dtype=np.float32, bias=True):
    """x with outlier channels, w, b: a linear layer whose quantization error is visible."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((6, C_in))
    x[:, ::5] *= 30
    w = rng.standard_normal((C_in, C_out)) * 0.05
    b = rng.standard_normal(C_out) * 0.1 if bias else None
    return x.astype(dtype), w.astype(dtype), None if b is None else b.astype(dtype)


def check_linear(student, x, w, b):
    """The student's forward against minisq's W8A8 leaf (per-token x, per-channel w, int path)."""
    want = minisq.quantize_linear(Linear(w, b), "per_channel", "per_token", path="int")(x)
    got = student.w8a8_linear(x, w, b)
    exact = x @ w + (0 if b is None else b)
    assert_close("w8a8_linear", got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()),
                 explain=f"the float result x @ w + b is {float(np.abs(exact - want).max()):.2e} away from the "
                         f"expected W8A8 one: quantize x per token and w per channel, multiply the int8 codes "
                         f"with int8_matmul, and scale back with dequant_epilogue")


@pytest.mark.a2_4
def test_w8a8_linear(student):
    check_linear(student, *layer(32, 16))


@pytest.mark.a2_4
def test_w8a8_linear_no_bias(student):
    check_linear(student, *layer(20, 8, seed=1, bias=False))


# --- the rules the handout states (ValueErrors, the empty sum) ----------------------------------

GEMMS = [pytest.param("int8_matmul", marks=pytest.mark.a2_1, id="int8_matmul"),
         pytest.param("int8_matmul_float32", marks=pytest.mark.a2_2, id="int8_matmul_float32")]
OPERAND_RULE = "ValueError for non-int8 operands or mismatched K (use the given check_int8_operands)"


@pytest.mark.parametrize("fn", GEMMS)
def test_rule_bad_operands_raise(student, fn):
    f = getattr(student, fn)
    assert_raises_value_error(f"{fn} on float32 operands", lambda: f(np.ones((2, 3), np.float32),
                                                                    np.ones((3, 2), np.float32)), OPERAND_RULE)
    assert_raises_value_error(f"{fn} on [2, 3] @ [4, 2]", lambda: f(codes((2, 3)), codes((4, 2), 1)), OPERAND_RULE)


@pytest.mark.parametrize("fn", GEMMS)
def test_rule_empty_sum_is_zero(student, fn):
    a, b = np.zeros((2, 0), np.int8), np.zeros((0, 3), np.int8)
    check_int_gemm(f"{fn} with K = 0 (an empty sum gives zeros)", getattr(student, fn)(a, b), a, b)


@pytest.mark.a2_2
@pytest.mark.parametrize("block_k", [0, 1025])
def test_rule_block_k_between_1_and_1024(student, block_k):
    assert_raises_value_error(f"int8_matmul_float32(block_k={block_k})",
                              lambda: student.int8_matmul_float32(codes((2, 8)), codes((8, 2), 1), block_k),
                              "ValueError unless 1 <= block_k <= 1024")


@pytest.mark.a2_4
def test_rule_w8a8_linear_leading_axes_and_dtype(student):
    x, w, b = layer(12, 5, seed=2, dtype=np.float64)
    x = x.reshape(2, 3, 12)                       # [..., C_in]: flatten to [T, C_in], reshape back
    check_linear(student, x, w, b)
