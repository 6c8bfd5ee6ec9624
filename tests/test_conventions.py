"""``smooth(..., convention="llm-compressor")`` against an independent torch oracle written from
llm-compressor's ``SmoothQuantModifier`` (0.14.0.1: a forward hook on each smooth layer
keeping per-channel min and max of its output, ``2 · max|W|`` over the balance layers,
``a^α / w^(1-α)`` with ``a`` where ``w = 0``, the 1e-5 floor, the weights and norms changed in
place), on tiny random OPT and Llama models with an outlier channel pushed to one side."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import minisq
from minisq.calibrate import CalibrationStats
from minisq.conventions import MINIMUM_SMOOTHING_SCALE, llmcompressor_factors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _outlier_models import CALIB, ids_of, outlier_model  # noqa: E402

# llm-compressor's mappings as it writes them: (balance layer patterns, smooth layer pattern)
ORACLE_MAPPINGS = {
    "opt": [(["q_proj", "k_proj", "v_proj"], "self_attn_layer_norm"), (["fc1"], "final_layer_norm")],
    "llama": [(["q_proj", "k_proj", "v_proj"], "input_layernorm"), (["gate_proj", "up_proj"], "post_attention_layernorm")],
}
ONE_SIDED = 5   # the channel a norm bias (OPT) or a shifted residual (Llama) pushes to one side


def one_sided_model(family):
    model = outlier_model(family, seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if family == "opt" and "layers" in name and "layer_norm" in name and name.endswith("bias"):
                p[ONE_SIDED] = 15.0              # every token's channel 5 lies around +15
            if family == "llama" and name.endswith("embed_tokens.weight"):
                p[:, ONE_SIDED] += 3.0           # the residual stream's channel 5 is shifted up
    return model


@torch.no_grad()
def llmcompressor_oracle(hf, family, alpha, calib):
    """SmoothQuantModifier's calibration and _apply_smoothing, on a copy of ``hf``; returns
    (smoothed model, {smooth layer name: scales})."""
    model = copy.deepcopy(hf)
    modules = dict(model.named_modules())
    resolved = []
    for balance, smooth_name in ORACLE_MAPPINGS[family]:
        for name in modules:
            if name.endswith(smooth_name) and ".layers." in name:
                parent = name.rsplit(".", 1)[0]
                layers = [m for n, m in modules.items() if n.startswith(parent + ".") and n.rsplit(".", 1)[-1] in balance]
                resolved.append((name, modules[name], layers))
    mins, maxs = {}, {}

    def hook(name):
        def record(module, inp, out):
            out = out.view(-1, out.shape[-1])
            lo, hi = torch.min(out, dim=0)[0], torch.max(out, dim=0)[0]
            mins[name] = lo if name not in mins else torch.minimum(mins[name], lo)
            maxs[name] = hi if name not in maxs else torch.maximum(maxs[name], hi)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m, _ in resolved]
    for ids in calib:
        model(torch.from_numpy(ids))
    for h in handles:
        h.remove()
    scales_of = {}
    for name, smooth_layer, balance_layers in resolved:
        activation_scales = maxs[name] - mins[name]
        weight_scales = 2.0 * torch.cat([b.weight.abs().max(dim=0, keepdim=True)[0] for b in balance_layers],
                                        dim=0).max(dim=0)[0]
        scales = activation_scales.pow(alpha) / weight_scales.pow(1 - alpha)
        scales = torch.where(weight_scales > 0.0, scales, activation_scales)
        scales = torch.maximum(scales, torch.Tensor([MINIMUM_SMOOTHING_SCALE]))
        for b in balance_layers:
            b.weight.mul_(scales.view(1, -1))
        smooth_layer.weight.div_(scales)
        if getattr(smooth_layer, "bias", None) is not None:
            smooth_layer.bias.div_(scales)
        scales_of[name] = scales.numpy()
    return model, scales_of


@pytest.mark.parametrize("family, alpha", [("opt", 0.5), ("llama", 0.8)])
def test_llmcompressor_smoothing_equals_the_oracle(tmp_path, family, alpha):
    hf = one_sided_model(family)
    hf.save_pretrained(tmp_path)
    model = minisq.load(tmp_path)
    stats = minisq.calibrate(model, CALIB, progress=False)
    ours = minisq.smooth(model, stats, alpha=alpha, convention="llm-compressor")
    theirs, scales = llmcompressor_oracle(hf, family, alpha, CALIB)
    prefix = "model.decoder." if family == "opt" else "model."
    factors = ours.info["smoothing"]["factors"]
    assert sorted(prefix + k for k in factors) == sorted(scales)
    for name, s in factors.items():
        # float64 here, float32 there: to float32 rounding of pow and division
        np.testing.assert_allclose(s, scales[prefix + name], rtol=2e-6)
    sd = {k: v.numpy() for k, v in theirs.state_dict().items()}
    for name, leaf in ours.linears().items():
        if name != "lm_head":
            np.testing.assert_allclose(leaf.w.T, sd[prefix + name + ".weight"], rtol=5e-6, atol=1e-9)
    ids = ids_of(1)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours(ids), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # the one-sided channel is where the two definitions part: SmoothQuant's max|X| is larger
    official = minisq.smooth(model, stats, alpha=alpha)
    first = next(iter(factors))
    s_off, s_llmc = official.info["smoothing"]["factors"][first], factors[first]
    assert s_off[ONE_SIDED] / s_llmc[ONE_SIDED] > 1.5 * np.median(s_off / s_llmc)


def test_llmcompressor_factors_edge_cases():
    a = np.array([0.0, 4.0, 4.0, 9.0])
    w = np.array([0.5, 0.0, 2.0, 0.5])
    s = llmcompressor_factors(a, w, 0.5)
    assert s[0] == MINIMUM_SMOOTHING_SCALE                 # no activation range: the floor, not 1
    assert s[1] == 4.0                                      # no weight: the activation range itself
    assert s[2] == pytest.approx(np.sqrt(4.0) / np.sqrt(2 * 2.0))
    assert s[3] == pytest.approx(3.0)
    with pytest.raises(minisq.errors.ConfigError):
        llmcompressor_factors(a, w[:3], 0.5)


def test_calibration_keeps_signed_extremes(tmp_path):
    hf = one_sided_model("opt")
    hf.save_pretrained(tmp_path / "m")
    model = minisq.load(tmp_path / "m")
    stats = minisq.calibrate(model, CALIB, progress=False)
    name = "layers.0.self_attn.q_proj"
    assert np.all(stats.channel_min[name] <= stats.channel_max[name])
    assert stats.channel_min[name][ONE_SIDED] > 5          # pushed to one side: min far above 0
    np.testing.assert_array_equal(np.maximum(-stats.channel_min[name], stats.channel_max[name]),
                                  stats.channel_absmax[name])
    back = CalibrationStats.load(stats.save(tmp_path / "s.npz"), model)
    for k in stats.channel_min:
        assert np.array_equal(back.channel_min[k], stats.channel_min[k])
        assert np.array_equal(back.channel_max[k], stats.channel_max[k])
