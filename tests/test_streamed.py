"""One SmoothQuant, two drivers: the streamed quantize_checkpoint equals the in-memory
pipeline bit for bit, over families x smoothing groups x presets x attention modes x the
baselines. The oracle is the in-memory pipeline itself, saved and reloaded:

    sm = smooth(m, calibrate(m, calib), 0.5, groups)
    q  = quantize(sm, preset, stats=calibrate(sm, calib), ...);  minisq.load(q.save(folder))

and every array of the two reloaded models (parameters, smoothing factors, static attention
scales) and their logits must be equal (bound 0). Tiny random checkpoints: 2 layers, hidden
32, four calibration sequences of 5 to 12 tokens."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import minisq
from minisq.smooth import SMOOTHING_TABLE

torch = pytest.importorskip("torch")

V = 101
CALIB = [np.random.default_rng(s).integers(0, V, shape) for s, shape in
         ((20, 12), (21, (2, 7)), (22, 5), (23, 9))]
IDS = np.random.default_rng(24).integers(0, V, (2, 11))
FAMILIES = ("gpt2", "opt", "llama", "qwen2", "mistral")   # llama: grouped-query; qwen2: multi-query


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> a tiny float32 checkpoint folder (built once per family)."""
    from conftest import hf_model, save_hf_model
    from test_llama import hf_llama

    folders = {}

    def make(family):
        if family not in folders:
            hf = hf_model(family, seed=7) if family in ("gpt2", "opt") else hf_llama(family, seed=7)
            folders[family] = save_hf_model(hf, tmp_path_factory.mktemp(f"{family}-streamed"))
        return folders[family]

    return make


@pytest.fixture(scope="module")
def smoothed():
    """(folder, groups, smooth) -> the in-memory smoothed model and its own calibration stats."""
    cache = {}

    def get(folder, groups, smooth):
        key = (str(folder), repr(groups), smooth)
        if key not in cache:
            m = minisq.load(folder)
            if smooth:
                m = minisq.smooth(m, minisq.calibrate(m, CALIB, progress=False), 0.5, groups)
            cache[key] = m, minisq.calibrate(m, CALIB, progress=False)
        return cache[key]

    return get


def _flat(node, name: str, out: dict) -> dict:
    """Every array and scalar of a tree (dicts, lists, quantized leaves) by dotted name."""
    if isinstance(node, dict):
        for k, v in node.items():
            _flat(v, f"{name}.{k}", out)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _flat(v, f"{name}.{i}", out)
    elif hasattr(node, "shape") and hasattr(node, "dtype"):
        out[name] = np.asarray(node)
    elif dataclasses.is_dataclass(node):
        out[f"{name}:type"] = type(node).__name__
        for f in dataclasses.fields(node):
            _flat(getattr(node, f.name), f"{name}.{f.name}", out)
    else:
        out[name] = node
    return out


def _contents(model) -> dict:
    info = {k: v for k, v in model.info.items() if k not in ("source", "storage")}
    return _flat({"params": model.params, "info": info, "attn_quant": model.attn_quant}, "", {})


def assert_same(streamed, in_memory):
    a, b = _contents(streamed), _contents(in_memory)
    assert list(a) == list(b)
    for name in a:
        if isinstance(a[name], np.ndarray):
            assert a[name].dtype == b[name].dtype, name
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            assert a[name] == b[name], name
    np.testing.assert_array_equal(streamed(IDS), in_memory(IDS))


def _both(checkpoint, smoothed, tmp_path, family, preset, groups=None, attn_bmm=False, smooth=True, **options):
    folder = checkpoint(family)
    sm, stats = smoothed(folder, groups, smooth)
    q = minisq.quantize(sm, preset, stats=stats, attn_bmm=attn_bmm, **options)
    in_memory = minisq.load(q.save(tmp_path / "in_memory"))
    streamed = minisq.load(minisq.quantize_checkpoint(folder, tmp_path / "streamed", CALIB, preset=preset,
                                                      groups=groups, attn_bmm=attn_bmm, smooth=smooth,
                                                      progress=False, **options))
    return streamed, in_memory


