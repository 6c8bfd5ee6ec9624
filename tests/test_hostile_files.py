"""Hostile and damaged files are refused in bounded memory, with a MinisqError naming the file.

Each small file here claims far more than it holds (a 1 GB safetensors header length in a
sparse file, a few KB of deflate that unpacks to hundreds of MB, JSON nested 100,000 deep,
a tensor name given twice); the oracle for "bounded" is tracemalloc's peak of what Python
allocated while the file was refused. A memory-mapped model whose file is truncated under
it must give a CheckpointError, not die of SIGBUS: that runs in a subprocess, together with
a control run with the check switched off that shows the crash the check prevents.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

import minisq
from minisq.errors import CheckpointError
from minisq.io.checkpoint import read_pytorch_bin, read_safetensors, read_state_dict

torch = pytest.importorskip("torch", reason="torch.save writes the .bin files")

ROOT = Path(__file__).resolve().parents[1]
MB = 2 ** 20


def peak_bytes(fn) -> tuple:
    """(peak bytes Python allocated while ``fn()`` ran, the CheckpointError it must raise)."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as err:
            fn()
        return tracemalloc.get_traced_memory()[1], err.value
    finally:
        tracemalloc.stop()


# --- safetensors --------------------------------------------------------------------------------

@pytest.mark.parametrize("lazy", [False, True])
def test_a_1gb_header_length_in_a_sparse_file_is_refused_before_allocating(tmp_path, lazy):
    """The file is sparse: 1 GB long but a few KB on disk, so the length fits in the file."""
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 10 ** 9) + b'{"w": ')
        f.truncate(10 ** 9 + 4096)
    assert os.stat(path).st_blocks * 512 < MB
    peak, err = peak_bytes(lambda: read_safetensors(path, lazy=lazy))
    assert "more than the 100000000" in str(err)
    assert peak < MB


@pytest.mark.parametrize("lazy", [False, True])
def test_a_tensor_named_twice_in_a_header_is_refused(tmp_path, lazy):
    """The reference library refuses it; JSON parsers would silently keep the last entry."""
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [%d, %d]}'
    header = ('{"w": ' + entry % (0, 8) + ', "w": ' + entry % (8, 16) + "}").encode()
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + np.arange(4, dtype=np.float32).tobytes())
    with pytest.raises(CheckpointError, match="'w' appears twice"):
        read_safetensors(path, lazy=lazy)


# --- pytorch_model.bin ----------------------------------------------------------------------------

def _rezip(src: Path, dst: Path, deflate: set, extra: dict | None = None) -> Path:
    """A copy of the zip ``src`` whose records named in ``deflate`` are deflated (and whose
    records in ``extra`` get those bytes appended)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename) + (extra or {}).get(item.filename.split("/", 1)[1], b"")
            method = zipfile.ZIP_DEFLATED if item.filename.split("/", 1)[1] in deflate else zipfile.ZIP_STORED
            zout.writestr(item.filename, data, compress_type=method)
    return dst


@pytest.mark.parametrize("lazy", [False, True])
def test_a_deflated_storage_is_refused_unread_with_how_to_convert(tmp_path, lazy):
    """16 MB of zeros deflate to 16 KB: a few KB of file could claim gigabytes."""
    torch.save({"w": torch.zeros(4 * MB)}, tmp_path / "x.bin")
    bad = _rezip(tmp_path / "x.bin", tmp_path / "z.bin", {"data/0"})
    assert bad.stat().st_size < MB
    peak, err = peak_bytes(lambda: read_pytorch_bin(bad, lazy=lazy))
    assert "compressed" in str(err) and "safetensors" in str(err)
    assert peak < 4 * MB


@pytest.mark.parametrize("lazy", [False, True])
def test_a_huge_deflated_data_pkl_is_refused_before_it_is_unpacked(tmp_path, lazy):
    """The pickle stops at its STOP opcode, so bytes appended after it are ignored by an
    unpickler but unpacked by a reader that trusts the record: 40 MB here."""
    torch.save({"w": torch.ones(3)}, tmp_path / "x.bin")
    bad = _rezip(tmp_path / "x.bin", tmp_path / "p.bin", {"data.pkl"}, {"data.pkl": bytes(40 * MB)})
    peak, err = peak_bytes(lambda: read_pytorch_bin(bad, lazy=lazy))
    assert "data.pkl unpacks to" in str(err)
    assert peak < 4 * MB


def test_a_data_pkl_that_compresses_too_well_is_refused(tmp_path):
    """Under the size cap but at a deflate ratio no pickle of tensors reaches."""
    torch.save({"w": torch.ones(3)}, tmp_path / "x.bin")
    bad = _rezip(tmp_path / "x.bin", tmp_path / "r.bin", {"data.pkl"}, {"data.pkl": bytes(4 * MB)})
    with pytest.raises(CheckpointError, match=r"compresses at most 100:1"):
        read_pytorch_bin(bad)
    ok = _rezip(tmp_path / "x.bin", tmp_path / "ok.bin", {"data.pkl"})   # a deflated pickle of normal ratio
    assert read_pytorch_bin(ok)["w"].tolist() == [1.0, 1.0, 1.0]


# --- JSON files of a model folder -------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_index_json_is_a_checkpoint_error(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ' + DEEP + "}")
    with pytest.raises(CheckpointError, match="index.json is JSON nested too deeply"):
        read_state_dict(tmp_path)


def test_a_json_file_larger_than_the_cap_is_refused_unread(tmp_path):
    path = tmp_path / "model.safetensors.index.json"
    with open(path, "wb") as f:
        f.truncate(200 * MB)                                            # sparse
    peak, err = peak_bytes(lambda: read_state_dict(tmp_path))
    assert "more than the 100000000" in str(err) and peak < MB


def test_deeply_nested_quantize_run_json_is_a_checkpoint_error(make_checkpoint, tmp_path):
    src = make_checkpoint("gpt2")[0]
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "quantize_run.json").write_text(DEEP)
    with pytest.raises(CheckpointError, match="quantize_run.json is unreadable"):
        minisq.quantize_checkpoint(src, dst, [np.arange(8)], progress=False)


# --- a lazily loaded model whose file changes under it ----------------------------------------------

TRUNCATE_AND_RUN = textwrap.dedent("""
    import os, sys
    import numpy as np
    import minisq
    from minisq.io import mapped, storage
    folder, check = sys.argv[1], sys.argv[2] == "check"
    if not check:
        storage.check_mapped = lambda a: None          # the control: no check, as if absent
    model = minisq.load(folder, lazy=True, tokenizer=False)
    before = model(np.arange(5))
    os.truncate(os.path.join(folder, "model.safetensors"), 0)
    try:
        model(np.arange(5))
    except minisq.MinisqError as e:
        print(type(e).__name__, e)
        sys.exit(1)
    print("no error")
