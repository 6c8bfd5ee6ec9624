"""The CPU thread runtime: minisq's own threads for NumPy's one-core elementwise passes.

NumPy runs each elementwise pass on one core; :func:`run_parallel` and the helpers after it
share rows (or attention's heads) out over the cores with a small pool of threads, and hold
NumPy's OpenBLAS at one thread meanwhile (:func:`one_blas_thread`). Every helper gives the
same result as the plain call it replaces (bit for bit for row-wise work; see
:func:`matmul_rows` for the one exception), only faster. Used by the kernels in
:mod:`minisq.kernels.cpu` and :mod:`minisq.kernels.int8_cpu`.

Legend: M rows, K the reduced axis, N columns.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..backend import get_array_module

@functools.lru_cache(maxsize=1)
def _openblas_libraries() -> tuple:
    """The OpenBLAS shared libraries NumPy may use, loaded with ctypes (none for MKL or
    Accelerate). NumPy's wheels bundle OpenBLAS in the process: the ones already loaded are
    read from ``/proc/self/maps`` (Linux), then the wheel's own folders are looked in."""
    import ctypes  # noqa: PLC0415
    import glob  # noqa: PLC0415

    paths = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:  # Linux: the loaded libraries
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
    except OSError:
        pass
    root = os.path.dirname(np.__file__)
    paths += glob.glob(os.path.join(root, "..", "numpy.libs", "*openblas*")) + glob.glob(
        os.path.join(root, ".dylibs", "*openblas*"))
    libs = []
    for path in paths:
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            continue
    return tuple(libs)


@functools.lru_cache(maxsize=None)
def openblas_function(name: str):
    """OpenBLAS's C function ``name`` (e.g. ``"get_num_threads"``) as a ctypes function, or
    None: ``scipy_openblas_<name>64_`` since NumPy 2, plain ``openblas_<name>`` in other
    builds. The caller sets its ``restype`` / ``argtypes``."""
    for lib in _openblas_libraries():
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                fn = getattr(lib, f"{prefix}_{name}{suffix}", None)
                if fn is not None:
                    return fn
    return None


@functools.lru_cache(maxsize=1)
def _openblas_thread_api():
    """(get_num_threads, set_num_threads) of the OpenBLAS that NumPy uses, or None (other
    BLAS libraries: MKL, Accelerate; :func:`one_blas_thread` is then a no-op)."""
    import ctypes  # noqa: PLC0415

    get, set_ = openblas_function("get_num_threads"), openblas_function("set_num_threads")
    if get is None or set_ is None:
        return None
    get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
    return get, set_


_BLAS_LOCK = threading.Lock()
_BLAS_HOLD = {"depth": 0, "before": 1}   # how many blocks hold OpenBLAS at one thread, and its count before