# One extra tuple of groups per family: the rows beyond the official two, where it has them.
TUPLES = {"gpt2": ("ln_fc1",), "opt": ("ln_qkv", "fc1_fc2", "v_out"), "llama": ("ln_qkv", "ln_fc1", "v_out"),
          "qwen2": ("up_down", "v_out"), "mistral": ("ln_qkv", "ln_fc1", "up_down", "v_out")}

# (preset, groups, attn_bmm, smooth); "tuple" = TUPLES[family]
ROWS = [
    ("O3", None, False, True),
    ("O3", "all", False, True),
    ("O3", "tuple", "static", True),
    ("O1", "all", True, True),
    ("O2", "default", True, True),
    ("naive", None, False, False),
]


@pytest.mark.parametrize("preset,groups,attn_bmm,smooth", ROWS, ids=lambda v: str(v))
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_equals_in_memory(checkpoint, smoothed, tmp_path, family, preset, groups, attn_bmm, smooth):
    groups = TUPLES[family] if groups == "tuple" else groups
    streamed, in_memory = _both(checkpoint, smoothed, tmp_path, family, preset, groups, attn_bmm, smooth)
    assert_same(streamed, in_memory)
    if smooth:
        assert len(streamed.info["smoothing"]["factors"]) > 0
    assert (streamed.attn_quant is None) == (attn_bmm is False)


@pytest.mark.parametrize("preset,options", [
    ("w8a16", {}), ("zeroquant", dict(group_size=16)), ("llm.int8", dict(threshold=0.5)),
    ("O1", dict(kv_cache="int8")), ("O3", dict(skip=())),
    ("O1", dict(path="fake", skip=("lm_head", "*.fc2", "*down_proj", "*.mlp.c_proj"))),
], ids=["w8a16", "zeroquant", "llm.int8", "kv_int8", "O3-head-too", "fake-skip"])
@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_streamed_baselines_and_options_equal_in_memory(checkpoint, smoothed, tmp_path, family, preset, options):
    streamed, in_memory = _both(checkpoint, smoothed, tmp_path, family, preset, **options)
    assert_same(streamed, in_memory)
    kinds = {type(leaf).__name__ for leaf in streamed.linears().values()}
    want = {"w8a16": "W8A16Linear", "zeroquant": "GroupW8A8Linear",
            "llm.int8": "LLMInt8Linear"}.get(preset, "W8A8Linear")
    assert kinds == ({want} if options.get("skip") == () else {want, "Linear"})


def test_groups_all_streams_every_row_of_the_family(checkpoint, tmp_path):
    """The string "all" selects every row of the family's table (it is not iterated)."""
    for family in ("gpt2", "llama"):
        dst = minisq.quantize_checkpoint(checkpoint(family), tmp_path / family, CALIB, groups="all", progress=False)
        model = minisq.load(dst)
        rows = SMOOTHING_TABLE[model.config.model_type]
        assert model.info["smoothing"]["groups"] == [m.group for m in rows]
        assert len(model.info["smoothing"]["factors"]) == len(rows) * model.config.num_layers


