"""minisq's exceptions: one small family, each message naming what is at fault and what to do.

Every error minisq raises on purpose is a :class:`MinisqError`. The subclasses that mean
"you passed a bad value" also derive from ``ValueError`` so generic code that catches
``ValueError`` keeps working.
"""


class MinisqError(Exception):
    """Base class of every error minisq raises on purpose."""


class CheckpointError(MinisqError):
    """A checkpoint or config file is missing, truncated, corrupt or unreadable."""


class UnsafePickleError(CheckpointError):
    """A pytorch_model.bin pickle asked for something other than tensors; nothing was run."""


class ConfigError(MinisqError, ValueError):
    """An unsupported model type, option or argument value."""


class ShapeError(MinisqError, ValueError):
    """An array's shape or dtype does not match what the config or operation needs."""


class InputError(MinisqError, ValueError):
    """Bad model input: token ids out of range, sequence too long, NaN/inf, empty batch."""


class CalibrationError(MinisqError, ValueError):
    """Missing, empty or mismatched calibration statistics."""


class DeviceError(MinisqError):
    """A device was asked for that is not usable here (e.g. a GPU where none is)."""


class DataError(MinisqError):
    """A dataset file is missing and cannot be downloaded, or is malformed."""


class NonFiniteError(InputError):
    """NaN or inf where finite numbers are needed: in weights, activations or logits."""
