"""Fast kernels: threaded, blocked, in-place and cuBLAS versions of the reference functions in
:mod:`minisq.nn` and :mod:`minisq.gemm`, each tested equal to its reference."""
