"""Assignment 4, deliberately wrong: classic mistakes the graders must catch, with a message
that says what went wrong. Every task not redefined here is the reference answer."""

import numpy as np

from solution import *  # noqa: F401,F403  -- the right answers for every other task
from solution import QMAX


def calibrate_channel_absmax(model, batches):
    """WRONG (Task 4.1): records max(x), not max(|x|) — negative outliers go unseen."""
    # list of [B, T] | [T] int -> {name: [C_in] float64}
    if len(batches) == 0:
        raise ValueError("calibration needs at least one batch")
    absmax = {}

    def observe(name, leaf):
        def observed(x, mask=None):
            seen = x.reshape(-1, x.shape[-1]).max(axis=0).astype(np.float64)
            absmax[name] = np.maximum(absmax[name], seen) if name in absmax else seen
            return leaf(x, mask)
        return observed

    observed_model = model.replace_linears(observe)
    for ids in batches:
        observed_model(np.asarray(ids))
    return absmax


def static_scale(channel_absmax, dtype=np.float32):
    """WRONG (Task 4.2): averages the channel ranges, so outlier channels clip."""
    # [C_in] float -> [] dtype
    absmax = np.asarray(channel_absmax, dtype=np.float64)
    if not np.isfinite(absmax).all() or (absmax < 0).any():
        raise ValueError("a calibrated range must be finite and >= 0")
    scale = np.asarray(absmax.mean(), dtype=dtype) / np.asarray(QMAX, dtype=dtype)
    return np.asarray(1.0 if scale < np.finfo(dtype).tiny else scale, dtype=dtype)
