"""W8A8 linear leaves and whole-model quantization at every SmoothQuant level."""

import numpy as np
import pytest

import minisq
from minisq.calibrate import calibrate
from minisq.gemm import int8_gemm_reference
from minisq.nn import Linear
from minisq.qlinear import PRESETS, W8A8Linear, quantize_linear, weight_memory
from minisq.quant import dequantize
from minisq.tree import _walk

GRID = [(w, a) for w in ("per_channel", "per_tensor") for a in ("per_token", "per_tensor", "static")]


def _leaf(rng, c_in=67, c_out=45, dtype=np.float64, bias=True):
    w = rng.standard_normal((c_in, c_out)).astype(dtype)
    b = rng.standard_normal(c_out).astype(dtype) if bias else None
    return Linear(w, b)


def _x(rng, shape=(3, 11, 67), dtype=np.float64):
    x = rng.standard_normal(shape).astype(dtype)
    x[..., 5] *= 30.0  # an outlier channel
    return x


@pytest.mark.parametrize("weights,acts", GRID)
def test_leaf_holds_real_integers(weights, acts):
    rng = np.random.default_rng(0)
    leaf = _leaf(rng)
    q = quantize_linear(leaf, weights, acts, x_absmax=40.0)
    assert q.w_q.dtype == np.int8 and q.w_q.shape == (67, 45)
    assert np.abs(q.w_q).max() == 127
    assert q.w_scale.shape == ((1, 45) if weights == "per_channel" else ())
    assert (q.x_scale is not None) == (acts == "static")
    np.testing.assert_allclose(dequantize(q.w_q, q.w_scale), leaf.w, atol=float(np.max(q.w_scale)) / 2 + 1e-15)


@pytest.mark.parametrize("weights,acts", GRID)
def test_int_path_equals_the_integer_formula(weights, acts):
    """Y[t, j] = Δx[t] · (Σ_k X̄[t, k] W̄[k, j]) · Δw[j] + b[j], assembled by hand from exact integers."""
    rng = np.random.default_rng(1)
    leaf, x = _leaf(rng), _x(rng)
    q = quantize_linear(leaf, weights, acts, x_absmax=float(np.abs(x).max()) * 0.8)  # static: some clipping
    y = q(x)
    x_q, x_s = q.quantize_input(x)                               # per token, per sequence or static
    assert x_s.shape == {"per_token": (3, 11, 1), "per_tensor": (3, 1, 1), "static": ()}[acts]
    if acts == "per_tensor":  # one scale per sequence: its own max |x| / 127
        np.testing.assert_array_equal(x_s.reshape(3), np.abs(x).max(axis=(1, 2)) / 127)
    acc = int8_gemm_reference(x_q.reshape(-1, 67), q.w_q)        # exact int32
    row = np.broadcast_to(x_s, (3, 11, 1)).reshape(-1, 1)
    expected = acc.astype(np.float64) * (row * np.asarray(q.w_scale)) + leaf.b
    np.testing.assert_array_equal(y.reshape(-1, 45), expected)
    assert y.dtype == np.float64 and y.shape == (3, 11, 45)


@pytest.mark.parametrize("weights,acts", GRID)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_int_path_equals_fake_quant_path(weights, acts, dtype):
    rng = np.random.default_rng(2)
    leaf, x = _leaf(rng, dtype=dtype), _x(rng, dtype=dtype)
    qi = quantize_linear(leaf, weights, acts, x_absmax=30.0, path="int")
    qf = quantize_linear(leaf, weights, acts, x_absmax=30.0, path="fake")
    yi, yf = qi(x), qf(x)
    assert yi.dtype == yf.dtype == dtype
    # both use the same integers; they differ only by the rounding of the float dot products:
    # |Δ| <= (K + 2) u · Δx Δw · (|X̄| @ |W̄|) elementwise (u = unit roundoff)
    x_q, x_s = qi.quantize_input(x.reshape(-1, 67))
    u = np.finfo(dtype).eps / 2
    bound = (67 + 2) * u * np.abs(np.asarray(x_s, np.float64) * np.asarray(qi.w_scale, np.float64)) \
        * (np.abs(x_q.astype(np.float64)) @ np.abs(qi.w_q.astype(np.float64))) + 4 * u * np.abs(leaf.b)
    diff = np.abs(yi.reshape(-1, 45).astype(np.float64) - yf.reshape(-1, 45).astype(np.float64))
    assert (diff <= bound + 4 * u * np.abs(yi.reshape(-1, 45))).all()
    if dtype == np.float64:
        assert diff.max() <= 1e-12 * np.abs(yf).max()


def test_int_and_fake_paths_agree_bit_for_bit_with_power_of_two_scales():
    """When every scale is a power of two every float op is exact: the paths are identical."""
    rng = np.random.default_rng(3)
    w = rng.integers(-127, 128, (40, 24)).astype(np.float64) / 128
    w[0, 0] = 127 / 128                                           # per-tensor scale = 1/128 exactly
    x = rng.integers(-200, 201, (9, 40)).astype(np.float64) / 64  # static scale 2^-5 clips a few
    leaf = Linear(w, None)
    qi = quantize_linear(leaf, "per_tensor", "static", x_absmax=127 / 32, path="int")
    qf = quantize_linear(leaf, "per_tensor", "static", x_absmax=127 / 32, path="fake")
    assert float(qi.w_scale) == 1 / 128 and float(qi.x_scale) == 1 / 32
    np.testing.assert_array_equal(qi(x), qf(x))