@contextlib.contextmanager
def one_blas_thread():
    """Run the ``with`` block with NumPy's OpenBLAS on one thread (a no-op for other BLAS
    libraries), the thread count before restored when the last such block ends.

    minisq's CPU code shares its work out over its own threads (:func:`run_parallel`), each
    calling BLAS on one thread: OpenBLAS's own workers, once woken, spin for about 0.1 s
    after every product, and on a small machine that spinning takes the very cores the
    elementwise passes that follow need. The setting is process-wide; blocks may nest and
    may run in several threads at once (they are counted under a lock). With another BLAS
    (MKL, Accelerate) nothing is changed: limit its threads yourself (``MKL_NUM_THREADS=1``)
    if minisq's threads and its threads oversubscribe the cores.
    """
    api = _openblas_thread_api()
    if api is None:
        yield
        return
    get, set_ = api
    with _BLAS_LOCK:
        if _BLAS_HOLD["depth"] == 0:
            _BLAS_HOLD["before"] = get()
            set_(1)
        _BLAS_HOLD["depth"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_HOLD["depth"] -= 1
            if _BLAS_HOLD["depth"] == 0:
                set_(_BLAS_HOLD["before"])


def cpu_threads() -> int:
    """How many threads minisq's CPU code shares work out over: NumPy's OpenBLAS thread
    count (which follows ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS``; inside
    :func:`one_blas_thread`, the count from before), or the CPUs this process may run on
    when the BLAS is not OpenBLAS."""
    api = _openblas_thread_api()
    if api is not None:
        with _BLAS_LOCK:
            return max(1, _BLAS_HOLD["before"] if _BLAS_HOLD["depth"] else api[0]())
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def _pool(pid: int, n: int) -> ThreadPoolExecutor:
    # keyed by the process id too: a child made by fork() has none of its parent's threads
    return ThreadPoolExecutor(n, thread_name_prefix="minisq-cpu")


def run_parallel(fn, parts: list) -> list:
    """``[fn(p) for p in parts]``, with the parts on up to :func:`cpu_threads` threads: the
    first in the calling thread, the others handed to a pool of worker threads.

    NumPy releases the GIL inside BLAS calls and inside ufunc loops over large arrays, so
    Python functions that spend their time there really run side by side; the results come
    back in the order of ``parts``. NumPy's elementwise ufuncs use one core, where torch's
    use all of them: this is how minisq uses the others, without a dependency. Each part
    must write only its own memory. Called from inside a part, it runs its parts in that
    thread (a worker waiting on the pool it belongs to could wait forever).
    """
    n = min(len(parts), cpu_threads())
    if n <= 1 or getattr(_WORKER, "busy", False):
        return [fn(p) for p in parts]
    pool = _pool(os.getpid(), n - 1)
    futures = [pool.submit(_as_worker, fn, parts[i::n]) for i in range(1, n)]
    try:
        mine = _as_worker(fn, parts[0::n])
    finally:
        done = [f.result() for f in futures]   # every part finished (or raised) before returning
    results = [None] * len(parts)
    for i, got in enumerate([mine] + done):
        results[i::n] = got
    return results


_WORKER = threading.local()


def _as_worker(fn, parts):
    # [fn(p) for p in parts] in this thread, marked busy so that fn runs nested calls in place
    _WORKER.busy = True
    try:
        return [fn(p) for p in parts]
    finally:
        _WORKER.busy = False


def row_ranges(rows: int, n: int) -> list:
    """``n`` contiguous ``(start, stop)`` ranges covering ``range(rows)``, sizes within one."""
    n = max(1, min(n, rows))
    cuts = [rows * i // n for i in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


# Below these sizes minisq leaves the work to one thread, or to BLAS's own threads (a
# hand-off to a thread takes about 0.1 ms on a 2-core VM). A product of fewer rows is done
# better by BLAS, which cuts the weight's columns so that each thread streams only its
# part; from 64 rows per thread on, rows cut by minisq are within 5-15% of BLAS's own
# split on GPT-2's shapes, and they keep BLAS's workers asleep: once woken, those spin for
# about 0.1 s after every product, on the cores that minisq's elementwise threads need
# (in a forward pass that mixed the two, products ran up to 2x slower).
PARALLEL_MIN_ELEMENTS = 1 << 19   # elements of an elementwise pass (or attention scores)
PARALLEL_MIN_WORK = 1 << 24       # multiply-adds of a matrix product (about 0.3 ms on one core)
PARALLEL_MIN_ROWS = 64            # rows of a matrix product per thread


def split_rows(fn, x, out):
    """``fn(x, out)`` on NumPy arrays, with the rows of ``x`` and ``out`` (same shape, both
    C-contiguous) cut into one block per thread and the blocks run by :func:`run_parallel`.

    For functions ``fn(x, out)`` that write each row of ``out`` from the same row of ``x``
    (elementwise passes, dtype conversions): the result is the same bit for bit, only
    faster. CuPy arrays, small arrays and non-contiguous ones of more than 2 axes get one
    plain call.
    # [..., N], [..., N] -> out
    """
    if (get_array_module(x) is not np or x.size < PARALLEL_MIN_ELEMENTS or x.ndim == 0
            or not ((x.flags.c_contiguous and out.flags.c_contiguous) or (x.ndim == 2 and out.ndim == 2))):
        fn(x, out)
        return out
    x2, out2 = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])   # views, no copies
    run_parallel(lambda r: fn(x2[r[0]:r[1]], out2[r[0]:r[1]]), row_ranges(x2.shape[0], cpu_threads()))
    return out


def row_blocks(rows: int, work: int) -> list:
    """How :func:`run_row_blocks` cuts a job of ``rows`` independent rows and ``work``
    multiply-adds: one ``(start, stop)`` range per thread, or one range for all the rows when
    the job is too small to be worth sharing (see ``PARALLEL_MIN_ROWS``)."""
    threads = cpu_threads()
    if threads == 1 or rows < PARALLEL_MIN_ROWS * threads or work < PARALLEL_MIN_WORK:
        return [(0, rows)]
    return row_ranges(rows, threads)


def run_row_blocks(fn, blocks: list) -> None:
    """``fn((start, stop))`` over row blocks from :func:`row_blocks`: with several, each on
    its own thread and every BLAS call on one thread (:func:`one_blas_thread`); with one, a
    plain call, where BLAS uses its own threads as usual. ``fn`` writes only its rows."""
    if len(blocks) == 1:
        fn(blocks[0])
        return
    with one_blas_thread():
        run_parallel(fn, blocks)


def matmul_rows(a, b, bias=None):
    """``a @ b (+ bias)`` for 2-D ``a``; on NumPy with the rows of ``a`` cut into one block
    per thread (:func:`run_row_blocks`).

    Every row of the result is one row of ``a`` times ``b``, so the blocks are independent;
    their float rounding can differ from a single BLAS call's in the last bit (BLAS blocks
    its work by shape). CuPy arrays get the plain expression.
    # [M, K], [K, N], [N] -> [M, N]
    """
    if get_array_module(a) is not np:
        y = a @ b
        if bias is not None:
            y += bias
        return y
    M, K = a.shape
    y = np.empty((M, b.shape[1]), dtype=np.result_type(a, b))

    def rows(r):
        np.matmul(a[r[0]:r[1]], b, out=y[r[0]:r[1]])
        if bias is not None:
            y[r[0]:r[1]] += bias          # in place: no second array of y's size

    run_row_blocks(rows, row_blocks(M, M * K * b.shape[1]))
    return y
