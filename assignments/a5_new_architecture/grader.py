"""Grader for Assignment 5 (smoothing a new architecture): the public tests. Run it with

    pytest assignments/a5_new_architecture            # every task
    pytest assignments/a5_new_architecture -m a5_2    # Task 5.2 only

The rows are held to the block's structure (which linears read each producer, what is not
foldable: ``minisq.NOT_FOLDABLE["llama"]``) and each one, applied alone with random factors,
to the float64 equivalence of the model; the factors to Eq. 4 with the grouped-query rule
(``minisq.course.grading``); the smoothed model to the original in float64, to
``minisq.smooth(..., groups="all")`` and, quantized W8A8, to the unsmoothed model's error on
planted outliers. Hidden tests (``grader_hidden.py``) add the edge cases HANDOUT.md lists.
"""

import copy

import numpy as np
import pytest

import minisq
from minisq.config import ModelConfig
from minisq.course.grading import (assert_equal, assert_equivalent, check_row_factors, check_row_is_equivalence,
                                   check_rows, check_smoothed_family)

# A tiny Llama with grouped-query attention: H = 4 query heads share G = 2 kv heads of D = 8.
TINY_LLAMA = ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, ffn_dim=48, max_positions=64)


def ids(seed, shape, V=97):
    return np.random.default_rng(seed).integers(0, V, shape)


def block_layers(model):
    """(linears, norms) of one block, with '{i}' for the layer index."""
    linears = {n.replace("layers.0.", "layers.{i}.", 1) for n in model.linears() if n.startswith("layers.0.")}
    norms = {f"layers.{{i}}.{k}" for k, v in model.params["layers"][0].items() if isinstance(v, dict) and "g" in v}
    return linears, norms


@pytest.fixture(scope="module")
def llama64():
    model = minisq.synthetic_model(TINY_LLAMA, seed=1, dtype="float64")
    return model, minisq.calibrate(model, [ids(1, (2, 16)), ids(2, (1, 20))], progress=False)


# --- Task 5.1 ---------------------------------------------------------------------------------

@pytest.mark.a5_1
def test_rows_match_the_block(student, llama64):
    model, _ = llama64
    check_rows("smoothing_rows", student.smoothing_rows(), minisq.SMOOTHING_TABLE["llama"],
               minisq.NOT_FOLDABLE["llama"], *block_layers(model))


@pytest.mark.a5_1
@pytest.mark.parametrize("layer", [0, 1])
def test_every_row_is_an_equivalence(student, llama64, layer):
    model, _ = llama64
    for row in student.smoothing_rows():
        check_row_is_equivalence("smoothing_rows", model, row, layer=layer, seed=layer)


@pytest.mark.a5_1
def test_rows_have_distinct_groups_and_a_reason(student):
    rows = student.smoothing_rows()
    groups = [r.group for r in rows]
    assert len(set(groups)) == len(groups), f"smoothing_rows: group names repeat ({groups}): users select rows by them"
    assert all(isinstance(r.why, str) and r.why.strip() for r in rows), "smoothing_rows: every row needs its why"


# --- Task 5.2 ---------------------------------------------------------------------------------

def ranges(C, seed):
    rng = np.random.default_rng(seed)
    act = rng.uniform(0.1, 3, C) * np.where(rng.random(C) < 0.2, 30, 1)   # a few outlier channels
    return act, rng.uniform(0.01, 1, C)


@pytest.mark.a5_2
@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_factors_of_a_full_width_source(student, alpha):
    act, w = ranges(32, 0)
    check_row_factors("row_factors", student.row_factors(act, w, alpha, 32, 8), act, w, alpha, 32, 8)


@pytest.mark.a5_2
@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_factors_under_grouped_query_attention(student, alpha):
    act, w = ranges(32, 1)      # o_proj's input: H = 4 heads of D = 8, read from G = 2 kv heads
    check_row_factors("row_factors", student.row_factors(act, w, alpha, 16, 8), act, w, alpha, 16, 8)


@pytest.mark.a5_2
def test_factors_of_the_calibrated_model(student, llama64):
    model, stats = llama64
    for source, (target, width) in {"layers.0.self_attn.v_proj": ("layers.0.self_attn.o_proj", 16),
                                    "layers.1.mlp.up_proj": ("layers.1.mlp.down_proj", 48)}.items():
        act, w = stats.channel_absmax[target], minisq.weight_absmax(model.params, [target])
        check_row_factors(f"row_factors ({source} -> {target})", student.row_factors(act, w, 0.5, width, 8),
                          act, w, 0.5, width, 8)


# --- Task 5.3 ---------------------------------------------------------------------------------

@pytest.mark.a5_3
def test_smoothed_llama_is_equivalent_and_matches_minisq(student, llama64):
    model, stats = llama64
    before = copy.deepcopy(model.params)
    smoothed = student.smooth_llama(model, stats, 0.5)
    assert_equal("the input model's layers.0.mlp.up_proj weight", model.params["layers"][0]["mlp"]["up_proj"].w,
                 before["layers"][0]["mlp"]["up_proj"].w, explain="return a new model; do not change the input")
    assert_equivalent("smooth_llama (float64 equivalence)",
                      minisq.check_equivalence(model, smoothed, ids(3, (2, 20)), dtype="float64", tol=1e-10))
    check_smoothed_family("smooth_llama", smoothed, model, stats, 0.5)


@pytest.mark.a5_3
def test_smoothing_lowers_the_w8a8_error_on_planted_outliers(student):
    model = minisq.synthetic_model(TINY_LLAMA, seed=1, outlier_scale=100.0)   # float32, outliers planted
    batches = [ids(1, (4, 24))]
    stats = minisq.calibrate(model, batches, progress=False)
    smoothed = student.smooth_llama(model, stats, 0.5)
    assert smoothed.dtype == model.dtype, f"smooth_llama: a {model.dtype} model became {smoothed.dtype}"
    test_ids = ids(4, (2, 24))
    reference = model(test_ids)
    plain = minisq.logit_error(reference, minisq.quantize(model, preset="naive", stats=stats)(test_ids))["rel_err"]
    smoothed_stats = minisq.calibrate(smoothed, batches, progress=False)
    mine = minisq.logit_error(reference, minisq.quantize(smoothed, preset="naive", stats=smoothed_stats)(test_ids))
    assert mine["rel_err"] < 0.75 * plain, (
        f"smooth_llama: W8A8 (naive preset) logits error {mine['rel_err']:.3g} with your smoothing vs {plain:.3g} "
        f"without: smoothing should move the outliers into the weights and lower it by a quarter at least")