def test_static_scale_needs_calibration():
    with pytest.raises(minisq.CalibrationError, match="calibrat"):
        quantize_linear(_leaf(np.random.default_rng(4)), "per_channel", "static")
    with pytest.raises(minisq.ConfigError, match="acts"):
        quantize_linear(_leaf(np.random.default_rng(4)), "per_channel", "per_channel")


# --- whole models -----------------------------------------------------------------------------

def _ids(seed, shape, V=101):
    return np.random.default_rng(seed).integers(0, V, shape)


@pytest.fixture(scope="module", params=["gpt2", "opt"])
def family_model(request, make_checkpoint):
    model = minisq.load(make_checkpoint(request.param)[0])
    stats = calibrate(model, [_ids(1, (4, 24))], progress=False)
    return request.param, model, stats


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_quantized_model_runs_and_stays_close_to_float(family_model, preset):
    family, model, stats = family_model
    q = minisq.quantize(model, preset, stats=stats)
    assert all(isinstance(leaf, W8A8Linear) for name, leaf in q.linears().items() if name != "lm_head")
    assert isinstance(q.linears()["lm_head"], Linear)              # skipped by default
    ids = _ids(2, (2, 16))
    ref, out = model(ids), q(ids)
    assert out.dtype == np.float32
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    # tiny random models have no outliers: per-tensor W8A8 stays within a few percent of float
    assert rel < 0.05, rel
    assert rel > 1e-5  # ...and it is really quantized
    gen = q.generate(ids[0, :5], max_new_tokens=6)
    assert gen.shape == (11,) and (gen[:5] == ids[0, :5]).all()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_int_model_equals_fake_model_in_float64(family_model, preset):
    family, model, _ = family_model
    m64 = model.astype("float64")
    stats = calibrate(m64, [_ids(1, (4, 24))], progress=False)
    ids = _ids(3, (2, 16))
    a = minisq.quantize(m64, preset, stats=stats, path="int", attn_bmm=True)(ids)
    b = minisq.quantize(m64, preset, stats=stats, path="fake", attn_bmm=True)(ids)
    assert np.abs(a - b).max() <= 1e-10 * np.abs(b).max()


