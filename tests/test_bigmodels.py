"""Models bigger than memory: stored dtypes, lazy models, layer-outer evaluation, and the
streamed, resumable quantize_checkpoint. Scaled-down shapes; the full-size runs
are in benchmarks/memory.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import minisq
from minisq.pipeline import _Run

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


def _ids(seed, shape, V=101):
    return np.random.default_rng(seed).integers(0, V, shape)


@pytest.fixture(scope="module", params=["gpt2", "opt", "llama"])
def fp16_ckpt(request, tmp_path_factory):
    """A tiny float16 checkpoint with 3 layers, and its transformers model (Llama: GQA, bfloat16)."""
    from conftest import hf_model, save_hf_model

    if request.param == "llama":
        from test_llama import hf_llama
        hf = hf_llama("llama", seed=4, num_hidden_layers=3).to(torch.bfloat16)
    else:
        layers = {"gpt2": dict(n_layer=3), "opt": dict(num_hidden_layers=3)}[request.param]
        hf = hf_model(request.param, seed=4, **layers).to(torch.float16)
    folder = save_hf_model(hf, tmp_path_factory.mktemp(f"{request.param}-fp16"))
    return request.param, folder, hf


CALIB = [_ids(10, 20), _ids(11, 33), _ids(12, (2, 9))]


# --- stored dtypes and lazy models ---------------------------------------------------------------

def test_lazy_equals_eager_bit_for_bit(fp16_ckpt):
    family, folder, _ = fp16_ckpt
    eager, lazy = minisq.load(folder), minisq.load(folder, lazy=True)
    assert lazy.lazy and lazy.stored and lazy.dtype == np.float32 and not eager.stored
    ids = _ids(1, (2, 12))
    out = lazy(ids)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, eager(ids))
    # layer-outer evaluation and calibration give the very numbers of the eager model
    stream = _ids(2, 200)
    assert minisq.perplexity(lazy, stream, seq_len=32, batch_size=3, progress=False) == \
        minisq.perplexity(eager, stream, seq_len=32, batch_size=3, progress=False)
    a, b = minisq.calibrate(lazy, CALIB, progress=False), minisq.calibrate(eager, CALIB, progress=False)
    for name in b.channel_absmax:
        np.testing.assert_array_equal(a.channel_absmax[name], b.channel_absmax[name])
        assert a.input_absmax[name] == b.input_absmax[name]
    # generate works (through the page cache) and agrees
    np.testing.assert_array_equal(lazy.generate(ids[0, :5], max_new_tokens=4), eager.generate(ids[0, :5], max_new_tokens=4))


def test_lazy_layer_outer_reads_each_layer_once(fp16_ckpt, monkeypatch):
    family, folder, _ = fp16_ckpt
    lazy = minisq.load(folder, lazy=True)
    widened = []
    original = type(lazy).layer
    monkeypatch.setattr(type(lazy), "layer", lambda self, i: widened.append(i) or original(self, i))
    minisq.perplexity(lazy, _ids(3, 200), seq_len=32, batch_size=2, progress=False)   # 6 windows, 3 batches
    assert widened == [0, 1, 2]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_stay_as_stored(tmp_path, dtype):
    """float16/bfloat16 checkpoints keep exactly the stored values, compute in float32 and
    give exactly the logits of the float32 model loaded from the same file."""
    from conftest import hf_model, save_hf_model

    tdtype = getattr(torch, dtype)
    hf = hf_model("opt", seed=5).to(tdtype)
    folder = save_hf_model(hf, tmp_path / dtype)
    model = minisq.load(folder, dtype=dtype)
    assert model.stored and not model.lazy and model.dtype == np.float32
    w = model.params["layers"][0]["fc1"].w                       # StoredTensor, [in, out] view of [out, in]
    want = hf.model.decoder.layers[0].fc1.weight.detach()
    raw = want.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else want.numpy()
    np.testing.assert_array_equal(w.data, raw)                   # the stored bits, untouched
    assert w.shape == (want.shape[1], want.shape[0])
    np.testing.assert_array_equal(w.materialize(np.float32), want.float().numpy().T)
    ids = _ids(6, (2, 10))
    out = model(ids)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, minisq.load(folder)(ids))
    q = minisq.quantize(model, "O1")                              # scales and epilogue in float32
    assert q(ids).dtype == np.float32
    sm = minisq.smooth(model, minisq.calibrate(model, CALIB, progress=False))
    assert not sm.stored and sm.dtype == np.float32


def test_float32_checkpoint_stored_as_float16_rounds(tmp_path):
    from conftest import hf_model, save_hf_model

    folder = save_hf_model(hf_model("gpt2", seed=6), tmp_path / "f32")
    model = minisq.load(folder, dtype="float16")
    w = model.params["h"][0]["mlp"]["c_fc"].w
    assert w.data.dtype == np.float16
    np.testing.assert_array_equal(w.materialize(np.float32),
                                  minisq.load(folder).params["h"][0]["mlp"]["c_fc"].w.astype(np.float16).astype(np.float32))
    with pytest.raises(minisq.ConfigError, match="dtype"):
        minisq.load(folder, dtype="int8")


# --- quantize_checkpoint ---------------------------------------------------------------------------

def _in_memory(folder, preset, smooth=True, attn_bmm=False):
    m = minisq.load(folder)
    if smooth:
        m = minisq.smooth(m, minisq.calibrate(m, CALIB, progress=False), 0.5)
    stats = minisq.calibrate(m, CALIB, progress=False)
    return minisq.quantize(m, preset, stats=stats, attn_bmm=attn_bmm)


def _assert_same_model(a, b):
    la, lb = a.linears(), b.linears()
    assert list(la) == list(lb)
    for name in la:
        for field in ("w_q", "w_scale", "x_scale", "b", "w"):
            va, vb = getattr(la[name], field, None), getattr(lb[name], field, None)
            assert (va is None) == (vb is None), (name, field)
            if va is not None:
                np.testing.assert_array_equal(va, vb, err_msg=f"{name}.{field}")
    ids = _ids(7, (2, 14))
    np.testing.assert_array_equal(a(ids), b(ids))


@pytest.mark.parametrize("preset,smooth,attn_bmm", [("O3", True, False), ("O1", True, False),
                                                     ("O3", True, "static"), ("naive", False, False)])
def test_quantize_checkpoint_equals_the_in_memory_pipeline(fp16_ckpt, tmp_path, preset, smooth, attn_bmm):
    """The bound is 0: the streamed pipeline is bit-identical to
    quantize(smooth(m, calibrate(m)), preset, stats=calibrate(smoothed))."""
    family, folder, _ = fp16_ckpt
    dst = minisq.quantize_checkpoint(folder, tmp_path / "q", CALIB, preset=preset, smooth=smooth,
                                     attn_bmm=attn_bmm, progress=False)
    streamed = minisq.load(dst)
    ref = _in_memory(folder, preset, smooth, attn_bmm)
    _assert_same_model(streamed, ref)
    assert streamed.info["quantization"] == ref.info["quantization"]
    if smooth:
        for src, s in ref.info["smoothing"]["factors"].items():
            np.testing.assert_array_equal(streamed.info["smoothing"]["factors"][src], s)
    files = sorted(p.name for p in Path(dst).iterdir())
    assert not any(name.startswith("carry") or name.endswith(".tmp") for name in files)   # no leftovers


class Killed(Exception):
    pass


@pytest.mark.parametrize("where,after", [("_save_carry", 1), ("_save_carry", 2), ("layer", 1), ("finish", 0)])
def test_a_killed_run_resumes_to_the_same_result(fp16_ckpt, tmp_path, monkeypatch, where, after):
    family, folder, _ = fp16_ckpt
    whole = minisq.load(minisq.quantize_checkpoint(folder, tmp_path / "whole", CALIB, progress=False))
    original = getattr(_Run, where)
    calls = []

    def dies(self, *args):
        calls.append(1)
        if len(calls) > after:
            raise Killed(f"killed in {where} after {after}")
        return original(self, *args)

    monkeypatch.setattr(_Run, where, dies)
    with pytest.raises(Killed):
        minisq.quantize_checkpoint(folder, tmp_path / "part", CALIB, progress=False)
    monkeypatch.setattr(_Run, where, original)
    run = json.loads((tmp_path / "part" / "quantize_run.json").read_text())
    assert not run["finished"] and not (tmp_path / "part" / "minisq.json").exists()
    with pytest.raises(minisq.CheckpointError, match="resume"):
        minisq.quantize_checkpoint(folder, tmp_path / "part", CALIB, progress=False, resume=False)
    resumed = minisq.load(minisq.quantize_checkpoint(folder, tmp_path / "part", CALIB, progress=False))
    _assert_same_model(resumed, whole)


def test_quantize_checkpoint_refuses_what_it_cannot_trust(fp16_ckpt, tmp_path):
    family, folder, _ = fp16_ckpt
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(minisq.CheckpointError, match="not a quantize_checkpoint run"):
        minisq.quantize_checkpoint(folder, tmp_path / "other", CALIB, progress=False)
    done = minisq.quantize_checkpoint(folder, tmp_path / "done", CALIB, progress=False)
    assert minisq.quantize_checkpoint(folder, done, CALIB, progress=False) == done   # finished: a no-op
    with pytest.raises(minisq.CheckpointError, match="other arguments.*alpha"):
        minisq.quantize_checkpoint(folder, done, CALIB, alpha=0.7, progress=False)
    with pytest.raises(minisq.CalibrationError, match="empty"):
        minisq.quantize_checkpoint(folder, tmp_path / "empty", [], progress=False)
    with pytest.raises(minisq.ConfigError, match="O3"):
        minisq.quantize_checkpoint(folder, tmp_path / "bmm", CALIB, preset="O1", attn_bmm="static", progress=False)
    with pytest.raises(minisq.ConfigError, match="preset"):
        minisq.quantize_checkpoint(folder, tmp_path / "bad", CALIB, preset="O4", progress=False)
    shard = next(Path(done).glob("layer-00001.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8])                   # a damaged result is named on load
    with pytest.raises(minisq.CheckpointError, match="layer-00001"):
        minisq.load(done)
    shard.unlink()
    with pytest.raises(minisq.CheckpointError, match="layer-00001.safetensors"):
        minisq.load(done)


# --- memory, measured ----------------------------------------------------------------------------

def _peak_rss_anon(code: str) -> tuple[int, str]:
    """Run ``code`` in a child Python; sample its RssAnon every 5 ms; (peak bytes, stdout)."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak = [0]

    def sample():
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.005)

    t = threading.Thread(target=sample)
    t.start()
    out, err = proc.communicate()
    t.join()
    assert proc.returncode == 0, err[-2000:]
    return peak[0], out


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to read RssAnon")
def test_lazy_evaluation_holds_about_one_layer(tmp_path):
    """A 12-layer float16 checkpoint (hidden 512, FFN 2048: 37.9M parameters, 152 MB in
    float32). Lazy perplexity must stay below 30% of the float32 model's size on top of the
    interpreter's own memory (one layer in float32 is 12.6 MB; the embedding 2 MB)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from safetensors.numpy import save_file

    C, F, V, L, P = 512, 2048, 1000, 12, 256
    rng = np.random.default_rng(0)
    t = {"model.decoder.embed_tokens.weight": rng.standard_normal((V, C)) * 0.02,
         "model.decoder.embed_positions.weight": rng.standard_normal((P + 2, C)) * 0.02,
         "model.decoder.final_layer_norm.weight": np.ones(C), "model.decoder.final_layer_norm.bias": np.zeros(C)}
    for i in range(L):
        p = f"model.decoder.layers.{i}"
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            t[f"{p}.{ln}.weight"], t[f"{p}.{ln}.bias"] = np.ones(C), np.zeros(C)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[f"{p}.self_attn.{name}.weight"] = rng.standard_normal((C, C)) * 0.02
            t[f"{p}.self_attn.{name}.bias"] = np.zeros(C)
        t[f"{p}.fc1.weight"], t[f"{p}.fc1.bias"] = rng.standard_normal((F, C)) * 0.02, np.zeros(F)
        t[f"{p}.fc2.weight"], t[f"{p}.fc2.bias"] = rng.standard_normal((C, F)) * 0.02, np.zeros(C)
    n_params = sum(v.size for v in t.values())
    save_file({k: v.astype(np.float16) for k, v in t.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="opt", hidden_size=C, ffn_dim=F, num_hidden_layers=L, num_attention_heads=8, vocab_size=V,
        max_position_embeddings=P, word_embed_proj_dim=C, do_layer_norm_before=True, activation_function="relu")))
    base, _ = _peak_rss_anon("import numpy, minisq")
    code = (f"import numpy as np, minisq\nm = minisq.load({str(tmp_path)!r}, lazy=True)\n"
            f"print(minisq.perplexity(m, np.random.default_rng(0).integers(0, {V}, 1024), seq_len=128, "
            "batch_size=4, progress=False))")
    peak, out = _peak_rss_anon(code)
    f32 = 4 * n_params
    print(f"lazy perplexity: peak RssAnon {peak / 1e6:.0f} MB (interpreter alone {base / 1e6:.0f} MB); "
          f"float32 model {f32 / 1e6:.0f} MB; ppl {out.strip()}")
    assert peak - base < 0.30 * f32, (peak, base, f32)


# --- the command ---------------------------------------------------------------------------------

def test_quantize_command_exit_codes(shared_data, tmp_path, make_checkpoint):
    import shutil

    folder, _ = make_checkpoint("gpt2", vocab_size=50257)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(shared_data / "gpt2" / f, folder / f)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MINISQ_DATA_DIR": str(shared_data)}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "minisq", "quantize", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=600)

    ok = run(folder, tmp_path / "q", "--calib-samples", "4", "--seq-len", "32")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "done" in ok.stdout and isinstance(minisq.load(tmp_path / "q").linears()["h.0.mlp.c_fc"], minisq.W8A8Linear)
    assert run(folder, tmp_path / "q2", "--alpha", "2").returncode == 2           # bad argument
    missing = run(tmp_path / "nope", tmp_path / "q3")
    assert missing.returncode == 1 and "error:" in missing.stderr and "Traceback" not in missing.stderr
    again = run(folder, tmp_path / "q", "--calib-samples", "4", "--seq-len", "32")
    assert again.returncode == 0 and "already holds the finished result" in again.stderr   # a no-op, said so
