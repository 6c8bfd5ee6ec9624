"""minisq.io.tokenizer against real GPT-2/OPT tokenizer files and three independent oracles:
llama.cpp's GPT-2 test vectors, a pure-Python BPE written here (OpenAI's encoder.py
algorithm), and transformers' GPT2Tokenizer.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from minisq import data
from minisq.errors import CheckpointError, ConfigError, InputError
from minisq.io.tokenizer import load_tokenizer

# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def gpt2_json(shared_data):
    """GPT-2 from tokenizer.json."""
    return load_tokenizer(shared_data / "gpt2", "gpt2")


@pytest.fixture(scope="module")
def gpt2_files_dir(shared_data, tmp_path_factory):
    """A folder with only GPT-2's vocab.json + merges.txt, so the BPE is built from them."""
    folder = tmp_path_factory.mktemp("gpt2-bpe")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(shared_data / "gpt2" / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def gpt2_files(gpt2_files_dir):
    return load_tokenizer(gpt2_files_dir, "gpt2")


@pytest.fixture(scope="module", params=["tokenizer.json", "vocab+merges"])
def gpt2(request, gpt2_json, gpt2_files):
    """GPT-2 through both loading routes."""
    return gpt2_json if request.param == "tokenizer.json" else gpt2_files


@pytest.fixture(scope="module")
def opt(shared_data):
    return load_tokenizer(shared_data / "opt", "opt")


@pytest.fixture(scope="module")
def llama_cpp_cases(shared_data):
    """The 46 (text, ids) pairs of llama.cpp's GPT-2 tokenizer test.

    llama.cpp writes each text followed by "\\n__ggml_vocab_test__\\n" (so the file ends with
    the separator) and each id list as " id id ...\\n" (an empty line for the empty text).
    The texts themselves may begin or end with newlines; nothing is stripped.
    """
    folder = shared_data / "gpt2" / "tokenizer-tests"
    inp = (folder / "ggml-vocab-gpt-2.gguf.inp").read_bytes().decode("utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")
    assert texts.pop() == ""
    lines = (folder / "ggml-vocab-gpt-2.gguf.out").read_bytes().decode("utf-8").split("\n")
    assert lines.pop() == ""
    assert len(texts) == len(lines) == 46
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines)]


@pytest.fixture(scope="module")
def wiki_lines(shared_data):
    """300 non-empty WikiText-2 test rows, spread over the file."""
    rows = [r for r in data.wikitext2_rows("test", shared_data) if r]
    return rows[:: len(rows) // 300][:300]


class ReferenceBPE:
    """GPT-2's tokenizer in pure Python, after OpenAI's gpt-2/src/encoder.py: an oracle
    that shares no code with the Rust ``tokenizers`` library."""

    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, vocab_file, merges_file):
        regex = pytest.importorskip("regex")  # installed with transformers
        self.split = regex.compile(self.PATTERN).findall
        self.vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        merges = merges_file.read_text(encoding="utf-8").split("\n")[1:]  # drop "#version: 0.2"
        self.ranks = {tuple(m.split()): rank for rank, m in enumerate(merges) if m}
        # Each byte maps to a printable character; printable bytes map to themselves.
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                     *range(ord("®"), ord("ÿ") + 1)]
        others = [b for b in range(256) if b not in printable]
        self.byte_char = {b: chr(b) for b in printable} | {b: chr(256 + k) for k, b in enumerate(others)}

    def bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            rank, first, second = min((self.ranks.get(p, math.inf), *p) for p in zip(parts, parts[1:]))
            if rank == math.inf:
                break
            merged, i = [], 0
            while i < len(parts):  # merge every (first, second), left to right
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in self.split(text):
            chars = "".join(self.byte_char[b] for b in word.encode("utf-8"))
            ids += [self.vocab[p] for p in self.bpe(chars)]
        return ids


@pytest.fixture(scope="module")
def reference_bpe(shared_data):
    return ReferenceBPE(shared_data / "gpt2" / "vocab.json", shared_data / "gpt2" / "merges.txt")


def hf_tokenizer(folder, **kwargs):
    """transformers' GPT2Tokenizer from a local folder (no network)."""
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2Tokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)


# ------------------------------------------------------------------ GPT-2


def test_gpt2_hello_world(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" Hello world") == [18435, 995]


def test_gpt2_special_token_facts(gpt2):
    facts = (gpt2.vocab_size, gpt2.bos_id, gpt2.eos_id, gpt2.pad_id, gpt2.add_bos)
    assert facts == (50257, 50256, 50256, None, False)


def test_gpt2_matches_llama_cpp_vectors(gpt2, llama_cpp_cases):
    wrong = [(i, text, gpt2.encode(text), ids) for i, (text, ids) in enumerate(llama_cpp_cases)
             if gpt2.encode(text) != ids]
    assert not wrong, f"{len(wrong)} of 46 differ; first: {wrong[0]}"


def test_reference_bpe_matches_llama_cpp_vectors(reference_bpe, llama_cpp_cases):
    # The oracle is only as good as itself: hold it to the same vectors first.
    for text, ids in llama_cpp_cases:
        assert reference_bpe.encode(text) == ids, text


def test_gpt2_matches_reference_bpe_on_wikitext(gpt2, reference_bpe, wiki_lines):
    for line in wiki_lines:
        assert gpt2.encode(line) == reference_bpe.encode(line), line


