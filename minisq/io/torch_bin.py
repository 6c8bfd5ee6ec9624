"""Read ``pytorch_model.bin`` (a ``torch.save`` zip) without torch and without running its pickle.

``torch.save`` writes a zip holding ``<prefix>/data.pkl`` (a pickle of the state dict), one
``<prefix>/data/<key>`` record of raw bytes per storage, and ``<prefix>/byteorder``. Unpickling
is code execution, so the pickle is read by an unpickler whose ``find_class`` knows only the
names that rebuild a tensor, each mapped to a NumPy stand-in defined here; any other name
raises :class:`~minisq.errors.UnsafePickleError` before anything is called.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, UnsafePickleError
from .mapped import map_file
from .dtypes import CORRUPT, STORED_DTYPES, TORCH_STORAGES, decode, is_count


# data.pkl holds only names, shapes and storage keys (about 200 bytes a tensor): 16 MB is
# 80,000 tensors. No real record compresses better than MAX_DEFLATE_RATIO : 1.
MAX_PICKLE_BYTES = 16 * 2 ** 20
MAX_DEFLATE_RATIO = 100
CONVERT = ("Re-save it as torch does (torch.save(torch.load(f, weights_only=True), f)), or convert it to "
           "safetensors (e.g. in transformers: AutoModelForCausalLM.from_pretrained(folder)"
           ".save_pretrained(new_folder))")


class _StandIn:
    """Base of every object the restricted unpickler hands to a pickle.

    Pickle's BUILD opcode sets attributes through ``__setstate__``; refusing it means a
    pickle cannot rewire a stand-in (no tensor pickle ever needs it).
    """

    __slots__ = ()

    def __setstate__(self, state):
        raise ValueError(f"the pickle tried to set the state of {self!r}, which tensors never need")


class _StorageType(_StandIn):
    """Stand-in for a torch storage class such as ``torch.FloatStorage``: its element type."""

    __slots__ = ("name", "elem")

    def __init__(self, name: str, elem: str):
        self.name, self.elem = name, elem

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Storage(_StandIn):
    """Stand-in for one torch storage: the flat elements of one ``data/<key>`` record."""

    __slots__ = ("kind", "elements")

    def __init__(self, kind: _StorageType, elements: np.ndarray):
        self.kind, self.elements = kind, elements  # elements: [numel] STORED_DTYPES[kind.elem]

    def __repr__(self) -> str:
        return f"<{self.kind!r} of {self.elements.size} elements>"


class _Function(_StandIn):
    """Stand-in for an allowed torch/collections callable: calls a NumPy version of it."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self) -> str:
        return self.name


def rebuild_tensor(storage: _Storage, storage_offset: int, size, stride) -> np.ndarray:
    """NumPy version of torch._utils._rebuild_tensor: a copy of a strided view of a storage.

    Element [i0, i1, ...] of the tensor is ``storage[storage_offset + sum(i_k * stride_k)]``
    (strides count elements, not bytes). Every index is checked to lie inside the storage
    before the view is made, so a hostile size or stride cannot read outside it.
    # storage [numel] -> [*size]
    """
    if not isinstance(storage, _Storage):
        raise ValueError(f"a tensor's storage is {storage!r:.60}, not a data/ record")
    size, stride = tuple(size), tuple(stride)
    if not (is_count(storage_offset) and len(size) == len(stride)
            and all(is_count(n) for n in size) and all(is_count(s) for s in stride)):
        raise ValueError(f"bad tensor layout: offset {storage_offset!r:.30}, "
                         f"size {size!r:.60}, stride {stride!r:.60}")
    elements = storage.elements
    if 0 not in size:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= elements.size:
            raise ValueError(
                f"a tensor of size {size}, stride {stride} at offset {storage_offset} reaches "
                f"element {last} of a storage of {elements.size}")
        # a stride of 0 (or strides that revisit elements) would let a tiny storage claim a
        # huge tensor: a checkpoint tensor never has more elements than its storage
        if math.prod(size) > elements.size - storage_offset or any(s == 0 for n, s in zip(size, stride) if n > 1):
            raise ValueError(
                f"a tensor of size {size}, stride {stride} at offset {storage_offset} has more "
                f"elements than its storage of {elements.size} (a zero or repeating stride)")
    # A dimension of length <= 1 never steps, so its stride is irrelevant: 0 avoids overflow.
    byte_strides = [s * elements.itemsize if n > 1 else 0 for n, s in zip(size, stride)]
    view = np.lib.stride_tricks.as_strided(
        elements[storage_offset:], shape=size, strides=byte_strides, writeable=False)
    return RebuiltTensor(storage.kind.elem, view)


