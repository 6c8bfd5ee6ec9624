"""Seven behaviours that an equivalence check or an int-vs-fake comparison cannot see, each
held against an oracle built from its definition.

A consistent mistake is still an equivalence: wrong smoothing factors still give a smoothed
model that computes the float function, and a wrong scale used on both the integer and the
fake path still gives agreeing paths. Each test below compares one number minisq computes
with the same number computed independently (brute force, transformers, the file format),
and each was seen to fail with the single-point mistake named in its docstring.

Legend: B batch, T tokens, S keys, C hidden, H query heads, G kv heads, D head dim, P context.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import minisq
from minisq.errors import CheckpointError
from minisq.io.checkpoint import read_safetensors, read_state_dict


def _ids(seed, shape, V=101):
    return np.random.default_rng(seed).integers(0, V, shape)


def _fake(x, scale):
    # float64 [...], scale -> [...]: clip(round-half-even(x / Δ), ±127) · Δ, from the definition
    return np.clip(np.round(np.asarray(x, np.float64) / scale), -127, 127) * scale


# --- 1. grouped-query attention: the v -> o factors -------------------------------------------------

@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory):
    """A tiny Llama with 4 query heads over 2 kv heads (float64), and the kv head each query
    head reads, as transformers' own repeat_kv lays them out."""
    torch = pytest.importorskip("torch")
    from test_llama import hf_llama
    from transformers.models.llama.modeling_llama import repeat_kv

    hf = hf_llama("llama", seed=7)
    folder = tmp_path_factory.mktemp("gqa")
    hf.save_pretrained(folder)
    model = minisq.load(folder, dtype="float64")
    H, G = model.config.num_heads, model.config.kv_heads
    assert G < H
    heads = torch.arange(G, dtype=torch.float64).reshape(1, G, 1, 1)          # [1, G, 1, 1]: kv head g holds g
    reads = repeat_kv(heads, H // G).reshape(H).long().numpy()              # [H]: query head h reads kv head reads[h]
    return model, reads


def test_gqa_vo_factors_equal_brute_force_max_over_reading_heads(gqa_llama):
    """Eq. 4 for v_proj -> o_proj under GQA: kv channel (g, d) is read by o_proj's input
    channels (h, d) of every query head h that attends with kv head g; its factor comes from
    the max of their activation and weight ranges. (Grouping the query heads by h % G instead
    of h // (H/G) is still an exact equivalence, with the wrong factors.)"""
    model, reads = gqa_llama
    cfg = model.config
    H, G, D = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    alpha = 0.5
    stats = minisq.calibrate(model, [_ids(1, (2, 12)), _ids(2, (1, 9))], progress=False)
    smoothed = minisq.smooth(model, stats, alpha=alpha, groups=("v_out",))
    for i in range(cfg.num_layers):
        o_in = stats.channel_absmax[f"layers.{i}.self_attn.o_proj"]             # [H*D]
        w_o = model.linears()[f"layers.{i}.self_attn.o_proj"].w                  # [H*D, C]
        s_kv = np.empty((G, D))
        for g in range(G):
            for d in range(D):
                readers = [h * D + d for h in range(H) if reads[h] == g]
                a = max(o_in[c] for c in readers)
                w = max(abs(w_o[c, j]) for c in readers for j in range(w_o.shape[1]))
                s_kv[g, d] = max(a ** alpha / max(w, 1e-5) ** (1 - alpha), 1e-5) if a > 0 else 1.0
        want = np.array([s_kv[reads[h], d] for h in range(H) for d in range(D)])   # [H*D]
        got = np.asarray(smoothed.info["smoothing"]["factors"][f"layers.{i}.self_attn.v_proj"])
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)
        # v_proj's output channel (g, d) is divided by kv channel (g, d)'s factor
        v0, v1 = (m.linears()[f"layers.{i}.self_attn.v_proj"].w for m in (model, smoothed))
        np.testing.assert_allclose(v1, v0 / s_kv.reshape(-1), rtol=1e-14, atol=0)


# --- 2. static int8 attention: P·V --------------------------------------------------------------

