"""Save and reload smoothed and quantized models."""

import json

import numpy as np
import pytest

import minisq
from minisq.calibrate import calibrate
from minisq.io.export import folder_bytes
from minisq.nn import Linear
from minisq.qlinear import W8A8Linear


def _ids(seed, shape, V=101):
    return np.random.default_rng(seed).integers(0, V, shape)


@pytest.fixture(scope="module", params=["gpt2", "opt"])
def variants(request, make_checkpoint):
    model = minisq.load(make_checkpoint(request.param)[0])
    calib = [_ids(1, (4, 24))]
    stats = calibrate(model, calib, progress=False)
    smoothed = minisq.smooth(model, stats, alpha=0.5)
    s_stats = calibrate(smoothed, calib, progress=False)
    return request.param, model, stats, smoothed, s_stats


@pytest.mark.parametrize("preset", ["naive", "O1", "O2", "O3"])
@pytest.mark.parametrize("smoothed", [False, True], ids=["plain", "smoothed"])
def test_roundtrip_gives_identical_logits(tmp_path, variants, preset, smoothed):
    family, model, stats, sm, s_stats = variants
    base, st = (sm, s_stats) if smoothed else (model, stats)
    q = minisq.quantize(base, preset, stats=st, attn_bmm=preset == "O2")
    folder = q.save(tmp_path / "q")
    back = minisq.load(folder)
    ids = _ids(2, (2, 14))
    np.testing.assert_array_equal(back(ids), q(ids))
    np.testing.assert_array_equal(back.generate(ids[0, :4], 5), q.generate(ids[0, :4], 5))
    # what it is travels with it
    assert back.info["quantization"] == q.info["quantization"]
    assert ("smoothing" in back.info) == smoothed
    if smoothed:
        assert back.info["smoothing"]["alpha"] == 0.5
        for k, s in q.info["smoothing"]["factors"].items():
            np.testing.assert_array_equal(back.info["smoothing"]["factors"][k], s)
    # the integers are stored as integers, and no float copy of the quantized weights exists
    for name, leaf in back.linears().items():
        if isinstance(leaf, W8A8Linear):
            assert leaf.w_q.dtype == np.int8
    meta = json.loads((folder / "minisq.json").read_text())
    assert meta["format"] == "minisq-model-v1" and meta["config"]["model_type"] == family


def test_float_and_smoothed_models_roundtrip(tmp_path, variants):
    _, model, _, sm, _ = variants
    ids = _ids(3, (1, 9))
    for m, name in ((model, "fp"), (sm, "sm")):
        back = minisq.load(m.save(tmp_path / name))
        np.testing.assert_array_equal(back(ids), m(ids))
        assert isinstance(back.linears()["lm_head"], Linear)


def test_quantized_checkpoint_is_smaller(tmp_path, make_checkpoint):
    folder, _ = make_checkpoint("gpt2", n_embd=128, n_layer=2, n_head=4, vocab_size=101)
    model = minisq.load(folder)
    q = minisq.quantize(model, "O1")
    fp_bytes = folder_bytes(model.save(tmp_path / "fp"))
    q_bytes = folder_bytes(q.save(tmp_path / "q"))
    print(f"\nfloat32 save {fp_bytes} B, W8A8 save {q_bytes} B ({q_bytes / fp_bytes:.2f}x)")
    # the block linears shrink 4x; embeddings and LayerNorms stay float
    assert q_bytes < 0.45 * fp_bytes


def test_tied_lm_head_is_stored_once(tmp_path, variants):
    _, model, *_ = variants
    folder = model.save(tmp_path / "m")
    from minisq.io.checkpoint import read_safetensors
    names = read_safetensors(folder / "model.safetensors")
    assert not any(k.startswith("lm_head") for k in names)
    back = minisq.load(folder)
    emb = back.params["wte" if "wte" in back.params else "embed_tokens"]
    assert np.shares_memory(back.linears()["lm_head"].w, emb)


def test_corrupt_saved_model_gives_clear_errors(tmp_path, variants):
    _, model, *_ = variants
    folder = minisq.quantize(model, "O1").save(tmp_path / "q")
    meta = folder / "minisq.json"
    good = meta.read_text()
    meta.write_text(good[: len(good) // 2])
    with pytest.raises(minisq.CheckpointError, match="minisq.json"):
        minisq.load(folder)
    meta.write_text(good)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(minisq.CheckpointError, match="model.safetensors"):
        minisq.load(folder)
