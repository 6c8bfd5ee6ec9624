"""Peak anonymous memory (RssAnon) of reading three small hostile checkpoint files.

    PYTHONPATH=. python3 benchmarks/hostile_files_memory.py [--minisq PATH] [--keep DIR]

The files (built in a temporary folder, a few MB on disk each):

* ``sparse``: a model.safetensors of 12 KB on disk whose header length says 1 GB (the file
  is sparse, 1 GB long, so the length fits inside it);
* ``deflated-storage``: a pytorch_model.bin holding one deflated 1.6 GB storage (1.6 MB);
* ``deflated-pkl``: a pytorch_model.bin whose deflated data.pkl unpacks to 1.5 GB (1.5 MB).

Each is read in a fresh subprocess (``minisq.io.checkpoint.read_state_dict``, eagerly and
lazily) with ``PYTHONPATH`` set to ``--minisq`` (default: this checkout), while this script
samples the child's ``RssAnon`` from /proc every 5 ms and reports the peak above the
child's memory right after import, with the outcome (the error class or "loaded").
"""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

GB = 10 ** 9

CHILD = """
import sys, time
from minisq.io.checkpoint import read_state_dict
print("ready", flush=True); time.sleep(0.3)
try:
    read_state_dict(sys.argv[1], lazy=sys.argv[2] == "lazy")
    print("loaded")
except Exception as e:
    print(type(e).__name__, str(e)[:120])
"""


def sparse_safetensors(folder: Path) -> None:
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", GB) + b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}' + b" " * 12_000)
        f.truncate(GB + 4096)


class _Tensor:
    """Pickles as torch does: _rebuild_tensor_v2(storage, 0, (n,), (1,), False, OrderedDict())."""

    def __init__(self, n):
        self.n = n

    def __reduce__(self):
        import torch

        return torch._utils._rebuild_tensor_v2, (_Storage(self.n), 0, (self.n,), (1,), False, collections.OrderedDict())


class _Storage:
    def __init__(self, n):
        self.n = n


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        import torch

        return ("storage", torch.FloatStorage, "0", "cpu", obj.n) if isinstance(obj, _Storage) else None


def _pickle_of(n: int) -> bytes:
    import io

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(collections.OrderedDict(w=_Tensor(n)))
    return buf.getvalue()


def _stream_zeros(zf: zipfile.ZipFile, name: str, head: bytes, zeros: int) -> None:
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with zf.open(info, "w", force_zip64=True) as f:
        f.write(head)
        chunk = bytes(16 * 2 ** 20)
        for start in range(0, zeros, len(chunk)):
            f.write(chunk[: min(len(chunk), zeros - start)])


def deflated_storage(folder: Path) -> None:
    n = 400_000_000                                                  # 1.6 GB of float32 zeros
    with zipfile.ZipFile(folder / "pytorch_model.bin", "w") as zf:
        zf.writestr("archive/data.pkl", _pickle_of(n))
        zf.writestr("archive/byteorder", "little")
        _stream_zeros(zf, "archive/data/0", b"", 4 * n)


def deflated_pkl(folder: Path) -> None:
    with zipfile.ZipFile(folder / "pytorch_model.bin", "w") as zf:
        _stream_zeros(zf, "archive/data.pkl", _pickle_of(1), 1_500_000_000)   # ignored after STOP
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/data/0", bytes(4))


def _status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def measure(minisq_path: str, folder: Path, mode: str) -> tuple:
    env = {**os.environ, "PYTHONPATH": minisq_path}
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), mode], stdout=subprocess.PIPE, text=True, env=env,
                         cwd=minisq_path)   # -c puts the working folder first on sys.path
    assert p.stdout.readline().strip() == "ready"
    base = _status(p.pid)["RssAnon"]
    peak = base
    while p.poll() is None:
        try:
            peak = max(peak, _status(p.pid)["RssAnon"])
        except (OSError, KeyError):
            break
        time.sleep(0.005)
    outcome = p.stdout.read().strip()
    p.wait()
    return peak - base, outcome, p.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minisq", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--keep", default=None, help="build the files here (and keep them)")
    args = ap.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="hostile-"))
    cases = {"sparse": sparse_safetensors, "deflated-storage": deflated_storage, "deflated-pkl": deflated_pkl}
    for name, build in cases.items():
        folder = root / name
        if not folder.is_dir():
            folder.mkdir(parents=True)
            build(folder)
        on_disk = sum(f.stat().st_blocks * 512 for f in folder.iterdir())
        for mode in ("eager", "lazy"):
            extra, outcome, rc = measure(args.minisq, folder, mode)
            print(f"{name:17s} {on_disk / 2 ** 20:6.2f} MB on disk  {mode:5s}  peak RssAnon +{extra / 2 ** 20:8.1f} MB"
                  f"  rc={rc}  {outcome[:110]}", flush=True)


if __name__ == "__main__":
    main()
