"""minisq: SmoothQuant (W8A8 post-training quantization of LLMs) from scratch in NumPy/CuPy.

The public API lives here; each name comes from a module that holds one concept.
"""

from .config import ModelConfig  # noqa: F401
from .errors import (  # noqa: F401
    CalibrationError, CheckpointError, ConfigError, DataError, DeviceError, InputError,
    MinisqError, ShapeError, UnsafePickleError,
)
from .loading import load  # noqa: F401
from .model import KVCache, Model  # noqa: F401
from .nn import Linear  # noqa: F401

__version__ = "0.1.0"
