"""Memory-mapped checkpoint files that remember which file they map, so a file changed under
a lazily loaded model gives a :class:`~minisq.errors.CheckpointError` instead of a crash.

A memory map reads the file's pages when an array is touched. If the file has been
truncated since, touching a page past its new end kills the process with SIGBUS (exit
code -7, no message, no traceback). So every map records the file's identity when it is
opened (device, inode, size, modification time) and :func:`check_mapped` compares it with
the file as it is now before a stored tensor is read (:meth:`minisq.io.storage.StoredTensor.materialize`
calls it, once per tensor of each layer). A file truncated, rewritten or replaced since the
model was loaded is refused with a message saying what changed.

What it cannot catch: a file truncated in the moment between the check and the read.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import CheckpointError

# os.stat_result fields that identify a file and its contents' version.
IDENTITY = ("st_dev", "st_ino", "st_size", "st_mtime_ns")


def identity_of(st: os.stat_result) -> tuple:
    """(device, inode, size, mtime in ns) of a stat result."""
    return tuple(getattr(st, field) for field in IDENTITY)


def map_file(f, dtype, offset: int, shape: tuple) -> np.memmap:
    """A read-only memory map of ``shape`` elements of ``dtype`` at byte ``offset`` of the open
    file ``f``, remembering the file's path and identity.  # -> [*shape] dtype"""
    mm = np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape)
    mm.minisq_file = (os.path.abspath(f.name), identity_of(os.fstat(f.fileno())))
    return mm


def _mapping_of(a):
    """The (path, identity) recorded by :func:`map_file` for the map ``a`` views, or None."""
    node = a
    while node is not None:
        found = getattr(node, "minisq_file", None)
        if found is not None:
            return found
        node = getattr(node, "base", None)    # views, reshapes and as_strided all keep a base
    return None


def check_mapped(a) -> None:
    """Raise :class:`CheckpointError` if the file that ``a`` is a memory-mapped view of has
    changed (truncated, rewritten, replaced, deleted) since it was mapped; nothing for arrays
    that are not such views."""
    mapping = _mapping_of(a)
    if mapping is None:
        return
    path, then = mapping
    try:
        now = identity_of(os.stat(path))
    except OSError as e:
        raise CheckpointError(f"{path}, which a lazily loaded model reads its weights from, is gone "
                              f"({e.strerror}): load the model again") from None
    if now == then:
        return
    if now[:2] != then[:2]:
        what = "was replaced by another file"
    elif now[2] != then[2]:
        what = f"changed size from {then[2]} to {now[2]} bytes"
    else:
        what = "was rewritten (its modification time changed)"
    raise CheckpointError(
        f"{path} {what} since the model was loaded lazily from it; its weights are read from the file "
        "as they are needed, so the model cannot go on: load it again")
