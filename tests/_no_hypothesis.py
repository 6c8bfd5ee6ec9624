"""Stand-ins for hypothesis where it is not installed (e.g. a GPU machine that runs only
``pytest -m gpu`` with numpy, CuPy and pytest): every ``@given`` test skips with a reason,
the strategies are never drawn from, and the rest of the module (the GPU tests) still runs.
With the test extra installed (``pip install -e '.[test]'``) this module is not used.
"""

from __future__ import annotations

import pytest


class _Strategy:
    """Accepts any strategy construction at import time (st.integers(...), @st.composite, ...)."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self


st = hnp = _Strategy()


def given(*args, **kwargs):
    return pytest.mark.skip(reason="hypothesis is not installed (pip install -e '.[test]')")


def settings(*args, **kwargs):
    return lambda fn: fn
