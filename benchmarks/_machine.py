"""What a CPU benchmark is running on (the CPU model, the BLAS library and its kernel, the
load), and how the CPU benchmarks time two sides against each other (in turns, one process)."""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import time

import numpy as np


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = f.read()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
        simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
        return f"{name} ({os.cpu_count()} cores, {simd})"
    except (OSError, StopIteration):
        return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def blas_kernel() -> str:
    """NumPy's BLAS and the kernel OpenBLAS picked at run time (its 'core name'), e.g.
    'OpenBLAS 0.3.31 kernel Haswell'; the environment overrides are named when set."""
    env = ", ".join(f"{k}={os.environ[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                      "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
                    if k in os.environ) or "no OPENBLAS_* overrides"
    from minisq.kernels import threads  # the OpenBLAS that NumPy loaded, found as minisq finds it

    core, config = threads.openblas_function("get_corename"), threads.openblas_function("get_config")
    if core is not None and config is not None:
        core.restype = config.restype = ctypes.c_char_p
        version = config().decode().split()[1]
        return f"OpenBLAS {version}, kernel {core().decode()} ({env})"
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')} ({env})"
    except Exception:  # noqa: BLE001  (older NumPy)
        return f"unknown BLAS ({env})"


def load() -> str:
    try:
        return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


def interleaved(fns: dict, repeats: int) -> dict:
    """Wall times of each function, run round-robin after one warm-up each (so that a change
    in the machine's load hits every side)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def print_ratio(times: dict, labels: dict, top: str, bottom: str, target: str, digits: int = 2) -> None:
    """Each side's best and median time (``labels``: name -> printed label, in print order),
    then ``top`` over ``bottom``: best-to-best, median-to-median and the range of the
    pairwise ratios, with the target."""
    for name, label in labels.items():
        print(f"{label:<18} best {min(times[name]) * 1e3:8.1f} ms   median {statistics.median(times[name]) * 1e3:8.1f} ms")
    pairs = [a / b for a, b in zip(times[top], times[bottom])]
    print(f"ratio {top} / {bottom} = {min(times[top]) / min(times[bottom]):.{digits}f}x best-to-best, "
          f"{statistics.median(times[top]) / statistics.median(times[bottom]):.{digits}f}x median-to-median, "
          f"pairwise {min(pairs):.2f}-{max(pairs):.2f}x  (target {target})")
