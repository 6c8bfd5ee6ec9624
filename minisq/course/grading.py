"""Grading assertions for the course (assignments/): compare a student's arrays with the
reference and raise an ``AssertionError`` whose message says where and by how much they
differ, and why that usually happens.

Every public name the graders use is importable from here: the quantizer and GEMM checks
live in this module, the plain assertions in :mod:`minisq.course.asserts`, the smoothing,
calibration and static-scale checks in :mod:`minisq.course.model_checks`, the check for
answers borrowed from minisq in :mod:`minisq.course.borrowing` and the checks of a family's
smoothing rows in :mod:`minisq.course.family_checks`. The library's diagnostics
(:func:`~minisq.diagnostics.check_equivalence`, ``sqnr_db``, ``layer_errors``,
``logit_error``) are in :mod:`minisq.diagnostics`.
"""

from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from ..errors import ConfigError
from .asserts import (  # noqa: F401
    _fmt_index,
    assert_close,
    assert_equal,
    assert_raises_value_error,
    assert_returns,
    assert_same_dtype_shape,
)
from .borrowing import borrowed, borrowed_message  # noqa: F401
from .family_checks import (  # noqa: F401
    check_row_factors, check_row_is_equivalence, check_rows, check_smoothed_family, reference_row_factors,
)
from .model_checks import (  # noqa: F401
    assert_equivalent,
    check_channel_absmax,
    check_smoothing_factors,
    check_smoothed_layernorms,
    check_smoothing_fold,
    check_static_scale,
    check_w8a8_leaf,
)

# --- graders' checks: one answer against minisq's own, with a diagnosis ----------------------------
#
# Each ``check_*`` recomputes a quantity with minisq's reference implementation and, when an answer
# differs, raises AssertionError naming the first wrong element, the numbers that should have
# produced it and, where a classic mistake explains the difference (128 for 127, a forgotten clamp,
# an int16 accumulator, multiplying where one should divide), that mistake. The course graders in
# ``assignments/`` call them; their messages are what a student reads.
#
# Legend: T tokens (rows), C_in / C_out a linear's widths (weights are [C_in, C_out], y = x @ w),
# M, K, N the GEMM's sizes ([M, K] @ [K, N]); ``...`` any leading axes.

def _group(granularity: str, x: np.ndarray, idx: tuple) -> tuple:
    """(where, how its range is written, max|x| of the group) for the scale at ``idx``."""
    if granularity == "per_token":
        row = idx[:-1]
        where = f"row {int(row[0])}" if len(row) == 1 else f"row {_fmt_index(row)}"
        label = f"x[{int(row[0])}]" if len(row) == 1 else f"x{_fmt_index(row)}"
        return where, f"max|{label}|", float(np.abs(x[row]).max())
    if granularity == "per_channel":
        j = int(idx[-1])
        return f"column (output channel) {j}", f"max|w[:, {j}]|", float(np.abs(x[:, j]).max())
    return "the tensor", "max|x|", float(np.abs(x).max())


_SCALE_SHAPES = {
    "per_tensor": "one scale for the whole tensor: a 0-d array such as np.asarray(max|x| / 127)",
    "per_token": "one scale per row, reduced over the last axis with keepdims=True so that q * scale broadcasts",
    "per_channel": "one scale per output channel (column of w), reduced over axis 0 with keepdims=True",
}


