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

import collections
import io
import json
import math
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

from .errors import CheckpointError, UnsafePickleError

# The weight files of a model folder, in the order they are tried.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# Element types read: name -> NumPy dtype of the bytes on disk (little-endian).
# bfloat16 has no NumPy dtype: its bits are read as uint16 and widened by bf16_to_float32.
# bool is read as uint8 and compared with 0, so a stray byte value cannot make a strange bool.
STORED_DTYPES = {
    "f8": "<f8", "f4": "<f4", "f2": "<f2", "bf16": "<u2",
    "i8": "<i8", "i4": "<i4", "i2": "<i2", "i1": "i1", "u1": "u1", "bool": "u1",
}
SAFETENSORS_DTYPES = {
    "F64": "f8", "F32": "f4", "F16": "f2", "BF16": "bf16",
    "I64": "i8", "I32": "i4", "I16": "i2", "I8": "i1", "U8": "u1", "BOOL": "bool",
}
# torch storage class (as named in a pickle) -> element type. UntypedStorage holds bytes.
TORCH_STORAGES = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "BFloat16Storage": "bf16",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "bool", "UntypedStorage": "u1",
}

_CORRUPT = "the file looks truncated or corrupt: re-download it"


# --------------------------------------------------------------------------- element types

def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> the same numbers as float32, exactly.

    bfloat16 is the top half of a float32 (1 sign, 8 exponent, 7 mantissa bits), so
    shifting its 16 bits into the high half of a 32-bit word is the value, with no rounding.
    # [...] uint16 -> [...] float32
    """
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 (round half to even), as its 16 bits.

    Adds half of the dropped low 16 bits' range, plus 1 when the kept part is odd (ties to
    even), then keeps the top half. For finite inputs only (the loader checks).
    # [...] float32 -> [...] uint16
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def decode(stored: np.ndarray, elem: str) -> np.ndarray:
    """Elements as stored -> the array handed out (native byte order; bf16 -> f32; u1 -> bool).

    # [...] STORED_DTYPES[elem] -> [...] float32 | float16 | float64 | int* | uint8 | bool
    """
    if elem == "bf16":
        return bf16_to_float32(stored)
    if elem == "bool":
        return stored != 0
    native = np.dtype(stored.dtype.type)  # the same type in this machine's byte order
    return stored.view(native) if stored.dtype.isnative else stored.astype(native)


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
    try:
        index = json.loads(index_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:  # ValueError covers JSON and UTF-8 errors
        raise CheckpointError(f"{index_path} is not readable JSON ({e}); {_CORRUPT}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(
            f"{index_path} has no 'weight_map' of tensor names to shard files; {_CORRUPT}")
    return weight_map


def _shard_path(index_path: Path, shard: str) -> Path:
    """The shard file beside the index; a name that leaves the folder is refused."""
    if Path(shard).name != shard or shard in ("", ".", ".."):
        raise CheckpointError(
            f"{index_path} names the shard {shard!r}, which is not a file in the same folder; "
            f"{_CORRUPT}")
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
                mm = np.memmap(path, dtype=np.uint8, mode="r") if file_size > data_start else None
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
        raise CheckpointError(f"{path}: {type(e).__name__}: {e}; {_CORRUPT}") from e


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
                f"{path}: tensors {n0!r} [{b0}, {e0}) and {n1!r} [{b1}, {e1}) overlap in the file; {_CORRUPT}")


def _safetensors_header(f, file_size: int, path: Path) -> tuple[dict, int]:
    """The parsed JSON header and where the data part starts (8 + N)."""
    if file_size < 8:
        raise CheckpointError(
            f"{path} is {file_size} bytes, shorter than the 8-byte header length; {_CORRUPT}")
    n = int.from_bytes(f.read(8), "little")
    if n > file_size - 8:
        raise CheckpointError(
            f"{path} says its header is {n} bytes but only {file_size - 8} follow; {_CORRUPT}")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: the header is not UTF-8 JSON ({e}); {_CORRUPT}") from e
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: the header is a JSON {type(header).__name__}, not an object; {_CORRUPT}")
    return header, 8 + n


def _tensor_spec(path: Path, name: str, entry, data_size: int) -> tuple[str, tuple, int, int]:
    """One header entry checked against the data part -> (element type, shape, begin, end)."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r}: {what}; {_CORRUPT}")

    if not isinstance(entry, dict):
        raise bad(f"header entry is {entry!r:.60}, not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise bad(f"unknown dtype {dtype!r:.30} (minisq reads {', '.join(SAFETENSORS_DTYPES)})")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise bad(f"shape {shape!r:.60} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
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
        raise CheckpointError(f"{path}: tensor {name!r}: the file ended early; {_CORRUPT}")
    return buf.view(STORED_DTYPES[elem]).reshape(shape)


def _is_count(x) -> bool:
    """A non-negative int (JSON's true/false are not counts, though Python calls them ints)."""
    return type(x) is int and x >= 0


# --------------------------------------------------------------------------- pytorch_model.bin

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
    if not (_is_count(storage_offset) and len(size) == len(stride)
            and all(_is_count(n) for n in size) and all(_is_count(s) for s in stride)):
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
        if not (isinstance(kind, _StorageType) and isinstance(key, str) and _is_count(numel)):
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
        raise CheckpointError(f"{path}: {type(e).__name__}: {e}; {_CORRUPT}") from e


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
    raise CheckpointError(f"{path} is not a torch.save zip; {_CORRUPT}")


def _unpickle_torch_zip(zf: zipfile.ZipFile, path: Path, lazy: bool = False):
    """Unpickle <prefix>/data.pkl, fetching <prefix>/data/<key> records as storages
    (``lazy``: as memory-mapped views of the zip file, which needs uncompressed records)."""
    pkl_names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pkl_names:
        raise CheckpointError(f"{path} is a zip without a <prefix>/data.pkl record; {_CORRUPT}")
    prefix = pkl_names[0][: -len("/data.pkl")]
    names = set(zf.namelist())
    has_byteorder = f"{prefix}/byteorder" in names  # absent in files of older torch: little
    byteorder = zf.read(f"{prefix}/byteorder").decode() if has_byteorder else "little"
    if byteorder not in ("little", "big"):
        raise CheckpointError(f"{path}: unknown byteorder record {byteorder!r:.20}; {_CORRUPT}")

    def read_record(key: str, elem: str, numel: int) -> np.ndarray:  # -> [numel] stored dtype
        name = f"{prefix}/data/{key}"
        if name not in names:
            raise CheckpointError(f"{path} has no storage record {name}; {_CORRUPT}")
        dtype = np.dtype(STORED_DTYPES[elem]).newbyteorder("<" if byteorder == "little" else ">")
        if zf.getinfo(name).file_size != numel * dtype.itemsize:  # checked before reading
            raise CheckpointError(
                f"{path}: storage record {name} is {zf.getinfo(name).file_size} bytes, not "
                f"{numel} elements of {dtype.itemsize} bytes; {_CORRUPT}")
        if lazy:
            return _mapped_record(zf, path, name, dtype, numel)
        return np.frombuffer(zf.read(name), dtype=dtype)

    return _TensorUnpickler(zf.read(pkl_names[0]), path, read_record).load()


def _mapped_record(zf: zipfile.ZipFile, path: Path, name: str, dtype: np.dtype, numel: int) -> np.ndarray:
    """A zip record's bytes as a read-only memory-mapped array (records must be stored, not
    compressed). Where the bytes start is read from the record's local header.  # -> [numel]"""
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(
            f"{path}: record {name} is compressed, so it cannot be memory-mapped: load without lazy=True, "
            "or convert the checkpoint to safetensors (e.g. in transformers: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder))")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{path}: bad local header for {name}; {_CORRUPT}")
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        file_size = os.fstat(f.fileno()).st_size
    nbytes = numel * dtype.itemsize
    if start + nbytes > file_size:
        raise CheckpointError(f"{path}: record {name} runs past the end of the file; {_CORRUPT}")
    if nbytes == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=start, shape=(numel,))
