"""The one module that knows about the GPU.

Everything else in minisq takes whatever array it is handed and asks this module for the
matching array module (``numpy`` or ``cupy``) with :func:`get_array_module`. CuPy is
imported lazily and only here; importing minisq never fails because CuPy or the CUDA
libraries are missing. Note that ``import cupy`` succeeds on machines without a GPU and
the first array operation fails, so :func:`gpu_available` really asks the driver.
"""

from __future__ import annotations

import contextlib
import functools

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


# ----------------------------------------------------------------------------------------
# CPU: the BLAS thread count


@functools.lru_cache(maxsize=1)
def _openblas_thread_api():
    """(get_num_threads, set_num_threads) of the OpenBLAS that NumPy uses, or None.

    NumPy's wheels bundle OpenBLAS as a shared library in the process (``scipy_openblas``
    symbols since NumPy 2, plain ``openblas_*`` in other builds); other BLAS libraries (MKL,
    Accelerate) give None, and :func:`blas_threads` is then a no-op.
    """
    import ctypes  # noqa: PLC0415
    import glob  # noqa: PLC0415
    import os  # noqa: PLC0415

    paths = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:  # Linux: the loaded libraries
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
    except OSError:
        pass
    root = os.path.dirname(np.__file__)
    paths += glob.glob(os.path.join(root, "..", "numpy.libs", "*openblas*")) + glob.glob(
        os.path.join(root, ".dylibs", "*openblas*"))
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                    return get, set_
    return None


@contextlib.contextmanager
def blas_threads(n: int):
    """Run the ``with`` block with NumPy's OpenBLAS limited to ``n`` threads (a no-op for
    other BLAS libraries); the previous count is restored afterwards.

    For many small matrix products (attention's per-head q·kᵀ and p·v), where splitting
    each one over threads gains little and every call pays a hand-off between threads —
    which costs far more than the product itself on a machine whose cores are busy with
    other work. The setting is process-wide: do not change it from concurrent threads.
    """
    api = _openblas_thread_api()
    if api is None:
        yield
        return
    get, set_ = api
    before = get()
    set_(n)
    try:
        yield
    finally:
        set_(before)
