"""minisq against llm-compressor itself: ``smooth(..., convention="llm-compressor")`` against
``oneshot`` with ``SmoothQuantModifier(smoothing_strength=α)`` on the same tiny Llama and
calibration tokens, and ``minisq.load`` of llm-compressor's W8A8 output (SmoothQuant, then
``QuantizationModifier(scheme="W8A8")``, saved compressed).

llm-compressor pins its own transformers range, so it is not in the test extra: this module
skips without it. To run it, in a separate environment:
``python -m venv /tmp/llmc && /tmp/llmc/bin/pip install llmcompressor torch==2.13.0 pytest``,
then ``/tmp/llmc/bin/python -m pytest tests/test_llmcompressor.py`` with minisq on the path.
"""

from __future__ import annotations


import numpy as np
import pytest

import minisq

torch = pytest.importorskip("torch")
pytest.importorskip("llmcompressor", reason="llm-compressor (optional oracle, its own environment)")
datasets = pytest.importorskip("datasets")

from _outlier_models import CALIB, outlier_model  # noqa: E402


def _word_level_tokenizer(vocab_size: int):
    """The calibration rows are token ids already, but oneshot wants a tokenizer: a word-level
    one whose words are the ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocab = {str(i): i for i in range(vocab_size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="0")), pad_token="1")


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothing_equals_llmcompressor_oneshot(tmp_path, alpha):
    from llmcompressor import oneshot
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    hf = outlier_model("llama", seed=5)
    with torch.no_grad():                      # a residual channel pushed to one side
        hf.model.embed_tokens.weight[:, 5] += 3.0
    hf.save_pretrained(tmp_path / "float")
    model = minisq.load(tmp_path / "float")
    ours = minisq.smooth(model, minisq.calibrate(model, CALIB, progress=False), alpha=alpha,
                         convention="llm-compressor")

    rows = [ids[0].tolist() for ids in CALIB]
    data = datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    theirs = oneshot(model=str(tmp_path / "float"), tokenizer=_word_level_tokenizer(hf.config.vocab_size), dataset=data,
                     recipe=SmoothQuantModifier(smoothing_strength=alpha),
                     pipeline="basic", num_calibration_samples=len(rows), shuffle_calibration_samples=False,
                     max_seq_length=max(len(r) for r in rows))
    sd = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    # The ranges come from two forward passes (minisq's NumPy, transformers' torch) that agree to
    # ~1e-7 relative; max - min of the channel pushed to one side cancels most of its digits
    # (it lies far from 0 with a small spread), which amplifies that to ~4e-5 in its factor.
    rtol = 2e-4
    changed = 0
    for name, leaf in ours.linears().items():
        if name == "lm_head":
            continue
        ref = sd["model." + name + ".weight"]
        np.testing.assert_allclose(leaf.w.T, ref, rtol=rtol, atol=1e-9)
        changed += not np.allclose(ref, hf.state_dict()["model." + name + ".weight"].numpy())
    assert changed == 2 * 5                    # q, k, v, gate, up of both layers were smoothed
    for i in range(2):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            np.testing.assert_allclose(ours.params["layers"][i][norm]["g"], sd[f"model.layers.{i}.{norm}.weight"],
                                       rtol=rtol)


def test_minisq_loads_llmcompressor_w8a8_output(tmp_path):
    """llm-compressor's whole recipe (SmoothQuant, then W8A8) saved compressed, read by minisq:
    the same codes and scales, and every quantized linear computes what transformers computes."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    from test_compressed_tensors import layer_by_layer
    from minisq.qlinear import W8A8Linear

    hf = outlier_model("llama", seed=6)
    hf.save_pretrained(tmp_path / "float")
    rows = [ids[0].tolist() for ids in CALIB]
    data = datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    recipe = [SmoothQuantModifier(smoothing_strength=0.5),
              QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    out = oneshot(model=str(tmp_path / "float"), tokenizer=_word_level_tokenizer(hf.config.vocab_size), dataset=data,
                  recipe=recipe, pipeline="basic", num_calibration_samples=len(rows),
                  shuffle_calibration_samples=False, max_seq_length=max(len(r) for r in rows))
    out.save_pretrained(tmp_path / "w8a8", save_compressed=True)
    model = minisq.load(tmp_path / "w8a8")
    from safetensors.numpy import load_file
    sd = load_file(str(tmp_path / "w8a8" / "model.safetensors"))
    leaves = {n: leaf for n, leaf in model.linears().items() if isinstance(leaf, W8A8Linear)}
    assert len(leaves) == 2 * 7
    for name, leaf in leaves.items():
        assert np.array_equal(leaf.w_q.T, sd[f"model.{name}.weight"])
        assert np.array_equal(leaf.w_scale.reshape(-1), sd[f"model.{name}.weight_scale"].reshape(-1))
    assert layer_by_layer(tmp_path / "w8a8", model, "llama", CALIB[0]) <= 1e-5
