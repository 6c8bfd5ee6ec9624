"""minisq: SmoothQuant (W8A8 post-training quantization of LLMs) from scratch in NumPy/CuPy."""

from .errors import (  # noqa: F401
    CalibrationError, CheckpointError, ConfigError, DataError, DeviceError, InputError,
    MinisqError, ShapeError, UnsafePickleError,
)

__version__ = "0.1.0"
