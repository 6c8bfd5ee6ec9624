"""The command-line programs: ``minisq demo | quantize | reproduce`` (see :mod:`minisq.__main__`)."""
