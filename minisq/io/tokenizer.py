"""Text <-> token ids for GPT-2 and OPT: byte-level BPE, through the ``tokenizers`` library.

GPT-2 and OPT share one tokenizer *algorithm* (Radford et al. 2019, sec. 2.2): the text is
split by a regex into words, each word's UTF-8 bytes are mapped to printable characters
("byte-level"), and the 50000 merges of ``merges.txt`` are applied greedily in rank order.
They differ only in data: OPT uses the same merges and token strings under fairseq's ids
(``Hello`` is 15496 in GPT-2 and 31414 in OPT) and prepends ``</s>`` (id 2) to every text.

minisq does not reimplement BPE: the Rust ``tokenizers`` library is the same code HF uses,
so the ids match what the checkpoints were trained on. The test suite holds it against
llama.cpp's test vectors and a pure-Python BPE.

What each model adds around the BPE is data, in :data:`SPECIAL_TOKENS` (each family's
module holds its row), not control flow.
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from ..errors import CheckpointError, ConfigError, InputError
from ..families import FAMILIES
from ..families.base import SpecialTokens
from .jsonfile import read_json


# The defaults HF's tokenizer_config.json gives each family (openai-community/gpt2 and
# facebook/opt-*), kept in the family's module. A tokenizer_config.json in the folder overrides them.
SPECIAL_TOKENS = {model_type: family.SPECIAL_TOKENS for model_type, family in FAMILIES.items()}


class Tokenizer:
    """A loaded BPE plus the special-token facts minisq needs; see :func:`load_tokenizer`."""

    def __init__(self, bpe: tokenizers.Tokenizer, special: SpecialTokens, folder: Path):
        self.bpe = bpe  # the tokenizers.Tokenizer doing the work; kept public for inspection
        self.special = special
        self.add_bos = special.add_bos
        self.bos_id = None if special.bos is None else _token_id(bpe, special.bos, folder)
        self.eos_id = _token_id(bpe, special.eos, folder)
        self.pad_id = None if special.pad is None else _token_id(bpe, special.pad, folder)

    @property
    def vocab_size(self) -> int:
        """Number of token strings, added special tokens included (GPT-2 50257, OPT 50265).

        The model's embedding may have more rows (OPT pads 50265 up to 50272); ids past
        ``vocab_size`` are never produced by :meth:`encode` and :meth:`decode` rejects them.
        """
        return self.bpe.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with ``bos_id`` first when ``add_bos`` (OPT) and nothing else added."""
        if not isinstance(text, str):
            raise InputError(f"encode takes a str, got {type(text).__name__}")
        # add_special_tokens=False: the BOS is added here, visibly, not by a post-processor
        # hidden in tokenizer.json (which OPT files may or may not carry).
        ids = self.bpe.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos else ids

    def encode_batch(self, texts) -> list[list[int]]:
        """:meth:`encode` of each text (the BPE runs on all of them in parallel)."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"encode_batch takes strs; item {i} is a {type(text).__name__}")
        encodings = self.bpe.encode_batch(texts, add_special_tokens=False)
        return [[self.bos_id, *e.ids] if self.add_bos else e.ids for e in encodings]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; special tokens (BOS/EOS/pad) are left out unless asked for."""
        ids = [int(i) for i in ids]  # accepts lists, NumPy arrays and NumPy integers
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            # tokenizers would silently drop them; a student should see the mistake instead.
            raise InputError(
                f"token ids {bad[:5]} are outside the tokenizer's vocabulary [0, {self.vocab_size})"
            )
        return self.bpe.decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, folder) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (the special tokens this
        tokenizer was loaded with, under transformers' names) into ``folder``."""
        folder = Path(folder)
        self.bpe.save(str(folder / "tokenizer.json"))
        special = self.special
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": special.bos, "eos_token": special.eos, "pad_token": special.pad,
             "add_bos_token": special.add_bos}, indent=1))

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id}, add_bos={self.add_bos})")


# GPT-2's vocab.json + merges.txt, shipped as package data (see assets/gpt2/SOURCE.md).
PACKAGED_GPT2 = Path(__file__).resolve().parent / "assets" / "gpt2"


def packaged_gpt2_tokenizer() -> Tokenizer:
    """GPT-2's tokenizer from the files shipped inside minisq (``minisq/assets/gpt2``, OpenAI's
    Modified MIT license): no data folder or download needed. The synthetic models use GPT-2's
    vocabulary, so this turns their token ids into text offline."""
    return load_tokenizer(PACKAGED_GPT2, "gpt2")


