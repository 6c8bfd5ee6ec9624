"""Evaluation: WikiText-2 perplexity and LAMBADA last-word accuracy, for any model variant.

Legend: W windows, L window length (tokens), V vocab.

Perplexity follows the protocol of SmoothQuant's and GPTQ's evaluation scripts: the test
rows joined with "\\n\\n" are tokenized once, cut into non-overlapping windows of the
model's context length, and ``ppl = exp(mean NLL)`` over every predicted token (each
window predicts its tokens 2..L from the ones before). A ``stride`` below the window
length gives the sliding-window variant of the HF docs: windows overlap and only the
tokens past the previous window are scored, each with up to L - 1 tokens of context.

LAMBADA accuracy, two rules (``metric=``):

* ``"last_word"`` (default; the GPT-2 paper and lm-eval's ``lambada_openai``): a passage
  counts when greedy decoding predicts *every* token of its last word;
* ``"last_token"`` (the official SmoothQuant notebook's evaluator): only the passage's
  final token must be the argmax. A last word of several tokens whose last token is right
  counts here and may not under ``"last_word"``, so this rule scores higher.

Every result is independent of ``batch_size``: sequences in a batch are right-padded, and
padding never enters attention, a dynamic quantization scale or a statistic.
"""

from __future__ import annotations

import math

import numpy as np

from .. import checks
from ..backend import to_numpy
from ..errors import InputError
from ..nn import log_softmax
from ..layerwise import logits_of


def _log_softmax_at(logits, targets) -> np.ndarray:
    # [N, V] float, [N] int -> [N] float64: log p(target)
    logp = log_softmax(np.asarray(to_numpy(logits), dtype=np.float64))
    return logp[np.arange(len(targets)), targets]


