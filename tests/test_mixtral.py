"""Mixtral held against transformers in both weight layouts (the hub's per-expert w1/w2/w3 and
transformers' stacked gate_up_proj/down_proj), top-k routing and sparse experts, its two
smoothing policies and the check that refuses a router smoothed apart from its experts, the
router kept float by default, per-expert quantization running on each expert's own tokens,
the streamed pipeline, and its errors."""

import contextlib
import json
import shutil

import numpy as np
import pytest
import torch
import transformers

import minisq
from minisq.families import mixtral
from minisq.families.base import Mapping
from minisq.nn import Linear
from minisq.qlinear import W8A8Linear

import family_checks as fc

CONFIG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=fc.V,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2)


def hf_mixtral(seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**CONFIG, **overrides}))
    model.config._experts_implementation = "eager"      # the per-expert loop, which also runs in float64
    with torch.no_grad():                               # a router that decides (init std 0.02 barely does)
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.3)
    return fc.perturbed(model, seed + 1)


@contextlib.contextmanager
def float64_transformers():
    """transformers computes RMSNorm, RoPE's cos/sin and the router's softmax in float32 even in a
    float64 model; for a float64 oracle these keep the input's dtype (transformers' formulas)."""
    from transformers.modeling_rope_utils import dynamic_rope_update

    mod = transformers.models.mixtral.modeling_mixtral

    def rms_forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    @dynamic_rope_update
    def rope_forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1).to(x.dtype)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    def router_forward(self, h):
        logits = torch.nn.functional.linear(h.reshape(-1, self.hidden_dim), self.weight)
        top, index = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), index

    patches = [(mod.MixtralRMSNorm, rms_forward), (mod.MixtralRotaryEmbedding, rope_forward),
               (mod.MixtralTopKRouter, router_forward)]
    saved = [(cls, cls.forward) for cls, _ in patches]
    for cls, fn in patches:
        cls.forward = fn
    try:
        yield
    finally:
        for cls, fn in saved:
            cls.forward = fn


