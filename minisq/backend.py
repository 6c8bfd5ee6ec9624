"""The one module that knows about the GPU: device dispatch.

Everything else in minisq takes whatever array it is handed and asks this module for the
matching array module (``numpy`` or ``cupy``) with :func:`get_array_module`. CuPy is
imported lazily and only here; importing minisq never fails because CuPy or the CUDA
libraries are missing. Note that ``import cupy`` succeeds on machines without a GPU and
the first array operation fails, so :func:`gpu_available` really asks the driver.

The GPU kernels (:mod:`minisq.kernels.cuda`) get CuPy from here too (:func:`cupy`,
:func:`cublas_module`); the CPU's thread runtime is :mod:`minisq.kernels.threads`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from .errors import DeviceError

DEVICES = ("cpu", "gpu")


@functools.lru_cache(maxsize=1)
def _cupy_or_error():
    """(the cupy module, None), or (None, why it cannot be imported)."""
    try:
        import cupy  # noqa: PLC0415  (the only CuPy import in minisq)
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        return None, f"CuPy cannot be imported ({type(exc).__name__}: {exc})"
    return cupy, None


def _cupy():
    """The cupy module, or None when it cannot be imported."""
    return _cupy_or_error()[0]


@functools.lru_cache(maxsize=1)
def gpu_unavailable_reason() -> str | None:
    """None when a GPU is usable; otherwise one line saying why not (for reports)."""
    cp, why = _cupy_or_error()
    if cp is None:
        return why + ": install the GPU extra, pip install 'minisq[gpu]' (CUDA 12) or 'minisq[gpu-cuda13]'"
    try:
        if not cp.cuda.is_available():
            return f"CuPy {cp.__version__} imports, but no CUDA device is visible (no GPU or no driver)"
        cp.asarray([1.0]).sum().item()  # the first real op is what fails without a GPU
    except Exception as exc:
        return f"CuPy {cp.__version__} imports, but the first GPU operation failed ({type(exc).__name__}: {exc})"
    return None


def gpu_available() -> bool:
    """True when CuPy imports *and* a CUDA device answers."""
    return gpu_unavailable_reason() is None


def cupy():
    """The cupy module; raises DeviceError when no GPU is usable."""
    if not gpu_available():
        raise DeviceError(
            f"a GPU was asked for, but none is usable ({gpu_unavailable_reason()}); on a machine "
            "with an NVIDIA GPU and driver install the GPU extra (pip install 'minisq[gpu]' for "
            "cupy-cuda12x, 'minisq[gpu-cuda13]' for cupy-cuda13x), or use device='cpu'"
        )
    return _cupy()


def check_device(device: str) -> str:
    """Validate a device name ('cpu' or 'gpu') and that it is usable."""
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}: use one of {DEVICES}")
    if device == "gpu":
        cupy()
    return device


def get_array_module(x):
    """numpy for NumPy arrays (and anything else), cupy for CuPy arrays."""
    cp = _cupy()
    if cp is not None and isinstance(x, cp.ndarray):
        return cp
    return np


def xp_for(device: str):
    """The array module for a device name."""
    return cupy() if check_device(device) == "gpu" else np


def is_gpu_array(x) -> bool:
    return get_array_module(x) is not np


def to_device(x, device: str):
    """Copy an array to 'cpu' (NumPy) or 'gpu' (CuPy); no copy when already there."""
    if x is None:
        return None
    return xp_for(device).asarray(x)


def to_numpy(x):
    """A NumPy array from a NumPy or CuPy array (or anything array-like)."""
    if is_gpu_array(x):
        return x.get()
    return np.asarray(x)


def cublas_module():
    """CuPy's thin cuBLAS binding (``cupy_backends.cuda.libs.cublas``: gemmEx, ...).

    Used by the INT8 GEMM (``cublasGemmEx`` with int8 inputs), which CuPy's own matmul
    does not offer. Raises DeviceError when no GPU is usable.
    """
    cupy()
    from cupy_backends.cuda.libs import cublas  # noqa: PLC0415  (CuPy stays in this module)

    return cublas


def cublas_handle() -> int:
    """The cuBLAS handle CuPy keeps for the current device (an int pointer)."""
    return cupy().cuda.device.get_cublas_handle()


def available_memory() -> int | None:
    """Bytes of CPU memory available to a new allocation (Linux ``MemAvailable``: free memory
    plus what the page cache would give back), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