def _token_ids(model, text_or_ids) -> np.ndarray:
    if isinstance(text_or_ids, str):
        if model.tokenizer is None:
            raise InputError("evaluating text needs the model's tokenizer; pass token ids instead")
        return np.asarray(model.tokenizer.encode(text_or_ids), dtype=np.int64)
    ids = np.asarray(to_numpy(text_or_ids))
    if ids.ndim != 1:
        raise InputError(f"perplexity takes one token stream [N], got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):   # 10.7 is no token: never truncated to 10
        raise InputError(f"token ids must be integers, got dtype {ids.dtype}")
    V = model.config.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        bad = int(ids[(ids < 0) | (ids >= V)][0])
        raise InputError(f"token id {bad} is outside the vocabulary [0, {V})")
    return ids.astype(np.int64)


def windows(n_tokens: int, seq_len: int, stride: int) -> list:
    """``(begin, end, n_scored)`` of every window: the last ``n_scored`` tokens of
    ``[begin, end)`` are scored (all but the first in the first window)."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + seq_len, n_tokens)
        if stride == seq_len and end - begin < seq_len:
            break  # the protocol drops the last partial window
        n_scored = end - max(prev_end, begin + 1)
        out.append((begin, end, n_scored))
        prev_end = end
        if end == n_tokens:
            break
    return out


def perplexity(model, text, seq_len: int | None = None, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 1, progress: bool = True) -> float:
    """``exp(mean NLL)`` of ``text`` (a string, tokenized once, or a token id stream [N]).

    ``seq_len`` (2 to the model's context, its default); ``stride`` (1 to ``seq_len``, its
    default: non-overlapping windows); ``max_tokens`` keeps only the first tokens (for quick
    runs); ``batch_size`` windows per forward pass. All are checked before anything runs.
    """
    P = model.config.max_positions
    L = P if seq_len is None else checks.integer("seq_len", seq_len, 2, P, error=InputError)
    stride = L if stride is None else checks.integer("stride", stride, 1, L, error=InputError)
    if max_tokens is not None:
        max_tokens = checks.integer("max_tokens", max_tokens, 2, error=InputError)
    batch_size = checks.integer("batch_size", batch_size, 1, error=InputError)
    ids = _token_ids(model, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2 or (stride == L and len(ids) < L):
        raise InputError(f"{len(ids)} tokens are too few for one window of {L}; lower seq_len")
    spans = windows(len(ids), L, stride)
    nll, count = 0.0, 0
    size = batch_size if stride == L else 1
    groups = [spans[i:i + size] for i in range(0, len(spans), size)]
    batches = [(np.stack([ids[b:e] for b, e, _ in group]), None) for group in groups]   # [W, L] each
    for group, (batch, _), logits in zip(groups, batches, logits_of(model, batches, progress, "perplexity")):
        for row, (b, e, n) in enumerate(group):
            pred = logits[row, e - b - n - 1: e - b - 1]                   # predicts the last n tokens
            nll -= float(_log_softmax_at(pred, batch[row, e - b - n:]).sum())
            count += n
    return math.exp(nll / count)


def lambada_pairs(model, passages) -> list:
    """``(context ids, target ids)`` per passage; the target is the last space-separated
    word, encoded with its leading space (no BOS)."""
    tok = model.tokenizer
    if tok is None:
        raise InputError("LAMBADA on text needs the model's tokenizer")
    pairs = []
    for p in passages:
        if " " not in p.strip():
            raise InputError(f"LAMBADA passage has no last word to predict: {p[:60]!r}")
        context, target = p.rsplit(" ", 1)
        tgt = tok.encode(" " + target)
        pairs.append((np.asarray(tok.encode(context)), np.asarray(tgt[1:] if tok.add_bos else tgt)))
    return pairs


LAMBADA_METRICS = ("last_word", "last_token")


def last_word_correct(model, pairs, batch_size: int = 8, progress: bool = True,
                      metric: str = "last_word") -> np.ndarray:
    """For ``(context ids, target ids)`` pairs: does greedy decoding give every target token
    (``metric="last_word"``), or the final one (``"last_token"``)?

    One forward per batch on ``context + target[:-1]`` (teacher forcing): the argmax at each
    target position must equal that target token. Right padding keeps positions intact.
    """
    if metric not in LAMBADA_METRICS:
        raise InputError(f"metric={metric!r} is not one of {LAMBADA_METRICS}")
    batch_size = checks.integer("batch_size", batch_size, 1, error=InputError)
    correct = np.zeros(len(pairs), dtype=bool)
    P = model.config.max_positions
    order = list(range(len(pairs)))
    groups, batches, all_seqs = [order[i:i + batch_size] for i in range(0, len(order), batch_size)], [], []
    for group in groups:
        seqs = []
        for i in group:
            ctx, tgt = pairs[i]
            seq = np.concatenate([ctx, tgt[:-1]])[-P:]
            seqs.append((seq, len(tgt)))
        T = max(len(s) for s, _ in seqs)
        ids = np.zeros((len(seqs), T), np.int64)
        mask = np.zeros((len(seqs), T), np.int64)
        for row, (s, _) in enumerate(seqs):
            ids[row, :len(s)], mask[row, :len(s)] = s, 1
        batches.append((ids, mask))
        all_seqs.append(seqs)
    for group, seqs, logits in zip(groups, all_seqs, logits_of(model, batches, progress, "lambada")):
        pred = to_numpy(logits).argmax(axis=-1)                              # [B, T]
        for row, i in enumerate(group):
            s, n = seqs[row]
            hits = pred[row, len(s) - n: len(s)] == pairs[i][1]                  # [n] per target token
            correct[i] = bool(hits.all() if metric == "last_word" else hits[-1])
    return correct


def lambada_accuracy(model, passages, n: int | None = None, batch_size: int = 8, progress: bool = True,
                     metric: str = "last_word") -> float:
    """Fraction of LAMBADA passages (texts) whose last word greedy decoding gets exactly right
    (``metric="last_word"``), or whose final token it gets right (``"last_token"``, the official
    SmoothQuant notebook's rule). See the module docstring."""
    passages = list(passages)[:n] if n else list(passages)
    if not passages:
        raise InputError("no LAMBADA passages to evaluate")
    return float(last_word_correct(model, lambada_pairs(model, passages), batch_size, progress, metric).mean())
