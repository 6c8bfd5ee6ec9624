"""Falcon in its three layouts — 7B (parallel attention, multi-query, one norm), 40B/180B
(new decoder architecture: ln_attn + ln_mlp, grouped kv heads) and sequential — held against
transformers, read from both the falcon and the older RefinedWeb/RefinedWebModel configs, its
smoothing rows (one shared factor for the 7B layout) as float64 equivalences, its quantized
paths, the streamed pipeline, and its errors."""

import contextlib
import json
import shutil

import numpy as np
import pytest
import torch
import transformers

import minisq
from minisq.families import falcon
from minisq.smooth import mappings_for

import family_checks as fc

BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=fc.V,
            max_position_embeddings=64)
LAYOUTS = {
    "7b": dict(multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False),
    "40b": dict(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, bias=False),
    "sequential": dict(multi_query=False, parallel_attn=False, new_decoder_architecture=False, bias=True),
}


def hf_falcon(layout, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = transformers.FalconConfig(**{**BASE, **LAYOUTS[layout], **overrides})
    return fc.perturbed(transformers.FalconForCausalLM(cfg), seed + 1)


@contextlib.contextmanager
def float64_transformers():
    """transformers' Falcon takes RoPE's cos and sin in float32 even in a float64 model; for a
    float64 oracle they keep the input's dtype (the angles still come from its float32 inverse
    frequencies)."""
    from transformers.modeling_rope_utils import dynamic_rope_update

    cls = transformers.models.falcon.modeling_falcon.FalconRotaryEmbedding
    forward = cls.forward

    @dynamic_rope_update
    def rope_forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1).to(x.dtype)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    cls.forward = rope_forward
    try:
        yield
    finally:
        cls.forward = forward


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for layout in LAYOUTS:
        hf = hf_falcon(layout)
        folder = tmp_path_factory.mktemp(f"falcon-{layout}")
        hf.save_pretrained(folder)
        out[layout] = (folder, hf)
    return out


def rewrite_config(src, dst, drop=(), **changes):
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    for key in drop:
        raw.pop(key, None)
    raw.update(changes)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-4), (np.float64, 1e-9)])
def test_logits_match_transformers(checkpoints, layout, dtype, tol):
    folder, hf = checkpoints[layout]
    assert fc.max_abs_vs_transformers(folder, hf, dtype, float64_transformers) <= tol


def test_config_reading(checkpoints):
    seven, forty = minisq.load(checkpoints["7b"][0]).config, minisq.load(checkpoints["40b"][0]).config
    assert (seven.kv_heads, seven.parallel_attn, seven.new_decoder_architecture) == (1, True, False)
    assert (forty.kv_heads, forty.new_decoder_architecture, forty.enable_bias) == (2, True, False)
    assert falcon.layout(seven) == "parallel" and falcon.layout(forty) == "two_norms"
    assert {"ln_attn", "ln_mlp"} <= set(minisq.load(checkpoints["40b"][0]).params["h"][0])
    assert "post_attention_layernorm" in minisq.load(checkpoints["sequential"][0]).params["h"][0]


@pytest.mark.parametrize("layout,old", [("7b", "RefinedWebModel"), ("40b", "RefinedWeb")])
def test_refinedweb_configs_load_the_same_model(checkpoints, tmp_path, layout, old):
    folder, _ = checkpoints[layout]
    raw = json.loads((folder / "config.json").read_text())
    names = dict(model_type=old, n_head=raw["num_attention_heads"], n_layer=raw["num_hidden_layers"])
    if layout == "40b":
        names["n_head_kv"] = raw["num_kv_heads"]
    drop = ("num_attention_heads", "num_hidden_layers", "num_kv_heads", "new_decoder_architecture", "multi_query")
    other = rewrite_config(folder, tmp_path / old, drop=drop, **names)
    a, b = minisq.load(folder, dtype="float64"), minisq.load(other, dtype="float64")
    assert b.config.model_type == old and b.config.kv_heads == a.config.kv_heads
    x = fc.ids(1, (1, 9))
    np.testing.assert_array_equal(a(x), b(x))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kv_cache_and_greedy_generation_equal_transformers(checkpoints, layout):
    folder, hf = checkpoints[layout]
    model = minisq.load(folder, dtype="float64")
    assert fc.kv_cache_decoding_error(model) <= 1e-12
    ours, theirs = fc.greedy_generations(model, hf, float64_transformers)
    np.testing.assert_array_equal(ours, theirs)


def test_left_padded_batch_matches_transformers(checkpoints):
    folder, hf = checkpoints["40b"]
    model = minisq.load(folder, dtype="float64")
    x = fc.ids(5, (2, 10))
    mask = np.ones_like(x)
    mask[1, :4] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    want = fc.hf_logits(hf, x, np.float64, float64_transformers, attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(positions))
    real = mask.astype(bool)
    assert np.abs(model(x, mask)[real] - want[real]).max() <= 1e-9


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("groups", ["all", ("ln_qkv",), ("ln_fc1",)])
def test_smoothing_is_an_equivalence_in_float64(checkpoints, layout, groups):
    model = minisq.load(checkpoints[layout][0], dtype="float64")
    report, factors = fc.smoothing_report(model, groups)
    assert report.passed, str(report)
    if layout == "7b" and groups == ("ln_fc1",):
        assert factors == {}          # the 7B layout has no norm of its own before the MLP
    else:
        assert any(np.abs(np.asarray(s) - 1).max() > 0.1 for s in factors.values())


