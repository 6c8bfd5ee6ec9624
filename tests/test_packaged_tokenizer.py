"""GPT-2's tokenizer files shipped as package data: the synthetic model decodes
text offline, with no data folder. Held against the hashes the files are documented with and
against llama.cpp's GPT-2 test vectors (independent of minisq)."""

import hashlib
import tomllib
from pathlib import Path

from minisq.io.tokenizer import PACKAGED_GPT2, packaged_gpt2_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHA256 = {  # openai-community/gpt2's published hashes, as in minisq/assets/gpt2/SOURCE.md
    "vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def test_the_shipped_files_are_gpt2s_and_named_as_package_data():
    for name, digest in SHA256.items():
        assert hashlib.sha256((PACKAGED_GPT2 / name).read_bytes()).hexdigest() == digest, name
    assert "Modified MIT License" in (PACKAGED_GPT2 / "LICENSE").read_text()
    assert "openai/gpt-2" in (PACKAGED_GPT2 / "SOURCE.md").read_text()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["minisq.io"]
    for name in ("vocab.json", "merges.txt", "LICENSE", "SOURCE.md"):
        assert f"assets/gpt2/{name}" in data


def test_the_packaged_tokenizer_matches_llama_cpps_gpt2_vectors(shared_data):
    tests = shared_data / "gpt2" / "tokenizer-tests"
    texts = (tests / "ggml-vocab-gpt-2.gguf.inp").read_bytes().decode("utf-8").split("\n__ggml_vocab_test__\n")
    ids = (tests / "ggml-vocab-gpt-2.gguf.out").read_bytes().decode("utf-8").split("\n")
    assert texts.pop() == "" and ids.pop() == "" and len(texts) == len(ids) == 46   # as tests/test_tokenizer.py
    tok = packaged_gpt2_tokenizer()
    for text, want in zip(texts, ids):
        assert tok.encode(text) == [int(i) for i in want.split()], text
    assert tok.decode(tok.encode("The capital of France is")) == "The capital of France is"
