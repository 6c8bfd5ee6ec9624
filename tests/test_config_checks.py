"""Configs checked against their tensors: every tensor used, every field of the right kind
and in its range, a saved model's minisq.json consistent with its tensors, and a property
test that loading any edited config either gives a model that uses all the file's tensors
or raises a MinisqError, never another exception.

Checkpoints are tiny random ones written by transformers (the independent oracle for what
a config means); each case copies one and edits its config.json.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pytest

import minisq
from minisq.errors import CheckpointError, ConfigError, InputError, MinisqError
from minisq.io.checkpoint import read_state_dict

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    from _no_hypothesis import given, settings, st
    HealthCheck = None

TINY_LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def folders(make_checkpoint, tmp_path_factory):
    """family -> a tiny checkpoint folder written by transformers (built once per module)."""
    import torch
    import transformers

    torch.manual_seed(0)
    llama = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).save_pretrained(llama)
    return {"gpt2": make_checkpoint("gpt2")[0], "opt": make_checkpoint("opt")[0], "llama": llama}


def edited(folder, dst, edit=None, **changes):
    """A copy of ``folder`` in ``dst`` whose config.json has ``changes`` (None deletes a key)
    applied, then ``edit(raw)`` if given."""
    shutil.copytree(folder, dst, dirs_exist_ok=True)
    raw = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    if edit is not None:
        edit(raw)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


# --- tensors the config does not use, or that it needs --------------------------------------------

@pytest.mark.parametrize("family,key,prefix", [("gpt2", "n_layer", "h.1."), ("opt", "num_hidden_layers", "layers.1."),
                                               ("llama", "num_hidden_layers", "layers.1.")])
def test_fewer_layers_in_the_config_than_in_the_file_is_refused_naming_them(folders, tmp_path, family, key, prefix):
    folder = edited(folders[family], tmp_path / "c", **{key: 1})
    with pytest.raises(CheckpointError, match=r"not used by its config") as err:
        minisq.load(folder, tokenizer=False)
    assert prefix in str(err.value) and "1 layers" in str(err.value)
    assert minisq.load(folders[family], tokenizer=False).config.num_layers == 2   # the unedited one loads


@pytest.mark.parametrize("family,key", [("gpt2", "n_layer"), ("opt", "num_hidden_layers"), ("llama", "num_hidden_layers")])
def test_more_layers_in_the_config_than_in_the_file_is_refused_naming_one(folders, tmp_path, family, key):
    folder = edited(folders[family], tmp_path / "c", **{key: 3})
    with pytest.raises(CheckpointError, match=r"'(h|layers)\.2\..*' is missing"):
        minisq.load(folder, tokenizer=False)


def test_opt_without_biases_refuses_a_file_that_has_them(folders, tmp_path):
    folder = edited(folders["opt"], tmp_path / "c", enable_bias=False)
    with pytest.raises(CheckpointError, match=r"layers\.0\.fc1\.bias"):
        minisq.load(folder, tokenizer=False)


def test_llama_tied_config_with_a_different_stored_lm_head_is_refused(folders, tmp_path):
    folder = edited(folders["llama"], tmp_path / "c", tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match="tie_word_embeddings.*lm_head"):
        minisq.load(folder, tokenizer=False)


def test_llama_tied_config_with_a_stored_copy_of_the_embedding_is_honoured(folders, tmp_path):
    """A file that stores lm_head as an exact copy of the embedding is what a tied model means."""
    from safetensors.numpy import save_file

    folder = edited(folders["llama"], tmp_path / "c", tie_word_embeddings=True)
    state = read_state_dict(folder)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()
    save_file(state, str(folder / "model.safetensors"))
    model = minisq.load(folder, tokenizer=False)
    np.testing.assert_array_equal(model.params["lm_head"].w, model.params["embed_tokens"].T)


def test_gpt2_causal_mask_buffers_are_not_weights(folders, tmp_path):
    """Hub GPT-2 files carry attn.bias (the causal mask): a buffer, skipped, not an unused weight."""
    from safetensors.numpy import save_file

    folder = edited(folders["gpt2"], tmp_path / "c")
    state = read_state_dict(folder)
    state["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    save_file(state, str(folder / "model.safetensors"))
    minisq.load(folder, tokenizer=False)
    state["h.0.attn.extra"] = np.ones(3, np.float32)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.extra"):
        minisq.load(folder, tokenizer=False)


# --- field kinds and ranges ------------------------------------------------------------------------

def _rope(**params):
    def edit(raw):
        raw.pop("rope_parameters", None)
        raw["rope_scaling"] = params
    return edit


@pytest.mark.parametrize("family,changes,edit,match", [
    ("gpt2", {"layer_norm_epsilon": "1e-5"}, None, "layer_norm_epsilon must be a number"),
    ("gpt2", {"model_type": ["gpt2"]}, None, "model_type must be a string"),
    ("gpt2", {"n_head": 4.0}, None, "n_head must be an integer"),
    ("gpt2", {"n_layer": True}, None, "n_layer must be an integer"),
    ("gpt2", {"scale_attn_weights": "false"}, None, "scale_attn_weights must be true or false"),
    ("gpt2", {"layer_norm_epsilon": 0}, None, "epsilon must be > 0"),
    ("gpt2", {"layer_norm_epsilon": -1e-5}, None, "epsilon must be > 0"),
    ("gpt2", {"eos_token_id": "50256"}, None, "eos_token_id must be a token id"),
    ("opt", {"enable_bias": "false"}, None, "enable_bias must be true or false"),
    ("opt", {"do_layer_norm_before": 1}, None, "do_layer_norm_before must be true or false"),
    ("llama", {"rms_norm_eps": "1e-6"}, None, "rms_norm_eps must be a number"),
    ("llama", {"rms_norm_eps": -1.0}, None, "epsilon must be > 0"),
    ("llama", {"head_dim": "8"}, None, "head_dim must be an integer"),
    ("llama", {"tie_word_embeddings": "false"}, None, "tie_word_embeddings must be true or false"),
    ("llama", {"rope_theta": "10000"}, _rope(rope_type="default"), "rope_theta must be a number"),
    ("llama", {"rope_theta": 0}, _rope(rope_type="default"), "rope_theta must be a finite number > 0"),
    ("llama", {"rope_theta": -5.0}, _rope(rope_type="default"), "rope_theta must be a finite number > 0"),
    ("llama", {}, _rope(rope_type="linear", factor="2"), "factor must be a number"),
    ("llama", {}, _rope(rope_type="linear", factor=-1.0), "factor must be a finite number > 0"),
    ("llama", {}, _rope(rope_type="linear", factor=math.inf), "factor must be a number"),
    ("llama", {}, _rope(rope_type="dynamic", factor=0.1), "dynamic RoPE factor must be >= 1"),
    ("llama", {}, _rope(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=0), "original_max_position_embeddings must be"),
    ("llama", {}, _rope(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=4.0,
                        original_max_position_embeddings=16), "high_freq_factor > low_freq_factor"),
    ("llama", {"rope_scaling": "abc"}, lambda raw: raw.pop("rope_parameters", None), "must be a JSON object"),
    ("llama", {"rope_scaling": {"type": ["linear"], "factor": 2.0}}, lambda raw: raw.pop("rope_parameters", None),
     "RoPE type"),
])
def test_bad_field_values_are_refused_naming_the_field(folders, tmp_path, family, changes, edit, match):
    folder = edited(folders[family], tmp_path / "c", edit, **changes)
    with pytest.raises(ConfigError, match=match):
        minisq.load(folder, tokenizer=False)


def test_deeply_nested_config_json_is_a_checkpoint_error(folders, tmp_path):
    folder = edited(folders["gpt2"], tmp_path / "c")
    (folder / "config.json").write_text('{"model_type": "gpt2", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match="nested too deeply"):
        minisq.load(folder, tokenizer=False)


def test_a_key_given_twice_in_config_json_is_refused(folders, tmp_path):
    folder = edited(folders["gpt2"], tmp_path / "c")
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[:-1] + ', "n_layer": 1}')
    with pytest.raises(CheckpointError, match="'n_layer' appears twice"):
        minisq.load(folder, tokenizer=False)


def test_unknown_load_dtype_is_a_config_error(folders):
    for dtype in ("float8", 3, "int8"):
        with pytest.raises(ConfigError, match="dtype must be one of"):
            minisq.load(folders["gpt2"], dtype=dtype, tokenizer=False)


def test_perplexity_refuses_float_ids_as_the_forward_pass_does(folders):
    model = minisq.load(folders["gpt2"], tokenizer=False)
    ids = np.arange(20) % 50
    with pytest.raises(InputError, match="integers"):
        model(ids + 0.7)
    with pytest.raises(InputError, match="integers"):
        minisq.perplexity(model, ids + 0.7, seq_len=10, progress=False)
    want = minisq.perplexity(model, ids, seq_len=10, progress=False)
    assert minisq.perplexity(model, list(ids), seq_len=10, progress=False) == want   # lists of ints are ids


# --- a saved model's minisq.json against its tensors -----------------------------------------------

@pytest.fixture(scope="module")
def saved(folders, tmp_path_factory):
    model = minisq.load(folders["gpt2"], tokenizer=False)
    out = tmp_path_factory.mktemp("saved")
    minisq.quantize(model).save(out)
    return out


def _edit_saved(saved, dst, edit):
    shutil.copytree(saved, dst)
    meta = json.loads((dst / "minisq.json").read_text())
    edit(meta)
    (dst / "minisq.json").write_text(json.dumps(meta))
    return dst


def _first_leaf(node):
    if isinstance(node, dict):
        if "leaf" in node:
            return node
        for child in node.values():
            found = _first_leaf(child)
            if found is not None:
                return found
    elif isinstance(node, list):
        for child in node:
            found = _first_leaf(child)
            if found is not None:
                return found
    return None


@pytest.mark.parametrize("what,edit,match", [
    ("num_layers", lambda m: m["config"].update(num_layers=1), "num_layers"),
    ("num_heads", lambda m: m["config"].update(num_heads=8), "num_heads: 4 in the tensors, 8 in minisq.json"),
    ("acts", lambda m: _first_leaf(m["params"])["fields"].update(acts="bogus"), "acts='bogus'"),
    ("eps", lambda m: m["config"].update(layer_norm_eps="tiny"), "layer_norm_eps"),
])
def test_edited_minisq_json_is_refused(saved, tmp_path, what, edit, match):
    assert type(minisq.load(saved).linears()["h.0.attn.c_attn"]).__name__ == "W8A8Linear"   # the unedited one loads
    folder = _edit_saved(saved, tmp_path / what, edit)
    with pytest.raises(CheckpointError if what != "eps" else MinisqError, match=match):
        minisq.load(folder)


def test_deeply_nested_minisq_json_is_a_checkpoint_error(saved, tmp_path):
    folder = _edit_saved(saved, tmp_path / "deep", lambda m: None)
    text = (folder / "minisq.json").read_text()
    (folder / "minisq.json").write_text(text[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match="nested too deeply"):
        minisq.load(folder)


def test_num_layers_edit_is_caught_by_the_tree_even_without_the_recorded_config(saved, tmp_path):
    """Files written without the config in their metadata are still checked against the tree."""
    from safetensors.numpy import save_file

    folder = _edit_saved(saved, tmp_path / "n", lambda m: m["config"].update(num_layers=1))
    save_file(read_state_dict(folder), str(folder / "model.safetensors"))          # no metadata
    with pytest.raises(CheckpointError, match="num_layers is 1 but the saved tree holds 2"):
        minisq.load(folder)


# --- tokenizer files ---------------------------------------------------------------------------------

def test_a_corrupt_tokenizer_is_dropped_with_a_warning(folders, tmp_path, shared_data):
    folder = edited(folders["gpt2"], tmp_path / "c")
    gpt2_tok = shared_data / "gpt2"
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_tok / name, folder / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert minisq.load(folder).tokenizer is not None
    (folder / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.warns(UserWarning, match="tokenizer was dropped.*tokenizer_config.json"):
        assert minisq.load(folder).tokenizer is None
    (folder / "tokenizer_config.json").unlink()
    (folder / "vocab.json").write_text("not json")
    with pytest.warns(UserWarning, match="tokenizer was dropped"):
        assert minisq.load(folder).tokenizer is None


# --- the property: any edited config loads a model that uses every tensor, or is a MinisqError -------

FIELDS = {
    "gpt2": ("n_embd", "n_layer", "n_head", "n_inner", "n_positions", "vocab_size", "layer_norm_epsilon",
             "activation_function", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "add_cross_attention",
             "eos_token_id", "model_type"),
    "opt": ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "max_position_embeddings",
            "word_embed_proj_dim", "enable_bias", "do_layer_norm_before", "layer_norm_elementwise_affine",
            "_remove_final_layer_norm", "activation_function", "pad_token_id"),
    "llama": ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
              "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act", "pretraining_tp"),
}

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 200), st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 2 ** 40, -1]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "false", "true", "1e-5", "abc", "gelu_new",
                                                                      "relu", "silu", "gpt2", "llama"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["rope_type", "type", "factor", "rope_theta", "low_freq_factor",
                                     "high_freq_factor", "original_max_position_embeddings"]), inner, max_size=5)),
    max_leaves=8)
rope_dicts = st.fixed_dictionaries({"rope_type": st.sampled_from(["default", "linear", "dynamic", "llama3", "yarn"])},
                                   optional={k: st.one_of(st.floats(-2, 40), json_scalars) for k in
                                             ("factor", "rope_theta", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings")})


@st.composite
def config_edits(draw):
    family = draw(st.sampled_from(sorted(FIELDS)))
    n = draw(st.integers(1, 3))
    edits = {}
    for _ in range(n):
        key = draw(st.sampled_from(FIELDS[family]))
        edits[key] = draw(rope_dicts if key in ("rope_scaling", "rope_parameters") else
                          st.one_of(json_values, st.just("<delete>")))
    return family, edits


def _tensor_elements(node, seen) -> int:
    """Elements of the distinct arrays of a parameter tree (a tied lm_head counts once)."""
    if isinstance(node, dict):
        return sum(_tensor_elements(v, seen) for v in node.values())
    if isinstance(node, (list, tuple)):
        return sum(_tensor_elements(v, seen) for v in node)
    if hasattr(node, "w"):            # a linear leaf
        return _tensor_elements(node.w, seen) + _tensor_elements(getattr(node, "b", None), seen)
    if isinstance(node, np.ndarray):
        base = node
        while base.base is not None and isinstance(base.base, np.ndarray):
            base = base.base
        if id(base) in seen:
            return 0
        seen.add(id(base))
        return node.size
    return 0


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck) if HealthCheck else [])
@given(config_edits())
def test_property_any_config_edit_loads_all_tensors_or_raises_minisq_error(folders, tmp_path_factory, case):
    family, edits = case
    folder = tmp_path_factory.mktemp("prop")
    src = folders[family]
    for p in src.iterdir():
        if p.name != "config.json":
            (folder / p.name).symlink_to(p)
    raw = json.loads((src / "config.json").read_text())
    if family == "llama" and ("rope_scaling" in edits or "rope_theta" in edits):
        raw.pop("rope_parameters", None)
    for key, value in edits.items():
        if value == "<delete>":
            raw.pop(key, None)
        else:
            raw[key] = value
    (folder / "config.json").write_text(json.dumps(raw))
    try:
        model = minisq.load(folder, tokenizer=False)
    except MinisqError:
        return
    stored = read_state_dict(folder)
    used = _tensor_elements(model.params, set())
    assert used == sum(a.size for a in stored.values()), "a loaded model must use every tensor of the file"
    try:
        logits = model(np.arange(3) % model.config.vocab_size)
    except MinisqError:
        return
    assert logits.shape == (3, model.config.vocab_size)
