"""Assignment 3, deliberately wrong: classic mistakes the graders must catch, with a message
that says what went wrong. Every task not redefined here is the reference answer."""

import numpy as np

from minisq.nn import Linear
from solution import *  # noqa: F401,F403  -- the right answers for every other task


def smoothing_factors(act_max, w_max, alpha):
    """WRONG (Task 3.1): forgets that a channel that never fires keeps s = 1."""
    # [C] float, [C] float, float -> [C] float64
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = np.asarray(act_max, dtype=np.float64)
    w = np.asarray(w_max, dtype=np.float64)
    if a.ndim != 1 or a.shape != w.shape or not (np.isfinite(a).all() and np.isfinite(w).all()):
        raise ValueError("bad ranges")
    return np.maximum(a ** alpha / np.maximum(w, 1e-5) ** (1.0 - alpha), 1e-5)


def fold_smoothing(ln, targets, s):
    """WRONG (Task 3.2): smooths the wrong side — multiplies the LayerNorm by s instead of dividing."""
    # {"g": [C], "b": [C]}, [Linear [C, C_out_i]], [C] -> {"g": [C], "b": [C]}, [Linear [C, C_out_i]]
    dtype = targets[0].w.dtype
    s = np.asarray(s, dtype=dtype)
    g = ln["g"] if ln["g"] is not None else np.ones(s.shape[0], dtype)
    b = ln["b"] if ln["b"] is not None else np.zeros(s.shape[0], dtype)
    return {"g": g * s, "b": b * s}, [Linear(t.w * s[:, None], t.b) for t in targets]
