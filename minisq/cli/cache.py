"""``minisq reproduce``'s cache: one JSON file per (model, variant) result, named by a hash
of everything that changes the number, written whole (temp file + rename) or not at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

from .. import __version__
from .common import say


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything besides the model and the variant that changes a number."""

    alpha: float
    calib_samples: int
    calib_len: int
    eval_tokens: int
    seq_len: int
    lambada_samples: int
    metric: str
    attn_bmm: bool
    seed: int
    minisq_version: str = __version__


def model_key(source: str) -> str:
    """How a model is named in the cache: an existing folder by its absolute path, else
    the hub id as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.is_dir() else str(source)


# Settings a variant's number does not depend on, left out of its key: the float and the
# naive rows are not recomputed when only α or the calibration set changes.
UNUSED_SETTINGS = {
    "fp32": {"alpha", "calib_samples", "calib_len", "seed", "attn_bmm"},
    "naive": {"alpha", "calib_samples", "calib_len", "seed"},
}


def cache_key(model: str, variant: str, settings: Settings) -> dict:
    """What one cached number depends on: the model, the variant and its settings."""
    used = {k: v for k, v in dataclasses.asdict(settings).items() if k not in UNUSED_SETTINGS.get(variant, ())}
    return {"model": model, "variant": variant, **used}


def cache_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", Path(key["model"]).name or key["model"])[:60]
    return cache_dir / f"{slug}__{key['variant']}__{digest}.json"


def read_cached(path: Path, key: dict) -> dict | None:
    """The cached result for ``key``, or None when absent; an unreadable file or one made
    with other settings is ignored (and recomputed), with a line saying so."""
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        if entry.get("key") == key and isinstance(entry.get("result"), dict):
            return entry["result"]
    except (OSError, ValueError):
        pass
    say(f"! ignoring {path.name}: not a finished result of these settings; recomputing it")
    return None


def write_cached(path: Path, key: dict, result: dict) -> None:
    """Written whole or not at all: a temp file in the same folder, then an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "result": result}, indent=1, allow_nan=True))
    os.replace(tmp, path)