@pytest.mark.parametrize("preset", ["O1", "O3"])
def test_quantized_kv_cache_equals_full_forward(family_model, preset):
    """Per-token and static scales treat every token alone, so incremental decoding is exact.
    (Per-tensor *dynamic* scales depend on all tokens of a call, so O2/naive decoding differs
    from a full forward by construction.)"""
    family, model, _ = family_model
    m64 = model.astype("float64")
    stats = calibrate(m64, [_ids(1, (4, 24))], progress=False)
    q = minisq.quantize(m64, preset, stats=stats)
    ids = _ids(4, (2, 12))
    full = q(ids)
    logits, cache = q.forward(ids[:, :7], use_cache=True)
    steps = [logits]
    for t in range(7, 12):
        logits, cache = q.forward(ids[:, t:t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-11)


def test_int8_attention_bmm(family_model):
    family, model, _ = family_model
    ids = _ids(5, (2, 16))
    ref = model(ids)
    q = minisq.quantize(model, "O1", attn_bmm=True)
    plain = minisq.quantize(model, "O1")
    assert q.attn_quant is not None and plain.attn_quant is None
    err_bmm = np.linalg.norm(q(ids) - ref) / np.linalg.norm(ref)
    # quantizing q, k, v changes the result (per-token: by about as much as the linears do)
    assert err_bmm < 0.1 and np.abs(q(ids) - plain(ids)).max() > 1e-4 * np.abs(ref).max()


def test_quantize_leaves_the_original_untouched_and_refuses_misuse(family_model):
    family, model, stats = family_model
    before = {k: v.w.copy() for k, v in model.linears().items()}
    ids = _ids(6, (1, 8))
    ref = model(ids)
    q = minisq.quantize(model, "O3", stats=stats, skip=("lm_head", "*.0.*"))
    np.testing.assert_array_equal(model(ids), ref)
    for k, v in model.linears().items():
        np.testing.assert_array_equal(v.w, before[k])
    layer0 = [k for k in q.linears() if ".0." in k]
    assert layer0 and all(isinstance(q.linears()[k], Linear) for k in layer0)
    assert q.info["quantization"]["preset"] == "O3"
    with pytest.raises(minisq.CalibrationError, match="calibration stats"):
        minisq.quantize(model, "O3")
    with pytest.raises(minisq.ConfigError, match="unknown preset"):
        minisq.quantize(model, "O4")
    with pytest.raises(minisq.ConfigError, match="already quantized"):
        minisq.quantize(q, "O1")


def test_weight_memory_counts_int8_and_scales(family_model):
    family, model, _ = family_model
    fp = weight_memory(model)
    q = weight_memory(minisq.quantize(model, weights="per_channel", acts="per_token"))
    leaves = {k: v for k, v in model.linears().items() if k != "lm_head"}
    n_w = sum(v.w.size for v in leaves.values())
    n_b = sum(v.b.size for v in leaves.values() if v.b is not None)
    n_scales = sum(v.w.shape[1] for v in leaves.values())
    head = model.linears()["lm_head"].w.nbytes
    assert fp["stored_bytes"] == 4 * (n_w + n_b) + head
    assert q["stored_bytes"] == n_w + 4 * n_scales + 4 * n_b + head
    assert q["float32_bytes"] == fp["float32_bytes"] and q["quantized_layers"] == len(leaves)


# --- the same on a GPU (skipped where none is usable) ----------------------------------------

gpu = pytest.mark.skipif(not minisq.backend.gpu_available(), reason="no usable CUDA GPU (cupy + driver)")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("weights,acts", GRID)
def test_w8a8_leaf_on_gpu_equals_cpu_bit_for_bit(weights, acts):
    from minisq.backend import to_device, to_numpy

    rng = np.random.default_rng(7)
    leaf, x = _leaf(rng, dtype=np.float32), _x(rng, dtype=np.float32)
    q_cpu = quantize_linear(leaf, weights, acts, x_absmax=30.0)
    q_gpu = quantize_linear(Linear(to_device(leaf.w, "gpu"), to_device(leaf.b, "gpu")), weights, acts, x_absmax=30.0)
    np.testing.assert_array_equal(to_numpy(q_gpu.w_q), q_cpu.w_q)
    np.testing.assert_array_equal(to_numpy(q_gpu(to_device(x, "gpu"))), q_cpu(x))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_quantized_model_on_gpu_matches_cpu(family_model, preset):
    from minisq.backend import to_numpy

    family, model, stats = family_model
    ids = _ids(8, (2, 16))
    cpu = minisq.quantize(model, preset, stats=stats, attn_bmm=True)
    on_gpu = minisq.quantize(model.to("gpu"), preset, stats=stats, attn_bmm=True)
    # integer GEMMs are exact on both; float attention/LayerNorm differ by float32 rounding
    np.testing.assert_allclose(to_numpy(on_gpu(ids)), cpu(ids), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(on_gpu.generate(ids[0, :4], 4), cpu.generate(ids[0, :4], 4))


def test_each_o3_leaf_scale_is_its_calibrated_input_range_over_127(family_model):
    family, model, stats = family_model
    q = minisq.quantize(model, "O3", stats=stats)
    leaves = {n: leaf for n, leaf in q.linears().items() if isinstance(leaf, W8A8Linear)}
    assert len(leaves) >= 6
    for name, leaf in leaves.items():
        expected = np.float32(stats.input_absmax[name]) / np.float32(127)   # the input's range, not the output's
        assert float(leaf.x_scale) == float(expected), name
        assert stats.input_absmax[name] != stats.output_absmax[name]


def test_default_skip_is_the_official_layer_set(make_checkpoint):
    """The official code quantizes decoder-layer linears only: lm_head and opt-350m's
    project_in/project_out stay float."""
    model = minisq.load(make_checkpoint("opt", word_embed_proj_dim=16)[0])
    q = minisq.quantize(model, "O1")
    for name in ("lm_head", "project_in", "project_out"):
        assert isinstance(q.linears()[name], Linear), name
    assert isinstance(q.linears()["layers.0.fc1"], W8A8Linear)
    # ...and Mixtral's router (a family's KEEP_FLOAT), which matches no OPT leaf
    assert q.info["quantization"]["skip"] == ["lm_head", "project_in", "project_out", "layers.*.block_sparse_moe.gate"]


def test_one_layer_quantizes_as_in_the_whole_model(family_model):
    """quantize_leaves on one layer's subtree, named by its prefix, gives that layer of
    quantize(model): the same skip patterns (full names) and static scales."""
    from minisq.qlinear import quant_spec, quantize_leaves

    family, model, stats = family_model
    prefix = model.family.LAYER_PREFIX.format(i=1)
    skipped = next(iter(n for n in model.linears() if n.startswith(prefix + ".")))
    whole = minisq.quantize(model, "O3", stats=stats, skip=(skipped,))
    layer = quantize_leaves(minisq.get_param(model.params, prefix), quant_spec("O3", skip=(skipped,)), stats,
                            model.dtype, prefix)
    ours = dict(_walk(layer, prefix + "."))
    theirs = {n: leaf for n, leaf in whole.linears().items() if n.startswith(prefix + ".")}
    assert list(ours) == list(theirs) and isinstance(ours[skipped], Linear)
    for name, leaf in ours.items():
        assert type(leaf) is type(theirs[name])
        for field in ("w", "w_q", "w_scale", "x_scale"):
            if hasattr(leaf, field):
                np.testing.assert_array_equal(getattr(leaf, field), getattr(theirs[name], field), err_msg=name)
