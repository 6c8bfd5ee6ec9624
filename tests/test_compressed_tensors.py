"""compressed-tensors int-quantized W8A8: minisq's export, held against transformers (which
loads it through the compressed-tensors package) and against compressed-tensors' own
quantizer and compressor; minisq's import of checkpoints that compressed-tensors wrote; the
rounding convention against compressed-tensors' own int8 quantizer; and every refusal.

The checkpoints are tiny random OPT and Llama models with planted outlier channels (a few
LayerNorm / RMSNorm gain entries ×25), smoothed (α = 0.5) before quantizing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

import minisq
from minisq.errors import CheckpointError, ConfigError, MinisqError, ShapeError
from minisq.nn import Linear
from minisq.qlinear import W8A8Linear
from minisq.quant import quantize_per_channel, quantize_per_token

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors", reason="the format's oracle (pip install -e '.[test]')")

from _outlier_models import CALIB, ids_of, outlier_model  # noqa: E402


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (folder, transformers float model)."""
    out = {}
    for family in ("opt", "llama"):
        model = outlier_model(family)
        folder = tmp_path_factory.mktemp(f"{family}-float")
        model.save_pretrained(folder)
        out[family] = (folder, model)
    return out



# scheme name -> minisq.quantize arguments: per-channel W / per-token A, O3, and O2 (dynamic
# per-tensor activations: over the whole tensor in the format, per sequence in minisq, the
# same on the one-sequence batches compared here)
SCHEMES = {"w-channel-a-token": dict(weights="per_channel", acts="per_token"), "O3": dict(preset="O3"),
           "O2": dict(preset="O2")}
# scheme -> (weights strategy, input_activations strategy, dynamic) in config.json
WRITTEN = {"w-channel-a-token": ("channel", "token", True), "O3": ("tensor", "tensor", False),
           "O2": ("tensor", "tensor", True)}


def quantized(folder, scheme: str):
    """minisq: load, calibrate, smooth (α = 0.5), quantize by compressed-tensors' rounding."""
    model = minisq.load(folder)
    smoothed = minisq.smooth(model, minisq.calibrate(model, CALIB, progress=False), alpha=0.5)
    stats = minisq.calibrate(smoothed, CALIB, progress=False)
    return minisq.quantize(smoothed, stats=stats, convention="compressed-tensors", **SCHEMES[scheme])