def save_stacked_layout(hf, folder):
    """The checkpoint as transformers holds it in memory: mlp.gate, mlp.experts.gate_up_proj [E, 2F, C]
    and down_proj [E, C, F] (what save_pretrained converts back to the hub's names)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(folder / "model.safetensors"))
    hf.config.to_json_file(folder / "config.json")
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    hf = hf_mixtral()
    hub = tmp_path_factory.mktemp("mixtral-hub")
    hf.save_pretrained(hub)
    stacked = save_stacked_layout(hf, tmp_path_factory.mktemp("mixtral") / "stacked")
    return {"hub": (hub, hf), "stacked": (stacked, hf)}


@pytest.fixture(scope="module")
def model64(checkpoints):
    return minisq.load(checkpoints["hub"][0], dtype="float64")


def test_both_weight_layouts_are_on_disk_as_named(checkpoints):
    from safetensors import safe_open

    with safe_open(str(checkpoints["hub"][0] / "model.safetensors"), "np") as f:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in f.keys()
    with safe_open(str(checkpoints["stacked"][0] / "model.safetensors"), "np") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()


@pytest.mark.parametrize("layout", ["hub", "stacked"])
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-4), (np.float64, 1e-9)])
def test_logits_match_transformers(checkpoints, layout, dtype, tol):
    folder, hf = checkpoints[layout]
    assert fc.max_abs_vs_transformers(folder, hf, dtype, float64_transformers) <= tol


def test_routing_is_transformers_top_k(model64, checkpoints):
    hf = checkpoints["hub"][1]
    h = np.random.default_rng(3).standard_normal((2, 7, 32))
    weights, chosen = mixtral.route(model64.params["layers"][0]["block_sparse_moe"]["gate"](h), 2)
    router = hf.model.layers[0].mlp.gate.double()
    with torch.no_grad(), float64_transformers():
        _, top, index = router(torch.from_numpy(h))
    hf.float()
    np.testing.assert_array_equal(chosen.reshape(-1, 2), index.numpy())
    np.testing.assert_allclose(weights.reshape(-1, 2), top.numpy(), rtol=1e-14)


def test_kv_cache_and_greedy_generation_equal_transformers(model64, checkpoints):
    assert fc.kv_cache_decoding_error(model64) <= 1e-12
    ours, theirs = fc.greedy_generations(model64, checkpoints["hub"][1], float64_transformers)
    np.testing.assert_array_equal(ours, theirs)


def test_each_expert_runs_on_its_own_tokens_only(model64):
    x = fc.ids(4, (2, 11))
    mask = np.ones_like(x)
    mask[0, :3] = 0                                                   # left padding
    rows, real = {}, {}

    def counting(name, leaf):
        def call(a, m=None):
            rows[name], real[name] = a.shape[0] * a.shape[1], int(np.asarray(m).sum())
            return leaf(a, m)
        return call

    model64.replace_linears(counting)(x, mask)
    w1 = [f"layers.0.block_sparse_moe.experts.{e}.w1" for e in range(4)]
    assert sum(real[n] for n in w1) == 2 * int(mask.sum())           # k = 2 experts per real token
    assert all(0 < real[n] < int(mask.sum()) for n in w1)             # each expert sees only its share
    assert all(rows[n] < x.size for n in w1)                          # and computes on fewer rows than all
    assert rows["layers.0.block_sparse_moe.gate"] == x.size           # the router sees every token


# --- smoothing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", ["all", ("ln_qkv",), ("ln_fc1",), ("w3_w2",), ("v_out",)])
def test_smoothing_is_an_equivalence_in_float64(model64, groups):
    report, factors = fc.smoothing_report(model64, groups)
    assert report.passed, str(report)
    assert any(np.abs(np.asarray(s) - 1).max() > 0.1 for s in factors.values())


def test_the_official_policy_gives_router_and_every_expert_one_factor(model64):
    stats = minisq.calibrate(model64, [fc.ids(10, (2, 12))], progress=False)
    smoothed = minisq.smooth(model64, stats, groups=mixtral.POLICIES["official"])
    s = np.asarray(smoothed.info["smoothing"]["factors"]["layers.1.post_attention_layernorm"])
    before, after = model64.linears(), smoothed.linears()
    moe = "layers.1.block_sparse_moe."
    for name in [moe + "gate"] + [f"{moe}experts.{e}.{w}" for e in range(4) for w in ("w1", "w3")]:
        np.testing.assert_allclose(after[name].w, before[name].w * s[:, None], rtol=1e-15)
    # s comes from the router's input (every token), as the official code takes it
    w_max = np.max([np.abs(before[n].w).max(axis=1) for n in [moe + "gate"] + [
        f"{moe}experts.{e}.{w}" for e in range(4) for w in ("w1", "w3")]], axis=0)
    np.testing.assert_allclose(s, minisq.smoothing_factors(stats.channel_absmax[moe + "gate"], w_max, 0.5))
    attention_only = minisq.smooth(model64, stats, groups=mixtral.POLICIES["attention-only"])
    assert set(attention_only.info["smoothing"]["factors"]) == {"layers.0.input_layernorm", "layers.1.input_layernorm"}
    assert attention_only.linears()[moe + "gate"] is before[moe + "gate"]


@pytest.mark.parametrize("targets", [
    ("layers.{i}.block_sparse_moe.gate",),                                        # the router alone
    ("layers.{i}.block_sparse_moe.experts.*.w1", "layers.{i}.block_sparse_moe.experts.*.w3"),   # the experts alone
    ("layers.{i}.block_sparse_moe.gate", "layers.{i}.block_sparse_moe.experts.0.w1"),
])
def test_a_row_smoothing_the_router_apart_from_its_experts_is_refused(model64, targets):
    row = Mapping("bad", "layers.{i}.post_attention_layernorm", "rmsnorm", targets, "")
    with pytest.raises(minisq.ConfigError, match="not an equivalence"):
        mixtral.foldable(model64.config, [row])


# --- quantization ---------------------------------------------------------------------------------

def test_router_stays_float_by_default_and_experts_quantize_per_expert(model64):
    q = minisq.quantize(model64, "O1")
    leaves = q.linears()
    assert isinstance(leaves["layers.0.block_sparse_moe.gate"], Linear)
    experts = [leaves[f"layers.0.block_sparse_moe.experts.{e}.w1"] for e in range(4)]
    assert all(isinstance(e, W8A8Linear) for e in experts)
    assert len({float(e.w_scale) for e in experts}) == 4                          # one scale per expert
    with_router = minisq.quantize(model64, "O1", skip=("lm_head",))
    assert isinstance(with_router.linears()["layers.0.block_sparse_moe.gate"], W8A8Linear)


@pytest.mark.parametrize("preset,attn", [("O1", True), ("O3", "static"), ("O2", False)])
def test_int_path_equals_fake_path_and_save_reload(model64, preset, attn, tmp_path):
    calib = [fc.ids(30, (2, 12)), fc.ids(34, (1, 20))]
    sm = minisq.smooth(model64, minisq.calibrate(model64, calib, progress=False))
    stats = minisq.calibrate(sm, calib, progress=False)
    x = fc.ids(31, (2, 12))
    q_int = minisq.quantize(sm, preset, path="int", stats=stats, attn_bmm=attn)
    got = q_int(x)
    np.testing.assert_allclose(got, minisq.quantize(sm, preset, path="fake", stats=stats, attn_bmm=attn)(x),
                               rtol=0, atol=1e-9)
    assert 0 < minisq.logit_error(model64(x), got)["rel_err"] < 0.5
    np.testing.assert_array_equal(minisq.load(q_int.save(tmp_path / "q"))(x), got)


@pytest.mark.parametrize("groups", [None, mixtral.POLICIES["attention-only"]])
def test_streamed_quantize_checkpoint_equals_in_memory(checkpoints, tmp_path, groups):
    fc.assert_streamed_equals_in_memory(checkpoints["hub"][0], tmp_path / "q", "O3", groups=groups)


def test_float16_and_lazy_storage_of_the_stacked_layout(checkpoints, tmp_path):
    hf = checkpoints["hub"][1]
    folder = save_stacked_layout(hf.to(torch.float16), tmp_path / "fp16")
    hf.to(torch.float32)
    x = fc.ids(33, (2, 9))
    want = minisq.load(folder)(x)
    np.testing.assert_array_equal(minisq.load(folder, dtype="float16")(x), want)
    np.testing.assert_array_equal(minisq.load(folder, lazy=True)(x), want)


def test_both_policies_beat_naive_on_a_synthetic_mixtral():
    cfg = minisq.ModelConfig(model_type="mixtral", vocab_size=fc.V, hidden_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, ffn_dim=128, max_positions=64, layer_norm_eps=1e-6)
    model = minisq.synthetic_model(cfg, seed=1)
    assert "synthetic" in model.config.name and model.config.num_experts == 4
    naive, o1, official = fc.o1_errors(model, groups=mixtral.POLICIES["official"])
    attention_only = fc.o1_errors(model, groups=mixtral.POLICIES["attention-only"])[2]
    # measured: naive 0.227, O1 0.166, SmoothQuant-O1 official 0.078, attention-only 0.097
    assert official < 0.5 * naive and attention_only < 0.5 * naive and official < o1 and attention_only < o1


# --- errors ---------------------------------------------------------------------------------------

def test_a_missing_expert_is_a_clear_error(checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoints["hub"][0], folder)
    state = load_file(folder / "model.safetensors")
    for w in ("w1", "w2", "w3"):
        del state[f"model.layers.1.block_sparse_moe.experts.2.{w}.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(minisq.CheckpointError, match=r"layer 1 lacks expert\(s\) \[2\] of the 4"):
        minisq.load(folder)


def test_an_expert_no_calibration_token_reached_is_a_clear_error():
    cfg = minisq.ModelConfig(model_type="mixtral", vocab_size=fc.V, hidden_size=32, num_layers=1, num_heads=4,
                             num_kv_heads=2, ffn_dim=48, max_positions=64, num_experts=8)
    model = minisq.synthetic_model(cfg, seed=1)
    stats = minisq.calibrate(model, [np.arange(1)], progress=False)          # one token: 2 of 8 experts
    with pytest.raises(minisq.CalibrationError, match="no input range of 'layers.0.block_sparse.*no calibration token reached it"):
        minisq.quantize(model, "O3", stats=stats)
    with pytest.raises(minisq.CalibrationError, match="no calibration token reached"):
        minisq.smooth(model, stats, groups="all")
    minisq.smooth(model, stats)             # the official rows take s from the router, which sees every token


@pytest.mark.parametrize("changes,match", [
    (dict(num_experts_per_tok=5), "num_experts_per_tok=5 must be between 1 and num_local_experts=4"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), "RoPE type 'yarn'"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
])
def test_bad_configs_are_config_errors(checkpoints, tmp_path, changes, match):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoints["hub"][0], folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(minisq.ConfigError, match=match):
        minisq.load(folder)


def test_expert_statistics_count_routed_tokens_only(model64):
    """Experts run on their routed tokens packed into padded batches: padding rows must never
    enter a statistic. Calibrating three sequences as one [3, T] batch must give every leaf
    the same signed extremes and maxima as calibrating them one by one (no padding there), up
    to float64 rounding (BLAS sums a batch of 3 in another order than a batch of 1)."""
    x = fc.ids(41, (3, 12))
    together = minisq.calibrate(model64, [x], progress=False)
    apart = minisq.calibrate(model64, [row for row in x], progress=False)
    experts = [n for n in together.channel_absmax if ".experts." in n]
    assert len(experts) == 2 * 4 * 3                        # 2 layers x 4 experts x w1/w2/w3, all reached
    for name in together.channel_absmax:
        np.testing.assert_allclose(together.channel_absmax[name], apart.channel_absmax[name], rtol=1e-12, atol=1e-15, err_msg=name)
        np.testing.assert_allclose(together.channel_min[name], apart.channel_min[name], rtol=1e-12, atol=1e-15, err_msg=name)
        np.testing.assert_allclose(together.channel_max[name], apart.channel_max[name], rtol=1e-12, atol=1e-15, err_msg=name)
