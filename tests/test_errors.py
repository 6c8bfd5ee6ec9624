"""Bad input gets a clear minisq error that names the culprit: one test per case."""

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minisq
from minisq import backend
from minisq.calibrate import calibrate
from minisq.config import ModelConfig
from minisq.qlinear import quantize_linear
from minisq.nn import Linear
from minisq.synthetic import synthetic_model


def _ids(seed, shape, V=101):
    return np.random.default_rng(seed).integers(0, V, shape)


def _copy(folder, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# --- files -------------------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(minisq.CheckpointError, match="no folder .*nope"):
        minisq.load(tmp_path / "nope")


def test_missing_config(tmp_path, make_checkpoint):
    folder = _copy(make_checkpoint("gpt2")[0], tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(minisq.CheckpointError, match="no config.json"):
        minisq.load(folder)


def test_corrupt_config(tmp_path, make_checkpoint):
    folder = _copy(make_checkpoint("gpt2")[0], tmp_path)
    (folder / "config.json").write_text('{"model_type": "gpt2", "n_embd": ')
    with pytest.raises(minisq.CheckpointError, match="config.json is not valid JSON"):
        minisq.load(folder)


def test_missing_and_truncated_weights(tmp_path, make_checkpoint):
    folder = _copy(make_checkpoint("opt")[0], tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(minisq.CheckpointError, match="model.safetensors"):
        minisq.load(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(minisq.CheckpointError, match="no weights in"):
        minisq.load(folder)


def test_weights_do_not_match_config(tmp_path, make_checkpoint):
    folder = _copy(make_checkpoint("gpt2")[0], tmp_path)
    _edit_config(folder, n_inner=40)
    with pytest.raises(minisq.ShapeError, match=r"'h.0.mlp.c_fc.weight' has shape \(32, 128\).*\(32, 40\)"):
        minisq.load(folder)


def _edit_weights(folder, edit):
    """Rewrite folder/model.safetensors after ``edit(state)`` changes the state dict in place."""
    from safetensors.numpy import save_file

    from minisq.io.checkpoint import read_safetensors

    state = read_safetensors(folder / "model.safetensors")
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


def test_tensor_of_the_wrong_dtype(tmp_path, make_checkpoint):
    folder = _copy(make_checkpoint("gpt2")[0], tmp_path)
    _edit_weights(folder, lambda st: st.update({"transformer.wpe.weight": st["transformer.wpe.weight"].astype(np.int32)}))
    with pytest.raises(minisq.ShapeError, match="'wpe.weight' has dtype int32"):
        minisq.load(folder)


def test_missing_tensor(tmp_path, make_checkpoint):
    folder = _copy(make_checkpoint("opt")[0], tmp_path)
    _edit_weights(folder, lambda st: st.pop("model.decoder.layers.1.fc2.bias"))
    with pytest.raises(minisq.CheckpointError, match="'layers.1.fc2.bias' is missing"):
        minisq.load(folder)


def test_non_finite_weights(tmp_path, make_checkpoint):
    folder = _copy(make_checkpoint("gpt2")[0], tmp_path)
    _edit_weights(folder, lambda st: st["transformer.h.1.attn.c_proj.weight"].__setitem__((3, 4), np.nan))
    with pytest.raises(minisq.NonFiniteError, match="'h.1.attn.c_proj.weight' holds 1 NaN/inf"):
        minisq.load(folder)


# --- unsupported -------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,match", [
    (dict(model_type="gptj"), "model_type 'gptj' is not supported"),
    (dict(activation_function="gelu"), "activation_function 'gelu' is not supported"),
    (dict(add_cross_attention=True), "add_cross_attention"),
    (dict(n_head=5), "not divisible by the number of heads 5"),
])
def test_unsupported_model_or_option(tmp_path, make_checkpoint, changes, match):
    folder = _copy(make_checkpoint("gpt2")[0], tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(minisq.ConfigError, match=match):
        minisq.load(folder)


def test_bad_load_arguments(make_checkpoint):
    folder = make_checkpoint("gpt2")[0]
    with pytest.raises(minisq.ConfigError, match="dtype must be one of"):
        minisq.load(folder, dtype="int8")
    with pytest.raises(minisq.DeviceError, match="unknown device 'tpu'"):
        minisq.load(folder, device="tpu")


@pytest.mark.skipif(backend.gpu_available(), reason="a GPU is usable here")
def test_gpu_asked_for_where_none_is_usable(make_checkpoint):
    with pytest.raises(minisq.DeviceError, match="none is usable.*minisq\\[gpu\\]"):
        minisq.load(make_checkpoint("gpt2")[0], device="gpu")


# --- inputs ------------------------------------------------------------------------------------

def test_sequence_longer_than_context_and_ids_out_of_range(make_checkpoint):
    model = minisq.load(make_checkpoint("opt")[0])
    with pytest.raises(minisq.InputError, match="65 tokens is longer than the model's context of 64"):
        model(np.zeros(65, int))
    with pytest.raises(minisq.InputError, match=r"token id -1 at position \[0, 2\]"):
        model(np.array([4, 5, -1]))
    with pytest.raises(minisq.InputError, match=r"token id 500 at position \[1, 0\].*\[0, 101\)"):
        model(np.array([[4, 5], [500, 6]]))


def test_calibration_errors(make_checkpoint):
    model = minisq.load(make_checkpoint("gpt2")[0])
    other = minisq.load(make_checkpoint("opt")[0])
    with pytest.raises(minisq.CalibrationError, match="calibration set is empty"):
        calibrate(model, [], progress=False)
    with pytest.raises(minisq.CalibrationError, match="needs calibration stats"):
        minisq.quantize(model, "O3")
    stats = calibrate(other, [_ids(0, (1, 8))], progress=False)
    with pytest.raises(minisq.CalibrationError, match="another model"):
        minisq.quantize(model, "O3", stats=stats)
    with pytest.raises(minisq.CalibrationError, match="another model"):
        minisq.smooth(model, stats)
    own = calibrate(model, [_ids(0, (1, 8))], progress=False)
    smoothed = minisq.smooth(model, own, alpha=0.5)
    with pytest.raises(minisq.CalibrationError, match="calibrate the smoothed model itself"):
        minisq.quantize(smoothed, "O3", stats=own)   # stale: taken before smoothing
    minisq.quantize(smoothed, "O3", stats=calibrate(smoothed, [_ids(0, (1, 8))], progress=False))


def test_float16_overflow_is_reported_not_returned():
    """GPT-2/OPT activations can exceed float16's 65504; minisq says so instead of returning NaN."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, ffn_dim=64, max_positions=16)
    model = synthetic_model(cfg, outlier_scale=3e4, dtype="float16")
    with pytest.raises(minisq.NonFiniteError, match="float16.*float32"):
        model(np.arange(8))
    assert np.isfinite(model.astype("float32")(np.arange(8))).all()


# --- numerical guards --------------------------------------------------------------------------

def test_zero_rows_and_channels_stay_finite_and_exact():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8))
    w[:, 3] = 0.0                                  # a dead output channel
    x = rng.standard_normal((5, 16))
    x[2] = 0.0                                     # an all-zero token
    b = rng.standard_normal(8)
    for acts in ("per_token", "per_tensor"):
        q = quantize_linear(Linear(w, b), "per_channel", acts)
        y = q(x)
        assert np.isfinite(y).all()
        np.testing.assert_array_equal(y[2], b)     # zero input -> exactly the bias
        np.testing.assert_array_equal(y[:, 3], np.full(5, b[3]))
    zero = quantize_linear(Linear(np.zeros((16, 8)), None), "per_tensor", "per_tensor")
    np.testing.assert_array_equal(zero(np.zeros((2, 16))), np.zeros((2, 8)))


def test_huge_but_finite_values_quantize_without_overflow():
    x = np.array([[1e30, -3e29, 2.0, 0.0]], dtype=np.float32)
    w = np.eye(4, dtype=np.float32)
    y = quantize_linear(Linear(w, None), "per_tensor", "per_token")(x)
    assert np.isfinite(y).all() and abs(y[0, 0] - 1e30) <= 1e30 / 254


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=9),
                    elements=st.floats(-1e6, 1e6, width=32) | st.sampled_from([0.0, np.nan, np.inf, -np.inf])),
       acts=st.sampled_from(["per_token", "per_tensor"]))
def test_fuzzed_activations_never_give_silent_nan(x, acts):
    """Random shapes and values, zeros and NaN/inf: either a finite output or a minisq error."""
    w = np.linspace(-1, 1, x.shape[1] * 3, dtype=np.float32).reshape(x.shape[1], 3)
    q = quantize_linear(Linear(w, None), "per_channel", acts)
    try:
        y = q(x)
    except minisq.InputError as exc:
        assert not np.isfinite(x).all() and "NaN" in str(exc)
        return
    assert np.isfinite(x).all() and np.isfinite(y).all()