def load_tokenizer(folder, model_type: str) -> Tokenizer:
    """The tokenizer of a checkpoint folder of ``model_type`` ("gpt2", "opt", "llama", ...).

    Reads ``tokenizer.json`` when present (byte-level BPE, or a SentencePiece model converted
    by transformers, as Llama 2 / TinyLlama ship), else builds the byte-level BPE from
    ``vocab.json`` + ``merges.txt``. ``tokenizer_config.json``, when present, may override
    the special tokens and ``add_bos_token``; what neither the family nor it says is read
    from ``generation_config.json`` and tokenizer.json's post-processor.
    """
    if model_type not in SPECIAL_TOKENS:
        raise ConfigError(f"unknown model_type {model_type!r}; expected one of {sorted(SPECIAL_TOKENS)}")
    # (a Llama-family SPECIAL_TOKENS is all None: read from tokenizer_config.json, else below)
    folder = Path(folder)
    special = _read_special_tokens(folder, SPECIAL_TOKENS[model_type])
    if (folder / "tokenizer.json").is_file():
        bpe = _read_tokenizer_json(folder / "tokenizer.json")
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        bpe = byte_level_bpe(folder / "vocab.json", folder / "merges.txt")
    else:
        raise CheckpointError(
            f"no tokenizer in {folder}: looked for tokenizer.json, or vocab.json and merges.txt"
        )
    special = _complete_special_tokens(folder, bpe, special)
    # Mark the special tokens so that decode can skip them and encode matches them whole
    # in text (HF does both). They are already in the vocabulary, so no id changes.
    names = dict.fromkeys(t for t in (special.bos, special.eos, special.pad) if t is not None)
    for name in names:
        _token_id(bpe, name, folder)
    bpe.add_special_tokens(
        [tokenizers.AddedToken(name, special=True, normalized=False) for name in names])
    return Tokenizer(bpe, special, folder)


def byte_level_bpe(vocab_file, merges_file) -> tokenizers.Tokenizer:
    """GPT-2's tokenizer from its two files: regex split, bytes -> printable chars, BPE merges.

    ``add_prefix_space=False``: GPT-2 encodes "Hello" without a leading space (15496), and
    " Hello" with one (18435). The ByteLevel pre-tokenizer's regex is GPT-2's own:
    ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``.
    """
    try:
        bpe_model = models.BPE.from_file(str(vocab_file), str(merges_file))
    except Exception as e:  # tokenizers raises plain Exception on unreadable or malformed files
        raise CheckpointError(f"cannot read BPE files {vocab_file} and {merges_file}: {e}") from e
    bpe = tokenizers.Tokenizer(bpe_model)
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    return bpe


def _read_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # plain Exception from tokenizers on bad JSON or unknown fields
        raise CheckpointError(f"cannot read {path}: {e}") from e


def _read_special_tokens(folder: Path, default: SpecialTokens) -> SpecialTokens:
    """``default`` with whatever ``tokenizer_config.json`` says about bos/eos/pad and add_bos_token."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return default
    config = read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} should hold a JSON object, not {type(config).__name__}")

    def token(key: str, fallback: str | None) -> str | None:
        value = config.get(key, fallback)
        # HF writes a token either as "</s>" or as an AddedToken dict {"content": "</s>", ...}.
        value = value.get("content") if isinstance(value, dict) else value
        if value is not None and not isinstance(value, str):
            raise CheckpointError(f"{path}: {key} must be a token string, got {value!r:.60}")
        return value

    add_bos = config.get("add_bos_token", default.add_bos)
    if add_bos is not None and not isinstance(add_bos, bool):
        raise CheckpointError(f"{path}: add_bos_token must be true or false, got {add_bos!r:.60}")
    special = SpecialTokens(
        bos=token("bos_token", default.bos),
        eos=token("eos_token", default.eos),
        pad=token("pad_token", default.pad),
        add_bos=add_bos,
    )
    if (default.bos is not None and special.bos is None) or (default.eos is not None and special.eos is None):
        raise CheckpointError(f"{path} sets no bos_token or eos_token; minisq needs both")
    return special


def _complete_special_tokens(folder: Path, bpe: tokenizers.Tokenizer, special: SpecialTokens) -> SpecialTokens:
    """Fill what the family leaves to the files (None; the Llama family): BOS/EOS from
    ``generation_config.json`` (or ``config.json``) token ids, and ``add_bos`` from what
    tokenizer.json's post-processor prepends — the BOS transformers adds for this file."""
    if None not in (special.bos, special.eos, special.add_bos):
        return special
    ids = {}
    for name in ("config.json", "generation_config.json"):          # the later file wins
        ids.update({k: v for k, v in _read_json_object(folder / name).items()
                    if k in ("bos_token_id", "eos_token_id") and v is not None})

    def name_of(key: str):
        token_id = ids.get(key)
        token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
        valid = type(token_id) is int and 0 <= token_id < bpe.get_vocab_size(with_added_tokens=True)
        return bpe.id_to_token(token_id) if valid else None

    add_bos, prepended = special.add_bos, None
    plain = bpe.encode("a", add_special_tokens=False).ids
    full = bpe.encode("a", add_special_tokens=True).ids
    if len(full) > len(plain) and full[1:len(plain) + 1] == plain:
        prepended = bpe.id_to_token(full[0])           # what transformers prepends for this file
    if add_bos is None:
        add_bos = prepended is not None
    bos = special.bos if special.bos is not None else (prepended or name_of("bos_token_id"))
    eos = special.eos if special.eos is not None else name_of("eos_token_id")
    if eos is None:
        raise CheckpointError(f"no EOS token found for the tokenizer in {folder}: tokenizer_config.json, "
                              "generation_config.json and config.json name none")
    if add_bos and bos is None:
        raise CheckpointError(f"the tokenizer in {folder} should prepend a BOS token but none is named")
    return SpecialTokens(bos=bos, eos=eos, pad=special.pad, add_bos=bool(add_bos))


def _read_json_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    value = read_json(path)
    return value if isinstance(value, dict) else {}


def _token_id(bpe: tokenizers.Tokenizer, name: str, folder: Path) -> int:
    token_id = bpe.token_to_id(name)
    if token_id is None:
        raise CheckpointError(
            f"the tokenizer in {folder} has no token {name!r}; is it the right model_type?")
    return token_id
