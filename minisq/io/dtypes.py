"""Element types of checkpoint files and their conversion to NumPy (shared by the safetensors
and torch ``.bin`` readers): what each stored type is on disk and how it is handed out."""

from __future__ import annotations

import numpy as np

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

CORRUPT = "the file looks truncated or corrupt: re-download it"


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


def is_count(x) -> bool:
    """A non-negative int (JSON's true/false are not counts, though Python calls them ints)."""
    return type(x) is int and x >= 0
