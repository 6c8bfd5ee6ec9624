"""Assertions whose failure message a student can act on: shapes, dtypes, exact and close
equality, and a function's returned tuple. Every course check (:mod:`minisq.course.grading`)
is built on these."""

from __future__ import annotations

import numpy as np

from ..backend import to_numpy

# --- assertions with messages a student can act on -------------------------------------------

def assert_same_dtype_shape(name: str, got, expected) -> None:
    got, expected = to_numpy(got), to_numpy(expected)
    if got.shape != expected.shape:
        raise AssertionError(f"{name}: shape {got.shape}, expected {expected.shape}")
    if got.dtype != expected.dtype:
        raise AssertionError(f"{name}: dtype {got.dtype}, expected {expected.dtype}")


def assert_equal(name: str, got, expected, explain: str = "") -> None:
    """Exact equality (integers, int8 codes), pointing at the first differing element."""
    assert_same_dtype_shape(name, got, expected)
    got, expected = to_numpy(got), to_numpy(expected)
    bad = got != expected
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.size} values differ; first at {list(idx)}: "
            f"yours {got[idx].item()!r}, expected {expected[idx].item()!r}" + (f" ({explain})" if explain else "")
        )


def assert_close(name: str, got, expected, rtol: float = 1e-6, atol: float = 0.0, explain: str = "") -> None:
    """``|got - expected| <= atol + rtol |expected|`` elementwise, pointing at the worst element."""
    assert_same_dtype_shape(name, got, expected)
    got, expected = np.asarray(to_numpy(got), np.float64), np.asarray(to_numpy(expected), np.float64)
    if not np.isfinite(got).all():
        raise AssertionError(f"{name}: holds NaN or inf ({int((~np.isfinite(got)).sum())} values)")
    excess = np.abs(got - expected) - (atol + rtol * np.abs(expected))
    if (excess > 0).any():
        idx = tuple(int(i) for i in np.unravel_index(np.argmax(excess), excess.shape))
        raise AssertionError(
            f"{name}: at {list(idx)} yours is {got[idx]:.6g}, expected {expected[idx]:.6g} "
            f"(|diff| {abs(got[idx] - expected[idx]):.3g} > atol {atol:g} + rtol {rtol:g}·|expected|)"
            + (f"; {explain}" if explain else "")
        )


def _fmt_index(idx) -> str:
    return "[" + ", ".join(str(int(i)) for i in idx) + "]"


def assert_returns(name: str, result, fields: tuple) -> tuple:
    """``result`` unpacked as a tuple of ``len(fields)`` values, or an AssertionError saying what
    the function should have returned (e.g. ``fields=("q", "scale")``)."""
    want = "(" + ", ".join(fields) + ")"
    if result is None:
        raise AssertionError(f"{name} returned None: return the tuple {want}")
    if not isinstance(result, (tuple, list)) or len(result) != len(fields):
        got = type(result).__name__ + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
        raise AssertionError(f"{name} returned a {got}: return the tuple {want}")
    return tuple(result)


def assert_raises_value_error(name: str, call, rule: str) -> None:
    """``call()`` must raise ValueError, as the handout's ``rule`` says; the message names the rule."""
    try:
        call()
    except ValueError:
        return
    except Exception as err:   # noqa: BLE001  -- any other error breaks the rule too: say which
        raise AssertionError(f"{name} raised {type(err).__name__} ({err}), expected ValueError; the rule: "
                             f"{rule}") from None
    raise AssertionError(f"{name} returned normally, expected ValueError; the rule: {rule}")
