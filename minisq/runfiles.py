"""The files of a :func:`minisq.quantize_checkpoint` run: its run file, durable writes, the
source's fingerprint and the clean-up. Nothing here knows SmoothQuant; the algorithm is in
:mod:`minisq.pipeline`.

The run file (``quantize_run.json``) holds what the run promises: its arguments (the key),
the fingerprint of the source it read, how many layers are done, whether it is finished, and
the names of its scratch files. Every file is written to ``NAME.tmp``, fsynced, renamed over
``NAME`` and its folder fsynced (:func:`write_durably`), so a kill at any point leaves the
old file or the new one, and a rename is trusted only once it is on disk. The run orders
its writes so that the run file never promises a file that is gone (see
:mod:`minisq.pipeline`): a layer's files and its carry are on disk before the run file
counts the layer, and the previous carry is deleted only after.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import CheckpointError

RUN_FILE = "quantize_run.json"
FORMAT = "minisq-quantize-run-v3"
SAMPLE = 1 << 16     # bytes hashed at each sampled offset of a source file
SAMPLES = 8          # offsets per file: the start, the end and six between


# --------------------------------------------------------------------------------------------
# durable writes


def fsync_dir(folder: Path) -> None:
    """Make the names in ``folder`` (a rename, a deletion) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, write) -> None:
    """``write(tmp_path)`` then fsync it, rename it to ``path`` and fsync the folder: after a
    kill, ``path`` is the old file or the whole new one, and a finished call survives a
    power cut."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, obj) -> None:
    write_durably(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def save_file(tensors: dict, path: Path) -> None:
    """A safetensors file, written durably."""
    import numpy as np
    from safetensors.numpy import save_file as save

    write_durably(path, lambda tmp: save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp)))


def remove(folder: Path, names) -> None:
    """Delete the files ``names`` of ``folder`` that exist (only these names, never a
    pattern), then fsync the folder."""
    gone = False
    for name in names:
        path = folder / name
        if path.is_file():
            path.unlink()
            gone = True
    if gone:
        fsync_dir(folder)


# --------------------------------------------------------------------------------------------
# the source's fingerprint


def file_fingerprint(path: Path) -> dict:
    """Size, mtime and a cheap content hash of one file: sha256 over ``SAMPLE`` bytes at
    ``SAMPLES`` offsets spread over the file (the start holds a safetensors header or a
    config whole; a rewritten tensor anywhere changes the size or mtime, and usually a
    sampled block)."""
    st = path.stat()
    h = hashlib.sha256(str(st.st_size).encode())
    with open(path, "rb") as f:
        last = max(st.st_size - SAMPLE, 0)
        for off in sorted({last * j // (SAMPLES - 1) for j in range(SAMPLES)}):
            f.seek(off)
            h.update(f.read(SAMPLE))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_sampled": h.hexdigest()[:16]}


def source_fingerprint(folder: Path) -> dict:
    """``{file name: file_fingerprint}`` for every file directly in the checkpoint folder."""
    return {p.name: file_fingerprint(p) for p in sorted(folder.iterdir()) if p.is_file()}


def fingerprint_changes(old: dict, new: dict) -> list:
    """What differs between two source fingerprints, in words (empty: the same)."""
    out = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a is None:
            out.append(f"{name} is new")
        elif b is None:
            out.append(f"{name} is gone")
        elif a != b:
            what = [f"size {a.get('size')} -> {b['size']} bytes" if a.get("size") != b["size"] else "",
                    "modified time" if a.get("mtime_ns") != b["mtime_ns"] else "",
                    "content" if a.get("sha256_sampled") != b["sha256_sampled"] else ""]
            out.append(f"{name} changed ({', '.join(w for w in what if w)})")
    return out


# --------------------------------------------------------------------------------------------
# the run file


def read_run(dst: Path, key: dict, source: dict) -> dict | None:
    """The run file of ``dst`` when it belongs to this very run (same key, same source), None
    for a new or empty folder; refuses anything else."""
    run_file = dst / RUN_FILE
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst} is a file: pass a new or empty folder")
    if not dst.exists() or not [p for p in dst.iterdir() if p.name != RUN_FILE + ".tmp"]:
        return None        # new, empty, or killed before its first run file was in place
    if not run_file.is_file():
        raise CheckpointError(
            f"{dst} is not empty and holds no {RUN_FILE}, so it is not a quantize_checkpoint run "
            "to resume: pass a new or empty folder")
    try:
        run = json.loads(run_file.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{run_file} is unreadable ({e}); delete {dst} and start again") from None
    if not isinstance(run, dict) or run.get("key") != key:
        theirs = run.get("key") if isinstance(run, dict) else None
        raise CheckpointError(
            f"{dst} holds a quantize_checkpoint run of other arguments ({_diff(theirs, key)}); "
            "pass another folder, or delete this one to start again")
    changes = fingerprint_changes(run.get("source") or {}, source)
    if changes:
        raise CheckpointError(
            f"the source {key['src']} changed since the run in {dst} began: {'; '.join(changes[:4])}. "
            "Its layers would mix two models: delete the folder and start again")
    done, scratch = run.get("layers_done"), run.get("scratch", [])
    if not (isinstance(done, int) and not isinstance(done, bool) and 0 <= done <= key["layers"]
            and isinstance(scratch, list) and all(isinstance(n, str) and "/" not in n for n in scratch)):
        raise CheckpointError(f"{run_file} is damaged (layers_done={done!r}); delete {dst} and start again")
    return run


def write_run(dst: Path, key: dict, source: dict, layers_done: int, finished: bool = False,
              scratch: list = ()) -> None:
    write_json(dst / RUN_FILE, {"key": key, "source": source, "layers_done": layers_done,
                                "finished": finished, "scratch": list(scratch)})


def _diff(theirs, ours) -> str:
    if not isinstance(theirs, dict):
        return "unreadable"
    keys = [k for k in ours if theirs.get(k) != ours[k]]
    return "; ".join(f"{k}: {theirs.get(k)!r} there, {ours[k]!r} now" for k in keys[:3]) or "format"
