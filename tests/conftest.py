"""Shared test fixtures: real data files and tiny random-weight HF checkpoints.

Checkpoints are built offline with ``transformers`` (CPU torch) and ``save_pretrained``;
transformers is also the independent oracle for logits. Data files come from
``$MINISQ_DATA_DIR`` (CI points it at ``../shared/data``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Small configs that still exercise every code path (several heads, >1 layer).
TINY_GPT2 = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=101)
TINY_OPT = dict(
    hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, vocab_size=101, word_embed_proj_dim=32,
    pad_token_id=1, bos_token_id=2, eos_token_id=2,
)


def data_dir() -> Path | None:
    d = os.environ.get("MINISQ_DATA_DIR")
    return Path(d) if d and Path(d).is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, through $MINISQ_DATA_DIR; skips with a reason when absent."""
    d = data_dir()
    if d is None:
        if os.environ.get("CI"):
            pytest.fail("MINISQ_DATA_DIR is not set to a folder in CI; .ci/run must set it")
        pytest.skip("real data files absent: set MINISQ_DATA_DIR to minisq's shared/data folder")
    return d


def hf_model(family: str, seed: int = 0, **overrides):
    """A random-weight transformers model (eval mode, float32) of a tiny config."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = transformers.GPT2Config(**{**TINY_GPT2, **overrides})
        model = transformers.GPT2LMHeadModel(cfg)
    elif family == "opt":
        cfg = transformers.OPTConfig(**{**TINY_OPT, **overrides})
        model = transformers.OPTForCausalLM(cfg)
    else:
        raise ValueError(family)
    # Random init uses std 0.02 and zero biases / unit LayerNorms: perturb them so that every
    # parameter matters and a transposed or forgotten tensor is caught.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if ("ln" in name or "layer_norm" in name) and name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def save_hf_model(model, path: Path, **save_kwargs) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, **save_kwargs)
    return path


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """Factory: (family, seed=0, save_kwargs=None, **config overrides) -> (folder, hf_model).

    Note: transformers 5 always writes safetensors (``safe_serialization=False`` is ignored);
    tests/test_checkpoint.py writes ``pytorch_model.bin`` files with ``torch.save`` itself.
    """
    cache: dict = {}

    def make(family: str, seed: int = 0, save_kwargs: dict | None = None, **overrides):
        pytest.importorskip("transformers", reason="the test oracle (pip install -e '.[test]')")
        key = (family, seed, repr(sorted((save_kwargs or {}).items())), repr(sorted(overrides.items())))
        if key not in cache:
            model = hf_model(family, seed, **overrides)
            folder = tmp_path_factory.mktemp(f"{family}-ckpt")
            save_hf_model(model, folder, **(save_kwargs or {}))
            cache[key] = (folder, model)
        return cache[key]

    return make


def hf_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None, dtype=None) -> np.ndarray:
    """transformers' logits for int ids [B, T] as a NumPy array (float32 or float64)."""
    import copy

    import torch

    m = model
    if dtype == np.float64:
        m = copy.deepcopy(model).double()
    with torch.no_grad():
        kw = {}
        if attention_mask is not None:
            kw["attention_mask"] = torch.from_numpy(np.asarray(attention_mask))
        out = m(torch.from_numpy(np.asarray(ids, dtype=np.int64)), **kw).logits
    return out.numpy()
