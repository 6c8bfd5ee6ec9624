"""Arguments first: small checks every public function runs on its arguments before it
writes or allocates anything, each raising a :class:`~minisq.errors.MinisqError` subclass
whose message names the argument, the range and what was given.

NumPy scalars (``np.float32(0.5)``, ``np.int64(3)``) count as the numbers they hold and come
back as plain Python ``float`` / ``int`` (JSON-safe); ``bool`` is not a number here, and
neither is a string (``"0.5"`` is refused: minisq never guesses a number out of text).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .errors import ConfigError


def real(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
         error=ConfigError) -> float:
    """``value`` as a finite Python float in [lo, hi] (``(lo, hi]`` with ``lo_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    x = float(value)
    if not math.isfinite(x):
        raise error(f"{name} must be a finite number, got {x}")
    if lo is not None and (x < lo or (lo_open and x == lo)):
        raise error(f"{name} must be {'>' if lo_open else '>='} {lo}, got {x}")
    if hi is not None and x > hi:
        raise error(f"{name} must be <= {hi}, got {x}")
    return x


def integer(name: str, value, lo: int | None = None, hi: int | None = None, *, error=ConfigError) -> int:
    """``value`` as a Python int in [lo, hi]; floats (even ``2.0``) and bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    n = int(value)
    if lo is not None and n < lo:
        raise error(f"{name} must be >= {lo}, got {n}")
    if hi is not None and n > hi:
        raise error(f"{name} must be <= {hi}, got {n}")
    return n


def flag(name: str, value, *, error=ConfigError) -> bool:
    """``value`` as a Python bool: only True or False (NumPy's included), never a truthy string
    such as ``"no"``."""
    if not isinstance(value, (bool, np.bool_)):
        raise error(f"{name} must be True or False, got {value!r}")
    return bool(value)


def alpha(value, name: str = "alpha"):
    """SmoothQuant's migration strength: one number in [0, 1], or a dict ``{source: α}``
    (as :func:`minisq.search_alpha` gives), every α checked; returned JSON-safe."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{name} keys must be source names (str), got {k!r}")
            out[k] = real(f"{name}[{k!r}]", v, 0.0, 1.0)
        return out
    return real(name, value, 0.0, 1.0)