def _scale_hint(granularity, x, idx, yours, expected, static) -> str:
    from ..quant import QMAX

    where, label, amax = _group(granularity, x, idx)
    if static:
        return (f"your scale is {yours:.6g}, expected {expected:.6g}: with a static scale, return the scale "
                f"you were given (in x's dtype); do not recompute it from x")
    tiny = np.finfo(x.dtype).tiny
    quotient = float(x.dtype.type(amax) / x.dtype.type(QMAX))       # as the quantizer computes it
    if expected == 1.0 and amax == 0:
        return (f"{where} is all zeros ({label} = 0): expected scale 1 (the zero-range guard: "
                f"{label}/127 = 0 would make x / scale divide by zero), yours is {yours:.6g}")
    if expected == 1.0 and quotient < tiny:
        return (f"{where} is not zero but tiny: {label} = {amax:.6g}, so {label}/127 = {quotient:.6g} is below "
                f"the smallest normal {x.dtype} ({tiny:.6g}), a subnormal number; expected scale 1 (the "
                f"zero-range guard applies wherever {label}/127 < np.finfo({x.dtype}).tiny, not only where it "
                f"is 0), yours is {yours:.6g}")
    msg = f"{where}: your scale is {yours:.6g}, expected {expected:.6g} = {label}/127 = {amax:.6g}/127"
    if not np.isfinite(yours) or yours <= 0:
        return msg + "; a scale must be finite and > 0"
    ratio = amax / yours
    k = round(ratio)
    if k != QMAX and k > 0 and abs(ratio - k) <= 1e-4 * ratio:
        msg += f"; yours is {label}/{k}"
        if k == 128:
            msg += " — the symmetric int8 range is [-127, 127]: divide by 127, not 128"
    elif granularity != "per_tensor" and abs(yours - float(np.abs(x).max()) / QMAX) <= 1e-6 * yours:
        msg += "; yours is the max over the whole tensor / 127: reduce over " + (
            "the last axis only (axis=-1, keepdims=True)" if granularity == "per_token" else
            "axis 0 only (axis=0, keepdims=True)")
    elif amax > 0 and abs(yours * expected - 1.0) <= 1e-4:
        msg += "; yours is its inverse 127/max|x|: the scale is max|x|/127 and q = x / scale"
    return msg


def _code_hint(v: float, mine: int, rounded_x_first: int) -> str:
    """Why a code ``mine`` differs from clip(rint(v)) for the quotient v = x / scale."""
    r = int(np.rint(v))
    if mine == -128:
        return ": -128 is outside the symmetric range; clip to [-127, 127], not [-128, 127]"
    if abs(r) > 127:
        wrapped = (r + 128) % 256 - 128
        if mine == wrapped:
            return (f": x / scale = {v:.4g} lies outside int8's range and .astype(np.int8) wrapped it "
                    f"around to {mine}; clip to [-127, 127] before casting")
        return ": x / scale lies outside [-127, 127]: clip it to ±127"
    if abs(abs(v) % 1.0 - 0.5) < 1e-9 and abs(mine - v) == 0.5:
        return f": {v:.4f} is a tie, and np.rint rounds ties to the even integer ({r}), as the reference does"
    if mine in (int(np.trunc(v)), int(np.floor(v))) and mine != r:
        return (f": {v:.4f} was cut to {mine} instead of rounded to {r}; round to the nearest integer "
                f"with np.rint before casting (.astype(np.int8) alone truncates toward zero)")
    if mine == rounded_x_first and mine != r:
        return ": that is rint(x) / scale — divide by the scale first, then round"
    return ""


