"""minisq against an independent torch oracle of the official SmoothQuant code.

The oracle below is written from the official definitions (mit-han-lab/smoothquant:
``smooth_lm`` / ``smooth_ln_fcs``, ``fake_quant.W8A8Linear`` and ``quantize_opt``), in plain
torch on a transformers OPT model, in float64:

* activation scales: per input channel, max |x| over the calibration tokens, taken with
  forward hooks on every ``nn.Linear``;
* smoothing: ``s = clamp(max|X|^α / clamp(max|W|, 1e-5)^(1-α), 1e-5)``; the LayerNorm's gain
  and bias are divided by s, the rows of q, k, v (or fc1) multiplied by s;
* fake W8A8: weights ``round(w / Δ) · Δ`` per output channel or per tensor; activations the
  same per token or per tensor *of the one sequence in the forward*; with BMM quantization
  the outputs of q_proj, k_proj and v_proj are fake-quantized too (before 1/√D), P stays float.

The official code runs one sequence per forward; minisq runs a right-padded batch of
sequences of different lengths. They must agree to float64 rounding (≤ 1e-9 relative).
The test models have non-zero linear biases: with zero biases, per-tensor weights put
activations on exact rounding ties, where a 1-ulp difference flips a code.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import minisq

torch = pytest.importorskip("torch")
nn = torch.nn

LENGTHS = (12, 40, 23)   # one batch, right-padded to 40
ALPHA = 0.5


# --- the oracle --------------------------------------------------------------------------------

def oracle_act_scales(model, calib_ids):
    """Per-channel max |x| of every nn.Linear input (the official ``get_act_scales``)."""
    scales = {}

    def hook(name):
        def record(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).abs().amax(dim=0)
            scales[name] = torch.maximum(scales[name], x) if name in scales else x
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for ids in calib_ids:
            model(torch.from_numpy(ids[None]))
    for h in handles:
        h.remove()
    return scales


def oracle_smooth(model, act_scales, alpha):
    """The official ``smooth_lm`` for OPT: self_attn_layer_norm -> q,k,v; final_layer_norm -> fc1."""
    with torch.no_grad():
        for i, layer in enumerate(model.model.decoder.layers):
            attn = layer.self_attn
            pairs = ((layer.self_attn_layer_norm, (attn.q_proj, attn.k_proj, attn.v_proj),
                      f"model.decoder.layers.{i}.self_attn.q_proj"),
                     (layer.final_layer_norm, (layer.fc1,), f"model.decoder.layers.{i}.fc1"))
            for ln, fcs, key in pairs:
                w_max = torch.cat([fc.weight.abs().amax(dim=0, keepdim=True) for fc in fcs]).amax(dim=0)
                s = (act_scales[key].pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
                ln.weight.div_(s)
                ln.bias.div_(s)
                for fc in fcs:
                    fc.weight.mul_(s.view(1, -1))


def fake_quant(t, per: str):
    """round(t / Δ) · Δ with Δ = clamp(max|t|, 1e-5) / 127 per row ("row") or for all of t ("tensor")."""
    if per == "row":
        scale = t.abs().amax(dim=-1, keepdim=True)
    else:
        scale = t.abs().amax()
    scale = scale.clamp(min=1e-5) / 127
    return torch.round(t / scale) * scale


class OracleW8A8Linear(nn.Module):
    """The official fake-quant ``W8A8Linear``: quantized weight, activations quantized per call."""

    def __init__(self, linear, weights: str, acts: str, quantize_output: bool):
        super().__init__()
        w = linear.weight.detach().clone()                       # [C_out, C_in]
        self.weight = fake_quant(w, "row" if weights == "per_channel" else "tensor")
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self.acts = "row" if acts == "per_token" else "tensor"
        self.quantize_output = quantize_output

    def forward(self, x):
        y = nn.functional.linear(fake_quant(x, self.acts), self.weight, self.bias)
        return fake_quant(y, self.acts) if self.quantize_output else y


def oracle_quantize(model, weights: str, acts: str, bmm: bool):
    """The official ``quantize_opt``: every decoder-layer linear; q/k/v outputs when ``bmm``."""
    model = copy.deepcopy(model)
    for layer in model.model.decoder.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, OracleW8A8Linear(getattr(attn, name), weights, acts, quantize_output=bmm))
        attn.out_proj = OracleW8A8Linear(attn.out_proj, weights, acts, quantize_output=False)
        layer.fc1 = OracleW8A8Linear(layer.fc1, weights, acts, quantize_output=False)
        layer.fc2 = OracleW8A8Linear(layer.fc2, weights, acts, quantize_output=False)
    return model


# --- the comparison ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def opt_pair(make_checkpoint):
    """A tiny OPT checkpoint with planted outlier channels, as minisq and transformers models (float64)."""
    import transformers
    from conftest import hf_model, save_hf_model

    hf = hf_model("opt", seed=7, num_hidden_layers=3)
    with torch.no_grad():
        for layer in hf.model.decoder.layers:       # outlier channels, as in real LLMs
            for ln in (layer.self_attn_layer_norm, layer.final_layer_norm):
                ln.weight[[3, 17]] *= 25.0
    import tempfile
    from pathlib import Path

    folder = save_hf_model(hf, Path(tempfile.mkdtemp()) / "opt-outliers")
    # (not attn_implementation="eager": transformers' eager attention takes its softmax in float32)
    hf64 = transformers.OPTForCausalLM.from_pretrained(folder).double().eval()
    model = minisq.load(folder, dtype="float64")
    rng = np.random.default_rng(11)
    calib = [rng.integers(4, 101, n) for n in (30, 17, 45)]
    ids = np.ones((len(LENGTHS), max(LENGTHS)), np.int64)        # right-padded batch
    mask = np.zeros_like(ids)
    for b, n in enumerate(LENGTHS):
        ids[b, :n], mask[b, :n] = rng.integers(4, 101, n), 1
    return model, hf64, calib, ids, mask


def _oracle_logits(hf, ids, mask):
    # one sequence per forward, as the official code runs
    with torch.no_grad():
        return [hf(torch.from_numpy(ids[b, :mask[b].sum()][None])).logits[0].numpy()
                for b in range(len(ids))]


# The integer path too, except per-tensor + BMM: there, with sharply peaked attention (P
# one-hot to float64 precision, which the planted outliers cause), an attention output lies
# exactly on v's int8 grid, out_proj's per-tensor requantization divides it by a ratio of grid
# values, and the quotient is an exact half-integer (measured: 7e-15 from .5 in layer 1). The
# int and fake paths round the same real number differently by 1 ulp, so one code flips
# (2e-3 relative on the logits). The fake path is the official definition and agrees.
CASES = [(w, a, bmm, path) for w, a in (("per_channel", "per_token"), ("per_tensor", "per_tensor"))
         for bmm in (False, True) for path in ("fake", "int")
         if not (w == "per_tensor" and bmm and path == "int")]


@pytest.mark.parametrize("weights,acts,bmm,path", CASES)
def test_smoothing_and_fake_w8a8_agree_with_the_official_definitions(opt_pair, weights, acts, bmm, path):
    model, hf, calib, ids, mask = opt_pair
    # the oracle: its own calibration, smoothing and fake quantization, one sequence at a time
    smoothed_hf = copy.deepcopy(hf)
    oracle_smooth(smoothed_hf, oracle_act_scales(hf, calib), ALPHA)
    expected = _oracle_logits(oracle_quantize(smoothed_hf, weights, acts, bmm), ids, mask)
    # minisq: one right-padded batch
    smoothed = minisq.smooth(model, minisq.calibrate(model, calib, progress=False), ALPHA)
    q = minisq.quantize(smoothed, weights=weights, acts=acts, path=path, attn_bmm=bmm)
    got = q(ids, mask)
    assert got.dtype == np.float64
    for b, n in enumerate(LENGTHS):
        rel = np.abs(got[b, :n] - expected[b]).max() / np.abs(expected[b]).max()
        assert rel <= 1e-9, (b, rel)
    # ...and the quantization really happened (the oracle's float model is far away)
    with torch.no_grad():
        float_logits = smoothed_hf(torch.from_numpy(ids[:1, :LENGTHS[0]])).logits[0].numpy()
    assert np.abs(float_logits - expected[0]).max() > 1e-4 * np.abs(expected[0]).max()


def test_smoothed_float_model_agrees_with_the_official_smoothing(opt_pair):
    model, hf, calib, ids, mask = opt_pair
    smoothed_hf = copy.deepcopy(hf)
    scales = oracle_act_scales(hf, calib)
    stats = minisq.calibrate(model, calib, progress=False)
    for i in range(3):   # the calibration itself: per-channel max |x| of q_proj's and fc1's inputs
        np.testing.assert_allclose(stats.channel_absmax[f"layers.{i}.self_attn.q_proj"],
                                   scales[f"model.decoder.layers.{i}.self_attn.q_proj"].numpy(), rtol=1e-12)
        np.testing.assert_allclose(stats.channel_absmax[f"layers.{i}.fc1"],
                                   scales[f"model.decoder.layers.{i}.fc1"].numpy(), rtol=1e-12)
    oracle_smooth(smoothed_hf, scales, ALPHA)
    smoothed = minisq.smooth(model, stats, ALPHA)
    for i, layer in enumerate(smoothed_hf.model.decoder.layers):
        ln = smoothed.params["layers"][i]["self_attn_layer_norm"]
        np.testing.assert_allclose(ln["g"], layer.self_attn_layer_norm.weight.detach().numpy(), rtol=1e-13)
        np.testing.assert_allclose(smoothed.linears()[f"layers.{i}.fc1"].w,
                                   layer.fc1.weight.detach().numpy().T, rtol=1e-13)
