"""BLOOM, both Falcon layouts and Mixtral against independent torch oracles of the official
SmoothQuant code (mit-han-lab/smoothquant: ``smooth_lm`` / ``smooth_ln_fcs``,
``fake_quant.W8A8Linear``, ``quantize_bloom`` / ``quantize_falcon`` / ``quantize_mixtral``),
written from its definitions on transformers models in float64:

* activation scales: per input channel, max |x| over the calibration tokens, by forward hooks;
* smoothing, per the official rows: BLOOM input_layernorm -> query_key_value and
  post_attention_layernorm -> dense_h_to_4h; Falcon-7B input_layernorm -> query_key_value *and*
  dense_h_to_4h with one factor (from query_key_value's input); Falcon-40B ln_attn ->
  query_key_value, ln_mlp -> dense_h_to_4h; Mixtral input_layernorm -> q, k, v and
  post_attention_layernorm -> the router and every expert's w1 and w3 with one factor (from the
  router's input). ``s = clamp(max|X|^α / clamp(max|W|, 1e-5)^(1-α), 1e-5)``, the norm's gain
  (and bias) divided by s, the targets' input columns multiplied by s;
* fake W8A8 on every decoder linear: weights per output channel, activations per token
  (``round(t / Δ) · Δ``, ``Δ = clamp(max|t|, 1e-5) / 127``), outputs not quantized. The Mixtral
  oracle runs the experts one by one on their routed tokens (transformers 5 stacks the expert
  weights, so the per-token quantization of w2's input is written into that loop).

minisq (default smoothing, then ``quantize(weights="per_channel", acts="per_token",
path="fake")``) must agree to float64 rounding.
"""

import copy

import numpy as np
import pytest
import torch

import minisq

import family_checks as fc
from test_bloom import float64_transformers as bloom_float64
from test_bloom import hf_bloom
from test_falcon import float64_transformers as falcon_float64
from test_falcon import hf_falcon
from test_mixtral import float64_transformers as mixtral_float64
from test_mixtral import hf_mixtral

ALPHA = 0.5
F = torch.nn.functional


def fake_quant(t):
    """round(t / Δ) · Δ per row (last axis): per output channel for a weight [C_out, C_in], per
    token for activations [..., C]."""
    scale = t.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / 127
    return torch.round(t / scale) * scale


def act_scales(model, names, calib, patches):
    """Per-channel max |x| of the inputs of the named modules over the calibration batches."""
    scales, modules = {}, dict(model.named_modules())

    def hook(name):
        def record(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).abs().amax(dim=0)
            scales[name] = torch.maximum(scales[name], x) if name in scales else x
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    with torch.no_grad(), patches():
        for batch in calib:
            model(torch.from_numpy(batch))
    for h in handles:
        h.remove()
    return scales