class RebuiltTensor(_StandIn):
    """A tensor rebuilt from a pickle: its element type and a strided view of its storage
    (a memory-mapped file region when read lazily). :func:`read_pytorch_bin` copies and
    decodes it, or hands it out as stored."""

    __slots__ = ("elem", "view")

    def __init__(self, elem: str, view: np.ndarray):
        self.elem, self.view = elem, view  # view: [*size] STORED_DTYPES[elem]

    def __repr__(self) -> str:
        return f"<tensor {self.elem} {list(self.view.shape)}>"


def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                      metadata=None):
    """NumPy version of torch._utils._rebuild_tensor_v2; autograd arguments are ignored."""
    return rebuild_tensor(storage, storage_offset, size, stride)


def rebuild_parameter(data, requires_grad, backward_hooks):
    """NumPy version of torch._utils._rebuild_parameter: an nn.Parameter is its data."""
    if not isinstance(data, RebuiltTensor):
        raise ValueError(f"a parameter's data is {data!r:.60}, not a tensor")
    return data


# (module, name) a pickle may ask for -> the stand-in it gets. Nothing else is reachable.
ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"):
        _Function("torch._utils._rebuild_tensor_v2", rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor"):
        _Function("torch._utils._rebuild_tensor", rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"):
        _Function("torch._utils._rebuild_parameter", rebuild_parameter),
    ("collections", "OrderedDict"): _Function("collections.OrderedDict", collections.OrderedDict),
    **{("torch", name): _StorageType(name, elem) for name, elem in TORCH_STORAGES.items()},
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", "u1"),
}


class _TensorUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild tensors and nothing else.

    ``find_class`` answers only ALLOWED_GLOBALS; ``persistent_load`` answers a storage
    reference ``('storage', storage class, key, location, numel)`` with that zip record.
    """

    def __init__(self, data: bytes, path: Path, read_record):
        super().__init__(io.BytesIO(data))
        self.path, self.read_record = path, read_record
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        stand_in = ALLOWED_GLOBALS.get((module, name))
        if stand_in is not None:
            return stand_in
        if module == "torch" and name.endswith("Storage"):  # e.g. a float8 or complex storage
            raise CheckpointError(
                f"{self.path} holds torch.{name} tensors, which minisq does not read (it reads "
                f"{', '.join(TORCH_STORAGES)}); re-save the checkpoint in float32, float16 "
                "or bfloat16")
        raise UnsafePickleError(
            f"{self.path}: the pickle asked for the global {module}.{name}, which is not needed to "
            "rebuild tensors; it was refused and nothing was executed. Only torch's tensor "
            "rebuilders, storage classes and collections.OrderedDict are allowed. Loading this "
            "file with torch.load(weights_only=False) would call it: do not, unless you trust "
            "its source, and prefer the repo's .safetensors weights")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ValueError(f"unknown persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid  # location ('cpu', 'cuda:0') does not matter here
        if not (isinstance(kind, _StorageType) and isinstance(key, str) and is_count(numel)):
            raise ValueError(f"malformed storage reference {pid!r:.80}")
        if key not in self.storages:
            self.storages[key] = _Storage(kind, self.read_record(key, kind.elem, numel))
        storage = self.storages[key]
        if storage.kind.elem != kind.elem or storage.elements.size != numel:
            raise ValueError(
                f"storage {key} is referenced as both {storage!r} and {kind!r} of {numel}")
        return storage


def read_pytorch_bin(path: Path | str, raw: bool = False, lazy: bool = False) -> dict:
    """The tensors of a torch.save zip (pytorch_model.bin), read without torch or code execution
    (``raw``/``lazy``: see :func:`read_state_dict`)."""
    path = Path(path)
    raw = raw or lazy
    try:
        with _open_torch_zip(path) as zf:
            state = _unpickle_torch_zip(zf, path, lazy)
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{path} holds a pickled {type(state).__name__}, not a state dict of tensors")
        # Non-tensor entries (rare: _extra_state objects) are left out; tensors keep their names.
        out = {}
        for k, v in state.items():
            if isinstance(k, str) and isinstance(v, RebuiltTensor):
                if lazy:
                    out[k] = (v.elem, v.view)
                else:
                    stored = np.array(v.view, order="C")  # a copy, in C order
                    out[k] = (v.elem, stored) if raw else decode(stored, v.elem)
        return out
    except CheckpointError:  # includes UnsafePickleError; both already name the file
        raise
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    except Exception as e:  # the promise: a bad file gives CheckpointError, nothing else
        raise CheckpointError(f"{path}: {type(e).__name__}: {e}; {CORRUPT}") from e


def _open_torch_zip(path: Path) -> zipfile.ZipFile:
    """The zip inside a torch.save file; pre-zip (legacy) formats get their own message."""
    with open(path, "rb") as f:
        head = f.read(512)
    if zipfile.is_zipfile(path):
        return zipfile.ZipFile(path)
    if head.startswith(b"\x80") or head[257:262] == b"ustar":  # a bare pickle, or the tar format
        raise CheckpointError(
            f"{path} is in torch's legacy (pre-1.6, non-zip) format, which minisq does not read: "
            "re-save it with a recent torch (torch.save(torch.load(f), f)) or use safetensors")
    raise CheckpointError(f"{path} is not a torch.save zip; {CORRUPT}")


def _unpickle_torch_zip(zf: zipfile.ZipFile, path: Path, lazy: bool = False):
    """Unpickle <prefix>/data.pkl, fetching <prefix>/data/<key> records as storages
    (``lazy``: as memory-mapped views of the zip file, which needs uncompressed records)."""
    pkl_names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pkl_names:
        raise CheckpointError(f"{path} is a zip without a <prefix>/data.pkl record; {CORRUPT}")
    prefix = pkl_names[0][: -len("/data.pkl")]
    names = set(zf.namelist())
    has_byteorder = f"{prefix}/byteorder" in names  # absent in files of older torch: little
    byteorder = _read_small(zf, path, f"{prefix}/byteorder", 16).decode() if has_byteorder else "little"
    if byteorder not in ("little", "big"):
        raise CheckpointError(f"{path}: unknown byteorder record {byteorder!r:.20}; {CORRUPT}")

    def read_record(key: str, elem: str, numel: int) -> np.ndarray:  # -> [numel] stored dtype
        name = f"{prefix}/data/{key}"
        if name not in names:
            raise CheckpointError(f"{path} has no storage record {name}; {CORRUPT}")
        dtype = np.dtype(STORED_DTYPES[elem]).newbyteorder("<" if byteorder == "little" else ">")
        info = zf.getinfo(name)
        if info.compress_type != zipfile.ZIP_STORED:   # a few KB of deflate can claim gigabytes
            raise CheckpointError(
                f"{path}: storage record {name} is compressed; torch.save writes its records "
                f"uncompressed, and minisq reads only those. {CONVERT}")
        if info.file_size != numel * dtype.itemsize or info.compress_size != info.file_size:  # before reading
            raise CheckpointError(
                f"{path}: storage record {name} is {info.file_size} bytes, not "
                f"{numel} elements of {dtype.itemsize} bytes; {CORRUPT}")
        if lazy:
            return _mapped_record(zf, path, name, dtype, numel)
        return np.frombuffer(zf.read(name), dtype=dtype)

    return _TensorUnpickler(_read_small(zf, path, pkl_names[0], MAX_PICKLE_BYTES), path, read_record).load()


def _read_small(zf: zipfile.ZipFile, path: Path, name: str, limit: int) -> bytes:
    """A zip record that must be small (data.pkl, byteorder): its size and compression ratio are
    checked from the zip's directory before it is read, and no more than ``limit`` bytes are
    ever decompressed, whatever the directory claims."""
    info = zf.getinfo(name)
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > limit or ratio > MAX_DEFLATE_RATIO:
        raise CheckpointError(
            f"{path}: record {name} unpacks to {info.file_size} bytes from {info.compress_size} "
            f"(a pickle of tensor names and shapes needs at most {limit} bytes, and compresses at most "
            f"{MAX_DEFLATE_RATIO}:1); {CORRUPT}")
    with zf.open(info) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{path}: record {name} unpacks to more than {limit} bytes; {CORRUPT}")
    return data


def _mapped_record(zf: zipfile.ZipFile, path: Path, name: str, dtype: np.dtype, numel: int) -> np.ndarray:
    """A zip record's bytes as a read-only memory-mapped array (records must be stored, not
    compressed). Where the bytes start is read from the record's local header.  # -> [numel]"""
    info = zf.getinfo(name)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{path}: bad local header for {name}; {CORRUPT}")
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        file_size = os.fstat(f.fileno()).st_size
        nbytes = numel * dtype.itemsize
        if start + nbytes > file_size:
            raise CheckpointError(f"{path}: record {name} runs past the end of the file; {CORRUPT}")
        if nbytes == 0:
            return np.zeros(0, dtype=dtype)
        return map_file(f, dtype, start, (numel,))
