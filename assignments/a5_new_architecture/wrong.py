"""Assignment 5, deliberately wrong: classic mistakes the graders must catch, with a message
that says what went wrong. Every task not redefined here is the reference answer.

One function per mistake, named ``<task function>__<mistake>``; the task names are bound to
one of each (``smoothing_rows``, ``row_factors``), and tests/test_assignments.py grades every
one of them in turn."""

import numpy as np

from minisq import smoothing_factors
from minisq.smooth import Mapping
from solution import *  # noqa: F401,F403  -- the right answers for every other task
from solution import row_factors as _right_factors
from solution import smoothing_rows as _right_rows


def smoothing_rows__forgets_a_consumer():
    """WRONG (Task 5.1): post_attention_layernorm feeds gate_proj AND up_proj; only up takes s."""
    # () -> tuple of Mapping
    return tuple(Mapping(r.group, r.source, r.kind, ("layers.{i}.mlp.up_proj",), r.why) if r.group == "ln_fc1" else r
                 for r in _right_rows())


def smoothing_rows__through_silu():
    """WRONG (Task 5.1): smooths gate_proj -> down_proj, through SiLU (silu(x / s) != silu(x) / s)."""
    # () -> tuple of Mapping
    return tuple(Mapping("gate_down", "layers.{i}.mlp.gate_proj", "linear", ("layers.{i}.mlp.down_proj",), r.why)
                 if r.group == "up_down" else r for r in _right_rows())


def row_factors__one_per_query_channel(act_max, w_max, alpha, source_width, head_dim):
    """WRONG (Task 5.2): ignores grouped-query attention: one factor per o_proj input channel, although
    v_proj can only divide each kv channel by one factor."""
    # [C_in] float, [C_in] float, float, int, int -> [C_in] float64
    return smoothing_factors(np.asarray(act_max, np.float64), np.asarray(w_max, np.float64), alpha)


def row_factors__wrong_side(act_max, w_max, alpha, source_width, head_dim):
    """WRONG (Task 5.2): the factor from the wrong side, 1/s: the weights' range over the activations'."""
    # [C_in] float, [C_in] float, float, int, int -> [C_in] float64
    return 1.0 / _right_factors(act_max, w_max, alpha, source_width, head_dim)


smoothing_rows = smoothing_rows__forgets_a_consumer
row_factors = row_factors__one_per_query_channel
