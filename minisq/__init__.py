"""minisq: SmoothQuant (W8A8 post-training quantization of LLMs) from scratch in NumPy/CuPy.

The public API lives here; each name comes from a module that holds one concept. Note
that ``minisq.calibrate`` and ``minisq.smooth`` are the *functions*; their modules'
other names are imported with ``from minisq.smooth import SMOOTHING_TABLE`` and the like.
"""

from . import backend  # noqa: F401
from .eval import data, evaluate, plots  # noqa: F401
from .calibrate import CalibrationStats, calibrate  # noqa: F401
from .config import ModelConfig  # noqa: F401
from .diagnostics import check_equivalence, layer_errors, logit_error, sqnr_db  # noqa: F401
from .errors import (  # noqa: F401
    CalibrationError, CheckpointError, ConfigError, DataError, DeviceError, InputError,
    MinisqError, NonFiniteError, ShapeError, UnsafePickleError,
)
from .eval.evaluate import lambada_accuracy, perplexity  # noqa: F401
from .gemm import dequant_epilogue, int8_bmm, int8_gemm, int8_gemm_reference  # noqa: F401
from .io.loading import load  # noqa: F401
from .model import KVCache, Model, get_param, replace_param  # noqa: F401
from .nn import Linear  # noqa: F401
from .qlinear import PRESETS, W8A8Linear, quantize, quantize_linear, weight_memory  # noqa: F401
from .baselines import (  # noqa: F401
    BASELINES, GroupW8A8Linear, LLMInt8Linear, W8A16Linear, outlier_fractions,
)
from .quant import (  # noqa: F401
    dequantize, fake_quantize, quantize_per_channel, quantize_per_sequence, quantize_per_tensor,
    quantize_per_token,
)
from .smooth import (  # noqa: F401
    NOT_FOLDABLE, SMOOTHING_TABLE, mappings_for, search_alpha, smooth, smoothing_factors, weight_absmax,
)
from .layerwise import forward_layerwise  # noqa: F401
from .pipeline import quantize_checkpoint  # noqa: F401
from .synthetic import synthetic_model  # noqa: F401

__version__ = "0.1.0"
