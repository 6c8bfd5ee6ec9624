"""The forward pass against transformers (the independent oracle), KV cache, padding, generate."""

import numpy as np
import pytest

import minisq
from conftest import hf_logits

# (family, config overrides): every switch the loader supports
CASES = [
    ("gpt2", {}),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True, n_layer=3)),
    ("gpt2", dict(n_embd=48, n_head=3, n_inner=40, scale_attn_weights=False, reorder_and_upcast_attn=True)),
    ("opt", {}),
    ("opt", dict(do_layer_norm_before=False, word_embed_proj_dim=16)),  # opt-350m style: post-LN + projections
    ("opt", dict(enable_bias=False, layer_norm_elementwise_affine=False)),
    ("opt", dict(_remove_final_layer_norm=True)),
]


def _ids(seed, shape, V=101):
    return np.random.default_rng(seed).integers(0, V, shape)


@pytest.mark.parametrize("family,overrides", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float64", 1e-9)])
def test_logits_match_transformers(make_checkpoint, family, overrides, dtype, tol):
    folder, hf = make_checkpoint(family, **overrides)
    model = minisq.load(folder, dtype=dtype)
    ids = _ids(1, (2, 13))
    ours = model(ids)
    assert ours.dtype == np.dtype(dtype)
    assert ours.shape == (2, 13, 101)
    ref = hf_logits(hf, ids, dtype=np.float64 if dtype == "float64" else None)
    assert np.abs(ours - ref).max() <= tol
    # the oracle is not trivially satisfied: logits vary across tokens
    assert ref.std() > 1e-2


def test_unbatched_ids_give_unbatched_logits(make_checkpoint):
    model = minisq.load(make_checkpoint("gpt2")[0])
    ids = _ids(2, (7,))
    one = model(ids)
    assert one.shape == (7, 101)
    np.testing.assert_array_equal(one, model(ids[None])[0])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_real_model_shapes(make_checkpoint, family):
    """GPT-2 small and OPT-125m shapes (random weights), one forward each."""
    if family == "gpt2":
        overrides = dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)
    else:
        overrides = dict(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=2048, vocab_size=50272, word_embed_proj_dim=768)
    folder, hf = make_checkpoint(family, **overrides)
    model = minisq.load(folder)
    assert model.config.hidden_size == 768 and model.config.num_layers == 12
    ids = _ids(3, (1, 32), V=50257)
    ours = model(ids)
    assert ours.dtype == np.float32
    assert np.abs(ours - hf_logits(hf, ids)).max() <= 1e-4


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_activations_stay_float32(make_checkpoint, family):
    """Under NumPy 2 a float64 constant silently upcasts: every intermediate must stay float32."""
    model = minisq.load(make_checkpoint(family)[0])
    seen = []

    def spy(name, leaf):
        def wrapped(x, mask=None):
            seen.append((name, x.dtype))
            return leaf(x, mask)
        return wrapped

    model.replace_linears(spy)(_ids(4, (1, 5)))
    assert seen and all(dt == np.float32 for _, dt in seen), seen


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_kv_cache_matches_full_forward(make_checkpoint, family):
    model = minisq.load(make_checkpoint(family)[0], dtype="float64")
    ids = _ids(5, (2, 12))
    full = model(ids)
    logits, cache = model.forward(ids[:, :5], use_cache=True)
    steps = [logits]
    for t in range(5, 12, 3):  # feed 3, 3, then 1 tokens
        logits, cache = model.forward(ids[:, t:t + 3], cache=cache)
        steps.append(logits)
    assert cache.length == 12
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(make_checkpoint, family, side):
    model = minisq.load(make_checkpoint(family)[0], dtype="float64")
    a, b = _ids(6, (10,)), _ids(7, (6,))
    pad = np.full(4, 1)
    if side == "left":
        ids = np.stack([a, np.concatenate([pad, b])])
        mask = np.stack([np.ones(10), np.r_[np.zeros(4), np.ones(6)]]).astype(int)
        got_b = model(ids, mask)[1, 4:]
    else:
        ids = np.stack([a, np.concatenate([b, pad])])
        mask = np.stack([np.ones(10), np.r_[np.ones(6), np.zeros(4)]]).astype(int)
        got_b = model(ids, mask)[1, :6]
    out = model(ids, mask)
    assert np.isfinite(out).all()  # padding rows stay finite, not NaN
    np.testing.assert_allclose(out[0], model(a), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_b, model(b), rtol=0, atol=1e-12)


def test_padded_batch_matches_transformers_opt(make_checkpoint):
    """OPT positions come from the mask in transformers too: compare a left-padded batch directly."""
    folder, hf = make_checkpoint("opt")
    model = minisq.load(folder)
    ids = _ids(8, (2, 9))
    mask = np.ones((2, 9), int)
    mask[1, :3] = 0
    ours, ref = model(ids, mask), hf_logits(hf, ids, mask)
    np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=1e-4)


