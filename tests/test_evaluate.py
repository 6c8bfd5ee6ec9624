"""Perplexity and LAMBADA accuracy against transformers and a brute-force loop."""

import math

import numpy as np
import pytest

import minisq
from minisq.eval.evaluate import last_word_correct, perplexity, windows


def _hf_window_losses(hf, ids, L):
    import torch

    losses = []
    with torch.no_grad():
        for b in range(0, len(ids) - L + 1, L):
            x = torch.from_numpy(ids[b:b + L][None])
            losses.append(float(hf(x, labels=x).loss))  # mean NLL over the window's L - 1 predictions
    return losses


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_perplexity_equals_transformers_loss(make_checkpoint, family):
    folder, hf = make_checkpoint(family)
    model = minisq.load(folder)
    ids = np.random.default_rng(0).integers(0, 101, 200)
    L = 32
    ref = math.exp(np.mean(_hf_window_losses(hf, ids, L)))   # 6 full windows, the 8 leftover tokens dropped
    for batch_size in (1, 4):
        got = perplexity(model, ids, seq_len=L, batch_size=batch_size, progress=False)
        assert abs(got - ref) / ref <= 1e-4, (got, ref)
    # a random 101-token model is close to uniform: ppl near the vocab size, not 1
    assert 50 < ref < 300


def test_sliding_window_scores_every_token_once():
    spans = windows(100, 32, 16)
    scored = [n for _, _, n in spans]
    assert sum(scored) == 99 and spans[-1][1] == 100
    assert windows(100, 32, 32) == [(0, 32, 31), (32, 64, 31), (64, 96, 31)]


def test_sliding_window_perplexity_matches_a_manual_loop(make_checkpoint):
    model = minisq.load(make_checkpoint("gpt2")[0], dtype="float64")
    ids = np.random.default_rng(1).integers(0, 101, 90)
    L, stride = 40, 10
    got = perplexity(model, ids, seq_len=L, stride=stride, progress=False)
    # token t is scored once, in the first window [b, b + L) (b = 0, 10, 20, ...) that reaches it,
    # with the context ids[b:t]: one separate forward per token
    nll = 0.0
    for t in range(1, 90):
        begin = 0 if t < L else -(-(t - L + 1) // stride) * stride
        logits = model(ids[begin:t])[-1]
        nll -= logits[ids[t]] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    assert abs(got - math.exp(nll / 89)) / got < 1e-10


def test_last_word_accuracy_equals_brute_force(make_checkpoint):
    model = minisq.load(make_checkpoint("opt")[0])
    rng = np.random.default_rng(2)
    pairs = []
    for i in range(12):
        ctx = rng.integers(3, 101, rng.integers(5, 20))
        if i % 2 == 0:  # the model's own greedy continuation: must count as correct
            tgt = model.generate(ctx, max_new_tokens=1 + i % 3)[len(ctx):]
        else:
            tgt = rng.integers(3, 101, 2)
        pairs.append((ctx, tgt))
    got = last_word_correct(model, pairs, batch_size=5, progress=False)
    brute = [np.array_equal(model.generate(c, max_new_tokens=len(t))[len(c):], t) for c, t in pairs]
    np.testing.assert_array_equal(got, brute)
    assert got[::2].all()


def test_lambada_on_real_passages_with_real_tokenizer(shared_data, make_checkpoint, tmp_path):
    """The text path: real LAMBADA passages through the real GPT-2 tokenizer (random tiny model)."""
    import shutil

    from minisq.eval.data import lambada

    folder, _ = make_checkpoint("gpt2", vocab_size=50257)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(shared_data / "gpt2" / f, folder / f)
    model = minisq.load(folder)
    passages = lambada(shared_data)[:6]
    acc = minisq.lambada_accuracy(model, passages, progress=False)
    pairs = minisq.eval.evaluate.lambada_pairs(model, passages)
    assert model.tokenizer.decode(pairs[0][1].tolist()) == " signs"
    assert acc == float(np.mean(last_word_correct(model, pairs, progress=False)))


def test_perplexity_errors(make_checkpoint):
    model = minisq.load(make_checkpoint("gpt2")[0])
    with pytest.raises(minisq.InputError, match="too few"):
        perplexity(model, np.arange(10), seq_len=32, progress=False)
    with pytest.raises(minisq.InputError, match="seq_len must be <= 64"):
        perplexity(model, np.arange(100), seq_len=128, progress=False)
    with pytest.raises(minisq.InputError, match="tokenizer"):
        perplexity(model.evolve(tokenizer=None), "some text", progress=False)


def test_last_word_needs_every_token_and_last_token_only_the_final_one(make_checkpoint):
    """A two-token last word whose first token greedy decoding gets right and whose second it
    gets wrong is wrong under "last_word" (lm-eval), and the reverse case is right under
    "last_token" (the official SmoothQuant notebook) but wrong under "last_word"."""
    model = minisq.load(make_checkpoint("gpt2")[0])
    rng = np.random.default_rng(3)
    ctx = rng.integers(3, 101, 10)
    greedy = model.generate(ctx, max_new_tokens=2)[len(ctx):]             # [g1, g2]
    first_right = np.array([greedy[0], (greedy[1] + 1) % 101])            # g1 right, then wrong
    g2_after_wrong = model.generate(np.concatenate([ctx, [(greedy[0] + 1) % 101]]), max_new_tokens=1)[-1]
    last_right = np.array([(greedy[0] + 1) % 101, g2_after_wrong])        # first wrong, last right
    pairs = [(ctx, greedy), (ctx, first_right), (ctx, last_right)]
    np.testing.assert_array_equal(last_word_correct(model, pairs, progress=False), [True, False, False])
    np.testing.assert_array_equal(last_word_correct(model, pairs, progress=False, metric="last_token"),
                                  [True, False, True])
    with pytest.raises(minisq.InputError, match="metric"):
        last_word_correct(model, pairs, progress=False, metric="first_token")