def test_gpt2_matches_transformers_on_wikitext(gpt2, gpt2_files_dir, wiki_lines):
    hf = hf_tokenizer(gpt2_files_dir)
    # Note: in transformers 5 GPT2Tokenizer runs on the same Rust `tokenizers` BPE, so this
    # checks our configuration of it; ReferenceBPE above checks the algorithm.
    assert gpt2.encode_batch(wiki_lines) == [hf(line)["input_ids"] for line in wiki_lines]


def test_gpt2_round_trip(gpt2, llama_cpp_cases, shared_data):
    texts = [text for text, _ in llama_cpp_cases] + [data.wikitext2("test", shared_data)[:20_000]]
    for text in texts:
        assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_endoftext_is_one_token_and_decode_skips_it(gpt2):
    # As in HF: the special token's text is matched whole, and decode leaves it out by default.
    assert gpt2.encode("Hello<|endoftext|>") == [15496, 50256]
    assert gpt2.decode([50256, 15496]) == "Hello"
    assert gpt2.decode([50256, 15496], skip_special_tokens=False) == "<|endoftext|>Hello"


def test_encode_batch_equals_encode(gpt2, opt, llama_cpp_cases):
    texts = [text for text, _ in llama_cpp_cases]
    for tok in (gpt2, opt):
        assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
        assert tok.encode_batch(iter(texts[:3])) == [tok.encode(t) for t in texts[:3]]


def test_decode_accepts_numpy_and_rejects_out_of_range(gpt2):
    np = pytest.importorskip("numpy")
    assert gpt2.decode(np.array([15496, 995], dtype=np.int32)) == "Hello world"
    with pytest.raises(InputError, match="50257"):
        gpt2.decode([15496, 50257])
    with pytest.raises(InputError):
        gpt2.decode([-1])


def test_encode_rejects_non_str(gpt2):
    with pytest.raises(InputError):
        gpt2.encode(b"Hello")
    with pytest.raises(InputError, match="item 1"):
        gpt2.encode_batch(["Hello", 3])


# ------------------------------------------------------------------ OPT


def test_opt_photo_of_a_cat(opt):
    # HF's OPTTokenizationTest: facebook/opt-350m encodes this as [2, 250, 1345, 9, 10, 4758].
    ids = opt.encode("A photo of a cat")
    assert ids == [2, 250, 1345, 9, 10, 4758]
    assert opt.decode(ids) == "A photo of a cat"
    assert opt.decode(ids, skip_special_tokens=False) == "</s>A photo of a cat"


def test_opt_special_token_facts(opt):
    assert (opt.vocab_size, opt.bos_id, opt.eos_id, opt.pad_id, opt.add_bos) == (50265, 2, 2, 1, True)


def test_opt_round_trip(opt, llama_cpp_cases):
    for text, _ in llama_cpp_cases:
        assert opt.decode(opt.encode(text)) == text


def test_opt_ids_are_gpt2_ids_renumbered_by_fairseq_dict(opt, gpt2_json, shared_data, wiki_lines):
    # OPT id = 4 + (line of the GPT-2 id in fairseq's dict.txt): an independent route to OPT's ids.
    lines = (shared_data / "opt" / "dict.txt").read_text(encoding="utf-8").splitlines()
    words = [line.split()[0] for line in lines]  # "<gpt2 id> <count>"; the last 3 are madeupwords
    gpt2_to_opt = {int(word): 4 + i for i, word in enumerate(words) if word.isdigit()}
    for line in wiki_lines:
        assert opt.encode(line) == [2] + [gpt2_to_opt[i] for i in gpt2_json.encode(line)], line


def test_opt_matches_transformers_on_wikitext(opt, shared_data, wiki_lines):
    # facebook/opt-*'s tokenizer_config.json: GPT2Tokenizer with these tokens and add_bos_token.
    hf = hf_tokenizer(shared_data / "opt", bos_token="</s>", eos_token="</s>", unk_token="</s>",
                      pad_token="<pad>", add_bos_token=True)
    for text in [*wiki_lines[:100], "<s> hi </s><pad><mask>"]:
        assert opt.encode(text) == hf(text)["input_ids"], text


def test_opt_tokenizer_config_can_turn_bos_off(shared_data, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(shared_data / "opt" / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": False, "bos_token": {"content": "</s>", "special": True},
         "pad_token": "<pad>"}))
    tok = load_tokenizer(tmp_path, "opt")
    assert tok.add_bos is False
    assert tok.encode("A photo of a cat") == [250, 1345, 9, 10, 4758]


# ------------------------------------------------------------------ errors


def test_missing_files_name_the_folder_and_files(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")  # merges.txt missing
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(tmp_path, "gpt2")
    message = str(e.value)
    assert str(tmp_path) in message
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert name in message


def test_unknown_model_type(tmp_path):
    with pytest.raises(ConfigError, match="gptj"):
        load_tokenizer(tmp_path, "gptj")


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path, "gpt2")


def test_wrong_model_type_for_the_vocabulary(gpt2_files_dir):
    # GPT-2's vocabulary has no </s>: loading it as OPT must say so, not give wrong ids.
    with pytest.raises(CheckpointError, match="</s>"):
        load_tokenizer(gpt2_files_dir, "opt")
