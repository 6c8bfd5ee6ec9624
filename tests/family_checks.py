"""Checks every family's test file runs the same way (tests/test_bloom.py, test_falcon.py,
test_mixtral.py): a tiny transformers checkpoint with perturbed parameters and planted outlier
channels, and the generic properties held against independent oracles — transformers for the
forward pass and greedy generation, float64 for the smoothing equivalence, the in-memory
pipeline for the streamed one (bit for bit), naive W8A8 for SmoothQuant-O1's gain."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch

import minisq
from minisq.calibrate import calibrate
from minisq.qlinear import quantize
from minisq.smooth import smooth

V = 101


def ids(seed, shape):
    return np.random.default_rng(seed).integers(0, V, shape)


def perturbed(model, seed: int = 1, outliers=(3, 17), outlier_gain: float = 20.0):
    """``model`` (eval) with every 1-D parameter drawn around its init (norm gains around 1,
    biases around 0), so that a forgotten bias or gain shows, and the gains of every norm that
    feeds a linear multiplied by ``outlier_gain`` in the ``outliers`` channels (as in real LLMs)."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                is_gain = ("norm" in name or "ln" in name) and name.endswith("weight")
                p.copy_((1.0 if is_gain else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
                if is_gain and "ln_f" not in name and name != "model.norm.weight" and "embeddings" not in name:
                    p[list(outliers)] *= outlier_gain
    return model.eval()


def hf_logits(hf, x, dtype, patches=contextlib.nullcontext, **kw):
    """transformers' logits in float32, or in float64 under ``patches()`` (the family's fixes for
    the places where transformers computes in float32 inside a float64 model)."""
    m = copy.deepcopy(hf).double() if dtype == np.float64 else hf
    ctx = patches() if dtype == np.float64 else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        out = m(torch.from_numpy(np.asarray(x, np.int64)), **kw).logits.numpy()
    assert out.dtype == dtype
    return out


def max_abs_vs_transformers(folder, hf, dtype, patches=contextlib.nullcontext, x=None):
    x = ids(0, (2, 12)) if x is None else x
    model = minisq.load(folder, dtype=np.dtype(dtype).name)
    got = model(x)
    assert got.dtype == dtype and got.shape == (*x.shape, V)
    return float(np.abs(got - hf_logits(hf, x, dtype, patches)).max())


def kv_cache_decoding_error(model) -> float:
    """max |decode token by token with the KV cache - full forward| (float64)."""
    x = ids(6, (2, 12))
    full = model(x)
    logits, cache = model.forward(x[:, :5], use_cache=True)
    steps = [logits]
    for t in range(5, 12):
        logits, cache = model.forward(x[:, t:t + 1], cache=cache)
        steps.append(logits)
    return float(np.abs(np.concatenate(steps, axis=1) - full).max())


def greedy_generations(model, hf, patches=contextlib.nullcontext, n: int = 10):
    """(minisq's, transformers') greedy continuations of one prompt, both with their KV caches, in float64."""
    prompt = ids(7, (1, 6))
    ours = model.generate(prompt[0], max_new_tokens=n)
    m = copy.deepcopy(hf).double()
    with torch.no_grad(), patches():
        theirs = m.generate(torch.from_numpy(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            attention_mask=torch.ones(1, 6, dtype=torch.long), pad_token_id=0)
    return ours, theirs[0].numpy()


def smoothing_report(model, groups, alpha=0.5):
    """check_equivalence of ``smooth(model, groups)`` (float64 model) at 1e-10, and its factors."""
    stats = calibrate(model, [ids(10, (2, 12)), ids(11, (1, 20))], progress=False)
    smoothed = smooth(model, stats, alpha=alpha, groups=groups)
    report = minisq.check_equivalence(model, smoothed, ids(12, (2, 14)), tol=1e-10)
    return report, smoothed.info["smoothing"]["factors"]


def o1_errors(model, groups=None, alpha=0.5):
    """Relative logit errors against float of naive W8A8, O1 without smoothing, and SmoothQuant-O1
    (``groups``: the default rows when None)."""
    calib, x = [ids(50, (2, 24)), ids(52, (1, 30))], ids(51, (2, 24))
    fp = model(x)
    err = lambda m: minisq.logit_error(fp, m(x))["rel_err"]     # noqa: E731
    stats = calibrate(model, calib, progress=False)
    kw = {} if groups is None else dict(groups=groups)
    smoothed = smooth(model, stats, alpha=alpha, **kw)
    return err(quantize(model, "naive")), err(quantize(model, "O1")), err(quantize(smoothed, "O1"))


def assert_streamed_equals_in_memory(folder, dst, preset="O3", attn_bmm=False, groups=None):
    """quantize_checkpoint (lazy, layer by layer) gives bit for bit the in-memory pipeline's model."""
    calib = [ids(60, (2, 10)), ids(61, (1, 16))]
    kw = {} if groups is None else dict(groups=groups)
    streamed = minisq.load(minisq.quantize_checkpoint(folder, dst, calib, preset=preset, attn_bmm=attn_bmm,
                                                      progress=False, **kw))
    m = minisq.load(folder)
    m = smooth(m, calibrate(m, calib, progress=False), 0.5, **kw)
    ref = quantize(m, preset, stats=calibrate(m, calib, progress=False), attn_bmm=attn_bmm)
    a, b = streamed.linears(), ref.linears()
    assert list(a) == list(b)
    for name in a:
        for field in ("w_q", "w_scale", "x_scale", "b", "w"):
            va, vb = getattr(a[name], field, None), getattr(b[name], field, None)
            assert (va is None) == (vb is None), (name, field)
            if va is not None:
                np.testing.assert_array_equal(va, vb, err_msg=f"{name}.{field}")
    x = ids(62, (2, 14))
    np.testing.assert_array_equal(streamed(x), ref(x))
    return streamed
