"""Fast kernels: threaded, blocked, in-place and cuBLAS versions of the reference functions in
:mod:`minisq.nn`, :mod:`minisq.gemm` and :mod:`minisq.quant`, each tested equal to its
reference (``tests/test_kernels.py``).

* :mod:`.threads` — the CPU thread runtime (rows over the cores, one BLAS thread meanwhile).
* :mod:`.cpu` — LayerNorm, RMSNorm, GELU, SiLU, softmax, blocked causal attention, linear.
* :mod:`.int8_cpu` — the exact int8 GEMM through float32 BLAS and the fused W8A8 linear.
* :mod:`.cuda` — cuBLAS's int8 GEMM (TN layout), the fused epilogue and per-token quantizer.
"""
