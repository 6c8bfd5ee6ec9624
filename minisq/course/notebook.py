"""What every teaching notebook starts from: a model, the tokens it runs on, and the check line.

The notebooks in ``notebooks/`` open with the same few steps: build the tiny SYNTHETIC
outlier model (or load a real one), find its q/k/v and fc1 inputs in the smoothing table,
pick tokens (WikiText-2 paragraphs for a real model with a data folder, otherwise tokens
sampled from the float model itself), and end every stage with a printed, asserted check.
They are written once here so that the notebooks cannot drift apart.

Legend: T tokens per sequence, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..config import ModelConfig
from ..eval.data import calibration_texts, data_dir, wikitext2
from ..io.loading import load
from ..model import Model
from ..smooth import mappings_for
from ..synthetic import synthetic_model

# The notebooks' SYNTHETIC model: GPT-2-shaped, small enough to run every cell in seconds.
TINY = ModelConfig(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, ffn_dim=512, max_positions=128)
OUTLIER_SCALE = 60  # the planted LayerNorm gains are x60 on 4 channels


class NotebookModel(NamedTuple):
    model: Model
    name: str              # printable, with "[SYNTHETIC random weights]" where it applies
    synthetic: bool
    data: Path | None      # the data folder the notebook reads text from, or None
    qkv: list              # per layer, the first linear fed by the attention's norm
    fc1: list              # per layer, the first linear fed by the MLP's norm


def open_model(name: str = "synthetic", num_layers: int = TINY.num_layers) -> NotebookModel:
    """The notebook's model: ``"synthetic"`` (a tiny random-weight GPT-2 whose LayerNorm
    gains carry 4 channels x60, the outlier mechanism of SmoothQuant Sec. 3, planted) or a
    hub id / local folder loaded in float32. Prints the model, its name and where its text
    comes from.

    A data folder (``$MINISQ_DATA_DIR``) is used only by a model with a tokenizer: the
    synthetic model has none, so it says so and samples its tokens from itself.
    """
    if name == "synthetic":
        config = dataclasses.replace(TINY, num_layers=num_layers)
        model = synthetic_model(config, outlier_scale=OUTLIER_SCALE)
    else:
        model = load(name)  # float32 GPT-2 / OPT / Llama-family
    synthetic = model.config.is_synthetic
    label = (model.config.name or name) + (" [SYNTHETIC random weights]" if synthetic else "")
    folder = data_dir()  # $MINISQ_DATA_DIR (WikiText-2, LAMBADA), or None
    if model.tokenizer is None:
        why = "SYNTHETIC model" if synthetic else "model without a tokenizer"
        where = f" ($MINISQ_DATA_DIR={folder} is not used)" if folder is not None else ""
        text = f"none: a {why} runs on tokens sampled from itself{where}"
        folder = None
    elif folder is None:
        text = "none ($MINISQ_DATA_DIR is not set): tokens sampled from the model"
    else:
        text = f"{folder} (WikiText-2, LAMBADA)"
    mappings = mappings_for(model.config)
    qkv = [m.targets[0] for m in mappings if m.group == "ln_qkv"]
    fc1 = [m.targets[0] for m in mappings if m.group == "ln_fc1"]
    print(model)
    print("model:", label)
    print("text:", text)
    return NotebookModel(model, label, synthetic, folder, qkv, fc1)


def sample_tokens(model: Model, n: int, length: int, seed: int) -> list:
    """``n`` SYNTHETIC sequences of ``length`` tokens sampled from the float model itself
    (temperature 1, seeded). On its own samples a random-weight model is as confident as a
    language model on text, so quantization errors show in its perplexity; on uniformly
    random ids every variant would be equally lost. -> n x [length] int64"""
    prompts = np.random.default_rng(seed).integers(0, model.config.vocab_size, size=(n, 1))
    return list(model.generate_ids(prompts, max_new_tokens=length - 1, temperature=1.0, seed=seed))


def calibration_tokens(model: Model, data: Path | None, n: int = 8, length: int = 128) -> tuple:
    """``(calib, description)``: ``n`` sequences of at most ``length`` tokens, WikiText-2
    paragraphs where the model has a tokenizer and ``data`` a folder, else SYNTHETIC samples
    of the float model (seed 0)."""
    if model.tokenizer is not None and data is not None:
        texts = calibration_texts(n=n, data_dir=data)
        calib = [np.asarray(model.tokenizer.encode(t))[:length] for t in texts]
        what = f"{n} WikiText-2 paragraphs (real text)"
    else:
        calib = sample_tokens(model, n, length, seed=0)
        what = f"SYNTHETIC tokens: {n} x {length} sampled from the float model (seed 0)"
    print("calibration tokens:", what, "|", sum(len(c) for c in calib), "tokens")
    return calib, what


def eval_tokens(model: Model, data: Path | None, n_tokens: int | None, seq_len: int) -> tuple:
    """``(ids, description)``: the first ``n_tokens`` of WikiText-2's test split (all of it
    for None) where the model has a tokenizer and ``data`` a folder, else SYNTHETIC windows
    of ``seq_len`` sampled from the float model (seed 1; 2048 tokens for None). -> [N] int"""
    if model.tokenizer is not None and data is not None:
        ids = np.asarray(model.tokenizer.encode(wikitext2("test", data_dir=data)))[:n_tokens]
        return ids, "WikiText-2 test (real text)"
    n_seq = -(-(n_tokens or 2048) // seq_len)
    ids = np.concatenate(sample_tokens(model, n_seq, seq_len, seed=1))[:n_tokens]
    return ids, f"SYNTHETIC tokens: {n_seq} x {seq_len} sampled from the float model (seed 1)"


def check(what: str, expected, seen, ok: bool) -> None:
    """One stage's check: print what was expected and what was seen, and stop if it fails."""
    print(f"check: {what}: expected {expected}, seen {seen} -> {'OK' if ok else 'MISMATCH'}")
    assert ok, f"{what}: expected {expected}, seen {seen}"


def show(fig) -> None:
    """Show a matplotlib figure inline in a notebook; run as a script, say what it is."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(fig)
    else:
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        print(f"[figure: {'; '.join(titles) or 'untitled'}]")
    try:
        import matplotlib.pyplot as plt

        plt.close(fig)  # a pyplot figure is not shown a second time at the end of the cell
    except ImportError:
        pass