def check_quantized(name: str, q, scale, x, granularity: str, static_scale=None) -> None:
    """Check a quantizer's answer ``(q, scale)`` for ``x`` against minisq's.

    The reference is ``minisq.quant.quantize_<granularity>(x, static_scale)``. ``scale`` must
    have its shape and dtype and equal it to 2 units in the last place; ``q`` must be int8 and
    exactly ``clip(rint(x / scale), -127, 127)`` for the scale given (which is what the reference
    computes when the scales are equal). Raises AssertionError naming the first wrong group or
    code and, where recognisable, the mistake (127 vs 128, no clamp, truncation, zero groups).
    """
    # [...] int8, [] | [..., 1] | [1, C_out] float, [...] float -> None
    from ..quant import QMAX, QUANTIZERS

    if granularity not in QUANTIZERS:
        raise ConfigError(f"unknown granularity {granularity!r}: use one of {sorted(QUANTIZERS)}")
    x = np.asarray(to_numpy(x))
    exp_q, exp_s = (np.asarray(to_numpy(a)) for a in QUANTIZERS[granularity](x, static_scale))
    x = x.astype(exp_s.dtype)  # the compute dtype (float16 is widened to float32)
    if q is None or scale is None:
        raise AssertionError(f"{name}: got q={type(q).__name__}, scale={type(scale).__name__}; return both arrays")
    q, s = np.asarray(to_numpy(q)), np.asarray(to_numpy(scale))
    # the scale: shape, dtype, value per group
    if s.dtype.kind != "f":
        raise AssertionError(f"{name}: scale has dtype {s.dtype}; a scale is a float array of x's dtype "
                             f"({exp_s.dtype})")
    if s.shape != exp_s.shape:
        raise AssertionError(f"{name}: scale has shape {s.shape}, expected {exp_s.shape} for x of shape "
                             f"{x.shape}: {_SCALE_SHAPES[granularity]}")
    if s.dtype != exp_s.dtype:
        raise AssertionError(f"{name}: scale has dtype {s.dtype}, expected {exp_s.dtype} (x's dtype): compute "
                             f"the scale in x's dtype")
    s64, e64 = s.astype(np.float64), exp_s.astype(np.float64)
    bad = ~(np.abs(s64 - e64) <= 2 * np.finfo(exp_s.dtype).eps * np.abs(e64))  # NaN counts as bad
    if bad.any():
        idx = tuple(np.argwhere(bad)[0]) if bad.ndim else ()
        hint = _scale_hint(granularity, x, idx, float(s64[idx]), float(e64[idx]), static_scale is not None)
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} scales are wrong; {hint}")
    # the codes: exactly clip(rint(x / scale)) for this scale
    if q.shape != x.shape:
        raise AssertionError(f"{name}: q has shape {q.shape}, expected x's shape {x.shape}")
    if q.dtype != np.int8:
        what = ("q holds the integer codes themselves: " if q.dtype.kind == "f" else "")
        raise AssertionError(f"{name}: q has dtype {q.dtype}, expected int8; {what}round with np.rint, clip to "
                             f"[-127, 127], then .astype(np.int8)")
    v = x / s.astype(x.dtype)
    want = exp_q if np.array_equal(s, exp_s) else np.clip(np.rint(v), -QMAX, QMAX).astype(np.int8)
    bad = q != want
    if bad.any():
        idx = tuple(np.argwhere(bad)[0])
        sb = np.broadcast_to(s, x.shape)
        hint = _code_hint(float(v[idx]), int(q[idx]), int(np.clip(np.rint(x[idx]) / sb[idx], -QMAX, QMAX)))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.size} codes differ; first at {_fmt_index(idx)}: yours {int(q[idx])}, "
            f"expected {int(want[idx])} = clip(rint(x / scale), -127, 127) with x = {float(x[idx]):.6g}, "
            f"scale = {float(sb[idx]):.6g} (x / scale = {float(v[idx]):.4f}){hint}"
        )


def check_int_gemm(name: str, c, a_q, b_q) -> None:
    """Check an integer GEMM's answer ``c`` against the exact ``minisq.gemm.int8_gemm_reference``.

    ``c`` must be int32 of shape ``[..., N]`` and equal ``Σ_k a[..., k] b[k, :]`` exactly. A
    wrong sum is diagnosed: a difference that is a multiple of 2^16 (or 2^8) means a 16-bit
    (or 8-bit) accumulator wrapped around; a wrong sum beyond 2^24 means float32 rounding.
    """
    # [..., N] int32, [..., K] int8, [K, N] int8 -> None
    from ..gemm import int8_gemm_reference

    a_q, b_q = np.asarray(to_numpy(a_q)), np.asarray(to_numpy(b_q))
    exp = int8_gemm_reference(a_q, b_q)
    if c is None or not hasattr(c, "shape"):
        raise AssertionError(f"{name} returned {type(c).__name__}: return the [M, N] int32 array C = A @ B")
    c = np.asarray(to_numpy(c))
    if c.shape != exp.shape:
        hint = (": that is C transposed; C[i, j] = Σ_k a[i, k] · b[k, j]" if c.shape == exp.shape[::-1] else
                f" = a's rows {a_q.shape[:-1]} + b's columns ({b_q.shape[1]},)")
        raise AssertionError(f"{name}: C has shape {c.shape}, expected {exp.shape}{hint}")
    if c.dtype != np.int32:
        why = {"f": "floats round large sums and are not what an INT8 GEMM gives; return exact integers",
               "u": "unsigned integers cannot hold negative sums"}.get(c.dtype.kind, "")
        if c.dtype in (np.int8, np.int16):
            why = f"{c.dtype} cannot hold the sums (one product alone reaches 127 · 127 = 16129)"
        elif c.dtype == np.int64:
            why = "int64 is exact too, but an INT8 GEMM accumulates in (and returns) int32: cast the result"
        raise AssertionError(f"{name}: C has dtype {c.dtype}, expected int32" + (f": {why}" if why else ""))
    diff = c.astype(np.int64) - exp.astype(np.int64)
    bad = diff != 0
    if bad.any():
        idx = tuple(np.argwhere(bad)[0])
        d, e = int(diff[idx]), int(exp[idx])
        if d % 2**16 == 0:
            hint = (f"the difference {d} is a multiple of 2^16 = 65536: your sum wrapped around in a 16-bit "
                    f"accumulator (int16 holds ±32767; one product reaches 16129); accumulate in int32")
        elif d % 2**8 == 0:
            hint = (f"the difference {d} is a multiple of 2^8 = 256: the products wrapped around in int8; "
                    f"widen a and b to int32 before multiplying")
        elif abs(e) > 2**24:
            hint = ("|C| > 2^24 = 16777216, where float32 no longer holds every integer: a float32 sum of "
                    "more than 1024 products can round; sum blocks of at most 1024 in float32 and add "
                    "the blocks in int32")
        else:
            hint = "C[i, j] = Σ_k a[i, k] · b[k, j] over every k (check the axes and that no k is skipped)"
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} sums are wrong; first at {_fmt_index(idx)}: "
                             f"yours {int(c[idx])}, expected {e}; {hint}")