def transformers_logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def as_transformers_runs_it(model, family: str):
    """What transformers computes on the CPU: the format's rules, except that OPT flattens the
    MLP's tokens to a 2-D [N, C] input and compressed-tensors' dynamic "token" scale then
    covers all N tokens at once (its reduce axes are every axis but the first two). On one
    sequence that is minisq's per-tensor (per-sequence) scale."""
    if family != "opt":
        return model
    mlp = ("fc1", "fc2")
    return model.replace_linears(lambda name, leaf: dataclasses.replace(leaf, acts="per_tensor")
                                 if isinstance(leaf, W8A8Linear) and leaf.acts == "per_token"
                                 and name.rsplit(".", 1)[-1] in mlp else leaf)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def layer_by_layer(folder, model, family, ids) -> float:
    """The largest relative difference, over every quantized linear, between transformers'
    output and minisq's leaf run on transformers' own input to it (teacher forcing).

    Why both this and whole-model logits: under the format's rule every token whose largest
    |x| is negative sits on a rounding tie, x / Δ = -127.5 (to within an ulp), so its code is
    -128 or -127 depending on the last bit of x and Δ. Two float32 implementations of the same
    model whose inputs differ by rounding (~1e-7) can therefore disagree on one code in a
    later layer, and that difference cascades (up to 1e-2 relative on these tiny models). Fed
    the same input, the leaves agree to float32 rounding of the GEMM."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seen = {}
    for name, m in hf.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda m, a, y, name=name: seen.__setitem__(name, (a[0].numpy(), y.numpy())))
    with torch.no_grad():
        hf(torch.from_numpy(ids))
    prefix = "model.decoder." if family == "opt" else "model."
    worst = 0.0
    for name, leaf in as_transformers_runs_it(model, family).linears().items():
        if isinstance(leaf, W8A8Linear):
            x, y = seen[prefix + name]
            worst = max(worst, rel(leaf(x), y))
    return worst


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_export_loads_in_transformers_with_the_same_logits(checkpoints, family, scheme, tmp_path):
    q = quantized(checkpoints[family][0], scheme)
    dst = q.save(tmp_path / "ct", format="compressed-tensors")
    ids = ids_of(99)
    theirs = transformers_logits(dst, ids)
    ours = as_transformers_runs_it(q, family)(ids)
    # float32 through both: minisq's int32 GEMM + scale epilogue against torch's float matmul of
    # dequantized values; measured 2e-7 to 4e-7 relative on these inputs, where no int8 code
    # differs (see layer_by_layer for when one can)
    assert rel(ours, theirs) <= 1e-5
    assert layer_by_layer(dst, q, family, ids_of(98, (1, 14))) <= 1e-5   # one sequence: O2's scale is per tensor there
    float_logits = minisq.load(checkpoints[family][0])(ids)
    assert rel(float_logits, theirs) > 1e-4          # the comparison sees quantization at all
    cfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    (group,) = cfg["config_groups"].values()
    assert (cfg["quant_method"], cfg["format"], cfg["quantization_status"]) == \
        ("compressed-tensors", "int-quantized", "compressed")
    acts = group["input_activations"]
    assert (group["weights"]["strategy"], acts["strategy"], acts["dynamic"]) == WRITTEN[scheme]
    assert cfg["ignore"] == ["lm_head"]


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_export_then_minisq_load_is_bit_identical(checkpoints, family, tmp_path):
    for scheme in SCHEMES:
        q = quantized(checkpoints[family][0], scheme)
        back = minisq.load(q.save(tmp_path / scheme, format="compressed-tensors"))
        ours, theirs = q.linears(), back.linears()
        assert ours.keys() == theirs.keys()
        for name, leaf in ours.items():
            other = theirs[name]
            assert type(other) is type(leaf), name
            for f in ("w_q", "w_scale", "b", "x_scale", "w"):
                a, b = getattr(leaf, f, None), getattr(other, f, None)
                assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and np.array_equal(a, b))), \
                    (name, f)
            if isinstance(leaf, W8A8Linear):
                assert (other.acts, other.convention) == (leaf.acts, "compressed-tensors")
        ids = ids_of(5, (2, 9))
        assert np.array_equal(q(ids), back(ids))
        assert back.info["quantization"]["acts"] == q.info["quantization"]["acts"]


# ------------------------------------------------------------------------- import


def compressed_tensors_checkpoint(hf_model, scheme: dict, folder, calib):
    """A checkpoint written by compressed-tensors itself: its config applied to the model, the
    weight scales (and static input scales, observed on ``calib``) from its calculate_qparams,
    its compressor, transformers' save_pretrained and its update_config. Returns the
    compressed in-memory modules."""
    import copy

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams

    model = copy.deepcopy(hf_model)
    ranges = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: ranges.__setitem__(n, (
        min(ranges.get(n, (0.0, 0.0))[0], float(a[0].min())), max(ranges.get(n, (0.0, 0.0))[1], float(a[0].max())))))
        for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for ids in calib:
            model(torch.from_numpy(ids))
    for h in hooks:
        h.remove()
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], **scheme)},
                                ignore=["lm_head"])
    apply_quantization_config(model, config)
    for name, m in model.named_modules():
        args = getattr(m, "quantization_scheme", None)
        if args is None:
            continue
        w = m.weight.data
        dims = dict(dim=1, keepdim=True) if args.weights.strategy == "channel" else {}
        s, _ = calculate_qparams(w.amin(**dims), w.amax(**dims), args.weights)
        m.weight_scale.data.copy_(s.reshape(m.weight_scale.shape))
        if not args.input_activations.dynamic:
            lo, hi = ranges[name]
            s, _ = calculate_qparams(torch.tensor(lo), torch.tensor(hi), args.input_activations)
            m.input_scale.data.copy_(s.reshape(m.input_scale.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    return dict(model.named_modules())


def _args(strategy, dynamic):
    from compressed_tensors.quantization import QuantizationArgs
    return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy=strategy, dynamic=dynamic)


CT_SCHEMES = {
    "W8A8": lambda: dict(weights=_args("channel", False), input_activations=_args("token", True)),
    "static": lambda: dict(weights=_args("tensor", False), input_activations=_args("tensor", False)),
}


@pytest.mark.parametrize("scheme", CT_SCHEMES)
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_import_of_a_checkpoint_written_by_compressed_tensors(checkpoints, family, scheme, tmp_path):
    folder = tmp_path / "ct"
    modules = compressed_tensors_checkpoint(checkpoints[family][1], CT_SCHEMES[scheme](), folder, CALIB)
    model = minisq.load(folder)
    prefix = "model.decoder." if family == "opt" else "model."
    n_quantized = 0
    for name, leaf in model.linears().items():
        if name == "lm_head":
            assert isinstance(leaf, Linear)
            continue
        m = modules[prefix + name]
        assert isinstance(leaf, W8A8Linear) and leaf.convention == "compressed-tensors"
        assert np.array_equal(leaf.w_q, m.weight.detach().numpy().T)                    # the codes, unchanged
        assert np.array_equal(leaf.w_scale.reshape(-1), m.weight_scale.detach().numpy().reshape(-1))
        if scheme == "static":
            assert leaf.acts == "static" and leaf.x_scale == m.input_scale.item()
        n_quantized += 1
    assert n_quantized == 2 * (6 if family == "opt" else 7)
    assert layer_by_layer(folder, model, family, ids_of(7, (2, 9))) <= 1e-5
    if scheme == "static":   # static scales: no rounding tie at -127.5 (layer_by_layer), whole logits agree
        ids = ids_of(7)
        assert rel(as_transformers_runs_it(model, family)(ids), transformers_logits(folder, ids)) <= 1e-5


def test_convention_equals_compressed_tensors_quantizer():
    """minisq's convention="compressed-tensors" against compressed-tensors' own int8 quantize /
    fake_quantize and calculate_qparams, bit for bit (including codes at -128)."""
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 48)) * rng.uniform(0.1, 30, (64, 1))).astype(np.float32)
    x[:, 5] = -np.abs(x).max(axis=1)                                   # the row's absmax is negative
    xt = torch.from_numpy(x)
    args = _args("token", True)
    s_ct, _ = calculate_qparams(xt.amin(1, keepdim=True), xt.amax(1, keepdim=True), args)
    q_ct = quantize(xt, s_ct, None, args, dtype=torch.int8)
    q, s = quantize_per_token(x, convention="compressed-tensors")
    assert np.array_equal(s, s_ct.numpy()) and np.array_equal(q, q_ct.numpy())
    assert (q == -128).sum() >= 64                                      # every row reaches -128
    w_args = _args("channel", False)                                   # weights: one scale per output row
    s_ct, _ = calculate_qparams(xt.amin(1, keepdim=True), xt.amax(1, keepdim=True), w_args)
    q_w, s_w = quantize_per_channel(x.T, convention="compressed-tensors")
    assert np.array_equal(s_w.reshape(-1), s_ct.numpy().reshape(-1))
    assert np.array_equal(q_w.T, quantize(xt, s_ct, None, w_args, dtype=torch.int8).numpy())
    q_sq, s_sq = quantize_per_token(x)                    # the default stays SmoothQuant's
    assert np.array_equal(s_sq, np.abs(x).max(axis=1, keepdims=True) / np.float32(127)) and q_sq.min() == -127


# ------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def good_export(checkpoints, tmp_path_factory):
    q = quantized(checkpoints["opt"][0], "O3")
    return q, q.save(tmp_path_factory.mktemp("good") / "ct", format="compressed-tensors")


@pytest.mark.parametrize("how, match", [
    (dict(preset="O1", attn_bmm=True), "attention-BMM"),
    (dict(preset="zeroquant", group_size=16), "ZeroQuant"),
    (dict(preset="llm.int8"), "LLM.int8"),
    (dict(preset="w8a16"), "W8A16"),
    (dict(preset="O1"), "convention='compressed-tensors'"),   # SmoothQuant's rounding: not what engines compute
    (dict(preset="O1", kv_cache="int8"), "kv_cache"),
    (None, "quantize first"),
])
def test_unsupported_schemes_are_refused_before_anything_is_written(checkpoints, tmp_path, how, match):
    model = minisq.load(checkpoints["opt"][0])
    if how is not None:
        model = minisq.quantize(model, **how)
    dst = tmp_path / "out"
    with pytest.raises(ConfigError, match=match):
        model.save(dst, format="compressed-tensors")
    assert list(tmp_path.iterdir()) == []


def test_gpt2_is_refused(make_checkpoint, tmp_path):
    folder, _ = make_checkpoint("gpt2")
    q = minisq.quantize(minisq.load(folder), "O1", convention="compressed-tensors")
    with pytest.raises(ConfigError, match="Conv1D"):
        q.save(tmp_path / "out", format="compressed-tensors")
    assert not (tmp_path / "out").exists()


def test_a_failed_write_leaves_nothing(good_export, tmp_path, monkeypatch):
    from minisq.io import compressed_tensors as fmt

    def broken(model, folder):
        raise OSError("disk full")

    monkeypatch.setattr(fmt, "_write_tokenizer", broken)
    with pytest.raises(OSError, match="disk full"):
        good_export[0].save(tmp_path / "out", format="compressed-tensors")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="not an empty folder"):       # never over an existing checkpoint
        good_export[0].save(good_export[1], format="compressed-tensors")


def _edited_copy(src, tmp_path, config=None, tensors=None):
    """A copy of the checkpoint ``src`` with quantization_config fields and tensors changed."""
    from safetensors.numpy import load_file, save_file

    dst = tmp_path / "edited"
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    if config:
        config(raw["quantization_config"])
    (dst / "config.json").write_text(json.dumps(raw))
    if tensors:
        sd = load_file(str(dst / "model.safetensors"))
        tensors(sd)
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _group(q):
    return q["config_groups"]["group_0"]


Q0 = "model.decoder.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("config, tensors, error, match", [
    (lambda q: q.update(format="float-quantized") or _group(q).update(format="float-quantized"), None,
     CheckpointError, "FP8"),
    (lambda q: _group(q)["weights"].update(num_bits=4), None, CheckpointError, "4-bit int"),
    (lambda q: _group(q)["weights"].update(type="float"), None, CheckpointError, "fp8"),
    (lambda q: q.update(format="pack-quantized") or _group(q).update(format="pack-quantized"), None,
     CheckpointError, "packed"),
    (lambda q: q.update(sparsity_config={"format": "sparse-bitmask"}), None, CheckpointError, "sparsity"),
    (lambda q: _group(q)["weights"].update(symmetric=False), None, CheckpointError, "asymmetric"),
    (lambda q: _group(q)["weights"].update(strategy="group", group_size=16), None, CheckpointError, "group-wise"),
    (lambda q: _group(q).update(input_activations=None), None, CheckpointError, "W8A8"),
    (lambda q: q.update(quantization_status="frozen"), None, CheckpointError, "compressed"),
    (None, lambda sd: sd.pop(f"{Q0}.weight_scale"), CheckpointError, "weight_scale"),
    (None, lambda sd: sd.pop(f"{Q0}.input_scale"), CheckpointError, "input_scale"),
    (None, lambda sd: sd.__setitem__(f"{Q0}.weight_scale", np.ones((32, 1), np.float32)), ShapeError, "weight_scale"),
    (None, lambda sd: sd.__setitem__(f"{Q0}.weight", np.ones((32, 16), np.int8)), ShapeError, "q_proj"),
    (None, lambda sd: sd.__setitem__(f"{Q0}.input_scale", np.zeros(1, np.float32)), CheckpointError, "> 0"),
])
def test_unsupported_or_broken_checkpoints_are_clear_errors(good_export, tmp_path, config, tensors, error, match):
    folder = _edited_copy(good_export[1], tmp_path, config, tensors)
    with pytest.raises(error, match=match) as info:
        minisq.load(folder)
    assert isinstance(info.value, MinisqError)


def test_quantize_checkpoint_streams_into_compressed_tensors(checkpoints, tmp_path):
    """The layer-by-layer driver with format="compressed-tensors" gives the in-memory result."""
    from minisq.cli.quantize import parse_args

    src = checkpoints["opt"][0]
    dst = minisq.quantize_checkpoint(src, tmp_path / "streamed", CALIB, preset="O3", alpha=0.5,
                                     format="compressed-tensors", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed"]      # the work folder is gone
    streamed = minisq.load(dst)
    model = minisq.load(src)
    smoothed = minisq.smooth(model, minisq.calibrate(model, CALIB, progress=False), alpha=0.5)
    ref = minisq.quantize(smoothed, "O3", stats=minisq.calibrate(smoothed, CALIB, progress=False),
                          convention="compressed-tensors")
    ids = ids_of(3, (2, 8))
    assert np.array_equal(streamed(ids), ref(ids))
    assert parse_args(["a", "b", "--format", "compressed-tensors"]).format == "compressed-tensors"
    with pytest.raises(ConfigError, match="attention-BMM"):
        minisq.quantize_checkpoint(src, tmp_path / "x", CALIB, attn_bmm=True, format="compressed-tensors",
                                   progress=False)
