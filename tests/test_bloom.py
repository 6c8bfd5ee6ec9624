"""BLOOM held against transformers (ALiBi for 4, 6 and 12 heads, the per-head interleaved
query_key_value, the embedding LayerNorm), its smoothing rows as float64 equivalences, its
quantized paths, the streamed pipeline, and its errors."""

import contextlib
import json
import shutil

import numpy as np
import pytest
import torch
import transformers

import minisq
from minisq.families import bloom

import family_checks as fc

BASE = dict(hidden_size=48, n_layer=2, vocab_size=fc.V)


def hf_bloom(n_head=6, seed=0, **overrides):
    torch.manual_seed(seed)
    return fc.perturbed(transformers.BloomForCausalLM(transformers.BloomConfig(**{**BASE, "n_head": n_head,
                                                                                  **overrides})), seed + 1)


@contextlib.contextmanager
def float64_transformers():
    """transformers' BLOOM takes its attention softmax in float32 even in a float64 model; for a
    float64 oracle it keeps the scores' dtype (everything else, ALiBi's float32 slopes included,
    is transformers' own)."""
    functional = transformers.models.bloom.modeling_bloom.F
    softmax = functional.softmax

    def softmax_in_input_dtype(x, dim=None, dtype=None, **kw):
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype, **kw)

    functional.softmax = softmax_in_input_dtype
    try:
        yield
    finally:
        functional.softmax = softmax


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """n_head -> (folder, transformers model); 6 heads is not a power of two, 12 has extra slopes
    that are not powers of two either."""
    out = {}
    for H in (4, 6, 12):
        hf = hf_bloom(H)
        folder = tmp_path_factory.mktemp(f"bloom{H}")
        hf.save_pretrained(folder)
        out[H] = (folder, hf)
    return out


@pytest.mark.parametrize("H", [4, 6, 12])
def test_alibi_slopes_and_bias_are_transformers(H):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor

    np.testing.assert_array_equal(bloom.alibi_slopes(H), _get_alibi_slopes(H, "cpu").numpy())
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    theirs = build_alibi_tensor(torch.from_numpy(mask), H, torch.float64).numpy().reshape(2, H, 1, 6)
    np.testing.assert_array_equal(bloom.alibi_bias(mask, H, np.float64), theirs)


@pytest.mark.parametrize("H", [4, 6, 12])
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-4), (np.float64, 1e-9)])
def test_logits_match_transformers(checkpoints, H, dtype, tol):
    folder, hf = checkpoints[H]
    assert fc.max_abs_vs_transformers(folder, hf, dtype, float64_transformers) <= tol


def test_config_and_tree(checkpoints):
    model = minisq.load(checkpoints[6][0])
    cfg = model.config
    assert (cfg.model_type, cfg.num_heads, cfg.head_dim, cfg.ffn_dim, cfg.alibi) == ("bloom", 6, 8, 192, True)
    assert np.shares_memory(model.params["lm_head"].w, model.params["word_embeddings"])     # tied
    assert "h.0.self_attention.query_key_value" in model.linears()


def test_left_padded_batch_matches_transformers(checkpoints):
    folder, hf = checkpoints[6]
    model = minisq.load(folder, dtype="float64")
    x = fc.ids(5, (2, 10))
    mask = np.ones_like(x)
    mask[1, :4] = 0
    want = fc.hf_logits(hf, x, np.float64, float64_transformers, attention_mask=torch.from_numpy(mask))
    real = mask.astype(bool)
    assert np.abs(model(x, mask)[real] - want[real]).max() <= 1e-9


def test_kv_cache_and_greedy_generation_equal_transformers(checkpoints):
    folder, hf = checkpoints[6]
    model = minisq.load(folder, dtype="float64")
    assert fc.kv_cache_decoding_error(model) <= 1e-12
    ours, theirs = fc.greedy_generations(model, hf, float64_transformers)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("groups", ["all", ("ln_qkv",), ("ln_fc1",)])
def test_smoothing_is_an_equivalence_in_float64(checkpoints, groups):
    model = minisq.load(checkpoints[6][0], dtype="float64")
    report, factors = fc.smoothing_report(model, groups)
    assert report.passed, str(report)
    assert any(np.abs(np.asarray(s) - 1).max() > 0.1 for s in factors.values())   # the factors really move


