"""Weights kept as the checkpoint stores them: float16, bfloat16, memory-mapped.

Legend: V vocab, C hidden, T tokens.

A 6.7B-parameter model is 13.4 GB in float16 and 27 GB in float32: the float32 copy does
not fit a 24 GB machine. So a model may keep its weights *as stored* and widen them to the
compute dtype only when a layer runs:

* ``dtype="float16"`` keeps float16 arrays; ``dtype="bfloat16"`` keeps bfloat16 as its raw
  16 bits (NumPy has no bfloat16) — both wrapped in :class:`StoredTensor`;
* ``lazy=True`` keeps *memory-mapped views* of the checkpoint file instead: the bytes stay
  on disk (in the page cache once read) and only the layer being computed is in memory.

Every computation happens in the compute dtype (float32 on the CPU: NumPy has no float16
BLAS, and a float16 matmul in NumPy is orders of magnitude slower). :func:`materialize`
turns a part of the parameter tree (one decoder layer, say) into compute-dtype arrays;
widening float16 or bfloat16 to float32 is exact, so a stored model computes exactly what
the float32 model loaded from the same file computes.

Why raw bits for bfloat16 rather than a dtype package (ml_dtypes): bfloat16 is the top
half of a float32, so the only operation minisq needs — widening — is one shift
(``bits << 16``), and keeping it in this file keeps the runtime dependencies at NumPy.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .dtypes import bf16_to_float32
from .mapped import check_mapped

STORAGE_DTYPES = ("float16", "bfloat16", "float32", "float64")
_ELEM_NAMES = {"f2": "float16", "bf16": "bfloat16", "f4": "float32", "f8": "float64"}


@dataclasses.dataclass(frozen=True, eq=False)
class StoredTensor:
    """A float tensor as stored: ``data`` in the stored element type (uint16 bits for
    bfloat16), possibly a read-only memory-mapped view, and possibly to be transposed
    (OPT's ``nn.Linear`` weights are ``[out, in]`` on disk, ``[in, out]`` in minisq).

    It has a ``shape`` (the logical one) but no arithmetic: :meth:`materialize` gives the
    array to compute with. What it holds in memory: nothing beyond ``data`` (a view of the
    file when lazy).
    """

    data: object           # [*stored shape] float16 | uint16 (bfloat16 bits) | float32 | float64
    elem: str              # "f2" | "bf16" | "f4" | "f8"
    transpose: bool = False

    @property
    def shape(self) -> tuple:
        return tuple(reversed(self.data.shape)) if self.transpose else tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def storage_dtype(self) -> str:
        return _ELEM_NAMES[self.elem]

    @property
    def T(self) -> "StoredTensor":
        return dataclasses.replace(self, transpose=not self.transpose)

    def materialize(self, dtype=np.float32) -> np.ndarray:
        """The tensor in ``dtype``: a fresh, contiguous, writable array (exact widening).
        A memory-mapped tensor's file is checked first (:func:`~minisq.io.mapped.check_mapped`):
        one changed since it was loaded gives a CheckpointError rather than a SIGBUS."""
        # [*shape] stored -> [*shape] dtype
        check_mapped(self.data)
        a = self.data.T if self.transpose else self.data
        if self.elem == "bf16":
            a = bf16_to_float32(np.asarray(a))
        return np.array(a, dtype=dtype, order="C", copy=True)

    def __repr__(self) -> str:
        kind = "memory-mapped " if isinstance(getattr(self.data, "base", None), np.memmap) or \
            isinstance(self.data, np.memmap) else ""
        return f"StoredTensor({kind}{self.storage_dtype} {list(self.shape)})"


def is_stored(node) -> bool:
    return isinstance(node, StoredTensor)


def materialize(node, dtype, memo: dict | None = None):
    """A copy of a parameter (sub)tree in which every :class:`StoredTensor` is an array of
    ``dtype``; arrays and everything else are shared, and linear leaves are rebuilt field by
    field. Stored tensors over the same bytes (a tied lm_head is the embedding's transpose)
    become one array and its transposed view, as in an eagerly loaded model. What it holds
    in memory: the widened arrays of ``node`` only (one layer, when called per layer)."""
    memo = {} if memo is None else memo
    if isinstance(node, StoredTensor):
        key = id(node.data)
        if key not in memo:
            memo[key] = dataclasses.replace(node, transpose=False).materialize(dtype)
        return memo[key].T if node.transpose else memo[key]
    if isinstance(node, dict):
        return {k: materialize(v, dtype, memo) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(materialize(v, dtype, memo) for v in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type) and _holds_stored(node):
        return dataclasses.replace(node, **{f.name: materialize(getattr(node, f.name), dtype, memo)
                                            for f in dataclasses.fields(node)})
    return node


def _holds_stored(node) -> bool:
    if isinstance(node, StoredTensor):
        return True
    if isinstance(node, dict):
        return any(_holds_stored(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_holds_stored(v) for v in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return any(_holds_stored(getattr(node, f.name)) for f in dataclasses.fields(node))
    return False