def test_greedy_generate_equals_transformers(make_checkpoint):
    import torch

    folder, hf = make_checkpoint("gpt2")  # eos id 50256 is outside the tiny vocab: no early stop
    model = minisq.load(folder)
    prompt = _ids(9, (1, 5))
    ours = model.generate(prompt, max_new_tokens=12)
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(prompt), max_new_tokens=12, do_sample=False,
                          attention_mask=torch.ones(1, 5, dtype=torch.long)).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert ours.shape == (1, 17)


def test_sampling_is_seeded_and_respects_top_k(make_checkpoint):
    model = minisq.load(make_checkpoint("opt")[0])
    prompt = _ids(10, (6,))
    a = model.generate(prompt, max_new_tokens=8, temperature=1.0, top_k=5, seed=3)
    b = model.generate(prompt, max_new_tokens=8, temperature=1.0, top_k=5, seed=3)
    np.testing.assert_array_equal(a, b)
    # every sampled token is among the top 5 of the logits at its step
    logits = model(a[:-1])
    for t in range(5, 13):
        assert a[t + 1] in np.argsort(logits[t])[-5:]
    # top_k=1 is greedy
    np.testing.assert_array_equal(model.generate(prompt, max_new_tokens=8, temperature=0.7, top_k=1, seed=0),
                                  model.generate(prompt, max_new_tokens=8))


def test_bad_inputs_give_clear_errors(make_checkpoint):
    model = minisq.load(make_checkpoint("gpt2")[0])
    with pytest.raises(minisq.InputError, match="outside the vocabulary"):
        model(np.array([[1, 2, 101]]))
    with pytest.raises(minisq.InputError, match="longer than the model's context of 64"):
        model(np.zeros((1, 65), int))
    with pytest.raises(minisq.InputError, match="integers"):
        model(np.zeros((1, 3), np.float32))
    with pytest.raises(minisq.InputError, match="empty"):
        model(np.zeros((1, 0), int))
    with pytest.raises(minisq.InputError, match="attention_mask has shape"):
        model(np.zeros((2, 3), int), np.ones((2, 4)))
    _, cache = model.forward(np.zeros((1, 60), int), use_cache=True)
    with pytest.raises(minisq.InputError, match="longer than the model's context"):
        model.forward(np.zeros((1, 5), int), cache=cache)


@pytest.mark.parametrize("T,S,block", [(300, 300, 128), (5, 40, 2), (64, 64, 64), (7, 7, 256)])
def test_blocked_causal_attention_equals_the_reference(T, S, block):
    from minisq import nn
    from minisq.kernels.cpu import attention_causal_blocked

    rng = np.random.default_rng(11)
    q = rng.standard_normal((2, 3, T, 8))
    k, v = rng.standard_normal((2, 2, 3, S, 8))
    mask = np.ones((2, S), int)
    mask[1, :3] = 0                                    # left padding in the second row
    bias = nn.attention_bias(mask, T, np.dtype(np.float64))
    ref = nn.attention(q, k, v, bias, 0.3)
    got = attention_causal_blocked(q, k, v, bias, 0.3, block=block)
    real = mask[:, S - T:] > 0                         # padding queries' outputs are never used
    np.testing.assert_allclose(got.transpose(0, 2, 1, 3)[real], ref.transpose(0, 2, 1, 3)[real], rtol=0, atol=1e-13)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("family", ["gpt2", "opt"])
@pytest.mark.parametrize("layout", ["bin", "bin-sharded", "fp16-bin", "bf16-safetensors"])
def test_every_weight_layout_loads_to_the_same_model(tmp_path, make_checkpoint, family, layout):
    """minisq.load end to end on .bin (many OPT hub repos ship only that), sharded .bin, and
    half-precision sources: the logits equal those of the same weights read from safetensors."""
    import copy
    import json
    import shutil

    import torch
    from test_checkpoint import save_bin

    folder, hf = make_checkpoint(family)
    model = minisq.load(folder)
    out = tmp_path / layout
    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    dtype = {"fp16-bin": torch.float16, "bf16-safetensors": torch.bfloat16}.get(layout)
    state = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    if layout == "bf16-safetensors":
        copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(out)   # never touch the shared fixture
    else:
        save_bin(state, out, n_shards=3 if layout == "bin-sharded" else 1)
    got = minisq.load(out)
    ids = _ids(12, (2, 9))
    if dtype is None:
        np.testing.assert_array_equal(got(ids), model(ids))
    else:
        # the stored weights are rounded to 16 bits: compare with transformers on those weights
        ref_model = hf_model_from_state(family, hf, state)
        np.testing.assert_allclose(got(ids), hf_logits(ref_model, ids), atol=1e-4)
    assert json.loads((out / "config.json").read_text())["model_type"] == family


def hf_model_from_state(family, hf, state):
    import copy

    m = copy.deepcopy(hf).float()
    m.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return m.eval()
