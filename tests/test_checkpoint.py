"""Tests of minisq.io.checkpoint (torch-free weight readers) and minisq.io.hub (finding a model folder).

Oracles: the torch tensors of the transformers model that wrote each checkpoint, files
written by torch.save and by the safetensors library, and torch.load(weights_only=True)
for the hand-assembled pickles below. transformers 5 always saves safetensors, so the
pytorch_model.bin layouts are written here with torch.save, as transformers 4 did.
Everything runs offline.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minisq.io.checkpoint import (
    WEIGHT_FILES, bf16_to_float32, read_pytorch_bin, read_safetensors, read_state_dict,
)
from minisq.errors import CheckpointError, UnsafePickleError
from minisq.io.hub import HUB_BIN_FILES, HUB_FILES, resolve_model_dir

LAYOUTS = ("safetensors", "sharded safetensors", "bin", "sharded bin")
# Buffers that old GPT-2 pytorch_model.bin files carry: a causal mask and a scalar.
GPT2_LEGACY_BUFFERS = {
    "transformer.h.0.attn.bias": torch.tril(torch.ones(64, 64, dtype=torch.uint8))[None, None],
    "transformer.h.0.attn.masked_bias": torch.tensor(-1e4),
}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- writers

def save_bin(state: dict, folder: Path, n_shards: int = 1) -> Path:
    """Write a state dict as transformers 4's save_pretrained(safe_serialization=False) did."""
    folder.mkdir(parents=True, exist_ok=True)
    if n_shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    keys = list(state)
    weight_map = {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        shard = {k: state[k] for k in keys[i::n_shards]}
        torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


def safetensors_bytes(header, data: bytes = b"", header_bytes: bytes | None = None) -> bytes:
    """A safetensors file from a header (any JSON value) and data; an independent writer."""
    raw = json.dumps(header).encode() if header_bytes is None else header_bytes
    return len(raw).to_bytes(8, "little") + raw + data


# Hand-assembled torch pickles, to write layouts torch.save never would. Each helper gives the
# opcodes that push one value; the assembler is checked against torch.load below.
def op_push(value) -> bytes:
    """Opcodes that push a plain value (str, int, tuple, dict): pickle.dumps less PROTO, STOP."""
    return pickle.dumps(value, protocol=2)[2:-1]


def op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def op_call(fn: bytes, *args: bytes) -> bytes:
    return fn + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def op_storage(storage_class: str, key: str, numel: int) -> bytes:
    """A storage reference ('storage', torch.<class>, key, 'cpu', numel), loaded by BINPERSID."""
    pid = [op_push("storage"), op_global("torch", storage_class), op_push(key), op_push("cpu"),
           op_push(numel)]
    return pickle.MARK + b"".join(pid) + pickle.TUPLE + pickle.BINPERSID


def op_tensor(storage: bytes, offset, size, stride) -> bytes:
    hooks = op_call(op_global("collections", "OrderedDict"))
    return op_call(op_global("torch._utils", "_rebuild_tensor_v2"), storage, op_push(offset),
                   op_push(tuple(size)), op_push(tuple(stride)), op_push(False), hooks)


def pickle_dict(items: dict[str, bytes]) -> bytes:
    """A whole protocol-2 pickle of {name: object pushed by the given opcodes}."""
    body = b"".join(op_push(k) + ops for k, ops in items.items())
    return b"\x80\x02" + pickle.EMPTY_DICT + pickle.MARK + body + pickle.SETITEMS + pickle.STOP


def write_torch_zip(path: Path, data_pkl: bytes, records: dict[str, bytes],
                    byteorder: str = "little") -> Path:
    """A torch.save-style zip: archive/data.pkl, archive/byteorder, archive/data/<key>."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", byteorder)
        for key, raw in records.items():
            z.writestr(f"archive/data/{key}", raw)
        z.writestr("archive/version", "3\n")
    return path


def replace_data_pkl(src: Path, data_pkl: bytes, dst: Path) -> Path:
    """A copy of a torch.save zip with its data.pkl replaced (CRCs recomputed)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            is_pkl = info.filename.endswith("/data.pkl")
            zout.writestr(info.filename, data_pkl if is_pkl else zin.read(info))
    return dst


class Payload:
    """An object whose unpickling calls fn(*args): what a malicious .bin carries."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


PAYLOADS = {  # refused global's name -> payload that creates `marker` when unpickled
    "system": lambda marker: Payload(os.system, f"touch {marker}"),  # pickled as posix.system
    "eval": lambda marker: Payload(eval, f"open({str(marker)!r}, 'w').close()"),
    "Popen": lambda marker: Payload(subprocess.Popen, ["touch", str(marker)]),
}


def must_fail_cleanly(read, path: Path) -> None:
    """read(path) may succeed or raise CheckpointError; any other exception fails the test."""
    try:
        read(path)
    except CheckpointError:
        pass


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", params=["gpt2", "opt"])
def layouts(request, make_checkpoint, tmp_path_factory):
    """(torch state dict, {layout: folder}) for one family, the same weights in all four layouts."""
    family = request.param
    folder, model = make_checkpoint(family)
    sharded, _ = make_checkpoint(family, save_kwargs={"max_shard_size": "20KB"})
    state = dict(model.state_dict())
    if family == "gpt2":
        state.update(GPT2_LEGACY_BUFFERS)
    root = tmp_path_factory.mktemp(f"{family}-bin")
    folders = {
        "safetensors": folder,
        "sharded safetensors": sharded,
        "bin": save_bin(state, root / "bin"),
        "sharded bin": save_bin(state, root / "sharded-bin", n_shards=3),
    }
    return state, folders


@pytest.fixture(scope="module")
def small_bin(tmp_path_factory) -> Path:
    """A small torch.save file with float32, int64 and float16 tensors."""
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(3, 4, generator=g), "b": torch.arange(5),
             "h": torch.randn(2, generator=g).half()}
    return save_bin(state, tmp_path_factory.mktemp("small-bin")) / "pytorch_model.bin"


@pytest.fixture(scope="module")
def armed_bin(tmp_path_factory) -> tuple[Path, Path]:
    """(a torch.save file whose dict holds tensors and an os.system payload, its marker file)."""
    folder = tmp_path_factory.mktemp("armed-bin")
    marker = folder / "marker"
    # The payload comes first, so a reader that let it through would run it before any tensor.
    state = {"evil": PAYLOADS["system"](marker), "w": torch.ones(2, 3), "b": torch.arange(4)}
    torch.save(state, folder / "armed.bin")
    return folder / "armed.bin", marker


@pytest.fixture(scope="module")
def small_safetensors(tmp_path_factory) -> Path:
    """A small .safetensors file written by the safetensors library."""
    from safetensors.numpy import save_file

    path = tmp_path_factory.mktemp("small-st") / "model.safetensors"
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4),
               "b": np.arange(3, dtype=np.int64)}
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --------------------------------------------------------------------------- folders and layouts

def test_layouts_are_written_as_named(layouts):
    _, folders = layouts
    assert (folders["safetensors"] / "model.safetensors").is_file()
    assert (folders["bin"] / "pytorch_model.bin").is_file()
    for layout, index, shard_glob in [
            ("sharded safetensors", "model.safetensors.index.json", "*.safetensors"),
            ("sharded bin", "pytorch_model.bin.index.json", "*.bin")]:
        folder = folders[layout]
        assert (folder / index).is_file()
        assert len(list(folder.glob(shard_glob))) >= 3
        assert not any((folder / name).exists() for name in WEIGHT_FILES if name != index)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_matches_torch(layouts, layout):
    state, folders = layouts
    got = read_state_dict(folders[layout])
    # safetensors drops a tied lm_head (it shares the embedding) and non-persistent buffers;
    # .bin keeps everything, the uint8 mask and 0-d scalar of old GPT-2 files included.
    may_be_absent = {"lm_head.weight", *GPT2_LEGACY_BUFFERS} if "safetensors" in layout else set()
    assert set(got) <= set(state)
    assert set(state) - set(got) <= may_be_absent
    for name, array in got.items():
        want = state[name].numpy()
        assert array.dtype == want.dtype and array.shape == want.shape, name
        assert np.array_equal(array, want), name


def test_layouts_agree_with_each_other(layouts):
    _, folders = layouts
    reads = {layout: read_state_dict(folders[layout]) for layout in LAYOUTS}
    assert set(reads["safetensors"]) == set(reads["sharded safetensors"])
    assert set(reads["bin"]) == set(reads["sharded bin"])
    first = reads["safetensors"]
    for layout, got in reads.items():
        for name in set(first) & set(got):
            assert np.array_equal(first[name], got[name]), (layout, name)


def test_safetensors_is_preferred_over_bin(make_checkpoint, tmp_path):
    st_folder, st_model = make_checkpoint("gpt2")
    _, other_model = make_checkpoint("gpt2", seed=1)
    shutil.copy(st_folder / "model.safetensors", tmp_path / "model.safetensors")
    save_bin(other_model.state_dict(), tmp_path)
    got = read_state_dict(tmp_path)
    want = st_model.state_dict()["transformer.wte.weight"].numpy()
    assert np.array_equal(got["transformer.wte.weight"], want)


def test_folder_without_weights_names_what_was_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as err:
        read_state_dict(tmp_path)
    for name in (str(tmp_path), *WEIGHT_FILES, "download"):
        assert name in str(err.value)


def test_read_state_dict_wants_a_folder(small_bin, tmp_path):
    for path in (small_bin, tmp_path / "missing"):
        with pytest.raises(CheckpointError, match="folder"):
            read_state_dict(path)


@pytest.fixture
def sharded_copy(make_checkpoint, tmp_path) -> Path:
    folder, _ = make_checkpoint("opt", save_kwargs={"max_shard_size": "20KB"})
    return Path(shutil.copytree(folder, tmp_path / "sharded"))


def _edit_index(folder: Path, edit) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


def test_sharded_missing_shard(sharded_copy):
    shard = sorted(sharded_copy.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        read_state_dict(sharded_copy)


def test_sharded_index_lists_a_tensor_its_shard_lacks(sharded_copy):
    _edit_index(sharded_copy, lambda wm: wm.update({"ghost.weight": next(iter(wm.values()))}))
    with pytest.raises(CheckpointError, match="ghost.weight"):
        read_state_dict(sharded_copy)


@pytest.mark.parametrize("shard", ["../model.safetensors", "/etc/passwd", ".."])
def test_sharded_index_cannot_leave_the_folder(sharded_copy, shard):
    _edit_index(sharded_copy, lambda wm: wm.update({"x": shard}))
    with pytest.raises(CheckpointError, match="same folder"):
        read_state_dict(sharded_copy)


@pytest.mark.parametrize("text", [
    "{not json", "[1, 2]", '{"weight_map": [1]}', '{"weight_map": {"a": 3}}'])
def test_sharded_index_malformed(sharded_copy, text):
    (sharded_copy / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match="index.json"):
        read_state_dict(sharded_copy)


# --------------------------------------------------------------------------- dtypes

def test_bf16_to_float32_is_exact_for_every_bit_pattern():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)  # [65536] uint16, NaNs and infs too
    want = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    got = bf16_to_float32(bits)
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.fixture(scope="module", params=[torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def half_checkpoint(request, make_checkpoint, tmp_path_factory):
    """(half-precision state dict, {layout: folder}) of the tiny OPT model."""
    _, model = make_checkpoint("opt")
    half = copy.deepcopy(model).to(request.param)
    root = tmp_path_factory.mktemp("half")
    half.save_pretrained(root / "safetensors")
    bin_folder = save_bin(half.state_dict(), root / "bin")
    return half.state_dict(), {"safetensors": root / "safetensors", "bin": bin_folder}


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_half_precision_checkpoints(half_checkpoint, layout):
    state, folders = half_checkpoint
    got = read_state_dict(folders[layout])
    assert len(got) >= len(state) - 1
    for name, array in got.items():
        t = state[name]
        assert t.dtype in (torch.float16, torch.bfloat16)
        if t.dtype == torch.float16:
            assert array.dtype == np.float16 and np.array_equal(array, t.numpy()), name
        else:  # bfloat16 -> float32, exactly
            assert array.dtype == np.float32 and np.array_equal(array, t.float().numpy()), name


def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g) * 100
    tensors = {str(dt).removeprefix("torch."): x.to(dt) for dt in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)}
    tensors["bool"] = x > 0
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.empty(0, 4)
    return tensors


def _want(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def test_safetensors_every_dtype(tmp_path):
    from safetensors.torch import save_file

    tensors = _every_dtype()
    save_file(tensors, str(tmp_path / "all.safetensors"))
    got = read_safetensors(tmp_path / "all.safetensors")
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == _want(t).dtype and np.array_equal(got[name], _want(t)), name
        assert got[name].flags.writeable


def test_bool_bytes_become_clean_bools(tmp_path):
    path = tmp_path / "b.safetensors"
    header = {"m": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}}
    path.write_bytes(safetensors_bytes(header, b"\x00\x01\x02"))
    got = read_safetensors(path)["m"]
    assert got.dtype == np.bool_ and list(got.view(np.uint8)) == [0, 1, 1]


def test_zero_stride_tensors_are_refused_before_allocating(tmp_path):
    """An expanded (stride-0) tensor claims more elements than its storage holds: a hostile
    file could make a 4-byte storage claim terabytes. Refused, so memory stays bounded by
    the file's size."""
    torch.save({"expanded": torch.arange(3.0).expand(4, 3)}, tmp_path / "x.bin")
    with pytest.raises(CheckpointError, match="more elements than its storage"):
        read_pytorch_bin(tmp_path / "x.bin")
    torch.save({"huge": torch.zeros(1).expand(10**6, 10**6)}, tmp_path / "y.bin")
    with pytest.raises(CheckpointError, match="more elements than its storage"):
        read_pytorch_bin(tmp_path / "y.bin", lazy=True)


def test_unexpected_errors_become_checkpoint_errors(monkeypatch, small_safetensors, small_bin):
    """Whatever goes wrong inside a reader, the caller sees CheckpointError naming the file."""
    import minisq.io.checkpoint
    import minisq.io.torch_bin

    def boom(*args):
        raise OverflowError("something nobody anticipated")

    monkeypatch.setattr(minisq.io.checkpoint, "decode", boom)
    monkeypatch.setattr(minisq.io.torch_bin, "decode", boom)
    for read, path in [(read_safetensors, small_safetensors), (read_pytorch_bin, small_bin)]:
        with pytest.raises(CheckpointError, match="OverflowError") as err:
            read(path)
        assert str(path) in str(err.value)


def test_safetensors_arrays_are_independent(small_safetensors):
    first = read_safetensors(small_safetensors)
    first["w"][...] = -1
    again = read_safetensors(small_safetensors)
    assert np.array_equal(again["w"], np.arange(12, dtype=np.float32).reshape(3, 4))


def test_bin_every_dtype_and_strided_tensors(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    strided = {
        "transposed": base.t(),
        "sliced": base[1:, 2:],  # storage offset 8, row stride 6
        "stepped": base[:, ::2],
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }
    # the layouts really are non-contiguous, so the strided path is what gets tested
    assert not strided["transposed"].is_contiguous() and strided["sliced"].storage_offset() == 8
    assert strided["stepped"].stride() == (6, 2)
    tensors = {**_every_dtype(), **strided}
    torch.save(tensors, tmp_path / "x.bin")
    got = read_pytorch_bin(tmp_path / "x.bin")
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        want = _want(t.detach().contiguous())
        assert got[name].dtype == want.dtype and np.array_equal(got[name], want), name
        assert got[name].flags.c_contiguous and got[name].flags.writeable, name
    got["transposed"][...] = -1  # views of one torch storage come back as separate arrays
    assert np.array_equal(got["sliced"], strided["sliced"].numpy())


def test_assembled_pickles_load_in_torch_too(tmp_path):
    """The hand assembler used below writes what torch itself reads: check it on one layout."""
    pkl = pickle_dict({"w": op_tensor(op_storage("FloatStorage", "0", 12), 1, (2, 3), (1, 4))})
    path = write_torch_zip(tmp_path / "a.bin", pkl, {"0": np.arange(12, dtype="<f4").tobytes()})
    want = torch.load(path, weights_only=True)["w"].numpy()
    assert np.array_equal(read_pytorch_bin(path)["w"], want)
    assert np.array_equal(want, [[1, 5, 9], [2, 6, 10]])


def test_bin_big_endian(tmp_path):
    values = np.arange(6, dtype=np.float32) * 1.5
    pkl = pickle_dict({"w": op_tensor(op_storage("FloatStorage", "0", 6), 0, (2, 3), (3, 1))})
    records = {"0": values.astype(">f4").tobytes()}
    path = write_torch_zip(tmp_path / "be.bin", pkl, records, byteorder="big")
    got = read_pytorch_bin(path)["w"]
    assert got.dtype == np.float32 and np.array_equal(got, values.reshape(2, 3))


# --------------------------------------------------------------------------- malicious pickles

def _run_plain(obj, protocol: int) -> None:
    """Unpickle obj with the plain pickle module (which runs the payload), waiting for it."""
    result = pickle.loads(pickle.dumps(obj, protocol=protocol))
    if isinstance(result, subprocess.Popen):
        result.wait()


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL opcodes
@pytest.mark.parametrize("target", PAYLOADS)
def test_malicious_pickle_is_refused(small_bin, tmp_path, target, protocol):
    # The payload is real: a plain unpickler runs it.
    _run_plain(PAYLOADS[target](tmp_path / "armed"), protocol)
    assert (tmp_path / "armed").exists()

    marker = tmp_path / "marker"
    evil = pickle.dumps(PAYLOADS[target](marker), protocol=protocol)
    path = replace_data_pkl(small_bin, evil, tmp_path / "evil.bin")
    with pytest.raises(UnsafePickleError) as err:
        read_pytorch_bin(path)
    message = str(err.value)
    assert target in message and str(path) in message and "nothing was executed" in message
    time.sleep(0.2 if target == "Popen" else 0)  # a spawned touch would have finished by now
    assert not marker.exists()


def test_payload_among_real_tensors_is_refused(armed_bin):
    path, marker = armed_bin
    with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system"):
        read_pytorch_bin(path)
    assert not marker.exists()


def test_stand_ins_cannot_be_rewired(tmp_path, small_bin):
    # BUILD (set attributes) on an allowed global, then use it: refused, and nothing sticks.
    rebuild = op_global("torch._utils", "_rebuild_tensor_v2")
    rewire = rebuild + op_push((None, {"fn": 1})) + pickle.BUILD
    path = write_torch_zip(tmp_path / "b.bin", b"\x80\x02" + rewire + pickle.STOP, {})
    with pytest.raises(CheckpointError, match="set the state"):
        read_pytorch_bin(path)
    assert set(read_pytorch_bin(small_bin)) == {"w", "b", "h"}


# --------------------------------------------------------------------------- corrupt files

@pytest.mark.parametrize("case", [
    "truncated", "not a zip", "legacy", "no data.pkl", "missing record", "record size",
    "past storage", "offset past storage", "negative stride", "rank mismatch", "bad pid",
    "two dtypes", "parameter of a string", "not a dict", "float8",
])
def test_corrupt_bin(small_bin, tmp_path, case):
    path = tmp_path / "bad.bin"
    f32 = np.arange(6, dtype="<f4").tobytes()

    def tensor(key="0", cls="FloatStorage", numel=6, offset=0, size=(2, 3), stride=(3, 1)):
        return op_tensor(op_storage(cls, key, numel), offset, size, stride)

    if case == "truncated":
        path.write_bytes(small_bin.read_bytes()[:-30])
    elif case == "not a zip":
        path.write_bytes(b"hello, I am not a checkpoint")
    elif case == "legacy":
        torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    elif case == "no data.pkl":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/byteorder", "little")
    elif case == "not a dict":
        write_torch_zip(path, b"\x80\x02" + op_push([1, 2]) + pickle.STOP, {})
    else:
        pkl, records = {
            "missing record": (tensor(), {}),
            "record size": (tensor(), {"0": f32[:-4]}),
            "past storage": (tensor(size=(3, 3)), {"0": f32}),
            "offset past storage": (tensor(offset=1), {"0": f32}),
            "negative stride": (tensor(stride=(3, -1)), {"0": f32}),
            "rank mismatch": (tensor(stride=(1,)), {"0": f32}),
            "bad pid": (op_tensor(op_push(("storage", 1)) + pickle.BINPERSID, 0, (1,), (1,)), {}),
            "two dtypes": (tensor() + pickle.POP + tensor(cls="IntStorage"), {"0": f32}),
            "parameter of a string": (op_call(op_global("torch._utils", "_rebuild_parameter"),
                                              op_push("x"), op_push(False), op_push({})), {}),
            "float8": (tensor(cls="Float8_e4m3fnStorage"), {"0": f32}),
        }[case]
        write_torch_zip(path, pickle_dict({"w": pkl}), records)
    with pytest.raises(CheckpointError) as err:
        read_pytorch_bin(path)
    assert type(err.value) is CheckpointError  # not UnsafePickleError: nothing hostile here
    assert str(path) in str(err.value)
    if case == "legacy":
        assert "legacy" in str(err.value)
    if case == "float8":
        assert "Float8_e4m3fnStorage" in str(err.value)


def test_truncated_safetensors(small_safetensors, tmp_path):
    data = small_safetensors.read_bytes()
    n = int.from_bytes(data[:8], "little")
    path = tmp_path / "t.safetensors"
    for cut in (0, 3, 7, 8, 9, 8 + n - 1, 8 + n, 8 + n + 5, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="re-download") as err:
            read_safetensors(path)
        assert str(path) in str(err.value), cut
        if 8 <= cut < 8 + n:  # caught by the header length, before any JSON is read
            assert "says its header is" in str(err.value), cut


GOOD_ENTRY = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}


@pytest.mark.parametrize("header, header_bytes, match", [
    (None, b"\xff" * 8, "header is"),  # a garbage header length, far beyond the file
    (None, b"{not json", "UTF-8 JSON"),
    (None, b'{"w": "\xff\xfe"}', "UTF-8 JSON"),
    ([1, 2], None, "not an object"),
    ({"w": [1]}, None, "not an object"),
    ({"w": {**GOOD_ENTRY, "dtype": "Q8"}}, None, "unknown dtype"),
    ({"w": {**GOOD_ENTRY, "shape": [-2, -3]}}, None, "shape"),
    ({"w": {**GOOD_ENTRY, "shape": [True, 6]}}, None, "shape"),
    ({"w": {**GOOD_ENTRY, "shape": [2.0, 3]}}, None, "shape"),
    ({"w": {**GOOD_ENTRY, "shape": "2x3"}}, None, "shape"),
    ({"w": {**GOOD_ENTRY, "data_offsets": [0, 48]}}, None, "outside"),  # 32 data bytes
    ({"w": {**GOOD_ENTRY, "data_offsets": [24, 0]}}, None, "outside"),
    ({"w": {**GOOD_ENTRY, "data_offsets": [0, 20]}}, None, "needs 24 bytes"),
    ({"w": {**GOOD_ENTRY, "data_offsets": [0, 28]}}, None, "needs 24 bytes"),
    ({"w": {**GOOD_ENTRY, "data_offsets": [0]}}, None, "data_offsets"),
    ({"w": {"dtype": "F32"}}, None, "shape"),
])
def test_corrupt_safetensors(tmp_path, header, header_bytes, match):
    path = tmp_path / "bad.safetensors"
    if header is None and header_bytes == b"\xff" * 8:
        path.write_bytes(header_bytes + b"{}")
    else:
        path.write_bytes(safetensors_bytes(header, bytes(32), header_bytes))
    with pytest.raises(CheckpointError, match=match) as err:
        read_safetensors(path)
    assert str(path) in str(err.value) and "re-download" in str(err.value)


def test_own_safetensors_writer_is_valid(tmp_path):
    """The corrupt cases above differ from a valid file only in what they break."""
    path = tmp_path / "ok.safetensors"
    path.write_bytes(safetensors_bytes({"w": GOOD_ENTRY, "__metadata__": {"format": "pt"}},
                                       np.arange(6, dtype="<f4").tobytes()))
    assert np.array_equal(read_safetensors(path)["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


# --------------------------------------------------------------------------- fuzzing

@FUZZ
@given(data=st.binary(max_size=400))
def test_fuzz_random_bytes(fuzz_dir, data):
    path = fuzz_dir / "random"
    path.write_bytes(data)
    must_fail_cleanly(read_safetensors, path)
    must_fail_cleanly(read_pytorch_bin, path)


@FUZZ
@given(cut=st.floats(0, 1, exclude_max=True))
def test_fuzz_truncation(fuzz_dir, small_safetensors, small_bin, cut):
    for name, src, read in [("st", small_safetensors, read_safetensors),
                            ("bin", small_bin, read_pytorch_bin)]:
        data = src.read_bytes()
        path = fuzz_dir / f"cut-{name}"
        path.write_bytes(data[: int(cut * len(data))])
        with pytest.raises(CheckpointError):
            read(path)


def _flip(data: bytes, where: float, xor: int) -> bytes:
    i = int(where * len(data))
    return data[:i] + bytes([data[i] ^ xor]) + data[i + 1:]


FLIP = dict(where=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))


@FUZZ
@given(**FLIP)
def test_fuzz_safetensors_byte_flips(fuzz_dir, small_safetensors, where, xor):
    path = fuzz_dir / "flip.safetensors"
    path.write_bytes(_flip(small_safetensors.read_bytes(), where, xor))
    must_fail_cleanly(read_safetensors, path)


@FUZZ
@given(**FLIP)
def test_fuzz_bin_byte_flips(fuzz_dir, armed_bin, where, xor):
    src, marker = armed_bin
    path = fuzz_dir / "flip.bin"
    path.write_bytes(_flip(src.read_bytes(), where, xor))
    must_fail_cleanly(read_pytorch_bin, path)
    assert not marker.exists()


@FUZZ
@given(**FLIP)
def test_fuzz_pickle_byte_flips(fuzz_dir, armed_bin, where, xor):
    """Flips inside data.pkl with the zip's CRCs recomputed, so the unpickler sees them."""
    src, marker = armed_bin
    with zipfile.ZipFile(src) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    path = replace_data_pkl(src, _flip(pkl, where, xor), fuzz_dir / "flip-pkl.bin")
    must_fail_cleanly(read_pytorch_bin, path)
    assert not marker.exists()


# --------------------------------------------------------------------------- hub

def test_resolve_local_folder(make_checkpoint):
    folder, _ = make_checkpoint("gpt2")
    assert resolve_model_dir(folder) == folder.resolve()
    assert resolve_model_dir(str(folder)) == folder.resolve()


def test_resolve_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="config.json") as err:
        resolve_model_dir(tmp_path)
    assert "model.safetensors" in str(err.value)


def test_resolve_file_asks_for_the_folder(small_bin):
    with pytest.raises(CheckpointError, match="pass the folder"):
        resolve_model_dir(small_bin)


@pytest.fixture
def no_hub(monkeypatch):
    """Make any snapshot_download call fail the test."""
    import huggingface_hub

    def fail(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)


@pytest.mark.parametrize("name", ["./no/such/folder", "/no/such/folder", "a/b/c"])
def test_missing_path_is_not_sent_to_the_hub(no_hub, name):
    with pytest.raises(CheckpointError, match="no folder"):
        resolve_model_dir(name)


def test_offline_hub_says_how_to_use_a_local_folder(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    for var in ("HF_HOME", "HF_HUB_CACHE"):
        monkeypatch.setenv(var, str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    start = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        resolve_model_dir("gpt2")
    message = str(err.value)
    assert "'gpt2'" in message and "local folder" in message and "synthetic" in message
    assert time.monotonic() - start < 10  # offline means no network timeouts


def _fake_hub(monkeypatch, tmp_path, repo_files: list[str], fail: Exception | None = None) -> list:
    """Replace snapshot_download with one that copies the allowed files of a fake repo.

    The filtering is huggingface_hub's own, so the patterns are tested as the hub applies them.
    """
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append(list(allow_patterns))
        if fail is not None:
            raise fail
        folder = tmp_path / "snapshot" / repo_id
        for name in filter_repo_objects(repo_files, allow_patterns=allow_patterns):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text("{}")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


COMMON = ["config.json", "vocab.json", "merges.txt", "README.md", "flax_model.msgpack",
          "tf_model.h5"]


def test_hub_fetches_safetensors_only(monkeypatch, tmp_path):
    calls = _fake_hub(monkeypatch, tmp_path, [*COMMON, "model.safetensors", "pytorch_model.bin"])
    folder = resolve_model_dir("gpt2")
    assert calls == [HUB_FILES]
    got = sorted(p.name for p in folder.iterdir())
    assert got == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]


def test_hub_falls_back_to_bin_when_no_safetensors(monkeypatch, tmp_path):
    shards = [f"pytorch_model-0000{i}-of-00002.bin" for i in (1, 2)]
    calls = _fake_hub(monkeypatch, tmp_path, [*COMMON, *shards, "pytorch_model.bin.index.json"])
    folder = resolve_model_dir("facebook/opt-13b")
    assert calls == [HUB_FILES, HUB_FILES + HUB_BIN_FILES]
    got = {p.name for p in folder.iterdir()}
    assert {*shards, "pytorch_model.bin.index.json", "config.json"} <= got
    assert not (folder / "tf_model.h5").exists()


@pytest.mark.parametrize("error", [OSError("Network is unreachable"), ValueError("bad repo id")])
def test_hub_errors_become_checkpoint_errors(monkeypatch, tmp_path, error):
    _fake_hub(monkeypatch, tmp_path, [], fail=error)
    with pytest.raises(CheckpointError, match="not found") as err:
        resolve_model_dir("facebook/opt-125m")
    assert "'facebook/opt-125m'" in str(err.value) and str(error) in str(err.value)
    assert err.value.__cause__ is error