def test_grouped_query_v_out_streams_one_factor_per_kv_channel(checkpoint, tmp_path):
    """v_proj -> o_proj under grouped-query attention (2 kv heads for 4 query heads): the
    factors of o_proj's H·D input channels repeat one factor per kv channel."""
    dst = minisq.quantize_checkpoint(checkpoint("llama"), tmp_path / "q", CALIB,
                                     groups=("ln_qkv", "ln_fc1", "v_out"), progress=False)
    model = minisq.load(dst)
    c = model.config
    assert c.kv_heads < c.num_heads
    s = model.info["smoothing"]["factors"]["layers.0.self_attn.v_proj"]             # [H*D]
    per_kv = s.reshape(c.kv_heads, c.num_heads // c.kv_heads, c.head_dim)
    assert s.shape == (c.num_heads * c.head_dim,) and len(np.unique(s)) > 1
    np.testing.assert_array_equal(per_kv, np.broadcast_to(per_kv[:, :1], per_kv.shape))


@pytest.mark.parametrize("options,match", [
    (dict(preset="O4"), "unknown preset 'O4'"),
    (dict(preset="w8a16", attn_bmm=True), "attn_bmm"),
    (dict(preset="O1", attn_bmm="static"), "attn_bmm='static'"),
    (dict(preset="O1", kv_cache="int4"), "kv_cache"),
    (dict(preset="O3", attn_bmm=True, kv_cache="int8"), "kv_cache"),
    (dict(preset="zeroquant", group_size=12), "group_size=12 does not divide"),
    (dict(preset="O1", threshold=6.0), "threshold"),
    (dict(preset="O3", groups=("ln_qkv", "nope")), "unknown smoothing groups \\['nope'\\]"),
    (dict(preset="O3", groups=5), "groups must be"),
])
def test_streamed_and_in_memory_refuse_alike(checkpoint, tmp_path, options, match):
    """A bad option is a ConfigError naming it, the same from either driver."""
    folder = checkpoint("opt")
    groups = options.pop("groups", None)
    with pytest.raises(minisq.ConfigError, match=match):
        minisq.quantize_checkpoint(folder, tmp_path / "q", CALIB, groups=groups, progress=False, **options)
    m = minisq.load(folder)
    with pytest.raises(minisq.ConfigError, match=match):
        stats = minisq.calibrate(m, CALIB, progress=False)
        minisq.quantize(minisq.smooth(m, stats, 0.5, groups), stats=minisq.calibrate(m, CALIB, progress=False),
                        **options)


def test_post_ln_opt_with_embedding_projections_streams_the_head_too(tmp_path, smoothed):
    """opt-350m's shape: post-LN (the LayerNorm rows are left out, with a warning) and
    project_in/project_out around the layers. With skip=() the streamed run quantizes them
    and the LM head as well, their static ranges observed on the carried activations."""
    from conftest import hf_model, save_hf_model

    folder = save_hf_model(hf_model("opt", seed=8, do_layer_norm_before=False, word_embed_proj_dim=16), tmp_path / "c")
    with pytest.warns(UserWarning, match="post-LN"):
        sm, stats = smoothed(folder, "all", True)
    in_memory = minisq.load(minisq.quantize(sm, "O3", stats=stats, skip=()).save(tmp_path / "in_memory"))
    with pytest.warns(UserWarning, match="post-LN"):
        dst = minisq.quantize_checkpoint(folder, tmp_path / "streamed", CALIB, groups="all", skip=(), progress=False)
    streamed = minisq.load(dst)
    assert_same(streamed, in_memory)
    assert {type(streamed.linears()[n]).__name__ for n in ("project_in", "project_out", "lm_head")} == {"W8A8Linear"}
    assert set(streamed.info["smoothing"]["factors"]) == {f"layers.{i}.{s}" for i in range(2)
                                                         for s in ("fc1", "self_attn.v_proj")}


def test_a_run_killed_while_finishing_resumes_to_the_same_head(checkpoint, tmp_path, monkeypatch):
    """Killed after every layer is written but before minisq.json, a run with skip=() resumes
    from the last carry file: the head's static ranges come out the same."""
    from minisq.pipeline import _Run

    folder = checkpoint("gpt2")
    whole = minisq.load(minisq.quantize_checkpoint(folder, tmp_path / "whole", CALIB, skip=(), progress=False))
    finish = _Run.finish

    def killed(self, src):
        raise KeyboardInterrupt("killed while finishing")

    monkeypatch.setattr(_Run, "finish", killed)
    with pytest.raises(KeyboardInterrupt):
        minisq.quantize_checkpoint(folder, tmp_path / "part", CALIB, skip=(), progress=False)
    monkeypatch.setattr(_Run, "finish", finish)
    assert not (tmp_path / "part" / "minisq.json").exists()
    resumed = minisq.load(minisq.quantize_checkpoint(folder, tmp_path / "part", CALIB, skip=(), progress=False))
    assert isinstance(resumed.linears()["lm_head"], minisq.W8A8Linear)
    assert_same(resumed, whole)