@pytest.fixture(scope="module")
def opt64(make_checkpoint):
    model = minisq.load(make_checkpoint("opt")[0], dtype="float64")
    stats = minisq.calibrate(model, [_ids(3, (2, 14)), _ids(4, (1, 20))], progress=False)
    return model, stats


def _projection_outputs(model, batches, names) -> dict:
    """Every output row of the named linears over these batches: ``name -> [N, C_out]``."""
    seen = {}

    def spy(name, leaf):
        if name not in names:
            return leaf

        def run(x, mask=None):
            y = leaf(x, mask)
            seen.setdefault(name, []).append(np.asarray(y).reshape(-1, y.shape[-1]))
            return y
        return run

    spied = model.replace_linears(spy)
    for b in batches:
        spied(b)
    return {k: np.concatenate(v) for k, v in seen.items()}


def _attention_from_definitions(q, k, v, scales, H, probs_int8):
    """The official int8 OPT attention, in float64 from its definitions: q, k, v fake-quantized
    with their static scales; scores = (q̂ k̂ᵀ)/√D, causal; P = softmax; P̄ = round(127 P) and
    out = (P̄ / 127) v̂ when ``probs_int8``, else out = P v̂."""
    # [B, T, C] x3, (Δq, Δk, Δv) -> [B, T, C]
    B, T, C = q.shape
    D = C // H
    dq, dk, dv = (float(s) for s in scales)
    heads = lambda a: a.reshape(B, T, H, D).transpose(0, 2, 1, 3)   # [B, H, T, D]
    qh, kh, vh = heads(_fake(q, dq)), heads(_fake(k, dk)), heads(_fake(v, dv))
    scores = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(D)                        # [B, H, T, T]
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if probs_int8:
        p = np.clip(np.round(127 * p), 0, 127) / 127
    return (p @ vh).transpose(0, 2, 1, 3).reshape(B, T, C)


@pytest.mark.parametrize("path", ["int", "fake"])
def test_static_int8_attention_equals_its_definition_with_delta_v_on_pv(opt64, path):
    """attn_bmm="static" (the official int8 OPT): Δq, Δk, Δv are the calibrated max|q|, |k|, |v|
    over 127, and out = (1/127 · Δv) · (P̄ V̄). (Δk in the P·V epilogue agrees int-vs-fake,
    since both paths then use it.)"""
    model, stats = opt64
    q = minisq.quantize(model, "O3", stats=stats, attn_bmm="static", path=path)
    calib = [_ids(3, (2, 14)), _ids(4, (1, 20))]
    names = [f"layers.0.self_attn.{p}_proj" for p in "qkv"]
    outs = _projection_outputs(model, calib, names)
    static = q.attn_quant.static[0]
    for name, s in zip(names, static):
        assert float(s) == np.abs(outs[name]).max() / 127, name     # calibrated range / 127, per projection
    assert len({float(s) for s in static}) == 3                     # Δk != Δv: a swap would show
    rng = np.random.default_rng(5)
    B, T, C, H = 2, 7, model.config.hidden_size, model.config.num_heads
    x = [rng.uniform(-1, 1, (B, T, C)) * 127 * float(s) for s in static]  # inside each static range
    mask = np.ones((B, T), np.int64)
    bias = minisq.nn.attention_bias(mask, T, np.dtype(np.float64))
    got = q.attn_quant(0, *x, mask, bias, model.config.head_dim ** -0.5, H)
    want = _attention_from_definitions(*x, static, H, probs_int8=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())


# --- 3. the streamed pipeline without smoothing under static scales ---------------------------------

@pytest.fixture(scope="module")
def fp16_opt(tmp_path_factory):
    """A 3-layer float16 OPT checkpoint."""
    torch = pytest.importorskip("torch")
    from conftest import hf_model, save_hf_model

    hf = hf_model("opt", seed=4, num_hidden_layers=3).to(torch.float16)
    return save_hf_model(hf, tmp_path_factory.mktemp("opt-fp16"))


CALIB = [_ids(10, 20), _ids(11, 33), _ids(12, (2, 9))]


def _same_quantized_model(a, b):
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


class Killed(Exception):
    pass