def test_smoothing_rows_and_reasons():
    assert [m.group for m in bloom.SMOOTHING] == ["ln_qkv", "ln_fc1"] and all(m.why for m in bloom.SMOOTHING)
    assert "GELU" in minisq.NOT_FOLDABLE["bloom"]["h.{i}.mlp.dense_h_to_4h -> h.{i}.mlp.dense_4h_to_h"]


@pytest.mark.parametrize("preset,attn", [("O1", True), ("O3", "static"), ("O2", False)])
def test_int_path_equals_fake_path_with_alibi_attention(checkpoints, preset, attn, tmp_path):
    model = minisq.load(checkpoints[6][0], dtype="float64")
    calib = [fc.ids(30, (2, 12))]
    sm = minisq.smooth(model, minisq.calibrate(model, calib, progress=False))
    stats = minisq.calibrate(sm, calib, progress=False)
    x = fc.ids(31, (2, 12))
    q_int = minisq.quantize(sm, preset, path="int", stats=stats, attn_bmm=attn)
    got = q_int(x)
    np.testing.assert_allclose(got, minisq.quantize(sm, preset, path="fake", stats=stats, attn_bmm=attn)(x),
                               rtol=0, atol=1e-9)
    assert 0 < minisq.logit_error(model(x), got)["rel_err"] < 0.5
    np.testing.assert_array_equal(minisq.load(q_int.save(tmp_path / "q"))(x), got)


def test_static_qkv_ranges_are_cut_per_head(checkpoints):
    model = minisq.load(checkpoints[6][0], dtype="float64")
    x = fc.ids(32, (2, 12))
    stats = minisq.calibrate(model, [x], progress=False)
    layer = model.params["h"][0]
    h = minisq.nn.layer_norm(bloom.embed(model, x, None, None), **layer["input_layernorm"], eps=1e-5)
    q, k, v = bloom.split_qkv(layer["self_attention"]["query_key_value"](h), 6)
    # the model runs the LayerNorm kernel, this the reference: equal to float64 rounding
    np.testing.assert_allclose(stats.qkv_absmax(model, 0), (np.abs(q).max(), np.abs(k).max(), np.abs(v).max()),
                               rtol=1e-14, atol=0)


def test_streamed_quantize_checkpoint_equals_in_memory(checkpoints, tmp_path):
    fc.assert_streamed_equals_in_memory(checkpoints[6][0], tmp_path / "q", "O3", attn_bmm="static")


def test_float16_and_lazy_storage_compute_as_float32(checkpoints, tmp_path):
    folder = tmp_path / "fp16"
    checkpoints[6][1].to(torch.float16).save_pretrained(folder)
    checkpoints[6][1].to(torch.float32)
    x = fc.ids(33, (2, 9))
    want = minisq.load(folder)(x)
    np.testing.assert_array_equal(minisq.load(folder, dtype="float16")(x), want)
    np.testing.assert_array_equal(minisq.load(folder, lazy=True)(x), want)


def test_smoothquant_o1_is_well_below_naive_on_a_synthetic_bloom_with_planted_outliers():
    cfg = minisq.ModelConfig(model_type="bloom", vocab_size=fc.V, hidden_size=64, num_layers=2, num_heads=4,
                             ffn_dim=256, max_positions=64)
    model = minisq.synthetic_model(cfg, seed=1)
    assert "synthetic" in model.config.name
    naive, o1, sq_o1 = fc.o1_errors(model)
    assert sq_o1 < 0.6 * naive and sq_o1 < o1       # measured: 0.0171 naive, 0.0106 O1, 0.0079 SmoothQuant-O1


@pytest.mark.parametrize("changes,match", [
    (dict(apply_residual_connection_post_layernorm=True), "apply_residual_connection_post_layernorm"),
    (dict(pretraining_tp=4, slow_but_exact=True), "slow_but_exact"),
    (dict(n_head=5), "not divisible by the number of heads 5"),
])
def test_unsupported_options_are_config_errors(checkpoints, tmp_path, changes, match):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoints[4][0], folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(minisq.ConfigError, match=match):
        minisq.load(folder)
