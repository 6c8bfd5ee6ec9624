"""Arguments first: every public function checks its arguments (type, range, NaN) before it
runs, reserves or writes anything, and says which argument is wrong with a MinisqError; a
NonFiniteError blames the right cause. The oracle for "nothing ran" is a forward pass or
KV cache made to fail if it is ever reached. Tiny random OPT and Llama checkpoints."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import minisq
import minisq.model as model_module
from minisq.errors import CalibrationError, ConfigError, InputError, NonFiniteError

pytest.importorskip("torch")
V = 101
IDS = np.random.default_rng(5).integers(0, V, 40)


@pytest.fixture(scope="module")
def opt(make_checkpoint):
    folder, _ = make_checkpoint("opt", seed=4)
    return minisq.load(folder)


@pytest.fixture
def nothing_runs(monkeypatch):
    """A forward pass or a KV cache made fatal: a check that comes too late fails the test."""
    def never(*args, **kwargs):
        raise AssertionError("ran before the arguments were checked")

    monkeypatch.setattr(model_module.Model, "forward", never)
    monkeypatch.setattr(model_module, "KVCache", never)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(temperature=float("nan")), ConfigError, "temperature .* must be a finite number"),
    (dict(temperature=-1.0), ConfigError, "temperature .* must be >= 0"),
    (dict(temperature="1"), ConfigError, "temperature .* must be a number"),
    (dict(top_k=2.5), ConfigError, "top_k must be an integer, got 2.5"),
    (dict(top_k=0), ConfigError, "top_k must be >= 1"),
    (dict(max_new_tokens=10**9), InputError, r"exceed the model's context of 64 positions: pass max_new_tokens <= 59"),
    (dict(max_new_tokens=-1), ConfigError, "max_new_tokens must be >= 0"),
    (dict(max_new_tokens=3.0), ConfigError, "max_new_tokens must be an integer"),
    (dict(seed="x"), ConfigError, "seed must be an integer"),
    (dict(stop_at_eos="no"), ConfigError, "stop_at_eos must be True or False"),
])
def test_generate_checks_its_arguments_before_generating(opt, nothing_runs, kwargs, error, match):
    with pytest.raises(error, match=match):
        opt.generate(IDS[:5], **kwargs)


def test_generate_past_the_context_raises_before_generating(opt, nothing_runs):
    with pytest.raises(InputError, match="60 tokens \\+ max_new_tokens=5 exceed"):
        opt.generate(IDS[:60] if len(IDS) >= 60 else np.resize(IDS, 60), max_new_tokens=5)
    with pytest.raises(InputError, match="outside the vocabulary"):
        opt.generate(np.array([1, V + 3]), max_new_tokens=2)


def test_the_kv_cache_size_is_checked_against_free_memory():
    with pytest.raises(InputError, match="KV cache would take .* GiB, more than"):
        model_module._check_cache_fits(2**62, "cpu")
    model_module._check_cache_fits(1024, "cpu")


def test_generate_still_samples_and_stops_at_the_context(opt):
    """The checks take nothing away: up to the context exactly is allowed, and sampling with
    a NumPy scalar temperature and top_k gives the same tokens as with plain numbers."""
    out = opt.generate(IDS[:4], max_new_tokens=60)
    assert out.shape == (64,)
    a = opt.generate(IDS[:4], max_new_tokens=5, temperature=np.float32(0.8), top_k=np.int64(5), seed=1)
    b = opt.generate(IDS[:4], max_new_tokens=5, temperature=0.8, top_k=5, seed=1)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_len=1), "seq_len must be >= 2"),
    (dict(seq_len=65), "seq_len must be <= 64"),
    (dict(seq_len=8.0), "seq_len must be an integer"),
    (dict(seq_len=8, batch_size=-1), "batch_size must be >= 1"),
    (dict(seq_len=8, batch_size=0), "batch_size must be >= 1"),
    (dict(seq_len=8, stride=0), "stride must be >= 1"),
    (dict(seq_len=8, stride=9), "stride must be <= 8"),
    (dict(seq_len=8, max_tokens=1), "max_tokens must be >= 2"),
])
def test_perplexity_checks_its_arguments(opt, nothing_runs, kwargs, match):
    with pytest.raises(InputError, match=match):
        minisq.perplexity(opt, IDS, progress=False, **kwargs)


def test_perplexity_refuses_float_ids_that_calibrate_refuses(opt, nothing_runs):
    with pytest.raises(InputError, match="integers"):
        minisq.perplexity(opt, IDS.astype(float) + 0.7, seq_len=8, progress=False)
    with pytest.raises(InputError, match="outside the vocabulary"):
        minisq.perplexity(opt, np.r_[IDS, V], seq_len=8, progress=False)


def test_perplexity_of_two_token_windows_is_the_mean_nll_of_every_second_token(opt):
    """seq_len=2 is the smallest window: each predicts its second token from its first."""
    got = minisq.perplexity(opt, IDS[:10], seq_len=2, batch_size=3, progress=False)
    logits = opt(IDS[:10].reshape(5, 2))[:, 0].astype(np.float64)          # [5, V]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = np.exp(-logp[np.arange(5), IDS[1:10:2]].mean())
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("batches", [None, 3, [None], [b"ab"], {"a": 1}])
def test_calibrate_refuses_what_is_not_a_calibration_set(opt, batches):
    with pytest.raises(CalibrationError, match="calibration"):
        minisq.calibrate(opt, batches, progress=False)


@pytest.mark.parametrize("alpha,match", [("0.5", r"got '0\.5' \(str\)"), (float("nan"), "finite"),
                                         (-0.1, ">= 0.0"), ({"*": 2.0}, r"alpha\['\*'\] must be <= 1\.0")])
def test_smooth_checks_alpha(opt, alpha, match):
    stats = minisq.calibrate(opt, [IDS[:8]], progress=False)
    with pytest.raises(ConfigError, match=match):
        minisq.smooth(opt, stats, alpha)


def test_numpy_scalar_alpha_smooths_like_a_float_and_is_json_safe(opt):
    stats = minisq.calibrate(opt, [IDS[:8]], progress=False)
    a, b = minisq.smooth(opt, stats, np.float32(0.5)), minisq.smooth(opt, stats, 0.5)
    assert json.dumps(a.info["smoothing"]["alpha"]) == "0.5"
    for name, leaf in b.linears().items():
        np.testing.assert_array_equal(a.linears()[name].w, leaf.w, err_msg=name)


def _non_finite(model):
    with pytest.raises(NonFiniteError) as e:
        model(IDS[:6])
    return str(e.value)


def test_non_finite_logits_blame_a_negative_epsilon(opt):
    bad = opt.evolve(config=dataclasses.replace(opt.config, layer_norm_eps=-1e6))
    assert "epsilon is -1000000.0" in _non_finite(bad)


def test_non_finite_logits_blame_a_weight_beyond_float16(opt):
    m16 = opt.astype("float16")
    leaf = m16.params["layers"][0]["fc1"]
    params = m16.params
    params = {**params, "layers": [{**params["layers"][0], "fc1": dataclasses.replace(leaf, w=leaf.w * np.float16(np.inf))},
                                   *params["layers"][1:]]}
    msg = _non_finite(m16.evolve(params=params))
    assert "layers.0.fc1.w holds NaN/inf" in msg and "activation overflow" not in msg


def test_non_finite_logits_blame_rope_theta(make_checkpoint, tmp_path):
    from conftest import save_hf_model
    from test_llama import hf_llama

    m = minisq.load(save_hf_model(hf_llama("llama", seed=2), tmp_path / "llama"))
    rope = {**m.config.rope, "rope_theta": -1.0}
    bad = m.evolve(config=dataclasses.replace(m.config, rope=rope))
    try:
        msg = _non_finite(bad)
    except pytest.fail.Exception:   # a negative theta may stay finite: then it is the config check's to refuse
        pytest.skip("rope_theta=-1 gave finite logits")
    assert "rope_theta is -1.0" in msg