def test_streamed_unsmoothed_o3_equals_in_memory_and_resumes_to_it(fp16_opt, tmp_path, monkeypatch):
    """quantize_checkpoint(smooth=False, preset="O3") gives quantize(m, "O3", stats=calibrate(m))
    bit for bit, uninterrupted and after a kill at layer 1: every static x_scale from layer 1 on
    comes from the activations that really reach the layer. (Not advancing the carried
    unsmoothed activations leaves a stale carry that only a resumed run reads.)"""
    from minisq.pipeline import _Run

    m = minisq.load(fp16_opt)
    ref = minisq.quantize(m, "O3", stats=minisq.calibrate(m, CALIB, progress=False))
    whole = minisq.load(minisq.quantize_checkpoint(fp16_opt, tmp_path / "whole", CALIB, preset="O3",
                                                   smooth=False, progress=False))
    _same_quantized_model(whole, ref)

    original, calls = _Run.layer, []

    def dies(self, i):
        calls.append(i)
        if len(calls) > 1:
            raise Killed(f"killed at layer {i}")
        return original(self, i)

    monkeypatch.setattr(_Run, "layer", dies)
    with pytest.raises(Killed):
        minisq.quantize_checkpoint(fp16_opt, tmp_path / "part", CALIB, preset="O3", smooth=False, progress=False)
    monkeypatch.setattr(_Run, "layer", original)
    assert calls == [0, 1]
    resumed = minisq.load(minisq.quantize_checkpoint(fp16_opt, tmp_path / "part", CALIB, preset="O3",
                                                     smooth=False, progress=False))
    _same_quantized_model(resumed, ref)


# --- 4. LAMBADA: a passage longer than the context --------------------------------------------------

def test_lambada_keeps_the_last_context_tokens_of_an_over_long_passage(make_checkpoint):
    """A passage of more than P tokens is scored on its last P tokens (the ones next to the
    word to predict): its target, the model's greedy continuation of those last tokens, counts
    as correct. (Keeping the first P tokens instead predicts something else.)"""
    from minisq.eval.evaluate import last_word_correct

    model = minisq.load(make_checkpoint("gpt2")[0])
    P = model.config.max_positions
    greedy = lambda ids: int(model(ids)[-1].argmax())          # the next token after ids
    # a tiny random model has a favourite token: take the first passage whose first P tokens
    # predict another word than its last P tokens do (so that this test can fail)
    for seed in range(20, 80):
        ctx = _ids(seed, P + 17)
        one = np.array([greedy(ctx[-P:])])
        two = np.array([greedy(ctx[-(P - 1):])])
        if greedy(ctx[:P]) != one[0] and greedy(ctx[:P - 1]) != two[0]:
            break
    else:
        pytest.fail("no passage tells the first P tokens from the last P")
    two = np.append(two, greedy(np.concatenate([ctx[-(P - 2):], two])))
    pairs = [(ctx, one), (ctx, two)]
    np.testing.assert_array_equal(last_word_correct(model, pairs, progress=False), [True, True])
    # and a wrong word is still wrong
    wrong = [(ctx, (one + 1) % model.config.vocab_size)]
    assert not last_word_correct(model, wrong, progress=False)[0]


# --- 5. LLM.int8(): the outlier threshold ----------------------------------------------------------

def test_llm_int8_counts_a_channel_whose_max_equals_the_threshold_as_an_outlier():
    """bitsandbytes takes out the columns where |x| >= threshold: a channel whose max |x| is
    exactly the threshold runs in float, and the output is assembled from that set."""
    rng = np.random.default_rng(6)
    C_in, C_out, t = 16, 8, 6.0
    leaf = minisq.Linear(rng.standard_normal((C_in, C_out)), rng.standard_normal(C_out))
    q = minisq.quantize_linear(leaf, "per_channel", "per_token", threshold=t)
    x = rng.uniform(-3, 3, (5, C_in))
    x[2, 4] = -6.0                              # max |x| of channel 4 is exactly the threshold
    x[1, 9] = np.nextafter(6.0, 0)              # just below it: a regular channel
    out = [max(abs(x[r, k]) for r in range(5)) >= t for k in range(C_in)]
    assert out[4] and not out[9] and sum(out) == 1
    np.testing.assert_array_equal(q.outlier_channels(x).reshape(-1), out)
    # Y = Δx (X̄_reg W̄) Δw + b + X[:, O] (W̄[O] Δw), from the definition (float64)
    x_reg = np.where(out, 0.0, x)
    dx = np.abs(x_reg).max(axis=1, keepdims=True) / 127
    w_hat = q.w_q.astype(np.float64) * q.w_scale
    want = _fake(x_reg, dx) @ w_hat + leaf.b + x[:, out] @ w_hat[out]
    np.testing.assert_allclose(q(x), want, rtol=0, atol=1e-12 * np.abs(want).max())


