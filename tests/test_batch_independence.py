"""A result never depends on what a sequence was batched with.

Dynamic per-tensor scales are per sequence over its real tokens; padding never enters a
scale or a statistic; the evaluators give the same numbers for every batch size.
"""

import numpy as np
import pytest

import minisq
from minisq.calibrate import calibrate
from minisq.eval.evaluate import last_word_correct, perplexity
from minisq.quant import quantize_per_sequence

VARIANTS = [(p, bmm) for p in ("naive", "O1", "O2", "O3") for bmm in (False, True)] + [("O3", "static")]


def _ids(seed, shape, V=101):
    return np.random.default_rng(seed).integers(3, V, shape)


@pytest.fixture(scope="module", params=["gpt2", "opt"])
def model64(request, make_checkpoint):
    model = minisq.load(make_checkpoint(request.param)[0], dtype="float64")
    return model, calibrate(model, [_ids(1, (4, 24))], progress=False)


def test_per_sequence_scale_ignores_padding_and_other_sequences():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 8))
    x[1, 4] = 1000.0                         # a padding token of sequence 1 with huge values
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    q, s = quantize_per_sequence(x, mask)
    assert s.shape == (2, 1, 1) and q.dtype == np.int8
    np.testing.assert_array_equal(s[:, 0, 0], [np.abs(x[0]).max() / 127, np.abs(x[1, :3]).max() / 127])
    # sequence 1 alone, without its padding, gets the very same codes
    q1, s1 = quantize_per_sequence(x[1, :3])
    assert s1.shape == () and float(s1) == float(s[1, 0, 0])
    np.testing.assert_array_equal(q1, q[1, :3])
    assert (np.abs(q[1, 4]) == 127).all()    # padding clips to the sequence's range, never sets it
    with pytest.raises(minisq.ShapeError, match="mask"):
        quantize_per_sequence(x, mask[:, :4])


@pytest.mark.parametrize("preset,bmm", VARIANTS)
def test_a_sequence_alone_equals_the_same_sequence_padded_in_a_batch(model64, preset, bmm):
    model, stats = model64
    q = minisq.quantize(model, preset, stats=stats, attn_bmm=bmm)
    short, long_ = _ids(2, 12), _ids(3, 40)
    ids = np.ones((2, 40), np.int64)
    mask = np.zeros((2, 40), np.int64)
    ids[0, :12], mask[0, :12] = short, 1
    ids[1], mask[1] = long_, 1
    batch = q(ids, mask)
    for row, seq in ((0, short), (1, long_)):
        alone = q(seq)
        got = batch[row, :len(seq)]
        assert np.abs(got - alone).max() <= 1e-12 * np.abs(alone).max(), (preset, bmm, row)


@pytest.mark.parametrize("preset,bmm", [("O1", False), ("O1", True), ("O3", True), ("O3", "static")])
def test_kv_cache_decoding_equals_the_full_forward_with_quantized_attention(model64, preset, bmm):
    model, stats = model64
    q = minisq.quantize(model, preset, stats=stats, attn_bmm=bmm)
    ids = _ids(4, (2, 12))
    full = q(ids)
    logits, cache = q.forward(ids[:, :7], use_cache=True)
    steps = [logits]
    for t in range(7, 12):
        logits, cache = q.forward(ids[:, t:t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-11)
    if bmm is not False:  # the cache holds int8 codes and their per-token scales
        k_q, k_s, v_q, v_s = (a[:, :, :12] for a in cache.store[0])
        assert k_q.dtype == v_q.dtype == np.int8 and k_s.shape == (2, 1, 12, 1)


def test_static_attention_path_int_equals_fake_and_depends_on_no_context(model64):
    """The official int8 O3 scheme: static q/k/v scales, P at 1/127. Every scale is fixed, so a
    token's logits do not depend on the batch or on later tokens."""
    model, stats = model64
    qi = minisq.quantize(model, "O3", stats=stats, attn_bmm="static", path="int")
    qf = minisq.quantize(model, "O3", stats=stats, attn_bmm="static", path="fake")
    ids = _ids(5, (3, 20))
    a, b = qi(ids), qf(ids)
    assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max()
    np.testing.assert_allclose(qi(ids[:, :9]), a[:, :9], rtol=0, atol=1e-12 * np.abs(a).max())
    np.testing.assert_allclose(qi(ids[1]), a[1], rtol=0, atol=1e-12 * np.abs(a).max())
    # P really is int8 at 1/127: the result differs from the float-P scheme
    c = minisq.quantize(model, "O3", stats=stats, attn_bmm=True, path="int")(ids)
    assert np.abs(c - a).max() > 1e-6 * np.abs(a).max()
    with pytest.raises(minisq.ConfigError, match="O3"):
        minisq.quantize(model, "O1", attn_bmm="static")
    with pytest.raises(minisq.ConfigError, match="attn_bmm"):
        minisq.quantize(model, "O1", attn_bmm="yes")


def test_static_qkv_scales_are_the_calibrated_projection_ranges(model64):
    """Δq, Δk, Δv = max |q|, |k|, |v| over the calibration tokens / 127 (GPT-2: thirds of c_attn)."""
    model, stats = model64
    q = minisq.quantize(model, "O3", stats=stats, attn_bmm="static")
    seen = {}

    def spy(name, leaf):
        def run(x, mask=None):
            y = leaf(x, mask)
            seen[name] = np.maximum(seen.get(name, 0.0), np.abs(y).reshape(-1, y.shape[-1]).max(axis=0))
            return y
        return run

    model.replace_linears(spy)(_ids(1, (4, 24)))   # the calibration batch, by brute force
    C = model.config.hidden_size
    for i in range(model.config.num_layers):
        if model.config.model_type == "gpt2":
            out = seen[f"h.{i}.attn.c_attn"]
            maxima = [out[j * C:(j + 1) * C].max() for j in range(3)]
        else:
            maxima = [seen[f"layers.{i}.self_attn.{p}_proj"].max() for p in "qkv"]
        np.testing.assert_allclose([float(s) for s in q.attn_quant.static[i]], np.array(maxima) / 127, rtol=1e-15)


@pytest.mark.parametrize("preset", ["naive", "O1", "O3"])
def test_perplexity_does_not_depend_on_batch_size(model64, preset):
    model, stats = model64
    q = minisq.quantize(model, preset, stats=stats)
    ids = _ids(6, 400)
    one = perplexity(q, ids, seq_len=40, batch_size=1, progress=False)
    eight = perplexity(q, ids, seq_len=40, batch_size=8, progress=False)
    assert abs(one - eight) <= 1e-12 * one


@pytest.mark.parametrize("preset", ["naive", "O2"])
def test_lambada_verdicts_do_not_depend_on_batch_size(model64, preset):
    model, stats = model64
    q = minisq.quantize(model, preset, stats=stats)
    rng = np.random.default_rng(7)
    pairs = []
    for i in range(16):
        ctx = rng.integers(3, 101, rng.integers(4, 30))
        tgt = q.generate(ctx, max_new_tokens=1 + i % 3)[len(ctx):] if i % 2 == 0 else rng.integers(3, 101, 2)
        pairs.append((ctx, tgt))
    one = last_word_correct(q, pairs, batch_size=1, progress=False)
    eight = last_word_correct(q, pairs, batch_size=8, progress=False)
    np.testing.assert_array_equal(one, eight)
    assert one[::2].all()   # its own greedy continuations are right whatever the batch
