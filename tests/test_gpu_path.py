"""The GPU path's speed features on a real GPU, held against the CPU reference (skipped
without one): the packed weight, the fused per-token quantizer, the float16 epilogue, W8A8
leaves that pack once, and whole SYNTHETIC models (no transformers needed, so a GPU
machine with only numpy, CuPy and pytest runs all of this file).
"""

from __future__ import annotations

import numpy as np
import pytest

import minisq
from minisq import backend
from minisq.config import ModelConfig
from minisq.errors import InputError
from minisq.gemm import TNWeight, dequant_epilogue, int8_gemm, int8_gemm_reference, pack_weight_tn
from minisq.nn import Linear
from minisq.qlinear import quantize_linear
from minisq.quant import quantize_per_token

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.gpu_available(), reason="no usable CUDA GPU (cupy + driver)")]

TINY = {"gpt2": ModelConfig(hidden_size=64, num_layers=2, num_heads=4, ffn_dim=256, vocab_size=101,
                            max_positions=64),
        "opt": ModelConfig(model_type="opt", hidden_size=64, num_layers=2, num_heads=4, ffn_dim=256,
                           vocab_size=101, max_positions=64, activation="relu", position_offset=2,
                           eos_token_id=2)}


def random_int8(rng, shape):
    return rng.integers(-128, 128, size=shape, dtype=np.int8)


@pytest.mark.parametrize("M, K, N", [(1, 1, 1), (3, 5, 7), (13, 31, 17), (5, 1025, 2), (64, 768, 3072),
                                     (37, 769, 101)])
def test_packed_int8_gemm_equals_cpu_reference(M, K, N):
    cp = backend.cupy()
    rng = np.random.default_rng(M + K + N)
    a, w = random_int8(rng, (M, K)), random_int8(rng, (K, N))
    packed = pack_weight_tn(cp.asarray(w))
    assert isinstance(packed, TNWeight) and packed.tn.flags.c_contiguous
    c = int8_gemm(cp.asarray(a), packed)
    assert isinstance(c, cp.ndarray) and c.dtype == np.int32 and c.shape == (M, N)
    np.testing.assert_array_equal(backend.to_numpy(c), int8_gemm_reference(a, w))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_fused_quantizer_equals_numpy_bit_for_bit(dtype):
    cp = backend.cupy()
    rng = np.random.default_rng(1)
    C = 777
    rows = [rng.normal(size=C), np.zeros(C), rng.normal(size=C) * 1e-39,
            np.r_[127.0, rng.integers(-127, 128, C - 1) + 0.5], np.r_[rng.normal(size=C - 1) * 1e-3, -5e3]]
    x = np.stack(rows * 3).reshape(3, 5, C).astype(dtype)
    q, s = quantize_per_token(cp.asarray(x))
    q_ref, s_ref = quantize_per_token(x)
    assert q.dtype == np.int8 and s.dtype == s_ref.dtype and s.shape == (3, 5, 1)
    np.testing.assert_array_equal(backend.to_numpy(s), s_ref)
    np.testing.assert_array_equal(backend.to_numpy(q), q_ref)
    bad = x.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="1 NaN/inf"):
        quantize_per_token(cp.asarray(bad))


@pytest.mark.parametrize("with_bias", [False, True])
def test_float16_epilogue_equals_numpy_bit_for_bit(with_bias):
    cp = backend.cupy()
    rng = np.random.default_rng(2)
    acc = rng.integers(-2**24, 2**24, size=(2, 5, 7)).astype(np.int32)
    r = rng.uniform(1e-4, 1e-1, (2, 5, 1)).astype(np.float32)
    c = rng.uniform(1e-4, 1e-1, (7,)).astype(np.float32)
    b = rng.normal(size=7).astype(np.float32) if with_bias else None
    y = dequant_epilogue(acc, r, c, b, out_dtype=np.float16)
    yg = dequant_epilogue(cp.asarray(acc), cp.asarray(r), cp.asarray(c),
                          None if b is None else cp.asarray(b), out_dtype=np.float16)
    assert yg.dtype == np.float16
    np.testing.assert_array_equal(backend.to_numpy(yg), y)


def test_w8a8_leaf_packs_its_weight_once_and_equals_the_cpu():
    cp = backend.cupy()
    rng = np.random.default_rng(3)
    w, b = rng.normal(size=(301, 45)).astype(np.float32), rng.normal(size=45).astype(np.float32)
    x = rng.normal(size=(17, 301)).astype(np.float32)
    q_cpu = quantize_linear(Linear(w, b), "per_tensor", "per_token")
    q_gpu = quantize_linear(Linear(cp.asarray(w), cp.asarray(b)), "per_tensor", "per_token")
    assert isinstance(q_gpu.w_packed, TNWeight) and q_cpu.w_packed is None
    assert q_gpu.w_q.shape == (301, 45) and cp.shares_memory(q_gpu.w_q, q_gpu.w_packed.tn)
    np.testing.assert_array_equal(backend.to_numpy(q_gpu.w_q), q_cpu.w_q)
    np.testing.assert_array_equal(backend.to_numpy(q_gpu(cp.asarray(x))), q_cpu(x))


@pytest.mark.parametrize("family", sorted(TINY))
def test_synthetic_w8a8_model_on_gpu_matches_cpu(family):
    model = minisq.synthetic_model(TINY[family], n_outliers=2)
    ids = np.random.default_rng(4).integers(0, 101, (2, 24))
    cpu = minisq.quantize(model, "O1")
    gpu = cpu.to("gpu")
    assert all(leaf.w_packed is not None for name, leaf in gpu.linears().items() if name != "lm_head")
    assert all(leaf.w_packed is None for name, leaf in gpu.to("cpu").linears().items() if name != "lm_head")
    np.testing.assert_allclose(backend.to_numpy(gpu(ids)), cpu(ids), rtol=0, atol=1e-3)
    np.testing.assert_array_equal(gpu.generate(ids[0, :4], 4), cpu.generate(ids[0, :4], 4))
    half = minisq.quantize(model, "O1").astype("float16").to("gpu")   # float16 activations
    logits = half(ids)
    assert logits.dtype == np.float16
    ref = model(ids)  # float32, CPU: float16 may move int8 codes by one (see test_fast_paths)
    err16 = np.abs(backend.to_numpy(logits).astype(np.float32) - ref).max()
    assert err16 <= 1.5 * np.abs(cpu(ids) - ref).max()