def test_llm_int8_threshold_zero_takes_out_every_channel_even_an_all_zero_one():
    rng = np.random.default_rng(7)
    leaf = minisq.Linear(rng.standard_normal((12, 5)), None)
    q = minisq.quantize_linear(leaf, "per_channel", "per_token", threshold=0.0)
    x = rng.standard_normal((2, 4, 12))
    x[:, :, 3] = 0.0                             # |0| >= 0: still an outlier channel
    assert q.outlier_channels(x).all()
    w_hat = q.w_q.astype(np.float64) * q.w_scale
    np.testing.assert_allclose(q(x), x @ w_hat, rtol=0, atol=1e-12)


# --- 6. safetensors: the overlap check -------------------------------------------------------------

def _write_safetensors(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()                 # the header keeps this dict's order
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("lazy", [False, True])
def test_safetensors_header_out_of_offset_order_loads_and_an_overlap_is_refused(tmp_path, lazy):
    """Tensors may be listed in any order; only their byte ranges, sorted by offset, must not
    overlap. (Comparing neighbours in header order refuses this valid file.)"""
    a, b, c = (np.arange(n, dtype=np.float32) + 10 * n for n in (4, 2, 3))
    data = b.tobytes() + c.tobytes() + a.tobytes()                      # b [0, 8), c [8, 20), a [20, 36)
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [20, 36]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "c": {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]}}
    path = tmp_path / "model.safetensors"
    _write_safetensors(path, header, data)
    got = read_safetensors(path, lazy=lazy)
    for name, want in (("a", a), ("b", b), ("c", c)):
        arr = got[name][1] if lazy else got[name]
        np.testing.assert_array_equal(arr, want)
    assert set(read_state_dict(tmp_path, lazy=lazy)) == {"a", "b", "c"}
    # the same tensors, c moved to overlap b (still listed out of order): refused
    header["c"]["data_offsets"] = [4, 16]
    _write_safetensors(path, header, data)
    with pytest.raises(CheckpointError, match="overlap"):
        read_safetensors(path, lazy=lazy)


# --- 7. tied embeddings on lazy and stored models ----------------------------------------------------

@pytest.mark.parametrize("family,embedding", [("gpt2", "wte"), ("opt", "embed_tokens")])
@pytest.mark.parametrize("how", [{"lazy": True}, {"dtype": "float16"}, {"dtype": "bfloat16"}])
def test_tied_lm_head_shares_memory_with_the_embedding_on_lazy_and_stored_models(make_checkpoint, family,
                                                                                 embedding, how):
    """A tied lm_head is the embedding's transpose: widened once, a view of one array, as in an
    eagerly loaded model (a second widened copy would double the biggest matrix)."""
    folder, _ = make_checkpoint(family)
    model = minisq.load(folder, **how)
    assert model.stored
    eager = minisq.load(folder)
    # outer(): embedding, final norm and head in the compute dtype; astype: every weight widened
    for widened in (model.outer(), model.astype("float32"), eager, eager.astype("float32")):
        emb, head = widened.params[embedding], widened.params["lm_head"].w
        assert isinstance(emb, np.ndarray) and emb.dtype == np.float32
        assert np.shares_memory(head, emb) and head.shape == emb.shape[::-1]
    ids = _ids(8, (1, 9))
    tol = 0 if how.get("lazy") else 5e-2
    np.testing.assert_allclose(model(ids), eager(ids), rtol=0, atol=tol)