def smooth_ln_fcs(ln, weights, act, alpha):
    """The official smooth_ln_fcs: ``weights`` are [C_out, C_in] tensors (or stacks [.., C_out, C_in])."""
    w_max = torch.stack([w.abs().reshape(-1, w.shape[-1]).amax(dim=0) for w in weights]).amax(dim=0)
    s = (act.pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
    ln.weight.div_(s)
    if getattr(ln, "bias", None) is not None:
        ln.bias.div_(s)
    for w in weights:
        w.mul_(s)


def w8a8(linears):
    """The official W8A8Linear on every given nn.Linear: per-channel weights, per-token inputs."""
    for fc_ in linears:
        fc_.weight.copy_(fake_quant(fc_.weight))
        fc_.register_forward_pre_hook(lambda mod, inputs: (fake_quant(inputs[0]),))


# --- BLOOM and Falcon ----------------------------------------------------------------------------

def official_bloom_or_falcon(hf, calib, x, patches, rows):
    """``rows(layer) -> [(norm, [linears], key of the linear whose input gives s)]``."""
    m = copy.deepcopy(hf).double()
    blocks = m.transformer.h
    keys = {f"transformer.h.{i}.{k}" for i, b in enumerate(blocks) for _, _, k in rows(b)}
    scales = act_scales(m, keys, calib, patches)
    with torch.no_grad():
        for i, b in enumerate(blocks):
            for ln, fcs, key in rows(b):
                smooth_ln_fcs(ln, [f.weight for f in fcs], scales[f"transformer.h.{i}.{key}"], ALPHA)
        w8a8([f for b in blocks for f in (b.self_attention.query_key_value, b.self_attention.dense,
                                          b.mlp.dense_h_to_4h, b.mlp.dense_4h_to_h)])
        with patches():
            return m(torch.from_numpy(x)).logits.numpy()


def bloom_rows(b):
    return [(b.input_layernorm, [b.self_attention.query_key_value], "self_attention.query_key_value"),
            (b.post_attention_layernorm, [b.mlp.dense_h_to_4h], "mlp.dense_h_to_4h")]


def falcon_rows(b):
    qkv, fc1 = b.self_attention.query_key_value, b.mlp.dense_h_to_4h
    if hasattr(b, "ln_attn"):       # new decoder architecture
        return [(b.ln_attn, [qkv], "self_attention.query_key_value"), (b.ln_mlp, [fc1], "mlp.dense_h_to_4h")]
    return [(b.input_layernorm, [qkv, fc1], "self_attention.query_key_value")]   # 7B: one factor for both


CASES = {
    "bloom": (lambda: hf_bloom(6, seed=5), bloom_float64, bloom_rows),
    "falcon-7b": (lambda: hf_falcon("7b", seed=5), falcon_float64, falcon_rows),
    "falcon-40b": (lambda: hf_falcon("40b", seed=5), falcon_float64, falcon_rows),
}


def minisq_w8a8(folder, calib, x, skip=None):
    model = minisq.load(folder, dtype="float64")
    stats = minisq.calibrate(model, calib, progress=False)
    kw = {} if skip is None else dict(skip=skip)
    smoothed = minisq.quantize(minisq.smooth(model, stats, ALPHA), weights="per_channel", acts="per_token",
                               path="fake", **kw)
    plain = minisq.quantize(model, weights="per_channel", acts="per_token", path="fake", **kw)
    return smoothed(x), plain(x)


@pytest.mark.parametrize("case", list(CASES))
def test_default_smoothing_and_fake_w8a8_match_the_official_code(case, tmp_path):
    make, patches, rows = CASES[case]
    hf = make()
    hf.save_pretrained(tmp_path)
    calib, x = [fc.ids(20, (2, 12)), fc.ids(21, (1, 16))], fc.ids(22, (2, 12))
    ours, plain = minisq_w8a8(tmp_path, calib, x)
    theirs = official_bloom_or_falcon(hf, calib, x, patches, rows)
    assert np.abs(ours - theirs).max() <= 1e-9
    assert np.abs(plain - theirs).max() > 1e-6                     # the oracle sees the smoothing


# --- Mixtral ---------------------------------------------------------------------------------------

def official_mixtral(hf, calib, x, quantize_router: bool):
    """The official rule on transformers 5's stacked experts: ``gate_up_proj`` [E, 2F, C] holds every
    expert's w1 and w3 (their input columns are multiplied by s), ``down_proj`` [E, C, F] their w2."""
    m = copy.deepcopy(hf).double()
    layers = m.model.layers
    keys = {f"model.layers.{i}.{k}" for i in range(len(layers)) for k in ("self_attn.q_proj", "mlp.gate")}
    scales = act_scales(m, keys, calib, mixtral_float64)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            attn, moe = layer.self_attn, layer.mlp
            smooth_ln_fcs(layer.input_layernorm, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight],
                          scales[f"model.layers.{i}.self_attn.q_proj"], ALPHA)
            smooth_ln_fcs(layer.post_attention_layernorm, [moe.gate.weight, moe.experts.gate_up_proj],
                          scales[f"model.layers.{i}.mlp.gate"], ALPHA)
            w8a8([attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj])
            moe.experts.gate_up_proj.copy_(fake_quant(moe.experts.gate_up_proj))   # per row = per output channel
            moe.experts.down_proj.copy_(fake_quant(moe.experts.down_proj))
            if quantize_router:
                moe.gate.weight.copy_(fake_quant(moe.gate.weight))
                moe.gate.register_forward_pre_hook(lambda mod, inputs: (fake_quant(inputs[0]),))
            moe.experts.forward = _w8a8_experts(moe.experts)
        with mixtral_float64():
            return m(torch.from_numpy(x)).logits.numpy()


def _w8a8_experts(experts):
    def forward(h, top_k_index, top_k_weights):
        out = torch.zeros_like(h)
        for e in range(experts.num_experts):
            token, k = torch.where(top_k_index == e)
            gate, up = F.linear(fake_quant(h[token]), experts.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(fake_quant(experts.act_fn(gate) * up), experts.down_proj[e])
            out.index_add_(0, token, y * top_k_weights[token, k, None])
        return out
    return forward


@pytest.mark.parametrize("quantize_router", [False, True])
def test_mixtral_official_rule_and_fake_w8a8_match_the_oracle(quantize_router, tmp_path):
    hf = hf_mixtral(seed=5)
    hf.save_pretrained(tmp_path)
    calib, x = [fc.ids(20, (2, 12)), fc.ids(21, (1, 16))], fc.ids(22, (2, 12))
    ours, plain = minisq_w8a8(tmp_path, calib, x, skip=("lm_head",) if quantize_router else None)
    theirs = official_mixtral(hf, calib, x, quantize_router)
    assert np.abs(ours - theirs).max() <= 1e-9
    assert np.abs(plain - theirs).max() > 1e-6
