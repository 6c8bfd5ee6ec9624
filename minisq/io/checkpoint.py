"""Read a Hugging Face checkpoint's weights into NumPy arrays, without torch.

A model folder keeps its weights in one of four layouts, tried in this order:

    model.safetensors                  one safetensors file
    model.safetensors.index.json       {"weight_map": {tensor name: shard file}} + the shards
    pytorch_model.bin                  one torch.save zip
    pytorch_model.bin.index.json       the same index, pointing at .bin shards

**safetensors** is a plain layout, parsed here directly::

    [8 bytes]  N, the header length, unsigned little-endian
    [N bytes]  UTF-8 JSON: {name: {"dtype": "F32", "shape": [768, 2304],
                                   "data_offsets": [begin, end]}, "__metadata__": {...}}
    [rest]     the raw little-endian tensor bytes; offsets count from the start of this part

Every number in the header is checked against the file before a byte is read, so a
truncated or damaged download gives a :class:`CheckpointError`, never a wrong array.

**pytorch_model.bin** is still the only format of many OPT repos. ``torch.save`` writes a
zip holding ``<prefix>/data.pkl`` (a pickle of the state dict), one ``<prefix>/data/<key>``
record of raw bytes per storage, and ``<prefix>/byteorder``. Unpickling is code execution:
a pickle may name any importable function (``os.system``, ``builtins.eval``) and call it.
So the pickle is read by an unpickler whose ``find_class`` knows only the handful of names
that rebuild a tensor, each mapped to a NumPy stand-in defined here; any other name raises
:class:`UnsafePickleError` before anything is called. torch is never imported.

Arrays come back in NumPy's own dtypes: float32/float16/float64 and integer tensors as
stored, bool as bool, and bfloat16 (which NumPy lacks) widened to float32 exactly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .dtypes import (  # noqa: F401  (bf16 helpers and decode: public here)
    CORRUPT, SAFETENSORS_DTYPES, STORED_DTYPES, bf16_to_float32, decode, float32_to_bf16, is_count,
)
from .mapped import map_file
from .jsonfile import MAX_JSON_BYTES, parse_json, read_json
from .torch_bin import read_pytorch_bin

# The weight files of a model folder, in the order they are tried.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# --------------------------------------------------------------------------- folders

def read_state_dict(folder: Path | str, raw: bool = False, lazy: bool = False) -> dict:
    """All tensors of a model folder, by checkpoint name, from the first layout in WEIGHT_FILES.

    By default each is a decoded NumPy array (bfloat16 widened to float32). ``raw=True``
    gives ``(element type, stored array)`` pairs instead (bfloat16 as its uint16 bits), and
    ``lazy=True`` (implies raw) makes the stored arrays read-only memory-mapped views of the
    files: nothing is read until an array is used, and the bytes are page cache, not the
    program's memory. A lazily read ``.bin`` must hold its tensors uncompressed (as
    ``torch.save`` writes them); otherwise convert it to safetensors.
    """
    folder = Path(folder)
    raw = raw or lazy
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise CheckpointError(
            f"{folder} {what}: pass the model folder that holds config.json and the weights")
    def st(p):
        return read_safetensors(p, raw=raw, lazy=lazy)

    def pt(p):
        return read_pytorch_bin(p, raw=raw, lazy=lazy)

    readers = {
        "model.safetensors": st,
        "model.safetensors.index.json": lambda p: read_sharded(p, st),
        "pytorch_model.bin": pt,
        "pytorch_model.bin.index.json": lambda p: read_sharded(p, pt),
    }
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return readers[name](folder / name)
    raise CheckpointError(
        f"no weights in {folder}: looked for {', '.join(WEIGHT_FILES)}. Put the checkpoint's "
        "weight files beside its config.json (e.g. `hf download gpt2 --local-dir gpt2`, or "
        "model.save_pretrained(folder) in transformers)")


def read_sharded(index_path: Path | str, read_shard) -> dict[str, np.ndarray]:
    """Tensors of a sharded checkpoint: read each shard named in the index's weight_map once.

    Every tensor the index lists must be in the shard it names; a missing one means an
    interrupted download, which is better caught here than as a missing weight later.
    """
    index_path = Path(index_path)
    weight_map = _read_weight_map(index_path)
    shard_names = sorted(set(weight_map.values()))
    shards = {name: read_shard(_shard_path(index_path, name)) for name in shard_names}
    tensors = {k: v for shard in shards.values() for k, v in shard.items()}
    for tensor, shard in weight_map.items():
        if tensor not in shards[shard]:
            raise CheckpointError(
                f"{index_path} lists {tensor!r} in {shard}, but that shard does not hold it; "
                "the download looks incomplete: re-download the shards")
        tensors[tensor] = shards[shard][tensor]
    return tensors


def _read_weight_map(index_path: Path) -> dict[str, str]:
    """The {tensor name: shard file name} map of a *.index.json file, checked."""
    index = read_json(index_path, what=CORRUPT)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(
            f"{index_path} has no 'weight_map' of tensor names to shard files; {CORRUPT}")
    return weight_map


def _shard_path(index_path: Path, shard: str) -> Path:
    """The shard file beside the index; a name that leaves the folder is refused."""
    if Path(shard).name != shard or shard in ("", ".", ".."):
        raise CheckpointError(
            f"{index_path} names the shard {shard!r}, which is not a file in the same folder; "
            f"{CORRUPT}")
    path = index_path.parent / shard
    if not path.is_file():
        raise CheckpointError(
            f"{index_path} needs the shard {shard}, which is missing from {index_path.parent}; "
            "the download looks incomplete: download all the shards")
    return path


# --------------------------------------------------------------------------- safetensors

def read_safetensors(path: Path | str, raw: bool = False, lazy: bool = False) -> dict:
    """All tensors of one .safetensors file; each array is its own fresh, writable buffer
    (``raw``/``lazy``: see :func:`read_state_dict`; lazy arrays are read-only file views).

    The whole header is checked before anything is read or allocated: every tensor's bytes
    lie inside the file, match its shape and dtype, and overlap no other tensor's, so
    memory stays bounded by the file's size whatever a hostile header claims.
    """
    path = Path(path)
    raw = raw or lazy
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            header, data_start = _safetensors_header(f, file_size, path)
            data_size = file_size - data_start
            specs = {name: _tensor_spec(path, name, entry, data_size)
                     for name, entry in header.items() if name != "__metadata__"}
            _check_disjoint(path, specs)
            if lazy:
                mm = map_file(f, np.uint8, 0, (file_size,)) if file_size > data_start else None
                return {name: (elem, _mapped(mm, data_start, elem, shape, begin, end))
                        for name, (elem, shape, begin, end) in specs.items()}
            out = {}
            for name, spec in specs.items():
                stored = _read_tensor(f, path, name, data_start, *spec)
                out[name] = (spec[0], stored) if raw else decode(stored, spec[0])
            return out
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    except Exception as e:  # the promise: a bad file gives CheckpointError, nothing else
        raise CheckpointError(f"{path}: {type(e).__name__}: {e}; {CORRUPT}") from e


def read_safetensors_metadata(path: Path | str) -> dict:
    """The ``__metadata__`` of a .safetensors file ({} when it has none), from its header only."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header, _ = _safetensors_header(f, os.fstat(f.fileno()).st_size, path)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: __metadata__ must map names to strings; {CORRUPT}")
    return meta


