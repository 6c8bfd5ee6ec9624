"""The text minisq evaluates and calibrates on: WikiText-2 (perplexity), LAMBADA (accuracy).

Where a file comes from, in order:

1. a data folder: the ``data_dir`` argument, else ``$MINISQ_DATA_DIR``, holding
   ``wikitext-2-raw/wiki.{test,train,valid}.raw`` and ``lambada/lambada_test.jsonl``;
2. the Hugging Face Hub, downloaded once into the HF cache, pinned to one commit and
   checked against its published sha256 (see :data:`WIKITEXT2_ZIP`, :data:`LAMBADA_JSONL`);
3. otherwise a :class:`DataError` that says what to download and where to put it.

Why these Hub files: ``Salesforce/wikitext`` (what ``datasets.load_dataset("wikitext")``
reads) stores parquet, and reading parquet needs pyarrow, which minisq does not depend on.
The ``ggml-org/ci`` dataset repo holds the original ``wikitext-2-raw-v1.zip`` (the one
llama.cpp's ``scripts/get-wikitext-2.sh`` fetches), which the standard library's ``zipfile``
reads; its ``wiki.test.raw`` is byte-identical to the canonical file. For LAMBADA,
``EleutherAI/lambada_openai`` keeps OpenAI's ``lambada_test.jsonl`` under ``data/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError, InputError


@dataclass(frozen=True)
class HubFile:
    """One file of a Hugging Face dataset repo, pinned to a commit and a sha256."""

    repo_id: str
    filename: str
    revision: str  # a commit, so that the bytes cannot change under us
    sha256: str

    @property
    def url(self) -> str:
        return f"https://huggingface.co/datasets/{self.repo_id}/resolve/{self.revision}/{self.filename}"


# The WikiText-2 raw archive (Merity et al. 2016; CC BY-SA 3.0), 4,721,645 bytes. Its sha256
# and the ggml-org/ci commit are pinned by several independent public projects. The same zip
# is served at https://wikitext.smerity.com/wikitext-2-raw-v1.zip.
WIKITEXT2_ZIP = HubFile(
    repo_id="ggml-org/ci",
    filename="wikitext-2-raw-v1.zip",
    revision="927b3642933080f1b0e811e2f916e14c292992f9",
    sha256="ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
)
# OpenAI's LAMBADA test set as used in the GPT-2 paper, 5153 passages. The sha256 is the one
# lm-evaluation-harness pins; the commit is the one lm-eval users pin for this repo. The path
# data/lambada_test.jsonl at that commit is attested by public download scripts but was not
# fetched from here (the Hub is unreachable while writing this): if it ever 404s, the
# DataError below still tells the user how to get the file by hand.
LAMBADA_JSONL = HubFile(
    repo_id="EleutherAI/lambada_openai",
    filename="data/lambada_test.jsonl",
    revision="900124bf3b8235c6daf21033af9948b3f07346c4",
    sha256="4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
)

# split name -> file name, inside the data folder and inside the zip.
WIKITEXT2_FILES = {
    "test": "wikitext-2-raw/wiki.test.raw",
    "train": "wikitext-2-raw/wiki.train.raw",
    "valid": "wikitext-2-raw/wiki.valid.raw",
    "validation": "wikitext-2-raw/wiki.valid.raw",
}
LAMBADA_FILE = "lambada/lambada_test.jsonl"


# ------------------------------------------------------------------ where files are


def data_dir(path=None) -> Path | None:
    """The data folder: ``path`` if given, else ``$MINISQ_DATA_DIR``, else None.

    A folder that is named but does not exist is an error, not a silent fallback.
    """
    if path is not None:
        where = "the data_dir argument"
    elif os.environ.get("MINISQ_DATA_DIR"):
        path, where = os.environ["MINISQ_DATA_DIR"], "$MINISQ_DATA_DIR"
    else:
        return None
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"data folder {folder} (from {where}) does not exist or is not a folder")
    return folder


_data_dir = data_dir  # the functions below take a ``data_dir`` argument that hides this name


def _local_file(relpath: str, data_dir) -> Path | None:
    """``<data folder>/relpath`` when both exist, else None."""
    folder = _data_dir(data_dir)
    if folder is not None and (folder / relpath).is_file():
        return folder / relpath
    return None


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE as set now (huggingface_hub reads them once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _hub_cache_dir() -> str | None:
    """HF_HUB_CACHE / HF_HOME as they are now, for the same reason; None means the default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _missing_message(what: str, relpath: str, data_dir, how_to_get: str) -> str:
    folder = _data_dir(data_dir)
    looked = (f"{folder / relpath}" if folder is not None
              else "no data folder (neither data_dir nor $MINISQ_DATA_DIR is set)")
    return (
        f"{what} not found. Looked in: {looked}. To fix it, {how_to_get}, so that "
        f"<folder>/{relpath} exists, and pass data_dir=<folder> (or --data-dir <folder>, "
        f"or set MINISQ_DATA_DIR=<folder>)."
    )


def _download(hub: HubFile, missing_message: str) -> Path:
    """``hub`` from the HF cache, downloading it once if allowed; checked against its sha256."""
    from huggingface_hub import hf_hub_download

    offline = _hub_offline()
    try:
        path = Path(hf_hub_download(
            repo_id=hub.repo_id, repo_type="dataset", filename=hub.filename,
            revision=hub.revision, cache_dir=_hub_cache_dir(), local_files_only=offline,
        ))
    except Exception as e:  # no network, 404, offline with an empty cache, ...: all mean "not here"
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        why = ("HF_HUB_OFFLINE is set and the HF cache has no copy" if offline
               else f"downloading it failed ({type(e).__name__}: {reason})")
        raise DataError(f"{missing_message} Tried the Hugging Face Hub: {why}.") from e
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != hub.sha256:
        raise DataError(f"{path} (from {hub.url}) has sha256 {digest}, expected {hub.sha256}; "
                        f"delete it and try again")
    return path


