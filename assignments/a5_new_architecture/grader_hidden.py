"""Grader for Assignment 5 (smoothing a new architecture): the hidden edge cases (not handed out).

Rows on multi-query attention (G = 1), on a model without grouping (G = H) and on Qwen2's
biased q, k, v; factors with α = 0 and 1, silent channels inside a kv group, one kv head,
a kv head read by 4 query heads; smoothing a float32 model (stays float32), an MQA model and
a Qwen2 model, each held to ``minisq.smooth``'s factors.
"""

import numpy as np
import pytest

import minisq
from minisq.config import ModelConfig
from minisq.course.grading import assert_equivalent, check_row_factors, check_row_is_equivalence, check_smoothed_family

LLAMA = dict(model_type="llama", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, ffn_dim=48,
             max_positions=64)
CONFIGS = {
    "mqa": ModelConfig(**LLAMA, num_kv_heads=1),
    "no-grouping": ModelConfig(**LLAMA, num_kv_heads=4),
    "qwen2-bias": ModelConfig(**{**LLAMA, "model_type": "qwen2"}, num_kv_heads=2, qkv_bias=True),
}


def ids(seed, shape, V=97):
    return np.random.default_rng(seed).integers(0, V, shape)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model64(request):
    model = minisq.synthetic_model(CONFIGS[request.param], seed=2, dtype="float64")
    return model, minisq.calibrate(model, [ids(1, (2, 16))], progress=False)


# --- Task 5.1 ---------------------------------------------------------------------------------

@pytest.mark.a5_1
def test_rows_are_equivalences_on_other_configs(student, model64):
    model, _ = model64
    for row in student.smoothing_rows():
        check_row_is_equivalence("smoothing_rows", model, row, layer=1, seed=5)


# --- Task 5.2 ---------------------------------------------------------------------------------

FACTOR_CASES = [   # name, C_in, source_width, head_dim, alpha, silent channels
    ("alpha-0", 32, 16, 8, 0.0, ()),
    ("alpha-1", 32, 16, 8, 1.0, ()),
    ("one-kv-head", 32, 8, 8, 0.5, ()),
    ("four-heads-per-kv", 64, 16, 8, 0.5, ()),
    ("silent-query-channel", 32, 16, 8, 0.5, (0, 5)),
    ("silent-kv-channel", 32, 16, 8, 0.5, (3, 11)),      # channel 3 of both query heads of kv head 0
    ("full-width-silent", 16, 16, 4, 0.5, (2,)),
]


@pytest.mark.a5_2
@pytest.mark.parametrize("name, C_in, width, D, alpha, silent", FACTOR_CASES, ids=[c[0] for c in FACTOR_CASES])
def test_factor_edge_cases(student, name, C_in, width, D, alpha, silent):
    rng = np.random.default_rng(7)
    act, w = rng.uniform(0.1, 40, C_in), rng.uniform(0.001, 2, C_in)
    act[list(silent)] = 0.0
    check_row_factors("row_factors", student.row_factors(act, w, alpha, width, D), act, w, alpha, width, D)


# --- Task 5.3 ---------------------------------------------------------------------------------

@pytest.mark.a5_3
def test_smoothing_other_configs(student, model64):
    model, stats = model64
    smoothed = student.smooth_llama(model, stats, 0.6)
    assert_equivalent("smooth_llama (float64 equivalence)",
                      minisq.check_equivalence(model, smoothed, ids(3, (2, 14)), dtype="float64", tol=1e-10))
    check_smoothed_family("smooth_llama", smoothed, model, stats, 0.6)


@pytest.mark.a5_3
def test_float32_model_stays_float32(student):
    model = minisq.synthetic_model(CONFIGS["mqa"], seed=3)
    stats = minisq.calibrate(model, [ids(1, (2, 16))], progress=False)
    smoothed = student.smooth_llama(model, stats, 0.5)
    check_smoothed_family("smooth_llama (float32 model)", smoothed, model, stats, 0.5)
