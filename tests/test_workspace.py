"""The exact CPU GEMM's float32 workspace is bounded: a weight is converted a block of
columns at a time into one buffer per thread of at most WORKSPACE_FLOATS elements, and the
results stay bit for bit the int64 reference's. The workspace is shrunk here (64 floats)
so that tiny shapes are cut into many column blocks, one column wide at the extreme."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from minisq import gemm
from minisq.kernels import int8_cpu
from minisq.kernels import threads as kthreads
from test_kernels import _epilogue_operands, random_int8


@pytest.fixture(params=[1, 3], ids=["1 thread", "3 threads"])
def small_workspace(request, monkeypatch):
    monkeypatch.setattr(int8_cpu, "WORKSPACE_FLOATS", 64)
    monkeypatch.setattr(int8_cpu, "_WORKSPACE", threading.local())           # a fresh, empty one
    monkeypatch.setattr(kthreads, "cpu_threads", lambda: request.param)
    monkeypatch.setattr(kthreads, "PARALLEL_MIN_ELEMENTS", 1 << 6)
    monkeypatch.setattr(kthreads, "PARALLEL_MIN_WORK", 1 << 8)
    monkeypatch.setattr(kthreads, "PARALLEL_MIN_ROWS", 2)
    return request.param


def test_column_blocks_cover_every_column_once_within_the_bound(monkeypatch):
    monkeypatch.setattr(int8_cpu, "WORKSPACE_FLOATS", 100)
    for K, N in [(1, 1), (7, 30), (10, 10), (100, 3), (101, 3), (3, 1000)]:
        blocks = int8_cpu.column_blocks(K, N)
        assert [c for n0, n1 in blocks for c in range(n0, n1)] == list(range(N))
        assert all(n1 > n0 and (K * (n1 - n0) <= 100 or n1 - n0 == 1) for n0, n1 in blocks)


@pytest.mark.parametrize("M, K, N", [(5, 7, 30), (9, 64, 9), (6, 200, 5), (4, 1500, 6)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("per_token", [True, False])
def test_int8_linear_in_column_blocks_is_the_reference_bit_for_bit(small_workspace, M, K, N, dtype, per_token):
    rng = np.random.default_rng(M + K + N)
    a, w = random_int8(rng, (M, K)), random_int8(rng, (K, N))
    r, c, b = _epilogue_operands(rng, M, N, dtype, per_token, True)
    ref = gemm.epilogue_reference(gemm.int8_gemm_reference(a, w), r, c, b, np.dtype(dtype))
    np.testing.assert_array_equal(int8_cpu.int8_linear(a, w, r, c, b, np.dtype(dtype)), ref)
    np.testing.assert_array_equal(int8_cpu.int8_matmul(a, w), gemm.int8_gemm_reference(a, w))
    assert int8_cpu._WORKSPACE.buf.size <= max(64, K)                     # one column at the least


def test_the_workspace_is_one_bounded_buffer_whatever_the_shapes():
    """Weights of four shapes through one thread: one buffer, never above the bound."""
    rng = np.random.default_rng(0)
    local = threading.local()
    int8_cpu._WORKSPACE, saved = local, int8_cpu._WORKSPACE
    try:
        for K, N in [(64, 64), (64, 256), (256, 64), (128, 128)]:
            a, w = random_int8(rng, (8, K)), random_int8(rng, (K, N))
            np.testing.assert_array_equal(int8_cpu.int8_matmul(a, w), gemm.int8_gemm_reference(a, w))
        assert local.buf.size == 256 * 64 <= int8_cpu.WORKSPACE_FLOATS
    finally:
        int8_cpu._WORKSPACE = saved


def test_a_saved_w8a8_model_loaded_lazily_is_mapped_not_read(make_checkpoint, tmp_path):
    """``minisq.load(saved, lazy=True)``: every int8 weight is a read-only view of the
    memory-mapped shard (no copy in the program's memory), and the logits are the eagerly
    loaded model's, bit for bit."""
    import minisq

    folder, _ = make_checkpoint("opt", seed=6)
    m = minisq.load(folder)
    q = minisq.quantize(m, "O1")
    q.save(tmp_path / "q")
    eager, mapped = minisq.load(tmp_path / "q"), minisq.load(tmp_path / "q", lazy=True)

    def base(a):
        while getattr(a, "base", None) is not None and not isinstance(a, np.memmap):
            a = a.base
        return a

    for name, leaf in mapped.linears().items():
        if isinstance(leaf, minisq.W8A8Linear):
            assert isinstance(base(leaf.w_q), np.memmap) and not leaf.w_q.flags.writeable, name
            assert not isinstance(base(eager.linears()[name].w_q), np.memmap), name
    ids = np.random.default_rng(1).integers(0, 101, (2, 9))
    np.testing.assert_array_equal(mapped(ids), eager(ids))
    assert minisq.perplexity(mapped, ids[0], seq_len=4, progress=False) == \
        minisq.perplexity(eager, ids[0], seq_len=4, progress=False)