def check_epilogue(name: str, y, acc, row_scale, col_scale, bias=None, out_dtype=np.float32,
                   ulps: float = 4.0) -> None:
    """Check a dequantization epilogue's answer ``y`` against ``minisq.gemm.dequant_epilogue``.

    ``y`` must have ``out_dtype`` and be within ``ulps`` units of rounding of
    ``|acc · row · col| + |bias|`` of the reference ``acc · (row_scale · col_scale) + bias``
    (bit-exact when computed in that order). Names a missing bias or a missing scale.
    """
    # [..., M, N] float, [..., M, N] int32, [..., M, 1] | [], [N] | [1, N] | [], [N] | None -> None
    from ..gemm import dequant_epilogue

    acc = np.asarray(to_numpy(acc))
    dtype = np.dtype(out_dtype)
    exp = dequant_epilogue(acc, to_numpy(row_scale), to_numpy(col_scale),
                           None if bias is None else to_numpy(bias), out_dtype=dtype)
    if y is None or not hasattr(y, "shape"):
        raise AssertionError(f"{name} returned {type(y).__name__}: return the [M, N] {dtype} array")
    y = np.asarray(to_numpy(y))
    if y.shape != exp.shape:
        raise AssertionError(f"{name}: y has shape {y.shape}, expected acc's shape {exp.shape}")
    if y.dtype != dtype:
        raise AssertionError(f"{name}: y has dtype {y.dtype}, expected out_dtype={dtype.name}: cast the "
                             f"accumulator and the scales to out_dtype and compute in it")
    r = np.asarray(to_numpy(row_scale), np.float64)
    c = np.asarray(to_numpy(col_scale), np.float64).reshape(-1) if np.size(col_scale) > 1 else \
        np.asarray(to_numpy(col_scale), np.float64).reshape(())
    b = np.zeros(()) if bias is None else np.asarray(to_numpy(bias), np.float64)
    a64 = acc.astype(np.float64)
    scaled = a64 * (r * c)
    tol = ulps * np.finfo(dtype).eps * (np.abs(scaled) + np.abs(b)) + np.finfo(dtype).tiny
    y64 = y.astype(np.float64)
    err = np.where(np.isfinite(y64), np.abs(y64 - exp.astype(np.float64)), np.inf)
    bad = err > tol
    if bad.any():
        idx = tuple(int(i) for i in np.unravel_index(np.argmax(err - tol), err.shape))
        candidates = {  # a classic slip -> what it computes
            "you left out the bias: add it after scaling": scaled,
            "you applied only the row (activation) scale: multiply by the column (weight) scale too": a64 * r + b,
            "you applied only the column (weight) scale: multiply by the row (activation) scale too": a64 * c + b,
            "the bias was added before scaling: it is in output units, so add it after": (a64 + b) * (r * c),
        }
        def matches(v):
            v = float(np.broadcast_to(v, err.shape)[idx])
            return abs(v - float(y64[idx])) <= ulps * np.finfo(dtype).eps * (abs(v) + float(np.abs(b).max())) * 2

        hint = next((why for why, v in candidates.items() if matches(v)), "")
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.size} values are off; worst at {_fmt_index(idx)}: yours "
            f"{float(y64[idx]):.7g}, expected {float(exp[idx]):.7g} = acc · (row_scale · col_scale) + bias with "
            f"acc = {int(acc[idx])}" + (f"; {hint}" if hint else "")
        )