def _decode(raw: bytes, origin) -> str:
    """UTF-8 bytes -> str with universal newlines (\\r\\n and \\r become \\n), as ``open()`` reads."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{origin} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text(path) -> str:
    """The text of a user's own UTF-8 file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"text file {path} does not exist or is not a file")
    return _decode(path.read_bytes(), path)


# ------------------------------------------------------------------ WikiText-2


def _wikitext2_raw(split: str, data_dir) -> str:
    """The whole ``wiki.<split>.raw`` file as text."""
    if split not in WIKITEXT2_FILES:
        raise ConfigError(f"unknown WikiText-2 split {split!r}; "
                          f"expected one of {sorted(WIKITEXT2_FILES)}")
    relpath = WIKITEXT2_FILES[split]
    local = _local_file(relpath, data_dir)
    if local is not None:
        return _decode(local.read_bytes(), local)
    how_to_get = (f"download {WIKITEXT2_ZIP.url} "
                  f"(or https://wikitext.smerity.com/wikitext-2-raw-v1.zip) and unzip it into <folder>")
    zip_path = _download(WIKITEXT2_ZIP, _missing_message(f"WikiText-2 raw {split!r} split", relpath,
                                                         data_dir, how_to_get))
    with zipfile.ZipFile(zip_path) as archive:
        return _decode(archive.read(relpath), f"{zip_path}:{relpath}")


def wikitext2_rows(split: str = "test", data_dir=None) -> list[str]:
    """The rows HF ``datasets`` gives for ``wikitext-2-raw-v1``: one per line of the file.

    A line keeps its newline; a blank line (WikiText writes them as " ") becomes "". The
    test split has 4358 rows, 2891 of them non-empty.
    """
    lines = _wikitext2_raw(split, data_dir).split("\n")
    last = lines.pop()  # "" when the file ends with a newline, as every WikiText file does
    rows = [line + "\n" if line.strip() else "" for line in lines]
    if last:
        rows.append(last if last.strip() else "")
    return rows


def wikitext2(split: str = "test", data_dir=None) -> str:
    """The WikiText-2 evaluation string of SmoothQuant and GPTQ: ``"\\n\\n".join(rows)``.

    Both build it as ``"\\n\\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split=...)["text"])``
    and cut its tokens into windows; perplexities are comparable only on this exact string.
    """
    return "\n\n".join(wikitext2_rows(split, data_dir))


# ------------------------------------------------------------------ LAMBADA


def _read_jsonl_texts(path: Path) -> list[str]:
    """The "text" field of each line of a JSON-lines file; blank lines are skipped."""
    texts = []
    for number, line in enumerate(_decode(path.read_bytes(), path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{path}, line {number}: expected an object with a "text" string')
        texts.append(record["text"])
    return texts


def lambada(data_dir=None) -> list[str]:
    """OpenAI's LAMBADA test passages (5153), each ending in the word a model must predict."""
    local = _local_file(LAMBADA_FILE, data_dir)
    if local is None:
        local = _download(LAMBADA_JSONL, _missing_message(
            "LAMBADA (OpenAI's lambada_test.jsonl)", LAMBADA_FILE, data_dir,
            f"download {LAMBADA_JSONL.url} into <folder>/lambada/"))
    return _read_jsonl_texts(local)


def lambada_split(passage: str) -> tuple[str, str]:
    """``(context, target_word)`` = ``passage.rsplit(" ", 1)``.

    The model reads ``context`` and must produce the tokens of ``" " + target_word``.
    """
    if " " not in passage:
        raise InputError(f"a LAMBADA passage needs a space before its last word: {passage[:60]!r}")
    context, target = passage.rsplit(" ", 1)
    return context, target


# ------------------------------------------------------------------ calibration


def calibration_texts(source: str = "wikitext2", n: int = 128, data_dir=None, seed: int = 0,
                      min_chars: int = 200) -> list[str]:
    """``n`` paragraphs of real text, drawn at random (``seed``), to calibrate activation scales.

    SmoothQuant (Xiao et al. 2023, sec. 5.1) calibrates on 512 random sentences of the Pile
    validation set; the Pile is not freely redistributable any more, so minisq uses WikiText-2
    paragraphs (rows of at least ``min_chars`` characters that are not ``= Heading =`` lines).
    Any real English text gives similar activation maxima. The train split is used when it
    can be had; otherwise the test split, with a warning, because calibrating on the split
    that perplexity is measured on leaks it into the result.
    """
    if source != "wikitext2":
        raise ConfigError(f"unknown calibration source {source!r}; only 'wikitext2' is supported")
    try:
        rows = wikitext2_rows("train", data_dir)
    except DataError as e:
        warnings.warn(f"calibrating on the WikiText-2 *test* split, the one perplexity is measured on, "
                      f"because the train split is unavailable: {e}", stacklevel=2)
        rows = wikitext2_rows("test", data_dir)
    paragraphs = [row.strip() for row in rows
                  if len(row.strip()) >= min_chars and not row.strip().startswith("=")]
    if not 0 < n <= len(paragraphs):
        raise ConfigError(f"n={n} calibration texts asked for; "
                          f"between 1 and {len(paragraphs)} are available")
    picked = np.random.default_rng(seed).choice(len(paragraphs), size=n, replace=False)
    return [paragraphs[i] for i in picked]
