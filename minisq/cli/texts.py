"""The text the programs calibrate and evaluate on, in a model's token ids.

Real models: WikiText-2 paragraphs to calibrate on, the WikiText-2 test string for
perplexity, LAMBADA passages. The synthetic model (random weights) gets token streams
SAMPLED FROM ITS OWN FLOAT MODEL instead: real text is noise to it.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np

from .. import KVCache
from ..backend import to_numpy
from ..errors import DataError
from ..eval import data as datasets
from ..progress import progress
from .common import say


@dataclasses.dataclass
class EvalData:
    """One model's calibration and evaluation data, in its tokenizer's ids."""

    calib: list            # calibration sequences, int64 [T] each
    eval_ids: np.ndarray   # evaluation tokens [N] int64
    passages: list         # LAMBADA passages (text); empty when skipped
    seq_len: int           # perplexity window
    source: str            # what the text is, in words
    calib_split: str       # where the calibration text comes from: "train", "test" or "synthetic"


def head_tokens(tokenizer, text: str, n: int) -> np.ndarray:
    """The first ``n`` tokens of ``text`` without tokenizing all of it: a prefix that gives
    at least 64 tokens more than ``n`` is tokenized, so the cut falls far from the tokens kept
    (BPE words are split locally)."""
    chars = 8 * n + 1024
    while True:
        ids = tokenizer.encode(text[:chars])
        if len(ids) >= n + 64 or chars >= len(text):
            return np.asarray(ids[:n], np.int64)
        chars *= 2


def calibration_ids(model, samples: int, length: int, data_dir, seed: int) -> tuple[list, str]:
    """``(sequences, split)``: ``samples`` WikiText-2 paragraphs (drawn with ``seed``) in the
    model's ids, each cut to ``length`` tokens and the model's context; ``split`` is "test"
    (with a line saying so) when the train split was not found."""
    if model.tokenizer is None:
        raise DataError(f"{model.config.name or 'this model'} has no tokenizer files (vocab.json + merges.txt "
                        "or tokenizer.json) in its folder; calibrating and evaluating on text needs them")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        texts = datasets.calibration_texts(n=samples, data_dir=data_dir, seed=seed)
    if caught:
        say("! calibrating on WikiText-2 *test* paragraphs (the train split was not found): "
            "perplexity then sees text the scales were calibrated on")
    cut = min(length, model.config.max_positions)
    return [np.asarray(model.tokenizer.encode(t), np.int64)[:cut] for t in texts], "test" if caught else "train"


def real_text(model, calib_samples: int, calib_len: int, eval_tokens: int, seq_len: int, lambada_samples: int,
              data_dir, seed: int, lambada_optional: bool = False) -> EvalData:
    """WikiText-2 calibration paragraphs, the first ``max(eval_tokens, seq_len)`` tokens of the
    WikiText-2 test string, and ``lambada_samples`` LAMBADA passages (skipped with a line
    saying why when ``lambada_optional`` and they cannot be read). ``seq_len`` is capped at
    the model's context."""
    calib, split = calibration_ids(model, calib_samples, calib_len, data_dir, seed)
    seq_len = min(seq_len, model.config.max_positions)
    eval_ids = head_tokens(model.tokenizer, datasets.wikitext2("test", data_dir), max(eval_tokens, seq_len))
    passages = []
    if lambada_samples:
        try:
            passages = datasets.lambada(data_dir)[:lambada_samples]
        except DataError as exc:
            if not lambada_optional:
                raise
            say(f"! LAMBADA skipped: {str(exc).splitlines()[0][:160]}")
    return EvalData(calib, eval_ids, passages, seq_len,
                    "WikiText-2 raw test (perplexity), WikiText-2 paragraphs (calibration)", split)


def synthetic_text(model, calib_samples: int, eval_tokens: int, seq_len: int, seed: int) -> EvalData:
    """For the synthetic model, real text is noise: its perplexity on WikiText-2 is
    astronomically high whatever the quantization. Instead it is evaluated on token streams
    SAMPLED FROM THE FLOAT MODEL ITSELF (temperature 1), on which the float model has a low
    perplexity and every quantization error shows. Calibration uses other samples.

    Each decoding step reads every weight (lm_head alone is V·C floats) whatever the number
    of rows, so the rows are sampled side by side: eval rows of ``seq_len`` and calibration
    rows of ``min(seq_len, 128)`` in one batch when their lengths agree."""
    n_eval = max(1, -(-eval_tokens // seq_len))
    calib_len = min(seq_len, 128)
    t0 = time.perf_counter()
    say(f"sampling SYNTHETIC text from the float model: {n_eval} eval rows of {seq_len} tokens and "
        f"{calib_samples} calibration rows of {calib_len} (LAMBADA skipped: meaningless for random weights)")
    if calib_len == seq_len:
        rows = sample_streams(model, n_eval + calib_samples, seq_len, seed=seed + 1)
        eval_rows, calib_rows = rows[:n_eval], rows[n_eval:]
    else:
        eval_rows = sample_streams(model, n_eval, seq_len, seed=seed + 1)
        calib_rows = sample_streams(model, calib_samples, calib_len, seed=seed + 2)
    say(f"sampled {eval_rows.size + calib_rows.size} SYNTHETIC tokens in {time.perf_counter() - t0:.1f} s")
    return EvalData(list(calib_rows), eval_rows.reshape(-1)[: max(eval_tokens, seq_len)], [], seq_len,
                    "SYNTHETIC token streams sampled from the float model", "synthetic")


def sample_streams(model, rows: int, length: int, seed: int) -> np.ndarray:
    """``rows`` token streams of ``length`` sampled from ``model`` at temperature 1, with the KV
    cache and a progress bar over the decoding steps (``model.generate_ids`` shows none).

    Sampling is Gumbel-max: ``argmax(logits + Gumbel noise)`` is an exact draw from
    ``softmax(logits)``. Holds one step's logits ``[rows, V]`` and the KV cache.
    """
    # -> [rows, length] int64
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.config.vocab_size, (rows, 1))                  # [B, 1] random first tokens
    cache = KVCache(model.config.num_layers, reserve=length)
    logits, cache = model.forward(ids, cache=cache)                             # [B, 1, V]
    out = [ids]
    for _ in progress(range(length - 1), True, "sampling"):
        z = to_numpy(logits[:, -1]).astype(np.float64)                          # [B, V]
        nxt = (z + rng.gumbel(size=z.shape)).argmax(axis=-1)[:, None]           # [B, 1]
        out.append(nxt)
        if len(out) < length:
            logits, cache = model.forward(nxt, cache=cache)
    return np.concatenate(out, axis=1)
