"""What the command-line programs share: printing, errors as one line, and loading a model
eagerly or memory-mapped by the memory it needs.

Every program runs its body through :func:`run_program`: a :class:`minisq.MinisqError` or
an ``OSError`` (a missing file, a read-only or full disk) becomes one line on stderr and
exit status 1, with the traceback only under ``--debug``; argparse's own errors exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from pathlib import Path

import numpy as np

from .. import MinisqError, load
from ..backend import available_memory

# Peak memory of an eager run, in float32 model sizes: the model, its smoothed copy, and one
# quantized variant (int8 weights, a quarter) with activations. A model whose float32
# weights times this factor do not fit in the available memory is loaded lazily.
EAGER_PEAK_FACTOR = 2.5


def say(msg: str = "") -> None:
    print(msg, flush=True)


def add_debug_option(ap) -> None:
    ap.add_argument("--debug", action="store_true", help="on an error, print the full traceback too")


def one_line(exc: BaseException) -> str:
    """The error's message on one line (a message may wrap over several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def run_program(prog: str, body, args) -> int:
    """``body(args)``; 0 when it returns, 1 with one line on stderr for a MinisqError or an
    OSError (after the traceback when ``args.debug``). Anything else is a bug: it propagates."""
    try:
        body(args)
    except (MinisqError, OSError) as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    return 0


# --- memory and loading ---------------------------------------------------------------------

_STORAGE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def float32_bytes(folder: Path) -> int:
    """Estimated bytes of a checkpoint's weights as float32: its weight files' size scaled
    by 4 / the stored element size (config.json's ``torch_dtype``; float32 when absent)."""
    files = [p for pattern in ("*.safetensors", "*.bin", "*.npz", "*.npy") for p in Path(folder).glob(pattern)]
    stored = sum(p.stat().st_size for p in files)
    try:
        dtype = json.loads((Path(folder) / "config.json").read_text()).get("torch_dtype") or "float32"
    except (OSError, ValueError, AttributeError):
        dtype = "float32"
    return stored * 4 // _STORAGE_BYTES.get(str(dtype), 4)


def load_model(source: str, lazy: bool = False, device: str = "cpu"):
    """``(model, folder, lazy)`` for a hub id or folder: eager (on ``device``) when its float32
    weights times :data:`EAGER_PEAK_FACTOR` fit in the available memory, else lazy
    (memory-mapped, one layer at a time, on the CPU), with a line saying so; lazy too when
    asked."""
    from ..io.hub import resolve_model_dir

    folder = resolve_model_dir(source)
    if not lazy:
        need, avail = float32_bytes(folder) * EAGER_PEAK_FACTOR, available_memory()
        if avail is None or need <= avail:
            return load(source, device=device), folder, False
        say(f"{source}: an eager run needs about {need / 2**30:.1f} GiB ({EAGER_PEAK_FACTOR}x its float32 "
            f"weights) and {avail / 2**30:.1f} GiB are available: loading it lazily (memory-mapped, one layer "
            "at a time) and writing its W8A8 variants layer by layer (minisq.quantize_checkpoint)")
    return load(source, lazy=True), folder, True


def parameter_count(model) -> int:
    """Number of distinct weights in the parameter tree (a tied LM head counted once).

    Any array-like leaf with a ``shape`` counts; NumPy arrays (and memory maps) that start
    at the same address with the same sizes — the LM head as a transposed view of the
    embedding — count once."""
    seen, total = set(), 0

    def visit(node):
        nonlocal total
        if isinstance(node, dict):
            for v in node.values():
                visit(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                visit(v)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for f in dataclasses.fields(node):
                visit(getattr(node, f.name))
        elif hasattr(node, "shape") and hasattr(node, "dtype"):
            key = ((node.__array_interface__["data"][0], tuple(sorted(node.shape)))
                   if isinstance(node, np.ndarray) else id(node))
            if key not in seen:
                seen.add(key)
                total += int(np.prod(node.shape))

    visit(model.params)
    return total