def test_the_7b_layout_shares_one_factor_between_query_key_value_and_the_mlp(checkpoints):
    model = minisq.load(checkpoints["7b"][0], dtype="float64")
    rows = mappings_for(model.config)   # the default: the official rows
    assert [(m.source, m.targets) for m in rows if m.source.startswith("h.0.")] == [
        ("h.0.input_layernorm", ("h.0.self_attention.query_key_value", "h.0.mlp.dense_h_to_4h"))]
    forty = minisq.load(checkpoints["40b"][0], dtype="float64")
    assert [m.source for m in mappings_for(forty.config) if m.source.startswith("h.0.")] == [
        "h.0.ln_attn", "h.0.ln_mlp"]


@pytest.mark.parametrize("layout", ["7b", "40b"])
def test_int_path_equals_fake_path_and_save_reload(checkpoints, layout, tmp_path):
    model = minisq.load(checkpoints[layout][0], dtype="float64")
    calib = [fc.ids(30, (2, 12))]
    sm = minisq.smooth(model, minisq.calibrate(model, calib, progress=False))
    stats = minisq.calibrate(sm, calib, progress=False)
    x = fc.ids(31, (2, 12))
    for preset, attn in (("O1", True), ("O3", "static")):
        q_int = minisq.quantize(sm, preset, path="int", stats=stats, attn_bmm=attn)
        got = q_int(x)
        np.testing.assert_allclose(got, minisq.quantize(sm, preset, path="fake", stats=stats, attn_bmm=attn)(x),
                                   rtol=0, atol=1e-9)
        assert 0 < minisq.logit_error(model(x), got)["rel_err"] < 0.5
    np.testing.assert_array_equal(minisq.load(q_int.save(tmp_path / "q"))(x), got)


def test_static_q_k_ranges_bound_the_rotated_values(checkpoints):
    model = minisq.load(checkpoints["40b"][0], dtype="float64")
    x = fc.ids(32, (2, 16))
    stats = minisq.calibrate(model, [x], progress=False)
    layer, cfg = model.params["h"][0], model.config
    h = minisq.nn.layer_norm(model.params["word_embeddings"][x], **layer["ln_attn"], eps=cfg.layer_norm_eps)
    q, k, v = falcon.split_qkv(layer["self_attention"]["query_key_value"](h), 4, 2)
    cos, sin = minisq.families.llama.rotary_tables(cfg, np.broadcast_to(np.arange(16), (2, 16)), h.dtype)
    q, k = minisq.families.llama.apply_rotary(q, cos, sin, 4), minisq.families.llama.apply_rotary(k, cos, sin, 2)
    bound_q, bound_k, bound_v = stats.qkv_absmax(model, 0)
    assert np.abs(q).max() <= bound_q and np.abs(k).max() <= bound_k and np.abs(v).max() == bound_v


def test_streamed_quantize_checkpoint_equals_in_memory(checkpoints, tmp_path):
    fc.assert_streamed_equals_in_memory(checkpoints["7b"][0], tmp_path / "q", "O3")


def test_float16_and_lazy_storage_compute_as_float32(checkpoints, tmp_path):
    folder = tmp_path / "fp16"
    checkpoints["40b"][1].to(torch.float16).save_pretrained(folder)
    checkpoints["40b"][1].to(torch.float32)
    x = fc.ids(33, (2, 9))
    want = minisq.load(folder)(x)
    np.testing.assert_array_equal(minisq.load(folder, dtype="float16")(x), want)
    np.testing.assert_array_equal(minisq.load(folder, lazy=True)(x), want)


def test_exact_gelu_matches_torch():
    x = np.linspace(-9, 9, 20001)
    want = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    assert np.abs(falcon.gelu(x) - want).max() <= 4e-15     # measured: 1.8e-15 (1 ulp at |x| = 9)
    assert np.abs(falcon.gelu(x.astype(np.float32)) - want).max() <= 1e-6


@pytest.mark.parametrize("layout", ["7b", "40b"])
def test_smoothquant_o1_is_well_below_naive_on_a_synthetic_falcon(layout):
    extra = dict(num_kv_heads=1, parallel_attn=True) if layout == "7b" else dict(num_kv_heads=2,
                                                                                 new_decoder_architecture=True)
    cfg = minisq.ModelConfig(model_type="falcon", vocab_size=fc.V, hidden_size=64, num_layers=2, num_heads=4,
                             ffn_dim=256, max_positions=64, **extra)
    model = minisq.synthetic_model(cfg, seed=1)
    assert "synthetic" in model.config.name and falcon.layout(model.config) == falcon.layout(cfg)
    naive, o1, sq_o1 = fc.o1_errors(model)
    assert sq_o1 < 0.6 * naive and sq_o1 < o1     # measured (7B layout): 0.064 naive, 0.040 O1, 0.026 SQ-O1


@pytest.mark.parametrize("changes,match", [
    (dict(num_kv_heads=3), "cannot share 3 key/value heads"),
    (dict(alibi=True), "alibi=True is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}), "RoPE type 'yarn'"),
    (dict(rope_parameters=None, rope_scaling={"type": "su"}), "RoPE type 'su'"),
    (dict(activation="relu"), "activation 'relu'"),
    (dict(num_ln_in_parallel_attn=1), "num_ln_in_parallel_attn=1"),
])
def test_bad_configs_are_config_errors(checkpoints, tmp_path, changes, match):
    folder = rewrite_config(checkpoints["40b"][0], tmp_path / "ckpt", **changes)
    with pytest.raises(minisq.ConfigError, match=match):
        minisq.load(folder)
