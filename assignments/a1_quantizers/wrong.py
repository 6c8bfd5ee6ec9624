"""Assignment 1, deliberately wrong: classic mistakes the graders must catch, with a message
that says what went wrong. Every task not redefined here is the reference answer."""

import numpy as np

from solution import *  # noqa: F401,F403  -- the right answers for every other task
from solution import QMAX, check_finite


def quantize_per_token(x):
    """WRONG (Task 1.2): divides by 128 — int8 reaches -128, but the symmetric range is ±127."""
    # [..., C] float -> [..., C] int8, [..., 1] float
    x = np.asarray(x)
    check_finite(x)
    scale = np.abs(x).max(axis=-1, keepdims=True) / 128
    scale = np.where(scale < np.finfo(x.dtype).tiny, 1, scale)
    return np.clip(np.rint(x / scale), -QMAX, QMAX).astype(np.int8), scale


def quantize_per_channel(w):
    """WRONG (Task 1.3): truncates instead of rounding (``astype(int8)`` cuts toward zero)."""
    # [C_in, C_out] float -> [C_in, C_out] int8, [1, C_out] float
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w has shape {w.shape}: expected [C_in, C_out]")
    check_finite(w)
    scale = np.abs(w).max(axis=0, keepdims=True) / QMAX
    scale = np.where(scale < np.finfo(w.dtype).tiny, 1, scale)
    return np.clip(w / scale, -QMAX, QMAX).astype(np.int8), scale


def quantize_static(x, scale):
    """WRONG (Task 1.5): forgets to clip, so x / scale beyond ±127 wraps around in int8."""
    # [...] float, [] float -> [...] int8, [] float
    x = np.asarray(x)
    check_finite(x)
    scale = np.asarray(scale, dtype=x.dtype)
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError("a static scale must be finite and > 0")
    return np.rint(x / scale).astype(np.int64).astype(np.int8), scale
