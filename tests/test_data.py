"""minisq.eval.data against the real WikiText-2 and LAMBADA files, and its error paths offline.

Every test that could reach the Hugging Face Hub sets HF_HUB_OFFLINE=1 and an empty HF_HOME
(fixture ``offline_hub``), or replaces ``hf_hub_download`` with a fake: none touches the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
import zipfile

import pytest

from minisq import data
from minisq.errors import ConfigError, DataError, InputError


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty HF cache: a download attempt fails at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf-home"


@pytest.fixture
def empty_dir(tmp_path):
    folder = tmp_path / "empty-data"
    folder.mkdir()
    return folder


# ------------------------------------------------------------------ data_dir


def test_data_dir_order(monkeypatch, tmp_path, empty_dir):
    monkeypatch.delenv("MINISQ_DATA_DIR", raising=False)
    assert data.data_dir() is None
    monkeypatch.setenv("MINISQ_DATA_DIR", str(tmp_path))
    assert data.data_dir() == tmp_path
    assert data.data_dir(empty_dir) == empty_dir  # the argument wins over the variable


def test_missing_data_dir_is_a_clear_error(monkeypatch, tmp_path):
    with pytest.raises(DataError, match="does-not-exist.*data_dir argument"):
        data.wikitext2(data_dir=tmp_path / "does-not-exist")
    monkeypatch.setenv("MINISQ_DATA_DIR", str(tmp_path / "nor-this"))
    with pytest.raises(DataError, match=r"nor-this.*\$MINISQ_DATA_DIR"):
        data.lambada()


# ------------------------------------------------------------------ WikiText-2


def test_wikitext2_rows_are_the_lines_of_the_file(shared_data):
    raw = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_bytes().decode("utf-8")
    rows = data.wikitext2_rows("test", shared_data)
    assert raw.count("\n") == len(rows) == 4358
    assert sum(1 for r in rows if r) == 2891
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]


def test_wikitext2_rows_match_hf_datasets_rows(shared_data):
    # source-tyloquant-wiki.test.raw is "".join(rows) of HF's Salesforce/wikitext test split,
    # written out with CRLF line ends: an independent copy of what `datasets` returns.
    hf_file = shared_data / "wikitext-2-raw" / "source-tyloquant-wiki.test.raw"
    hf_joined = hf_file.read_bytes().decode("utf-8")
    assert "".join(data.wikitext2_rows("test", shared_data)) == hf_joined.replace("\r\n", "\n")


def test_wikitext2_eval_string(shared_data, monkeypatch):
    pytest.importorskip("transformers")
    from transformers import GPT2Tokenizer

    from minisq.io.tokenizer import load_tokenizer

    monkeypatch.setenv("MINISQ_DATA_DIR", str(shared_data))
    text = data.wikitext2()  # the same as data.wikitext2("test", shared_data), through the variable
    assert text == "\n\n".join(data.wikitext2_rows("test", shared_data))
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    # Measured once with this code (len(text); len(load_tokenizer(gpt2).encode(text))).
    # 287644 is also the length transformers' GPT2Tokenizer gives, checked below; it is the
    # "287644 > 1024" warning familiar from GPT-2 WikiText-2 perplexity scripts.
    assert len(text) == 1_294_336
    ours = load_tokenizer(shared_data / "gpt2", "gpt2").encode(text)
    assert len(ours) == 287_644
    hf = GPT2Tokenizer.from_pretrained(str(shared_data / "gpt2"), local_files_only=True)
    assert hf(text, verbose=False)["input_ids"] == ours


def test_wikitext2_unknown_split(shared_data):
    with pytest.raises(ConfigError, match="dev"):
        data.wikitext2("dev", shared_data)


def test_wikitext2_absent_and_offline_says_what_to_do(offline_hub, empty_dir):
    with pytest.raises(DataError) as e:
        data.wikitext2("test", empty_dir)
    message = str(e.value)
    assert str(empty_dir / "wikitext-2-raw" / "wiki.test.raw") in message
    assert "HF_HUB_OFFLINE" in message
    assert data.WIKITEXT2_ZIP.url in message
    assert "MINISQ_DATA_DIR" in message


def test_no_data_dir_at_all_and_offline(offline_hub, monkeypatch):
    monkeypatch.delenv("MINISQ_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="no data folder.*HF_HUB_OFFLINE"):
        data.wikitext2()


def _fake_download(monkeypatch, path, calls):
    """Online mode, with hf_hub_download replaced by a stand-in that returns ``path``."""
    def fake_hf_hub_download(**kwargs):
        calls.append(kwargs)
        return str(path)

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


def test_wikitext2_from_the_hub_zip(shared_data, tmp_path, empty_dir, monkeypatch):
    # The online route, without a network: a stand-in for ggml-org/ci's wikitext-2-raw-v1.zip.
    archive = tmp_path / "wikitext-2-raw-v1.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(shared_data / "wikitext-2-raw" / "wiki.test.raw", "wikitext-2-raw/wiki.test.raw")
    calls = []
    _fake_download(monkeypatch, archive, calls)

    with pytest.raises(DataError, match="sha256"):  # our zip is not the published one
        data.wikitext2("test", empty_dir)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(data, "WIKITEXT2_ZIP", dataclasses.replace(data.WIKITEXT2_ZIP, sha256=digest))
    assert data.wikitext2("test", empty_dir) == data.wikitext2("test", shared_data)
    assert calls[-1]["repo_id"] == "ggml-org/ci" and calls[-1]["repo_type"] == "dataset"
    assert calls[-1]["filename"] == "wikitext-2-raw-v1.zip"
    assert calls[-1]["local_files_only"] is False


# ------------------------------------------------------------------ LAMBADA


def test_lambada(shared_data):
    passages = data.lambada(shared_data)
    assert len(passages) == 5153
    context, target = data.lambada_split(passages[0])
    assert target == "signs"
    assert context.endswith("his mouth curved in a confident grin, I don't care about")


def test_lambada_split_agrees_with_llm_foundry_copy(shared_data):
    # lambada_openai.jsonl holds the same passages already cut into context / continuation.
    path = shared_data / "lambada" / "lambada_openai.jsonl"
    cut = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    ours = [data.lambada_split(p) for p in data.lambada(shared_data)]
    assert ours == [(c["context"], c["continuation"]) for c in cut]


def test_lambada_split_needs_a_space():
    with pytest.raises(InputError):
        data.lambada_split("oneword")


def test_lambada_absent_and_offline(offline_hub, empty_dir):
    with pytest.raises(DataError) as e:
        data.lambada(empty_dir)
    assert str(empty_dir / "lambada" / "lambada_test.jsonl") in str(e.value)
    assert data.LAMBADA_JSONL.url in str(e.value)


def test_lambada_from_the_hub(shared_data, empty_dir, monkeypatch):
    calls = []
    _fake_download(monkeypatch, shared_data / "lambada" / "lambada_test.jsonl", calls)
    # The real file has exactly the pinned sha256, so this is the real check, not a stand-in.
    assert data.lambada(empty_dir) == data.lambada(shared_data)
    assert calls[0]["repo_id"] == "EleutherAI/lambada_openai"
    assert calls[0]["filename"] == "data/lambada_test.jsonl"


@pytest.mark.parametrize("bad_line, why", [
    ("{not json", "not valid JSON"),
    ('{"context": "no text field"}', '"text" string'),
    ('["a list"]', '"text" string'),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, bad_line, why):
    (tmp_path / "lambada").mkdir()
    path = tmp_path / "lambada" / "lambada_test.jsonl"
    path.write_text('{"text": "a b"}\n\n{"text": "c d"}\n' + bad_line + "\n")
    with pytest.raises(DataError, match="line 4") as e:
        data.lambada(tmp_path)
    assert str(path) in str(e.value) and why in str(e.value)


# ------------------------------------------------------------------ read_text


def test_read_text(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_bytes("héllo\r\nworld\n".encode("utf-8"))
    assert data.read_text(path) == "héllo\nworld\n"
    with pytest.raises(DataError, match="does not exist"):
        data.read_text(tmp_path / "nope.txt")
    path.write_bytes(b"caf\xe9")  # latin-1, not UTF-8
    with pytest.raises(DataError, match="not UTF-8.*byte 3"):
        data.read_text(path)


# ------------------------------------------------------------------ calibration


def test_calibration_falls_back_to_test_with_a_warning(shared_data, offline_hub):
    with pytest.warns(UserWarning, match="test.*split"):
        texts = data.calibration_texts(n=16, data_dir=shared_data, seed=0)
    assert len(texts) == 16 == len(set(texts))
    assert all(len(t) >= 200 and not t.startswith("=") for t in texts)
    paragraphs = {r.strip() for r in data.wikitext2_rows("test", shared_data)}
    assert set(texts) <= paragraphs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert data.calibration_texts(n=16, data_dir=shared_data, seed=0) == texts
        assert data.calibration_texts(n=16, data_dir=shared_data, seed=1) != texts


def test_calibration_prefers_train(tmp_path):
    (tmp_path / "wikitext-2-raw").mkdir()
    paragraph = " " + "word " * 60 + "\n"
    (tmp_path / "wikitext-2-raw" / "wiki.train.raw").write_text(" \n = Title = \n \n" + paragraph * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no leak warning when train is there
        assert data.calibration_texts(n=3, data_dir=tmp_path) == [paragraph.strip()] * 3


def test_calibration_bad_arguments(shared_data, offline_hub):
    with pytest.raises(ConfigError, match="pile"):
        data.calibration_texts("pile", data_dir=shared_data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="between 1 and"):
            data.calibration_texts(n=100_000, data_dir=shared_data)
