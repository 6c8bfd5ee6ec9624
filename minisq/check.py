"""Kept for code written before the split: ``minisq.check`` re-exports the library's
diagnostics (:mod:`minisq.diagnostics`) and the course's grading assertions
(:mod:`minisq.grading`). New code imports from those two modules.
"""

from .diagnostics import *  # noqa: F401,F403
from .diagnostics import EquivalenceReport, _in_dtype, _rel  # noqa: F401
from .grading import *  # noqa: F401,F403