def _mapped(mm, data_start: int, elem: str, shape: tuple, begin: int, end: int) -> np.ndarray:
    """A read-only view of one tensor's bytes in the memory-mapped file.  # -> [*shape] stored"""
    dtype = np.dtype(STORED_DTYPES[elem])
    if end == begin:
        return np.zeros(shape, dtype=dtype)
    return mm[data_start + begin: data_start + end].view(dtype).reshape(shape)


def _check_disjoint(path: Path, specs: dict) -> None:
    """No two tensors may share bytes (a hostile header could alias one region many times)."""
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in specs.items() if end > begin)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(
                f"{path}: tensors {n0!r} [{b0}, {e0}) and {n1!r} [{b1}, {e1}) overlap in the file; {CORRUPT}")


def _safetensors_header(f, file_size: int, path: Path) -> tuple[dict, int]:
    """The parsed JSON header and where the data part starts (8 + N)."""
    if file_size < 8:
        raise CheckpointError(
            f"{path} is {file_size} bytes, shorter than the 8-byte header length; {CORRUPT}")
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_JSON_BYTES:   # the reference library's cap, checked before anything is allocated
        raise CheckpointError(
            f"{path} says its header is {n} bytes, more than the {MAX_JSON_BYTES} a safetensors "
            f"header may have; {CORRUPT}")
    if n > file_size - 8:
        raise CheckpointError(
            f"{path} says its header is {n} bytes but only {file_size - 8} follow; {CORRUPT}")
    header = parse_json(f.read(n), f"{path}: the header", what=CORRUPT)   # a name given twice is refused
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: the header is a JSON {type(header).__name__}, not an object; {CORRUPT}")
    return header, 8 + n


def _tensor_spec(path: Path, name: str, entry, data_size: int) -> tuple[str, tuple, int, int]:
    """One header entry checked against the data part -> (element type, shape, begin, end)."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r}: {what}; {CORRUPT}")

    if not isinstance(entry, dict):
        raise bad(f"header entry is {entry!r:.60}, not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise bad(f"unknown dtype {dtype!r:.30} (minisq reads {', '.join(SAFETENSORS_DTYPES)})")
    if not (isinstance(shape, list) and all(is_count(d) for d in shape)):
        raise bad(f"shape {shape!r:.60} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)):
        raise bad(f"data_offsets {offsets!r:.60} is not [begin, end]")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise bad(f"data_offsets [{begin}, {end}] fall outside the {data_size} data bytes")
    elem = SAFETENSORS_DTYPES[dtype]
    nbytes = math.prod(shape) * np.dtype(STORED_DTYPES[elem]).itemsize
    if end - begin != nbytes:
        raise bad(f"shape {shape} of {dtype} needs {nbytes} bytes, data_offsets hold {end - begin}")
    return elem, tuple(shape), begin, end


def _read_tensor(f, path: Path, name: str, data_start: int,
                 elem: str, shape: tuple, begin: int, end: int) -> np.ndarray:
    """Read one tensor's bytes into a fresh buffer, as stored.  # -> [*shape] STORED_DTYPES[elem]"""
    buf = np.empty(end - begin, dtype=np.uint8)
    f.seek(data_start + begin)
    if f.readinto(buf) != buf.size:
        raise CheckpointError(f"{path}: tensor {name!r}: the file ended early; {CORRUPT}")
    return buf.view(STORED_DTYPES[elem]).reshape(shape)
