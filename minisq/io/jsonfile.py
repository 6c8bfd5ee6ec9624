"""Read the JSON files of a model folder with bounded memory and a clear error for any damage.

``json.loads`` alone has three ways to surprise: a deeply nested document raises
``RecursionError`` (not a ``ValueError``), a repeated key silently keeps its last value, and
nothing stops a multi-gigabyte file from being read whole. :func:`parse_json` and
:func:`read_json` close all three: the size is checked before a byte is read, a repeated
key is refused (as the reference safetensors library refuses a header that names a tensor
twice), and every failure is the caller's :class:`~minisq.errors.MinisqError` naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CheckpointError

# The largest JSON file (or safetensors header) minisq reads: the reference safetensors
# library's header cap. A real config.json is a few KB; a 400-shard index, a few hundred KB.
MAX_JSON_BYTES = 100_000_000


def _unique_keys(pairs: list) -> dict:
    """object_pairs_hook: a JSON object as a dict, refusing a key given twice."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r:.80} appears twice in one object")
        out[key] = value
    return out


def parse_json(data: bytes, where: str, error=CheckpointError, what: str = "the file looks corrupt"):
    """The JSON value of ``data`` (UTF-8); any damage (bad UTF-8 or JSON, a repeated key,
    nesting too deep to parse) raises ``error`` naming ``where``."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except ValueError as e:          # UnicodeDecodeError, JSONDecodeError, a repeated key
        raise error(f"{where} is not valid JSON (UTF-8 JSON expected: {e}); {what}") from None
    except RecursionError:
        raise error(f"{where} is JSON nested too deeply to read; {what}") from None


def read_json(path: Path | str, error=CheckpointError, what: str = "the file looks corrupt",
              max_bytes: int = MAX_JSON_BYTES):
    """The JSON value of the file at ``path``, read only if it is at most ``max_bytes`` long
    (see :func:`parse_json` for what is refused)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise error(f"{path} is {size} bytes, more than the {max_bytes} a JSON file of a model "
                            f"folder may have; {what}")
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"cannot read {path}: {e}") from None
    return parse_json(data, str(path), error, what)
