"""The command-line programs ``minisq demo | quantize | reproduce`` (see :mod:`minisq.__main__`).

What they share: :mod:`.variants` (the one table of variants, and how a row is built and
evaluated, eager or streamed), :mod:`.texts` (calibration and evaluation text),
:mod:`.common` (errors as one line, loading a model by the memory it needs). Besides:
:mod:`.paper` (the paper's numbers, reproduce's table and figure), :mod:`.cache`
(reproduce's resumable cache), :mod:`.report` (the demo's figures and report).
"""
