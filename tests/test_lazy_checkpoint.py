"""Memory-mapped (lazy) and as-stored checkpoint reading, and hostile headers."""

import json
import struct
import zipfile

import numpy as np
import pytest

from minisq.io.checkpoint import bf16_to_float32, float32_to_bf16, read_pytorch_bin, read_safetensors, read_state_dict
from minisq.errors import CheckpointError

torch = pytest.importorskip("torch")


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w16": (torch.randn(6, 5, generator=g) * 3).to(torch.float16),
        "wbf": (torch.randn(4, 7, generator=g) * 3).to(torch.bfloat16),
        "w32": torch.randn(3, 3, generator=g),
        "empty": torch.empty(0, 4),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("lazy")
    t = _tensors()
    save_file(t, str(d / "x.safetensors"))
    torch.save(t, d / "x.bin")
    return t, d


@pytest.mark.parametrize("reader,name", [(read_safetensors, "x.safetensors"), (read_pytorch_bin, "x.bin")])
def test_lazy_and_raw_reads_hold_exactly_the_stored_bits(files, reader, name):
    t, d = files
    eager = reader(d / name)
    raw = reader(d / name, raw=True)
    lazy = reader(d / name, lazy=True)
    for key, tensor in t.items():
        elem_r, stored_r = raw[key]
        elem_l, stored_l = lazy[key]
        assert elem_r == elem_l
        np.testing.assert_array_equal(stored_r, stored_l)
        if tensor.dtype == torch.bfloat16:
            assert elem_l == "bf16" and stored_l.dtype == np.uint16
            np.testing.assert_array_equal(stored_l, tensor.view(torch.int16).numpy().view(np.uint16))
            np.testing.assert_array_equal(bf16_to_float32(stored_l), eager[key])
        else:
            np.testing.assert_array_equal(stored_l, tensor.numpy())
    # the lazy arrays are views of the file, not copies in memory
    big = lazy["w16"][1]
    assert not big.flags.writeable and not big.flags.owndata


def test_float32_to_bf16_rounds_to_nearest_even():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(1)) * 100
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3.0e38])])
    want = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)   # torch rounds to nearest even
    np.testing.assert_array_equal(float32_to_bf16(x.numpy()), want)


def _write_safetensors(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("lazy", [False, True])
def test_overlapping_tensors_are_refused_before_reading(tmp_path, lazy):
    """A hostile header can alias one region many times (or claim a tensor larger than the file)."""
    path = tmp_path / "evil.safetensors"
    _write_safetensors(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24))
    with pytest.raises(CheckpointError, match="overlap"):
        read_safetensors(path, lazy=lazy)
    _write_safetensors(path, {"a": {"dtype": "F32", "shape": [10 ** 9], "data_offsets": [0, 4 * 10 ** 9]}}, bytes(16))
    with pytest.raises(CheckpointError, match="outside"):
        read_safetensors(path, lazy=lazy)


@pytest.mark.parametrize("lazy", [False, True])
def test_compressed_bin_is_refused_with_how_to_convert(tmp_path, lazy):
    """torch.save stores its records uncompressed; a deflated one (which could unpack to
    gigabytes from a few KB) is refused, eagerly and lazily, with the way to convert it."""
    torch.save({"w": torch.ones(3, 3)}, tmp_path / "x.bin")
    with zipfile.ZipFile(tmp_path / "x.bin") as src, \
            zipfile.ZipFile(tmp_path / "z.bin", "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item.filename, src.read(item.filename))
    assert read_pytorch_bin(tmp_path / "x.bin", raw=True, lazy=lazy)["w"][1].sum() == 9    # as torch wrote it
    with pytest.raises(CheckpointError, match="compressed.*torch.save.*safetensors"):
        read_pytorch_bin(tmp_path / "z.bin", lazy=lazy)


def test_lazy_state_dict_of_a_sharded_folder(tmp_path):
    from safetensors.torch import save_file

    t = _tensors()
    save_file({"w16": t["w16"]}, str(tmp_path / "a.safetensors"))
    save_file({"w32": t["w32"]}, str(tmp_path / "b.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w16": "a.safetensors", "w32": "b.safetensors"}}))
    got = read_state_dict(tmp_path, lazy=True)
    assert got["w16"][0] == "f2" and got["w32"][0] == "f4"
    np.testing.assert_array_equal(got["w32"][1], t["w32"].numpy())
    (tmp_path / "b.safetensors").write_bytes((tmp_path / "b.safetensors").read_bytes()[:-4])   # truncated shard
    with pytest.raises(CheckpointError, match="b.safetensors"):
        read_state_dict(tmp_path, lazy=True)