""")


def test_a_truncated_file_under_a_lazy_model_is_a_checkpoint_error_not_sigbus(make_checkpoint, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = {}
    for mode in ("check", "control"):
        folder = shutil.copytree(make_checkpoint("opt")[0], tmp_path / mode)
        results[mode] = subprocess.run([sys.executable, "-c", TRUNCATE_AND_RUN, str(folder), mode],
                                       capture_output=True, text=True, env=env, timeout=300, check=False)
    checked = results["check"]
    assert checked.returncode == 1, checked.stderr
    assert checked.stdout.startswith("CheckpointError") and "changed size from" in checked.stdout
    assert "to 0 bytes" in checked.stdout and "load it again" in checked.stdout
    assert results["control"].returncode == -7, results["control"]   # SIGBUS: what the check prevents


@pytest.fixture
def lazy_state(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "m.safetensors"
    save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, str(path))
    from minisq.io.storage import StoredTensor

    elem, a = read_safetensors(path, lazy=True)["w"]
    return path, StoredTensor(a, elem)


def test_a_lazy_tensor_reads_while_its_file_is_unchanged(lazy_state):
    _, t = lazy_state
    np.testing.assert_array_equal(t.materialize(), np.arange(12, dtype=np.float32).reshape(3, 4))
    np.testing.assert_array_equal(t.T.materialize(), np.arange(12, dtype=np.float32).reshape(3, 4).T)


def test_a_lazy_tensor_whose_file_was_rewritten_in_place_is_refused(lazy_state):
    path, t = lazy_state
    data = path.read_bytes()
    st = os.stat(path)
    path.write_bytes(data[:-4] + struct.pack("<f", 99.0))               # same size, new bytes
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    with pytest.raises(CheckpointError, match="was rewritten"):
        t.materialize()


def test_a_lazy_tensor_whose_file_was_replaced_or_removed_is_refused(lazy_state):
    path, t = lazy_state
    data = path.read_bytes()
    path.unlink()
    with pytest.raises(CheckpointError, match="is gone"):
        t.materialize()
    path.write_bytes(data)                                               # a new file, same bytes
    with pytest.raises(CheckpointError, match="replaced by another file"):
        t.materialize()


def test_lazy_bin_records_are_checked_too(tmp_path):
    torch.save({"w": torch.arange(6.0)}, tmp_path / "x.bin")
    from minisq.io.storage import StoredTensor

    elem, a = read_pytorch_bin(tmp_path / "x.bin", lazy=True)["w"]
    t = StoredTensor(a, elem)
    assert t.materialize().tolist() == [0, 1, 2, 3, 4, 5]
    os.truncate(tmp_path / "x.bin", 100)
    with pytest.raises(CheckpointError, match="changed size"):
        t.materialize()
